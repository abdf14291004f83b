"""Loading a checkpoint into a model for scoring: the one place `evaluate` (on Ray) and `predict` (local) share.

A checkpoint's state.json names the architecture it was trained with (its model section) and the classes it was
trained on; its recipe.yaml holds the rest of the run's recipe, among it the seed a random-init frozen CLIP is
rebuilt from. `read_checkpoint` reads both (from a local directory, a registered model version, or a bucket:
s3://, gs://, ...), `build_eval_model` rebuilds the model with the trained weights, and `model_logits` scores
clips as DiST, as DiST blended with frozen CLIP, or as frozen CLIP alone. Nothing here starts Ray.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from workflows.checkpoints import (
    CorruptCheckpoint,
    fetch_remote_checkpoint,
    find_checkpoint,
    read_recipe,
    read_state,
    read_weights,
    weight_shapes,
)
from workflows.config_loader import ConfigError, drop_removed_keys, from_dict
from workflows.recipe import Recipe, model_config
from workflows.runtime import scratch_dir

Mode = Literal["dist", "fusion", "clip_only"]


# ---------------------------------------------------------------------------------------------------------------
# the checkpoint
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """A checkpoint directory's state.json and recipe.yaml, read (the weights are read when a model is built).
    `directory` is local (a registered model or a checkpoint in a bucket is fetched first); `source` says where the
    checkpoint came from: the directory itself, the `models:/` URI, or the checkpoint's URI in the bucket."""

    directory: Path
    state: dict[str, Any]
    raw_recipe: dict[str, Any]  # recipe.yaml as written ({} when the checkpoint has none)
    source: str = ""

    def __post_init__(self) -> None:
        self.source = self.source or str(self.directory)

    @property
    def model_section(self) -> dict[str, Any]:
        """The recipe's model section the checkpoint was trained with."""
        return self.state["model"]

    @functools.cached_property
    def recipe(self) -> Recipe:
        """recipe.yaml with the checkpoint's own model section. Built on first use: evaluate's `--config` replaces
        recipe.yaml and must not fail on it."""
        return from_dict(Recipe, {**self.raw_recipe, "model": self.model_section})

    def training_seed(self, default: Recipe) -> int:
        """The run's `train.seed` as its recipe.yaml records it, else `default`'s."""
        train = self.raw_recipe.get("train") or {}
        return int(train["seed"]) if "seed" in train else default.train.seed


REGISTRY_SCHEME = "models:/"


def fetch_registered_model(uri: str, tracking_uri: str | None = None) -> Path:
    """Download a registered model version (`models:/NAME/VERSION`, as training registers it) into a new local
    directory, from the MLflow store `tracking_uri` (else MLFLOW_TRACKING_URI)."""
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise ConfigError(f"{uri} lives in an MLflow store: pass --tracking-uri (the training run's, e.g. "
                          "sqlite:///<storage_path>/<run>/mlflow.db or http://<head>:5000) or set MLFLOW_TRACKING_URI")
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, _, version = uri.removeprefix(REGISTRY_SCHEME).partition("/")
    if not name or not version:
        raise ConfigError(f"{uri}: a registered model is named models:/NAME/VERSION (e.g. models:/k710-b16/3)")
    # MLflow's own tqdm bar would land among the command's progress lines (a checkpoint is a few files)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:  # the registry lives in the same store (MLflow's models:/ resolution would use the global registry URI)
        source = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(name, version)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri,
                                                        dst_path=str(scratch_dir("dist-model-"))))
    except MlflowException as exc:
        raise FileNotFoundError(f"{uri} in {tracking_uri}: {exc.message}") from None


