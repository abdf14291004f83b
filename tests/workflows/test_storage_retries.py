"""A video in a bucket is read from a real S3 API (moto's server on loopback) through a proxy that takes the endpoint
away: a storage outage shorter than STORAGE_RETRY_S is waited out and the video decodes as if nothing happened; a
longer one fails with StorageUnreachable, never a BadVideo (a good video must not be dropped as "missing" or
"corrupt" because the network went away), and the decoders' batch function lets it through (the batch fails
instead of shrinking). A remote video is fetched once per read, not once to probe and again to decode. These tests
use no Ray: the decoders call exactly this.

The last test [integration] runs the whole path with real parts: the `pretrain` CLI (a Ray node of the test's own,
started with the credentials; 2 Train workers, 4 steps) on the sample dataset in the bucket, its run directory
local. After every rank has written the step-2 checkpoint the endpoint goes away until the run reports it
unreachable: a decoder's read gives up with StorageUnreachable after data.storage_retry_s (3 s here, from the
recipe) and the SDK's own retries, the Ray Data execution and so the Train worker group fail, Ray Train restarts the
group (run.max_failures), and the new group resumes from the step-2 checkpoint (state.json resumed_from_step 2) with
the endpoint back and finishes, no video dropped (the run's drop report and every validation's video count). About
1.5 minutes on an idle 2-core machine; the run's output is kept in the test's tmp_path (pretrain.log)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.ray_nodes import MARKER, REPO, Cluster
from tests.workflows.conftest import GOOD_VIDEOS
from tests.workflows.object_store import FaultyProxy, Reaper, proxied_bucket
from workflows.data import video
from workflows.data.data_config import DataConfig
from workflows.data.pipeline import ClipSpec, decode_batch
from workflows.data.sampling import segment_indices
from workflows.data.video import BadVideo, StorageUnreachable, read_frames

BUCKET = "videos"


@pytest.fixture(scope="module")
def bucket(tmp_path_factory, video_dir):
    """moto behind the faulty proxy, a bucket holding one good video: (proxy, its s3:// URI, the credentials)."""
    with proxied_bucket(tmp_path_factory.mktemp("s3"), BUCKET) as (proxy, creds, client):
        name = next(iter(GOOD_VIDEOS))
        body = (video_dir / "clips" / f"{name}.mp4").read_bytes()
        client.put_object(Bucket=BUCKET, Key=f"clips/{name}.mp4", Body=body)
        yield proxy, f"s3://{BUCKET}/clips/{name}.mp4", creds


def _read(uri: str) -> np.ndarray:
    def choose(first: int, last: int, fps: float) -> np.ndarray:
        return segment_indices(first, last, 4, mode="test", view=0, num_views=1, rng=np.random.default_rng(0))

    return read_frames(uri, choose).frames


def _gets(proxy: FaultyProxy, uri: str) -> int:
    key = uri.removeprefix(f"s3://{BUCKET}")
    return sum(1 for _, method, path in proxy.requests if method == "GET" and path.split("?")[0].endswith(key))


def test_an_outage_is_waited_out_and_a_longer_one_is_not_a_bad_video(bucket, monkeypatch, capsys):
    proxy, uri, creds = bucket
    for name, value in creds.env().items():
        monkeypatch.setenv(name, value)
    before = _gets(proxy, uri)
    frames = _read(uri)
    assert _gets(proxy, uri) - before == 1, "fetched once: the probe's bytes are the decoder's"

    # The endpoint goes away for 15 s just before the read, longer than the S3 SDK's own retries (~6 s here): the
    # read waits it out and decodes the same frames.
    resets = proxy.resets
    capsys.readouterr()
    proxy.outage(15)
    assert np.array_equal(_read(uri), frames)
    assert proxy.resets > resets, "the outage never reset a connection: nothing was retried"
    # past video.WAIT_NOTICE_S (10 s) the read says once what it waits for: a run whose steps stall says why
    waiting = [line for line in capsys.readouterr().err.splitlines() if " is waiting for " in line]
    assert len(waiting) == 1 and waiting[0].startswith("note: node ") and \
        f"is waiting for the storage of {uri} to answer (" in waiting[0], waiting

    # Longer than the retry budget: the storage's problem, said as such, never a dropped video. The decoders'
    # batch function (what Ray Data runs) lets it through, so the batch fails instead of shrinking.
    # The decoders take the budget from the recipe (data.storage_retry_s, through ClipSpec): 2 s here while the
    # module default stays 120 s, so a budget that did not reach the read would wait the outage out instead.
    proxy.outage(60)
    drops: list = []
    batch = {"path": np.array([uri], object), "label": np.array([0]), "video_index": np.array([0]),
             "start": np.array([np.nan]), "end": np.array([np.nan])}
    spec = ClipSpec.from_config(DataConfig(storage_retry_s=2.0), split="eval", num_frames=4, crop_size=24)
    try:
        with pytest.raises(StorageUnreachable, match=r"did not answer for [2-9] s"):
            decode_batch(batch, spec, lambda *args: drops.append(args))
        monkeypatch.setattr(video, "STORAGE_RETRY_S", 2.0)  # what `data check` and `predict` wait
        with pytest.raises(StorageUnreachable, match=rf"cannot read {uri}: its storage did not answer for \d+ s "
                                                     r"\(.*\); check the bucket and key, and set AWS_ENDPOINT_URL"):
            _read(uri)
    finally:
        proxy.outage(0)  # back at once for the next test
    assert drops == []
    assert not issubclass(StorageUnreachable, BadVideo) and issubclass(StorageUnreachable, OSError)


def test_a_missing_object_is_still_missing_at_once(bucket, monkeypatch):
    """pyarrow reports a missing object as NotFound, not an OSError: dropped as missing, without a single retry."""
    proxy, uri, creds = bucket
    for name, value in creds.env().items():
        monkeypatch.setenv(name, value)
    pauses: list[float] = []
    monkeypatch.setattr(video, "time", SimpleNamespace(monotonic=time.monotonic, sleep=pauses.append))
    with pytest.raises(BadVideo) as info:
        _read(uri.replace(".mp4", "_gone.mp4"))
    assert info.value.reason == "missing" and pauses == []


# ---------------------------------------------------------------------------------------------------------------
# the whole path: a real pretrain run whose videos are in the bucket


SAMPLE = f"s3://{BUCKET}/datasets/sample"
SMOKE = Path(__file__).parents[2] / "workflows" / "configs" / "smoke.yaml"
RETRY_S = 3  # data.storage_retry_s of the run: far below the module default, so the budget must reach the actors
OUTAGE_MAX_S = 90  # the endpoint comes back once the run says it is unreachable, at the latest after this
RUN_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def sample_in_bucket(bucket, tmp_path_factory):
    """The sample dataset as test_pretrain writes it (16 training and 8 validation videos of 8 classes) copied into
    the bucket below SAMPLE, as `data upload` copies a folder: its manifests' relative paths resolve there."""
    from workflows.data.sample import write_sample_dataset

    proxy, _, creds = bucket
    local = tmp_path_factory.mktemp("sample")
    info = write_sample_dataset(local, videos_per_class=3, size=48, num_frames=24, seed=1, workers=1)
    client = creds.client()
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.put_object(Bucket=BUCKET, Key=f"datasets/sample/{path.relative_to(local).as_posix()}",
                          Body=path.read_bytes())
    return info


def _val_gets(proxy: FaultyProxy, before: float) -> int:
    """GET requests for the sample's validation videos forwarded before monotonic time `before`."""
    return sum(1 for t, method, path in proxy.requests
               if t < before and method == "GET" and re.search(r"/datasets/sample/videos/[^/?]+/val_", path))


@pytest.mark.integration
def test_an_outage_longer_than_the_retry_budget_restarts_the_run_from_its_newest_complete_checkpoint(
        bucket, sample_in_bucket, tmp_path):
    """`pretrain` (the CLI, 2 workers, 4 steps, a validation and a checkpoint every 2 steps) on videos in the bucket,
    its run directory local. Once every rank has written the step-2 checkpoint, the endpoint goes away until the run
    reports it unreachable: a read of the step-4 validation gives up after the SDK's retries and
    data.storage_retry_s with StorageUnreachable, which fails the batch, the Ray Data execution and the worker
    group; Ray Train (run.max_failures=2) starts a new group, which resumes from the step-2 checkpoint with the
    endpoint back, reads the bucket again and finishes. No video was dropped on the way.

    When the endpoint goes away: the clips of steps 3 and 4 were decoded ahead, before the step-2 checkpoint, and
    those steps take ~0.1 s here, so an outage started when a watcher sees the checkpoint complete raced the
    step-4 validation's reads (eval.cache_val_clips=false makes it read the val videos again). Instead the proxy
    cuts the first val-video GET after the step-2 validation's (one GET per video): that read comes after
    `ray.train.report` of the step-2 checkpoint returned, a barrier of all ranks. The test checks that
    newest_complete_checkpoint then was the step-2 checkpoint, every file of it written before the cut."""
    from workflows.checkpoints import newest_complete_checkpoint

    proxy, _, creds = bucket
    runs = tmp_path / "runs"
    root = Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))  # short: Ray's socket paths live below it
    reaper = Reaper(root, MARKER)  # ends the node and the driver should this process die without the finally below
    # A Ray node of the test's own, started with the credentials (its workers inherit them, as on a cluster whose
    # start commands export them), never another Ray on the machine: every process of it has RAY_ADDRESS set to it.
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="rc-", dir=root)),
                      env={**creds.env(), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"})
    reaper.add(tag=cluster.tag)
    lines: list[str] = []
    outage: dict = {}
    done = threading.Event()
    driver = reader = None
    started = time.monotonic()

    def watch_the_outage() -> None:
        """Where the run stood when the endpoint went away; the endpoint back once the run reports it unreachable."""
        while not done.is_set() and proxy.cut is None:
            time.sleep(0.02)
        if proxy.cut is None:
            return
        found = newest_complete_checkpoint(str(runs / "it"))
        outage.update(down=proxy.cut[0], wall=time.time() - (time.monotonic() - proxy.cut[0]), resets=proxy.resets)
        if found:
            outage.update(step=found[2], written=max(p.stat().st_mtime for p in Path(found[1]).rglob("*")
                                                     if p.is_file()))
        while not done.is_set() and proxy.down and not any("StorageUnreachable" in line for line in lines):
            time.sleep(0.1)
        outage["reported"] = any("StorageUnreachable" in line for line in lines)
        proxy.outage(0)
        outage["up"] = time.monotonic()

    watcher = threading.Thread(target=watch_the_outage, daemon=True)
    try:
        cluster.start_head("--num-cpus=4")  # 2 Train workers and 2 decoders, as the CLI's own Ray would have
        sets = [f"data.train_manifest={SAMPLE}/train.csv", f"data.val_manifest={SAMPLE}/val.csv",
                f"data.labels={SAMPLE}/labels.json", f"run.storage_path={runs}", "run.name=it", "train.max_steps=4",
                # 16 videos x 2 views / global batch 8 = 4 steps per epoch: step 2 lies inside epoch 0
                "eval.every_steps=2", "data.train_views=2", "eval.cache_val_clips=false", "run.max_failures=2",
                f"data.storage_retry_s={RETRY_S}", "mlflow.enabled=false"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
        env.update(creds.env(), PYTHONPATH=str(REPO), RAY_ADDRESS=f"127.0.0.1:{cluster.gcs_port}",
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(cluster.token_file), RAY_DEDUP_LOGS="0",
                   RAY_USAGE_STATS_ENABLED="0", **{MARKER: cluster.tag})
        proxy.cut = None
        proxy.arm(r"/datasets/sample/videos/[^/?]+/val_", OUTAGE_MAX_S, method="GET",
                  let_through=sample_in_bucket.val_videos)  # the step-2 validation's GETs pass, the next is cut
        driver = subprocess.Popen([sys.executable, "-m", "workflows", "pretrain", "--config", str(SMOKE),
                                   *[a for s in sets for a in ("--set", s)]], cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        reader = threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True)
        reader.start()
        watcher.start()
        driver.wait(timeout=RUN_TIMEOUT_S)
        reader.join(timeout=30)
    finally:
        done.set()
        proxy.arm("^$", 0)  # disarmed (matches nothing)
        proxy.outage(0)  # back for whatever runs next
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        left = cluster.stop()  # the node and every process with its marker: the driver too
        reaper.stop()
        shutil.rmtree(root, ignore_errors=True)
        console = "".join(lines)
        (tmp_path / "pretrain.log").write_text(console)  # kept in pytest's basetemp for reading a failure
    print(f"\nstorage outage: {outage.get('up', 0) - outage.get('down', 0):.1f} s; the test "
          f"{time.monotonic() - started:.0f} s")
    tail = console[-8000:]
    assert not left, f"processes of the test's Ray node survived: {left}"
    assert driver.returncode == 0, tail

    # The endpoint went away after every rank had written the step-2 checkpoint, and came back once a read had
    # given up: the run said so, not the outage's cap.
    assert outage.get("step") == 2, (outage, tail)
    assert outage["written"] < outage["wall"], outage
    assert _val_gets(proxy, outage["down"]) - _val_gets(proxy, started) == sample_in_bucket.val_videos
    assert outage.get("reported"), f"the run never said StorageUnreachable in {OUTAGE_MAX_S} s: {tail}"
    assert outage["up"] - outage["down"] > RETRY_S and proxy.resets > outage["resets"]
    # The decoder's read gave up with StorageUnreachable (after data.storage_retry_s, not the module's 120 s),
    # which failed the Ray Data execution and the training function of a Train worker.
    failure = re.search(r"workflows\.data\.video\.StorageUnreachable: cannot read (s3://\S+): its storage did not "
                        r"answer for (\d+) s", console)
    assert failure, tail
    assert failure[1].startswith(f"{SAMPLE}/videos/") and int(failure[2]) < 60, failure[0]
    assert "Error in training function" in console and 'operator "MapBatches(decode_clips)"' in console, tail
    # Ray Train started a new worker group once (FailureConfig), not the driver a new run (its relaunch after a
    # controller failure), and the new group resumed from the checkpoint the outage came after, read the videos
    # from the bucket again and finished.
    assert console.count("[pretrain] worker rank 0/2 on node") == 2, tail
    assert console.count("[pretrain] resumed from step 2 (epoch 0, step 2 of it") == 1, tail
    # The restart line names the root cause the failing rank recorded (Ray carries it only as text). Once in CI a
    # rank's validation pipeline ended without its videos and without the decoders' error (not reproduced in 12 runs
    # here): that rank now stops with IncompleteValidation, which may be the first recorded cause.
    assert re.search(rf"restart: 2 -> 2 workers \(rank [01] failed: (StorageUnreachable: cannot read {SAMPLE}/videos/"
                     r"\S+: its storage did not answer for \d+ s .*|IncompleteValidation: rank [01]'s validation data "
                     r"ended before .*)\); resuming at step 2", console), tail
    assert "the Train controller could not write to" not in console and "relaunching the run" not in console
    assert _val_gets(proxy, time.monotonic()) - _val_gets(proxy, outage["up"]) >= sample_in_bucket.val_videos
    _, newest, step = newest_complete_checkpoint(str(runs / "it"))
    state = json.loads((Path(newest) / "state.json").read_text())
    assert step == 4 and state["final"] is True, state
    assert state["resumed_from_step"] == outage["step"], state
    assert re.search(r"^\[pretrain\] finished: step 4, .*checkpoint: .*/runs/it/checkpoint_", console, re.M), tail
    # No video dropped: every validation scored every val video, the run's drop report (of the training split,
    # printed at the end when any was dropped; the driver's DropCounter outlives the worker groups) is absent, and so
    # is the bad-fraction stop that drops "missing" or "corrupt" would have led to.
    validations = re.findall(r"\[pretrain\] validation at step (\d+): .*\((\d+) videos;", console)
    videos = str(sample_in_bucket.val_videos)
    digest = "\n".join(line[-300:] for line in console.splitlines()
                        if "[pretrain]" in line or "Error" in line or "StorageUnreachable" in line)
    assert validations == [("2", videos), ("4", videos)], f"{validations}\n{digest[-6000:]}"
    assert "dropped videos:" not in console and "TooManyBadVideos" not in console and "are unusable" not in console
