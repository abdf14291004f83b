"""A small synthetic video dataset whose classes differ only in motion (the embedded default for `make demo`).

Eight classes: an object moving left / right / up / down, rotating clockwise / counterclockwise, growing /
shrinking. Every video draws its own object shape (five asymmetric polygons), colour, background (a two-colour
gradient with fixed noise), size, orientation, start position and speed. Any single frame carries no class
signal by construction: at *every* frame index the object's position is uniform on the frame (movement wraps
around the edges, a torus), its orientation is uniform, its log-size is uniform on a fixed range (growing and
shrinking wrap around that range, a sawtooth), and shape, colours and background do not depend on the class. A
spatial-only model therefore stays at chance while a temporal model can learn the task.

A horizontal flip turns "moving left" into "moving right" and "clockwise" into "counterclockwise", so train on
it with `flip: swap_labels` and `flip_pairs: SAMPLE_FLIP_PAIRS` ([[0, 1], [4, 5]]); the writer also records
this in `sample_info.json`.

Videos are real H.264 mp4 files written with PyAV (libx264), read back by decord like any other corpus.
Deterministic: the same seed gives identical frames (and, with the same PyAV build, identical files).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from workflows.data.manifest import save_labels, write_manifest

SAMPLE_CLASSES = ("moving left", "moving right", "moving up", "moving down", "rotating clockwise",
                  "rotating counterclockwise", "growing", "shrinking")
SAMPLE_FLIP_PAIRS = [[0, 1], [4, 5]]  # what a horizontal flip swaps

# Polygons in object coordinates (x right, y down, radius ~1); none has rotational symmetry.
_SHAPES = [
    np.array([(0, -1), (0.7, 0.8), (0, 0.35), (-0.7, 0.8)]),  # arrow head
    np.array([(-0.7, -1), (-0.15, -1), (-0.15, 0.45), (0.75, 0.45), (0.75, 1), (-0.7, 1)]),  # L
    np.array([(-0.9, -1), (0.9, -1), (0.9, -0.45), (0.25, -0.45), (0.25, 1), (-0.25, 1), (-0.25, -0.45),
              (-0.9, -0.45)]),  # T
    np.array([(0, -1), (0.8, -0.25), (0.8, 1), (-0.8, 1), (-0.8, -0.25)]),  # house
    np.array([(-0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]),  # right triangle
]
_LOG_SIZE = (math.log(0.14), math.log(0.30))  # object radius as a fraction of the frame side


def write_video(path: str | Path, frames: np.ndarray, fps: float = 16, *, crf: int = 18, gop: int = 16,
                codec: str = "libx264") -> None:
    """Encode (T, H, W, 3) uint8 RGB frames as an mp4 (H.264 by default; yuv420p: H and W must be even)."""
    import av

    t, h, w, _ = frames.shape
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":  # other encoders (used by tests for exotic files) take their defaults
            stream.codec_context.options = {"preset": "veryfast", "crf": str(crf), "g": str(gop), "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _inside(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for points (..., P) against one polygon (V, 2)."""
    inside = np.zeros(px.shape, bool)
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for a, b, c, d in zip(x1, y1, x2, y2, strict=True):
        if b == d:
            continue
        crosses = (b > py) != (d > py)
        inside ^= crosses & (px < (c - a) * (py - b) / (d - b) + a)
    return inside


def _draw_object(rng: np.random.Generator, shape: np.ndarray, mean_bg: np.ndarray, s: float,
                 num_frames: int) -> dict:
    """One object's class-independent appearance and start state, and its motion magnitudes."""
    colour = rng.uniform(0, 255, 3)
    for _ in range(20):  # keep the object visible against the background
        if np.abs(colour - mean_bg).sum() > 150:
            break
        colour = rng.uniform(0, 255, 3)
    lo, hi = _LOG_SIZE
    return dict(shape=shape, colour=colour, x=rng.uniform(0, s), y=rng.uniform(0, s),
                angle=rng.uniform(0, 2 * math.pi), log_r=rng.uniform(lo, hi),
                speed=rng.uniform(0.6, 1.4) * s / 32,  # pixels per frame
                spin=math.radians(rng.uniform(5, 11)),  # radians per frame
                grow=rng.uniform(0.45, 0.75) / num_frames)  # log-size per frame


def _object_mask(name: str, obj: dict, t: np.ndarray, xx: np.ndarray, yy: np.ndarray, s: float) -> np.ndarray:
    """(T, H, W) bool: where the object is in every frame, moving as class `name` says."""
    x, y = np.full_like(t, obj["x"]), np.full_like(t, obj["y"])
    angle, log_r = np.full_like(t, obj["angle"]), np.full_like(t, obj["log_r"])
    lo, hi = _LOG_SIZE
    speed, spin, grow = obj["speed"], obj["spin"], obj["grow"]
    if name == "moving left":
        x = x - speed * t
    elif name == "moving right":
        x = x + speed * t
    elif name == "moving up":
        y = y - speed * t
    elif name == "moving down":
        y = y + speed * t
    elif name == "rotating clockwise":  # y points down, so a growing angle turns clockwise on screen
        angle = angle + spin * t
    elif name == "rotating counterclockwise":
        angle = angle - spin * t
    elif name == "growing":
        log_r = lo + np.mod(log_r - lo + grow * t, hi - lo)
    elif name == "shrinking":
        log_r = lo + np.mod(log_r - lo - grow * t, hi - lo)
    else:
        raise ValueError(f"unknown sample class {name!r}")
    radius = np.exp(log_r) * s  # (T,)
    # Torus-relative pixel offsets from the object centre, then into object coordinates.
    dx = np.mod(xx[None] - x[:, None, None] + s / 2, s) - s / 2  # (T, H, W)
    dy = np.mod(yy[None] - y[:, None, None] + s / 2, s) - s / 2
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = (cos * dx + sin * dy) / radius[:, None, None]
    v = (-sin * dx + cos * dy) / radius[:, None, None]
    return _inside(u, v, obj["shape"])


