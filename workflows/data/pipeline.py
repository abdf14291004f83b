"""The clip dataset on Ray Data: manifest rows in, decoded and augmented uint8 clips out, bad videos counted.

    build_clip_dataset(cfg, manifest, labels, split=..., num_frames=T_d, crop_size=S, ...) -> ray.data.Dataset

The manifest (one small row per video) is shuffled on the driver with a generator seeded by (seed, epoch) for
training, cut into blocks, and decoded by `ClipDecoder` actors in `map_batches` (an autoscaling actor pool sized
from the cluster's CPUs, or from the CPUs of the nodes labelled `cfg.decode_node_label`). Decoding is the
expensive step, so only the manifest is shuffled, never the frames; execution streams. Each video is decoded
once and gives `views x crops` rows:

    frames       uint8 (T_d, S, S, 3)   dense frames; the model takes every γ-th for its sparse stream
    label        int64                  after a label-swapping flip
    video_index  int64                  row of the manifest
    view         int64                  temporal view (train: independent random clip), 0..views-1
    crop         int64                  spatial crop, 0..crops-1
    flipped      bool
    path         str

Random draws come from a generator seeded by (seed, epoch, video_index), so results do not depend on which
actor decodes which video; output order is not deterministic (sort by video_index/view/crop to compare).

Decode nodes. `resolve_decode_nodes(cfg.decode_node_label)` reads the alive nodes' labels and CPUs: an unset
label becomes "dist-role=decode" when some alive node carries it (the label cluster/*.yaml give CPU decode nodes),
else "any"; `DecodeNodes.check` fails fast, naming the labels the nodes do carry, when the label matches no alive
node or too few CPUs. The drivers (pretrain, tune) resolve and check before any training work, through
`workflows.capacity.check_capacity` (which first waits for the autoscaler when scaling.wait_for_nodes_s > 0), and hand
the result to the workers in the recipe; here, an unset label means any node.

Bad videos. A video that cannot give a clip (see video.DROP_REASONS) is dropped and reported to a named Ray
actor, `DropCounter` (name `cfg.drop_counter`), keyed by split and epoch, together with its path. The trainer
reads it with `get_drop_report(split, epoch, name=cfg.drop_counter)` during or after an epoch and gets a
`DropReport` (videos, dropped {reason: count}, examples {reason: [paths]}). The bad-fraction limit is checked
when a drop is reported: the number of drops only grows during an epoch, so as soon as it exceeds
`max_bad_fraction x videos` the result is certain and the decoding actor raises `TooManyBadVideos` (naming
examples), which fails the dataset's iteration at once instead of after hours of training on a broken corpus.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from workflows.data.config import DECODE_ANYWHERE, DECODE_LABEL_AUTO, DataConfig
from workflows.data.manifest import Manifest, load_labels, load_manifest
from workflows.data.sampling import segment_indices
from workflows.data.transforms import eval_clips, train_clip
from workflows.data.video import DROP_REASONS, BadVideo, read_frames

MAX_EXAMPLES = 5
MAX_BLOCKS = 4096


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
            f"Run `python -m workflows data check --manifest ...` to list them all.")


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
                report.details[path] = f"{reason}: {detail}"[:300]
        return report


def drop_counter(name: str) -> Any:
    """The named DropCounter actor (created on first use, owned by this job)."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(DropCounter)
    return actor_cls.options(name=name, get_if_exists=True).remote()


def get_drop_report(split: str, epoch: int | None = None, *, name: str = "dist-data-drops") -> DropReport:
    """Dropped-video counts of `split` (latest epoch when `epoch` is None), from the named DropCounter actor."""
    import ray

    try:
        actor = ray.get_actor(name)
    except ValueError:
        return DropReport(split=split, epoch=epoch, videos=0)
    return ray.get(actor.get.remote(split, epoch))


