"""Shared measuring tools for the benchmarks: peak memory of this process, the machine's matmul rate, the ratios line.

Peak memory on CPU is the kernel's resident-set high-water mark (VmHWM in /proc/self/status), reset with
`/proc/self/clear_refs` so a benchmark measures its own phase. It sees every allocation torch makes (tracemalloc
sees none of them) and is exact for the process, which is why each measured variant runs in a fresh subprocess.
On CUDA it is `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MIB = 2**20


def _status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), or None where procfs is missing."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process (falls back to the peak where /proc is unavailable)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trim_allocator() -> bool:
    """Hand the C allocator's free memory back to the OS (glibc `malloc_trim`), so memory freed while building a
    model (fp32 weights cast to bf16, a released text tower) is not counted as the step's. False where unavailable."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and hasattr(libc, "malloc_trim") and libc.malloc_trim(0) >= 0)
    except OSError:
        return False


def reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark to the current RSS (Linux >= 4.0). False if it could not be reset."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Resident-set high-water mark since the last `reset_peak_rss` (or since the process started)."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of each of `repeats` calls of `fn` (device-synchronised)."""
    return [wall for wall, _ in time_calls_with_cpu(fn, repeats, device)]


def time_calls_with_cpu(fn: Callable[[], object], repeats: int, device: torch.device) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) of each of `repeats` calls of `fn`. CPU time counts only when this
    process runs, so on a machine shared with other jobs it shows how much of a slow wall time was waiting."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start, time.process_time() - start_cpu))
    return times


@dataclass
class StepProfile:
    """What `profile_calls` saw, per call: device time with at least one kernel running (0 on a CPU), kernels
    launched, and the operator table (top ops by self device time on a GPU, self CPU time on a CPU)."""

    device_busy_s: float
    kernels: float
    table: str


def busy_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: time with at least one running, overlaps counted once
    (kernels on concurrent streams)."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profile_calls(fn: Callable[[], object], calls: int, device: torch.device, rows: int = 40) -> StepProfile:
    """Call `fn` `calls` times under torch.profiler (kernels too on a GPU). The busy time is what says whether a
    step is bound by the device (busy close to the step's wall time) or by the host launching its ops; it is taken
    from the kernels' own timestamps, which the profiler's host-side overhead does not stretch."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=rows, max_name_column_width=90)
    return StepProfile(device_busy_s=busy_length(kernels) / 1e6 / calls, kernels=len(kernels) / calls, table=table)


def matmul_rate(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 10
) -> float:
    """The machine's dense matmul rate in FLOP/s: median of `repeats` (size x size) @ (size x size) products."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    time_calls(lambda: torch.mm(a, b, out=out), 3, device)  # warm up the kernels and the thread pool
    seconds = statistics.median(time_calls(lambda: torch.mm(a, b, out=out), repeats, device))
    return 2.0 * size**3 / seconds


def count_dispatched_ops(fn: Callable[[], object]) -> int:
    """How many aten ops calling `fn()` dispatches, the backward's included. Each costs host time in eager mode (tens
    of microseconds through autograd on a GPU), so a step of many small ops is bound by the host, not the device:
    a count that does not depend on the machine."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    with _Counter() as counter:
        fn()
    return counter.count


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none): printed beside results measured on a shared machine."""
    import os

    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


def print_results(load_before: float, how: str, table: str, ratios: Mapping[str, float]) -> None:
    """A benchmark's closing output: the load average around the run and how its numbers are formed, the table,
    and, last, the ratios line."""
    print(f"load average (1 min) before {load_before:.2f}, after {load_average():.2f}; {how}")
    print(table)
    print(ratios_line(ratios), flush=True)


def ratios_line(ratios: Mapping[str, float]) -> str:
    """The benchmarks' last line: `ratios: name=value name=value ...` (4 significant digits)."""
    return "ratios: " + " ".join(f"{name}={value:.4g}" for name, value in ratios.items())


def parse_ratios(line: str) -> dict[str, float]:
    """Inverse of `ratios_line`; raises ValueError on anything else."""
    head, _, body = line.strip().partition(":")
    if head != "ratios" or not body.strip():
        raise ValueError(f"not a ratios line: {line!r}")
    values = {}
    for item in body.split():
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad ratios item {item!r} in {line!r}")
        values[name] = float(value)
    return values


def spread(values: Iterable[float]) -> str:
    """Repeated measurements of one ratio as '0.95 0.96 1.04 (mean 0.98 ± 0.05)': each value, then the mean and two
    standard errors (about a 95% interval for the mean; only with 2 or more values). On a shared machine single
    repeats of a ratio move by ±0.1, so whether a target is met needs the interval, not one value."""
    values = list(values)
    text = " ".join(f"{v:.2f}" for v in values)
    if len(values) < 2:
        return text
    half = 2 * statistics.stdev(values) / math.sqrt(len(values))
    return f"{text} (mean {statistics.fmean(values):.2f} ± {half:.2f})"


def finite_positive(value: float) -> bool:
    """True for a finite number > 0."""
    return math.isfinite(value) and value > 0


@dataclass(frozen=True)
class ProcCPU:
    """One process of a tree: its CPU seconds so far (user + system), name and depth below the root (root: 0)."""

    cpu: float
    name: str
    depth: int


