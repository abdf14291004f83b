"""Process-level helpers of workflows/runtime.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_scratch_directory_is_gone_when_its_process_exits(tmp_path):
    """A checkpoint fetched from a bucket or registry lands in a scratch directory: after the CLI exits, no copy of
    the weights is left in the temp folder."""
    script = ("import sys; from workflows.runtime import scratch_dir; d = scratch_dir('dist-checkpoint-'); "
              "(d / 'weights.safetensors').write_bytes(b'0' * 1024); print(d); sys.exit(3)")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)})
    assert done.returncode == 3, done.stderr
    made = Path(done.stdout.strip())
    assert made.parent == tmp_path and made.name.startswith("dist-checkpoint-")
    assert not made.exists() and not list(tmp_path.iterdir())


def test_a_process_started_without_the_venv_on_path_finds_the_venvs_ninja():
    """How `make demo` starts (the venv's python, the venv not on PATH) against how the suite does (venv first): a
    training worker puts its interpreter's bin directory first, so both use the venv's ninja and DeepSpeed's CPU op is
    not rebuilt at each switch. Run in a fresh interpreter whose PATH holds only the system directories."""
    import shutil

    here = os.path.dirname(sys.executable)
    system_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != here)
    script = ("import os, shutil; from workflows.runtime import tools_of_this_interpreter_first as first; "
              "before = shutil.which('ninja'); first(); first(); "
              "print(before, shutil.which('ninja'), os.environ['PATH'], sep='\\n')")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PATH": system_path})
    assert done.returncode == 0, done.stderr
    before, after, path = done.stdout.splitlines()
    assert path.split(os.pathsep) == [here, *system_path.split(os.pathsep)]  # first, once
    venv_ninja = os.path.join(here, "ninja")
    assert os.path.exists(venv_ninja), "DeepSpeed's requirements install ninja into the venv"
    assert after == venv_ninja, (before, after)
    if shutil.which("ninja", path=system_path):  # a system ninja too (Debian's here): the one it would have used
        assert before != venv_ninja


def test_sigterm_runs_the_sigint_handler_installed_when_it_arrives():
    """`ray job stop` and schedulers send SIGTERM. After stop_like_ctrl_c, a real SIGTERM runs the SIGINT handler
    installed later (Ray Train's abort of the run, Tune's last save: here one that ends the wait as Ray Train's does,
    with SystemExit), also once ray.init has put its core worker's SIGTERM handler in (which logs and exits: the CLI
    calls stop_like_ctrl_c before it connects), and the driver's message and exit status name SIGTERM; with no
    Python SIGINT handler it is a KeyboardInterrupt. The whole path of a stopped pre-training job:
    tests/test_cluster_integration.py."""
    script = """
import os, signal, sys, time
from workflows.runtime import ensure_ray, interrupted_exit_code, stop_like_ctrl_c, stop_signal_note
print(repr(stop_signal_note()), interrupted_exit_code(), flush=True)  # before any signal: Ctrl-C's 130
stop_like_ctrl_c()
mode = sys.argv[1]
if mode == "ray":
    ensure_ray(1, fresh_local=True, quiet=True)
if mode in ("handler", "ray"):
    def abort(signum, frame):
        print("SIGINT handler ran for", signal.Signals(signum).name, flush=True)
        sys.exit(0)
    signal.signal(signal.SIGINT, abort)
else:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
except (KeyboardInterrupt, SystemExit) as exc:
    print(type(exc).__name__, f"interrupted{stop_signal_note()}", flush=True)
    sys.exit(interrupted_exit_code())
"""
    for mode, raised in (("handler", "SystemExit"), ("none", "KeyboardInterrupt"), ("ray", "SystemExit")):
        done = subprocess.run([sys.executable, "-c", script, mode], cwd=REPO, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
        lines = done.stdout.splitlines()
        assert done.returncode == 143, (mode, done.stdout, done.stderr)
        assert lines[0] == "'' 130", lines
        if mode != "none":
            assert lines[1] == "SIGINT handler ran for SIGINT", lines
        assert lines[-1] == f"{raised} interrupted by SIGTERM (ray job stop, or the scheduler)", lines


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_ray_address_that_does_not_answer_is_an_error_at_once_not_a_wait():
    """ray.init on a GCS address nobody serves retries for minutes (over 200 s measured, with no error): the CLIs
    say which address does not answer, before Ray is asked."""
    import socket

    import pytest

    from workflows.config_loader import ConfigError
    from workflows.runtime import _connect_ray, gcs_answers

    port = _closed_port()
    assert not gcs_answers(f"127.0.0.1:{port}", timeout_s=1)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert gcs_answers(f"127.0.0.1:{server.getsockname()[1]}")
    assert gcs_answers("auto") and gcs_answers("ray://head:10001")  # left to Ray
    with pytest.raises(ConfigError, match=rf"the Ray cluster at 127.0.0.1:{port} \(--address\) does not answer"):
        _connect_ray(1, f"127.0.0.1:{port}", fresh_local=False, quiet=True)


def test_a_dead_cluster_recorded_by_ray_start_does_not_hang_a_command(tmp_path, sample_data):
    """`ray start` records its cluster's address on the machine (<tmp>/ray/ray_current_cluster) and `ray stop`
    removes it; a cluster killed otherwise leaves it behind, and Ray's "auto" then tries to join it for minutes.
    A command run without RAY_ADDRESS says so and starts a local Ray instead. On a machine without a Ray token
    (a fresh HOME) that local Ray has token authentication on, Ray's default, without Ray's notice saying so."""
    import shutil
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # Ray's socket paths live below RAY_TMPDIR
    try:
        (short / "ray").mkdir()
        (short / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_closed_port()}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        done = subprocess.run([sys.executable, "-m", "workflows", "data", "check", "--manifest",
                               sample_data.val_manifest, "--labels", sample_data.labels],
                              cwd=REPO, capture_output=True, text=True, timeout=150,
                              env={**env, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(short),
                                   "HOME": str(short / "home")})
        token_created = (short / "home" / ".ray" / "auth_token").is_file()
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert token_created and "Token authentication is enabled" not in done.stderr, done.stderr[-3000:]
    assert "does not answer (stopped without `ray stop`, or its node crashed): starting a local Ray for this " \
           "command instead" in done.stderr, done.stderr[-3000:]