def check_drop_report(report: DropReport, max_bad_fraction: float) -> None:
    """Raise TooManyBadVideos naming examples when the report's bad fraction exceeds the limit."""
    if report.total_dropped > max_bad_fraction * report.videos:
        raise TooManyBadVideos(_too_many_message(report, max_bad_fraction))


@dataclass
class ClipSpec:
    """Everything a decoding actor needs to turn a manifest row into clips (a plain dict on the wire)."""

    split: Literal["train", "eval"]
    num_frames: int
    crop_size: int
    num_views: int = 1
    num_crops: int = 1
    seed: int = 0
    epoch: int = 0
    flip: str = "plain"
    flip_pairs: list[list[int]] = field(default_factory=list)
    flip_p: float = 0.5
    crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    grayscale_p: float = 0.2
    min_frames: int = 4
    decode_short_side: int | None = None
    decode_resize_threshold: float = 1.25
    decode_threads: int = 1
    counter_split: str = "train"  # key under which drops are counted

    @classmethod
    def from_config(cls, cfg: DataConfig, **kwargs: Any) -> ClipSpec:
        return cls(flip=cfg.flip, flip_pairs=[list(p) for p in cfg.flip_pairs], flip_p=cfg.flip_p,
                   crop_scale=list(cfg.crop_scale), crop_ratio=list(cfg.crop_ratio), grayscale_p=cfg.grayscale_p,
                   min_frames=cfg.min_frames, decode_short_side=cfg.decode_short_side,
                   decode_resize_threshold=cfg.decode_resize_threshold, decode_threads=cfg.decode_threads, **kwargs)

    def target_short(self) -> int:
        """Short side to decode at when the source is much larger."""
        if self.decode_short_side:
            return self.decode_short_side
        return int(round(self.crop_size * 8 / 7)) if self.split == "train" else self.crop_size


def _empty_output(spec: ClipSpec) -> dict[str, np.ndarray]:
    s, t = spec.crop_size, spec.num_frames
    return {"frames": np.zeros((0, t, s, s, 3), np.uint8), "label": np.zeros(0, np.int64),
            "video_index": np.zeros(0, np.int64), "view": np.zeros(0, np.int64), "crop": np.zeros(0, np.int64),
            "flipped": np.zeros(0, bool), "path": np.zeros(0, object)}


def clips_from_video(path: str, label: int, video_index: int, start: float, end: float,
                     spec: ClipSpec) -> list[dict[str, Any]]:
    """Decode one video and return its views x crops clip rows; raises BadVideo when it is unusable."""
    rng = np.random.default_rng([spec.seed, spec.epoch, video_index])
    plans: list[np.ndarray] = []

    def choose(first: int, last: int, fps: float) -> np.ndarray:
        for v in range(spec.num_views):
            plans.append(segment_indices(first, last, spec.num_frames, mode=spec.split, view=v,
                                         num_views=spec.num_views, rng=rng))
        return np.concatenate(plans)

    decoded = read_frames(path, choose, start=start, end=end, min_frames=spec.min_frames,
                          target_short=spec.target_short(), resize_threshold=spec.decode_resize_threshold,
                          num_threads=spec.decode_threads)
    rows = []
    for v, idx in enumerate(plans):
        frames = decoded.take(idx)  # (T_d, H, W, 3)
        if spec.split == "train":
            clip, out_label, flipped = train_clip(
                frames, label, rng, crop_size=spec.crop_size, flip=spec.flip, flip_pairs=spec.flip_pairs,
                flip_p=spec.flip_p, scale=spec.crop_scale, ratio=spec.crop_ratio, grayscale_p=spec.grayscale_p)
            rows.append(dict(frames=clip, label=out_label, view=v, crop=0, flipped=flipped))
        else:
            for c, clip in enumerate(eval_clips(frames, crop_size=spec.crop_size, num_crops=spec.num_crops)):
                rows.append(dict(frames=clip, label=label, view=v, crop=c, flipped=False))
    for row in rows:
        row.update(video_index=video_index, path=path)
    return rows


