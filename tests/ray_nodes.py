"""Real Ray nodes for integration tests: `ray start --block` processes that the test starts and ends itself.

`Cluster` starts a head and more raylets on this machine, each with its own temp dir, working directory and ports,
token authentication on through a token file of its own (the user's ~/.ray is never read or written), and talks
to them only through the real CLI and the dashboard's HTTP API. Every process of a test cluster carries a marker
variable in its environment (the nodes' environment is inherited by the raylet, GCS, dashboard, workers and job
drivers), and `Cluster.stop` ends exactly those processes and reports what `ps` still shows. Other Ray clusters on
the host, like the session fixture's, are untouched; `ray stop` is never run.

Used by tests/test_cluster_integration.py (smoke jobs on one and two nodes) and
tests/workflows/test_object_storage.py (the no-shared-disk run against an S3 endpoint).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the project's venv: `ray`, and the `python` job drivers run
RAY = str(VENV_BIN / "ray")
MARKER = "DIST_TEST_RAY_CLUSTER"  # environment marker of every process a test cluster starts
JOB_TIMEOUT_S = 480
NODE_START_TIMEOUT_S = 180


# ---------------------------------------------------------------------------------------------------------------
# ports and processes


def port_block(size: int) -> list[int]:
    """`size` consecutive TCP ports that are free now, below the kernel's ephemeral range and away from Ray's
    defaults (6379, 8265, 10001, 10002-19999 worker ports), so concurrent clusters on the host do not collide."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - size)
        ports = list(range(base, base + size))
        if all(port_free(p) for p in ports):
            return ports
    raise RuntimeError(f"no block of {size} free ports found")


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def marked(tag: str, marker: str = MARKER, cwd_under: Path | None = None) -> list[psutil.Process]:
    """Live processes whose environment carries `marker`=`tag`, or (with `cwd_under`) whose working directory lies
    below that folder: a raylet's dashboard and runtime-env agents were seen without the marker, outliving
    their raylet and spinning a core, but they run in their node's working directory."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(marker) == tag or (cwd_under is not None
                                                       and Path(proc.cwd()).is_relative_to(cwd_under)):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def end(procs: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM, then SIGKILL what is left after `grace_s`. A zombie counts as ended: only its parent can reap it
    (psutil's wait_procs waited the whole grace for the zombies a `ray start --block` leaves until it exits)."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    alive = _running(procs, grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    _running(alive, 10)


def _running(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of `procs` still running (not gone, not a zombie) after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:  # is_running: not a reused pid
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def ps_lines(needle: str) -> list[str]:
    """Non-zombie processes whose command line, as `ps` shows it, contains `needle`."""
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    rows = (line.split(None, 2) for line in out.splitlines())
    return [" ".join(row) for row in rows if len(row) == 3 and needle in row[2] and not row[1].startswith("Z")]


def listening_hosts(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="tcp") if c.status == "LISTEN" and c.laddr.port == port}


def http(url: str, token: str | None = None, data: dict | None = None, timeout: float = 10) -> tuple[int, str]:
    """(status, body) of a GET, or of a JSON POST of `data`; (0, the error) when nothing answers (not up yet)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = None
    if data is not None:
        body = json.dumps(data).encode()
        headers["Content-Type"] = "application/json"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers),
                                    timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError as err:
        return 0, str(err)


# ---------------------------------------------------------------------------------------------------------------
# the cluster


