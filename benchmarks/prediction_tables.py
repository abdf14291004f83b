"""What `predict --ray`'s driver spends writing its tables (workflows/prediction_tables.py), CSV against Parquet:

    python -m benchmarks.prediction_tables [--classes 710] [--rows 20000] [--seed 0]

Each format writes the same rows (a path, no window, the probabilities of a Dirichlet(0.1) draw over `--classes`:
peaked, as a trained model's are) through the tables' own `write` and `close`, with every class (`--top all`) and
with the top 5. It prints bytes per row, GiB per million rows and the driver's microseconds per row, and as its last
line the ratios Parquet / CSV (bytes and write time, for `--top all` and `--top 5`), measured in this process.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.measure import ratios_line


def measure(fmt: str, top: int, probs: np.ndarray, names: list[str], folder: Path) -> tuple[float, float]:
    """(bytes per row, seconds per row) of writing `probs` (rows, classes) as a `fmt` predictions table."""
    from workflows.prediction_tables import PREDICTION_LEAD, open_table

    folder.mkdir(parents=True)
    table = open_table(fmt, folder, "predictions", PREDICTION_LEAD, names, top)
    start = time.perf_counter()
    for i, row in enumerate(probs):
        table.write([i, f"s3://bucket/videos/{i:07d}.mp4", math.nan, math.nan], row)
    table.close()
    took = time.perf_counter() - start
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return size / len(probs), took / len(probs)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prediction_tables", description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=710)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = [f"class{k:04d}" for k in range(args.classes)]
    probs = np.random.default_rng(args.seed).dirichlet(np.full(args.classes, 0.1), size=args.rows)
    results = {}
    print(f"{args.rows} rows, {args.classes} classes")
    print("| format | classes per row | bytes/row | GiB per 1M rows | us/row written |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="dist-tables-") as root:
        for top, shown in ((args.classes, "all"), (5, "top 5")):
            for fmt in ("csv", "parquet"):
                size, seconds = measure(fmt, top, probs, names, Path(root) / f"{fmt}-{top}")
                results[(fmt, shown)] = size, seconds
                print(f"| {fmt} | {shown} | {size:.0f} | {size * 1e6 / 2**30:.2f} | {seconds * 1e6:.0f} |")
    ratios = {}
    for shown, key in (("all", "all"), ("top 5", "top5")):
        (csv_size, csv_s), (pq_size, pq_s) = results[("csv", shown)], results[("parquet", shown)]
        ratios[f"parquet_vs_csv_bytes_{key}"] = pq_size / csv_size
        ratios[f"parquet_vs_csv_write_time_{key}"] = pq_s / csv_s
    print(ratios_line(ratios))
    return ratios


if __name__ == "__main__":
    main(sys.argv[1:])
