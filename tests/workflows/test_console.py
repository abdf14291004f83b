"""The console: the recipe summary, and Ray's own lines kept off the driver's console (but in Ray's log files)."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest

from workflows.console import recipe_changes, recipe_summary
from workflows.recipe import Recipe, load_recipe

SMOKE = Path(__file__).parents[2] / "workflows" / "configs" / "smoke.yaml"

# What Ray prints per dataset execution and per report (Ray 2.60), and what Train's controller prints at start.
DATA_LINES = (r"Starting execution of Dataset {name}_", r"Execution plan of Dataset {name}_",
              r"Dataset {name}_\S+ execution finished in")
TRAIN_LINES = ("Reporting training result", "Checkpoint successfully created at",
               "Attempting to start training worker group", "Started training worker group",
               "Setting up process group")


# --- recipe summary (no Ray) ---
def test_recipe_summary_lists_only_what_differs_from_the_defaults():
    recipe = load_recipe(SMOKE, ["model.num_frames=4", "train.deepspeed={zero_optimization: {stage: 1}}"],
                         check_files=False)
    changes = recipe_changes(recipe)
    assert changes["train.max_steps"] == 6 and changes["data.flip_pairs"] == [[0, 1], [4, 5]]
    assert changes["model.num_frames"] == 4 and changes["run.name"] == "smoke"
    assert changes["train.deepspeed"] == {"zero_optimization": {"stage": 1}}
    # defaults and unset model overrides (None = the preset's value) stay out; the preset is always named
    for key in ("train.zero_stage", "train.base_lr", "scaling.num_workers", "model.temporal_dim", "model.variant",
                "mlflow.enabled", "run.storage_path"):
        assert key not in changes, key
    assert changes["model.preset"] == "dist_tiny"

    text = recipe_summary(recipe)
    lines = text.splitlines()
    assert lines[0] == "recipe: model.preset=dist_tiny  model.num_frames=4"
    assert all(len(line) <= 120 for line in lines), text
    assert "data.flip_pairs=[[0,1],[4,5]]" in text and "train.lr=0.001" in text
    assert 'train.deepspeed={"zero_optimization":{"stage":1}}' in text
    # each line holds one section's items (a long section continues on the next line), in schema order
    sections = []
    for line in lines:
        items = line.removeprefix("recipe:").split()
        assert len({item.split(".")[0] for item in items}) == 1, line
        sections.append(items[0].split(".")[0])
    assert sections == sorted(sections, key=["model", "data", "train", "eval", "scaling", "run", "mlflow"].index)
    assert len(lines) <= 8, text


def test_recipe_summary_of_the_defaults_names_the_run():
    assert recipe_summary(Recipe()) == "recipe: model.preset=dist_tiny\n        run.name=dist-run"


def test_recipe_summary_wraps_long_sections():
    recipe = load_recipe(SMOKE, ["run.storage_path=/" + "long/" * 30, "eval.views=2"], check_files=False)
    lines = recipe_summary(recipe, width=80).splitlines()
    run_lines = [line for line in lines if "run." in line]
    assert len(run_lines) == 2 and run_lines[1].strip().startswith("run.storage_path=/long/")  # too long: own line
    assert all(len(line) <= 80 for line in lines if "storage_path" not in line)
    assert all(line.startswith(" " * 8) for line in lines[1:])


# --- Ray's console lines ---
def test_console_filter_drops_ray_data_and_train_info_only():
    import logging

    import ray

    from workflows.console import RayInfoToFiles

    ray_dir = Path(ray.__file__).parent
    keep = RayInfoToFiles().filter

    def record(path: Path | str, level: int = logging.INFO, msg: str = "m") -> logging.LogRecord:
        return logging.LogRecord(str(path), level, str(path), 1, msg, None, None)

    executor = ray_dir / "data/_internal/execution/streaming_executor.py"
    assert not keep(record(executor, msg="Starting execution of Dataset d_1."))
    assert not keep(record(ray_dir / "train/v2/_internal/execution/context.py", msg="Reporting training result 1"))
    assert not keep(record(ray_dir / "data/_internal/progress/__init__.py", logging.WARNING, "Progress bars disabled."))
    assert keep(record(executor, logging.WARNING, "Cluster resources are not enough"))  # warnings stay
    assert keep(record(ray_dir / "train/v2/api/data_parallel_trainer.py", msg="Received SIGINT."))  # driver API
    assert keep(record(ray_dir / "_private/worker.py", msg="Started a local Ray instance."))
    assert keep(record(Path(__file__), msg="step 3/6 | loss 1.2"))  # our own lines (and Train's patched print)
    import importlib.util

    factory = Path(importlib.util.find_spec("open_clip").origin).parent / "factory.py"
    assert not keep(record(factory, msg="Parsing model identifier. Schema: None, Identifier: DiST-Tiny-CLIP"))
    assert keep(record(factory, logging.WARNING, "Pretrained weights (x) not found"))  # open_clip's warnings stay


def _console_until(capfd, sentinel: str, timeout_s: float = 60) -> str:
    """The driver's console (stdout + stderr) until `sentinel` has come through both streams: Ray forwards each
    worker stream in order, so every line printed before the sentinel has arrived by then."""
    out = err = ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        o, e = capfd.readouterr()
        out, err = out + o, err + e
        if sentinel in out and sentinel in err:
            return out + err
        time.sleep(0.2)
    raise AssertionError(f"{sentinel} never reached the driver's console; got:\n{out}\n{err}")


def _session_logs() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"  # where Ray writes its logs


def _logged(folder: Path, *patterns: str) -> bool:
    """Whether one of Ray's log files under `folder` matches all regex `patterns`."""
    return any(all(re.search(pat, p.read_text(errors="replace")) for pat in patterns) for p in folder.glob("*.log"))


