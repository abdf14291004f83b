"""A local disk that goes away is not a corpus of missing videos: a shared disk's mount lost for a while, or a node
(added by the autoscaler, say) that does not mount it. A video found missing is checked against a few of the
corpus's videos that existed when the work started (its witnesses); when none of them is there either, the decoder
waits for the disk for data.storage_retry_s, reads on when it is back, and otherwise fails the batch with
StorageUnreachable naming the node, the way a bucket that stopped answering does. Real files and real folder
renames; the first tests use no Ray, the last ones the real Ray Data decoders and `data check`."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.workflows.conftest import GOOD_VIDEOS
from workflows.data import video
from workflows.data.data_config import DataConfig
from workflows.data.pipeline import ClipSpec, decode_batch
from workflows.data.shared_disk import witness_files
from workflows.data.video import StorageUnreachable

NAMES = list(GOOD_VIDEOS)[:3]


@pytest.fixture()
def disk(tmp_path, video_dir) -> Path:
    """A folder standing for a mounted disk, holding three of the test videos."""
    root = tmp_path / "mnt"
    (root / "clips").mkdir(parents=True)
    for name in NAMES:
        shutil.copy(video_dir / "clips" / f"{name}.mp4", root / "clips" / f"{name}.mp4")
    return root


def _batch(paths: list[str]) -> dict[str, np.ndarray]:
    n = len(paths)
    return {"path": np.array(paths, object), "label": np.zeros(n, np.int64), "video_index": np.arange(n),
            "start": np.full(n, np.nan), "end": np.full(n, np.nan)}


def _spec(retry_s: float, witnesses: list[str]) -> ClipSpec:
    return ClipSpec.from_config(DataConfig(storage_retry_s=retry_s), split="eval", num_frames=4, crop_size=24,
                                witnesses=witnesses)


def _unmount_for(root: Path, seconds: float) -> threading.Thread:
    """Move the disk's folder away now and back after `seconds` (a mount lost and found again)."""
    away = root.with_name(root.name + ".away")
    root.rename(away)

    def back() -> None:
        time.sleep(seconds)
        away.rename(root)

    thread = threading.Thread(target=back, daemon=True)
    thread.start()
    return thread


def test_witnesses_are_local_files_spread_over_the_corpus(tmp_path):
    files = []
    for i in range(100):
        (tmp_path / f"{i}.mp4").write_bytes(b"x")
        files.append(str(tmp_path / f"{i}.mp4"))
    picked = witness_files(files[:40] + [str(tmp_path / "gone.mp4")] * 60 + ["s3://b/v.mp4"], count=3, tries=10)
    assert picked == [files[0], files[10], files[20]]  # spread, existing, local
    assert witness_files(["s3://b/v.mp4", str(tmp_path / "gone.mp4")]) == []


def test_a_disk_gone_for_a_while_is_waited_for_and_no_video_is_dropped(disk, monkeypatch, capsys):
    paths = [str(disk / "clips" / f"{n}.mp4") for n in NAMES]
    drops: list = []
    expected = decode_batch(_batch(paths), _spec(30, paths[:2]), lambda *a: drops.append(a))
    monkeypatch.setattr(video, "WAIT_NOTICE_S", 0.5)  # 10 s in a run
    returned = _unmount_for(disk, 1.5)
    started = time.monotonic()
    out = decode_batch(_batch(paths), _spec(30, paths[:2]), lambda *a: drops.append(a))
    returned.join()
    assert drops == [], drops
    assert time.monotonic() - started >= 1.0  # it did wait for the disk
    np.testing.assert_array_equal(out["frames"], expected["frames"])
    # said once, while it waited: a run whose steps stall says why
    assert capsys.readouterr().err.splitlines() == [
        f"note: node {video.node_address()} is waiting for the disk holding {disk / 'clips'} (not there: "
        f"{paths[0]}) (up to 30 s, data.storage_retry_s); the run goes on when it answers"]


def test_a_disk_that_stays_away_fails_the_batch_naming_the_node_and_drops_nothing(disk):
    paths = [str(disk / "clips" / f"{n}.mp4") for n in NAMES]
    drops: list = []
    returned = _unmount_for(disk, 2.5)
    try:
        with pytest.raises(StorageUnreachable, match=r"node \S+( \(Ray node id \w+\))? has not seen any of the "
                                                     r"corpus's videos there for [1-3] s .*not mounted on this node, "
                                                     r"or went away") as info:
            decode_batch(_batch(paths), _spec(1.0, paths[1:]), lambda *a: drops.append(a))
    finally:
        returned.join()
    assert paths[0] in str(info.value) and paths[1] in str(info.value)  # the video read, and a witness
    assert drops == []


def test_a_missing_video_on_a_disk_that_is_there_is_dropped_at_once(disk, monkeypatch):
    paths = [str(disk / "clips" / f"{n}.mp4") for n in NAMES]
    pauses: list[float] = []
    monkeypatch.setattr(video, "time", SimpleNamespace(monotonic=time.monotonic, sleep=pauses.append))
    drops: list = []
    gone = str(disk / "clips" / "deleted.mp4")
    out = decode_batch(_batch([gone, *paths]), _spec(30, paths), lambda *a: drops.append(a))
    assert [(d[1], d[2]) for d in drops] == [(gone, "missing")] and pauses == []
    assert sorted(set(out["video_index"].tolist())) == [1, 2, 3]
    # Without witnesses (a corpus in a bucket, or none seen where the dataset was built) nothing is waited for.
    drops.clear()
    returned = _unmount_for(disk, 0.5)
    returned.join()  # back already; the point is the call below, with no witnesses, on a disk that is there
    decode_batch(_batch([gone]), _spec(30, []), lambda *a: drops.append(a))
    assert len(drops) == 1 and pauses == []


