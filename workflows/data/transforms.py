"""Clip transforms (reference §5) as pure functions over numpy uint8 clips (T, H, W, 3).

Train: random-resized crop (area 0.4-1, aspect ratio 3/4-4/3, torchvision's algorithm), horizontal flip (plain,
none, or flip-and-swap-labels), random grayscale (p = 0.2); one set of random draws per clip, so every frame
of a clip gets the same crop, flip and colour. The reference flips before cropping; a flip commutes in
distribution with a crop whose position is uniform, so flipping the smaller cropped clip is equivalent.
Eval: short-side resize to the crop size and a centre crop (or 3 crops along the long side).

Outputs stay uint8 (T, crop, crop, 3): CLIP normalisation happens on the training device, so the wire carries a
quarter of the bytes. Resizing is bilinear with half-pixel centres (no antialiasing; large sources are already
shrunk at decode time, see video.py), run by OpenCV's fixed-point SIMD kernel (values within 1 of float arithmetic):
~2 ms for a 16-frame crop on one core, where numpy float passes took ~47 ms of a ~110 ms clip at 640x360. OpenCV
rather than torch's equally fast uint8 kernel because every decoder imports it: 0.15 s and ~35 MiB, against
torch's ~2 s and ~280 MiB of private memory (CUDA build) in a process that starts again every epoch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = np.array([0.2989, 0.587, 0.114], np.float32)


@functools.cache
def _opencv():
    """cv2, set single-threaded once per process: one decoder per CPU is how the pipeline scales (and what Ray's CPU
    accounting assumes); OpenCV's own thread pool would oversubscribe the cores."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


def resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (T, H, W, 3) uint8 to (T, height, width, 3) uint8 (half-pixel centres, no antialiasing)."""
    t, h, w, c = frames.shape
    if (h, w) == (height, width):
        return frames
    cv2 = _opencv()
    out = np.empty((t, height, width, c), np.uint8)
    for i in range(t):  # one C call per frame (microseconds of overhead each); strided crop views are read in place
        cv2.resize(frames[i], (width, height), dst=out[i], interpolation=cv2.INTER_LINEAR)
    return out


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(h, w) with the short side scaled to `short`, aspect ratio kept."""
    if height <= width:
        return short, max(short, int(round(width * short / height)))
    return max(short, int(round(height * short / width))), short


def resize_short_side(frames: np.ndarray, short: int) -> np.ndarray:
    """Resize (T, H, W, 3) so that min(H, W) == short."""
    h, w = frames.shape[1:3]
    return resize(frames, *short_side_size(h, w, short))


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator, scale: Sequence[float] = (0.4, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering `scale` of the area with aspect ratio in `ratio`
    (torchvision's RandomResizedCrop: 10 tries, then a centre crop with the ratio clamped)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def hflip(frames: np.ndarray) -> np.ndarray:
    """Mirror (T, H, W, 3) left-right."""
    return frames[:, :, ::-1]


def grayscale(frames: np.ndarray) -> np.ndarray:
    """Luma of (T, H, W, 3) replicated to three channels (uint8)."""
    luma = np.rint(frames.astype(np.float32) @ _LUMA)  # (T, H, W)
    return np.repeat(np.clip(luma, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def swap_label(label: int, pairs: Sequence[Sequence[int]]) -> int:
    """The label a horizontally flipped clip of class `label` has (the other member of its pair, if any)."""
    for a, b in pairs:
        if label == a:
            return b
        if label == b:
            return a
    return label


def train_clip(
    frames: np.ndarray,
    label: int,
    rng: np.random.Generator,
    *,
    crop_size: int,
    flip: str = "plain",
    flip_pairs: Sequence[Sequence[int]] = (),
    flip_p: float = 0.5,
    scale: Sequence[float] = (0.4, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    grayscale_p: float = 0.2,
) -> tuple[np.ndarray, int, bool]:
    """Augment one clip (T, H, W, 3) uint8 -> ((T, crop, crop, 3) uint8, label after a label-swapping flip,
    whether it was flipped). Random draws in a fixed order (crop, flip, grayscale) so a seed fixes the result."""
    top, left, h, w = random_resized_crop_box(frames.shape[1], frames.shape[2], rng, scale, ratio)
    clip = resize(frames[:, top : top + h, left : left + w], crop_size, crop_size)  # (T, crop, crop, 3)
    flipped = bool(rng.random() < flip_p) if flip != "none" else False
    if flipped:
        clip = hflip(clip)
        if flip == "swap_labels":
            label = swap_label(label, flip_pairs)
    if rng.random() < grayscale_p:
        clip = grayscale(clip)
    return np.ascontiguousarray(clip), label, flipped


def eval_clips(frames: np.ndarray, *, crop_size: int, num_crops: int = 1) -> list[np.ndarray]:
    """Short-side resize to `crop_size`, then the centre crop (num_crops=1) or start/centre/end crops along the
    long side (num_crops=3). Returns num_crops clips (T, crop, crop, 3) uint8."""
    clip = resize_short_side(frames, crop_size)
    h, w = clip.shape[1:3]
    if num_crops == 1:
        offsets = [0.5]
    elif num_crops == 3:
        offsets = [0.0, 0.5, 1.0]
    else:
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    out = []
    for o in offsets:
        top = int(round((h - crop_size) * o)) if h > w else (h - crop_size) // 2
        left = int(round((w - crop_size) * o)) if w >= h else (w - crop_size) // 2
        out.append(np.ascontiguousarray(clip[:, top : top + crop_size, left : left + crop_size]))
    return out
