"""Tracking never stops training: off, unreachable, or working."""

from __future__ import annotations

import sqlite3

from workflows.tracking import Tracker, flatten


def test_disabled_tracker_is_a_no_op():
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
