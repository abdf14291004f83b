"""No shared disk: every workflow against a real S3-API endpoint, as on a cloud cluster (issue #21).

One module-wide setup, all real processes on loopback (tests/workflows/object_store.py, tests/ray_nodes.py):

- moto's standalone S3 server, reached through a TCP proxy that can take the endpoint away (moto keeps its state
  in memory, so it is never restarted);
- an MLflow tracking server (`--backend-store-uri sqlite:///... --artifacts-destination s3://BUCKET/mlartifacts`,
  proxied artifacts);
- a Ray cluster of two raylets (`ray start --head` and `ray start --address`), each with its own temp dir and working
  directory, token authentication on. Credentials reach every process the way users give them: AWS_ACCESS_KEY_ID /
  AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION / AWS_ENDPOINT_URL (pyarrow's `FileSystem.from_uri`, which Ray Train
  and this project use for every URI, reads AWS_ENDPOINT_URL; boto3, behind MLflow's S3 store, too) in the
  environment of `ray start`, of the MLflow server and of the local commands; MLFLOW_TRACKING_URI on the nodes.

The drivers run as `ray job submit --working-dir <repo>` jobs (so on the head, in Ray's copy of the code) or, for the
local commands (`data upload`, and after the cluster is gone `evaluate` and `predict`), from a scratch directory.
What it proves, in order: the sample dataset uploaded with `data upload` and checked in the bucket with `data check`;
`pretrain` with `run.storage_path=s3://...` on both nodes, a Train worker SIGKILLed after the step-2 checkpoint is
complete in the bucket, the restarted group resuming from it; [marker `storage_sweep`] a Tune sweep with ASHA on s3
storage whose trials end completed and stopped early; [marker `storage_faults`] the S3 endpoint gone for 30 s in the
middle of a checkpoint upload, the run recovering and never resuming from the partial checkpoint; then the cluster
is stopped and its temp dirs and every local working directory deleted, and `evaluate` (on a new local Ray) and
`predict` still work from the bucket and the MLflow server alone (the registered model version too), and every
artifact the runs logged reads back through the server; the secret key appears in none of the bucket's files, MLflow
params and tags, the files the Ray nodes left (session logs included), or the drivers' output.

About 6 minutes on an idle 2-core machine (the sweep 1.2 and the outage 1.5 of them; `-m "not storage_faults"` or
`-m "not storage_sweep"` leave them out). The sweep and the outage are `extended`: only `make extended-test` runs
them, to keep `make test` within CI's time. Every driver's output, moto's request log and the MLflow server's log are
kept in pytest's basetemp (`object-storage-outputs*`), and the seconds per stage are printed at the end (`-s`).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.ray_nodes import MARKER, REPO, Cluster, end, marked
from tests.workflows.object_store import FaultyProxy, MlflowServer, MotoServer, Reaper, S3Credentials

pytestmark = pytest.mark.integration

BUCKET = "dist-no-shared-disk"
DATA = f"s3://{BUCKET}/datasets/sample"
RUNS = f"s3://{BUCKET}/runs"
RUN = "s3-run"
MODEL = "dist-s3"
SWEEPS = f"s3://{BUCKET}/sweeps"
SWEEP = "s3-sweep"
OUTAGE_RUN = "s3-outage"
OUTAGE_S = 30
JOB_TIMEOUT_S = 600
SMOKE = "workflows/configs/smoke.yaml"  # relative: the jobs run in Ray's copy of the repository


# ---------------------------------------------------------------------------------------------------------------
# the setup


@dataclass
class Stack:
    """The servers and the cluster, and everything the drivers printed (for the credentials check)."""

    root: Path
    moto: MotoServer
    proxy: FaultyProxy
    creds: S3Credentials
    mlflow: MlflowServer
    cluster: Cluster
    reaper: Reaper
    keep: Path  # what the drivers printed, kept after the module (pytest's basetemp) for reading a failure
    outputs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def record(self, name: str, text: str, seconds: float) -> None:
        self.outputs[name] = text
        self.timings[name] = round(seconds, 1)
        (self.keep / f"{name.replace(' ', '-')}.log").write_text(text)

    def fs(self):
        """The bucket as the test sees it: straight to moto, credentials given explicitly (not through the proxy,
        so the test's own reads never count as the workflows' requests). Patient: moto shares two cores with a
        training cluster, and the SDK's default gives up on a reply that is 3 s slow (a CI run failed so)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=self.creds.access_key, secret_key=self.creds.secret_key,
                                 region=self.creds.region, endpoint_override=self.moto.url.removeprefix("http://"),
                                 scheme="http", request_timeout=30, connect_timeout=10,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=6))

    def user_env(self, **extra: str) -> dict[str, str]:
        """A user's shell: the project's venv on PATH, the code importable, credentials exported; no Ray settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
        env.update(self.creds.env(), PYTHONPATH=str(REPO), PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
                   **extra)
        return env

    def command(self, name: str, *args: str, cwd: Path, env: dict[str, str] | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
        """`python -m workflows ARGS` from `cwd`, its output kept under `name`."""
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "workflows", *args], cwd=cwd, env=env or self.user_env(),
                              capture_output=True, text=True, timeout=timeout)
        self.record(name, proc.stdout + proc.stderr, time.monotonic() - start)
        return proc

    def job(self, name: str, *args: str, timeout: float = JOB_TIMEOUT_S) -> tuple[str, str]:
        """`ray job submit` of `python -m workflows ARGS` from a scratch directory; waits; (status, logs)."""
        cwd = self.root / "laptop"
        cwd.mkdir(exist_ok=True)
        start = time.monotonic()
        self.cluster.submit(name, "python", "-m", "workflows", *args, cwd=cwd)
        status = self.cluster.wait_for_job(name, timeout_s=timeout)
        logs = self.cluster.job_logs(name)
        self.record(f"job {name}", logs, time.monotonic() - start)
        return status, logs

    def objects(self, prefix: str) -> dict[str, int]:
        """bucket key -> size of every object below `prefix` (an s3:// URI or a bucket path)."""
        import pyarrow.fs as pafs

        path = prefix.removeprefix("s3://").rstrip("/")
        infos = self.fs().get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return {i.path: i.size for i in infos if i.type == pafs.FileType.File}

    def read(self, path: str) -> bytes:
        with self.fs().open_input_stream(path.removeprefix("s3://")) as f:
            return f.read()

    def checkpoints(self, run: str, known: dict[str, int] | None = None) -> dict[str, int | None]:
        """checkpoint directory (bucket path) -> its step when complete, None when not (workflows.checkpoints'
        own check). `known`: complete ones found before (a complete checkpoint stays so), not read again."""
        import pyarrow.fs as pafs

        from workflows.checkpoints import checkpoint_step

        fs = self.fs()
        infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/{run}", allow_not_found=True))
        found = {i.path: (known or {}).get(i.path) for i in infos
                 if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")}
        return {path: step if step is not None else checkpoint_step(fs, path) for path, step in found.items()}

    def complete_checkpoints(self, run: str, known: dict[str, int] | None = None) -> dict[str, int]:
        """checkpoint directory -> step, the complete ones only (see `checkpoints`)."""
        return {path: step for path, step in self.checkpoints(run, known).items() if step is not None}

    def state(self, checkpoint: str) -> dict:
        return json.loads(self.read(f"{checkpoint}/state.json"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """moto + proxy, the MLflow server, and a two-node Ray cluster (head and one more raylet, 2 CPUs each: a Train
    worker and a decoder on each). About 40-60 s to start here."""
    root = Path(tempfile.mkdtemp(prefix="os-", dir="/tmp"))  # short: Ray's socket paths live below it
    reaper = Reaper(root, MARKER)  # ends all of it should this process die without the teardown below
    moto = MotoServer(root)
    proxy = mlflow = cluster = None
    left: list[str] = []
    keep = tmp_path_factory.mktemp("object-storage-outputs")
    start = time.monotonic()
    try:
        moto.start()
        reaper.add(pgid=moto.proc.pid)
        proxy = FaultyProxy(moto.port)
        proxy.start()
        creds = S3Credentials(endpoint=proxy.url)
        creds.client(moto.url).create_bucket(Bucket=BUCKET)
        (root / "mlflow").mkdir()
        server_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
        mlflow = MlflowServer(root / "mlflow", f"s3://{BUCKET}/mlartifacts", {**server_env, **creds.env()})
        mlflow.start()
        reaper.add(pgid=mlflow.proc.pid)
        cluster = Cluster(Path(tempfile.mkdtemp(prefix="rc-", dir=root)),
                          env={**creds.env(), "MLFLOW_TRACKING_URI": mlflow.url,
                               "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"})
        reaper.add(tag=cluster.tag)
        cluster.start_head("--num-cpus=2", "--labels=dist-node=head")
        cluster.add_node("--num-cpus=2", "--labels=dist-node=second")
        made = Stack(root=root, moto=moto, proxy=proxy, creds=creds, mlflow=mlflow, cluster=cluster, reaper=reaper,
                     keep=keep)
        made.timings["start"] = round(time.monotonic() - start, 1)
        yield made
        print(f"\nobject storage: seconds per stage {made.timings}; outputs in {keep}")
    finally:
        for log in (root / "moto.log", root / "mlflow" / "mlflow-server.log"):
            if log.exists():
                shutil.copy(log, keep)
        if cluster is not None:
            left = cluster.stop()
        if mlflow is not None:
            mlflow.stop()
        if proxy is not None:
            proxy.stop()
        moto.stop()
        reaper.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"processes of the test cluster survived: {left}"


def _sample_folder(root: Path) -> Path:
    """The sample dataset (as test_pretrain writes it) plus two manifests for the sweep: `every_label.csv` lists
    two val videos once under each of the K labels (val top-1 = 100/K whatever the model predicts) and
    `unreadable.csv` two corrupt files (val top-1 = 0 with data.max_bad_fraction=1)."""
    from workflows.data.sample import write_sample_dataset

    info = write_sample_dataset(root, videos_per_class=3, size=48, num_frames=24, seed=1, workers=1)
    labels = json.loads(Path(info.labels).read_text())
    with open(info.val_manifest) as f:
        videos = [row["path"] for row in csv.DictReader(f)][:2]
    (root / "every_label.csv").write_text("path,label\n" + "".join(f"{v},{n}\n" for v in videos for n in labels))
    for i in range(2):
        (root / f"corrupt_{i}.mp4").write_bytes(np.random.default_rng(i).bytes(3000))
    (root / "unreadable.csv").write_text("path,label\n" + "".join(f"corrupt_{i}.mp4,{n}\n"
                                                                    for i, n in zip(range(2), labels, strict=False)))
    return root


@pytest.fixture(scope="module")
def dataset(stack):
    """`data upload` of the sample folder from a scratch directory, then `data check` of the bucket copy as a job."""
    local = _sample_folder(stack.root / "laptop-data")
    upload = stack.command("upload", "data", "upload", str(local), DATA, "--json", cwd=stack.root)
    assert upload.returncode == 0, upload.stdout + upload.stderr
    report = json.loads(upload.stdout)
    shutil.rmtree(local)  # from now on the dataset exists only in the bucket
    status, logs = stack.job("data-check", "data", "check", "--manifest", f"{DATA}/train.csv", "--labels",
                             f"{DATA}/labels.json", "--json")
    return report, status, logs


@pytest.fixture(scope="module")
def transcoded(stack, dataset):
    """`data transcode` of the bucket's val.csv as jobs on the two-node cluster: into the bucket (any node may
    transcode), then into a local folder, which both nodes see here (one machine: a shared disk), so both may
    transcode into it too (tests/workflows/test_data_cli.py has a node that does not see it)."""
    args = ["data", "transcode", "--manifest", f"{DATA}/val.csv", "--short-side", "32", "--json", "--out"]
    into_bucket = stack.job("transcode-bucket", *args, f"{DATA}-small")
    local = stack.root / "transcoded-on-the-head"
    into_folder = stack.job("transcode-local", *args, str(local))
    return into_bucket, into_folder, local


def _pretrain_args(run: str, *extra: str) -> list[str]:
    sets = [f"data.train_manifest={DATA}/train.csv", f"data.val_manifest={DATA}/val.csv",
            f"data.labels={DATA}/labels.json", f"run.storage_path={RUNS}", f"run.name={run}", "eval.every_steps=2",
            # 16 videos x 2 views / global batch 8 = 4 steps per epoch (as test_pretrain's runs)
            "data.train_views=2", "scaling.placement_strategy=STRICT_SPREAD", *extra]
    return ["pretrain", "--config", SMOKE, *[a for s in sets for a in ("--set", s)]]


def _watch_complete_checkpoints(stack: Stack, run: str, known: dict[str, int]) -> dict[str, int]:
    """For a watcher thread: the complete checkpoints now, or `known` when the listing failed (moto shares two
    cores with the cluster; one slow listing must not end the watch, or the fault it waits to inject never comes)."""
    try:
        return stack.complete_checkpoints(run, known)
    except OSError as error:
        print(f"[watcher] listing the bucket failed, trying again: {error}")
        time.sleep(1)
        return known


def _train_workers(cluster: Cluster) -> list:
    return [p for p in cluster.processes() if "RayTrainWorker" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def trained(stack, dataset):
    """`pretrain` on the bucket (4 steps, a checkpoint every 2, 2 workers on the two nodes, MLflow on the server);
    a Train worker is SIGKILLed as soon as the step-2 checkpoint is complete in the bucket."""
    killed: dict = {}
    done = threading.Event()

    def kill_a_worker_after_step_2() -> None:
        complete: dict[str, int] = {}
        while not done.is_set():
            complete = _watch_complete_checkpoints(stack, RUN, complete)
            steps = list(complete.values())
            if steps and max(steps) >= 2:
                workers = _train_workers(stack.cluster)
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    killed.update(pid=workers[-1].pid, after_step=max(steps))
                return
            time.sleep(0.25)

    killer = threading.Thread(target=kill_a_worker_after_step_2, daemon=True)
    killer.start()
    try:
        status, logs = stack.job("pretrain", *_pretrain_args(RUN, "train.max_steps=4", "run.max_failures=2",
                                                             f"mlflow.registered_model_name={MODEL}"))
    finally:
        done.set()
        killer.join(timeout=30)
    return status, logs, killed


@pytest.fixture(scope="module")
def sweep(stack, dataset):
    """`tune` on s3 storage: 2 trials of 2 steps, a validation (report) after each, ASHA (grace 1, max_t 2,
    reduction factor 2), one trial at a time: trial 1 validates on every_label.csv (100/K), trial 2 on
    unreadable.csv (0), so ASHA must stop trial 2 after its first report."""
    space = json.dumps({"data.val_manifest": {"grid": [f"{DATA}/every_label.csv", f"{DATA}/unreadable.csv"]}})
    sets = [f"storage_path={SWEEPS}", f"name={SWEEP}", f"search_space={space}", "searcher=grid", "num_samples=1",
            "scheduler=asha", "asha={grace_period: 1, max_t: 2, reduction_factor: 2}", "max_concurrent_trials=1",
            f"data.train_manifest={DATA}/train.csv", f"data.val_manifest={DATA}/every_label.csv",
            f"data.labels={DATA}/labels.json", "train.max_steps=2",
            "eval.every_steps=1", "run.max_failures=0", "data.max_bad_fraction=1.0"]
    return stack.job("tune", "tune", "--config", "workflows/configs/sweep_smoke.yaml",
                     *[a for s in sets for a in ("--set", s)])


# ---------------------------------------------------------------------------------------------------------------
# the tests, in the order they run (the cluster is stopped by the `afterwards` fixture, after the cluster tests)


def test_dataset_uploaded_and_checked_in_the_bucket(stack, dataset):
    report, status, logs = dataset
    assert report["manifests"] == [f"{DATA}/every_label.csv", f"{DATA}/train.csv", f"{DATA}/unreadable.csv",
                                   f"{DATA}/val.csv"]
    assert report["labels"] == [f"{DATA}/labels.json"] and report["missing_videos"] == {}
    objects = stack.objects(DATA)
    assert len(objects) == report["files"] and sum(objects.values()) == report["bytes"]
    assert sum(k.endswith(".mp4") for k in objects) == 16 + 8 + 2
    assert status == "SUCCEEDED", logs[-4000:]
    check = json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])
    assert check["manifest"] == f"{DATA}/train.csv"
    assert check["videos"] == check["ok"] == 16 and check["dropped"] == {} and check["unknown_labels"] == {}


def test_transcode_on_the_cluster_writes_into_the_bucket_or_on_this_node_alone(stack, transcoded):
    (status, logs), (local_status, local_logs), local = transcoded
    assert status == "SUCCEEDED", logs[-4000:]
    result = json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])
    assert (result["manifest"], result["videos"], result["ok"]) == (f"{DATA}-small/val.csv", 8, 8)
    objects = stack.objects(f"{DATA}-small")
    assert sum(k.endswith(".mp4") for k in objects) == 8 and f"{BUCKET}/datasets/sample-small/val.csv" in objects
    assert local_status == "SUCCEEDED", local_logs[-4000:]
    result = json.loads([line for line in local_logs.splitlines() if line.startswith("{")][-1])
    assert result["ok"] == 8 and "no shared disk" not in local_logs, local_logs[-3000:]
    assert len(list((local / "videos").rglob("*.mp4"))) == 8 and (local / "val.csv").is_file()
    assert not list(local.glob(".dist-shared-*"))  # the question's marker is gone


def test_pretrain_on_the_bucket_survives_a_killed_worker_and_resumes_from_the_bucket(stack, trained):
    status, logs, killed = trained
    assert status == "SUCCEEDED", logs[-6000:]
    assert killed.get("after_step") == 2, f"the worker was not killed after the step-2 checkpoint: {killed}"
    placed = {int(m[1]): m[2] for m in re.finditer(r"\[pretrain\] worker rank (\d)/2 on node ([0-9a-f]+)", logs)}
    assert len(set(placed.values())) == 2, f"the two workers did not run on the two nodes: {placed}"
    complete = stack.complete_checkpoints(RUN)
    assert sorted(complete.values()) == [2, 4], stack.checkpoints(RUN)
    final = stack.state(max(complete, key=complete.get))
    assert final["step"] == 4 and final["final"] is True
    assert final["resumed_from_step"] == 2, "the restarted workers must resume from the step-2 checkpoint"
    assert "resumed from step 2" in logs
    # The killed worker raised nothing; the survivor's collective then failed, which is not the cause.
    assert re.search(r"\[pretrain\] restart: 2 -> 2 workers \(a worker or node was lost\); resuming at step 2, "
                     r"\d+ steps? lost", logs), [line for line in logs.splitlines() if "restart:" in line]
    assert "checkpoint pruning skipped" not in logs  # Ray's retained checkpoints were matched in the bucket
    run_files = stack.objects(f"{RUNS}/{RUN}")
    assert f"{BUCKET}/runs/{RUN}/recipe.yaml" in run_files
    assert re.search(rf"^\[pretrain\] finished: step 4, .*checkpoint: {BUCKET}/runs/{RUN}/checkpoint_", logs, re.M)


@pytest.mark.extended  # test_tune.py's ASHA sweep, on local storage, is in `make test`
@pytest.mark.storage_sweep
def test_tune_on_the_bucket_reports_completed_and_asha_stopped_trials(stack, sweep):
    from mlflow import MlflowClient

    status, logs = sweep
    assert status == "SUCCEEDED", logs[-6000:]
    client = MlflowClient(tracking_uri=stack.mlflow.url)
    experiment = client.get_experiment_by_name("dist-sweeps")
    parent = client.search_runs([experiment.experiment_id], f"tags.`dist.sweep_path` = '{SWEEPS}/{SWEEP}'")[0]
    assert parent.info.status == "FINISHED"
    assert (parent.data.metrics["trials_completed"], parent.data.metrics["trials_stopped_early"]) == (1, 1)
    nested = {r.data.params["data.val_manifest"]: r for r in
              client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert {k: (r.data.tags["tune.status"], r.info.status) for k, r in nested.items()} == {
        f"{DATA}/every_label.csv": ("completed", "FINISHED"), f"{DATA}/unreadable.csv": ("stopped early", "KILLED")}
    table = client.download_artifacts(parent.info.run_id, "results.csv", str(stack.root / "laptop"))
    rows = {r["data.val_manifest"]: r for r in csv.DictReader(open(table))}
    assert {k: (r["status"], r["reports"]) for k, r in rows.items()} == {
        f"{DATA}/every_label.csv": ("completed", "2"), f"{DATA}/unreadable.csv": ("stopped early", "1")}
    assert stack.objects(f"{SWEEPS}/{SWEEP}"), "the sweep wrote nothing to its s3 storage"


@pytest.mark.extended  # test_storage_retries.py's outage under a run, reading its videos, is in `make test`
@pytest.mark.storage_faults
@pytest.mark.timeout(1500)  # the run and, when the controller failed, its relaunch: 1.5 min idle, more when busy
def test_an_endpoint_outage_during_a_checkpoint_upload_never_resumes_from_the_partial_checkpoint(stack, dataset):
    """The S3 endpoint goes away for 30 s in the middle of the step-4 checkpoint's upload (the connection of a
    file's upload is cut as it completes). The run must recover by itself and never resume from the partial
    checkpoint. Two recoveries are possible with Ray Train 2.60, and both were seen here: the failed upload fails
    the worker group, which FailureConfig restarts from the newest complete checkpoint; or the controller's own
    write of its checkpoint registry (checkpoint_manager_snapshot.json) falls into the outage, which Ray treats as a
    non-retryable ControllerError, and the pre-training driver waits for the storage and fits the run again
    (workflows.pretrain.fit_through_storage_outages)."""
    armed: dict = {}
    done = threading.Event()

    def arm_after_step_2() -> None:
        while not done.is_set():
            complete_now = _watch_complete_checkpoints(stack, OUTAGE_RUN, {})
            first = list(complete_now)
            if first:
                name = first[0].rsplit("/", 1)[-1]
                # the next checkpoint directory: let one file's upload complete, cut at the next completion
                stack.proxy.arm(rf"/{BUCKET}/runs/{OUTAGE_RUN}/checkpoint_(?!{re.escape(name)})[^/]+/.*\?uploadId=",
                                OUTAGE_S, let_through=1, method="POST")
                armed["after"], armed["step"] = first[0], complete_now[first[0]]
                return
            time.sleep(0.25)

    args = _pretrain_args(OUTAGE_RUN, "train.max_steps=6", "run.max_failures=6", "mlflow.enabled=false")
    arming = threading.Thread(target=arm_after_step_2, daemon=True)
    arming.start()
    try:
        status, logs = stack.job("pretrain-outage", *args, timeout=1200)
    finally:
        done.set()
        arming.join(timeout=30)
        stack.proxy.arm("^$", 0)  # disarmed (matches nothing)
    assert armed, "the step-2 checkpoint never became complete"
    assert stack.proxy.cut is not None, "no checkpoint upload was cut"
    _, method, cut_path = stack.proxy.cut
    cut = re.search(rf"/{BUCKET}/(runs/{OUTAGE_RUN}/checkpoint_[^/?]+)/", cut_path)
    assert cut, f"the outage did not start in a checkpoint upload: {method} {cut_path}"
    cut_dir = f"{BUCKET}/{cut[1]}"
    assert stack.proxy.resets > 0
    assert status == "SUCCEEDED", logs[-6000:]
    relaunched = "the Train controller could not write to" in logs
    if relaunched:  # the controller's registry write fell into the outage: the driver waited and fitted again
        assert "answers again: relaunching the run" in logs, logs[-6000:]
    checkpoints = stack.checkpoints(OUTAGE_RUN)
    complete = sorted(s for s in checkpoints.values() if s is not None)
    assert complete[-1] == 6, checkpoints
    final = stack.state(max((p for p, s in checkpoints.items() if s), key=checkpoints.get))
    # After the run the driver deleted what Ray neither retains nor would have: no partial checkpoint is left in the
    # bucket. A resumed-from checkpoint may be gone too: pruned, or dropped by Ray's own retention once better and
    # newer ones were kept (the step-2 checkpoint was seen complete before the outage).
    assert all(step is not None for step in checkpoints.values()), checkpoints
    pruned_line = re.search(r"^\[pretrain\] removed \d+ checkpoint directories .*?: (.*)$", logs, re.M)
    pruned = dict(re.findall(r"(checkpoint_[^ ,]+) \((partial|step \d+)\)", pruned_line[1] if pruned_line else ""))
    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", logs)]
    kept_or_pruned = set(complete) | {int(v.split()[1]) for v in pruned.values() if v != "partial"} | {armed["step"]}
    assert resumed and all(s in kept_or_pruned for s in resumed), (resumed, checkpoints, pruned)
    if cut_dir not in checkpoints:  # the cut upload failed for good: its partial checkpoint was pruned at the end
        assert pruned.get(cut_dir.rsplit("/", 1)[-1]) == "partial", (cut_dir, pruned)
        assert f"resuming from {cut_dir}" not in logs
        # The last attempt resumed from a complete checkpoint: from step 2, or from a step-4 checkpoint written again
        # after the cut one (a later failure, e.g. the controller's registry write in the outage, restarted it there).
        cut_name = cut_dir.rsplit("/", 1)[-1]
        other_step_4 = any(step == 4 for path, step in checkpoints.items() if path != cut_dir) or any(
            v == "step 4" for name, v in pruned.items() if name != cut_name)
        assert final["resumed_from_step"] in kept_or_pruned, final
        assert final["resumed_from_step"] < 4 or other_step_4, (final, checkpoints, pruned)
    print(f"outage: cut {method} {cut_path}; the driver relaunched the run: {relaunched}; pruned at the end: "
          f"{pruned}; resumed from {resumed}; checkpoints {checkpoints}")


@dataclass
class Afterwards:
    evaluate: subprocess.CompletedProcess
    predict_bucket: subprocess.CompletedProcess
    predict_registry: subprocess.CompletedProcess
    secret_in_session_logs: list[str]
    deleted: list[Path]


@pytest.fixture(scope="module")
def afterwards(stack, trained):
    """Stop the cluster, grep its session logs for the secret, delete its temp dirs and working directories (and
    every local working directory of the drivers); then `evaluate` (a new local Ray, from a new directory) and
    `predict` (the bucket's run directory, and the registered model version through the tracking server)."""
    cluster = stack.cluster
    left = cluster.stop()
    assert not left, f"processes of the test cluster survived: {left}"
    secret = stack.creds.secret_key.encode()
    # Every file the nodes left: session logs, runtime-env copies of the code, the `ray start` output.
    hits = [p for p in cluster.root.rglob("*") if p.is_file() and not p.is_symlink() and secret in p.read_bytes()]
    with (stack.keep / "secret-in-session-logs.txt").open("w") as out:  # which lines, the key itself masked
        for path in hits:
            lines = [line for line in path.read_bytes().splitlines() if secret in line]
            out.write(f"{path}\n" + "".join(f"    {line.replace(secret, b'<SECRET>')[:2000].decode(errors='replace')}\n"
                                             for line in lines[:5]))
    hits = [str(p) for p in hits]
    deleted = [*cluster.temp_dirs, *(cluster.root / f"{n}-cwd" for n in cluster.node_names), stack.root / "laptop"]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    elsewhere = stack.root / "elsewhere"
    elsewhere.mkdir()
    tag = f"eval-{stack.root.name}"
    stack.reaper.add(tag=tag)
    env = stack.user_env(MLFLOW_TRACKING_URI=stack.mlflow.url, RAY_ADDRESS="local",
                         RAY_TMPDIR=str(stack.root / "ray-eval"), **{MARKER: tag})
    (stack.root / "ray-eval").mkdir()
    try:
        evaluate = stack.command("evaluate", "evaluate", "--checkpoint", f"{RUNS}/{RUN}", "--manifest",
                                 f"{DATA}/val.csv", "--views", "1", "--json", cwd=elsewhere, env=env)
    finally:
        end(marked(tag), grace_s=10)  # the evaluation's own local Ray, if it outlived the driver
    video = f"{DATA}/videos/moving_left/val_0002.mp4"
    predict_bucket = stack.command("predict-bucket", "predict", "--checkpoint", f"{RUNS}/{RUN}", "--device", "cpu",
                                   "--views", "1", "--json", video, cwd=elsewhere)
    predict_registry = stack.command("predict-registry", "predict", "--checkpoint", f"models:/{MODEL}/1",
                                     "--tracking-uri", stack.mlflow.url, "--device", "cpu", "--views", "1", "--json",
                                     video, cwd=elsewhere)
    return Afterwards(evaluate, predict_bucket, predict_registry, hits, deleted)


def test_evaluate_and_predict_need_only_the_bucket_and_the_tracking_server(stack, trained, afterwards):
    assert not any(p.exists() for p in afterwards.deleted)
    assert afterwards.evaluate.returncode == 0, afterwards.evaluate.stderr[-4000:]
    metrics = json.loads(afterwards.evaluate.stdout)
    complete = stack.complete_checkpoints(RUN)
    newest = max(complete, key=complete.get)
    assert metrics["checkpoint"] == f"s3://{newest}" and metrics["step"] == 4
    assert metrics["videos"] == 8 and metrics["dropped_total"] == 0 and metrics["manifest"] == f"{DATA}/val.csv"
    assert metrics["mlflow_tracking_uri"] == stack.mlflow.url and metrics["mlflow_run_id"]
    for proc in (afterwards.predict_bucket, afterwards.predict_registry):
        assert proc.returncode == 0, proc.stderr[-4000:]
    from_bucket, from_registry = (json.loads(p.stdout) for p in (afterwards.predict_bucket,
                                                                  afterwards.predict_registry))
    assert len(from_bucket[0]["top"]) == 5
    # The registered version is the final checkpoint's weights: the same scores, whichever way it was fetched.
    assert from_bucket == from_registry


def test_every_logged_artifact_reads_back_through_the_tracking_server(stack, trained, afterwards):
    import mlflow.artifacts
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow.url)
    experiment = client.get_experiment_by_name("dist")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {RUN, f"eval-{RUN}"} <= set(runs)
    assert runs[f"eval-{RUN}"].data.tags["mlflow.parentRunId"] == runs[RUN].info.run_id
    bucket = stack.objects(f"s3://{BUCKET}/mlartifacts")
    # Every run of every experiment (the sweep's parent and trials too, when the sweep ran before).
    every_run = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.run_id for r in runs.values()} <= {r.info.run_id for r in every_run}
    for run in every_run:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri  # proxied by the server
        listed = _all_artifacts(client, run.info.run_id)
        if run.info.run_name in (RUN, f"eval-{RUN}"):
            assert listed, f"run {run.info.run_name} logged no artifacts"
        if not listed:
            continue
        local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=stack.mlflow.url,
                                                         dst_path=tempfile.mkdtemp(dir=stack.root)))
        for path, size in listed.items():
            assert (local / path).stat().st_size == size, path
            key = f"{BUCKET}/mlartifacts/{run.info.experiment_id}/{run.info.run_id}/artifacts/{path}"
            assert bucket.get(key) == size, f"{key} is not in the bucket"  # stored there, not on the server's disk
    trained_files = set(_all_artifacts(client, runs[RUN].info.run_id))
    assert {"recipe.yaml", "confusion_matrix.png", "training_curves.png", "final_checkpoint/weights.safetensors",
            "final_checkpoint/state.json"} <= trained_files
    assert {"evaluation/metrics.json", "evaluation/confusion_matrix.png"} <= \
        set(_all_artifacts(client, runs[f"eval-{RUN}"].info.run_id))
    version = client.get_model_version(MODEL, "1")
    assert version.run_id == runs[RUN].info.run_id and version.tags["step"] == "4"