def read_checkpoint(path: str | Path, tracking_uri: str | None = None) -> LoadedCheckpoint:
    """The checkpoint at `path`: a checkpoint directory, a run directory (its latest checkpoint), either local or
    in a bucket (s3://, gs://, ...: see `fetch_remote_checkpoint`), or a registered model version
    `models:/NAME/VERSION` (fetched from `tracking_uri`). Raises FileNotFoundError when there is none, ConfigError
    when its state.json names no model, CorruptCheckpoint when one of its files cannot be read (a fetched copy's
    weights are checked here, so the error names where they came from, not the temporary copy)."""
    from workflows.runtime import is_remote, redact_secrets
    from workflows.tracking import repaired_sqlite_uri

    source = str(path)
    fetched = source.startswith(REGISTRY_SCHEME) or is_remote(source)
    if source.startswith(REGISTRY_SCHEME):
        path = fetch_registered_model(source, tracking_uri)
    elif fetched:
        path, source = fetch_remote_checkpoint(source)
        source = redact_secrets(source)  # what is printed and logged
    directory = find_checkpoint(path)
    try:
        state, raw = read_state(directory), read_recipe(directory)
        if fetched:
            weight_shapes(directory)  # the header alone
    except CorruptCheckpoint as exc:
        if not fetched:
            raise
        raise CorruptCheckpoint(str(exc).replace(str(directory), source)) from None
    if "model" not in state:
        raise ConfigError(f"{directory}/state.json has no model section: not a checkpoint of this workflow")
    raw, _ = drop_removed_keys(Recipe, raw)  # a recipe.yaml written before a key was removed still loads
    mlflow = raw.get("mlflow")
    if isinstance(mlflow, dict) and isinstance(mlflow.get("tracking_uri"), str):  # written before 2026-12-06
        mlflow["tracking_uri"] = repaired_sqlite_uri(mlflow["tracking_uri"])
    return LoadedCheckpoint(directory=directory, state=state, raw_recipe=raw,
                            source=source if source != str(path) else "")


def resolve_labels(label_file: str | None, checkpoint: LoadedCheckpoint | None,
                   missing: str | None = None) -> tuple[dict[str, int], str]:
    """The label set to score with, and where it came from: `label_file` when given, else the class names stored
    in `checkpoint`. Neither: ConfigError(`missing`, by default "<checkpoint> stores no class names; pass
    --labels")."""
    from workflows.data.manifest import load_labels

    if label_file:
        return load_labels(label_file), label_file
    if checkpoint is not None and checkpoint.state.get("class_names"):
        label_map = {name: i for i, name in enumerate(checkpoint.state["class_names"])}
        return label_map, f"{checkpoint.directory} (class names stored in the checkpoint)"
    where = checkpoint.directory if checkpoint is not None else "no checkpoint"
    raise ConfigError(missing or f"{where} stores no class names; pass --labels")


def trainable_shapes(recipe: Recipe) -> dict[str, tuple[int, ...]]:
    """{checkpoint key: shape} of the recipe's trainable weights, as weights.safetensors stores them (built on the
    meta device: no CLIP is built, nothing is allocated)."""
    import torch

    from dist_model.model import DiSTNet, SpatialOnlyHead

    module = SpatialOnlyHead if recipe.model.variant == "spatial_only" else DiSTNet
    prefix = "head." if recipe.model.variant == "spatial_only" else "dist_net."
    with torch.device("meta"):
        return {prefix + k: tuple(v.shape) for k, v in module(model_config(recipe.model)).state_dict().items()}


def check_weights_fit(checkpoint: Path, recipe: Recipe) -> None:
    """Raise ConfigError when the checkpoint's weights do not fit the recipe's model (`trainable_shapes`)."""
    expected = trainable_shapes(recipe)
    found = weight_shapes(checkpoint)  # the safetensors header alone: no tensor is read
    problems = [f"missing {k}" for k in sorted(set(expected) - set(found))]
    problems += [f"unexpected {k}" for k in sorted(set(found) - set(expected))]
    problems += [f"{k}: {found[k]} in the checkpoint, {expected[k]} in the model" for k in sorted(expected)
                 if k in found and found[k] != expected[k]]
    if problems:
        raise ConfigError(f"the weights of {checkpoint} do not fit the model (preset {recipe.model.preset}, "
                          f"variant {recipe.model.variant}): {'; '.join(problems[:6])}"
                          f"{' ...' if len(problems) > 6 else ''}")


# ---------------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------------


