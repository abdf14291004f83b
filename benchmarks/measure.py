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
from collections.abc import Callable, Mapping
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


def finite_positive(value: float) -> bool:
    """True for a finite number > 0."""
    return math.isfinite(value) and value > 0
