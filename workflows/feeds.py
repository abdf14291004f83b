"""Per-worker clip feeds: what one Ray Train worker iterates for training and for validation.

Each worker builds its own streaming Ray Data pipeline (the ingest layer's `build_clip_dataset`) over its shard
of the epoch's seeded order: rank r reads videos r, r+W, r+2W, ... of the (seed, epoch) permutation, so every
video is decoded once per epoch and the order and augmentation are reproducible from the seed. A resumed run,
at the same or another number of workers, shares out only what the epoch has left: checkpoints count the clips
trained on per video (workflows/elastic.py). Decoders are shared out so all workers together use the
cluster's decode capacity (recomputed at every start, so after a resize too).

Every worker yields exactly the same number of micro-batches per epoch (ranks must step together); if bad
videos leave a shard short, it tops up with re-augmented clips of its own shard's good videos (a shard with none
borrows from the whole set), carrying partial micro-batches over, so training runs while any video decodes.

Why not Train's `datasets=` / `get_dataset_shard`: those split one dataset's stream among the workers as it comes, so
no epoch has an order fixed by the seed, and a resumed run cannot continue inside an epoch where it stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from workflows.data.decode_nodes import decode_pool_size
from workflows.data.manifest import Manifest, class_names, load_labels, load_manifest
from workflows.data.pipeline import build_clip_dataset, columns_collate, shard_rows
from workflows.elastic import BatchPlan, epoch_order, remaining_assignment
from workflows.recipe import Recipe


def steps_per_epoch(recipe: Recipe, train_videos: int) -> int:
    """Optimizer steps in one epoch (the last partial global batch is dropped)."""
    return max(1, train_videos * recipe.data.train_views // recipe.train.global_batch_size)


def total_steps(recipe: Recipe, train_videos: int) -> int:
    if recipe.train.max_steps:
        return recipe.train.max_steps
    return max(1, round(recipe.train.epochs * steps_per_epoch(recipe, train_videos)))


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def train_shuffle_clips(recipe: Recipe) -> int:
    """Clips in each worker's local shuffle buffer (see DataConfig.train_shuffle_clips); 0 = no shuffle."""
    data = recipe.data
    if data.train_shuffle_clips is not None:
        return data.train_shuffle_clips
    return 0 if data.train_views == 1 else 4 * data.train_views * recipe.micro_batch


def validation_videos(recipe: Recipe, manifest: Manifest) -> Manifest:
    """The videos training-time validation reads: all of `manifest`, or eval.max_videos of them (a stratified
    subset seeded by train.seed: the same on every worker and at every validation)."""
    if not recipe.eval.max_videos:
        return manifest
    return manifest.stratified_subset(recipe.eval.max_videos, recipe.train.seed)


