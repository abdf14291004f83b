"""Kinetics-710 assembly and the SSV2 / list importers, on small annotation files written by the tests."""

from __future__ import annotations

import csv
import json

import pytest

from workflows.data.importers import import_list, import_ssv2
from workflows.data.kinetics import (
    KINETICS_CLASSES_FILE,
    alias_resolver,
    alias_table,
    assemble_k710,
    builtin_k710_aliases,
    display_class_name,
    normalize_class_name,
)
from workflows.data.manifest import load_labels, load_manifest


def _ids(n: int, prefix: str) -> list[str]:
    return [f"{prefix}{i:0{11 - len(prefix)}d}" for i in range(n)]


def _write_csv(path, rows, with_label: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow((["label"] if with_label else []) + ["youtube_id", "time_start", "time_end", "split"])
        for label, yid, split in rows:
            w.writerow(([label] if with_label else []) + [yid, 10, 20, split])


def test_normalize_class_name_merges_release_spellings() -> None:
    variants = ["passing American football (in game)", "passing_american_football_(in_game)",
                "Passing American Football In Game", ' "passing american football  (in game)" ']
    assert {normalize_class_name(v) for v in variants} == {"passing american football in game"}
    assert normalize_class_name("tossing coin") != normalize_class_name("tossing salad")


def test_display_names_keep_apostrophes_while_matching_ignores_them(tmp_path) -> None:
    """The display name is the prompt CLIP reads: "massaging person's head", never "massaging persons head"; only
    the cross-release matching key drops punctuation."""
    assert display_class_name("massaging_person's_head") == "massaging person's head"
    assert display_class_name('  "juggling"   balls ') == "juggling balls"  # double quotes go, as the authors do
    assert display_class_name("\u201cdancing\u201d") == "dancing"
    assert normalize_class_name("massaging person's head") == normalize_class_name("Massaging persons head")
    classes = {"k400": ["massaging persons head", "abseiling"], "k700": ["massaging_person's_head", "abseiling"]}
    report = assemble_k710(_release_csvs(tmp_path, classes), None, tmp_path / "k710")
    labels = load_labels(str(tmp_path / "k710" / "labels.json"))
    assert sorted(labels) == ["abseiling", "massaging person's head"] and report.classes == 2


def test_k710_dedups_removes_val_leaks_and_counts_missing(tmp_path) -> None:
    t4, t6, t7 = _ids(4, "a"), _ids(4, "b"), _ids(3, "c")
    v4, v7, test7 = "v4000000000", "v7000000000", "t7000000000"
    ann = tmp_path / "ann"
    _write_csv(ann / "k400" / "train.csv", [("abseiling", t4[0], "train"), ("passing American football (in game)",
               t4[1], "train"), ("abseiling", t4[2], "train"), ("abseiling", t4[3], "train"),
                                            ("abseiling", v7, "train")])  # v7 leaks into K700's val
    _write_csv(ann / "k400" / "validate.csv", [("abseiling", v4, "val")])
    _write_csv(ann / "k600" / "train.csv", [("Abseiling", t4[0], "train"),  # duplicate of a K400 video
                                            ("passing_American_football_(in_game)", t6[0], "train"),
                                            ("abseiling", v4, "train"),  # leak: K400 val
                                            ("Tossing 'coin'", t6[1], "train"), ("abseiling", t6[2], "train"),
                                            ("abseiling", t6[3], "train")])
    _write_csv(ann / "k700" / "train.csv", [("tossing coin", t7[0], "train"), ("tossing coin", t6[1], "train"),
                                            ("juggling", t7[1], "train"), ("juggling", test7, "train"),
                                            ("juggling", t7[2], "train")])
    _write_csv(ann / "k700" / "validate.csv", [("juggling", v7, "val")])
    _write_csv(ann / "k700" / "test.csv", [("", test7, "test")], with_label=False)
    videos = tmp_path / "clips"
    videos.mkdir()
    on_disk = [*t4, *t6[:3], *t7, v4, v7]  # t6[3] listed but never downloaded
    for yid in on_disk:
        sub = videos / yid[0]
        sub.mkdir(exist_ok=True)
        (sub / f"{yid}_000010_000020.mp4").write_bytes(b"x")
    csvs = [(rel, p) for rel in ("k400", "k600", "k700") for p in sorted((ann / rel).glob("*.csv"))]
    report = assemble_k710(csvs, videos, tmp_path / "k710")

    labels = load_labels(str(tmp_path / "k710" / "labels.json"))
    assert sorted(labels) == ["abseiling", "juggling", "passing American football (in game)", "tossing coin"]
    train = load_manifest(str(tmp_path / "k710" / "train.csv"), labels)
    val = load_manifest(str(tmp_path / "k710" / "val.csv"), labels)
    train_ids = {p.rsplit("/", 1)[-1][:11] for p in train.table.column("path").to_pylist()}
    expected = set(t4) | set(t6[:3]) | set(t7)  # union, de-duplicated, leaks and the missing file removed
    assert train_ids == expected
    assert {v4, v7, test7}.isdisjoint(train_ids)
    assert {p.rsplit("/", 1)[-1][:11] for p in val.table.column("path").to_pylist()} == {v4, v7}
    assert report.duplicates_removed == 2  # t4[0] in K600, t6[1] in K700
    assert report.val_leaks_removed == 3  # v7 (K400 train), v4 (K600 train), test7 (K700 train)
    assert report.missing_train == 1 and report.missing_val == 0 and report.missing_examples == [t6[3]]
    assert (report.train_videos, report.val_videos, report.classes) == (len(expected), 2, 4)
    names = dict(zip(train.table.column("path").to_pylist(), train.table.column("label_name").to_pylist(),
                     strict=True))
    assert names[str(videos / "b" / f"{t6[0]}_000010_000020.mp4")] == "passing American football (in game)"
    assert json.loads((tmp_path / "k710" / "k710_report.json").read_text())["val_leaks_removed"] == 3
    # The videos are not below the manifests' folder: absolute paths, said
    assert report.summary().splitlines()[-1] == (
        f"note: the videos are not below {tmp_path / 'k710'}/, so the manifests name them by absolute paths: fine "
        f"on this machine and a shared disk, but `data upload` needs them below it")


def _release_csvs(tmp_path, classes: dict[str, list[str]]) -> list[tuple[str, object]]:
    """One official-format train CSV per release with one video per class (distinct YouTube ids)."""
    out = []
    for n, (rel, names) in enumerate(classes.items()):
        path = tmp_path / "ann" / rel / "train.csv"
        _write_csv(path, [(name, f"{'xyz'[n]}{i:010d}", "train") for i, name in enumerate(names)])
        out.append((rel, path))
    return out


def test_k710_merges_classes_renamed_between_releases(tmp_path) -> None:
    classes = {
        "k400": ["dying hair", "tying tie", "throwing ball", "picking fruit", "hugging", "balloon blowing",
                 "skiing (not slalom or crosscountry)", "abseiling"],
        "k600": ["dyeing hair", "tying necktie", "throwing ball (not baseball or American football)", "picking fruit",
                 "hugging (not baby)", "inflating balloons", "abseiling"],
        "k700": ["dyeing hair", "tying necktie", "throwing ball (not baseball or American football)", "picking apples",
                 "hugging (not baby)", "inflating balloons", "skiing mono", "abseiling"],
    }
    canonical = sorted(classes["k700"])
    report = assemble_k710(_release_csvs(tmp_path, classes), None, tmp_path / "k710")
    labels = load_labels(str(tmp_path / "k710" / "labels.json"))
    assert sorted(labels) == canonical and report.classes == len(canonical)  # display names: K700's spelling
    assert not any(report.classes_in_one_release.values())
    assert report.aliases_used["dying hair"] == "dyeing hair"
    assert report.aliases_used["picking fruit"] == "picking apples"  # K400 and K600 name
    assert report.aliases_used["throwing ball"] == "throwing ball (not baseball or American football)"
    assert "renamed classes merged (7)" in report.summary()
    train = load_manifest(str(tmp_path / "k710" / "train.csv"), labels)
    assert len(train) == sum(map(len, classes.values()))

    # Without the built-in table the renamed pairs stay apart, as before.
    plain = assemble_k710(_release_csvs(tmp_path, classes), None, tmp_path / "plain", builtin_aliases=False)
    assert plain.classes == 15 and plain.aliases_used == {}  # 8 K400 names + 5 new in K600 + 2 new in K700
    # User aliases extend and override the built-in table (a self-map undoes a built-in merge).
    user = assemble_k710(_release_csvs(tmp_path, classes), None, tmp_path / "user",
                         aliases={"hugging": "hugging", "Abseiling": "rappelling", "rappelling": "rope descent"})
    user_labels = load_labels(str(tmp_path / "user" / "labels.json"))
    assert "hugging" in user_labels and "hugging (not baby)" in user_labels and user.classes == len(canonical) + 1
    assert user.aliases_used["abseiling"] == "abseiling"  # merged into key "rope descent", no release spells it
    assert alias_resolver({"Abseiling": "rappelling", "rappelling": "rope descent"})["abseiling"] == "rope descent"
    with pytest.raises(ValueError, match="cycle"):
        alias_resolver({"dyeing hair": "dying hair"})  # reversing a built-in pair needs both directions overridden
    assert alias_table({"about": "notes", "aliases": {"a": "b"}}) == {"a": "b"}  # the shipped file's layout


def test_k710_official_class_lists_union_is_710_classes(tmp_path) -> None:
    """The three official class lists merge into exactly UniFormerV2's 710 K710 classes, each release class onto
    the K710 class UniFormerV2's own index maps say (kinetics_classes.json: lists, maps and their sources)."""
    ref = json.loads(KINETICS_CLASSES_FILE.read_text())
    lists = {rel: ref[rel] for rel in ("k400", "k600", "k700")}
    assert [len(v) for v in lists.values()] == [400, 600, 700] and len(ref["k710"]) == 710
    alias = alias_resolver()

    def key(name: str) -> str:
        return alias.get(normalize_class_name(name), normalize_class_name(name))

    for rel, names in lists.items():
        index = ref["k710_index"][rel]
        assert [key(n) for n in names] == [key(ref["k710"][i]) for i in index], rel
    report = assemble_k710(_release_csvs(tmp_path, lists), None, tmp_path / "k710")
    labels = load_labels(str(tmp_path / "k710" / "labels.json"))
    assert report.classes == len(labels) == 710
    assert {key(n) for n in labels} == {key(n) for n in ref["k710"]}
    assert sorted(report.aliases_used) == sorted(builtin_k710_aliases())  # every built-in alias is needed
    plain = assemble_k710(_release_csvs(tmp_path, lists), None, tmp_path / "plain", builtin_aliases=False)
    assert plain.classes == 724  # spelling rules alone leave the 14 renamed pairs apart


def test_import_ssv2_and_plain_lists(tmp_path) -> None:
    (tmp_path / "videos").mkdir()
    for vid in ("11", "12"):
        (tmp_path / "videos" / f"{vid}.webm").write_bytes(b"x")
    (tmp_path / "labels.json").write_text(json.dumps({"Pushing something from left to right": "0",
                                                      "Pushing something from right to left": "1"}))
    (tmp_path / "train.json").write_text(json.dumps([
        {"id": "11", "template": "Pushing [something] from left to right", "label": "pushing a cup ..."},
        {"id": "12", "template": "Pushing [something] from right to left"},
        {"id": "13", "template": "Pushing [something] from right to left"}]))
    report = import_ssv2(tmp_path / "train.json", tmp_path / "labels.json", tmp_path / "videos",
                         tmp_path / "out" / "train.csv")
    assert (report.videos, report.missing, report.missing_examples) == (2, 1, ["13"])
    m = load_manifest(str(tmp_path / "out" / "train.csv"), load_labels(str(tmp_path / "out" / "labels.json")))
    assert m.table.column("label").to_pylist() == [0, 1]
    assert m.table.column("path").to_pylist()[0] == str(tmp_path / "videos" / "11.webm")

    (tmp_path / "k400_train_list.txt").write_text("abseiling/a.mp4 0\njuggling/b.mp4 1\n\njuggling/c.mp4 1\n")
    (tmp_path / "k400_labels.json").write_text(json.dumps({"abseiling": 0, "juggling": 1}))
    report = import_list(tmp_path / "k400_train_list.txt", tmp_path / "k400" / "train.csv",
                         root=tmp_path / "k400_videos", labels=tmp_path / "k400_labels.json")
    assert report.videos == 3
    m = load_manifest(str(tmp_path / "k400" / "train.csv"), load_labels(str(tmp_path / "k400" / "labels.json")))
    assert m.table.column("label_name").to_pylist() == ["abseiling", "juggling", "juggling"]
    assert m.table.column("path").to_pylist()[0] == str(tmp_path / "k400_videos" / "abseiling" / "a.mp4")


def _cli_error(argv: list[str], capsys) -> str:
    """The one-line error of a data tool that must refuse its input (exit code 2, no traceback)."""
    from workflows.data.cli import main

    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_k710_cli_refuses_bad_inputs_naming_the_file_or_option(tmp_path, capsys) -> None:
    t4 = _ids(2, "a")
    _write_csv(tmp_path / "k400" / "train.csv", [("abseiling", t4[0], "train"), ("juggling", t4[1], "train")])
    _write_csv(tmp_path / "k400" / "empty.csv", [])
    csv_ok = f"k400:{tmp_path / 'k400' / 'train.csv'}"
    out = str(tmp_path / "k710")
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "unrelated.mp4").write_bytes(b"x")
    (tmp_path / "bad_aliases.json").write_text('{"a": }')
    err = _cli_error(["k710", "--csv", csv_ok, "--videos", str(tmp_path / "nope"), "--out", out], capsys)
    assert f"--videos {tmp_path / 'nope'} is not a folder" in err
    err = _cli_error(["k710", "--csv", csv_ok, "--videos", str(tmp_path / "clips"), "--out", out], capsys)
    assert f"none of the 2 videos the CSVs list was found under --videos {tmp_path / 'clips'}" in err
    assert "<id>_<start:06d>_<end:06d>.<ext>" in err and "--keep-missing" in err
    err = _cli_error(["k710", "--csv", f"k400:{tmp_path / 'k400' / 'empty.csv'}", "--out", out], capsys)
    assert f"{tmp_path / 'k400' / 'empty.csv'} has a header but no rows" in err
    err = _cli_error(["k710", "--csv", f"k900:{tmp_path / 'k400' / 'train.csv'}", "--out", out], capsys)
    assert "unknown Kinetics release 'k900'" in err and "valid releases: k400, k600, k700" in err
    err = _cli_error(["k710", "--csv", csv_ok, "--aliases", str(tmp_path / "bad_aliases.json"), "--out", out], capsys)
    assert f"--aliases file {tmp_path / 'bad_aliases.json'} is not valid JSON" in err
    err = _cli_error(["k710", "--csv", csv_ok, "--aliases", str(tmp_path / "nope.json"), "--out", out], capsys)
    assert f"--aliases file {tmp_path / 'nope.json'} does not exist" in err
    err = _cli_error(["k710", "--csv", f"k400:{tmp_path / 'nope.csv'}", "--out", out], capsys)
    assert f"Kinetics annotation CSV {tmp_path / 'nope.csv'} does not exist" in err
    assert not (tmp_path / "k710").exists()  # nothing written by a refused run
    # Clips still to be downloaded: --keep-missing accepts a folder that does not exist yet.
    report = assemble_k710([("k400", tmp_path / "k400" / "train.csv")], tmp_path / "later", tmp_path / "k710",
                           keep_missing=True)
    assert report.train_videos == 2


