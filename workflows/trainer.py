"""What each Ray Train worker runs: a `Trainer` (setup, train, validate, save_checkpoint, cleanup) over one
`TrainState`.

Each worker builds DiST, wraps it in a DeepSpeed engine (only the trainable part is optimised; the frozen CLIP rides
along without gradients) and trains on its clip feed (feeds.py) with the reference recipe: AdamW, warm-up + cosine per
step, mixup/cutmix/label smoothing and CLIP normalisation on the device (step.py). Validation every N steps is
distributed (each val clip counted once); every validation reports a checkpoint. `TrainState` is everything a
checkpoint must carry to resume; `to_dict`/`from_dict` are the only way it is written and read back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workflows.config_loader import ConfigError, dump_yaml
from workflows.data.shared_disk import blind_node
from workflows.elastic import (
    DRAIN,
    GROW,
    NONE,
    REASONS,
    ResizeWatch,
    blind_node_failure,
    kv_get,
    kv_key,
    kv_put,
    legacy_consumed,
    note_failure,
    take_failure,
    unrestartable_failure,
)
from workflows.recipe import Recipe, recipe_from_dict, recipe_to_dict
from workflows.relaunch import RELAUNCHED
from workflows.runtime import (
    compile_toolchain_problem,
    root_cause,
    storage_of,
    tools_of_this_interpreter_first,
    write_text,
)

LOG_PREFIX = "[pretrain]"
CONSUMED_KEY = "dist_consumed"  # DeepSpeed client state: clips trained on per video in the checkpoint's epoch
PARK_LIMIT_S = 300.0  # after a resize checkpoint, how long past the deadline a worker waits to be restarted
HISTORY_KEYS = ("loss", "lr", "val_top1", "clips_per_s")
# Tests only (make elastic-test): every optimizer step lasts at least this many seconds, so a run's legs (a drain, a
# node added, a node lost, each 20-60 s of Ray's own detection) land inside it on a machine whose tiny steps take
# 0.2 s as on one whose take 2 s. Unset: no pause.
MIN_STEP_S_ENV = "DIST_TEST_MIN_STEP_S"


def seed_and_determinism(seed: int, deterministic: bool) -> None:
    """Seed torch (identical init on every rank; DeepSpeed also broadcasts it) and, when asked, make the kernels
    reproducible (train.deterministic). Before the model and the engine exist: cuBLAS reads its workspace setting when
    its first handle is made."""
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # warn_only: an op without a deterministic kernel (e.g. some CUDA scatter/interpolate backwards) warns once
        # instead of stopping a run that was asked to be reproducible where it can be
        torch.use_deterministic_algorithms(True, warn_only=True)


def _empty_history() -> dict[str, list[tuple[int, float]]]:
    return {key: [] for key in HISTORY_KEYS}


@dataclass
class TrainState:
    """Where a run stands: written into every checkpoint's state.json, read back on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    epoch_steps: int = 0  # optimizer steps done in `epoch` (0 at an epoch boundary)
    world_size: int = 0  # the number of workers that wrote it (0: not saved yet)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=_empty_history)  # (step, value) per curve
    # the best validation by eval.best_metric: {metric: value, "step": its step} ({} before the first)
    best: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    resumed_from_step: int | None = None  # the step this attempt resumed at (None: it started fresh)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (history pairs as lists)."""
        data = dataclasses.asdict(self)
        data["history"] = {k: [list(p) for p in v] for k, v in self.history.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """The state of a checkpoint's state.json (other keys there, e.g. metrics or class names, are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in names})
        state.history = {**_empty_history(), **{k: [tuple(p) for p in v] for k, v in state.history.items()}}
        return state

    def record_validation(self, metrics: dict[str, float], best_metric: str) -> None:
        """A validation's `metrics` into the history, and into `best` when it beats it by `best_metric` (a NaN
        never does; a best without that metric, such as an older checkpoint's, is beaten by any other)."""
        from workflows.checkpoints import metric_score

        self.history["val_top1"].append((self.step, metrics["val_top1"]))
        if metric_score(metrics, best_metric) > metric_score(self.best, best_metric):  # -inf for NaN or none
            self.best = {best_metric: metrics[best_metric], "step": self.step}

    def best_note(self, best_metric: str) -> str:
        """"best 61.25% at step 40" ("best val_file_top1 ..." when not ranked by val top-1)."""
        if best_metric not in self.best or "step" not in self.best:
            return f"no {best_metric} yet"
        name = "" if best_metric == "val_top1" else f"{best_metric} "
        return f"best {name}{self.best[best_metric]:.2f}% at step {int(self.best['step'])}"


# ---------------------------------------------------------------------------------------------------------------
# progress arithmetic (no Ray, no collectives: unit-tested on its own)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ProgressWindow:
    """What one rank saw since the last progress line. The loss sums on the device (no host sync per step)."""

    device: torch.device
    start: float = field(default_factory=time.perf_counter)
    wait: float = 0.0  # seconds spent waiting for the next batch
    clips: int = 0
    micro_batches: int = 0
    loss_sum: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, clips: int) -> None:
        self.loss_sum = loss.float() if self.loss_sum is None else self.loss_sum + loss.float()
        self.micro_batches += 1
        self.clips += clips

    def totals(self) -> torch.Tensor:
        """[loss sum, micro-batches, clips, wait s, elapsed s]: summed over ranks, they give `progress_stats`."""
        loss = 0.0 if self.loss_sum is None else float(self.loss_sum)
        return torch.tensor([loss, self.micro_batches, self.clips, self.wait, time.perf_counter() - self.start],
                            dtype=torch.float64)


