"""Classify video files with a checkpoint, locally (no Ray):
`python -m workflows predict --checkpoint C [--labels L] video.mp4|folder [...] [--views V] [--top 5]
[--device auto] [--json]`.

Each video is decoded and cut into clips exactly as the evaluation does (the data layer's `clips_from_video`:
segment sampling of `views` temporal views, short-side resize and centre crop; views, crops and zero-shot fusion
default to the checkpoint recipe's eval section, as `evaluate`'s do), scored, and the softmax
probabilities are averaged over its clips. A video that cannot be decoded is reported with its drop reason;
the others are still classified (exit status 1 when any video failed). The model runs on the GPU when there is
one (`--device auto`), in the recipe's precision there, as `evaluate` scores. Loading the checkpoint and
scoring are `workflows.inference`'s, shared with `evaluate`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from workflows.config_loader import ConfigError
from workflows.inference import Mode, load_predictor, model_logits, scoring_autocast, scoring_precision
from workflows.recipe import Recipe


def predict_video(model: Any, recipe: Recipe, class_names: list[str], path: str, *, views: int = 3,
                  crops: int = 1, top: int = 5, mode: Mode = "dist") -> list[tuple[str, float]]:
    """Top-`top` (class name, probability) of one video, probabilities averaged over views x crops clips.
    Raises workflows.data.video.BadVideo when the video is unusable."""
    import numpy as np
    import torch

    from workflows.data.pipeline import ClipSpec, clips_from_video

    cfg = model.cfg
    spec = ClipSpec.from_config(recipe.data, split="eval", num_frames=cfg.num_frames, crop_size=cfg.image_size,
                                num_views=views, num_crops=crops)
    rows = clips_from_video(path, 0, 0, math.nan, math.nan, spec)
    device = next(model.parameters()).device
    frames = torch.from_numpy(np.stack([r["frames"] for r in rows])).to(device)  # (views * crops, T_d, S, S, 3) uint8
    with scoring_autocast(device, scoring_precision(recipe)):
        logits = model_logits(model, frames, class_names, mode)
    probs = torch.softmax(logits.float(), dim=-1).mean(dim=0).cpu()  # (K,)
    values, indices = probs.topk(min(top, len(class_names)))
    return [(class_names[i], float(p)) for p, i in zip(values.tolist(), indices.tolist(), strict=True)]


def expand_inputs(inputs: list[str]) -> list[str]:
    """The videos to classify: each argument as given, a local folder as the video files below it (sorted, at any
    depth), an unexpanded glob pattern (quoted) as its matches. An argument that names nothing stays as given, so
    it is reported as missing."""
    import glob
    from pathlib import Path

    from workflows.data.manifest import video_files
    from workflows.runtime import is_remote

    out: list[str] = []
    for arg in inputs:
        if not is_remote(arg) and Path(arg).expanduser().is_dir():
            out += [str(p) for p in video_files(arg)]
        elif not is_remote(arg) and glob.has_magic(arg) and not Path(arg).exists():
            out += sorted(glob.glob(str(Path(arg).expanduser()), recursive=True))
        else:
            out.append(arg)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows predict",
                                     description=__doc__.split("\n")[0].rstrip(":"))
    parser.add_argument("videos", nargs="+", help="video files (local paths or URIs pyarrow reads), folders (their "
                                                  "videos at any depth) or quoted glob patterns")
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
    parser.add_argument("--top", type=int, default=5, help="classes to show per video (default 5)")
    parser.add_argument("--zero-shot-fusion", action=argparse.BooleanOptionalAction,
                        help="blend DiST with frozen-CLIP logits (default: the recipe's eval.zero_shot_fusion)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (default auto: the GPU when there is one)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of tables")
    args = parser.parse_args(argv)
    for flag, value in (("--views", args.views), ("--top", args.top)):
        if value is not None and value < 1:
            print(f"error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA GPU here; use --device cpu (or auto)", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    from workflows.data.video import BadVideo, StorageUnreachable

    videos = expand_inputs(args.videos)
    if not videos:
        print(f"error: no video files in {' '.join(args.videos)}", file=sys.stderr)
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
    results, failed = [], 0
    for path in videos:
        try:
            top = predict_video(model, recipe, class_names, path, views=views, crops=crops, top=args.top,
                                mode=mode)
        except (BadVideo, StorageUnreachable) as exc:  # the second: a bucket that did not answer, not a bad video
            reason, detail = (exc.reason, exc.detail) if isinstance(exc, BadVideo) else ("unreachable", str(exc))
            failed += 1
            results.append({"path": path, "error": reason, "detail": detail})
            print(f"{path}: could not be read ({reason}: {detail})", file=sys.stderr, flush=True)
            continue
        results.append({"path": path, "top": [{"class": name, "prob": p} for name, p in top]})
        if not args.json:
            width = max(len(name) for name, _ in top)
            print(f"{path}:")
            print("\n".join(f"  {i}. {name:<{width}}  {100 * p:5.1f}%" for i, (name, p) in enumerate(top, 1)),
                  flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    if failed:
        print(f"{failed} of {len(videos)} videos could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
