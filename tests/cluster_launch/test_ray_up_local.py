"""`ray up cluster/local.yaml` for real: a head and two workers, the smoke recipe submitted, `ray down`.

The hosts are namespaces on this machine (tests/cluster_launch/hosts.py: own address on a private bridge, own sshd,
own /tmp, /dev/shm, home, process table and hostname), reachable only from here. This machine plays the laptop:
the project venv's `ray` CLI runs `ray up`, which SSHes into the head and runs the YAML's own file mounts, setup
and start commands there; the head's autoscaler then sets up the two workers over SSH the same way. The test changes
only what a user edits: the addresses (and the worker count that follows from them), the SSH user, and the
package index (pip's and uv's user config files as two more file_mounts, pointing at a local wheelhouse, because the
hosts reach nothing outside this machine). The commands are the YAML's, checked unchanged below.

Then: the dashboard through `ray dashboard` (an SSH tunnel), token authentication with a token made by
`ray get-auth-token --generate` in the test's own HOME, `ray job submit` of the smoke recipe with
cluster/runtime_env.yaml, SUCCEEDED, the Train workers on the two workers (the head advertises no CPU), the run in
the head's MLflow server; `ray up` again after an edit to a mounted file (setup reruns everywhere, Ray and MLflow
restart, MLflow keeps its runs); the teardown cluster/README.md gives for on-prem machines (MLflow, `ray down`,
`ray stop` on the workers) leaving nothing but sshd on the hosts; and nothing of the test left afterwards: no
process, namespace or link, also when the test fails. Needs root and 5-22 minutes on 2 cores (shared with other
work); `make cluster-test` runs it.

The laptop side runs in a mount namespace of its own where root's home is the test's HOME and /tmp is a test
directory, so `ray up`'s ssh, rsync, cluster state and config cache never touch the real ~/.ssh, ~/.ray or /tmp.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster_launch import hosts as H
from tests.cluster_launch import wheelhouse
from tests.ray_nodes import http, port_block
from tests.test_cluster_integration import SMOKE_SETTINGS, WORKER_LINE

pytestmark = [pytest.mark.cluster_launch, pytest.mark.timeout(3 * 3600)]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
CLUSTER_YAML = REPO / "cluster" / "local.yaml"
LOCK = Path("/run/lock/dist-cluster-launch-test.lock")
HOST_NAMES = ["head", "worker1", "worker2"]
RAY_UP_TIMEOUT_S = 3600  # the head's setup: the whole requirements.txt into a fresh venv, on a shared 2-core CPU
WORKERS_TIMEOUT_S = 3600  # the autoscaler sets up both workers (in parallel) after the head is up
JOB_TIMEOUT_S = 1200
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")  # fmt: skip


def log(msg: str) -> None:
    print(f"[cluster-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Laptop:
    """The machine `ray up` runs on: this one, with a HOME, /tmp and ~/.ssh of the test's own."""

    def __init__(self, root: Path):
        self.home = root / "laptop"
        self.tmp = self.home / "tmp"
        self.logs = root / "logs"
        self.tmp.mkdir(parents=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        # ssh finds ~/.ssh through the password database, not $HOME: root's home is the test's HOME in here.
        passwd = []
        for line in Path("/etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == "root":
                fields[5] = str(self.home)
            passwd.append(":".join(fields))
        (self.home / "passwd").write_text("\n".join(passwd) + "\n")
        self.key = self.home / ".ssh" / "id_ed25519"  # where local.yaml's auth.ssh_private_key points
        self.key.parent.mkdir(mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dist-cluster-test", "-f", str(self.key)],
                       check=True)
        self.procs: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PIP_", "UV_"))}
        env.update({
            "HOME": str(self.home),
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
            "TMPDIR": "/tmp",
            "RAY_AUTH_MODE": "token",
            "RAY_USAGE_STATS_ENABLED": "0",
            H.MARKER: self.home.parent.name,
        })
        return env

    def argv(self, *args: str) -> list[str]:
        script = (f"mount --bind {self.home / 'passwd'} /etc/passwd && mount --bind {self.tmp} /tmp && "
                  'exec "$@"')
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *args]

    def run(self, *args: str, log_name: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """A command on the laptop, from the repository root (the YAML's file_mounts are relative to it)."""
        start = time.monotonic()
        if log_name:
            path = self.logs / log_name
            with path.open("w") as out:
                proc = subprocess.Popen(self.argv(*args), cwd=REPO, env=self.env(), stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
                try:
                    code = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise
            result = subprocess.CompletedProcess(args, code, path.read_text(), "")
        else:
            result = subprocess.run(self.argv(*args), cwd=REPO, env=self.env(), capture_output=True, text=True,
                                    timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True)
        log(f"$ {' '.join(a if len(a) < 60 else a[:57] + '...' for a in args)}: exit {result.returncode} "
            f"in {time.monotonic() - start:.0f} s")
        return result

    def background(self, *args: str, log_name: str) -> subprocess.Popen:
        out = (self.logs / log_name).open("w")
        proc = subprocess.Popen(self.argv(*args), cwd=REPO, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()


def index_config(root: Path, wheels: Path) -> dict[str, str]:
    """pip's and uv's user config files pointing at the wheelhouse; the YAML mounts them on every node."""
    folder = root / "laptop" / "index"
    folder.mkdir(parents=True)
    (folder / "pip.conf").write_text(f"[global]\nno-index = true\nfind-links = {wheels}\n")
    (folder / "uv.toml").write_text(f'no-index = true\nfind-links = ["{wheels}"]\npython-downloads = "never"\n')
    return {"~/.config/pip/pip.conf": str(folder / "pip.conf"), "~/.config/uv/uv.toml": str(folder / "uv.toml")}


def launch_config(hosts: H.Hosts, index_mounts: dict[str, str]) -> dict:
    """cluster/local.yaml with this test's addresses, user and package index; nothing else changes."""
    original = yaml.safe_load(CLUSTER_YAML.read_text())
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    head, *workers = hosts.hosts
    config["provider"]["head_ip"] = head.ip
    config["provider"]["worker_ips"] = [w.ip for w in workers]
    config["min_workers"] = config["max_workers"] = len(workers)
    config["auth"]["ssh_user"] = H.USER  # the key stays ~/.ssh/id_ed25519: the test's HOME holds a fresh one
    config["file_mounts"].update(index_mounts)
    for key in COMMAND_KEYS:
        assert config[key] == original[key], key
    assert set(config) == set(original)
    return config


def _host_file(host: H.Host, path: str) -> Path:
    """A file as the host sees it (its own /tmp), through its sshd's /proc/PID/root. Symbolic links are resolved
    inside the host (Ray's session_latest points at an absolute /tmp/ray/session_... path)."""
    root = f"/proc/{host.init_pid()}/root"
    resolved = "/"
    parts = [p for p in path.split("/") if p]
    for _ in range(40):
        if not parts:
            break
        candidate = str(Path(resolved) / parts.pop(0))
        if os.path.islink(root + candidate):
            target = os.readlink(root + candidate)
            parts = [p for p in target.split("/") if p] + parts
            resolved = "/" if target.startswith("/") else resolved
        else:
            resolved = candidate
    return Path(root + resolved)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"({path}: {err})"


def diagnostics(hosts: H.Hosts, laptop: Laptop) -> str:
    parts = []
    for name in sorted(p.name for p in laptop.logs.glob("*.log")):
        parts.append(f"--- laptop {name}\n{_tail(laptop.logs / name, 80)}")
    head = hosts.hosts[0]
    for name in ("monitor.log", "monitor.out", "monitor.err"):
        parts.append(f"--- head {name}\n{_tail(_host_file(head, '/tmp/ray/session_latest/logs/' + name), 80)}")
    parts.append(f"--- head ~/mlflow/server.log\n{_tail(head.home / 'mlflow' / 'server.log', 30)}")
    for host in hosts:
        parts.append(f"--- {host.name} processes\n" + "\n".join(c[:200] for _, c in hosts.processes(host)))
    return "\n".join(parts)


def save_logs(hosts: H.Hosts, laptop: Laptop) -> Path:
    """Copy the laptop logs and each host's Ray logs out of the run directory, which is deleted."""
    keep = Path(tempfile.mkdtemp(prefix="dist-cluster-test-logs-", dir="/var/tmp"))
    shutil.copytree(laptop.logs, keep / "laptop", dirs_exist_ok=True)
    for host in hosts:
        src = _host_file(host, "/tmp/ray/session_latest/logs")
        if host.init_pid() and src.is_dir():
            shutil.copytree(src, keep / host.name / "ray-logs", ignore_dangling_symlinks=True, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.sock"))
        if (host.home / "mlflow" / "server.log").is_file():
            shutil.copy(host.home / "mlflow" / "server.log", keep / f"{host.name}-mlflow-server.log")
    return keep


def wait_for(what: str, check, timeout_s: float, progress=None, every_s: float = 60) -> float:
    start = time.monotonic()
    last = start
    while not check():
        now = time.monotonic()
        if now - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        if progress and now - last > every_s:
            progress(now - start)
            last = now
        time.sleep(5)
    return time.monotonic() - start


def host_leftovers(hosts: H.Hosts) -> dict[str, list[str]]:
    """Per host, every process but its sshd listener and the test's own `unshare` that started it."""
    left = {}
    for host in hosts:
        pid1 = host.init_pid()
        left[host.name] = [c[:160] for pid, c in hosts.processes(host)
                           if pid not in (pid1, host.proc.pid) and not c.startswith("sshd: ")]
    return left


def mlflow_servers(hosts: H.Hosts, head: H.Host) -> list[int]:
    """PIDs of the `mlflow server` processes on the head."""
    return [pid for pid, c in hosts.processes(head) if "bin/mlflow server " in c]


def mlflow_runs(head: H.Host) -> set[tuple[str, str]] | None:
    """(run name, status) of every run in the head's MLflow server, through its REST API from this machine;
    None while the server does not answer."""
    url = f"http://{head.ip}:5000/api/2.0/mlflow"
    status, body = http(f"{url}/experiments/search", data={"max_results": 100})
    if status != 200:
        return None
    experiments = [e["experiment_id"] for e in json.loads(body).get("experiments", [])]
    status, body = http(f"{url}/runs/search", data={"experiment_ids": experiments, "max_results": 100})
    if status != 200:
        return None
    return {(r["info"].get("run_name"), r["info"]["status"]) for r in json.loads(body).get("runs", [])}


def _user_state() -> dict[str, tuple]:
    """The real user's ~/.ssh and ~/.ray (names, sizes, mtimes): the test must leave them as they were."""
    state = {}
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    for folder in (home / ".ssh", home / ".ray"):
        state[str(folder)] = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())
                                   ) if folder.is_dir() else None
    return state


def test_ray_up_local_yaml_runs_the_smoke_recipe():
    if os.geteuid() != 0:
        pytest.fail("the launch test needs root: network, mount and PID namespaces, and an sshd per host")
    started = time.monotonic()
    user_state_before = _user_state()
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    lock = LOCK.open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # one launch test at a time: fixed bridge and namespace names, one wheelhouse
    H.ensure_tools(log)
    built_s = wheelhouse.ensure(log=log)
    H.clean_stale(log)
    for stale in Path("/var/tmp").glob("distlt-*"):  # run directories of runs killed before their cleanup
        log(f"removing stale run directory {stale}")
        shutil.rmtree(stale, ignore_errors=True)
    root = Path(tempfile.mkdtemp(prefix="distlt-", dir="/var/tmp"))
    root.chmod(0o755)
    laptop = Laptop(root)
    hosts = H.Hosts(root, HOST_NAMES, (laptop.key.parent / "id_ed25519.pub").read_text(), log)
    passed = False
    timings: dict[str, float] = {"wheelhouse": built_s}
    try:
        hosts.up()
        head, *workers = hosts.hosts
        config = launch_config(hosts, index_config(root, wheelhouse.DEFAULT_DIR))
        cluster_file = laptop.home / "cluster.yaml"
        cluster_file.write_text(yaml.safe_dump(config, sort_keys=False))

        # The cluster's token: made on the laptop the way cluster/README.md says, in the test's HOME only.
        result = laptop.run(RAY, "get-auth-token", "--generate")
        assert result.returncode == 0, result.stderr
        token = (laptop.home / ".ray" / "auth_token").read_text().strip()
        assert re.fullmatch(r"[0-9a-f]{64}", token), "unexpected token format"

        # Data and run storage on a path every host sees (what NFS is on real machines).
        shared = root / "shared"
        subprocess.run([sys.executable, "-m", "workflows", "data", "sample", "--out", str(shared / "sample"),
                        "--videos-per-class", "3", "--size", "48", "--frames", "24"], cwd=REPO, check=True,
                       capture_output=True)
        (shared / "runs").mkdir()
        for path in [shared, *shared.rglob("*")]:
            os.chown(path, H.UID, H.GID)

        # -- ray up: the head's setup and start commands, over SSH, from this "laptop".
        t0 = time.monotonic()
        up = laptop.run(RAY, "up", "-y", "--disable-usage-stats", "--log-style", "record", str(cluster_file),
                        log_name="ray-up.log", timeout=RAY_UP_TIMEOUT_S)
        timings["ray up (head setup + start)"] = time.monotonic() - t0
        assert up.returncode == 0, f"ray up failed:\n{up.stdout[-8000:]}"

        # -- the dashboard through the launcher's SSH tunnel, as a user reaches it.
        port = port_block(1)[0]
        tunnel = laptop.background(RAY, "dashboard", "--port", str(port), str(cluster_file), log_name="tunnel.log")
        dashboard = f"http://127.0.0.1:{port}"
        wait_for("the dashboard tunnel", lambda: http(f"{dashboard}/api/version", token)[0] == 200, 120)
        assert tunnel.poll() is None
        assert http(f"{dashboard}/api/jobs/")[0] == 401, "the Jobs API answered without a token"

        def alive_nodes() -> list[dict]:
            status, body = http(f"{dashboard}/api/v0/nodes?limit=100&detail=true", token)
            if status != 200:
                return []
            return [n for n in json.loads(body)["data"]["result"]["result"] if n["state"] == "ALIVE"]

        def progress(elapsed: float) -> None:
            line = _tail(_host_file(head, "/tmp/ray/session_latest/logs/monitor.log"), 1)
            log(f"{elapsed:.0f} s: {len(alive_nodes())} node(s) alive; monitor: {line[:200]}")

        # -- the workers: set up by the head's autoscaler (local provider, min_workers = both listed machines).
        t0 = time.monotonic()
        wait_for("both workers to join", lambda: len(alive_nodes()) == len(hosts.hosts), WORKERS_TIMEOUT_S,
                 progress)
        timings["workers (autoscaler setup + start)"] = time.monotonic() - t0
        nodes = {n["node_ip"]: n for n in alive_nodes()}
        assert set(nodes) == {h.ip for h in hosts}, nodes.keys()
        assert nodes[head.ip]["labels"].get("dist-role") == "head"
        assert nodes[head.ip]["resources_total"].get("CPU", 0) == 0, nodes[head.ip]["resources_total"]
        for w in workers:  # no GPU here, so the start command labels them decode nodes
            assert nodes[w.ip]["labels"].get("dist-role") == "decode", nodes[w.ip]["labels"]
            assert nodes[w.ip]["resources_total"].get("CPU", 0) >= 1

        # -- the smoke recipe through the Jobs API, with the runtime env users submit with.
        job_id = "smoke-ray-up"
        sample = shared / "sample"
        sets = [f"data.train_manifest={sample / 'train.csv'}", f"data.val_manifest={sample / 'val.csv'}",
                f"data.labels={sample / 'labels.json'}", f"run.storage_path={shared / 'runs'}", f"run.name={job_id}",
                *SMOKE_SETTINGS]
        t0 = time.monotonic()
        submit = laptop.run(RAY, "job", "submit", "--address", dashboard, "--submission-id", job_id, "--no-wait",
                            "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", ".", "--",
                            "python", "-m", "workflows", "pretrain", "--config", "workflows/configs/smoke.yaml",
                            *[a for s in sets for a in ("--set", s)])
        assert submit.returncode == 0, submit.stdout + submit.stderr

        def job_status() -> str:
            status, body = http(f"{dashboard}/api/jobs/{job_id}", token)
            return json.loads(body)["status"] if status == 200 else f"HTTP {status}"

        wait_for("the smoke job to end", lambda: job_status() in ("SUCCEEDED", "FAILED", "STOPPED"), JOB_TIMEOUT_S,
                 lambda s: log(f"{s:.0f} s: job {job_status()}"))
        timings["smoke job"] = time.monotonic() - t0
        logs = laptop.run(RAY, "job", "logs", "--address", dashboard, job_id).stdout
        (laptop.logs / "job.log").write_text(logs)
        assert job_status() == "SUCCEEDED", f"job ended {job_status()}:\n{logs[-6000:]}"
        for step in (1, 2, 3):
            assert f"[pretrain] step {step}/3" in logs
        assert "[pretrain] validation at step 3" in logs
        assert re.search(r"^\[pretrain\] finished: step 3, val top-1 [\d.]+%; checkpoint: /", logs, re.M), logs[-3000:]
        placed = {int(m[1]): m[4] for m in WORKER_LINE.finditer(logs)}
        assert set(placed) == {0, 1}, logs[-3000:]
        assert set(placed.values()) <= {w.ip for w in workers}, f"Train workers on {placed}: the head has no CPU"
        assert list((shared / "runs" / job_id).glob("checkpoint_*")), "no checkpoint in the shared run storage"

        # -- the run in the head's MLflow server (started by head_start_ray_commands; the nodes log to it).
        runs = mlflow_runs(head)
        assert runs and (job_id, "FINISHED") in runs, runs

        # -- `ray up` again, as a user applies an edit (here: to a mounted file, so no command changes): the file
        # mounts and setup commands run again on every host (they must be idempotent), Ray and MLflow restart on the
        # head (`ray stop`, the MLflow pid file), the workers rejoin the new head, and MLflow's history is kept.
        nodes_before = {n["node_id"] for n in alive_nodes()}
        mlflow_before = mlflow_servers(hosts, head)
        assert len(mlflow_before) == 1, mlflow_before
        pip_conf = Path(config["file_mounts"]["~/.config/pip/pip.conf"])
        pip_conf.write_text(pip_conf.read_text() + "# edited: ray up applies it\n")
        t0 = time.monotonic()
        again = laptop.run(RAY, "up", "-y", "--disable-usage-stats", "--log-style", "record", str(cluster_file),
                           log_name="ray-up-again.log", timeout=RAY_UP_TIMEOUT_S)
        assert again.returncode == 0, f"ray up (again) failed:\n{again.stdout[-8000:]}"

        def restarted() -> bool:  # every node is a new one: Ray restarted on each host, after its update
            nodes = alive_nodes()
            return len(nodes) == len(hosts.hosts) and not nodes_before & {n["node_id"] for n in nodes}

        wait_for("the restarted cluster", restarted, WORKERS_TIMEOUT_S, progress)
        timings["ray up again (until all nodes are back)"] = time.monotonic() - t0
        for host in hosts:  # the edit reached every host, and the setup commands ran there again without harm
            assert "# edited" in (host.home / ".config" / "pip" / "pip.conf").read_text(), host.name
            assert (host.home / ".bashrc").read_text().count("dist-venv/bin/activate") == 1, host.name
        assert "Configuration already up to date" not in again.stdout
        mlflow_after = mlflow_servers(hosts, head)  # the old server was stopped, not left beside the new one
        assert len(mlflow_after) == 1 and mlflow_after != mlflow_before, (mlflow_before, mlflow_after)
        wait_for("MLflow on the restarted head", lambda: mlflow_runs(head) is not None, 300)
        log_text = (head.home / "mlflow" / "server.log").read_bytes()
        assert b"\0" not in log_text, "two MLflow servers wrote the log at once (the restart did not wait)"
        runs = mlflow_runs(head)
        assert runs and (job_id, "FINISHED") in runs, runs

        # -- tear down as cluster/README.md says for on-prem machines: MLflow first (`ray down` only runs
        # `ray stop` on the head), then `ray down`, then `ray stop` on each worker (a log monitor outlives the
        # raylet there once the head is gone).
        laptop.stop()
        t0 = time.monotonic()
        stop_mlflow = laptop.run(RAY, "exec", str(cluster_file), 'kill "$(cat ~/mlflow/server.pid)"')
        assert stop_mlflow.returncode == 0, stop_mlflow.stdout + stop_mlflow.stderr
        down = laptop.run(RAY, "down", "-y", str(cluster_file), log_name="ray-down.log", timeout=600)
        assert down.returncode == 0, down.stdout[-4000:]
        for w in workers:
            stop = laptop.run("ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
                              f"{H.USER}@{w.ip}", "~/dist-venv/bin/ray stop")
            assert stop.returncode == 0, stop.stdout + stop.stderr
        try:
            wait_for("every host to run nothing but its sshd", lambda: not any(host_leftovers(hosts).values()), 120)
        except AssertionError as err:
            raise AssertionError(f"{err}: {host_leftovers(hosts)}") from None
        timings["tear down"] = time.monotonic() - t0
        passed = True
    except BaseException:
        try:
            print(diagnostics(hosts, laptop), flush=True)
        except Exception as err:  # diagnostics must never hide the failure
            print(f"(diagnostics failed: {err})")
        raise
    finally:
        if not passed or os.environ.get("DIST_CLUSTER_KEEP_LOGS") == "1":
            try:
                log(f"logs kept in {save_logs(hosts, laptop)}")
            except Exception as err:
                log(f"could not keep logs: {err}")
        laptop.stop()
        left = hosts.down()
        t0 = time.monotonic()
        # Three venvs and uv caches (~0.3 M files): one `rm` per host at once is faster than one after the other.
        removers = [subprocess.Popen(["rm", "-rf", "--one-file-system", str(path)])
                    for path in sorted((root / "hosts").glob("*"))]
        for remover in removers:
            remover.wait()
        shutil.rmtree(root, ignore_errors=True)
        timings["removing the run directory"] = time.monotonic() - t0
        lock.close()
        timings["total"] = time.monotonic() - started
        log("timings: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()))
    assert not left, f"left behind by the launch test: {left}"
    assert not root.exists()
    assert _user_state() == user_state_before, "the real ~/.ssh or ~/.ray changed"