class ClipFeeds:
    """Training and validation batches for one worker (rank of world)."""

    def __init__(self, recipe: Recipe, rank: int, world: int, device: torch.device,
                 label_map: dict[str, int] | None = None):
        """`label_map`: the recipe's labels when the caller has read them already."""
        self.recipe, self.rank, self.world, self.device = recipe, rank, world, device
        self.plan = recipe.batch_plan(world)
        self.label_map = label_map if label_map is not None else load_labels(recipe.data.labels)
        self.train_manifest: Manifest = load_manifest(recipe.data.train_manifest, self.label_map, strict=True)
        self.val_manifest: Manifest = validation_videos(
            recipe, load_manifest(recipe.data.val_manifest, self.label_map, strict=True))
        # This worker's share of the decode pool: the workers' pipelines run side by side.
        data = recipe.data
        share = max(1, (data.decode_actors or decode_pool_size(data)) // world)
        self.data_cfg = dataclasses.replace(data, decode_actors=share)
        self._val_cache: list[dict[str, torch.Tensor]] | None = None
        cfg = recipe.model_cfg
        self.num_frames, self.crop = cfg.num_frames, cfg.image_size

    @property
    def class_names(self) -> list[str]:
        return class_names(self.label_map)

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.recipe, len(self.train_manifest))

    def train_batches(self, epoch: int, steps: int | None = None,
                      consumed: np.ndarray | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches for `steps` optimizer steps of `epoch` (default: all of them):
        {"frames": uint8 (B, T_d, S, S, 3), "label": (B,), "video_index": (B,)}, `plan.accum` per step sized
        `plan.micro_sizes(rank)` (ranks must step together). `consumed` counts the clips of each video the epoch
        has already trained on (a resumed run), so only what is left is read. Clips carry over between the passes of
        `_train_clips`: no partial micro-batch is dropped."""
        plan = self.plan
        steps = self.steps_per_epoch() if steps is None else steps
        sizes = plan.micro_sizes(self.rank)
        pending: list[dict[str, torch.Tensor]] = []  # clips not yet in a micro-batch
        clips = self._train_clips(epoch, plan, consumed)
        for index in range(steps * plan.accum):
            size = sizes[index % plan.accum]
            while sum(len(b["label"]) for b in pending) < size:
                pending.append(next(clips))
            merged = pending[0] if len(pending) == 1 else {k: torch.cat([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:size] for k, v in merged.items()}
            rest = {k: v[size:] for k, v in merged.items()}
            pending = [rest] if len(rest["label"]) else []
        clips.close()

    def _train_clips(self, epoch: int, plan: BatchPlan,
                     consumed: np.ndarray | None) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's clips of `epoch`, without end: its share of what the epoch has left (`remaining_assignment`;
        at the start of an epoch of an even plan, videos rank, rank + W, ... of the epoch order), then its share of
        the whole epoch again and again with fresh augmentation (bad videos left it short). A rank with no good
        video in its share borrows re-augmented clips of the whole training set; only an epoch where no video
        decodes fails."""
        seed, views, n = self.recipe.train.seed, self.recipe.data.train_views, len(self.train_manifest)
        order = epoch_order(n, seed, epoch)
        fresh = np.zeros(n, dtype=np.int32)
        left = remaining_assignment(order, fresh if consumed is None else consumed, views, plan, self.rank)
        # Videos some of whose clips were trained on before the checkpoint: only the rest of their clips count.
        partial = {} if consumed is None else {int(v): int(consumed[v]) for v in order[left] if consumed[v] > 0}
        got = 0
        first = self._iterate(self._train_dataset(epoch, seed, left), shuffle_key=(epoch, self.rank, 0)) \
            if len(left) else iter(())
        for batch in first:
            got += len(batch["label"])
            yield _without_used_clips(batch, partial) if partial else batch
        if len(left):
            self._check_pass_complete(epoch, order[left], got)
        own = remaining_assignment(order, fresh, views, plan, self.rank)
        sources: list[np.ndarray | None] = [own, None]  # this rank's share, then all videos
        if got == 0 and len(left) == len(own):
            sources.pop(0)  # the whole share was read and gave nothing: no good video there
        attempt = 1
        while sources:
            share = sources[0]
            if share is not None and not len(share):  # more ranks than videos: nothing of its own
                sources.pop(0)
                continue
            augment = seed + 7919 * attempt + (0 if share is not None else 104729 * (self.rank + 1))
            got = 0
            # The shuffle key of the shard's passes is what it was before top-ups existed: the demo's accuracy turned
            # out to swing with it (64.8% vs 41.1% val top-1 with another key, same code otherwise).
            key = (epoch, self.rank, attempt) if share is not None else (epoch, self.rank, attempt, 1)
            for batch in self._iterate(self._train_dataset(epoch, augment, share), shuffle_key=key):
                got += len(batch["label"])
                yield batch
            if got == 0:
                sources.pop(0)  # a whole pass gave nothing: no good video there
            attempt += 1
        raise RuntimeError(f"no video of the training set decodes in epoch {epoch} (rank {self.rank} found none in its "
                           f"shard nor in the whole set); check the data with `python -m workflows data check`")

    def _check_pass_complete(self, epoch: int, videos: np.ndarray, got: int) -> None:
        """IncompleteEpoch unless this rank's share of `epoch` (`videos`, read once through) gave `data.train_views`
        clips of each video its decoders did not drop: a pipeline that ended early would be topped up with other
        clips as if its videos were bad, and the epoch would skip them unsaid."""
        from workflows.data.drops import get_dropped_videos

        views = self.recipe.data.train_views
        if got >= views * len(videos):
            return
        dropped = get_dropped_videos("train", epoch, name=self.recipe.data.drop_counter)
        expected = views * sum(int(v) not in dropped for v in videos)
        if got < expected:
            raise IncompleteEpoch(
                f"rank {self.rank}'s training data of epoch {epoch} ended after {got} of the {expected} clips of its "
                f"{len(videos)} videos ({len(videos) - expected // views} dropped; an error of its decoders above may "
                f"say why): the run restarts from its newest complete checkpoint rather than skip them")

    def _train_dataset(self, epoch: int, augment_seed: int, positions: np.ndarray | None) -> Any:
        """Clips of the videos at `positions` of the epoch order (None: all of them)."""
        return build_clip_dataset(
            self.data_cfg, self.train_manifest, self.label_map, split="train", num_frames=self.num_frames,
            crop_size=self.crop, num_views=self.recipe.data.train_views, seed=self.recipe.train.seed, epoch=epoch,
            counter_split="train", positions=positions, augment_seed=augment_seed,
            avoid_nodes=self.recipe.scaling.exclude_nodes)

    def _iterate(self, ds: Any, shuffle_key: tuple[int, ...]) -> Iterator[dict[str, torch.Tensor]]:
        """A dataset's clips in micro-batches (the last may be partial), through the local shuffle buffer."""
        shuffle = train_shuffle_clips(self.recipe)
        # On a GPU the uint8 clips go through pinned host memory and Ray copies them to the device without blocking,
        # in its prefetch thread: the next micro-batch is on its way while the step runs.
        yield from ds.iter_torch_batches(
            batch_size=self.recipe.micro_batch, drop_last=False, device=self.device,
            collate_fn=columns_collate(["frames", "label", "video_index"], self.device),
            pin_memory=self.device.type == "cuda", prefetch_batches=1,
            local_shuffle_buffer_size=shuffle or None,
            local_shuffle_seed=_seed(self.recipe.train.seed, *shuffle_key) if shuffle else None)

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's validation clips (each video exactly once over all ranks, `eval.views` views each)."""
        if self._val_cache is not None:
            for batch in self._val_cache:  # kept in host memory; on a GPU, copied over again for each validation
                yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            return
        ev = self.recipe.eval
        ds = build_clip_dataset(
            self.data_cfg, self.val_manifest, self.label_map, split="eval", num_frames=self.num_frames,
            crop_size=self.crop, num_views=ev.views, seed=self.recipe.train.seed, epoch=0, counter_split="val",
            shard=(self.rank, self.world), avoid_nodes=self.recipe.scaling.exclude_nodes,
        )
        cache: list[dict[str, torch.Tensor]] | None = [] if ev.cache_val_clips else None
        size, seen = 0, set()
        for batch in ds.iter_torch_batches(batch_size=ev.batch_size, device=self.device,
                                           collate_fn=columns_collate(["frames", "label", "video_index"], self.device)):
            seen.update(batch["video_index"].tolist())
            yield batch
            if cache is not None:
                size += batch["frames"].numel()
                cache = None if size > ev.cache_limit_mb * 2**20 else cache
            if cache is not None:  # host memory, not the GPU's: the cache may hold eval.cache_limit_mb
                pin = self.device.type == "cuda"
                cache.append({k: (v.cpu().pin_memory() if pin else v.cpu()) for k, v in batch.items()})
        self._check_val_complete(seen)
        self._val_cache = cache

    def val_shard(self) -> list[int]:
        """The video indices of this rank's validation videos, as `build_clip_dataset` shards them."""
        table = self.val_manifest.table
        return table.column("video_index").take(shard_rows(table.num_rows, self.rank, self.world)).to_pylist()

    def _check_val_complete(self, seen: set[int]) -> None:
        """IncompleteValidation unless every video of this rank's share came out of the pipeline or was dropped
        (the drop counter has it): a validation over part of the set must never be reported as the whole."""
        from workflows.data.drops import get_dropped_videos

        expected = self.val_shard()
        missing = [v for v in expected if v not in seen]
        if missing:
            dropped = get_dropped_videos("val", 0, name=self.recipe.data.drop_counter)
            missing = [v for v in missing if v not in dropped]
        if missing:
            paths = self.val_manifest.table.column("path").to_pylist()
            where = dict(zip(self.val_manifest.table.column("video_index").to_pylist(), paths, strict=True))
            raise IncompleteValidation(
                f"rank {self.rank}'s validation data ended before {len(missing)} of its {len(expected)} videos were "
                f"decoded or counted as dropped (e.g. {where[missing[0]]}; an error of its decoders above may say "
                f"why). A validation of part of the set is not reported: the run restarts from its newest complete "
                f"checkpoint")


class IncompleteValidation(RuntimeError):
    """A rank's validation pipeline ended without every video of its share (neither scored nor dropped)."""


class IncompleteEpoch(RuntimeError):
    """A rank's training pipeline ended without the clips of every video of its share (neither read nor dropped)."""


def _without_used_clips(batch: dict[str, torch.Tensor], used: dict[int, int]) -> dict[str, torch.Tensor]:
    """`batch` less as many clips of each video in `used` as it says (counting down `used` in place)."""
    keep = []
    for i, video in enumerate(batch["video_index"].tolist()):
        if used.get(video, 0) > 0:
            used[video] -= 1
        else:
            keep.append(i)
    if len(keep) == len(batch["label"]):
        return batch
    index = torch.tensor(keep, dtype=torch.long, device=batch["label"].device)
    return {k: v.index_select(0, index) for k, v in batch.items()}


def drop_summary(report: Any) -> dict[str, float]:
    """Dropped-video counts of a DropReport as metrics: dropped_total and dropped_<reason>."""
    metrics = {"dropped_total": float(report.total_dropped)}
    metrics.update({f"dropped_{reason}": float(n) for reason, n in report.dropped.items()})
    return metrics
