"""Tune sweeps: the sweep schema and its validation, the concurrency derivation, Pareto fronts, counted FLOPs and
the closing of trials' MLflow runs (unit); and two real sweeps on the smoke recipe into sqlite MLflow stores
(integration): a 2-trial grid interrupted after its first trial and resumed, and a 3-trial optuna + ASHA sweep in
which ASHA stops one trial on validation top-1 and another trial fails, then resumed with --retry-failed; a full disk
stopping a sweep, and the slots that hold a sweep to max_concurrent_trials on a real Ray."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from ray import tune

from workflows.config_loader import ConfigError
from workflows.runtime import stop_like_ctrl_c
from workflows.tune.driver import (
    build_param_space,
    max_trials_that_fit,
    resolve_max_concurrent,
    run_sweep,
    trial_resources,
)
from workflows.tune.report import pareto_front
from workflows.tune.sweep_config import build_trial_recipe, expected_trials, load_sweep, plan_sweep, split_overrides

CONFIGS = Path(__file__).parents[2] / "workflows" / "configs"
SWEEP_SMOKE = CONFIGS / "sweep_smoke.yaml"


def write_sweep(tmp_path: Path, space: str, extra: str = "") -> Path:
    """A sweep file over the smoke recipe with the given search_space block."""
    path = tmp_path / "sweep.yaml"
    path.write_text(f"base: {CONFIGS / 'smoke.yaml'}\nsearch_space:\n{space}\n{extra}")
    return path


def plan(path: Path, overrides: list[str] | None = None):
    return plan_sweep(load_sweep(path, overrides or []), check_files=False)


# --- the schema and its validation (no Ray) ---
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("sweep_*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_is_valid(path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")  # remote sweeps need a server
    text = path.read_text()
    assert text.startswith("#") and "python -m workflows tune --config" in text
    sweep_plan = plan(path)
    assert sweep_plan.sweep.search_space["model.fusion_layers"]["grid"]
    assert expected_trials(sweep_plan.sweep) >= 3


def test_unknown_search_key_fails_listing_valid_keys(tmp_path):
    path = write_sweep(tmp_path, "  model.fusion_layer: {grid: [all, every2]}")
    with pytest.raises(ConfigError, match=r"unknown recipe key 'model.fusion_layer'; valid keys in model: .*"
                                          r"model.fusion_layers.*model.pooling_layers"):
        plan(path)
    path = write_sweep(tmp_path, "  modle.fusion_layers: {grid: [all]}")
    with pytest.raises(ConfigError, match="valid keys start with one of: data, eval, mlflow, model, run"):
        plan(path)
    path = write_sweep(tmp_path, "  run.name: {grid: [a, b]}")
    with pytest.raises(ConfigError, match="set by the sweep itself"):
        plan(path)


def test_each_trial_keeps_its_checkpoints_best_by_the_sweeps_metric(tmp_path):
    """The table names each trial's checkpoint of its best report by the sweep's metric: the trial's Ray Train must
    keep that one, so its eval.best_metric is the sweep's (a base recipe's own is overridden). A file metric gets
    its own column."""
    from workflows.tune.report import table_metrics

    path = write_sweep(tmp_path, "  model.fusion_layers: {grid: [all]}", "metric: val_mean_class_acc\n")
    sweep_plan = plan(path, ["eval.best_metric=val_top5"])
    assert sweep_plan.base_recipe.eval.best_metric == "val_mean_class_acc"
    assert build_trial_recipe(sweep_plan.base, {"model.fusion_layers": "all"}).eval.best_metric == \
        "val_mean_class_acc"
    assert table_metrics("val_mean_class_acc") == ["val_top1", "val_top5", "val_mean_class_acc"]
    assert table_metrics("val_file_top1") == ["val_top1", "val_top5", "val_mean_class_acc", "val_file_top1"]
    with pytest.raises(ConfigError, match="metric: 'top1' is not valid; choose one of 'val_top1'"):
        load_sweep(write_sweep(tmp_path, "  model.fusion_layers: {grid: [all]}", "metric: top1\n"))
    with pytest.raises(ConfigError, match=r"mode: min would rank the worst trial best: val_top1, like every metric a "
                                          r"sweep ranks by, is an accuracy \(higher is better\)"):
        load_sweep(write_sweep(tmp_path, "  model.fusion_layers: {grid: [all]}", "mode: min\n"))


def test_a_training_recipe_given_to_tune_says_to_run_pretrain():
    smoke = CONFIGS / "smoke.yaml"
    with pytest.raises(ConfigError, match=rf"{smoke} is a training recipe, not a Tune sweep \(it has the recipe "
                                          rf"sections data, eval, model, run, scaling, train .*\): run it with "
                                          rf"`python -m workflows pretrain --config {smoke}`"):
        load_sweep(smoke)


def test_the_shipped_sweeps_placeholder_bucket_is_named_first_with_the_sweeps_own_key(capsys, monkeypatch):
    """sweep_fusion_b16.yaml's storage_path names YOUR-BUCKET: `tune --check` says so before anything else (the
    tracking server a bucket sweep needs), naming the sweep's key, which works, not run.storage_path, which the
    sweep sets for its trials."""
    from workflows.tune.driver import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["--config", str(CONFIGS / "sweep_fusion_b16.yaml"), "--check"]) == 2
    err = capsys.readouterr().err
    assert "error: storage_path s3://YOUR-BUCKET/dist-sweeps names the placeholder bucket YOUR-BUCKET of the shipped " \
           "sweeps: set your own with the sweep's key (it sets run.storage_path for its trials), e.g. --set " \
           "storage_path=s3://<your-bucket>/dist-sweeps" in err, err


def test_every_grid_point_is_built_before_ray(tmp_path):
    # dist_tiny has head_dim 32: 100 is not a multiple, and only the combination with that value is invalid.
    path = write_sweep(tmp_path, "  model.fusion_layers: {grid: [all, every2]}\n"
                                 "  model.integration_dim: {choice: [64, 100]}")
    with pytest.raises(ConfigError, match=r"the trial \{model.fusion_layers='all', model.integration_dim=100\} "
                                          r"is invalid: .*integration_dim must be a positive multiple of head_dim"):
        plan(path)
    path = write_sweep(tmp_path, "  model.fusion_layers: {grid: [all, every7]}")
    with pytest.raises(ConfigError, match="unknown fusion preset 'every7'"):
        plan(path)


@pytest.mark.parametrize("spec, message", [
    ("{grid: []}", "expected a non-empty list"),
    ("{loguniform: [0, 1.0e-3]}", "low must be > 0"),
    ("{uniform: [2, 1]}", "need low < high"),
    ("{randint: [1, 2.5]}", "must be integers"),
    ("{between: [1, 2]}", "give exactly one of grid, choice, uniform, loguniform, randint"),
])
def test_domain_errors(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path, f"  train.lr: {spec}"))


def test_sweep_keys_are_strict_and_set_routes_by_section(tmp_path, capsys):
    path = write_sweep(tmp_path, "  model.fusion_layers: {grid: [all]}", "searcher: bayes\n")
    with pytest.raises(ConfigError, match="searcher: 'bayes' is not valid; choose one of 'grid', 'random', 'optuna'"):
        load_sweep(path)
    assert split_overrides(["num_samples=3", "train.lr=1e-4", "mlflow.experiment=x"]) == \
        (["num_samples=3", "mlflow.experiment=x"], ["train.lr=1e-4"])
    # What the sweep sets for each trial, or sweeps, would be replaced: refused, saying which key to change.
    with pytest.raises(ConfigError, match=r"run.storage_path is set by the sweep itself for each trial .* set the "
                                          r"sweep's own keys instead: name, storage_path"):
        split_overrides(["run.storage_path=/tmp/x"])
    load_sweep(CONFIGS / "sweep_smoke.yaml", ["model.fusion_layers=every3"])
    assert "note: --set model.fusion_layers sets the base recipe only: the search space sweeps this key" in \
        capsys.readouterr().err
    with pytest.raises(ConfigError, match="neither a sweep key"):
        split_overrides(["bogus.key=1"])
    sweep = load_sweep(write_sweep(tmp_path, "  model: {fusion_layers: {grid: [all, every2]}}"),
                       ["num_samples=2", "train.max_steps=3"])
    assert sweep.search_space == {"model.fusion_layers": {"grid": ["all", "every2"]}}  # nested form flattened
    assert sweep.num_samples == 2 and sweep.base_overrides[-1] == "train.max_steps=3"
    assert expected_trials(sweep) == 4


def test_trial_recipe_takes_the_trial_values(tmp_path):
    sweep_plan = plan(write_sweep(tmp_path, "  model.fusion_layers: {grid: [all, every2]}\n"
                                            "  train.lr: {loguniform: [1.0e-4, 1.0e-3]}"))
    recipe = build_trial_recipe(sweep_plan.base, {"model.fusion_layers": "every2", "train.lr": np.float64(2e-4)},
                                name="t1", storage_path="/tmp/x")
    assert recipe.model_cfg.layers == (1, 3) and recipe.peak_lr == pytest.approx(2e-4)
    assert (recipe.run.name, recipe.run.storage_path) == ("t1", "/tmp/x")
    assert recipe.mlflow.tracking_uri == sweep_plan.tracking_uri  # one store for the parent and every trial


def test_search_space_and_searchers(tmp_path):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from workflows.tune.driver import _search_alg

    path = write_sweep(tmp_path, "  model.fusion_layers: {grid: [all, every2]}\n  model.pooling_layers: "
                                 "{choice: [1, 2]}\n  train.lr: {loguniform: [1.0e-4, 1.0e-3]}")
    grid = plan(path).sweep
    space = build_param_space(grid)
    assert space["model.fusion_layers"] == {"grid_search": ["all", "every2"]}
    assert isinstance(space["model.pooling_layers"], tune.search.sample.Categorical)
    alg = _search_alg(grid, 2)
    assert isinstance(alg, BasicVariantGenerator) and alg.max_concurrent == 2  # the generator carries the limit
    optuna = plan(path, ["searcher=optuna", "num_samples=5"]).sweep
    assert isinstance(build_param_space(optuna)["model.fusion_layers"], tune.search.sample.Categorical)
    assert isinstance(_search_alg(optuna, 3), ConcurrencyLimiter)
    with pytest.raises(ConfigError, match="optuna needs choices that are numbers or strings"):
        plan(write_sweep(tmp_path, "  model.fusion_layers: {choice: [[0, 3], [1, 3]]}", "searcher: optuna\n"))


def test_points_to_evaluate_are_checked_and_reach_the_searcher(tmp_path):
    from workflows.tune.driver import _search_alg

    space = "  model.fusion_layers: {grid: [all, every2]}\n  train.lr: {loguniform: [1.0e-4, 1.0e-3]}"
    point = "{model.fusion_layers: every2, train.lr: 2.0e-4}"
    path = write_sweep(tmp_path, space, f"searcher: optuna\nnum_samples: 2\npoints_to_evaluate:\n  - {point}\n"
                                        "  - {model: {fusion_layers: all}, train: {lr: 1.0e-3}}\n")
    sweep = plan(path).sweep
    assert sweep.points_to_evaluate == [{"model.fusion_layers": "every2", "train.lr": 2e-4},
                                        {"model.fusion_layers": "all", "train.lr": 1e-3}]  # nested form flattened
    assert _search_alg(sweep, 1).searcher._points_to_evaluate == sweep.points_to_evaluate
    random = plan(path, ["searcher=random"]).sweep
    assert _search_alg(random, 1)._points_to_evaluate == sweep.points_to_evaluate

    for settings, points, message in [
        ("searcher: grid", [point], "needs searcher random or optuna"),
        ("searcher: random\nnum_samples: 1", [point, point], "has 2 points but num_samples is 1"),
        ("searcher: optuna", ["{model.fusion_layers: all, train.lr: 1.0e-2}"],
         r"points_to_evaluate\[0\].train.lr: 0.01 is outside its search-space domain"),
        ("searcher: optuna", ["{model.fusion_layers: all}"], "missing: train.lr"),
        ("searcher: optuna", ["{model.fusion_layers: all, train.lr: 2.0e-4, train.epochs: 3}"],
         "not in search_space: train.epochs"),
    ]:
        listed = "".join(f"  - {p}\n" for p in points)
        with pytest.raises(ConfigError, match=message):
            load_sweep(write_sweep(tmp_path, space, f"{settings}\npoints_to_evaluate:\n{listed}"))
    # A point inside every domain whose recipe is invalid fails before Ray, naming the point.
    path = write_sweep(tmp_path, "  model.integration_dim: {randint: [32, 65]}",  # both ends valid (head_dim 32)
                       "searcher: random\npoints_to_evaluate:\n  - {model.integration_dim: 40}\n")
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\] is invalid: .*multiple of head_dim"):
        plan(path)
    # Without the point, the randint axis itself: built between its ends too (it was at its ends only).
    path = write_sweep(tmp_path, "  model.integration_dim: {randint: [32, 65]}", "searcher: random\n")
    with pytest.raises(ConfigError, match=r"search_space.model.integration_dim: randint draws every whole number in "
                                          r"\[32, 65\), such as 33, which model.integration_dim does not take "
                                          r"\(.*multiple of head_dim.*\); use choice with the values that fit"):
        plan(path)


def test_trial_runs_are_closed_to_match_the_table(tmp_path):
    """A trial that Tune stopped or that failed leaves its nested run RUNNING: the summary closes it with the
    status its row shows (an interrupted sweep closes only the failed ones: the others resume)."""
    import mlflow

    from workflows.tracking import Tracker
    from workflows.tune.report import annotate_trial_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    statuses = ["completed", "stopped early", "error: boom", "completed"]
    for interrupted in (True, False):
        parent = Tracker(uri, experiment=f"e{interrupted}", run_name="sweep")
        # t0's first attempt, abandoned when its sweep was stopped before the trial's first checkpoint: the resumed
        # sweep ran it again under the same name (the audit saw the table read, and tag, this empty run)
        abandoned = Tracker(uri, experiment=f"e{interrupted}", run_name="t0", parent_run_id=parent.run_id)
        time.sleep(0.01)  # MLflow orders runs by start time (ms)
        rows = []
        for i, status in enumerate(statuses):
            nested = Tracker(uri, experiment=f"e{interrupted}", run_name=f"t{i}", parent_run_id=parent.run_id)
            nested.log_metrics({"clips_per_s": 2.0 + i}, step=1)
            if i == 3:
                nested.finish()  # closed by its own driver
            rows.append({"trial_id": f"t{i}", "run_name": f"t{i}", "status": status, "dist_gflops": 1.0,
                         "frozen_clip_gflops": 2.0, "total_gflops": 3.0})
        # a trial that failed before its workers opened a run (a missing file): the summary opens one, FAILED
        rows.append({"trial_id": "t4", "run_name": "t4", "status": "error: ManifestError: val2.csv does not exist",
                     "model.fusion_layers": "every2", "dist_gflops": 1.0, "frozen_clip_gflops": 2.0,
                     "total_gflops": 3.0})
        annotate_trial_runs(rows, parent, interrupted, ["model.fusion_layers"])
        runs = parent.children()
        assert runs["t4"].info.status == "FAILED" == rows[4]["mlflow_status"]
        assert runs["t4"].data.params == {"model.fusion_layers": "every2"}
        assert runs["t4"].data.tags["tune.status"].startswith("error: ManifestError")
        rows.pop()
        closed = {r.info.run_name: r.info.status for r in runs.values()}
        expected = ["RUNNING", "RUNNING", "FAILED", "FINISHED"] if interrupted else \
            ["FINISHED", "KILLED", "FAILED", "FINISHED"]
        assert [closed[f"t{i}"] for i in range(4)] == expected == [r["mlflow_status"] for r in rows]
        assert [r["clips_per_s"] for r in rows] == [2.0, 3.0, 4.0, 5.0]
        assert runs["t1"].data.tags["tune.status"] == "stopped early"
        assert runs["t1"].data.metrics["total_gflops_per_clip"] == 3.0
        assert runs["t0"].info.run_id != abandoned.run_id and runs["t0"].data.tags["tune.status"] == "completed"
        old = mlflow.MlflowClient(uri).get_run(abandoned.run_id)
        assert old.info.status == "KILLED" and old.data.tags["tune.status"].startswith("superseded")


# --- concurrency ---
def test_max_concurrent_trials_derivation(tmp_path):
    recipe = plan(write_sweep(tmp_path, "  model.fusion_layers: {grid: [all]}"),
                  ["scaling.num_workers=2", "scaling.cpus_per_worker=2"]).base_recipe
    need = trial_resources(recipe)
    assert need == {"CPU": pytest.approx(0.1 + 2 * 2 + 2 * 1)}  # driver + workers + one decoder per worker
    assert max_trials_that_fit({"CPU": 16.0}, need) == 2
    assert max_trials_that_fit({"CPU": 6.0}, need) == 0
    assert resolve_max_concurrent(None, {"CPU": 32.0}, need) == 5
    assert resolve_max_concurrent(0, {"CPU": 32.0}, need) == 5
    assert resolve_max_concurrent(2, {"CPU": 32.0}, need) == 2
    assert resolve_max_concurrent(9, {"CPU": 32.0}, need) == 5  # never more than fit: waiting trials would hang
    with pytest.raises(ConfigError, match="one trial needs .* but the cluster has 4 CPU"):
        resolve_max_concurrent(None, {"CPU": 4.0}, need)
    gpu = plan(write_sweep(tmp_path, "  model.fusion_layers: {grid: [all]}"),
               ["scaling.num_workers=2", "scaling.use_gpu=true", "data.decode_node_label=dist-role=decode"]).base_recipe
    need = trial_resources(gpu)
    assert need == {"CPU": pytest.approx(2.1), "GPU": 2.0, "decode_CPU": 2.0}
    assert max_trials_that_fit({"CPU": 64.0, "GPU": 8.0, "decode_CPU": 4.0}, need) == 2  # decode nodes bind
    assert max_trials_that_fit({"CPU": 64.0, "GPU": 8.0, "decode_CPU": 64.0}, need) == 4  # GPUs bind


def test_a_resumed_sweep_must_be_the_sweep_it_was_started_as(tmp_path):
    """A sweep directory is resumed as it was started (Tune restores its search and trials): a changed search space,
    objective, sample count or base recipe is refused before Ray, naming each change (it was reported under the new
    settings, and a raised num_samples left the sweep "interrupted" forever); concurrency may change."""
    from workflows.tune.driver import DEFINITION_FILE, check_sweep_unchanged, sweep_definition

    space = "  model.fusion_layers: {grid: [all, every2]}"
    started = plan(write_sweep(tmp_path, space), [f"storage_path={tmp_path / 'runs'}"])
    Path(started.path).mkdir(parents=True, exist_ok=True)
    Path(started.path, DEFINITION_FILE).write_text(json.dumps(sweep_definition(started)))
    check_sweep_unchanged(plan(write_sweep(tmp_path, space), [f"storage_path={tmp_path / 'runs'}",
                                                              "max_concurrent_trials=1", "trial_max_failures=2"]))
    changed = plan(write_sweep(tmp_path, "  model.fusion_layers: {grid: [all, last_third]}"),
                   [f"storage_path={tmp_path / 'runs'}", "num_samples=2", "metric=val_top5", "train.lr=0.01"])
    with pytest.raises(ConfigError) as refused:
        check_sweep_unchanged(changed)
    message = str(refused.value)
    for change in ("metric: 'val_top1' -> 'val_top5'", "num_samples: 1 -> 2", "train.lr: 0.001 -> 0.01",
                   "search_space.model.fusion_layers.grid: ['all', 'every2'] -> ['all', 'last_third']"):
        assert change in message, message
    assert "give it another name (--set name=...)" in message
    # A sweep recorded by an older version of this code: a recipe key added since (at its default) or dropped since
    # is not a change; a key added since and set to another value is
    older = json.loads(Path(started.path, DEFINITION_FILE).read_text())
    del older["base"]["train.compile_backend"]
    older["base"]["train.a_key_since_dropped"] = 3
    Path(started.path, DEFINITION_FILE).write_text(json.dumps(older))
    check_sweep_unchanged(plan(write_sweep(tmp_path, space), [f"storage_path={tmp_path / 'runs'}"]))
    with pytest.raises(ConfigError, match=r"train.compile_backend: None -> 'aot_eager'"):
        check_sweep_unchanged(plan(write_sweep(tmp_path, space), [f"storage_path={tmp_path / 'runs'}",
                                                                  "train.compile_backend=aot_eager"]))
    # A sweep from before the definition was recorded: nothing to compare
    Path(started.path, DEFINITION_FILE).unlink()
    check_sweep_unchanged(changed)


def test_real_valued_axes_on_integer_keys_and_chosen_data_files_fail_before_ray(tmp_path):
    """uniform/loguniform ends that are whole numbers passed the check while every draw failed its trial (and the
    summary with it); a data file a choice names that does not exist failed only in its trial, after Ray started."""
    path = write_sweep(tmp_path, "  model.pooling_layers: {uniform: [1, 4]}", "searcher: random\nnum_samples: 2")
    with pytest.raises(ConfigError, match=r"uniform draws real numbers such as 2\.11.*use randint"):
        plan(path)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.csv", "val.csv"):
        (data / name).write_text("path,label\na.mp4,x\n")
    (data / "labels.json").write_text('{"x": 0}')
    sets = [f"data.train_manifest={data / 'train.csv'}", f"data.labels={data / 'labels.json'}",
            f"data.val_manifest={data / 'val.csv'}"]
    path = write_sweep(tmp_path, f"  data.val_manifest: {{choice: [{data / 'val.csv'}, {data / 'val2.csv'}]}}",
                       "searcher: random\nnum_samples: 2")
    with pytest.raises(ConfigError, match=r"val2.csv.*invalid: data.val_manifest: .*val2.csv does not exist"):
        plan_sweep(load_sweep(path, sets))


def test_the_console_shows_a_long_axis_and_a_long_error_cut_short(tmp_path):
    """A 100-value grid printed 400 banner lines, and an error's message made every table row 300+ characters."""
    from workflows.tune.driver import banner_yaml
    from workflows.tune.report import TABLE_CELL_CHARS, format_table

    lrs = ", ".join(str(i / 1000) for i in range(1, 101))
    sweep = load_sweep(write_sweep(tmp_path, f"  train.lr: {{grid: [{lrs}]}}\n  model.fusion_layers: {{grid: [all]}}"))
    assert "'... (100 values)'" in banner_yaml(sweep) and len(banner_yaml(sweep).splitlines()) < 50
    assert expected_trials(sweep) == 100
    table = format_table([{"trial_id": "t", "status": "error: " + "x" * 200}], ["trial_id", "status"])
    assert max(len(line) for line in table.splitlines()) == len("trial_id") + 2 + TABLE_CELL_CHARS