def test_import_cli_refuses_bad_inputs_naming_the_file_or_option(tmp_path, capsys) -> None:
    (tmp_path / "videos").mkdir()
    (tmp_path / "labels.json").write_text(json.dumps({"Pushing something from left to right": "0"}))
    (tmp_path / "train.json").write_text(json.dumps([{"id": "11",
                                                      "template": "Pushing [something] from left to right"}]))
    (tmp_path / "bad.json").write_text('[{"id": "11", template: 1}]')
    ssv2 = ["import", "ssv2", "--labels", str(tmp_path / "labels.json"), "--out", str(tmp_path / "out" / "train.csv")]
    err = _cli_error([*ssv2, "--annotations", str(tmp_path / "bad.json"), "--videos", str(tmp_path / "videos")], capsys)
    assert f"annotations file (--annotations) {tmp_path / 'bad.json'} is not valid JSON" in err
    err = _cli_error([*ssv2, "--annotations", str(tmp_path / "nope.json"), "--videos", str(tmp_path / "videos")],
                     capsys)
    assert f"annotations file (--annotations) {tmp_path / 'nope.json'} does not exist" in err
    err = _cli_error([*ssv2, "--annotations", str(tmp_path / "train.json"), "--videos", str(tmp_path / "nope")], capsys)
    assert f"video folder (--videos) {tmp_path / 'nope'} is not a folder" in err
    err = _cli_error([*ssv2, "--annotations", str(tmp_path / "train.json"), "--videos", str(tmp_path / "videos")],
                     capsys)
    assert "none of the 1 videos" in err and "<id>.webm and <id>.mp4" in err
    assert not (tmp_path / "out").exists()

    (tmp_path / "list.txt").write_text("a/x.mp4 jump\nb/y.mp4 run\n")
    lst = ["import", "list", "--out", str(tmp_path / "l" / "m.csv")]
    err = _cli_error([*lst, "--list", str(tmp_path / "nope.txt")], capsys)
    assert f"list file (--list) {tmp_path / 'nope.txt'} does not exist" in err
    err = _cli_error([*lst, "--list", str(tmp_path / "list.txt"), "--root", str(tmp_path / "nope"), "--check"], capsys)
    assert f"--root {tmp_path / 'nope'} is not a folder" in err
    err = _cli_error([*lst, "--list", str(tmp_path / "list.txt"), "--check"], capsys)
    assert "none of the 2 files listed" in err and "relative to the list file's folder" in err
    assert not (tmp_path / "l").exists()


