"""MLflow tracking that never takes a training run down.

Every call is guarded: the first failure (server unreachable, store locked, bad URI) prints one line saying that
tracking is off and why, and later calls do nothing. Training runs use it from rank 0 only; the Tune driver uses
it for a sweep's parent run and to annotate the trials' nested runs.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

from workflows.runtime import is_remote, redact_secrets

STORE_FILE = "mlflow.db"


def resolve_tracking_uri(configured: str | None, run_dir: str | Path, *, create: bool = True,
                         make_dir: bool = True) -> str | None:
    """The MLflow store of a run (or sweep) directory, the one rule every workflow uses: the configured URI, else
    MLFLOW_TRACKING_URI (set on cluster nodes), else a sqlite store `<run_dir>/mlflow.db` (MLflow 3 refuses the
    plain file store). `create` False: only a store that already exists there, else None. `make_dir` False: the
    directory of a new sqlite store is left for the caller to make (planning a sweep makes nothing). A remote run
    directory needs a tracking server: ConfigError when no URI is configured."""
    from workflows.config_loader import ConfigError

    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if is_remote(run_dir):
        if not create:
            return None
        raise ConfigError(f"run directory {run_dir} is remote: set mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to a "
                          "tracking server, e.g. http://<head>:5000")
    path = Path(run_dir).resolve()
    if not create and not (path / STORE_FILE).is_file():
        return None
    if make_dir:
        path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / STORE_FILE}"


def check_tracking_uri(uri: str, key: str = "mlflow.tracking_uri") -> None:
    """ConfigError, before any work, for a tracking URI a run could not record into: a scheme MLflow has no store for
    (a typo: `htp://`), or a tracking server that does not answer. Tracking never stops a run that has started
    (the module's rule), so a wrong URI found only then would leave a whole run unrecorded."""
    import urllib.error
    import urllib.request

    from mlflow.tracking._tracking_service.utils import _tracking_store_registry  # MLflow 3's scheme table

    from workflows.config_loader import ConfigError

    shown = redact_secrets(uri)
    try:
        _tracking_store_registry.get_store_builder(uri)
    except Exception:  # noqa: BLE001 - MLflow's Unsupported*StoreURIException, whose text lists the schemes
        raise ConfigError(f"{key} {shown}: MLflow has no tracking store for this URI. Use a server "
                          f"(http://<host>:5000), a database (sqlite:////abs/path/mlflow.db, postgresql://...), or "
                          f"leave it unset for the run directory's own sqlite store") from None
    if uri.startswith(("http://", "https://")):
        try:  # any HTTP answer (401 from a server with auth included) says the server is there
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except urllib.error.HTTPError:
            pass
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"{key} {shown}: the tracking server does not answer ({reason}). Start it (`mlflow "
                              f"server ...`) or fix the address, or --set mlflow.enabled=false to train without "
                              f"tracking") from None


