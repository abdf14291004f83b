"""Decode the frames one clip needs from one video, or say precisely why the video is unusable.

`read_frames` checks the file (pyarrow filesystem), probes the container header with PyAV (cheap: no frames are
decoded), then decodes only the requested frame indices with decord (`num_threads` readers, decode-time resize
when the source is much larger than needed). Every failure becomes a `BadVideo` with one of `DROP_REASONS`:

    missing            the file does not exist
    empty              zero bytes
    truncated          an MP4/MOV whose boxes run past the end of the file (an interrupted download/copy)
    corrupt            not a container FFmpeg recognises (random bytes, HTML error pages, ...)
    no_video_stream    a container without a video stream (audio only)
    unsupported_codec  a video stream decord cannot decode (e.g. AV1 with the pinned decord 0.6.0)
    zero_frames        a video stream without a single packet (e.g. an interrupted fragmented-MP4 recording,
                       or a sample table emptied by a broken muxer); found with PyAV when decord cannot open the
                       stream: decord 0.6.0 never reports 0 frames for such files, it fails earlier because no
                       pixel format can be known without a frame
    too_short          fewer frames than the configured minimum (in the start/end window)
    decode_error       anything else that failed while decoding frames

decord 0.6.0 mis-copies frames for a few output widths (e.g. 48 or 72 px: "The size must exactly match");
those videos are decoded with PyAV instead of being dropped.

A video in a bucket whose storage does not answer is not a bad video: each read is retried for up to
STORAGE_RETRY_S seconds (the storage SDK's own retries come first), then `StorageUnreachable` (an OSError, never a
BadVideo) fails the batch, so the run restarts from its newest complete checkpoint instead of dropping good videos.
"""

from __future__ import annotations

import io
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import numpy as np
import pyarrow.fs as pafs

from workflows.data.manifest import resolve_filesystem, storage_hint

DROP_REASONS = ("missing", "empty", "truncated", "corrupt", "no_video_stream", "unsupported_codec", "zero_frames",
                "too_short", "decode_error")

# ISO base media (MP4/MOV/3GP) top-level box types we expect to see at the start of a healthy file.
_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"uuid", b"pnot", b"styp", b"sidx", b"moof",
              b"mfra", b"meta", b"pdin", b"prft", b"emsg"}


class BadVideo(Exception):
    """A video that cannot give a clip; `reason` is one of DROP_REASONS, `detail` a short explanation."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in DROP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class VideoInfo:
    """What the container header says about the first video stream."""

    width: int
    height: int
    codec: str
    size_bytes: int


@dataclass
class DecodedVideo:
    """Frames gathered for a clip: `frames` (K, H, W, 3) uint8 for the sorted unique `indices` (K,)."""

    frames: np.ndarray
    indices: np.ndarray
    num_frames: int
    fps: float
    width: int  # source resolution (before any decode-time resize)
    height: int

    def take(self, wanted: np.ndarray) -> np.ndarray:
        """Frames for `wanted` indices (T,) -> (T, H, W, 3)."""
        return self.frames[np.searchsorted(self.indices, wanted)]


STORAGE_RETRY_S = 120.0  # how long a read from a bucket is retried before the storage counts as unreachable
# (the default of data.storage_retry_s, and what `data check` and `predict` wait)


class StorageUnreachable(OSError):
    """A bucket that did not answer for the retry budget: the run's problem, not the video's."""


def _from_storage(path: str, fs: pafs.FileSystem, read: Callable[[], object], retry_s: float | None) -> object:
    """`read()` against the storage of `path`; on a remote filesystem an OSError (connection reset or refused,
    throttling, a 5xx) is retried with backoff until `retry_s` (None: STORAGE_RETRY_S) seconds have passed, then
    raised as StorageUnreachable. A missing file is no OSError here: pyarrow reports it as FileType.NotFound."""
    if isinstance(fs, pafs.LocalFileSystem):
        return read()
    budget = STORAGE_RETRY_S if retry_s is None else retry_s
    started, pause = time.monotonic(), 0.5
    while True:
        try:
            return read()
        except OSError as exc:
            waited = time.monotonic() - started
            if waited >= budget:
                raise StorageUnreachable(f"cannot read {path}: its storage did not answer for {waited:.0f} s ({exc})"
                                         f"{storage_hint(path)}") from None
            time.sleep(min(pause, max(0.0, budget - waited)))
            pause = min(pause * 2, 10.0)


def _source(path: str, fs: pafs.FileSystem, inner: str, retry_s: float | None) -> str | IO[bytes]:
    """What decord/PyAV open: the local path itself, or the bytes of a remote file (`fs`, `inner`: `path` as
    `resolve_filesystem` gives it)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return inner

    def fetch() -> IO[bytes]:
        with fs.open_input_stream(inner) as f:
            return io.BytesIO(f.read())

    return _from_storage(path, fs, fetch, retry_s)


