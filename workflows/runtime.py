"""Where a workflow runs: starting or joining Ray, remote vs local paths, Ray node labels.

Every driver (pretrain, tune, evaluate, demo, the data tools, the benchmarks) starts or joins Ray through
`ensure_ray`, which also remembers whether this process started the cluster itself (a local cluster has no
autoscaler, so `capacity` never waits for nodes on one).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from workflows.recipe import Recipe

# The GCS address of the cluster this process started (None: it joined one, or none yet). Written only here.
_started_gcs_address: str | None = None


def is_remote(path: str | os.PathLike | None) -> bool:
    """True for a URI (s3://, gs://, ...) that pyarrow or Ray must fetch; False for a local path (or None)."""
    return path is not None and "://" in str(path)


def in_bucket(path: str | os.PathLike | None) -> bool:
    """True for an object-store URI (s3://, gs://, ...): a remote path that is not a file:// one."""
    return is_remote(path) and not str(path).startswith("file://")


# Query parameters of a storage or tracking URI that carry credentials (pyarrow's S3/GCS options, presigned URLs).
_SECRET_PARAMS = re.compile(r"(?i)^(access_key|secret_key|session_token|token|password|secret|sig|signature|"
                            r"x-amz-signature|x-amz-credential|x-amz-security-token|credential|key)$")
REDACTED = "REDACTED"


def redact_secrets(value: Any) -> Any:
    """`value` with the credentials inside URIs replaced by REDACTED: a password in `scheme://user:password@host`
    and secret query parameters (`?access_key=...&secret_key=...`). Dicts and lists are walked. For everything
    written to files, logs and MLflow; Ray's workers get the recipe itself."""
    if isinstance(value, dict):
        return {k: redact_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(v) for v in value)
    if not isinstance(value, str) or "://" not in value:
        return value
    # Only the secrets are replaced; every other character stays as written. (urlunsplit would rewrite the rest:
    # "sqlite:////abs/mlflow.db" came back as "sqlite://abs/mlflow.db", another store, and %2F as "/".)
    parts = urlsplit(value)
    out = value
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        hidden = f"{userinfo.split(':', 1)[0]}:{REDACTED}" if ":" in userinfo else REDACTED
        at = value.index(parts.netloc)
        out = f"{value[:at]}{hidden}@{host}{value[at + len(parts.netloc):]}"
    if parts.query:
        fields = [f"{field.split('=', 1)[0]}={REDACTED}" if _SECRET_PARAMS.match(unquote(field.split("=", 1)[0]))
                  else field for field in parts.query.split("&")]
        out = out.replace(f"?{parts.query}", f"?{'&'.join(fields)}", 1)
    return out


def scratch_dir(prefix: str) -> Path:
    """A new local temporary directory that is deleted when this process exits: for a checkpoint fetched from a
    bucket or a model registry, read by the caller and then no longer needed (a CLI run must not leave a copy of
    the weights in /tmp for each checkpoint it reads)."""
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def storage_of(path: str | os.PathLike) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) of a run's or a sweep's storage: a URI (s3://, gs://, file://) or a local
    path, as the manifests' `resolve_filesystem` reads them, a relative one taken from the working directory
    (pyarrow's `FileSystem.from_uri` refuses relative paths, and the default run.storage_path is ./runs)."""
    import pyarrow.fs

    from workflows.data.manifest import resolve_filesystem

    fs, inner = resolve_filesystem(str(path))
    return fs, os.path.abspath(inner) if isinstance(fs, pyarrow.fs.LocalFileSystem) else inner


def write_text(path: str, text: str) -> None:
    """Write a small text file at a local path or a URI (s3://, gs://, file://), creating its directory."""
    fs, fs_path = storage_of(path)
    fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(fs_path) as out:
        out.write(text.encode())


def parse_node_label(label: str) -> tuple[str, str]:
    """`key=value` -> (key, value), whitespace stripped; the value is "" when there is no `=`."""
    key, _, value = label.partition("=")
    return key.strip(), value.strip()


def label_selector(label: str | None) -> dict[str, str] | None:
    """A `key=value` node label as a Ray label selector ({key: value}); None when no label is given."""
    if not label:
        return None
    key, value = parse_node_label(label)
    return {key: value}


NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node: a task selecting it runs on that node alone


def avoiding(selector: dict[str, str] | None, nodes: Sequence[str]) -> dict[str, str] | None:
    """`selector` that also keeps off the Ray nodes of id `nodes` (scaling.exclude_nodes); None when it selects
    any node."""
    if not nodes:
        return selector
    return {**(selector or {}), NODE_ID_LABEL: f"!in({','.join(nodes)})"}


def without_nodes(nodes: list[dict[str, Any]], excluded: Sequence[str]) -> list[dict[str, Any]]:
    """`ray.nodes()` entries less those of id `excluded` (scaling.exclude_nodes)."""
    excluded = set(excluded)
    return [node for node in nodes if node.get("NodeID") not in excluded]


# --- `ray.nodes()` entries: the capacity check and the decode-node resolution read them the same way ---


def alive_nodes(nodes: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The alive entries of `nodes` (`ray.nodes()` entries; default: ask the running cluster)."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    return [node for node in nodes if node.get("Alive", False)]


def node_labels(node: dict[str, Any]) -> dict[str, str]:
    return node.get("Labels") or node.get("labels") or {}


def node_matches(node: dict[str, Any], selector: dict[str, str] | None) -> bool:
    """Whether `node` carries every label of `selector` (every node does for None or {})."""
    labels = node_labels(node)
    return not selector or all(labels.get(k) == v for k, v in selector.items())


def node_resource(node: dict[str, Any], name: str) -> float:
    """How much of resource `name` (CPU, GPU, or a custom one) a node has; 0 when none."""
    return float((node.get("Resources") or {}).get(name, 0.0))


def node_resources(node: dict[str, Any]) -> tuple[float, float]:
    """(CPUs, GPUs) of a node."""
    return node_resource(node, "CPU"), node_resource(node, "GPU")


def local_cpus_for(recipe: Recipe) -> float:
    """Logical CPUs a local cluster needs for a run: the training workers plus one decoder per worker."""
    return recipe.scaling.max_workers * (recipe.scaling.cpus_per_worker + recipe.data.decode_threads)


def tools_of_this_interpreter_first() -> None:
    """Put this interpreter's bin directory first on PATH, as an activated venv does, so the tools installed beside it
    (above all the `ninja` DeepSpeed's wheel brings) are the ones found, however the process was started. Torch keys
    its JIT build cache by the build commands' hash, and a venv's ninja (1.13) and a system one (1.11) hash them
    differently: processes that alternated between them rebuilt DeepSpeed's CPU shared-memory op (~30 s on 2 cores)
    at every switch, e.g. `make demo` (venv not on PATH) after `make test` (venv first)."""
    import sys

    here = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != here:
        os.environ["PATH"] = os.pathsep.join([here, path]) if path else here


# The signal that stopped this driver when it was not Ctrl-C (set by stop_like_ctrl_c's handler), else None.
_stop_signal: int | None = None
_sigterm_like_ctrl_c = False  # stop_like_ctrl_c was called: ensure_ray takes SIGTERM back after ray.init


def stop_like_ctrl_c() -> Callable[[], None]:
    """Let SIGTERM stop this driver as Ctrl-C does. `ray job stop`, Kubernetes and batch schedulers end a driver with
    SIGTERM, then SIGKILL after a grace period (RAY_JOB_STOP_WAIT_TIME_S for `ray job stop`, 3 s by default; the
    cluster configs give 30 s). Whatever SIGINT handler is installed when SIGTERM arrives runs (Ray Train's abort of
    the run, Tune's last save of the sweep, else KeyboardInterrupt), so the driver says where the work resumes and
    closes its MLflow run instead of dying without a word. Main thread only (Python's rule for handlers). ray.init
    installs a SIGTERM handler of Ray's core worker (it logs "SIGTERM received" and ends the process), so
    ensure_ray installs this one again after connecting. Returns what undoes it (for a process that goes on, as a
    test session does)."""
    import signal

    global _sigterm_like_ctrl_c
    previous = signal.getsignal(signal.SIGTERM)
    _sigterm_like_ctrl_c = True
    _forward_sigterm()

    def undo() -> None:
        global _sigterm_like_ctrl_c, _stop_signal
        _sigterm_like_ctrl_c, _stop_signal = False, None
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    return undo


def _forward_sigterm() -> None:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def forward(signum: int, frame: Any) -> None:
        global _stop_signal
        _stop_signal = signum
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # SIG_DFL, SIG_IGN, or one installed outside Python
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    signal.signal(signal.SIGTERM, forward)


def stop_signal_note() -> str:
    """' by SIGTERM (ray job stop, or the scheduler)' after stop_like_ctrl_c forwarded one, else ''."""
    import signal

    return f" by {signal.Signals(_stop_signal).name} (ray job stop, or the scheduler)" if _stop_signal else ""


def interrupted_exit_code() -> int:
    """A stopped driver's exit status, as a shell reports a process a signal ended: 128 + the signal (130 for
    Ctrl-C, 143 for SIGTERM)."""
    import signal

    return 128 + (_stop_signal or signal.SIGINT)


def compile_toolchain_problem(use_gpu: bool, backend: str = "inductor") -> str | None:
    """Why torch.compile cannot build kernels on this machine, or None. Inductor writes C++ for CPU kernels; on a
    GPU its kernels are Triton's, and Triton builds a small C launcher for each with the system C compiler. The
    other backends (train.compile_backend aot_eager, eager) build no kernels and need no compiler."""
    import shutil

    if backend != "inductor":
        return None

    if use_gpu:
        if os.environ.get("CC") or any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
            return None
        return ("torch.compile on GPU needs a C compiler (Triton builds its kernel launchers with cc/gcc); install "
                "one or set train.compile=false")
    if os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++"):
        return None
    return "torch.compile needs a C++ compiler (g++) for CPU kernels; install one or set train.compile=false"


def ensure_ray(min_cpus: float = 1, *, address: str | None = None, fresh_local: bool = False,
               quiet: bool = False) -> None:
    """Join the cluster at `address` (else RAY_ADDRESS, else one running on this machine); failing that, or with
    `fresh_local`, start a local cluster with at least `min_cpus` logical CPUs (more than the machine's cores is
    fine: decoders and training workers take turns). `quiet`: workers' output stays in Ray's log files."""
    import ray

    if ray.is_initialized():
        return
    _connect_ray(min_cpus, address, fresh_local, quiet)
    if _sigterm_like_ctrl_c:  # ray.init installed the core worker's own SIGTERM handler (a log line, then exit)
        _forward_sigterm()


def _connect_ray(min_cpus: float, address: str | None, fresh_local: bool, quiet: bool) -> None:
    import ray

    global _started_gcs_address
    local_cpus = max(os.cpu_count() or 1, math.ceil(min_cpus))
    options = {"log_to_driver": False, "logging_level": "WARNING"} if quiet else {}
    if (address or os.environ.get("RAY_ADDRESS")) == "local":  # a new local cluster, sized as one started here
        fresh_local = True
    if fresh_local:
        _start_local_ray(address="local", num_cpus=local_cpus, **options)
    elif address or os.environ.get("RAY_ADDRESS"):
        given = address or os.environ["RAY_ADDRESS"]
        if not gcs_answers(given):
            from workflows.config_loader import ConfigError

            raise ConfigError(f"the Ray cluster at {given} ({'--address' if address else 'RAY_ADDRESS'}) does not "
                              f"answer: start it, or point at a running one (RAY_ADDRESS=local starts a local Ray "
                              f"for this command)")
        ray.init(address=address, **options)
        return
    else:
        recorded = recorded_ray_address()
        if recorded and not gcs_answers(recorded):  # Ray would try to join it for minutes on end
            print(f"note: the Ray cluster this machine last started ({recorded}, recorded by `ray start`) does not "
                  f"answer (stopped without `ray stop`, or its node crashed): starting a local Ray for this command "
                  f"instead; `ray stop` clears the record", file=sys.stderr, flush=True)
            _start_local_ray(address="local", num_cpus=local_cpus, **options)
        else:
            try:
                ray.init(address="auto", **options)
                return
            except ConnectionError:
                _start_local_ray(num_cpus=local_cpus, **options)
    _started_gcs_address = _gcs_address()


def _start_local_ray(**init: Any) -> None:
    """ray.init of a new local cluster, without the WARNING Ray 2.60 logs on each one started with RAY_AUTH_MODE
    unset: that it turned token authentication on (its default, creating ~/.ray/auth_token when missing), and that
    RAY_AUTH_MODE=disabled opts out. Nothing a user of a local run should act on, printed before every command's
    own first line; the behaviour is Ray's. (Setting RAY_AUTH_MODE here instead does not work: Ray read its config
    at import, and a GCS started with the variable and no token fails.)"""
    import logging

    import ray

    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    hide = _DropMessage("Token authentication is enabled for this Ray cluster")
    notice.addFilter(hide)
    try:
        ray.init(**init)
    finally:
        notice.removeFilter(hide)


class _DropMessage:
    """A logging filter dropping the records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def filter(self, record: Any) -> bool:
        return not record.getMessage().startswith(self.prefix)


GCS_PROBE_S = 3.0
_HOST_PORT = re.compile(r"^\[?([\w.:-]+?)\]?:(\d+)$")  # host:port, [v6]:port; not ray:// or http:// addresses


def gcs_answers(address: str, timeout_s: float = GCS_PROBE_S) -> bool:
    """Whether a Ray cluster's GCS at `address` (host:port) accepts a connection within `timeout_s`. Addresses of
    another form ("auto", "local", ray://) are left to Ray: True."""
    import socket

    found = _HOST_PORT.match(address.strip())
    if not found:
        return True
    try:
        with socket.create_connection((found[1], int(found[2])), timeout=timeout_s):
            return True
    except OSError:
        return False


def recorded_ray_address() -> str | None:
    """The address of the cluster `ray start` last started on this machine (what Ray's "auto" joins), or None."""
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address() or None
    except Exception:  # noqa: BLE001 - a Ray internals change: let ray.init find it as before
        return None


def ray_started_here() -> bool:
    """Whether the connected cluster is one this process started through `ensure_ray` (no autoscaler there)."""
    return _started_gcs_address is not None and _started_gcs_address == _gcs_address()


def ray_description() -> str:
    """Which Ray this process is connected to, for a console line: one it started, or a running cluster it joined
    (which a user may not have meant)."""
    import ray

    resources = ray.cluster_resources()
    size = f"{int(resources.get('CPU', 0))} CPUs" + (f", {int(resources['GPU'])} GPUs" if resources.get("GPU") else "")
    if ray_started_here():
        return f"a local Ray started for this command ({size})"
    return (f"the running Ray cluster at {_gcs_address()} ({size}; RAY_ADDRESS=local starts a separate local one "
            f"instead)")


def _gcs_address() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - only a hint; never let it break a run
        return None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.M)  # "module.Type: message", at the line's start
_CAUSED = "The above exception was the direct cause of the following exception:"  # `raise ... from`
_DURING = "During handling of the above exception, another exception occurred:"  # raised in an `except`
_SEPARATOR = re.compile(f"({re.escape(_CAUSED)}|{re.escape(_DURING)})")


def _root_in_text(text: str) -> re.Match | None:
    """The error line of the root cause in a printed exception chain (oldest first): from the last exception back
    through its direct causes, stopping at one raised while handling another (that one is the failure)."""
    parts = _SEPARATOR.split(_ANSI.sub("", text))  # [exc, separator, exc, separator, exc, ...]
    i = len(parts) - 1
    while i >= 2 and parts[i - 1] == _CAUSED:
        i -= 2
    return _ERROR_LINE.search(parts[i])


def free_bytes(path: str | Path) -> int:
    """Free bytes on the disk that holds local `path` (its nearest existing folder: a new run's is not made yet)."""
    import shutil

    path = Path(path).absolute()
    return shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free


def reserve_disk_space(path: str | Path, nbytes: int) -> bool:
    """Hold `nbytes` of a local disk in file `path` (allocated blocks, not a sparse file), for a write that must not
    meet a full disk: deleting the file just before it frees them. False, leaving no file, when there is no room."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # glibc writes the blocks where the file system cannot allocate them
        finally:
            os.close(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(path)
        return False
    return True


# What the check before a run says when its disk cannot hold one more checkpoint (pretrain.check_free_space).
CHECKPOINT_WOULD_NOT_FIT = "checkpoint would not fit"
# A full disk (ENOSPC) or quota (EDQUOT), as Python, pyarrow and shells word it, or that check's refusal: no restart
# or wait fixes any of them.
_DISK_FULL = re.compile(rf"No space left on device|Disk quota exceeded|\[Errno (?:28|122)\]|{CHECKPOINT_WOULD_NOT_FIT}",
                        re.IGNORECASE)


def is_disk_full(error: str) -> bool:
    """Whether an error's text (e.g. `root_cause`'s line) says a disk or a quota is full, or too full for the
    run's next checkpoint."""
    return bool(_DISK_FULL.search(error))


def root_cause(exc: BaseException) -> str:
    """"Type: first line of the message" of the error at the root of `exc` (followed through `raise ... from`), for
    a one-line report. A remote error (a decoder's, say) reaches a Train worker as RayTaskError(UserCodeException),
    whose chain survives only as text; Ray Train's WorkerGroupError holds each rank's (the lowest rank's is named)."""
    chain = [exc]
    while (inner := getattr(chain[-1], "cause", None) or chain[-1].__cause__) is not None and inner not in chain:
        chain.append(inner)
    from ray.exceptions import RayTaskError

    for error in chain:
        failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError: {rank: its error}
        if failures:
            rank = min(failures)
            return f"rank {rank} failed: {root_cause(failures[rank])}"
        found = _root_in_text(str(error)) if isinstance(error, RayTaskError) else None
        if found:
            following = [line.strip() for line in found.string[found.end():].splitlines() if line.strip()]
            return f"{found[1].rsplit('.', 1)[-1]}: {_with_its_cause(found[2].strip(), following)}"
    lines = [line.strip() for line in _ANSI.sub("", str(chain[-1])).strip().splitlines() if line.strip()]
    if not lines:
        return type(chain[-1]).__name__
    return f"{type(chain[-1]).__name__}: {_with_its_cause(lines[0], lines[1:])}"


def _with_its_cause(first: str, following: list[str]) -> str:
    """An error's first line, and the next when the first only introduces it ("Training failed due to controller
    error:", Ray Train's ControllerError, whose cause, e.g. ENOSPC, is on the line after)."""
    return f"{first} {following[0]}" if first.endswith(":") and following else first
