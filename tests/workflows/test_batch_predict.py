"""`workflows predict --ray` (workflows.batch_predict): a corpus scored on Ray into predictions.csv, on real mp4
files and the tiny checkpoint of `run_dir`, checked against `predict` on this machine; a job that was stopped, or
whose driver was SIGKILLed, continues where it stopped."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.workflows.conftest import GOOD_VIDEOS
from workflows.predict import main as predict_main

N = len(GOOD_VIDEOS)
REPO = Path(__file__).resolve().parents[2]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _top(row: dict[str, str]) -> list[tuple[str, float]]:
    return [(row[f"class_{k}"], float(row[f"prob_{k}"])) for k in range(1, 6) if row.get(f"class_{k}")]


def _assert_same_top(row: dict[str, str], expected: list[tuple[str, float]], rel: float = 1e-3) -> None:
    got = _top(row)
    assert [name for name, _ in got] == [name for name, _ in expected], row["path"]
    assert [p for _, p in got] == pytest.approx([p for _, p in expected], rel=rel, abs=2e-6), row["path"]


def test_flags_that_need_ray_say_so_and_a_foreign_folder_is_refused(run_dir: Path, video_dir: Path, tmp_path: Path,
                                                                      capsys) -> None:
    """Before any Ray work: --out without --ray, --ray without --out, --device with --ray, and an --out that holds
    a predictions.csv this command did not write."""
    video = str(video_dir / "clips" / "wide.mp4")
    assert predict_main(["--checkpoint", str(run_dir), video, "--out", str(tmp_path / "o")]) == 2
    assert "--out needs --ray" in capsys.readouterr().err
    assert predict_main(["--checkpoint", str(run_dir), video, "--ray"]) == 2
    assert "--ray needs --out" in capsys.readouterr().err
    assert predict_main(["--checkpoint", str(run_dir), video, "--ray", "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "--device is for predict on this machine" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "predictions.csv").write_text("path,label\n")
    assert predict_main(["--checkpoint", str(run_dir), video, "--ray", "--out", str(foreign)]) == 2
    assert "that `predict --ray` did not write" in capsys.readouterr().err
    assert predict_main(["--checkpoint", str(run_dir), "--ray", "--out", str(tmp_path / "none")]) == 2
    assert "nothing to predict" in capsys.readouterr().err
    assert predict_main(["--checkpoint", str(run_dir), video, "--mlflow"]) == 2
    assert "--mlflow needs --ray and --out" in capsys.readouterr().err
    assert predict_main(["--checkpoint", str(run_dir), video, "--top", "0"]) == 2
    assert "--top must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_main(["--checkpoint", str(run_dir), video, "--top", "most"])
    assert "a number of classes or 'all', not 'most'" in capsys.readouterr().err


@pytest.mark.integration
def test_predict_on_ray_scores_as_predict_here_and_lists_what_could_not_be_read(ray_local, run_dir: Path,
                                                                                video_dir: Path, tmp_path: Path,
                                                                                capsys, monkeypatch) -> None:
    """A manifest (its labels ignored) with good and unreadable videos: every row written once, the good ones with
    the top classes `predict` gives on this machine for the same views x crops, the others with why; --mlflow: the
    job recorded in the store (where its rows are as an absolute path, though --out was given relative)."""
    from mlflow import MlflowClient

    from workflows.inference import load_predictor
    from workflows.predict import predict_video

    out, store = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    rc = predict_main(["--ray", "--checkpoint", str(run_dir), "--manifest", str(video_dir / "bad.csv"), "--views", "2",
                       "--crops", "3", "--out", "out", "--json", "--set", "data.max_bad_fraction=1.0", "--set",
                       f"mlflow.tracking_uri={store}", "--mlflow"])
    captured = capsys.readouterr()
    assert rc == 1, captured.err  # some videos could not be read
    result = json.loads(captured.out)
    rows = _rows(out / "predictions.csv")
    assert sorted(int(r["video_index"]) for r in rows) == list(range(N + 4))
    assert {Path(r["path"]).name: r["dropped"].split(":")[0] for r in rows if r["dropped"]} == \
        {"missing.mp4": "missing", "empty.mp4": "empty", "truncated.mp4": "truncated", "random.mp4": "corrupt"}
    assert result["predicted"] == N and result["dropped_total"] == 4 and result["files"] == 0
    assert "4 could not be read" in captured.err
    model, recipe, names = load_predictor(str(run_dir))
    for row in (r for r in rows if not r["dropped"]):
        _assert_same_top(row, predict_video(model, recipe, names, row["path"], views=2, crops=3, top=5))
    assert not (out / "file_predictions.csv").exists()
    job = json.loads((out / "job.json").read_text())
    assert (job["views"], job["crops"], job["step"], job["rows"]) == (2, 3, 2, N + 4)
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(result["mlflow_run_id"])
    assert (run.info.run_name, run.info.status, run.data.tags["dist.kind"]) == ("predict-evaltest", "FINISHED",
                                                                                  "predict")
    assert run.data.tags["dist.predictions"] == str(out)
    assert {k: run.data.params[k] for k in ("views", "crops", "rows", "step", "inputs")} == {
        "views": "2", "crops": "3", "rows": str(N + 4), "step": "2", "inputs": str(video_dir / "bad.csv")}
    assert (run.data.metrics["predict_predicted"], run.data.metrics["predict_dropped_total"]) == (N, 4)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "prediction")] == ["prediction/job.json"]


@pytest.mark.integration
def test_a_job_whose_pipeline_ends_early_says_so_and_continues(ray_local, run_dir: Path, video_dir: Path,
                                                               tmp_path: Path, capsys, monkeypatch) -> None:
    """A pipeline that ends before one video came out (a filter standing in for an execution that stopped early
    without an error) is not a finished job: exit 1 naming the count, the rows written kept, and the same command
    scores the row that was left."""
    import workflows.data.pipeline as pipeline

    args = ["--ray", "--checkpoint", str(run_dir), "--manifest", str(video_dir / "good.csv"), "--out",
            str(tmp_path / "out"), "--views", "1", "--crops", "1"]
    real = pipeline.build_clip_dataset
    monkeypatch.setattr(pipeline, "build_clip_dataset",
                        lambda *a, **k: real(*a, **k).filter(lambda row: row["video_index"] != 1))
    rc = predict_main(args)
    err = capsys.readouterr().err
    assert rc == 1 and f"the scoring ended before 1 of the {N} videos were scored or counted as dropped" in err, err
    assert sorted(int(r["video_index"]) for r in _rows(tmp_path / "out" / "predictions.csv")) == \
        [i for i in range(N) if i != 1]
    monkeypatch.setattr(pipeline, "build_clip_dataset", real)
    assert predict_main(args) == 0, capsys.readouterr().err
    assert sorted(int(r["video_index"]) for r in _rows(tmp_path / "out" / "predictions.csv")) == list(range(N))


@pytest.mark.integration
def test_a_stopped_job_continues_and_another_job_is_refused(ray_local, run_dir: Path, video_dir: Path,
                                                            tmp_path: Path, capsys) -> None:
    """The same command after a stop scores only what is not written: a cut last line and the videos that could not
    be read are scored again; the result is the uninterrupted one. The bad-video limit is over the whole job: 3 of
    its 8 videos are unreadable, under 0.4, though they are 3 of the 6 scored again. Other settings into the same
    folder are refused, naming what changed."""
    out = tmp_path / "out"
    args = ["--ray", "--checkpoint", str(run_dir), str(video_dir / "clips"), "--out", str(out), "--views", "2",
            "--set", "data.max_bad_fraction=0.4"]
    assert predict_main(args) == 1  # the folder holds three unreadable files
    capsys.readouterr()
    first = {r["video_index"]: r for r in _rows(out / "predictions.csv")}
    assert len(first) == N + 3
    # As a stop leaves it: a few rows written, one of them a video that could not be read, the last line cut.
    scored = [i for i, r in first.items() if not r["dropped"]]
    unreadable = next(i for i, r in first.items() if r["dropped"])
    lines = (out / "predictions.csv").read_text().splitlines(keepends=True)
    by_index = {line.split(",", 1)[0]: line for line in lines[1:]}
    cut = by_index[scored[2]]
    (out / "predictions.csv").write_text(lines[0] + by_index[scored[0]] + by_index[scored[1]] + by_index[unreadable]
                                         + cut[: len(cut) // 2])
    assert predict_main(args) == 1
    captured = capsys.readouterr()
    assert f"continuing: 2 written before, {N + 1} to go" in captured.out
    again = _rows(out / "predictions.csv")
    assert sorted(int(r["video_index"]) for r in again) == list(range(N + 3))  # each row once
    for row in again:
        before = first[row["video_index"]]
        assert row["dropped"].split(":")[0] == before["dropped"].split(":")[0]
        if not row["dropped"]:
            _assert_same_top(row, _top(before), rel=1e-5)
    # Another job into the same folder: refused before any work, naming what changed.
    assert predict_main([*args[:-3], "3", *args[-2:]]) == 2
    assert "holds the predictions of another job (views 2 then, 3 now)" in capsys.readouterr().err
    assert predict_main([*args, "--format", "parquet"]) == 2
    assert "holds the predictions of another job (format 'csv' then, 'parquet' now)" in capsys.readouterr().err
    assert len(_rows(out / "predictions.csv")) == N + 3


@pytest.mark.integration
def test_long_files_are_scored_per_clip_and_as_the_mean_of_their_clips(ray_local, run_dir: Path, video_dir: Path,
                                                                       tmp_path: Path, capsys) -> None:
    """--clip-seconds: a 2.33 s video as two 1 s clips and one file row (the mean of the clips' probabilities), the
    answer `predict --clip-seconds` gives on this machine; a video shorter than a clip is one row, and no file row.
    --top all: every row lists each of the 5 classes once, their probabilities summing to 1."""
    clips = video_dir / "clips"
    mid, tall = str(clips / "mid.mp4"), str(clips / "tall.mp4")  # 2.33 s, 0.8 s
    out = tmp_path / "out"
    assert predict_main(["--ray", "--checkpoint", str(run_dir), mid, tall, "--clip-seconds", "1", "--top", "all",
                         "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "shorter than --clip-seconds 1" in captured.out
    assert json.loads((out / "job.json").read_text())["top"] == 5
    rows = sorted(_rows(out / "predictions.csv"), key=lambda r: int(r["video_index"]))
    for row in [*rows, *_rows(out / "file_predictions.csv")]:
        assert "class_6" not in row and len({name for name, _ in _top(row)}) == 5, row
        assert sum(p for _, p in _top(row)) == pytest.approx(1, abs=1e-5), row
    assert [(r["path"], r["start"], r["end"]) for r in rows] == [(mid, "0.167", "1.167"), (mid, "1.167", "2.167"),
                                                                 (tall, "", "")]
    (whole,) = _rows(out / "file_predictions.csv")
    assert (whole["path"], whole["clips"], whole["read_clips"], whole["dropped"]) == (mid, "2", "2", "")
    mean = {name: sum(dict(_top(r))[name] for r in rows[:2]) / 2 for name, _ in _top(rows[0])}
    assert dict(_top(whole)) == pytest.approx(mean, abs=2e-6)
    assert predict_main(["--checkpoint", str(run_dir), mid, "--clip-seconds", "1", "--json"]) == 0
    (here,) = json.loads(capsys.readouterr().out)
    _assert_same_top(whole, [(t["class"], t["prob"]) for t in here["top"]])


@pytest.mark.integration
def test_a_job_whose_driver_is_stopped_or_killed_continues_where_it_stopped(ray_local, run_dir: Path,
                                                                            video_dir: Path, tmp_path: Path,
                                                                            capsys) -> None:
    """Real signals to the driver (a separate process on the same Ray cluster) while rows are being written: SIGTERM
    (`ray job stop`) ends it as Ctrl-C does (exit 143, saying the rows are kept), SIGKILL mid-write; the same command
    run again writes the rest, and every video is in predictions.csv exactly once."""
    videos = tmp_path / "many"
    videos.mkdir()
    names = list(GOOD_VIDEOS)
    total = 160
    for i in range(total):
        (videos / f"v{i:03d}.mp4").symlink_to(video_dir / "clips" / f"{names[i % N]}.mp4")
    out = tmp_path / "out"
    args = ["--ray", "--checkpoint", str(run_dir), str(videos), "--out", str(out), "--views", "8"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    predictions = out / "predictions.csv"

    def lines() -> int:
        return predictions.read_text().count("\n") if predictions.exists() else 0

    def signal_once_writing(sig: int) -> tuple[int, str]:
        """Start the driver, send `sig` once it has written a row more than there are; (exit status, output)."""
        log = tmp_path / f"driver-{sig}.log"
        before = max(lines(), 1)  # the header at least
        with log.open("w") as f:
            driver = subprocess.Popen([sys.executable, "-m", "workflows", "predict", *args], cwd=REPO, env=env,
                                      stdout=f, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and driver.poll() is None and lines() <= before:
                time.sleep(0.05)
            assert driver.poll() is None, f"the job ended before the signal:\n{log.read_text()}"
            driver.send_signal(sig)
            return driver.wait(timeout=120), log.read_text()

    status, output = signal_once_writing(signal.SIGTERM)
    assert status == 143, output
    assert f"interrupted by SIGTERM (ray job stop, or the scheduler): the rows written so far are kept in {out}" \
        in output
    stopped = lines() - 1  # complete rows: a line cut by the kill is not one
    status, output = signal_once_writing(signal.SIGKILL)
    assert status == -signal.SIGKILL, output
    assert "continuing: " in output
    killed = lines() - 1
    assert 0 < stopped < killed < total
    assert predict_main(args) == 0
    captured = capsys.readouterr()
    assert f"continuing: {killed} written before" in captured.out and f"{total} predicted" in captured.out
    indices = [int(r["video_index"]) for r in _rows(predictions)]
    assert sorted(indices) == list(range(total))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_continuing_keeps_whole_files_only_and_never_writes_a_credential(tmp_path: Path, monkeypatch,
                                                                         fmt: str) -> None:
    """What an earlier run left, row by row, in either format: a file's clips are kept only with its file row (else
    all of them are scored again), a video that could not be read is scored again, what a kill cut (a CSV's last
    line, a Parquet part not yet renamed) is dropped; only the Parquet parts that lost rows are rewritten. Paths are
    written with a URI's credentials replaced, and a rotated credential is the same job."""
    from workflows import prediction_tables
    from workflows.batch_predict import Collector, Rows, continue_job, job_tables

    monkeypatch.setattr(prediction_tables, "PART_ROWS", 2)  # Parquet: a part per add() below
    secret = "s3://bucket/v/{}.mp4?endpoint_override=127.0.0.1:9000&secret_key=TOPSECRET"
    nan = float("nan")
    rows = Rows([secret.format("long"), secret.format("long"), secret.format("other"), secret.format("long2"),
                 secret.format("long2"), secret.format("bad")],
                [0.0, 10.0, nan, 0.0, 10.0, nan], [10.0, 20.0, nan, 10.0, 20.0, nan])
    identity = {"rows_digest": rows.digest(), "format": fmt}
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.json").write_text(json.dumps(identity))
    tables = job_tables(out, fmt, ["a", "b", "c"], top=2)
    assert continue_job(out, identity, rows, tables) == (set(), [])  # a job.json without rows yet
    pushed: list[list[str]] = []
    collector = Collector(rows, list(range(len(rows))), 1, tables,
                          push=lambda names: pushed.append(list(names)) or True)
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2]]))
    collector.add(np.array([0, 1]), logits[:2])  # long's two clips
    collector.add(np.array([2, 3]), logits[2:])  # other, and one of long2's two clips
    collector.finish({5: "corrupt: not a video"})
    predictions, files = tables
    paths = predictions.columns(["path"])["path"] + files.columns(["path"])["path"]
    assert all("TOPSECRET" not in path for path in paths) and set(paths) >= set(rows.shown)
    whole = files.columns(["path", "clips", "read_clips"])
    assert whole == {"path": [rows.shown[0]], "clips": [2], "read_clips": [2]} if fmt == "parquet" else \
        {"path": [rows.shown[0]], "clips": ["2"], "read_clips": ["2"]}
    assert predictions.columns(["dropped"])["dropped"] == ["", "", "", "", "corrupt: not a video"]
    assert predictions.columns(["class_1"])["class_1"] == ["a", "b", "c", "a", ""]
    if fmt == "csv":
        assert _top(_rows(out / "file_predictions.csv")[0]) == [("b", pytest.approx(0.45)), ("a", pytest.approx(0.4))]
        text = (out / "predictions.csv").read_text()
        (out / "predictions.csv").write_text(text + "4,s3://bucket/v/lon")  # a row cut by a kill
        assert pushed == []  # the CSV is uploaded every PUSH_S, and at the end
    else:
        import pyarrow.parquet as pq

        part = pq.read_table(out / "file_predictions" / "part-00000.parquet").to_pylist()[0]
        assert part["classes"] == ["b", "a"] and part["probs"] == pytest.approx([0.45, 0.4])
        assert [p.name for p in predictions.parts()] == ["part-00000.parquet", "part-00001.parquet",
                                                         "part-00002.parquet"]
        (out / "predictions" / ".part-00003.parquet.partial").write_bytes(b"PAR1 cut by a kill")
        assert pushed == [["predictions/part-00000.parquet"], ["predictions/part-00001.parquet"]]  # each when written
        assert collector.unpushed == ["predictions/part-00002.parquet", "file_predictions/part-00000.parquet"]
        before = (out / "predictions" / "part-00000.parquet").stat().st_mtime_ns
    rotated = Rows([p.replace("TOPSECRET", "ROTATED") for p in rows.paths], rows.starts, rows.ends)
    assert rotated.digest() == rows.digest()
    tables = job_tables(out, fmt, ["a", "b", "c"], top=2)
    kept, rewritten = continue_job(out, identity, rotated, tables)
    assert kept == {0, 1, 2}  # long (with its file row) and other
    assert sorted(int(i) for i in tables[0].columns(["video_index"])["video_index"]) == [0, 1, 2]
    assert tables[1].columns(["path"])["path"] == [rows.shown[0]]
    if fmt == "csv":
        assert rewritten == ["predictions.csv", "file_predictions.csv"]
    else:  # the parts that lost rows (long2's lone clip; the unread video), to upload again
        assert rewritten == ["predictions/part-00001.parquet", "predictions/part-00002.parquet"]
        assert (out / "predictions" / "part-00000.parquet").stat().st_mtime_ns == before
        # The folder read whole, as users read it: the part a kill cut is hidden from the reader.
        assert sorted(pq.read_table(out / "predictions")["video_index"].to_pylist()) == [0, 1, 2]


