"""What a relaunch may change: the same `run.name` and `run.storage_path` resume the run from its newest complete
checkpoint, so the driver compares the recipe with the one that checkpoint was trained with before any Ray work.

- Changes the run cannot absorb are refused, naming each key: the model's architecture (the weights would not fit),
  the class names (a checkpoint's head scores its own label set; best-checkpoint tracking and the registered model
  would mix label sets), the precision (DeepSpeed's optimizer files differ), ZeRO-0 <-> ZeRO-1/2 (likewise; 1 <-> 2
  loads bitwise, tests/workflows/test_elastic.py), and the number of workers of a fixed-size run (its ZeRO
  optimizer files load only at the size that wrote them). The way out is a new `run.name`,
  with `train.init_from` naming this run to start from its weights.
- Every other change is allowed and listed (`[pretrain] resuming <run> from step N with changed settings: key: old
  -> new`): the trainer applies the recipe's lr, betas and weight decay over the ones the checkpoint restores, and
  the lr schedule from step N on is the new recipe's (a longer or shorter run bends its cosine from there).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from workflows.config_loader import ConfigError, from_dict
from workflows.recipe import ModelSection, Recipe, model_config, recipe_to_dict, with_absolute_paths
from workflows.runtime import redact_secrets

# The restart reason a relaunch's first worker group reports (pretrain sets it, the trainer's restart line reads it).
RELAUNCHED = "the run was relaunched"

# DiSTConfig fields a resumed run may change: how the frozen towers run and what only evaluation reads.
_MODEL_FREE = {"clip_precision", "activation_checkpointing", "zero_shot_weight"}
# Keys whose change means nothing to a resumed run (where it is written, how it is watched and evaluated).
NOT_COMPARED = ("run.", "mlflow.", "scaling.wait_for_nodes_s", "scaling.resize_check_s", "scaling.exclude_nodes",
            "data.decode_node_label",
            "data.drop_counter", "train.fail_at_step", "train.fail_rank", "train.init_from")


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: a recipe read back from YAML holds lists."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def flat_settings(section: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": ..., ...} of a nested recipe dict."""
    if isinstance(section, dict):
        out: dict[str, Any] = {}
        for key, value in section.items():
            out.update(flat_settings(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: _plain(section)}


def recorded_checkpoint(recipe: Recipe) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """(path, state.json, recipe.yaml as a dict) of the newest complete checkpoint in the recipe's run directory,
    the one a relaunch resumes from; None for a new run."""
    import yaml

    from workflows.checkpoints import RECIPE, newest_complete_checkpoint, read_state_at

    found = newest_complete_checkpoint(recipe.run_dir)
    if found is None:
        return None
    fs, path, _ = found
    try:
        with fs.open_input_stream(f"{path}/{RECIPE}") as f:
            recorded = yaml.safe_load(f.read()) or {}
    except (OSError, yaml.YAMLError):
        recorded = {}
    return path, read_state_at(fs, path), recorded if isinstance(recorded, dict) else {}


class Relaunch(NamedTuple):
    """What a relaunch resumes from and what changed."""

    checkpoint: str  # the newest complete checkpoint, which the run resumes from
    step: int
    changes: list[str]  # "key: old -> new" for every change that matters
    init_from: str | None  # the train.init_from that checkpoint's launch pinned (a resumed run does not read it)


def relaunch_changes(recipe: Recipe) -> Relaunch | None:
    """For a relaunch of an existing run, a `Relaunch`; None for a new run. Raises ConfigError naming the changes a
    resumed run cannot take (see the module docstring) before any Ray work."""
    from workflows.data.manifest import class_names, load_labels

    found = recorded_checkpoint(recipe)
    if found is None:
        return None
    path, state, recorded = found
    recipe = with_absolute_paths(recipe)  # as the record holds them
    now = recipe_to_dict(recipe)
    old = flat_settings({k: v for k, v in recorded.items() if k != "model"})
    new = flat_settings({k: v for k, v in now.items() if k != "model"})
    refused_model: dict[str, tuple[Any, Any]] = {}
    changed = {key: (old[key], new.get(key)) for key in sorted(old)
               if old[key] != new.get(key) and not key.startswith(NOT_COMPARED)}
    if changed.get("train.micro_batch_size", (None, None))[1] == "auto":  # the record holds what the probe found
        del changed["train.micro_batch_size"]
    refused = []
    if state.get("model"):  # the architecture as built (a preset's default written out is no change)
        old_cfg = dataclasses.asdict(model_config(from_dict(ModelSection, state["model"])))
        new_cfg = dataclasses.asdict(model_config(recipe.model))
        for key in sorted(old_cfg):
            if old_cfg[key] != new_cfg[key]:
                listed = changed if key in _MODEL_FREE else refused_model
                listed[f"model.{key}"] = (old_cfg[key], new_cfg[key])
        if state["model"].get("variant", "dist") != recipe.model.variant:
            refused_model["model.variant"] = (state["model"].get("variant", "dist"), recipe.model.variant)
        refused += [f"{key}: {a!r} -> {b!r}" for key, (a, b) in refused_model.items()]
    old_train, old_scaling = recorded.get("train") or {}, recorded.get("scaling") or {}
    old_precision = old_train.get("precision", "auto")
    if old_precision == "auto":  # as Recipe.precision resolves it
        old_precision = "bf16" if old_scaling.get("use_gpu") else "fp32"
    changed.pop("train.precision", None)
    if old_train and old_precision != recipe.precision():
        refused.append(f"train.precision: {old_precision!r} -> {recipe.precision()!r}")
    names, new_names = state.get("class_names"), class_names(load_labels(recipe.data.labels))
    if names and new_names != list(names):
        refused.append(f"the classes of data.labels: {len(names)} ({', '.join(names[:3])}, ...) -> "
                       f"{len(new_names)} ({', '.join(new_names[:3])}, ...)")
    old_stage = old_train.get("zero_stage", recipe.train.zero_stage)
    if (old_stage == 0) != (recipe.train.zero_stage == 0):
        changed.pop("train.zero_stage", None)
        refused.append(f"train.zero_stage: {old_stage} -> {recipe.train.zero_stage} (ZeRO-0 saves a plain optimizer "
                       f"state and ZeRO-1/2 partitioned files, and DeepSpeed reads neither as the other; 1 <-> 2 "
                       f"is allowed)")
    old_metric = (recorded.get("eval") or {}).get("best_metric", "val_top1")
    if old_metric != recipe.eval.best_metric:
        changed.pop("eval.best_metric", None)
        refused.append(f"eval.best_metric: {old_metric!r} -> {recipe.eval.best_metric!r} (Ray Train's record of the "
                       f"checkpoints it keeps is ranked by the first)")
    world = int(state.get("world_size") or 0)
    if world and not recipe.scaling.elastic and recipe.scaling.min_workers != world:
        refused.append(f"scaling.num_workers: {world} -> {recipe.scaling.min_workers} (a fixed-size run's ZeRO "
                       f"optimizer files load only at the number of workers that wrote them; an elastic [min, max] "
                       f"run takes any)")
    step = int(state.get("step") or 0)
    if refused:
        raise ConfigError(
            f"run {recipe.run.name} in {redact_secrets(recipe.run.storage_path)} already holds a run (newest "
            f"checkpoint: step {step}) that a relaunch would resume, and these cannot change inside it: "
            f"{'; '.join(refused)}. Start a new run instead (another run.name; add "
            f"train.init_from={redact_secrets(recipe.run_dir)} to start from this run's weights), or relaunch with "
            f"the recorded values")
    return Relaunch(path, step, [f"{key}: {redact_secrets(a)!r} -> {redact_secrets(b)!r}"
                                 for key, (a, b) in sorted(changed.items())], old_train.get("init_from") or None)
