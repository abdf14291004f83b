"""Which frames of a video make one clip: DiST's segment-based sampling (reference §5), as pure numpy.

The window [first, last) of the video (the whole video, or the manifest's start/end seconds) is split into T_d
equal segments, edges `linspace(first, last, T_d + 1)`; one frame is taken per segment:

- train: a uniformly random position inside each segment (seeded generator);
- eval, 1 view: the middle of each segment;
- eval, view v of V (V > 1): position (v + 1) / V inside each segment, exactly as the reference (and the
  authors' code) says. For V = 3 that is 1/3, 2/3 and the segment's end (= the next segment's start; the last
  segment's end is clamped to the last frame). Note this is not the symmetric (v + 1) / (V + 1).

Positions are clamped to [first, last - 1] and then rounded (numpy rounds halves to even, like torch.round).
The model's sparse stream takes every γ-th of these dense indices, so only these T_d frames are decoded.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np


def frame_window(times: np.ndarray, start: float = math.nan, end: float = math.nan) -> tuple[int, int]:
    """[first, last) frame range covered by the [start, end) seconds window (NaN: video start/end), from each frame's
    presentation time `times` (seconds from the first frame, ascending): `first` is the frame on screen at `start`,
    and frames that start at or after `end` are out. Presentation times, not index / average fps, which drifts by
    seconds on variable-frame-rate video (phone and screen recordings)."""
    n = len(times)
    first, last = 0, n
    if not math.isnan(start) and n:
        first = n if start > last_frame_end(times) + 1e-6 else \
            max(int(np.searchsorted(times, start + 1e-6, "right")) - 1, 0)
    if not math.isnan(end):
        last = int(np.searchsorted(times, end - 1e-6, "left"))
    return first, min(max(last, first), n)


def last_frame_end(times: np.ndarray) -> float:
    """When the last of frames shown at `times` (ascending, at least one) leaves the screen: it lasts as long as the
    one before it."""
    return float(times[-1] + (times[-1] - times[-2] if len(times) > 1 else 0.0))


def segment_indices(
    first: int,
    last: int,
    num_segments: int,
    *,
    mode: Literal["train", "eval"],
    view: int = 0,
    num_views: int = 1,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Frame indices (T_d,) int64 of one clip: one real-valued position per segment of [first, last) (uniform in it
    for training; for evaluation the middle, or with several views evenly spaced offsets), clamped to
    [first, last - 1] and rounded."""
    if last <= first:
        raise ValueError(f"empty frame window [{first}, {last})")
    if not 0 <= view < num_views:
        raise ValueError(f"view {view} is outside 0..{num_views - 1}")
    edges = np.linspace(first, last, num_segments + 1)
    lo, hi = edges[:-1], edges[1:]
    if mode == "train":
        if rng is None:
            raise ValueError("train sampling needs a seeded numpy Generator")
        pos = rng.uniform(lo, hi)
    elif num_views == 1:
        pos = (lo + hi) / 2
    else:
        pos = lo + (hi - lo) * (view + 1) / num_views
    return np.round(np.clip(pos, first, last - 1)).astype(np.int64)


def clip_windows(duration: float, seconds: float) -> list[tuple[float, float]] | None:
    """The [start, end) windows of `seconds` a video of `duration` seconds is cut into, centred (what is left over
    is split between its two ends); None for a video shorter than one window (it is listed whole)."""
    if duration < seconds:
        return None
    n = int(duration // seconds)
    offset = (duration - n * seconds) / 2
    return [(round(offset + i * seconds, 3), round(offset + (i + 1) * seconds, 3)) for i in range(n)]
