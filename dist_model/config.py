"""DiSTConfig: the model's typed schema, its invariants, the named presets and the fusion-layer presets.

Architecture is data: a preset is a plain `DiSTConfig`; the CLIP weights are a separate choice
(`clip_pretrained`: an open_clip tag such as "openai", a local checkpoint file, or None for random init), and so is
the activation the CLIP blocks were trained with (`clip_activation`, see `declared_clip_activation`).
Knob names map onto the authors' keys (reference §3.2) as noted on each field.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

CLIP_CONFIG_DIR = Path(__file__).parent / "clip_configs"

# Named fusion-layer presets (reference §7.3). Each maps the CLIP depth L to the tapped block indices; every
# preset except `first_half` ends on the top block. Names from the reference's B/16 table are aliases.
FUSION_PRESETS: dict[str, str] = {
    "all": "every block (the released default)",
    "every2": "every 2nd block, ending on the top block",
    "every3": "every 3rd block, ending on the top block",
    "last_half": "the top half of the blocks (B/16: 6..11)",
    "last_third": "the top third of the blocks (B/16: 8..11)",
    "first_half": "the bottom half of the blocks; the head's CLS shortcut still reads the top block",
}
FUSION_ALIASES = {"last6": "last_half", "last4": "last_third", "first6": "first_half"}


def fusion_layers_for(preset: str, depth: int) -> tuple[int, ...]:
    """Block indices of a named fusion preset for a CLIP of `depth` blocks."""
    name = FUSION_ALIASES.get(preset, preset)
    top = depth - 1
    if name == "all":
        return tuple(range(depth))
    if name in ("every2", "every3"):
        step = int(name[-1])
        return tuple(sorted(range(top, -1, -step)))
    if name == "last_half":
        return tuple(range(depth // 2, depth))
    if name == "last_third":
        return tuple(range(depth - max(1, depth // 3), depth))
    if name == "first_half":
        return tuple(range(max(1, depth // 2)))
    valid = ", ".join(list(FUSION_PRESETS) + list(FUSION_ALIASES))
    raise ValueError(f"unknown fusion preset {preset!r}; choose one of {valid} or give a list of block indices")


def recomputed_layer_count(activation_checkpointing: bool | int, depth: int) -> int:
    """The `activation_checkpointing` setting as a number of fusion layers: true = all `depth`, false = 0, N = N."""
    if isinstance(activation_checkpointing, bool):
        return depth if activation_checkpointing else 0
    return min(int(activation_checkpointing), depth)


# The MLP activation of the CLIP blocks. OpenAI trained every CLIP with QuickGELU (x * sigmoid(1.702 x)); LAION,
# DataComp and most other open_clip-trained weights use GELU. Weights run with the other activation give wrong
# features, and nothing in a plain state dict says which one they need. "auto" takes it from what is known for sure
# (the pretrained tag, a `-quickgelu` architecture, or the checkpoint file itself: spatial.inspect_clip_checkpoint)
# and refuses to guess when nothing is.
CLIP_ACTIVATIONS = ("auto", "quick_gelu", "gelu")


def declared_clip_activation(arch: str, pretrained: str | None) -> list[tuple[str, str]]:
    """What the names alone say about the CLIP activation: [(activation, why)], empty when they say nothing.

    The architecture's own config when it sets `quick_gelu` (open_clip's `-quickgelu` variants), and open_clip's
    record for a pretrained tag (each tag is registered with the activation it was trained with: "openai" is
    QuickGELU, the LAION tags GELU). A file path or random init says nothing here."""
    import open_clip

    register_clip_configs()
    found = []
    model_cfg = open_clip.get_model_config(arch) or {}
    if "quick_gelu" in model_cfg:
        quick = bool(model_cfg["quick_gelu"])
        found.append((_activation(quick), f"architecture {arch} (quick_gelu: {str(quick).lower()})"))
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    if tag_cfg:
        quick = bool(tag_cfg.get("quick_gelu", False))
        found.append((_activation(quick), f"open_clip's pretrained tag {pretrained!r} for {arch}"))
    return found


def check_clip_activation(requested: str, evidence: list[tuple[str, str]]) -> None:
    """Raise ValueError when `requested` is not a valid choice, when the evidence disagrees with itself, or when an
    explicit choice contradicts it."""
    if requested not in CLIP_ACTIVATIONS:
        raise ValueError(f"clip_activation must be one of {', '.join(CLIP_ACTIVATIONS)} (got {requested!r})")
    found = {activation for activation, _ in evidence}
    said = "; ".join(f"{why} -> {activation}" for activation, why in evidence)
    if len(found) > 1:
        raise ValueError(f"conflicting CLIP activations: {said}")
    if requested != "auto" and found and requested not in found:
        raise ValueError(
            f"clip_activation {requested!r} contradicts what the CLIP weights were trained with: {said}. Set "
            "clip_activation: auto (or the activation named there), or choose other weights or architecture"
        )


def _activation(quick_gelu: bool) -> str:
    return "quick_gelu" if quick_gelu else "gelu"


@dataclass(frozen=True)
class ClipArch:
    """What DiST needs to know about an open_clip ViT architecture (read from its JSON config, no weights)."""

    name: str
    width: int  # C
    layers: int  # number of transformer blocks
    patch_size: int  # P
    image_size: int
    embed_dim: int  # E, the joint image-text space

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def register_clip_configs() -> None:
    """Make this package's small test/demo CLIP architectures known to open_clip (idempotent)."""
    import open_clip

    if "DiST-Tiny-CLIP" not in open_clip.list_models():
        open_clip.add_model_config(CLIP_CONFIG_DIR)