def _all_artifacts(client, run_id: str, path: str | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            out |= _all_artifacts(client, run_id, info.path)
        else:
            out[info.path] = info.file_size
    return out


def test_the_secret_key_is_written_nowhere(stack, trained, afterwards):
    from mlflow import MlflowClient

    secret = stack.creds.secret_key
    assert stack.creds.access_key and secret
    # The bucket: run directories (recipe.yaml, state.json, Ray's own files), sweeps, MLflow artifacts.
    leaked = [key for key in stack.objects(f"s3://{BUCKET}") if not key.endswith(".mp4")
              and secret.encode() in stack.read(key)]
    assert not leaked, f"the secret key is in {leaked}"
    # MLflow params and tags of every run, through the server, and the server's own store and log.
    client = MlflowClient(tracking_uri=stack.mlflow.url)
    experiments = client.search_experiments()
    for run in client.search_runs([e.experiment_id for e in experiments]):
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not any(secret in str(v) for v in values), run.info.run_name
    assert secret.encode() not in stack.mlflow.db.read_bytes()
    # Ray's session logs of the cluster (read before they were deleted) and what every driver printed.
    assert not afterwards.secret_in_session_logs, afterwards.secret_in_session_logs
    # and "job tune", "job pretrain-outage" when they ran
    assert {"upload", "job data-check", "job transcode-bucket", "job transcode-local", "job pretrain", "evaluate",
            "predict-bucket", "predict-registry"} <= set(stack.outputs)
    assert not [name for name, text in stack.outputs.items() if secret in text]
    assert not [name for name, text in stack.outputs.items() if stack.creds.access_key in text]
