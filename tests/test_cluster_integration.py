"""Real Ray clusters started with the `ray` CLI, and the smoke pre-training submitted to them with `ray job submit`.

Each test starts its own Ray processes with `ray start ... --block` (own temp dir under /tmp, own ports, token
authentication on through a token file of its own; the user's ~/.ray is never read or written), talks to them
only through the real CLI and the dashboard's HTTP API, and finally stops exactly the processes it started:
every process of a test cluster carries a marker variable in its environment (the nodes' environment is
inherited by the raylet, GCS, dashboard, workers and job drivers), and the test ends those processes and
checks with `ps` that none is left. Other Ray clusters on the host, like the session fixture's, are untouched.

Each test takes about 3-4 minutes on an otherwise idle 2-core machine (most of it Ray, Ray Train and DeepSpeed
start-up; the job itself is 3 optimizer steps), and longer when other work shares the cores.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the project's venv: `ray`, and the `python` job drivers run
RAY = str(VENV_BIN / "ray")
MARKER = "DIST_TEST_RAY_CLUSTER"  # environment marker of every process a test cluster starts
JOB_TIMEOUT_S = 480
NODE_START_TIMEOUT_S = 180
# The smallest run of the smoke recipe that still trains, validates, checkpoints and finishes.
SMOKE_SETTINGS = ("train.max_steps=3", "eval.every_steps=3", "train.log_every_steps=1")
WORKER_LINE = re.compile(r"\[pretrain\] worker rank (\d+)/(\d+) on node ([0-9a-f]+) \(ip ([^,]+), pid (\d+)\)")


# ---------------------------------------------------------------------------------------------------------------
# helpers: ports, processes, the CLI, the dashboard API


def _port_block(size: int) -> list[int]:
    """`size` consecutive TCP ports that are free now, below the kernel's ephemeral range and away from Ray's
    defaults (6379, 8265, 10001, 10002-19999 worker ports), so concurrent clusters on the host do not collide."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - size)
        ports = list(range(base, base + size))
        if all(_port_free(p) for p in ports):
            return ports
    raise RuntimeError(f"no block of {size} free ports found")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _marked(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries this cluster's marker."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _end(procs: list[psutil.Process], grace_s: float) -> None:
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def _ps_lines(needle: str) -> list[str]:
    """Non-zombie processes whose command line, as `ps` shows it, contains `needle`."""
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    rows = (line.split(None, 2) for line in out.splitlines())
    return [" ".join(row) for row in rows if len(row) == 3 and needle in row[2] and not row[1].startswith("Z")]


def _listening_hosts(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="tcp") if c.status == "LISTEN" and c.laddr.port == port}


def _http(url: str, token: str | None = None, timeout: float = 10) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