def test_of_equally_good_trials_one_not_failed_then_the_cheapest_is_best():
    from workflows.tune.report import _best_row

    rows = [{"trial_id": "a", "val_top1": 12.5, "total_gflops": 0.041}, {"trial_id": "b", "val_top1": 12.5,
                                                                         "total_gflops": 0.038},
            {"trial_id": "c", "val_top1": math.nan, "total_gflops": 0.01}]
    assert _best_row(rows, "val_top1", "max")["trial_id"] == "b"
    assert _best_row(rows, "val_top1", "min")["trial_id"] == "b"
    rows[0]["val_top1"] = 13.0
    assert _best_row(rows, "val_top1", "max")["trial_id"] == "a"
    assert _best_row(rows, "val_top1", "min")["trial_id"] == "b"
    rows[0]["val_top1"] = 12.5
    rows[1]["status"] = "error: rank 0 failed: OSError: [Errno 28] No space left on device"  # failed after step 2
    assert _best_row(rows, "val_top1", "max")["trial_id"] == "a"  # equally good and not failed
    rows[1]["val_top1"] = 13.0
    assert _best_row(rows, "val_top1", "max")["trial_id"] == "b"  # better: its checkpoint from then is whole


# --- Pareto front ---
def test_pareto_front():
    costs = [1.0, 2.0, 3.0, 2.0, 4.0, 1.5, math.nan]
    scores = [10.0, 30.0, 25.0, 30.0, 40.0, 5.0, 99.0]
    # 1.0/10 cheapest; 2.0/30 (both, tied); 3.0/25 dominated by 2.0/30; 4.0/40 best; 1.5/5 dominated; NaN never.
    assert pareto_front(costs, scores) == [True, True, False, True, True, False, False]
    assert pareto_front([1.0, 2.0], [5.0, 1.0], maximize=False) == [True, True]
    assert pareto_front([1.0, 2.0], [1.0, 5.0], maximize=False) == [True, False]
    assert pareto_front([], []) == []


