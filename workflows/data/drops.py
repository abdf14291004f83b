"""Bad-video accounting for the clip pipeline: which videos were dropped, why, and whether too many were.

A video that cannot give a clip (see `video.DROP_REASONS`) is dropped and reported to a named Ray actor,
`DropCounter` (name `cfg.drop_counter`), keyed by split and epoch, together with its path. The trainer reads it with
`get_drop_report(split, epoch, name=cfg.drop_counter)` during or after an epoch and gets a `DropReport` (videos,
dropped {reason: count}, examples {reason: [paths]}). The bad-fraction limit is checked when a drop is reported:
the number of drops only grows during an epoch, so as soon as it exceeds `max_bad_fraction x videos` the result is
certain and the decoder raises `TooManyBadVideos` (naming examples), which fails the dataset's iteration at
once instead of after hours of training on a broken corpus. The drivers (pretrain, tune, evaluate) create the counter
before their workers start, so the counts survive worker restarts; `build_clip_dataset` gets it, or creates it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MAX_EXAMPLES = 5


class TooManyBadVideos(RuntimeError):
    """More than `max_bad_fraction` of a split's videos could not be decoded."""


@dataclass
class DropReport:
    """Dropped videos of one split (and epoch): counts by reason and a few example paths per reason."""

    split: str
    epoch: int | None
    videos: int  # videos in the manifest
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)  # example path -> what failed

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def bad_fraction(self) -> float:
        return self.total_dropped / self.videos if self.videos else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON and MLflow)."""
        return {**asdict(self), "total_dropped": self.total_dropped, "bad_fraction": self.bad_fraction}

    def summary(self) -> str:
        """One line per reason, with examples."""
        lines = [f"{self.split}: {self.total_dropped} of {self.videos} videos dropped ({self.bad_fraction:.1%})"]
        for reason, count in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason}: {count}  e.g. {', '.join(self.examples.get(reason, []))}")
        return "\n".join(lines)


def _too_many_message(report: DropReport, limit: float) -> str:
    examples = [f"{p} ({report.details.get(p, reason)})" for reason, paths in report.examples.items() for p in paths]
    return (f"{report.total_dropped} of {report.videos} {report.split} videos are unusable, more than "
            f"max_bad_fraction={limit:g}: {dict(report.dropped)}. Examples: {'; '.join(examples[:8])}. "
            f"`python -m workflows data check --manifest ... --bad-list bad.csv` lists them all.")


def _what_failed(reason: str, detail: str) -> str:
    """A dropped video's reason and the decoder's words, as reports and evaluate's predictions.csv give them."""
    return f"{reason}: {detail}"[:300]


class DropCounter:
    """Counts dropped videos per (split, epoch); one drop per video per epoch however often it is retried."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, int], dict[str, Any]] = {}

    def register(self, split: str, epoch: int, videos: int, max_bad_fraction: float) -> None:
        run = self._runs.setdefault((split, epoch), {"drops": {}})
        run.update(videos=videos, limit=max_bad_fraction)

    def report(self, split: str, epoch: int, video_index: int, path: str, reason: str, detail: str) -> str | None:
        """Record a drop; returns an error message once the split's bad fraction exceeds its limit."""
        run = self._runs.setdefault((split, epoch), {"drops": {}, "videos": 0, "limit": 1.0})
        run["drops"][video_index] = (reason, path, detail)
        if run["videos"] and len(run["drops"]) > run["limit"] * run["videos"]:
            return _too_many_message(self.get(split, epoch), run["limit"])
        return None

    def dropped_videos(self, split: str, epoch: int) -> dict[int, str]:
        """Every dropped video of one epoch: manifest row -> "reason: what failed" (evaluate lists them all)."""
        drops = self._runs.get((split, epoch), {}).get("drops", {})
        return {index: _what_failed(reason, detail) for index, (reason, _, detail) in drops.items()}

    def get(self, split: str, epoch: int | None = None) -> DropReport:
        """Report for one epoch, or (epoch None) for the latest epoch seen of this split."""
        epochs = sorted(e for s, e in self._runs if s == split)
        if not epochs:
            return DropReport(split=split, epoch=epoch, videos=0)
        epoch = epochs[-1] if epoch is None else epoch
        run = self._runs.get((split, epoch), {"drops": {}, "videos": 0})
        report = DropReport(split=split, epoch=epoch, videos=run["videos"])
        for reason, path, detail in run["drops"].values():
            report.dropped[reason] = report.dropped.get(reason, 0) + 1
            shown = report.examples.setdefault(reason, [])
            if len(shown) < MAX_EXAMPLES:
                shown.append(path)
                report.details[path] = _what_failed(reason, detail)
        return report


def drop_counter(name: str) -> Any:
    """The named DropCounter actor (created on first use, owned by this job), on the caller's node: the driver's,
    which lives as long as the run. Anywhere else it could land on a spot worker node, and the reclaim of that node
    would take it along, failing every later attempt of the run (Ray counts such a failure as a preemption and
    retries it without limit). Should its node go anyway, Ray restarts it (the epoch's counts so far are lost)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)(DropCounter)
    return actor_cls.options(name=name, get_if_exists=True, scheduling_strategy=here).remote()


def get_dropped_videos(split: str, epoch: int, *, name: str = "dist-data-drops") -> dict[int, str]:
    """Every video of `split`'s `epoch` the named DropCounter actor has as dropped (none when there is no counter):
    manifest row -> "reason: what failed"."""
    import ray

    try:
        actor = ray.get_actor(name)
    except ValueError:
        return {}
    return ray.get(actor.dropped_videos.remote(split, epoch))


def get_drop_report(split: str, epoch: int | None = None, *, name: str = "dist-data-drops") -> DropReport:
    """Dropped-video counts of `split` (latest epoch when `epoch` is None), from the named DropCounter actor."""
    import ray

    try:
        actor = ray.get_actor(name)
    except ValueError:
        return DropReport(split=split, epoch=epoch, videos=0)
    return ray.get(actor.get.remote(split, epoch))

