"""One training micro-step: normalise, mix, forward, loss, backward, step. The trainer and benchmarks/ both run it.

`engine` is anything with DeepSpeed's engine interface: `engine(video, class_names)` gives logits,
`engine.backward(loss)` scales by the accumulation and back-propagates, `engine.step()` applies the optimizer and the
lr schedule at accumulation boundaries (and is a no-op in between).
"""

from __future__ import annotations

from typing import Any

import torch

from dist_model import normalize_video
from workflows.mixup import mix_batch, soft_cross_entropy


def train_micro_step(engine: Any, batch: dict[str, torch.Tensor], class_names: list[str], train: Any,
                     dtype: torch.dtype, generator: torch.Generator, loss_weight: float = 1.0) -> torch.Tensor:
    """Train on one micro-batch {"frames": uint8 (B, T_d, S, S, 3), "label": (B,)} with the recipe's `train` section
    (mixup/cutmix, label smoothing). `loss_weight` scales what is back-propagated (uneven shares of the global
    batch, workflows/elastic.py). Returns the unweighted loss, detached and still on the device: reading it here
    (`.item()`) would stall a GPU once per forward, so callers sum it and read it when they log."""
    video = normalize_video(batch["frames"], dtype)  # (B, 3, T_d, S, S)
    video, targets = mix_batch(
        video, batch["label"], len(class_names), mixup_alpha=train.mixup_alpha, cutmix_alpha=train.cutmix_alpha,
        prob=train.mix_prob, switch_prob=train.mix_switch_prob, smoothing=train.label_smoothing, generator=generator)
    loss = soft_cross_entropy(engine(video, class_names), targets)
    engine.backward(loss if loss_weight == 1.0 else loss * loss_weight)
    engine.step()
    return loss.detach()