# --- counted FLOPs ---
def test_counted_flops_follow_the_fusion_depth():
    from dist_model import DiSTConfig
    from dist_model.flops import count_cost_per_clip

    costs = {f: count_cost_per_clip(DiSTConfig.from_name("dist_tiny", fusion_layers=f))
             for f in ("all", "every2", "last_third")}
    assert costs["all"].dist_gflops > costs["every2"].dist_gflops > costs["last_third"].dist_gflops > 0
    assert costs["all"].trainable_params > costs["every2"].trainable_params > costs["last_third"].trainable_params
    # Every preset ends on the top block: the same CLIP cost.
    assert len({c.frozen_clip_gflops for c in costs.values()}) == 1
    b16 = count_cost_per_clip(DiSTConfig.from_name("dist_b16_k400"))
    # Reference §2.8 (GMACs; counted FLOPs are 2 per multiply-add): CLIP 140.5, DiST branch 22.4, 26.1 M params.
    assert b16.frozen_clip_gflops / 2 == pytest.approx(140.5, rel=0.01)
    assert b16.dist_gflops / 2 == pytest.approx(22.4, rel=0.03)
    assert b16.trainable_params / 1e6 == pytest.approx(26.1, rel=0.01)


# --- a real sweep, interrupted after its first trial and resumed ---
class InterruptAfterFirstTrial(tune.Callback):
    """Sends this process SIGTERM once, when the first trial completes, as `ray job stop` does to a sweep driver:
    stop_like_ctrl_c hands it to Tune's Ctrl-C handler, which ends the run and saves its state. Module-level: Tune
    pickles it with the sweep state."""

    def __init__(self, marker: str):
        self.marker = marker

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> Path:
    """The sample motion dataset, tiny: 8 classes, 16 training and 8 validation videos of 48 px."""
    from workflows.data.sample import write_sample_dataset

    root = tmp_path_factory.mktemp("sweep-data")
    write_sample_dataset(root, videos_per_class=3, size=48, num_frames=24, workers=1)
    return root


