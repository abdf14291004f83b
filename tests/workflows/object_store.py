"""Servers for the object-storage tests: a real S3-API endpoint (moto's standalone server), a TCP proxy in front of
it that can take the endpoint away, and an MLflow tracking server whose artifacts live in the bucket.

Every server is a real process or socket on loopback that the test starts and ends itself; clients reach them the
way users configure them (AWS_* environment variables, an http:// tracking URI), nothing is patched in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status < 500:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen | None, grace_s: float = 10) -> None:
    """End a server started with start_new_session=True and everything it spawned (uvicorn workers)."""
    if proc is None or proc.poll() is not None and not _group_alive(proc.pid):
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(proc.pid):
            proc.poll()
            time.sleep(0.2)
        if not _group_alive(proc.pid):
            break
    proc.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group `pgid`."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return False


class Reaper:
    """A process of its own that ends what a test started if the test process dies without its teardown (e.g.
    pytest-timeout's thread method ends the process with os._exit): the process groups and the marked processes
    (environment variable `marker`=tag) registered here, then the folders. `stop()` after a normal teardown."""

    def __init__(self, root: Path, marker: str):
        self.file = root / "reaper.json"
        self.state: dict[str, list] = {"pgids": [], "tags": [], "paths": [str(root)], "marker": [marker]}
        self._save()
        self.proc = subprocess.Popen([sys.executable, __file__, str(os.getpid()), str(self.file)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def _save(self) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.file)

    def add(self, *, pgid: int | None = None, tag: str | None = None) -> None:
        self.state["pgids" if pgid is not None else "tags"].append(pgid if pgid is not None else tag)
        self._save()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _reap(parent: int, file: Path) -> None:
    """The Reaper's process: wait for `parent` to end, then end what `file` lists."""
    while True:
        try:
            if psutil.Process(parent).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(2)
    state = json.loads(file.read_text())
    for pgid in state["pgids"]:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    marker = state["marker"][0]
    procs = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(marker) in state["tags"]:
                procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    for pgid in state["pgids"]:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for path in state["paths"]:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# the S3 endpoint


@dataclass
class S3Credentials:
    """What a user exports to reach a bucket: keys, region, endpoint."""

    endpoint: str
    access_key: str = field(default_factory=lambda: "AKIA" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self, endpoint: str | None = None):
        """A boto3 S3 client with these credentials, to `endpoint` (default: theirs)."""
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)