def _run_pipeline(name: str, rows: int = 16) -> int:
    """A small streaming Ray Data pipeline consumed with iter_torch_batches, as a training worker does."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # as the workflows do: no per-worker bars
    ds = ray.data.range(rows, override_num_blocks=2).map_batches(lambda b: {"x": b["id"] * 2}, batch_size=4)
    ds.set_name(name)
    return sum(len(batch["x"]) for batch in ds.iter_torch_batches(batch_size=4))


@pytest.mark.integration
def test_ray_data_lines_leave_the_console_but_not_the_log_files(ray_local, capfd):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Worker:  # stands in for a Ray Train worker: its console is forwarded to the driver
        def run(self, verbose: bool, name: str, sentinel: str) -> int:
            import sys

            from workflows.console import quiet_ray_console

            quiet_ray_console(verbose)
            rows = _run_pipeline(name)
            print(sentinel, flush=True)
            print(sentinel, file=sys.stderr, flush=True)
            return rows

    worker = Worker.remote()
    tag = uuid.uuid4().hex[:8]
    seen = {}
    for verbose in (False, True):  # the same process, switched both ways (Ray reuses worker processes)
        name, sentinel = f"console{tag}{len(seen)}", f"pipeline-done-{tag}-{len(seen)}"
        capfd.readouterr()
        assert ray.get(worker.run.remote(verbose, name, sentinel)) == 16
        seen[name] = (verbose, _console_until(capfd, sentinel))
    for name, (verbose, console) in seen.items():
        for line in DATA_LINES:
            pattern = line.format(name=name)
            assert bool(re.search(pattern, console)) == verbose, (pattern, verbose, console)
        if not verbose:
            assert name not in console, console
            assert "Progress bars disabled" not in console, "Ray's hint about a setting we chose is noise"
            assert _logged(_session_logs() / "ray-data", *(line.format(name=name) for line in DATA_LINES)), \
                "the quieted lines must still reach ray-data.log"


@pytest.mark.integration
def test_train_report_lines_leave_the_console(ray_local, capfd, tmp_path):
    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from workflows.console import quiet_ray_console, train_logging_config

    tag = uuid.uuid4().hex[:8]
    dataset, sentinel = f"trainconsole{tag}", f"train-done-{tag}"

    def train_fn(config: dict) -> None:
        import sys
        import tempfile

        import ray.train

        quiet_ray_console(verbose=False)
        _run_pipeline(config["dataset"])
        for step in (1, 2):
            with tempfile.TemporaryDirectory() as folder:
                Path(folder, "state.txt").write_text(str(step))
                ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(folder))
        print(config["sentinel"], flush=True)
        print(config["sentinel"], file=sys.stderr, flush=True)

    quiet_ray_console(verbose=False)
    capfd.readouterr()
    trainer = TorchTrainer(train_fn, train_loop_config={"dataset": dataset, "sentinel": sentinel},
                           scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name=f"console-{tag}", storage_path=str(tmp_path),
                                                logging_config=train_logging_config(verbose=False)))
    result = trainer.fit()
    assert result.metrics["step"] == 2 and result.checkpoint is not None
    console = _console_until(capfd, sentinel)
    for line in TRAIN_LINES:
        assert line not in console, (line, console)
    assert dataset not in console and "Progress bars disabled" not in console, console
    # still in Ray Train's and Ray Data's log files
    run_dir = re.escape(str(tmp_path))
    assert _logged(_session_logs() / "train", "Reporting training result 2", run_dir)
    assert _logged(_session_logs() / "train", "Checkpoint successfully created at", run_dir)
    assert _logged(_session_logs() / "ray-data", f"Execution plan of Dataset {dataset}_")


def test_ray_actor_noise_leaves_the_forwarded_console(ray_local, capfd):
    """Two lines Ray's own actors print once per run, forwarded to the driver, are dropped there (the first reads as
    an error); the other lines of the same batch, and of other processes, are printed as before."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from workflows.console import quiet_forwarded_ray_lines

    quiet_forwarded_ray_lines()
    quiet_forwarded_ray_lines()  # idempotent: one filter
    assert [name for name, _ in dispatcher.handlers].count("dist_quiet_forwarded") == 1
    assert "ray_print_logs" not in [name for name, _ in dispatcher.handlers]
    watcher = ("[2026-12-06 06:14:09,125 E 24535 24566] core_worker.cc:2465: Actor with class name: "
               "'PreemptionWatcher' and ID: '13e45ef0c7aa' has constructor arguments in the object store and "
               "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
               "will fail.")
    cleaner = ("Detected that the Ray Train controller actor (3eb522d3410eb9e2c8c4381601000000) is dead. Cleaning up "
               "placement group = [PlacementGroupID(2d4b)]")
    capfd.readouterr()
    base = {"ip": "127.0.0.1", "localhost": "127.0.0.1", "job": "", "is_err": False, "task_name": "",
            "actor_name": "TrainController"}
    dispatcher.emit({**base, "pid": 11, "lines": [watcher, "[pretrain] step 1/4 | loss 1.0"]})
    dispatcher.emit({**base, "pid": 12, "lines": [cleaner], "actor_name": "PlacementGroupCleaner"})
    console = "".join(capfd.readouterr())
    assert "[pretrain] step 1/4 | loss 1.0" in console, console
    assert "PreemptionWatcher" not in console and "Cleaning up placement group" not in console, console