def build_eval_model(model_section: dict[str, Any], seed: int, weights: dict[str, Any] | None) -> Any:
    """The model a recipe's model section describes, in eval mode, with `weights` (trainable keys) loaded.

    `seed` must be the training run's `train.seed`: a random-init frozen CLIP (clip_pretrained None) is only
    the one the run trained against when built right after the same `torch.manual_seed`, as pretrain does."""
    import torch

    from dist_model import build_dist, build_spatial_only
    from workflows.recipe import ModelSection

    section = from_dict(ModelSection, model_section, prefix="model.")
    build = build_spatial_only if section.variant == "spatial_only" else build_dist
    torch.manual_seed(seed)
    model = build(model_config(section))
    if weights is not None:
        # Copies: arrays from Ray's object store are read-only.
        tensors = {k: v.clone() if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))
                   for k, v in weights.items()}
        model.load_state_dict(tensors, strict=True)
    return model.eval()


def load_predictor(checkpoint: str | Path, labels: str | None = None, device: str = "cpu",
                   tracking_uri: str | None = None) -> tuple[Any, Recipe, list[str]]:
    """(model in eval mode on `device`, the checkpoint's recipe, class names): `labels` (a label file) replaces the
    class names stored in the checkpoint. `tracking_uri`: where a `models:/` checkpoint is registered."""
    from workflows.data.manifest import class_names

    loaded = read_checkpoint(checkpoint, tracking_uri)
    recipe = loaded.recipe
    model = build_eval_model(loaded.model_section, loaded.training_seed(recipe), read_weights(loaded.directory))
    label_map, _ = resolve_labels(labels, loaded)
    return model.to(device), recipe, class_names(label_map)


# ---------------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------------

MANY_VIEWS = 32  # temporal views per video above which evaluate and predict warn (the reference protocol uses 3)


def scoring_warnings(*, views: int, views_from: str, fix_views: str, crops: int, num_frames: int,
                     class_names: list[str], labels_from: str) -> list[str]:
    """One-line warnings, for before the scoring starts, about a scoring that runs but costs far more than meant or
    cannot tell anything apart: more than MANY_VIEWS temporal views per video (`views_from`: the flag or recipe
    key that set them, `fix_views`: what to do), a label set of one class (`labels_from`: where it came from)."""
    out = []
    if views > MANY_VIEWS:
        out.append(f"warning: {views_from} {views} scores {views * crops} clips of {num_frames} frames per video, "
                   f"{views / 3:.0f}x the work of the usual 3 views, and a video only has distinct views up to its "
                   f"frames / {num_frames} (a 10 s video at 30 fps: {300 // num_frames}); more resample the same "
                   f"frames. {fix_views}")
    if len(class_names) == 1:
        out.append(f"warning: the label set ({labels_from}) has one class, {class_names[0]!r}: every video gets it "
                   f"at 100%, so the scores tell nothing apart. Pass --labels with every class to tell apart")
    return out



def model_logits(model: Any, frames: Any, class_names: list[str], mode: Mode, dtype: Any = None) -> Any:
    """Logits (N, K) of uint8 clips (N, T_d, S, S, 3) on the model's device: DiST, DiST blended with frozen
    CLIP (`fusion`), or frozen CLIP alone (`clip_only`)."""
    import torch

    from dist_model import normalize_video

    video = normalize_video(frames, dtype or torch.float32)  # (N, 3, T_d, S, S)
    with torch.inference_mode():
        if mode == "clip_only":
            return model.clip_logits(video, class_names)
        return model(video, class_names, zero_shot_fusion=mode == "fusion")


def scoring_precision(recipe: Recipe) -> str:
    """The precision a checkpoint is scored in on a GPU: the recipe's, `auto` meaning bf16."""
    return recipe.train.precision if recipe.train.precision != "auto" else "bf16"


def scoring_autocast(device: Any, precision: str) -> Any:
    """Autocast for scoring on `device`: bf16/fp16 on a GPU as the recipe trained; on CPU the weights' own dtypes."""
    import torch

    from dist_model import PRECISION_DTYPES

    reduced = device.type == "cuda" and precision in ("bf16", "fp16")
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision] if reduced else None, enabled=reduced)
