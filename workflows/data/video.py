"""Decode the frames one clip needs from one video, or say precisely why the video is unusable.

`read_frames` checks the file (pyarrow filesystem), probes the container header with PyAV (cheap: no frames are
decoded), then decodes only the requested frame indices with decord (`num_threads` readers, decode-time resize
when the source is much larger than needed). Every failure becomes a `BadVideo` with one of `DROP_REASONS`:

    missing            the file does not exist
    empty              zero bytes
    truncated          an MP4/MOV whose boxes, or a Matroska/WebM whose Segment, run past the end of the file (an
                       interrupted download/copy); a Matroska/WebM is checked before decoding, as its decoders give
                       the frames before the cut without an error
    corrupt            not a container FFmpeg recognises (random bytes, HTML error pages, ...)
    no_video_stream    a container without a video stream (audio only)
    unsupported_codec  a video stream neither decord nor PyAV can decode
    zero_frames        a video stream without a single packet (e.g. an interrupted fragmented-MP4 recording,
                       or a sample table emptied by a broken muxer); found with PyAV when decord cannot open the
                       stream: decord 0.6.0 never reports 0 frames for such files, it fails earlier because no
                       pixel format can be known without a frame
    too_short          fewer frames than the configured minimum (in the start/end window)
    decode_error       anything else that failed while decoding frames

PyAV decodes what decord 0.6.0 cannot, instead of dropping it: streams in a codec decord lacks (AV1), containers
without a duration or frame count (live/streamed Matroska and WebM, raw H.264), MPEG transport streams (camcorders'
.MTS/.M2TS, broadcast .ts: decord cannot seek in them) and the few output widths decord mis-copies (e.g. 48 or 72
px: "The size must exactly match"). PyAV decodes sequentially from the first frame, so
these cost more per clip than decord's seek-and-decode.

Frames come out as displayed: a phone video's rotation (an MP4/MOV display matrix) is applied, by decord or here,
and a decode-time resize keeps the displayed aspect ratio (another container's rotation, rare, is not applied:
decord 0.6.0 ignores it, and the frames stay as stored in every path). Non-square pixels (a sample aspect ratio
other than 1:1: DVD, HDV and broadcast video) are decoded at the displayed size, square pixels, as a player shows
them: the decoders themselves return the stored, squeezed picture. Windows in seconds (a manifest's start/end)
are found from each frame's presentation time, which stays right for variable frame rates.

A video in a bucket whose storage does not answer is not a bad video: each read is retried for up to
STORAGE_RETRY_S seconds (the storage SDK's own retries come first), then `StorageUnreachable` (an OSError, never a
BadVideo) fails the batch, so the run restarts from its newest complete checkpoint instead of dropping good videos.
A local disk that is not there (a shared disk's mount lost, or a node added later that does not mount it) is the
same: a missing video is checked against a few of the corpus's videos known to exist when the work started
(`witnesses`), and when none of them is there either, the disk is waited for, then `StorageUnreachable`.
"""

from __future__ import annotations

import io
import math
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np
import pyarrow.fs as pafs

from workflows.data.manifest import resolve_filesystem, storage_hint

DROP_REASONS = ("missing", "empty", "truncated", "corrupt", "no_video_stream", "unsupported_codec", "zero_frames",
                "too_short", "decode_error")

# Matroska/WebM (EBML) element IDs, as written (length marker included): the EBML header a file starts with, the
# Segment holding everything else, and the two elements EBML allows anywhere (Void padding, CRC-32)
_EBML_HEADER, _MKV_SEGMENT, _EBML_VOID, _EBML_CRC32 = 0x1A45DFA3, 0x18538067, 0xEC, 0xBF

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
    declared_duration: float = 0.0  # seconds, as the header says (0: it does not say)
    rotation: int = 0  # counter-clockwise degrees an MP4/MOV's picture is turned by for display (a phone's)
    sar: float = 1.0  # sample aspect ratio: a stored pixel's width / height (DVD, HDV, broadcast: not 1)

    def square_pixel_size(self) -> tuple[int, int]:
        """(w, h) of the stored picture with square pixels (the width scaled by the sample aspect ratio), before
        any rotation."""
        return max(1, round(self.width * self.sar)), self.height

    def displayed_size(self) -> tuple[int, int]:
        """(w, h) as a player shows the video: square pixels, turned by the rotation."""
        w, h = self.square_pixel_size()
        return (h, w) if self.rotation % 180 else (w, h)


