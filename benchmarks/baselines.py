"""The two training baselines DiST's train step is measured against, built from the same CLIP and dist_model parts.

- `FullFineTune`: DiST exactly, except that the CLIP image tower trains too (gradients through every block).
- `STAdapterBaseline`: frozen CLIP with an ST-Adapter before every block and a small head; CLIP's weights never
  change, but the backward still runs through the whole tower (input gradients), as in AIM and ST-Adapter.

These live here, not in `dist_model/`: they exist to be measured (benchmarks/README.md, train_step).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_model import DiST, DiSTConfig, FrozenCLIP
from dist_model.model import SpatialOnlyHead, VideoTextModel


def attention_batch_first(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Self-attention of `attn`'s weights on batch-first (N, L, C) tokens, as `attn(x, x, x)` computes it.

    nn.MultiheadAttention's autograd path transposes batch-first inputs to (L, N, C); a linear on that
    non-contiguous view of a tensor that requires grad makes torch.matmul broadcast the weight to a batched bmm
    (a ~0.7 GB copy per in-projection at B/16), 2-4x slower in bf16. The baselines must not pay for that.
    """
    n, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (N, L, 3C)
    q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # 3 x (N, h, L, C/h)
    out = F.scaled_dot_product_attention(q, k, v)  # (N, h, L, C/h)
    return attn.out_proj(out.transpose(1, 2).reshape(n, length, width))  # (N, L, C)


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock.forward (no mask, self-attention) with `attention_batch_first`."""
    x = x + block.ls_1(attention_batch_first(block.attn, block.ln_1(x)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def clip_tokens_with_grad(
    clip: FrozenCLIP,
    frames: torch.Tensor,
    taps: Iterable[int],
    stop: int,
    adapters: Sequence[nn.Module] | None = None,
    batch: int = 1,
) -> dict[int, torch.Tensor]:
    """`FrozenCLIP.forward_tokens` with autograd on, optionally with `adapters[i]` applied before block i.

    frames: (N, 3, H, W) with N = batch * T (clip-major); returns {block: (N, L+1, C)} for `taps`.
    """
    taps = set(taps)
    visual = clip.model.visual
    x = visual._embeds(frames.to(clip.dtype))  # (N, L+1, C): patch embed + CLS + pos + ln_pre
    out: dict[int, torch.Tensor] = {}
    for index, block in enumerate(visual.transformer.resblocks[: stop + 1]):
        if adapters is not None:
            x = adapters[index](x, batch)
        x = block_forward(block, x)
        if index in taps:
            out[index] = x
    return out


class FullFineTune(DiST):
    """DiST with the CLIP image tower unfrozen: gradients flow through CLIP and its weights are optimised."""

    def __init__(self, cfg: DiSTConfig, clip: FrozenCLIP):
        super().__init__(cfg, clip)
        visual = clip.model.visual
        self.clip_stop = max(set(cfg.layers) | {cfg.head_cls_layer})
        # Unfreeze exactly what the forward uses (ln_post / proj after the top block are never read by DiST's head).
        for module in (visual.conv1, visual.ln_pre, *visual.transformer.resblocks[: self.clip_stop + 1]):
            module.requires_grad_(True)
        visual.class_embedding.requires_grad_(True)
        visual.positional_embedding.requires_grad_(True)

    def _clip_features(self, video: torch.Tensor, to_top: bool) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        layers, cls_layer = self.fusion_layers, self.head_cls_layer
        taps = set(layers) | {cls_layer} | ({self.clip.num_blocks - 1} if to_top else set())
        feats = clip_tokens_with_grad(self.clip, self.sparse_frames(video), taps, stop=max(taps))
        return [feats[i] for i in layers], feats[cls_layer][:, 0], feats


class STAdapter(nn.Module):
    """x + Up(DWConv_t(Down(x))) on (B*T, N+1, C) tokens: a bottleneck with a depthwise (k,1,1) conv that mixes each
    token position across the T frames (ST-Adapter; applied to CLS too, which costs the same)."""

    def __init__(self, width: int, bottleneck: int, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size
        self.down = nn.Linear(width, bottleneck)
        self.conv = nn.Conv3d(
            bottleneck, bottleneck, (kernel_size, 1, 1), padding=(kernel_size // 2, 0, 0), groups=bottleneck
        )
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)  # starts as the identity, as ST-Adapter does
        nn.init.zeros_(self.up.bias)

    def temporal_conv(self, h: torch.Tensor, batch: int) -> torch.Tensor:
        """The depthwise (k,1,1) Conv3d of `self.conv`, computed channels-last as a sum of k time-shifted products:
        identical values, but ~15x faster forward + backward on CPU than PyTorch's grouped Conv3d kernel, which
        would make this baseline look slower than an optimised implementation is."""
        bt, n1, r = h.shape
        frames, pad = bt // batch, self.kernel_size // 2
        h = F.pad(h.view(batch, frames, n1, r), (0, 0, 0, 0, pad, pad))  # (B, T + 2 pad, N+1, r)
        weight = self.conv.weight.view(r, self.kernel_size)  # (r, k)
        out = self.conv.bias + sum(h[:, i : i + frames] * weight[:, i] for i in range(self.kernel_size))
        return out.reshape(bt, n1, r)  # (B*T, N+1, r)

    def forward(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        return x + self.up(self.temporal_conv(self.down(x), batch))  # (B*T, N+1, C)


class AdapterNet(nn.Module):
    """The trainable part of the adapter baseline: one ST-Adapter per CLIP block plus DiST's spatial-only head."""

    def __init__(self, cfg: DiSTConfig, bottleneck: int | None = None):
        super().__init__()
        arch = cfg.arch
        width = arch.width
        self.adapters = nn.ModuleList(STAdapter(width, bottleneck or width // 2) for _ in range(arch.layers))
        self.head = SpatialOnlyHead(cfg)

    def forward(self, video: torch.Tensor, clip_tokens: Sequence[torch.Tensor], clip_cls: torch.Tensor) -> torch.Tensor:
        return self.head(video, clip_tokens, clip_cls)  # (B, E)


class STAdapterBaseline(VideoTextModel):
    """Frozen CLIP + ST-Adapters before every block + a head on the frame-averaged top CLS (B/16: 7.1 M adapter
    params at bottleneck 384, the paper's setting); gradients pass through all frozen blocks."""

    trainable_name = "adapter_net"

    def __init__(self, cfg: DiSTConfig, clip: FrozenCLIP, bottleneck: int | None = None):
        super().__init__(cfg, clip, AdapterNet(cfg, bottleneck))

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Video embeddings (B, E): adapted CLIP on the sparse frames, top-block CLS, trainable head."""
        top = self.clip.num_blocks - 1
        adapters = self.trainable.adapters
        feats = clip_tokens_with_grad(self.clip, self.sparse_frames(video), {top}, top, adapters, video.shape[0])
        return self.trainable(video, [], feats[top][:, 0])
