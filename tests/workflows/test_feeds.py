"""Training feeds on a corpus with bad files: every rank yields its micro-batches while any video decodes.

Real mp4 files (tests/workflows/conftest.py) and real Ray Data pipelines; the bad files (missing, empty, truncated,
random bytes) are placed on chosen ranks through the epoch's seeded order."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from workflows.checkpoints import read_state
from workflows.data.manifest import load_manifest, write_manifest
from workflows.elastic import legacy_consumed
from workflows.feeds import ClipFeeds
from workflows.recipe import load_recipe

SMOKE = Path(__file__).parents[2] / "workflows" / "configs" / "smoke.yaml"
GOOD = ["wide", "tall", "mid", "big", "narrow"]
BAD = ["missing", "empty", "truncated", "random"]
SEED = 0


def _manifest(video_dir: Path, out: Path, rows: int, bad_on_rank1: list[int], world: int = 2) -> tuple[Path, set]:
    """A manifest of `rows` videos whose rank-1 shard (of epoch 0's seeded order) has bad files at the given shard
    positions; every other row is a good video. Returns the manifest and the video indices of the bad rows."""
    perm = np.random.default_rng([SEED, 0]).permutation(rows)  # build_clip_dataset's epoch-0 order
    shard1 = perm[1::world]
    bad_rows = {int(shard1[i]) for i in bad_on_rank1}
    table, good_i, bad_i = [], 0, 0
    for row in range(rows):
        if row in bad_rows:
            name, label = BAD[bad_i % len(BAD)], "cls0"
            bad_i += 1
        else:
            name = GOOD[good_i % len(GOOD)]
            label = f"cls{GOOD.index(name)}"
            good_i += 1
        table.append({"path": str(video_dir / "clips" / f"{name}.mp4"), "label": label})
    path = out / "train.csv"
    write_manifest(table, path)
    return path, bad_rows


@pytest.fixture
def counters(ray_local):
    """Holds the named drop counters a test's feeds use, as the pretrain driver does (an unowned one dies)."""
    from workflows.data.drops import drop_counter

    held: dict = {}

    def hold(name: str) -> str:
        held.setdefault(name, drop_counter(name))
        return name

    yield hold
    for actor in held.values():
        ray_local.kill(actor)


def _feeds(video_dir: Path, manifest: Path, rank: int, counter: str, *overrides: str) -> ClipFeeds:
    """Rank `rank` of 2's feeds over `manifest`; `counter` names a drop counter the test holds (see `counters`)."""
    recipe = load_recipe(SMOKE, [
        f"data.train_manifest={manifest}", f"data.val_manifest={video_dir / 'good.csv'}",
        f"data.labels={video_dir / 'labels.json'}", "scaling.num_workers=2", "data.max_bad_fraction=0.5",
        f"data.drop_counter={counter}", f"train.seed={SEED}", "data.decode_actors=2", *overrides])
    return ClipFeeds(recipe, rank, 2, torch.device("cpu"))


def _shard(feeds: ClipFeeds, rank: int) -> set[int]:
    perm = np.random.default_rng([SEED, 0]).permutation(len(feeds.train_manifest))
    return {int(i) for i in perm[rank::2]}


@pytest.mark.integration
def test_a_shard_with_fewer_good_clips_than_one_micro_batch_still_yields_its_batch(counters, video_dir, tmp_path):
    # 12 videos, 4 bad, all on rank 1: its shard has 2 good clips for a micro-batch of 4 (the case).
    manifest, bad = _manifest(video_dir, tmp_path, rows=12, bad_on_rank1=[0, 1, 2, 3])
    overrides = ("train.micro_batch_size=4", "train.global_batch_size=8", "data.train_views=1")
    for rank in (0, 1):
        feeds = _feeds(video_dir, manifest, rank, counters("feeds-short"), *overrides)
        batches = list(feeds.train_batches(epoch=0))
        assert len(batches) == feeds.steps_per_epoch() * feeds.plan.accum == 1
        assert all(len(b["label"]) == 4 and b["frames"].dtype == torch.uint8 for b in batches)
        seen = {int(v) for b in batches for v in b["video_index"]}
        assert seen <= _shard(feeds, rank) - bad, "top-up clips come from the rank's own good videos"


@pytest.mark.integration
def test_a_rank_whose_whole_shard_is_bad_borrows_good_clips(counters, video_dir, tmp_path):
    manifest, bad = _manifest(video_dir, tmp_path, rows=8, bad_on_rank1=[0, 1, 2, 3])
    feeds = _feeds(video_dir, manifest, 1, counters("feeds-all-bad"), "train.micro_batch_size=2",
                   "train.global_batch_size=4", "data.train_views=1")
    assert _shard(feeds, 1) == bad  # every video of rank 1's shard is bad
    batches = list(feeds.train_batches(epoch=0))
    assert len(batches) == feeds.steps_per_epoch() * feeds.plan.accum == 2
    seen = {int(v) for b in batches for v in b["video_index"]}
    assert seen and not seen & bad


@pytest.mark.integration
def test_resume_inside_the_top_up(counters, video_dir, tmp_path):
    # Rank 1: 2 good videos x 2 views = 4 clips = 2 micro-batches of its 6; the top-up gives the rest. Resuming at
    # step 4 (one micro-batch per step), each rank has trained on 4 of its 6 videos: rank 1's last two are bad, so
    # only the top-up can continue.
    manifest, bad = _manifest(video_dir, tmp_path, rows=12, bad_on_rank1=[1, 2, 4, 5])
    feeds = _feeds(video_dir, manifest, 1, counters("feeds-resume"), "train.micro_batch_size=2",
                   "train.global_batch_size=4", "data.train_views=2")
    assert (feeds.steps_per_epoch(), feeds.plan.accum) == (6, 1)
    consumed = legacy_consumed(12, SEED, 0, world=2, skipped_per_rank=4, views=2)  # rank r read shard r's first 4
    batches = list(feeds.train_batches(epoch=0, steps=2, consumed=consumed))
    assert len(batches) == 2 and all(len(b["label"]) == 2 for b in batches)
    assert {int(v) for b in batches for v in b["video_index"]} <= _shard(feeds, 1) - bad


@pytest.mark.integration
def test_an_epoch_where_no_video_decodes_fails_clearly(counters, video_dir, tmp_path):
    rows = [{"path": str(video_dir / "clips" / f"{name}.mp4"), "label": "cls0"} for name in BAD]
    write_manifest(rows, tmp_path / "all_bad.csv")
    feeds = _feeds(video_dir, tmp_path / "all_bad.csv", 0, counters("feeds-none"), "train.micro_batch_size=1",
                   "train.global_batch_size=2", "data.train_views=1", "data.max_bad_fraction=1.0")
    with pytest.raises(RuntimeError, match="no video of the training set decodes in epoch 0"):
        list(feeds.train_batches(epoch=0))


def _bad_corpus_run(video_dir: Path, tmp_path: Path, max_bad_fraction: float, name: str, max_failures: int = 0,
                    val_manifest: Path | None = None, *extra: str):
    """A 2-step smoke run on 12 clips whose 4 bad ones (missing, empty, truncated, random bytes) all land on rank 1."""
    manifest, _ = _manifest(video_dir, tmp_path, rows=12, bad_on_rank1=[0, 1, 2, 3])
    return load_recipe(SMOKE, [
        f"data.train_manifest={manifest}", f"data.val_manifest={val_manifest or video_dir / 'good.csv'}",
        f"data.labels={video_dir / 'labels.json'}", "scaling.num_workers=2",
        f"data.max_bad_fraction={max_bad_fraction}", "data.flip=plain",  # (the smoke recipe's pairs: the sample's)
        f"train.seed={SEED}", "train.micro_batch_size=4", "train.global_batch_size=8", "data.train_views=1",
        "train.max_steps=2", "eval.every_steps=2", f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}",
        "mlflow.enabled=false", f"run.max_failures={max_failures}", *extra])


