"""`data import folders`: a user's own videos as one folder per class become train.csv, val.csv and labels.json.
The folders here hold what real folders hold beside the videos (a README, thumbnails, macOS `._` metadata files,
`.DS_Store`, a stray video at the top, an empty class folder, nested sub-folders); what is not taken is counted and
shown. The last test imports the real H.264 sample videos and hands the manifests to `pretrain --check`."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from workflows.data.cli import main
from workflows.data.folder_import import folder_class_text, import_folders
from workflows.data.manifest import VIDEO_EXTENSIONS, load_labels, load_manifest


def _touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)  # only listed, never decoded


def _rows(manifest: Path) -> list[tuple[str, str]]:
    lines = manifest.read_text().splitlines()
    assert lines[0] == '"path","label"'
    return [tuple(cell.strip('"') for cell in line.split(",")) for line in lines[1:]]


def _cli_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_folder_names_become_the_words_the_text_encoder_reads() -> None:
    assert {name: folder_class_text(name) for name in (
        "playing_guitar", "passing_American_football_(in_game)", "massaging person's head", "ApplyEyeMakeup", "YoYo",
        "TaiChi", "abseiling", "hula-hoop", "  spaced__out  ", "TV", "dog")} == {
        "playing_guitar": "playing guitar",
        "passing_American_football_(in_game)": "passing American football (in game)",  # Kinetics' own spelling
        "massaging person's head": "massaging person's head", "ApplyEyeMakeup": "apply eye makeup", "YoYo": "yo yo",
        "TaiChi": "tai chi", "abseiling": "abseiling", "hula-hoop": "hula-hoop", "  spaced__out  ": "spaced out",
        "TV": "TV", "dog": "dog"}


def _user_folder(root: Path) -> Path:
    """Ten videos of `playing_guitar` (two in a nested folder), 21 of `ApplyEyeMakeup`, one of `lonely`, an empty
    class folder, and what else such folders hold."""
    videos = root / "my_videos"
    for i in range(8):
        _touch(videos / "playing_guitar" / f"g{i}.mp4")
    _touch(videos / "playing_guitar" / "day2" / "g8.MP4")  # upper-case extension, nested
    _touch(videos / "playing_guitar" / "day2" / "g9.webm")
    for i in range(21):
        _touch(videos / "ApplyEyeMakeup" / f"v_{i:02d}.avi")
    _touch(videos / "lonely" / "only.mkv")
    (videos / "empty_class").mkdir()
    _touch(videos / "playing_guitar" / "notes.txt")
    _touch(videos / "ApplyEyeMakeup" / "thumb.jpg")
    _touch(videos / "ApplyEyeMakeup" / "._v_00.avi")  # macOS AppleDouble: looks like a video, is metadata
    _touch(videos / "playing_guitar" / ".DS_Store")
    _touch(videos / "playing_guitar" / ".cache" / "g0.mp4")
    (videos / "playing_guitar" / "day2" / "again").symlink_to(videos / "playing_guitar")  # a loop: walked once
    _touch(videos / "stray.mp4")
    _touch(videos / "README.md")
    _touch(videos / ".DS_Store")
    return videos


def test_a_folder_of_class_folders_is_split_per_class_and_shows_what_it_skipped(tmp_path, capsys) -> None:
    videos = _user_folder(tmp_path)
    out = tmp_path / "data"
    assert main(["import", "folders", "--videos", str(videos), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        f"wrote {out / 'train.csv'}: 29 videos of 3 classes",
        f"wrote {out / 'val.csv'}: 3 videos (0.1 of each class's videos, chosen with --seed 0)",
        f"wrote {out / 'labels.json'}: 3 classes, the folder names as words (e.g. 'ApplyEyeMakeup' -> "
        f"'apply eye makeup'; 'playing_guitar' -> 'playing guitar')"], lines
    notes = "\n".join(lines[3:])
    assert f"--videos {videos}: skipped 1 videos lying in no class folder (stray.mp4)" in notes, notes
    assert "skipped 1 folders holding no video (empty_class/)" in notes, notes
    assert "skipped 2 files that are not videos by their extension (.jpg: 1, .txt: 1; e.g. " in notes, notes
    assert "skipped 3 hidden files or folders (ApplyEyeMakeup/._v_00.avi, playing_guitar/.DS_Store, " \
           "playing_guitar/.cache; a ._name file is macOS metadata" in notes, notes
    assert "1 classes have a single video, kept for training and absent from val.csv (lonely)" in notes, notes
    assert "the classes are imbalanced: 1 to 21 videos per class in --videos (fewest: lonely (1), playing_guitar " \
           "(10), ApplyEyeMakeup (21)); mean class accuracy (val_mean_class_acc, evaluate's) weighs every class " \
           "alike, top-1 follows the large ones: rank checkpoints by it with --set " \
           "eval.best_metric=val_mean_class_acc" in notes, notes
    assert all(line.startswith("note: ") for line in lines[3:]) and len(lines) == 10, lines

    assert load_labels(str(out / "labels.json")) == {"apply eye makeup": 0, "lonely": 1, "playing guitar": 2}
    train, val = _rows(out / "train.csv"), _rows(out / "val.csv")
    by_class = {label: ([p for p, lab in train if lab == label], [p for p, lab in val if lab == label])
                for label in ("apply eye makeup", "playing guitar", "lonely")}
    # round(21 x 0.1) = 2 and round(10 x 0.1) = 1 to val; the one video of `lonely` trains
    assert [(len(t), len(v)) for t, v in by_class.values()] == [(19, 2), (9, 1), (1, 0)], by_class
    assert not set(p for p, _ in train) & set(p for p, _ in val)
    paths = {p for p, _ in train + val}
    # The videos are not below --out: absolute paths (said in a note), nested files and any extension case kept
    assert {str(videos / "playing_guitar/day2/g8.MP4"), str(videos / "playing_guitar/day2/g9.webm")} <= paths
    assert not any("._" in p or ".cache" in p or "stray" in p for p in paths)
    # Relative to the manifests, the paths resolve to the files (what a run reads).
    manifest = load_manifest(str(out / "train.csv"), load_labels(str(out / "labels.json")), strict=True)
    assert all(Path(p).is_file() for p in manifest.table.column("path").to_pylist())
    note = "note: the videos are not below --out"
    assert any(line.startswith(note) for line in lines), lines

    # The same files and seed give the same split whatever order the disk lists them in; another seed another one.
    again = tmp_path / "again"
    import_folders(videos, again)
    assert (again / "val.csv").read_text() == (out / "val.csv").read_text()
    other = import_folders(videos, tmp_path / "seed7", seed=7)
    assert other.counts == {"train": 29, "val": 3}
    assert (tmp_path / "seed7" / "val.csv").read_text() != (again / "val.csv").read_text()


def test_a_separate_validation_folder_and_layouts_that_cannot_be_right(tmp_path, capsys) -> None:
    # --out the folder above the two: the manifests name the videos relative to themselves (uploadable)
    train, val, out = tmp_path / "split" / "train", tmp_path / "split" / "val", tmp_path / "split"
    for folder, names in ((train, ("cat", "dog", "bird")), (val, ("cat", "dog"))):
        for name in names:
            for i in range(3):
                _touch(folder / name / f"{i}.mp4")
    # The parent of train/ and val/ is not a folder of classes: the error gives the command that is.
    err = _cli_error(["import", "folders", "--videos", str(tmp_path / "split"), "--out", str(out)], capsys)
    assert f"holds split folders (train, val), not class folders: give --videos {train} --val-videos {val}" in err
    assert main(["import", "folders", "--videos", str(train), "--val-videos", str(val), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"wrote {out / 'val.csv'}: 6 videos (--val-videos {val})", lines
    assert lines[3] == "note: 1 training classes have no validation videos in --val-videos (bird)", lines
    assert {label for _, label in _rows(out / "val.csv")} == {"cat", "dog"}
    assert _rows(out / "train.csv")[0] == ("train/bird/0.mp4", "bird") and len(lines) == 4, lines

    _touch(val / "horse" / "0.mp4")
    err = _cli_error(["import", "folders", "--videos", str(train), "--val-videos", str(val), "--out",
                      str(tmp_path / "x")], capsys)
    assert "1 class folders have no folder of the same name in --videos" in err and "(horse)" in err, err
    assert not (tmp_path / "x").exists()

    flat = tmp_path / "flat"
    _touch(flat / "a.mp4")
    err = _cli_error(["import", "folders", "--videos", str(flat), "--out", str(out)], capsys)
    assert "holds 1 videos but no class folder: this tool takes one folder per class" in err, err
    assert "use `data import list`" in err
    err = _cli_error(["import", "folders", "--videos", str(tmp_path / "nowhere"), "--out", str(out)], capsys)
    assert f"--videos {tmp_path / 'nowhere'} is not a folder" in err
    err = _cli_error(["import", "folders", "--videos", str(train), "--val-fraction", "0", "--out", str(out)], capsys)
    assert "--val-fraction 0.0: give a fraction between 0 and 1" in err
    clash = tmp_path / "clash"
    _touch(clash / "Playing_Guitar" / "a.mp4")
    _touch(clash / "Playing Guitar" / "b.mp4")
    err = _cli_error(["import", "folders", "--videos", str(clash), "--out", str(tmp_path / "y")], capsys)
    assert "class folders 'Playing Guitar' and 'Playing_Guitar' both read 'playing guitar'" in err, err
    # Case aside, too: CLIP's tokenizer lower-cases, so 'Big' and 'big' would get one text embedding.
    cased = tmp_path / "cased"
    for folder in ("Big", "big", "Small__Dog", "small dog"):
        _touch(cased / folder / "a.mp4")
        _touch(cased / folder / "b.mp4")
    err = _cli_error(["import", "folders", "--videos", str(cased), "--out", str(tmp_path / "y")], capsys)
    assert "class folders 'Big' and 'big' both read 'big' to the model's text encoder" in err, err
    assert "merge the two folders, or rename one" in err and not (tmp_path / "y").exists()
    shutil.rmtree(cased / "big")
    err = _cli_error(["import", "folders", "--videos", str(cased), "--out", str(tmp_path / "y")], capsys)
    assert "class folders 'Small__Dog' and 'small dog' both read 'small dog'" in err, err


def test_folders_onto_an_existing_label_file_and_an_earlier_import_kept(tmp_path, capsys) -> None:
    videos = tmp_path / "kinetics_like"
    for folder in ("playing_guitar", "passing_American_football_(in_game)"):
        for i in range(4):
            _touch(videos / folder / f"{i}.mp4")
    k400 = tmp_path / "k400_labels.json"
    k400.write_text('{"abseiling": 0, "passing American football (in game)": 1, "playing guitar": 2, "zumba": 3}')
    out = tmp_path / "data"
    assert main(["import", "folders", "--videos", str(videos), "--out", str(out), "--labels", str(k400)]) == 0
    assert f"labels.json: the classes and indices of {k400}" in capsys.readouterr().out
    assert load_labels(str(out / "labels.json")) == load_labels(str(k400))
    assert {label for _, label in _rows(out / "train.csv")} == {"playing guitar", "passing American football (in game)"}

    _touch(videos / "juggling_fire" / "0.mp4")
    err = _cli_error(["import", "folders", "--videos", str(videos), "--out", str(tmp_path / "z"), "--labels",
                      str(k400)], capsys)
    assert f"1 class folders are not classes of --labels {k400}: 'juggling_fire' (read as 'juggling fire')" in err
    # Without --labels, a folder already holding another import's labels.json is refused, and nothing is written.
    before = (out / "train.csv").read_text()
    err = _cli_error(["import", "folders", "--videos", str(videos), "--out", str(out)], capsys)
    assert "written by an earlier import into this folder) holds other classes" in err, err
    assert (out / "train.csv").read_text() == before


def test_the_sample_videos_as_class_folders_are_a_dataset_pretrain_accepts(sample_data, tmp_path, capsys,
                                                                           monkeypatch) -> None:
    """The motion sample's real H.264 files lie in videos/<class>/: imported as a user's folder (below --out, so
    relative and uploadable), they give the sample's own classes, and `pretrain --check` (which decodes a sample of
    the videos and checks every label) accepts the result."""
    from workflows import pretrain
    from workflows.data.sample import SAMPLE_CLASSES

    out = tmp_path / "mine"
    shutil.copytree(Path(sample_data.root) / "videos", out / "videos")
    assert main(["import", "folders", "--videos", str(out / "videos"), "--out", str(out),
                 "--val-fraction", "0.34"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wrote {out / 'train.csv'}: 16 videos of 8 classes", lines
    assert not any(line.startswith("note: ") for line in lines), lines
    assert sorted(load_labels(str(out / "labels.json"))) == sorted(SAMPLE_CLASSES)
    assert all(p.startswith("videos/") for p, _ in _rows(out / "val.csv"))

    monkeypatch.setattr(pretrain, "ensure_ray", lambda *a, **k: pytest.fail("--check started Ray"))
    code = pretrain.main(["--config", "workflows/configs/smoke.yaml", "--check", "--set",
                          f"data.train_manifest={out / 'train.csv'}", f"data.val_manifest={out / 'val.csv'}",
                          f"data.labels={out / 'labels.json'}", f"run.storage_path={tmp_path / 'runs'}"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "[pretrain] check: 16 training videos" in printed.out, printed.out


@pytest.mark.integration
def test_class_folders_in_a_bucket_are_imported_in_place(sample_data, tmp_path, monkeypatch, capsys) -> None:
    """Videos already in a bucket as <class>/<video> (moto's real S3 API on loopback, reached through the AWS_*
    variables a user exports): one listing, nothing downloaded, the manifests written beside them and naming them
    relative to themselves, the same split as the same files on a disk; `pretrain --check` then reads the
    manifests and decodes a sample of the videos from the bucket."""
    from tests.workflows.object_store import MotoServer, S3Credentials
    from workflows import pretrain
    from workflows.data.sample import SAMPLE_CLASSES

    moto = MotoServer(tmp_path)
    moto.start()
    try:
        creds = S3Credentials(moto.url)
        for name, value in creds.env().items():
            monkeypatch.setenv(name, value)
        client = creds.client()
        client.create_bucket(Bucket="vds")
        local = tmp_path / "disk"
        shutil.copytree(Path(sample_data.root) / "videos", local / "clips")
        for path in sorted((local / "clips").rglob("*.mp4")):
            client.put_object(Bucket="vds", Key=f"mine/{path.relative_to(local).as_posix()}", Body=path.read_bytes())
        client.put_object(Bucket="vds", Key="mine/clips/moving_left/._train_0000.mp4", Body=b"\0" * 4096)
        client.put_object(Bucket="vds", Key="mine/clips/growing/info.json", Body=b"{}")

        assert main(["import", "folders", "--videos", "s3://vds/mine/clips", "--out", "s3://vds/mine",
                     "--val-fraction", "0.34"]) == 0
        lines = capsys.readouterr().out.splitlines()
        # The listing said, then what it found: 24 videos, 2 other files, 8 class folders.
        assert lines[0] == "listing s3://vds/mine/clips (one request per 1,000 objects) ..."
        assert re.fullmatch(r"listed 34 objects and folders in \d+\.\d s", lines[1]), lines[1]
        lines = lines[2:]
        assert lines[:2] == ["wrote s3://vds/mine/train.csv: 16 videos of 8 classes",
                             "wrote s3://vds/mine/val.csv: 8 videos (0.34 of each class's videos, chosen with "
                             "--seed 0)"]
        assert lines[3:] == [
            "note: --videos s3://vds/mine/clips: skipped 1 files that are not videos by their extension (.json: 1; "
            f"e.g. growing/info.json); videos are {', '.join(VIDEO_EXTENSIONS)}",
            "note: --videos s3://vds/mine/clips: skipped 1 hidden files or folders (moving_left/._train_0000.mp4; a "
            "._name file is macOS metadata, not a video)"], lines
        in_bucket = {name: client.get_object(Bucket="vds", Key=f"mine/{name}")["Body"].read().decode()
                     for name in ("train.csv", "val.csv", "labels.json")}
        assert sorted(load_labels("s3://vds/mine/labels.json")) == sorted(SAMPLE_CLASSES)
        assert in_bucket["val.csv"].count('"clips/') == 8  # relative to the manifest: the dataset moves as one

        import_folders(local / "clips", local, val_fraction=0.34)  # the same files on a disk: the same manifests
        assert {name: (local / name).read_text() for name in in_bucket} == in_bucket

        monkeypatch.setattr(pretrain, "ensure_ray", lambda *a, **k: pytest.fail("--check started Ray"))
        code = pretrain.main(["--config", "workflows/configs/smoke.yaml", "--check", "--set",
                              "data.train_manifest=s3://vds/mine/train.csv", "data.val_manifest=s3://vds/mine/val.csv",
                              "data.labels=s3://vds/mine/labels.json", f"run.storage_path={tmp_path / 'runs'}"])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        assert "[pretrain] check: 16 training videos" in printed.out, printed.out

        # Manifests on this machine for videos in the bucket: full URIs, and a note on what a cluster needs.
        assert main(["import", "folders", "--videos", "s3://vds/mine/clips", "--out", str(tmp_path / "here"),
                     "--val-fraction", "0.34"]) == 0
        assert "note: the manifests are on this machine and name the videos by their bucket URIs" in \
            capsys.readouterr().out
        assert _rows(tmp_path / "here" / "train.csv")[0][0] == "s3://vds/mine/clips/growing/train_0000.mp4"
        # Local videos cannot be imported into a bucket; an empty prefix is not a dataset.
        err = _cli_error(["import", "folders", "--videos", str(local / "clips"), "--out", "s3://vds/other"], capsys)
        assert "is in a bucket but the videos are on this machine" in err and "`data upload`" in err, err
        err = _cli_error(["import", "folders", "--videos", "s3://vds/nothing-here", "--out", "s3://vds/x"], capsys)
        assert "--videos s3://vds/nothing-here holds nothing (no object below that prefix)" in err, err

        # predict takes a bucket prefix as it takes a local folder: the videos below it, hidden files left out.
        from workflows.predict import expand_inputs

        listed = expand_inputs(["s3://vds/mine/clips"])
        assert listed == sorted(f"s3://vds/mine/{p.relative_to(local).as_posix()}"
                                for p in (local / "clips").rglob("*.mp4")) and len(listed) == 24
        assert expand_inputs(["s3://vds/mine/clips/growing/"]) == [u for u in listed if "/growing/" in u]
        assert expand_inputs(["s3://vds/mine/nothing"]) == ["s3://vds/mine/nothing"]  # reported as missing later

        # --clip-seconds in the bucket: the durations from the objects' headers (ranged reads), the same clips as
        # the same files cut on a disk; a missing or unreadable object is listed whole, as on a disk.
        client.put_object(Bucket="vds", Key="mine/clips/growing/broken.mp4", Body=b"<html>404</html>")
        _touch(local / "clips" / "growing" / "broken.mp4", b"<html>404</html>")
        assert main(["import", "folders", "--videos", "s3://vds/mine/clips", "--out", "s3://vds/mine",
                     "--val-fraction", "0.34", "--clip-seconds", "0.75"]) == 0
        notes = capsys.readouterr().out
        assert "1 videos could not be opened (`data check` says why) and are listed whole (clips/growing/broken.mp4)"\
            in notes, notes
        assert "an epoch fetches a video once per clip of it: `data transcode --manifest M --out s3://BUCKET/PREFIX " \
               "--cut` writes each clip as a file of its own, into the bucket" in notes
        import_folders(local / "clips", local, val_fraction=0.34, clip_seconds=0.75)
        for name in ("train.csv", "val.csv"):
            cut = client.get_object(Bucket="vds", Key=f"mine/{name}")["Body"].read().decode()
            assert cut == (local / name).read_text() and cut.count("0.75") >= 8
        from workflows.data.video import header_duration

        assert header_duration("s3://vds/mine/clips/gone.mp4", retry_s=600) is None  # gone: at once, not retried
    finally:
        moto.stop()


def test_long_recordings_are_cut_into_clips_after_the_split(sample_data, tmp_path, capsys) -> None:
    """--clip-seconds: each video becomes centred windows of that length (rows with start,end), all of a video's
    in one manifest; videos shorter than a window, without a declared duration or that cannot be opened are listed
    whole and said. The windows read as clips of that length."""
    import av

    from tests.workflows.conftest import index_frames
    from workflows.data.video import read_frames

    out = tmp_path / "mine"
    shutil.copytree(Path(sample_data.root) / "videos", out / "videos")  # 1.5 s each: 24 frames at 16 fps
    for name, frames, options in (("short.mp4", 5, {}), ("live.mkv", 20, {"live": "1"})):
        with av.open(str(out / "videos" / "growing" / name), "w", options=options) as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = 48, 48, "yuv420p"
            for image in index_frames(48, 48, frames):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())
    _touch(out / "videos" / "growing" / "broken.mp4", b"<html>404</html>")
    assert main(["import", "folders", "--videos", str(out / "videos"), "--out", str(out), "--val-fraction", "0.34",
                 "--clip-seconds", "0.75"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # growing: 6 videos -> 4 train + 2 val; the others 3 -> 2 + 1. Each sample video: 2 windows of 0.75 s.
    train, val = load_manifest(str(out / "train.csv"), None), load_manifest(str(out / "val.csv"), None)
    assert lines[0] == f"wrote {out / 'train.csv'}: {len(train)} clips of 0.75 s from 18 videos of 8 classes", lines
    assert lines[1].startswith(f"wrote {out / 'val.csv'}: {len(val)} clips of 0.75 s from 9 videos ("), lines
    notes = "\n".join(lines[3:])
    assert "1 videos are shorter than --clip-seconds 0.75 and are listed whole (videos/growing/short.mp4)" in notes
    assert "1 videos declare no duration (a live recording) and are listed whole (videos/growing/live.mkv)" in notes
    assert "1 videos could not be opened (`data check` says why) and are listed whole (videos/growing/broken.mp4)" \
        in notes, notes
    rows = {}
    for manifest, part in ((train, "train"), (val, "val")):
        for path, start, end in zip(*(manifest.table.column(c).to_pylist() for c in ("path", "start", "end")),
                                    strict=True):
            rows.setdefault(path, []).append((part, start, end))
    assert len(rows) == 27 and all(len({part for part, _, _ in r}) == 1 for r in rows.values())  # no video split
    whole = {Path(p).name for p, r in rows.items() if math.isnan(r[0][1])}
    assert whole == {"short.mp4", "live.mkv", "broken.mp4"}, whole
    cut = next(r for p, r in rows.items() if p.endswith("train_0000.mp4"))
    assert [(s, e) for _, s, e in cut] == [(0.0, 0.75), (0.75, 1.5)], cut
    path = next(p for p in rows if p.endswith("train_0000.mp4"))
    clip = read_frames(path, lambda first, last, fps: np.arange(first, last), start=0.75, end=1.5)
    assert len(clip.indices) == 12 and clip.indices[0] == 12  # 0.75 s at 16 fps, from frame 12 on

    from workflows.data.sampling import clip_windows

    assert clip_windows(2.0, 0.75) == [(0.25, 1.0), (1.0, 1.75)]  # centred: 0.5 s left over, 0.25 s at each end
    assert clip_windows(0.5, 0.75) is None and clip_windows(30.0, 10.0) == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]
    err = _cli_error(["import", "folders", "--videos", str(out / "videos"), "--out", str(tmp_path / "x"),
                      "--clip-seconds", "0"], capsys)
    assert "--clip-seconds 0.0: give the length of a clip in seconds" in err