@dataclass
class DecodedVideo:
    """Frames gathered for a clip: `frames` (K, H, W, 3) uint8 for the sorted unique `indices` (K,)."""

    frames: np.ndarray
    indices: np.ndarray
    num_frames: int
    fps: float
    width: int  # source resolution as displayed (rotation applied; before any decode-time resize)
    height: int
    duration: float = 0.0  # seconds from the first frame's start to the last frame's end
    declared_duration: float = 0.0  # what the header says (0: nothing); far above `duration` when frames are lost
    rotation: int = 0  # the display rotation the frames were turned by (an MP4/MOV's)
    sar: float = 1.0  # the stored pixels' aspect ratio the frames were stretched from (1: square)

    def take(self, wanted: np.ndarray) -> np.ndarray:
        """Frames for `wanted` indices (T,) -> (T, H, W, 3)."""
        return self.frames[np.searchsorted(self.indices, wanted)]


STORAGE_RETRY_S = 120.0  # how long a read from a bucket is retried before the storage counts as unreachable
# (the default of data.storage_retry_s, and what `data check` and `predict` wait)


WAIT_NOTICE_S = 10.0  # a read still waiting for its storage after this long says so, once (a stalled run says why)


class StorageUnreachable(OSError):
    """A bucket that did not answer for the retry budget: the run's problem, not the video's."""


def _notice_wait(what: str, budget: float) -> None:
    """One line on stderr (a decode task's reaches the driver's console through Ray) while a read waits."""
    import sys

    print(f"note: node {node_address()} is waiting for {what} (up to {budget:.0f} s, data.storage_retry_s); "
          f"the run goes on when it answers", file=sys.stderr, flush=True)


def from_storage(path: str, fs: pafs.FileSystem, read: Callable[[], object],
                 retry_s: float | None = None, action: str = "read") -> object:
    """`read()` against the storage of `path`; on a remote filesystem an OSError (connection reset or refused,
    throttling, a 5xx) is retried with backoff until `retry_s` (None: STORAGE_RETRY_S) seconds have passed, then
    raised as StorageUnreachable ("cannot `action` `path`"). A missing file is no OSError here: pyarrow reports it
    as FileType.NotFound."""
    if isinstance(fs, pafs.LocalFileSystem):
        return read()
    budget = STORAGE_RETRY_S if retry_s is None else retry_s
    started, pause, noticed = time.monotonic(), 0.5, False
    while True:
        try:
            return read()
        except OSError as exc:
            waited = time.monotonic() - started
            if waited >= WAIT_NOTICE_S and not noticed and waited < budget:
                noticed = True
                _notice_wait(f"the storage of {path} to answer ({str(exc)[:200]})", budget)
            if waited >= budget:
                raise StorageUnreachable(f"cannot {action} {path}: its storage did not answer for {waited:.0f} s "
                                         f"({exc}){storage_hint(path)}") from None
            time.sleep(min(pause, max(0.0, budget - waited)))
            pause = min(pause * 2, 10.0)


def wait_for_local_disk(path: str, witnesses: tuple[str, ...] | list[str], retry_s: float | None = None) -> bool:
    """For a local `path` found missing: whether its disk had gone away. `witnesses` are other files of the same
    corpus (seen where the work was planned, or expected there); when none of them exists either, it is the disk
    that is not there (an NFS mount lost, or a node that does not mount it), not the video: wait for them for up to
    `retry_s` (None: STORAGE_RETRY_S) seconds, True when they came back (look at `path` again), else
    StorageUnreachable naming this node. False at once when a witness is there (the video is missing) or there are
    none."""
    if not witnesses or any(os.path.exists(w) for w in witnesses):
        return False
    budget = STORAGE_RETRY_S if retry_s is None else retry_s
    started, pause, noticed = time.monotonic(), 0.5, False
    while (waited := time.monotonic() - started) < budget:
        if waited >= WAIT_NOTICE_S and not noticed:
            noticed = True
            _notice_wait(f"the disk holding {os.path.dirname(witnesses[0])} (not there: {witnesses[0]})", budget)
        time.sleep(min(pause, budget - waited))
        pause = min(pause * 2, 5.0)
        if any(os.path.exists(w) for w in witnesses):
            return True
    raise StorageUnreachable(
        f"cannot read {path}: node {node_name()} has not seen any of the corpus's videos there for "
        f"{time.monotonic() - started:.0f} s (e.g. {witnesses[0]}): the disk that "
        f"holds them is not mounted on this node, or went away. Mount it at the same path on every node, or put "
        f"the videos in a bucket (`data upload`, cluster/README.md, \"No shared disk\")")