def process_tree(pid: int | None = None, names: bool = True) -> dict[int, ProcCPU]:
    """A process (default: this one) and each of its living descendants, by pid (`names=False`: skip reading
    names and command lines, for frequent sampling)."""
    import psutil  # a dependency of DeepSpeed; imported here so the rest of this module does not need it

    root = psutil.Process(pid)
    depth = {root.pid: 0}
    tree: dict[int, ProcCPU] = {}
    for proc in (root, *root.children(recursive=True)):  # parents come before their children
        try:
            with proc.oneshot():
                times, parent = proc.cpu_times(), proc.ppid()
                name = proc.name() if names else ""
                if name.startswith(("python", "ray-dashboard")):
                    name = " ".join(proc.cmdline())[:400] or name
        except psutil.Error:  # exited between listing and reading
            continue
        depth[proc.pid] = depth.get(parent, 0) + 1 if proc.pid != root.pid else 0
        tree[proc.pid] = ProcCPU(times.user + times.system, name, depth[proc.pid])
    return tree


class TreeCPU:
    """CPU seconds a process tree (this process, its workers, a local Ray's daemons and actors) used between
    `start()` and the last `sample()`. A process that exits keeps the CPU time of its last sample, so sample
    often (once per consumed batch). Unlike wall-clock time, this does not grow when other jobs share the
    machine, so CPU seconds per item compare pipelines' overheads on a busy machine."""

    def __init__(self, names: bool = True, exclude: Iterable[int] = ()) -> None:
        self.names = names
        self.exclude = set(exclude)  # pids never counted (e.g. an idle Ray cluster's processes beside a baseline)
        self._start: dict[int, ProcCPU] = {}
        self.last: dict[int, ProcCPU] = {}

    def _tree(self) -> dict[int, ProcCPU]:
        return {pid: p for pid, p in process_tree(names=self.names).items() if pid not in self.exclude}

    def start(self) -> None:
        self._start = self._tree()
        self.last = dict(self._start)

    def sample(self) -> None:
        self.last.update(self._tree())

    def used(self, pid: int) -> float:
        start = self._start.get(pid)
        return self.last[pid].cpu - (start.cpu if start else 0.0)

    @property
    def seconds(self) -> float:
        return sum(self.used(pid) for pid in self.last)


_PROC_STAT = Path("/proc/stat")


def _machine_jiffies() -> tuple[int, int] | None:
    """(all CPU time, idle + iowait time) of the whole machine since boot, in kernel ticks; None off Linux."""
    try:
        fields = [int(v) for v in _PROC_STAT.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user and nice]
    return sum(fields[:8]), fields[3] + fields[4]


class MachineIdle:
    """The share of the whole machine's CPU time left idle between `start()` and the last `sample()` (every
    process counted, other jobs included): how much of the cores a pipeline leaves unused. NaN off Linux."""

    def __init__(self) -> None:
        self._start: tuple[int, int] | None = None
        self._last: tuple[int, int] | None = None

    def start(self) -> None:
        self._start = self._last = _machine_jiffies()

    def sample(self) -> None:
        self._last = _machine_jiffies()

    @property
    def fraction(self) -> float:
        if self._start is None or self._last is None or self._last[0] <= self._start[0]:
            return math.nan
        return (self._last[1] - self._start[1]) / (self._last[0] - self._start[0])


class CPUSampler:
    """A background thread that samples this process tree's CPU (`TreeCPU`) every `interval` seconds, so the CPU
    used inside any wall-clock window of a run can be read afterwards, in total (`between`) or by process group
    (`between_by`)."""

    def __init__(self, interval: float = 0.5) -> None:
        import threading

        self.interval = interval
        self.samples: list[tuple[float, dict[int, ProcCPU]]] = []  # (time.time(), the tree's processes)
        self._cpu = TreeCPU()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _take(self) -> None:
        self.samples.append((time.time(), dict(self._cpu.last)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._cpu.sample()
            self._take()

    def __enter__(self) -> CPUSampler:
        self._cpu.start()
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _at(self, when: float) -> tuple[dict[int, float], dict[int, ProcCPU]]:
        """Each process's CPU seconds at wall-clock time `when`, linear between the two samples around it (a
        process first seen in the later sample counts from zero), and that later sample's processes (names as they
        were then: Ray renames a worker process when it returns to its pool)."""
        import bisect

        times = [t for t, _ in self.samples]
        i = bisect.bisect_left(times, when)
        if i == 0 or i == len(times):
            procs = self.samples[min(i, len(times) - 1)][1]
            return {pid: proc.cpu for pid, proc in procs.items()}, procs
        (t0, before), (t1, after) = self.samples[i - 1], self.samples[i]
        frac = (when - t0) / (t1 - t0) if t1 > t0 else 1.0
        out = {}
        for pid, proc in after.items():
            v0 = before[pid].cpu if pid in before else 0.0
            out[pid] = v0 + (proc.cpu - v0) * frac
        return out, after

    def between_by(self, start: float, end: float, label: Callable[[int, ProcCPU], str]) -> dict[str, float]:
        """CPU seconds used between two wall-clock times (time.time()), summed by `label(pid, proc)`."""
        (first, _), (last, procs) = self._at(start), self._at(end)
        out: dict[str, float] = {}
        for pid, value in last.items():
            used = value - first.get(pid, 0.0)
            if used > 0:
                key = label(pid, procs[pid])
                out[key] = out.get(key, 0.0) + used
        return out

    def between(self, start: float, end: float) -> float:
        """CPU seconds the whole tree used between two wall-clock times (time.time())."""
        return sum(self.between_by(start, end, lambda pid, proc: "").values())
