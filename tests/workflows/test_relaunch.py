"""A relaunch with the same run.name resumes the run: the driver compares the recipe with the one its newest
checkpoint was trained with (refusing what the run cannot absorb, listing the rest), and the trainer applies the
recipe's lr, betas and weight decay over the ones a checkpoint restores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workflows.config_loader import ConfigError, dump_yaml
from workflows.recipe import load_recipe, recipe_to_dict, with_absolute_paths

SMOKE = Path(__file__).parents[2] / "workflows/configs/smoke.yaml"
CLASSES = ["walking", "running", "jumping"]


def _recipe(tmp_path: Path, *overrides: str):
    labels = tmp_path / "labels.json"
    if not labels.exists():
        labels.write_text(json.dumps({name: i for i, name in enumerate(CLASSES)}))
    return load_recipe(SMOKE, [f"data.labels={labels}", f"run.storage_path={tmp_path / 'runs'}", "run.name=it",
                               *overrides], check_files=False)


def _checkpoint_of(recipe, step: int = 6, classes: list[str] = CLASSES) -> Path:
    """A complete checkpoint of `recipe` at `step`, as a finished launch leaves it (state.json, recipe.yaml and
    each rank's file list)."""
    from workflows.checkpoints import write_file_list

    world = recipe.scaling.min_workers
    directory = Path(recipe.run_dir) / f"checkpoint_{step:06d}"
    directory.mkdir(parents=True)
    (directory / "recipe.yaml").write_text(dump_yaml(with_absolute_paths(recipe)))
    (directory / "state.json").write_text(json.dumps({
        "step": step, "world_size": world, "model": recipe_to_dict(recipe)["model"], "class_names": classes}))
    for rank in range(world):
        write_file_list(directory, rank)
    return directory


def test_a_new_run_and_an_unchanged_relaunch(tmp_path) -> None:
    from workflows.relaunch import relaunch_changes

    recipe = _recipe(tmp_path)
    assert relaunch_changes(recipe) is None
    checkpoint = _checkpoint_of(recipe)
    assert relaunch_changes(recipe) == (str(checkpoint), 6, [], None)
    # A preset's default written out, the micro-batch probe's record, where the run is watched: no change.
    assert relaunch_changes(_recipe(tmp_path, "model.integration_dim=64", "train.micro_batch_size=auto",
                                    "train.precision=fp32",  # what auto was on CPU
                                    "mlflow.enabled=false", "eval.every_steps=7"))[2] == ["eval.every_steps: 3 -> 7"]


def test_what_a_resumed_run_takes_is_listed(tmp_path) -> None:
    from workflows.relaunch import relaunch_changes

    _checkpoint_of(_recipe(tmp_path))
    _, step, changes, _ = relaunch_changes(_recipe(tmp_path, "train.lr=0.01", "train.max_steps=12",
                                                "train.betas=[0.8,0.99]", "model.clip_precision=bf16",
                                                "train.zero_stage=1"))
    assert step == 6
    assert changes == ["model.clip_precision: 'fp32' -> 'bf16'", "train.betas: [0.9, 0.999] -> [0.8, 0.99]",
                       "train.lr: 0.001 -> 0.01", "train.max_steps: 6 -> 12", "train.zero_stage: 2 -> 1"]


def test_a_relaunch_keeps_the_init_from_its_first_launch_pinned_and_says_a_new_one_is_not_read(tmp_path,
                                                                                                capsys) -> None:
    from workflows.pretrain import with_recorded_init_from
    from workflows.relaunch import relaunch_changes

    pinned = str(tmp_path / "pre" / "checkpoint_000003")
    _checkpoint_of(_recipe(tmp_path, f"train.init_from={pinned}"))
    # The same command again: the run directory it named now holds a newer checkpoint, which the run never read.
    recipe = _recipe(tmp_path, f"train.init_from={tmp_path / 'pre'}")
    relaunch = relaunch_changes(recipe)
    assert relaunch.init_from == pinned and relaunch.changes == []
    assert with_recorded_init_from(recipe, relaunch).train.init_from == pinned
    assert capsys.readouterr().out.strip() == (
        f"[pretrain] train.init_from is not read: run it resumes from its own checkpoint (step 6); its first launch "
        f"started from {pinned}. To start from {tmp_path / 'pre'}, choose another run.name")
    # A run started without one keeps none; a relaunch without one says nothing.
    started_bare = relaunch._replace(init_from=None)
    assert with_recorded_init_from(recipe, started_bare).train.init_from is None
    assert "it started without one" in capsys.readouterr().out
    assert with_recorded_init_from(_recipe(tmp_path), relaunch).train.init_from == pinned
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("override, named", [
    ("model.integration_dim=32", "model.integration_dim: 64 -> 32"),
    ("model.fusion_layers=[0]", "model.fusion_layers"),
    ("model.variant=spatial_only", "model.variant: 'dist' -> 'spatial_only'"),
    ("train.precision=bf16", "train.precision: 'fp32' -> 'bf16'"),  # smoke's auto is fp32 on CPU
    ("scaling.num_workers=1", "scaling.num_workers: 2 -> 1"),
    ("train.zero_stage=0", "train.zero_stage: 2 -> 0 (ZeRO-0 saves a plain optimizer state"),
    ("labels", "the classes of data.labels: 3 (walking, running, jumping, ...) -> 2 (walking, running, ...)"),
    ("eval.best_metric=val_mean_class_acc", "eval.best_metric: 'val_top1' -> 'val_mean_class_acc' (Ray Train's "
                                            "record of the checkpoints it keeps is ranked by the first)"),
])
def test_what_a_resumed_run_cannot_take_is_refused_before_ray_naming_the_key(tmp_path, override, named) -> None:
    from workflows.relaunch import relaunch_changes

    _checkpoint_of(_recipe(tmp_path))
    if override == "labels":
        (tmp_path / "labels.json").write_text(json.dumps({"walking": 0, "running": 1}))
        override = "eval.every_steps=3"
    with pytest.raises(ConfigError) as info:
        relaunch_changes(_recipe(tmp_path, override))
    message = str(info.value)
    assert named in message and "newest checkpoint: step 6" in message, message
    assert "another run.name; add train.init_from=" in message and str(tmp_path / "runs" / "it") in message


def test_a_restored_optimizer_takes_the_recipes_lr_betas_and_weight_decay() -> None:
    """What torch's load_state_dict does under DeepSpeed's load_checkpoint: the saved base lr, betas and weight
    decay come back with the optimizer and scheduler states; the recipe's are put back over them, with the lr of
    the current step of the (new) schedule."""
    import torch

    from workflows.trainer import apply_recipe_hyperparameters

    def build(peak: float, betas=(0.9, 0.999), decay=0.05):
        params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))]
        optimizer = torch.optim.AdamW([{"params": params[:1], "weight_decay": decay},
                                       {"params": params[1:], "weight_decay": 0.0}], lr=peak, betas=betas)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))

    optimizer, scheduler = build(1e-3)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()
    optimizer, scheduler = build(1e-2, betas=(0.8, 0.99), decay=0.1)  # the relaunch's recipe
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 5) and scheduler.base_lrs == [1e-3, 1e-3]
    apply_recipe_hyperparameters(scheduler, 1e-2, (0.8, 0.99), [0.1, 0.0])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2 / 5] * 2)
    assert [g["betas"] for g in optimizer.param_groups] == [(0.8, 0.99)] * 2
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([1e-2 / 6] * 2)  # the schedule goes on from the new peak