@pytest.mark.integration
def test_pretrain_runs_on_a_corpus_whose_bad_files_all_land_on_one_worker(counters, video_dir, tmp_path, capfd):
    """The reported case: 12 clips, 4 bad (missing, empty, truncated, random bytes), 2 workers, micro-batch 4,
    max_bad_fraction 0.5. `data check` counted 8 ok / 4 dropped, but every attempt of `pretrain` failed on rank 1.
    Its validation set is clips of files (each good video whole and its first 0.3 s): the two ranks' rows are
    also scored per file, summed over the ranks, and the checkpoints are ranked by the files' top-1."""
    from workflows.pretrain import run_pretrain

    whole = load_manifest(str(video_dir / "good.csv"), None)
    rows = [{"path": path, "label": label, **window} for path, label in
            zip(whole.table.column("path").to_pylist(), whole.table.column("label_name").to_pylist(), strict=True)
            for window in ({}, {"start": 0.0, "end": 0.3})]
    write_manifest(rows, tmp_path / "val_clips.csv")
    result = run_pretrain(_bad_corpus_run(video_dir, tmp_path, 0.5, "bad-corpus", 0, tmp_path / "val_clips.csv",
                                          "eval.best_metric=val_file_top1"))
    assert result.metrics["step"] == 2 and result.error is None
    files_top1 = result.metrics["val_file_top1"]
    assert 0 <= files_top1 <= 100 and "val_file_mean_class_acc" in result.metrics
    console = "".join(capfd.readouterr())
    # 9 of the 10 rows: narrow.mp4's first 0.3 s is 3 frames at 10 fps, under data.min_frames (dropped as too
    # short); its whole row still scores that file.
    assert re.search(rf"validation at step 2: .*\(9 videos; per file top-1 {files_top1:.2f}% of 5 files; best "
                     rf"val_file_top1 {files_top1:.2f}% at step 2\)", console), \
        [line for line in console.splitlines() if "validation" in line]
    assert f", val_file_top1 {files_top1:.2f}%; checkpoint: " in console
    assert "Result dict has no key" not in console  # Ray Train found the metric it ranks by in every report
    assert read_state(result.checkpoint.path)["best"] == {"val_file_top1": files_top1, "step": 2}