def node_address() -> str:
    """This Ray node's address (the host name outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # naming the node must never hide the error being raised
        pass
    return socket.gethostname()


def node_name() -> str:
    """This node as an error names it: its address, and in Ray its node id too (what `scaling.exclude_nodes` takes,
    and how a training run's driver tells which node to leave out: `shared_disk.blind_node`)."""
    try:
        import ray

        if ray.is_initialized():
            return f"{node_address()} (Ray node id {ray.get_runtime_context().get_node_id()})"
    except Exception:  # naming the node must never hide the error being raised
        pass
    return node_address()


def _source(path: str, fs: pafs.FileSystem, inner: str, retry_s: float | None) -> str | IO[bytes]:
    """What decord/PyAV open: the local path itself, or the bytes of a remote file (`fs`, `inner`: `path` as
    `resolve_filesystem` gives it)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return inner

    def fetch() -> IO[bytes]:
        with fs.open_input_stream(inner) as f:
            return io.BytesIO(f.read())

    return from_storage(path, fs, fetch, retry_s)


def fetch_to_file(path: str, dst: str, retry_s: float | None = None) -> None:
    """Copy the video at `path` (a bucket URI) into the local file `dst`, streamed, retried as reads are
    (`from_storage`): for a video decoded many times over, e.g. each clip of a long recording."""
    import shutil

    fs, inner = resolve_filesystem(path)

    def copy() -> None:
        with fs.open_input_stream(inner) as src, open(dst, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)

    from_storage(path, fs, copy, retry_s)


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


def _boxes(f: IO[bytes], start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, first byte of the body, end) of each ISO-BMFF box in [start, end) of `f`."""
    offset = start
    while offset + 8 <= end:
        f.seek(offset)
        head = f.read(16)
        if len(head) < 8:
            return
        box_size, box_type = struct.unpack(">I4s", head[:8])
        header = 8
        if box_size == 1 and len(head) >= 16:
            box_size, header = struct.unpack(">Q", head[8:16])[0], 16
        elif box_size == 0:  # runs to the end
            box_size = end - offset
        if box_size < header:
            return
        yield box_type, offset + header, min(offset + box_size, end)
        offset += box_size


def mp4_rotation(f: IO[bytes], size: int) -> int | None:
    """Counter-clockwise degrees (0, 90, 180, 270) by which the first video track of an MP4/MOV is turned for display:
    its track header's display matrix, which phones write instead of turning the picture. None when `f` is no
    MP4/MOV or has no video track. A few small reads, no decoding (PyAV shows the rotation only on decoded frames)."""
    try:
        return _mp4_rotation(f, size)
    except (struct.error, IndexError, OSError):  # a box cut short: the decoders report what is wrong
        return None


def _mp4_rotation(f: IO[bytes], size: int) -> int | None:
    if mp4_truncated(f, size) is None:
        return None
    for kind, body, end in _boxes(f, 0, size):
        if kind != b"moov":
            continue
        for kind, trak, trak_end in _boxes(f, body, end):
            if kind != b"trak":
                continue
            matrix, handler = None, None
            for kind, inner, inner_end in _boxes(f, trak, trak_end):
                if kind == b"tkhd":
                    f.seek(inner)
                    version = f.read(1)[0]
                    # version/flags, times, track id, reserved, duration (v1: 64-bit times), reserved, layer, group,
                    # volume, reserved: then the matrix a b u c d v x y w (a b c d in 16.16 fixed point)
                    f.seek(inner + 4 + (32 if version == 1 else 20) + 16)
                    matrix = struct.unpack(">9i", f.read(36))
                elif kind == b"mdia":
                    for sub, sub_body, _ in _boxes(f, inner, inner_end):
                        if sub == b"hdlr":
                            f.seek(sub_body + 8)  # version/flags, pre-defined
                            handler = f.read(4)
            if handler == b"vide" and matrix is not None:
                degrees = -math.degrees(math.atan2(matrix[1], matrix[0]))  # as FFmpeg's av_display_rotation_get
                return int(round(degrees / 90.0)) % 4 * 90
    return None


def _ebml_element(data: bytes) -> tuple[int, int | None, int] | None:
    """(ID, declared body size or None when unknown, header length) of the EBML element `data` starts with; None when
    its ID or size is no valid variable-length integer, EOFError when `data` ends inside them. An EBML
    variable-length integer's first byte gives its length (1 + its leading zero bits); a size whose value bits are
    all 1 is unknown (a live recording's Segment)."""
    if not data:
        raise EOFError
    if data[0] < 0x10:  # IDs are 1 to 4 bytes long
        return None
    id_length = 9 - data[0].bit_length()
    if len(data) <= id_length:
        raise EOFError
    if data[id_length] == 0:  # sizes are 1 to 8 bytes long
        return None
    header = id_length + 9 - data[id_length].bit_length()
    if len(data) < header:
        raise EOFError
    unknown = (1 << 7 * (header - id_length)) - 1
    body = int.from_bytes(data[id_length:header], "big") & unknown
    return int.from_bytes(data[:id_length], "big"), None if body == unknown else body, header


def mkv_truncated(f: IO[bytes], size: int) -> bool | None:
    """Read the EBML header and the Segment's declared size of a Matroska/WebM file: True if the Segment (or the
    header) runs past the end of the file, False if it fits or its size is unknown (a live recording: it cannot be
    judged so), None if this does not look like a Matroska/WebM file. Two reads of 12 bytes (more only past Void
    elements between the two)."""
    f.seek(0)
    head = f.read(12)
    if head[:4] != _EBML_HEADER.to_bytes(4, "big"):
        return None
    offset = 0
    for _ in range(8):  # the EBML header, then the Segment after at most a few Void/CRC-32 elements
        if offset:
            if offset >= size:  # cut inside the EBML header (or a Void), or right after it
                return True
            f.seek(offset)
            head = f.read(12)
        try:
            element = _ebml_element(head)
        except EOFError:  # the file ends inside the element's ID or size
            return True
        if element is None:
            return None
        kind, body, header = element
        if kind == _MKV_SEGMENT:
            return body is not None and offset + header + body > size
        if kind not in ((_EBML_VOID, _EBML_CRC32) if offset else (_EBML_HEADER,)) or body is None:
            return None
        offset += header + body
    return None


def _container_header(source: str | IO[bytes], size: int) -> tuple[int | None, bool | None]:
    """`mp4_rotation` and `mkv_truncated` of a local path (one open) or of fetched bytes (left at their start for the
    decoders): a few small reads, no decoding."""
    def read(f: IO[bytes]) -> tuple[int | None, bool | None]:
        return mp4_rotation(f, size), mkv_truncated(f, size)

    if isinstance(source, str):
        try:
            with open(source, "rb") as f:
                return read(f)
        except OSError:
            return None, None
    facts = read(source)
    source.seek(0)
    return facts


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
    return probe_source(path)[0]


def probe_source(path: str, retry_s: float | None = None,
                 witnesses: tuple[str, ...] | list[str] = ()) -> tuple[VideoInfo, str | IO[bytes]]:
    """`probe`, plus what the decoder opens (`_source`): a remote video is fetched once, not again to decode it.
    A local video found missing while none of `witnesses` exists is waited for as its disk (`wait_for_local_disk`).
    The display rotation is an MP4/MOV's (its track header): decord 0.6.0 applies that one and no other container's
    (a rotated Matroska comes out as stored), so that is the one the PyAV fallback and the resize box follow too."""
    import av  # imported here: workers import it once, the CLI only when needed

    try:
        fs, inner = resolve_filesystem(path)
    except (OSError, ValueError) as exc:  # a URI no filesystem takes
        raise BadVideo("missing", str(exc)) from None
    info = from_storage(path, fs, lambda: fs.get_file_info(inner), retry_s)
    if (info.type == pafs.FileType.NotFound and isinstance(fs, pafs.LocalFileSystem)
            and wait_for_local_disk(path, witnesses, retry_s)):
        info = fs.get_file_info(inner)  # its disk is back: look again
    if info.type == pafs.FileType.NotFound:
        raise BadVideo("missing", "no such file")
    if info.type != pafs.FileType.File:
        raise BadVideo("missing", "not a regular file")
    size = int(info.size or 0)
    if size == 0:
        raise BadVideo("empty", "zero bytes")
    source = _source(path, fs, inner, retry_s)  # outside the try below: a storage failure is not an unopenable video
    rotation, mkv_cut = _container_header(source, size)
    if mkv_cut:  # decord and PyAV would decode the frames before the cut as if they were the whole video
        raise BadVideo("truncated", f"container ends early ({size} bytes): its Matroska Segment runs past the end")
    try:
        with av.open(source, metadata_errors="ignore") as container:
            streams = container.streams.video
            if not streams:
                kinds = sorted({s.type for s in container.streams})
                raise BadVideo("no_video_stream", f"streams: {kinds or 'none'}")
            ctx = streams[0].codec_context
            if ctx is None:  # a codec id FFmpeg has no decoder for
                raise BadVideo("unsupported_codec", "FFmpeg knows no decoder for the video stream's codec")
            stream = streams[0]
            info = VideoInfo(width=int(ctx.width or 0), height=int(ctx.height or 0), codec=str(ctx.name or "?"),
                             size_bytes=size, declared_duration=_declared_duration(container), rotation=rotation or 0,
                             sar=_sample_aspect_ratio(stream))
            return info, source
    except BadVideo as bad:  # no stream or no codec to find: an MP4 cut inside its index looks the same
        truncated = _classify_unopenable(path, size, str(bad))
        raise (truncated if truncated.reason == "truncated" else bad) from None
    except Exception as exc:  # PyAV raises FFmpegError subclasses; anything here means "cannot open"
        raise _classify_unopenable(path, size, f"{type(exc).__name__}: {exc}") from None


def _declared_duration(container) -> float:
    """Seconds of the first video stream as its header says (Matroska/WebM: the container's, all streams); 0.0 when
    it says nothing (a live recording)."""
    import av

    stream = container.streams.video[0]
    declared = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base else
                (container.duration or 0) / av.time_base)
    return max(float(declared), 0.0)


