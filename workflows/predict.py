"""Classify video files with a checkpoint, locally (no Ray), or a whole corpus on Ray with --ray:
`python -m workflows predict --checkpoint C [--labels L] video.mp4|folder [...] [--views V] [--top 5]
[--device auto] [--clip-seconds S] [--json]`; `--ray --out DIR [--manifest M]` is workflows.batch_predict's.

Each video is decoded and cut into clips exactly as the evaluation does (the data layer's `clips_from_video`:
segment sampling of `views` temporal views, short-side resize and centre crop; views, crops and zero-shot fusion
default to the checkpoint recipe's eval section, as `evaluate`'s do), scored, and the softmax
probabilities are averaged over its clips. A video that cannot be decoded is reported with its drop reason;
the others are still classified (exit status 1 when any video failed). The model runs on the GPU when there is
one (`--device auto`), in the recipe's precision there, as `evaluate` scores. While it scores one video, the next
ones decode in a small thread pool (`decode_ahead`: decord, PyAV and OpenCV release the GIL), at most
DECODE_AHEAD videos and DECODE_AHEAD_BYTES of clips ahead; results come in the order the videos were given.
Loading the checkpoint and scoring are `workflows.inference`'s, shared with `evaluate`. With `--clip-seconds`, a long
video is cut into centred clips of that length (`plan_windows`), each scored and shown as it comes, then the video
as the mean of its clips' probabilities (`_Report`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from workflows.config_loader import CommandParser, ConfigError, add_override_option
from workflows.inference import (
    Mode,
    load_predictor,
    model_logits,
    scoring_autocast,
    scoring_precision,
    scoring_warnings,
)
from workflows.recipe import Recipe
from workflows.runtime import is_remote

EVERY_CLASS = sys.maxsize  # --top all: every use takes min(top, number of classes)
DECODE_AHEAD = 4  # videos decoded ahead of the one being scored, at most ...
DECODE_AHEAD_BYTES = 1 << 30  # ... and at most this many bytes of their clips (views x crops x T x S x S x 3)


def clip_spec(model: Any, recipe: Recipe, views: int, crops: int) -> Any:
    """The data layer's ClipSpec for scoring: the recipe's eval decoding, the model's frames and crop size."""
    from workflows.data.pipeline import ClipSpec

    cfg = model.cfg
    return ClipSpec.from_config(recipe.data, split="eval", num_frames=cfg.num_frames, crop_size=cfg.image_size,
                                num_views=views, num_crops=crops)


def video_clips(path: str, spec: Any, start: float = math.nan, end: float = math.nan) -> Any:
    """(views * crops, T_d, S, S, 3) uint8 clips of one video (of its [start, end) seconds when given), one
    contiguous array (what a decoded video holds in memory while it waits to be scored). Raises
    workflows.data.video.BadVideo when the video is unusable."""
    import numpy as np

    from workflows.data.pipeline import clips_from_video

    return np.stack([r["frames"] for r in clips_from_video(path, 0, 0, start, end, spec)])


def clip_probs(model: Any, recipe: Recipe, class_names: list[str], clips: Any, mode: Mode = "dist") -> Any:
    """The class probabilities (K,) of one video's clips (`video_clips`), the softmax averaged over them."""
    import torch

    device = next(model.parameters()).device
    frames = torch.from_numpy(clips).to(device)  # (views * crops, T_d, S, S, 3) uint8
    with scoring_autocast(device, scoring_precision(recipe)):
        logits = model_logits(model, frames, class_names, mode)
    return torch.softmax(logits.float(), dim=-1).mean(dim=0).cpu()


def top_classes(probs: Any, class_names: list[str], top: int) -> list[tuple[str, float]]:
    """The `top` most probable (class name, probability) of a (K,) probability vector."""
    values, indices = probs.topk(min(top, len(class_names)))
    return [(class_names[i], float(p)) for p, i in zip(values.tolist(), indices.tolist(), strict=True)]


def score_clips(model: Any, recipe: Recipe, class_names: list[str], clips: Any, *, top: int = 5,
                mode: Mode = "dist") -> list[tuple[str, float]]:
    """Top-`top` (class name, probability) of one video's clips (`video_clips`), probabilities averaged over them."""
    return top_classes(clip_probs(model, recipe, class_names, clips, mode), class_names, top)