def test_check_validates_the_sweep_prints_its_banner_and_starts_nothing(smoke_data, tmp_path, capsys, monkeypatch):
    from workflows.tune import driver

    def no_sweep(*args, **kwargs):
        raise AssertionError("--check started the sweep")

    monkeypatch.setattr(driver, "run_sweep", no_sweep)
    storage = tmp_path / "sweeps"
    sets = [f"data.train_manifest={smoke_data / 'train.csv'}", f"data.val_manifest={smoke_data / 'val.csv'}",
            f"data.labels={smoke_data / 'labels.json'}", f"storage_path={storage}"]
    assert driver.main(["--config", str(SWEEP_SMOKE), "--set", *sets, "--check"]) == 0
    out = capsys.readouterr().out
    assert f"[tune] sweep sweep-smoke in {storage / 'sweep-smoke'} (new), 3 trial(s); MLflow sqlite:///" in out, out
    assert "[tune] check: one trial holds {'CPU': 2.1}. Left to the start: the cluster's room for it" in out, out
    assert not storage.exists()  # planning made no directory and no MLflow store
    # What the start would refuse is refused here, before Ray.
    assert driver.main(["--config", str(SWEEP_SMOKE), "--set", *sets, "--check", "--resume"]) == 2
    assert f"--resume: no sweep to resume at {storage / 'sweep-smoke'}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def resumed_sweep(ray_local, smoke_data, tmp_path_factory):
    """The smoke sweep on 2 of its fusion presets (1 worker, 2 steps, one validation per trial; a third trial cost
    ~20 s and showed nothing more), interrupted after trial 1, then resumed: (plan, first run's result, resumed run's
    result, id of the trial finished before the stop)."""
    root = tmp_path_factory.mktemp("sweep")
    overrides = ['search_space={"model.fusion_layers": {"grid": ["every2", "last_third"]}}',
                 f"data.train_manifest={smoke_data / 'train.csv'}", f"data.val_manifest={smoke_data / 'val.csv'}",
                 f"data.labels={smoke_data / 'labels.json'}", f"storage_path={root / 'runs'}", "scheduler=none",
                 "max_concurrent_trials=1", "train.max_steps=2", "eval.every_steps=2"]
    sweep_plan = plan_sweep(load_sweep(SWEEP_SMOKE, overrides))
    marker = root / "interrupted"
    undo = stop_like_ctrl_c()  # as the tune CLI does
    try:
        first = run_sweep(sweep_plan, callbacks=[InterruptAfterFirstTrial(str(marker))])
    finally:
        undo()  # pytest's own SIGTERM handling again, for the tests after this one
    second = run_sweep(sweep_plan, resume=True)
    return sweep_plan, first, second, marker.read_text()