def header_duration(path: str, retry_s: float | None = None) -> float | None:
    """A video's declared duration (0.0: none declared) read from its header alone, None when it cannot be opened.
    A local file is probed in place; a bucket object is opened for ranged reads, so PyAV fetches the header and
    the index it seeks to (an MP4's may be at the end), not the frames: a bucket of hour-long recordings is not
    downloaded to learn their lengths. A storage that does not answer is retried as reading is (`from_storage`)."""
    import av

    fs, inner = resolve_filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            return probe(path).declared_duration
        except BadVideo:
            return None

    def read() -> float | None:
        try:
            f = fs.open_input_file(inner)
        except FileNotFoundError:  # gone since the listing: not a storage failure to retry
            return None
        with f:
            try:
                with av.open(f, metadata_errors="ignore") as container:
                    return _declared_duration(container) if container.streams.video else None
            except av.FFmpegError:  # some are OSErrors too, but a file FFmpeg cannot open is no storage failure
                return None

    return from_storage(path, fs, read, retry_s)


# Sample aspect ratios outside this range are broken metadata, not a picture to stretch 4x (kept as square pixels).
_SAR_RANGE = (0.25, 4.0)


def _sample_aspect_ratio(stream) -> float:
    """A video stream's sample aspect ratio as PyAV reads it (the container's, else the codec's: an H.264 VUI, an
    MPEG-2 sequence header); 1.0 when it is unset (0:1), square or out of `_SAR_RANGE`."""
    for source in (stream, stream.codec_context):
        ratio = getattr(source, "sample_aspect_ratio", None)
        if ratio and ratio.denominator and _SAR_RANGE[0] <= float(ratio) <= _SAR_RANGE[1]:
            return float(ratio)
    return 1.0