def test_one_release_keeps_its_own_class_names(tmp_path, capsys) -> None:
    """`data kinetics`: K400 from its official CSVs, as the K400 recipes read it: its own 400 class names (among
    them "dying hair", which K710 merges into K700's "dyeing hair"), its validation videos, a report named for the
    release, and a refusal naming `data k710` for CSVs of several releases."""
    from workflows.data.cli import main

    names = json.loads(KINETICS_CLASSES_FILE.read_text())["k400"]
    train, val = tmp_path / "k400" / "train.csv", tmp_path / "k400" / "validate.csv"
    _write_csv(train, [(name, f"t{i:010d}", "train") for i, name in enumerate(names)])
    _write_csv(val, [(name, f"v{i:010d}", "validate") for i, name in enumerate(names[:50])])
    out = tmp_path / "data" / "k400"
    assert main(["kinetics", "--csv", f"k400:{train}", "--csv", str(val), "--out", str(out), "--keep-missing"]) == 0
    said = capsys.readouterr().out
    assert said.startswith("K400: 400 train / 50 val videos, 400 classes"), said
    labels = load_labels(str(out / "labels.json"))
    assert sorted(labels) == sorted(display_class_name(n) for n in names) and "dying hair" in labels
    assert len(load_manifest(str(out / "val.csv"), labels)) == 50 and (out / "k400_report.json").is_file()
    k700 = tmp_path / "k700" / "train.csv"
    _write_csv(k700, [("dyeing hair", "k0000000001", "train")])
    assert main(["kinetics", "--csv", str(train), "--csv", str(k700), "--out", str(tmp_path / "x")]) == 2
    assert "`data kinetics` reads one release's CSVs, got k400, k700; the union of several releases is `data k710`" \
        in capsys.readouterr().err


def test_every_importer_takes_check_and_no_check() -> None:
    """`ssv2` checked by default and took only --no-check, the others only --check: each takes both now, with its
    default unchanged (ssv2 checks unless told not to; list, ucf101 and hmdb51 when told to)."""
    from workflows.data.cli import build_parser

    common = {"ssv2": ["--annotations", "a", "--labels", "l", "--videos", "v", "--out", "o.csv"],
              "list": ["--list", "l.txt", "--out", "o.csv"],
              "ucf101": ["--videos", "v", "--splits", "s", "--split", "1", "--out", "o"],
              "hmdb51": ["--videos", "v", "--splits", "s", "--split", "1", "--out", "o"]}
    for name, args in common.items():
        parse = build_parser().parse_args
        assert parse(["import", name, *args, "--check"]).check is True
        assert parse(["import", name, *args, "--no-check"]).check is False
        assert parse(["import", name, *args]).check is (name == "ssv2")