@pytest.mark.integration
def test_a_corpus_over_its_bad_video_limit_is_not_retried_and_says_why_in_one_line(ray_local, video_dir, tmp_path,
                                                                                   capfd):
    """The same corpus with max_bad_fraction 0.2 and two restarts allowed: the decoder's TooManyBadVideos fails
    rank 1. A restart cannot fix a corpus (the drop counts survive it), so the next group ends before it builds
    anything and the run fails at once, not after run.max_failures more attempts. Ray's own summary would cut the
    cause off; `pretrain` ends with one line naming the root cause the failing rank recorded and what the same
    command would do."""
    from workflows.elastic import RunNotRestarted, kv_key, kv_put, take_failure, unrestartable_failure
    from workflows.pretrain import describe_training_failure, run_pretrain

    recipe = _bad_corpus_run(video_dir, tmp_path, max_bad_fraction=0.2, name="too-bad", max_failures=2)
    kv_put(kv_key(recipe.run_dir, "unrestartable"), {"reason": "an earlier attempt's, fixed since"})
    with pytest.raises(RunNotRestarted) as info:
        run_pretrain(recipe)  # the stale record above did not end it before the corpus was read
    out = capfd.readouterr().out
    assert out.count("not restarting: rank 1 failed: TooManyBadVideos: ") == 1, out
    assert "restart: " not in out and "resumed from step" not in out, out  # no group trained after the failure
    line = describe_training_failure(info.value, recipe)
    assert line.startswith("the run failed and was not restarted, as a restart cannot fix this: rank 1 failed: "
                           "TooManyBadVideos: ") and "max_bad_fraction=0.2" in line, line
    assert line.endswith(f"the same command resumes from the newest complete checkpoint in "
                         f"{tmp_path / 'runs' / 'too-bad'} (none was found there now: it would start anew)."), line
    # both records taken: neither a later attempt of this run directory nor its restart line sees them
    assert unrestartable_failure(recipe.run_dir) is None and take_failure(recipe.run_dir) is None

    # Ray Train's own give-up (a failure a restart may fix, its restarts spent): the reason recorded, the count said
    from ray.train import TrainingFailedError

    kv_put(kv_key(recipe.run_dir, "failure"), {"reason": "rank 0 failed: RuntimeError: lost the disk"})
    line = describe_training_failure(TrainingFailedError("cut short"), recipe)
    assert line.startswith("the run failed after 2 restarts (run.max_failures): rank 0 failed: RuntimeError: lost "
                           "the disk. Once that is fixed, "), line


