"""Tracking never stops training: off, unreachable, or working."""

from __future__ import annotations

import sqlite3
import sys

import mlflow

from workflows.tracking import Tracker, flatten


def test_disabled_tracker_is_a_no_op(monkeypatch):
    # Tracking off must not need mlflow at all (a GPU image without it crashed at the first progress line).
    for name in ("mlflow", "mlflow.entities"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of it now raises ImportError
    tracker = Tracker(None)
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_artifact("/nonexistent")
    tracker.finish()
    assert not tracker.active


def test_unreachable_server_turns_tracking_off_once(capsys):
    tracker = Tracker("http://127.0.0.1:9", experiment="x")  # nothing listens on the discard port
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_metrics({"loss": 2.0}, step=2)
    out = capsys.readouterr().out
    assert not tracker.active and out.count("training continues without tracking") == 1


def test_sqlite_store_receives_params_and_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, experiment="exp", run_name="r")
    tracker.log_params({"train": {"lr": 0.1}, "model": {"preset": "dist_tiny"}})
    tracker.log_metrics({"loss": 0.5}, step=3)
    tracker.finish()
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        params = dict(con.execute("select key, value from params").fetchall())
        metrics = con.execute("select key, value, step from metrics").fetchall()
    assert params == {"train.lr": "0.1", "model.preset": "dist_tiny"} and metrics == [("loss", 0.5, 3)]
    assert flatten({"a": {"b": {"c": 1}}, "d": {}}) == {"a.b.c": 1, "d": {}}


def test_reuse_tags_reopen_the_latest_tagged_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri, experiment="exp", run_name="sweep", tags={"role": "sweep"}, reuse_tags={"path": "/a"})
    first.finish()
    other = Tracker(uri, experiment="exp", run_name="sweep", reuse_tags={"path": "/b"})
    again = Tracker(uri, experiment="exp", run_name="sweep", reuse_tags={"path": "/a"})
    assert first.created and other.created and not again.created
    assert again.run_id == first.run_id != other.run_id
    run = mlflow.MlflowClient(uri).get_run(again.run_id)
    assert run.info.status == "RUNNING" and run.data.tags["role"] == "sweep" and run.data.tags["path"] == "/a"


def test_children_and_child_trackers(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker(uri, experiment="exp", run_name="parent")
    for name, rates in (("a", [1.0, 3.0]), ("b", [2.0])):
        nested = Tracker(uri, experiment="exp", run_name=name, parent_run_id=parent.run_id)
        for step, rate in enumerate(rates):
            nested.log_metrics({"clips_per_s": rate}, step=step)
    Tracker(uri, experiment="exp", run_name="unrelated")
    runs = parent.children()
    assert sorted(runs) == ["a", "b"]
    a = parent.child(runs["a"].info.run_id)
    assert a.metric_history("clips_per_s") == [1.0, 3.0] and a.run_id != parent.run_id
    a.set_tags({"tune.status": "stopped early"})
    a.finish("KILLED")
    run = mlflow.MlflowClient(uri).get_run(a.run_id)
    assert run.info.status == "KILLED" and run.data.tags["tune.status"] == "stopped early"
    # A child found through a Tracker reattached by run id (no experiment name needed).
    assert sorted(Tracker(uri, run_id=parent.run_id).children()) == ["a", "b"]


def test_one_failure_turns_off_a_tracker_and_its_children(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker(uri, experiment="exp", run_name="parent", who="the sweep")
    child = parent.child("no-such-run")
    child.log_metrics({"x": 1.0})  # an unknown run id: the store refuses
    parent.log_metrics({"x": 1.0})
    assert not child.active and not parent.active and parent.children() == {} and child.metric_history("x") == []
    out = capsys.readouterr().out
    assert out.count("the sweep continues without tracking") == 1
    down = Tracker("http://127.0.0.1:9", experiment="x", reuse_tags={"a": "b"})
    assert not down.active and down.run_id is None and down.children() == {} and not down.created


def test_artifacts_land_beside_the_sqlite_store_not_in_the_working_directory(tmp_path, monkeypatch):
    """A Ray worker's working directory is Ray's session directory, which Ray rotates away: what a run logs must live
    beside its store and stay readable once that directory is gone."""
    import shutil

    store = tmp_path / "run"
    store.mkdir()
    session = tmp_path / "ray_session" / "artifacts"  # the worker's working directory
    session.mkdir(parents=True)
    monkeypatch.chdir(session)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    tracker = Tracker(uri, experiment="demo dist/1", run_name="r")
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"not really weights")
    tracker.log_artifact(weights, "final_checkpoint")
    tracker.log_text("a: 1\n", "recipe.yaml")
    tracker.finish()
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(tmp_path / "ray_session")

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    location = client.get_experiment(run.info.experiment_id).artifact_location
    assert location.startswith((store / "mlartifacts").as_uri()), location
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    client.download_artifacts(tracker.run_id, "", str(fetched))
    assert (fetched / "final_checkpoint" / "weights.safetensors").read_bytes() == b"not really weights"
    assert (fetched / "recipe.yaml").read_text() == "a: 1\n"


def test_register_model_creates_versions_with_tags(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model_dir = tmp_path / "final_checkpoint"
    model_dir.mkdir()
    (model_dir / "weights.safetensors").write_bytes(b"w")
    versions = []
    for step in (4, 6):
        tracker = Tracker(uri, experiment="exp", run_name="r")
        tracker.log_artifacts(model_dir, "final_checkpoint")
        versions.append(tracker.register_model("k710-b16", "final_checkpoint", {"step": step, "val_top1": 50.0},
                                               "a description"))
        tracker.finish()
    assert versions == ["1", "2"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    second = client.get_model_version("k710-b16", "2")
    assert second.tags == {"step": "6", "val_top1": "50.0"} and second.description == "a description"
    assert Tracker(None).register_model("x", "final_checkpoint", {}, "") is None  # tracking off: nothing to do


def test_a_registered_model_needs_its_store(monkeypatch):
    import pytest

    from workflows.config_loader import ConfigError
    from workflows.inference import read_checkpoint

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="pass --tracking-uri"):
        read_checkpoint("models:/k710-b16/3")


def test_a_registered_version_loads_back_as_a_checkpoint_directory(tmp_path, monkeypatch, capfd):
    from workflows.inference import fetch_registered_model

    monkeypatch.chdir(tmp_path)  # no global MLflow state may stand in for the store named here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    (tmp_path / "run").mkdir()
    model_dir = tmp_path / "final_checkpoint"
    model_dir.mkdir()
    (model_dir / "state.json").write_text('{"step": 6}')
    tracker = Tracker(uri, experiment="exp", run_name="r")
    tracker.log_artifacts(model_dir, "final_checkpoint")
    assert tracker.register_model("it", "final_checkpoint", {}, "") == "1"
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    capfd.readouterr()
    fetched = fetch_registered_model("models:/it/1", uri)
    assert (fetched / "state.json").read_text() == '{"step": 6}'
    assert "Downloading artifacts" not in capfd.readouterr().err  # MLflow's tqdm bar, among the command's lines
