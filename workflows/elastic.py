"""What stays constant when the worker group changes size (`BatchPlan`, `EpochProgress`), and how the ranks agree,
one step boundary at a time, to checkpoint before a node is taken away or the group grows (`ResizeWatch`).

A run with `scaling.num_workers: [min, max]` may run at any size in between (Ray Train's elastic policy takes what
the cluster has). The recipe's global batch and lr schedule hold at every size: each optimizer step consumes exactly
`global_batch_size` clips. When the size splits it evenly into whole micro-batches, every rank takes the same share
(exactly the fixed-size behaviour); otherwise shares differ by one clip and each micro-batch's loss is weighted by its
clip count, so the gradient is still the mean over the global batch.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# the global batch at a world size
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's `global_batch` clips are split over `world` ranks: each rank runs `accum`
    micro-batches (DeepSpeed's gradient accumulation steps) holding `shares[rank]` clips in all."""

    global_batch: int
    world: int
    micro: int  # the largest micro-batch (what DeepSpeed is told)
    accum: int
    shares: tuple[int, ...]

    @property
    def even(self) -> bool:
        """Every micro-batch of every rank holds `micro` clips: the loss needs no weights."""
        return all(s == self.micro * self.accum for s in self.shares)

    def micro_sizes(self, rank: int) -> list[int]:
        """Clips in each of `rank`'s micro-batches of one step (larger ones first)."""
        base, extra = divmod(self.shares[rank], self.accum)
        return [base + (i < extra) for i in range(self.accum)]

    def loss_weight(self, clips: int) -> float:
        """Factor on a micro-batch's mean loss so the step's gradient is the mean over all `global_batch` clips:
        DeepSpeed divides by `accum` and averages over `world`; 1.0 exactly for an even plan."""
        return clips * self.world * self.accum / self.global_batch

    def micro_batches_per_rank(self, steps: int) -> int:
        return steps * self.accum

    def describe(self) -> str:
        """"4 x 2 workers x 1 accumulation", or how an uneven split runs (the console's line for the split)."""
        workers = f"{self.world} worker{'s' if self.world > 1 else ''}"
        if self.even:
            return f"{self.micro} x {workers} x {self.accum} accumulation"
        return (f"{min(self.shares)}-{max(self.shares)} clips on each of {workers} in {self.accum} micro-batches of "
                f"up to {self.micro} (losses weighted by clip count)")


def batch_plan(global_batch: int, micro: int, world: int) -> BatchPlan:
    """The split of `global_batch` over `world` ranks with micro-batches of at most `micro` clips. ValueError
    when some rank would get an empty micro-batch (fewer clips than micro-batches)."""
    if world < 1 or micro < 1 or global_batch < 1:
        raise ValueError(f"bad batch geometry: global {global_batch}, micro {micro}, world {world}")
    base, extra = divmod(global_batch, world)
    shares = tuple(base + (r < extra) for r in range(world))
    accum = math.ceil(max(shares) / micro)
    if min(shares) < accum:
        raise ValueError(f"a global batch of {global_batch} clips cannot give each of {world} workers {accum} "
                         f"micro-batches of up to {micro} clips")
    return BatchPlan(global_batch, world, min(micro, max(shares)), accum, shares)


def workable_sizes(global_batch: int, micro: int, low: int, high: int) -> tuple[list[int], list[int]]:
    """World sizes in [low, high] that can hold the global batch, and those that split it evenly."""
    fits, even = [], []
    for world in range(low, high + 1):
        try:
            plan = batch_plan(global_batch, micro, world)
        except ValueError:
            continue
        fits.append(world)
        if plan.even:
            even.append(world)
    return fits, even


# ---------------------------------------------------------------------------------------------------------------
# where an epoch stands: clips consumed per video of the training set
# ---------------------------------------------------------------------------------------------------------------


