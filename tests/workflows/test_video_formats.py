"""Video files as real corpora hold them, beyond the H.264 MP4s the other tests write: phone videos with a display
rotation, non-square pixels, live/streamed Matroska and WebM without a duration, variable frame rates, AV1, a codec
FFmpeg does not know, an MP4 cut inside its index, a WebM or MKV cut short. Each is a real file encoded with PyAV
(FFmpeg's encoders) and read through `read_frames`, the one decode path training, evaluation and `data check`
share."""

from __future__ import annotations

import csv
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tests.workflows.conftest import frame_ids, index_frames
from workflows.data.video import BadVideo, mkv_truncated, read_frames


def _encode(path: Path, frames: np.ndarray, *, codec: str = "libx264", fps: int = 10, rotation: int = 0,
            pts_ms: list[int] | None = None, container_options: dict[str, str] | None = None,
            sar: tuple[int, int] | None = None) -> Path:
    """(T, H, W, 3) RGB frames as a video file; `rotation`: a display matrix (counter-clockwise degrees) as phones
    write it; `pts_ms`: each frame's presentation time (variable frame rate); `sar`: the sample aspect ratio the
    encoder writes (non-square pixels, as DVD and HDV video has). libvpx's encoders run in a fresh
    interpreter: late in the full suite (not alone, nor after any one test module) libvpx-vp9 failed to initialise
    in the pytest process (avcodec_open2: EINVAL), which is about the test process, not about decoding."""
    if codec.startswith("libvpx"):
        import subprocess
        import sys

        np.save(path.with_suffix(".npy"), frames)
        args = json.dumps([str(path), codec, fps, rotation, pts_ms, container_options, sar])
        script = ("import json, sys, numpy as np; from tests.workflows.test_video_formats import _encode_here; "
                  "p, *rest = json.loads(sys.argv[1]); _encode_here(p, np.load(p.rsplit('.', 1)[0] + '.npy'), *rest)")
        done = subprocess.run([sys.executable, "-c", script, args], cwd=Path(__file__).parents[2], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        path.with_suffix(".npy").unlink()
        return path
    return _encode_here(path, frames, codec, fps, rotation, pts_ms, container_options, sar)


def _encode_here(path: str | Path, frames: np.ndarray, codec: str, fps: int, rotation: int, pts_ms: list[int] | None,
                 container_options: dict[str, str] | None, sar: tuple[int, int] | None = None) -> Path:
    import av

    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.codec_context.options = {"preset": "veryfast", "crf": "18", "threads": "1"}
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        if sar:
            stream.codec_context.sample_aspect_ratio = Fraction(*sar)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def _all(first: int, last: int, fps: float) -> np.ndarray:
    return np.arange(first, last)


def _ramp_runs(frames: np.ndarray) -> str:
    """Where the source's left-dark/right-bright green ramp ends up: "right", "left", "up" or "down"."""
    g = frames[..., 1].astype(np.float64).mean(0)
    dx, dy = g[:, -4:].mean() - g[:, :4].mean(), g[:4].mean() - g[-4:].mean()
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "up" if dy > 0 else "down"


@pytest.mark.parametrize("stored", [(96, 64), (64, 48)])  # 64x48 turned is 48 wide: decord's copy bug -> PyAV
def test_a_phone_video_comes_out_as_displayed_and_keeps_its_shape_when_resized(tmp_path, stored) -> None:
    """A display matrix turns the stored picture: the frames come out turned (by decord, or by PyAV where decord
    cannot), and a decode-time resize keeps the displayed aspect ratio instead of squeezing a portrait picture into
    a landscape box (what happened when the resize box came from the stored size)."""
    width, height = stored
    frames = index_frames(width, height, 12)
    for rotation, runs in ((90, "up"), (-90, "down"), (180, "left"), (0, "right")):
        path = _encode(tmp_path / f"rot{rotation}_{width}.mp4", frames, rotation=rotation)
        shown = (height, width) if rotation % 180 == 0 else (width, height)  # (H, W) on screen
        decoded = read_frames(str(path), _all)
        assert decoded.frames.shape[1:3] == shown and (decoded.height, decoded.width) == shown, rotation
        assert _ramp_runs(decoded.frames) == runs, rotation
        np.testing.assert_array_equal(frame_ids(decoded.frames), np.arange(12))
        small = read_frames(str(path), _all, target_short=24, resize_threshold=1.0)
        h, w = small.frames.shape[1:3]
        assert min(h, w) == 24 and abs(w / h - shown[1] / shown[0]) < 0.1, (rotation, small.frames.shape)
        assert (small.height, small.width) == shown and _ramp_runs(small.frames) == runs, rotation
    # Matroska can carry a rotation too, which decord 0.6.0 does not apply: such frames stay as stored, and are
    # never squeezed into the turned shape.
    path = _encode(tmp_path / f"rot90_{width}.mkv", frames, rotation=90)
    for target in (None, 24):
        decoded = read_frames(str(path), _all, target_short=target, resize_threshold=1.0)
        h, w = decoded.frames.shape[1:3]
        assert abs(w / h - width / height) < 0.1 and _ramp_runs(decoded.frames) == "right", decoded.frames.shape
        assert (decoded.height, decoded.width) == (height, width)


def _bright_box(frames: np.ndarray) -> tuple[int, int]:
    """(height, width) of the bright region of the first frame."""
    ys, xs = np.nonzero(frames[0, ..., 1] > 128)
    return int(np.ptp(ys)) + 1, int(np.ptp(xs)) + 1


def _squeezed_square(num_frames: int = 12) -> np.ndarray:
    """64x48 stored pixels holding a box 8 wide and 16 tall: a square once each pixel is shown twice as wide (2:1)."""
    frames = np.zeros((num_frames, 48, 64, 3), np.uint8)
    frames[:, 16:32, 24:32] = 255
    return frames


# A live Matroska: decord refuses it, so PyAV decodes it (and scales it to the displayed size itself)
@pytest.mark.parametrize("name, options", [("hdv.mp4", None), ("live.mkv", {"live": "1"})])
def test_non_square_pixels_come_out_square_as_a_player_shows_them(tmp_path, name, options) -> None:
    """A sample aspect ratio of 2:1 (each stored pixel shown twice as wide, as HDV's 1440x1080 for 1920x1080): the
    decoders return the stored picture, squeezed; the frames come out at the displayed size, so a square is square,
    and a decode-time resize keeps that shape."""
    path = _encode(tmp_path / name, _squeezed_square(), sar=(2, 1), container_options=options)
    decoded = read_frames(str(path), _all)
    assert decoded.frames.shape[1:3] == (48, 128) and (decoded.height, decoded.width) == (48, 128)
    height, width = _bright_box(decoded.frames)
    assert abs(height - 16) <= 1 and abs(width - 16) <= 2, (height, width)
    small = read_frames(str(path), _all, target_short=24, resize_threshold=1.0)
    assert small.frames.shape[1:3] == (24, 64) and (small.height, small.width) == (48, 128)
    height, width = _bright_box(small.frames)
    assert abs(height - width) <= 2, (height, width)


def test_a_transcoded_copy_shows_as_its_original_does(tmp_path) -> None:
    """`data transcode` keeps what a player shows: a phone video's display rotation (the copies were stored
    sideways, without it) and, for non-square pixels, the displayed width (as square pixels)."""
    from workflows.data.transcode import transcode_video
    from workflows.data.video import probe

    for name, frames, options in (("phone.mp4", index_frames(96, 64, 12), {"rotation": 90}),
                                  ("hdv.mp4", _squeezed_square(), {"sar": (2, 1)})):
        original = read_frames(str(_encode(tmp_path / name, frames, **options)), _all)
        transcode_video(str(tmp_path / name), tmp_path / "small" / name, short_side=32)
        copy = read_frames(str(tmp_path / "small" / name), _all)
        (oh, ow), (ch, cw) = original.frames.shape[1:3], copy.frames.shape[1:3]
        assert min(ch, cw) == 32 and abs(cw / ch - ow / oh) < 0.05, (name, original.frames.shape, copy.frames.shape)
        assert _ramp_runs(copy.frames) == _ramp_runs(original.frames), name
        assert probe(str(tmp_path / "small" / name)).sar == 1.0
        np.testing.assert_array_equal(frame_ids(copy.frames), np.arange(12)) if name == "phone.mp4" else None


@pytest.mark.parametrize("name, codec", [("live.mkv", "libx264"), ("live.webm", "libvpx-vp9")])
def test_a_live_recording_without_duration_is_decoded_not_dropped(tmp_path, name, codec) -> None:
    """Matroska/WebM written live (a stream dump, a browser's MediaRecorder) has no duration or index; decord 0.6.0
    refuses it ("broken metadata"), PyAV demuxes and decodes it."""
    import decord

    path = _encode(tmp_path / name, index_frames(64, 64, 20), codec=codec, container_options={"live": "1"})
    with pytest.raises(decord.DECORDError, match="broken metadata"):
        decord.VideoReader(str(path))
    decoded = read_frames(str(path), lambda first, last, fps: np.array([0, 7, last - 1]), min_frames=4)
    assert decoded.num_frames == 20 and decoded.fps == pytest.approx(10.0)
    np.testing.assert_array_equal(frame_ids(decoded.frames), [0, 7, 19])
    assert decoded.duration == pytest.approx(2.0)
    window = read_frames(str(path), _all, start=0.5, end=1.0)  # its windows are found too
    np.testing.assert_array_equal(frame_ids(window.frames), [5, 6, 7, 8, 9])


def test_a_camcorder_transport_stream_is_decoded_through_pyav(tmp_path) -> None:
    """AVCHD camcorders write H.264 in MPEG transport streams (.MTS/.M2TS), as broadcast recordings (.ts) are:
    decord opens them but cannot seek in them ("Unable to handle EOF" with every frame there), PyAV reads them."""
    import av
    import decord

    from workflows.data.manifest import video_files

    path = tmp_path / "00012.MTS"
    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        # x264's default preset (medium: B-frames referenced by B-frames, as camcorders encode); with "veryfast"
        # decord reads this little stream
        stream.codec_context.options = {"crf": "18", "threads": "1"}
        for image in index_frames(64, 48, 12):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(decord.DECORDError, match="Unable to handle EOF"):
        decord.VideoReader(str(path)).get_batch([0, 5])
    decoded = read_frames(str(path), _all)
    assert decoded.num_frames == 12 and decoded.frames.shape == (12, 48, 64, 3)
    np.testing.assert_array_equal(frame_ids(decoded.frames), np.arange(12))
    assert video_files(tmp_path) == [path]  # a folder's .MTS files are videos (data import folders, predict DIR)


def test_av1_is_decoded_through_pyav_and_an_unknown_codec_is_unsupported(tmp_path) -> None:
    """decord 0.6.0 has no AV1 decoder (yt-dlp fetches AV1 for many newer YouTube videos): PyAV decodes it. A
    stream whose codec FFmpeg does not know at all is `unsupported_codec`."""
    av1 = _encode(tmp_path / "av1.mp4", index_frames(64, 64, 10), codec="libsvtav1")
    decoded = read_frames(str(av1), _all)
    np.testing.assert_array_equal(frame_ids(decoded.frames), np.arange(10))
    vp9 = _encode(tmp_path / "vp9.webm", index_frames(64, 64, 10), codec="libvpx-vp9")
    data = vp9.read_bytes()
    assert data.count(b"V_VP9") == 1
    unknown = tmp_path / "unknown.webm"
    unknown.write_bytes(data.replace(b"V_VP9", b"V_QQ9"))  # the codec id a decoder is chosen by
    with pytest.raises(BadVideo) as info:
        read_frames(str(unknown), _all)
    assert info.value.reason == "unsupported_codec", info.value


def test_a_variable_frame_rate_window_is_found_by_presentation_time(tmp_path) -> None:
    """A manifest's start/end seconds pick the frames shown then. Index / average fps drifts by seconds on a
    variable-frame-rate video: frames 10 ms apart, then 250 ms apart."""
    pts = [10 * i for i in range(20)] + [200 + 250 * i for i in range(10)]  # 0.0-0.19 s, then 0.2-2.45 s
    for suffix in ("mkv", "mp4"):
        path = _encode(tmp_path / f"vfr.{suffix}", index_frames(64, 64, 30), pts_ms=pts)
        decoded = read_frames(str(path), _all, start=1.0, end=2.0)
        np.testing.assert_array_equal(frame_ids(decoded.frames), [23, 24, 25, 26, 27])  # 0.95 ... 1.95 s
        assert decoded.duration == pytest.approx(2.7, abs=0.01), suffix  # the last frame lasts as the one before
        with pytest.raises(BadVideo, match="too_short"):
            read_frames(str(path), _all, start=3.0, min_frames=1)  # after the video's end


@pytest.mark.parametrize("into_index", [0.1, 0.3, 0.9])
def test_an_mp4_cut_inside_its_index_is_truncated(tmp_path, into_index) -> None:
    """An interrupted download of an MP4 whose index (moov) follows the frames: cut early in the index it shows no
    video stream, then a stream without a codec, late in it a stream without frames; each is `truncated`, which
    says what happened (it was `no_video_stream`, `unsupported_codec` or `zero_frames`)."""
    path = _encode(tmp_path / "whole.mp4", index_frames(64, 64, 30))
    data = path.read_bytes()
    moov = data.rfind(b"moov") - 4  # the box starts with its size
    assert moov > len(data) // 2
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: moov + int((len(data) - moov) * into_index)])
    with pytest.raises(BadVideo) as info:
        read_frames(str(cut), _all)
    assert info.value.reason == "truncated", info.value


