"""The trainer's pieces that need no Ray: TrainState round trips, the progress and ETA arithmetic, the micro-step."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from workflows.trainer import ProgressWindow, TrainState, eta_minutes, progress_stats


def test_train_state_round_trips_through_json_and_ignores_other_checkpoint_keys():
    state = TrainState(step=8, epoch=1, epoch_steps=2, world_size=3, mlflow_run_id="abc", resumed_from_step=4,
                       best={"val_top1": 50.0, "step": 8})
    state.history["loss"] += [(1, 2.5), (2, 2.25)]
    state.history["val_top1"].append((8, 50.0))
    # What a checkpoint's state.json holds: the state plus what evaluate/predict read.
    on_disk = json.loads(json.dumps({**state.to_dict(), "metrics": {"val_top1": 50.0}, "class_names": ["a"],
                                     "model": {"preset": "dist_tiny"}, "final": False}))
    assert TrainState.from_dict(on_disk) == state
    assert on_disk["step"] == 8 and on_disk["epoch_steps"] == 2 and on_disk["resumed_from_step"] == 4
    assert on_disk["world_size"] == 3


def test_train_state_from_an_older_checkpoint_gets_defaults():
    state = TrainState.from_dict({"step": 3, "epoch": 0, "position": 3})  # micro-batches per rank, as once saved
    assert (state.step, state.epoch_steps) == (3, 0)  # the trainer converts `position` with the consumed clips
    assert state.history == {"loss": [], "lr": [], "val_top1": [], "clips_per_s": []}
    assert state.best == {} and state.mlflow_run_id is None


def test_record_validation_keeps_the_best_and_its_step():
    state = TrainState(step=2)
    state.record_validation({"val_top1": 10.0}, "val_top1")
    state.step = 4
    state.record_validation({"val_top1": 5.0}, "val_top1")
    assert state.best == {"val_top1": 10.0, "step": 2}
    assert state.history["val_top1"] == [(2, 10.0), (4, 5.0)]
    assert state.best_note("val_top1") == "best 10.00% at step 2"


def test_the_best_validation_is_the_best_by_eval_best_metric():
    """eval.best_metric val_file_top1: the best is the validation whose files scored highest, whatever its clips did;
    one that read no file (NaN) never counts; a best that an older recipe recorded by val top-1 (a relaunch that
    changed eval.best_metric) is beaten by the first validation."""
    state = TrainState.from_dict({"step": 6, "best": {"val_top1": 90.0, "step": 4}})
    state.record_validation({"val_top1": 50.0, "val_file_top1": 40.0}, "val_file_top1")
    state.step = 8
    state.record_validation({"val_top1": 70.0, "val_file_top1": 30.0}, "val_file_top1")
    state.step = 10
    state.record_validation({"val_top1": 80.0, "val_file_top1": float("nan")}, "val_file_top1")
    assert state.best == {"val_file_top1": 40.0, "step": 6}
    assert state.history["val_top1"] == [(6, 50.0), (8, 70.0), (10, 80.0)]
    assert state.best_note("val_file_top1") == "best val_file_top1 40.00% at step 6"
    fresh = TrainState(step=2)
    fresh.record_validation({"val_top1": 10.0, "val_file_top1": float("nan")}, "val_file_top1")
    assert fresh.best == {} and fresh.best_note("val_file_top1") == "no val_file_top1 yet"


def test_progress_window_sums_the_loss_on_its_device_and_reports_totals():
    opened = time.perf_counter()
    window = ProgressWindow(torch.device("cpu"), start=opened)
    for loss in (1.0, 2.0, 3.0):
        window.add(torch.tensor(loss), clips=4)
    window.wait = 0.5
    loss_sum, micro, clips, wait, elapsed = window.totals().tolist()
    assert (loss_sum, micro, clips, wait) == (6.0, 3, 12, 0.5)
    assert 0 < elapsed <= time.perf_counter() - opened  # the window's own age, on the same clock


def test_progress_stats_over_ranks():
    # Two ranks, each 2 micro-batches of 4 clips in 2 s, 0.5 s of which waiting for data.
    one_rank = torch.tensor([3.0, 2, 8, 0.5, 2.0], dtype=torch.float64)
    stats = progress_stats(one_rank * 2, world=2)
    assert stats["loss"] == pytest.approx(1.5)  # mean loss per micro-batch
    assert stats["clips_per_s"] == pytest.approx(8.0)  # 16 clips over the mean wall time of 2 s
    assert stats["data_wait_fraction"] == pytest.approx(0.25)
    empty = progress_stats(torch.zeros(5, dtype=torch.float64), world=1)
    assert empty["loss"] == 0.0 and empty["clips_per_s"] == 0.0


def test_eta_at_this_attempts_pace():
    assert eta_minutes(step=10, total=70, steps_this_attempt=6, seconds_this_attempt=60) == pytest.approx(10.0)
    assert eta_minutes(step=0, total=10, steps_this_attempt=0, seconds_this_attempt=5) > 1e6
    assert eta_minutes(step=10, total=10, steps_this_attempt=10, seconds_this_attempt=1) == 0.0
    assert not math.isnan(eta_minutes(step=0, total=10, steps_this_attempt=0, seconds_this_attempt=0))


class _RecordingEngine:
    """DeepSpeed's engine interface around a linear classifier over mean-pooled frames."""

    def __init__(self):
        self.layer = torch.nn.Linear(3, 2)
        self.calls: list[str] = []

    def __call__(self, video, class_names):
        self.calls.append(f"forward {tuple(video.shape)} {video.dtype}")
        return self.layer(video.mean(dim=(2, 3, 4)))  # (B, 3, T, S, S) -> (B, K)

    def backward(self, loss):
        self.calls.append("backward")
        loss.backward()

    def step(self):
        self.calls.append("step")