def mp4_truncated(f: IO[bytes], size: int) -> bool | None:
    """Walk the top-level boxes of an ISO-BMFF file: True if one claims bytes past the end, False if they tile
    the file, None if this does not look like an MP4/MOV at all."""
    f.seek(0)
    offset, first = 0, True
    while offset + 8 <= size:
        f.seek(offset)
        head = f.read(16)
        box_size, box_type = struct.unpack(">I4s", head[:8])
        if first and box_type not in _MP4_BOXES:
            return None
        first = False
        if box_size == 1 and len(head) >= 16:
            box_size = struct.unpack(">Q", head[8:16])[0]
        elif box_size == 0:  # runs to the end of the file
            return False
        if box_size < 8:
            return None if first else True
        offset += box_size
    if first:
        return None
    return offset > size


def _classify_unopenable(path: str, size: int, message: str) -> BadVideo:
    fs, inner = resolve_filesystem(path)
    try:
        with fs.open_input_file(inner) as f:
            truncated = mp4_truncated(f, size)
    except OSError:
        truncated = None
    if truncated:
        return BadVideo("truncated", f"container ends early ({size} bytes): {message}")
    return BadVideo("corrupt", message)


def video_has_packets(source: str | IO[bytes]) -> bool | None:
    """Whether the first video stream holds at least one non-empty packet (PyAV demuxes until the first one, so a
    healthy file costs one packet read); None when PyAV cannot tell."""
    import av

    if not isinstance(source, str):
        source.seek(0)
    try:
        with av.open(source, metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            return any(packet.size for packet in container.demux(stream))
    except Exception:  # any failure here means "cannot tell"; the caller classifies the original error
        return None


def probe(path: str) -> VideoInfo:
    """Check that `path` exists, is non-empty and holds a readable video stream; raise BadVideo otherwise."""
    return _probe(path)[0]


def _probe(path: str, retry_s: float | None = None) -> tuple[VideoInfo, str | IO[bytes]]:
    """`probe`, plus what the decoder opens (`_source`): a remote video is fetched once, not again to decode it."""
    import av  # imported here: workers import it once, the CLI only when needed

    try:
        fs, inner = resolve_filesystem(path)
    except (OSError, ValueError) as exc:  # a URI no filesystem takes
        raise BadVideo("missing", str(exc)) from None
    info = _from_storage(path, fs, lambda: fs.get_file_info(inner), retry_s)
    if info.type == pafs.FileType.NotFound:
        raise BadVideo("missing", "no such file")
    if info.type != pafs.FileType.File:
        raise BadVideo("missing", "not a regular file")
    size = int(info.size or 0)
    if size == 0:
        raise BadVideo("empty", "zero bytes")
    source = _source(path, fs, inner, retry_s)  # outside the try below: a storage failure is not an unopenable video
    try:
        with av.open(source, metadata_errors="ignore") as container:
            streams = container.streams.video
            if not streams:
                kinds = sorted({s.type for s in container.streams})
                raise BadVideo("no_video_stream", f"streams: {kinds or 'none'}")
            ctx = streams[0].codec_context
            info = VideoInfo(width=int(ctx.width or 0), height=int(ctx.height or 0), codec=str(ctx.name or "?"),
                             size_bytes=size)
            return info, source
    except BadVideo:
        raise
    except Exception as exc:  # PyAV raises FFmpegError subclasses; anything here means "cannot open"
        raise _classify_unopenable(path, size, f"{type(exc).__name__}: {exc}") from None


def decode_size(width: int, height: int, target_short: int | None, threshold: float) -> tuple[int, int] | None:
    """(w, h) to decode at (even, short side >= target) when the source's short side exceeds threshold x target;
    None to decode at the source size."""
    if not target_short or min(width, height) <= threshold * target_short:
        return None
    scale = target_short / min(width, height)
    # Round up to even sizes, so the short side never falls below the target.
    return 2 * math.ceil(width * scale / 2), 2 * math.ceil(height * scale / 2)


def _pyav_frames(source: str | IO[bytes], wanted: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Decode frames `wanted` (sorted unique) sequentially with PyAV -> (K, H, W, 3) uint8."""
    import av

    if not isinstance(source, str):
        source.seek(0)
    out: list[np.ndarray] = []
    pos, k = 0, 0
    with av.open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            while k < len(wanted) and wanted[k] == pos:
                if size is None:
                    out.append(frame.to_ndarray(format="rgb24"))
                else:
                    out.append(frame.to_ndarray(format="rgb24", width=size[0], height=size[1]))
                k += 1
            pos += 1
            if k == len(wanted):
                break
    if k < len(wanted):
        raise BadVideo("truncated", f"only {pos} frames decodable, frame {int(wanted[k])} requested")
    return np.stack(out)


def read_frames(
    path: str,
    choose: Callable[[int, int, float], np.ndarray],
    *,
    start: float = math.nan,
    end: float = math.nan,
    min_frames: int = 1,
    target_short: int | None = None,
    resize_threshold: float = 1.25,
    num_threads: int = 1,
    storage_retry_s: float | None = None,
) -> DecodedVideo:
    """Decode the frames `choose(first, last, fps)` picks (any int array of indices in [first, last)) from the
    [start, end) seconds window of `path`. Raises BadVideo (with a reason from DROP_REASONS) on any failure, and
    StorageUnreachable when a bucket did not answer for `storage_retry_s` (None: STORAGE_RETRY_S) seconds."""
    import decord

    from workflows.data.sampling import frame_window

    info, source = _probe(path, storage_retry_s)
    if not isinstance(source, str):
        source.seek(0)  # PyAV read it
    size = decode_size(info.width, info.height, target_short, resize_threshold)
    try:
        vr = decord.VideoReader(source, ctx=decord.cpu(0), width=size[0] if size else -1,
                                height=size[1] if size else -1, num_threads=num_threads)
    except AssertionError as exc:  # decord's own check of a positive frame count
        raise BadVideo("zero_frames", str(exc)) from None
    except Exception as exc:
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        if video_has_packets(source) is False:  # decord fails on these before counting frames (no pixel format)
            raise BadVideo("zero_frames", f"{info.codec} stream without packets; decord: {message}") from None
        if "video stream" in message or "codec" in message.lower() or "decoder" in message.lower():
            raise BadVideo("unsupported_codec", f"{info.codec}: {message}") from None
        bad = _classify_unopenable(path, info.size_bytes, message)
        raise BadVideo(bad.reason if bad.reason == "truncated" else "decode_error", message) from None
    n, fps = len(vr), float(vr.get_avg_fps())
    first, last = frame_window(n, fps, start, end)
    if last - first < min_frames:
        raise BadVideo("too_short", f"{last - first} frames in window [{first}, {last}) of {n}; need {min_frames}")
    wanted = np.unique(np.asarray(choose(first, last, fps), dtype=np.int64))
    if wanted.size == 0 or wanted[0] < 0 or wanted[-1] >= n:
        raise ValueError(f"frame indices {wanted[:4]}... outside [0, {n})")  # a sampling bug, not a bad video
    try:
        frames = vr.get_batch(wanted.tolist()).asnumpy()  # (K, H, W, 3)
    except Exception as exc:
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        if "must exactly match" not in message:
            bad = _classify_unopenable(path, info.size_bytes, message)
            raise BadVideo(bad.reason if bad.reason == "truncated" else "decode_error", message) from None
        frames = _pyav_frames(source, wanted, size)  # decord's copy bug for some widths
    finally:
        del vr
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != wanted.size:
        raise BadVideo("decode_error", f"decoder returned frames of shape {frames.shape}")
    return DecodedVideo(frames=frames, indices=wanted, num_frames=n, fps=fps, width=info.width, height=info.height)
