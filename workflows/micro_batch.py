"""`train.micro_batch_size: auto`: the largest micro-batch a worker's device holds, found by a short probe.

Each worker runs the real training computation (CLIP normalisation, mixup, the frozen CLIP and the branch forward,
the loss, the backward) on random clips of doubling sizes, eagerly and before the optimizer exists, and measures the
memory each size takes: on a GPU the allocator's peak, on a CPU the process's peak resident set. Doubling stops at the
first size that runs out of memory, whose measured peak passes the budget, or that the growth measured so far says
would pass it; the budget is the memory the worker may use less a margin (MARGIN) for what the probe does not
allocate (optimizer state, ZeRO's buckets, compiled or CUDA-graph pools). Memory grows linearly with the micro-batch,
so the largest size under the budget is read off the last two measurements and confirmed by one more run. A real
out-of-memory error means the budget was wrong (another process took memory): the cap is then the margin below the
largest size that ran.

The workers agree on the smallest size any of them holds; the result is kept in the cluster's GCS store for the run,
so a restart (at any size) does not probe again. From that cap, each (re)start picks the micro-batch that needs the
fewest accumulation steps for its share of the global batch (`micro_for_share`).
"""

from __future__ import annotations

import gc
import math
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

MARGIN = 0.15  # of the worker's memory, kept free for what the probe does not allocate


# How torch's allocators say they ran out: CUDA's and the CPU's, and oneDNN's (the CPU kernels of GELU, matmuls and
# convolutions), which reports a failed allocation of its own memory as a primitive it could not create (seen under
# an address-space limit, when the doubling's failing size ran out inside such a kernel).
OUT_OF_MEMORY_TEXTS = ("out of memory", "can't allocate memory", "could not create a primitive")


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure of torch's allocators (GPU or CPU, oneDNN's included) or Python's."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in OUT_OF_MEMORY_TEXTS)