def progress_stats(summed: torch.Tensor, world: int) -> dict[str, float]:
    """Mean loss per micro-batch, clips/s of all ranks over the mean wall time, and the share of time spent
    waiting for data, from `ProgressWindow.totals()` summed over `world` ranks."""
    loss_sum, micro_batches, clips, wait, elapsed = (float(v) for v in summed)
    return {"loss": loss_sum / max(1.0, micro_batches),
            "clips_per_s": clips / max(1e-9, elapsed / world),
            "data_wait_fraction": wait / max(1e-9, elapsed)}


def eta_minutes(step: int, total: int, steps_this_attempt: int, seconds_this_attempt: float) -> float:
    """Minutes to `total` at this attempt's mean pace (infinite before the first step)."""
    rate = steps_this_attempt / max(1e-9, seconds_this_attempt)
    return (total - step) / max(1e-9, rate) / 60


# ---------------------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------------------


class Trainer:
    """One rank of a training run. Every rank runs the same calls in the same order: several of them are
    collectives (validation counts, progress stats, `master_weights` under ZeRO, `ray.train.report`)."""

    def __init__(self, recipe: Recipe, *, rank: int, world: int, device: torch.device,
                 mlflow_parent_run_id: str | None = None):
        self.recipe, self.rank, self.world, self.device = recipe, rank, world, device
        self.mlflow_parent_run_id = mlflow_parent_run_id
        self.state = TrainState(world_size=world)
        self.published = False  # final results (artifacts, MLflow run closed) published
        self.min_step_s = float(os.environ.get(MIN_STEP_S_ENV) or 0)  # tests only: see MIN_STEP_S_ENV
        self._paced_at: float | None = None
        self.checkpoint_seconds: float | None = None  # how long the last checkpoint took (for a drain deadline)
        self.probe_note: str | None = None  # what train.micro_batch_size auto found, for the run's records

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"{LOG_PREFIX} {message}", flush=True)

    # --- setup ---

    def setup(self, checkpoint: Any = None) -> None:
        """Model, feeds, optimizer + schedule in a DeepSpeed engine, resume from `checkpoint` (a Ray Train
        Checkpoint or None), tracking."""
        from workflows.data.shared_disk import check_run_dir_seen

        recipe = self.recipe
        check_run_dir_seen(recipe.run_dir, recipe.data.storage_retry_s)  # this node writes checkpoints there
        seed_and_determinism(recipe.train.seed, recipe.train.deterministic)
        if recipe.train.deterministic:  # what the worker's torch now says, not what was asked
            self.log(f"train.deterministic: cudnn.deterministic {torch.backends.cudnn.deterministic}, "
                     f"deterministic algorithms {torch.are_deterministic_algorithms_enabled()} (slower on GPU)")
        if not recipe.scaling.use_gpu:
            torch.set_num_threads(max(1, int(recipe.scaling.cpus_per_worker)))
        self._build_model(init=checkpoint is None)
        self._build_engine()
        videos = len(self.feeds.train_manifest)
        # Clips trained on per video in the current epoch: before this attempt (from the checkpoint), and by this
        # rank since (summed over ranks into every checkpoint: a restart at any size reads only what is left).
        self.consumed_before = np.zeros(videos, dtype=np.int32)
        self.consumed_here = torch.zeros(videos, dtype=torch.int32, device=self.device)
        self.watch = ResizeWatch(recipe.run_dir, self.rank, self.world)
        previous_world = None
        if checkpoint is not None:
            previous_world = self.resume(checkpoint)
        self.state.world_size = self.world
        self._open_tracker()
        if checkpoint is not None:
            self._note_restart(previous_world)

    def _build_model(self, init: bool) -> None:
        import logging

        from dist_model import build_dist, build_spatial_only
        from workflows.checkpoints import init_model_from
        from workflows.data.manifest import class_names, load_labels
        from workflows.feeds import ClipFeeds

        recipe = self.recipe
        build = build_spatial_only if recipe.model.variant == "spatial_only" else build_dist
        # which CLIP and activation each rank builds is the same line on every rank: rank 0's is enough
        logging.getLogger("dist_model").setLevel(logging.INFO if self.rank == 0 else logging.WARNING)
        self.model = build(recipe.model_cfg)
        if recipe.train.init_from and init:
            self.log(init_model_from(self.model, recipe.train.init_from))
        self.model.to(self.device)
        label_map = load_labels(recipe.data.labels)
        self.class_names = class_names(label_map)
        # Training and validation score one label set: embed it once, then free the text tower (63 M parameters at
        # B/16, 123 M at L/14) that no step reads.
        self.model.text_embeddings(self.class_names, self.device)
        freed = self.model.clip.release_text_tower()
        self.log(f"cached {len(self.class_names)} class embeddings; released CLIP's text tower "
                 f"({freed / 1e6:.1f} M parameters)")
        if recipe.train.micro_batch_size == "auto":
            self._probe_micro_batch()  # eager, before anything is compiled
        self.plan = self.recipe.batch_plan(self.world)  # this size's share of each step's global batch
        self.feeds = ClipFeeds(self.recipe, self.rank, self.world, self.device, label_map)
        from workflows.metrics import FileIndex

        val_rows = self.feeds.val_manifest.table
        # a validation set of clips cut from longer files: each file is scored as a whole too (val_file_*)
        self.val_files = FileIndex.of(val_rows.column("path").to_pylist(), val_rows.column("label").to_pylist())
        parts = recipe.train.compile
        if parts != "off":
            backend = recipe.train.compile_backend
            problem = compile_toolchain_problem(recipe.scaling.use_gpu, backend)
            if problem:
                import ray

                raise ConfigError(f"train.compile on node {ray.util.get_node_ip_address()}: {problem}")
            mode = "reduce-overhead" if recipe.train.cuda_graphs else None
            if parts in ("branch", "all"):
                self.model.compile_trainable(mode, backend=backend)
            if parts in ("frozen", "all"):
                self.model.clip.compile_forward(mode, backend=backend)
            what = {"branch": "the trainable branch", "frozen": "the frozen CLIP's forward",
                    "all": "the frozen CLIP's forward and the trainable branch"}[parts]
            graphs = ", with CUDA graphs" if recipe.train.cuda_graphs else ""
            cost = "a minute or more on a few CPU cores" if backend == "inductor" else \
                f"backend {backend}: traced, eager kernels, no speed-up"
            self.log(f"train.compile: {what} compiled at the first step{graphs} ({cost})")

    def _probe_micro_batch(self) -> None:
        """train.micro_batch_size auto: the largest micro-batch every rank's device holds (workflows/micro_batch.py),
        probed once per run (kept in the GCS store: a restart at another size reuses it), then the micro-batch for
        this size's share of the global batch."""
        import ray.train
        import torch.distributed as dist

        from dist_model import PRECISION_DTYPES
        from workflows.micro_batch import (
            MemoryGauge,
            agreed_cap,
            find_micro_batch,
            micro_for_share,
            probe_in_dtype,
            probe_runner,
        )

        recipe, cfg = self.recipe, self.recipe.model_cfg
        share = -(-recipe.train.global_batch_size // self.world)  # the largest rank share
        gauge = MemoryGauge(self.device, workers_on_node=ray.train.get_context().get_local_world_size())
        key = kv_key(recipe.run_dir, "micro_batch_probe")
        known: list[Any] = [kv_get(key) if self.rank == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(known, src=0)  # every rank takes the same branch (the probe has a collective)
        record = known[0]
        # What the memory depends on: a relaunch of the run with another model or precision probes again.
        fingerprint = json.dumps([gauge.name(), recipe.precision(), recipe_to_dict(recipe)["model"]], sort_keys=True)
        if record and record.get("fingerprint") == fingerprint and (record["memory_bound"] or record["cap"] >= share):
            cap, how = int(record["cap"]), f"probed before on {record['device']}: {record['summary']}"
        else:
            dtype = PRECISION_DTYPES[recipe.precision()]
            run = probe_runner(self.model, self.class_names, recipe.train, dtype, self.device, cfg.num_frames,
                               cfg.image_size)
            found = probe_in_dtype(self.model, dtype, lambda: find_micro_batch(run, gauge, limit=share))
            cap = agreed_cap(found.cap, self.device)
            how = f"probed on {gauge.name()} (rank 0): {found.summary()}"
            if cap < found.cap:
                how += f"; {cap} on the tightest rank"
            if self.rank == 0:
                kv_put(key, {"device": gauge.name(), "fingerprint": fingerprint, "cap": cap,
                             "memory_bound": found.memory_bound or cap < share, "summary": found.summary()})
        micro = micro_for_share(share, cap)
        self.recipe = recipe.with_probed_micro_batch(micro)
        self.probe_note = f"micro-batch {micro} (auto; {how})"
        self.log(f"train.micro_batch_size auto: {self.probe_note}")

    def _build_engine(self) -> None:
        import deepspeed

        from dist_model import PRECISION_DTYPES
        from workflows.checkpoints import install_safe_checkpoint_engine
        from workflows.feeds import steps_per_epoch, total_steps
        from workflows.optim import build_deepspeed_config, lr_at

        recipe, train = self.recipe, self.recipe.train
        videos = len(self.feeds.train_manifest)
        self.per_epoch, self.total = steps_per_epoch(recipe, videos), total_steps(recipe, videos)
        warmup = round(train.warmup_epochs * self.per_epoch)
        if train.max_steps and warmup > self.total // 5:  # documented in TrainSection.warmup_epochs
            self.log(f"warm-up capped at {self.total // 5} of {warmup} steps: train.max_steps={train.max_steps} is "
                     f"set, and warm-up takes at most a fifth of the steps")
            warmup = self.total // 5
        peak = recipe.peak_lr
        # On a GPU, torch's fused AdamW: one kernel for each flat ZeRO partition, no per-parameter Python loop.
        optimizer = torch.optim.AdamW(self.model.param_groups(train.weight_decay), lr=peak, betas=tuple(train.betas),
                                      fused=True if self.device.type == "cuda" else None)
        for group in optimizer.param_groups:
            group.pop("name", None)  # DeepSpeed's ZeRO wrapper copies groups; keep only torch's keys

        def factor(step: int) -> float:  # LambdaLR scales the optimizer's lr (= peak) by this factor
            return 0.0 if peak <= 0 else lr_at(step, peak=peak, total=self.total, warmup=warmup,
                                               start=train.warmup_start_lr, floor=train.min_lr) / peak

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=build_deepspeed_config(recipe, self.world),
                                                    dist_init_required=False)
        install_safe_checkpoint_engine(self.engine)
        self.dtype = PRECISION_DTYPES[recipe.precision()]

    def resume(self, checkpoint: Any) -> int:
        """Load the engine (weights, optimizer, schedule; ZeRO's optimizer state re-partitioned when the number of
        workers changed), the TrainState and the epoch's consumed clips of a Ray Train checkpoint. Returns the
        number of workers that wrote it."""
        from workflows.checkpoints import (
            DS_TAG,
            CorruptCheckpoint,
            check_written_bytes,
            read_state,
            restore_full_optimizer_state,
            unreadable_checkpoint,
        )

        try:
            with checkpoint.as_directory() as directory:
                check_written_bytes(directory, checkpoint.path)
                previous_world = int(read_state(directory).get("world_size") or self.recipe.scaling.min_workers)
                if previous_world == self.world:
                    _, client = self.engine.load_checkpoint(directory, tag=DS_TAG, load_module_strict=False)
                else:  # ZeRO's partitioned optimizer files fit only their own world size: the whole state instead
                    _, client = self.engine.load_checkpoint(directory, tag=DS_TAG, load_module_strict=False,
                                                            load_optimizer_states=False)
                    restore_full_optimizer_state(self.engine, self.model, directory)
        except CorruptCheckpoint:
            raise
        except Exception as exc:  # a checkpoint whose bytes cannot be read: every restart would read them again
            corrupt = unreadable_checkpoint(checkpoint.path, exc)
            if corrupt is None:
                raise
            raise corrupt from None  # its message carries the loader's complaint; the root cause is this
        # torch restores the saved lr peak (the scheduler's base_lrs), betas and weight decay with the optimizer:
        # a relaunch with a changed lr trained on with the old one while every record showed the new.
        train = self.recipe.train
        apply_recipe_hyperparameters(self.engine.lr_scheduler, self.recipe.peak_lr, tuple(train.betas),
                                     [g["weight_decay"] for g in self.model.param_groups(train.weight_decay)])
        saved = client["dist_state"]
        self.state = TrainState.from_dict(saved)
        self.state.resumed_from_step = self.state.step
        consumed = client.get(CONSUMED_KEY)
        if consumed is not None and len(consumed) == len(self.consumed_before):
            self.consumed_before = consumed.numpy().astype(np.int32)
        elif consumed is not None:
            self.log(f"the checkpoint counts {len(consumed)} training videos, the manifest lists "
                     f"{len(self.consumed_before)}: epoch {self.state.epoch} is read from its start again")
        elif saved.get("position"):  # written before consumed clips were counted: `position` micro-batches per rank
            self._resume_legacy_position(int(saved["position"]), previous_world)
        s = self.state
        self.log(f"resumed from step {s.step} (epoch {s.epoch}, step {s.epoch_steps} of it, "
                 f"{int((self.consumed_before > 0).sum())} videos of it trained on)")
        return previous_world

    def _resume_legacy_position(self, position: int, world: int) -> None:
        recipe = self.recipe
        plan, views = recipe.batch_plan(world), recipe.data.train_views
        self.state.epoch_steps = position // plan.accum
        self.consumed_before = legacy_consumed(len(self.consumed_before), recipe.train.seed, self.state.epoch, world,
                                               position * recipe.micro_batch // views, views)

    def _note_restart(self, previous_world: int | None) -> None:
        """Rank 0: one console line and MLflow record per restart: the old and new size (the old one is the last
        group's that trained, from the GCS store; else the checkpoint's), why (a drain notice or added nodes, when
        the previous group said so; else the error a worker raised, `note_failure`; otherwise a lost worker or node)
        and the steps lost (the last step any attempt reached, from the GCS store, less the step resumed at)."""
        if self.rank != 0:
            return
        run_dir, step = self.recipe.run_dir, self.state.step
        progress = kv_get(kv_key(run_dir, "progress")) or {}
        reached = progress.get("step")
        previous_world = progress.get("world") or previous_world  # the group that stopped, not the checkpoint's
        event = kv_get(kv_key(run_dir, "event")) or {}
        failure = take_failure(run_dir)  # taken even when the event outdoes it: a later failure is not this one
        reason = event.get("reason") or failure or "a worker or node was lost"
        lost = max(0, reached - step) if reached is not None else None
        if event:
            kv_put(kv_key(run_dir, "event"), {})
        if reached is not None:  # this group starts here: a group that fails again before a step loses none
            kv_put(kv_key(run_dir, "progress"), {"step": step, "world": self.world})
        if lost is not None:
            lost_text = f"{lost} step{'s' * (lost != 1)} lost"
        elif reason == RELAUNCHED:  # a new Ray session: the previous launch's progress record went with its cluster
            lost_text = "any steps the previous launch trained past it are trained again"
        else:
            lost_text = "steps lost unknown (no record of progress)"
        self.log(f"restart: {previous_world} -> {self.world} workers ({reason}); resuming at step {step}, {lost_text}")
        self.tracker.log_metrics({"world_size": float(self.world), "restart_steps_lost": float(lost or 0)}, step=step)
        self.tracker.set_tags({f"restart.step_{step}": f"{previous_world} -> {self.world} workers; {reason}; "
                                                       f"{lost_text}"})
        if event.get("changes"):  # MLflow params cannot change: a relaunch's new settings are tags, and its recipe
            self.tracker.set_tags({f"relaunch.step_{step}.changes": "; ".join(event["changes"])[:5000]})
            self.tracker.log_text(dump_yaml(self.recipe), f"recipe_relaunched_at_step_{step}.yaml")

    def _open_tracker(self) -> None:
        """Rank 0's MLflow run: a resumed run continues its own; the others get a no-op tracker."""
        from workflows.tracking import Tracker, resolve_tracking_uri

        recipe, model = self.recipe, self.model
        self.tracker = Tracker(None)
        if self.rank != 0 or not recipe.mlflow.enabled:
            return
        uri = resolve_tracking_uri(recipe.mlflow.tracking_uri, recipe.run_dir)
        self.tracker = Tracker(uri, recipe.mlflow.experiment, run_name=recipe.run.name,
                               run_id=self.state.mlflow_run_id, parent_run_id=self.mlflow_parent_run_id)
        if self.state.mlflow_run_id is None:
            self.tracker.log_params(recipe_to_dict(recipe))
            self.tracker.log_text(dump_yaml(recipe), "recipe.yaml")
            self.tracker.log_metrics({"trainable_params": float(model.num_trainable_params())}, step=0)
        self.state.mlflow_run_id = self.tracker.run_id
        if self.probe_note:  # per (re)start: the micro-batch may differ with the number of workers
            self.tracker.set_tags({"micro_batch_size.auto": self.probe_note})
            self.tracker.log_metrics({"micro_batch_size": float(self.plan.micro)}, step=self.state.step)
        self.log(f"{model.num_trainable_params():,} trainable parameters; {self.total} steps ({self.per_epoch}/epoch), "
                 f"global batch {recipe.train.global_batch_size} = {self.plan.describe()}; peak lr "
                 f"{recipe.peak_lr:.3g}; precision {recipe.precision()}; ZeRO-{recipe.train.zero_stage}")

    # --- training ---

    def train(self) -> None:
        """Train from the state's position to the last step, validating and checkpointing on the way."""
        from workflows.step import train_micro_step

        recipe, state, plan = self.recipe, self.state, self.plan
        mix_gen = torch.Generator().manual_seed(recipe.train.seed * 1000 + self.rank + 7 * state.step)
        self.engine.train()
        self.window = ProgressWindow(self.device)
        self.attempt_start, self.attempt_first_step = time.perf_counter(), state.step
        self.audit: list[int] = []  # the step's video indices, with train.data_audit_dir
        while state.step < self.total:
            fetch_start, micro = time.perf_counter(), 0
            steps_left = self.per_epoch - state.epoch_steps
            for batch in self.feeds.train_batches(state.epoch, steps_left, self.consumed_before):
                self.window.wait += time.perf_counter() - fetch_start
                clips = batch["frames"].shape[0]
                weight = 1.0 if plan.even else plan.loss_weight(clips)
                loss = train_micro_step(self.engine, batch, self.class_names, recipe.train, self.dtype, mix_gen,
                                        loss_weight=weight)
                self.window.add(loss, clips=clips)
                videos = batch["video_index"].to(self.device)
                self.consumed_here.index_add_(0, videos, torch.ones_like(videos, dtype=torch.int32))
                if recipe.train.data_audit_dir:
                    self.audit += batch["video_index"].tolist()
                micro += 1
                if micro % plan.accum == 0 and self._end_step():
                    break
                fetch_start = time.perf_counter()

    def _end_step(self) -> bool:
        """After an optimizer step: progress, epoch rollover, validation + checkpoint, and a checkpoint before a
        resize the ranks agreed on. True when the feed must restart (a new epoch, or the last step)."""
        recipe, state = self.recipe, self.state
        state.step += 1
        state.epoch_steps += 1
        self._write_audit()
        self._maybe_inject_failure()
        self._pace_for_tests()
        verdict, deadline = self.watch.poll()  # a collective: every rank, every step
        if self.rank == 0:  # how far this attempt got: a restart tells the steps it lost
            kv_put(kv_key(recipe.run_dir, "progress"), {"step": state.step, "world": self.world})
        final = state.step == self.total
        if state.step % recipe.train.log_every_steps == 0 or final:
            self.log_progress()
        epoch_done = state.epoch_steps >= self.per_epoch
        if epoch_done:  # checkpoints taken now must point at the start of the next epoch
            state.epoch, state.epoch_steps = state.epoch + 1, 0
            self.consumed_before[:] = 0
            self.consumed_here.zero_()
        validated = state.step % (recipe.eval.every_steps or self.per_epoch) == 0 or final
        if validated:
            self.validate_and_checkpoint()
        if verdict != NONE and not final:
            self._checkpoint_and_park(verdict, deadline, checkpointed=validated)
        return epoch_done or final

    def _write_audit(self) -> None:
        """train.data_audit_dir: this rank's video indices of the step, one JSON line per step."""
        directory = self.recipe.train.data_audit_dir
        if not directory:
            return
        state = self.state
        group = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"  # one per worker group start
        record = {"time": time.time(), "group": group, "attempt_start_step": self.attempt_first_step,
                  "step": state.step, "epoch": state.epoch,
                  "rank": self.rank, "world": self.world, "videos": self.audit}
        Path(directory).mkdir(parents=True, exist_ok=True)
        with open(Path(directory) / f"rank_{self.rank}_pid_{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.audit = []

    def _checkpoint_and_park(self, verdict: int, deadline: float, checkpointed: bool) -> None:
        """Every rank: checkpoint now (unless the step's validation just did, or a drain deadline leaves no time
        for one), tell the controller side, then wait for Ray Train to stop this worker group and start the next
        (at the drain deadline, or once the grow request is answered). Training on would only make steps that the
        next group, resuming from this checkpoint, repeats."""
        reason, state = REASONS[verdict], self.state
        if verdict == DRAIN and not deadline:  # no deadline given: Ray Train restarts 120 s after the notice
            deadline = time.time() + 120
        needs = 1.5 * (self.checkpoint_seconds or 0.0) + 5.0
        saved = checkpointed
        if not checkpointed and (verdict == GROW or time.time() + needs < deadline):
            no_validation = dict.fromkeys({"val_top1", self.recipe.eval.best_metric}, float("nan"))
            self.save_checkpoint({"step": state.step, "epoch": state.epoch, **no_validation,
                                  "final": 0.0, "resize_checkpoint": 1.0})
            saved = True
        elif not checkpointed:
            self.log(f"{reason}: {deadline - time.time():.0f} s to the deadline, a checkpoint takes ~{needs:.0f} s; "
                     f"the next worker group resumes from the newest complete checkpoint")
        run_dir = self.recipe.run_dir
        if self.rank == 0:
            kv_put(kv_key(run_dir, "event"), {"reason": reason, "step": state.step, "world": self.world})
            if verdict == GROW:
                kv_put(kv_key(run_dir, "grow_ack"), {"step": state.step})
        self.watch.close()
        self.log(f"{reason}: {'checkpointed step ' + str(state.step) if saved else 'no checkpoint'}; waiting for Ray "
                 f"Train to restart the worker group")
        wait_until = (deadline if verdict == DRAIN else time.time()) + PARK_LIMIT_S
        while time.time() < wait_until:
            time.sleep(1.0)
        raise RuntimeError(f"{reason} at step {state.step}: Ray Train did not restart the worker group within "
                           f"{PARK_LIMIT_S:.0f} s; restarting from the newest complete checkpoint")

    def _pace_for_tests(self) -> None:
        """MIN_STEP_S_ENV: sleep what this step took less than `min_step_s`."""
        if not self.min_step_s:
            return
        if self._paced_at is not None:
            time.sleep(max(0.0, self._paced_at + self.min_step_s - time.monotonic()))
        self._paced_at = time.monotonic()

    def _maybe_inject_failure(self) -> None:
        """train.fail_at_step: rank `fail_rank` raises once to exercise recovery. A marker in the run's own storage
        remembers it, so a restart on another node (or with a remote run directory) does not fail again."""
        import pyarrow.fs

        train, step = self.recipe.train, self.state.step
        if train.fail_at_step != step or self.rank != train.fail_rank:
            return
        marker = fail_once_marker(self.recipe)
        fs, fs_path = storage_of(marker)
        if fs.get_file_info(fs_path).type != pyarrow.fs.FileType.NotFound:
            return
        write_text(marker, f"injected failure at step {step}\n")
        raise RuntimeError(f"injected failure at step {step} (train.fail_at_step) on rank {self.rank}")

    def log_progress(self) -> None:
        """One progress line (rank 0) and MLflow metrics from every rank's window (a collective)."""
        from workflows.metrics import all_reduce_sum

        stats = progress_stats(all_reduce_sum(self.window.totals()), self.world)
        state, lr = self.state, self.engine.get_lr()[0]
        for key, value in (("loss", stats["loss"]), ("lr", lr), ("clips_per_s", stats["clips_per_s"])):
            state.history[key].append((state.step, value))
        eta = eta_minutes(state.step, self.total, state.step - self.attempt_first_step,
                          time.perf_counter() - self.attempt_start)
        self.log(f"step {state.step}/{self.total} | epoch {state.epoch} | loss {stats['loss']:.4f} | lr {lr:.3g} | "
                 f"{stats['clips_per_s']:.1f} clips/s | {self.world} workers | data wait "
                 f"{100 * stats['data_wait_fraction']:.0f}% | ETA {eta:.1f} min")
        if self.rank == 0:
            self.tracker.log_metrics({**stats, "lr": lr, "epoch": float(state.epoch), "world_size": float(self.world)},
                                     step=state.step)
        self.window = ProgressWindow(self.device)

    # --- validation and checkpoints ---

    def validate(self) -> dict[str, Any]:
        """Top-1/top-5/mean class accuracy over the whole validation set (each video counted once over all ranks);
        for a validation set of clips, also over its files (`files`: `FileIndex.summary`)."""
        from dist_model import normalize_video
        from workflows.metrics import VideoScores, accuracy_summary, all_reduce_counts, all_reduce_sum

        self.engine.eval()
        scores = VideoScores(len(self.class_names))
        with torch.no_grad():
            for batch in self.feeds.val_batches():
                video = normalize_video(batch["frames"], self.dtype)
                logits = self.engine(video, self.class_names, self.recipe.eval.zero_shot_fusion)
                scores.add(batch["video_index"], logits, batch["label"])
        self.engine.train()
        counts = all_reduce_counts(scores.counts())
        val = {**accuracy_summary(counts), "confusion": counts["confusion"]}
        if self.val_files is not None:
            val["files"] = self.val_files.summary(*(all_reduce_sum(t) for t in self.val_files.sums(scores)))
        return val

    def validate_and_checkpoint(self) -> None:
        """Validate, log, and report a checkpoint. At the last step the final results are published first: a Tune
        scheduler (ASHA at max_t) may stop the trial as soon as the final report lands."""
        state, final = self.state, self.state.step == self.total
        val = self.validate()
        # `final` travels with the report: a sweep's table tells completed from stopped trials by it, wherever the
        # checkpoints are stored.
        metrics = {"step": state.step, "epoch": state.epoch, "val_top1": val["top1"], "val_top5": val["top5"],
                   "val_mean_class_acc": val["mean_class_acc"], "final": float(final)}
        files = val.get("files")
        if files:
            metrics |= {"val_file_top1": files["top1"], "val_file_top5": files["top5"],
                        "val_file_mean_class_acc": files["mean_class_acc"]}
        best_metric = self.recipe.eval.best_metric
        metrics.setdefault(best_metric, float("nan"))  # Ray Train ranks the checkpoints by it: never absent
        state.record_validation(metrics, best_metric)
        per_file = f"; per file top-1 {files['top1']:.2f}% of {int(files['videos'])} files" if files else ""
        self.log(f"validation at step {state.step}: top-1 {val['top1']:.2f}% top-5 {val['top5']:.2f}% "
                 f"({int(val['videos'])} videos{per_file}; {state.best_note(best_metric)})")
        if self.rank == 0:
            self._log_validation(metrics, val if final else None)
        if final:
            self.publish_final_results(metrics)
        self.save_checkpoint(metrics, final=final)

    def _log_validation(self, metrics: dict[str, Any], final_val: dict[str, Any] | None) -> None:
        """Rank 0: validation metrics and drop counts to MLflow; the confusion matrix after the last step."""
        from workflows.data.drops import get_drop_report
        from workflows.feeds import drop_summary
        from workflows.metrics import save_confusion_png

        drops = drop_summary(get_drop_report("train", None, name=self.recipe.data.drop_counter))
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("val_")} | drops,
                                 step=self.state.step)
        if final_val is not None:
            with tempfile.TemporaryDirectory() as tmp:
                png = Path(tmp) / "confusion_matrix.png"
                save_confusion_png(final_val["confusion"], self.class_names, png,
                                   f"validation, step {self.state.step}: top-1 {final_val['top1']:.1f}%")
                self.tracker.log_artifact(png)

    def checkpoint_state(self, metrics: dict[str, Any], final: bool) -> dict[str, Any]:
        """state.json of a checkpoint: the TrainState plus what evaluate / predict / init_from read."""
        return {**self.state.to_dict(), "metrics": metrics, "class_names": self.class_names,
                "model": recipe_to_dict(self.recipe)["model"], "final": final}

    def consumed_clips(self) -> torch.Tensor:
        """Clips trained on per training video in the current epoch, over all ranks and attempts (a collective)."""
        from workflows.metrics import all_reduce_sum

        return torch.from_numpy(self.consumed_before) + all_reduce_sum(self.consumed_here).cpu()

    def save_checkpoint(self, metrics: dict[str, Any], final: bool = False) -> None:
        """Every rank writes its part of a checkpoint, then one `ray.train.report` (a barrier) hands it to Ray."""
        import ray.train

        from workflows.checkpoints import write_checkpoint

        start = time.perf_counter()
        state = self.checkpoint_state(metrics, final)
        consumed = self.consumed_clips()
        with tempfile.TemporaryDirectory(prefix="dist-ckpt-") as tmp:
            write_checkpoint(Path(tmp), engine=self.engine, model=self.model, rank=self.rank, state=state,
                             recipe_yaml=dump_yaml(self.recipe), client_extra={CONSUMED_KEY: consumed},
                             elastic=self.recipe.scaling.elastic)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        self.checkpoint_seconds = time.perf_counter() - start
        self.log(f"checkpoint of step {self.state.step} reported{' (final)' if final else ''}")

    # --- the end ---

    def publish_final_results(self, metrics: dict[str, Any] | None = None) -> None:
        """Final drop report, training curves and the final checkpoint's model files (fp32 weights, state, recipe) to
        MLflow, registered as a new model version, and the MLflow run closed. Every rank calls it: gathering the
        weights is a collective under ZeRO."""
        from workflows.checkpoints import master_weights, write_model_files

        self.published = True
        final_weights = master_weights(self.engine, self.model)
        if self.rank != 0:
            return
        from workflows.data.drops import get_drop_report
        from workflows.metrics import save_curves_png

        drop_report = get_drop_report("train", None, name=self.recipe.data.drop_counter)
        if drop_report.total_dropped:
            self.log(f"dropped videos: {drop_report.summary()}")
        with tempfile.TemporaryDirectory() as tmp:
            curves = Path(tmp) / "training_curves.png"
            save_curves_png(self.state.history, curves)
            self.tracker.log_artifact(curves)
            state = self.checkpoint_state(metrics or {}, final=True)
            write_model_files(Path(tmp) / "final_checkpoint", model=self.model, state=state,
                              recipe_yaml=dump_yaml(self.recipe), weights=final_weights)
            self.tracker.log_artifacts(Path(tmp) / "final_checkpoint", "final_checkpoint")
        self._register_model(metrics or {})
        self.tracker.finish()

    def _register_model(self, metrics: dict[str, Any]) -> None:
        """Rank 0: the final checkpoint as a version of the recipe's registered model, with its validation metrics."""
        mlflow = self.recipe.mlflow
        if not (mlflow.register_model and self.tracker.active):
            return
        name = mlflow.registered_model_name or self.recipe.run.name
        tags = {k: v for k, v in metrics.items() if k.startswith("val_")}
        tags |= {"step": self.state.step} | {f"best_{k}": v for k, v in self.state.best.items() if k != "step"}
        description = (f"{self.recipe.model.preset} ({self.recipe.model.variant}) trained {self.state.step} steps on "
                       f"{len(self.class_names)} classes by run {self.recipe.run.name}; recipe.yaml holds the recipe")
        version = self.tracker.register_model(name, "final_checkpoint", tags, description)
        if version:
            from workflows.runtime import redact_secrets

            self.log(f"registered as MLflow model {name!r} version {version} (evaluate or predict it with --checkpoint "
                     f"models:/{name}/{version} --tracking-uri {redact_secrets(self.tracker.tracking_uri)})")

    def cleanup(self) -> None:
        """Publish the final results if training did not (e.g. relaunched after the run had already finished)."""
        if not self.published:
            self.publish_final_results()


def fail_once_marker(recipe: Recipe) -> str:
    """The injected-failure marker: a file in the run directory (a local path or a URI pyarrow can write)."""
    return f"{recipe.run_dir.rstrip('/')}/.injected_failure_done"


def apply_recipe_hyperparameters(scheduler: Any, peak: float, betas: tuple[float, float],
                                 weight_decays: list[float]) -> None:
    """Put the recipe's lr peak, betas and per-group weight decay into a LambdaLR scheduler and its optimizer after
    a checkpoint's states were loaded over them, with each group's lr for the scheduler's current step."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [peak] * len(groups)
    for group, factor, decay in zip(groups, scheduler.lr_lambdas, weight_decays, strict=True):
        group.update(initial_lr=peak, lr=peak * factor(scheduler.last_epoch), betas=betas, weight_decay=decay)
    scheduler._last_lr = [group["lr"] for group in groups]


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function: {"recipe": the recipe as a dict, "verbose": bool, "mlflow_parent_run_id": str}."""
    import ray.train

    recipe = recipe_from_dict(config["recipe"])
    prepare_worker_process(recipe, verbose=config.get("verbose", False))
    ctx = ray.train.get_context()
    unfixable = unrestartable_failure(recipe.run_dir)
    if unfixable is not None:  # the last group failed on what a restart cannot fix: end; the driver says why
        if ctx.get_world_rank() == 0:
            then = ("the driver leaves that node out or waits for the disk" if blind_node_failure(recipe.run_dir)
                    else "a restart cannot fix that")
            print(f"{LOG_PREFIX} not restarting: {unfixable} ({then})", flush=True)
        return
    device = ray.train.torch.get_device() if recipe.scaling.use_gpu else torch.device("cpu")
    trainer = Trainer(recipe, rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device,
                      mlflow_parent_run_id=config.get("mlflow_parent_run_id"))
    try:
        trainer.setup(checkpoint_to_resume(ray.train.get_checkpoint(), recipe.run_dir, trainer.log))
        trainer.train()
    except Exception as exc:
        note_failure(recipe.run_dir, trainer.rank, exc, restartable=not restart_cannot_fix(exc),
                     blind_node=blind_node(root_cause(exc)))
        raise
    trainer.cleanup()


def restart_cannot_fix(exc: BaseException) -> bool:
    """An error a new worker group would meet again: a corpus over its bad-video limit (the drop counts survive
    restarts), a recipe the worker's node cannot run (ConfigError, e.g. train.compile without a compiler), or a full
    disk (a checkpoint that did not fit: each restart would train to the next checkpoint and fail there again), or a
    checkpoint to resume from whose bytes cannot be read (each restart would read it again), or a node that does not
    see the shared disk (Ray Train may place the new group there again: the driver fits the run again without it,
    `pretrain.fit_through_storage_outages`)."""
    from workflows.checkpoints import CorruptCheckpoint
    from workflows.data.drops import TooManyBadVideos
    from workflows.data.pipeline import decode_failure
    from workflows.runtime import is_disk_full

    cause = root_cause(exc)
    return isinstance(exc, (ConfigError, CorruptCheckpoint)) or isinstance(decode_failure(exc), TooManyBadVideos) \
        or is_disk_full(cause) or blind_node(cause) is not None


def checkpoint_to_resume(registered: Any, run_dir: str, log: Any = print) -> Any:
    """The checkpoint a (re)started run resumes from: Ray's newest registered one, or a newer complete one in the
    run directory. Ray Train collects reports asynchronously (every few seconds): a worker killed between writing a
    checkpoint and that collection loses its registration although every rank's files are in storage. Rank 0 decides
    and the others follow (a collective), so all ranks load the same checkpoint."""
    import ray.train
    import torch.distributed as dist

    from workflows.checkpoints import newest_complete_checkpoint, read_state_at

    choice: list[Any] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        found = newest_complete_checkpoint(run_dir)
        registered_step = read_state_at(registered.filesystem, registered.path).get("step", -1) if registered else -1
        if found is not None and found[2] > registered_step:
            choice = [found[1]]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return registered
    fs, _ = storage_of(run_dir)
    if registered is None:  # none registered: a registry set aside (`set_aside_unusable_registry`), or a lost report
        log(f"resuming from {choice[0]}: the newest complete checkpoint in storage (Ray Train has none registered)")
    else:
        log(f"resuming from {choice[0]}: complete in storage and newer than Ray's newest registered checkpoint "
            f"({registered.path}): its report never reached Ray Train (a worker lost, or the run stopped, between "
            f"its upload and its report)")
    return ray.train.Checkpoint(choice[0], filesystem=fs)


def skip_deepspeed_shm_op() -> None:
    """Tell DeepSpeed its CPU shared-memory collective op cannot be built, so its CPU backend never JIT-compiles it
    (~35 s on a fresh 2-core machine: every first CPU run, `make demo` and CI paid it). Only DeepSpeed's inference
    all-reduce uses that op; ZeRO training's collectives are torch.distributed's (gloo) either way. DeepSpeed reads
    the compatibility table it caches in deepspeed.ops, and its comment says edits to that table persist."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def prepare_worker_process(recipe: Recipe, verbose: bool = False) -> None:
    """Process-wide settings of a training worker, and one line saying where it landed."""
    import ray
    import ray.data

    from workflows.console import quiet_ray_console

    quiet_ray_console(verbose)  # Ray Data's per-dataset and Train's per-report lines: log files only, unless verbose

    ray.data.DataContext.get_current().enable_progress_bars = False  # per-worker pipelines: bars garble the log
    # DeepSpeed's ZeRO calls a deprecated torch collective on every step; one warning per step drowns the progress.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    # Ray Data wraps its zero-copy torch.as_tensor of a read-only batch in warnings.catch_warnings, which is not
    # thread-safe: with its prefetch thread beside the step, torch's "NumPy array is not writable" warning (which
    # does not apply: the batch is never written) sometimes escapes, a traceback-like block in the progress.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
    if not recipe.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo); before importing it
        skip_deepspeed_shm_op()
    tools_of_this_interpreter_first()  # one ninja for DeepSpeed's JIT ops, whether or not the driver's venv was active
    ctx = ray.train.get_context()
    print(f"{LOG_PREFIX} worker rank {ctx.get_world_rank()}/{ctx.get_world_size()} on node "
          f"{ray.get_runtime_context().get_node_id()} (ip {ray.util.get_node_ip_address()}, pid {os.getpid()})",
          flush=True)
