"""`data import ucf101` / `data import hmdb51`: the official split files of the two transfer benchmarks (written here
in their exact formats: CRLF line endings, HMDB's trailing spaces, UCF's HandstandPushups / HandStandPushups
spellings) become train.csv, val.csv (the official test list) and labels.json with the class names as words; a
bad split file fails naming the file, the line and what to do, and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workflows.data.cli import main
from workflows.data.importers import hmdb51_class_text, import_hmdb51, import_ucf101, ucf101_class_text
from workflows.data.manifest import load_labels, load_manifest

UCF101_CLASSES = """ApplyEyeMakeup ApplyLipstick Archery BabyCrawling BalanceBeam BandMarching BaseballPitch Basketball
BasketballDunk BenchPress Biking Billiards BlowDryHair BlowingCandles BodyWeightSquats Bowling BoxingPunchingBag
BoxingSpeedBag BreastStroke BrushingTeeth CleanAndJerk CliffDiving CricketBowling CricketShot CuttingInKitchen Diving
Drumming Fencing FieldHockeyPenalty FloorGymnastics FrisbeeCatch FrontCrawl GolfSwing Haircut Hammering HammerThrow
HandstandPushups HandstandWalking HeadMassage HighJump HorseRace HorseRiding HulaHoop IceDancing JavelinThrow
JugglingBalls JumpingJack JumpRope Kayaking Knitting LongJump Lunges MilitaryParade Mixing MoppingFloor Nunchucks
ParallelBars PizzaTossing PlayingCello PlayingDaf PlayingDhol PlayingFlute PlayingGuitar PlayingPiano PlayingSitar
PlayingTabla PlayingViolin PoleVault PommelHorse PullUps Punch PushUps Rafting RockClimbingIndoor RopeClimbing Rowing
SalsaSpin ShavingBeard Shotput SkateBoarding Skiing Skijet SkyDiving SoccerJuggling SoccerPenalty StillRings
SumoWrestling Surfing Swing TableTennisShot TaiChi TennisSwing ThrowDiscus TrampolineJumping Typing UnevenBars
VolleyballSpiking WalkingWithDog WallPushups WritingOnBoard YoYo""".split()
HMDB51_CLASSES = """brush_hair cartwheel catch chew clap climb climb_stairs dive draw_sword dribble drink eat fall_floor
fencing flic_flac golf handstand hit hug jump kick kick_ball kiss laugh pick pour pullup punch push pushup ride_bike
ride_horse run shake_hands shoot_ball shoot_bow shoot_gun sit situp smile smoke somersault stand swing_baseball sword
sword_exercise talk throw turn walk wave""".split()


def _crlf(path: Path, lines: list[str]) -> Path:
    """A split file as the official archives ship it: CRLF line endings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(f"{line}\r\n" for line in lines).encode())
    return path


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")  # only looked for, never decoded


