"""Classify a whole corpus with a checkpoint on Ray: `python -m workflows predict --ray --out DIR --checkpoint C
[--labels L] [videos, folders, bucket prefixes ...] [--manifest M] [--clip-seconds S] [--top 5|all] ...`.

`predict` without `--ray` classifies a few files on this machine; this is the same scoring for a library of videos:
the ingest layer decodes on the cluster's CPU nodes and `evaluate`'s actor pool scores (one GPU per actor when the
cluster has GPUs), with the views, crops and fusion `predict` uses. No label is needed: the videos are the inputs'
files, or a manifest's `path` column (its `label`, `start` and `end` columns are read when present; labels are
ignored).

Results are written as they come, a row per video (or clip) in `predictions` in the order they finish, and a row
per long file in `file_predictions` (the mean of its read clips' probabilities, as `evaluate` scores a file), as CSV
or Parquet (workflows.prediction_tables). `job.json` records what the job is; run the same command again after it
was stopped or killed and it scores only what is not written yet (what a kill cut is dropped; the rows of a file
whose clips were not all written, and the videos that could not be read, are scored again). The driver holds the
scores of the videos in flight only (and with Parquet the part being filled), so the corpus's size is bounded by
the disk, not the driver's memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workflows.config_loader import ConfigError
from workflows.prediction_tables import FILE_LEAD, FORMATS, PREDICTION_LEAD, Table, csv_cell, open_table

LOG_PREFIX = "[predict]"
JOB_FILE = "job.json"
LABELS_FILE = "labels.json"  # the job's label set ({name: index}, a label file): what `data import predictions` reads


@dataclass
class BatchRequest:
    """What the command line asked for (None = the checkpoint recipe's eval section)."""

    checkpoint: str
    out: str
    videos: list[str] = field(default_factory=list)  # files, folders, bucket prefixes, glob patterns
    manifest: str | None = None
    labels: str | None = None
    tracking_uri: str | None = None
    views: int | None = None
    crops: int | None = None
    top: int = 5
    zero_shot_fusion: bool | None = None
    clip_seconds: float | None = None
    actors: int | None = None
    overrides: list[str] = field(default_factory=list)
    verbose: bool = False
    mlflow: bool | None = None  # None: record the job when the checkpoint's run already has a tracking store
    format: str = "csv"  # of the tables: workflows.prediction_tables.FORMATS


@dataclass
class Rows:
    """The rows to score: one per video, or per clip of a long one; `video_index` is the row's place here."""

    paths: list[str]
    starts: list[float]
    ends: list[float]
    notes: list[str] = field(default_factory=list)  # with --clip-seconds: the videos left whole, and why

    def __len__(self) -> int:
        return len(self.paths)

    @functools.cached_property
    def shown(self) -> list[str]:
        """Each row's path as written into the outputs: a URI's credentials (`?secret_key=...`) replaced."""
        from workflows.runtime import redact_secrets

        return [redact_secrets(path) for path in self.paths]

    @functools.cached_property
    def groups(self) -> dict[str, list[int]]:
        """{path: its rows} for each file named by more than one row (clips of a long file); built once (the rows do
        not change), read by the continuation, the collector and the console."""
        by_path: dict[str, list[int]] = {}
        for i, path in enumerate(self.paths):
            by_path.setdefault(path, []).append(i)
        return {path: rows for path, rows in by_path.items() if len(rows) > 1}

    def digest(self) -> str:
        """What identifies the job's rows across runs: each row's path and window, in order."""
        text = "\n".join(f"{p}\t{csv_cell(s)}\t{csv_cell(e)}" for p, s, e in zip(self.shown, self.starts, self.ends,
                                                                             strict=True))
        return hashlib.sha256(text.encode()).hexdigest()

    def manifest(self, source: str, rows: list[int]) -> Any:
        """The given rows as an unlabelled workflows.data.manifest.Manifest (label -1), keeping their indices."""
        import pyarrow as pa

        from workflows.data.manifest import Manifest

        table = pa.table({
            "video_index": pa.array(np.asarray(rows, np.int64)),
            "path": pa.array([self.paths[i] for i in rows], pa.string()),
            "label": pa.array(np.full(len(rows), -1, np.int64)),
            "label_name": pa.array([""] * len(rows), pa.string()),
            "start": pa.array(np.asarray([self.starts[i] for i in rows], np.float64)),
            "end": pa.array(np.asarray([self.ends[i] for i in rows], np.float64)),
        })
        return Manifest(table=table, source=source)


def _float(value: Any) -> float:
    return math.nan if value is None or value == "" else float(value)


def rows_to_score(request: BatchRequest) -> Rows:
    """The inputs as rows: the videos of the files, folders and prefixes given (each once, in order), then the
    manifest's rows; with --clip-seconds each whole video cut into centred clips (`clips.cut_into_clips`, as
    `data clips` cuts; rows that are clips already are kept)."""
    from workflows.data.video import StorageUnreachable
    from workflows.predict import expand_inputs

    try:
        videos = list(dict.fromkeys(expand_inputs(request.videos))) if request.videos else []
    except StorageUnreachable:  # a bucket that did not answer for the retry budget: said as it is
        raise
    except (OSError, ValueError) as exc:  # a bucket prefix that could not be listed (credentials, no such bucket)
        from workflows.data.manifest import storage_hint
        from workflows.runtime import is_remote, redact_secrets

        remote = next((a for a in request.videos if is_remote(a)), "")
        raise ConfigError(f"cannot list {redact_secrets(remote)}: {exc}{storage_hint(remote)}") from None
    if request.videos and not videos:
        raise ConfigError(f"no video files in {' '.join(request.videos)}")
    listed: list[dict[str, Any]] = [{"path": path, "start": None, "end": None} for path in videos]
    if request.manifest:
        from workflows.data.manifest import load_manifest

        table = load_manifest(request.manifest, None, labelled=False).table
        listed += [{"path": path, "start": None if math.isnan(a) else a, "end": None if math.isnan(b) else b}
                   for path, a, b in zip(*(table.column(c).to_pylist() for c in ("path", "start", "end")),
                                         strict=True)]
    if not listed:
        raise ConfigError("nothing to predict: give video files, folders or bucket prefixes, or --manifest")
    notes: list[str] = []
    if request.clip_seconds is not None:
        from workflows.data.clips import cut_into_clips

        cut, notes = cut_into_clips({"rows": [{**row, "location": row["path"]} for row in listed]},
                                    request.clip_seconds, progress=True)
        listed = cut["rows"]
    return Rows([str(r["path"]) for r in listed], [_float(r.get("start")) for r in listed],
                [_float(r.get("end")) for r in listed], notes)


# ---------------------------------------------------------------------------------------------------------------
# the job's record and what an earlier run wrote
# ---------------------------------------------------------------------------------------------------------------


def job_identity(request: BatchRequest, plan: Any, rows: Rows) -> dict[str, Any]:
    """What must not change between a run and its continuation: the same model, classes, scoring and rows."""
    return {
        "checkpoint": plan.checkpoint_source or str(plan.checkpoint), "step": plan.state.get("step"),
        "classes": hashlib.sha256("\n".join(plan.class_names).encode()).hexdigest()[:16],
        "num_classes": len(plan.class_names), "mode": plan.mode, "views": plan.views, "crops": plan.crops,
        "top": shown_top(request, plan), "clip_seconds": request.clip_seconds, "rows": len(rows),
        "rows_digest": rows.digest(), "format": request.format,
    }


def shown_top(request: BatchRequest, plan: Any) -> int:
    """How many classes each row lists: --top, at most the label set's."""
    return min(request.top, len(plan.class_names))


CSV_NOTE_CELLS = 200  # a CSV row of more cells than this (100 classes with their probabilities) gets csv_size_note


def csv_size_note(fmt: str, top: int, classes: int) -> str | None:
    """A note before the job when its CSV rows would be long (the distribution over many classes), pointing at
    --format parquet (benchmarks/prediction_tables.py: at 710 classes a quarter of the bytes, ~7x less driver
    time per row); None otherwise."""
    if fmt != "csv" or 2 * top <= CSV_NOTE_CELLS:
        return None
    every = " (every class)" if top == classes else ""
    return (f"note: a CSV row here lists {top} classes{every} with their probabilities, ~{16 * top / 1000:.0f} kB a "
            f"row, each written by the driver alone: --format parquet takes about a quarter of the bytes and a "
            f"fraction of the driver's time (docs/evaluation.md)")


def job_tables(out: Path, fmt: str, class_names: list[str], top: int) -> tuple[Table, Table]:
    """The job's two tables in `out`: predictions (a row per video or clip) and file_predictions (per long file)."""
    return (open_table(fmt, out, "predictions", PREDICTION_LEAD, class_names, top),
            open_table(fmt, out, "file_predictions", FILE_LEAD, class_names, top))


def check_same_job(out: Path, identity: dict[str, Any], shown: str) -> bool:
    """Whether `out` holds an earlier run of this job (False: nothing of one). ConfigError when it holds another
    job's predictions, naming what changed, or predictions this command did not write (`shown`: the folder as the
    user named it)."""
    record = out / JOB_FILE
    if not record.exists():
        for fmt in FORMATS:
            table = job_tables(out, fmt, [""], 1)[0]
            if table.exists():
                raise ConfigError(f"--out {shown} holds {table.shown} that `predict --ray` did not write (no "
                                  f"{JOB_FILE}): choose another --out")
        return False
    try:
        earlier = json.loads(record.read_text())
    except ValueError:
        earlier = {}
    earlier.setdefault("format", "csv")  # a job.json from before --format
    changed = [f"{key} {earlier.get(key)!r} then, {value!r} now" for key, value in identity.items()
               if earlier.get(key) != value]
    if changed:
        raise ConfigError(f"--out {shown} holds the predictions of another job ({'; '.join(changed[:3])}): choose "
                          f"another --out, or delete {shown} to start again")
    return True


def continue_job(out: Path, identity: dict[str, Any], rows: Rows, tables: tuple[Table, Table]
                 ) -> tuple[set[int], list[str]]:
    """The rows an earlier run of this job finished (none for a new job), after setting `tables` to hold exactly
    those: a video's scored row (once); a long file's rows and its file row once its file row is written. Everything
    else (what a kill cut, videos that could not be read, the clips of a file not finished) is scored again. Also
    returns the files rewritten (to upload). ConfigError when `out` holds another job's predictions
    (`check_same_job`)."""
    if not check_same_job(out, identity, str(out)):
        return set(), []
    predictions, files = tables
    groups = rows.groups
    group_of = {i: path for path, members in groups.items() for i in members}
    shown_groups = {rows.shown[members[0]]: path for path, members in groups.items()}
    written = files.columns(["path", "dropped"])
    files_done = {shown_groups[path] for path, dropped in zip(written["path"], written["dropped"], strict=True)
                  if not dropped and path in shown_groups}
    kept: set[int] = set()

    def keep_row(row: dict[str, Any]) -> bool:
        index = int(row["video_index"])
        if index in kept or not 0 <= index < len(rows) or rows.shown[index] != row["path"]:
            return False  # written twice, or not this job's row (cannot happen unless edited): scored again
        if (index in group_of and group_of[index] in files_done) or (index not in group_of and not row["dropped"]):
            kept.add(index)
            return True
        return False

    files_kept: set[str] = set()

    def keep_file_row(row: dict[str, Any]) -> bool:
        path = shown_groups.get(row["path"])
        if row["dropped"] or path not in files_done or path in files_kept:
            return False
        files_kept.add(path)
        return True

    rewritten = predictions.keep(keep_row) + files.keep(keep_file_row)
    return kept, rewritten


# ---------------------------------------------------------------------------------------------------------------
# collecting the scores as they come
# ---------------------------------------------------------------------------------------------------------------


class Collector:
    """Per-view logits in, rows out: a video's row once all its views x crops are scored (its probabilities, the
    mean softmax over them, then dropped), a long file's row once all its clips are written; into `tables`
    (job_tables), which say when their files are due to be uploaded (`push`: uploads them, returns whether it
    could)."""

    def __init__(self, rows: Rows, todo: list[int], per_video: int, tables: tuple[Table, Table],
                 push: Callable[[list[str]], bool] | None = None) -> None:
        self.rows, self.per_video = rows, per_video
        self.predictions, self.files = tables
        self.sums: dict[int, np.ndarray] = {}
        self.seen: Counter[int] = Counter()
        todo_set = set(todo)
        self.groups = {path: members for path, members in rows.groups.items() if todo_set & set(members)}
        self.group_of = {i: path for path, members in self.groups.items() for i in members}
        self.file_sums: dict[str, np.ndarray] = {}
        self.file_read: Counter[str] = Counter()
        self.file_left = {path: len(members) for path, members in self.groups.items()}
        self.written = 0
        self.dropped = 0
        self.push = push
        self.unpushed: list[str] = []  # files written since the last upload that went through

    def add(self, video_index: np.ndarray, logits: np.ndarray) -> None:
        """One batch of per-view logits (N, K) of the rows `video_index` (N,)."""
        shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
        for vid, p in zip(video_index.tolist(), probs, strict=True):
            self.sums[vid] = self.sums[vid] + p if vid in self.sums else p
            self.seen[vid] += 1
            if self.seen[vid] == self.per_video:
                self._write(vid, self.sums.pop(vid) / self.per_video)
        now = time.monotonic()
        self._due(self.predictions.flush_now_and_then(now) + self.files.flush_now_and_then(now))

    def _write(self, vid: int, probs: np.ndarray | None, why: str = "") -> None:
        self.seen.pop(vid, None)
        self.predictions.write([vid, self.rows.shown[vid], self.rows.starts[vid], self.rows.ends[vid]], probs, why)
        self.written += 1
        self.dropped += bool(why)
        path = self.group_of.get(vid)
        if path is None:
            return
        if probs is not None:
            self.file_sums[path] = self.file_sums[path] + probs if path in self.file_sums else probs
            self.file_read[path] += 1
        self.file_left[path] -= 1
        if not self.file_left[path]:
            self._write_file(path, why)

    def _write_file(self, path: str, why: str) -> None:
        read = self.file_read.pop(path, 0)
        probs = self.file_sums.pop(path) / read if read else None
        members = self.groups[path]
        self.files.write([self.rows.shown[members[0]], len(members), read], probs,
                         "" if read else f"none of its clips could be read ({why})")

    def _due(self, names: list[str]) -> None:
        """Files the tables say are due for upload: pushed with any an earlier push could not upload."""
        self._not_pushed(names)
        if names and self.push is not None and self.push(self.unpushed):
            self.unpushed = []

    def _not_pushed(self, names: list[str]) -> None:
        self.unpushed += [name for name in names if name not in self.unpushed]

    def finish(self, dropped: dict[int, str]) -> None:
        """The rows that could not be read, each with why; then every table written and closed."""
        for vid in sorted(dropped):
            self._write(vid, None, dropped[vid])
        self.close()

    def close(self) -> None:
        """Every table written and closed; what is left to upload is in `unpushed`."""
        for table in (self.predictions, self.files):
            self._not_pushed(table.close())


# ---------------------------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------------------------


def plan_batch(request: BatchRequest, rows: Rows) -> Any:
    """An evaluate.EvalPlan for the rows (unlabelled) with the checkpoint's model, the label set, views, crops and
    fusion as `predict` picks them; nothing of Ray yet."""
    from workflows.evaluate import EvalPlan, EvalRequest, scoring_recipe
    from workflows.inference import check_weights_fit, read_checkpoint, resolve_labels
    from workflows.recipe import check_clip_file, recipe_to_dict

    checkpoint = read_checkpoint(request.checkpoint, request.tracking_uri)
    recipe = scoring_recipe(EvalRequest(overrides=request.overrides), checkpoint)
    check_weights_fit(checkpoint.directory, recipe)
    check_clip_file(recipe, "model.clip_pretrained (the CLIP the checkpoint was trained with)")
    label_map, labels_source = resolve_labels(request.labels, checkpoint)
    fusion = request.zero_shot_fusion if request.zero_shot_fusion is not None else recipe.eval.zero_shot_fusion
    manifest = rows.manifest(request.manifest or "the videos given", list(range(len(rows))))
    from workflows.outputs import OutputFolder

    output = OutputFolder(request.out)  # a bucket prefix: a staging folder here, pushed to it
    return EvalPlan(recipe=recipe, model_section=recipe_to_dict(recipe)["model"],
                    seed=checkpoint.training_seed(recipe), checkpoint=checkpoint.directory, state=checkpoint.state,
                    manifest=manifest, label_map=label_map, labels_source=labels_source,
                    mode="fusion" if fusion else "dist",
                    views=request.views if request.views is not None else recipe.eval.test_views,
                    crops=request.crops if request.crops is not None else recipe.eval.test_crops,
                    out_dir=output.local, tracking_uri=request.tracking_uri,
                    checkpoint_source=checkpoint.source, output=output)


def summary(output: Any, tables: tuple[Table, Table]) -> dict[str, Any]:
    """What the output folder (outputs.OutputFolder) holds now in `tables`: videos predicted and dropped (by
    reason), the most predicted classes, and where the files are."""
    predictions, files = tables
    predicted, reasons = Counter(), Counter()
    written = predictions.columns(["class_1", "dropped"])
    for top, dropped in zip(written["class_1"], written["dropped"], strict=True):
        if dropped:
            reasons[dropped.split(":", 1)[0]] += 1
        else:
            predicted[top] += 1
    file_rows = len(files.columns(["path"])["path"])
    result = {"predicted": sum(predicted.values()), "dropped": dict(reasons), "dropped_total": sum(reasons.values()),
              "files": file_rows, "most_predicted": predicted.most_common(10),
              "predictions": f"{output}/{predictions.shown}"}
    if file_rows:
        result["file_predictions"] = f"{output}/{files.shown}"
    return result


def run_batch_predict(request: BatchRequest, progress: bool = True) -> dict[str, Any]:
    """Plan (fails before Ray on bad input), continue or start the job in `--out`, score the rows not written yet
    on Ray, writing rows as they come; returns `summary`."""
    from workflows.console import quiet_ray_console
    from workflows.data.shared_disk import check_videos_reachable
    from workflows.inference import scoring_warnings
    from workflows.recipe import model_config
    from workflows.run_lock import claim_run_directory
    from workflows.runtime import ensure_ray, local_cpus_for

    rows = rows_to_score(request)
    plan = plan_batch(request, rows)
    output, out = plan.output, plan.out_dir
    if request.manifest:  # the files and folders given are listed as they are found
        check_videos_reachable(plan.manifest, "manifest")
    identity = job_identity(request, plan, rows)
    tables = job_tables(out, request.format, plan.class_names, shown_top(request, plan))
    output.fetch([JOB_FILE, LABELS_FILE, *(table.shown for table in tables)])  # an earlier run's, from a bucket
    check_same_job(out, identity, str(output))  # another job's folder: refused before Ray starts
    cfg = model_config(plan.recipe.model)
    for line in scoring_warnings(views=plan.views, views_from="--views" if request.views is not None else
                                 "the checkpoint recipe's eval.test_views", fix_views="Lower --views", crops=plan.crops,
                                 num_frames=cfg.num_frames, class_names=plan.class_names,
                                 labels_from=plan.labels_source):
        print(line, file=sys.stderr, flush=True)
    note = csv_size_note(request.format, shown_top(request, plan), len(plan.class_names))
    if note:
        print(note, file=sys.stderr, flush=True)
    quiet_ray_console(request.verbose)
    ensure_ray(local_cpus_for(plan.recipe), quiet=not request.verbose)
    # One driver per output folder on this cluster: a second one (a resubmitted job) would rewrite the rows this
    # one appends to. Held until the job is done.
    with claim_run_directory(output.uri if output.remote else str(out.absolute()), "--out",
                             clash="a second driver would write the same predictions (each rewriting the other's "
                                   "rows). Wait for it to end or stop it (`ray job stop <id>`, or Ctrl-C), or "
                                   "choose another --out"):
        return _predict_into(request, plan, rows, identity, tables, progress)


def _predict_into(request: BatchRequest, plan: Any, rows: Rows, identity: dict[str, Any],
                  tables: tuple[Table, Table], progress: bool) -> dict:
    """run_batch_predict once Ray is up and the output folder claimed: keep what an earlier run wrote, score the
    rest, push it."""

    from workflows.evaluate import start_scoring
    from workflows.runtime import ray_description

    output, out = plan.output, plan.out_dir
    retry_s = plan.recipe.data.storage_retry_s
    done, rewritten = continue_job(out, identity, rows, tables)
    todo = [i for i in range(len(rows)) if i not in done]
    out.mkdir(parents=True, exist_ok=True)
    (out / JOB_FILE).write_text(json.dumps(identity, indent=2) + "\n")
    from workflows.data.manifest import save_labels

    save_labels({name: i for i, name in enumerate(plan.class_names)}, out / LABELS_FILE)
    output.push([JOB_FILE, LABELS_FILE, *rewritten], retry_s=retry_s)
    if progress:
        step = f", step {plan.state['step']}" if "step" in plan.state else ""
        for note in rows.notes:
            print(f"{LOG_PREFIX} note: {note}", flush=True)
        print(f"{LOG_PREFIX} {plan.checkpoint_source} ({plan.recipe.model.preset}{step}), {plan.mode} logits, "
              f"{plan.views} views x {plan.crops} crops, {len(plan.class_names)} classes ({plan.labels_source}): "
              f"{len(rows)} {'rows' if rows.groups else 'videos'} into {output}"
              + (f"; continuing: {len(done)} written before, {len(todo)} to go" if done else ""), flush=True)
    if not todo:
        result = summary(output, tables)
        output.finish([], retry_s=retry_s)
        return result
    # The whole job's rows, only `todo` read: the bad-video limit stays over the job (rows written before count as
    # read), not over what is left (one unreadable video of a job's 1000, scored again, would be 1 of 1).
    plan.manifest, plan.positions = rows.manifest(plan.manifest.source, list(range(len(rows)))), todo
    if progress:
        print(f"{LOG_PREFIX} on {ray_description()}", flush=True)
    pipeline = start_scoring(plan, request.actors)
    per_video = plan.views * plan.crops
    collector = Collector(rows, todo, per_video, tables, push=output.push_or_say if output.remote else None)
    if progress:
        print(f"{LOG_PREFIX} scoring on {pipeline.describe()}", flush=True)
    start = time.perf_counter()
    try:
        dropped, _ = pipeline.run(lambda batch: collector.add(batch["video_index"], batch["logits"]),
                                  videos=len(todo), per_video=per_video, prefix=LOG_PREFIX, progress=progress,
                                  written=f"The rows written so far are kept in {output}; the same command continues")
    except BaseException:
        collector.close()  # what was scored stays written
        if output.remote:
            output.push_or_say(collector.unpushed)
        raise
    collector.finish(dropped)
    unfinished = sorted(collector.seen)
    if unfinished:  # a bug, never a data problem: every decoded video gives exactly views x crops clips
        raise RuntimeError(f"rows {unfinished[:5]} got a number of scored clips other than {plan.views} x {plan.crops}")
    if collector.written < len(todo):  # a pipeline that ended early: the rows it never gave are not in the tables
        from workflows.evaluate import IncompleteEvaluation

        raise IncompleteEvaluation(
            f"the scoring ended before {len(todo) - collector.written} of the {len(todo)} videos were scored or "
            f"counted as dropped (an error above may say why); the rows written are kept in {output}: the same "
            f"command continues the job")
    result = summary(output, tables)
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["scored_now"] = collector.written - collector.dropped
    record_in_mlflow(request, plan, identity, result)
    output.finish(collector.unpushed, retry_s=retry_s)
    return result


def record_in_mlflow(request: BatchRequest, plan: Any, identity: dict[str, Any], result: dict[str, Any]) -> None:
    """A run of this job in the checkpoint's MLflow store (`evaluate`'s choice of store, a child of the training run
    when known): what was scored and how, the counts, and job.json; the rows stay in --out (they can be millions).
    Each run that scored rows is one MLflow run (a continued job: one per run). Adds mlflow_run_id to `result` when
    one was logged."""
    from workflows.evaluate import scoring_tracking_uri
    from workflows.runtime import redact_secrets
    from workflows.tracking import Tracker

    uri = scoring_tracking_uri(plan, request.mlflow)
    if not uri:
        return
    # where the rows are, as read later from anywhere: absolute (`--out` as typed may be relative)
    where = plan.output.shown if plan.output.remote else str(plan.out_dir.absolute())
    tracker = Tracker(uri, plan.recipe.mlflow.experiment, run_name=f"predict-{plan.recipe.run.name}",
                      parent_run_id=plan.state.get("mlflow_run_id"),
                      tags={"dist.kind": "predict", "dist.predictions": where},
                      who="the prediction job")
    tracker.log_params({"checkpoint": identity["checkpoint"], "step": identity["step"], "inputs":
                        redact_secrets(request.manifest) if request.manifest else f"{len(request.videos)} given",
                        **{k: identity[k] for k in ("num_classes", "mode", "views", "crops", "top", "clip_seconds",
                                                    "rows", "format")}})
    tracker.log_metrics({f"predict_{k}": float(result.get(k, 0)) for k in ("predicted", "dropped_total", "files",
                                                                            "scored_now", "seconds")},
                        step=int(identity["step"] or 0))
    tracker.log_artifact(plan.out_dir / JOB_FILE, "prediction")
    tracker.finish()
    if tracker.active:
        result["mlflow_run_id"] = tracker.run_id


def format_summary(result: dict[str, Any]) -> str:
    dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(result["dropped"].items()))
    most = ", ".join(f"{name} {n}" for name, n in result["most_predicted"][:5])
    lines = [f"{LOG_PREFIX} {result['predicted']} predicted"
             + (f", {result['dropped_total']} could not be read ({dropped})" if result["dropped_total"] else "")
             + (f", {result['files']} long file{'s' if result['files'] != 1 else ''}" if result["files"] else "")
             + (f" (this run: {result['scored_now']} in {result['seconds']:.1f} s)" if "seconds" in result else ""),
             f"{LOG_PREFIX} most predicted: {most}" if most else "",
             f"{LOG_PREFIX} written: {result['predictions']}"
             + (f", {result['file_predictions']}" if "file_predictions" in result else "")]
    return "\n".join(line for line in lines if line)

