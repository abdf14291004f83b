"""Small building blocks shared by the DiST modules, and the reference initialisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _quick_gelu_grad(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d/dx [x sigmoid(1.702 x)] * grad. With u = 1.702 x, x sigmoid(1.702 x) = silu(u) / 1.702, so the derivative is
    silu'(u): aten's fused silu_backward, two ops (eager, each is a host dispatch) where the written-out formula took
    eight."""
    return torch.ops.aten.silu_backward(grad, 1.702 * x)


class _QuickGELU(torch.autograd.Function):
    """QuickGELU that saves only its input for the backward and recomputes the sigmoid there: autograd's version
    keeps both x and sigmoid(1.702 x), so this halves the activation's saved memory. Same forward values."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _quick_gelu_grad(x, grad)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation, x * sigmoid(1.702 x)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _QuickGELU.apply(x)
    return x * torch.sigmoid(1.702 * x)


# --- linears fused with the LayerNorm or QuickGELU before them ---
# A Linear after a LayerNorm or a QuickGELU would store that op's output for its weight gradient, while the op itself
# stores its own input: two activations per token where one suffices. These fused versions store only the op's input
# (and LayerNorm's per-token statistics) and recompute its output in the backward, one elementwise pass, no matmul;
# they also keep the float32 weight rather than autocast's bf16 copy. At B/16 bf16 batch 1 the step's stored tensors
# went from 231 to 160 MiB (the branch's FFNs, temporal FFNs and pooling MLPs).
def _autocast_on(x: torch.Tensor) -> bool:
    kind = x.device.type
    # No autocast exists on e.g. meta tensors. torch 2.11's dynamo cannot trace that check (the GPU machines' torch),
    # and a compiled step never runs on such a device, so it is made in eager only.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(kind):
        return False
    return torch.is_autocast_enabled(kind)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear computes in here: autocast's when it is on (it would cast both), else the weight's."""
    return torch.get_autocast_dtype(x.device.type) if _autocast_on(x) else weight.dtype


def _linear_backward(ctx, grad: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias_dtype):
    """Gradients of out = inp @ weight.T + bias for the recomputed input `inp` (computed in grad's dtype):
    (grad of inp, of weight, of bias), each None where not needed."""
    dtype = grad.dtype
    grad2 = grad.reshape(-1, grad.shape[-1])
    grad_weight = grad_bias = None
    if ctx.needs_weight_grad:
        grad_weight = (grad2.t() @ inp.to(dtype).reshape(-1, inp.shape[-1])).to(weight.dtype)
    if ctx.needs_bias_grad:
        # Accumulated in float32 (the bias is float32 under autocast); a bf16 sum here also trips an inductor C++
        # codegen bug (torch 2.14) when two of these biases reduce the same gradient (the FFN and temporal FFN).
        # (The accumulation dtype is picked in Python: torch.promote_types would dispatch an aten op per call.)
        acc = torch.float64 if grad2.dtype == torch.float64 else torch.float32
        grad_bias = grad2.sum(0, dtype=acc).to(bias_dtype)
    return grad @ weight.to(dtype), grad_weight, grad_bias


