"""MLflow tracking that never takes a training run down.

Every call is guarded: the first failure (server unreachable, store locked, bad URI) prints one line saying that
tracking is off and why, and later calls do nothing. Used from rank 0 only.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def default_tracking_uri(run_dir: str) -> str:
    """A sqlite store inside the run directory (MLflow 3 refuses the plain file store)."""
    if "://" in run_dir:
        raise ValueError(f"run directory {run_dir} is remote: set mlflow.tracking_uri to a tracking server")
    path = Path(run_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None, run_dir: str) -> str:
    """The recipe's URI, else MLFLOW_TRACKING_URI (set on cluster nodes), else a sqlite store in the run dir."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_dir)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the resolved config as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class Tracker:
    """A guarded MLflow run. `Tracker(None)` is a no-op tracker (non-zero ranks, tracking disabled)."""

    def __init__(self, tracking_uri: str | None, experiment: str = "dist", run_name: str | None = None,
                 run_id: str | None = None, parent_run_id: str | None = None, tags: dict[str, str] | None = None):
        self.active = tracking_uri is not None
        self.run_id: str | None = None
        self._mlflow = None
        if not self.active:
            return
        # Fail fast instead of retrying for minutes when a tracking server is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self._guard("start", lambda: self._start(tracking_uri, experiment, run_name, run_id, parent_run_id, tags or {}))

    def _start(self, uri, experiment, run_name, run_id, parent_run_id, tags) -> None:
        import mlflow

        self._mlflow = mlflow
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        if run_id is None:
            found = self._client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
            if parent_run_id:
                tags = {**tags, "mlflow.parentRunId": parent_run_id}
            run = self._client.create_run(experiment_id, run_name=run_name, tags=tags)
            run_id = run.info.run_id
        self.run_id = run_id

    def _guard(self, what: str, call) -> Any:
        """Run `call()` (a thunk, so nothing is evaluated once tracking is off); the first failure turns it off."""
        if not self.active:
            return None
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self.active = False
            print(f"[mlflow] {what} failed ({type(exc).__name__}: {exc}); training continues without tracking",
                  flush=True)
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            batch = items[i:i + 100]
            self._guard("log_params", lambda batch=batch: self._client.log_batch(self.run_id, params=batch))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if items:
            self._guard("log_metrics", lambda: self._client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._guard("set_tag", lambda key=key, value=value: self._client.set_tag(self.run_id, key, str(value)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._guard("log_artifact", lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_text(self, text: str, name: str) -> None:
        self._guard("log_text", lambda: self._client.log_text(self.run_id, text, name))

    def finish(self, status: str = "FINISHED") -> None:
        self._guard("finish", lambda: self._client.set_terminated(self.run_id, status))


@contextmanager
def temporary_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dist-") as tmp:
        yield Path(tmp)
