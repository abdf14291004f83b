"""Classification metrics shared by validation during training and the `evaluate` workflow.

Scores of several views of one video are summed (softmax probabilities, reference §4.2) before ranking.
Everything accumulates into tensors so ranks can all-reduce them: each clip is counted once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class VideoScores:
    """Per-video summed softmax scores of one rank; `counts()` gives top-1/top-5 hits and a confusion matrix."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.scores: dict[int, torch.Tensor] = {}
        self.labels: dict[int, int] = {}

    def add(self, video_index: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        for vid, p, y in zip(video_index.tolist(), probs, labels.tolist(), strict=True):
            self.scores[vid] = self.scores[vid] + p if vid in self.scores else p.clone()
            self.labels[vid] = y

    def table(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """The scored videos in index order, their summed scores (videos, K) and labels (videos,): one stack that
        `counts` and an evaluation's outputs share (at K710's validation set, ~190 MB each time it is built)."""
        vids = sorted(self.scores)
        if not vids:
            return [], torch.zeros(0, self.num_classes), torch.zeros(0, dtype=torch.long)
        return vids, torch.stack([self.scores[v] for v in vids]), torch.tensor([self.labels[v] for v in vids])

    def counts(self, table: tuple[list[int], torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{"top1", "top5", "videos"} scalars and "confusion" (K, K) [true, predicted], float64 for all-reduce;
        `table`: this object's `table()`, when the caller has it already."""
        _, scores, labels = self.table() if table is None else table
        return ranked_counts(scores, labels, self.num_classes)


def ranked_counts(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Top-1/top-5 hits and the confusion matrix of scored items (rows of `scores`, (N, K), with `labels` (N,)):
    {"top1", "top5", "videos"} scalars and "confusion" (K, K) [true, predicted], float64 for all-reduce."""
    k = num_classes
    confusion = torch.zeros(k, k, dtype=torch.float64)
    top1 = top5 = 0.0
    if len(labels):
        ranked = scores.topk(min(5, k), dim=-1).indices
        top1 = float((ranked[:, 0] == labels).sum())
        top5 = float((ranked == labels[:, None]).any(dim=-1).sum())
        confusion.index_put_((labels, ranked[:, 0]), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    return {"top1": torch.tensor(top1, dtype=torch.float64), "top5": torch.tensor(top5, dtype=torch.float64),
            "videos": torch.tensor(float(len(labels)), dtype=torch.float64), "confusion": confusion}


class FileIndex:
    """The rows of a manifest that cuts files into clips (a file named in several rows), grouped by file, so each
    file is also scored as a whole: the mean of its read rows' class probabilities, each row weighing the same. A
    file whose rows name different classes (a recording annotated by segment) has no one label: left out, listed
    in `mixed`. `of` gives None for a manifest naming each file once."""

    def __init__(self, paths: list[str], file_of_row: list[int], labels: list[int], mixed: list[str]) -> None:
        self.paths = paths  # each scored file once, in the order of its first row
        self.file_of_row = file_of_row  # the file of each manifest row (-1: a row of a mixed-label file)
        self.labels = torch.tensor(labels, dtype=torch.long)  # (files,)
        self.mixed = mixed

    @classmethod
    def of(cls, paths: list[str], labels: list[int]) -> FileIndex | None:
        rows_of: dict[str, list[int]] = {}
        for row, path in enumerate(paths):
            rows_of.setdefault(path, []).append(row)
        if all(len(rows) == 1 for rows in rows_of.values()):
            return None
        files, file_labels, mixed = [], [], []
        file_of_row = [-1] * len(paths)
        for path, rows in rows_of.items():
            if len({labels[r] for r in rows}) > 1:
                mixed.append(path)
                continue
            for r in rows:
                file_of_row[r] = len(files)
            files.append(path)
            file_labels.append(labels[rows[0]])
        return cls(files, file_of_row, file_labels, mixed)

    def sums(self, scores: VideoScores) -> tuple[torch.Tensor, torch.Tensor]:
        """(files, K) sums of this process's read rows' mean probabilities (a row's summed softmaxes over its
        views, divided by their count) and (files,) how many rows of each file were read: add these over ranks,
        then `summary` scores the files."""
        k = scores.num_classes
        sums, read = torch.zeros(len(self.paths), k), torch.zeros(len(self.paths))
        for row, summed in scores.scores.items():
            f = self.file_of_row[row]
            if f >= 0:
                sums[f] += summed / summed.sum()  # each view's softmax sums to 1: the sum is the view count
                read[f] += 1
        return sums, read

    def summary(self, sums: torch.Tensor, read: torch.Tensor) -> dict[str, Any]:
        """The files' accuracies (`accuracy_summary`, `videos` the files read) from `sums`' totals over ranks, plus
        `clips` (rows read) and, per file read, `files_read` (its index), `files_probs` (files read, K) and
        `files_clips` (its rows read)."""
        seen = read > 0
        probs = sums[seen] / read[seen, None]
        counts = ranked_counts(probs, self.labels[seen], sums.shape[1])
        return {**accuracy_summary(counts), "clips": float(read.sum()), "files_probs": probs,
                "files_read": seen.nonzero().flatten().tolist(), "files_clips": read[seen].int().tolist()}


def accuracy_summary(counts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracies in percent from (all-reduced) counts. An empty set (no videos) gives 0.0 for every accuracy, as
    top-1 and top-5 always did: the mean over no classes is 0.0 too, never NaN (which MLflow and best-checkpoint
    ranking would carry on)."""
    videos = max(1.0, float(counts["videos"]))
    confusion = counts["confusion"]
    per_true = confusion.sum(dim=1)
    seen = per_true > 0  # classes with at least one video: the mean is over these
    per_class = confusion.diag() / per_true.clamp(min=1)
    return {"top1": 100.0 * float(counts["top1"]) / videos, "top5": 100.0 * float(counts["top5"]) / videos,
            "mean_class_acc": 100.0 * float(per_class[seen].mean()) if bool(seen.any()) else 0.0,
            "videos": float(counts["videos"])}


def collective_device() -> torch.device:
    """Where a tensor must live for this process group's collectives: NCCL reduces CUDA tensors only (a CPU tensor
    fails with "No backend type associated with device type cpu"); gloo and MPI take CPU tensors."""
    import torch.distributed as dist

    if str(dist.get_backend()).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over ranks, on the device it came from (itself outside torch.distributed). Every cross-rank
    sum of the workflows goes through here, so each runs on the device the backend needs."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    reduced = tensor.to(collective_device(), copy=True)
    dist.all_reduce(reduced)
    return reduced.to(tensor.device)


def all_reduce_counts(counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum counts over ranks (no-op outside torch.distributed)."""
    return {key: all_reduce_sum(value) for key, value in counts.items()}


def save_confusion_png(confusion: torch.Tensor, class_names: list[str], path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix as an image (class names shown when there are few)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = confusion.shape[0]
    norm = (confusion / confusion.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    size = min(24.0, 3.0 + 0.35 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 40:
        ax.set_xticks(range(k), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_curves_png(history: dict[str, list[tuple[int, float]]], path: str | Path) -> None:
    """Training curves: one panel per metric, x = optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, points in history.items() if points]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.5 * max(1, len(names)), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        steps, values = zip(*history[name], strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
