"""Manifests, label files and lists as people write them by hand or download them: byte-order marks, classes called
"NA", names that differ only in spaces or Unicode form, repeated rows, a repeated column, `~` paths, class names
with spaces in a `path label` list, a second import into the same folder. Each was silently misread or a raw
traceback before; now each loads right or fails naming the file, row and what to do."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflows.data.manifest import ManifestError, load_labels, load_manifest

NFD_CAFE = unicodedata.normalize("NFD", "café")


def _write(path: Path, text: str, encoding: str = "utf-8") -> str:
    path.write_text(text, encoding=encoding)
    return str(path)


def test_class_names_match_whatever_spaces_unicode_form_or_null_markers_they_were_written_with(tmp_path) -> None:
    labels = load_labels(_write(tmp_path / "labels.json", json.dumps({"NA": 0, "null": 1, "walking ": 2, NFD_CAFE: 3},
                                                                     ensure_ascii=False), "utf-8-sig"))  # with a BOM
    assert labels == {"NA": 0, "null": 1, "walking": 2, "café": 3}
    manifest = load_manifest(_write(tmp_path / "m.csv", f"path,label\na.mp4,NA\nb.mp4,null\nc.mp4,walking\n"
                                                         f"d.mp4,café\ne.mp4, {NFD_CAFE} \nf.mp4,²\n"), labels,
                             strict=False)
    assert manifest.table.column("label").to_pylist() == [0, 1, 2, 3, 3, -1]  # "²" is a name, not an index
    assert manifest.unknown_labels == {"²": [5]}
    with pytest.raises(ManifestError, match=r"labels.json: class 'run' appears twice \(indices 0 and 1\)"):
        load_labels(_write(tmp_path / "labels.json", '{"run": 0, "walk": 2, "run": 1}'))
    with pytest.raises(ManifestError, match="the same name once spaces and Unicode form are set aside"):
        load_labels(_write(tmp_path / "labels.json", json.dumps({"café": 0, NFD_CAFE: 1}, ensure_ascii=False)))


def test_repeated_rows_and_one_clip_with_two_labels_are_reported_not_silently_kept(tmp_path) -> None:
    labels = {"walking": 0, "running": 1}
    manifest = load_manifest(_write(tmp_path / "m.csv", "path,label,start,end\na.mp4,walking,,\nb.mp4,walking,0,2\n"
                                                         "b.mp4,running,2,4\na.mp4,walking,,\n./a.mp4,running,,\n"),
                             labels)
    assert manifest.repeated_rows == [(3, 0)] and manifest.label_conflicts == [(4, 0)]  # b's windows differ: fine
    warnings = manifest.duplicate_warnings()
    assert len(warnings) == 2 and "1 row(s) repeat an earlier row" in warnings[0] and "line 5 = line 2" in warnings[0]
    assert "name the same clip as an earlier row with another label: line 6 = line 2" in warnings[1]


@pytest.mark.parametrize("sep", [",", "\t"], ids=["csv", "tsv"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_errors_name_the_line_an_editor_shows(tmp_path, sep: str, newline: str) -> None:
    """Errors counted data rows ("row 1" was the line after the header, and blank lines were not counted): they
    now give the file's line, as an editor numbers it, for CSV and TSV, LF or CRLF, with blank lines anywhere (the
    header's too) and a quoted path that runs over two lines; a Parquet table has no lines and says "row N"."""
    labels = {"walking": 0, "running": 1}
    head = ["", "path,label,start,end", ""]  # a blank line before the header and after it: lines 1 and 3

    def manifest(*rows: str) -> str:
        text = newline.join(r.replace(",", sep) for r in head + list(rows)) + newline
        return _write(tmp_path / f"m.{'tsv' if sep == chr(9) else 'csv'}", text)

    ok = ["a.mp4,walking,,", "", "", "b.mp4,running,0,2"]  # lines 4 and 7
    for bad, line, message in ((",walking,,", 8, "empty path"),
                               ("c.mp4,walking,soon,", 8, "start='soon' is not a number of seconds"),
                               ("c.mp4,walking,-1,", 8, "start='-1' is negative"),
                               ("c.mp4,walking,3,2", 8, "start=3.0 is not before end=2.0")):
        with pytest.raises(ManifestError, match=rf", line {line}: {message}"):
            load_manifest(manifest(*ok, bad), labels)
    with pytest.raises(ManifestError, match=r"2 label\(s\) not in the label file \(2 classes\): 'jumping' \(lines 8, "
                                            r"10\); 'swimming' \(line 12\)"):
        load_manifest(manifest(*ok, "c.mp4,jumping,,", "", "d.mp4,jumping,,", "", "e.mp4,swimming,,"), labels)
    (tmp_path / "m.json").write_text('[{"path": "a.mp4", "label": "walking"}]')
    with pytest.raises(ManifestError, match=r"m.json is JSON, not a CSV/TSV or Parquet file of path,label"):
        load_manifest(str(tmp_path / "m.json"), labels)
    (tmp_path / "latin1.csv").write_bytes("path,label\na.mp4,walking\ncaf\u00e9.mp4,walking\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin1.csv is not UTF-8 text \(line 3: byte 0xe9; .*iconv -f "
                                            r"WINDOWS-1252 -t UTF-8 FILE > NEW"):
        load_manifest(str(tmp_path / "latin1.csv"), labels)
    with pytest.raises(ManifestError, match=r"'walkng' \(line 8; did you mean 'walking'\?\); 'Running' \(line 9; "
                                            r"did you mean 'running'\?\)"):
        load_manifest(manifest(*ok, "c.mp4,walkng,,", "d.mp4,Running,,"), labels)
    loaded = load_manifest(manifest('"x', 'y.mp4",walking,,', *ok, "a.mp4,walking,,", "", "a.mp4,running,,"),
                           labels)  # the quoted path runs over lines 4 and 5: the rows below move down one
    assert loaded.lines == [4, 6, 9, 10, 12] and loaded.where(2) == "line 9" and loaded.where([0, 1]) == "lines 4, 6"
    assert [w.rsplit(": ", 1)[1] for w in loaded.duplicate_warnings()] == ["line 10 = line 6", "line 12 = line 6"]
    with pytest.raises(ManifestError, match=r"cannot be read as CSV at line 8: CSV parse error: Expected 4 columns, "
                                            r"got 5"):
        load_manifest(manifest(*ok, "c.mp4,walking,,,"), labels)
    # Without a header the first video was taken for the column names ("lacks column(s) ['path', 'label']; it has
    # ['a.mp4', 'walking']", or a column '' twice): said so, with the fix.
    head = []
    for rows in (["a.mp4,walking", "b.mp4,running"], ok):
        with pytest.raises(ManifestError, match=r"has no header line: its first line names a video \('a.mp4'\), not "
                                                r"the columns; add the line path,label"):
            load_manifest(manifest(*rows), labels)
    # Parquet: no lines, so rows (1-based, no header), said as such.
    pq.write_table(pa.table({"path": ["a.mp4", "b.mp4", "c.mp4"], "label": ["walking", "jumping", "jumping"]}),
                   tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"'jumping' \(rows 2, 3\)"):
        load_manifest(str(tmp_path / "m.parquet"), labels)
    assert load_manifest(str(tmp_path / "m.parquet"), labels, strict=False).where(1) == "row 2"


