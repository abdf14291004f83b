"""The clip dataset through the real Ray Data pipeline, on real mp4 files written by the tests."""

from __future__ import annotations

import numpy as np
import pytest

from tests.workflows.conftest import GOOD_VIDEOS, frame_ids, is_mirrored
from workflows.data.data_config import DataConfig
from workflows.data.drops import get_drop_report
from workflows.data.pipeline import build_clip_dataset
from workflows.data.sampling import segment_indices

pytestmark = pytest.mark.integration

T, S = 8, 32
FRAMES = [n for (_, _, _, n) in GOOD_VIDEOS.values()]


def _rows(ds) -> list[dict]:
    return sorted(ds.take_all(), key=lambda r: (r["video_index"], r["view"], r["crop"]))


def test_eval_clips_shapes_and_multiview_indices(ray_local, video_dir) -> None:
    cfg = DataConfig(batch_size=2, drop_counter="test-eval-drops")
    ds = build_clip_dataset(cfg, str(video_dir / "good.csv"), str(video_dir / "labels.json"), split="eval",
                            num_frames=T, crop_size=S, num_views=3, num_crops=3)
    rows = _rows(ds)
    assert len(rows) == len(GOOD_VIDEOS) * 3 * 3
    for r in rows:
        assert r["frames"].shape == (T, S, S, 3) and r["frames"].dtype == np.uint8
        assert r["label"] == r["video_index"]  # good.csv labels video i as cls<i> = index i
        expected = segment_indices(0, FRAMES[r["video_index"]], T, mode="eval", view=r["view"], num_views=3)
        np.testing.assert_array_equal(frame_ids(r["frames"]), expected)
        assert not r["flipped"] and not is_mirrored(r["frames"])
    assert get_drop_report("eval", 0, name="test-eval-drops").total_dropped == 0


def test_train_clips_are_segment_sampled_seeded_and_flip_swaps_labels(ray_local, video_dir) -> None:
    cfg = DataConfig(batch_size=2, grayscale_p=0.0, flip="swap_labels", flip_pairs=[[0, 1], [2, 3]],
                     drop_counter="test-train-drops")
    swap = {0: 1, 1: 0, 2: 3, 3: 2, 4: 4}

    def run(seed: int, epoch: int) -> list[dict]:
        ds = build_clip_dataset(cfg, str(video_dir / "good.csv"), str(video_dir / "labels.json"), split="train",
                                num_frames=T, crop_size=S, num_views=4, seed=seed, epoch=epoch)
        return _rows(ds)

    rows = run(seed=3, epoch=0)
    assert len(rows) == len(GOOD_VIDEOS) * 4
    for r in rows:
        assert r["frames"].shape == (T, S, S, 3) and r["frames"].dtype == np.uint8
        n = FRAMES[r["video_index"]]
        edges = np.linspace(0, n, T + 1)
        ids = frame_ids(r["frames"])
        assert np.all(ids >= np.floor(edges[:-1])) and np.all(ids <= np.minimum(np.ceil(edges[1:]), n - 1)), ids
        assert r["flipped"] == is_mirrored(r["frames"])  # the flag tells the truth
        original = r["video_index"]
        assert r["label"] == (swap[original] if r["flipped"] else original)
    assert {r["flipped"] for r in rows} == {True, False}  # 20 clips at p = 0.5 (fixed seed): both happen
    again = run(seed=3, epoch=0)
    for a, b in zip(rows, again, strict=True):
        np.testing.assert_array_equal(a["frames"], b["frames"])
        assert a["label"] == b["label"]
    other = run(seed=3, epoch=1)
    assert any(not np.array_equal(a["frames"], b["frames"]) for a, b in zip(rows, other, strict=True))


def test_bad_videos_are_dropped_counted_and_named(ray_local, video_dir) -> None:
    cfg = DataConfig(batch_size=2, max_bad_fraction=0.5, drop_counter="test-bad-drops")
    ds = build_clip_dataset(cfg, str(video_dir / "bad.csv"), str(video_dir / "labels.json"), split="eval",
                            num_frames=T, crop_size=S)
    rows = _rows(ds)
    assert [r["video_index"] for r in rows] == list(range(len(GOOD_VIDEOS)))  # every good video came through
    report = get_drop_report("eval", 0, name="test-bad-drops")
    assert report.videos == len(GOOD_VIDEOS) + 4
    assert report.dropped == {"missing": 1, "empty": 1, "truncated": 1, "corrupt": 1}
    names = {reason: [p.rsplit("/", 1)[-1] for p in paths] for reason, paths in report.examples.items()}
    assert names == {"missing": ["missing.mp4"], "empty": ["empty.mp4"], "truncated": ["truncated.mp4"],
                     "corrupt": ["random.mp4"]}