class _Recorder:
    """The trainer's tracker, recording what the restart line sends to MLflow."""

    def __init__(self) -> None:
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics, step) -> None:
        pass

    def set_tags(self, tags) -> None:
        self.tags.update(tags)

    def log_text(self, text, name) -> None:
        pass


@pytest.mark.integration
def test_the_restart_line_of_a_relaunch_says_what_becomes_of_the_steps_past_the_checkpoint(ray_local, tmp_path,
                                                                                           capsys) -> None:
    """A relaunch in the same Ray session knows how far the previous launch got (its progress record in the GCS);
    in a new session (a new cluster, or `ray stop` between) that record is gone, and the line says what happens
    instead of "steps lost unknown"."""
    import torch

    from workflows.elastic import kv_key, kv_put
    from workflows.relaunch import RELAUNCHED
    from workflows.trainer import Trainer

    recipe = _recipe(tmp_path)

    def restart_line(progress: dict) -> str:
        trainer = Trainer(recipe, rank=0, world=2, device=torch.device("cpu"))
        trainer.state.step, trainer.tracker = 4, _Recorder()
        kv_put(kv_key(recipe.run_dir, "progress"), progress)
        kv_put(kv_key(recipe.run_dir, "event"), {"reason": RELAUNCHED, "changes": []})
        trainer._note_restart(previous_world=2)
        return capsys.readouterr().out.strip()

    assert restart_line({"step": 7, "world": 2}).endswith(
        "restart: 2 -> 2 workers (the run was relaunched); resuming at step 4, 3 steps lost")
    # A group that fails again before its first step (a disk still away, say) lost nothing more: the steps past the
    # checkpoint were counted once, by the restart before it (seen: "13 steps lost" twice).
    trainer = Trainer(recipe, rank=0, world=2, device=torch.device("cpu"))
    trainer.state.step, trainer.tracker = 4, _Recorder()
    trainer._note_restart(previous_world=2)
    assert capsys.readouterr().out.strip().endswith(
        "restart: 2 -> 2 workers (a worker or node was lost); resuming at step 4, 0 steps lost")
    assert restart_line({}).endswith(
        "restart: 2 -> 2 workers (the run was relaunched); resuming at step 4, any steps the previous launch trained "
        "past it are trained again")