@pytest.mark.parametrize("name, codec", [("whole.webm", "libvpx-vp9"), ("whole.mkv", "libx264")])
def test_a_cut_webm_or_mkv_is_truncated_not_decoded_short(tmp_path, monkeypatch, name, codec) -> None:
    """An interrupted download of a Matroska/WebM: its EBML header declares the Segment's size, and the file ends
    before it. Both decoders gave the frames before the cut without an error, so such a video trained as a shorter
    one (cut at 70%) or was dropped as `zero_frames` (cut at 30%); it is `truncated`, from the header alone, in a
    bucket too. A live recording's Segment has an unknown size: the header cannot tell a cut one, and it decodes."""
    import io

    import pyarrow.fs as pafs

    import workflows.data.video as video_mod

    path = _encode(tmp_path / name, index_frames(64, 64, 30), codec=codec)
    assert frame_ids(read_frames(str(path), _all).frames).tolist() == list(range(30))
    data = path.read_bytes()
    for fraction in (0.3, 0.7):
        cut = tmp_path / f"cut{int(fraction * 100)}_{name}"
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(BadVideo) as info:
            read_frames(str(cut), _all)
        assert info.value.reason == "truncated", (fraction, info.value)
    store = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # not local: fetched as bytes
    local = video_mod.resolve_filesystem
    monkeypatch.setattr(video_mod, "resolve_filesystem", lambda uri: (store, uri.removeprefix("mem://bucket/"))
                        if uri.startswith("mem://bucket/") else local(uri))
    with pytest.raises(BadVideo) as info:
        read_frames(f"mem://bucket/cut70_{name}", _all)
    assert info.value.reason == "truncated", info.value
    assert read_frames(f"mem://bucket/{name}", _all).num_frames == 30

    live = _encode(tmp_path / f"live_{name}", index_frames(64, 64, 30), codec=codec, container_options={"live": "1"})
    live_cut = tmp_path / f"live_cut_{name}"
    live_cut.write_bytes(live.read_bytes()[: int(live.stat().st_size * 0.7)])
    assert read_frames(str(live), _all).num_frames == 30
    assert 0 < read_frames(str(live_cut), _all).num_frames < 30  # what is there, as before
    for video in (path, live, live_cut):
        with open(video, "rb") as f:
            assert mkv_truncated(f, video.stat().st_size) is False  # (an unknown size cannot be judged)
    assert mkv_truncated(io.BytesIO(data[:-1]), len(data) - 1) is True


