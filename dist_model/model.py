"""DiST: wires the frozen CLIP, the temporal encoder, the integration branch and the pooling head.

Input video is (B, 3, T_d, H, W), CLIP-normalised (see `normalize_video`). The sparse stream CLIP sees is every
gamma-th dense frame; the temporal encoder sees all T_d. `build_dist(cfg)` is the one constructor.

Module and parameter names follow the authors' `dist_net.*` keys so their checkpoints map one-to-one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_model.config import DiSTConfig, recomputed_layer_count
from dist_model.head import AdaPoolingLayer, TextClassifier, cosine_logits
from dist_model.integration import IntegrationBlock, IntegrationToTemporal, TemporalToIntegration
from dist_model.layers import TOKEN_PARAM_NAMES, for_weights, init_dist_weights
from dist_model.spatial import FrozenCLIP, uses_cuda_graphs
from dist_model.temporal import TemporalBlock, build_temporal_stem


class DiSTNet(nn.Module):
    """The trainable part (the authors' `dist_net`): temporal encoder, integration branch, pooling, projection."""

    def __init__(self, cfg: DiSTConfig):
        super().__init__()
        arch = cfg.arch
        width, dim, tdim = arch.width, cfg.integration_dim, cfg.temporal_dim
        gamma, frames, depth = cfg.sparse_ratio, cfg.sparse_frames, len(cfg.layers)
        self.temporal_stem = build_temporal_stem(tdim, arch.patch_size, cfg.stem_temporal_size)
        self.input_linears = nn.ModuleList(nn.Linear(width, dim) for _ in range(depth))
        self.temporal_nets = nn.ModuleList(
            TemporalBlock(tdim, cfg.temporal_mlp_ratio, cfg.temporal_kernel_size) for _ in range(depth)
        )
        # The last layer's integration->temporal map would feed a temporal stream nothing reads (the authors built it
        # anyway and needed DDP's find_unused_parameters); we build K-1 of them. Its key in their checkpoints is
        # reported as unused by design.
        self.integration2temporal_nets = nn.ModuleList(
            IntegrationToTemporal(dim, tdim, gamma) for _ in range(depth - 1)
        )
        self.temporal2integration_nets = nn.ModuleList(
            TemporalToIntegration(dim, tdim, gamma, frames) for _ in range(depth)
        )
        self.integration_nets = nn.ModuleList(
            IntegrationBlock(dim, cfg.integration_mlp_ratio, cfg.integration_temporal_mlp_ratio,
                             cfg.temporal_kernel_size)
            for _ in range(depth)
        )
        self.adapooling_nets = nn.ModuleList(
            AdaPoolingLayer(dim, dim // cfg.head_dim, frames, cfg.pooling_mlp_ratio)
            for _ in range(cfg.pooling_layers)
        )
        self.aggregated_cls_token = nn.Parameter(torch.empty(1, 1, dim))  # video query q_v
        self.aggregated_spatial_cls_token = nn.Parameter(torch.empty(1, 1, dim))  # frame query q_s
        self.proj_spatial_cls_token = nn.Linear(width, dim)  # the head's CLIP-CLS shortcut
        self.ln_post = nn.LayerNorm(dim)
        self.proj = nn.Parameter(torch.empty(dim, arch.embed_dim))
        self.activation_checkpointing = cfg.activation_checkpointing  # true, false, or the first N fusion layers
        self.apply(init_dist_weights)
        nn.init.trunc_normal_(self.aggregated_cls_token, std=0.02)
        nn.init.trunc_normal_(self.aggregated_spatial_cls_token, std=0.02)
        nn.init.normal_(self.proj, std=dim**-0.5)

    def fusion_layer(
        self, k: int, z: torch.Tensor, tokens: torch.Tensor, residual: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Fusion layer k: (Z_{k-1}', CLIP tokens X^(l_k), R_{k-1}) -> (Z_k' or None after the last, Y_k', R_k)."""
        z = self.temporal_nets[k](z)  # Z_k
        y = self.input_linears[k](for_weights(tokens, self.proj.dtype))  # Y_k = Linear(X^(l_k)) + R_{k-1}
        if residual is not None:
            y = y + residual
        # Simultaneous exchange: both directions read the pre-exchange Y_k and Z_k.
        last = k == len(self.integration_nets) - 1
        z_next = None if last else self.integration2temporal_nets[k].add_to(z, y, batch)  # Z'_k
        y = y + self.temporal2integration_nets[k](z)  # Y'_k: (B*T, N+1, D)
        return z_next, y, self.integration_nets[k](y, batch)  # R_k

    def forward(self, video: torch.Tensor, clip_tokens: Sequence[torch.Tensor], clip_cls: torch.Tensor) -> torch.Tensor:
        """Video embedding (B, E) in CLIP's joint space.

        video: (B, 3, T_d, H, W); clip_tokens: one (B*T, N+1, C) tensor per fusion layer; clip_cls: (B*T, C), the
        CLS of the head's shortcut block.
        """
        batch = video.shape[0]
        wdtype = self.proj.dtype
        z = self.temporal_stem(for_weights(video, wdtype))  # (B, D_t, T_d, g, g)
        residual = None  # R_{k-1}; R_0 = 0
        y = None
        recompute = recomputed_layer_count(self.activation_checkpointing, len(clip_tokens)) \
            if self.training and torch.is_grad_enabled() else 0
        for k, tokens in enumerate(clip_tokens):
            if k < recompute:
                z, y, residual = checkpoint(self.fusion_layer, k, z, tokens, residual, batch, use_reentrant=False)
            else:
                z, y, residual = self.fusion_layer(k, z, tokens, residual, batch)
        tokens = residual + y  # F = R_K + Y'_K: (B*T, N+1, D)

        q_s = self.aggregated_spatial_cls_token.expand(tokens.shape[0], -1, -1)  # (B*T, 1, D)
        q_v = self.aggregated_cls_token.expand(batch, -1, -1)  # (B, 1, D)
        for layer in self.adapooling_nets:
            q_s, q_v = layer(q_s, q_v, tokens, batch)
        cls = clip_cls.to(wdtype).view(batch, -1, clip_cls.shape[-1]).mean(dim=1)  # (B, C): frame-averaged CLS
        emb = self.ln_post(q_v.squeeze(1) + self.proj_spatial_cls_token(cls))  # (B, D)
        return emb @ self.proj  # (B, E)


class SpatialOnlyHead(nn.Module):
    """Baseline head: frame-averaged CLIP CLS -> Linear C->D -> LN -> proj. No temporal modelling at all."""

    def __init__(self, cfg: DiSTConfig):
        super().__init__()
        arch = cfg.arch
        self.proj_spatial_cls_token = nn.Linear(arch.width, cfg.integration_dim)
        self.ln_post = nn.LayerNorm(cfg.integration_dim)
        self.proj = nn.Parameter(torch.empty(cfg.integration_dim, arch.embed_dim))
        self.apply(init_dist_weights)
        nn.init.normal_(self.proj, std=cfg.integration_dim**-0.5)

    def forward(self, video: torch.Tensor, clip_tokens: Sequence[torch.Tensor], clip_cls: torch.Tensor) -> torch.Tensor:
        batch = video.shape[0]
        cls = clip_cls.to(self.proj.dtype).view(batch, -1, clip_cls.shape[-1]).mean(dim=1)  # (B, C)
        return self.ln_post(self.proj_spatial_cls_token(cls)) @ self.proj  # (B, E)


class VideoTextModel(nn.Module):
    """A frozen CLIP plus one trainable module, scored against frozen text embeddings of class names.

    `state_dict()` / `load_state_dict()` cover the trainable module only (keys prefixed with its name, e.g.
    `dist_net.`): the frozen CLIP is rebuilt from its tag, so a B/16 checkpoint is ~100 MB, not ~600 MB.
    """

    trainable_name = "dist_net"

    def __init__(self, cfg: DiSTConfig, clip: FrozenCLIP, trainable: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.clip = clip
        self.add_module(self.trainable_name, trainable)
        # Resolved once: presets and arch lookups stay out of the forward (and out of torch.compile's trace).
        self.fusion_layers, self.head_cls_layer = cfg.layers, cfg.head_cls_layer
        self.num_frames, self.image_size, self.sparse_ratio = cfg.num_frames, cfg.image_size, cfg.sparse_ratio
        self.classifier = TextClassifier(clip.encode_text, clip.tokenizer, cfg.prompt_template)

    @property
    def trainable(self) -> nn.Module:
        return getattr(self, self.trainable_name)

    def compile_trainable(self, mode: str | None = None, fullgraph: bool = False, backend: str = "inductor") -> None:
        """torch.compile the trainable module in place (its state-dict keys do not change): inductor fuses the
        branch's LayerNorms, activations, casts and adds around the matmuls (~15% off DiST's bf16 branch step on
        CPU), and AOTAutograd compiles its backward as one graph too. The frozen CLIP stays eager (see
        `FrozenCLIP.compile_forward`). `mode` is torch.compile's ("reduce-overhead": CUDA graphs on a GPU);
        `fullgraph=True` raises on any graph break instead of running the pieces between breaks eagerly (the
        benchmark uses it: a break would put host dispatch back into the step). On CPU inductor needs a C++
        compiler. `backend` is torch.compile's: "aot_eager" and "eager" trace the same graphs without generating
        kernels (torch's way to find which layer of the compiler a failure comes from)."""
        self.trainable.compile(mode=mode, fullgraph=fullgraph, backend=backend)
        self._trainable_cuda_graphs = uses_cuda_graphs(mode)

    _trainable_cuda_graphs = False

    def _begin_pass(self) -> None:
        """Mark one pass of the model as one CUDA-graph iteration when a part runs as CUDA graphs. Unmarked, torch
        starts a new iteration at every call of a compiled part (without a backward pending) and reclaims the
        previous iteration's outputs: the branch's call would reclaim the frozen CLIP's tokens it is about to read
        ("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run"). A marked pass's
        outputs live until the next pass begins; the trainer and the benchmark read none later (the loss and logits
        are computed outside the compiled parts)."""
        if self._trainable_cuda_graphs or self.clip.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    # --- forward ---
    def sparse_frames(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T_d, H, W) -> the frames CLIP sees, (B*T, 3, H, W), clip-major (row b*T + t)."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video shaped (B, 3, T_d, H, W), got {tuple(video.shape)}")
        if not video.is_floating_point():  # raw 0..255 values taken as normalised ones: wrong logits, no error
            raise ValueError(f"expected a normalised float video, got {video.dtype}: pass uint8 clips (B, T_d, H, W, "
                             f"3) through normalize_video first")
        frames, size = self.num_frames, self.image_size
        if video.shape[2] != frames or video.shape[-1] != size or video.shape[-2] != size:
            raise ValueError(
                f"video {tuple(video.shape)} does not match the model: expected {frames} dense frames of {size}x{size}"
            )
        sparse = video[:, :, :: self.sparse_ratio]  # (B, 3, T, H, W)
        return sparse.transpose(1, 2).flatten(0, 1)  # (B*T, 3, H, W)

    def _clip_features(self, video: torch.Tensor, to_top: bool) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        self._begin_pass()  # every pass starts here, before the frozen CLIP's forward
        layers, cls_layer = self.fusion_layers, self.head_cls_layer
        top = self.clip.num_blocks - 1
        taps = set(layers) | {cls_layer} | ({top} if to_top else set())
        feats = self.clip.forward_tokens(self.sparse_frames(video), taps, stop=max(taps))
        return [feats[i] for i in layers], feats[cls_layer][:, 0], feats

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Video embeddings (B, E) in CLIP's joint space."""
        tokens, cls, _ = self._clip_features(video, to_top=False)
        return self.trainable(video, tokens, cls)

    def text_embeddings(self, class_names: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Cached, L2-normalised class-name embeddings (K, E)."""
        return self.classifier.embeddings(class_names, device or self.trainable_device)

    def forward(
        self, video: torch.Tensor, class_names: Sequence[str], zero_shot_fusion: bool = False
    ) -> torch.Tensor:
        """Logits (B, K) = exp(logit_scale) * cos(video, text). With `zero_shot_fusion` (evaluation on unseen
        label sets), blend with the frozen CLIP's frame-averaged logits using `cfg.zero_shot_weight`."""
        text = self.text_embeddings(class_names, video.device)
        if not zero_shot_fusion:
            return cosine_logits(self.encode_video(video), text, self.clip.logit_scale)
        tokens, cls, feats = self._clip_features(video, to_top=True)
        logits = cosine_logits(self.trainable(video, tokens, cls), text, self.clip.logit_scale)
        clip_logits = self._frame_averaged_clip_logits(feats[self.clip.num_blocks - 1], video.shape[0], text)
        w = self.cfg.zero_shot_weight
        return (1.0 - w) * logits + w * clip_logits

    def clip_logits(self, video: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        """Frozen CLIP alone (zero-shot baseline): per-frame CLIP logits averaged over the sparse frames."""
        text = self.text_embeddings(class_names, video.device)
        top = self.clip.num_blocks - 1
        feats = self.clip.forward_tokens(self.sparse_frames(video), {top}, stop=top)
        return self._frame_averaged_clip_logits(feats[top], video.shape[0], text)

    def _frame_averaged_clip_logits(self, top_tokens: torch.Tensor, batch: int, text: torch.Tensor) -> torch.Tensor:
        frame_emb = self.clip.image_embedding(top_tokens)  # (B*T, E)
        frame_logits = cosine_logits(frame_emb, text, self.clip.logit_scale)  # (B*T, K)
        return frame_logits.view(batch, -1, frame_logits.shape[-1]).mean(dim=1)  # (B, K)

    # --- trainable surface ---
    @property
    def trainable_device(self) -> torch.device:
        return next(self.trainable.parameters()).device

    def num_trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def no_weight_decay(self) -> set[str]:
        """Trainable parameter names (relative to the model) that are never decayed: biases, norms, tokens."""
        names = set()
        for name, param in self.named_parameters():
            if param.requires_grad and (param.ndim < 2 or name.rsplit(".", 1)[-1] in TOKEN_PARAM_NAMES):
                names.add(name)
        return names

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups over trainable parameters only: weights decayed, biases/norms/tokens not; no empty
        group (an empty group breaks DeepSpeed's LR scheduler)."""
        skip = self.no_weight_decay()
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if name in skip else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        return [g for g in groups if g["params"]]

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Trainable weights only (keys `<trainable_name>.*`)."""
        return self.trainable.state_dict(
            destination=destination, prefix=f"{prefix}{self.trainable_name}.", keep_vars=keep_vars
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load trainable weights saved by `state_dict()`; keys outside the trainable module are unexpected."""
        head = f"{self.trainable_name}."
        inner = {k[len(head):]: v for k, v in state_dict.items() if k.startswith(head)}
        outside = [k for k in state_dict if not k.startswith(head)]
        if strict and outside:
            raise RuntimeError(f"unexpected keys outside {head}*: {outside[:5]}{' ...' if len(outside) > 5 else ''}")
        result = self.trainable.load_state_dict(inner, strict=strict, assign=assign)
        result.missing_keys[:] = [head + k for k in result.missing_keys]
        result.unexpected_keys[:] = [head + k for k in result.unexpected_keys] + outside
        return result


class DiST(VideoTextModel):
    """The full DiST model (reference §1)."""

    trainable_name = "dist_net"

    def __init__(self, cfg: DiSTConfig, clip: FrozenCLIP):
        super().__init__(cfg, clip, DiSTNet(cfg))


class SpatialOnly(VideoTextModel):
    """Spatial-only baseline: the same frozen CLIP, frames averaged, only a small head trained."""

    trainable_name = "head"

    def __init__(self, cfg: DiSTConfig, clip: FrozenCLIP):
        super().__init__(cfg, clip, SpatialOnlyHead(cfg))


def build_clip(cfg: DiSTConfig) -> FrozenCLIP:
    """The frozen CLIP towers for a config (weights per `cfg.clip_pretrained`, activation per `cfg.clip_activation`)."""
    return FrozenCLIP(cfg.clip_arch, cfg.clip_pretrained, cfg.clip_precision, cfg.clip_activation)


def build_dist(cfg: DiSTConfig | str, clip: FrozenCLIP | None = None) -> DiST:
    """Build DiST from a config or preset name. Pass `clip` to share one frozen CLIP between models."""
    cfg = DiSTConfig.from_name(cfg) if isinstance(cfg, str) else cfg
    return DiST(cfg, clip if clip is not None else build_clip(cfg))


def build_spatial_only(cfg: DiSTConfig | str, clip: FrozenCLIP | None = None) -> SpatialOnly:
    """Build the spatial-only baseline for the same config (same CLIP, same text classifier)."""
    cfg = DiSTConfig.from_name(cfg) if isinstance(cfg, str) else cfg
    return SpatialOnly(cfg, clip if clip is not None else build_clip(cfg))
