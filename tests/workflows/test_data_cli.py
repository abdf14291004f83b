"""`python -m workflows data ...`: the dataset doctor as a real subprocess, transcode, sample and import."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.workflows.conftest import GOOD_VIDEOS
from workflows.data.cli import main
from workflows.data.manifest import load_labels, load_manifest
from workflows.data.sample import write_sample_dataset
from workflows.data.video import read_frames

REPO = Path(__file__).resolve().parents[2]


def _check(manifest: Path, labels: Path, address: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "workflows", "data", "check", "--manifest", str(manifest),
                           "--labels", str(labels), "--json", "--address", address],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout)  # stdout is exactly one JSON object


@pytest.mark.integration
def test_data_check_on_sample_data_and_bad_manifest(ray_local, video_dir, tmp_path) -> None:
    address = ray_local.get_runtime_context().gcs_address
    info = write_sample_dataset(tmp_path / "sample", videos_per_class=3, size=32, num_frames=16, workers=1)
    rc, report = _check(Path(info.train_manifest), Path(info.labels), address)
    assert rc == 0
    assert report["videos"] == report["ok"] == info.train_videos and report["dropped"] == {}
    assert report["frames"]["min"] == report["frames"]["max"] == 16 and report["resolutions"] == {"32x32": 16}

    rc, report = _check(video_dir / "bad.csv", video_dir / "labels.json", address)
    assert rc == 1
    assert (report["videos"], report["ok"]) == (len(GOOD_VIDEOS) + 4, len(GOOD_VIDEOS))
    assert report["dropped"] == {"missing": 1, "empty": 1, "truncated": 1, "corrupt": 1}
    assert {r: [p.rsplit("/", 1)[-1] for p in ps] for r, ps in report["examples"].items()} == {
        "missing": ["missing.mp4"], "empty": ["empty.mp4"], "truncated": ["truncated.mp4"], "corrupt": ["random.mp4"]}
    # Unknown labels and repeated rows are named by the manifest's lines, the header and blank lines counted.
    clips = video_dir / "clips"
    (tmp_path / "odd.csv").write_text(f"path,label\n\n{clips / 'wide.mp4'},cls0\n\n{clips / 'tall.mp4'},zebra\n"
                                      f"{clips / 'wide.mp4'},cls0\n{clips / 'mid.mp4'},CLS 1\n")
    rc, report = _check(tmp_path / "odd.csv", video_dir / "labels.json", address)
    assert rc == 1 and report["numbered_by"] == "line"
    assert report["unknown_labels"] == {"zebra": [5], "CLS 1": [7]} and report["repeated_rows"] == [[6, 3]]
    assert report["meant_labels"] == {"CLS 1": "cls1"}  # a label a typo or another case away from a class
    from workflows.data.cli import _format_check

    assert "'zebra' (line 5)" in _format_check(report) and "1 row(s) repeat an earlier row" in _format_check(report)
    assert "'CLS 1' (line 7; did you mean 'cls1'?)" in _format_check(report)
    assert "line 6 = line 3" in _format_check(report)


@pytest.mark.integration
def test_transcode_writes_small_copies_and_never_touches_originals(ray_local, video_dir, tmp_path) -> None:
    from workflows.data.cli import _format_transcode
    from workflows.data.transcode import transcode_dataset

    originals = {p: p.read_bytes() for p in (video_dir / "clips").glob("*.mp4")}
    result = transcode_dataset(str(video_dir / "bad.csv"), tmp_path / "small", short_side=32, progress=False)
    said = _format_transcode(result)  # what the command prints: each reason a video was left out, with examples
    assert f"{result['ok']} of {result['videos']} videos transcoded, {result['videos'] - result['ok']} left out" in said
    assert all(f"  {reason}: {count}, e.g. " in said for reason, count in result["dropped"].items()), said
    assert (result["videos"], result["ok"]) == (len(GOOD_VIDEOS) + 4, len(GOOD_VIDEOS))
    assert sum(result["dropped"].values()) == 4
    m = load_manifest(result["manifest"], load_labels(str(video_dir / "labels.json")))
    for path, (name, (w, h, _, n)) in zip(m.table.column("path").to_pylist(), GOOD_VIDEOS.items(), strict=True):
        assert path.startswith(str(tmp_path / "small" / "videos")) and path.endswith(f"{name}.mp4")
        d = read_frames(path, lambda a, b, fps: np.arange(a, b))
        assert d.num_frames == n and min(d.width, d.height) == 32
        assert abs(d.width / d.height - w / h) < 0.1
    assert {p: p.read_bytes() for p in (video_dir / "clips").glob("*.mp4")} == originals
    with pytest.raises(ValueError, match="originals"):
        transcode_dataset(str(video_dir / "bad.csv"), video_dir, progress=False)


@pytest.mark.integration
def test_transcode_check_and_evaluate_stay_on_this_node_when_another_does_not_see_its_files(
        ray_local, video_dir, tmp_path, monkeypatch, capsys) -> None:
    """A cluster without a shared disk: a node that does not see the local --out (or the videos) would write its
    copies into its own disk, out of the manifest's reach, and `data check` there would count the videos missing.
    Each node is asked (a marker file in --out, the first video); here the second node is one that is gone when
    asked, so this node does the work alone, and says so."""
    import ray

    from workflows.data.decode_nodes import decode_pool_size
    from workflows.data.doctor import check_dataset
    from workflows.data.transcode import transcode_dataset
    from workflows.evaluate import decoded_where_seen
    from workflows.recipe import load_recipe

    real = ray.nodes()
    here = ray.get_runtime_context().get_node_id()
    # alive in the listing, gone when asked
    gone = {**real[0], "NodeID": "ab" * 28, "NodeManagerAddress": "192.0.2.99", "Labels": {"ray.io/node-id": "ab" * 28}}
    monkeypatch.setattr(ray, "nodes", lambda: [*real, gone])
    out = tmp_path / "small"
    result = transcode_dataset(str(video_dir / "good.csv"), out, short_side=32, progress=False)
    assert (result["ok"], result["nodes"]) == (len(GOOD_VIDEOS), 1)
    cpus = int(next(n for n in real if n["NodeID"] == here)["Resources"]["CPU"])
    wide = video_dir / "clips" / "wide.mp4"
    assert capsys.readouterr().err.startswith(  # then Ray Data's own INFO lines (the CLI keeps them in its logs)
        f"note: 1 of the cluster's 2 nodes do not see --out {out} and the videos, e.g. {wide} (no shared disk): "
        f"this node does the work alone, on its {cpus} CPUs; put them in a bucket (s3://...), or on a disk every "
        f"node mounts, for every node to take a share\n")
    assert not list(out.glob(".dist-shared-*"))
    report = check_dataset(str(video_dir / "good.csv"), str(video_dir / "labels.json"))
    assert report["ok"] == len(GOOD_VIDEOS)
    assert capsys.readouterr().err.startswith(f"note: 1 of the cluster's 2 nodes do not see the videos, e.g. {wide} "
                                              f"(no shared disk): this node does the work alone")
    # evaluate: its decoders (which read the files) kept here by this node's id label, the scorers anywhere
    data = load_recipe(REPO / "workflows" / "configs" / "smoke.yaml", check_files=False).data
    pinned = decoded_where_seen(data, load_manifest(str(video_dir / "good.csv"), None))
    assert pinned.decode_node_label == f"ray.io/node-id={here}" and "this node does the work alone" in \
        capsys.readouterr().err
    derived = dataclasses.replace(pinned, decode_actors=None)  # sized from this node's CPUs alone
    assert decode_pool_size(derived) == cpus // pinned.decode_threads
    monkeypatch.undo()
    capsys.readouterr()
    result = transcode_dataset(str(video_dir / "good.csv"), tmp_path / "again", short_side=32, progress=False)
    assert result["nodes"] == 1 and "note:" not in capsys.readouterr().err  # one node: nothing to ask or say
    assert decoded_where_seen(data, load_manifest(str(video_dir / "good.csv"), None)) is data


@pytest.mark.integration
def test_transcode_reads_each_video_once_and_cut_writes_each_window_as_a_file(ray_local, tmp_path, capsys) -> None:
    """A manifest naming a recording in several rows (clips of it, a repeated row, the whole of it): each source
    file is transcoded once (it was once per row, with rows of one file writing the same temporary file at once),
    the rows keep their windows; with --cut each window is a file of its own, holding exactly the frames the
    window samples from, and the new rows have none. A window past the video's end is dropped as too_short."""
    from tests.workflows.conftest import frame_ids, index_frames
    from workflows.data.manifest import save_labels, write_manifest
    from workflows.data.sample import write_video

    write_video(tmp_path / "src" / "long.mp4", index_frames(64, 48, 30), 10, crf=8)  # 3 s, frames 0..29
    write_video(tmp_path / "src" / "other.mp4", index_frames(48, 48, 12), 10, crf=8)
    windows = [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (1.0, 2.0), (None, None), (0.55, None)]
    rows = [{"path": "src/long.mp4", "label": "a", "start": a, "end": b} for a, b in windows]
    rows += [{"path": "src/other.mp4", "label": "b", "start": 0.2, "end": 0.8},
             {"path": "src/long.mp4", "label": "a", "start": 10.0, "end": 12.0}]
    write_manifest(rows, tmp_path / "clips.csv")
    save_labels({"a": 0, "b": 1}, tmp_path / "labels.json")

    def ids(path: str, start=None, end=None) -> list[int]:
        nan = float("nan")
        clip = read_frames(path, lambda a, b, fps: np.arange(a, b), start=nan if start is None else start,
                           end=nan if end is None else end, min_frames=1)
        return frame_ids(clip.frames).tolist()

    assert main(["transcode", "--manifest", str(tmp_path / "clips.csv"), "--out", str(tmp_path / "same"),
                 "--short-side", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["videos"], result["ok"], result["source_files"]) == (8, 8, 2)  # the window past the end too
    assert sorted(p.name for p in (tmp_path / "same" / "videos" / "src").iterdir()) == ["long.mp4", "other.mp4"]
    same = load_manifest(result["manifest"], None)
    original = [str(tmp_path / r["path"]) for r in rows]
    for path, start, end, source in zip(*(same.table.column(c).to_pylist() for c in ("path", "start", "end")),
                                        original, strict=True):
        if start != 10.0:
            assert ids(path, start, end) == ids(source, start, end)

    # A row left out is a failure, as `data check` counts one (exit 1); the progress counts failed files apart.
    assert main(["transcode", "--manifest", str(tmp_path / "clips.csv"), "--out", str(tmp_path / "cut"),
                 "--short-side", "32", "--cut"]) == 1
    said = capsys.readouterr().out
    assert "  7/7 clips done (1 failed, " in said and "transcoded 7/7" not in said, said
    assert "7 of 8 rows' clips cut from 2 videos, 1 left out (not in the new manifest):" in said, said
    assert f"  too_short: 1, e.g. {tmp_path / 'src' / 'long.mp4'}" in said
    cut = load_manifest(str(tmp_path / "cut" / "clips.csv"), None)
    assert np.isnan(cut.table.column("start").to_numpy()).all() and np.isnan(cut.table.column("end").to_numpy()).all()
    names = [Path(p).name for p in cut.table.column("path").to_pylist()]
    assert names == ["long_0-1s.mp4", "long_1-2s.mp4", "long_2-3s.mp4", "long_1-2s.mp4", "long.mp4",
                     "long_0.55-ends.mp4", "other_0.2-0.8s.mp4"]
    kept = [r for r in rows if r["start"] != 10.0]
    for path, row in zip(cut.table.column("path").to_pylist(), kept, strict=True):
        assert ids(path) == ids(str(tmp_path / row["path"]), row["start"], row["end"]), (path, row)
    assert ids(str(tmp_path / "cut" / "videos" / "src" / "long_1-2s.mp4")) == list(range(10, 20))
    assert ids(str(tmp_path / "cut" / "videos" / "src" / "long_0.55-ends.mp4")) == list(range(5, 30))
    assert not list((tmp_path / "cut").rglob(".*.part"))


def test_sample_and_import_commands(tmp_path, capsys) -> None:
    assert main(["sample", "--out", str(tmp_path / "s"), "--videos-per-class", "2", "--size", "32", "--frames",
                 "8", "--workers", "1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["train_videos"] == 8 and info["val_videos"] == 8
    assert len(load_manifest(info["train_manifest"], load_labels(info["labels"]))) == 8
    (tmp_path / "list.txt").write_text("a/x.mp4 jump\nb/y.mp4 run\n")
    assert main(["import", "list", "--list", str(tmp_path / "list.txt"), "--out", str(tmp_path / "l" / "m.csv")]) == 0
    assert "; files not checked (add --check)" in capsys.readouterr().out  # not "0 listed but missing"
    assert load_labels(str(tmp_path / "l" / "labels.json")) == {"jump": 0, "run": 1}
    assert main(["check", "--manifest", str(tmp_path / "nope.csv")]) == 2  # a clear error, not a traceback


def test_upload_refuses_what_a_bucket_copy_could_not_read(tmp_path, capsys) -> None:
    """`data upload` checks its input before copying anything (the copy itself, to a real S3 endpoint, is
    tests/workflows/test_object_storage.py)."""
    from workflows.data.upload import check_manifests

    root = Path(write_sample_dataset(tmp_path / "s", videos_per_class=2, size=32, num_frames=8, workers=1).root)
    manifests, missing = check_manifests(root)
    assert [m.name for m in manifests] == ["train.csv", "val.csv"] and missing == {}
    (root / "extra.csv").write_text("path,label\nvideos/moving_left/gone.mp4,moving left\n")
    assert check_manifests(root)[1] == {"extra.csv": 1}  # a missing video is counted (data check reports it)
    (root / "notes.csv").write_text("a,b\n1,2\n")  # not a manifest: ignored
    manifests, missing = check_manifests(root)
    assert [m.name for m in manifests] == ["extra.csv", "train.csv", "val.csv"] and missing == {"extra.csv": 1}
    assert main(["upload", str(tmp_path / "nope"), "s3://bucket/data"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["upload", str(root), str(tmp_path / "copy")]) == 2
    assert "is not a bucket URI" in capsys.readouterr().err
    assert main(["upload", "s3://bucket/a", "s3://bucket/b"]) == 2
    assert "already a URI" in capsys.readouterr().err
    video = next(root.glob("videos/*/*.mp4"))
    for name, entry in (("absolute.csv", str(video)), ("outside.csv", "../elsewhere/x.mp4"),
                        ("file_uri.csv", video.as_uri())):
        (root / name).write_text(f"path,label\n{entry},moving left\n")
        assert main(["upload", str(root), "s3://bucket/data"]) == 2
        err = capsys.readouterr().err
        assert f"{name} (1 of 1 rows, e.g. line 2: {entry})" in err and "relative to the manifest's folder" in err
        (root / name).unlink()


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if a data tool gets as far as starting Ray: bad input must be refused before that."""
    import workflows.data.cli as cli

    def started(address):
        raise AssertionError("Ray was started before the bad input was refused")

    monkeypatch.setattr(cli, "_init_ray", started)


def _tiny_manifest(tmp_path: Path) -> Path:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.csv").write_text("path,label\nvideos/a.mp4,jump\n")
    return tmp_path / "ds" / "train.csv"


def test_check_refuses_bad_labels_and_frame_counts_before_ray(tmp_path, capsys, no_ray) -> None:
    manifest = str(_tiny_manifest(tmp_path))
    (tmp_path / "bad.json").write_text('{"jump": ')
    for extra, message in ((["--labels", str(tmp_path / "nope.json")], f"label file {tmp_path / 'nope.json'} does "
                                                                          f"not exist"),
                           (["--labels", str(tmp_path / "bad.json")], f"label file {tmp_path / 'bad.json'} is not "
                                                                       f"valid JSON"),
                           (["--frames", "0"], "--frames 0: frames decoded per video must be at least 1"),
                           (["--min-frames", "0"], "--min-frames 0: must be at least 1")):
        assert main(["check", "--manifest", manifest, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and "Traceback" not in err, err


def test_check_names_an_unreachable_bucket_and_the_variables_to_set(tmp_path, capsys, monkeypatch, no_ray) -> None:
    for key, value in (("AWS_ENDPOINT_URL", "http://127.0.0.1:9"), ("AWS_ACCESS_KEY_ID", "x"),
                       ("AWS_SECRET_ACCESS_KEY", "y"), ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(key, value)  # a closed local port: refused at once, no network needed
    assert main(["check", "--manifest", "s3://bucket/data/train.csv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read manifest s3://bucket/data/train.csv: ") and err.count("\n") == 1
    assert "AWS_ENDPOINT_URL" in err and "AWS_ACCESS_KEY_ID" in err
    # Other unreadable label files take the same path (an OSError, not a traceback); a folder needs no bucket.
    assert main(["check", "--manifest", str(_tiny_manifest(tmp_path)), "--labels", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot read label file {tmp_path}: ")


def test_transcode_refuses_bad_options_and_outputs_before_ray(tmp_path, capsys, no_ray, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there: refused at once
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "test")
    manifest = _tiny_manifest(tmp_path)
    (tmp_path / "a_file").write_text("x")
    out = str(tmp_path / "small")
    for extra, message in ((["--out", out, "--short-side", "0"], "--short-side 0: the short side must be at least 2"),
                           (["--out", out, "--gop", "-1"], "--gop -1: the keyframe interval must be at least 1"),
                           (["--out", out, "--crf", "99"], "--crf 99: x264's quality setting must be 0..51"),
                           (["--out", str(tmp_path / "a_file")], f"--out {tmp_path / 'a_file'} is an existing file"),
                           (["--out", str(tmp_path / "a_file" / "x")], f"lies below the file {tmp_path / 'a_file'}"),
                           (["--out", f"{manifest.parent}/"], "is the manifest's own folder"),
                           (["--out", out, "--storage-retry-s", "-1"], "--storage-retry-s -1.0: must be >= 0"),
                           (["--out", "s3://bucket/small"], "--out s3://bucket/small: the bucket cannot be reached: ")):
        assert main(["transcode", "--manifest", str(manifest), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "small").exists()


def test_transcode_help_says_where_a_local_out_is_transcoded(capsys) -> None:
    """A local --out on a cluster is transcoded on every node that sees the same files (`where_tasks_see`)."""
    with pytest.raises(SystemExit):
        main(["transcode", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert "this node's CPUs only" not in said
    assert ("a local folder (transcoded on every node that sees the same files there, a shared disk; else on this "
            "node alone)") in said, said


def test_sample_refuses_a_file_as_its_output_folder(tmp_path, capsys) -> None:
    (tmp_path / "a_file").write_text("x")
    assert main(["sample", "--out", str(tmp_path / "a_file"), "--videos-per-class", "2", "--size", "16",
                 "--frames", "4", "--workers", "1"]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'a_file'} is an existing file; give a folder (it is " \
                                      f"created when missing)\n"
    assert (tmp_path / "a_file").read_text() == "x"
    for workers in ("0", "-1"):  # was: 0 silently meant the default, -1 ran serially
        assert main(["sample", "--out", str(tmp_path / "new"), "--workers", workers]) == 2
        assert f"error: --workers {workers}: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
