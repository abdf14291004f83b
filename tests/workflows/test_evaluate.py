"""`workflows evaluate` (multi-view test on Ray), `workflows predict` (local) and the checkpoint loading they share
(`workflows.inference`), on real mp4 files written by the tests and a checkpoint written without a training run
(the tiny model, saved the way pretrain saves it)."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.workflows.conftest import CLASSES, GOOD_VIDEOS, SMOKE
from workflows.checkpoints import read_state, read_weights
from workflows.config_loader import ConfigError
from workflows.data.manifest import save_labels
from workflows.evaluate import EvalRequest, plan_evaluation
from workflows.evaluate import main as evaluate_main
from workflows.inference import build_eval_model, model_logits, read_checkpoint, resolve_labels
from workflows.predict import main as predict_main
from workflows.recipe import load_recipe, recipe_to_dict

N = len(GOOD_VIDEOS)


@pytest.fixture(scope="module")
def seven_labels(video_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another label set: the five test classes among seven, in another order."""
    path = tmp_path_factory.mktemp("labels") / "seven.json"
    names = ["jumping", "cls3", "cls0", "swimming", "cls4", "cls1", "cls2"]
    save_labels({name: i for i, name in enumerate(names)}, path)
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


# --- without Ray ----------------------------------------------------------------------------------------------


def test_clear_errors_before_any_ray_work(run_dir: Path, video_dir: Path, tmp_path: Path, capsys) -> None:
    assert evaluate_main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert evaluate_main(["--checkpoint", str(tmp_path / "empty")]) == 2
    assert "not a DiST checkpoint" in capsys.readouterr().err
    # A manifest label missing from the label file names the label and the fix.
    save_labels({"cls0": 0, "cls1": 1}, tmp_path / "two.json")
    assert evaluate_main(["--checkpoint", str(run_dir), "--labels", str(tmp_path / "two.json")]) == 2
    err = capsys.readouterr().err
    assert "'cls2'" in err and "--labels" in err
    # An architecture override the weights do not fit.
    with pytest.raises(ConfigError, match="do not fit"):
        plan_evaluation(EvalRequest(checkpoint=str(run_dir), overrides=["model.integration_dim=128"]))
    with pytest.raises(ConfigError, match="--checkpoint is required"):
        plan_evaluation(EvalRequest())
    with pytest.raises(ConfigError, match="unknown key"):
        plan_evaluation(EvalRequest(checkpoint=str(run_dir), overrides=["eval.nope=1"]))
    # An output folder that cannot be written fails here, not after every video was scored.
    (tmp_path / "a_file").write_text("x")
    assert evaluate_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "a_file")]) == 2
    assert "error: --out" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--out .*lies below the file"):
        plan_evaluation(EvalRequest(checkpoint=str(run_dir), out=str(tmp_path / "a_file" / "eval")))
    # A manifest moved away from its videos (relative paths): said here, as pretrain says it, not after the
    # decoders waited data.storage_retry_s for a disk that never went away.
    shutil.copy(video_dir / "good.csv", tmp_path / "moved.csv")
    assert evaluate_main(["--checkpoint", str(run_dir), "--manifest", str(tmp_path / "moved.csv")]) == 2
    assert "manifest " + str(tmp_path / "moved.csv") + ": none of the 5 videos checked exists (e.g. " in \
        capsys.readouterr().err


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting Ray fails the test: what it checks must be refused before any Ray work."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("workflows.runtime.ensure_ray", refuse)