def _ebml(element_id: int, body: bytes, size_bytes: int = 1, unknown: bool = False) -> bytes:
    """An EBML element: its ID, its body's size as a `size_bytes`-long variable-length integer (all value bits set:
    unknown), its body."""
    value = (1 << 7 * size_bytes) - 1 if unknown else len(body)
    return element_id.to_bytes((element_id.bit_length() + 7) // 8, "big") + (
        (1 << 7 * size_bytes) | value).to_bytes(size_bytes, "big") + body


def test_mkv_truncated_reads_the_header_and_the_segment_size() -> None:
    """The Matroska header check on bytes: variable-length sizes of 1 and 8 bytes, Void elements before the
    Segment, an unknown size, cuts inside the header or the Segment's size, and files that are no Matroska."""
    import io

    def judge(data: bytes) -> bool | None:
        return mkv_truncated(io.BytesIO(data), len(data))

    header = _ebml(0x1A45DFA3, _ebml(0x4282, b"webm"), size_bytes=1)  # 12 bytes
    segment = _ebml(0x18538067, _ebml(0x1549A966, b"\0" * 40), size_bytes=8)
    void = _ebml(0xEC, b"\0" * 3)  # 5 bytes
    for whole, end in ((header + segment, None), (header + void + segment, None),  # Void padding between
                       (header + _ebml(0x18538067, b"\0" * 20), None), (header + segment + b"trailing", -8)):
        assert judge(whole) is False, whole.hex()
        # cut inside the EBML header, right after it, inside the Segment's ID or size, a byte short of its end
        for cut in (len(header) // 2, len(header), len(header) + 7, len(whole[:end]) - 1):
            assert judge(whole[:cut]) is True, (whole.hex(), cut)
    for size_bytes in (1, 8):  # a live recording's Segment: unknown size, whatever its length
        live = header + _ebml(0x18538067, b"\0" * 20, size_bytes=size_bytes, unknown=True)
        assert judge(live) is False and judge(live[:-10]) is False
    for other in (b"\x00\x00\x00\x18ftypisom" + b"\0" * 40, b"<html>404</html>", b"\x1a\x45\xdf",
                  header + _ebml(0x1F43B675, b"\0" * 8),  # a Cluster where the Segment should start
                  _ebml(0x1A45DFA3, b"", unknown=True) + segment):  # an EBML header of unknown size
        assert judge(other) is None, other.hex()


def _video_shorter_than_its_audio(path: Path) -> Path:
    """An MKV whose H.264 video (10 frames at 10 fps) stops 2 s before its AAC audio: the container's duration, 3 s,
    says more than the video holds (a screen recording whose video stopped)."""
    import av

    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        audio = container.add_stream("aac", rate=48000)
        for image in index_frames(64, 64, 10):
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
        for i in range(3 * 48000 // 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 48000, i * 1024
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return path


@pytest.mark.integration
def test_data_check_counts_rotated_live_and_cut_videos_and_lists_every_bad_one(ray_local, tmp_path, capsys) -> None:
    """The doctor on such a corpus: displayed sizes, true durations, a WebM cut in half as truncated (it used to
    decode, to half its frames), an MKV whose video stops long before its audio reported as usable but far shorter
    than its header says, videos under data.min_frames' default (4) as too_short, as training drops them, and
    `--bad-list` writing every video that is not ok with its reason."""
    from workflows.data.cli import main as data_main
    from workflows.data.manifest import save_labels, write_manifest

    videos = {
        "phone.mp4": _encode(tmp_path / "phone.mp4", index_frames(96, 64, 20), rotation=90),
        "live.webm": _encode(tmp_path / "live.webm", index_frames(64, 64, 20), codec="libvpx-vp9",
                             container_options={"live": "1"}),
        "three.mp4": _encode(tmp_path / "three.mp4", index_frames(64, 64, 3)),
        "hdv.mp4": _encode(tmp_path / "hdv.mp4", _squeezed_square(20), sar=(2, 1)),
    }
    whole = _encode(tmp_path / "whole.webm", index_frames(64, 64, 30), codec="libvpx-vp9")
    (tmp_path / "half.webm").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    videos["half.webm"] = tmp_path / "half.webm"
    videos["early_end.mkv"] = _video_shorter_than_its_audio(tmp_path / "early_end.mkv")
    (tmp_path / "junk.mp4").write_text("<html>404</html>")
    videos["junk.mp4"] = tmp_path / "junk.mp4"
    write_manifest([{"path": name, "label": "a"} for name in videos], tmp_path / "m.csv")
    save_labels({"a": 0}, tmp_path / "labels.json")
    bad_list = tmp_path / "bad.csv"
    assert data_main(["check", "--manifest", str(tmp_path / "m.csv"), "--json", "--bad-list", str(bad_list)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] == 4 and report["dropped"] == {"too_short": 1, "corrupt": 1, "truncated": 1}, report
    # the phone video and the 2:1 pixels as displayed, each said once
    assert report["resolutions"] == {"64x64": 2, "64x96": 1, "128x48": 1}
    shown = report["displayed_not_as_stored"]
    assert shown == {"turned": 1, "non_square_pixels": 1, "examples": [
        f"{tmp_path / 'phone.mp4'} (turned 90 degrees)", f"{tmp_path / 'hdv.mp4'} (pixels 2:1)"]}, shown
    from workflows.data.cli import _format_check
    assert "decoded as a player shows them, not as stored: 1 turned by their display rotation (phone videos), 1 with " \
           "non-square pixels made square" in _format_check(report)
    assert report["duration_s"]["max"] == pytest.approx(2.0)
    shorter = report["shorter_than_declared"]
    assert shorter["count"] == 1 and shorter["examples"][0].startswith(str(tmp_path / "early_end.mkv")), shorter
    with open(bad_list, newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert {name: r["reason"] for name, r in rows.items()} == {"three.mp4": "too_short", "junk.mp4": "corrupt",
                                                               "half.webm": "truncated"}
    assert "need 4" in rows["three.mp4"]["detail"]
    assert not math.isnan(report["decode_seconds_per_video"])
    assert report["long_rows"] == {"count": 0, "seconds": 30.0, "examples": []}
    # A 40 s recording: reported as a row too long for DiST's frames, unless the row is a window of it.
    _encode(tmp_path / "long.mp4", index_frames(32, 32, 80), fps=2)
    write_manifest([{"path": "long.mp4", "label": "a"}, {"path": "long.mp4", "label": "a", "start": 0.0, "end": 10.0},
                    {"path": "long.mp4", "label": "a", "start": 5.0}, {"path": "phone.mp4", "label": "a"}],
                   tmp_path / "long.csv")
    assert data_main(["check", "--manifest", str(tmp_path / "long.csv"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["long_rows"] == {"count": 2, "seconds": 30.0, "examples": [f"{tmp_path / 'long.mp4'} (40 s)",
                                                                            f"{tmp_path / 'long.mp4'} (35 s)"]}
    assert "rows longer than 30 s: 2. DiST spreads its frames over a whole row" in _format_check(report)
    assert f"`data clips --manifest {tmp_path / 'long.csv'} --clip-seconds 10 --out NEW.csv`" in _format_check(report)
    # `data clips` cuts the whole video into 10 s windows, keeps the rows that have a window already.
    assert data_main(["clips", "--manifest", str(tmp_path / "long.csv"), "--clip-seconds", "10", "--out",
                      str(tmp_path / "long_clips.csv")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {tmp_path / 'long_clips.csv'}: 7 rows; 1 videos cut into clips of 10 s, 1 left whole (below), 2 rows "
        f"kept as they were (clips already: start,end)",
        f"note: 1 videos are shorter than --clip-seconds 10 and are listed whole ({tmp_path / 'phone.mp4'})"]
    with open(tmp_path / "long_clips.csv", newline="") as f:
        cut = [(r["path"], r["label"], r["start"], r["end"]) for r in csv.DictReader(f)]
    # relative to the new manifest, as the videos lie beside it
    assert cut == [("long.mp4", "a", str(a), str(a + 10)) for a in (0, 10, 20, 30)] + [
        ("long.mp4", "a", "0", "10"), ("long.mp4", "a", "5", ""), ("phone.mp4", "a", "", "")], cut
    assert data_main(["check", "--manifest", str(tmp_path / "long_clips.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["long_rows"]["examples"] == [f"{tmp_path / 'long.mp4'} (35 s)"]
    # Written elsewhere, the new manifest names the videos by absolute paths, and says so.
    (tmp_path / "elsewhere").mkdir()
    assert data_main(["clips", "--manifest", str(tmp_path / "long.csv"), "--clip-seconds", "10", "--out",
                      str(tmp_path / "elsewhere" / "long_clips.csv")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"note: the videos are not below {tmp_path / 'elsewhere'}/, so the manifests name them by absolute paths: "
        f"fine on this machine and a shared disk, but `data upload` needs them below it")
    assert data_main(["clips", "--manifest", str(tmp_path / "long.csv"), "--clip-seconds", "10", "--out",
                      str(tmp_path / "long.csv")]) == 2
    assert "is the manifest itself" in capsys.readouterr().err