def test_micro_step_normalises_mixes_and_steps_once():
    from workflows.recipe import TrainSection
    from workflows.step import train_micro_step

    engine = _RecordingEngine()
    batch = {"frames": torch.randint(0, 255, (4, 2, 8, 8, 3), dtype=torch.uint8), "label": torch.tensor([0, 1, 0, 1])}
    loss = train_micro_step(engine, batch, ["a", "b"], TrainSection(), torch.float32, torch.Generator().manual_seed(0))
    assert engine.calls == ["forward (4, 3, 2, 8, 8) torch.float32", "backward", "step"]
    assert loss.ndim == 0 and not loss.requires_grad and loss.item() > 0
    assert engine.layer.weight.grad is not None


def test_injected_failure_fires_once_and_remembers_it_in_the_run_storage(tmp_path):
    """The marker lives in the run directory itself, also when that is a URI: a restart on another node (whose
    local /tmp never saw the marker) must not fail again."""
    from pathlib import Path

    from workflows.recipe import load_recipe
    from workflows.trainer import Trainer

    smoke = Path(__file__).parents[2] / "workflows" / "configs" / "smoke.yaml"
    storage = tmp_path / "bucket" / "runs"
    recipe = load_recipe(smoke, [f"run.storage_path={storage.as_uri()}", "run.name=failing", "train.fail_at_step=3",
                                 "train.fail_rank=1"], check_files=False)
    other_rank = Trainer(recipe, rank=0, world=2, device=torch.device("cpu"))
    other_rank.state.step = 3
    other_rank._maybe_inject_failure()  # not train.fail_rank: no failure, no marker
    assert not (storage / "failing" / ".injected_failure_done").exists()
    trainer = Trainer(recipe, rank=1, world=2, device=torch.device("cpu"))
    trainer.state.step = 3
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        trainer._maybe_inject_failure()
    assert (storage / "failing" / ".injected_failure_done").is_file()
    trainer._maybe_inject_failure()  # the restarted attempt: no second failure


def test_deterministic_kernels_are_set_only_when_asked():
    """train.deterministic, in a fresh interpreter each (the settings are process-wide): off leaves torch's defaults,
    on sets cuDNN's deterministic mode without autotuning, torch's deterministic algorithms (warning where an op has
    none) and cuBLAS's fixed workspace, and the seed either way."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    probe = ("import os, torch; from workflows.trainer import seed_and_determinism as s; s(5, {}); "
             "print(torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, "
             "torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), "
             "os.environ.get('CUBLAS_WORKSPACE_CONFIG'), torch.initial_seed())")
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    env["PYTHONPATH"] = str(repo)
    seen = [subprocess.run([sys.executable, "-c", probe.format(flag)], cwd=repo, env=env, capture_output=True,
                           text=True, check=True).stdout.split() for flag in (False, True)]
    assert seen[0] == ["False", "False", "False", "False", "None", "5"]
    assert seen[1] == ["True", "False", "True", "True", ":4096:8", "5"]


def test_only_errors_a_restart_would_meet_again_end_the_run_at_once():
    """What `note_failure(restartable=False)` is given: the decoder's TooManyBadVideos (here raw; wrapped by Ray Data
    in test_feeds' end-to-end run) and a recipe the node cannot run. Anything else may pass with a new worker group."""
    from workflows.config_loader import ConfigError
    from workflows.data.drops import TooManyBadVideos
    from workflows.data.video import StorageUnreachable
    from workflows.trainer import restart_cannot_fix

    assert restart_cannot_fix(TooManyBadVideos("4 of 12 train videos are unusable"))
    assert restart_cannot_fix(ConfigError("train.compile on node 10.0.0.2: needs a C++ compiler"))
    assert not restart_cannot_fix(StorageUnreachable("cannot read s3://b/v.mp4: its storage did not answer"))
    assert not restart_cannot_fix(RuntimeError("injected failure at step 3 (train.fail_at_step) on rank 1"))