def test_data_check_counts_a_disk_that_stays_away_as_unreachable_not_as_missing_videos(disk):
    """The doctor's batch function (what `data check`'s Ray tasks run) with the witnesses it is given."""
    from workflows.data.doctor import UNREACHABLE, _check_batch

    paths = [str(disk / "clips" / f"{n}.mp4") for n in NAMES]
    returned = _unmount_for(disk, 2.0)
    try:
        out = _check_batch(_batch(paths), 4, 1, storage_retry_s=1.0, witnesses=paths)
    finally:
        returned.join()
    assert out["reason"].tolist() == [UNREACHABLE] * 3  # the first gave up; the rest were not tried
    assert "not mounted on this node" in out["detail"][0] and out["detail"][1].startswith("not tried: ")
    assert _check_batch(_batch(paths), 4, 1, storage_retry_s=1.0, witnesses=paths)["ok"].all()  # back


def test_transcode_waits_for_the_disk_too(disk, tmp_path):
    """`data transcode`'s batch function (its Ray tasks) with the witnesses it is given: every copy made."""
    import json

    from workflows.data.transcode import _transcode_batch

    paths = [str(disk / "clips" / f"{n}.mp4") for n in NAMES]
    batch = {"path": np.array(paths, object),
             "windows": np.array([json.dumps([[np.nan, np.nan, f"{n}.mp4"]]) for n in NAMES], object)}
    returned = _unmount_for(disk, 1.5)
    try:
        out = _transcode_batch(batch, str(tmp_path / "small"), 32, 16, 23, retry_s=30, witnesses=paths)
    finally:
        returned.join()
    assert out["ok"].tolist() == [True] * 3, out["reason"]
    assert sorted(p.name for p in (tmp_path / "small" / "videos").iterdir()) == sorted(f"{n}.mp4" for n in NAMES)


@pytest.mark.integration
def test_the_ray_decoders_wait_for_the_disk(ray_local, disk):
    """Through Ray Data: the dataset's builder picks the witnesses where it runs, and the decode tasks get them. Built
    while the disk is away (a training worker builds each epoch's dataset; this is how a real run first failed,
    its epoch built in the outage), the witnesses are the videos expected there."""
    from workflows.data.drops import get_drop_report
    from workflows.data.manifest import save_labels, write_manifest
    from workflows.data.pipeline import build_clip_dataset

    # the manifest outside the lost folder, as one on the head's own disk would be
    write_manifest([{"path": str(disk / "clips" / f"{n}.mp4"), "label": "a"} for n in NAMES], disk.parent / "m.csv")
    save_labels({"a": 0}, disk.parent / "labels.json")
    for epoch, build_in_the_outage in enumerate((False, True)):
        cfg = DataConfig(batch_size=2, storage_retry_s=60, drop_counter="test-disk-gone-drops")
        args = (cfg, str(disk.parent / "m.csv"), str(disk.parent / "labels.json"))
        kwargs = dict(split="eval", num_frames=4, crop_size=24, epoch=epoch)
        ds = None if build_in_the_outage else build_clip_dataset(*args, **kwargs)
        returned = _unmount_for(disk, 2.0)
        rows = (ds or build_clip_dataset(*args, **kwargs)).take_all()
        returned.join()
        assert sorted(r["video_index"] for r in rows) == [0, 1, 2], build_in_the_outage
        assert get_drop_report("eval", epoch, name="test-disk-gone-drops").total_dropped == 0, build_in_the_outage


def test_a_training_worker_that_does_not_see_the_run_directory_stops_naming_its_node(tmp_path):
    """The run directory's marker, written where the run is started (fit_through_storage_outages): a Train worker
    on a node without the shared disk would write its checkpoint shards into its own disk, so every checkpoint
    would be partial. Its first check waits for the marker as for a lost mount, then fails naming the node."""
    import torch

    from workflows.data.shared_disk import RUN_DIR_MARKER, check_run_dir_seen, mark_run_dir
    from workflows.recipe import load_recipe
    from workflows.trainer import Trainer

    smoke = Path(__file__).parents[2] / "workflows" / "configs" / "smoke.yaml"
    recipe = load_recipe(smoke, [f"run.storage_path={tmp_path / 'runs'}", "run.name=it", "data.storage_retry_s=0.5"],
                         check_files=False)
    trainer = Trainer(recipe, rank=1, world=2, device=torch.device("cpu"))
    with pytest.raises(StorageUnreachable, match=rf"node \S+( \(Ray node id [0-9a-f]{{56}}\))? does not see the "
                                                 rf"run directory {recipe.run_dir} \(its "
                                                 rf"{RUN_DIR_MARKER}, written where the run was started, is not "
                                                 r"there\): its checkpoints would land on the node's own disk"):
        trainer.setup()
    mark_run_dir(recipe.run_dir)
    started = time.monotonic()
    check_run_dir_seen(recipe.run_dir, 30)  # there: at once
    assert time.monotonic() - started < 1
    check_run_dir_seen("s3://bucket/runs/it", 30)  # a bucket is every node's
