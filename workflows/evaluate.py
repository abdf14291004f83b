"""Multi-view testing of a checkpoint (or of frozen CLIP alone) on any label set:
`python -m workflows evaluate --checkpoint C [--labels L] [--manifest M] [--views 3] [--crops 1|3] ...`.

The reference test protocol (§4.2): `views` temporal views x `crops` spatial crops per video, softmax scores
summed per video, each video counted once. Runs on Ray Data: the ingest layer's `build_clip_dataset` decodes
(CPU tasks), a `map_batches` actor pool of `ViewScorer`s runs the model (one GPU per actor when the cluster
has GPUs, CPU otherwise) and returns per-view logits, and the driver sums them per video (`VideoScores`).

The model is rebuilt from the checkpoint by `workflows.inference` (shared with `predict`): the architecture its
`state.json` names, the frozen CLIP from its tag or, for random-init CLIPs (tiny/small presets), from the run's
seed. Classes enter only through their names, so `--labels` evaluates on any label set (zero-shot);
`--zero-shot-fusion` blends the frozen CLIP's logits in, and `--clip-only` scores with frozen CLIP alone (no
checkpoint needed).

Writes metrics.json, per_class_accuracy.csv, predictions.csv and confusion_matrix.png (and every video's class
probabilities in scores.npz with `--save-scores`; with a manifest of clips cut from longer files, each file scored as
the mean of its clips too, in file_predictions.csv and metrics.json's `per_file`) into `--out` (default
`<run dir>/evals/<checkpoint>-eval-<time>` for a run's checkpoint_*, out of reach of the run's checkpoint retention;
`<checkpoint>/eval-<time>` for a checkpoint folder of its own), prints a summary, and logs an MLflow run into the
training run's store when it has one (never failing when MLflow is unreachable). A folder holding an earlier
evaluation is refused before any scoring (`--overwrite` removes that evaluation's files first).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workflows.config_loader import (
    CommandParser,
    ConfigError,
    add_override_option,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_yaml,
)
from workflows.inference import (
    REGISTRY_SCHEME,
    LoadedCheckpoint,
    Mode,
    build_eval_model,
    check_weights_fit,
    model_logits,
    read_checkpoint,
    resolve_labels,
    scoring_autocast,
    scoring_precision,
    scoring_warnings,
)
from workflows.recipe import Recipe, check_clip_file, model_config, recipe_to_dict
from workflows.runtime import is_remote

LOG_PREFIX = "[evaluate]"


# ---------------------------------------------------------------------------------------------------------------
# the scoring actor (the model itself: workflows.inference, shared with predict.py)
# ---------------------------------------------------------------------------------------------------------------


class ViewScorer:
    """Ray Data actor: clip rows in, per-view logits out (frames are not sent back)."""

    def __init__(self, model_section: dict[str, Any], seed: int, weights: list | None, class_names: list[str],
                 mode: Mode, use_gpu: bool, precision: str, threads: int = 1) -> None:
        import torch

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        state = None
        if weights:  # [ObjectRef]: Ray Data does not resolve references inside constructor arguments
            import ray

            state = ray.get(weights[0])
        self.model = build_eval_model(model_section, seed, state).to(self.device)
        self.class_names, self.mode, self.precision = class_names, mode, precision

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        frames = torch.from_numpy(np.array(batch["frames"])).to(self.device)  # (N, T_d, S, S, 3); a writable copy
        with scoring_autocast(self.device, self.precision):
            logits = model_logits(self.model, frames, self.class_names, self.mode)
        return {"logits": logits.float().cpu().numpy(),  # (N, K)
                **{k: np.asarray(batch[k], np.int64) for k in ("video_index", "label", "view", "crop")}}


# ---------------------------------------------------------------------------------------------------------------
# resolving what to evaluate (all before Ray starts)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EvalRequest:
    """What the command line asked for (None = from the recipe)."""

    checkpoint: str | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    manifest: str | None = None
    labels: str | None = None
    views: int | None = None
    crops: int | None = None
    zero_shot_fusion: bool = False
    clip_only: bool = False
    preset: str | None = None
    out: str | None = None
    actors: int | None = None
    mlflow: bool | None = None  # None: log when the run already has a tracking store
    tracking_uri: str | None = None  # the MLflow store of a models:/ checkpoint; the evaluation is logged there too
    verbose: bool = False  # Ray's own INFO lines and worker output on the console too
    save_scores: bool = False  # also write every video's class probabilities (scores.npz)
    overwrite: bool = False  # --out holds an earlier evaluation: remove its files (OUTPUT_FILES) instead of refusing
    # cut each whole video of the manifest into clips of this many seconds first (data clips' cut, written as
    # clips.csv in the output folder), so long recordings are scored per clip and per file
    clip_seconds: float | None = None


@dataclass
class EvalPlan:
    """Everything resolved and validated: what `score_views` and `write_outputs` need."""

    recipe: Recipe
    model_section: dict[str, Any]
    seed: int
    checkpoint: Path | None
    state: dict[str, Any]
    manifest: Any  # workflows.data.manifest.Manifest
    label_map: dict[str, int]
    labels_source: str
    mode: Mode
    views: int
    crops: int
    out_dir: Path
    tracking_uri: str | None = None  # the store a models:/ checkpoint came from
    checkpoint_source: str | None = None  # where the checkpoint came from (its URI when fetched from a bucket)
    warnings: list[str] = field(default_factory=list)  # printed once before the scoring starts
    save_scores: bool = False  # scores.npz beside the other outputs
    cut: Any = None  # with --clip-seconds: what cutting the manifest into clips wrote (clips.CutManifest)
    output: Any = None  # where the outputs go (outputs.OutputFolder): out_dir, or a bucket prefix it is pushed to
    # The manifest rows to score (None: all). The rest count as read for data.max_bad_fraction, which is then over
    # the whole manifest: a continued `predict --ray` job scores what is left, and its bad share is the job's.
    positions: list[int] | None = None

    @property
    def class_names(self) -> list[str]:
        from workflows.data.manifest import class_names

        return class_names(self.label_map)


def plan_evaluation(request: EvalRequest) -> EvalPlan:
    """Resolve the recipe, model, label set and manifest; raise ConfigError/ManifestError/FileNotFoundError
    with the reason when something does not fit."""
    _check_counts(request)
    checkpoint = _checkpoint_of(request)
    recipe = scoring_recipe(request, checkpoint)
    if checkpoint is not None and not request.clip_only:
        check_weights_fit(checkpoint.directory, recipe)
    check_clip_file(recipe, "model.clip_pretrained (the CLIP the checkpoint was trained with)")
    seed = checkpoint.training_seed(recipe) if checkpoint is not None else recipe.train.seed
    label_map, labels_source = _label_set(request, recipe, checkpoint)
    manifest = _manifest(request.manifest or recipe.data.val_manifest, label_map, labels_source)
    # Both valid: the flags by _check_counts, the recipe's eval.test_views / test_crops by EvalSection.
    views = request.views if request.views is not None else recipe.eval.test_views
    crops = request.crops if request.crops is not None else recipe.eval.test_crops
    mode: Mode = "clip_only" if request.clip_only else \
        "fusion" if request.zero_shot_fusion or recipe.eval.zero_shot_fusion else "dist"
    directory = checkpoint.directory if checkpoint is not None else None
    from workflows.data.manifest import class_names
    from workflows.outputs import OutputFolder

    # An existing file there, a place that cannot be written, an earlier evaluation: found before any scoring, not
    # after it. A bucket prefix: the outputs are written in a staging folder and uploaded at the end.
    output = OutputFolder(_out_dir(request, recipe, directory),
                          "--out" if request.out else "the output folder (--out to choose another)")
    out_dir = output.local
    try:
        prepare_output_folder(output, request.overwrite)
        cut = None
        if request.clip_seconds is not None:  # after the labels and the output folder are known to be right
            cut = _cut_into_clips(manifest.source, request.clip_seconds, out_dir)
            manifest = _manifest(cut.manifest, label_map, labels_source)
        if request.save_scores:
            check_room_for_scores(out_dir, len(manifest), len(class_names(label_map)))
    except BaseException:
        output.restore(OUTPUT_FILES)  # an earlier evaluation --overwrite set aside, back in place
        output.discard()  # the folder made for it, still empty
        raise
    plan = EvalPlan(recipe=recipe, model_section=recipe_to_dict(recipe)["model"], seed=seed, checkpoint=directory,
                    state=checkpoint.state if checkpoint is not None else {}, manifest=manifest, label_map=label_map,
                    labels_source=labels_source, mode=mode, views=views, crops=crops,
                    out_dir=out_dir, tracking_uri=request.tracking_uri,
                    checkpoint_source=checkpoint.source if checkpoint is not None else None,
                    save_scores=request.save_scores, cut=cut, output=output)
    plan.warnings = scoring_warnings(
        views=views, views_from="--views" if request.views is not None else "eval.test_views",
        fix_views=f"Lower --views (left out: eval.test_views, {recipe.eval.test_views})" if request.views is not None
        else "Pass --views 3, or lower eval.test_views (--set eval.test_views=3)",
        crops=crops, num_frames=model_config(recipe.model).num_frames, class_names=plan.class_names,
        labels_from=labels_source)
    return plan


def _check_counts(request: EvalRequest) -> None:
    """--views, --crops and --actors as given (None: the default) are usable counts: a 0 is never replaced by the
    default, a negative one never reaches Ray."""
    defaults = {"--views": "eval.test_views of the recipe, 3 by default",
                "--actors": "one per GPU, or CPUs / 4 capped at 4 without GPUs"}
    for flag, value in (("--views", request.views), ("--actors", request.actors)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {value}); leave it out for the default ({defaults[flag]})")
    if request.crops not in (None, 1, 3):
        raise ConfigError(f"--crops must be 1 (centre) or 3 (left, centre, right), got {request.crops}")


def _checkpoint_of(request: EvalRequest) -> LoadedCheckpoint | None:
    """The checkpoint to evaluate (None: frozen CLIP alone), after checking the flags fit together."""
    if request.clip_only and request.zero_shot_fusion:
        raise ConfigError("--clip-only and --zero-shot-fusion exclude each other (clip-only has no DiST to blend)")
    if request.preset and not request.clip_only:
        raise ConfigError("--preset picks the CLIP architecture for --clip-only; a checkpoint brings its own model")
    if request.checkpoint:
        return read_checkpoint(request.checkpoint, request.tracking_uri)
    if not request.clip_only:
        raise ConfigError("--checkpoint is required (or use --clip-only --preset NAME for frozen CLIP alone)")
    if not (request.preset or request.config):
        raise ConfigError("--clip-only without a checkpoint needs --preset NAME (or --config) to pick the CLIP")
    return None


def scoring_recipe(request: EvalRequest, checkpoint: LoadedCheckpoint | None) -> Recipe:
    """`--config` (default: the checkpoint's recipe.yaml) with the checkpoint's model section (or `--preset`'s)
    and the `--set` overrides."""
    base = load_yaml(request.config) if request.config else dict(checkpoint.raw_recipe if checkpoint else {})
    if request.preset:
        base["model"] = {"preset": request.preset}
    elif checkpoint is not None:
        base["model"] = checkpoint.model_section  # the architecture the checkpoint was trained with
    return from_dict(Recipe, apply_overrides(Recipe, base, request.overrides))


def _label_set(request: EvalRequest, recipe: Recipe,
               checkpoint: LoadedCheckpoint | None) -> tuple[dict[str, int], str]:
    """(label map, where it came from): --labels, else the recipe's label file when it exists, else the class
    names stored in the checkpoint."""
    labels_path = request.labels or recipe.data.labels
    usable = labels_path and (request.labels or is_remote(labels_path) or Path(labels_path).exists())
    return resolve_labels(labels_path if usable else None, checkpoint,
                          missing=f"no label file: pass --labels (data.labels {labels_path or 'is not set'}"
                                  f"{' does not exist' if labels_path else ''})")


def _manifest(manifest_path: str | None, label_map: dict[str, int], labels_source: str) -> Any:
    """The videos to evaluate (--manifest, else data.val_manifest), every label checked against the label set, and
    its local videos there at all (`check_videos_reachable`)."""
    from workflows.data.manifest import ManifestError, load_manifest
    from workflows.data.shared_disk import check_videos_reachable

    if not manifest_path:
        raise ConfigError("no manifest to evaluate: pass --manifest or set data.val_manifest")
    manifest = load_manifest(manifest_path, label_map, strict=False)  # unknown labels: said below, with the fix
    if manifest.unknown_labels:
        shown = "; ".join(f"{name!r} ({manifest.where(rows)})"
                          for name, rows in list(manifest.unknown_labels.items())[:5])
        raise ManifestError(f"manifest {manifest_path}: {len(manifest.unknown_labels)} label(s) not in the label "
                            f"set ({len(label_map)} classes, from {labels_source}): {shown}. Evaluate with a label "
                            f"file that names every class of the manifest (--labels)")
    check_videos_reachable(manifest, "manifest")
    return manifest


CLIPS_MANIFEST = "clips.csv"  # --clip-seconds: the manifest's videos cut into clips, in the output folder
EVALS_FOLDER = "evals"  # in a run directory: the default output folders of its checkpoints' evaluations


def _cut_into_clips(manifest: str, seconds: float, out_dir: Path) -> Any:
    """--clip-seconds: `manifest` with each whole video cut into clips (`clips.cut_manifest`, rows with a window
    kept), written as CLIPS_MANIFEST in `out_dir`."""
    from workflows.data.clips import cut_manifest

    try:
        return cut_manifest(manifest, out_dir / CLIPS_MANIFEST, seconds, progress=True)
    except ValueError as exc:  # a length that is no length
        raise ConfigError(str(exc)) from None


def _out_dir(request: EvalRequest, recipe: Recipe, checkpoint: Path | None) -> str | Path:
    """--out (a folder, or a bucket prefix), else for a local checkpoint `<run dir>/evals/<checkpoint>-eval-<time>`
    when it is a run's checkpoint_* (what a run directory resolves to: inside it, the run's checkpoint retention
    would delete the evaluation with the checkpoint) and `<checkpoint>/eval-<time>` for a checkpoint folder of its
    own; `eval/<name>-<time>` for one fetched from a registry or a bucket, else (frozen CLIP alone)
    `eval/clip-only-<preset>-<time>`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if request.out:
        return request.out if is_remote(request.out) else Path(request.out).expanduser()
    if request.clip_only:  # not the checkpoint's evaluation: kept out of its folder
        return Path("eval") / f"clip-only-{recipe.model.preset}-{stamp}"
    if request.checkpoint and request.checkpoint.startswith(REGISTRY_SCHEME):  # fetched into a temporary directory
        return Path("eval") / f"{request.checkpoint.removeprefix(REGISTRY_SCHEME).replace('/', '-')}-{stamp}"
    if request.checkpoint and is_remote(request.checkpoint):  # fetched from a bucket into a temporary directory
        name = request.checkpoint.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        return Path("eval") / f"{name}-{stamp}"
    from workflows.checkpoints import CHECKPOINT_PREFIX

    if checkpoint is not None and checkpoint.name.startswith(CHECKPOINT_PREFIX):
        return checkpoint.parent / EVALS_FOLDER / f"{checkpoint.name}-eval-{stamp}"
    if checkpoint is not None:
        return checkpoint / f"eval-{stamp}"
    return Path("eval") / f"clip-only-{recipe.model.preset}-{stamp}"


# ---------------------------------------------------------------------------------------------------------------
# scoring on Ray
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ViewResults:
    """Per-video summed scores plus what was seen on the way."""

    scores: Any  # workflows.metrics.VideoScores
    rows: int
    rows_per_video: dict[int, int]
    drops: Any  # workflows.data.drops.DropReport
    dropped_videos: dict[int, str]  # manifest row -> why it was dropped
    seconds: float


@dataclass
class ScoringPipeline:
    """A plan's videos decoded into views x crops clips and scored by an actor pool (`start_scoring`): iterate
    `views` for batches of per-view logits; `counter` (named `counter_name`) counts what could not be read."""

    views: Any  # ray.data.Dataset of {"logits", "video_index", "label", "view", "crop"}
    counter: Any  # the DropCounter actor of this scoring alone
    counter_name: str
    actors: int
    use_gpu: bool

    def describe(self) -> str:
        return f"{self.actors} {'GPU' if self.use_gpu else 'CPU'} actor(s)"

    def run(self, consume: Callable[[dict[str, Any]], None], *, videos: int, per_video: int, prefix: str,
            progress: bool = True, written: str = "Nothing was written") -> tuple[dict[int, str], Any]:
        """Iterate the pipeline: each batch of per-view logits to `consume`, a progress line (`prefix`) every 5 s
        over `videos` videos of `per_video` clips; then (every dropped video: manifest row -> why, the drop report).
        The decoders' errors are said plainly (`plain_scoring_errors`, `written`: what a failure leaves behind);
        the drop counter is killed after, whatever happens."""
        import ray

        from workflows.data.drops import get_drop_report

        start = last = time.perf_counter()
        clips = 0
        try:
            with plain_scoring_errors(written):
                for batch in self.views.iter_batches(batch_size=None, batch_format="numpy"):
                    consume(batch)
                    clips += len(batch["video_index"])
                    now = time.perf_counter()
                    if progress and now - last > 5:
                        last = now
                        done, seconds = clips / per_video, now - start
                        eta = (videos - done) * seconds / max(done, 1e-9)
                        print(f"{prefix} {done:.0f}/{videos} videos ({100 * done / max(videos, 1):.0f}%), "
                              f"{clips / max(seconds, 1e-9):.1f} clips/s, ETA {eta / 60:.1f} min", flush=True)
                return (ray.get(self.counter.dropped_videos.remote("eval", 0)),
                        get_drop_report("eval", 0, name=self.counter_name))
        finally:
            ray.kill(self.counter)


def start_scoring(plan: EvalPlan, actors: int | None = None) -> ScoringPipeline:
    """The Ray Data pipeline of `plan` (nothing runs until it is iterated): decoders where the videos are seen, a
    pool of ViewScorer actors (`actors`, default one per GPU, or CPUs / 4 capped at 4), and a drop counter of its own.
    `ray.kill(pipeline.counter)` when done."""
    import ray

    from workflows.data.decode_nodes import decode_pool_size
    from workflows.data.drops import drop_counter

    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress line instead
    gpus = ray.cluster_resources().get("GPU", 0.0)
    use_gpu = gpus >= 1
    cpus = ray.cluster_resources().get("CPU", 1.0)
    pool = actors if actors is not None else int(gpus) if use_gpu else max(1, min(4, int(cpus) // 4))
    if pool < 1:
        raise ConfigError(f"actors must be >= 1, got {pool}")
    data = decoded_where_seen(plan.recipe.data, plan.manifest)
    if not use_gpu and not data.decode_actors:  # leave CPUs for the scoring actors
        data = dataclasses.replace(data, decode_actors=max(1, decode_pool_size(data) - pool))
    name = f"{data.drop_counter}:eval-{uuid.uuid4().hex[:8]}"  # this scoring's own drop counts
    data = dataclasses.replace(data, drop_counter=name)
    counter = drop_counter(name)
    return ScoringPipeline(views=_scored_views(plan, data, pool, use_gpu), counter=counter, counter_name=name,
                           actors=pool, use_gpu=use_gpu)


@contextmanager
def plain_scoring_errors(written: str = "Nothing was written") -> Iterator[None]:
    """Say the decoders' errors, which Ray wraps, plainly, with what to do: too many unreadable videos, storage that
    did not answer. `written`: what the failure leaves behind."""
    from workflows.data.drops import TooManyBadVideos
    from workflows.data.pipeline import decode_failure
    from workflows.data.video import StorageUnreachable

    try:
        yield
    except Exception as exc:
        plain = decode_failure(exc)
        if isinstance(plain, TooManyBadVideos):
            raise TooManyBadVideos(f"{plain} {written}. To score the readable videos anyway: "
                                   f"--set data.max_bad_fraction=1.0") from None
        if isinstance(plain, StorageUnreachable):
            raise StorageUnreachable(f"{plain}. {written}; run again once the storage answers "
                                     f"(data.storage_retry_s sets how long a read is retried)") from None
        raise


def score_views(plan: EvalPlan, actors: int | None = None, progress: bool = True) -> ViewResults:
    """Decode every video of the plan's manifest into views x crops clips, score them in an actor pool, and sum
    the softmax scores per video on the driver."""
    import torch

    from workflows.metrics import VideoScores

    pipeline = start_scoring(plan, actors)
    total = len(plan.manifest)
    per_video = plan.views * plan.crops
    if progress:
        print(f"{LOG_PREFIX} scoring {total} videos x {plan.views} views x {plan.crops} crops on "
              f"{pipeline.describe()}, {plan.mode} logits, {len(plan.class_names)} classes", flush=True)
    scores = VideoScores(len(plan.class_names))
    rows_per_video: dict[int, int] = {}

    def consume(batch: dict[str, Any]) -> None:
        scores.add(torch.tensor(batch["video_index"]), torch.tensor(batch["logits"]), torch.tensor(batch["label"]))
        for vid in batch["video_index"].tolist():
            rows_per_video[vid] = rows_per_video.get(vid, 0) + 1

    start = time.perf_counter()
    dropped_videos, drops = pipeline.run(consume, videos=total, per_video=per_video, prefix=LOG_PREFIX,
                                         progress=progress)
    seconds = time.perf_counter() - start
    rows = sum(rows_per_video.values())
    if progress:
        print(f"{LOG_PREFIX} scored {rows} clips of {len(rows_per_video)} videos in {seconds:.1f} s", flush=True)
    return ViewResults(scores=scores, rows=rows, rows_per_video=rows_per_video, drops=drops,
                       dropped_videos=dropped_videos, seconds=seconds)


def decoded_where_seen(data: Any, manifest: Any) -> Any:
    """The data section, its decoders kept on this node (its `ray.io/node-id` label) when the manifest's videos are
    local and another node of the cluster does not see them (`shared_disk.where_tasks_see`: there each would count
    as missing), said in a note. Only the decoders read the files; the scorers may run anywhere."""
    from workflows.data.shared_disk import where_tasks_see, witness_files

    local = [("the videos, e.g.", p) for p in witness_files(manifest.table.column("path").to_pylist(), count=1)]
    placement, _, note = where_tasks_see(local)
    if not placement:
        return data
    print(f"note: {note}", file=sys.stderr, flush=True)
    (key, value), = placement["label_selector"].items()
    return dataclasses.replace(data, decode_node_label=f"{key}={value}")


def _scored_views(plan: EvalPlan, data: Any, pool: int, use_gpu: bool) -> Any:
    """The Ray Data pipeline: the plan's videos decoded into views x crops clips (`data`: the recipe's data
    section, this evaluation's drop counter), scored by a pool of `pool` ViewScorer actors."""
    import ray

    from workflows.data.pipeline import build_clip_dataset

    recipe, cfg = plan.recipe, model_config(plan.recipe.model)
    weights = None
    if plan.checkpoint is not None and plan.mode != "clip_only":
        from workflows.checkpoints import read_weights

        weights = [ray.put({k: v.numpy() for k, v in read_weights(plan.checkpoint).items()})]
    precision = scoring_precision(recipe)
    clips = build_clip_dataset(data, plan.manifest, plan.label_map, split="eval", num_frames=cfg.num_frames,
                               crop_size=cfg.image_size, num_views=plan.views, num_crops=plan.crops,
                               counter_split="eval",
                               positions=None if plan.positions is None else np.asarray(plan.positions, np.int64))
    return clips.map_batches(
        ViewScorer,
        fn_constructor_kwargs={"model_section": plan.model_section, "seed": plan.seed, "weights": weights,
                               "class_names": plan.class_names, "mode": plan.mode, "use_gpu": use_gpu,
                               "precision": precision},
        batch_size=recipe.eval.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool),
        num_cpus=1,
        **({"num_gpus": 1} if use_gpu else {}),
    )


# ---------------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------------

# `--save-scores`: every scored video's class probabilities (the mean softmax over its views x crops), for fusing
# evaluations (two checkpoints, DiST and frozen CLIP, other view counts) or an analysis of its own. Arrays: scores
# (videos, classes) float32, video_index (the manifest row, as in predictions.csv), label, class_names; for a
# manifest of clips also file_scores (files, classes: the mean of each file's read clips, as file_predictions.csv),
# file_path and file_label.
SCORES_FILE = "scores.npz"

# Every file an evaluation writes into its output folder (write_outputs, --clip-seconds, --save-scores): one of them
# there is an earlier evaluation, which `--overwrite` removes, these names only, before the new one starts.
OUTPUT_FILES = ("metrics.json", "per_class_accuracy.csv", "predictions.csv", "confusion_matrix.csv",
                "confusion_matrix.png", "recipe.yaml", "file_predictions.csv", SCORES_FILE, CLIPS_MANIFEST)


def prepare_output_folder(output: Any, overwrite: bool = False) -> None:
    """`output` (outputs.OutputFolder) made ready before any scoring, so that it never mixes two evaluations: a
    local folder created and proven writable (`OutputFolder.create`); a checkpoint or run directory refused (the
    evaluation's recipe.yaml would replace theirs); an earlier evaluation there refused, or with `overwrite` its
    files (OUTPUT_FILES, nothing else) set aside until the new one is written (`OutputFolder.set_aside`: a failure
    on the way puts them back). ConfigError saying what is there and what to do."""
    from workflows.checkpoints import CHECKPOINT_PREFIX, STATE, WEIGHTS

    output.create()
    listed = output.listed()
    shown = f"{output.option} {output}"
    theirs = sorted(name for name in listed if name in (STATE, WEIGHTS) or name.startswith(CHECKPOINT_PREFIX))
    if theirs:
        raise ConfigError(f"{shown} is a checkpoint or run directory (it holds {', '.join(theirs[:3])}): the "
                          f"evaluation's files would mix with its own; choose another --out")
    earlier = [name for name in OUTPUT_FILES if name in listed]
    if earlier and not overwrite:
        raise ConfigError(f"{shown} holds an earlier evaluation ({', '.join(earlier)}): choose another --out, or "
                          f"remove those files or pass --overwrite to replace it (only those files are removed)")
    output.set_aside(earlier)


def check_room_for_scores(out_dir: str | Path, videos: int, classes: int) -> None:
    """--save-scores writes a float32 per video and class (~190 MB for K710's validation set): a disk without
    room for it fails here, before the scoring, not after it."""
    from workflows.runtime import free_bytes

    need, free, mib = videos * (4 * classes + 16) + 2**20, free_bytes(out_dir), 2**20  # + indices, labels, names
    if free < need:
        raise ConfigError(f"--save-scores: {SCORES_FILE} of {videos} videos x {classes} classes takes about "
                          f"{need / mib:.1f} MiB, and {out_dir}'s disk has {free / mib:.1f} MiB free: free space, "
                          f"choose another folder with --out, or leave --save-scores out")


def per_class_rows(confusion: Any, class_names: list[str]) -> list[dict[str, Any]]:
    """One row per class from a (K, K) [true, predicted] confusion matrix: videos, correct, accuracy (%)."""
    rows = []
    for k, name in enumerate(class_names):
        videos, correct = int(confusion[k].sum()), int(confusion[k, k])
        rows.append({"index": k, "class": name, "videos": videos, "correct": correct,
                     "accuracy": round(100.0 * correct / videos, 4) if videos else None})
    return rows


def _file_metrics(plan: EvalPlan, files: Any, scores: Any, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each file of a manifest of clips scored as a whole (`files`: its `metrics.FileIndex`, `scores`: the
    evaluation's VideoScores): writes file_predictions.csv (one row per file read); returns the accuracies for
    metrics.json and the files' `FileIndex.summary`."""
    names = plan.class_names
    summary = files.summary(*files.sums(scores))
    with (out / "file_predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "predicted", "probability", "correct", "clips"])
        for i, probs, clips in zip(summary["files_read"], summary["files_probs"], summary["files_clips"], strict=True):
            label, predicted = int(files.labels[i]), int(probs.argmax())
            writer.writerow([files.paths[i], names[label], names[predicted], round(float(probs[predicted]), 6),
                             int(label == predicted), clips])
    return {"top1": summary["top1"], "top5": summary["top5"], "mean_class_acc": summary["mean_class_acc"],
            "files": int(summary["videos"]), "clips": int(summary["clips"]), "mixed_label_files": len(files.mixed),
            "mixed_label_examples": files.mixed[:5]}, summary


class IncompleteEvaluation(RuntimeError):
    """The scoring pipeline ended without every planned video (neither scored nor counted as dropped)."""


def write_outputs(plan: EvalPlan, results: ViewResults) -> dict[str, Any]:
    """metrics.json, per_class_accuracy.csv, predictions.csv (one row per video), confusion_matrix.csv (counts),
    confusion_matrix.png, with `plan.save_scores` scores.npz (`SCORES_FILE`), and with a manifest naming a file in
    several rows (clips) file_predictions.csv, in `plan.out_dir`; returns the metrics."""
    import numpy as np

    from workflows.metrics import FileIndex, accuracy_summary, save_confusion_png

    scored, summed, labels = table = results.scores.table()  # the scored videos' manifest rows, in order
    counts = results.scores.counts(table)
    summary = accuracy_summary(counts)
    names = plan.class_names
    per_class = per_class_rows(counts["confusion"], names)
    incomplete = sorted(v for v, n in results.rows_per_video.items() if n != plan.views * plan.crops)
    if incomplete:  # a bug, never a data problem: every decoded video gives exactly views x crops clips
        raise RuntimeError(f"videos {incomplete[:5]} got a number of scored clips other than "
                           f"{plan.views} x {plan.crops}")
    expected = range(len(plan.manifest)) if plan.positions is None else plan.positions
    unaccounted = [v for v in expected if v not in results.scores.scores and v not in results.dropped_videos]
    if unaccounted:  # a pipeline that ended early: its metrics would pass for the whole manifest's
        raise IncompleteEvaluation(
            f"the scoring ended before {len(unaccounted)} of the {len(expected)} videos were scored or counted as "
            f"dropped (e.g. {plan.manifest.table.column('path')[unaccounted[0]].as_py()}; an error above may say "
            f"why); nothing was written: run it again")
    drops = results.drops
    metrics = {
        "top1": summary["top1"], "top5": summary["top5"], "mean_class_acc": summary["mean_class_acc"],
        "videos": int(summary["videos"]), "manifest_videos": len(plan.manifest), "rows": results.rows,
        "views": plan.views, "crops": plan.crops, "num_classes": len(names), "mode": plan.mode,
        "dropped": dict(drops.dropped), "dropped_total": drops.total_dropped,
        "dropped_examples": {reason: paths for reason, paths in drops.examples.items()},
        "checkpoint": plan.checkpoint_source or (str(plan.checkpoint) if plan.checkpoint else None),
        "step": plan.state.get("step"),
        "preset": plan.recipe.model.preset, "manifest": plan.manifest.source, "labels": plan.labels_source,
        "seconds": round(results.seconds, 2), "clips_per_s": round(results.rows / max(results.seconds, 1e-9), 2),
        "per_class": per_class, "out_dir": str(plan.output or plan.out_dir),
    }
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    probs = (summed / (plan.views * plan.crops)).numpy()  # the mean softmax over each video's clips, a row each
    row_of = {vid: i for i, vid in enumerate(scored)}
    with (out / "per_class_accuracy.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["index", "class", "videos", "correct", "accuracy"])
        writer.writeheader()
        writer.writerows([{**r, "accuracy": "" if r["accuracy"] is None else r["accuracy"]} for r in per_class])
    table = plan.manifest.table
    paths, label_names = table.column("path").to_pylist(), table.column("label_name").to_pylist()
    starts, ends = ([_seconds(v) for v in table.column(c).to_pylist()] for c in ("start", "end"))
    with (out / "predictions.csv").open("w", newline="") as f:  # every manifest row: scored, or why it was dropped
        writer = csv.writer(f)
        writer.writerow(["video_index", "path", "label", "predicted", "probability", "correct", "dropped", "start",
                         "end"])
        for vid in sorted(results.scores.scores.keys() | results.dropped_videos.keys()):
            if vid not in results.scores.scores:
                writer.writerow([vid, paths[vid], label_names[vid], "", "", "", results.dropped_videos[vid],
                                 starts[vid], ends[vid]])
                continue
            video_probs = probs[row_of[vid]]
            label, predicted = results.scores.labels[vid], int(video_probs.argmax())
            writer.writerow([vid, paths[vid], names[label], names[predicted], round(float(video_probs[predicted]), 6),
                             int(label == predicted), "", starts[vid], ends[vid]])
    files = FileIndex.of(paths, table.column("label").to_pylist())
    file_scores: dict[str, Any] = {}
    if files is not None:  # clips cut from longer files: each file scored as a whole too
        metrics["per_file"], read = _file_metrics(plan, files, results.scores, out)
        file_scores = {"file_scores": read["files_probs"].numpy().astype(np.float32),
                       "file_path": np.asarray([files.paths[i] for i in read["files_read"]], dtype=str),
                       "file_label": files.labels[read["files_read"]].numpy().astype(np.int64)}
    if plan.save_scores:
        np.savez(out / SCORES_FILE, scores=probs.astype(np.float32), video_index=np.asarray(scored, np.int64),
                 label=labels.numpy().astype(np.int64), class_names=np.asarray(names, dtype=str), **file_scores)
        metrics["scores_file"] = str(out / SCORES_FILE)
    if plan.cut is not None:
        metrics["clip_seconds"] = plan.cut.seconds
    with (out / "confusion_matrix.csv").open("w", newline="") as f:  # the counts behind the row-normalised image
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *names])
        writer.writerows([name, *map(int, row)] for name, row in zip(names, counts["confusion"].tolist(), strict=True))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    title = f"{plan.mode}, {plan.views}x{plan.crops} views: top-1 {metrics['top1']:.1f}% ({metrics['videos']} videos)"
    save_confusion_png(counts["confusion"], names, out / "confusion_matrix.png", title)
    (out / "recipe.yaml").write_text(dump_yaml(plan.recipe))
    return metrics


def _seconds(value: float | None) -> str:
    """A start/end cell as predictions.csv writes it: empty when not set (NaN)."""
    return "" if value is None or value != value else format(value, ".10g")


def format_summary(metrics: dict[str, Any], max_classes: int = 30) -> str:
    """The printed result: a header line, the accuracies, and per-class accuracy (the worst when many)."""
    labels_of = f", the label set of {metrics['checkpoint']}" if metrics["checkpoint"] else ""
    what = f"frozen CLIP alone ({metrics['preset']}{labels_of})" if metrics["mode"] == "clip_only" else \
        metrics["checkpoint"]
    lines = [f"evaluation of {what}",
             f"  mode {metrics['mode']}, {metrics['views']} views x {metrics['crops']} crops, "
             f"{metrics['num_classes']} classes, manifest {metrics['manifest']}",
             f"  videos {metrics['videos']} of {metrics['manifest_videos']} (dropped {metrics['dropped_total']}"
             f"{': ' + ', '.join(f'{k} {v}' for k, v in metrics['dropped'].items()) if metrics['dropped'] else ''})",
             f"  top-1 {metrics['top1']:6.2f}%   top-5 {metrics['top5']:6.2f}%   mean class accuracy "
             f"{metrics['mean_class_acc']:6.2f}%"]
    files = metrics.get("per_file")
    if files:
        mixed = f"; {files['mixed_label_files']} file(s) whose clips name different classes left out (e.g. " \
                f"{files['mixed_label_examples'][0]})" if files["mixed_label_files"] else ""
        lines.append(f"  per file: top-1 {files['top1']:6.2f}%   top-5 {files['top5']:6.2f}%   mean class accuracy "
                     f"{files['mean_class_acc']:6.2f}%   ({files['files']} files of {files['clips']} clips, each "
                     f"file's clip scores averaged{mixed})")
    seen = [r for r in metrics["per_class"] if r["videos"]]
    if len(seen) > max_classes:
        seen = sorted(seen, key=lambda r: r["accuracy"])[:10]
        lines.append("  the 10 worst classes:")
    width = max([len(r["class"]) for r in seen] + [5])
    lines.append(f"  {'class':<{width}}  videos  top-1")
    lines += [f"  {r['class']:<{width}}  {r['videos']:>6}  {r['accuracy']:5.1f}%" for r in seen]
    return "\n".join(lines)


def scoring_tracking_uri(plan: EvalPlan, wanted: bool | None) -> str | None:
    """Where `evaluate` and `predict --ray` record a scoring: the training run's MLflow store, i.e. the recipe's
    server (or MLFLOW_TRACKING_URI), or an existing sqlite store in the run directory (or beside the checkpoint).
    `wanted` True creates the run directory's store; False disables tracking."""
    from workflows.tracking import resolve_tracking_uri

    recipe = plan.recipe
    if wanted is False or (wanted is None and not recipe.mlflow.enabled):
        return None
    if plan.tracking_uri:  # where a models:/ checkpoint came from
        return plan.tracking_uri
    directories = [recipe.run_dir] + ([plan.checkpoint.parent] if plan.checkpoint is not None else [])
    for directory in directories:
        uri = resolve_tracking_uri(recipe.mlflow.tracking_uri, directory, create=False)
        if uri:
            return uri
    return resolve_tracking_uri(recipe.mlflow.tracking_uri, recipe.run_dir) if wanted and \
        not is_remote(recipe.run_dir) else None


def log_to_mlflow(plan: EvalPlan, metrics: dict[str, Any], uri: str) -> str | None:
    """Log the evaluation as an MLflow run (a child of the training run when known); returns its run id."""
    from workflows.tracking import Tracker

    clip_only = plan.mode == "clip_only"  # a baseline, not an evaluation of the checkpoint: not under its run
    name = "eval-clip-only" if clip_only or not plan.checkpoint else f"eval-{plan.recipe.run.name}"
    tracker = Tracker(uri, plan.recipe.mlflow.experiment, run_name=name,
                      parent_run_id=None if clip_only else plan.state.get("mlflow_run_id"),
                      tags={"dist.kind": "evaluate"}, who="the evaluation")
    tracker.log_params({k: metrics[k] for k in ("checkpoint", "step", "manifest", "labels", "mode", "views", "crops",
                                                "num_classes", "preset", "clip_seconds") if k in metrics})
    step = 0 if clip_only else int(metrics["step"] or 0)
    files = metrics.get("per_file") or {}
    tracker.log_metrics({f"eval_{k}": float(metrics[k]) for k in ("top1", "top5", "mean_class_acc", "videos")}
                        | {f"eval_file_{k}": float(files[k]) for k in ("top1", "top5", "mean_class_acc", "files")
                           if k in files}
                        | {"eval_dropped_total": float(metrics["dropped_total"])}, step=step)
    cut = [CLIPS_MANIFEST] if plan.cut is not None else []  # with --clip-seconds: the clips that were scored
    for name in ("metrics.json", "per_class_accuracy.csv", "confusion_matrix.png", *cut):
        tracker.log_artifact(plan.out_dir / name, "evaluation")
    tracker.finish()
    return tracker.run_id if tracker.active else None


def run_evaluate(request: EvalRequest, progress: bool = True) -> dict[str, Any]:
    """Plan (fails before Ray on bad input), score on Ray, write the outputs, log to MLflow; returns metrics."""
    from workflows.console import quiet_ray_console
    from workflows.runtime import ensure_ray, local_cpus_for, ray_description

    plan = plan_evaluation(request)
    if progress:
        what = "frozen CLIP alone" if plan.mode == "clip_only" else plan.checkpoint_source or plan.checkpoint
        step = f", step {plan.state['step']}" if plan.mode != "clip_only" and "step" in plan.state else ""
        for line in plan.cut.summary() if plan.cut is not None else []:
            print(f"{LOG_PREFIX} {line}", flush=True)
        print(f"{LOG_PREFIX} {what} ({plan.recipe.model.preset}{step}) on {plan.manifest.source}: "
              f"{len(plan.manifest)} videos, labels {plan.labels_source}", flush=True)
    for line in plan.warnings:
        print(line, file=sys.stderr, flush=True)
    try:
        quiet_ray_console(request.verbose)
        ensure_ray(local_cpus_for(plan.recipe), quiet=not request.verbose)
        if progress:
            print(f"{LOG_PREFIX} on {ray_description()}", flush=True)
        results = score_views(plan, actors=request.actors, progress=progress)
        if not results.scores.scores:  # every video dropped (data.max_bad_fraction=1.0 lets the run get here)
            drops = results.drops
            raise ValueError(f"none of the {len(plan.manifest)} videos could be read ({dict(drops.dropped)}; e.g. "
                             f"{'; '.join(p for paths in drops.examples.values() for p in paths[:2])}); nothing "
                             f"was written")
        metrics = write_outputs(plan, results)
    except BaseException:
        plan.output.restore(OUTPUT_FILES)  # an earlier evaluation --overwrite set aside, back in place
        plan.output.discard()  # the output folder made for it, when nothing was written in it
        raise
    uri = scoring_tracking_uri(plan, request.mlflow)
    if uri:
        metrics["mlflow_run_id"] = log_to_mlflow(plan, metrics, uri)
        metrics["mlflow_tracking_uri"] = uri
        (plan.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plan.output.finish(retry_s=plan.recipe.data.storage_retry_s)  # a bucket prefix: uploaded now
    return metrics


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="python -m workflows evaluate",
                                     description=__doc__.split("\n")[0].rstrip(":"))
    parser.add_argument("--checkpoint", help="checkpoint directory, a run directory (its latest checkpoint), local or "
                                             "in a bucket (s3://...), or a registered model models:/NAME/VERSION")
    parser.add_argument("--tracking-uri", help="the MLflow store of a models:/ checkpoint (default: "
                                               "MLFLOW_TRACKING_URI); the evaluation is logged there")
    parser.add_argument("--config", help="recipe YAML (default: the checkpoint's recipe.yaml)")
    add_override_option(parser, "override a recipe key, e.g. --set eval.batch_size=32")
    parser.add_argument("--manifest", help="videos to evaluate (default: data.val_manifest)")
    parser.add_argument("--labels", help="label file {class name: index}; any label set works (zero-shot)")
    parser.add_argument("--views", type=int, help="temporal views per video (default: eval.test_views, 3)")
    parser.add_argument("--crops", type=int, choices=(1, 3), help="spatial crops per view (default: eval.test_crops)")
    parser.add_argument("--zero-shot-fusion", action="store_true", help="blend DiST with frozen-CLIP logits")
    parser.add_argument("--clip-only", action="store_true", help="score with the frozen CLIP alone (baseline)")
    parser.add_argument("--preset", help="with --clip-only: the DiST preset whose CLIP to use")
    parser.add_argument("--out", help="output directory or bucket prefix (default: <run dir>/evals/<checkpoint>-eval-"
                                      "<time> for a run's checkpoint_*, <checkpoint>/eval-<time> for a checkpoint "
                                      "folder of its own, eval/<name>-<time> for a registered or remote checkpoint)")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out holds an earlier evaluation: remove its files (those an evaluation writes, "
                             "nothing else) first, instead of refusing")
    parser.add_argument("--actors", type=int, help="scoring actors (default: one per GPU, or CPUs / 4 capped at 4)")
    tracking = parser.add_mutually_exclusive_group()
    tracking.add_argument("--mlflow", dest="mlflow", action="store_true", default=None,
                          help="log to MLflow (default: only when the run already has a tracking store)")
    tracking.add_argument("--no-mlflow", dest="mlflow", action="store_false")
    parser.add_argument("--save-scores", action="store_true",
                        help=f"also write every video's class probabilities to {SCORES_FILE} in the output folder "
                             "(videos x classes float32), e.g. to fuse evaluations")
    parser.add_argument("--clip-seconds", type=float, metavar="S",
                        help=f"cut each whole video of the manifest into centred clips of S seconds first (written "
                             f"as {CLIPS_MANIFEST} in the output folder): long recordings scored per clip and per file")
    parser.add_argument("--json", action="store_true", help="print metrics.json to stdout (the summary to stderr)")
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray's own log lines and the workers' output (default: Ray's log files only)")
    args = parser.parse_args(argv)
    request = EvalRequest(checkpoint=args.checkpoint, config=args.config, overrides=args.overrides,
                          manifest=args.manifest, labels=args.labels, views=args.views, crops=args.crops,
                          zero_shot_fusion=args.zero_shot_fusion, clip_only=args.clip_only, preset=args.preset,
                          out=args.out, actors=args.actors, mlflow=args.mlflow, tracking_uri=args.tracking_uri,
                          verbose=args.verbose, save_scores=args.save_scores, clip_seconds=args.clip_seconds,
                          overwrite=args.overwrite)
    from workflows.console import stdout_kept_for_json
    from workflows.data.drops import TooManyBadVideos
    from workflows.data.video import StorageUnreachable

    try:
        with stdout_kept_for_json(args.json):
            metrics = run_evaluate(request)
    except (ConfigError, ValueError, FileNotFoundError, TooManyBadVideos, StorageUnreachable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except IncompleteEvaluation as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(metrics), file=sys.stderr if args.json else sys.stdout)
    print(f"results in {metrics['out_dir']}", file=sys.stderr if args.json else sys.stdout, flush=True)
    if metrics.get("mlflow_run_id"):
        print(f"MLflow run {metrics['mlflow_run_id']} in {metrics['mlflow_tracking_uri']}",
              file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
