"""Cross-rank sums: on the device the process group's backend needs, correct over a real two-process gloo group;
and the accuracies computed from the summed counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workflows.metrics import VideoScores, accuracy_summary, all_reduce_counts, all_reduce_sum, collective_device


def test_collective_device_follows_the_backend(monkeypatch) -> None:
    # NCCL reduces CUDA tensors only: a CPU tensor fails there ("No backend type associated with device type cpu",
    # seen on an H100 before every sum went through all_reduce_sum).
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collective_device() == torch.device("cpu")


def test_outside_torch_distributed_the_tensor_is_returned_unchanged() -> None:
    counts = {"top1": torch.tensor(2.0, dtype=torch.float64), "confusion": torch.eye(3, dtype=torch.float64)}
    assert all_reduce_counts(counts) == counts


def test_an_empty_set_gives_zero_accuracies_never_nan() -> None:
    """A validation set with no videos (every clip dropped, or a rank-local empty shard summed to nothing): every
    accuracy is 0.0, mean class accuracy included (it was NaN: the mean over no classes)."""
    summary = accuracy_summary(VideoScores(num_classes=4).counts())
    assert summary == {"top1": 0.0, "top5": 0.0, "mean_class_acc": 0.0, "videos": 0.0}


def test_mean_class_accuracy_averages_the_classes_that_have_videos() -> None:
    scores = VideoScores(num_classes=3)
    logits = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])  # class 0: 1 of 1, class 1: 1 of 2
    scores.add(torch.tensor([0, 1, 2]), logits, torch.tensor([0, 1, 1]))
    summary = accuracy_summary(scores.counts())
    assert summary["videos"] == 3.0 and summary["top1"] == pytest.approx(200.0 / 3)
    assert summary["mean_class_acc"] == 75.0  # (50% + 100%) / 2: class 2 has no video and does not count


def _sum_on_rank(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mine = torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float64)
        summed = all_reduce_sum(mine)
        counts = all_reduce_counts({"videos": torch.tensor(float(rank + 1)), "confusion": torch.eye(2) * rank})
        assert mine.tolist() == [rank + 1.0, 10.0 * rank]  # the caller's tensor is not reduced in place
        torch.save({"sum": summed, "counts": counts}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sums_over_a_real_two_process_group(tmp_path: Path) -> None:
    out = str(tmp_path / "result")
    mp.spawn(_sum_on_rank, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert got["sum"].dtype == torch.float64 and got["sum"].device == torch.device("cpu")
        assert got["sum"].tolist() == [3.0, 10.0]
        assert float(got["counts"]["videos"]) == 3.0
        assert torch.equal(got["counts"]["confusion"], torch.eye(2))


def test_files_of_clips_are_scored_as_the_mean_of_their_rows_however_the_rows_are_split_over_ranks() -> None:
    """FileIndex: each file the mean of its read rows' probabilities (each row weighing the same, whatever its view
    count); the sums of two ranks' rows added equal one process holding all of them; a file whose rows name
    different classes is left out; a manifest naming each file once has none."""
    from workflows.metrics import FileIndex

    assert FileIndex.of(["a", "b", "c"], [0, 1, 0]) is None
    paths, labels = ["a", "a", "b", "c", "c", "a"], [0, 0, 1, 2, 1, 0]  # c: two classes
    files = FileIndex.of(paths, labels)
    assert files.paths == ["a", "b"] and files.mixed == ["c"] and files.labels.tolist() == [0, 1]
    logits = {0: [2.0, 0.0, 0.0], 1: [0.0, 3.0, 0.0], 2: [0.0, 1.0, 0.0], 3: [1.0, 0.0, 0.0], 4: [0.0, 0.0, 1.0]}
    views = {0: 1, 1: 3, 2: 2, 3: 1, 4: 2}  # row 5 (of a) not read
    probs = {row: torch.softmax(torch.tensor(v), 0) for row, v in logits.items()}

    def scored(rows: list[int]) -> VideoScores:
        scores = VideoScores(3)
        for row in rows:
            for _ in range(views[row]):
                scores.add(torch.tensor([row]), torch.tensor([logits[row]]), torch.tensor([labels[row]]))
        return scores

    one = files.summary(*files.sums(scored(list(logits))))
    rank0, rank1 = files.sums(scored([0, 2, 4])), files.sums(scored([1, 3]))
    two = files.summary(rank0[0] + rank1[0], rank0[1] + rank1[1])
    expected_a = (probs[0] + probs[1]) / 2
    for summary in (one, two):
        torch.testing.assert_close(summary["files_probs"], torch.stack([expected_a, probs[2]]))
        assert summary["files_read"] == [0, 1] and summary["files_clips"] == [2, 1] and summary["clips"] == 3
        # a: rows lean to 0 (p 0.79) and to 1 (p 0.91): the mean favours 1, wrong; b: right
        assert (summary["videos"], summary["top1"]) == (2.0, 50.0)
