"""The clip dataset on Ray Data: manifest rows in, decoded and augmented uint8 clips out, bad videos counted.

    build_clip_dataset(cfg, manifest, labels, split=..., num_frames=T_d, crop_size=S, ...) -> ray.data.Dataset

The manifest (one small row per video) is shuffled on the driver with a generator seeded by (seed, epoch) for
training, cut into blocks, and decoded by `decode_clips` tasks in `map_batches` (at most a pool of them at once, sized
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

Alongside: `decode_nodes` (which nodes the decoders may use), `drops` (bad videos counted, and a run failed
early when too many are bad), `doctor` (decode a whole manifest once and summarise it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from workflows.data.data_config import DataConfig
from workflows.data.decode_nodes import decode_pool_size
from workflows.data.drops import TooManyBadVideos, drop_counter
from workflows.data.manifest import Manifest, load_labels, load_manifest
from workflows.data.sampling import segment_indices
from workflows.data.shared_disk import spread_local_paths, witness_files
from workflows.data.transforms import eval_clips, train_clip
from workflows.data.video import BadVideo, StorageUnreachable, read_frames
from workflows.runtime import avoiding, root_cause

MAX_BLOCKS = 4096
BATCHES_PER_TASK = 4
# Ray Data's cluster autoscaler, read when an execution starts. Ray 2.60's default ("RATE_BASED") shares the
# cluster between concurrent executions by their measured rates: with one task-based decode execution per Train
# worker, each was starved of CPUs in turn ("Cluster resources are not enough to run any task"), and the coordinator
# traffic took the training processes' CPU: the end-to-end benchmark fell to 0.24x its DDP baseline. "V2" (the
# previous default) measured 1.02x, as the actor pool did (benchmarks/results/2026-12-06.md). A value set in the
# environment wins.
RAY_DATA_AUTOSCALER = ("RAY_DATA_CLUSTER_AUTOSCALER", "V2")


@dataclass
class ClipSpec:
    """Everything a decoder needs to turn a manifest row into clips (a plain dict on the wire)."""

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
    storage_retry_s: float | None = None  # None: video.STORAGE_RETRY_S (what data.storage_retry_s defaults to)
    witnesses: list[str] = field(default_factory=list)  # local videos seen where the dataset was built
    counter_split: str = "train"  # key under which drops are counted

    @classmethod
    def from_config(cls, cfg: DataConfig, **kwargs: Any) -> ClipSpec:
        return cls(flip=cfg.flip, flip_pairs=[list(p) for p in cfg.flip_pairs], flip_p=cfg.flip_p,
                   crop_scale=list(cfg.crop_scale), crop_ratio=list(cfg.crop_ratio), grayscale_p=cfg.grayscale_p,
                   min_frames=cfg.min_frames, decode_short_side=cfg.decode_short_side,
                   decode_resize_threshold=cfg.decode_resize_threshold, decode_threads=cfg.decode_threads,
                   storage_retry_s=cfg.storage_retry_s, **kwargs)

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
                          num_threads=spec.decode_threads, storage_retry_s=spec.storage_retry_s,
                          witnesses=spec.witnesses)
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


def decode_failure(exc: BaseException) -> TooManyBadVideos | StorageUnreachable | None:
    """The decoders' own error (too many bad videos, or a bucket that stopped answering) out of Ray's wrapping
    (RayTaskError(UserCodeException), whose chain is only text), re-raised by the driver with its message alone;
    None for any other error."""
    cause = root_cause(exc)
    for kind in (TooManyBadVideos, StorageUnreachable):
        if cause.startswith(f"{kind.__name__}: "):
            return kind(cause.removeprefix(f"{kind.__name__}: "))
    return None


def decode_clips(batch: dict[str, np.ndarray], spec: dict[str, Any], counter: Any = None) -> pa.Table:
    """Ray Data task UDF: `decode_batch`, each dropped video reported to the DropCounter actor `counter`, which
    answers with an error once the split's bad fraction passes its limit (raised here as TooManyBadVideos).

    A task, not an actor pool: Ray keeps its idle task workers (imports done) between executions, and a dataset is
    executed once per epoch and per validation. An actor pool started new decoder processes each time, ~3 s of
    every epoch boundary and validation on 2 cores, which dominated fine-tuning on small datasets."""
    clip_spec = ClipSpec(**spec)

    def on_drop(video_index: int, path: str, reason: str, detail: str) -> None:
        if counter is None:
            return
        import ray

        error = ray.get(counter.report.remote(clip_spec.counter_split, clip_spec.epoch, video_index, path, reason,
                                              detail))
        if error:
            raise TooManyBadVideos(error)

    return clips_to_table(decode_batch(batch, clip_spec, on_drop))


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


def manifest_blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    """Cut the manifest into blocks of `rows` videos, one decode task each (more rows per block only beyond
    MAX_BLOCKS blocks)."""
    n = table.num_rows
    rows = max(1, rows, math.ceil(n / MAX_BLOCKS))
    return [table.slice(i, rows) for i in range(0, n, rows)]


def decode_block_rows(videos: int, batch_size: int, pool: int) -> int:
    """Videos per decode task: up to BATCHES_PER_TASK map_batches calls, fewer when that would leave some of the
    `pool` decoders without a block, never under one call. Each task pays its own scheduling: with one 8-video call
    per task, a quarter of the machine stayed idle and Ray Data fell to 0.74x the DataLoader's clips/s; with four
    calls per task it is back at or above it (benchmarks.ingest, results/2026-12-06.md)."""
    return max(batch_size, min(batch_size * BATCHES_PER_TASK, math.ceil(videos / max(1, pool))))


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
    augment_seed: int | None = None,
    positions: np.ndarray | None = None,
    avoid_nodes: Sequence[str] = (),
) -> Any:
    """A streaming ray.data.Dataset of clips (schema in the module docstring) for one epoch of `manifest`.

    Training rows are shuffled with (seed, epoch); build one dataset per epoch. Drops are counted under
    `counter_split` (default: `split`) and `epoch` in the DropCounter named `cfg.drop_counter`.

    `shard=(rank, world)` keeps every world-th video of the (shuffled) epoch order, so each training worker
    reads its own disjoint part and every video is seen once per epoch; `skip` drops that many videos from the
    front of the shard (resuming inside an epoch). `positions` instead names the positions in the epoch order to read
    (an elastic run's share of what the epoch has left). `augment_seed` (default `seed`) seeds the clips' random
    sampling and augmentation alone: the same videos in the same order, augmented anew."""
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
    if positions is not None:
        if shard is not None or skip:
            raise ValueError("positions replaces shard and skip; pass one or the other")
        table = table.take(pa.array(np.asarray(positions, dtype=np.int64)))
    if shard is not None:
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard {shard} must be (rank, world) with 0 <= rank < world")
        table = table.take(pa.array(shard_rows(table.num_rows, rank, world)))
    if skip:
        table = table.slice(min(skip, table.num_rows))
    key = counter_split or split
    os.environ.setdefault(*RAY_DATA_AUTOSCALER)  # this process runs the execution: it iterates the dataset
    counter = drop_counter(cfg.drop_counter)
    ray.get(counter.register.remote(key, epoch, videos_in_epoch, cfg.max_bad_fraction))
    # A few videos seen here: a decoder on a node whose disk is gone must not drop every video as missing. None
    # here now (the run's start read some, or the builder's checks did): the disk went away before this epoch's
    # dataset was built, and the decoders must wait for any of them.
    paths = loaded.table.column("path").to_pylist()
    witnesses = witness_files(paths) or spread_local_paths(paths)[:3]
    spec = ClipSpec.from_config(cfg, split=split, num_frames=num_frames, crop_size=crop_size, num_views=num_views,
                                num_crops=num_crops, seed=seed if augment_seed is None else augment_seed, epoch=epoch,
                                counter_split=key, witnesses=witnesses)
    pool = decode_pool_size(cfg)
    blocks = manifest_blocks(table, decode_block_rows(table.num_rows, cfg.batch_size, pool))
    ds = ray.data.from_arrow(blocks)
    selector = avoiding(cfg.node_label_selector(), avoid_nodes)  # avoid_nodes: scaling.exclude_nodes
    return ds.map_batches(
        decode_clips,
        fn_kwargs={"spec": asdict(spec), "counter": counter},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        # no more at once than there are blocks (Ray Data warns about a limit it cannot reach)
        compute=ray.data.TaskPoolStrategy(size=max(1, min(pool, len(blocks)))),
        num_cpus=cfg.decode_threads,
        **({"label_selector": selector} if selector else {}),
    )


def shard_rows(rows: int, rank: int, world: int) -> np.ndarray:
    """The rows of `rows` that worker `rank` of `world` reads with `shard=(rank, world)`: every world-th one."""
    return np.arange(rank, rows, world)


def columns_collate(columns: list[str], device: Any = None) -> Any:
    """A collate_fn for `iter_torch_batches` that keeps only `columns` (Ray's default Arrow -> torch conversion).
    Consumers pick their columns here rather than with `Dataset.select_columns`: that adds a Project operator
    behind the decoders, and on a small cluster Ray Data's per-operator CPU reservation for it keeps the
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
