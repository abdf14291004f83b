"""`data import predictions` (workflows/data/pseudo_labels.py): a `predict --ray` job's rows, written by the job's
own tables in either format, become a manifest and label file that the training loader reads; rows are left out by
--min-prob and --per-class and counted; what cannot become a manifest is refused, saying why."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from workflows.data.cli import main as data_main

NAMES = ["walk", "run", "jump"]


def _job(out: Path, fmt: str, top: int, paths: list[str], starts: list[float], probs: list[list[float] | None],
         labels_file: bool = True) -> None:
    """A finished `predict --ray` job in `out`, written by its own code (job.json, labels.json, its table)."""
    from workflows.batch_predict import Collector, Rows, job_tables
    from workflows.data.manifest import save_labels

    out.mkdir(parents=True)
    rows = Rows(paths, starts, [s + 1.0 if not math.isnan(s) else math.nan for s in starts])
    (out / "job.json").write_text(json.dumps({"format": fmt, "top": top, "num_classes": len(NAMES), "rows": len(rows)}))
    if labels_file:
        save_labels({name: i for i, name in enumerate(NAMES)}, out / "labels.json")
    collector = Collector(rows, list(range(len(rows))), 1, job_tables(out, fmt, NAMES, top))
    read = [i for i, p in enumerate(probs) if p is not None]
    collector.add(np.array(read), np.log(np.array([probs[i] for i in read])))
    collector.finish({i: "corrupt: not a video" for i, p in enumerate(probs) if p is None})


@pytest.mark.parametrize(("fmt", "top"), [("csv", 2), ("parquet", 2), ("parquet", 3)])
def test_confident_rows_become_a_manifest_the_loader_reads(tmp_path, capsys, fmt, top):
    from workflows.data.manifest import load_labels, load_manifest

    videos = tmp_path / "videos"
    paths = [str(videos / f"{i}.mp4") for i in range(6)]
    nan = math.nan
    _job(tmp_path / "job", fmt, top, paths, [nan, nan, 5.0, nan, nan, nan],
         [[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], None, [0.95, 0.03, 0.02], [0.4, 0.3, 0.3]])
    out = tmp_path / "pseudo"
    assert data_main(["import", "predictions", "--predictions", str(tmp_path / "job"), "--out", str(out),
                      "--min-prob", "0.6", "--per-class", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}/train.csv: 3 of the job's 6 rows, labels {out}/labels.json (3 classes, 0 without a row)" \
        in printed
    assert "left out: 1 below --min-prob 0.6, 1 over --per-class, 1 the job could not read" in printed
    assert "\nrows: " in printed and "fewest" not in printed  # 3 classes: one list, not the same one twice
    labels = load_labels(str(out / "labels.json"))
    assert labels == {"walk": 0, "run": 1, "jump": 2}  # the job's whole label set, in its order
    manifest = load_manifest(str(out / "train.csv"), labels)
    table = manifest.table.to_pylist()
    # walk: the more confident of rows 0 and 4; run: row 1; jump: row 2, a clip keeping its window
    assert [(Path(r["path"]).name, r["label"]) for r in table] == [("1.mp4", 1), ("2.mp4", 2), ("4.mp4", 0)]
    assert [(r["start"], r["end"]) for r in table][1] == (5.0, 6.0)
    assert math.isnan(table[0]["start"])
    assert "videos/1.mp4" in (out / "train.csv").read_text()  # relative to the manifest: the dataset can move


def test_what_cannot_become_a_manifest_is_refused_saying_why(tmp_path, capsys):
    nan = math.nan
    _job(tmp_path / "old", "csv", 2, ["/v/a.mp4"], [nan], [[0.9, 0.05, 0.05]], labels_file=False)
    assert data_main(["import", "predictions", "--predictions", str(tmp_path / "old"), "--out",
                      str(tmp_path / "o")]) == 2
    assert "the predictions do not say their label set (a job from before labels.json was written): give " \
           "--labels" in capsys.readouterr().err
    _job(tmp_path / "meta", "parquet", 2, ["/v/a.mp4"], [nan], [[0.9, 0.05, 0.05]], labels_file=False)
    assert data_main(["import", "predictions", "--predictions", str(tmp_path / "meta"), "--out",
                      str(tmp_path / "m")]) == 0  # a Parquet job records its label set in its parts
    assert json.loads((tmp_path / "m" / "labels.json").read_text()) == {name: i for i, name in enumerate(NAMES)}
    (tmp_path / "three.json").write_text(json.dumps({name: i for i, name in enumerate(NAMES)}))
    assert data_main(["import", "predictions", "--predictions", str(tmp_path / "old"), "--out",
                      str(tmp_path / "o"), "--labels", str(tmp_path / "three.json")]) == 0
    assert "1 of the job's 1 rows, labels " in (printed := capsys.readouterr().out)
    assert "(3 classes, 2 without a row: run, jump)" in printed  # named: the classes the fine-tune will not see
    secret = "s3://AK:REDACTED@bucket/v/a.mp4"
    _job(tmp_path / "redacted", "parquet", 2, [secret], [nan], [[0.9, 0.05, 0.05]])
    assert data_main(["import", "predictions", "--predictions", str(tmp_path / "redacted"), "--out",
                      str(tmp_path / "r")]) == 2
    assert f"row 0 names {secret}: the job wrote its URI with the credentials replaced" in capsys.readouterr().err
    for flags, says in ((["--min-prob", "1.5"], "--min-prob must be a probability between 0 and 1, got 1.5"),
                        (["--per-class", "0"], "--per-class must be >= 1, got 0"),
                        (["--min-prob", "0.99"], "no row has a most probable class at --min-prob 0.99 or above")):
        assert data_main(["import", "predictions", "--predictions", str(tmp_path / "old"), "--out",
                          str(tmp_path / "o2"), "--labels", str(tmp_path / "three.json"), *flags]) == 2
        assert says in capsys.readouterr().err
    assert data_main(["import", "predictions", "--predictions", str(tmp_path / "none"), "--out",
                      str(tmp_path / "o3")]) == 2
    assert "is not a folder: give the --out of a `predict --ray` job" in capsys.readouterr().err
