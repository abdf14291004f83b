"""The temporal encoder: a 3D-conv stem and T-blocks at full dense frame rate (reference §2.3).

Layout throughout: (B, D_t, T_d, g, g), channels-first for Conv3d. No temporal downsampling anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_model.layers import quick_gelu


def build_temporal_stem(dim: int, patch_size: int, temporal_size: int) -> nn.Conv3d:
    """Tokenise the dense clip like the ViT does spatially, keeping every frame: (B,3,T_d,H,W) -> (B,D_t,T_d,g,g)."""
    return nn.Conv3d(
        3, dim, kernel_size=(temporal_size, patch_size, patch_size), stride=(1, patch_size, patch_size),
        padding=(temporal_size // 2, 0, 0),
    )


class TemporalConvPair(nn.Module):
    """Pure temporal conv (k,1,1), QuickGELU, pure spatial conv (1,3,3) (keys `c_fc1`, `c_fc2`)."""

    def __init__(self, dim: int, hidden: int, kernel_size: int):
        super().__init__()
        self.c_fc1 = nn.Conv3d(dim, hidden, (kernel_size, 1, 1), padding=(kernel_size // 2, 0, 0))
        self.c_fc2 = nn.Conv3d(hidden, dim, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_fc2(quick_gelu(self.c_fc1(x)))


class TemporalBlock(nn.Module):
    """Z <- QuickGELU(Z + SpatialConv(QuickGELU(TemporalConv(LN(Z))))): post-activation residual block."""

    def __init__(self, dim: int, mlp_ratio: float, kernel_size: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.temporal_net = TemporalConvPair(dim, int(dim * mlp_ratio), kernel_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.ln(z.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)  # LayerNorm over channels, channels-last
        return quick_gelu(z + self.temporal_net(y))