class Cluster:
    """Ray nodes on this machine, started with `ray start --block` as children of the test."""

    def __init__(self, root: Path):
        self.root = root  # short: Ray's Unix socket paths live under it (limit ~107 characters)
        self.tag = root.name
        self.token = secrets.token_hex(32)  # the format `ray get-auth-token --generate` writes
        self.token_file = root / "auth_token"
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        self.nodes: list[tuple[subprocess.Popen, Path]] = []
        self.gcs_port = self.dashboard_port = 0

    # -- environments --
    def node_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # none of the session's settings
        env.update({
            # The job driver's `python` (and every worker's interpreter) is the venv's: drivers and workers inherit
            # the environment of `ray start`, and the uploaded working dir carries no venv.
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_file),
            # Processes of this cluster that look their cluster up (Train's placement-group cleaner uses the State
            # API with address "auto") must not find another cluster running on the same machine.
            "RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}",
            "RAY_USAGE_STATS_ENABLED": "0",
            MARKER: self.tag,
        })
        return env

    def cli_env(self, *, authenticated: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        if authenticated:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file))
        else:
            env["HOME"] = str(self.root / "home-without-token")  # so the CLI cannot fall back to ~/.ray/auth_token
        return env

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    # -- nodes --
    def _start(self, name: str, args: list[str], ready: str = "Ray runtime started") -> None:
        ports = _port_block(100)  # 9 service ports, the rest for worker processes
        service = dict(zip(("node-manager-port", "object-manager-port", "metrics-export-port",
                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port"),
                           ports[:6], strict=True))
        if not self.nodes:  # the head
            self.gcs_port, self.dashboard_port, client_port = ports[6:9]
            args = [*args, f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                    "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client_port}"]
        args += [f"--{flag}={port}" for flag, port in service.items()]
        args += [f"--min-worker-port={ports[10]}", f"--max-worker-port={ports[-1]}"]
        temp_dir = self.root / name
        log = self.root / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [RAY, "start", *args, f"--temp-dir={temp_dir}", "--object-store-memory=300000000",
                 "--disable-usage-stats", "--block"],
                cwd=self.root, env=self.node_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append((proc, log))
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while ready not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`ray start` for {name} did not come up (exit {proc.poll()}):\n"
                                   f"{log.read_text()[-4000:]}")
            time.sleep(1)

    def start_head(self, *extra: str) -> None:
        self._start("head", ["--head", *extra])
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while self.http("/api/version")[0] != 200:  # the Jobs API answers once the dashboard is up
            assert time.monotonic() < deadline, "the dashboard did not come up"
            time.sleep(1)

    def add_node(self, *extra: str) -> None:
        """A second raylet on this machine, joined to the head."""
        before = len(self.alive_nodes())
        self._start(f"node{len(self.nodes)}", [f"--address=127.0.0.1:{self.gcs_port}", *extra])
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while len(self.alive_nodes()) <= before:
            assert time.monotonic() < deadline, "the second node did not register with the head"
            time.sleep(1)

    def stop(self) -> list[str]:
        """End every process this cluster started; returns what `ps` still shows of it (should be nothing)."""
        for _ in range(3):  # a raylet may spawn a worker while the others end
            procs = _marked(self.tag)
            if not procs:
                break
            _end(procs, grace_s=10)
        for proc, _ in self.nodes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in _marked(self.tag)]
        return left + _ps_lines(str(self.root))

    # -- API --
    def http(self, path: str, token: str | None = "default") -> tuple[int, str]:
        try:
            return _http(self.dashboard + path, self.token if token == "default" else token)
        except OSError as exc:  # not listening yet
            return 0, str(exc)

    def alive_nodes(self) -> list[dict]:
        status, body = self.http("/api/v0/nodes?limit=100")
        if status != 200:
            return []
        return [n for n in json.loads(body)["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def ray(self, *args: str, authenticated: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], cwd=REPO, env=self.cli_env(authenticated=authenticated),
                              capture_output=True, text=True, timeout=timeout)

    def submit_smoke(self, job_id: str, data: Path, runs: Path, *overrides: str) -> None:
        sets = [f"data.train_manifest={data / 'train.csv'}", f"data.val_manifest={data / 'val.csv'}",
                f"data.labels={data / 'labels.json'}", f"run.storage_path={runs}", f"run.name={job_id}",
                *SMOKE_SETTINGS, *overrides]
        result = self.ray("job", "submit", "--address", self.dashboard, "--submission-id", job_id, "--no-wait",
                          "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", ".", "--",
                          "python", "-m", "workflows", "pretrain", "--config", "workflows/configs/smoke.yaml",
                          *[arg for s in sets for arg in ("--set", s)])
        assert result.returncode == 0, result.stdout + result.stderr

    def wait_for_job(self, job_id: str) -> str:
        """Poll the Jobs API until the job ends; returns its final status."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            status, body = self.http(f"/api/jobs/{job_id}")
            if status == 200 and json.loads(body)["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return json.loads(body)["status"]
            time.sleep(3)
        return "TIMEOUT"

    def job_logs(self, job_id: str) -> str:
        result = self.ray("job", "logs", "--address", self.dashboard, job_id)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture
def cluster():
    root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short, unlike tmp_path
    made = Cluster(root)
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


def _assert_succeeded(cluster: Cluster, job_id: str) -> str:
    final = cluster.wait_for_job(job_id)
    logs = cluster.job_logs(job_id)
    assert final == "SUCCEEDED", f"job {job_id} ended {final}; last log lines:\n{logs[-6000:]}"
    status = cluster.ray("job", "status", "--address", cluster.dashboard, job_id)
    assert status.returncode == 0 and "succeeded" in status.stdout.lower(), status.stdout + status.stderr
    # Training progress, validation, and the driver's last line, as a user sees them in `ray job logs`.
    for step in (1, 2, 3):
        assert f"[pretrain] step {step}/3" in logs
    assert "[pretrain] validation at step 3" in logs
    assert re.search(r"^\[pretrain\] finished: step 3, val top-1 [\d.]+%; checkpoint: /", logs, re.M), logs[-3000:]
    return logs


def _placement(logs: str) -> dict[int, str]:
    """rank -> node id, from the start-up line each Train worker prints."""
    placed = {int(m[1]): m[3] for m in WORKER_LINE.finditer(logs)}
    assert placed, "no worker placement lines in the job logs"
    return placed


# ---------------------------------------------------------------------------------------------------------------
# tests


def test_head_with_token_auth_runs_submitted_smoke_job(cluster, sample, tmp_path):
    cluster.start_head("--num-cpus=4")  # 2 Train workers x 1 CPU + their decode actors

    # Token authentication is on: the Jobs API and GCS refuse requests without the token, accept it with.
    assert cluster.http("/api/jobs/", token=None)[0] == 401
    assert cluster.http("/api/jobs/", token="0" * 64)[0] == 403
    assert cluster.http("/api/jobs/") == (200, "[]")
    refused = cluster.ray("job", "list", "--address", cluster.dashboard, authenticated=False)
    assert refused.returncode != 0 and "AuthenticationError" in refused.stderr, refused.stderr[-2000:]
    refused = cluster.ray("status", "--address", f"127.0.0.1:{cluster.gcs_port}", authenticated=False)
    assert refused.returncode != 0 and "InvalidAuthToken" in refused.stderr, refused.stderr[-2000:]
    # (the authenticated CLI is exercised by the submission below)
    # The dashboard / Jobs API listens on loopback only (GCS and raylet listen on all interfaces, token-guarded).
    assert _listening_hosts(cluster.dashboard_port) == {"127.0.0.1"}

    runs = tmp_path / "runs"
    cluster.submit_smoke("smoke-head", sample, runs)
    logs = _assert_succeeded(cluster, "smoke-head")
    assert set(_placement(logs)) == {0, 1}
    checkpoints = list((runs / "smoke-head").glob("checkpoint_*"))
    assert checkpoints, f"no checkpoint under {runs / 'smoke-head'}"


def test_two_nodes_on_one_machine_place_workers_on_different_nodes(cluster, sample, tmp_path):
    # Each node holds one Train worker (1 CPU) and one decode actor (1 CPU); both are labelled for training.
    cluster.start_head("--num-cpus=2", "--labels=dist-role=train,dist-node=head")
    cluster.add_node("--num-cpus=2", "--labels=dist-role=train,dist-node=second")
    nodes = {n["node_id"]: n for n in cluster.alive_nodes()}
    assert len(nodes) == 2
    assert sorted(n["labels"].get("dist-node") for n in nodes.values()) == ["head", "second"]

    cluster.submit_smoke("smoke-2node", sample, tmp_path / "runs", "scaling.placement_strategy=STRICT_SPREAD",
                         "scaling.worker_node_label=dist-role=train")
    placed = _placement(_assert_succeeded(cluster, "smoke-2node"))
    assert set(placed) == {0, 1}
    assert placed[0] != placed[1], f"both workers on node {placed[0]}"
    assert set(placed.values()) == set(nodes)
