"""The local package mirror of the `ray up` launch test: every wheel requirements.txt needs, in one directory.

The test's hosts reach nothing outside this machine, so the YAML's setup commands install from a wheelhouse
(pip's and uv's `find-links` with `no-index`) instead of PyPI. It is built once with `pip download` (sdists such as
deepspeed's are turned into wheels here, so nothing is built on the hosts) and reused while requirements.txt is
unchanged. Run directly to build it ahead of time: `python -m tests.cluster_launch.wheelhouse [DIR]`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = Path(os.environ.get("DIST_WHEELHOUSE", "/var/cache/dist-wheelhouse"))
# What the setup commands install besides requirements.txt: uv itself (`python3 -m pip install --user uv`).
EXTRA = ("uv>=0.5",)
STAMP = ".complete"


def _digest(requirements: Path) -> str:
    return hashlib.sha256(requirements.read_bytes() + "\n".join(EXTRA).encode()).hexdigest()


def ensure(wheelhouse: Path = DEFAULT_DIR, requirements: Path = REPO / "requirements.txt",
           log=print) -> float:
    """Build the wheelhouse unless it is complete for this requirements.txt; returns the seconds spent."""
    stamp = wheelhouse / STAMP
    digest = _digest(requirements)
    if stamp.is_file() and stamp.read_text().strip() == digest:
        log(f"[wheelhouse] reusing {wheelhouse} ({sum(1 for _ in wheelhouse.glob('*.whl'))} wheels)")
        return 0.0
    start = time.monotonic()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    log(f"[wheelhouse] downloading requirements.txt and {', '.join(EXTRA)} into {wheelhouse} (several GB once)")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                    "-r", str(requirements), *EXTRA, "-d", str(wheelhouse)], check=True)
    # Build the sdists (deepspeed) into wheels once, here, so the offline hosts never need build tools.
    sdists = [p for p in wheelhouse.iterdir() if p.name.endswith((".tar.gz", ".zip", ".tar.bz2"))]
    for sdist in sdists:
        log(f"[wheelhouse] building a wheel of {sdist.name}")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
                        "-w", str(wheelhouse), str(sdist)], check=True)
        sdist.unlink()
    stamp.write_text(digest + "\n")
    seconds = time.monotonic() - start
    size = sum(p.stat().st_size for p in wheelhouse.glob("*.whl"))
    log(f"[wheelhouse] built in {seconds:.0f} s: {sum(1 for _ in wheelhouse.glob('*.whl'))} wheels, "
        f"{size / 2**30:.1f} GiB")
    return seconds


if __name__ == "__main__":
    ensure(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR)
