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


def frame_window(num_frames: int, fps: float, start: float = math.nan, end: float = math.nan) -> tuple[int, int]:
    """[first, last) frame range covered by `start`/`end` seconds (NaN: video start/end), clipped to the video."""
    first = 0 if math.isnan(start) or fps <= 0 else int(math.floor(start * fps + 1e-6))
    last = num_frames if math.isnan(end) or fps <= 0 else int(math.ceil(end * fps - 1e-6))
    first = min(max(first, 0), num_frames)
    last = min(max(last, first), num_frames)
    return first, last


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
