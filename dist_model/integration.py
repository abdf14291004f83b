"""The integration branch and the bidirectional per-layer exchange (reference §2.4).

Token tensors are batch-first and clip-major: (B*T, N+1, D) with row b*T + t, CLS at token 0.
Temporal maps are (B, D_t, T_d, g, g). T = sparse frames, T_d = gamma * T dense frames, N = g*g patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_model.layers import (
    Mlp,
    layer_norm_linear,
    quick_gelu_linear,
    temporal_conv_channels_last,
    temporal_kernel_matrix,
)


class IntegrationToTemporal(nn.Module):
    """Integration tokens -> temporal map: drop CLS, Linear D->D_t, patch grid, nearest upsampling x gamma in time."""

    def __init__(self, dim: int, temporal_dim: int, sparse_ratio: int):
        super().__init__()
        self.sparse_ratio = sparse_ratio
        self.linear_fuse = nn.Linear(dim, temporal_dim)

    def sparse_map(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        """(B*T, N+1, D) -> the map at the sparse frame rate, (B, D_t, T, g, g)."""
        bt, n1, _ = y.shape
        frames, grid = bt // batch, int(round((n1 - 1) ** 0.5))
        x = self.linear_fuse(y[:, 1:])  # (B*T, N, D_t)
        return x.view(batch, frames, grid, grid, -1).permute(0, 4, 1, 2, 3)  # (B, D_t, T, g, g), row-major patches

    def forward(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        return self.sparse_map(y, batch).repeat_interleave(self.sparse_ratio, dim=2)  # (B, D_t, T_d, g, g)

    def add_to(self, z: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
        """z + forward(y, batch), each sparse frame's map broadcast over its gamma dense frames: the same sums,
        without materialising the upsampled map (repeat_interleave's copy and its backward)."""
        b, c, dense = z.shape[:3]
        gamma = self.sparse_ratio
        grouped = z.reshape(b, c, dense // gamma, gamma, *z.shape[3:])  # (B, D_t, T, gamma, g, g)
        return (grouped + self.sparse_map(y, batch).unsqueeze(3)).reshape(z.shape)  # a view where the layout allows


class TemporalToIntegration(nn.Module):
    """Temporal map -> integration tokens: strided Conv3d (gamma,1,1) pools dense to sparse rate, plus a learned
    per-frame CLS token (shape (1, 1, T, D) as in the authors' checkpoints)."""

    def __init__(self, dim: int, temporal_dim: int, sparse_ratio: int, sparse_frames: int):
        super().__init__()
        self.linear_fuse = nn.Conv3d(temporal_dim, dim, (sparse_ratio, 1, 1), stride=(sparse_ratio, 1, 1))
        self.cls_token = nn.Parameter(torch.empty(1, 1, sparse_frames, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, c, dense = z.shape[:3]
        gamma = self.linear_fuse.stride[0]
        t = dense // gamma
        # The strided (gamma,1,1) conv is a linear over each position's gamma consecutive frames: one matmul on
        # channels-last frame groups that lands in token layout (mkldnn's 3D conv backward is ~3x slower on CPU).
        x = z.reshape(b, c, t, gamma, -1).permute(0, 2, 4, 1, 3).reshape(b * t, -1, c * gamma)  # (B*T, N, D_t*gamma)
        x = F.linear(x, temporal_kernel_matrix(self.linear_fuse), self.linear_fuse.bias)  # (B*T, N, D)
        # The CLS joins in the stream's dtype: under autocast a float32 CLS would promote every token to float32.
        cls = self.cls_token.to(x.dtype).expand(b, -1, -1, -1).reshape(b * t, 1, x.shape[-1])  # (B*T, 1, D)
        return torch.cat([cls, x], dim=1)  # (B*T, N+1, D)


class TemporalFFN(nn.Module):
    """Temporal bottleneck over the T sparse frames, run for every token position (CLS included):
    1x1x1 conv D->D_h, (k,1,1) conv D_h->D_h, QuickGELU, 1x1x1 conv D_h->D."""

    def __init__(self, dim: int, hidden: int, kernel_size: int):
        super().__init__()
        self.c_fc1 = nn.Conv3d(dim, hidden, 1)
        self.c_fc2 = nn.Conv3d(hidden, hidden, (kernel_size, 1, 1), padding=(kernel_size // 2, 0, 0))
        self.c_proj = nn.Conv3d(hidden, dim, 1)

    def forward(self, x: torch.Tensor, batch: int, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """TFFN(x), or TFFN(norm(x)) when `norm` is given (fused into the first linear: norm(x) is not stored)."""
        bt, n1, d = x.shape
        t = bt // batch
        # Every conv here runs channels-last as a matmul: the 1x1x1s are per-token linears, the (k,1,1) one a linear
        # over k time-shifted copies. No permute of the activations.
        fc1 = self.c_fc1.weight.flatten(1)
        h = F.linear(x, fc1, self.c_fc1.bias) if norm is None else layer_norm_linear(x, norm, fc1, self.c_fc1.bias)
        h = temporal_conv_channels_last(h.view(batch, t, n1, -1), self.c_fc2)  # (B, T, N+1, D_h)
        return quick_gelu_linear(h.view(bt, n1, -1), self.c_proj.weight.flatten(1), self.c_proj.bias)  # (B*T, N+1, D)


class IntegrationBlock(nn.Module):
    """R = FFN(LN(Y')) + TFFN(LN_t(Y')); no identity term inside (the residual is carried by the branch)."""

    def __init__(self, dim: int, mlp_ratio: float, temporal_mlp_ratio: float, kernel_size: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.ffn = Mlp(dim, int(dim * mlp_ratio))
        self.ln_temporal = nn.LayerNorm(dim)
        self.temporal_ffn = TemporalFFN(dim, int(dim * temporal_mlp_ratio), kernel_size)

    def forward(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        return self.ffn(y, norm=self.ln) + self.temporal_ffn(y, batch, norm=self.ln_temporal)
