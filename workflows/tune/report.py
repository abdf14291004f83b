"""What a finished sweep produced: the results table, the accuracy-vs-cost plot with its Pareto front, the best
trial, and their record in MLflow.

`summarize_sweep` turns Tune's ResultGrid into one row per trial (the trial's values, its best report, its status:
completed / stopped early (ASHA) / error: ... / no report, its starts), adds the counted cost of each trial's
model (GFLOPs per video clip of the DiST branch and of the frozen CLIP, trainable params) and its measured clips/s,
prints the table and writes it as CSV beside the plot. With tracking on, each trial's nested run gets its cost, its
status as a tag, and is closed with a matching MLflow status (FINISHED / KILLED / FAILED) when its driver could not
close it; the parent run gets the table, the plot, the best trial's checkpoint and the counts.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workflows.elastic import RunNotRestarted
from workflows.recipe import recipe_to_dict
from workflows.runtime import is_remote, root_cause, storage_of
from workflows.tracking import Tracker
from workflows.tune.sweep_config import (
    LOG_PREFIX,
    SweepPlan,
    attempts_file,
    build_trial_recipe,
    plain_value,
    trial_overrides,
    trial_run_name,
)

RESULTS_CSV = "results.csv"
PLOT_PNG = "accuracy_vs_cost.png"
# A trial's status in the table -> the status its MLflow run is closed with when the trial's driver left it open
# (Tune stops a trial's driver at once: ASHA, the max_t cap, a failure).
MLFLOW_STATUS = {"completed": "FINISHED", "stopped early": "KILLED", "no report": "KILLED"}


def pareto_front(costs: Sequence[float], scores: Sequence[float], maximize: bool = True) -> list[bool]:
    """Which points are Pareto-optimal for (lower cost, better score): no other point is at least as good on both
    and strictly better on one. Points with a NaN are never on the front."""
    sign = 1.0 if maximize else -1.0
    points = [(float(c), sign * float(s)) for c, s in zip(costs, scores, strict=True)]
    front = []
    for i, (c, s) in enumerate(points):
        if math.isnan(c) or math.isnan(s):
            front.append(False)
            continue
        dominated = any(j != i and not (math.isnan(cj) or math.isnan(sj)) and cj <= c and sj >= s
                        and (cj < c or sj > s) for j, (cj, sj) in enumerate(points))
        front.append(not dominated)
    return front


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


TABLE_CELL_CHARS = 48  # the console table's widest cell (an error's whole message is in results.csv and MLflow)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A fixed-width text table of `rows` (what the console shows); long cells are cut at TABLE_CELL_CHARS."""
    def cell(value: Any) -> str:
        text = _fmt(value)
        return text if len(text) <= TABLE_CELL_CHARS else text[:TABLE_CELL_CHARS - 3] + "..."

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _fmt(row.get(c, "")) if isinstance(row.get(c), list) else row.get(c, "")
                             for c in columns})


def save_pareto_png(rows: list[dict[str, Any]], metric: str, label_keys: list[str], path: Path,
                    title: str, best_id: str | None = None) -> None:
    """Accuracy against cost (counted GFLOPs per clip, trainable params) for every trial that reported, the
    Pareto front of each panel drawn as a line through its points, the best trial starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if not math.isnan(r.get(metric, math.nan))]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), squeeze=False)
    for ax, (cost_key, xlabel, scale) in zip(axes[0], (("total_gflops", "GFLOPs per clip (CLIP + DiST, counted)", 1.0),
                                                      ("trainable_params", "trainable parameters (M)", 1e-6)),
                                             strict=True):
        xs = [r.get(cost_key, math.nan) * scale for r in shown]
        ys = [r[metric] for r in shown]
        front = pareto_front(xs, ys) if shown else []
        ax.scatter([x for x, f in zip(xs, front, strict=True) if not f], [y for y, f in zip(ys, front, strict=True)
                                                                            if not f],
                   c="tab:gray", label="trial")
        on = sorted((x, y) for x, y, f in zip(xs, ys, front, strict=True) if f)
        if on:
            ax.plot([p[0] for p in on], [p[1] for p in on], "-o", c="tab:red", label="Pareto front")
        for r, x, y in zip(shown, xs, ys, strict=True):
            label = " ".join(_fmt(r.get(k)) for k in label_keys)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            if r["trial_id"] == best_id:
                ax.scatter([x], [y], marker="*", s=250, c="gold", edgecolors="k", zorder=5, label="best")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trial_failure(error: BaseException) -> str:
    """What a failed trial died of: the root cause, not Ray's wrapping (a trial's Train run fails as
    WorkerGroupError); a RunNotRestarted's message is the recorded root cause already ("rank 0 failed: ...")."""
    return root_cause(error).removeprefix(f"{RunNotRestarted.__name__}: ")


