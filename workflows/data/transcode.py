"""Rewrite a corpus for fast decoding: short side 320 px, a keyframe every few frames, H.264 (PyAV).

Kinetics' YouTube clips are often 720p-1080p with keyframes seconds apart, so decoding 16 sampled frames means
decoding most of the clip at full size. Transcoding once to a small short side with a short keyframe interval
makes training-time decoding several times faster (see shared/design/platform.md for the per-core numbers).

The originals are never modified: videos are written under a new folder (mirroring their paths relative to the
manifest) through a temporary file that is renamed when complete, so an interrupted run can be resumed (finished
files are skipped), and a new manifest with the same labels and start/end points at them. Into a bucket
(`--out s3://...`), each file is made in a local temporary folder and uploaded when complete (an object appears
only once its upload completes), on whichever node transcodes it. A local --out (or local videos) on a cluster of
several nodes is used by every node only when each sees the same files there (a shared disk:
`shared_disk.where_tasks_see` asks); else the driver's node transcodes alone. Videos that cannot be
transcoded are left out of the new manifest and reported. A copy shows as its original does: a phone video keeps
its display rotation, and non-square pixels (DVD, HDV) become square at the displayed width.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from workflows.data.manifest import (
    check_output_folder,
    load_manifest,
    parent_dir,
    relative_to,
    write_manifest,
)
from workflows.data.sampling import last_frame_end
from workflows.data.shared_disk import where_tasks_see, witness_files
from workflows.data.upload import upload_file
from workflows.data.video import BadVideo, from_storage, probe, probe_source
from workflows.runtime import is_remote, storage_of


def even_short_side_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the short side at most `short_side` (never upscaled), both even (yuv420p needs it)."""
    scale = min(1.0, short_side / min(width, height))
    w, h = max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)
    return w, h


# A frame is in a window as `sampling.frame_window` counts it: from the frame on screen at `start` to the last one
# shown before `end`, times in seconds from the first frame.
_EPS = 1e-6


@dataclass
class Window:
    """One output of a source video: the frames of [start, end) seconds (NaN: the video's start or end) into `dst`."""

    start: float
    end: float
    dst: Path

    def begins_after(self, t: float) -> bool:
        return math.isfinite(self.start) and t <= self.start + _EPS

    def ends_by(self, t: float) -> bool:
        return math.isfinite(self.end) and t >= self.end - _EPS


class _Writer:
    """An H.264 mp4 written through a temporary file, renamed into place when complete."""

    def __init__(self, dst: Path, rate: Fraction, size: tuple[int, int], rotation: int, options: dict[str, str]):
        import av

        self.dst, self.size, self.rate, self.frames = dst, size, rate, 0
        dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = dst.with_name(f".{dst.name}.part")
        self.out = av.open(str(self.tmp), "w", format="mp4")
        self.stream = self.out.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = *size, "yuv420p"
        if rotation:
            self.stream.set_display_rotation(rotation)
        self.stream.codec_context.options = options

    def write(self, frame: Any) -> None:
        small = frame.reformat(width=self.size[0], height=self.size[1], format="yuv420p")
        small.pts, small.time_base = self.frames, 1 / self.rate
        for packet in self.stream.encode(small):
            self.out.mux(packet)
        self.frames += 1

    def finish(self) -> int:
        for packet in self.stream.encode():
            self.out.mux(packet)
        self.out.close()
        os.replace(self.tmp, self.dst)
        return self.frames

    def abort(self) -> None:
        try:
            self.out.close()
        except Exception:  # noqa: BLE001 - a half-written file is removed either way
            pass
        self.tmp.unlink(missing_ok=True)