class MemoryGauge:
    """Peak memory of one probe run and the worker's memory budget, on a CUDA device or the host."""

    def __init__(self, device: torch.device, workers_on_node: int = 1, margin: float = MARGIN):
        self.device, self.workers_on_node, self.margin = device, max(1, workers_on_node), margin

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        """Peak since reset: the CUDA allocator's reserved bytes (what the device must hold, fragmentation
        included); on the host the process's resident high-water mark (it cannot be reset, but the probe's sizes
        only grow, so it is the latest size's peak)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_reserved(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def budget_bytes(self) -> int:
        """What this worker may use, less the margin: on a GPU its free memory plus what this process already
        holds; on the host its share (of the node's training workers) of the available memory plus its own."""
        if self.cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            held = free + torch.cuda.memory_reserved(self.device)
        else:
            import psutil

            own = psutil.Process().memory_info().rss
            held = own + psutil.virtual_memory().available // self.workers_on_node
        return int(held * (1 - self.margin))

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def name(self) -> str:
        if self.cuda:
            return torch.cuda.get_device_name(self.device)
        import platform

        return f"cpu ({platform.processor() or platform.machine()})"


@dataclass
class Probe:
    """What a probe found: `cap` (the largest micro-batch under the budget), why it stopped, and every size tried
    with its peak bytes (None: it ran out of memory)."""

    cap: int
    limit: int
    budget: int
    stopped: str  # "limit" (cap = limit), "budget" (memory stopped the doubling) or "out of memory"
    tried: dict[int, int | None] = field(default_factory=dict)

    @property
    def memory_bound(self) -> bool:
        return self.stopped != "limit"

    def summary(self) -> str:
        sizes = format_peaks(self.tried)
        why = {"limit": f"its share of the global batch ({self.limit} clips) fits",
               "budget": "the next size would pass the budget", "out of memory": "a larger size ran out of memory"}
        return (f"largest micro-batch {self.cap} ({why[self.stopped]}; budget {self.budget / 2**30:.2f} GiB; "
                f"peaks {sizes})")


def format_peaks(tried: dict[int, int | None]) -> str:
    """`1: 0.77 GiB, 2: 0.78 GiB, 4: OOM`: each size tried and its peak."""
    return ", ".join(f"{b}: {'OOM' if p is None else f'{p / 2**30:.2f} GiB'}" for b, p in tried.items())


def find_micro_batch(run: Callable[[int], None], gauge: MemoryGauge, limit: int) -> Probe:
    """The largest micro-batch of at most `limit` clips whose `run(size)` (one forward + backward) stays under the
    gauge's budget. Raises RuntimeError when not even one clip fits."""
    budget = gauge.budget_bytes()
    tried: dict[int, int | None] = {}
    ran_out: dict[int, str] = {}  # size -> the allocator's words

    def attempt(size: int) -> int | None:
        gauge.reset()
        try:
            run(size)
            peak: int | None = gauge.peak_bytes()
        except Exception as exc:  # noqa: BLE001 - anything but an out-of-memory error is a real failure
            if not is_out_of_memory(exc):
                raise
            peak = None
            ran_out[size] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
        gauge.release()
        tried[size] = peak
        return peak

    def fits(size: int) -> bool:
        peak = tried.get(size)
        return peak is not None and peak <= budget

    def slope(ran: list[int]) -> float:
        """Bytes per clip between the two largest sizes of `ran` that ran."""
        lo, hi = ran[-2], ran[-1]
        return (tried[hi] - tried[lo]) / (hi - lo)  # type: ignore[operator]

    stopped, size = "limit", 1
    while True:
        if attempt(size) is None:
            stopped = "out of memory"
            break
        if not fits(size):
            stopped = "budget"
            break
        if size == limit:
            break
        following = min(2 * size, limit)
        ran = sorted(tried)
        if len(ran) >= 2 and tried[size] + slope(ran) * (following - size) > budget:  # type: ignore[operator]
            stopped = "budget"
            break
        size = following
    good = [b for b in tried if fits(b)]
    if not good:
        failed_one = (f", and it failed to allocate ({ran_out[1]}; to see a failure that is not about memory, run "
                      f"with train.micro_batch_size=1)") if 1 in ran_out else ""
        raise RuntimeError(f"train.micro_batch_size auto: a micro-batch of one clip takes more than this worker's "
                           f"memory budget ({budget / 2**30:.2f} GiB on {gauge.name()}; peaks {tried}{failed_one}): "
                           f"use a smaller model, frames or crop, or activation checkpointing "
                           f"(model.activation_checkpointing)")
    best = max(good)
    failed = min([b for b in tried if b > best] or [limit + 1])
    if stopped == "out of memory":
        # The device held less than the budget promised (another process, fragmentation): keep the margin in
        # clips below the largest size that ran, and do not search closer to the failure.
        return Probe(cap=max(1, int(best * (1 - gauge.margin))), limit=limit, budget=budget, stopped=stopped,
                     tried=tried)
    # Between the largest size that fits and the first that did not: the line through the measurements says how far
    # the budget reaches; one run confirms it (memory is not exactly linear: allocator rounding, workspaces).
    ran = sorted(b for b in tried if fits(b))
    if len(ran) >= 2 and failed > best + 1:
        per_clip = slope(ran)
        reach = best + int((budget - tried[best]) / per_clip) if per_clip > 0 else failed - 1  # type: ignore[operator]
        guess = min(reach, failed - 1, limit)
        if guess > best and attempt(guess) is not None and fits(guess):
            best = guess
    return Probe(cap=best, limit=limit, budget=budget, stopped="limit" if best == limit else stopped, tried=tried)


def micro_for_share(share: int, cap: int) -> int:
    """The micro-batch for a rank's `share` of the global batch given the largest that fits (`cap`): the fewest
    accumulation steps the cap allows, or one more when that splits the share evenly (static shapes: one compiled
    graph), else near-even micro-batches (31 clips, cap 10: 8 + 8 + 8 + 7, weighted in the loss)."""
    if share < 1 or cap < 1:
        raise ValueError(f"bad share {share} or cap {cap}")
    fewest = math.ceil(share / cap)
    for steps in (fewest, fewest + 1):
        if share % steps == 0:
            return share // steps
    return math.ceil(share / fewest)


class _Engine:
    """The step's engine interface over a bare model: backward without DeepSpeed, no optimizer step."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, video: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        return self.model(video, class_names)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        pass


def probe_runner(model: torch.nn.Module, class_names: list[str], train: Any, dtype: torch.dtype,
                 device: torch.device, frames: int, size: int) -> Callable[[int], None]:
    """`run(b)`: one training micro-step of `model` (eager, in its current dtype) on `b` random clips of `frames`
    dense frames at `size` x `size`, leaving no gradients behind."""
    from workflows.step import train_micro_step

    engine = _Engine(model)
    generator = torch.Generator().manual_seed(0)
    was_training = model.training
    model.train()

    def run(batch: int) -> None:
        clips = {"frames": torch.randint(0, 256, (batch, frames, size, size, 3), dtype=torch.uint8, device=device),
                 "label": torch.randint(0, len(class_names), (batch,), device=device)}
        try:
            train_micro_step(engine, clips, class_names, train, dtype, generator)
        finally:
            del clips
            model.zero_grad(set_to_none=True)
            model.train(was_training)

    return run


def probe_in_dtype(model: torch.nn.Module, dtype: torch.dtype, probe: Callable[[], Probe]) -> Probe:
    """Run `probe` with the model's parameters in `dtype` (what DeepSpeed's bf16/fp16 engine will train: it casts the
    parameters, not the buffers), then put the original parameter tensors back untouched."""
    originals = [(p, p.data) for p in model.parameters() if p.dtype != dtype and p.is_floating_point()]
    for param, data in originals:
        param.data = data.to(dtype)
    try:
        return probe()
    finally:
        for param, data in originals:
            param.data = data


def agreed_cap(cap: int, device: torch.device) -> int:
    """The smallest cap over all ranks (each probed its own device; all must run the same plan)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return cap
    from workflows.metrics import collective_device

    value = torch.tensor([cap], dtype=torch.int64, device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