def stopped_before_its_last_step(last_report: dict[str, Any]) -> bool:
    """Whether a trial ended before its run's last step (the scheduler stopped it), from its last report: each
    report says whether it was the run's last step (`final`); one from before that key counts as the last."""
    final = last_report.get("final")
    unknown = final is None or (isinstance(final, float) and math.isnan(final))
    return not (unknown or final)


def table_metrics(metric: str) -> list[str]:
    """The validation metrics of the results table: the clips' three, and the sweep's `metric` when it is a file one."""
    return ["val_top1", "val_top5", "val_mean_class_acc"] + ([metric] if metric.startswith("val_file_") else [])


def trial_row(result: Any, plan: SweepPlan, keys: list[str]) -> dict[str, Any]:
    """One results-table row from a Tune Result: the trial's values, its best report and its status."""
    sweep = plan.sweep
    trial_id = Path(result.path).name
    row: dict[str, Any] = {"trial_id": trial_id, "run_name": trial_run_name(sweep.name, trial_id)}
    row |= {k: plain_value(result.config.get(k)) for k in keys}
    frame = result.metrics_dataframe
    reports = [] if frame is None or sweep.metric not in getattr(frame, "columns", []) else \
        [r for r in frame.to_dict("records") if r.get(sweep.metric) is not None]
    pick = max if sweep.mode == "max" else min
    best = pick(reports, key=lambda r: r[sweep.metric]) if reports else {}
    row["reports"] = len(reports)
    for key in table_metrics(sweep.metric):
        row[key] = float(best.get(key, math.nan))
    row["best_step"] = best.get("step", "")
    row["last_step"] = reports[-1].get("step", "") if reports else ""
    row["checkpoint"] = best.get("checkpoint_path", "")
    if result.error is not None:
        row["status"] = "error: " + trial_failure(result.error)[:160]
    elif not reports:
        row["status"] = "no report"
    else:  # from the reports: storage may be remote, nothing is read from it
        row["status"] = "stopped early" if stopped_before_its_last_step(reports[-1]) else "completed"
    attempts = attempts_file(plan.path, row["run_name"])
    row["attempts"] = len(attempts.read_text().splitlines()) if attempts is not None and attempts.exists() else ""
    return row


def add_costs(rows: list[dict[str, Any]], plan: SweepPlan, keys: list[str]) -> None:
    """Counted GFLOPs per video clip and trainable params for each row (counted once per distinct model config)."""
    from dist_model.flops import count_cost_per_clip

    cache: dict[str, Any] = {}
    for row in rows:
        recipe = build_trial_recipe(plan.base, {k: row[k] for k in keys if row.get(k) is not None})
        model_key = json.dumps(recipe_to_dict(recipe)["model"], sort_keys=True)
        if model_key not in cache:
            cache[model_key] = count_cost_per_clip(recipe.model_cfg, recipe.model.variant)
        cost = cache[model_key]
        row.update(dist_gflops=cost.dist_gflops, frozen_clip_gflops=cost.frozen_clip_gflops,
                   total_gflops=cost.total_gflops, trainable_params=cost.trainable_params)


@dataclass
class SweepResult:
    """What a finished (or interrupted) sweep produced."""

    path: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    parent_run_id: str | None
    tracking_uri: str
    interrupted: bool
    table_path: Path | None = None
    plot_path: Path | None = None