class _LayerNormLinear(torch.autograd.Function):
    """linear(layer_norm(x)) storing x and LayerNorm's statistics, not the normalised tokens."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias):
        shape = (x.shape[-1],)
        normed, mean, rstd = torch.native_layer_norm(x, shape, norm_weight, norm_bias, eps)
        dtype = _compute_dtype(x, weight)
        out = F.linear(normed.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight)
        ctx.eps = eps
        ctx.needs_weight_grad, ctx.needs_bias_grad = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        # One fused kernel (recomputing from the saved statistics would take five elementwise passes)
        normed = torch.native_layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, ctx.eps)[0]
        grad_normed, grad_weight, grad_bias = _linear_backward(ctx, grad, normed, weight, ctx.bias_dtype)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
            grad_normed.to(x.dtype), x, [x.shape[-1]], mean, rstd, norm_weight, norm_bias, mask)
        return grad_x, grad_norm_weight, grad_norm_bias, None, grad_weight, grad_bias


class _QuickGELULinear(torch.autograd.Function):
    """linear(quick_gelu(x)) storing x, not the activation."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype = _compute_dtype(x, weight)
        act = x * torch.sigmoid(1.702 * x)
        out = F.linear(act.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, weight)
        ctx.needs_weight_grad, ctx.needs_bias_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_act, grad_weight, grad_bias = _linear_backward(ctx, grad, quick_gelu(x), weight, ctx.bias_dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _quick_gelu_grad(x, grad_act.to(x.dtype))
        return grad_x, grad_weight, grad_bias


def _stores_for_backward(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def layer_norm_linear(x: torch.Tensor, norm: nn.LayerNorm, weight: torch.Tensor, bias: torch.Tensor | None):
    """F.linear(norm(x), weight, bias), storing x instead of norm(x) for the backward."""
    if _stores_for_backward(x, norm.weight, norm.bias, weight, bias):
        return _LayerNormLinear.apply(x, norm.weight, norm.bias, norm.eps, weight, bias)
    return F.linear(norm(x), weight, bias)


def quick_gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(quick_gelu(x), weight, bias), storing x instead of the activation for the backward."""
    if _stores_for_backward(x, weight, bias):
        return _QuickGELULinear.apply(x, weight, bias)
    return F.linear(quick_gelu(x), weight, bias)


def for_weights(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` as input to a layer whose weights are `dtype`. Under autocast the layer casts its input itself, so casting
    here would only add a copy (a bf16 -> fp32 -> bf16 round trip for bf16 CLIP tokens)."""
    return x if _autocast_on(x) else x.to(dtype)


def temporal_kernel_matrix(conv: nn.Conv3d) -> torch.Tensor:
    """A (k,1,1) Conv3d's weight as a linear's, (C_out, C*k), channel-major with each channel's k time taps side by
    side: a view of the weight, no copy (tap-major would need a transposed copy, and its backward, per layer). The
    conv is then one matmul over channels-last inputs whose k frames are interleaved per channel, (..., C, k)."""
    return conv.weight.flatten(1)


def temporal_conv_channels_last(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """`conv`, a Conv3d with kernel (k, 1, 1), stride 1 and padding (k // 2, 0, 0), on channels-last x (B, T, ..., C)
    -> (B, T, ..., C_out). Same values as the conv on the channels-first layout, as one matmul over the k-frame
    windows of each position: no permutes of the activation, and on CPU ~3x faster than mkldnn's 3D conv backward."""
    k = conv.kernel_size[0]
    if conv.kernel_size[1:] != (1, 1) or conv.stride != (1, 1, 1) or conv.padding != (k // 2, 0, 0):
        raise ValueError(f"expected a (k,1,1) temporal conv with 'same' padding, got {conv}")
    weight = temporal_kernel_matrix(conv)  # (C_out, C*k)
    if k == 1:
        return F.linear(x, weight, conv.bias)
    pad = k // 2
    padded = F.pad(x, (0, 0) * (x.dim() - 2) + (pad, pad))  # zero frames at both ends of T
    # unfold: a view (B, T, ..., C, k) of every frame's k-frame window (one op, where k slices and a cat were k + 1)
    windows = padded.unfold(1, k, 1).flatten(-2)  # (B, T, ..., C*k), channel-major like the weight
    return F.linear(windows, weight, conv.bias)


class Mlp(nn.Module):
    """Linear -> QuickGELU -> Linear, applied per token (keys `c_fc`, `c_proj` as in the authors' release)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """c_proj(quick_gelu(c_fc(x))), or of norm(x) when `norm` is given (fused: norm(x) is not stored)."""
        h = self.c_fc(x) if norm is None else layer_norm_linear(x, norm, self.c_fc.weight, self.c_fc.bias)
        return quick_gelu_linear(h, self.c_proj.weight, self.c_proj.bias)


class CrossAttention(nn.Module):
    """Multi-head attention on PyTorch's fused scaled-dot-product kernel.

    Parameter names match `nn.MultiheadAttention` (`in_proj_weight`, `in_proj_bias`, `out_proj`) so the authors'
    checkpoints load unchanged; inputs are batch-first (B, L, D).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention initialises it

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, lq, d = query.shape
        lk = context.shape[1]
        h = self.num_heads
        w_q, w_kv = self.in_proj_weight.split([d, 2 * d])
        b_q, b_kv = self.in_proj_bias.split([d, 2 * d])
        q = F.linear(query, w_q, b_q).view(b, lq, h, d // h).transpose(1, 2)  # (B, h, Lq, d/h)
        k, v = F.linear(context, w_kv, b_kv).view(b, lk, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, Lk, d/h)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, Lq, d/h)
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, d))


# Parameter names that hold learned tokens or positional embeddings: initialised like weights but never decayed.
TOKEN_PARAM_NAMES = ("cls_token", "positional_embedding", "aggregated_cls_token", "aggregated_spatial_cls_token")


def init_dist_weights(module: nn.Module) -> None:
    """Reference initialisation (§2.7): Linear/Conv weights trunc-normal std 0.02, biases 0; LayerNorm 1/0."""
    if isinstance(module, (nn.Linear, nn.Conv3d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