def test_counts_below_one_are_refused_not_replaced_by_defaults(run_dir: Path, no_ray: None, capsys) -> None:
    """--views 0 / --actors 0 were taken as "the default", a negative --actors reached Ray."""
    for flag, value in (("--views", "0"), ("--actors", "0"), ("--actors", "-2"), ("--views", "-1")):
        assert evaluate_main(["--checkpoint", str(run_dir), flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag} must be >= 1 (got {value}); leave it out for the default" in err and "Traceback" not in err
    for request, message in ((EvalRequest(checkpoint=str(run_dir), views=0), "--views must be >= 1"),
                             (EvalRequest(checkpoint=str(run_dir), actors=0), "--actors must be >= 1"),
                             (EvalRequest(checkpoint=str(run_dir), crops=0), "--crops must be 1 .* or 3"),
                             (EvalRequest(checkpoint=str(run_dir), crops=2), "--crops must be 1 .* or 3")):
        with pytest.raises(ConfigError, match=message):
            plan_evaluation(request)
    plan = plan_evaluation(EvalRequest(checkpoint=str(run_dir), views=1, crops=3))
    assert (plan.views, plan.crops) == (1, 3)


def test_absurd_views_and_a_one_class_label_set_are_warned_once_before_any_work(run_dir: Path, video_dir: Path,
                                                                                  tmp_path: Path, no_ray: None,
                                                                                  capsys) -> None:
    """--views 1000 (or such a recipe eval.test_views) was accepted silently and took forever; a label set of one
    class (every video trivially at 100%) got no word either. Each is now one warning line, not an error."""
    assert plan_evaluation(EvalRequest(checkpoint=str(run_dir), views=32)).warnings == []
    (warning,) = plan_evaluation(EvalRequest(checkpoint=str(run_dir), views=1000, crops=3)).warnings
    assert warning.startswith("warning: --views 1000 scores 3000 clips of 8 frames per video, 333x the work of the "
                              "usual 3 views") and warning.endswith("Lower --views (left out: eval.test_views, 3)")
    (warning,) = plan_evaluation(EvalRequest(checkpoint=str(run_dir), overrides=["eval.test_views=100"])).warnings
    assert warning.startswith("warning: eval.test_views 100 scores 100 clips") and "--set eval.test_views=3" in warning
    save_labels({"cls0": 0}, tmp_path / "one.json")
    (tmp_path / "one.csv").write_text(f"path,label\n{video_dir / 'clips' / 'wide.mp4'},cls0\n")
    one_class = ["--checkpoint", str(run_dir), "--labels", str(tmp_path / "one.json"), "--manifest",
                 str(tmp_path / "one.csv")]
    (warning,) = plan_evaluation(EvalRequest(checkpoint=str(run_dir), labels=str(tmp_path / "one.json"),
                                             manifest=str(tmp_path / "one.csv"))).warnings
    assert warning == (f"warning: the label set ({tmp_path / 'one.json'}) has one class, 'cls0': every video gets it "
                       f"at 100%, so the scores tell nothing apart. Pass --labels with every class to tell apart")
    with pytest.raises(AssertionError, match="Ray was started"):  # printed once, before Ray starts
        evaluate_main([*one_class, "--views", "40", "--out", str(tmp_path / "out")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and warnings[0].startswith("warning: --views 40 scores 40 clips of 8 frames per video")
    assert warnings[1].startswith(f"warning: the label set ({tmp_path / 'one.json'}) has one class, 'cls0'")
    # predict: the same lines, once, before the first video; the videos are still classified (it is no error).
    video = str(video_dir / "clips" / "mid.mp4")
    assert predict_main(["--checkpoint", str(run_dir), video, video, "--views", "33", "--labels",
                         str(tmp_path / "one.json")]) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 3 and lines[0].startswith("[predict]") and out.count("cls0  100.0%") == 2
    assert lines[1].startswith("warning: --views 33 scores 33 clips of 8 frames per video, 11x the work")
    assert lines[1].endswith("Lower --views (left out: the recipe's eval.test_views, 3)")
    assert lines[2].startswith(f"warning: the label set ({tmp_path / 'one.json'}) has one class, 'cls0'")
    assert predict_main(["--checkpoint", str(run_dir), video]) == 0
    assert "warning" not in capsys.readouterr().err


def test_the_labels_hint_comes_only_with_labels_missing_from_the_label_set(run_dir: Path, tmp_path: Path,
                                                                            capsys) -> None:
    assert evaluate_main(["--checkpoint", str(run_dir), "--manifest", str(tmp_path / "nope.csv")]) == 2
    err = capsys.readouterr().err
    assert f"manifest {tmp_path / 'nope.csv'} does not exist" in err and "--labels" not in err
    (tmp_path / "rows.csv").write_text("path,label\na.mp4,cls0\nb.mp4,cls9\nc.mp4,cls9\n")
    assert evaluate_main(["--checkpoint", str(run_dir), "--manifest", str(tmp_path / "rows.csv")]) == 2
    err = capsys.readouterr().err
    assert f"1 label(s) not in the label set ({N} classes, from " in err and "'cls9' (lines 3, 4)" in err
    assert err.rstrip().endswith("Evaluate with a label file that names every class of the manifest (--labels)")


def test_a_corrupt_checkpoint_file_is_one_clear_error_in_evaluate_and_predict(run_dir: Path, video_dir: Path,
                                                                             tmp_path: Path, capsys) -> None:
    """A truncated or overwritten weights.safetensors, state.json or recipe.yaml: exit 2 with one line naming the
    file and the run's other checkpoints, not a SafetensorError / JSONDecodeError traceback."""
    run = shutil.copytree(run_dir, tmp_path / "run")
    weights = run / "checkpoint_000001" / "weights.safetensors"  # the newest: what the run directory resolves to
    weights.write_bytes(weights.read_bytes()[:1000])
    video = str(video_dir / "clips" / "mid.mp4")
    for main, args in ((evaluate_main, ["--checkpoint", str(run)]), (predict_main, ["--checkpoint", str(run), video])):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {weights} is corrupt or truncated (") and err.count("\n") == 1
        assert f"use another checkpoint of the run (in {run}: checkpoint_000000)" in err
    # Fetched from a bucket (file:// here, the same code path): named by its URI, not by the temporary copy.
    assert evaluate_main(["--checkpoint", (run / "checkpoint_000001").as_uri()]) == 2
    assert capsys.readouterr().err.startswith(f"error: {weights.as_uri()} is corrupt or truncated (")
    for name, text in (("state.json", '{"step": 2, "mod'), ("recipe.yaml", "train: [\n")):
        ckpt = _edited_copy(run_dir, tmp_path / name)
        (ckpt / name).write_text(text)
        for main, args in ((evaluate_main, ["--checkpoint", str(ckpt)]),
                           (predict_main, ["--checkpoint", str(ckpt), video])):
            assert main(args) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {ckpt / name} is corrupt or truncated (") and err.count("\n") == 1


def test_plan_uses_the_checkpoint_model_and_latest_step(run_dir: Path, seven_labels: Path) -> None:
    plan = plan_evaluation(EvalRequest(checkpoint=str(run_dir)))
    assert plan.checkpoint == run_dir / "checkpoint_000001" and plan.state["step"] == 2
    assert plan.class_names == CLASSES and (plan.views, plan.crops, plan.mode) == (3, 1, "dist")
    swapped = plan_evaluation(EvalRequest(checkpoint=str(run_dir), labels=str(seven_labels), zero_shot_fusion=True))
    assert len(swapped.class_names) == 7 and swapped.mode == "fusion"


def test_the_default_output_folder_outlives_the_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    """The default --out was <checkpoint>/eval-<time>: once the run trained on, its checkpoint retention deleted the
    checkpoint and the evaluation in it. A run's checkpoint_* (what a run directory resolves to) is now evaluated
    into <run dir>/evals/<checkpoint>-eval-<time>; a checkpoint folder of its own keeps <checkpoint>/eval-<time>."""
    run = shutil.copytree(run_dir, tmp_path / "run")
    for given, evaluated in ((run, "checkpoint_000001"), (run / "checkpoint_000000", "checkpoint_000000")):
        out = plan_evaluation(EvalRequest(checkpoint=str(given))).out_dir
        assert out.parent == run / "evals" and out.name.startswith(f"{evaluated}-eval-") and out.is_dir()
    (out / "metrics.json").write_text("{}")
    shutil.rmtree(run / "checkpoint_000000")  # what retention does to a checkpoint no longer kept
    assert (out / "metrics.json").exists()
    alone = shutil.copytree(run / "checkpoint_000001", tmp_path / "mine")
    out = plan_evaluation(EvalRequest(checkpoint=str(alone))).out_dir
    assert out.parent == alone and out.name.startswith("eval-")


def test_an_output_folder_that_cannot_be_written_fails_before_any_scoring(run_dir: Path, tmp_path: Path,
                                                                          no_ray: None, monkeypatch, capsys) -> None:
    """The check asked os.access, which says yes to root everywhere: `--out /proc/x` passed it and failed once every
    video was scored. The folder is now made and a file written and deleted in it first; a failure names the folder
    and the OS error, and the folders it made are removed again."""
    import errno
    import os

    from workflows import outputs

    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)  # what root is told, whoever runs the test
    if Path("/proc/self").exists():  # Linux: no one can make a folder in /proc
        assert evaluate_main(["--checkpoint", str(run_dir), "--out", "/proc/dist-eval-out"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out /proc/dist-eval-out cannot be written here ([Errno ") and \
            err.rstrip().endswith("give a folder you can write") and err.count("\n") == 1
        assert not Path("/proc/dist-eval-out").exists()

    def read_only(path: Path) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    write_probe = outputs.write_probe
    monkeypatch.setattr(outputs, "write_probe", read_only)
    with pytest.raises(ConfigError, match=rf"^--out {tmp_path}/new/out cannot be written here \(\[Errno 30\] "
                                          r"Read-only file system: "):
        plan_evaluation(EvalRequest(checkpoint=str(run_dir), out=str(tmp_path / "new" / "out")))
    assert list(tmp_path.iterdir()) == []  # new/ and new/out, which the check made, removed again
    monkeypatch.setattr(outputs, "write_probe", write_probe)
    plan = plan_evaluation(EvalRequest(checkpoint=str(run_dir), out=str(tmp_path / "new" / "out")))
    assert plan.out_dir.is_dir() and list(plan.out_dir.iterdir()) == []  # made, the probe file gone


def test_an_earlier_evaluation_or_a_checkpoint_is_never_written_over(run_dir: Path, tmp_path: Path, no_ray: None,
                                                                     capsys) -> None:
    """`evaluate --out X` into X holding an earlier evaluation wrote over it silently: refused before any work,
    naming what is there; `--overwrite` replaces those files, nothing else, and only once the new evaluation is
    written: one that fails on the way leaves the earlier one as it was. A checkpoint or run directory is refused
    even with --overwrite (its recipe.yaml would be replaced)."""
    from workflows.evaluate import OUTPUT_FILES

    out = tmp_path / "out"
    out.mkdir()
    for name in ("metrics.json", "clips.csv", "notes.txt"):
        (out / name).write_text(name)
    assert evaluate_main(["--checkpoint", str(run_dir), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: --out {out} holds an earlier evaluation (metrics.json, clips.csv): " \
        "choose another --out, or remove those files or pass --overwrite to replace it (only those files are " \
        "removed)\n"
    assert sorted(p.name for p in out.iterdir()) == ["clips.csv", "metrics.json", "notes.txt"]
    aside = out / f".replaced-{os.getpid()}"
    plan = plan_evaluation(EvalRequest(checkpoint=str(run_dir), out=str(out), overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == [aside.name, "notes.txt"]
    (out / "metrics.json").write_text("new")  # the new evaluation fails after writing part of its files
    plan.output.restore(OUTPUT_FILES)
    assert {p.name: p.read_text() for p in out.iterdir()} == {n: n for n in ("metrics.json", "clips.csv", "notes.txt")}
    plan = plan_evaluation(EvalRequest(checkpoint=str(run_dir), out=str(out), overwrite=True))
    (out / "metrics.json").write_text("new")  # the new evaluation written (without --clip-seconds: no clips.csv)
    plan.output.finish()
    assert {p.name: p.read_text() for p in out.iterdir()} == {"metrics.json": "new", "notes.txt": "notes.txt"}
    for folder, holds in ((run_dir / "checkpoint_000001", "state.json, weights.safetensors"),
                          (run_dir, "checkpoint_000000, checkpoint_000001")):
        recipe = (folder / "recipe.yaml").read_bytes() if (folder / "recipe.yaml").exists() else None
        assert evaluate_main(["--checkpoint", str(run_dir), "--out", str(folder), "--overwrite"]) == 2
        assert capsys.readouterr().err == f"error: --out {folder} is a checkpoint or run directory (it holds " \
            f"{holds}): the evaluation's files would mix with its own; choose another --out\n"
        assert (folder / "recipe.yaml").read_bytes() == recipe if recipe is not None else \
            not (folder / "recipe.yaml").exists()


def test_an_earlier_evaluation_in_a_bucket_prefix_is_refused_or_replaced(tmp_path: Path, monkeypatch) -> None:
    """--out s3://...: what the prefix holds is asked of the bucket (moto here) before any scoring; --overwrite
    deletes the earlier evaluation's objects there that the new one does not write over (a staging folder pushes
    only what the new one writes, so an object left there would mix the two), after its last push: a failure
    before it leaves the earlier one in place."""
    from tests.workflows.object_store import proxied_bucket
    from workflows.evaluate import prepare_output_folder
    from workflows.outputs import OutputFolder

    (tmp_path / "s3").mkdir()
    with proxied_bucket(tmp_path / "s3", "results") as (_, creds, client):
        for name, value in creds.env().items():
            monkeypatch.setenv(name, value)
        for key in ("eval/metrics.json", "eval/clips.csv", "eval/notes.txt", "eval/old/predictions.csv",
                    "run/checkpoint_000001/state.json"):
            client.put_object(Bucket="results", Key=key, Body=b"x")

        def keys() -> list[str]:  # the objects (not the empty "eval/" marker pyarrow leaves when it deletes one)
            listed = client.list_objects_v2(Bucket="results").get("Contents", [])
            return sorted(o["Key"] for o in listed if not o["Key"].endswith("/"))

        outputs = [OutputFolder(f"s3://results/{name}") for name in ("eval", "run", "new")]
        try:
            with pytest.raises(ConfigError, match=r"^--out s3://results/eval holds an earlier evaluation "
                                                  r"\(metrics.json, clips.csv\): choose another --out"):
                prepare_output_folder(outputs[0])
            with pytest.raises(ConfigError, match=r"^--out s3://results/run is a checkpoint or run directory"):
                prepare_output_folder(outputs[1], overwrite=True)
            prepare_output_folder(outputs[2])  # nothing there
            assert len(keys()) == 5
            prepare_output_folder(outputs[0], overwrite=True)
            assert len(keys()) == 5  # nothing deleted before the new evaluation is written
            (outputs[0].local / "metrics.json").write_text("new")
            outputs[0].finish()
            assert keys() == ["eval/metrics.json", "eval/notes.txt", "eval/old/predictions.csv",
                              "run/checkpoint_000001/state.json"]
            assert client.get_object(Bucket="results", Key="eval/metrics.json")["Body"].read() == b"new"
        finally:
            for output in outputs:
                shutil.rmtree(output.local, ignore_errors=True)


def test_clips_of_one_file_are_also_scored_as_the_file(run_dir: Path, video_dir: Path, tmp_path: Path) -> None:
    """A manifest of clips cut from longer files (data import folders --clip-seconds): each row is scored as
    before, and each file once more as the mean of its read clips' probabilities; a file whose clips name
    different classes is left out of the per-file scores and said."""
    from workflows.data.drops import DropReport
    from workflows.data.manifest import write_manifest
    from workflows.evaluate import ViewResults, format_summary, write_outputs
    from workflows.metrics import VideoScores

    clips = tmp_path / "clips.csv"
    wide, tall, mid = (str(video_dir / "clips" / f"{name}.mp4") for name in ("wide", "tall", "mid"))
    write_manifest([{"path": wide, "label": "cls0", "start": 0.0, "end": 1.0},
                    {"path": wide, "label": "cls0", "start": 1.0, "end": 2.5},
                    {"path": wide, "label": "cls0", "start": 2.5, "end": 4.0},  # dropped below
                    {"path": tall, "label": "cls1"},  # a short file, listed whole: a file of one clip
                    {"path": mid, "label": "cls2", "start": 0.0, "end": 1.0},
                    {"path": mid, "label": "cls3", "start": 1.0, "end": 2.0}], clips)
    plan = plan_evaluation(EvalRequest(checkpoint=str(run_dir), manifest=str(clips), views=2,
                                       out=str(tmp_path / "out"), mlflow=False))
    # Row 0 leans to cls1 and row 1 more strongly to cls0: alone, row 0 is wrong; the file's mean is right.
    logits = {0: [0.0, 1.0, 0, 0, 0], 1: [3.0, 0.0, 0, 0, 0], 3: [0, 2.0, 0, 0, 0], 4: [0, 0, 1.0, 0, 0],
              5: [0, 0, 0, 0, 1.0]}
    scores = VideoScores(N)
    for row, row_logits in logits.items():
        label = plan.manifest.table.column("label")[row].as_py()
        for _ in range(plan.views):
            scores.add(torch.tensor([row]), torch.tensor([row_logits]), torch.tensor([label]))
    results = ViewResults(scores=scores, rows=2 * len(logits), rows_per_video={row: 2 for row in logits},
                          drops=DropReport("eval", None, 6, dropped={"corrupt": 1}, examples={"corrupt": [wide]}),
                          dropped_videos={2: "corrupt: test"}, seconds=1.0)
    metrics = write_outputs(plan, results)
    probs = {row: torch.softmax(torch.tensor(v), 0) for row, v in logits.items()}
    assert metrics["videos"] == 5 and metrics["top1"] == pytest.approx(100 * 3 / 5)  # rows 1, 3 and 4 right
    assert metrics["per_file"] == {"top1": pytest.approx(100.0), "top5": pytest.approx(100.0),
                                   "mean_class_acc": pytest.approx(100.0), "files": 2, "clips": 3,
                                   "mixed_label_files": 1, "mixed_label_examples": [mid]}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["per_file"]["files"] == 2
    by_file = _read_csv(tmp_path / "out" / "file_predictions.csv")
    assert [(r["path"], r["label"], r["predicted"], r["correct"], r["clips"]) for r in by_file] == \
        [(wide, "cls0", "cls0", "1", "2"), (tall, "cls1", "cls1", "1", "1")]
    assert float(by_file[0]["probability"]) == pytest.approx(float((probs[0] + probs[1])[0] / 2), abs=1e-6)
    rows = _read_csv(tmp_path / "out" / "predictions.csv")  # each clip still its own row, with its window
    assert [(r["start"], r["end"], r["dropped"][:7]) for r in rows] == \
        [("0", "1", ""), ("1", "2.5", ""), ("2.5", "4", "corrupt"), ("", "", ""), ("0", "1", ""), ("1", "2", "")]
    summary = format_summary(metrics)
    assert "per file: top-1 100.00%" in summary and "(2 files of 3 clips" in summary and mid in summary
    # A manifest naming each file once: nothing per file.
    plan = plan_evaluation(EvalRequest(checkpoint=str(run_dir), manifest=str(video_dir / "good.csv"), views=2,
                                       out=str(tmp_path / "whole"), mlflow=False))
    scores = VideoScores(N)
    for row in range(N):
        scores.add(torch.tensor([row, row]), torch.eye(N)[[row, row]], torch.tensor([row, row]))
    metrics = write_outputs(plan, ViewResults(scores=scores, rows=2 * N, rows_per_video=dict.fromkeys(range(N), 2),
                                              drops=DropReport("eval", None, N), dropped_videos={}, seconds=1.0))
    assert "per_file" not in metrics and not (tmp_path / "whole" / "file_predictions.csv").exists()
    assert "per file" not in format_summary(metrics)


def test_clip_seconds_cuts_whole_videos_into_clips_and_saves_the_files_scores(run_dir: Path, video_dir: Path,
                                                                                 tmp_path: Path, capsys) -> None:
    """evaluate --clip-seconds: the manifest's whole videos are cut as `data clips` cuts them (clips.csv in the
    output folder), so a long recording is scored per clip and per file; --save-scores then also holds the files'
    probabilities, the ones file_predictions.csv names. A length that is no length fails before any work."""
    from workflows.data.clips import cut_manifest
    from workflows.data.drops import DropReport
    from workflows.data.manifest import load_manifest
    from workflows.evaluate import ViewResults, write_outputs
    from workflows.metrics import VideoScores

    out = tmp_path / "out"
    plan = plan_evaluation(EvalRequest(checkpoint=str(run_dir), manifest=str(video_dir / "good.csv"), views=1,
                                       clip_seconds=1.0, out=str(out), mlflow=False, save_scores=True))
    by_data_clips = cut_manifest(str(video_dir / "good.csv"), tmp_path / "by_data_clips.csv", 1.0)
    columns = ("path", "label_name", "start", "end")
    cut_by_data_clips = load_manifest(by_data_clips.manifest, None).table.select(columns)
    assert plan.manifest.table.select(columns).to_pandas().equals(cut_by_data_clips.to_pandas())  # NaN == NaN
    assert plan.manifest.source == str(out / "clips.csv")
    # wide (1.24 s) gives one clip, mid (2.33 s) and narrow (2 s) two; tall and big are under 1 s: whole
    assert (plan.cut.rows, plan.cut.cut, plan.cut.whole) == (7, 3, 2) and "2 videos are shorter" in plan.cut.notes[0]
    scores = VideoScores(N)
    labels = plan.manifest.table.column("label").to_pylist()
    for row, label in enumerate(labels):
        scores.add(torch.tensor([row]), torch.randn(1, N), torch.tensor([label]))
    metrics = write_outputs(plan, ViewResults(scores=scores, rows=7, rows_per_video=dict.fromkeys(range(7), 1),
                                              drops=DropReport("eval", None, 7), dropped_videos={}, seconds=1.0))
    assert metrics["clip_seconds"] == 1.0 and (metrics["videos"], metrics["per_file"]["files"]) == (7, 5)
    saved = np.load(out / "scores.npz")
    by_file = _read_csv(out / "file_predictions.csv")
    assert list(saved["file_path"]) == [r["path"] for r in by_file] and saved["file_scores"].shape == (5, N)
    assert [saved["class_names"][i] for i in saved["file_label"]] == [r["label"] for r in by_file]
    assert [saved["class_names"][i] for i in saved["file_scores"].argmax(1)] == [r["predicted"] for r in by_file]
    mid = [i for i, path in enumerate(plan.manifest.table.column("path").to_pylist()) if path.endswith("mid.mp4")]
    row_of = {int(v): i for i, v in enumerate(saved["video_index"])}
    np.testing.assert_allclose(saved["file_scores"][list(saved["file_path"]).index(str(video_dir / "clips/mid.mp4"))],
                               saved["scores"][[row_of[r] for r in mid]].mean(0), rtol=1e-5)
    # MLflow: the length as a param, the clips that were scored as an artifact
    from mlflow import MlflowClient

    from workflows.evaluate import log_to_mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_to_mlflow(plan, metrics, uri)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).data.params["clip_seconds"] == "1.0"
    assert "evaluation/clips.csv" in {a.path for a in client.list_artifacts(run_id, "evaluation")}
    # A second evaluation into the same folder, of whole videos: it was written over the first, beside the first's
    # clips.csv, file_predictions.csv and scores.npz, which no longer matched. Refused before any work, naming what
    # is there; with --overwrite the first one's files (those alone) are set aside, then removed once the second is
    # written.
    (out / "notes.txt").write_text("mine")
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    again = dict(checkpoint=str(run_dir), manifest=str(video_dir / "good.csv"), views=1, out=str(out), mlflow=False)
    with pytest.raises(ConfigError, match=rf"^--out {out} holds an earlier evaluation \(metrics.json, "
                                          r"per_class_accuracy.csv, predictions.csv, confusion_matrix.csv, "
                                          r"confusion_matrix.png, recipe.yaml, file_predictions.csv, scores.npz, "
                                          r"clips.csv\): choose another --out, or remove those files or pass "
                                          r"--overwrite to replace it"):
        plan_evaluation(EvalRequest(**again))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    plan = plan_evaluation(EvalRequest(**again, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == [f".replaced-{os.getpid()}", "notes.txt"]
    scores = VideoScores(N)
    for row in range(N):
        scores.add(torch.tensor([row]), torch.randn(1, N), torch.tensor([row]))
    write_outputs(plan, ViewResults(scores=scores, rows=N, rows_per_video=dict.fromkeys(range(N), 1),
                                    drops=DropReport("eval", None, N), dropped_videos={}, seconds=1.0))
    plan.output.finish()  # as run_evaluate ends: the first evaluation's files, set aside, removed
    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.csv", "confusion_matrix.png", "metrics.json",
                                                     "notes.txt", "per_class_accuracy.csv", "predictions.csv",
                                                     "recipe.yaml"]

    assert evaluate_main(["--checkpoint", str(run_dir), "--clip-seconds", "0", "--out", str(tmp_path / "o2")]) == 2
    assert "--clip-seconds 0.0: give the length of a clip in seconds" in capsys.readouterr().err


def test_eval_model_is_the_trained_one_and_modes_differ(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoint_000001"
    state, weights = read_state(ckpt), read_weights(ckpt)
    model = build_eval_model(state["model"], 0, weights)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key])
    frames = torch.randint(0, 256, (2, model.cfg.num_frames, model.cfg.image_size, model.cfg.image_size, 3),
                           dtype=torch.uint8)
    dist = model_logits(model, frames, CLASSES, "dist")
    clip = model_logits(model, frames, CLASSES, "clip_only")
    fused = model_logits(model, frames, CLASSES, "fusion")
    w = model.cfg.zero_shot_weight
    assert dist.shape == clip.shape == (2, N)
    torch.testing.assert_close(fused, (1 - w) * dist + w * clip, rtol=1e-4, atol=1e-4)
    # The frozen CLIP is the run's (seeded) one: clip_only logits do not depend on the trained weights.
    torch.testing.assert_close(build_eval_model(state["model"], 0, None).clip_logits(
        __import__("dist_model").normalize_video(frames), CLASSES), clip)


def test_unreachable_mlflow_never_fails_the_evaluation(run_dir: Path, tmp_path: Path, capsys) -> None:
    from workflows.evaluate import log_to_mlflow

    plan = plan_evaluation(EvalRequest(checkpoint=str(run_dir), out=str(tmp_path)))
    metrics = {"checkpoint": str(plan.checkpoint), "step": 2, "manifest": "m.csv", "labels": "l.json", "mode": "dist",
               "views": 3, "crops": 1, "num_classes": N, "preset": "dist_tiny", "top1": 1.0, "top5": 2.0,
               "mean_class_acc": 1.0, "videos": 5, "dropped_total": 0}
    assert log_to_mlflow(plan, metrics, "http://127.0.0.1:9") is None
    assert "[mlflow] start failed" in capsys.readouterr().out


# --- the checkpoint loading evaluate and predict share (workflows.inference) -------------------------------------


def _edited_copy(run_dir: Path, tmp_path: Path, *, state: dict | None = None, recipe_yaml: str | None = None) -> Path:
    """A copy of the run's latest checkpoint with its state.json or recipe.yaml replaced."""
    ckpt = shutil.copytree(run_dir / "checkpoint_000001", tmp_path / "checkpoint_000009")
    if state is not None:
        (ckpt / "state.json").write_text(json.dumps(state))
    if recipe_yaml is not None:
        (ckpt / "recipe.yaml").write_text(recipe_yaml)
    return ckpt


def test_read_checkpoint_gives_the_trained_recipe_and_seed(run_dir: Path, tmp_path: Path) -> None:
    loaded = read_checkpoint(run_dir)  # a run directory: its latest checkpoint
    assert loaded.directory == run_dir / "checkpoint_000001" and loaded.state["step"] == 2
    assert recipe_to_dict(loaded.recipe)["model"] == loaded.model_section == loaded.state["model"]
    assert loaded.raw_recipe["run"]["name"] == "evaltest" and loaded.recipe.run.name == "evaltest"
    default = load_recipe(SMOKE, ["train.seed=11"], check_files=False)
    assert loaded.training_seed(default) == loaded.raw_recipe["train"]["seed"] == loaded.recipe.train.seed != 11
    # A recipe.yaml that records no seed: the seed comes from the recipe the caller evaluates with.
    unseeded = read_checkpoint(_edited_copy(run_dir, tmp_path, recipe_yaml="run:\n  name: other\n"))
    assert unseeded.training_seed(default) == 11 and unseeded.recipe.run.name == "other"


def test_read_checkpoint_repairs_the_sqlite_uri_older_versions_wrote(run_dir: Path, tmp_path: Path) -> None:
    """recipe.yaml files written before 2026-12-06 hold a run's sqlite store as sqlite://abs/...: evaluating such a
    checkpoint logged nowhere ("Invalid SQLite URL")."""
    store = tmp_path / "store" / "mlflow.db"
    written = f"mlflow:\n  tracking_uri: sqlite:/{store}\n"  # what the redaction made of sqlite:///{store}
    loaded = read_checkpoint(_edited_copy(run_dir, tmp_path, recipe_yaml=written))
    assert loaded.recipe.mlflow.tracking_uri == f"sqlite:///{store}"


def test_read_checkpoint_refuses_a_state_without_model(run_dir: Path, video_dir: Path, tmp_path: Path,
                                                        capsys) -> None:
    state = {k: v for k, v in read_state(run_dir / "checkpoint_000001").items() if k != "model"}
    ckpt = _edited_copy(run_dir, tmp_path, state=state)
    with pytest.raises(ConfigError, match="state.json has no model section"):
        read_checkpoint(ckpt)
    # Both commands say so, before any model is built.
    assert evaluate_main(["--checkpoint", str(ckpt)]) == 2
    assert "has no model section" in capsys.readouterr().err
    assert predict_main(["--checkpoint", str(ckpt), str(video_dir / "clips" / "mid.mp4")]) == 2
    assert "has no model section" in capsys.readouterr().err


def test_a_checkpoint_in_storage_is_fetched_and_a_partial_one_never_used(run_dir: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint given as a URI (s3://, gs://, here file:// through the same pyarrow code path) is fetched: a
    checkpoint directory as it is, a run directory's newest *complete* checkpoint (every rank's file list there,
    every file at its size), so a newer partial upload is skipped. tests/workflows/test_object_storage.py does this
    against a real S3 endpoint."""
    from workflows.checkpoints import write_file_list

    runs = tmp_path / "bucket" / "run"
    for step, name in ((1, "checkpoint_a"), (2, "checkpoint_b"), (3, "checkpoint_c")):
        ckpt = shutil.copytree(run_dir / "checkpoint_000001", runs / name)
        (ckpt / "state.json").write_text(json.dumps({**read_state(ckpt), "step": step, "world_size": 1}))
        write_file_list(ckpt, 0)
    (runs / "checkpoint_c" / "weights.safetensors").write_bytes(b"half an upload")  # listed size differs: partial
    loaded = read_checkpoint(runs.as_uri())
    assert loaded.state["step"] == 2 and loaded.source == (runs / "checkpoint_b").as_uri()
    assert loaded.directory != runs / "checkpoint_b" and not loaded.directory.is_relative_to(tmp_path)  # a copy
    # what scoring reads, and rank 0's checksums (they cover the weights); no DeepSpeed file
    assert {p.name for p in loaded.directory.iterdir()} == {"state.json", "weights.safetensors", "recipe.yaml",
                                                            "complete"}
    assert [p.name for p in (loaded.directory / "complete").iterdir()] == ["rank_0.sha256"]
    for key, value in read_weights(loaded.directory).items():
        torch.testing.assert_close(value, read_weights(run_dir / "checkpoint_000001")[key])
    assert read_checkpoint((runs / "checkpoint_a").as_uri()).state["step"] == 1  # a checkpoint directory itself
    monkeypatch.chdir(tmp_path)  # the default output folder, eval/checkpoint_b-<time>, is made by the plan
    plan = plan_evaluation(EvalRequest(checkpoint=runs.as_uri()))
    assert plan.checkpoint_source == (runs / "checkpoint_b").as_uri() and plan.out_dir.parts[0] == "eval"
    assert plan.out_dir.name.startswith("run-") and (tmp_path / plan.out_dir).is_dir()
    shutil.rmtree(runs / "checkpoint_a" / "complete")
    shutil.rmtree(runs / "checkpoint_b" / "complete")
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint_"):
        read_checkpoint(runs.as_uri())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint((runs / "nope").as_uri())


def test_resolve_labels_file_then_stored_names_then_a_clear_error(run_dir: Path, seven_labels: Path,
                                                                   tmp_path: Path) -> None:
    loaded = read_checkpoint(run_dir)
    label_map, source = resolve_labels(str(seven_labels), loaded)
    assert len(label_map) == 7 and label_map["jumping"] == 0 and source == str(seven_labels)
    label_map, source = resolve_labels(None, loaded)
    assert label_map == {name: i for i, name in enumerate(CLASSES)} and "stored in the checkpoint" in source
    state = {k: v for k, v in loaded.state.items() if k != "class_names"}
    nameless = read_checkpoint(_edited_copy(run_dir, tmp_path, state=state))
    with pytest.raises(ConfigError, match="stores no class names; pass --labels"):
        resolve_labels(None, nameless)
    with pytest.raises(ConfigError, match="^no label file"):
        resolve_labels(None, None, missing="no label file")
    from workflows.inference import load_predictor

    with pytest.raises(ConfigError, match="stores no class names; pass --labels"):
        load_predictor(str(nameless.directory))
    _, _, names = load_predictor(str(nameless.directory), str(seven_labels))
    assert names == list(json.loads(seven_labels.read_text()))  # in index order


# --- predict (local, no Ray) ------------------------------------------------------------------------------------


def test_predict_prints_top_k_and_reports_a_corrupt_video(run_dir: Path, video_dir: Path, seven_labels: Path,
                                                          capsys) -> None:
    clips = video_dir / "clips"
    videos = [str(clips / "wide.mp4"), str(clips / "random.mp4"), str(clips / "tall.mp4")]
    assert predict_main(["--checkpoint", str(run_dir), *videos, "--top", "3"]) == 1
    out, err = capsys.readouterr()
    assert "random.mp4: could not be read (corrupt" in err and "1 of 3 videos could not be read" in err
    assert "dist logits, 3 views x 1 crops, 5 classes, on cpu: 3 video(s)" in err  # the recipe's eval section
    for name in ("wide.mp4", "tall.mp4"):
        block = out.split(f"{name}:")[1].splitlines()[1:4]
        assert [line.split()[0] for line in block] == ["1.", "2.", "3."]
        assert all(line.split()[1] in CLASSES and line.endswith("%") for line in block)
    # JSON, a swapped label set, every class shown: probabilities sorted and summing to one.
    assert predict_main(["--checkpoint", str(run_dir / "checkpoint_000001"), str(clips / "mid.mp4"), "--labels",
                         str(seven_labels), "--top", "7", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    probs = [t["prob"] for t in result["top"]]
    assert len(probs) == 7 and probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert {t["class"] for t in result["top"]} == {"jumping", "swimming", *CLASSES}
    if not torch.cuda.is_available():  # asking for a GPU that is not there is a clear error, not a traceback
        assert predict_main(["--checkpoint", str(run_dir), str(clips / "mid.mp4"), "--device", "cuda"]) == 2
        assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_predict_scores_as_the_recipe_evaluates_and_takes_folders(run_dir: Path, video_dir: Path, tmp_path: Path,
                                                                   capsys) -> None:
    """predict's views, crops and fusion default to the checkpoint recipe's eval section, as evaluate's do (it
    used 3 x 1 pure DiST whatever the recipe said); a folder stands for the videos below it."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoint_000001", ckpt)
    recipe = (ckpt / "recipe.yaml").read_text()
    assert "test_views: 3" in recipe and "zero_shot_fusion: false" in recipe
    (ckpt / "recipe.yaml").write_text(recipe.replace("test_views: 3", "test_views: 2")
                                      .replace("zero_shot_fusion: false", "zero_shot_fusion: true"))
    folder = tmp_path / "videos" / "sub"
    folder.mkdir(parents=True)
    for name in ("wide.mp4", "tall.mp4"):
        shutil.copy(video_dir / "clips" / name, folder / name)
    assert predict_main(["--checkpoint", str(ckpt), str(tmp_path / "videos"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "fusion logits, 2 views x 1 crops" in err and "2 video(s)" in err
    assert [r["path"] for r in json.loads(out)] == [str(folder / "tall.mp4"), str(folder / "wide.mp4")]
    assert predict_main(["--checkpoint", str(ckpt), str(tmp_path / "videos"), "--views", "1", "--no-zero-shot-fusion",
                         "--json"]) == 0
    assert "dist logits, 1 views x 1 crops" in capsys.readouterr().err
    assert predict_main(["--checkpoint", str(ckpt), str(tmp_path / "nothing*.mp4")]) == 2
    assert "no video files in" in capsys.readouterr().err


def _decode_ahead_watched(paths: list[str], ahead: int, workers: int) -> tuple[list, list[str]]:
    """predict's decode_ahead over `paths`, checking as it goes that no more than `ahead` videos beyond the one
    handed over were ever started and (`ahead` >= 1) that the next one starts before the caller is done with the
    current one; returns (path, clip shape or drop reason) in the order handed over, and the paths started."""
    import threading

    from workflows.data.pipeline import ClipSpec
    from workflows.data.video import BadVideo
    from workflows.predict import decode_ahead, video_clips

    spec = ClipSpec(split="eval", num_frames=4, crop_size=24, num_views=2)
    started: list[str] = []
    changed = threading.Condition()

    def decode(path: str) -> np.ndarray:
        with changed:
            started.append(path)
            changed.notify_all()
        return video_clips(path, spec)

    seen = []
    for i, (path, decoded) in enumerate(decode_ahead(paths, decode, ahead, workers)):
        with changed:
            assert set(started) <= set(paths[: i + ahead + 1])
        try:
            seen.append((path, decoded.result().shape))
        except BadVideo as exc:
            seen.append((path, exc.reason))
        with changed:
            if not ahead:  # nothing decoded ahead: one at a time
                assert started == paths[: i + 1]
            elif i + 1 < len(paths):  # the next one decodes while this one is scored
                assert changed.wait_for(lambda i=i: paths[i + 1] in started, timeout=60)
    return seen, started


def test_predict_decodes_the_next_videos_while_one_is_scored(video_dir: Path) -> None:
    """predict decoded and scored one video at a time (the model waited while each decoded): the next videos now
    decode in a small thread pool while one is scored, handed over in input order, a bad video's error in its place,
    and no more than `ahead` videos beyond the one being scored are ever started."""
    from workflows.data.pipeline import ClipSpec
    from workflows.predict import DECODE_AHEAD, decode_plan

    clips = video_dir / "clips"
    paths = [str(clips / f"{name}.mp4") for name in ("wide", "random", "tall", "mid", "missing", "big", "narrow")]
    dropped = {"random": "corrupt", "missing": "missing"}
    for ahead, workers in ((2, 2), (0, 1)):
        seen, started = _decode_ahead_watched(paths, ahead, workers)
        assert seen == [(p, dropped.get(Path(p).stem, (2, 4, 24, 24, 3))) for p in paths]
        assert sorted(started) == sorted(paths)
    # The look-ahead is bounded by the clips' bytes: DECODE_AHEAD videos of a usual eval, none for an absurd --views.
    assert decode_plan(ClipSpec(split="eval", num_frames=16, crop_size=224, num_views=3), 1)[0] == DECODE_AHEAD
    assert decode_plan(ClipSpec(split="eval", num_frames=16, crop_size=224, num_views=1000), 1) == (0, 1)


def test_predict_output_is_the_one_video_at_a_time_result(run_dir: Path, video_dir: Path, capsys) -> None:
    """Decoding ahead changes neither the order, the numbers, nor the report of a bad video."""
    from workflows.inference import load_predictor
    from workflows.predict import predict_video

    clips = video_dir / "clips"
    paths = [str(clips / f"{name}.mp4") for name in ("wide", "random", "tall", "missing", "mid", "big", "narrow")]
    assert predict_main(["--checkpoint", str(run_dir), *paths, "--json"]) == 1
    out, err = capsys.readouterr()
    results = json.loads(out)
    assert [r["path"] for r in results] == paths
    assert [r.get("error") for r in results] == [None, "corrupt", None, "missing", None, None, None]
    assert err.index("random.mp4: could not be read (corrupt") < err.index("missing.mp4: could not be read (missing")
    assert "2 of 7 videos could not be read" in err
    model, recipe, names = load_predictor(str(run_dir), None, "cpu")
    for result in results:
        if "top" in result:
            alone = predict_video(model, recipe, names, result["path"], views=3, crops=1, top=5)
            assert [(t["class"], t["prob"]) for t in result["top"]] == \
                [(name, pytest.approx(p, abs=1e-6)) for name, p in alone]


def test_predict_scores_a_long_video_clip_by_clip(run_dir: Path, video_dir: Path, capsys, monkeypatch) -> None:
    """--clip-seconds: a long video is cut into centred clips (the cut `data import folders` makes), each scored
    and shown as it comes, then the video as the mean of its clips' probabilities; a video shorter than a clip is
    scored whole and says why; an unreadable one is reported as before."""
    from workflows.inference import load_predictor
    from workflows.predict import clip_probs, clip_spec, video_clips

    clips = video_dir / "clips"
    mid, tall, broken = (str(clips / name) for name in ("mid.mp4", "tall.mp4", "random.mp4"))  # 2.33 s, 0.8 s
    assert predict_main(["--checkpoint", str(run_dir), mid, tall, broken, "--clip-seconds", "1", "--top", "5",
                         "--json"]) == 1
    out, err = capsys.readouterr()
    by_path = {r["path"]: r for r in json.loads(out)}
    assert [(c["start"], c["end"]) for c in by_path[mid]["clips"]] == [(0.167, 1.167), (1.167, 2.167)]
    assert "clips" not in by_path[tall] and by_path[broken]["error"] == "corrupt"
    assert "random.mp4: could not be read (corrupt" in err and "1 of 3 videos could not be read" in err
    model, recipe, names = load_predictor(str(run_dir), None, "cpu")
    spec = clip_spec(model, recipe, 3, 1)
    each = [clip_probs(model, recipe, names, video_clips(mid, spec, start, end))
            for start, end in ((0.167, 1.167), (1.167, 2.167))]
    for clip, probs in zip(by_path[mid]["clips"], each, strict=True):
        assert {t["class"]: t["prob"] for t in clip["top"]} == \
            {name: pytest.approx(float(p), abs=1e-6) for name, p in zip(names, probs, strict=True)}
    mean = torch.stack(each).mean(0)
    assert {t["class"]: t["prob"] for t in by_path[mid]["top"]} == \
        {name: pytest.approx(float(p), abs=1e-6) for name, p in zip(names, mean, strict=True)}
    assert not torch.allclose(each[0], each[1])  # two clips of different frames: the mean is not either one
    # The table: a line per clip as it is scored, then the video; the short one says why it is whole.
    assert predict_main(["--checkpoint", str(run_dir), mid, tall, "--clip-seconds", "1", "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    best = [names[int(p.argmax())] for p in each]
    assert lines[:6] == [f"{mid}: 2 clips of 1 s",
                         f"  0:00.2-0:01.2  {best[0]}  {100 * float(each[0].max()):5.1f}%",
                         f"  0:01.2-0:02.2  {best[1]}  {100 * float(each[1].max()):5.1f}%",
                         "  the whole video (the mean of its 2 read clips):",
                         lines[4], lines[5]] and lines[4].startswith(f"  1. {names[int(mean.argmax())]}")
    assert lines[6] == f"{tall}: (scored whole: it is 0.8 s, shorter than --clip-seconds 1)", lines
    assert predict_main(["--checkpoint", str(run_dir), mid, "--clip-seconds", "0"]) == 2
    assert "error: --clip-seconds 0.0: give the length of a clip in seconds" in capsys.readouterr().err
    # A video in storage (file:// through the same pyarrow code as s3://) is fetched once for all its clips, into a
    # temporary file removed after its last clip; the scores are those of the local file.
    import workflows.data.video as video_module

    fetched = []
    real_fetch = video_module.fetch_to_file

    def counting_fetch(path: str, dst: str, retry_s=None) -> None:
        fetched.append(dst)
        real_fetch(path, dst, retry_s)

    monkeypatch.setattr(video_module, "fetch_to_file", counting_fetch)
    uri = Path(mid).as_uri()
    assert predict_main(["--checkpoint", str(run_dir), uri, "--clip-seconds", "1", "--top", "5", "--json"]) == 0
    (remote,) = json.loads(capsys.readouterr().out)
    assert len(fetched) == 1 and not Path(fetched[0]).exists() and not Path(fetched[0]).parent.exists()
    assert [c["top"] for c in remote["clips"]] == [c["top"] for c in by_path[mid]["clips"]]


# --- evaluate on Ray --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_evaluate_multiview_on_a_swapped_label_set(ray_local, run_dir: Path, video_dir: Path, seven_labels: Path,
                                                   tmp_path: Path, capsys) -> None:
    """One run covers the protocol: 3 views x 3 crops, another label set than the checkpoint's (7 classes, not 5),
    bad videos dropped and counted by reason, outputs that agree, and the MLflow record."""
    out = tmp_path / "eval"
    rc = evaluate_main(["--checkpoint", str(run_dir), "--manifest", str(video_dir / "bad.csv"), "--labels",
                        str(seven_labels), "--views", "3", "--crops", "3", "--set", "data.max_bad_fraction=1.0",
                        "--out", str(out), "--json", "--mlflow", "--save-scores"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    metrics = json.loads(captured.out)
    assert metrics == json.loads((out / "metrics.json").read_text())
    # 3 views x 3 crops = 9 clips per video, summed into one score per video: each video counted once.
    assert (metrics["rows"], metrics["videos"], metrics["views"], metrics["crops"]) == (9 * N, N, 3, 3)
    assert metrics["num_classes"] == 7 and metrics["step"] == 2  # the label swap; the run's latest checkpoint
    assert metrics["manifest_videos"] == N + 4
    assert metrics["dropped"] == {"missing": 1, "empty": 1, "truncated": 1, "corrupt": 1}
    per_class = _read_csv(out / "per_class_accuracy.csv")
    listed = _read_csv(out / "predictions.csv")  # every manifest row, the dropped ones with why
    assert [int(r["video_index"]) for r in listed] == list(range(N + 4))
    dropped = {r["path"].rsplit("/", 1)[-1]: r for r in listed if r["dropped"]}
    assert {name: r["dropped"].split(":")[0] for name, r in dropped.items()} == \
        {"missing.mp4": "missing", "empty.mp4": "empty", "truncated.mp4": "truncated", "random.mp4": "corrupt"}
    assert all(r["predicted"] == r["probability"] == r["correct"] == "" for r in dropped.values())
    assert dropped["truncated.mp4"]["label"] == "cls2"
    predictions = [r for r in listed if not r["dropped"]]
    assert [r["class"] for r in per_class] == list(json.loads(seven_labels.read_text())) and len(predictions) == N
    assert {r["path"].rsplit("/", 1)[-1]: r["label"] for r in predictions} == \
        {f"{name}.mp4": f"cls{i}" for i, name in enumerate(GOOD_VIDEOS)}
    assert sum(int(r["videos"]) for r in per_class) == N
    correct = sum(int(r["correct"]) for r in per_class)
    assert correct == sum(int(r["correct"]) for r in predictions)
    assert metrics["top1"] == pytest.approx(100 * correct / N)
    accs = [float(r["accuracy"]) for r in per_class if int(r["videos"])]
    assert len(accs) == N and metrics["mean_class_acc"] == pytest.approx(sum(accs) / len(accs))
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    confusion = list(csv.reader((out / "confusion_matrix.csv").open()))
    assert confusion[0][1:] == [r["class"] for r in per_class] and len(confusion) == 1 + len(per_class)
    assert sum(int(row[1 + i]) for i, row in enumerate(confusion[1:])) == correct  # the diagonal
    assert sum(int(v) for row in confusion[1:] for v in row[1:]) == N
    assert "top-1" in captured.err and "dropped 4" in captured.err
    # --save-scores: every read video's probabilities, the numbers predictions.csv and the accuracies come from.
    import numpy as np

    saved = np.load(out / "scores.npz")
    assert metrics["scores_file"] == str(out / "scores.npz")
    assert saved["scores"].shape == (N, 7) and saved["scores"].dtype == np.float32
    np.testing.assert_allclose(saved["scores"].sum(1), 1.0, rtol=1e-5)  # a mean of softmaxes
    assert list(saved["class_names"]) == [r["class"] for r in per_class]
    assert list(saved["video_index"]) == [int(r["video_index"]) for r in predictions]
    assert [saved["class_names"][i] for i in saved["label"]] == [r["label"] for r in predictions]
    best = saved["scores"].argmax(1)
    assert [saved["class_names"][i] for i in best] == [r["predicted"] for r in predictions]
    np.testing.assert_allclose(saved["scores"].max(1), [float(r["probability"]) for r in predictions], atol=1e-6)
    assert metrics["top1"] == pytest.approx(100 * float(np.mean(best == saved["label"])))
    # The same clips scored locally (predict's path, no Ray) give the same winner and probability per video.
    import math

    from workflows.predict import load_predictor, predict_video

    model, recipe, names = load_predictor(str(run_dir), str(seven_labels))
    for row in predictions:
        ((name, prob),) = predict_video(model, recipe, names, row["path"], views=3, crops=3, top=1)
        assert name == row["predicted"] and math.isclose(prob, float(row["probability"]), rel_tol=1e-3)
    # Logged into the run's MLflow store.
    from mlflow import MlflowClient

    assert metrics["mlflow_tracking_uri"].endswith(f"{run_dir}/mlflow.db")
    run = MlflowClient(tracking_uri=metrics["mlflow_tracking_uri"]).get_run(metrics["mlflow_run_id"])
    assert run.data.metrics["eval_top1"] == pytest.approx(metrics["top1"])
    assert run.data.params["num_classes"] == "7"


@pytest.mark.integration
def test_evaluate_clip_only_without_checkpoint(ray_local, video_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "clip"
    rc = evaluate_main(["--clip-only", "--preset", "dist_tiny", "--manifest", str(video_dir / "good.csv"),
                        "--labels", str(video_dir / "labels.json"), "--views", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["mode"], metrics["checkpoint"], metrics["rows"], metrics["videos"]) == ("clip_only", None,
                                                                                           2 * N, N)
    assert "frozen CLIP alone (dist_tiny)" in captured.out and "[evaluate] on " in captured.out
    assert "scores_file" not in metrics and not (out / "scores.npz").exists()  # only with --save-scores
    # Nothing readable, with the bad-video limit lifted: an error, not a 0% evaluation of 0 videos.
    from workflows.data.manifest import write_manifest

    write_manifest([{"path": str(video_dir / "clips" / name), "label": "cls0"}
                    for name in ("missing.mp4", "empty.mp4", "random.mp4")], tmp_path / "bad_only.csv")
    rc = evaluate_main(["--clip-only", "--preset", "dist_tiny", "--manifest", str(tmp_path / "bad_only.csv"),
                        "--labels", str(video_dir / "labels.json"), "--set", "data.max_bad_fraction=1.0",
                        "--out", str(tmp_path / "none")])
    assert rc == 2 and "none of the 3 videos could be read" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


@pytest.mark.integration
def test_an_evaluation_whose_pipeline_ends_early_writes_nothing(ray_local, video_dir: Path, tmp_path: Path, capsys,
                                                                monkeypatch) -> None:
    """Every video of the manifest is scored or counted as dropped (bad.csv: 5 good, 4 bad, the limit lifted), or the
    evaluation writes nothing: a pipeline that ends before one good video came out (a filter standing in for an
    execution that stopped early without an error) would give metrics that pass for the whole manifest's."""
    import workflows.data.pipeline as pipeline

    args = ["--clip-only", "--preset", "dist_tiny", "--manifest", str(video_dir / "bad.csv"), "--labels",
            str(video_dir / "labels.json"), "--set", "data.max_bad_fraction=0.5", "--views", "1", "--crops", "1"]
    assert evaluate_main([*args, "--out", str(tmp_path / "whole")]) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert (metrics["videos"], metrics["dropped_total"], metrics["manifest_videos"]) == (5, 4, 9)
    real = pipeline.build_clip_dataset
    monkeypatch.setattr(pipeline, "build_clip_dataset",
                        lambda *a, **k: real(*a, **k).filter(lambda row: row["video_index"] != 2))
    rc = evaluate_main([*args, "--out", str(tmp_path / "part")])
    err = capsys.readouterr().err
    assert rc == 1, err
    # Into the earlier evaluation with --overwrite: it fails as well, and the earlier one is kept as it was.
    before = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    assert evaluate_main([*args, "--out", str(tmp_path / "whole"), "--overwrite"]) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()} == before
    assert (f"the scoring ended before 1 of the 9 videos were scored or counted as dropped "
            f"(e.g. {video_dir}/clips/mid.mp4;") in err
    assert not (tmp_path / "part").exists()


def test_a_checkpoint_recipe_with_a_since_removed_key_still_loads(tmp_path):
    """Checkpoints written before data.eval_views/eval_crops were removed carry them in recipe.yaml."""
    from workflows.inference import read_checkpoint

    ckpt = tmp_path / "checkpoint_000"
    ckpt.mkdir()
    (ckpt / "state.json").write_text('{"step": 2, "model": {"preset": "dist_tiny"}, "class_names": ["a", "b"]}')
    (ckpt / "weights.safetensors").write_bytes(b"")
    (ckpt / "recipe.yaml").write_text("data:\n  eval_views: 3\n  eval_crops: 1\ntrain:\n  seed: 5\n")
    loaded = read_checkpoint(ckpt)
    assert loaded.recipe.train.seed == 5 and "eval_views" not in loaded.raw_recipe["data"]


def test_predict_names_the_count_that_is_below_one(capsys):
    for flag in ("--views", "--top"):
        assert predict_main(["--checkpoint", "/nope", flag, "0", "video.mp4"]) == 2
        assert capsys.readouterr().err == f"error: {flag} must be >= 1, got 0\n"


def test_predict_refuses_a_folder_that_is_not_there_before_loading_the_model(tmp_path: Path, capsys):
    """`predict ... nofolder/` was scored as a missing video (exit 1, after loading the model): an input error."""
    video = tmp_path / "a.mp4"
    video.write_bytes(b"x")
    assert predict_main(["--checkpoint", "/nope", str(video), f"{tmp_path / 'nofolder'}/"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nofolder'}/: no such folder\n"


def test_a_clip_file_that_is_gone_fails_before_any_work(run_dir: Path, video_dir: Path, tmp_path: Path,
                                                         capsys) -> None:
    """The checkpoint records the CLIP file it was trained with; moved or deleted since, evaluate says so before Ray
    and predict before decoding (both exit 2 with one line)."""
    state = read_state(run_dir / "checkpoint_000001")
    state["model"] = {**state["model"], "clip_pretrained": str(tmp_path / "moved_clip.pt"),
                      "clip_activation": "gelu"}
    ckpt = _edited_copy(run_dir, tmp_path, state=state)
    video = str(video_dir / "clips" / "mid.mp4")
    for main, args in ((evaluate_main, ["--checkpoint", str(ckpt)]),
                       (predict_main, ["--checkpoint", str(ckpt), video])):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "moved_clip.pt" in err and "nor a file" in err and err.startswith("error: ") and err.count("\n") == 1


def test_save_scores_without_room_for_them_fails_before_any_scoring(tmp_path: Path) -> None:
    """--save-scores on a disk that cannot hold scores.npz: refused with its size and the disk's free space, before
    the scoring (measured against this machine's real free space: 400 classes x a count of videos no disk holds)."""
    import shutil

    from workflows.config_loader import ConfigError
    from workflows.evaluate import check_room_for_scores

    check_room_for_scores(tmp_path / "new" / "out", 20_000, 400)  # K710-sized: ~31 MiB
    videos = shutil.disk_usage(tmp_path).free // 1600 + 1
    with pytest.raises(ConfigError, match=rf"--save-scores: scores.npz of {videos} videos x 400 classes takes about "
                                          r"[\d.]+ MiB, and .*'s disk has [\d.]+ MiB free: free space, choose another "
                                          r"folder with --out, or leave --save-scores out"):
        check_room_for_scores(tmp_path, videos, 400)


@pytest.mark.integration
def test_sigterm_stops_an_evaluation_in_one_line(ray_local, run_dir: Path, video_dir: Path, tmp_path: Path) -> None:
    """`ray job stop` sends SIGTERM: `python -m workflows evaluate` (a separate driver on the same Ray) ends as on
    Ctrl-C, `interrupted by SIGTERM ...` and exit 143, not with the abort and C++ stack of Ray's own handler."""
    import os
    import signal
    import subprocess
    import sys
    import time

    names = list(GOOD_VIDEOS)
    (tmp_path / "v").mkdir()
    rows = ["path,label"]
    for i in range(160):
        (tmp_path / "v" / f"{i}.mp4").symlink_to(video_dir / "clips" / f"{names[i % N]}.mp4")
        rows.append(f"v/{i}.mp4,cls{i % N}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(repo)}
    log = tmp_path / "driver.log"
    with log.open("w") as f:
        driver = subprocess.Popen([sys.executable, "-m", "workflows", "evaluate", "--checkpoint", str(run_dir),
                                   "--manifest", str(tmp_path / "m.csv"), "--views", "8", "--out", str(tmp_path / "o"),
                                   "--no-mlflow"], cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None and "[evaluate] scoring" not in log.read_text():
            time.sleep(0.05)
        time.sleep(1)  # inside the scoring loop
        assert driver.poll() is None, log.read_text()
        driver.send_signal(signal.SIGTERM)
        status = driver.wait(timeout=120)
    output = log.read_text()
    assert status == 143, output
    assert output.rstrip().endswith("interrupted by SIGTERM (ray job stop, or the scheduler)"), output[-2000:]
    assert "SIGTERM received" not in output and not (tmp_path / "o" / "metrics.json").exists()