def fetch_checkpoint_files(checkpoint: str, sweep_path: str, dest: Path,
                           names: Sequence[str] = ("weights.safetensors", "state.json")) -> list[Path]:
    """Local paths of a checkpoint's weights and state: the files themselves for a local checkpoint, copies in
    `dest` for one in the sweep's remote storage (Train reports remote paths without the scheme)."""
    local = Path(checkpoint)
    if local.is_dir():
        return [local / n for n in names if (local / n).exists()]
    if not is_remote(sweep_path):
        return []

    fs, _ = storage_of(sweep_path)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        try:
            with fs.open_input_stream(f"{checkpoint.split('://')[-1].rstrip('/')}/{name}") as src:
                (dest / name).write_bytes(src.read())
            out.append(dest / name)
        except OSError as exc:
            print(f"{LOG_PREFIX} could not fetch {name} of {checkpoint}: {exc}", flush=True)
    return out


def _best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The trial with the best `metric`; of equally good ones (ties are common in short sweeps) one that did not
    fail, then the cheapest (the one on the Pareto front). A failed trial's metric is from a validation before its
    failure, and its checkpoint from then is whole: strictly better, it is the best."""
    scored = [r for r in rows if not math.isnan(r.get(metric, math.nan))]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda r: (sign * r[metric], not str(r.get("status", "")).startswith("error"),
                                      -r.get("total_gflops", 0.0)))


def mlflow_status(status: str) -> str:
    """The MLflow run status that matches a results-table status."""
    return "FAILED" if status.startswith("error") else MLFLOW_STATUS.get(status, "KILLED")


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if v is not None and not math.isnan(v)}


def annotate_trial_runs(rows: list[dict[str, Any]], parent: Tracker, interrupted: bool,
                        keys: Sequence[str] = ()) -> None:
    """Median clips/s of each trial (from its nested run) into its row; cost, trial id and status onto the nested
    run; runs left open by a stopped or failed trial closed with the matching status (an interrupted sweep closes
    only failed ones: the others resume). A trial that failed before its workers opened a run (a bad file, a
    start-up error) gets one here, FAILED, with its values (`keys`) as params: one nested run per trial."""
    attempts = parent.child_attempts()
    for row in rows:
        runs = attempts.get(row["run_name"], [])
        if not runs and parent.active and row["status"].startswith("error"):
            failed = parent.new_child(row["run_name"], {"tune.trial_id": row["trial_id"], "tune.status": row["status"]})
            failed.log_params({k: row.get(k) for k in keys})
            failed.finish("FAILED")
            row["mlflow_status"], row["clips_per_s"] = "FAILED", math.nan
            continue
        run = runs[0] if runs else None  # the trial's newest attempt: the one a resumed sweep finished
        for earlier in runs[1:]:  # attempts a resumed sweep started again: closed, and said so
            old = parent.child(earlier.info.run_id)
            old.set_tags({"tune.trial_id": row["trial_id"], "tune.status": "superseded: the trial was started "
                          "again when its sweep resumed (see the newest run of this name)"})
            if earlier.info.status == "RUNNING":
                old.finish("KILLED")
        trial = parent.child(run.info.run_id) if run is not None else None
        rates = trial.metric_history("clips_per_s") if trial is not None else []
        row["clips_per_s"] = statistics.median(rates) if rates else math.nan
        if trial is None:
            continue
        trial.log_metrics(_finite({"dist_gflops_per_clip": row["dist_gflops"],
                                   "frozen_clip_gflops_per_clip": row["frozen_clip_gflops"],
                                   "total_gflops_per_clip": row["total_gflops"],
                                   "clips_per_s_median": row["clips_per_s"]}))
        trial.set_tags({"tune.trial_id": row["trial_id"], "tune.status": row["status"]})
        status = mlflow_status(row["status"])
        # A stopped trial's workers may finish their last step, and close the run as FINISHED, before Tune's stop
        # lands (the loop logs its final artifacts before its last report): Tune's verdict wins.
        overtaken = run.info.status == "FINISHED" and row["status"] == "stopped early"
        if (run.info.status == "RUNNING" and (status == "FAILED" or not interrupted)) or overtaken:
            trial.finish(status)
            row["mlflow_status"] = status
        else:
            row["mlflow_status"] = run.info.status


def summarize_sweep(grid: Any, plan: SweepPlan, parent: Tracker, interrupted: bool) -> SweepResult:
    """Build the results table, annotate the nested runs, and log table, plot and best checkpoint on the parent
    run (`parent`: the sweep's Tracker; a no-op one when tracking is off)."""
    sweep = plan.sweep
    keys = list(sweep.search_space)
    rows = [trial_row(result, plan, keys) for result in grid]  # in the order Tune created the trials
    add_costs(rows, plan, keys)
    annotate_trial_runs(rows, parent, interrupted, keys)
    best = _best_row(rows, sweep.metric, sweep.mode)
    fronts = pareto_front([r["total_gflops"] for r in rows], [r.get(sweep.metric, math.nan) for r in rows],
                          maximize=sweep.mode == "max")
    for row, on in zip(rows, fronts, strict=True):
        row["pareto"] = on
        row["best"] = best is not None and row["trial_id"] == best["trial_id"]
    columns = (["trial_id", "status"] + keys + table_metrics(sweep.metric)
               + ["best_step", "reports", "dist_gflops", "frozen_clip_gflops", "total_gflops", "trainable_params",
                  "clips_per_s", "pareto", "best", "attempts", "run_name", "checkpoint"])
    shown = [c for c in columns if c not in ("run_name", "checkpoint")]
    print(f"{LOG_PREFIX} results ({'interrupted: ' if interrupted else ''}{len(rows)} trials; GFLOPs are counted "
          f"per clip, 2 per multiply-add):\n{format_table(rows, shown)}", flush=True)

    result = SweepResult(path=plan.path, rows=rows, best=best, parent_run_id=parent.run_id,
                         tracking_uri=plan.tracking_uri, interrupted=interrupted)
    with tempfile.TemporaryDirectory(prefix="dist-sweep-") as tmp:
        # A local sweep keeps its table and plot in the sweep directory; a remote one only in MLflow.
        out_dir = Path(plan.path) if not is_remote(plan.path) else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        result.table_path, result.plot_path = out_dir / RESULTS_CSV, out_dir / PLOT_PNG
        write_csv(rows, columns, result.table_path)
        label_keys = [k for k in keys if len({json.dumps(r.get(k)) for r in rows}) > 1] or keys[:1]
        save_pareto_png(rows, sweep.metric, label_keys, result.plot_path,
                        f"{sweep.name}: {sweep.metric} against cost ({len(rows)} trials)",
                        best["trial_id"] if best else None)
        parent.log_artifact(result.table_path)
        parent.log_artifact(result.plot_path)
        parent.log_metrics({
            "trials": float(len(rows)),
            "trials_completed": float(sum(r["status"] == "completed" for r in rows)),
            "trials_stopped_early": float(sum(r["status"] == "stopped early" for r in rows)),
            "trials_failed": float(sum(r["status"].startswith("error") for r in rows)),
            **({f"best_{sweep.metric}": best[sweep.metric]} if best else {})})
        if best is not None:
            checkpoint = best.get("checkpoint") or ""
            print(f"{LOG_PREFIX} best trial {best['trial_id']}: {sweep.metric} {best[sweep.metric]:.2f} at step "
                  f"{best['best_step']} ({' '.join(trial_overrides({k: best[k] for k in keys}))}); checkpoint: "
                  f"{checkpoint or 'none kept'}", flush=True)
            if parent.active and checkpoint:
                for path in fetch_checkpoint_files(checkpoint, plan.path, Path(tmp) / "best"):
                    parent.log_artifact(path, "best_checkpoint")
                parent.set_tags({"best_trial_id": best["trial_id"], "best_checkpoint": checkpoint})
        if is_remote(plan.path):
            result.table_path = result.plot_path = None
    if not interrupted:
        parent.finish("FINISHED")
    return result