def decode_batch(batch: dict[str, np.ndarray], spec: ClipSpec,
                 on_drop: Any = None) -> dict[str, np.ndarray]:
    """Manifest rows -> clip rows (pure apart from reading the files). `on_drop(video_index, path, reason,
    detail)` is called for every dropped video."""
    rows: list[dict[str, Any]] = []
    for i in range(len(batch["path"])):
        path, index = str(batch["path"][i]), int(batch["video_index"][i])
        try:
            rows += clips_from_video(path, int(batch["label"][i]), index, float(batch["start"][i]),
                                     float(batch["end"][i]), spec)
        except BadVideo as exc:
            if on_drop is not None:
                on_drop(index, path, exc.reason, exc.detail)
    if not rows:
        return _empty_output(spec)
    out = {key: np.stack([r[key] for r in rows]) for key in ("frames", "label", "video_index", "view", "crop")}
    out["frames"] = out["frames"].astype(np.uint8, copy=False)  # (N, T_d, S, S, 3)
    for key in ("label", "video_index", "view", "crop"):
        out[key] = out[key].astype(np.int64)
    out["flipped"] = np.array([r["flipped"] for r in rows], bool)
    out["path"] = np.array([r["path"] for r in rows], object)
    return out


class ClipDecoder:
    """Ray Data actor UDF: decode_batch plus drop reporting to the DropCounter actor."""

    def __init__(self, spec: dict[str, Any], counter: Any = None) -> None:
        self.spec = ClipSpec(**spec)
        self.counter = counter

    def _on_drop(self, video_index: int, path: str, reason: str, detail: str) -> None:
        if self.counter is None:
            return
        import ray

        error = ray.get(self.counter.report.remote(self.spec.counter_split, self.spec.epoch, video_index, path,
                                                   reason, detail))
        if error:
            raise TooManyBadVideos(error)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return clips_to_table(decode_batch(batch, self.spec, self._on_drop))


def clips_to_table(clips: dict[str, np.ndarray]) -> pa.Table:
    """Clip rows as an Arrow table with a fixed schema, also when empty (every video of a batch dropped), so
    blocks always concatenate: frames become Ray's fixed-shape tensor column."""
    from ray.data.extensions import ArrowTensorArray

    return pa.table({
        "frames": ArrowTensorArray.from_numpy(clips["frames"]),
        **{key: pa.array(clips[key], pa.int64()) for key in ("label", "video_index", "view", "crop")},
        "flipped": pa.array(clips["flipped"], pa.bool_()),
        "path": pa.array(clips["path"].tolist(), pa.string()),
    })


class DecodeNodesError(RuntimeError):
    """The nodes that `data.decode_node_label` selects cannot hold the decode actors (none alive, or too few CPUs)."""