@cache
def clip_arch(name: str) -> ClipArch:
    """Look up an open_clip architecture by name; raise ValueError if it is unknown or not a plain ViT."""
    import open_clip

    register_clip_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        vits = [m for m in open_clip.list_models() if m.startswith(("ViT-", "DiST-"))]
        raise ValueError(f"unknown open_clip architecture {name!r}; ViT choices include: {', '.join(vits[:30])} ...")
    vision = cfg["vision_cfg"]
    if "timm_model_name" in vision and vision.get("timm_model_name") or not isinstance(vision.get("layers"), int):
        raise ValueError(f"{name!r} is not an open_clip ViT (DiST needs a plain ViT image tower)")
    image_size = vision["image_size"]
    patch_size = vision["patch_size"]
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    patch_size = patch_size if isinstance(patch_size, int) else patch_size[0]
    return ClipArch(name, vision["width"], vision["layers"], patch_size, image_size, cfg["embed_dim"])


@dataclass
class DiSTConfig:
    """Everything that defines a DiST model. Validated on construction (raises ValueError)."""

    # --- spatial encoder: frozen open_clip ViT ---
    clip_arch: str = "ViT-B-16"
    clip_pretrained: str | None = None  # open_clip tag ("openai"), a local checkpoint file, or None = random init
    clip_precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # the frozen towers may run in reduced precision
    # MLP activation of the CLIP blocks: "auto" = what the tag, a -quickgelu architecture or the file itself says
    # (OpenAI's weights: QuickGELU), refusing a plain state dict that says nothing; or "quick_gelu" / "gelu", which
    # must agree with whatever the weights declare. Random init with "auto": the architecture's open_clip default.
    clip_activation: Literal["auto", "quick_gelu", "gelu"] = "auto"
    # --- frames ---
    num_frames: int = 16  # dense frames T_d (DATA.NUM_INPUT_FRAMES)
    sparse_ratio: int = 2  # gamma (DATA.SPARSE_SAMPLE_ALPHA): CLIP sees every gamma-th dense frame
    # --- fusion ---
    fusion_layers: str | tuple[int, ...] = "all"  # a FUSION_PRESETS name or block indices (SELECTED_LAYERS)
    # block whose CLS feeds the head shortcut; None = the last fusion layer (the top block for first_half)
    cls_layer: int | None = None
    # --- widths and depths (reference §3.2) ---
    integration_dim: int = 384  # D (INTEGRATION_DIM)
    temporal_dim: int = 96  # D_t (TEMPORAL_DIM)
    integration_mlp_ratio: float = 1.0  # INTEGRATION_MLP_RATIO
    integration_temporal_mlp_ratio: float = 0.25  # INTEGRATION_TEMPORAL_MLP_RATIO
    temporal_mlp_ratio: float = 1.0  # TEMPORAL_CONV_MLP_RATIO
    temporal_kernel_size: int = 3  # TEMPORAL_KERNEL_SIZE
    stem_temporal_size: int = 5  # T_PATCH_SIZE
    stem_patch_size: int | None = None  # S_PATCH_SIZE; None = the CLIP patch size (they must match)
    pooling_layers: int = 4  # ADA_POOLING_LAYERS
    pooling_mlp_ratio: float = 4.0
    head_dim: int = 64  # attention head width in the pooling layers (heads = D / head_dim)
    # --- text classifier ---
    prompt_template: str = "{}"  # e.g. "a video of a person {}."; "{}" = the bare class name (authors' default)
    zero_shot_weight: float = 0.5  # weight of frozen-CLIP logits when zero-shot fusion is on at evaluation
    # --- memory ---
    # Recompute fusion layers' branch activations in the backward (torch.utils.checkpoint): a recomputed layer stores
    # only its inputs, at the cost of a second forward of that layer per step. true = every fusion layer; an integer
    # N = the first N (the shallowest: their backward runs last, when the deeper layers' activations are already
    # freed, so the recompute adds nothing to the peak). Weights and gradients are unchanged.
    activation_checkpointing: bool | int = False

    def __post_init__(self) -> None:
        if isinstance(self.fusion_layers, list):
            self.fusion_layers = tuple(self.fusion_layers)
        self._check()
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, name: str, value: object) -> None:
        """A field changed after construction is checked as construction checks it, and refused (the old value
        kept) when the config it makes is invalid: a model built from it would otherwise fail later, or not at all."""
        if not self.__dict__.get("_checked"):
            object.__setattr__(self, name, value)
            return
        old = getattr(self, name)
        object.__setattr__(self, name, tuple(value) if name == "fusion_layers" and isinstance(value, list) else value)
        try:
            self._check()
        except ValueError as exc:
            object.__setattr__(self, name, old)
            raise ValueError(f"{exc} (DiSTConfig.{name} = {value!r} refused; to change several fields together, "
                             f"use dataclasses.replace(config, {name}=..., ...))") from None

    def _check(self) -> None:
        if self.clip_precision not in ("fp32", "bf16", "fp16"):  # (the recipe loader checks its Literal; a direct
            # DiSTConfig would otherwise fail at build, with a KeyError)
            raise ValueError(f"clip_precision must be fp32, bf16 or fp16, got {self.clip_precision!r}")
        if isinstance(self.fusion_layers, tuple) and not all(
                isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in self.fusion_layers):  # int(1.5): 1
            raise ValueError(f"fusion_layers takes CLIP block indices (whole numbers) or a preset name, got "
                             f"{list(self.fusion_layers)}")
        arch = clip_arch(self.clip_arch)
        check_clip_activation(self.clip_activation, declared_clip_activation(self.clip_arch, self.clip_pretrained))
        depth = arch.layers
        layers = self.layers  # resolves presets, raising on unknown names
        if not layers:
            raise ValueError("fusion_layers selects no CLIP block")
        if any(b < 0 or b >= depth for b in layers):
            raise ValueError(f"fusion_layers {list(layers)} out of range for {self.clip_arch} (blocks 0..{depth - 1})")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"fusion_layers must be strictly increasing, got {list(layers)}")
        if self.cls_layer is not None and not 0 <= self.cls_layer < depth:
            raise ValueError(f"cls_layer {self.cls_layer} out of range for {self.clip_arch} (0..{depth - 1})")
        if self.stem_patch_size is not None and self.stem_patch_size != arch.patch_size:
            raise ValueError(
                f"stem_patch_size {self.stem_patch_size} must equal the CLIP patch size {arch.patch_size} of "
                f"{self.clip_arch} so the temporal and spatial token grids match (the authors' L/14 configs got this "
                "wrong); set it to null or to the CLIP patch size"
            )
        if arch.image_size % arch.patch_size:
            raise ValueError(f"image size {arch.image_size} is not a multiple of patch size {arch.patch_size}")
        if self.integration_dim <= 0 or self.integration_dim % self.head_dim:
            raise ValueError(
                f"integration_dim must be a positive multiple of head_dim={self.head_dim} (got {self.integration_dim})"
            )
        for name in ("temporal_dim", "pooling_layers", "num_frames", "sparse_ratio", "stem_temporal_size"):
            if getattr(self, name) < (0 if name == "pooling_layers" else 1):
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")
        if self.num_frames % self.sparse_ratio:
            raise ValueError(
                f"num_frames (dense, {self.num_frames}) must be divisible by sparse_ratio ({self.sparse_ratio})"
            )
        for name in ("temporal_kernel_size", "stem_temporal_size"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"{name} must be odd so the temporal length is preserved (got {getattr(self, name)})")
        for name in ("integration_mlp_ratio", "integration_temporal_mlp_ratio", "temporal_mlp_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")
        if "{}" not in self.prompt_template:
            raise ValueError(
                f"prompt_template must contain '{{}}' where the class name goes (got {self.prompt_template!r})"
            )
        recompute = self.activation_checkpointing
        if not isinstance(recompute, bool) and not 0 <= recompute <= len(layers):
            raise ValueError(
                f"activation_checkpointing must be true, false or a number of fusion layers in 0..{len(layers)} "
                f"(got {self.activation_checkpointing})"
            )
        if not 0.0 <= self.zero_shot_weight <= 1.0:
            raise ValueError(f"zero_shot_weight must be in [0, 1] (got {self.zero_shot_weight})")

    # --- derived values ---
    @property
    def arch(self) -> ClipArch:
        return clip_arch(self.clip_arch)

    @property
    def layers(self) -> tuple[int, ...]:
        """The CLIP block indices tapped by the integration branch, in order (K = len)."""
        if isinstance(self.fusion_layers, str):
            return fusion_layers_for(self.fusion_layers, clip_arch(self.clip_arch).layers)
        return tuple(int(b) for b in self.fusion_layers)

    @property
    def head_cls_layer(self) -> int:
        """The CLIP block whose CLS token feeds the head's spatial shortcut."""
        if self.cls_layer is not None:
            return self.cls_layer
        if FUSION_ALIASES.get(self.fusion_layers, self.fusion_layers) == "first_half":
            return self.arch.layers - 1
        return self.layers[-1]

    @property
    def sparse_frames(self) -> int:
        """T_s = T_d / gamma: the frames CLIP sees."""
        return self.num_frames // self.sparse_ratio

    @property
    def image_size(self) -> int:
        return self.arch.image_size

    @property
    def patch_size(self) -> int:
        return self.arch.patch_size

    @classmethod
    def from_name(cls, name: str, **overrides) -> DiSTConfig:
        """A named preset, optionally with field overrides: `DiSTConfig.from_name("dist_b16_k400", num_frames=32)`."""
        table = _presets()
        if name not in table:
            raise ValueError(f"unknown DiST preset {name!r}; choose one of {', '.join(sorted(table))}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown DiSTConfig field(s) {unknown}; valid: {sorted(fields)}")
        return dataclasses.replace(table[name], **overrides)


