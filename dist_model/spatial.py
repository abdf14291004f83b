"""The frozen CLIP towers: per-block image tokens for the sparse frames, class-name text embeddings.

CLIP never trains here: its parameters have requires_grad=False, it stays in eval mode whatever the parent
module's mode, and every forward runs under no_grad. It runs only the blocks DiST reads (up to the deepest
tapped block) and only on the sparse frames, which are subsampled before patch embedding (the authors embedded
all dense frames first, a waste of compute with identical results).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn

from dist_model.config import register_clip_configs

# OpenAI CLIP's pixel statistics; every open_clip ViT preset here uses them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # recipe name -> dtype


def normalize_video(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 clips (B, T, H, W, 3) -> CLIP-normalised float (B, 3, T, H, W). Runs on the training device."""
    if frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 clips shaped (B, T, H, W, 3), got {tuple(frames.shape)}")
    mean, std = _clip_stats(frames.device, dtype)
    video = frames.permute(0, 4, 1, 2, 3).to(dtype).div_(255.0)  # (B, 3, T, H, W), a fresh tensor
    return video.sub_(mean).div_(std)


@functools.lru_cache(maxsize=16)
def _clip_stats(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std as (1, 3, 1, 1, 1) tensors on `device`, made once: not a host-to-device copy per batch."""
    mean = torch.tensor(CLIP_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1, 1)
    std = torch.tensor(CLIP_STD, device=device, dtype=dtype).view(1, 3, 1, 1, 1)
    return mean, std


def load_open_clip(arch: str, pretrained: str | None) -> nn.Module:
    """Build an open_clip model: weights by tag ("openai", needs the network or a warm cache), by local file
    (air-gapped clusters), or None for random init (tests, demos)."""
    import open_clip

    register_clip_configs()
    kwargs = {}
    if pretrained and open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu", False):
        kwargs["force_quick_gelu"] = True  # OpenAI's weights were trained with QuickGELU
    try:
        return open_clip.create_model(arch, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise RuntimeError(
            f"could not load CLIP weights {pretrained!r} for {arch}: {exc}. Known tags for {arch}: {tags}. Without "
            "network access, download the weights once and pass the local file path as clip_pretrained."
        ) from exc


def _scalar_parameters_to_buffers(module: nn.Module) -> None:
    """Hold frozen 0-dim parameters (CLIP's logit_scale) as buffers: DeepSpeed's start-up broadcast views every
    parameter as bytes, which fails for 0-dim tensors; a frozen scalar is state, not a parameter, anyway."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.dim() == 0:
                del sub._parameters[name]
                sub.register_buffer(name, param.detach().clone())


# open_clip CLIP attributes used only by encode_text (the image tower is `visual`; logit_scale stays).
_TEXT_TOWER_MODULES = ("transformer", "token_embedding", "ln_final")
_TEXT_TOWER_TENSORS = ("positional_embedding", "text_projection", "attn_mask")


class FrozenCLIP(nn.Module):
    """An open_clip model used read-only: image-block tokens, CLIP image embeddings, text embeddings."""

    def __init__(self, arch: str, pretrained: str | None = None, precision: str = "fp32"):
        super().__init__()
        import open_clip

        self.arch = arch
        self.model = load_open_clip(arch, pretrained)
        self.model.requires_grad_(False)
        _scalar_parameters_to_buffers(self.model)
        self.model.to(PRECISION_DTYPES[precision])
        self.tokenizer = open_clip.get_tokenizer(arch)
        visual = self.model.visual
        if not getattr(visual.transformer, "batch_first", True):
            raise ValueError(f"{arch}: DiST expects open_clip's batch-first transformer blocks")
        self.num_blocks = len(visual.transformer.resblocks)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenCLIP:
        """CLIP stays in eval mode whatever the parent does (no dropout, frozen statistics)."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's learned temperature (log scale); frozen, never optimised."""
        return self.model.logit_scale.detach()

    def compile_forward(self, mode: str | None = None) -> None:
        """torch.compile `forward_tokens` (one graph per tap set). Off by default: on CPU the eager tower already
        runs one fused inference path that inductor's GEMMs did not beat; on a GPU, where small batches are bound
        by the host launching ops, it removes the tower's per-op dispatch."""
        self.forward_tokens = torch.compile(self.forward_tokens, mode=mode)

    @torch.no_grad()
    def forward_tokens(self, frames: torch.Tensor, taps: Iterable[int], stop: int) -> dict[int, torch.Tensor]:
        """Run the image tower on frames (N, 3, H, W) up to block `stop`; return {block: (N, L+1, C)} for `taps`.

        Outputs are the raw residual stream after each block (before `ln_post`), CLS at token 0.
        """
        taps = set(taps)
        visual = self.model.visual
        x = visual._embeds(frames.to(self.dtype))  # (N, L+1, C): patch embed + CLS + pos + ln_pre
        out: dict[int, torch.Tensor] = {}
        for index, block in enumerate(visual.transformer.resblocks[: stop + 1]):
            x = block(x)
            if index in taps:
                out[index] = x
        return out

    @torch.no_grad()
    def image_embedding(self, top_tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's own image embedding (ln_post, pool, proj) from the top block's tokens: (N, L+1, C) -> (N, E)."""
        visual = self.model.visual
        pooled, _ = visual._pool(top_tokens)
        return pooled @ visual.proj if visual.proj is not None else pooled

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text-tower embeddings of tokenised prompts (K, E), unnormalised."""
        if self.text_released:
            raise RuntimeError(
                "the CLIP text tower was released (release_text_tower) after the class embeddings were cached; "
                "embedding new class names needs it: build the model again, or do not release it")
        return self.model.encode_text(tokens)

    @property
    def text_released(self) -> bool:
        return getattr(self, "_text_released", False)

    def release_text_tower(self) -> int:
        """Free the text tower's weights; returns how many values (parameters and the attention-mask buffer) it held.

        Training on a fixed label set reads the text tower once, to cache the class embeddings (TextClassifier); a
        train step never touches it, yet it is 40% of CLIP B/16's weights (63 M of 150 M; L/14: 123 M of 428 M).
        Cache the label sets you need first: a later cache miss raises."""
        model = self.model
        freed = 0
        for name in _TEXT_TOWER_MODULES:
            module = getattr(model, name, None)
            if isinstance(module, nn.Module):
                freed += sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
                setattr(model, name, None)
        for name in _TEXT_TOWER_TENSORS:
            tensor = getattr(model, name, None)
            if isinstance(tensor, torch.Tensor):
                freed += tensor.numel()
                delattr(model, name)
                setattr(model, name, None)
        self._text_released = True
        return freed
