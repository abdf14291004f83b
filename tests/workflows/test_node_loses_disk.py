"""A real node loses the shared disk in the middle of a real pre-training run, and the run finishes without it.

A head (which runs the Train worker and sees the sample data) and a second raylet in a mount namespace of its own
(`unshare`, root); after the run's third step an empty tmpfs is mounted over the dataset's `videos/` folder in
that namespace only (`tests/ray_nodes.Cluster.hide_later`): the second node's NFS mount is lost while it runs.
Its decode tasks wait data.storage_retry_s (2 s) and fail naming it by Ray node id; the Train worker records a
failure a restart cannot fix, so the restarted group ends at once; the driver asks the node, which still does not
see the videos, and fits the run again with it in scaling.exclude_nodes, from the newest complete checkpoint. No
video is dropped as missing.

About two minutes on 2 cores: `make disk-test`, not `make test`, which covers the same code with the real errors
and a stand-in trainer (tests/workflows/test_node_left_out.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.ray_nodes import REPO, Cluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.environ.get("DIST_DISK_FAULTS"), reason="a node that loses the disk: make disk-test"),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
                       reason="taking a folder from one node needs root, unshare and nsenter"),
]

SMOKE = REPO / "workflows" / "configs" / "smoke.yaml"


def test_a_node_that_loses_the_disk_mid_run_is_left_out_and_the_run_finishes(sample_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the raylets', so their workers import this repository
    root = Path(tempfile.mkdtemp(prefix="nl-", dir="/tmp"))  # short: Ray's socket paths live below it
    cluster = Cluster(root)
    left: list[str] = []
    lines: list[str] = []
    try:
        cluster.start_head("--num-cpus=2", "--labels=dist-node=head")
        cluster.add_node("--num-cpus=2", "--labels=dist-node=other", own_mounts=True)
        other = next(n["node_id"] for n in cluster.alive_nodes() if n.get("labels", {}).get("dist-node") == "other")
        env = {**cluster.cli_env(), "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs_port}", "PYTHONPATH": str(REPO)}
        videos = Path(sample_data.train_manifest).parent / "videos"
        run = subprocess.Popen(
            [sys.executable, "-m", "workflows", "pretrain", "--config", str(SMOKE), "--set",
             f"data.train_manifest={sample_data.train_manifest}", f"data.val_manifest={sample_data.val_manifest}",
             f"data.labels={sample_data.labels}", f"run.storage_path={tmp_path / 'runs'}", "mlflow.enabled=false",
             "scaling.num_workers=1", "scaling.worker_node_label=dist-node=head", "data.decode_node_label=any",
             "data.storage_retry_s=2", "train.max_steps=15", "run.max_failures=2"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        reader = threading.Thread(target=lambda: lines.extend(run.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 300
        while not any("step 3/" in line for line in lines):
            assert run.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
            time.sleep(0.2)
        cluster.hide_later(1, videos)  # the other node's mount is lost; the head's stays
        assert run.wait(timeout=600) == 0, "".join(lines)[-6000:]
        reader.join(timeout=10)
    finally:
        left = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"processes of the test cluster survived: {left}"
    out = "".join(lines)
    assert f"(Ray node id {other}) has not seen any of the corpus's videos there for" in out, out[-6000:]
    assert (f"(Ray node id {other}) does not see the shared disk, which this node sees (its decoders or Train "
            f"worker waited data.storage_retry_s for it): leaving it out of this run (scaling.exclude_nodes)") in out, \
        out[-6000:]
    assert "(the driver leaves that node out or waits for the disk)" in out, out[-6000:]
    assert "finished: step 15" in out and "dropped videos" not in out, out[-6000:]
    assert f"(Ray node id {other}) left out: it does not see the shared disk); resuming at step" in out, out[-6000:]