def _alive_nodes(nodes: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    if nodes is None:
        import ray

        nodes = ray.nodes()
    return [node for node in nodes if node.get("Alive", False)]


def _node_labels(node: dict[str, Any]) -> dict[str, str]:
    return node.get("Labels") or node.get("labels") or {}


def _selector(label: str | None) -> dict[str, str] | None:
    if not label or label == DECODE_ANYWHERE:
        return None
    key, _, value = label.partition("=")
    return {key.strip(): value.strip()}


@dataclass(frozen=True)
class DecodeNodes:
    """Where the decode actors may run, resolved against the alive Ray nodes by `resolve_decode_nodes`."""

    label: str | None  # the node label they are restricted to ("key=value"); None: any node
    auto: bool  # the label was found on the cluster because data.decode_node_label was unset
    nodes: int  # alive nodes they may use
    cpus: float  # CPUs of those nodes
    largest_cpus: float  # CPUs of the largest of them (one actor needs decode_threads CPUs on one node)
    gpus: float  # GPUs of those nodes
    other_cpus: float  # CPUs and GPUs of the alive nodes outside the label (both 0 without a label)
    other_gpus: float
    cluster_labels: dict[str, int] = field(default_factory=dict)  # "key=value" -> alive nodes carrying it
    unlabelled_nodes: int = 0  # alive nodes carrying no label of their own (Ray's ray.io/* ones not counted)

    @property
    def setting(self) -> str:
        """The resolved `data.decode_node_label` to hand to the workers: the label, or "any"."""
        return self.label or DECODE_ANYWHERE

    def labels_seen(self) -> str:
        """The labels the alive nodes carry, for messages: 'dist-role=train (2 nodes), dist-role=head (1 node)'."""
        def count(n: int) -> str:
            return f"{n} node{'s' if n != 1 else ''}"

        parts = [f"{label} ({count(n)})" for label, n in sorted(self.cluster_labels.items())]
        if self.unlabelled_nodes:
            parts.append(f"no label ({count(self.unlabelled_nodes)})")
        return ", ".join(parts) or "no alive nodes"

    def describe(self) -> str:
        """One line for the console: where the decode actors go and why."""
        if self.label is None:
            return f"decode actors may run on any node ({self.nodes} alive, {self.cpus:g} CPUs)"
        where = (f"decode actors run on the {self.nodes} alive node(s) labelled {self.label} "
                 f"({self.cpus:g} CPUs)")
        if self.auto:
            return (f"{where}, found automatically (data.decode_node_label is unset); set "
                    f"data.decode_node_label={DECODE_ANYWHERE} to decode on any node")
        return where

    def check(self, actors: int, threads: int) -> None:
        """Raise DecodeNodesError, naming the label, the labels the nodes do carry and what to do, when the
        selected nodes cannot hold `actors` decode actors of `threads` CPUs each (they would wait forever)."""
        if self.label is None:
            return  # any node: the cluster-wide CPU check (capacity.check_capacity) covers it
        key, _, value = self.label.partition("=")
        label_them = (f"`ray start --labels={self.label}`, or `labels: {{{key}: {value}}}` on the node type in the "
                      f"cluster YAML; see cluster/README.md")
        other = f"or set data.decode_node_label={DECODE_ANYWHERE} to decode on any node"
        if not self.auto:
            other = (f"or unset data.decode_node_label (null: the nodes labelled {DECODE_LABEL_AUTO} when there are "
                     f"any, else any node), {other}")
        origin = "found automatically" if self.auto else "set in data.decode_node_label"
        if self.nodes == 0:
            raise DecodeNodesError(f"decode node label {self.label!r} ({origin}): no alive Ray node carries it; the "
                                   f"alive nodes carry: {self.labels_seen()}. Label nodes for decoding ({label_them}), "
                                   f"{other}.")
        need = actors * threads
        if self.cpus < need or self.largest_cpus < threads:
            raise DecodeNodesError(
                f"decode node label {self.label!r} ({origin}): the {self.nodes} alive node(s) carrying it have "
                f"{self.cpus:g} CPUs (largest {self.largest_cpus:g}), but the decode actors need {need:g}: {actors} "
                f"actor(s) (at least one per training worker) x data.decode_threads={threads}, each on one node. "
                f"Add or enlarge nodes with that label ({label_them}), lower data.decode_threads, or set "
                f"data.decode_node_label={DECODE_ANYWHERE} to decode on any node.")


def resolve_decode_nodes(setting: str | None, nodes: list[dict[str, Any]] | None = None) -> DecodeNodes:
    """Resolve `data.decode_node_label` against the alive nodes (`nodes`: `ray.nodes()` entries; default: ask
    the running cluster). "key=value": those nodes, however many there are (`DecodeNodes.check` fails on none);
    None (unset): DECODE_LABEL_AUTO when some alive node carries it, else any node; "any": any node.
    Never raises for missing nodes: `DecodeNodes.check` does, with the labels the cluster has."""
    alive = _alive_nodes(nodes)
    auto = setting is None
    label = setting if setting != DECODE_ANYWHERE else None
    if auto:
        label = DECODE_LABEL_AUTO
        if not any(_matches(node, _selector(label)) for node in alive):
            label = None
    selector = _selector(label)
    cluster_labels: dict[str, int] = {}
    unlabelled = 0
    cpus = gpus = other_cpus = other_gpus = largest = 0.0
    count = 0
    for node in alive:
        own = {k: v for k, v in _node_labels(node).items() if not k.startswith("ray.io/")}
        for k, v in own.items():
            cluster_labels[f"{k}={v}"] = cluster_labels.get(f"{k}={v}", 0) + 1
        unlabelled += not own
        resources = node.get("Resources") or {}
        node_cpus, node_gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
        if _matches(node, selector):
            count += 1
            cpus, gpus, largest = cpus + node_cpus, gpus + node_gpus, max(largest, node_cpus)
        else:
            other_cpus, other_gpus = other_cpus + node_cpus, other_gpus + node_gpus
    return DecodeNodes(label=label, auto=auto and label is not None, nodes=count, cpus=cpus, largest_cpus=largest,
                       gpus=gpus, other_cpus=other_cpus, other_gpus=other_gpus, cluster_labels=cluster_labels,
                       unlabelled_nodes=unlabelled)


def _matches(node: dict[str, Any], selector: dict[str, str] | None) -> bool:
    labels = _node_labels(node)
    return not selector or all(labels.get(k) == v for k, v in selector.items())


def decode_cpus(label_selector: dict[str, str] | None = None) -> float:
    """CPUs of the alive nodes that may run decode actors (all nodes, or those carrying every selected label)."""
    return sum(float((node.get("Resources") or {}).get("CPU", 0.0))
               for node in _alive_nodes(None) if _matches(node, label_selector))


def decode_pool_size(cfg: DataConfig) -> int:
    """Number of decode actors: cfg.decode_actors, or one per decode_threads CPUs of the eligible nodes.
    An unset decode_node_label means any node here: the drivers resolve it before the workers start."""
    if cfg.decode_actors:
        return cfg.decode_actors
    selector = cfg.node_label_selector()
    if selector:
        found = resolve_decode_nodes(cfg.decode_node_label)
        found.check(1, cfg.decode_threads)
        cpus = found.cpus
    else:
        cpus = decode_cpus()
    return max(1, int(cpus // cfg.decode_threads))


def _manifest_blocks(table: pa.Table, batch_size: int) -> list[pa.Table]:
    """Cut the manifest into blocks of one map_batches call each (more rows per block only beyond MAX_BLOCKS
    blocks): small blocks keep every actor busy and bound the frames one task holds."""
    n = table.num_rows
    rows = max(batch_size, math.ceil(n / MAX_BLOCKS))
    return [table.slice(i, rows) for i in range(0, n, rows)]


def build_clip_dataset(
    cfg: DataConfig,
    manifest: str | Manifest,
    labels: dict[str, int] | str,
    *,
    split: Literal["train", "eval"],
    num_frames: int,
    crop_size: int,
    num_views: int = 1,
    num_crops: int = 1,
    seed: int = 0,
    epoch: int = 0,
    counter_split: str | None = None,
    shard: tuple[int, int] | None = None,
    skip: int = 0,
) -> Any:
    """A streaming ray.data.Dataset of clips (schema in the module docstring) for one epoch of `manifest`.

    Training rows are shuffled with (seed, epoch); build one dataset per epoch. Drops are counted under
    `counter_split` (default: `split`) and `epoch` in the DropCounter named `cfg.drop_counter`.

    `shard=(rank, world)` keeps every world-th video of the (shuffled) epoch order, so each training worker
    reads its own disjoint part and every video is seen once per epoch; `skip` drops that many videos from the
    front of the shard (resuming inside an epoch)."""
    import ray

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if num_frames < 1 or crop_size < 8 or num_views < 1 or num_crops not in (1, 3):
        raise ValueError(f"bad clip geometry: num_frames={num_frames}, crop_size={crop_size}, "
                         f"num_views={num_views}, num_crops={num_crops}")
    if split == "train" and num_crops != 1:
        raise ValueError("training clips use one random crop; num_crops must be 1")
    label_map = load_labels(labels) if isinstance(labels, str) else labels
    loaded = manifest if isinstance(manifest, Manifest) else load_manifest(manifest, label_map, strict=True)
    table = loaded.table.select(["video_index", "path", "label", "start", "end"])
    if split == "train":  # the per-epoch shuffle: a permutation of the (small) manifest, never of frames
        perm = np.random.default_rng([seed, epoch]).permutation(table.num_rows)
        table = table.take(pa.array(perm))
    videos_in_epoch = table.num_rows  # the bad-fraction limit is over the whole epoch, whoever decodes what
    if shard is not None:
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard {shard} must be (rank, world) with 0 <= rank < world")
        table = table.take(pa.array(np.arange(rank, table.num_rows, world)))
    if skip:
        table = table.slice(min(skip, table.num_rows))
    key = counter_split or split
    counter = drop_counter(cfg.drop_counter)
    ray.get(counter.register.remote(key, epoch, videos_in_epoch, cfg.max_bad_fraction))
    spec = ClipSpec.from_config(cfg, split=split, num_frames=num_frames, crop_size=crop_size, num_views=num_views,
                                num_crops=num_crops, seed=seed, epoch=epoch, counter_split=key)
    pool = decode_pool_size(cfg)
    ds = ray.data.from_arrow(_manifest_blocks(table, cfg.batch_size))
    selector = cfg.node_label_selector()
    return ds.map_batches(
        ClipDecoder,
        fn_constructor_kwargs={"spec": asdict(spec), "counter": counter},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool),
        num_cpus=cfg.decode_threads,
        **({"label_selector": selector} if selector else {}),
    )


def columns_collate(columns: list[str], device: Any = None) -> Any:
    """A collate_fn for `iter_torch_batches` that keeps only `columns` (Ray's default Arrow -> torch conversion).
    Consumers pick their columns here rather than with `Dataset.select_columns`: that adds a Project operator
    behind the decode actors, and on a small cluster Ray Data's per-operator CPU reservation for it keeps the
    decode pool at one actor (measured: half the clips/s; benchmarks/README.md, ingest).

    As Ray's default does, chunks are combined on the host only for a CPU `device`; for an accelerator they are
    combined by the copy to it (no extra host copy of the frames)."""
    from ray.data.collate_fn import DefaultCollateFn

    class SelectColumns(DefaultCollateFn):
        def __call__(self, batch: Any) -> dict[str, Any]:
            picked = batch.select(columns) if isinstance(batch, pa.Table) else batch[columns]
            return super().__call__(picked)

    on_cpu = device is None or str(device).split(":")[0] == "cpu"
    return SelectColumns(combine_chunks=on_cpu)


# ---- dataset doctor -------------------------------------------------------------------------------------------


def check_video(path: str, start: float = math.nan, end: float = math.nan, *, num_frames: int = 16,
                min_frames: int = 1) -> dict[str, Any]:
    """Decode `num_frames` frames spread over the whole video (first and last included); a stats row."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {"path": path, "ok": False, "reason": "", "detail": "", "frames": 0, "fps": 0.0,
                           "width": 0, "height": 0, "decoded": 0}
    try:
        decoded = read_frames(path, lambda a, b, fps: np.unique(np.linspace(a, b - 1, num_frames).round()),
                              start=start, end=end, min_frames=min_frames)
        row.update(ok=True, frames=decoded.num_frames, fps=decoded.fps, width=decoded.width, height=decoded.height,
                   decoded=len(decoded.indices))
    except BadVideo as exc:
        row.update(reason=exc.reason, detail=exc.detail[:300])
    row["seconds"] = time.perf_counter() - t0
    return row


def _check_batch(batch: dict[str, np.ndarray], num_frames: int, min_frames: int) -> dict[str, np.ndarray]:
    rows = [check_video(str(p), float(s), float(e), num_frames=num_frames, min_frames=min_frames)
            for p, s, e in zip(batch["path"], batch["start"], batch["end"], strict=True)]
    out = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    out["video_index"] = np.asarray(batch["video_index"], np.int64)
    return out


def check_dataset(manifest: str, labels: str | dict[str, int] | None = None, *, num_frames: int = 16,
                  min_frames: int = 1, parallelism: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Decode every video of `manifest` once, in parallel on Ray; return the doctor's summary as a dict with
    videos, ok, dropped {reason: count}, examples {reason: paths}, unknown_labels, frame/resolution statistics
    and decode throughput."""
    import ray

    label_map = load_labels(labels) if isinstance(labels, str) else labels
    loaded = load_manifest(manifest, label_map, strict=False)
    table = loaded.table.select(["video_index", "path", "start", "end"])
    cpus = max(1, int(parallelism or ray.cluster_resources().get("CPU", 1)))
    t0 = time.perf_counter()
    ds = ray.data.from_arrow(_manifest_blocks(table, max(1, math.ceil(table.num_rows / (4 * cpus)))))
    ds = ds.map_batches(_check_batch, fn_kwargs={"num_frames": num_frames, "min_frames": min_frames},
                        batch_size=None, batch_format="numpy", num_cpus=1)
    rows: list[dict[str, Any]] = []
    last = t0
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
        rows += batch.to_dict("records")
        if progress and time.perf_counter() - last > 5:
            last = time.perf_counter()
            print(f"  checked {len(rows)}/{table.num_rows} videos ({len(rows) / (last - t0):.1f}/s)", flush=True)
    rows.sort(key=lambda r: r["video_index"])
    wall = time.perf_counter() - t0
    ok = [r for r in rows if r["ok"]]
    dropped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    details: dict[str, str] = {}
    for r in rows:
        if not r["ok"]:
            dropped[r["reason"]] = dropped.get(r["reason"], 0) + 1
            if len(examples.setdefault(r["reason"], [])) < MAX_EXAMPLES:
                examples[r["reason"]].append(r["path"])
                details[r["path"]] = r["detail"]

    def stats(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        a = np.asarray(values, np.float64)
        return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max()), "mean": float(a.mean())}

    resolutions: dict[str, int] = {}
    for r in ok:
        key = f"{r['width']}x{r['height']}"
        resolutions[key] = resolutions.get(key, 0) + 1
    decode_seconds = float(sum(r["seconds"] for r in rows))
    return {
        "manifest": manifest,
        "videos": len(rows),
        "ok": len(ok),
        "dropped": dropped,
        "examples": examples,
        "details": details,
        "unknown_labels": {k: [i + 1 for i in v] for k, v in loaded.unknown_labels.items()} if label_map else {},
        "frames": stats([r["frames"] for r in ok]),
        "fps": stats([r["fps"] for r in ok]),
        "short_side": stats([min(r["width"], r["height"]) for r in ok]),
        "resolutions": dict(sorted(resolutions.items(), key=lambda kv: -kv[1])[:10]),
        "duration_s": stats([r["frames"] / r["fps"] for r in ok if r["fps"] > 0]),
        "wall_seconds": wall,
        "videos_per_second": len(rows) / wall if wall > 0 else 0.0,
        "decode_seconds_per_video": decode_seconds / len(rows) if rows else 0.0,
        "drop_reasons": list(DROP_REASONS),
    }