def test_parquet_with_every_class_holds_the_distribution_as_one_vector(tmp_path: Path) -> None:
    """--format parquet --top all: `scores` is each row's probabilities in the label set's order (named in the
    schema's metadata), with class_1 and prob_1; an unread row has nulls there and says why."""
    import pyarrow.parquet as pq

    from workflows.batch_predict import Collector, Rows, job_tables

    names = ["walk", "run", "jump", "sit"]
    rows = Rows(["a.mp4", "b.mp4", "c.mp4"], [float("nan")] * 3, [float("nan")] * 3)
    tables = job_tables(tmp_path, "parquet", names, top=10**9)
    collector = Collector(rows, [0, 1, 2], 2, tables)
    logits = np.log(np.array([[0.1, 0.6, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1], [0.3, 0.4, 0.2, 0.1]]))
    collector.add(np.array([0, 2, 0]), logits)  # two views each of a.mp4, one of c.mp4 so far
    collector.finish({1: "corrupt: no video stream"})
    (part,) = sorted((tmp_path / "predictions").glob("*.parquet"))
    table = pq.read_table(part)
    assert json.loads(table.schema.metadata[b"dist.class_names"]) == names
    assert table.column_names == ["video_index", "path", "start", "end", "class_1", "prob_1", "scores", "dropped"]
    a, b = table.to_pylist()
    assert (a["video_index"], a["class_1"], a["start"], a["dropped"]) == (0, "run", None, None)
    assert a["scores"] == pytest.approx([0.2, 0.5, 0.2, 0.1]) and a["prob_1"] == pytest.approx(0.5)
    assert (b["video_index"], b["class_1"], b["prob_1"], b["scores"]) == (1, None, None, None)
    assert b["dropped"] == "corrupt: no video stream"
    assert collector.seen == {2: 1}  # c.mp4 waits for its second view
    assert tables[0].columns(["class_1", "dropped"]) == {"class_1": ["run", ""],  # as the summary reads them
                                                          "dropped": ["", "corrupt: no video stream"]}


