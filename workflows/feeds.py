"""Per-worker clip feeds: what one Ray Train worker iterates for training and for validation.

Each worker builds its own streaming Ray Data pipeline (the ingest layer's `build_clip_dataset`) over its shard
of the epoch's seeded order: rank r reads videos r, r+W, r+2W, ... of the (seed, epoch) permutation, so every
video is decoded once per epoch, the order and augmentation are reproducible from the seed, and a resumed run
continues inside the epoch by skipping the videos the shard already consumed. Decode actors are shared out so
all workers together use the cluster's decode capacity.

Every worker yields exactly the same number of micro-batches per epoch (ranks must step together); if bad
videos leave a shard short, it tops up with re-augmented clips of its own shard.

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
from workflows.data.pipeline import build_clip_dataset, columns_collate
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
    return 0 if data.train_views == 1 else 4 * data.train_views * recipe.train.micro_batch_size


class ClipFeeds:
    """Training and validation batches for one worker (rank of world)."""

    def __init__(self, recipe: Recipe, rank: int, world: int, device: torch.device):
        self.recipe, self.rank, self.world, self.device = recipe, rank, world, device
        self.label_map = load_labels(recipe.data.labels)
        self.train_manifest: Manifest = load_manifest(recipe.data.train_manifest, self.label_map, strict=True)
        self.val_manifest: Manifest = load_manifest(recipe.data.val_manifest, self.label_map, strict=True)
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

    def micro_batches_per_epoch(self) -> int:
        return steps_per_epoch(self.recipe, len(self.train_manifest)) * self.recipe.grad_accum_steps

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches `start`.. of `epoch` for this rank: {"frames": uint8 (B, T_d, S, S, 3), "label": (B,)}."""
        micro = self.recipe.train.micro_batch_size
        views = self.recipe.data.train_views
        shuffle = train_shuffle_clips(self.recipe)
        needed = self.micro_batches_per_epoch() - start
        produced, attempt = 0, 0
        while produced < needed:
            ds = build_clip_dataset(
                self.data_cfg, self.train_manifest, self.label_map, split="train", num_frames=self.num_frames,
                crop_size=self.crop, num_views=views, seed=self.recipe.train.seed + 7919 * attempt, epoch=epoch,
                counter_split="train", shard=(self.rank, self.world),
                skip=(start * micro) // views if attempt == 0 else 0,
            )
            before = produced
            batches = ds.iter_torch_batches(
                batch_size=micro, drop_last=True, device=self.device,
                collate_fn=columns_collate(["frames", "label"], self.device),
                local_shuffle_buffer_size=shuffle or None,
                local_shuffle_seed=_seed(self.recipe.train.seed, epoch, self.rank, attempt) if shuffle else None)
            for batch in batches:
                yield batch
                produced += 1
                if produced >= needed:
                    return
            if produced == before:
                raise RuntimeError(f"rank {self.rank}: its shard of the training set yields no clips in epoch "
                                   f"{epoch}; check the data with `python -m workflows data check`")
            attempt += 1

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
            shard=(self.rank, self.world),
        )
        cache: list[dict[str, torch.Tensor]] | None = [] if ev.cache_val_clips else None
        size = 0
        for batch in ds.iter_torch_batches(batch_size=ev.batch_size, device=self.device,
                                           collate_fn=columns_collate(["frames", "label", "video_index"], self.device)):
            yield batch
            if cache is not None:
                size += batch["frames"].numel()
                cache = None if size > ev.cache_limit_mb * 2**20 else cache
            if cache is not None:  # host memory, not the GPU's: the cache may hold eval.cache_limit_mb
                pin = self.device.type == "cuda"
                cache.append({k: (v.cpu().pin_memory() if pin else v.cpu()) for k, v in batch.items()})
        self._val_cache = cache


def drop_summary(report: Any) -> dict[str, float]:
    """Dropped-video counts of a DropReport as metrics: dropped_total and dropped_<reason>."""
    metrics = {"dropped_total": float(report.total_dropped)}
    metrics.update({f"dropped_{reason}": float(n) for reason, n in report.dropped.items()})
    return metrics
