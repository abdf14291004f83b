"""Mixup / CutMix with label smoothing, applied on the training device (reference §4.1).

"Batch" mode as in the reference: one lambda per batch, each clip paired with the batch flipped. The box of
CutMix is the same for every frame, so the dense and sparse streams (one tensor) see identical mixing.
"""

from __future__ import annotations

import math

import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) int -> (B, K) soft targets with `smoothing` spread uniformly."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def mix_batch(
    video: torch.Tensor, labels: torch.Tensor, num_classes: int, *, mixup_alpha: float, cutmix_alpha: float,
    prob: float, switch_prob: float, smoothing: float, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed video (B, 3, T, H, W) and soft targets (B, K). Draws come from `generator` (CPU) for determinism."""

    def uniform() -> float:
        return torch.rand((), generator=generator).item()

    def beta(alpha: float) -> float:
        g1 = torch._standard_gamma(torch.tensor([alpha]), generator=generator).item()
        g2 = torch._standard_gamma(torch.tensor([alpha]), generator=generator).item()
        return g1 / (g1 + g2)

    targets = smooth_one_hot(labels, num_classes, smoothing)
    use_any = (mixup_alpha > 0 or cutmix_alpha > 0) and video.shape[0] > 1
    if not use_any or uniform() >= prob:
        return video, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or uniform() < switch_prob)
    flipped = video.flip(0)
    if use_cutmix:
        lam = beta(cutmix_alpha)
        h, w = video.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(uniform() * h), int(uniform() * w)
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        video = video.clone()
        video[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the box was clipped at the borders: use its real area
    else:
        lam = beta(mixup_alpha)
        video = video * lam + flipped * (1.0 - lam)
    return video, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets, averaged over the batch."""
    return torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
