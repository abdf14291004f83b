"""ingest: clips/s of the Ray Data clip pipeline against a DataLoader and against the decode limit, same videos.

    python -m benchmarks.ingest [--videos 256] [--sizes 340x256,640x360] [--video-frames 96] [--workers N]
                                [--threads 1] [--frames 16] [--crop 224] [--batch 8] [--map-batch N]
                                [--warmup-clips 32] [--tail-clips 16] [--single-videos 48] [--repeats 2]
                                [--no-select-columns] [--cache DIR]

Writes H.264 videos once into `--cache`, then times in steady state `build_clip_dataset` on a local Ray, a
`torch.utils.data.DataLoader` with as many workers, and `clips_from_video` in one process (the decode limit); every
variant makes the very same clips with the pipeline's own code. Method, variants and ratios: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from workflows.data import pipeline
from workflows.data.data_config import DataConfig
from workflows.data.pipeline import ClipSpec, build_clip_dataset, clips_from_video, columns_collate

FPS = 24
RENDER_SIZE = 96  # render_motion's square size before upscaling (rendering at full size costs seconds per video)


# --- the videos ---------------------------------------------------------------------------------------------------
@dataclass
class VideoSet:
    """A generated set of videos of one resolution, with its manifest and label file."""

    width: int
    height: int
    manifest: str
    labels: str
    videos: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


def parse_size(text: str) -> tuple[int, int]:
    """'340x256' -> (340, 256); both even (yuv420p)."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) % 2 or int(h) % 2 or min(int(w), int(h)) < 16:
        raise ValueError(f"size {text!r} must be WIDTHxHEIGHT with even sides >= 16, e.g. 340x256")
    return int(w), int(h)


