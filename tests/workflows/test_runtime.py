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