def epoch_order(num_videos: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's video order (video indices): the permutation the training pipeline reads in."""
    return np.random.default_rng([seed, epoch]).permutation(num_videos)


def remaining_assignment(order: np.ndarray, consumed: np.ndarray, views: int, plan: BatchPlan,
                         rank: int) -> np.ndarray:
    """Positions in `order` that `rank` reads for the rest of the epoch: the videos with clips left
    (`consumed[video] < views`), in the epoch's order, dealt out every `world`-th (an even plan: at the start of an
    epoch exactly the fixed-size shard) or in contiguous runs sized by the ranks' shares (an uneven plan)."""
    left = np.flatnonzero(consumed[order] < views)
    if plan.even:
        return left[rank::plan.world]
    bounds = np.floor(np.cumsum((0,) + plan.shares) * len(left) / plan.global_batch).astype(int)
    return left[bounds[rank]:bounds[rank + 1]]


def legacy_consumed(num_videos: int, seed: int, epoch: int, world: int, skipped_per_rank: int,
                    views: int) -> np.ndarray:
    """Consumed counts of a checkpoint written before they were recorded: every rank had read the first
    `skipped_per_rank` videos of its shard (what resuming skipped then)."""
    consumed = np.zeros(num_videos, dtype=np.int32)
    order = epoch_order(num_videos, seed, epoch)
    for rank in range(world):
        consumed[order[rank::world][:skipped_per_rank]] = views
    return consumed


# ---------------------------------------------------------------------------------------------------------------
# agreeing to checkpoint before a resize
# ---------------------------------------------------------------------------------------------------------------

NONE, DRAIN, GROW = 0, 1, 2
REASONS = {DRAIN: "drain notice", GROW: "nodes added"}


def kv_key(run_dir: str, what: str) -> bytes:
    """A key in Ray's GCS key-value store for run `run_dir` (survives worker restarts, not the cluster)."""
    return f"dist-elastic:{run_dir}:{what}".encode()


def kv_put(key: bytes, value: dict[str, Any], overwrite: bool = True) -> bool:
    """`overwrite=False`: only when `key` holds nothing yet (the first of several writers wins). Returns whether
    `key` held a value before."""
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_put(key, json.dumps(value).encode(), overwrite=overwrite)


# A collective whose peer died (gloo's "Read error ...: Connection reset by peer", NCCL's): a survivor's error, not
# the cause. Seen on the rank that outlived a SIGKILLed one (tests/workflows/test_pretrain.py's SIGKILL test).
_COLLECTIVE_ERROR = re.compile(r"gloo|NCCL|DistBackendError|DistNetworkError")


def note_failure(run_dir: str, rank: int, exc: BaseException, restartable: bool = True,
                 blind_node: str | None = None) -> None:
    """Why a worker group is about to fail, for the next group's restart line (`take_failure`): the first error
    raised on any rank; the others' errors come after it and are not the cause. A worker or node that dies without
    raising leaves none, and neither do the collectives it leaves failing on the other ranks. `restartable=False`:
    an error a restart cannot fix (a corpus over its bad-video limit); the next group ends at once instead of
    training into it again (`unrestartable_failure`). `blind_node`: the id of the node the error says does not see
    the shared disk, for the driver to leave out (`blind_node_failure`)."""
    from workflows.runtime import root_cause

    what = root_cause(exc)
    if _COLLECTIVE_ERROR.search(what):  # a peer is gone: said as a lost worker unless that peer recorded more
        return
    what = what if len(what) <= 200 else what[:197] + "..."
    reason: dict[str, Any] = {"reason": f"rank {rank} failed: {what}"}
    if blind_node:
        reason["blind_node"] = blind_node
    try:
        kv_put(kv_key(run_dir, "failure"), reason, overwrite=False)
        if not restartable:
            kv_put(kv_key(run_dir, "unrestartable"), reason, overwrite=False)
    except Exception:  # noqa: BLE001 - the GCS unreachable too: the error being raised is what matters
        pass


def take_failure(run_dir: str) -> str | None:
    """The failure `note_failure` recorded for this run (None: none), removed: a later failure is not this one."""
    return _take(kv_key(run_dir, "failure"))


class RunNotRestarted(RuntimeError):
    """A worker failed on an error a restart cannot fix; the restarted group ended without training (its message:
    the recorded reason, e.g. "rank 1 failed: TooManyBadVideos: ...")."""


def unrestartable_failure(run_dir: str) -> str | None:
    """The reason of a failure a restart cannot fix, recorded by a worker of this run (None: none). Read by each
    worker of a (re)started group before it builds anything: such a group returns at once."""
    return (kv_get(kv_key(run_dir, "unrestartable")) or {}).get("reason")


def blind_node_failure(run_dir: str) -> tuple[str, str] | None:
    """(node id, reason) when this run's workers stopped because a node does not see the shared disk (recorded by
    `note_failure` as a failure a restart cannot fix); None otherwise. Left in place: `forget_unrestartable_failure`
    removes it."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():  # no Ray here, so no workers either
        return None
    record = kv_get(kv_key(run_dir, "unrestartable")) or {}
    return (record["blind_node"], record["reason"]) if record.get("blind_node") else None


def forget_unrestartable_failure(run_dir: str) -> None:
    """By the driver before it starts the run: a record left by an earlier attempt (the corpus fixed since) must not
    end this one. The GCS store outlives runs on a long-lived cluster."""
    _take(kv_key(run_dir, "unrestartable"))


def raise_if_not_restarted(run_dir: str) -> None:
    """By the driver after Ray Train returned: the run ended because a group found `unrestartable_failure`."""
    reason = _take(kv_key(run_dir, "unrestartable"))
    if reason is not None:
        take_failure(run_dir)  # the same failure: no later restart line should repeat it
        raise RunNotRestarted(reason)


def _take(key: bytes) -> str | None:
    record = kv_get(key)
    kv_del(key)
    return (record or {}).get("reason")


def kv_get(key: bytes) -> dict[str, Any] | None:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(key)
    return json.loads(raw) if raw else None


def kv_del(key: bytes) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key)


def local_preemption_info() -> Any:
    """This worker's drain notice as Ray Train's watcher delivered it (None when there is none). Read from the
    worker's own context: `ray.train.get_preemption_info()` is a barrier through an actor on every call."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info
    except (ImportError, AttributeError, RuntimeError):
        return None


class ResizeWatch:
    """Rank 0 looks at two cheap signals each step boundary: its own drain notice (set by Ray Train's preemption
    watcher, no RPC) and, at most once a second, a grow request in the GCS store (put by `GrowCheckpointCallback`).
    Its verdict reaches every rank through a broadcast on a CPU (gloo) group that is started at one boundary and
    waited for at the next, so no step stalls on it; all ranks act on the same verdict one step later."""

    def __init__(self, run_dir: str, rank: int, world: int, grow_poll_s: float = 1.0):
        import torch
        import torch.distributed as dist

        self.run_dir, self.rank, self.world, self.grow_poll_s = run_dir, rank, world, grow_poll_s
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() and world > 1 else None
        self._buffer = torch.zeros(2, dtype=torch.float64)  # [verdict, drain deadline in epoch seconds]
        self._pending: Any = None
        self._last_grow_poll = 0.0

    def _verdict_here(self) -> tuple[int, float]:
        info = local_preemption_info()
        if info is not None:
            return DRAIN, (info.deadline_ms or 0) / 1000
        now = time.monotonic()
        if now - self._last_grow_poll >= self.grow_poll_s:
            self._last_grow_poll = now
            if kv_get(kv_key(self.run_dir, "grow")):
                return GROW, 0.0
        return NONE, 0.0

    def poll(self) -> tuple[int, float]:
        """The verdict agreed at the previous boundary ((NONE, 0) at the first), and the next one started."""
        import torch.distributed as dist

        if self.group is None:  # one rank: nothing to agree on
            return self._verdict_here() if self.rank == 0 else (NONE, 0.0)
        agreed = (NONE, 0.0)
        if self._pending is not None:
            self._pending.wait()
            agreed = (int(self._buffer[0]), float(self._buffer[1]))
        if self.rank == 0:
            verdict, deadline = self._verdict_here()
            self._buffer[0], self._buffer[1] = verdict, deadline
        self._pending = dist.broadcast(self._buffer, src=0, group=self.group, async_op=True)
        return agreed

    def close(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None


def grow_checkpoint_callback(run_dir: str, timeout_s: float = 600.0) -> Any:
    """A Ray Train controller callback (RunConfig.callbacks) that makes a running worker group checkpoint before Ray
    Train's resize monitor replaces it with a larger one: it posts a grow request in the GCS store, which rank 0's
    `ResizeWatch` sees within a second, and holds the resize until rank 0 acknowledges the reported checkpoint (or
    `timeout_s` passes). Shrinking is never held: it follows a lost or drained node, handled by the workers."""
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    class GrowCheckpoint(ControllerCallback, WorkerGroupCallback):
        def __init__(self) -> None:
            self.running: int | None = None  # the size of the running worker group, if one runs

        def after_worker_group_start(self, worker_group: Any) -> None:
            self.running = len(worker_group.get_workers())

        def before_worker_group_shutdown(self, worker_group: Any) -> None:
            self.running = None

        def after_worker_group_abort(self, worker_group_context: Any) -> None:
            self.running = None

        def before_controller_execute_resize_decision(self, resize_decision: Any) -> None:
            if not self.running or resize_decision.num_workers <= self.running:
                return
            request, ack = kv_key(run_dir, "grow"), kv_key(run_dir, "grow_ack")
            kv_put(ack, {})
            kv_put(request, {"from": self.running, "to": resize_decision.num_workers})
            give_up = time.monotonic() + timeout_s
            while time.monotonic() < give_up and not kv_get(ack):
                time.sleep(0.5)
            kv_put(request, {})
            kv_put(ack, {})

    return GrowCheckpoint()
