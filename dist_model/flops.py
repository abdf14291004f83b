"""Counted compute of one video clip through DiST: GFLOPs of the trainable branch and of the frozen CLIP image
tower, and parameter counts.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; elementwise work
is not counted) over one forward of one video clip (one view). A multiply-add counts as 2 FLOPs, so papers' "GFLOPs"
(which are usually GMACs, the fvcore convention of the reference §2.8) are half these numbers: B/16 8+16f counts
~281 GFLOPs of frozen CLIP and ~45 of the DiST branch here, against the reference's 140.5 and 22.4 GMACs.

The model is built on the meta device (no memory, no arithmetic): only the frozen CLIP is first built for real,
once per architecture, because open_clip's constructor cannot target meta; it is then moved to meta and reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_model.config import DiSTConfig
from dist_model.model import build_clip, build_dist, build_spatial_only
from dist_model.spatial import FrozenCLIP


@dataclass(frozen=True)
class CostPerClip:
    """What one video clip costs a model: counted forward GFLOPs (2 per multiply-add) and parameter counts."""

    dist_gflops: float  # the trainable branch (DiST: temporal encoder, integration, pooling, projection)
    frozen_clip_gflops: float  # the frozen CLIP image tower on the T_s sparse frames, up to the highest block read
    trainable_params: int
    frozen_params: int  # the CLIP towers (image and text)

    @property
    def total_gflops(self) -> float:
        return self.dist_gflops + self.frozen_clip_gflops


@cache
def _meta_frozen_clip(arch: str) -> FrozenCLIP:
    """A randomly initialised CLIP of `arch`, moved to the meta device (FLOPs do not depend on the weights)."""
    cfg = DiSTConfig(clip_arch=arch, fusion_layers=(0,))
    return build_clip(cfg).to("meta")


def count_flops(fn) -> float:
    """FLOPs of calling `fn()`. nn.MultiheadAttention's inference fast path is one fused op the counter does not
    know; with it off, the same attention is counted op by op."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return float(counter.get_total_flops())


def count_cost_per_clip(cfg: DiSTConfig, variant: Literal["dist", "spatial_only"] = "dist") -> CostPerClip:
    """Count the forward compute of one video clip (batch 1, one view) through `variant` built from `cfg`."""
    frozen_clip = _meta_frozen_clip(cfg.clip_arch)
    with torch.device("meta"):
        model = (build_spatial_only if variant == "spatial_only" else build_dist)(cfg, clip=frozen_clip)
    video = torch.empty(1, 3, cfg.num_frames, cfg.image_size, cfg.image_size, device="meta")  # (B, 3, T_d, H, W)
    # The blocks the model reads from CLIP: its fusion layers and the head's CLS block (encode_video stops there).
    taps = set(model.fusion_layers) | {model.head_cls_layer}
    frozen_clip_flops = count_flops(lambda: model.clip.forward_tokens(model.sparse_frames(video), taps, stop=max(taps)))
    total_flops = count_flops(lambda: model.encode_video(video))
    return CostPerClip(dist_gflops=(total_flops - frozen_clip_flops) / 1e9, frozen_clip_gflops=frozen_clip_flops / 1e9,
                       trainable_params=model.num_trainable_params(),
                       frozen_params=sum(p.numel() for p in frozen_clip.parameters()))