def _preset(arch: str, frames: int, pooling: int, patch: int | None = None, **kw) -> DiSTConfig:
    return DiSTConfig(clip_arch=arch, num_frames=frames, pooling_layers=pooling, stem_patch_size=patch, **kw)


def _build_presets() -> dict[str, DiSTConfig]:
    presets: dict[str, DiSTConfig] = {}
    # K400 vs SSV2 differ in the model only by the pooling depth (4 vs 2); the flip rule is a data setting.
    for dataset, pooling in (("k400", 4), ("ssv2", 2)):
        for sparse, dense in ((8, 16), (16, 32), (32, 64)):
            presets[f"dist_b16_{dataset}_{sparse}x{dense}f"] = _preset("ViT-B-16", dense, pooling, 16)
        presets[f"dist_b16_{dataset}"] = presets[f"dist_b16_{dataset}_8x16f"]
        # L/14: stem patch 14 (the authors' configs kept 16, a defect: the token grids would not match).
        for sparse, dense in ((8, 16), (32, 64)):
            presets[f"dist_l14_{dataset}_{sparse}x{dense}f"] = _preset("ViT-L-14", dense, pooling, 14)
        presets[f"dist_l14_{dataset}"] = presets[f"dist_l14_{dataset}_32x64f"]
    # CPU-sized variants: tiny for the demo and the tests, small a wider one. Same wiring, narrower widths.
    presets["dist_tiny"] = _preset(
        "DiST-Tiny-CLIP", 8, 1, integration_dim=64, temporal_dim=16, head_dim=32
    )
    presets["dist_small"] = _preset(
        "DiST-Small-CLIP", 16, 2, integration_dim=128, temporal_dim=32, head_dim=32
    )
    return presets


def presets() -> dict[str, DiSTConfig]:
    """All named presets, as copies: changing one changes nothing `from_name` gives later."""
    return {name: dataclasses.replace(cfg) for name, cfg in _presets().items()}


@cache
def _presets() -> dict[str, DiSTConfig]:
    """The presets (built on first use, so importing this module never touches open_clip)."""
    return _build_presets()