class Cluster:
    """Ray nodes on this machine, started with `ray start --block` as children of the test.

    `env`: extra environment variables of every node (and so of every Ray process of the cluster, job drivers
    included), e.g. storage credentials, as a cluster's start commands would export them. Each node runs in its
    own working directory `<root>/<node>-cwd` with its own temp dir `<root>/<node>`."""

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = root  # short: Ray's Unix socket paths live under it (limit ~107 characters)
        self.tag = root.name
        self.extra_env = dict(env or {})
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
            # the session's faster Train health checks (tests/conftest.py), so each run's end is seen sooner
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"),
            **self.extra_env,
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

    @property
    def temp_dirs(self) -> list[Path]:
        """Each node's --temp-dir (sessions, logs, spilled objects, runtime-env resources)."""
        return [self.root / name for name in self.node_names]

    @property
    def node_names(self) -> list[str]:
        return ["head" if i == 0 else f"node{i}" for i in range(len(self.nodes))]

    # -- nodes --
    def _start(self, name: str, args: list[str], ready: str = "Ray runtime started",
               hide: Path | None = None, own_mounts: bool = False) -> None:
        ports = port_block(100)  # 9 service ports, the rest for worker processes
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
        cwd = self.root / f"{name}-cwd"
        cwd.mkdir(exist_ok=True)
        log = self.root / f"{name}.log"
        command = [RAY, "start", *args, f"--temp-dir={temp_dir}", "--object-store-memory=300000000",
                   "--disable-usage-stats", "--block"]
        if hide is not None:  # a node that does not mount a disk the others see: an empty tmpfs over the folder in
            # a private mount namespace of its own (root), which its raylet and every worker of it inherit
            command = ["unshare", "--mount", "--propagation", "private", "bash", "-c",
                       'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"', str(hide), *command]
        elif own_mounts:  # a mount namespace of its own, for `hide_later` (root)
            command = ["unshare", "--mount", "--propagation", "private", *command]
        with log.open("w") as out:
            proc = subprocess.Popen(
                command,
                cwd=cwd, env=self.node_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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

    def add_node(self, *extra: str, hide: Path | None = None, own_mounts: bool = False) -> None:
        """Another raylet on this machine, joined to the head; `hide`: a folder this node sees empty (root);
        `own_mounts`: in a mount namespace of its own, so that `hide_later` can take a folder from it (root)."""
        before = len(self.alive_nodes())
        self._start(f"node{len(self.nodes)}", [f"--address=127.0.0.1:{self.gcs_port}", *extra], hide=hide,
                    own_mounts=own_mounts)
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while len(self.alive_nodes()) <= before:
            assert time.monotonic() < deadline, "the new node did not register with the head"
            time.sleep(1)

    def hide_later(self, index: int, folder: Path) -> None:
        """From now on node `index` (0: the head; started with `own_mounts`) sees `folder` empty: its mount lost
        while it runs, for its raylet and every worker process of it (an empty tmpfs over the folder in its mount
        namespace)."""
        proc, _ = self.nodes[index]
        subprocess.run(["nsenter", f"--target={proc.pid}", "--mount", "mount", "-t", "tmpfs", "-o", "size=1m",
                        "tmpfs", str(folder)], check=True, capture_output=True, text=True, timeout=30)

    def processes(self) -> list[psutil.Process]:
        """Live processes of this cluster (raylets, GCS, workers, job drivers)."""
        return marked(self.tag, cwd_under=self.root)

    def stop(self) -> list[str]:
        """End every process this cluster started; returns what `ps` still shows of it (should be nothing)."""
        for _ in range(3):  # a raylet may spawn a worker while the others end
            procs = marked(self.tag, cwd_under=self.root)
            if not procs:
                break
            # A test cluster's state is thrown away: no need to wait out the raylets and agents that take over
            # 10 s to end on SIGTERM once their GCS is gone (seen after test_cluster_integration's stopped job).
            end(procs, grace_s=3)
        for proc, _ in self.nodes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in marked(self.tag, cwd_under=self.root)]
        return left + ps_lines(str(self.root))

    # -- API --
    def http(self, path: str, token: str | None = "default") -> tuple[int, str]:
        return http(self.dashboard + path, self.token if token == "default" else token)

    def alive_nodes(self) -> list[dict]:
        status, body = self.http("/api/v0/nodes?limit=100")
        if status != 200:
            return []
        return [n for n in json.loads(body)["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def ray(self, *args: str, authenticated: bool = True, timeout: float = 120,
            cwd: Path | str = REPO) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], cwd=cwd, env=self.cli_env(authenticated=authenticated),
                              capture_output=True, text=True, timeout=timeout)

    def submit(self, job_id: str, *entrypoint: str, cwd: Path | str = REPO) -> None:
        """`ray job submit --no-wait` of `entrypoint` with this repository as the working dir and
        cluster/runtime_env.yaml, as cluster/README.md says (`cwd`: where the CLI runs)."""
        result = self.ray("job", "submit", "--address", self.dashboard, "--submission-id", job_id, "--no-wait",
                          "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--working-dir", str(REPO),
                          "--", *entrypoint, cwd=cwd)
        assert result.returncode == 0, result.stdout + result.stderr

    def wait_for_job(self, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
        """Poll the Jobs API until the job ends; returns its final status."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status, body = self.http(f"/api/jobs/{job_id}")
            if status == 200 and json.loads(body)["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return json.loads(body)["status"]
            time.sleep(0.5)
        return "TIMEOUT"

    def job_logs(self, job_id: str) -> str:
        result = self.ray("job", "logs", "--address", self.dashboard, job_id)
        assert result.returncode == 0, result.stderr
        return result.stdout
