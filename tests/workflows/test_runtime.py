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