def transcode_windows(src: str, windows: list[Window], *, short_side: int = 320, gop: int = 16, crf: int = 23,
                      preset: str = "veryfast", retry_s: float | None = None,
                      witnesses: list[str] | tuple[str, ...] = ()) -> dict[Path, int | BadVideo]:
    """Transcode windows of one video to H.264 mp4s in a single decode pass (a recording cut into many clips is
    decoded once, not once per clip): {dst: frames written, or the BadVideo of a window without a frame}. The whole
    video failing raises BadVideo and leaves no file. A copy shows as its original does: square pixels (a
    non-square source stretched to its displayed width), stored unturned with the source's display rotation.
    `witnesses`: `read_frames`' (a local disk gone is waited for, not the video missing)."""
    import av

    # a video in a bucket: its bytes, fetched once (retried) for both
    info, source = probe_source(src, retry_s, witnesses)
    if not isinstance(source, str):
        source.seek(0)  # the probe read it
    w, h = even_short_side_size(*info.square_pixel_size(), short_side)
    options = {"preset": preset, "crf": str(crf), "g": str(gop), "keyint_min": str(max(1, gop // 2)), "threads": "1"}
    open_: dict[int, _Writer] = {}
    pending: dict[int, Any] = {}  # a window's candidate first frame: the newest one shown at or before its start
    done: dict[Path, int | BadVideo] = {}
    times: list[float] = []
    try:
        with av.open(source) as inp:
            vin = inp.streams.video[0]
            vin.thread_type = "AUTO"
            rate = Fraction(vin.average_rate or vin.guessed_rate or 25).limit_denominator(1001)

            def writer(i: int) -> _Writer:
                open_[i] = _Writer(windows[i].dst, rate, (w, h), info.rotation, options)
                return open_[i]

            for index, frame in enumerate(inp.decode(vin)):
                t = frame.time if frame.time is not None else index / float(rate)
                times.append(t)
                t -= times[0]
                for i, window in enumerate(windows):
                    if window.dst in done:
                        continue
                    if i not in open_:
                        if window.begins_after(t):
                            pending[i] = frame
                            continue
                        out = writer(i)
                        if i in pending:
                            out.write(pending.pop(i))
                    if window.ends_by(t):
                        done[window.dst] = open_.pop(i).finish()
                    else:
                        open_[i].write(frame)
            end_of_video = _last_frame_end(times)
            for i, window in enumerate(windows):  # windows still open at the end, or whose start came last
                if window.dst in done:
                    continue
                if i not in open_ and i in pending and window.start <= end_of_video + _EPS:
                    writer(i).write(pending.pop(i))
                done[window.dst] = open_.pop(i).finish() if i in open_ else BadVideo(
                    "too_short", f"no frame in [{window.start:g}, {window.end:g}) s of a {end_of_video:.2f} s video")
    except Exception as exc:
        for out in open_.values():
            out.abort()
        for dst, written in done.items():  # no clip of a video that failed: all of it is reported, none kept
            if not isinstance(written, BadVideo):
                dst.unlink(missing_ok=True)
        if isinstance(exc, BadVideo):
            raise
        raise BadVideo("decode_error", f"{type(exc).__name__}: {exc}") from None
    if not times:
        raise BadVideo("zero_frames", "no frames decoded")
    return done


def _last_frame_end(times: list[float]) -> float:
    """Seconds from the first frame until the last one leaves the screen (`sampling.last_frame_end`)."""
    if not times:
        return 0.0
    return last_frame_end(np.asarray(times, np.float64) - times[0])


def transcode_video(src: str, dst: str | Path, *, short_side: int = 320, gop: int = 16, crf: int = 23,
                    preset: str = "veryfast") -> dict[str, Any]:
    """Transcode one whole video to H.264 mp4 at `dst`; returns {frames, width, height, seconds}. Raises BadVideo."""
    t0 = time.perf_counter()
    dst = Path(dst)
    (frames,) = transcode_windows(src, [Window(math.nan, math.nan, dst)], short_side=short_side, gop=gop, crf=crf,
                                  preset=preset).values()
    info = probe(str(dst))
    return {"frames": frames, "width": info.width, "height": info.height, "seconds": time.perf_counter() - t0}


def _output_name(path: str, base: str, index: int) -> str:
    """Where a source video goes inside the output folder: its path relative to the manifest's folder when it
    lies below it, else `<index>_<file name>`; always with an .mp4 suffix."""
    rel = relative_to(path, base) if not is_remote(path) else ""
    if not rel or rel.startswith("/") or rel.startswith(".."):
        rel = f"{index:08d}_{Path(path.rsplit('/', 1)[-1]).name}"
    return str(Path(rel).with_suffix(".mp4"))


def _window_name(name: str, start: float, end: float) -> str:
    """A cut clip's file beside where its whole video would go: `<stem>_<start>-<end>s.mp4` (a row without a window:
    the whole video's name)."""
    if math.isnan(start) and math.isnan(end):
        return name
    first = format(start, ".10g") if math.isfinite(start) else "0"
    last = format(end, ".10g") if math.isfinite(end) else "end"
    return str(Path(name).with_name(f"{Path(name).stem}_{first}-{last}s.mp4"))


def _complete(fs: Any, inner: str, uri: str, retry_s: float | None) -> bool:
    """Whether an output exists whole: a local file is renamed into place when complete, a bucket object appears
    when its upload completes, so any non-empty one is (a resumed run skips it)."""
    import pyarrow.fs as pafs

    info = from_storage(uri, fs, lambda: fs.get_file_info(inner), retry_s)
    return info.type == pafs.FileType.File and (info.size or 0) > 0


def _transcode_batch(batch: dict[str, np.ndarray], out_dir: str, short_side: int, gop: int, crf: int,
                     retry_s: float | None = None, witnesses: list[str] | None = None) -> dict[str, np.ndarray]:
    """One source video per row, with its windows (JSON [[start, end, output name], ...], NaN: the video's start
    or end): each output not already complete is written, in one decode of the source, into `out_dir`/videos: a
    local folder directly, a bucket through a local temporary folder (each output uploaded when it is complete).
    Each output row also names the Ray node that made it."""
    import tempfile

    import pyarrow.fs as pafs
    import ray

    fs, root = storage_of(out_dir)
    remote = not isinstance(fs, pafs.LocalFileSystem)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    results: dict[str, list[Any]] = {"output": [], "ok": [], "reason": [], "detail": [], "node": []}
    for path, listed in zip(batch["path"], batch["windows"], strict=True):
        named = [(a, b, n) for a, b, n in json.loads(str(listed))]
        uri = {n: f"{out_dir.rstrip('/')}/videos/{n}" for _, _, n in named}
        todo = [(a, b, n) for a, b, n in named if not _complete(fs, f"{root}/videos/{n}", uri[n], retry_s)]
        outcome: dict[str, int | BadVideo] = {}
        if todo:  # into a bucket: made in a local temporary folder first
            with tempfile.TemporaryDirectory(prefix="dist-transcode-") if remote else nullcontext(root) as where:
                windows = [Window(a, b, Path(where) / "videos" / n) for a, b, n in todo]
                try:
                    made = transcode_windows(str(path), windows, short_side=short_side, gop=gop, crf=crf,
                                             retry_s=retry_s, witnesses=witnesses or ())
                except BadVideo as exc:
                    made = dict.fromkeys((w.dst for w in windows), exc)
                for window, (_, _, n) in zip(windows, todo, strict=True):
                    outcome[n] = made[window.dst]
                    if remote and not isinstance(made[window.dst], BadVideo):
                        upload_file(window.dst, fs, f"{root}/videos/{n}", uri[n], retry_s)
        for _, _, n in named:
            bad = outcome.get(n)
            bad = bad if isinstance(bad, BadVideo) else None
            results["output"].append(uri[n])
            results["ok"].append(bad is None)
            results["reason"].append(bad.reason if bad else "")
            results["detail"].append(bad.detail[:300] if bad else "")
            results["node"].append(node)
    return {k: np.array(v) for k, v in results.items()}


def check_transcode_arguments(manifest: str, out_dir: str | Path, *, short_side: int = 320, gop: int = 16,
                              crf: int = 23, storage_retry_s: float | None = None) -> str:
    """The resolved output folder (a local path, or a bucket URI as given), after checking what `data transcode`
    was given (before Ray starts): ValueError naming the option for sizes x264 cannot use, a local output that is
    not a folder that can be written, a bucket that does not answer, or the manifest's own folder (the originals
    must stay untouched)."""
    if short_side < 2:
        raise ValueError(f"--short-side {short_side}: the short side must be at least 2 pixels (default 320)")
    if gop < 1:
        raise ValueError(f"--gop {gop}: the keyframe interval must be at least 1 frame (default 16)")
    if not 0 <= crf <= 51:
        raise ValueError(f"--crf {crf}: x264's quality setting must be 0..51 (0 lossless, 23 the default, higher "
                         f"is smaller and worse)")
    if storage_retry_s is not None and not storage_retry_s >= 0:
        raise ValueError(f"--storage-retry-s {storage_retry_s}: must be >= 0 seconds (default 120)")
    source_dir = parent_dir(manifest)
    if is_remote(out_dir):
        out = str(out_dir).rstrip("/")
        if out == source_dir.rstrip("/"):
            raise ValueError(f"--out {out} is the manifest's own folder; choose a new prefix so originals stay "
                             f"untouched")
        _check_bucket_answers(out)
        return out
    out_path = check_output_folder(out_dir).resolve()
    if not is_remote(source_dir) and out_path == Path(source_dir).resolve():
        raise ValueError(f"--out {out_path} is the manifest's own folder; choose a new folder so originals stay "
                         f"untouched")
    return str(out_path)


def _check_bucket_answers(out: str) -> None:
    """ValueError when the bucket of `--out` cannot be listed (credentials, endpoint, a bucket that is not there),
    before any video is transcoded for it."""
    import pyarrow
    import pyarrow.fs as pafs

    from workflows.data.manifest import storage_hint
    from workflows.runtime import redact_secrets

    try:
        fs, root = storage_of(out)
        bucket = fs.get_file_info(root.split("/", 1)[0])
        fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (OSError, pyarrow.ArrowInvalid) as exc:
        raise ValueError(f"--out {redact_secrets(out)}: the bucket cannot be reached: {redact_secrets(str(exc))}"
                         f"{storage_hint(out)}") from None
    if bucket.type == pafs.FileType.NotFound:
        raise ValueError(f"--out {redact_secrets(out)}: there is no bucket {bucket.path!r}; create it, or name one "
                         f"that exists{storage_hint(out)}")


def transcode_dataset(manifest: str, out_dir: str | Path, *, short_side: int = 320, gop: int = 16, crf: int = 23,
                      cut: bool = False, progress: bool = True, storage_retry_s: float | None = None) -> dict[str, Any]:
    """Transcode every video of `manifest` (in parallel on Ray, each source file once however many rows name it)
    into out_dir/videos/ and write out_dir/<manifest name> pointing at the new files. With `cut`, each row's
    [start, end) window becomes a file of its own (rows without start and end: the whole video), named
    `<video>_<start>-<end>s.mp4`, and the new rows have no window: a long recording cut into clips is then read
    clip by clip, not whole for each clip (from a bucket: its bytes fetched once per clip row). `out_dir` in a
    bucket (s3://...): every node of the cluster transcodes and uploads; a local one (or local videos): every node
    that sees the same files, else this node alone (`where_tasks_see`). A bucket that stops answering is waited for
    `storage_retry_s` seconds (None: `video.STORAGE_RETRY_S`) per read or upload, then StorageUnreachable. Returns a
    summary dict."""
    import pyarrow as pa
    import ray

    out = check_transcode_arguments(manifest, out_dir, short_side=short_side, gop=gop, crf=crf,
                                    storage_retry_s=storage_retry_s)
    source_dir = parent_dir(manifest)
    loaded = load_manifest(manifest, None, strict=False)
    table = loaded.table
    paths, labels, starts, ends = (table.column(c).to_pylist() for c in ("path", "label_name", "start", "end"))
    first_row: dict[str, int] = {}
    for i, path in enumerate(paths):
        first_row.setdefault(path, i)
    names = {path: _output_name(path, source_dir, i) for path, i in first_row.items()}
    # each row's output file: its video's copy, or (cut) its window's own file; sources keep their first row's order
    row_output = [_window_name(names[p], a, b) if cut else names[p] for p, a, b in zip(paths, starts, ends,
                                                                                     strict=True)]
    windows: dict[str, dict[str, tuple[float, float]]] = {p: {} for p in first_row}  # NaN: the video's start/end
    for path, name, a, b in zip(paths, row_output, starts, ends, strict=True):
        windows[path][name] = (a, b) if cut else (math.nan, math.nan)
    work = pa.table({"path": list(windows), "windows": [json.dumps([[a, b, n] for n, (a, b) in w.items()])
                                                        for w in windows.values()]})
    outputs = sum(len(w) for w in windows.values())
    if not is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)  # made now: the nodes are asked whether they see it
    witnesses = witness_files(paths)  # the first is what the nodes are asked; all, what a task missing one checks
    local = [("--out", out)] + [("the videos, e.g.", p) for p in witnesses[:1]]
    placement, cpus, note = where_tasks_see(local)
    rows_per_block = max(1, -(-work.num_rows // (4 * cpus)))
    blocks = [work.slice(i, rows_per_block) for i in range(0, work.num_rows, rows_per_block)]
    if note:  # on stderr: with --json, stdout holds the result alone
        print(f"note: {note}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    ds = ray.data.from_arrow(blocks).map_batches(
        _transcode_batch, fn_kwargs={"out_dir": out, "short_side": short_side, "gop": gop, "crf": crf,
                                     "retry_s": storage_retry_s, "witnesses": witnesses},
        batch_size=None, batch_format="numpy", num_cpus=1, **placement)
    results: dict[str, dict[str, Any]] = {}
    shown, failed = t0, 0
    what = "clips" if cut else "videos"
    for batch in _storage_errors_as_themselves(ds.iter_batches(batch_format="numpy", batch_size=None)):
        for i, output in enumerate(batch["output"]):
            results[str(output)] = {k: batch[k][i] for k in ("ok", "reason", "detail", "node")}
            failed += not batch["ok"][i]
        now = time.perf_counter()
        if progress and (now - shown >= 10 or len(results) == outputs):  # a line per 10 s, and the last
            shown = now
            # done, not "transcoded": a failed file is done too, and counted apart
            failures = f"{failed} failed, " if failed else ""
            print(f"  {len(results)}/{outputs} {what} done ({failures}{now - t0:.0f} s)", flush=True)
    rows, dropped, examples = [], {}, {}
    for i, path in enumerate(paths):
        r = results[f"{out}/videos/{row_output[i]}"]
        if not r["ok"]:
            dropped[str(r["reason"])] = dropped.get(str(r["reason"]), 0) + 1
            examples.setdefault(str(r["reason"]), []).append(path)
            continue
        start, end = (None if cut or np.isnan(v) else v for v in (starts[i], ends[i]))
        rows.append({"path": f"videos/{row_output[i]}", "label": labels[i], "start": start, "end": end})
    new_manifest = f"{out}/{manifest.rstrip('/').rsplit('/', 1)[-1]}"
    from_storage(new_manifest, storage_of(new_manifest)[0], lambda: write_manifest(rows, new_manifest),
                 storage_retry_s, action="write")
    return {"manifest": new_manifest, "videos": len(paths), "ok": len(rows), "dropped": dropped,
            "examples": {k: v[:5] for k, v in examples.items()}, "seconds": time.perf_counter() - t0,
            "source_files": len(first_row), "cut": cut,
            "nodes": len({str(r["node"]) for r in results.values()})}


def _storage_errors_as_themselves(batches: Any) -> Any:
    """`batches`, with a task's StorageUnreachable (a bucket that stopped answering: the command's one clear error)
    raised as itself, not inside the RayTaskError(UserCodeException) Ray Data wraps it in."""
    from ray.exceptions import RayTaskError

    from workflows.data.video import StorageUnreachable
    from workflows.runtime import root_cause

    try:
        yield from batches
    except RayTaskError as exc:
        cause = root_cause(exc)
        if cause.startswith(f"{StorageUnreachable.__name__}: "):
            raise StorageUnreachable(cause.split(": ", 1)[1]) from None
        raise