def test_a_column_twice_home_paths_and_parquet_quirks(tmp_path, monkeypatch) -> None:
    with pytest.raises(ManifestError, match=r"has column\(s\) \['label'\] more than once"):
        load_manifest(_write(tmp_path / "m.csv", "path,label,label\na.mp4,walking,running\n"), {"walking": 0})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    manifest = load_manifest(_write(tmp_path / "m.csv", "path,label\n~/videos/a.mp4,walking\n"), {"walking": 0})
    assert manifest.table.column("path").to_pylist() == [str(tmp_path / "home" / "videos" / "a.mp4")]
    pq.write_table(pa.table({"path": pa.array([b"a.mp4"], pa.binary()), "label": [0]}), tmp_path / "M.PARQUET")
    manifest = load_manifest(str(tmp_path / "M.PARQUET"), {"walking": 0})  # upper-case suffix, bytes paths
    assert manifest.table.column("path").to_pylist() == [str(tmp_path / "a.mp4")]


def test_a_path_label_list_with_spaces_tabs_and_a_second_import(tmp_path) -> None:
    from workflows.data.importers import import_list

    out = tmp_path / "out"
    train = _write(tmp_path / "train.txt", "videos/a.mp4\tplaying guitar\nvideos/b c.mp4 walking\n", "utf-8-sig")
    import_list(train, out / "train.csv")
    assert load_labels(str(out / "labels.json")) == {"playing guitar": 0, "walking": 1}
    rows = load_manifest(str(out / "train.csv"), None).table.column("label_name").to_pylist()
    assert rows == ["playing guitar", "walking"]
    # The validation list of the same dataset, imported into the same folder, keeps train's indices.
    import_list(_write(tmp_path / "val.txt", "videos/c.mp4 walking\n"), out / "val.csv")
    assert load_labels(str(out / "labels.json")) == {"playing guitar": 0, "walking": 1}
    with pytest.raises(ValueError, match="class 'jumping' is not in .*labels.json \\(written by an earlier import"):
        import_list(_write(tmp_path / "test.txt", "videos/d.mp4 jumping\n"), out / "test.csv")
    with pytest.raises(ValueError, match=r"line 1: the path 'videos/a.mp4 playing' does not end in a video file name"):
        import_list(_write(tmp_path / "spaces.txt", "videos/a.mp4 playing guitar\n"), tmp_path / "o2" / "m.csv")
    with pytest.raises(ValueError, match=r"labels mix class indices \('0'\) and names \('walking'\)"):
        import_list(_write(tmp_path / "mixed.txt", "a.mp4 0\nb.mp4 walking\n"), tmp_path / "o3" / "m.csv")