def decode_size(width: int, height: int, target_short: int | None, threshold: float) -> tuple[int, int] | None:
    """(w, h) to decode at (even, short side >= target) when the source's short side exceeds threshold x target;
    None to decode at the source size."""
    if not target_short or min(width, height) <= threshold * target_short:
        return None
    scale = target_short / min(width, height)
    # Round up to even sizes, so the short side never falls below the target.
    return 2 * math.ceil(width * scale / 2), 2 * math.ceil(height * scale / 2)


def decoder_message(exc: BaseException) -> str:
    """`Type: message` of a decoder's exception, on one line: the last line of decord's message without its
    `[time] /source/file.cc:line:` and `[path]` prefixes, which would otherwise fill a short report."""
    text = str(exc).strip()
    last = text.splitlines()[-1] if text else ""
    last = re.sub(r"^(?:\[[\d:]+\] \S+:\d+: )+", "", last)
    last = re.sub(r"^\[[^\]]*\] ", "", last)
    return f"{type(exc).__name__}: {last}"


def _pyav_index(source: str | IO[bytes]) -> tuple[int, float, np.ndarray | None]:
    """(frames, fps, presentation times in seconds from the first frame or None) of the first video stream, from its
    packets alone (demuxed, not decoded): for videos decord cannot index. Raises what PyAV raises."""
    import av

    if not isinstance(source, str):
        source.seek(0)
    with av.open(source, metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        pts = [packet.pts for packet in container.demux(stream) if packet.size]
        rate, base = stream.average_rate or stream.guessed_rate, stream.time_base
    fps = float(rate) if rate else 0.0
    if not pts or any(p is None for p in pts) or not base:  # e.g. a raw H.264 stream: no timestamps
        return len(pts), fps, None
    times = np.sort(np.asarray(pts, np.float64)) * float(base)
    times -= times[0]
    if fps <= 0 and times[-1] > 0:
        fps = (len(times) - 1) / float(times[-1])
    return len(pts), fps, times


def _pyav_frames(source: str | IO[bytes], wanted: np.ndarray, size: tuple[int, int] | None,
                 rotation: int = 0) -> np.ndarray:
    """Decode frames `wanted` (sorted unique) sequentially with PyAV -> (K, H, W, 3) uint8, turned counter-clockwise
    by `rotation` degrees, as decord turns them; `size`: (w, h) after turning."""
    import av

    if not isinstance(source, str):
        source.seek(0)
    out: list[np.ndarray] = []
    pos, k = 0, 0
    with av.open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        turns = rotation // 90 % 4
        for frame in container.decode(stream):
            while k < len(wanted) and wanted[k] == pos:
                if size is None:
                    image = frame.to_ndarray(format="rgb24")
                else:  # the stored picture is scaled before it is turned
                    w, h = size if turns % 2 == 0 else size[::-1]
                    image = frame.to_ndarray(format="rgb24", width=w, height=h)
                out.append(np.ascontiguousarray(np.rot90(image, turns)) if turns else image)
                k += 1
            pos += 1
            if k == len(wanted):
                break
    if k < len(wanted):
        raise BadVideo("truncated", f"only {pos} frames decodable, frame {int(wanted[k])} requested")
    return np.stack(out)


# decord 0.6.0 cannot open these, though PyAV decodes them: a codec it lacks, or no duration/frame count to index by
_DECORD_CANNOT = re.compile(r"video stream|codec|decoder|broken metadata", re.IGNORECASE)
# ... nor read frames of these: its copy bug for some widths ("The size must exactly match"), and its seeking in an
# MPEG transport stream with B-frames referenced by B-frames (camcorders' .MTS/.M2TS, broadcast .ts), which ends in
# "Unable to handle EOF" though every frame is there (a file that really ends early then fails in PyAV, as truncated)
_DECORD_CANNOT_READ = re.compile(r"must exactly match|Unable to handle EOF")


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
    witnesses: tuple[str, ...] | list[str] = (),
) -> DecodedVideo:
    """Decode the frames `choose(first, last, fps)` picks (any int array of indices in [first, last)) from the
    [start, end) seconds window of `path`. Raises BadVideo (with a reason from DROP_REASONS) on any failure, and
    StorageUnreachable when a bucket did not answer for `storage_retry_s` (None: STORAGE_RETRY_S) seconds, or a local
    disk was not there for as long (`witnesses`: other local videos of the corpus, known to exist when the work
    started; `wait_for_local_disk`)."""
    import decord

    from workflows.data.sampling import frame_window, last_frame_end

    # a decode-time resize box must have the displayed shape
    info, source = probe_source(path, storage_retry_s, witnesses)
    width, height = info.displayed_size()
    size = decode_size(width, height, target_short, resize_threshold)
    if size is None and info.sar != 1.0:  # non-square pixels: decoded at the displayed size (the decoders ignore it)
        size = (2 * math.ceil(width / 2), 2 * math.ceil(height / 2))
    if not isinstance(source, str):
        source.seek(0)  # PyAV read it
    vr = None
    try:
        vr = decord.VideoReader(source, ctx=decord.cpu(0), width=size[0] if size else -1,
                                height=size[1] if size else -1, num_threads=num_threads)
    except AssertionError as exc:  # decord's own check of a positive frame count
        _raise_unreadable(path, info, "zero_frames", str(exc))
    except Exception as exc:
        message = decoder_message(exc)
        if video_has_packets(source) is False:  # decord fails on these before counting frames (no pixel format)
            _raise_unreadable(path, info, "zero_frames", f"{info.codec} stream without packets; decord: {message}")
        if not _DECORD_CANNOT.search(message):
            _raise_unreadable(path, info, "decode_error", message)
        try:  # PyAV instead: it decodes what decord lacks
            n, fps, times = _pyav_index(source)
        except Exception as pyav_exc:  # noqa: BLE001
            raise BadVideo("unsupported_codec", f"{info.codec}: {message}; PyAV: {decoder_message(pyav_exc)}") from None
    if vr is not None:
        n, fps = len(vr), float(vr.get_avg_fps())
        times = vr.get_frame_timestamp(np.arange(n))[:, 0].astype(np.float64) if n else np.zeros(0)
    times = _rising_times(times, n, fps)
    first, last = frame_window(times, start, end) if times is not None else (0, n)
    if last - first < min_frames:
        raise BadVideo("too_short", f"{last - first} frames in window [{first}, {last}) of {n}; need {min_frames}")
    wanted = np.unique(np.asarray(choose(first, last, fps), dtype=np.int64))
    if wanted.size == 0 or wanted[0] < 0 or wanted[-1] >= n:
        raise ValueError(f"frame indices {wanted[:4]}... outside [0, {n})")  # a sampling bug, not a bad video
    frames = None
    if vr is not None:
        try:
            frames = vr.get_batch(wanted.tolist()).asnumpy()  # (K, H, W, 3)
        except Exception as exc:
            message = decoder_message(exc)
            if not _DECORD_CANNOT_READ.search(message):  # what decord cannot read, PyAV reads below
                _raise_unreadable(path, info, "decode_error", message)
        finally:
            del vr
    if frames is None:
        try:
            frames = _pyav_frames(source, wanted, size, info.rotation)
        except BadVideo:
            raise
        except Exception as exc:  # noqa: BLE001 - PyAV failed inside the stream
            raise BadVideo("decode_error", decoder_message(exc)) from None
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != wanted.size:
        raise BadVideo("decode_error", f"decoder returned frames of shape {frames.shape}")
    if size is None:  # decoded as displayed, at the source size
        height, width = frames.shape[1:3]
    duration = last_frame_end(times) if times is not None and n else 0.0
    return DecodedVideo(frames=frames, indices=wanted, num_frames=n, fps=fps, width=width, height=height,
                        duration=duration, declared_duration=info.declared_duration, rotation=info.rotation,
                        sar=info.sar)


def _rising_times(times: np.ndarray | None, n: int, fps: float) -> np.ndarray | None:
    """The frames' presentation times when they rise frame after frame, else (a container without usable
    timestamps) index / fps, else (no frame rate either) None: windows then keep the whole video."""
    if times is not None and len(times) == n and (n < 2 or (np.all(np.diff(times) >= 0) and times[-1] > times[0])):
        return times
    return np.arange(n) / fps if fps > 0 else None


def _raise_unreadable(path: str, info: VideoInfo, reason: str, detail: str) -> None:
    """Raise BadVideo(`reason`) for a stream the decoders could not read, or `truncated` when the container ends
    early (an interrupted download; an MP4 cut inside its index also has no frames to find)."""
    bad = _classify_unopenable(path, info.size_bytes, detail)
    raise BadVideo("truncated" if bad.reason == "truncated" else reason, detail) from None