@pytest.mark.integration
def test_interrupted_sweep_resumes_the_rest_only(resumed_sweep):
    sweep_plan, first, second, first_id = resumed_sweep
    assert first.interrupted and not second.interrupted
    assert [r["trial_id"] for r in first.rows if r["status"] == "completed"] == [first_id]
    assert len(second.rows) == 2 and all(r["status"] == "completed" for r in second.rows)
    assert first_id in {r["trial_id"] for r in second.rows}
    # Each trial's driver started exactly once: the finished trial was not run again after the restore.
    assert [r["attempts"] for r in second.rows] == [1, 1]
    before = next(r for r in first.rows if r["trial_id"] == first_id)
    after = next(r for r in second.rows if r["trial_id"] == first_id)
    assert (after["reports"], after["val_top1"], after["checkpoint"]) == \
        (before["reports"], before["val_top1"], before["checkpoint"])


@pytest.mark.integration
def test_sweep_is_tracked_with_nested_runs_table_plot_and_best(resumed_sweep):
    import mlflow

    from workflows.checkpoints import read_state

    sweep_plan, _, result, _ = resumed_sweep
    client = mlflow.MlflowClient(sweep_plan.tracking_uri)
    experiment = client.get_experiment_by_name(sweep_plan.sweep.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("dist.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.run_id == result.parent_run_id  # the resume reused it
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(nested) == 2
    assert sorted(r.data.params["model.fusion_layers"] for r in nested) == ["every2", "last_third"]
    for run in nested:  # config as params, metrics per report, and the cost the driver added
        assert run.data.params["train.max_steps"] == "2"
        assert {"val_top1", "loss", "clips_per_s", "trainable_params", "dist_gflops_per_clip",
                "frozen_clip_gflops_per_clip", "clips_per_s_median"} <= set(run.data.metrics)

    # The results table (CSV on disk and on the parent) and the plot.
    assert result.table_path.exists() and result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with result.table_path.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and {"model.fusion_layers", "val_top1", "val_top5", "dist_gflops", "frozen_clip_gflops",
                                "trainable_params", "clips_per_s", "pareto", "status"} <= set(table[0])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "accuracy_vs_cost.png", "best_checkpoint"} <= artifacts
    best_files = {a.path for a in client.list_artifacts(parent.info.run_id, "best_checkpoint")}
    assert best_files == {"best_checkpoint/weights.safetensors", "best_checkpoint/state.json"}

    # The best trial is the one with the highest val top-1 reported by any trial (read back from MLflow).
    reported = {r.info.run_name: max(m.value for m in client.get_metric_history(r.info.run_id, "val_top1"))
                for r in nested}
    top = max(reported.values())
    assert result.best["val_top1"] == top and reported[result.best["run_name"]] == top
    assert parent.data.metrics["best_val_top1"] == top
    assert read_state(result.best["checkpoint"])["metrics"]["val_top1"] == top


# --- a real optuna + ASHA sweep in which one trial is stopped early and one fails ---
@pytest.fixture(scope="module")
def asha_sweep(ray_local, smoke_data, tmp_path_factory):
    """Three trials of 2 steps with a validation after each (so 2 reports), ASHA on val top-1 (grace 1, max_t 2,
    reduction factor 2), one trial at a time, searcher optuna given three fixed points (num_samples 3, so optuna
    suggests them and draws nothing more: a fourth trial cost ~25 s of the suite):

    1. val on `every_label.csv`: every val video listed once under each of the K labels, so whatever the model
       predicts exactly one row in K is right: val top-1 = 100/K, independent of training;
    2. as 1 but `train.fail_at_step=1` with run.max_failures=0: the trial fails before reporting;
    3. val on `unreadable.csv` (corrupt files, dropped with data.max_bad_fraction=1): val top-1 = 0. ASHA
       recorded trial 1's 100/K at the first rung, and the failed trial between must not have changed that, so it
       must stop this one after its first report.

    Returns (plan, result, labels K, what the driver printed)."""
    root = tmp_path_factory.mktemp("asha")
    labels = json.loads((smoke_data / "labels.json").read_text())
    with (smoke_data / "val.csv").open() as f:
        videos = [row["path"] for row in csv.DictReader(f)][:2]
    every_label, unreadable = smoke_data / "every_label.csv", smoke_data / "unreadable.csv"
    every_label.write_text("path,label\n" + "".join(f"{v},{name}\n" for v in videos for name in labels))
    for i in range(2):
        (smoke_data / f"corrupt_{i}.mp4").write_bytes(np.random.default_rng(i).bytes(3000))
    unreadable.write_text("path,label\n" + "".join(f"corrupt_{i}.mp4,{name}\n"
                                                     for i, name in zip(range(2), labels, strict=False)))
    point = "{{data.val_manifest: {val}, train.fail_at_step: {fail}}}"
    path = root / "sweep.yaml"
    path.write_text(f"""base: {CONFIGS / 'smoke.yaml'}
base_overrides:
  - scaling.num_workers=1
  - train.global_batch_size=4
  - train.max_steps=2
  - eval.every_steps=1
  - run.max_failures=0
  - data.max_bad_fraction=1.0
  - data.train_manifest={smoke_data / 'train.csv'}
  - data.val_manifest={every_label}
  - data.labels={smoke_data / 'labels.json'}
search_space:
  data.val_manifest: {{choice: [{every_label}, {unreadable}]}}
  train.fail_at_step: {{choice: [null, 1]}}
searcher: optuna
num_samples: 3
seed: 0
points_to_evaluate:
  - {point.format(val=every_label, fail="null")}
  - {point.format(val=every_label, fail=1)}
  - {point.format(val=unreadable, fail="null")}
scheduler: asha
asha: {{grace_period: 1, max_t: 2, reduction_factor: 2}}
max_concurrent_trials: 1
name: asha-optuna
storage_path: {root / 'runs'}
""")
    sweep_plan = plan_sweep(load_sweep(path))
    console = io.StringIO()  # the driver's console: Tune's reporter and our callback print to sys.stdout
    with contextlib.redirect_stdout(console):
        result = run_sweep(sweep_plan)
    return sweep_plan, result, len(labels), console.getvalue()


@pytest.mark.integration
def test_asha_stops_a_trial_and_a_failed_trial_does_not_stop_the_sweep(asha_sweep):
    import mlflow

    sweep_plan, result, num_labels, _ = asha_sweep
    sweep = sweep_plan.sweep
    assert not result.interrupted and len(result.rows) == 3
    rows = result.rows  # in the order Tune created the trials: the three points
    assert [{k: r[k] for k in sweep.search_space} for r in rows] == sweep.points_to_evaluate
    steady, failed, stopped = rows

    # ASHA: trial 1 set the rung at 100/K; trial 3 reported 0 there and was stopped after 1 of its 2 reports.
    assert steady["status"] == "completed" and steady["reports"] == sweep.asha.max_t == 2
    assert steady["val_top1"] == pytest.approx(100.0 / num_labels)
    assert stopped["status"] == "stopped early" and stopped["reports"] == 1 < sweep.asha.max_t
    assert stopped["val_top1"] == 0.0 and stopped["last_step"] == 1
    # The failure is reported and the sweep went on to the third trial.
    assert failed["reports"] == 0 and math.isnan(failed["val_top1"])
    # its root cause, not Ray's wrapping: the trial's Train run failed as a WorkerGroupError
    assert failed["status"] == "error: rank 0 failed: RuntimeError: injected failure at step 1 (train.fail_at_step) " \
                               "on rank 0", failed["status"]
    assert [r["attempts"] for r in rows] == [1, 1, 1]

    # The best trial is the highest val top-1 among the trials that reported.
    reported = [r for r in rows if not r["status"].startswith("error")]
    assert result.best["val_top1"] == max(r["val_top1"] for r in reported)
    assert result.best["trial_id"] in {r["trial_id"] for r in reported}

    # The table on disk shows the statuses.
    with result.table_path.open() as f:
        table = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert table[stopped["trial_id"]]["status"] == "stopped early"
    assert table[failed["trial_id"]]["status"].startswith("error")
    assert table[result.best["trial_id"]]["best"] == "True"

    # MLflow: each nested run closed with the status of its row; the parent counts them.
    client = mlflow.MlflowClient(sweep_plan.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    experiment = client.get_experiment_by_name(sweep.mlflow.experiment)
    nested = {r.info.run_name: r for r in client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")}
    assert len(nested) == 3
    expected = {steady["run_name"]: ("FINISHED", "completed"), stopped["run_name"]: ("KILLED", "stopped early"),
                failed["run_name"]: ("FAILED", failed["status"])}
    for name, (status, tag) in expected.items():
        assert (nested[name].info.status, nested[name].data.tags["tune.status"]) == (status, tag)
    # (A stopped trial's Train workers end with its driver; they may log one more validation before they do.)
    history = client.get_metric_history(nested[stopped["run_name"]].info.run_id, "val_top1")
    assert (history[0].step, history[0].value) == (1, 0.0)
    assert parent.data.metrics["trials"] == 3
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_stopped_early"] == 1
    assert parent.data.metrics["best_val_top1"] == result.best["val_top1"]


@pytest.mark.integration
def test_the_sweep_console_is_a_line_per_trial_event_not_tunes_tables(asha_sweep):
    _, result, _, console = asha_sweep
    steady, failed, stopped = result.rows
    assert "Trial status:" not in console and "started with configuration" not in console, console[-4000:]
    # Tune's output engine: its start box and a box per trial result or failure, even at verbose=0
    assert "Configuration for experiment" not in console and "errored after" not in console, console[-4000:]
    assert "result" not in "".join(line for line in console.splitlines() if line.startswith("│")), console[-4000:]
    assert f"[tune] trial {steady['trial_id']}: val_top1 " in console
    assert f"[tune] trial {steady['trial_id']} completed after 2 report(s); 1 of 3 trials finished; best so far " \
           f"{steady['trial_id']} val_top1 " in console, console[-4000:]
    assert f"[tune] trial {failed['trial_id']} failed: rank 0 failed: RuntimeError: injected failure at step 1 " \
           "(train.fail_at_step) on rank 0; 2 of 3 trials finished" in console, console[-4000:]
    traceback = re.search(rf"\[tune\] trial {failed['trial_id']} failed: .*; its traceback: (\S+)$", console, re.M)
    assert traceback and "injected failure at step 1" in Path(traceback[1]).read_text(), console[-4000:]
    assert f"[tune] trial {stopped['trial_id']} stopped early by the scheduler after 1 report(s); 3 of 3 trials " \
           "finished" in console, console[-4000:]


@pytest.mark.integration
def test_retry_failed_resumes_the_failed_trial_under_its_id_and_it_finishes(asha_sweep):
    """`--retry-failed` resumes a failed trial as it was (Tune's resume_errored: its id, so its run directory and
    newest complete checkpoint), and no other trial runs again. The failed trial's injected failure happens once per
    run directory, so in its own directory it now trains to the end."""
    sweep_plan, first, _, _ = asha_sweep
    failed = first.rows[1]
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        result = run_sweep(sweep_plan, resume=True, retry_failed=True)
    rows = {r["trial_id"]: r for r in result.rows}
    assert set(rows) == {r["trial_id"] for r in first.rows}  # the same three trials, no new id
    assert rows[failed["trial_id"]]["status"] in ("completed", "stopped early"), rows[failed["trial_id"]]
    assert rows[failed["trial_id"]]["attempts"] == 2
    assert [rows[r["trial_id"]]["attempts"] for r in (first.rows[0], first.rows[2])] == [1, 1]
    assert f"[tune] trial {failed['trial_id']} (" in console.getvalue()


def test_a_full_disk_stops_the_sweep_as_ctrl_c_does(tmp_path, capsys):
    """A trial that failed on a full disk (ENOSPC in a checkpoint's write, or the check before training that finds
    no room for one) stops the sweep through Tune's SIGUSR1 handler, which saves the sweep's state: every later
    trial would train to its first checkpoint and fail there. Other failures do not; a retry
    (trial_max_failures) of a full disk is not attempted; Tune's "Ctrl-C" line for it is dropped."""
    import logging
    from types import SimpleNamespace

    import cloudpickle

    from workflows.console import quiet_tune_console
    from workflows.elastic import RunNotRestarted
    from workflows.runtime import is_disk_full
    from workflows.tune import progress

    def failed_trial(trial_id: str, error: BaseException):
        path = tmp_path / f"{trial_id}.pkl"
        path.write_bytes(cloudpickle.dumps(error))
        return SimpleNamespace(trial_id=trial_id, status="RUNNING", metric_analysis={}, pickled_error_file=str(path),
                               error_file=None)

    full = RunNotRestarted("rank 0 failed: OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No "
                           "space left on device")
    no_room = ConfigError("/x's disk has 0.7 MiB free, and a checkpoint of this run takes about 3.2 MiB: the first "
                          "checkpoint would not fit, after training up to it")
    assert is_disk_full(str(full)) and is_disk_full(str(no_room)) and not is_disk_full("RuntimeError: injected")
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: (received.append(1), logging.getLogger(
        "ray.tune.tune").warning("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run.")))
    records = []
    catcher = logging.Handler()
    catcher.emit = records.append
    logging.getLogger("ray.tune.tune").addHandler(catcher)
    quiet_tune_console()  # as run_sweep does without --verbose (before, this test passed only after a sweep had run)
    room = tmp_path / progress.ROOM_FOR_THE_STATE  # disk space held for Tune's last save, given back before it
    try:
        progress.hold_room_for_the_sweep_state(str(tmp_path), trials=3)
        assert room.stat().st_size == 2**20 + 3 * 2**16 and room.stat().st_blocks * 512 >= 2**20  # not sparse
        sweep = progress.SweepProgress("val_top1", "max", expected_trials=3)
        sweep.setup()
        sweep.on_trial_error(0, [], failed_trial("a", RuntimeError("injected failure")))
        assert received == [] and progress.sweep_stopped_for() is None and room.exists()
        sweep.on_trial_error(0, [], failed_trial("b", full))
        assert received == [1] and progress.sweep_stopped_for() == "trial b failed on a full disk"
        assert not room.exists()
        state_logger = logging.getLogger("ray.tune.execution.experiment_state")
        state_logger.addHandler(catcher)
        try:  # what Tune logs when a copy of its state begun before the stop failed on the full disk
            raise OSError(28, "No space left on device")
        except OSError:
            state_logger.error("Saving experiment state to storage at '/x' failed with exception: ", exc_info=True)
        finally:
            state_logger.removeHandler(catcher)
        assert records == []  # the line below instead
        assert records == []  # Tune's line blaming a Ctrl-C
        sweep.on_trial_error(0, [], failed_trial("c", full))  # stopping already
        assert received == [1]
        sweep.setup()  # the next sweep in this process
        assert progress.sweep_stopped_for() is None
        sweep.on_trial_recover(0, [], failed_trial("d", no_room))
        assert received == [1, 1] and progress.sweep_stopped_for() == "trial d failed on a full disk"
        progress.hold_room_for_the_sweep_state(str(tmp_path / "gone"), trials=3)  # no room (here: no folder)
        progress.give_back_room_for_the_sweep_state()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        logging.getLogger("ray.tune.tune").removeHandler(catcher)
        progress.give_back_room_for_the_sweep_state()
    out = capsys.readouterr().out
    assert "[tune] trial a failed: RuntimeError: injected failure; " in out
    assert "[tune] stopping the sweep: trial b met a full disk, which would fail each trial after it" in out
    assert "[tune] a copy of the sweep's state begun before the stop met the full disk; Tune saves the state" in out
    assert "[tune] trial d failed: ConfigError: /x's disk has 0.7 MiB free" in out and "starts again" not in out


def test_a_sweep_whose_saved_state_was_cut_short_is_refused_not_started_anew(tmp_path):
    """Tune writes its experiment state in place; a full disk cut one short at 20000 bytes on a real tmpfs, and
    Tune's restore then logged a failure and started the sweep anew over its finished trials."""
    from types import SimpleNamespace

    from workflows.tune.driver import check_sweep_state_readable

    plan = SimpleNamespace(path=str(tmp_path), train_storage=str(tmp_path / "trials"),
                           sweep=SimpleNamespace(name="s"))
    check_sweep_state_readable(plan)  # none there: nothing to check
    (tmp_path / "experiment_state-2026-12-06_10-00-00.json").write_text('{"trial_data": []}')
    check_sweep_state_readable(plan)
    (tmp_path / "experiment_state-2026-12-06_11-12-58.json").write_text('{"trial_data": [["{\\"trial_id')
    with pytest.raises(ConfigError, match=r"experiment_state-2026-12-06_11-12-58\.json cannot be read \(\d+ bytes; "
                                          r".*cut short, most likely by a full disk.*another name \(--set name="):
        check_sweep_state_readable(plan)


@pytest.mark.integration
def test_a_sweep_holds_its_trials_to_its_slots_and_takes_back_a_dead_trials(ray_local, tmp_path):
    """TrialSlots on a real Ray: with one slot, a second trial waits while the first trial's actor lives (idle, or
    busy in a call), and takes the slot once that actor is killed (as Tune kills a trial its scheduler stops, before
    the trial's own `finally` gives the slot back)."""
    import ray

    from workflows.tune.slots import give_back_slot, open_slots, take_slot

    @ray.remote(num_cpus=0)
    class Trial:
        def take(self, sweep_path: str, trial_id: str) -> bool:
            take_slot(sweep_path, trial_id)
            return True

    path = str(tmp_path / "sweep")
    slots = open_slots(path, 1)
    first, second, third = Trial.remote(), Trial.remote(), Trial.remote()
    assert ray.get(first.take.remote(path, "first"), timeout=60)
    waiting = second.take.remote(path, "second")
    ready, _ = ray.wait([waiting], timeout=4)
    assert not ready and ray.get(slots.held.remote()) == ["first"]
    ray.kill(first)
    assert ray.get(waiting, timeout=60)
    assert ray.get(slots.held.remote()) == ["second"]
    give_back_slot(path, "second")  # what a trial's `finally` does
    assert ray.get(third.take.remote(path, "third"), timeout=60)
    for actor in (second, third, slots):
        ray.kill(actor)


def test_the_sweep_status_line_counts_the_trials_and_names_the_best():
    from types import SimpleNamespace

    from workflows.tune.progress import SweepProgress

    def trial(trial_id: str, status: str, best: float | None = None):
        return SimpleNamespace(trial_id=trial_id, status=status,
                               metric_analysis={"val_top1": {"max": best}} if best is not None else {})

    trials = [trial("a", "TERMINATED", 20.0), trial("b", "RUNNING", 35.0), trial("c", "PENDING")]
    progress = SweepProgress("val_top1", "max", expected_trials=4, status_every_s=0)
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        progress.on_step_end(1, trials)
        progress.on_step_end(2, [trial("a", "TERMINATED", 20.0)])  # nothing running: no line
    assert console.getvalue() == "[tune] 1 pending, 1 running, 1 terminated; 1 of 4 trials finished; best so far b " \
                                 "val_top1 35.00\n"


def test_trial_status_comes_from_the_reports_even_on_remote_storage(tmp_path):
    """With s3:// storage nothing local holds the trials' checkpoints: the status must come from the reported
    metrics, so an ASHA-stopped trial is not reported completed."""
    import types

    import pandas as pd

    from workflows.tune.report import trial_row

    sweep_plan = plan(write_sweep(tmp_path, "  train.lr: {grid: [0.001]}"))

    def result(finals: list[float]) -> types.SimpleNamespace:
        reports = [{"val_top1": 10.0 * i, "step": 2 * i, "final": f,
                    "checkpoint_path": f"s3://bucket/sweep/trials/t/checkpoint_{i}"} for i, f in enumerate(finals, 1)]
        return types.SimpleNamespace(path="s3://bucket/sweep/trial_x", config={}, error=None,
                                     metrics_dataframe=pd.DataFrame(reports))

    assert trial_row(result([0.0]), sweep_plan, [])["status"] == "stopped early"
    assert trial_row(result([0.0, 1.0]), sweep_plan, [])["status"] == "completed"


def test_a_trial_not_restarted_reports_the_recorded_cause(tmp_path):
    """A trial whose Train run ended on a failure a restart cannot fix (run_trial raises RunNotRestarted, which Tune
    wraps in a RayTaskError, as it did in a by-hand sweep over 16 good and 6 corrupt videos): the status is
    the cause the failing rank recorded, not the wrapper's name."""
    import types

    from ray.exceptions import RayTaskError

    from workflows.elastic import RunNotRestarted
    from workflows.tune.report import trial_row

    sweep_plan = plan(write_sweep(tmp_path, "  train.lr: {grid: [0.001]}"))
    cause = RunNotRestarted("rank 0 failed: TooManyBadVideos: 3 of 22 train videos are unusable, more than "
                            "max_bad_fraction=0.1")
    error = RayTaskError("ImplicitFunc.train", "Traceback (most recent call last): ...", cause)
    trial = types.SimpleNamespace(path=str(tmp_path / "trial_x"), config={}, error=error, metrics_dataframe=None)
    assert trial_row(trial, sweep_plan, [])["status"] == ("error: rank 0 failed: TooManyBadVideos: 3 of 22 train "
                                                          "videos are unusable, more than max_bad_fraction=0.1")


def test_trials_get_no_copy_of_the_drivers_aws_credentials(monkeypatch):
    """Ray Tune 2.60 copies AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN from the driver into each
    trial actor's runtime env, which Ray writes to every node's runtime_env_agent.log (seen by
    tests/workflows/test_object_storage.py) and the GCS actor table. The sweep driver turns that off; the trials
    inherit the credentials from their nodes (or the job's runtime env) instead."""
    from ray.tune.execution import class_cache

    from workflows.tune.driver import TUNE_COPIED_CREDENTIALS, keep_credentials_out_of_trial_runtime_envs

    # Ray's own set (a sweep run earlier in this process has already taken the credentials out of it).
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE",
                        set(class_cache.ENV_VARS_TO_PROPAGATE) | set(TUNE_COPIED_CREDENTIALS))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "the-secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "the-key-id")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")

    class Trainable:
        pass

    def runtime_env_vars() -> dict:
        return class_cache._ActorClassCache().get(Trainable)._default_options["runtime_env"]["env_vars"]

    assert runtime_env_vars()["AWS_SECRET_ACCESS_KEY"] == "the-secret"  # what Ray Tune does by itself
    keep_credentials_out_of_trial_runtime_envs()
    copied = runtime_env_vars()
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} & set(copied)
    assert copied["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "300"  # Ray Train's own settings still travel
