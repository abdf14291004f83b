"""Real Ray clusters started with the `ray` CLI, and the smoke pre-training submitted to them with `ray job submit`.

Each test starts its own Ray processes with `ray start ... --block` (tests/ray_nodes.py: own temp dir under /tmp,
own ports, token authentication on through a token file of its own; the user's ~/.ray is never read or written),
talks to them only through the real CLI and the dashboard's HTTP API, and finally stops exactly the processes it
started: every process of a test cluster carries a marker variable in its environment (the nodes' environment is
inherited by the raylet, GCS, dashboard, workers and job drivers), and the test ends those processes and checks
with `ps` that none is left. Other Ray clusters on the host, like the session fixture's, are untouched.

One cluster (a token-guarded head and a second raylet) and one job cover the checks, because each cluster and job
costs about a minute on an otherwise idle 2-core machine (most of it Ray, Ray Train and DeepSpeed start-up; the job
is stopped with `ray job stop` after its step-2 checkpoint), and longer when other work shares the cores. Jobs that
run to their end on a two-raylet cluster: tests/workflows/test_object_storage.py.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.ray_nodes import REPO, Cluster, listening_hosts

pytestmark = pytest.mark.integration

SMOKE_SETTINGS = ("train.log_every_steps=1",)
WORKER_LINE = re.compile(r"\[pretrain\] worker rank (\d+)/(\d+) on node ([0-9a-f]+) \(ip ([^,]+), pid (\d+)\)")


class SmokeCluster(Cluster):
    def submit_smoke(self, job_id: str, data: Path, runs: Path, *overrides: str) -> None:
        sets = [f"data.train_manifest={data / 'train.csv'}", f"data.val_manifest={data / 'val.csv'}",
                f"data.labels={data / 'labels.json'}", f"run.storage_path={runs}", f"run.name={job_id}",
                *SMOKE_SETTINGS, *overrides]
        self.submit(job_id, "python", "-m", "workflows", "pretrain", "--config", "workflows/configs/smoke.yaml",
                    *[arg for s in sets for arg in ("--set", s)])


@pytest.fixture
def cluster():
    root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short, unlike tmp_path
    # as the cluster configs' head: `ray job stop` gives the driver 30 s between SIGTERM and SIGKILL
    made = SmokeCluster(root, env={"RAY_JOB_STOP_WAIT_TIME_S": "30"})
    try:
        yield made
    finally:
        left = made.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"processes of the test cluster survived: {left}"


@pytest.fixture
def sample(tmp_path) -> Path:
    """Sample videos where the job can read them by absolute path (the runtime env never uploads data)."""
    out = tmp_path / "sample"
    subprocess.run([sys.executable, "-m", "workflows", "data", "sample", "--out", str(out), "--videos-per-class",
                    "3", "--size", "48", "--frames", "24"], cwd=REPO, check=True, capture_output=True)
    return out


def _placement(logs: str) -> dict[int, str]:
    """rank -> node id, from the start-up line each Train worker prints."""
    placed = {int(m[1]): m[3] for m in WORKER_LINE.finditer(logs)}
    assert placed, "no worker placement lines in the job logs"
    return placed


# ---------------------------------------------------------------------------------------------------------------
# tests


def test_a_token_guarded_two_node_cluster_runs_a_job_one_worker_per_node_until_ray_job_stop(cluster, sample,
                                                                                            tmp_path):
    # Each node holds one Train worker (1 CPU) and one decoder (1 CPU); both are labelled for training.
    cluster.start_head("--num-cpus=2", "--labels=dist-role=train,dist-node=head")

    # Token authentication is on: the Jobs API and GCS refuse requests without the token, accept it with.
    assert cluster.http("/api/jobs/", token=None)[0] == 401
    assert cluster.http("/api/jobs/", token="0" * 64)[0] == 403
    assert cluster.http("/api/jobs/") == (200, "[]")
    refused = cluster.ray("job", "list", "--address", cluster.dashboard, authenticated=False)
    assert refused.returncode != 0 and "AuthenticationError" in refused.stderr, refused.stderr[-2000:]
    refused = cluster.ray("status", "--address", f"127.0.0.1:{cluster.gcs_port}", authenticated=False)
    assert refused.returncode != 0 and "InvalidAuthToken" in refused.stderr, refused.stderr[-2000:]
    # (the authenticated CLI is exercised by the node join and the submission below)
    # The dashboard / Jobs API listens on loopback only (GCS and raylet listen on all interfaces, token-guarded).
    assert listening_hosts(cluster.dashboard_port) == {"127.0.0.1"}

    cluster.add_node("--num-cpus=2", "--labels=dist-role=train,dist-node=second")
    nodes = {n["node_id"]: n for n in cluster.alive_nodes()}
    assert len(nodes) == 2
    assert sorted(n["labels"].get("dist-node") for n in nodes.values()) == ["head", "second"]

    # `ray job stop` of a running pre-training job (SIGTERM to the driver, SIGKILL 30 s later), its two workers
    # placed by label one per node: the driver aborts the run as on Ctrl-C, says where the same command resumes,
    # marks its MLflow run KILLED and exits 143. (A submitted job that runs to its end: test_object_storage.py.)
    runs = tmp_path / "runs"
    cluster.submit_smoke("stopped", sample, runs, "train.max_steps=200", "eval.every_steps=2",
                         "scaling.placement_strategy=STRICT_SPREAD", "scaling.worker_node_label=dist-role=train")
    deadline = time.monotonic() + 300
    while "checkpoint of step 2 reported" not in _live_logs(cluster, "stopped") and time.monotonic() < deadline:
        time.sleep(0.5)
    stop = cluster.ray("job", "stop", "--address", cluster.dashboard, "stopped")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert cluster.wait_for_job("stopped") == "STOPPED"
    logs = cluster.job_logs("stopped")
    for step in (1, 2):  # training progress and validation, as a user sees them in `ray job logs`
        assert f"[pretrain] step {step}/200" in logs, logs[-6000:]
    assert "[pretrain] validation at step 2" in logs
    placed = _placement(logs)
    assert set(placed) == {0, 1}
    assert placed[0] != placed[1], f"both workers on node {placed[0]}"
    assert set(placed.values()) == set(nodes)
    newest = re.search(r"^interrupted by SIGTERM \(ray job stop, or the scheduler\): the run was stopped; the same "
                       r"command resumes it from its newest complete checkpoint, (\S+) \(step (\d+)\)$", logs, re.M)
    assert newest, logs[-6000:]
    assert Path(newest[1]).parent == runs / "stopped" and int(newest[2]) >= 2, newest[0]
    with sqlite3.connect(runs / "stopped" / "mlflow.db") as con:
        assert con.execute("select status from runs").fetchall() == [("KILLED",)]


def _live_logs(cluster: Cluster, job_id: str) -> str:
    """A running job's logs so far, through the Jobs API (cheaper than a `ray job logs` process per poll)."""
    status, body = cluster.http(f"/api/jobs/{job_id}/logs")
    return json.loads(body).get("logs", "") if status == 200 else ""