@pytest.mark.integration
def test_a_validation_whose_pipeline_ends_early_is_never_reported_as_the_whole(counters, video_dir, tmp_path,
                                                                                monkeypatch):
    """A validation is over every video of a rank's share: each one scored or counted as dropped. With bad videos
    (bad.csv: 5 good, 4 bad, data.max_bad_fraction 0.5) both ranks complete, their drops accounted. A pipeline that
    ends before one good video came out (a filter standing in for an execution that stopped early without an error;
    CI once reported a step's validation over 4 of 8 videos) raises IncompleteValidation naming the video, and the
    partial clips are not cached for the next validation."""
    import workflows.feeds as feeds_module
    from workflows.feeds import IncompleteValidation

    counter = counters("feeds-val")
    val = [f"data.val_manifest={video_dir / 'bad.csv'}", "eval.cache_val_clips=true"]
    scored = set()
    for rank in (0, 1):
        feeds = _feeds(video_dir, video_dir / "good.csv", rank, counter, *val)
        scored |= {v for batch in feeds.val_batches() for v in batch["video_index"].tolist()}
        assert feeds._val_cache is not None
    assert len(scored) == 5  # the 5 good videos of 9; the 4 bad ones dropped, on either rank

    feeds = _feeds(video_dir, video_dir / "good.csv", 0, counter, *val)
    paths = dict(zip(feeds.val_manifest.table.column("video_index").to_pylist(),
                     feeds.val_manifest.table.column("path").to_pylist(), strict=True))
    victim = next(v for v in feeds.val_shard() if v in scored)
    real = feeds_module.build_clip_dataset
    monkeypatch.setattr(feeds_module, "build_clip_dataset",
                        lambda *a, **k: real(*a, **k).filter(lambda row: row["video_index"] != victim))
    expected = (rf"rank 0's validation data ended before 1 of its \d+ videos were decoded or counted as dropped "
                rf"\(e\.g\. {re.escape(paths[victim])};")
    with pytest.raises(IncompleteValidation, match=expected):
        list(feeds.val_batches())
    assert feeds._val_cache is None


@pytest.mark.integration
def test_a_training_pass_whose_pipeline_ends_early_is_not_topped_up_unsaid(counters, video_dir, tmp_path,
                                                                           monkeypatch):
    """A rank's pass over its share of the epoch gives `data.train_views` clips of each video not dropped (the tests
    above: bad videos are topped up). A pipeline that ends before one good video came out (a filter standing in
    for an execution that stopped early without an error) was topped up as if the video were bad, and the epoch
    skipped it unsaid: IncompleteEpoch, which restarts the run from its newest complete checkpoint."""
    import workflows.feeds as feeds_module
    from workflows.feeds import IncompleteEpoch

    manifest, _ = _manifest(video_dir, tmp_path, rows=8, bad_on_rank1=[])
    feeds = _feeds(video_dir, manifest, 0, counters("feeds-epoch"), "train.micro_batch_size=1",
                   "train.global_batch_size=2", "data.train_views=1")
    victim = min(_shard(feeds, 0))
    real = feeds_module.build_clip_dataset
    monkeypatch.setattr(feeds_module, "build_clip_dataset",
                        lambda *a, **k: real(*a, **k).filter(lambda row: row["video_index"] != victim))
    with pytest.raises(IncompleteEpoch, match=r"rank 0's training data of epoch 0 ended after 3 of the 4 clips of "
                                              r"its 4 videos \(0 dropped"):
        list(feeds.train_batches(epoch=0))