class LoopbackServer:
    """A server process on a free loopback port, in a process group of its own, its output in `log`."""

    what = "the server"
    health = "/"  # answers below 500 once the server is up

    def __init__(self, log: Path):
        self.port = free_port()
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _launch(self, command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        _wait_http(f"{self.url}{self.health}", self.proc, self.log, self.what)

    def stop(self) -> None:
        stop_process_group(self.proc)


class MotoServer(LoopbackServer):
    """`python -m moto.server` on a loopback port: a real HTTP S3 API (in-memory, so it is never restarted)."""

    what, health = "moto's S3 server", "/moto-api/"

    def __init__(self, root: Path):
        super().__init__(root / "moto.log")

    def start(self) -> None:
        self._launch([str(VENV_BIN / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)])


# ---------------------------------------------------------------------------------------------------------------
# the proxy that can take the endpoint away


_REQUEST_LINE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (/[^ \r\n]*) HTTP/1\.[01]\r\n")


class FaultyProxy:
    """A TCP proxy on loopback in front of `upstream_port`. Normally it forwards every connection. During an
    outage it resets every open connection and every new one at once (a client sees "connection reset"), as
    an endpoint that went away does. An outage starts with `outage(seconds)`, or when a request line matches the
    pattern given to `arm` (that request is cut before it reaches the server).

    `requests` lists (time, method, path) of every request line forwarded; `cut` the (time, method, path) of the
    request that started an armed outage; `resets` counts connections reset during outages."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self.requests: list[tuple[float, str, str]] = []
        self.cut: tuple[float, str, str] | None = None
        self.resets = 0
        self.outages: list[tuple[float, float]] = []  # (start, end) monotonic
        self._down_until = 0.0
        self._armed: tuple[re.Pattern, int, float] | None = None  # (pattern, matches to let through, seconds)
        self._matches = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name="faulty-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
        with self._lock:
            for sock in list(self._open):
                _reset(sock)
            self._open.clear()

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def outage(self, seconds: float) -> None:
        """Take the endpoint away now, for `seconds`."""
        with self._lock:
            now = time.monotonic()
            self._down_until = now + seconds
            self.outages.append((now, now + seconds))
            for sock in list(self._open):
                _reset(sock)
                self.resets += 1
            self._open.clear()

    def arm(self, path_pattern: str, seconds: float, let_through: int = 0, method: str = "") -> None:
        """Start a `seconds` outage at the request whose path matches `path_pattern` (a regex searched in
        `METHOD /path?query`), after letting `let_through` matching requests pass."""
        with self._lock:
            self._armed = (re.compile(path_pattern.encode()), let_through, seconds)
            self._matches = 0
            self._armed_method = method.encode()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down:
                with self._lock:
                    self.resets += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if from_client and self._inspect(data):
                    return  # an armed outage started at this request: the connection is gone
                if self.down:
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                for sock in (src, dst):
                    if sock in self._open:
                        self._open.discard(sock)
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        sock.close()

    def _inspect(self, data: bytes) -> bool:
        """Record the request lines in `data`; True when an armed outage starts here."""
        start = False
        for match in _REQUEST_LINE.finditer(data):
            method, path = match.group(1).decode(), match.group(2).decode()
            with self._lock:
                armed = self._armed
                if armed and (not self._armed_method or match.group(1) == self._armed_method) \
                        and armed[0].search(match.group(1) + b" " + match.group(2)):
                    if self._matches >= armed[1]:
                        self._armed = None
                        self.cut = (time.monotonic(), method, path)
                        start = True
                    self._matches += 1
            if start:
                self.outage(armed[2])
                return True
            self.requests.append((time.monotonic(), method, path))
        return False


@contextlib.contextmanager
def proxied_bucket(root: Path, bucket: str) -> Iterator[tuple[FaultyProxy, S3Credentials, Any]]:
    """moto (state under `root`) behind a FaultyProxy, `bucket` created: (the proxy, credentials whose endpoint is
    the proxy, a boto3 client straight to moto for filling the bucket). Both servers end with the block."""
    moto = MotoServer(root)
    moto.start()
    proxy = FaultyProxy(moto.port)
    proxy.start()
    try:
        creds = S3Credentials(endpoint=proxy.url)
        client = creds.client(moto.url)
        client.create_bucket(Bucket=bucket)
        yield proxy, creds, client
    finally:
        proxy.stop()
        moto.stop()


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashed or unreachable peer does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------------------
# the MLflow tracking server


class MlflowServer(LoopbackServer):
    """`mlflow server` with a sqlite backend and proxied artifacts in a bucket (`--artifacts-destination`), as
    cluster/README.md's "No shared disk" section runs it; `env` carries the S3 credentials and endpoint."""

    what, health = "the MLflow server", "/health"

    def __init__(self, root: Path, artifacts: str, env: dict[str, str]):
        super().__init__(root / "mlflow-server.log")
        self.db = root / "mlflow.db"
        self.artifacts = artifacts
        self.env = env

    def start(self) -> None:
        # No job runner: it starts eight more Python processes (huey consumers) that nothing here uses.
        env = {**self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self._launch([str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                      "--workers", "1", "--backend-store-uri", f"sqlite:///{self.db}",
                      "--artifacts-destination", self.artifacts], env=env, cwd=self.db.parent)


if __name__ == "__main__":  # the Reaper's process
    _reap(int(sys.argv[1]), Path(sys.argv[2]))