def test_a_videos_symlink_to_shared_storage_stays_relative_in_an_imported_manifest(tmp_path) -> None:
    """`videos/` as a symlink to a mount elsewhere: the manifest keeps `videos/...` (relocatable, and accepted by
    `data upload`), not the mount's absolute paths."""
    from tests.workflows.conftest import index_frames
    from workflows.data.importers import import_list
    from workflows.data.sample import write_video
    from workflows.data.upload import check_manifests

    storage = tmp_path / "mnt" / "clips"
    write_video(storage / "a.mp4", index_frames(32, 32, 4))
    data = tmp_path / "data"
    data.mkdir()
    (data / "videos").symlink_to(storage, target_is_directory=True)
    import_list(_write(data / "train.txt", "videos/a.mp4 walking\n"), data / "train.csv", check_files=True)
    assert (data / "train.csv").read_text().splitlines()[1].startswith('"videos/a.mp4"')
    check_manifests(data)


def test_a_kinetics_csv_saved_with_a_byte_order_mark_keeps_its_labels(tmp_path) -> None:
    from workflows.data.kinetics import read_kinetics_csv

    rows = read_kinetics_csv(_write(tmp_path / "train.csv", "label,youtube_id,time_start,time_end,split\n"
                                                             "abseiling,abc123def45,0,10,train\n", "utf-8-sig"),
                             release="k400")
    assert [r.label for r in rows] == ["abseiling"]


def test_the_driver_warns_once_about_repeated_rows_and_probes_file_uri_rows(tmp_path, capsys) -> None:
    from workflows.data.sample import write_sample_dataset
    from workflows.data.shared_disk import check_videos_reachable
    from workflows.pretrain import validate_before_start
    from workflows.recipe import load_recipe

    sample_data = write_sample_dataset(tmp_path / "sample", videos_per_class=2, size=32, num_frames=8, workers=1)

    source = Path(sample_data.train_manifest)
    text = source.read_text()
    first_row = text.splitlines()[1]
    repeated = _write(source.parent / "repeated.csv", text + first_row + "\n")
    recipe = load_recipe(Path(__file__).parents[2] / "workflows/configs/smoke.yaml", [
        f"data.train_manifest={repeated}", f"data.val_manifest={sample_data.val_manifest}",
        f"data.labels={sample_data.labels}", "mlflow.enabled=false", f"run.storage_path={tmp_path / 'runs'}"])
    validate_before_start(recipe)
    validate_before_start(recipe)
    err = capsys.readouterr().err
    assert err.count("warning: data.train_manifest: manifest") == 1 and "1 row(s) repeat an earlier row" in err, err
    table = load_manifest(str(source), None).table  # file:/abs rows (one slash) are local files to probe
    uris = _write(tmp_path / "uris.csv", "path,label\n" + "".join(
        f"file:{path},{label}\n" for path, label in zip(table.column("path").to_pylist()[:2],
                                                         table.column("label_name").to_pylist()[:2], strict=True)))
    check_videos_reachable(load_manifest(uris, load_labels(sample_data.labels)), "data.train_manifest")


def test_a_spreadsheets_text_exports_tab_separated_read_utf16_named(tmp_path) -> None:
    """Excel's "Text (Tab delimited)" export is read (a path may hold spaces); its "Unicode Text" export, and a
    label file Notepad saved as "Unicode", are UTF-16: refused naming the encoding and the conversion, not a
    "column count" or "invalid start byte" error."""
    labels = _write(tmp_path / "labels.json", '{"cls 0": 0, "cls1": 1}')
    tsv = _write(tmp_path / "train.tsv", "path\tlabel\nclips/a b.mp4\tcls 0\nclips/c.mp4\tcls1\n")
    table = load_manifest(tsv, load_labels(labels)).table
    assert table.column("path").to_pylist() == [str(tmp_path / "clips" / "a b.mp4"), str(tmp_path / "clips" / "c.mp4")]
    assert table.column("label").to_pylist() == [0, 1]
    for path, loader in ((_write(tmp_path / "u16.txt", "path\tlabel\nclips/c.mp4\tcls1\n", "utf-16"),
                          lambda p: load_manifest(p, load_labels(labels))),
                         (_write(tmp_path / "u16.json", '{"cls1": 0}', "utf-16"), load_labels)):
        with pytest.raises(ManifestError, match=r"is UTF-16 text .*iconv -f UTF-16 -t UTF-8"):
            loader(path)
