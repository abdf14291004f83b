"""DiST in plain PyTorch: a frozen open_clip ViT, a 3D-conv temporal encoder and an integration branch between them.

Public entry points: `DiSTConfig.from_name(name)`, `build_dist(cfg)`, `build_spatial_only(cfg)`,
`normalize_video(frames)`, `load_authors_checkpoint(model, path)`. This package never imports Ray.
"""

from dist_model.checkpoint import LoadReport, load_authors_checkpoint
from dist_model.config import FUSION_PRESETS, DiSTConfig, fusion_layers_for, presets
from dist_model.model import DiST, DiSTNet, SpatialOnly, build_clip, build_dist, build_spatial_only
from dist_model.spatial import CLIP_MEAN, CLIP_STD, PRECISION_DTYPES, FrozenCLIP, normalize_video

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FUSION_PRESETS",
    "PRECISION_DTYPES",
    "DiST",
    "DiSTConfig",
    "DiSTNet",
    "FrozenCLIP",
    "LoadReport",
    "SpatialOnly",
    "build_clip",
    "build_dist",
    "build_spatial_only",
    "fusion_layers_for",
    "load_authors_checkpoint",
    "normalize_video",
    "presets",
]