def render_motion(label: int, rng: np.random.Generator, *, size: int = 64, num_frames: int = 32,
                  num_objects: int = 1) -> np.ndarray:
    """Frames (T, size, size, 3) uint8 of one video of class `label` (index into SAMPLE_CLASSES).

    `num_objects` objects, each with its own shape, colour, size, start state and speed, all moving as the class
    says (drawn one over the other). More objects put more motion in every clip: an easier task for a model
    trained from scratch, with single frames still carrying no class signal."""
    if not 0 <= label < len(SAMPLE_CLASSES):
        raise ValueError(f"unknown sample class {label}")
    if num_objects < 1:
        raise ValueError(f"num_objects must be >= 1, got {num_objects}")
    t = np.arange(num_frames, dtype=np.float64)
    s = float(size)
    # Class-independent appearance (draw order kept stable: one object gives the same frames as before).
    first_shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres (H, W)
    ramp = ((xx * math.cos(theta) + yy * math.sin(theta)) / s)[..., None]
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    background = c0 * (1 - ramp) + c1 * ramp + rng.normal(0, 8, (size, size, 1))  # (H, W, 3)
    mean_bg = background.reshape(-1, 3).mean(0)
    # Per-frame state, uniform marginals at every t (see the module docstring).
    objects = [_draw_object(rng, first_shape, mean_bg, s, num_frames)]
    for _ in range(num_objects - 1):
        objects.append(_draw_object(rng, _SHAPES[int(rng.integers(len(_SHAPES)))], mean_bg, s, num_frames))
    frames = np.broadcast_to(background[None], (num_frames, size, size, 3))
    name = SAMPLE_CLASSES[label]
    for obj in objects:
        frames = np.where(_object_mask(name, obj, t, xx, yy, s)[..., None], obj["colour"], frames)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


@dataclass
class SampleDataset:
    """Where a written sample dataset is and what it holds."""

    root: str
    train_manifest: str
    val_manifest: str
    labels: str
    classes: list[str]
    flip_pairs: list[list[int]]
    train_videos: int
    val_videos: int
    size: int
    num_frames: int
    fps: int
    seed: int
    num_objects: int = 1


def _write_one(job: tuple[str, int, int, int, int, int, int, int]) -> None:
    path, label, index, seed, size, num_frames, fps, num_objects = job
    rng = np.random.default_rng([seed, label, index])
    write_video(path, render_motion(label, rng, size=size, num_frames=num_frames, num_objects=num_objects), fps)


def write_sample_dataset(
    out_dir: str | Path,
    *,
    videos_per_class: int = 40,
    size: int = 64,
    num_frames: int = 32,
    seed: int = 0,
    fps: int = 16,
    num_objects: int = 1,
    val_fraction: float = 0.25,
    workers: int | None = None,
    progress: bool = False,
) -> SampleDataset:
    """Write the motion dataset under `out_dir`: videos/<class>/<split>_<i>.mp4, train.csv, val.csv,
    labels.json and sample_info.json. Per class, the first (1 - val_fraction) of the videos are training."""
    if size % 2 or size < 16:
        raise ValueError(f"size must be even and >= 16, got {size}")
    if videos_per_class < 2 or num_frames < 2:
        raise ValueError("need at least 2 videos per class and 2 frames")
    out = Path(out_dir)
    n_val = max(1, int(round(videos_per_class * val_fraction)))
    jobs, rows = [], {"train": [], "val": []}
    for label, name in enumerate(SAMPLE_CLASSES):
        slug = name.replace(" ", "_")
        for i in range(videos_per_class):
            split = "val" if i >= videos_per_class - n_val else "train"
            rel = f"videos/{slug}/{split}_{i:04d}.mp4"
            jobs.append((str(out / rel), label, i, seed, size, num_frames, fps, num_objects))
            rows[split].append({"path": rel, "label": name})
    workers = workers or min(4, os.cpu_count() or 1)
    if workers > 1:
        # Spawned, not forked: callers (a Ray driver, a test session with Ray and torch started) are multi-threaded,
        # and a forked child can block forever on a lock one of those threads held at the fork.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for k, _ in enumerate(pool.map(_write_one, jobs, chunksize=8)):
                if progress and (k + 1) % 50 == 0:
                    print(f"  wrote {k + 1}/{len(jobs)} videos", flush=True)
    else:
        for k, job in enumerate(jobs):
            _write_one(job)
            if progress and (k + 1) % 50 == 0:
                print(f"  wrote {k + 1}/{len(jobs)} videos", flush=True)
    write_manifest(rows["train"], out / "train.csv")
    write_manifest(rows["val"], out / "val.csv")
    save_labels({name: i for i, name in enumerate(SAMPLE_CLASSES)}, out / "labels.json")
    info = SampleDataset(root=str(out), train_manifest=str(out / "train.csv"), val_manifest=str(out / "val.csv"),
                         labels=str(out / "labels.json"), classes=list(SAMPLE_CLASSES), flip_pairs=SAMPLE_FLIP_PAIRS,
                         train_videos=len(rows["train"]), val_videos=len(rows["val"]), size=size,
                         num_frames=num_frames, fps=fps, seed=seed, num_objects=num_objects)
    (out / "sample_info.json").write_text(json.dumps(asdict(info), indent=1) + "\n")
    return info
