"""The embedded default: `python -m workflows demo` (what `make demo` runs).

On one machine, with nothing downloaded: writes the sample motion dataset (classes differ only in motion), starts
a local Ray, pre-trains a CPU-sized DiST with DeepSpeed on 2 workers, then trains the spatial-only baseline (the
same frozen CLIP, frames averaged, only a head trained) on the same data with the same recipe, and prints both
validation accuracies. Both runs are tracked in one MLflow store. The last line is machine-readable:

    demo: dist_val_top1=<float> spatial_only_val_top1=<float> minutes=<float>
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from workflows.config_loader import CommandParser, add_override_option
from workflows.data.sample import SAMPLE_CLASSES
from workflows.recipe import load_recipe

DEMO_RECIPE = Path(__file__).parent / "configs" / "demo.yaml"


SAMPLE_SETTINGS = dict(size=64, num_frames=32, seed=0)


def _sample_matches(data_dir: Path, videos_per_class: int, num_objects: int) -> bool:
    """Whether `data_dir` already holds the sample dataset these settings would write (reuse it, else rewrite)."""
    info_path = data_dir / "sample_info.json"
    if not info_path.exists():
        return False
    info = json.loads(info_path.read_text())
    same = all(info.get(k) == v for k, v in SAMPLE_SETTINGS.items()) and info.get("num_objects", 1) == num_objects
    return same and info.get("train_videos", 0) + info.get("val_videos", 0) == len(SAMPLE_CLASSES) * videos_per_class


def run_demo(out: Path, overrides: list[str], videos_per_class: int, num_objects: int = 3) -> dict[str, float]:
    """Run both trainings; returns the numbers of the final line."""
    from workflows.data.sample import write_sample_dataset
    from workflows.pretrain import run_pretrain
    from workflows.runtime import ensure_ray, local_cpus_for

    start = time.perf_counter()
    out = out.resolve()
    data_dir = out / "data"
    if not _sample_matches(data_dir, videos_per_class, num_objects):
        print(f"[demo] writing the sample motion dataset to {data_dir} ...", flush=True)
        if data_dir.exists():
            shutil.rmtree(data_dir)
        write_sample_dataset(data_dir, videos_per_class=videos_per_class, num_objects=num_objects, **SAMPLE_SETTINGS)
    for stale in (out / "runs", out / "mlflow.db"):  # a demo always trains from scratch
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    tracking = f"sqlite:///{out / 'mlflow.db'}"
    common = [f"data.train_manifest={data_dir / 'train.csv'}", f"data.val_manifest={data_dir / 'val.csv'}",
              f"data.labels={data_dir / 'labels.json'}", f"run.storage_path={out / 'runs'}",
              f"mlflow.tracking_uri={tracking}", *overrides]
    dist_recipe = load_recipe(DEMO_RECIPE, common + ["run.name=demo-dist"])
    spatial_recipe = load_recipe(DEMO_RECIPE, common + ["run.name=demo-spatial-only", "model.variant=spatial_only"])
    import ray

    started_ray = not ray.is_initialized()
    ensure_ray(local_cpus_for(dist_recipe), fresh_local=True)  # never join another cluster running on this machine

    results = {}
    for label, recipe in (("DiST", dist_recipe), ("spatial-only", spatial_recipe)):
        print(f"[demo] training {label} ...", flush=True)
        began = time.perf_counter()
        result = run_pretrain(recipe)
        metrics = result.metrics or {}
        results[label] = {"top1": float(metrics.get("val_top1", float("nan"))),
                          "top5": float(metrics.get("val_top5", float("nan"))),
                          "minutes": (time.perf_counter() - began) / 60}
    if started_ray:  # stops the workers' log stream too: their late lines must not follow the summary line
        ray.shutdown()
    minutes = (time.perf_counter() - start) / 60
    classes = len(json.loads((data_dir / "labels.json").read_text()))

    print("\n[demo] validation accuracy on the motion dataset (single frames carry no class signal; "
          f"chance = {100 / classes:.1f}%)")
    print(f"{'model':<14} {'val top-1':>10} {'val top-5':>10} {'minutes':>8}")
    for label, r in results.items():
        print(f"{label:<14} {r['top1']:>9.1f}% {r['top5']:>9.1f}% {r['minutes']:>8.1f}")
    print(f"\n[demo] MLflow UI: .venv/bin/mlflow ui --backend-store-uri {tracking}  (then open http://127.0.0.1:5000)")
    print(f"[demo] checkpoints: {out / 'runs'}")
    summary = {"dist_val_top1": results["DiST"]["top1"], "spatial_only_val_top1": results["spatial-only"]["top1"],
               "minutes": minutes}
    print("demo: " + " ".join(f"{k}={v:.2f}" for k, v in summary.items()), flush=True)
    return summary


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="python -m workflows demo",
                                     description=__doc__.split("\n")[0].rstrip(":"))
    parser.add_argument("--out", default="demo_output", help="folder for data, runs and the MLflow store")
    parser.add_argument("--videos-per-class", type=int, default=150)
    parser.add_argument("--objects", type=int, default=3,
                        help="moving objects per sample video (more motion per clip: the tiny model learns faster)")
    add_override_option(parser, "override a key of workflows/configs/demo.yaml")
    args = parser.parse_args(argv)
    run_demo(Path(args.out), args.overrides, args.videos_per_class, args.objects)
    return 0
