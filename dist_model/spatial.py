"""The frozen CLIP towers: per-block image tokens for the sparse frames, class-name text embeddings.

CLIP never trains here: its parameters have requires_grad=False, it stays in eval mode whatever the parent
module's mode, and every forward runs under no_grad. It runs only the blocks DiST reads (up to the deepest
tapped block) and only on the sparse frames, which are subsampled before patch embedding (the authors embedded
all dense frames first, a waste of compute with identical results).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dist_model.checkpoint import looks_like_torch_file
from dist_model.config import check_clip_activation, clip_arch, declared_clip_activation, register_clip_configs

log = logging.getLogger(__name__)

# OpenAI CLIP's pixel statistics; every open_clip ViT preset here uses them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # recipe name -> dtype


def normalize_video(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 clips (B, T, H, W, 3) -> CLIP-normalised float (B, 3, T, H, W). Runs on the training device."""
    if frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 clips shaped (B, T, H, W, 3), got {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:  # a float clip would be scaled by 1/255 again, or an unscaled one taken as is
        raise ValueError(f"expected uint8 clips (0..255), got {frames.dtype}: normalize_video scales and normalises "
                         f"them; a float clip already in CLIP's normalisation goes to the model as it is")
    mean, std = _clip_stats(frames.device, dtype)
    video = frames.permute(0, 4, 1, 2, 3).to(dtype).div_(255.0)  # (B, 3, T, H, W), a fresh tensor
    return video.sub_(mean).div_(std)


@functools.lru_cache(maxsize=16)
def _clip_stats(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std as (1, 3, 1, 1, 1) tensors on `device`, made once: not a host-to-device copy per batch."""
    mean = torch.tensor(CLIP_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1, 1)
    std = torch.tensor(CLIP_STD, device=device, dtype=dtype).view(1, 3, 1, 1, 1)
    return mean, std


# Entries of OpenAI's own CLIP module that no open_clip model has: their presence marks OpenAI's export (its JIT
# archive, or that archive's state_dict saved as a plain file), and every OpenAI CLIP uses QuickGELU.
_OPENAI_EXPORT_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class ClipCheckpoint:
    """What a local CLIP checkpoint file says about itself (`inspect_clip_checkpoint`)."""

    path: str
    evidence: list[tuple[str, str]]  # [(activation, why)]: what the file itself records about its activation
    # The weights, when open_clip's loader cannot read the file as it is (a TorchScript archive; a plain dict with
    # OpenAI's export entries, which its strict load rejects); None: open_clip loads the file itself.
    state_dict: dict[str, torch.Tensor] | None = None


def inspect_clip_checkpoint(path: str, arch: str) -> ClipCheckpoint:
    """Read what a CLIP checkpoint file records about the activation its weights were trained with.

    - A TorchScript archive (OpenAI's distribution format: the .pt files the `openai` tag's URLs serve) holds the
      modules themselves: the type of its blocks' MLP activation is read from it.
    - A plain state dict with OpenAI's export entries (input_resolution, context_length, vocab_size: a JIT
      archive's state_dict saved as a file) is OpenAI's, hence QuickGELU.
    - open_clip's `open_clip_config.json` beside the file (a Hugging Face snapshot downloaded whole) records the
      model config the weights were built with: `quick_gelu: true` when they use it (open_clip writes it when it
      pushes the `openai` weights), GELU otherwise. It counts only if it describes `arch`'s image tower.
    Anything else records nothing: a plain CLIP state dict has the same keys and shapes with either activation."""
    if _is_torchscript_archive(path):
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": it is still OpenAI's format
            warnings.simplefilter("ignore", FutureWarning)
            archive = torch.jit.load(path, map_location="cpu")
        kinds = {_unmangled(m.original_name) for name, m in archive.named_modules()
                 if name.startswith("visual.") and name.endswith(".mlp.gelu")}
        state = dict(archive.state_dict())
        evidence = []
        if kinds in ({"QuickGELU"}, {"GELU"}):
            activation = "quick_gelu" if kinds == {"QuickGELU"} else "gelu"
            evidence.append((activation, f"{path}: a TorchScript archive whose image blocks use {kinds.pop()}"))
        elif all(k in state for k in _OPENAI_EXPORT_KEYS):
            evidence.append(("quick_gelu", f"{path}: OpenAI's TorchScript CLIP archive"))
        return ClipCheckpoint(path, evidence, state)
    keys, state = _checkpoint_keys(path), None
    evidence = []
    if all(k in keys for k in _OPENAI_EXPORT_KEYS):
        evidence.append(("quick_gelu", f"{path}: OpenAI's CLIP state dict (it has OpenAI's "
                                       f"{'/'.join(_OPENAI_EXPORT_KEYS)} entries)"))
        from open_clip.factory import load_state_dict

        state = load_state_dict(path, device="cpu", weights_only=True)
    evidence += _sibling_config_evidence(Path(path), arch)
    return ClipCheckpoint(path, evidence, state)


class ClipWeightsError(ValueError, RuntimeError):
    """The CLIP weights cannot be built as asked: an unknown tag, a missing or unreadable file, another
    architecture's weights, an activation that cannot be decided. The message says which and what to do. (A
    ValueError and a RuntimeError, the two kinds these errors were raised as before.)"""


def _is_torchscript_archive(path: str) -> bool:
    """A torch.jit.save archive: a zip whose top folder holds constants.pkl and code/ (a torch.save zip does not)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        inner = {name.split("/", 1)[-1] for name in archive.namelist()}
    return "constants.pkl" in inner and any(name.startswith("code/") for name in inner)


def _state_dict_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """How `state` differs from `model`'s own state dict: how many keys are missing, unexpected or of another shape,
    with the first few of each (torch's strict-load error lists every name: hundreds). "" when nothing differs."""
    ours = model.state_dict()
    theirs = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    shapes = [(k, tuple(theirs[k].shape), tuple(ours[k].shape)) for k in ours
              if k in theirs and tuple(theirs[k].shape) != tuple(ours[k].shape)]
    parts = [f"{len(names)} {label} key(s) (e.g. {', '.join(names[:3])})"
             for label, names in (("missing", missing), ("unexpected", unexpected)) if names]
    if shapes:
        name, file_shape, our_shape = shapes[0]
        parts.append(f"{len(shapes)} tensor(s) of another shape (e.g. {name}: {list(file_shape)} in the file, "
                     f"{list(our_shape)} here)")
    return "; ".join(parts)


def _unmangled(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


def _checkpoint_keys(path: str) -> set[str]:
    """The tensor names in a checkpoint file, without reading the tensors where the format allows."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    if Path(path).suffix in (".npz", ".npy"):  # big_vision weights: open_clip converts them, no OpenAI marks
        return set()
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, ValueError):  # an old (non-zip) torch.save file cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not looks_like_torch_file(path):  # torch's own message would suggest weights_only=False: wrong here
            raise ClipWeightsError(f"the CLIP checkpoint {path} is not a PyTorch file (torch.save or TorchScript), "
                                   "a safetensors file or big_vision .npz weights: another kind of file, or a "
                                   "truncated download") from None
        raise ClipWeightsError(f"could not read the CLIP checkpoint {path}: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ClipWeightsError(f"{path} holds a {type(obj).__name__}, not a CLIP state dict")
    return {k[len("module."):] if k.startswith("module.") else k for k in obj}


def _sibling_config_evidence(path: Path, arch: str) -> list[tuple[str, str]]:
    """open_clip's open_clip_config.json in the file's folder, if it describes `arch`'s image tower."""
    config_path = path.with_name("open_clip_config.json")
    if not config_path.is_file():
        return []
    model_cfg = json.loads(config_path.read_text(encoding="utf-8")).get("model_cfg")
    ours = clip_arch(arch)
    vision = (model_cfg or {}).get("vision_cfg") or {}
    patch = vision.get("patch_size")
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    if (vision.get("width"), vision.get("layers"), patch) != (ours.width, ours.layers, ours.patch_size):
        return []  # another model's config: it says nothing about this file
    quick = bool(model_cfg.get("quick_gelu", False))
    return [("quick_gelu" if quick else "gelu", f"{config_path} (model_cfg.quick_gelu: {str(quick).lower()})")]


def resolve_clip_activation(
    arch: str, pretrained: str | None, requested: str = "auto", checkpoint: ClipCheckpoint | None = None
) -> tuple[str, str]:
    """The CLIP activation to build, "quick_gelu" or "gelu", and why. Raises ValueError on contradictions, and for
    "auto" with a checkpoint file that records nothing (see `inspect_clip_checkpoint`): never a silent guess."""
    import open_clip

    evidence = declared_clip_activation(arch, pretrained) + (checkpoint.evidence if checkpoint else [])
    check_clip_activation(requested, evidence)
    said = "; ".join(why for _, why in evidence)
    if requested != "auto":
        return requested, "clip_activation: " + requested + (f" (agrees with {said})" if said else "")
    if evidence:
        return evidence[0][0], said
    if checkpoint is None:  # random init: nothing to match, open_clip's default for the architecture
        return "gelu", f"random init; {arch} declares no activation (open_clip's default GELU)"
    variant = f"{arch}-quickgelu"
    alternative = f", or clip_arch {variant}" if variant in open_clip.list_models() else ""
    raise ClipWeightsError(
        f"cannot tell which activation the CLIP weights in {checkpoint.path} were trained with: a plain CLIP state "
        "dict has the same keys whether its blocks used QuickGELU (OpenAI's weights) or GELU (LAION, DataComp and "
        "most open_clip-trained weights), and running them with the other one gives wrong features. Set "
        f"clip_activation: quick_gelu for OpenAI's weights or gelu for GELU-trained ones{alternative}. (OpenAI's own "
        ".pt download, a TorchScript archive, and a Hugging Face snapshot with its open_clip_config.json are "
        "recognised without it.)"
    )


def load_open_clip(arch: str, pretrained: str | None, activation: str = "auto") -> tuple[nn.Module, str, str]:
    """Build an open_clip model with its weights: by tag ("openai", needs the network or a warm cache), by local file
    (air-gapped clusters: an open_clip/OpenAI state dict, safetensors, or OpenAI's TorchScript .pt), or None for
    random init (tests, demos). Returns (model, activation, why): the blocks' activation is resolved by
    `resolve_clip_activation`, so a file gives exactly the tower its tag gives."""
    import open_clip

    register_clip_configs()
    is_tag = bool(pretrained) and bool(open_clip.get_pretrained_cfg(arch, pretrained))
    if pretrained and not is_tag and not os.path.isfile(pretrained):
        raise ClipWeightsError(
            f"could not load CLIP weights {pretrained!r} for {arch}: it is neither a pretrained tag of {arch} "
            f"({open_clip.list_pretrained_tags_by_model(arch) or 'it has none'}) nor a file. Without network access, "
            "download the weights once and pass the local file path as clip_pretrained."
        )
    checkpoint = inspect_clip_checkpoint(pretrained, arch) if pretrained and not is_tag else None
    activation, why = resolve_clip_activation(arch, pretrained, activation, checkpoint)
    # force_quick_gelu, not a quick_gelu model kwarg: open_clip compares the tag's activation with the config's.
    kwargs = {"force_quick_gelu": True} if activation == "quick_gelu" else {}
    if checkpoint is not None and checkpoint.state_dict is not None:
        model = _create_model(arch, None, kwargs)
        _load_exported_state(model, checkpoint.state_dict, checkpoint.path, arch)
    else:
        try:
            model = _create_model(arch, pretrained, kwargs)
        except (RuntimeError, AssertionError) as exc:  # open_clip asserts on some shape changes before loading
            if checkpoint is not None:  # a file that open_clip read, but whose tensors are not this architecture's
                from open_clip.factory import load_state_dict

                empty = _create_model(arch, None, kwargs)
                state = load_state_dict(pretrained, device="cpu", weights_only=True)
                raise ClipWeightsError(_not_this_architecture(pretrained, arch, _state_dict_mismatch(empty, state) or
                                                          str(exc).splitlines()[0])) from exc
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ClipWeightsError(
                f"could not load CLIP weights {pretrained!r} for {arch}: {exc}. Known tags for {arch}: {tags}. "
                "Without network access, download the weights once and pass the local file path as clip_pretrained."
            ) from exc
    built = {type(block.mlp.gelu).__name__ for block in model.visual.transformer.resblocks}
    if built != {"QuickGELU" if activation == "quick_gelu" else "GELU"}:  # open_clip did not build what was resolved
        raise RuntimeError(f"{arch}: resolved activation {activation} ({why}) but open_clip built {sorted(built)}")
    return model, activation, why


class _NoRandomInitWarning(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" whenever it is given no tag, also
    where the weights are loaded right after (OpenAI's exported files, a wrong file being diagnosed): misleading.
    A real random init is said by FrozenCLIP's own log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _create_model(arch: str, pretrained: str | None, kwargs: dict) -> nn.Module:
    import open_clip

    quiet, root = _NoRandomInitWarning(), logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(quiet)
    try:
        return open_clip.create_model(arch, pretrained=pretrained, **kwargs)
    finally:
        root.removeFilter(quiet)


def _load_exported_state(model: nn.Module, state: dict[str, torch.Tensor], path: str, arch: str) -> None:
    """Load OpenAI's exported weights (JIT archive or its state dict) strictly: its extra entries (input_resolution,
    ..., and non-persistent buffers such as the text tower's attention mask) are not weights."""
    transient = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    state = {k: v for k, v in state.items() if k not in _OPENAI_EXPORT_KEYS and k not in transient}
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ClipWeightsError(_not_this_architecture(path, arch, _state_dict_mismatch(model, state) or
                                                  str(exc).splitlines()[0])) from exc


def _not_this_architecture(path: str, arch: str, difference: str) -> str:
    return (f"the CLIP weights in {path} do not fit {arch}: {difference}. Use the file of the preset's CLIP "
            "(model.clip_arch), or a preset whose CLIP the file holds")


def check_clip_weights(arch: str, pretrained: str | None, activation: str = "auto") -> None:
    """Raise what building this CLIP on a worker would raise (ClipWeightsError), before any worker exists. A tag
    is only checked to be one of `arch`'s (the workers fetch it, or find it in their cache); a local file is loaded
    whole into a CPU model here and dropped (seconds, and the file's size in memory for that time: 0.6 GB at B/16,
    1.7 GB at L/14), so a missing, unreadable or truncated file, another architecture's weights and an undecidable
    activation fail at once."""
    import open_clip

    register_clip_configs()
    if not pretrained or open_clip.get_pretrained_cfg(arch, pretrained):
        return
    load_open_clip(arch, pretrained, activation)


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


def uses_cuda_graphs(compile_mode: str | None) -> bool:
    """Whether torch.compile in `compile_mode` captures CUDA graphs (on a GPU; on CPU the modes only compile)."""
    return compile_mode in ("reduce-overhead", "max-autotune")


class FrozenCLIP(nn.Module):
    """An open_clip model used read-only: image-block tokens, CLIP image embeddings, text embeddings.

    `activation` (DiSTConfig.clip_activation): "auto", "quick_gelu" or "gelu"; see `resolve_clip_activation`."""

    def __init__(self, arch: str, pretrained: str | None = None, precision: str = "fp32", activation: str = "auto"):
        super().__init__()
        import open_clip

        self.arch = arch
        # activation: what the blocks run ("quick_gelu" / "gelu"); activation_source: why (tag, file, request).
        self.model, self.activation, self.activation_source = load_open_clip(arch, pretrained, activation)
        log.info("CLIP %s (%s): %s activation, from %s", arch, pretrained or "random init", self.activation,
                 self.activation_source)
        self.model.requires_grad_(False)
        _scalar_parameters_to_buffers(self.model)
        # CLIP's learned temperature (log scale), frozen: read before the cast, which would round it (bf16 holds
        # ln 100 as 4.594, a scale of 98.9, not 100).
        self.logit_scale = float(self.model.logit_scale)
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

    cuda_graphs = False  # compile_forward in a mode that captures CUDA graphs

    def compile_forward(self, mode: str | None = None, fullgraph: bool = False, backend: str = "inductor") -> None:
        """torch.compile the tower's forward (one graph per tap set; `fullgraph=True`: a graph break raises). Off by
        default: on CPU the eager tower already runs one fused inference path that inductor's GEMMs did not beat; on
        a GPU, where small batches are bound by the host launching ops, it removes the tower's per-op dispatch."""
        self._forward_taps = torch.compile(self._forward_taps, mode=mode, fullgraph=fullgraph, backend=backend)
        self.cuda_graphs = uses_cuda_graphs(mode)

    def forward_tokens(self, frames: torch.Tensor, taps: Iterable[int], stop: int) -> dict[int, torch.Tensor]:
        """Run the image tower on frames (N, 3, H, W) up to block `stop`; return {block: (N, L+1, C)} for `taps`.

        Outputs are the raw residual stream after each block (before `ln_post`), CLS at token 0.
        """
        # The compiled forward takes the taps as a sorted tuple of ints: torch 2.11's dynamo (the GPU machines')
        # fails on a set passed into a compiled function (an internal assertion at `set(taps)`); 2.14's does not.
        return self._forward_taps(frames, tuple(sorted(set(taps))), stop)

    @torch.no_grad()
    def _forward_taps(self, frames: torch.Tensor, taps: tuple[int, ...], stop: int) -> dict[int, torch.Tensor]:
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
