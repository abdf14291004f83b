"""Ingest units without Ray: config, manifests, sampling indices, transforms, decoding and drop reasons."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.workflows.conftest import GOOD_VIDEOS, frame_ids, index_frames, is_mirrored
from workflows.config_loader import ConfigError, from_dict
from workflows.data.data_config import SSV2_FLIP_PAIRS, DataConfig
from workflows.data.manifest import ManifestError, load_labels, load_manifest, save_labels, write_manifest
from workflows.data.pipeline import ClipSpec, decode_batch
from workflows.data.sampling import frame_window, segment_indices
from workflows.data.transforms import eval_clips, random_resized_crop_box, resize, train_clip
from workflows.data.video import BadVideo, decode_size, read_frames


def test_config_defaults_and_validation() -> None:
    cfg = from_dict(DataConfig, {"flip": "swap_labels", "flip_pairs": SSV2_FLIP_PAIRS,
                                 "decode_node_label": "dist-role=decode"})
    assert cfg.node_label_selector() == {"dist-role": "decode"}
    assert DataConfig().node_label_selector() is None
    for bad, why in (({"flip": "swap_labels"}, "needs flip_pairs"),
                     ({"flip_pairs": [[1, 2], [2, 3]]}, r"class \[2\] appears in more than one pair"),
                     ({"flip_pairs": [[4, 4]]}, "two different non-negative class indices"),
                     ({"decode_node_label": "dist-role"}, "one Ray node label key=value"),
                     ({"max_bad_fraction": 1.5}, r"max_bad_fraction must lie in \[0, 1\]"),
                     ({"crop_scale": [0.5, 0.4]}, "crop_scale must be"), ({"flip": "mirror"}, "'mirror' is not valid"),
                     ({"decode_actors": -1}, "decode_actors must be >= 0")):
        with pytest.raises(ConfigError, match=why):
            from_dict(DataConfig, bad)


def test_removed_eval_views_and_crops_name_the_eval_keys(tmp_path) -> None:
    """data.eval_views / data.eval_crops were never read (evaluate uses eval.test_views / eval.test_crops): a recipe
    that sets them fails at load, before any work, saying which key to use; a checkpoint's own recipe.yaml written
    before the removal still loads once `drop_removed_keys` has taken them out."""
    from workflows.config_loader import drop_removed_keys
    from workflows.recipe import Recipe, load_recipe

    assert not {"eval_views", "eval_crops"} & set(DataConfig.__dataclass_fields__)
    path = tmp_path / "old.yaml"
    path.write_text("data:\n  eval_views: 3\n  eval_crops: 3\n")
    with pytest.raises(ConfigError, match=r"data\.eval_crops was removed: use eval\.test_crops.*"
                                          r"data\.eval_views was removed: use eval\.test_views .*eval\.views"):
        load_recipe(str(path), [])
    with pytest.raises(ConfigError, match=r"data\.eval_views was removed: use eval\.test_views"):
        load_recipe(None, ["data.eval_views=5"])
    data, dropped = drop_removed_keys(Recipe, {"data": {"eval_views": 3, "eval_crops": 1, "min_frames": 6},
                                               "eval": {"test_views": 3}})
    assert sorted(dropped) == ["data.eval_crops", "data.eval_views"]
    recipe = from_dict(Recipe, data)
    assert (recipe.data.min_frames, recipe.eval.test_views) == (6, 3)


def test_manifest_resolves_relative_paths_labels_and_windows(tmp_path) -> None:
    save_labels({"a": 0, "b": 1}, tmp_path / "labels.json")
    labels = load_labels(str(tmp_path / "labels.json"))
    write_manifest([{"path": "x/one.mp4", "label": "b", "start": 1.5, "end": 3.0},
                    {"path": "/abs/two.mp4", "label": "0"}], tmp_path / "m.csv")
    write_manifest([{"path": "x/one.mp4", "label": "a"}], tmp_path / "m.parquet")
    m = load_manifest(str(tmp_path / "m.csv"), labels)
    assert m.table.column("path").to_pylist() == [str(tmp_path / "x/one.mp4"), "/abs/two.mp4"]
    assert m.table.column("label").to_pylist() == [1, 0]
    assert m.table.column("label_name").to_pylist() == ["b", "a"]
    assert m.table.column("start")[0].as_py() == 1.5 and np.isnan(m.table.column("end")[1].as_py())
    p = load_manifest(str(tmp_path / "m.parquet"), labels)
    assert p.table.column("path").to_pylist() == [str(tmp_path / "x/one.mp4")]


def test_manifest_as_file_uri_resolves_against_its_folder(video_dir, tmp_path) -> None:
    import shutil

    folder = tmp_path / "my data"  # a space: the URI carries it percent-encoded
    (folder / "clips dir").mkdir(parents=True)
    shutil.copy(video_dir / "clips" / "wide.mp4", folder / "clips dir" / "wide.mp4")
    save_labels({"cls0": 0, "cls1": 1}, folder / "labels.json")
    tall = (video_dir / "clips" / "tall.mp4").as_uri()
    rows = [{"path": "clips dir/wide.mp4", "label": "cls0"}, {"path": tall, "label": "cls1"},
            {"path": "clips dir/gone.mp4", "label": "cls1"}]
    write_manifest(rows, folder / "m.csv")
    write_manifest(rows, folder / "m.parquet")
    uri = (folder / "m.csv").as_uri()
    assert "%20" in uri
    labels = load_labels((folder / "labels.json").as_uri())
    for manifest in (uri, (folder / "m.parquet").as_uri()):
        m = load_manifest(manifest, labels)
        paths = m.table.column("path").to_pylist()
        assert paths == [str(folder / "clips dir" / "wide.mp4"), tall, str(folder / "clips dir" / "gone.mp4")]
        assert m.table.column("label").to_pylist() == [0, 1, 1]
    for path, n in zip(paths[:2], (GOOD_VIDEOS["wide"][3], GOOD_VIDEOS["tall"][3]), strict=True):
        d = read_frames(path, _mid(n))
        assert d.num_frames == n
        np.testing.assert_array_equal(frame_ids(d.frames), d.indices)
    with pytest.raises(BadVideo) as info:
        read_frames(paths[2], _mid(8))
    assert info.value.reason == "missing"
    with pytest.raises(BadVideo) as info:  # a file URI on another host cannot be read: dropped, not a crash
        read_frames("file://elsewhere/clips/wide.mp4", _mid(8))
    assert info.value.reason == "missing"


def test_manifest_and_videos_through_a_non_local_filesystem(video_dir, monkeypatch) -> None:
    """The same dataset read through pyarrow's filesystem layer as remote storage is: a SubTreeFileSystem
    (not a LocalFileSystem, so videos are fetched as bytes and decoded from memory) behind a `mem://` URI."""
    import pyarrow.fs as pafs

    import workflows.data.manifest as manifest_mod
    import workflows.data.video as video_mod

    store = pafs.SubTreeFileSystem(str(video_dir), pafs.LocalFileSystem())
    local = manifest_mod.resolve_filesystem

    def resolve(uri: str):
        if uri.startswith("mem://bucket/"):
            return store, uri.removeprefix("mem://bucket/")
        return local(uri)

    monkeypatch.setattr(manifest_mod, "resolve_filesystem", resolve)
    monkeypatch.setattr(video_mod, "resolve_filesystem", resolve)
    labels = load_labels("mem://bucket/labels.json")
    m = load_manifest("mem://bucket/bad.csv", labels)
    assert m.table.column("path").to_pylist()[0] == "mem://bucket/clips/wide.mp4"
    remote = read_frames("mem://bucket/clips/narrow.mp4", _mid(20))  # the PyAV fallback from bytes too
    here = read_frames(str(video_dir / "clips" / "narrow.mp4"), _mid(20))
    np.testing.assert_array_equal(remote.frames, here.frames)
    batch = {k: np.asarray(m.table.column(k).to_numpy(zero_copy_only=False)) for k in m.table.column_names}
    drops = []
    out = decode_batch(batch, ClipSpec(split="eval", num_frames=4, crop_size=24), lambda *args: drops.append(args))
    assert sorted(set(out["video_index"].tolist())) == list(range(len(GOOD_VIDEOS)))
    assert sorted(d[2] for d in drops) == ["corrupt", "empty", "missing", "truncated"]


def test_manifest_errors_name_rows_and_labels(tmp_path) -> None:
    write_manifest([{"path": "a.mp4", "label": "a"}, {"path": "b.mp4", "label": "zebra"}], tmp_path / "m.csv")
    with pytest.raises(ManifestError, match=r"'zebra' \(line 3\)"):  # the file's line: the header is line 1
        load_manifest(str(tmp_path / "m.csv"), {"a": 0})
    lenient = load_manifest(str(tmp_path / "m.csv"), {"a": 0}, strict=False)
    assert lenient.unknown_labels == {"zebra": [1]} and lenient.table.column("label").to_pylist() == [0, -1]
    (tmp_path / "gap.json").write_text(json.dumps({"a": 0, "b": 2}))
    with pytest.raises(ManifestError, match="missing"):
        load_labels(str(tmp_path / "gap.json"))
    # Names CLIP's tokenizer reads alike (it lower-cases and collapses spaces) would share one text embedding.
    (tmp_path / "cased.json").write_text(json.dumps({"Big": 0, "big": 1, "small  dog": 2, "Small dog": 3}))
    with pytest.raises(ManifestError, match=r"classes 'Big' and 'big' both read 'big' to the model's text encoder"):
        load_labels(str(tmp_path / "cased.json"))
    (tmp_path / "spaced.json").write_text(json.dumps({"small  dog": 0, "Small dog": 1}))
    with pytest.raises(ManifestError, match=r"'small  dog' and 'Small dog' both read 'small dog'.*rename one"):
        load_labels(str(tmp_path / "spaced.json"))
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(str(tmp_path / "nope.csv"), None)
    (tmp_path / "clips" / "cat").mkdir(parents=True)  # a folder of class folders given where a manifest goes
    with pytest.raises(ManifestError, match=r"clips is a folder: a manifest is a CSV/TSV or Parquet file .* data "
                                            r"import folders --videos .*clips --out <folder>"):
        load_manifest(str(tmp_path / "clips"), None)


def test_segment_indices_follow_the_reference() -> None:
    # 40 frames, 8 segments of 5 frames: edges 0, 5, ..., 40.
    mid = segment_indices(0, 40, 8, mode="eval")
    np.testing.assert_array_equal(mid, [2, 8, 12, 18, 22, 28, 32, 38])  # 2.5, 7.5, ... rounded half to even
    views = [segment_indices(0, 40, 8, mode="eval", view=v, num_views=3) for v in range(3)]
    np.testing.assert_array_equal(views[0], [2, 7, 12, 17, 22, 27, 32, 37])  # lo + 5/3
    np.testing.assert_array_equal(views[1], [3, 8, 13, 18, 23, 28, 33, 38])  # lo + 10/3
    np.testing.assert_array_equal(views[2], [5, 10, 15, 20, 25, 30, 35, 39])  # segment end, last clamped
    # A start/end window shifts and narrows the segments.
    first, last = frame_window(np.arange(40) / 25.0, start=0.4, end=1.2)
    assert (first, last) == (10, 30)
    np.testing.assert_array_equal(segment_indices(first, last, 4, mode="eval"), [12, 18, 22, 28])
    # Train: one random frame inside each segment, reproducible from the seed.
    a = segment_indices(0, 40, 8, mode="train", rng=np.random.default_rng(7))
    b = segment_indices(0, 40, 8, mode="train", rng=np.random.default_rng(7))
    c = segment_indices(0, 40, 8, mode="train", rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(a >= np.arange(8) * 5) and np.all(a <= np.arange(8) * 5 + 5)
    # Fewer frames than segments: indices repeat but stay valid.
    short = segment_indices(0, 3, 8, mode="eval")
    assert short.min() >= 0 and short.max() <= 2 and len(short) == 8


def test_random_resized_crop_box_respects_area_and_ratio() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(120, 160, rng, (0.4, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 160
        assert 0.35 <= h * w / (120 * 160) <= 1.0
        assert 0.7 <= w / h <= 1.4


def test_train_clip_flip_modes_and_grayscale() -> None:
    frames = index_frames(64, 48, 4)
    pairs = [[0, 1], [5, 6]]
    clip, label, flipped = train_clip(frames, 5, np.random.default_rng(0), crop_size=32, flip="swap_labels",
                                      flip_pairs=pairs, flip_p=1.0, grayscale_p=0.0, scale=(1.0, 1.0),
                                      ratio=(4 / 3, 4 / 3))
    assert clip.shape == (4, 32, 32, 3) and clip.dtype == np.uint8
    assert flipped and label == 6 and is_mirrored(clip)
    np.testing.assert_array_equal(frame_ids(clip), [0, 1, 2, 3])
    _, label, flipped = train_clip(frames, 5, np.random.default_rng(0), crop_size=32, flip="plain", flip_p=1.0)
    assert flipped and label == 5
    clip, label, flipped = train_clip(frames, 5, np.random.default_rng(0), crop_size=32, flip="none", flip_p=1.0,
                                      grayscale_p=0.0)
    assert not flipped and label == 5 and not is_mirrored(clip)
    gray, _, _ = train_clip(frames, 0, np.random.default_rng(0), crop_size=32, grayscale_p=1.0)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_eval_clips_resize_and_three_crops() -> None:
    frames = index_frames(96, 64, 2)
    (centre,) = eval_clips(frames, crop_size=32, num_crops=1)
    left, mid, right = eval_clips(frames, crop_size=32, num_crops=3)
    assert centre.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(centre, mid)
    g = [c[..., 1].mean() for c in (left, mid, right)]
    assert g[0] < g[1] < g[2]  # the green ramp rises left to right
    const = np.full((1, 50, 70, 3), 77, np.uint8)
    assert np.all(resize(const, 20, 31) == 77)


def _reference_bilinear(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize in float64, no antialiasing (the arithmetic `resize` must reproduce)."""
    def axis(size_in: int, size_out: int):
        src = np.clip((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0, size_in - 1)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, size_in - 1), src - lo

    y0, y1, wy = axis(frames.shape[1], height)
    x0, x1, wx = axis(frames.shape[2], width)
    f = frames.astype(np.float64)
    rows = f[:, y0] * (1 - wy)[:, None, None] + f[:, y1] * wy[:, None, None]
    return rows[:, :, x0] * (1 - wx)[:, None] + rows[:, :, x1] * wx[:, None]


