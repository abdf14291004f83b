"""A real node that does not see the shared disk: a raylet started in a private mount namespace of its own with an
empty tmpfs over the dataset's video folder (`unshare`, root), alive beside a head that sees it. This is what a
cluster node whose NFS mount failed, or one the autoscaler added from an image without it, looks like to Ray.

- `data check` asks each node (shared_disk.nodes_that_see), keeps its decode tasks on the head, says so, and finds
  every video good;
- `pretrain` whose decoders may use that node stops before training, naming it;
- decode tasks that do land there (a node that joined after the start's question) wait for the disk
  (data.storage_retry_s) and fail with StorageUnreachable naming the node: no video is dropped as missing.

About a minute on 2 cores: `make disk-test`, not `make test`, which covers the same code with a node that is gone
when asked (tests/workflows/test_data_cli.py) and with a folder renamed away (tests/workflows/test_disk_gone.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.ray_nodes import REPO, Cluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.environ.get("DIST_DISK_FAULTS"), reason="a node without the shared disk: make disk-test"),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                       reason="hiding a folder from one node needs root and unshare"),
]

SMOKE = REPO / "workflows" / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def blind(sample_data):
    """(cluster, the driver's environment, the blind node's id): a head with 2 CPUs that sees the sample data, and
    a node labelled dist-node=blind whose `videos/` folder is empty."""
    import ray  # noqa: F401  (the venv's, for the drivers' python)

    root = Path(tempfile.mkdtemp(prefix="bn-", dir="/tmp"))  # short: Ray's socket paths live below it
    cluster = Cluster(root)
    left: list[str] = []
    try:
        cluster.start_head("--num-cpus=2", "--labels=dist-node=head")
        cluster.add_node("--num-cpus=2", "--labels=dist-node=blind",
                         hide=Path(sample_data.train_manifest).parent / "videos")
        blind_id = next(n["node_id"] for n in cluster.alive_nodes() if n.get("labels", {}).get("dist-node") == "blind")
        env = {**cluster.cli_env(), "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs_port}", "PYTHONPATH": str(REPO)}
        yield cluster, env, blind_id
    finally:
        left = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"processes of the test cluster survived: {left}"


def _run(env: dict[str, str], *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_blind_node_really_does_not_see_the_videos(blind, sample_data):
    cluster, env, blind_id = blind
    videos = Path(sample_data.train_manifest).parent / "videos"
    probe = textwrap.dedent(f"""
        import os, ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        ray.init()
        look = ray.remote(num_cpus=0)(lambda: sorted(os.listdir({str(videos)!r})))
        print(ray.get(look.options(scheduling_strategy=NodeAffinitySchedulingStrategy({blind_id!r}, soft=False))
                      .remote()))
    """)
    done = _run(env, "-c", probe)
    assert done.returncode == 0 and done.stdout.strip().endswith("[]"), done.stdout[-2000:] + done.stderr[-2000:]
    assert os.listdir(videos), "the head sees the videos"


def test_data_check_reads_on_the_head_alone_and_finds_every_video_good(blind, sample_data):
    _, env, _ = blind
    done = _run(env, "-m", "workflows", "data", "check", "--manifest", sample_data.train_manifest, "--labels",
                sample_data.labels, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["ok"] == report["videos"] > 0 and report["dropped"] == {}, report
    assert "note: 1 of the cluster's 2 nodes do not see the videos, e.g. " in done.stderr
    assert "this node does the work alone, on its 2 CPUs" in done.stderr


def test_pretrain_whose_decoders_may_use_the_node_stops_before_training_naming_it(blind, sample_data, tmp_path):
    _, env, blind_id = blind
    done = _run(env, "-m", "workflows", "pretrain", "--config", str(SMOKE), "--set",
                f"data.train_manifest={sample_data.train_manifest}", f"data.val_manifest={sample_data.val_manifest}",
                f"data.labels={sample_data.labels}", f"run.storage_path={tmp_path / 'runs'}", "mlflow.enabled=false",
                "scaling.num_workers=1", "data.decode_node_label=dist-node=blind", cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 of the 2 nodes this run's workers and decoders may use (" in done.stderr, done.stderr[-3000:]
    assert "do not see the local paths it reads and writes (data.train_manifest's videos, e.g." in done.stderr
    assert f"or leave those nodes out: --set 'scaling.exclude_nodes=[{blind_id}]'" in done.stderr, done.stderr[-3000:]
    assert "step 1/" not in done.stdout + done.stderr


def test_decoders_that_land_on_the_node_wait_for_the_disk_and_drop_nothing(blind, sample_data):
    """What a node that joined after the start's question meets: the decode tasks sent to it (its label) find no
    video, and none of the witnesses the driver saw, so they wait data.storage_retry_s (2 s) and fail the read as
    StorageUnreachable naming the node; the drop counter stays at 0."""
    _, env, _ = blind
    script = textwrap.dedent(f"""
        import ray
        from workflows.data.data_config import DataConfig
        from workflows.data.drops import get_drop_report
        from workflows.data.pipeline import build_clip_dataset, decode_failure
        ray.init()
        cfg = DataConfig(batch_size=2, storage_retry_s=2, decode_node_label="dist-node=blind", drop_counter="blind")
        ds = build_clip_dataset(cfg, {sample_data.val_manifest!r}, {sample_data.labels!r}, split="eval",
                                num_frames=4, crop_size=32)
        try:
            ds.take_all()
            print("RESULT read everything")
        except Exception as exc:
            print("RESULT", decode_failure(exc))
        print("DROPPED", get_drop_report("eval", 0, name="blind").total_dropped)
    """)
    done = _run(env, "-c", script)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    result = next(line for line in out.splitlines() if line.startswith("RESULT "))
    assert "has not seen any of the corpus's videos there for" in result, result
    assert "the disk that holds them is not mounted on this node, or went away" in result, result
    assert "DROPPED 0" in out, out[-2000:]


def test_a_training_worker_there_would_stop_at_its_first_check_naming_the_node(blind, sample_data):
    """The Train worker's first check (shared_disk.check_run_dir_seen), run on the blind node for a run directory
    on the disk it does not see (made and marked on the head, as the run's driver does)."""
    _, env, blind_id = blind
    run_dir = Path(sample_data.train_manifest).parent / "videos" / "runs" / "it"
    script = textwrap.dedent(f"""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        from workflows.data.shared_disk import check_run_dir_seen, mark_run_dir
        ray.init()
        mark_run_dir({str(run_dir)!r})
        check = ray.remote(num_cpus=0)(check_run_dir_seen)
        try:
            ray.get(check.options(scheduling_strategy=NodeAffinitySchedulingStrategy({blind_id!r}, soft=False))
                    .remote({str(run_dir)!r}, 1.0))
            print("RESULT seen")
        except ray.exceptions.RayTaskError as exc:
            print("RESULT", str(exc).strip().splitlines()[-1])
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        ray.get(check.options(scheduling_strategy=here).remote({str(run_dir)!r}, 1.0))  # the head sees it: silent
    """)
    done = _run(env, "-c", script)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    assert f"does not see the run directory {run_dir} (its .dist-run-dir" in result, result