@pytest.mark.integration
def test_results_into_a_bucket_are_pushed_continued_and_never_lost_to_an_outage(ray_local, run_dir: Path,
                                                                                video_dir: Path, tmp_path: Path,
                                                                                monkeypatch, capsys) -> None:
    """`--out s3://...` (moto behind a proxy that can fail): predict --ray of a bucket prefix (credentials in its URI,
    written nowhere) and evaluate land their files in the bucket; a job continues from what the bucket holds, as CSV
    and as Parquet parts; a push
    the bucket does not answer is said and the job goes on, and a last one that fails names the local folder holding
    the results."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.workflows.object_store import proxied_bucket
    from workflows import prediction_tables
    from workflows.data.video import StorageUnreachable
    from workflows.evaluate import main as evaluate_main
    from workflows.outputs import OutputFolder

    (tmp_path / "s3").mkdir()
    with proxied_bucket(tmp_path / "s3", "results") as (proxy, creds, client):
        for name, value in creds.env().items():
            monkeypatch.setenv(name, value)

        def read(key: str) -> str:
            return client.get_object(Bucket="results", Key=key)["Body"].read().decode()

        for name in GOOD_VIDEOS:
            client.put_object(Bucket="results", Key=f"videos/{name}.mp4",
                              Body=(video_dir / "clips" / f"{name}.mp4").read_bytes())
        # The videos named by a prefix whose URI carries the credentials (the Ray workers have no others here).
        host = creds.endpoint.removeprefix("http://")
        prefix = (f"s3://{creds.access_key}:{creds.secret_key}@results/videos?endpoint_override={host}&scheme=http"
                  f"&region={creds.region}")
        args = ["--ray", "--checkpoint", str(run_dir), prefix, "--views", "2", "--out", "s3://results/tags"]
        assert predict_main(args) == 0
        assert "s3://results/tags/predictions.csv" in capsys.readouterr().out
        rows = list(csv.DictReader(read("tags/predictions.csv").splitlines()))
        assert sorted(int(r["video_index"]) for r in rows) == list(range(N)) and not any(r["dropped"] for r in rows)
        assert all(r["path"].startswith("s3://") and "/videos/" in r["path"] for r in rows)
        assert json.loads(read("tags/job.json"))["rows"] == N
        assert creds.secret_key not in read("tags/predictions.csv") + read("tags/job.json")
        # Continued from the bucket (a new staging folder each run): the rows it lacks are scored, the rest kept.
        lines = read("tags/predictions.csv").splitlines(keepends=True)
        client.put_object(Bucket="results", Key="tags/predictions.csv", Body="".join(lines[:3]).encode())
        assert predict_main(args) == 0
        assert f"continuing: 2 written before, {N - 2} to go" in capsys.readouterr().out
        again = list(csv.DictReader(read("tags/predictions.csv").splitlines()))
        assert sorted(int(r["video_index"]) for r in again) == list(range(N))
        # --format parquet --top all: each part uploaded once written; the scores are the CSV's probabilities in
        # the label set's order; a part lost from the bucket is scored again.
        monkeypatch.setattr(prediction_tables, "PART_ROWS", 1)  # a part per row
        parquet = [*args[:-1], "s3://results/parquet", "--format", "parquet", "--top", "all"]
        assert predict_main(parquet) == 0
        assert "s3://results/parquet/predictions/" in capsys.readouterr().out

        def parts() -> dict[str, pa.Table]:
            listed = client.list_objects_v2(Bucket="results", Prefix="parquet/predictions/").get("Contents", [])
            return {o["Key"]: pq.read_table(io.BytesIO(client.get_object(Bucket="results", Key=o["Key"])["Body"]
                                                       .read())) for o in listed}

        written = parts()
        assert all(key.endswith(".parquet") for key in written)
        table = pa.concat_tables(written.values())
        assert sorted(table["video_index"].to_pylist()) == list(range(N))
        names = json.loads(table.schema.metadata[b"dist.class_names"])
        by_index = {int(r["video_index"]): dict(_top(r)) for r in again}
        for row in table.to_pylist():
            assert dict(zip(names, row["scores"], strict=True)) == pytest.approx(by_index[row["video_index"]],
                                                                                 abs=2e-6)
        assert len(written) == N  # a part per row
        lost, lost_rows = next((key, t.num_rows) for key, t in written.items())
        client.delete_object(Bucket="results", Key=lost)
        assert predict_main(parquet) == 0
        assert f"continuing: {N - lost_rows} written before, {lost_rows} to go" in capsys.readouterr().out
        assert sorted(pa.concat_tables(parts().values())["video_index"].to_pylist()) == list(range(N))
        # `data import predictions` reads the job from the bucket; these rows name their videos by a URI whose
        # credentials the job replaced, which no manifest can use: refused, saying so.
        from workflows.data.cli import main as data_main

        assert data_main(["import", "predictions", "--predictions", "s3://results/parquet", "--out",
                          str(tmp_path / "pseudo")]) == 2
        assert "the job wrote its URI with the credentials replaced" in capsys.readouterr().err
        # evaluate --out into the bucket: the same files as into a folder.
        assert evaluate_main(["--checkpoint", str(run_dir), "--manifest", str(video_dir / "good.csv"), "--views", "1",
                              "--out", "s3://results/eval", "--json", "--no-mlflow"]) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert metrics["out_dir"] == "s3://results/eval" and json.loads(read("eval/metrics.json"))["videos"] == N
        assert read("eval/predictions.csv").count("\n") == N + 1
        # The bucket not answering: a periodic push is said and skipped; the last one names where the results are.
        output = OutputFolder("s3://results/late")
        (output.local / "predictions.csv").write_text("video_index\n")
        proxy.outage(30)
        assert output.push_or_say(retry_s=1) is False
        assert "could not upload the results so far to s3://results/late" in capsys.readouterr().err
        with pytest.raises(StorageUnreachable, match=f"The results are in {output.local} on this machine"):
            output.finish(retry_s=1)
        assert (output.local / "predictions.csv").exists()  # kept; a finished push removes the staging folder


@pytest.mark.integration
def test_a_second_driver_into_the_same_folder_is_refused(ray_local, run_dir: Path, video_dir: Path, tmp_path: Path,
                                                         capsys) -> None:
    """While another driver on the cluster holds the output folder (a separate process, as a resubmitted job is),
    `predict --ray` into it is refused, naming that driver, and writes nothing."""
    out = tmp_path / "out"
    holder = ("import sys, time, ray; ray.init(address=sys.argv[1]); from workflows.run_lock import "
              "claim_run_directory; claim_run_directory(sys.argv[2], '--out'); print('claimed', flush=True); "
              "time.sleep(120)")
    other = subprocess.Popen([sys.executable, "-c", holder, ray_local.get_runtime_context().gcs_address,
                              str(out.absolute())], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout.readline().strip() == "claimed"
        assert predict_main(["--ray", "--checkpoint", str(run_dir), str(video_dir / "clips" / "wide.mp4"), "--out",
                             str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out.absolute()} is being written by a driver (pid {other.pid}" in err
        assert "a second driver would write the same predictions" in err
        assert not (out / "predictions.csv").exists()
    finally:
        other.kill()
        other.wait()


def test_long_csv_rows_get_a_note_pointing_at_parquet():
    """Before the job: a CSV of many classes per row (the distribution over a large label set) is pointed at
    --format parquet; a top 5, a small label set, or Parquet itself are not."""
    from workflows.batch_predict import csv_size_note

    assert csv_size_note("csv", 710, 710).startswith("note: a CSV row here lists 710 classes (every class) with "
                                                     "their probabilities, ~11 kB a row")
    assert "--format parquet" in csv_size_note("csv", 150, 710)
    assert csv_size_note("csv", 5, 710) is csv_size_note("csv", 5, 5) is csv_size_note("parquet", 710, 710) is None