def _cli_error(argv: list[str], capsys) -> str:
    """The one-line error of a data tool that must refuse its input (exit code 2, no traceback)."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _import_split_1(dataset: str, videos: Path, splits: Path, out: Path, capsys) -> list[str]:
    """`data import <dataset> ... --split 1 --check` as a user runs it (exit code 0); the lines it printed."""
    assert main(["import", dataset, "--videos", str(videos), "--splits", str(splits), "--split", "1",
                 "--out", str(out), "--check"]) == 0
    return capsys.readouterr().out.splitlines()


def _rows(manifest: Path) -> list[tuple[str, str]]:
    lines = manifest.read_text().splitlines()
    assert lines[0] == '"path","label"'
    return [tuple(cell.strip('"') for cell in line.split(",")) for line in lines[1:]]


def test_class_names_become_the_words_the_text_encoder_reads() -> None:
    assert {name: ucf101_class_text(name) for name in (
        "ApplyEyeMakeup", "YoYo", "PlayingDaf", "BasketballDunk", "CleanAndJerk", "HandstandPushups", "TaiChi",
        "PullUps", "BoxingPunchingBag", "WalkingWithDog", "SkyDiving", "Skijet", "RockClimbingIndoor")} == {
        "ApplyEyeMakeup": "apply eye makeup", "YoYo": "yo yo", "PlayingDaf": "playing daf",
        "BasketballDunk": "basketball dunk", "CleanAndJerk": "clean and jerk", "HandstandPushups": "handstand pushups",
        "TaiChi": "tai chi", "PullUps": "pull ups", "BoxingPunchingBag": "boxing punching bag",
        "WalkingWithDog": "walking with dog", "SkyDiving": "sky diving", "Skijet": "skijet",
        "RockClimbingIndoor": "rock climbing indoor"}
    assert {name: hmdb51_class_text(name) for name in (
        "brush_hair", "fall_floor", "ride_bike", "shoot_bow", "climb_stairs", "draw_sword", "flic_flac", "kick_ball",
        "shake_hands", "swing_baseball", "sword_exercise", "pullup", "cartwheel")} == {
        "brush_hair": "brush hair", "fall_floor": "fall floor", "ride_bike": "ride bike", "shoot_bow": "shoot bow",
        "climb_stairs": "climb stairs", "draw_sword": "draw sword", "flic_flac": "flic flac", "kick_ball": "kick ball",
        "shake_hands": "shake hands", "swing_baseball": "swing baseball", "sword_exercise": "sword exercise",
        "pullup": "pullup", "cartwheel": "cartwheel"}
    # Every official class keeps a name of its own.
    assert len(UCF101_CLASSES) == len({ucf101_class_text(n) for n in UCF101_CLASSES}) == 101
    assert len(HMDB51_CLASSES) == len({hmdb51_class_text(n) for n in HMDB51_CLASSES}) == 51


def _ucf101(root: Path, classes: list[str] | None = None, train: list[str] | None = None,
            test: list[str] | None = None) -> tuple[Path, Path]:
    """A small UCF101 download: classInd, split 1's lists, and the videos (HandstandPushups extracted as
    HandStandPushups, as some copies have it)."""
    splits = root / "ucfTrainTestlist"
    classes = classes or ["ApplyEyeMakeup", "HandstandPushups", "PlayingDaf", "YoYo"]
    _crlf(splits / "classInd.txt", [f"{i} {name}" for i, name in enumerate(classes, 1)])
    _crlf(splits / "trainlist01.txt", train if train is not None else [
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1", "HandstandPushups/v_HandStandPushups_g08_c01.avi 2",
        "YoYo/v_YoYo_g08_c01.avi 4", "YoYo/v_YoYo_g09_c01.avi 4"])
    _crlf(splits / "testlist01.txt", test if test is not None else [
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "HandstandPushups/v_HandStandPushups_g01_c01.avi",
        "PlayingDaf/v_PlayingDaf_g01_c01.avi"])
    videos = root / "UCF101"
    for rel in ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "HandStandPushups/v_HandStandPushups_g08_c01.avi",
                "YoYo/v_YoYo_g08_c01.avi", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
                "HandStandPushups/v_HandStandPushups_g01_c01.avi", "PlayingDaf/v_PlayingDaf_g01_c01.avi"):
        _touch(videos / rel)  # YoYo g09 is missing
    return videos, splits


def test_a_ucf101_split_becomes_train_val_and_labels(tmp_path, capsys) -> None:
    videos, splits = _ucf101(tmp_path)
    out = tmp_path / "data" / "ucf101"
    assert _import_split_1("ucf101", videos, splits, out, capsys) == [
        f"wrote {out / 'train.csv'}: 3 videos, 4 classes; labels {out / 'labels.json'}; 1 listed but missing "
        f"(e.g. {videos / 'YoYo/v_YoYo_g09_c01.avi'})",
        f"wrote {out / 'val.csv'}: 3 videos, 4 classes; labels {out / 'labels.json'}; 0 listed but missing"]
    assert json.loads((out / "labels.json").read_text()) == {
        "apply eye makeup": 0, "handstand pushups": 1, "playing daf": 2, "yo yo": 3}  # classInd's order
    # Paths as they are on disk (the folder's case found), relative to the manifest when the videos lie below it,
    # else absolute, as every importer writes them.
    assert _rows(out / "train.csv") == [
        (str(videos / "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"), "apply eye makeup"),
        (str(videos / "HandStandPushups/v_HandStandPushups_g08_c01.avi"), "handstand pushups"),
        (str(videos / "YoYo/v_YoYo_g08_c01.avi"), "yo yo")]
    labels = load_labels(str(out / "labels.json"))
    val = load_manifest(str(out / "val.csv"), labels)
    assert val.table.column("label").to_pylist() == [0, 1, 2]
    assert all(Path(p).is_file() for p in val.table.column("path").to_pylist())

    # Videos below the output folder stay relative; without --check every listed video is written, in its class
    # folder as spelt on disk (one listing of the video folder), and the summary says the files were not checked.
    assert main(["import", "ucf101", "--videos", str(videos), "--splits", str(splits), "--split", "1",
                 "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {tmp_path / 'train.csv'}: 4 videos, 4 classes; labels {tmp_path / 'labels.json'}; files not checked "
        f"(add --check)",
        f"wrote {tmp_path / 'val.csv'}: 3 videos, 4 classes; labels {tmp_path / 'labels.json'}; files not checked "
        f"(add --check)"]
    assert _rows(tmp_path / "train.csv")[1] == ("UCF101/HandStandPushups/v_HandStandPushups_g08_c01.avi",
                                                "handstand pushups")
    assert (tmp_path / _rows(tmp_path / "val.csv")[1][0]).is_file()


def test_a_second_split_reuses_the_folders_label_file_and_another_dataset_is_refused(tmp_path, capsys) -> None:
    videos, splits = _ucf101(tmp_path)
    for n in (2, 3):
        (splits / f"trainlist0{n}.txt").write_bytes((splits / "trainlist01.txt").read_bytes())
        (splits / f"testlist0{n}.txt").write_bytes((splits / "testlist01.txt").read_bytes())
    out = tmp_path / "ucf101"
    import_ucf101(videos, splits, 1, out)
    before = (out / "labels.json").read_text()
    import_ucf101(videos, splits, 3, out)
    assert (out / "labels.json").read_text() == before
    hmdb_splits = tmp_path / "testTrainMulti_7030_splits"
    _crlf(hmdb_splits / "brush_hair_test_split1.txt", ["a.avi 1 ", "b.avi 2 "])
    err = _cli_error(["import", "hmdb51", "--videos", str(tmp_path / "hmdb51_org"), "--splits", str(hmdb_splits),
                      "--split", "1", "--out", str(out)], capsys)
    assert f"{out / 'labels.json'} (written by an earlier import into this folder) holds other classes" in err
    assert "import into another folder" in err
    assert (out / "labels.json").read_text() == before


def test_ucf101_split_files_that_cannot_be_used_are_refused_naming_file_and_line(tmp_path, capsys) -> None:
    def refused(**lists: list[str]) -> str:
        root = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        videos, splits = _ucf101(root, **lists)
        err = _cli_error(["import", "ucf101", "--videos", str(videos), "--splits", str(splits), "--split", "1",
                          "--out", str(root / "out")], capsys)
        assert not (root / "out").exists(), "nothing is written by a refused import"
        return err.replace(str(splits) + "/", "")

    err = refused(train=["YoYo/v_YoYo_g08_c01.avi 4", "YoYo/v_YoYo_g09_c01.avi 102"])
    assert "trainlist01.txt, line 2: class index '102' is not in" in err and "classInd.txt (1..4)" in err
    err = refused(test=["YoYo/v_YoYo_g01_c01.avi", "Juggling/v_Juggling_g01_c01.avi"])
    assert "testlist01.txt, line 2: folder 'Juggling' of Juggling/v_Juggling_g01_c01.avi is not a class of" in err
    err = refused(train=["YoYo/v_YoYo_g08_c01.avi 4 extra"])
    assert "trainlist01.txt, line 1: expected '<Class>/<video>.avi <class index>'" in err
    assert "(too many fields)" in err
    err = refused(test=["YoYo/v_YoYo_g01_c01.avi 4"])
    assert "testlist01.txt, line 1: expected '<Class>/<video>.avi'" in err and "(too many fields)" in err
    err = refused(train=["YoYo/v_YoYo_g08_c01.avi 1"])
    assert "trainlist01.txt, line 1: YoYo/v_YoYo_g08_c01.avi is in folder 'YoYo', but class 1 is 'ApplyEyeMakeup'" \
        in err
    err = refused(train=["YoYo/v_YoYo_g08_c01.avi 4", "YoYo/v_YoYo_g01_c01.avi 4"],
                  test=["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "YoYo/v_YoYo_g01_c01.avi"])
    assert ("testlist01.txt, line 2: YoYo/v_YoYo_g01_c01.avi is both train and test in this split (also "
            "trainlist01.txt, line 2)") in err
    err = refused(classes=["YoYo", "Yo_Yo"], train=["YoYo/v_YoYo_g08_c01.avi 1"], test=["Yo_Yo/v_Yo_Yo_g01.avi"])
    assert "classInd.txt: classes 'YoYo' and 'Yo_Yo' both read 'yo yo'" in err

    videos, splits = _ucf101(tmp_path / "split2")
    args = ["import", "ucf101", "--videos", str(videos), "--splits", str(splits), "--out", str(tmp_path / "o")]
    err = _cli_error([*args, "--split", "2"], capsys)
    assert f"split folder (--splits) {splits} has no trainlist02.txt (split 2's training list)" in err
    assert "ucfTrainTestlist" in err
    err = _cli_error([*args, "--split", "4"], capsys)
    assert "--split 4: UCF101 has the official splits 1, 2 and 3" in err
    err = _cli_error([*args[:4], "--splits", str(tmp_path / "split2"), "--out", str(tmp_path / "o"), "--split", "1"],
                     capsys)
    assert f"has no classInd.txt (the class list) (did you mean --splits {splits}?)" in err
    err = _cli_error([*args, "--split", "1", "--check", "--videos", str(tmp_path / "nope")], capsys)
    assert f"video folder (--videos) {tmp_path / 'nope'} is not a folder" in err
    err = _cli_error([*args, "--split", "1", "--check", "--videos", str(tmp_path / "split2")], capsys)
    example = tmp_path / "split2" / "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"
    assert (f"none of the 4 train videos of the UCF101 split files is below video folder (--videos) "
            f"{tmp_path / 'split2'} (e.g. {example})") in err
    assert not (tmp_path / "o").exists()


def _hmdb51(root: Path, files: dict[str, list[str]] | None = None) -> tuple[Path, Path]:
    """A small HMDB51 download: split files of three classes (lines with their trailing space, CRLF) and videos."""
    splits = root / "testTrainMulti_7030_splits"
    files = files if files is not None else {
        "fall_floor_test_split1.txt": ["Fall_down_floor_f_cm_np1_ri_med_0.avi 1 ", "fall_f_cm_np1_le_bad_1.avi 2 ",
                                       "unused_fall_0.avi 0 "],
        "brush_hair_test_split1.txt": ["April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 ",
                                       "Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0.avi 2 "],
        "ride_bike_test_split1.txt": ["Bike_ride_ride_bike_f_cm_np1_ba_med_0.avi 2 ", "missing_ride_bike.avi 1 "],
        "fall_floor_test_split2.txt": ["Fall_down_floor_f_cm_np1_ri_med_0.avi 2 "]}
    for name, lines in files.items():
        _crlf(splits / name, lines)
    videos = root / "hmdb51_org"
    for rel in ("fall_floor/Fall_down_floor_f_cm_np1_ri_med_0.avi", "fall_floor/fall_f_cm_np1_le_bad_1.avi",
                "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
                "brush_hair/Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0.avi",
                "ride_bike/Bike_ride_ride_bike_f_cm_np1_ba_med_0.avi"):
        _touch(videos / rel)
    return videos, splits


def test_an_hmdb51_split_becomes_train_val_and_labels(tmp_path, capsys) -> None:
    videos, splits = _hmdb51(tmp_path)
    out = tmp_path / "data" / "hmdb51"
    assert _import_split_1("hmdb51", videos, splits, out, capsys) == [
        f"wrote {out / 'train.csv'}: 2 videos, 3 classes; labels {out / 'labels.json'}; 1 listed but missing "
        f"(e.g. {videos / 'ride_bike/missing_ride_bike.avi'})",
        f"wrote {out / 'val.csv'}: 3 videos, 3 classes; labels {out / 'labels.json'}; 0 listed but missing"]
    assert json.loads((out / "labels.json").read_text()) == {"brush hair": 0, "fall floor": 1, "ride bike": 2}
    assert _rows(out / "train.csv") == [
        (str(videos / "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi"), "brush hair"),
        (str(videos / "fall_floor/Fall_down_floor_f_cm_np1_ri_med_0.avi"), "fall floor")]
    assert [label for _, label in _rows(out / "val.csv")] == ["brush hair", "fall floor", "ride bike"]
    load_manifest(str(out / "val.csv"), load_labels(str(out / "labels.json")))
    # Split 2 is another split file of the same class: only fall_floor has one here, so split 2 is refused.
    err = _cli_error(["import", "hmdb51", "--videos", str(videos), "--splits", str(splits), "--split", "2",
                      "--out", str(tmp_path / "o")], capsys)
    assert (f"split folder (--splits) {splits} lacks split 2's file of 2 of its 3 classes: "
            f"brush_hair_test_split2.txt, ride_bike_test_split2.txt") in err
    assert "testTrainMulti_7030_splits" in err


def test_hmdb51_split_files_that_cannot_be_used_are_refused_naming_file_and_line(tmp_path, capsys) -> None:
    def refused(files: dict[str, list[str]]) -> str:
        root = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        videos, splits = _hmdb51(root, files)
        err = _cli_error(["import", "hmdb51", "--videos", str(videos), "--splits", str(splits), "--split", "1",
                          "--out", str(root / "out")], capsys)
        assert not (root / "out").exists(), "nothing is written by a refused import"
        return err.replace(str(splits) + "/", "")

    err = refused({"fall_floor_test_split1.txt": ["a.avi 1 ", "b.avi 3 "]})
    assert "fall_floor_test_split1.txt, line 2: tag '3' of b.avi is not 0 (not in this split), 1 (train) or 2" in err
    err = refused({"fall_floor_test_split1.txt": ["a.avi 1 ", "b.avi 2 x "]})
    assert "fall_floor_test_split1.txt, line 2: expected '<video>.avi <tag>'" in err and "(too many fields)" in err
    err = refused({"fall_floor_test_split1.txt": ["a.avi 1 ", "b.avi 2 ", "a.avi 2 "]})
    assert ("fall_floor_test_split1.txt, line 3: fall_floor/a.avi is both train and test in this split (also "
            "fall_floor_test_split1.txt, line 1)") in err
    err = refused({"fall_floor_test_split1.txt": ["a.avi 1 ", "a.avi 0 "]})
    assert "line 2: fall_floor/a.avi is both train and not used (tag 0) in this split" in err
    err = refused({"fall_floor_test_split1.txt": ["a.avi 1 "], "Fall_Floor_test_split1.txt": ["b.avi 2 "]})
    assert "classes 'Fall_Floor' and 'fall_floor' both read 'fall floor'" in err
    err = refused({"fall_floor_test_split1.txt": ["a.avi 1 "]})
    assert "the HMDB51 split files list no val videos" in err
    err = refused({"README.txt": ["not a split file"]})
    assert "holds no <class>_test_split<N>.txt files" in err
    with pytest.raises(ValueError, match="--split 0: HMDB51 has the official splits 1, 2 and 3"):
        import_hmdb51(tmp_path / "nope", tmp_path / "nope", 0, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match=r"split folder \(--splits\) .*nope is not a folder"):
        import_hmdb51(tmp_path / "nope", tmp_path / "nope", 1, tmp_path / "o")