def upscale(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """(T, h, w, 3) uint8 -> (T, height, width, 3) uint8 with FFmpeg's swscale (fast; generation only)."""
    import av

    return np.stack([av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
                     .reformat(width=width, height=height, format="rgb24").to_ndarray() for f in frames])


def _write_one(job: tuple[str, int, int, int, int, int, int]) -> None:
    path, label, index, seed, width, height, frames = job
    from workflows.data.sample import render_motion, write_video

    rng = np.random.default_rng([seed, label, index])
    tmp = f"{path}.part.mp4"
    write_video(tmp, upscale(render_motion(label, rng, size=RENDER_SIZE, num_frames=frames), width, height), FPS)
    os.replace(tmp, path)  # a killed run never leaves a truncated video behind


def ensure_videos(cache: Path, width: int, height: int, count: int, frames: int, seed: int = 0,
                  workers: int = 2) -> VideoSet:
    """`count` videos of width x height under `cache` (only the missing ones are written), their manifest and
    label file. Labels cycle through the sample dataset's 8 motion classes."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from workflows.data.manifest import save_labels, write_manifest
    from workflows.data.sample import SAMPLE_CLASSES

    root = cache / f"{width}x{height}_{frames}f_seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    jobs, rows = [], []
    for i in range(count):
        label = i % len(SAMPLE_CLASSES)
        rel = f"v{i:05d}.mp4"
        rows.append({"path": rel, "label": SAMPLE_CLASSES[label]})
        if not (root / rel).exists():
            jobs.append((str(root / rel), label, i, seed, width, height, frames))
    if jobs:
        print(f"  writing {len(jobs)} {width}x{height} videos to {root} ...", flush=True)
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                list(pool.map(_write_one, jobs, chunksize=4))
        else:
            for job in jobs:
                _write_one(job)
    manifest = root / f"manifest_{count}.csv"
    write_manifest(rows, manifest)
    save_labels({name: i for i, name in enumerate(SAMPLE_CLASSES)}, root / "labels.json")
    return VideoSet(width, height, str(manifest), str(root / "labels.json"), count)


# --- the DataLoader baseline (also used by benchmarks.end_to_end) -------------------------------------------------
class ClipVideos(torch.utils.data.Dataset):
    """One item per video: the clips `clips_from_video` makes of it ({"frames": (V, T, S, S, 3) uint8,
    "label": (V,) int64}, V = spec.num_views). Batch with `collate_clips`."""

    def __init__(self, videos: Sequence[tuple[str, int, int, float, float]], spec: dict[str, Any]):
        self.videos = list(videos)  # (path, label, video_index, start, end)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path, label, index, start, end = self.videos[i]
        rows = clips_from_video(path, label, index, start, end, ClipSpec(**self.spec))
        return {"frames": torch.from_numpy(np.stack([r["frames"] for r in rows])),
                "label": torch.tensor([r["label"] for r in rows], dtype=torch.int64)}


def collate_clips(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate the clips of several videos into one batch."""
    return {key: torch.cat([item[key] for item in items]) for key in ("frames", "label")}


def manifest_videos(manifest: str, labels: str) -> list[tuple[str, int, int, float, float]]:
    """(path, label, video_index, start, end) of every manifest row, as the pipeline reads them."""
    from workflows.data.manifest import load_labels, load_manifest

    table = load_manifest(manifest, load_labels(labels), strict=True).table
    cols = [table.column(c).to_pylist() for c in ("path", "label", "video_index", "start", "end")]
    return [(str(p), int(lab), int(i), float(s), float(e)) for p, lab, i, s, e in zip(*cols, strict=True)]


@contextlib.contextmanager
def thread_env(threads: int) -> Iterator[None]:
    """OMP/BLAS thread counts for processes started inside (as Ray gives a `num_cpus=threads` actor)."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update({n: str(threads) for n in names})
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def dataloader_batches(videos: Sequence[tuple], spec: ClipSpec, workers: int, batch: int,
                       **loader_kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `batch` clips from a DataLoader with `workers` spawned worker processes."""
    if batch % spec.num_views:
        raise ValueError(f"batch {batch} must be a multiple of the views per video ({spec.num_views})")
    loader = torch.utils.data.DataLoader(
        ClipVideos(videos, asdict(spec)), batch_size=batch // spec.num_views, num_workers=workers,
        collate_fn=collate_clips, multiprocessing_context="spawn" if workers else None, **loader_kwargs)
    with thread_env(spec.decode_threads):
        yield from loader


# --- timing ---------------------------------------------------------------------------------------------------
@dataclass
class StreamTiming:
    """Steady-state timing of one stream of batches."""

    total_clips: int
    clips: int  # timed clips (after the warm-up)
    seconds: float  # from the warm-up point to the last clip
    startup_seconds: float  # from the call to the warm-up point
    cpu_seconds: float  # CPU time of this process tree (workers, actors, Ray's daemons) over the timed clips
    machine_idle: float = math.nan  # share of the whole machine's CPU time left idle over the timed clips

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else math.nan

    @property
    def cpu_per_clip(self) -> float:
        return self.cpu_seconds / self.clips


def time_stream(make: Callable[[], Iterator[dict[str, Any]]], warmup_clips: int, tail_clips: int,
                count_existing: bool = True) -> StreamTiming:
    """Consume `make()` and time its steady state: from the arrival that completes the first `warmup_clips` clips
    to the last arrival that leaves at least `tail_clips` clips still to come. Both ends of the window fall while
    every worker is busy, so the work already in progress when the clock starts is balanced by the work in
    progress when it stops (timing to the very last clip would count the head start as free and add the drain).
    The process tree's CPU time is sampled at every arrival inside the window; `count_existing=False` leaves out
    the processes that ran before `make()` was called (this one excepted): a local Ray idling beside a baseline.
    The whole machine's idle share over the same window is recorded too."""
    from benchmarks.measure import MachineIdle, TreeCPU, process_tree

    existing = set() if count_existing else set(process_tree(names=False)) - {os.getpid()}
    cpu = TreeCPU(names=False, exclude=existing)
    idle = MachineIdle()
    t0 = time.perf_counter()
    arrivals: list[tuple[float, int, float, float]] = []  # (time, clips so far, tree CPU s, machine idle share)
    seen = 0
    for batch in make():
        seen += len(batch["label"])
        now = time.perf_counter()
        if not arrivals and seen < warmup_clips:
            continue
        if not arrivals:
            cpu.start()
            idle.start()
        else:
            cpu.sample()
            idle.sample()
        arrivals.append((now, seen, cpu.seconds, idle.fraction))
    inside = [a for a in arrivals if a[1] <= seen - tail_clips]
    if len(inside) < 2:
        raise RuntimeError(f"only {seen} clips: not enough between {warmup_clips} warm-up and {tail_clips} tail "
                           f"clips to time")
    (t_start, n_start, *_), (t_end, n_end, cpu_end, idle_end) = inside[0], inside[-1]
    return StreamTiming(seen, n_end - n_start, t_end - t_start, t_start - t0, cpu_end, idle_end)


@dataclass
class SingleProcess:
    """`clips_from_video` one clip after another in this process."""

    clips: int
    seconds: float
    cpu_seconds: float
    decode_seconds: float  # inside read_frames (decord)

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds

    @property
    def decode_share(self) -> float:
        return self.decode_seconds / self.seconds


def single_process(videos: Sequence[tuple], spec: ClipSpec, warmup: int = 2) -> SingleProcess:
    """Time `clips_from_video` over `videos` (the first `warmup` untimed) with BLAS limited to the decode threads;
    the time spent in the pipeline's `read_frames` is measured by wrapping it."""
    from threadpoolctl import threadpool_limits

    decode = [0.0]
    read_frames = pipeline.read_frames

    def timed_read_frames(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return read_frames(*args, **kwargs)
        finally:
            decode[0] += time.perf_counter() - t

    with threadpool_limits(spec.decode_threads), mock.patch.object(pipeline, "read_frames", timed_read_frames):
        for path, label, index, start, end in videos[:warmup]:
            clips_from_video(path, label, index, start, end, spec)
        decode[0], clips = 0.0, 0
        t, cpu = time.perf_counter(), time.process_time()
        for path, label, index, start, end in videos[warmup:]:
            clips += len(clips_from_video(path, label, index, start, end, spec))
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return SingleProcess(clips, wall, cpu, decode[0])


# --- Ray ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A fresh local Ray (never another cluster on this machine) for the benchmark, or the one already running in
    this process; Ray Data's progress bars and execution banners off."""
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved
        if started:
            ray.shutdown()


def ray_batches(videos: VideoSet, cfg: DataConfig, spec: ClipSpec, batch: int,
                consumer: str = "collate") -> Iterator[dict[str, Any]]:
    """Batches of `batch` clips from `build_clip_dataset`, consumed with iter_torch_batches.

    consumer "collate": the two columns are picked in iter_torch_batches' collate_fn, in the consuming process
    (as workflows/feeds.py does).
    consumer "select_columns": `.select_columns(["frames", "label"])` first. That adds a
    task-based Project operator behind the decoders; on a small cluster Ray Data reserves part of the CPU
    budget for it, so the autoscaling decode pool (min_size 1) is refused its second actor (see README)."""
    ds = build_clip_dataset(cfg, videos.manifest, videos.labels, split="train", num_frames=spec.num_frames,
                            crop_size=spec.crop_size, seed=spec.seed, epoch=spec.epoch)
    if consumer == "select_columns":
        yield from ds.select_columns(["frames", "label"]).iter_torch_batches(batch_size=batch)
    elif consumer == "collate":
        yield from ds.iter_torch_batches(batch_size=batch, collate_fn=columns_collate(["frames", "label"]))
    else:
        raise ValueError(f"unknown consumer {consumer!r}")


# --- the benchmark --------------------------------------------------------------------------------------------
PIPELINES = ("dataloader", "ray", "ray_select_columns")


@dataclass
class SizeResult:
    """All measurements of one video size: per pipeline, one StreamTiming per repeat."""

    name: str
    videos: int
    workers: int
    parallel: int  # min(workers, cores): the decode limit's multiplier
    single: list[SingleProcess] = field(default_factory=list)
    runs: dict[str, list[StreamTiming]] = field(default_factory=dict)

    def rate(self, pipeline_name: str) -> float:
        return statistics.median(r.clips_per_s for r in self.runs[pipeline_name])

    def cpu_per_clip(self, pipeline_name: str) -> float:
        return statistics.median(r.cpu_per_clip for r in self.runs[pipeline_name])

    def machine_idle(self, pipeline_name: str) -> float:
        return statistics.median(r.machine_idle for r in self.runs[pipeline_name])

    @property
    def single_rate(self) -> float:
        return statistics.median(s.clips_per_s for s in self.single)

    @property
    def single_cpu_per_clip(self) -> float:
        return statistics.median(s.cpu_seconds / s.clips for s in self.single)

    @property
    def decode_limit(self) -> float:
        return self.single_rate * self.parallel

    def repeat_ratios(self, pipeline_name: str) -> list[float]:
        """clips/s against the DataLoader's, within each repeat (both measured in the same repeat)."""
        pairs = zip(self.runs[pipeline_name], self.runs["dataloader"], strict=True)
        return [r.clips_per_s / d.clips_per_s for r, d in pairs]

    def vs_dataloader(self, pipeline_name: str) -> float:
        """Median over repeats of the pairwise ratio."""
        return statistics.median(self.repeat_ratios(pipeline_name))

    def vs_limit(self, pipeline_name: str) -> float:
        pairs = zip(self.runs[pipeline_name], self.single, strict=True)
        return statistics.median(r.clips_per_s / (s.clips_per_s * self.parallel) for r, s in pairs)

    @property
    def decode_share(self) -> float:
        return statistics.median(s.decode_share for s in self.single)


def run_size(videos: VideoSet, args: argparse.Namespace) -> SizeResult:
    """Single-process limit, DataLoader and Ray Data on one video set, `args.repeats` times."""
    cfg = DataConfig(decode_actors=args.workers, decode_threads=args.threads, batch_size=args.map_batch)
    all_videos = manifest_videos(videos.manifest, videos.labels)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    result = SizeResult(videos.name, len(all_videos), args.workers, min(args.workers, cores))
    names = [n for n in PIPELINES if n != "ray_select_columns" or args.select_columns]
    for repeat in range(args.repeats):
        # The ClipSpec build_clip_dataset builds from cfg; epoch = repeat gives each repeat fresh random clips.
        spec = ClipSpec.from_config(cfg, split="train", num_frames=args.frames, crop_size=args.crop, epoch=repeat)
        single = single_process(all_videos[: args.single_videos + 2], spec)
        result.single.append(single)
        print(f"  {videos.name} repeat {repeat}: single process {single.clips_per_s:.2f} clips/s "
              f"(decord {100 * single.decode_share:.0f}%, CPU/wall {single.cpu_seconds / single.seconds:.2f})",
              flush=True)
        makers: dict[str, Callable[[], Iterator[dict[str, Any]]]] = {
            "dataloader": lambda spec=spec: dataloader_batches(all_videos, spec, args.workers, args.batch),
            "ray": lambda spec=spec: ray_batches(videos, cfg, spec, args.batch, "collate"),
            "ray_select_columns": lambda spec=spec: ray_batches(videos, cfg, spec, args.batch, "select_columns"),
        }
        for name in names if repeat % 2 == 0 else names[::-1]:  # alternate who goes first
            timing = time_stream(makers[name], args.warmup_clips, args.tail_clips,
                                 count_existing=name != "dataloader")
            result.runs.setdefault(name, []).append(timing)
            print(f"  {videos.name} repeat {repeat}: {name} {timing.clips_per_s:.2f} clips/s, "
                  f"{timing.cpu_per_clip:.3f} CPU s/clip, machine {100 * timing.machine_idle:.1f}% idle "
                  f"({timing.clips} of {timing.total_clips} clips timed, "
                  f"start-up {timing.startup_seconds:.1f} s)", flush=True)
    totals = {name: {r.total_clips for r in runs} for name, runs in result.runs.items()}
    if len(set().union(*totals.values())) != 1:
        raise RuntimeError(f"the pipelines produced different numbers of clips: {totals}")
    return result


def summarise(results: Sequence[SizeResult]) -> dict[str, float]:
    """Headline ratios (the first size) first, then every size's."""
    head = results[0]
    ratios = {"ray_vs_dataloader": head.vs_dataloader("ray"), "ray_vs_decode_limit": head.vs_limit("ray")}
    for r in results:
        ratios[f"ray_vs_dataloader_{r.name}"] = r.vs_dataloader("ray")
        ratios[f"ray_vs_decode_limit_{r.name}"] = r.vs_limit("ray")
        ratios[f"dataloader_vs_decode_limit_{r.name}"] = r.vs_limit("dataloader")
        if "ray_select_columns" in r.runs:
            ratios[f"ray_select_columns_vs_dataloader_{r.name}"] = r.vs_dataloader("ray_select_columns")
        ratios[f"ray_vs_dataloader_cpu_per_clip_{r.name}"] = r.cpu_per_clip("ray") / r.cpu_per_clip("dataloader")
        ratios[f"decord_share_{r.name}"] = r.decode_share
        for name in ("dataloader", "ray"):
            idle = r.machine_idle(name)
            if math.isfinite(idle):  # the ratios line carries finite numbers only
                ratios[f"{name}_machine_idle_{r.name}"] = idle
    return ratios


def format_table(results: Sequence[SizeResult]) -> str:
    """A markdown table, medians over repeats: clips/s and CPU seconds per clip of every pipeline, and each repeat's
    ratio to the DataLoader with their mean and its ± two standard errors."""
    from benchmarks.measure import spread

    head = ("| size | pipeline | clips/s | vs DataLoader | vs DataLoader, each repeat | vs decode limit | "
            "CPU s/clip | machine idle |")
    rows = [head, "|" + "---|" * 8]
    for r in results:
        rows.append(f"| {r.name} | single process (decord {100 * r.decode_share:.0f}% of it) | "
                    f"{r.single_rate:.2f} | | | | {r.single_cpu_per_clip:.3f} | |")
        rows.append(f"| {r.name} | decode limit (single x {r.parallel}) | {r.decode_limit:.2f} | | | 1.00 | | |")
        for name in r.runs:
            label = {"dataloader": "DataLoader", "ray": "Ray Data",
                     "ray_select_columns": "Ray Data, select_columns first"}[name]
            each = "" if name == "dataloader" else spread(r.repeat_ratios(name))
            rows.append(f"| {r.name} | {label} | {r.rate(name):.2f} | {r.vs_dataloader(name):.2f} | {each} | "
                        f"{r.vs_limit(name):.2f} | {r.cpu_per_clip(name):.3f} | "
                        f"{100 * r.machine_idle(name):.1f}% |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=256, help="videos (= clips) per size")
    parser.add_argument("--sizes", default="340x256,640x360", help="comma-separated WIDTHxHEIGHT; the first is "
                                                                   "the headline")
    parser.add_argument("--video-frames", type=int, default=96, help="frames per generated video (24 fps)")
    parser.add_argument("--workers", type=int, default=0, help="decoders = DataLoader workers (0: cores)")
    parser.add_argument("--threads", type=int, default=1, help="decord (and BLAS) threads per worker")
    parser.add_argument("--frames", type=int, default=16, help="dense frames per clip (T_d)")
    parser.add_argument("--crop", type=int, default=224, help="clip crop size")
    parser.add_argument("--batch", type=int, default=8, help="clips per consumed batch")
    parser.add_argument("--map-batch", type=int, default=0,
                        help="videos per map_batches call (data.batch_size; 0: --batch, a DataLoader worker's share)")
    parser.add_argument("--warmup-clips", type=int, default=32, help="clips before the clock starts")
    parser.add_argument("--tail-clips", type=int, default=16, help="last clips, after the clock stops")
    parser.add_argument("--single-videos", type=int, default=48, help="videos timed in the single process")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each pipeline per size (median)")
    parser.add_argument("--select-columns", action=argparse.BooleanOptionalAction, default=True,
                        help="also time Ray Data consumed with select_columns first (feeds.py's former way)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dist-bench-videos"),
                        help="folder for the generated videos (reused across runs)")
    args = parser.parse_args(argv)
    args.workers = args.workers or len(os.sched_getaffinity(0))
    args.map_batch = args.map_batch or args.batch
    try:
        args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    if not args.size_list:
        parser.error("--sizes names no size")
    if args.videos < args.warmup_clips + args.tail_clips + 2 * args.batch:
        parser.error("--videos must leave at least two batches between --warmup-clips and --tail-clips")
    if args.repeats < 1 or args.single_videos < 1 or args.batch < 1:
        parser.error("--repeats, --single-videos and --batch must be >= 1")
    args.single_videos = min(args.single_videos, args.videos - 2)
    return args


def main(argv: list[str] | None = None) -> list[SizeResult]:
    """Generate (or reuse) the videos, run every size, print the table and the ratios line last."""
    from benchmarks.measure import load_average, print_results

    args = parse_args(argv)
    load = load_average()
    print(f"ingest: videos={args.videos} sizes={args.sizes} video_frames={args.video_frames} workers={args.workers} "
          f"threads={args.threads} clip={args.frames}x{args.crop}x{args.crop} batch={args.batch} "
          f"map_batch={args.map_batch} warmup_clips={args.warmup_clips} tail_clips={args.tail_clips} "
          f"repeats={args.repeats} "
          f"load={load:.2f}", flush=True)
    sets = [ensure_videos(Path(args.cache), w, h, args.videos, args.video_frames, workers=args.workers)
            for w, h in args.size_list]
    results = []
    for videos in sets:  # a fresh local Ray per size: a size's ratios must not depend on what ran before it
        with local_ray(args.workers * args.threads):
            results.append(run_size(videos, args))
    print_results(load, "decode limit = single-process clips_from_video clips/s x min(workers, cores); "
                  f"headline = {results[0].name}", format_table(results), summarise(results))
    return results


if __name__ == "__main__":
    main()