def test_too_many_bad_videos_stop_with_examples(ray_local, video_dir) -> None:
    cfg = DataConfig(batch_size=2, max_bad_fraction=0.2, drop_counter="test-limit-drops")
    ds = build_clip_dataset(cfg, str(video_dir / "bad.csv"), str(video_dir / "labels.json"), split="train",
                            num_frames=T, crop_size=S)
    with pytest.raises(Exception, match="max_bad_fraction=0.2") as info:
        ds.take_all()
    assert any(name in str(info.value) for name in ("missing.mp4", "empty.mp4", "truncated.mp4", "random.mp4"))


def test_decoders_follow_node_labels(ray_local, video_dir) -> None:
    from workflows.data.decode_nodes import decode_cpus, decode_pool_size

    node_id = ray_local.get_runtime_context().get_node_id()
    total = ray_local.cluster_resources()["CPU"]
    assert decode_cpus() == total and decode_cpus({"ray.io/node-id": node_id}) == total
    assert decode_cpus({"dist-role": "decode"}) == 0
    assert decode_pool_size(DataConfig(decode_threads=2)) == int(total // 2)
    assert decode_pool_size(DataConfig(decode_actors=3)) == 3
    with pytest.raises(RuntimeError, match="dist-role"):
        build_clip_dataset(DataConfig(decode_node_label="dist-role=decode"), str(video_dir / "good.csv"),
                           str(video_dir / "labels.json"), split="eval", num_frames=T, crop_size=S)
    # A selector that matches (Ray's default node-id label) really places the decoders.
    cfg = DataConfig(decode_node_label=f"ray.io/node-id={node_id}", drop_counter="test-label-drops")
    ds = build_clip_dataset(cfg, str(video_dir / "good.csv"), str(video_dir / "labels.json"), split="eval",
                            num_frames=4, crop_size=S)
    assert len(ds.take_all()) == len(GOOD_VIDEOS)


def test_decode_tasks_are_a_few_calls_each_and_start_no_actor(ray_local, video_dir) -> None:
    """Decoders are Ray tasks, whose worker processes Ray keeps between a run's many executions (one per epoch and
    per validation), not an actor pool started anew for each; a task takes up to BATCHES_PER_TASK calls' videos
    while every decoder of the pool still gets a block."""
    from ray.util.state import list_actors

    from workflows.data.pipeline import BATCHES_PER_TASK, decode_block_rows

    assert decode_block_rows(10_000, 4, 8) == 4 * BATCHES_PER_TASK  # large: the most per task
    assert decode_block_rows(8, 4, 2) == 4  # a small shard: one call each, both decoders busy
    assert decode_block_rows(20, 4, 2) == 10  # between: as many blocks as decoders
    assert decode_block_rows(3, 4, 8) == 4  # never under one call

    gcs = ray_local.get_runtime_context().gcs_address  # this session's cluster (others may run on the machine)
    before = {a.actor_id for a in list_actors(address=gcs, limit=10_000)}
    cfg = DataConfig(batch_size=2, drop_counter="test-task-drops")
    for _ in range(2):
        ds = build_clip_dataset(cfg, str(video_dir / "good.csv"), str(video_dir / "labels.json"), split="eval",
                                num_frames=4, crop_size=S)
        assert len(ds.take_all()) == len(GOOD_VIDEOS)
    started = [a.class_name for a in list_actors(address=gcs, limit=10_000) if a.actor_id not in before]
    assert not [name for name in started if "MapWorker" in name], started


def test_the_decoders_own_errors_come_out_of_rays_wrapping(ray_local):
    """A decoder's TooManyBadVideos (raised while handling the BadVideo that tipped it) or StorageUnreachable
    reaches the driver as RayTaskError(UserCodeException), its chain only text; `decode_failure` gives the driver the
    error itself to say in one line (evaluate does), and None for anything else."""
    from workflows.data.drops import TooManyBadVideos
    from workflows.data.pipeline import decode_failure
    from workflows.data.video import BadVideo, StorageUnreachable

    too_many = "3 of 4 train videos are unusable, more than max_bad_fraction=0.05: {'corrupt': 3}. Examples: a.mp4"
    unreachable = "cannot read s3://b/v.mp4: its storage did not answer for 120 s (reset); check the bucket"

    def tipped(batch):
        try:
            raise BadVideo("corrupt", "moov atom not found")
        except BadVideo:
            raise TooManyBadVideos(too_many)  # noqa: B904 - as decode_clips raises it

    def gone(batch):
        raise StorageUnreachable(unreachable)

    def other(batch):
        raise KeyError("not a decode failure")

    found = {}
    for udf in (tipped, gone, other):
        with pytest.raises(Exception) as info:  # noqa: PT011 - Ray's wrapping is what is under test
            ray_local.data.range(2).map_batches(udf).materialize()
        found[udf.__name__] = decode_failure(info.value)
    assert isinstance(found["tipped"], TooManyBadVideos) and str(found["tipped"]) == too_many
    assert isinstance(found["gone"], StorageUnreachable) and str(found["gone"]) == unreachable
    assert found["other"] is None
