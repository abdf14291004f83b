"""The dataset doctor: decode every video of a manifest once, in parallel on Ray, and summarise what is usable
(`python -m workflows data check`).

A bucket that stops answering, or a local disk that goes away, is not a property of the videos: a video whose read
gave up (StorageUnreachable, after `storage_retry_s`) is counted as unreachable, never as dropped; the rest of its
batch is not tried (each would wait the whole budget again), and the check stops at the first such batch, reporting
what it had checked."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np

from workflows.data.data_config import DataConfig
from workflows.data.drops import MAX_EXAMPLES
from workflows.data.manifest import closest_class, load_labels, load_manifest
from workflows.data.pipeline import manifest_blocks
from workflows.data.shared_disk import where_tasks_see, witness_files
from workflows.data.video import DROP_REASONS, BadVideo, StorageUnreachable, read_frames

UNREACHABLE = "unreachable"  # a row's reason when its storage did not answer: not one of DROP_REASONS


MIN_FRAMES = DataConfig().min_frames  # what training drops as too_short, unless a recipe says otherwise


def _row(path: str) -> dict[str, Any]:
    return {"path": path, "ok": False, "reason": "", "detail": "", "frames": 0, "fps": 0.0, "width": 0, "height": 0,
            "duration": 0.0, "declared_duration": 0.0, "decoded": 0, "seconds": 0.0, "rotation": 0, "sar": 1.0}


# Rows longer than this (3x a Kinetics clip) are reported: DiST spreads its 8 sparse and 16 dense frames over a
# whole row, so in a longer one the dense frames are over 2 s apart and the motion between them is lost.
LONG_ROW_S = 30.0


def sampled_seconds(duration: float, start: float, end: float) -> float:
    """The seconds of a video a row samples from: its [start, end) window (NaN: the video's own start or end)."""
    first = start if math.isfinite(start) else 0.0
    last = min(end, duration) if math.isfinite(end) else duration
    return max(0.0, last - first)


def shorter_than_declared(duration: float, declared: float) -> bool:
    """Whether a video decodes to well under the duration its header declares (over 10% and over half a second
    short): a video damaged in the middle, or one whose video track stops long before its audio, still decodes, to
    fewer frames (a Matroska/WebM cut short is dropped as truncated when its header declares its size)."""
    return declared > 0 and declared - duration > max(0.1 * declared, 0.5)


def check_video(path: str, start: float = math.nan, end: float = math.nan, *, num_frames: int = 16,
                min_frames: int = MIN_FRAMES, storage_retry_s: float | None = None,
                witnesses: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Decode `num_frames` frames spread over the whole video (first and last included); a stats row. `witnesses`:
    `read_frames`' (a local disk gone is unreachable, not every video missing)."""
    t0 = time.perf_counter()
    row = _row(path)
    try:
        decoded = read_frames(path, lambda a, b, fps: np.unique(np.linspace(a, b - 1, num_frames).round()),
                              start=start, end=end, min_frames=min_frames, storage_retry_s=storage_retry_s,
                              witnesses=witnesses)
        row.update(ok=True, frames=decoded.num_frames, fps=decoded.fps, width=decoded.width, height=decoded.height,
                   duration=decoded.duration, declared_duration=decoded.declared_duration,
                   decoded=len(decoded.indices), rotation=decoded.rotation, sar=decoded.sar)
    except BadVideo as exc:
        row.update(reason=exc.reason, detail=exc.detail[:300])
    except StorageUnreachable as exc:
        row.update(reason=UNREACHABLE, detail=str(exc))
    row["seconds"] = time.perf_counter() - t0
    return row


def _check_batch(batch: dict[str, np.ndarray], num_frames: int, min_frames: int,
                 storage_retry_s: float | None = None, witnesses: list[str] | None = None) -> dict[str, np.ndarray]:
    rows: list[dict[str, Any]] = []
    gave_up = ""  # why the storage was given up on, once it was: the rest of the batch does not wait again
    for p, s, e in zip(batch["path"], batch["start"], batch["end"], strict=True):
        if gave_up:
            rows.append({**_row(str(p)), "reason": UNREACHABLE, "detail": "not tried: " + gave_up})
            continue
        rows.append(check_video(str(p), float(s), float(e), num_frames=num_frames, min_frames=min_frames,
                                storage_retry_s=storage_retry_s, witnesses=witnesses or ()))
        if rows[-1]["reason"] == UNREACHABLE:
            gave_up = rows[-1]["detail"]
    out = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    out["video_index"] = np.asarray(batch["video_index"], np.int64)
    return out


def check_arguments(num_frames: int, min_frames: int, storage_retry_s: float | None = None) -> None:
    """ValueError naming the option when `data check`'s numbers cannot work (checked before Ray starts)."""
    if storage_retry_s is not None and not storage_retry_s >= 0:
        raise ValueError(f"--storage-retry-s {storage_retry_s}: must be >= 0 seconds (default 120)")
    if num_frames < 1:
        raise ValueError(f"--frames {num_frames}: frames decoded per video must be at least 1 (default 16)")
    if min_frames < 1:
        raise ValueError(f"--min-frames {min_frames}: must be at least 1 (videos with fewer frames count as too_short)")


def check_dataset(manifest: str, labels: str | dict[str, int] | None = None, *, num_frames: int = 16,
                  min_frames: int = MIN_FRAMES, parallelism: int | None = None, progress: bool = False,
                  storage_retry_s: float | None = None) -> dict[str, Any]:
    """Decode every video of `manifest` once, in parallel on Ray; return the doctor's summary as a dict with
    videos, ok, dropped {reason: count}, examples {reason: paths}, `bad` (every video not ok: path, reason, detail),
    `shorter_than_declared` (usable videos that decode to well under their header's duration: count, examples),
    unknown_labels, frame/resolution statistics and decode throughput; `unreachable` counts the videos not read
    because their storage did not answer (`storage_error` says why), after which the check stopped."""
    import ray

    check_arguments(num_frames, min_frames, storage_retry_s)
    label_map = load_labels(labels) if isinstance(labels, str) else labels
    loaded = load_manifest(manifest, label_map, strict=False)
    table = loaded.table.select(["video_index", "path", "start", "end"])
    # local videos on a cluster whose other nodes do not see them: read here alone, or they would count as missing
    witnesses = witness_files(table.column("path").to_pylist())  # the first is what the nodes are asked
    placement, cpus, note = where_tasks_see([("the videos, e.g.", p) for p in witnesses[:1]])
    if note:  # on stderr: with --json, stdout holds the report alone
        print(f"note: {note}", file=sys.stderr, flush=True)
    cpus = max(1, int(parallelism or cpus))
    t0 = time.perf_counter()
    ds = ray.data.from_arrow(manifest_blocks(table, max(1, math.ceil(table.num_rows / (4 * cpus)))))
    ds = ds.map_batches(_check_batch, fn_kwargs={"num_frames": num_frames, "min_frames": min_frames,
                                                 "storage_retry_s": storage_retry_s,
                                                 "witnesses": witnesses},
                        batch_size=None, batch_format="numpy", num_cpus=1, **placement)
    rows: list[dict[str, Any]] = []
    last = t0
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
        rows += batch.to_dict("records")
        if (batch["reason"] == UNREACHABLE).any():
            break  # the storage went away: every further batch would wait out the same budget
        if progress and time.perf_counter() - last > 5:
            last = time.perf_counter()
            print(f"  checked {len(rows)}/{table.num_rows} videos ({len(rows) / (last - t0):.1f}/s)", flush=True)
    rows.sort(key=lambda r: r["video_index"])
    wall = time.perf_counter() - t0
    ok = [r for r in rows if r["ok"]]
    dropped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    details: dict[str, str] = {}
    unreachable = [r for r in rows if r["reason"] == UNREACHABLE]
    for r in rows:
        if not r["ok"] and r["reason"] != UNREACHABLE:
            dropped[r["reason"]] = dropped.get(r["reason"], 0) + 1
            if len(examples.setdefault(r["reason"], [])) < MAX_EXAMPLES:
                examples[r["reason"]].append(r["path"])
                details[r["path"]] = r["detail"]

    def stats(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        a = np.asarray(values, np.float64)
        return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max()), "mean": float(a.mean())}

    short = [r for r in ok if shorter_than_declared(r["duration"], r["declared_duration"])]
    window = {int(i): (float(a), float(b)) for i, a, b in zip(*(table.column(c).to_numpy(zero_copy_only=False)
                                                               for c in ("video_index", "start", "end")), strict=True)}
    long = sorted(((sampled_seconds(r["duration"], *window[int(r["video_index"])]), r["path"]) for r in ok),
                  reverse=True)
    long = [(seconds, path) for seconds, path in long if seconds > LONG_ROW_S]
    turned = [r for r in ok if r["rotation"] % 360]
    stretched = [r for r in ok if r["sar"] != 1.0]
    resolutions: dict[str, int] = {}
    for r in ok:
        key = f"{r['width']}x{r['height']}"
        resolutions[key] = resolutions.get(key, 0) + 1
    decode_seconds = float(sum(r["seconds"] for r in rows))
    return {
        "manifest": manifest,
        "videos": table.num_rows,
        "ok": len(ok),
        # not read because the storage did not answer, plus those the check did not reach after it stopped
        "unreachable": len(unreachable) + table.num_rows - len(rows),
        "storage_error": next((r["detail"] for r in unreachable if not r["detail"].startswith("not tried")), ""),
        "dropped": dropped,
        "examples": examples,
        "details": details,
        "bad": [{"path": r["path"], "reason": r["reason"], "detail": r["detail"]} for r in rows if not r["ok"]],
        "shorter_than_declared": {
            "count": len(short),
            "examples": [f"{r['path']} ({r['duration']:.2f} of {r['declared_duration']:.2f} s)"
                         for r in short[:MAX_EXAMPLES]]},
        # rows over LONG_ROW_S seconds long (the longest first): frames too far apart for DiST's temporal encoder
        "long_rows": {"count": len(long), "seconds": LONG_ROW_S,
                      "examples": [f"{path} ({seconds:.0f} s)" for seconds, path in long[:MAX_EXAMPLES]]},
        # decoded as a player shows them, not as stored: turned by a display rotation, non-square pixels made square
        "displayed_not_as_stored": {
            "turned": len(turned), "non_square_pixels": len(stretched),
            "examples": [f"{r['path']} (turned {int(r['rotation'])} degrees)" for r in turned[:MAX_EXAMPLES]] +
                        [f"{r['path']} (pixels {r['sar']:.3g}:1)" for r in stretched[:MAX_EXAMPLES]]},
        # rows as a user finds them: file lines of a CSV/TSV manifest, 1-based rows of a Parquet one (`numbered_by`)
        "numbered_by": "line" if loaded.lines is not None else "row",
        "unknown_labels": {k: [loaded.number(i) for i in v] for k, v in loaded.unknown_labels.items()}
        if label_map else {},
        # the class each unknown label most likely meant (a typo, another case): {label: class}
        "meant_labels": {k: meant for k in loaded.unknown_labels if label_map
                         for meant in [closest_class(k, label_map)] if meant},
        # rows naming the same clip (path, start, end) as an earlier row, [row, earlier row] pairs (numbered_by)
        "repeated_rows": [[loaded.number(r), loaded.number(e)] for r, e in loaded.repeated_rows],
        "label_conflicts": [[loaded.number(r), loaded.number(e)] for r, e in loaded.label_conflicts],
        "duplicate_warnings": loaded.duplicate_warnings(),
        "frames": stats([r["frames"] for r in ok]),
        "fps": stats([r["fps"] for r in ok]),
        "short_side": stats([min(r["width"], r["height"]) for r in ok]),
        "resolutions": dict(sorted(resolutions.items(), key=lambda kv: -kv[1])[:10]),
        "duration_s": stats([r["duration"] for r in ok if r["duration"] > 0]),
        "wall_seconds": wall,
        "videos_per_second": len(rows) / wall if wall > 0 else 0.0,
        "decode_seconds_per_video": decode_seconds / len(rows) if rows else 0.0,
        "drop_reasons": list(DROP_REASONS),
    }