def repaired_sqlite_uri(uri: str | None) -> str | None:
    """A sqlite store's URI as recipe.yaml files written before 2026-12-06 hold it: their secret redaction rewrote
    sqlite:////abs/mlflow.db as sqlite://abs/mlflow.db and sqlite:///rel.db as sqlite:/rel.db, forms SQLAlchemy
    refuses. Those two come back as written; every other URI is returned unchanged."""
    if uri is None or uri.startswith("sqlite:///") or uri == "sqlite://":
        return uri
    if uri.startswith("sqlite://"):  # was sqlite:////abs
        return "sqlite:////" + uri.removeprefix("sqlite://")
    if uri.startswith("sqlite:/"):  # was sqlite:///rel
        return "sqlite:///" + uri.removeprefix("sqlite:/")
    return uri


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go. A local sqlite store keeps them beside it, `<store dir>/mlartifacts/
    <experiment>`: left to MLflow, they land under the creating process's working directory, which for a Ray worker
    is Ray's session directory (rotated away, and on whichever node rank 0 ran). Other stores (a tracking server)
    use their own artifact root: None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    store_dir = Path(tracking_uri.removeprefix("sqlite:///")).parent
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (store_dir / "mlartifacts" / safe).resolve().as_uri()


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
    """A guarded MLflow run. `Tracker(None)` is a no-op tracker (non-zero ranks, tracking disabled).

    Which run: `run_id` reattaches to an existing run (a resumed training run). Otherwise, with `reuse_tags`, the
    latest run of the experiment that carries all of them is reopened (a resumed sweep's parent run); failing
    that, a new run is created with `tags` + `reuse_tags`, nested under `parent_run_id` when given. `created`
    says whether this Tracker made the run.

    Other runs: `child(run_id)` is a Tracker bound to another run of the same store that shares this one's client
    and its on/off switch (one failure turns tracking off for both); `children()` lists the runs nested under
    this one. `who` names what goes on when tracking fails ("training", "the sweep").
    """

    def __init__(self, tracking_uri: str | None, experiment: str = "dist", run_name: str | None = None,
                 run_id: str | None = None, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 *, reuse_tags: dict[str, str] | None = None, who: str = "training"):
        self._switch = {"on": tracking_uri is not None}  # shared with child() trackers
        self._who = who
        self.tracking_uri = tracking_uri
        self.run_id: str | None = None
        self.created = False
        self.experiment_id: str | None = None
        self._client: Any = None
        if not self.active:
            return
        # Fail fast instead of retrying for minutes when a tracking server is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self._guard("start", lambda: self._start(tracking_uri, experiment, run_name, run_id, parent_run_id, tags or {},
                                                 reuse_tags or {}))

    @property
    def active(self) -> bool:
        """False once tracking is off (never on, or the first failure)."""
        return self._switch["on"]

    def _start(self, uri, experiment, run_name, run_id, parent_run_id, tags, reuse_tags) -> None:
        import logging

        import mlflow

        # "Creating initial MLflow database tables..." / "Updating database tables": two INFO lines on the console
        # each time a run's sqlite store is made; its warnings and errors still show
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        if run_id is None:
            found = self._client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self._client.create_experiment(
                experiment, artifact_location=artifact_location(uri, experiment))
            if reuse_tags:
                query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in reuse_tags.items())
                runs = self._client.search_runs([self.experiment_id], query,
                                                order_by=["attributes.start_time DESC"], max_results=1)
                if runs:
                    run_id = runs[0].info.run_id
                    self._client.update_run(run_id, status="RUNNING")
        if run_id is None:
            tags = {**tags, **reuse_tags}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self._client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            run_id, self.created = run.info.run_id, True
        self.run_id = run_id

    def _guard(self, what: str, call) -> Any:
        """Run `call()` (a thunk, so nothing is evaluated once tracking is off); the first failure turns it off."""
        if not self.active:
            return None
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._switch["on"] = False
            print(f"[mlflow] {what} failed ({type(exc).__name__}: {exc}); {self._who} continues without tracking",
                  flush=True)
            return None

    def child(self, run_id: str) -> Tracker:
        """A Tracker bound to `run_id` (e.g. a nested run), sharing this one's client and on/off switch."""
        other = copy.copy(self)
        other.run_id, other.created = run_id, False
        return other

    def new_child(self, run_name: str, tags: dict[str, Any]) -> Tracker:
        """A new run nested under this one, e.g. for a trial that failed before its own run opened."""
        def create() -> str:
            experiment_id = self.experiment_id or self._client.get_run(self.run_id).info.experiment_id
            run = self._client.create_run(experiment_id, run_name=run_name,
                                          tags={**{k: str(v) for k, v in tags.items()},
                                                "mlflow.parentRunId": self.run_id})
            return run.info.run_id

        return self.child(self._guard("create a nested run", create))

    def child_attempts(self) -> dict[str, list[Any]]:
        """Run name -> the MLflow `Run`s nested under this one with that name, newest first (a trial rerun after
        its sweep was interrupted opens a second run of the same name); empty when tracking is off."""
        def search() -> dict[str, list[Any]]:
            experiment_id = self.experiment_id or self._client.get_run(self.run_id).info.experiment_id
            runs = self._client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{self.run_id}'")
            by_name: dict[str, list[Any]] = {}
            for run in sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True):
                by_name.setdefault(run.info.run_name, []).append(run)
            return by_name

        return self._guard("search nested runs", search) or {}

    def children(self) -> dict[str, Any]:
        """Run name -> the newest MLflow `Run` of that name nested under this one (empty when tracking is off)."""
        return {name: runs[0] for name, runs in self.child_attempts().items()}

    def metric_history(self, key: str) -> list[float]:
        """Every value logged for `key`, in logging order."""
        history = self._guard("metric history", lambda: self._client.get_metric_history(self.run_id, key)) or []
        return [m.value for m in history]

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:  # tracking off: mlflow need not even be installed
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(redact_secrets(params)).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            batch = items[i:i + 100]
            self._guard("log_params", lambda batch=batch: self._client.log_batch(self.run_id, params=batch))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if not self.active:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if items:
            self._guard("log_metrics", lambda: self._client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self._guard("set_tag", lambda key=key, value=value: self._client.set_tag(self.run_id, key, str(value)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._guard("log_artifact", lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._guard("log_artifacts", lambda: self._client.log_artifacts(self.run_id, str(directory), artifact_path))

    def register_model(self, name: str, artifact_path: str, tags: dict[str, Any], description: str) -> str | None:
        """Register this run's artifact directory `artifact_path` as a new version of registered model `name`
        (created on first use); returns the version, or None when tracking is off or it failed."""
        def register() -> str:
            from mlflow.exceptions import MlflowException

            try:
                self._client.get_registered_model(name)
            except MlflowException:
                self._client.create_registered_model(name)
            version = self._client.create_model_version(
                name, source=f"runs:/{self.run_id}/{artifact_path}", run_id=self.run_id,
                tags={k: str(v) for k, v in tags.items()}, description=description)
            return str(version.version)

        return self._guard("register_model", register)

    def log_text(self, text: str, name: str) -> None:
        self._guard("log_text", lambda: self._client.log_text(self.run_id, text, name))

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status` (FINISHED, FAILED, KILLED)."""
        self._guard("finish", lambda: self._client.set_terminated(self.run_id, status))