def predict_video(model: Any, recipe: Recipe, class_names: list[str], path: str, *, views: int = 3,
                  crops: int = 1, top: int = 5, mode: Mode = "dist") -> list[tuple[str, float]]:
    """Top-`top` (class name, probability) of one video, probabilities averaged over views x crops clips.
    Raises workflows.data.video.BadVideo when the video is unusable."""
    clips = video_clips(path, clip_spec(model, recipe, views, crops))
    return score_clips(model, recipe, class_names, clips, top=top, mode=mode)


def decode_ahead(paths: list[Any], decode: Callable[[Any], Any], ahead: int,
                 workers: int) -> Iterator[tuple[Any, Future]]:
    """(path, future of `decode(path)`) for each path (or a `Span` of one), in order, while the next `ahead` (at
    most) are already being decoded in a pool of `workers` threads (decord, PyAV and OpenCV release the GIL): the
    caller scores one video while the next ones decode. At most `ahead` + 1 decoded videos are held at once (the
    one yielded and the ones ahead of it; `ahead` 0: one at a time). The caller takes each result
    (`future.result()` raises what the decode raised) before asking for the next; leaving the loop early cancels
    the decodes not yet started."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="predict-decode")
    pending: deque[tuple[str, Future]] = deque()
    upcoming = iter(paths)

    def start_next() -> None:
        path = next(upcoming, None)
        if path is not None:
            pending.append((path, pool.submit(decode, path)))

    try:
        for _ in range(ahead + 1):
            start_next()
        while pending:
            yield pending.popleft()
            start_next()  # the caller is done with the one yielded: the next may start
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def decode_plan(spec: Any, decode_threads: int) -> tuple[int, int]:
    """(videos decoded ahead, decoding threads) for clips of `spec`: DECODE_AHEAD videos, fewer when their clips
    would hold more than DECODE_AHEAD_BYTES (none ahead when one video's clips alone exceed it); a thread per
    video ahead, as far as the CPUs go at `decode_threads` decord threads each."""
    clip_bytes = spec.num_views * spec.num_crops * spec.num_frames * spec.crop_size ** 2 * 3
    ahead = max(0, min(DECODE_AHEAD, DECODE_AHEAD_BYTES // clip_bytes - 1))
    workers = max(1, min(ahead, (os.cpu_count() or 1) // max(1, decode_threads)))
    return ahead, workers


@dataclass
class Span:
    """What one decode covers: a whole video (start, end NaN), or one window of a long one (`--clip-seconds`)."""

    path: str
    start: float = math.nan
    end: float = math.nan
    windows: int = 0  # the video's windows, on each of them (0: scored whole)
    whole_because: str = ""  # with --clip-seconds: why this video is scored whole


def plan_windows(videos: list[str], seconds: float | None) -> list[Span]:
    """Each video as one Span, or with `seconds` cut into centred windows of that length (the cut `data import
    folders --clip-seconds` makes; durations from the headers, ranged reads in a bucket). A video shorter than a
    window, declaring no duration or that cannot be opened is scored whole (the last: reported as it fails)."""
    if seconds is None:
        return [Span(path) for path in videos]
    from workflows.data.clips import durations
    from workflows.data.sampling import clip_windows

    found = durations(videos, progress=False)
    planned = []
    for path in videos:
        duration = found[path]
        windows = clip_windows(duration, seconds) if duration else None
        if windows is None:
            why = ("" if duration is None else "it declares no duration" if not duration else
                   f"it is {duration:.1f} s, shorter than --clip-seconds {seconds:g}")
            planned.append(Span(path, whole_because=why))
        else:
            planned += [Span(path, start, end, len(windows)) for start, end in windows]
    return planned


class _LocalCopies:
    """A video in a bucket cut into several spans is fetched once, into a temporary file its spans decode from,
    deleted after its last span (decoders read whole files: each span would fetch all of it again). A fetch that
    failed is not tried again for the video's other spans."""

    def __init__(self, spans: list[Span], folder: str) -> None:
        from collections import Counter

        self.folder = folder
        self.left = Counter(s.path for s in spans if s.windows > 1 and is_remote(s.path))
        self.lock = threading.Lock()
        self.copies: dict[str, str | BaseException] = {}
        self.fetching: dict[str, threading.Lock] = {path: threading.Lock() for path in self.left}

    def path_for(self, span: Span) -> str:
        if span.path not in self.left:
            return span.path
        with self.fetching[span.path]:  # one fetch per video; its other spans wait for it
            if span.path not in self.copies:
                from workflows.data.video import fetch_to_file

                local = os.path.join(self.folder, f"{len(self.copies)}{os.path.splitext(span.path.split('?')[0])[1]}")
                try:
                    fetch_to_file(span.path, local)
                    self.copies[span.path] = local
                except Exception as exc:  # noqa: BLE001 - raised for each of its spans, reported as usual
                    self.copies[span.path] = exc
            copy = self.copies[span.path]
        if isinstance(copy, BaseException):
            raise copy
        return copy

    def done(self, span: Span) -> None:
        if span.path not in self.left:
            return
        with self.lock:
            self.left[span.path] -= 1
            last = self.left[span.path] == 0
        copy = self.copies.get(span.path)
        if last and isinstance(copy, str):
            os.unlink(copy)


def _timestamp(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{rest:04.1f}" if hours else f"{minutes}:{rest:04.1f}"


class _Report:
    """Results as they come: a whole video's top classes, or a long video's clips one line each as each is scored
    and then the video as the mean of its read clips' probabilities (each clip weighing the same, as `evaluate`
    scores a file of clips)."""

    def __init__(self, class_names: list[str], top: int, as_json: bool, clip_seconds: float | None) -> None:
        self.class_names, self.top, self.as_json, self.clip_seconds = class_names, top, as_json, clip_seconds
        self.results: list[dict[str, Any]] = []
        self.failed = 0  # videos of which nothing could be read
        self.unread_clips = 0  # clips that could not be read, of videos scored on their other clips
        self._clips: list[dict[str, Any]] = []  # the current long video's clips so far
        self._probs: list[Any] = []

    def add(self, span: Span, probs: Any, reason: str = "", detail: str = "") -> None:
        if not span.windows:
            self._whole(span, probs, reason, detail)
            return
        if not self._clips and not self.as_json:
            print(f"{span.path}: {span.windows} clips of {self.clip_seconds:g} s", flush=True)
        when = f"{_timestamp(span.start)}-{_timestamp(span.end)}"
        if probs is None:
            self._clips.append({"start": span.start, "end": span.end, "error": reason, "detail": detail})
            print(f"{span.path} {when}: could not be read ({reason}: {detail})", file=sys.stderr, flush=True)
        else:
            top = top_classes(probs, self.class_names, self.top)
            self._clips.append({"start": span.start, "end": span.end,
                                "top": [{"class": name, "prob": p} for name, p in top]})
            self._probs.append(probs)
            if not self.as_json:
                print(f"  {when}  {top[0][0]}  {100 * top[0][1]:5.1f}%", flush=True)
        if len(self._clips) == span.windows:
            self._finish_long(span)

    def _whole(self, span: Span, probs: Any, reason: str, detail: str) -> None:
        if probs is None:
            self.failed += 1
            self.results.append({"path": span.path, "error": reason, "detail": detail})
            print(f"{span.path}: could not be read ({reason}: {detail})", file=sys.stderr, flush=True)
            return
        top = top_classes(probs, self.class_names, self.top)
        self.results.append({"path": span.path, "top": [{"class": name, "prob": p} for name, p in top]})
        if not self.as_json:
            print(f"{span.path}:" + (f" (scored whole: {span.whole_because})" if span.whole_because else ""))
            self._print_top(top)

    def _finish_long(self, span: Span) -> None:
        clips, probs = self._clips, self._probs
        self._clips, self._probs = [], []
        unread = len(clips) - len(probs)
        if not probs:
            self.failed += 1
            first = clips[0]
            self.results.append({"path": span.path, "error": first["error"], "detail": first["detail"],
                                 "clips": clips})
            print(f"{span.path}: none of its {len(clips)} clips could be read", file=sys.stderr, flush=True)
            return
        import torch

        self.unread_clips += unread
        top = top_classes(torch.stack(probs).mean(dim=0), self.class_names, self.top)
        self.results.append({"path": span.path, "top": [{"class": name, "prob": p} for name, p in top],
                             "clips": clips})
        if not self.as_json:
            print(f"  the whole video (the mean of its {len(probs)} read clips"
                  f"{f'; {unread} could not be read' if unread else ''}):")
            self._print_top(top)

    @staticmethod
    def _print_top(top: list[tuple[str, float]]) -> None:
        width = max(len(name) for name, _ in top)
        print("\n".join(f"  {i}. {name:<{width}}  {100 * p:5.1f}%" for i, (name, p) in enumerate(top, 1)), flush=True)


def expand_inputs(inputs: list[str]) -> list[str]:
    """The videos to classify: each argument as given, a folder (local, or a bucket prefix) as the video files
    below it (sorted, at any depth), an unexpanded glob pattern (quoted) as its matches. An argument that names
    nothing stays as given, so it is reported as missing; one ending in / that is no folder raises FileNotFoundError, a
    bucket that cannot be listed OSError."""
    import glob
    from pathlib import Path

    from workflows.data.manifest import bucket_video_files, video_files

    out: list[str] = []
    for arg in inputs:
        if not is_remote(arg) and arg.endswith(("/", os.sep)) and not Path(arg).expanduser().is_dir():
            raise FileNotFoundError(f"{arg}: no such folder")  # meant as a folder: not a video to report missing
        if is_remote(arg):
            out += bucket_video_files(arg) or [arg]  # an empty prefix too: reported as missing
        elif Path(arg).expanduser().is_dir():
            out += [str(p) for p in video_files(arg)]
        elif glob.has_magic(arg) and not Path(arg).exists():
            out += sorted(glob.glob(str(Path(arg).expanduser()), recursive=True))
        else:
            out.append(arg)
    return out


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="python -m workflows predict",
                                     description=__doc__.split("\n")[0].rstrip(":"))
    parser.add_argument("videos", nargs="*", help="video files (local paths or URIs pyarrow reads), folders (their "
                                                  "videos at any depth, a bucket prefix too) or quoted glob patterns")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory, a run directory (local or in a bucket, s3://...), or a "
                             "registered model models:/NAME/VERSION")
    parser.add_argument("--tracking-uri", help="the MLflow store of a models:/ checkpoint (default: "
                                               "MLFLOW_TRACKING_URI)")
    parser.add_argument("--labels", help="label file {class name: index} (default: the checkpoint's classes)")
    parser.add_argument("--views", type=int, help="temporal views per video (default: the recipe's eval.test_views, "
                                                  "as evaluate)")
    parser.add_argument("--crops", type=int, choices=(1, 3), help="spatial crops per view (default: the recipe's "
                                                                  "eval.test_crops)")
    parser.add_argument("--top", type=top_count, default=5,
                        help="classes to show per video, most probable first (default 5; `all`: every class with its "
                             "probability, e.g. --ray's rows as soft pseudo-labels)")
    parser.add_argument("--zero-shot-fusion", action=argparse.BooleanOptionalAction,
                        help="blend DiST with frozen-CLIP logits (default: the recipe's eval.zero_shot_fusion)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (default auto: the GPU when there is one)")
    parser.add_argument("--clip-seconds", type=float,
                        help="score long videos in clips of this many seconds (centred, as `data import folders "
                             "--clip-seconds` cuts them): a line per clip, then the video as their mean")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of tables (with --ray: the "
                                                          "summary as JSON)")
    on_ray = parser.add_argument_group("a whole corpus on Ray (--ray)")
    on_ray.add_argument("--ray", action="store_true",
                        help="score on Ray (the running cluster, else a local one): decoders on the CPU nodes, a pool "
                             "of scoring actors on the GPUs; rows written to --out as they come, and the same command "
                             "continues a job that was stopped")
    on_ray.add_argument("--out", help="with --ray: the folder (or bucket prefix) for predictions.csv (and "
                        "file_predictions.csv), or with --format parquet predictions/ (and file_predictions/)")
    on_ray.add_argument("--format", choices=("csv", "parquet"),
                        help="with --ray: the tables' format (default csv). parquet: parts written whole every "
                             "10,000 rows or minute, each uploaded once into a bucket; with --top all a row's "
                             "`scores` is the whole distribution as one vector in the label set's order")
    on_ray.add_argument("--manifest", help="with --ray: a CSV/TSV/Parquet list of videos (a path column; start and "
                                           "end read when present; a label column is ignored)")
    on_ray.add_argument("--actors", type=int, help="with --ray: scoring actors (default: one per GPU, or CPUs / 4 "
                                                   "capped at 4)")
    add_override_option(on_ray, "with --ray: override a key of the checkpoint's recipe, e.g. --set eval.batch_size=32 "
                                "or --set data.max_bad_fraction=1.0")
    on_ray.add_argument("--verbose", action="store_true", help="with --ray: also print Ray's own log lines")
    on_ray.add_argument("--mlflow", dest="mlflow", action="store_true", default=None,
                        help="with --ray: record the job in MLflow, under the checkpoint's training run (default: only "
                             "when the run already has a tracking store)")
    on_ray.add_argument("--no-mlflow", dest="mlflow", action="store_false")
    args = parser.parse_args(argv)
    if ray_flags_given(args):
        return _main_on_ray(args)
    if not args.videos:
        parser.error("give at least one video file, folder or pattern (or --ray --manifest M --out DIR)")
    refusal = _bad_count(args)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA GPU here; use --device cpu (or auto)", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    from workflows.data.video import BadVideo, StorageUnreachable

    try:
        videos = expand_inputs(args.videos)
    except (StorageUnreachable, FileNotFoundError) as exc:  # a bucket that did not answer; a folder not there
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # a bucket prefix that could not be listed
        from workflows.data.manifest import storage_hint
        from workflows.runtime import redact_secrets

        remote = next((a for a in args.videos if is_remote(a)), "")
        print(f"error: cannot list {redact_secrets(remote)}: {exc}{storage_hint(remote)}", file=sys.stderr)
        return 2
    if not videos:
        print(f"error: no video files in {' '.join(args.videos)}", file=sys.stderr)
        return 2
    try:
        spans = plan_windows(videos, args.clip_seconds)  # with --clip-seconds: the durations, from the headers
    except StorageUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        model, recipe, class_names = load_predictor(args.checkpoint, args.labels, device, args.tracking_uri)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # As evaluate scores: the recipe's test views, crops and fusion unless the flags say otherwise.
    views = args.views if args.views is not None else recipe.eval.test_views
    crops = args.crops if args.crops is not None else recipe.eval.test_crops
    fusion = args.zero_shot_fusion if args.zero_shot_fusion is not None else recipe.eval.zero_shot_fusion
    mode: Mode = "fusion" if fusion else "dist"
    print(f"[predict] {args.checkpoint} ({recipe.model.preset}), {mode} logits, {views} views x {crops} crops, "
          f"{len(class_names)} classes, on {device}: {len(videos)} video(s)", file=sys.stderr, flush=True)
    fix_views = (f"Lower --views (left out: the recipe's eval.test_views, {recipe.eval.test_views})"
                 if args.views is not None else "Pass --views 3")
    for line in scoring_warnings(views=views, views_from="--views" if args.views is not None else
                                 "the checkpoint recipe's eval.test_views", fix_views=fix_views, crops=crops,
                                 num_frames=model.cfg.num_frames, class_names=class_names,
                                 labels_from=args.labels or "the checkpoint's class names"):
        print(line, file=sys.stderr, flush=True)
    spec = clip_spec(model, recipe, views, crops)
    ahead, workers = decode_plan(spec, recipe.data.decode_threads)
    report = _Report(class_names, args.top, args.json, args.clip_seconds)
    with tempfile.TemporaryDirectory(prefix="predict-") as folder:
        copies = _LocalCopies(spans, folder)

        def decode(span: Span) -> Any:
            try:
                return video_clips(copies.path_for(span), spec, span.start, span.end)
            finally:
                copies.done(span)

        for span, decoded in decode_ahead(spans, decode, ahead, workers):
            try:
                report.add(span, clip_probs(model, recipe, class_names, decoded.result(), mode))
            except (BadVideo, StorageUnreachable) as exc:  # the second: a bucket that did not answer, not a bad video
                reason, detail = (exc.reason, exc.detail) if isinstance(exc, BadVideo) else ("unreachable", str(exc))
                report.add(span, None, reason, detail)
    if args.json:
        print(json.dumps(report.results, indent=2))
    if report.failed:
        print(f"{report.failed} of {len(videos)} videos could not be read", file=sys.stderr)
    if report.unread_clips:
        print(f"{report.unread_clips} clips could not be read; their videos were scored on their other clips",
              file=sys.stderr)
    return 1 if report.failed or report.unread_clips else 0


def top_count(text: str) -> int:
    """--top's value: a number of classes, or `all` (EVERY_CLASS)."""
    if text.strip().lower() == "all":
        return EVERY_CLASS
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of classes or 'all', not {text!r}") from None


def _bad_count(args: argparse.Namespace) -> str | None:
    """Why a count or length flag is unusable (None: all are)."""
    for flag, value in (("--views", args.views), ("--top", args.top), ("--actors", args.actors)):
        if value is not None and value < 1:
            return f"{flag} must be >= 1, got {value}"
    if args.clip_seconds is not None:
        from workflows.data.clips import check_clip_seconds

        try:
            check_clip_seconds(args.clip_seconds)
        except ValueError as exc:
            return str(exc)
    return None


def ray_flags_given(args: argparse.Namespace) -> list[str]:
    """The flags of `predict --ray` on the command line (any of them means the user wants the Ray job), --ray last:
    the first one names what needs --ray and --out when they are missing."""
    given = (("--out", args.out), ("--manifest", args.manifest), ("--actors", args.actors is not None),
             ("--set", args.overrides), ("--verbose", args.verbose), ("--mlflow", args.mlflow is not None),
             ("--format", args.format is not None),
             ("--ray", args.ray))
    return [flag for flag, on in given if on]


def _main_on_ray(args: argparse.Namespace) -> int:
    """`predict --ray`: the corpus scored on Ray into --out (workflows.batch_predict)."""
    from workflows.batch_predict import BatchRequest, format_summary, run_batch_predict
    from workflows.console import stdout_kept_for_json
    from workflows.data.drops import TooManyBadVideos
    from workflows.data.video import StorageUnreachable
    from workflows.evaluate import IncompleteEvaluation
    from workflows.runtime import interrupted_exit_code, stop_signal_note

    needs = [flag for flag, given in (("--ray", args.ray), ("--out", args.out)) if not given]
    if needs:
        given = ray_flags_given(args)[0]
        print(f"error: {given} needs {' and '.join(needs)}: `predict --ray --out DIR` scores a corpus on Ray and "
              f"writes its predictions into DIR (without them, predict prints the top classes of a few files here)",
              file=sys.stderr)
        return 2
    if args.device != "auto":
        print("error: --device is for predict on this machine; with --ray the scoring actors take the cluster's GPUs "
              "(or CPUs when it has none)", file=sys.stderr)
        return 2
    refusal = _bad_count(args)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    request = BatchRequest(checkpoint=args.checkpoint, out=args.out, videos=args.videos, manifest=args.manifest,
                           labels=args.labels, tracking_uri=args.tracking_uri, views=args.views, crops=args.crops,
                           top=args.top, zero_shot_fusion=args.zero_shot_fusion, clip_seconds=args.clip_seconds,
                           actors=args.actors, overrides=args.overrides, verbose=args.verbose, mlflow=args.mlflow,
                           format=args.format or "csv")
    try:
        with stdout_kept_for_json(args.json):
            result = run_batch_predict(request)
    except (ConfigError, ValueError, FileNotFoundError, TooManyBadVideos, StorageUnreachable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except IncompleteEvaluation as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (`python -m workflows` makes it one): the rows so far stay written
        print(f"interrupted{stop_signal_note()}: the rows written so far are kept in {args.out}; the same command "
              f"continues the job", file=sys.stderr)
        return interrupted_exit_code()
    print(format_summary(result), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(result, indent=2))
    return 1 if result["dropped_total"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