@pytest.mark.parametrize("size", [(224, 224), (20, 31), (300, 410)])
def test_resize_is_half_pixel_bilinear_on_crop_views(size) -> None:
    frames = np.random.default_rng(3).integers(0, 256, (3, 120, 170, 3), dtype=np.uint8)
    crop = frames[:, 7:107, 11:161]  # a strided view, as train_clip passes its crop
    for view in (crop, crop[:, :, ::-1]):  # also a mirrored (negative-stride) view
        out = resize(view, *size)
        assert out.shape == (3, *size, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
        err = np.abs(out.astype(np.float64) - _reference_bilinear(view, *size))
        assert err.max() <= 1.0 and err.mean() < 0.5  # integer rounding only
    assert resize(crop, 100, 150) is crop  # already the size: no copy


def test_decode_size_only_shrinks_large_sources() -> None:
    assert decode_size(340, 256, 37, 1.25) == (50, 38)
    assert decode_size(64, 44, 37, 1.25) is None  # 44 <= 1.25 x 37: decode at the source size
    assert decode_size(1920, 1080, None, 1.25) is None


def _mid(n: int):
    return lambda first, last, fps: segment_indices(first, last, 8, mode="eval")


def test_read_frames_good_videos_and_decode_time_resize(video_dir) -> None:
    for name, (w, h, fps, n) in GOOD_VIDEOS.items():
        d = read_frames(str(video_dir / "clips" / f"{name}.mp4"), _mid(n))
        assert d.num_frames == n and abs(d.fps - fps) < 0.01 and (d.width, d.height) == (w, h)
        assert d.frames.shape[1:] == (h, w, 3)
        np.testing.assert_array_equal(frame_ids(d.frames), d.indices)  # the frames asked for, not neighbours
    small = read_frames(str(video_dir / "clips" / "big.mp4"), _mid(16), target_short=64)
    assert small.frames.shape[1:3] == (64, 86) and (small.width, small.height) == (340, 256)


def _zero_frame_videos(video_dir, tmp_path) -> list:
    """Real files with a video stream and no frames: an MP4 whose header was written but no packet muxed (an
    interrupted fragmented recording), and a healthy MP4 whose sample tables were emptied (codec setup intact)."""
    import struct

    import av

    header_only = tmp_path / "header_only.mp4"
    with av.open(str(header_only), "w", options={"movflags": "frag_keyframe+empty_moov"}) as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        c.start_encoding()  # writes ftyp + moov; no frame is ever encoded
    data = bytearray((video_dir / "clips" / "wide.mp4").read_bytes())
    for box, field in ((b"stsz", 8), (b"stts", 4), (b"stsc", 4), (b"stco", 4), (b"stss", 4)):  # entry counts
        at = data.rfind(box)  # the moov follows the mdat in these files
        if at > 0:
            struct.pack_into(">I", data, at + 4 + field, 0)
    emptied = tmp_path / "emptied.mp4"
    emptied.write_bytes(bytes(data))
    for path in (header_only, emptied):
        with av.open(str(path)) as c:
            assert len(c.streams.video) == 1 and c.streams.video[0].frames == 0
    return [header_only, emptied]


def test_read_frames_reports_each_bad_kind(video_dir, tmp_path) -> None:
    import av
    import decord

    with av.open(str(tmp_path / "audio.mp4"), "w") as c:  # a container without video
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in list(s.encode(frame)) + list(s.encode()):
            c.mux(packet)
    # (unsupported_codec, and AV1, which PyAV decodes where decord 0.6.0 cannot: test_video_formats.py)
    expected = {video_dir / "clips" / "missing.mp4": "missing", video_dir / "clips" / "empty.mp4": "empty",
                video_dir / "clips" / "truncated.mp4": "truncated", video_dir / "clips" / "random.mp4": "corrupt",
                tmp_path / "audio.mp4": "no_video_stream"}
    for path in _zero_frame_videos(video_dir, tmp_path):
        with pytest.raises(decord.DECORDError, match="filter"):  # decord 0.6.0 cannot even open them (no
            decord.VideoReader(str(path))  # pixel format without a frame for its filter graph) ...
        expected[path] = "zero_frames"  # ... so read_frames asks PyAV whether the stream has any packet
    for path, reason in expected.items():
        with pytest.raises(BadVideo) as info:
            read_frames(str(path), _mid(8))
        assert info.value.reason == reason, (path, info.value)
    with pytest.raises(BadVideo) as info:  # 16 frames, but the window [0.5 s, 0.6 s) at 24 fps holds 3
        read_frames(str(video_dir / "clips" / "big.mp4"), _mid(8), start=0.5, end=0.6, min_frames=4)
    assert info.value.reason == "too_short"


def test_decode_batch_without_ray(video_dir) -> None:
    m = load_manifest(str(video_dir / "bad.csv"), load_labels(str(video_dir / "labels.json")))
    batch = {k: np.asarray(m.table.column(k).to_numpy(zero_copy_only=False)) for k in m.table.column_names}
    drops = []
    spec = ClipSpec(split="eval", num_frames=4, crop_size=24, num_views=2, num_crops=3)
    out = decode_batch(batch, spec, lambda *args: drops.append(args))
    assert out["frames"].shape == (len(GOOD_VIDEOS) * 6, 4, 24, 24, 3) and out["frames"].dtype == np.uint8
    assert sorted(set(out["video_index"].tolist())) == list(range(len(GOOD_VIDEOS)))
    assert sorted(d[2] for d in drops) == ["corrupt", "empty", "missing", "truncated"]


def test_columns_collate_keeps_only_the_named_columns_as_tensors():
    import pyarrow as pa
    import torch

    from workflows.data.pipeline import clips_to_table, columns_collate

    def clips(n: int, first: int) -> dict[str, np.ndarray]:
        frames = np.arange(n * 2 * 4 * 4 * 3, dtype=np.uint8).reshape(n, 2, 4, 4, 3) + first
        return {"frames": frames, "label": np.arange(first, first + n), "video_index": np.arange(n),
                "view": np.zeros(n), "crop": np.zeros(n), "flipped": np.zeros(n, bool),
                "path": np.array([f"v{i}.mp4" for i in range(n)])}

    parts = [clips(2, 0), clips(3, 10)]
    table = pa.concat_tables([clips_to_table(p) for p in parts])  # two chunks, as batches from two blocks arrive
    out = columns_collate(["frames", "label"])(table)
    assert set(out) == {"frames", "label"}
    assert out["frames"].dtype == torch.uint8 and out["frames"].shape == (5, 2, 4, 4, 3)
    assert torch.equal(out["frames"], torch.from_numpy(np.concatenate([p["frames"] for p in parts])))
    assert out["label"].tolist() == [0, 1, 10, 11, 12]
    # For an accelerator the chunks stay separate: they are combined by the copy to the device.
    assert not columns_collate(["label"], "cuda:0").combine_chunks
    assert columns_collate(["label"], "cpu").combine_chunks


def test_a_stratified_subset_keeps_each_class_share_and_is_the_same_for_the_same_seed() -> None:
    import pyarrow as pa

    from workflows.data.manifest import Manifest

    labels = np.array([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)
    manifest = Manifest(table=pa.table({"video_index": np.arange(100), "label": np.roll(labels, 7)}), source="m.csv",
                        lines=list(range(2, 102)))
    subset = manifest.stratified_subset(20, seed=0)
    rows = subset.table.column("video_index").to_numpy()
    assert np.bincount(subset.table.column("label").to_numpy()).tolist() == [10, 6, 3, 1]
    assert (np.diff(rows) > 0).all() and subset.lines == [int(r) + 2 for r in rows]  # manifest order, its lines
    assert subset.table.equals(manifest.stratified_subset(20, seed=0).table)
    assert not subset.table.equals(manifest.stratified_subset(20, seed=1).table)
    # largest remainders: 3 of 100 -> quotas 1.5, 0.9, 0.45, 0.15 -> 2, 1, 0, 0
    assert np.bincount(manifest.stratified_subset(3, 0).table.column("label").to_numpy(), minlength=4).tolist() == \
        [2, 1, 0, 0]
    assert manifest.stratified_subset(100, 0) is manifest and manifest.stratified_subset(500, 0) is manifest


def test_a_relative_manifest_path_resolves_as_pathlib_joins_it() -> None:
    """resolve_path joins plain relative paths with string operations (a K710 manifest has 0.66 M rows): the result
    must be pathlib's for every shape of path, the ones it leaves to pathlib included."""
    from pathlib import Path

    from workflows.data.manifest import resolve_path

    paths = ["a.mp4", "cls/a.mp4", "./a.mp4", "a//b.mp4", "a/./b.mp4", "a/../b.mp4", "a/", "a/.", ".hidden/x.mp4",
             "x y/ z .mp4", "...", ".a./b", "c:d/e.mp4", "ü/ñ.mp4", "a\\b.mp4", ".", "..", "a/b/"]
    bases = ["/data/k710", "/data/k710/", "/", "/a//b", "/a/./b", ".", "./x", "rel/dir", "//host/share"]
    for base in bases:
        for path in paths:
            assert resolve_path(path, base) == str(Path(base) / path), (path, base)
    assert resolve_path("/abs/a.mp4", "/data") == "/abs/a.mp4"
    assert resolve_path("s3://b/a.mp4", "/data") == "s3://b/a.mp4"
    assert resolve_path("a.mp4", "s3://b/data") == "s3://b/data/a.mp4"


def test_a_folder_of_videos_is_its_video_files_without_hidden_ones(tmp_path) -> None:
    """What `predict DIR` classifies and `data k710 --videos` indexes: videos at any depth, any extension case,
    not macOS's `._name.mp4` metadata files nor anything in a hidden folder."""
    from workflows.data.manifest import video_files
    from workflows.predict import expand_inputs

    for rel in ("a.mp4", "sub/b.MKV", "sub/deeper/c.webm", "._a.mp4", "sub/._b.mp4", ".cache/d.mp4", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    expected = [tmp_path / "a.mp4", tmp_path / "sub/b.MKV", tmp_path / "sub/deeper/c.webm"]
    assert video_files(tmp_path) == expected
    missing = str(tmp_path / "nope.mp4")  # stays, to be reported as missing
    assert expand_inputs([str(tmp_path), missing]) == [*map(str, expected), missing]
