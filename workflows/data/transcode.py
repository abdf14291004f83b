"""Rewrite a corpus for fast decoding: short side 320 px, a keyframe every few frames, H.264 (PyAV).

Kinetics' YouTube clips are often 720p-1080p with keyframes seconds apart, so decoding 16 sampled frames means
decoding most of the clip at full size. Transcoding once to a small short side with a short keyframe interval
makes training-time decoding several times faster (see shared/design/platform.md for the per-core numbers).

The originals are never modified: videos are written under a new folder (mirroring their paths relative to the
manifest) through a temporary file that is renamed when complete, so an interrupted run can be resumed (finished
files are skipped), and a new manifest with the same labels and start/end points at them. Videos that cannot be
transcoded are left out of the new manifest and reported. A copy shows as its original does: a phone video keeps
its display rotation, and non-square pixels (DVD, HDV) become square at the displayed width.
"""

from __future__ import annotations

import os
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from workflows.data.manifest import (
    check_output_folder,
    load_manifest,
    parent_dir,
    read_bytes,
    relative_to,
    write_manifest,
)
from workflows.data.video import BadVideo, probe
from workflows.runtime import is_remote


def even_short_side_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the short side at most `short_side` (never upscaled), both even (yuv420p needs it)."""
    scale = min(1.0, short_side / min(width, height))
    w, h = max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)
    return w, h


def transcode_video(src: str, dst: str | Path, *, short_side: int = 320, gop: int = 16, crf: int = 23,
                    preset: str = "veryfast") -> dict[str, Any]:
    """Transcode one video to H.264 mp4 at `dst`; returns {frames, width, height, seconds}. Raises BadVideo."""
    import io

    import av

    info = probe(src)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.part")
    t0 = time.perf_counter()
    source: Any = src if not is_remote(src) else io.BytesIO(read_bytes(src))
    frames = 0
    try:
        with av.open(source) as inp, av.open(str(tmp), "w", format="mp4") as out:
            vin = inp.streams.video[0]
            vin.thread_type = "AUTO"
            rate = Fraction(vin.average_rate or vin.guessed_rate or 25).limit_denominator(1001)
            # Square pixels (a non-square source is stretched to its displayed width), stored unturned with the
            # source's display rotation: the copy shows as the original does.
            w, h = even_short_side_size(*info.square_pixel_size(), short_side)
            vout = out.add_stream("libx264", rate=rate)
            vout.width, vout.height, vout.pix_fmt = w, h, "yuv420p"
            if info.rotation:
                vout.set_display_rotation(info.rotation)
            vout.codec_context.options = {"preset": preset, "crf": str(crf), "g": str(gop),
                                          "keyint_min": str(max(1, gop // 2)), "threads": "1"}
            for frame in inp.decode(vin):
                small = frame.reformat(width=w, height=h, format="yuv420p")
                small.pts, small.time_base = frames, 1 / rate
                for packet in vout.encode(small):
                    out.mux(packet)
                frames += 1
            for packet in vout.encode():
                out.mux(packet)
    except BadVideo:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise BadVideo("decode_error", f"{type(exc).__name__}: {exc}") from None
    if frames == 0:
        tmp.unlink(missing_ok=True)
        raise BadVideo("zero_frames", "no frames decoded")
    os.replace(tmp, dst)
    return {"frames": frames, "width": w, "height": h, "seconds": time.perf_counter() - t0}


def _output_name(path: str, base: str, index: int) -> str:
    """Where a source video goes inside the output folder: its path relative to the manifest's folder when it
    lies below it, else `<index>_<file name>`; always with an .mp4 suffix."""
    rel = relative_to(path, base) if not is_remote(path) else ""
    if not rel or rel.startswith("/") or rel.startswith(".."):
        rel = f"{index:08d}_{Path(path.rsplit('/', 1)[-1]).name}"
    return str(Path(rel).with_suffix(".mp4"))


def _transcode_batch(batch: dict[str, np.ndarray], out_dir: str, short_side: int, gop: int,
                     crf: int) -> dict[str, np.ndarray]:
    results: dict[str, list[Any]] = {"video_index": [], "ok": [], "reason": [], "detail": [], "output": []}
    for path, index, name in zip(batch["path"], batch["video_index"], batch["output"], strict=True):
        dst = Path(out_dir) / "videos" / str(name)
        ok, reason, detail = True, "", ""
        if not (dst.is_file() and dst.stat().st_size > 0):
            try:
                transcode_video(str(path), dst, short_side=short_side, gop=gop, crf=crf)
            except BadVideo as exc:
                ok, reason, detail = False, exc.reason, exc.detail[:300]
        for key, value in (("video_index", int(index)), ("ok", ok), ("reason", reason), ("detail", detail),
                           ("output", str(dst))):
            results[key].append(value)
    return {k: np.array(v) for k, v in results.items()}


def check_transcode_arguments(manifest: str, out_dir: str | Path, *, short_side: int = 320, gop: int = 16,
                              crf: int = 23) -> Path:
    """The resolved output folder, after checking what `data transcode` was given (before Ray starts): ValueError
    naming the option for sizes x264 cannot use, an output that is not a new local folder, or the manifest's own
    folder (the originals must stay untouched)."""
    if short_side < 2:
        raise ValueError(f"--short-side {short_side}: the short side must be at least 2 pixels (default 320)")
    if gop < 1:
        raise ValueError(f"--gop {gop}: the keyframe interval must be at least 1 frame (default 16)")
    if not 0 <= crf <= 51:
        raise ValueError(f"--crf {crf}: x264's quality setting must be 0..51 (0 lossless, 23 the default, higher "
                         f"is smaller and worse)")
    if is_remote(out_dir):
        raise ValueError(f"--out {out_dir}: transcode writes to a local folder; copy it into a bucket afterwards "
                         f"with `data upload`")
    out = check_output_folder(out_dir).resolve()
    source_dir = parent_dir(manifest)
    if not is_remote(source_dir) and out == Path(source_dir).resolve():
        raise ValueError(f"--out {out} is the manifest's own folder; choose a new folder so originals stay untouched")
    return out


def transcode_dataset(manifest: str, out_dir: str | Path, *, short_side: int = 320, gop: int = 16, crf: int = 23,
                      progress: bool = True) -> dict[str, Any]:
    """Transcode every video of `manifest` (in parallel on Ray) into out_dir/videos/ and write
    out_dir/<manifest name> pointing at the new files. Returns a summary dict."""
    import pyarrow as pa
    import ray

    out = check_transcode_arguments(manifest, out_dir, short_side=short_side, gop=gop, crf=crf)
    source_dir = parent_dir(manifest)
    loaded = load_manifest(manifest, None, strict=False)
    table = loaded.table
    names = [_output_name(p, source_dir, i) for i, p in enumerate(table.column("path").to_pylist())]
    work = table.select(["video_index", "path"]).append_column("output", pa.array(names, pa.string()))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    rows_per_block = max(1, -(-work.num_rows // (4 * cpus)))
    blocks = [work.slice(i, rows_per_block) for i in range(0, work.num_rows, rows_per_block)]
    t0 = time.perf_counter()
    ds = ray.data.from_arrow(blocks).map_batches(
        _transcode_batch, fn_kwargs={"out_dir": str(out), "short_side": short_side, "gop": gop, "crf": crf},
        batch_size=None, batch_format="numpy", num_cpus=1)
    results, shown = {}, t0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i, index in enumerate(batch["video_index"]):
            results[int(index)] = {k: batch[k][i] for k in ("ok", "reason", "detail", "output")}
        now = time.perf_counter()
        if progress and (now - shown >= 10 or len(results) == work.num_rows):  # a line per 10 s, and the last
            shown = now
            print(f"  transcoded {len(results)}/{work.num_rows} videos ({now - t0:.0f} s)", flush=True)
    rows, dropped, examples = [], {}, {}
    labels, starts, ends = (table.column(c).to_pylist() for c in ("label_name", "start", "end"))
    for i in range(work.num_rows):
        r = results[i]
        if not r["ok"]:
            dropped[str(r["reason"])] = dropped.get(str(r["reason"]), 0) + 1
            examples.setdefault(str(r["reason"]), []).append(table.column("path")[i].as_py())
            continue
        start, end = (None if np.isnan(v) else v for v in (starts[i], ends[i]))
        rows.append({"path": relative_to(str(r["output"]), out), "label": labels[i], "start": start, "end": end})
    new_manifest = out / Path(manifest.rsplit("/", 1)[-1]).name
    write_manifest(rows, new_manifest)
    return {"manifest": str(new_manifest), "videos": work.num_rows, "ok": len(rows), "dropped": dropped,
            "examples": {k: v[:5] for k, v in examples.items()}, "seconds": time.perf_counter() - t0}
