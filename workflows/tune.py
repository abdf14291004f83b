"""Ray Tune sweeps over DiST's fusion choices: `python -m workflows tune --config SWEEP.yaml [--set k=v] [--resume]`.

A sweep YAML names a base pre-training recipe and a search space over the same dotted keys `--set` uses
(`model.fusion_layers`, `model.integration_dim`, `train.lr`, ...). Each Tune trial is the pre-training driver: it
builds the trial's recipe (base + base_overrides + the trial's values) and runs `pretrain.build_trainer(...).fit()`
with Tune's report callback; the training code itself lives in pretrain.py only.

Tracking: the tune driver opens one MLflow parent run per sweep; each trial's rank-0 worker opens a nested run
(parent tag) that holds the trial's resolved config as params and its metrics per report. When the sweep ends,
each nested run gets its cost (counted GFLOPs per clip of the DiST branch and of CLIP, trainable params, measured
clips/s) and the parent run gets the results table (CSV, also printed), a plot of accuracy against cost with the
Pareto front marked, and the best trial's checkpoint.

An interrupted sweep (Ctrl-C, a lost driver) resumes from `<storage_path>/<name>` through `Tuner.restore`: finished
trials are kept, unfinished ones continue (their Train runs resume from their latest checkpoints). A failing trial
is reported in the table and the sweep goes on.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

from workflows.config import ConfigError, apply_overrides, dump_yaml, from_dict, load_yaml, parse_override, to_dict
from workflows.recipe import Recipe, check_data_files, recipe_to_dict, with_absolute_paths

LOG_PREFIX = "[tune]"
DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
# Keys the sweep itself sets on every trial; a search space may not touch them.
RESERVED_KEYS = ("run.name", "run.storage_path", "mlflow.enabled", "mlflow.tracking_uri", "mlflow.experiment")
TRIAL_DRIVER_CPUS = 0.1  # the trial's driver function only waits on fit(); Tune needs a non-empty request
MAX_VALIDATED_COMBINATIONS = 4096  # beyond this many grid/choice combinations, values are checked axis by axis
RESULTS_CSV = "results.csv"
PLOT_PNG = "accuracy_vs_cost.png"


# ---------------------------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class AshaSection:
    """ASHA early stopping (used when `scheduler: asha`). Time is counted in validations by default."""

    time_attr: Literal["training_iteration", "step"] = "training_iteration"  # training_iteration = reports
    grace_period: int = 1  # every trial runs at least this long before it can be stopped
    reduction_factor: float = 3.0  # keep the top 1/reduction_factor at each rung
    max_t: int = 100  # no trial runs longer than this (in time_attr units)
    brackets: int = 1

    def __post_init__(self) -> None:
        if self.grace_period < 1 or self.max_t < self.grace_period:
            raise ValueError("asha: need 1 <= grace_period <= max_t")
        if self.reduction_factor <= 1:
            raise ValueError("asha.reduction_factor must be > 1")


@dataclass
class SweepMlflow:
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<sweep dir>/mlflow.db
    experiment: str = "dist-sweeps"


@dataclass
class SweepConfig:
    """A Tune sweep over a base pre-training recipe (see the module docstring)."""

    base: str = ""  # base recipe YAML, relative to the sweep file (or to the working directory)
    base_overrides: list[str] = field(default_factory=list)  # "key=value" applied to the base, like --set
    # dotted recipe key -> {grid: [...]} | {choice: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} |
    # {randint: [lo, hi]} (hi excluded). Nested mappings (model: {fusion_layers: {grid: ...}}) are flattened.
    search_space: dict = field(default_factory=dict)
    searcher: Literal["grid", "random", "optuna"] = "grid"  # grid: grid axes crossed, others sampled per point
    num_samples: int = 1  # grid: repeats of the grid; random/optuna: number of trials
    seed: int | None = 0  # sampling seed (random/optuna and the sampled axes of a grid)
    metric: Literal["val_top1", "val_top5", "val_mean_class_acc"] = "val_top1"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["none", "asha"] = "none"
    asha: AshaSection = field(default_factory=AshaSection)
    max_concurrent_trials: int | None = None  # None/0: as many as the cluster holds (derived from the scaling)
    trial_max_failures: int = 0  # Tune-level restarts of a failed trial (Train's run.max_failures come first)
    name: str = "sweep"
    storage_path: str = "./runs/sweeps"  # the sweep lives in <storage_path>/<name>
    mlflow: SweepMlflow = field(default_factory=SweepMlflow)

    def __post_init__(self) -> None:
        if not self.base:
            raise ValueError("base: name the base pre-training recipe YAML")
        if self.num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 0:
            raise ValueError("max_concurrent_trials must be >= 0 (0 or null: derive from the cluster)")
        if self.trial_max_failures < 0:
            raise ValueError("trial_max_failures must be >= 0")
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty directory name, got {self.name!r}")
        self.search_space = flatten_space(self.search_space)
        if not self.search_space:
            raise ValueError("search_space is empty: give at least one axis, e.g. model.fusion_layers: {grid: [...]}")
        for key, spec in self.search_space.items():
            check_domain(key, spec)


def flatten_space(space: dict, prefix: str = "") -> dict[str, dict]:
    """{"model": {"fusion_layers": {"grid": [...]}}} -> {"model.fusion_layers": {"grid": [...]}}."""
    if not isinstance(space, dict):
        raise ValueError(f"search_space{'.' + prefix.rstrip('.') if prefix else ''}: expected a mapping")
    out: dict[str, dict] = {}
    for key, spec in space.items():
        name = f"{prefix}{key}"
        if isinstance(spec, dict) and spec and not set(spec) & set(DOMAINS):
            out.update(flatten_space(spec, name + "."))
        else:
            out[name] = spec
    return out


def check_domain(key: str, spec: Any) -> None:
    """One axis must be a mapping with exactly one domain: grid/choice (a non-empty list), uniform/loguniform
    (two numbers, low < high, loguniform low > 0) or randint (two integers, low < high)."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ValueError(f"search_space.{key}: give exactly one of {', '.join(DOMAINS)}, e.g. {{grid: [a, b]}}; "
                         f"got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise ValueError(f"search_space.{key}.{kind}: expected a non-empty list, got {values!r}")
        return
    if not isinstance(values, list) or len(values) != 2:
        raise ValueError(f"search_space.{key}.{kind}: expected [low, high], got {values!r}")
    low, high = values
    numeric = (int,) if kind == "randint" else (int, float)
    if any(isinstance(v, bool) or not isinstance(v, numeric) for v in values):
        kind_name = "integers" if kind == "randint" else "numbers"
        raise ValueError(f"search_space.{key}.{kind}: low and high must be {kind_name}, got {values!r}")
    if not low < high:
        raise ValueError(f"search_space.{key}.{kind}: need low < high, got {values!r}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"search_space.{key}.loguniform: low must be > 0, got {low!r}")


# ---------------------------------------------------------------------------------------------------------------
# loading and validation (no Ray)
# ---------------------------------------------------------------------------------------------------------------


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """CLI `--set`s: keys of the sweep file go to the sweep; keys under a recipe-only section (model, data, train,
    eval, scaling, run) go to the base recipe, after its base_overrides."""
    sweep_keys = {f.name for f in dataclasses.fields(SweepConfig)}
    recipe_sections = {f.name for f in dataclasses.fields(Recipe)}
    to_sweep, to_base = [], []
    for text in overrides:
        head = parse_override(text)[0][0]
        if head in sweep_keys:
            to_sweep.append(text)
        elif head in recipe_sections:
            to_base.append(text)
        else:
            raise ConfigError(f"--set {text!r}: {head!r} is neither a sweep key ({', '.join(sorted(sweep_keys))}) "
                              f"nor a recipe section ({', '.join(sorted(recipe_sections))})")
    return to_sweep, to_base


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Load a sweep YAML (strict) plus `--set` overrides; `base` becomes an absolute path."""
    path = Path(path)
    to_sweep, to_base = split_overrides(overrides)
    data = apply_overrides(SweepConfig, load_yaml(path), to_sweep)
    sweep = from_dict(SweepConfig, data)
    base = Path(sweep.base)
    if not base.is_absolute():
        candidates = [path.parent / base, Path.cwd() / base]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"base: {sweep.base} not found next to {path} nor in {Path.cwd()}")
        base = found
    elif not base.is_file():
        raise ConfigError(f"base: {base} does not exist")
    return dataclasses.replace(sweep, base=str(base.resolve()), base_overrides=list(sweep.base_overrides) + to_base)


def sweep_dir(sweep: SweepConfig) -> str:
    """Where the sweep lives: <storage_path>/<name> (an absolute local path, or a URI)."""
    if "://" in sweep.storage_path:
        return f"{sweep.storage_path.rstrip('/')}/{sweep.name}"
    return str(Path(sweep.storage_path).resolve() / sweep.name)


def tracking_uri(sweep: SweepConfig) -> str:
    """The one MLflow store of the parent and all trials."""
    uri = sweep.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    where = sweep_dir(sweep)
    if "://" in where:
        raise ConfigError("storage_path is remote: set mlflow.tracking_uri to a tracking server (http://...)")
    return f"sqlite:///{Path(where) / 'mlflow.db'}"


def valid_recipe_keys(schema: type = Recipe, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the recipe schema (what `--set` and a search space may name)."""
    keys = []
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += valid_recipe_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def check_space_keys(space: dict[str, dict]) -> None:
    """Every search-space key must be a recipe leaf key that the sweep does not own; the error lists the valid
    keys of the section it names (or the sections)."""
    valid = valid_recipe_keys()
    for key in space:
        if key in RESERVED_KEYS:
            raise ConfigError(f"search_space.{key}: set by the sweep itself (run name, storage and tracking per "
                              f"trial); reserved keys: {', '.join(RESERVED_KEYS)}")
        if key in valid:
            continue
        section = key.split(".")[0]
        near = [k for k in valid if k.startswith(section + ".")]
        listed = near or sorted({k.split(".")[0] for k in valid})
        raise ConfigError(f"search_space: unknown recipe key {key!r}; valid keys"
                          f"{' in ' + section if near else ' start with one of'}: {', '.join(listed)}")


def _plain(value: Any) -> Any:
    """Numpy scalars (Tune's samplers) as Python numbers, tuples as lists."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def trial_overrides(trial_config: dict[str, Any]) -> list[str]:
    """A trial's values as `key=value` overrides (JSON is YAML, so values round-trip exactly)."""
    return [f"{key}={json.dumps(_plain(value))}" for key, value in sorted(trial_config.items())]


def build_trial_recipe(base: dict[str, Any], trial_config: dict[str, Any], **run: Any) -> Recipe:
    """The recipe of one trial: the resolved base dict, the trial's values, then `run` section fields."""
    data = apply_overrides(Recipe, base, trial_overrides(trial_config))
    recipe = from_dict(Recipe, data)
    if run:
        recipe = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, **run))
    return recipe


def _probe_values(spec: dict) -> list[Any]:
    """The values of an axis that validation builds: every grid/choice value, both ends of a range."""
    kind, values = next(iter(spec.items()))
    if kind == "randint":
        return [values[0], values[1] - 1]
    return list(values)


def check_space_values(base: dict[str, Any], space: dict[str, dict]) -> int:
    """Build the recipe of every combination of probe values (all of them up to MAX_VALIDATED_COMBINATIONS, else
    each axis alone) so that an invalid value (integration_dim not a multiple of head_dim, an unknown preset) fails
    now. Returns the number of recipes built."""
    keys = list(space)
    probes = [_probe_values(space[k]) for k in keys]
    total = math.prod(len(p) for p in probes)
    if total <= MAX_VALIDATED_COMBINATIONS:
        combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*probes)]
    else:
        combos = [{k: v} for k, p in zip(keys, probes, strict=True) for v in p]
    for combo in combos:
        try:
            build_trial_recipe(base, combo)
        except ConfigError as exc:
            shown = ", ".join(f"{k}={_plain(v)!r}" for k, v in combo.items())
            raise ConfigError(f"search_space: the trial {{{shown}}} is invalid: {exc}") from exc
    return len(combos)


@dataclass
class SweepPlan:
    """A validated sweep: the config, the resolved base recipe (absolute paths, sweep tracking) and where it runs."""

    sweep: SweepConfig
    base_recipe: Recipe
    base: dict[str, Any]  # the base recipe as the plain dict each trial starts from
    path: str  # the sweep directory (Tune experiment)
    tracking_uri: str

    @property
    def train_storage(self) -> str:
        """Where the trials' Train runs keep their checkpoints."""
        return f"{self.path}/trials"


def plan_sweep(sweep: SweepConfig, check_files: bool = True) -> SweepPlan:
    """Validate everything that can be checked before Ray starts: the base recipe, every search-space key against
    the recipe schema, the recipe of every grid point, the searcher's needs, the data files."""
    raw = apply_overrides(Recipe, load_yaml(sweep.base), list(sweep.base_overrides))
    check_space_keys(sweep.search_space)
    uri = tracking_uri(sweep)
    raw = apply_overrides(Recipe, raw, ["mlflow.enabled=true", f"mlflow.tracking_uri={json.dumps(uri)}",
                                        f"mlflow.experiment={json.dumps(sweep.mlflow.experiment)}"])
    recipe = with_absolute_paths(from_dict(Recipe, raw))
    if check_files:
        check_data_files(recipe)
    base = recipe_to_dict(recipe)
    check_space_values(base, sweep.search_space)
    if sweep.searcher == "optuna":
        for key, spec in sweep.search_space.items():
            kind, values = next(iter(spec.items()))
            if kind in ("grid", "choice") and not all(v is None or isinstance(v, (bool, int, float, str))
                                                      for v in values):
                raise ConfigError(f"search_space.{key}: optuna needs choices that are numbers or strings (use a "
                                  f"fusion preset name rather than a list of blocks), got {values!r}")
    return SweepPlan(sweep=sweep, base_recipe=recipe, base=base, path=sweep_dir(sweep), tracking_uri=uri)


# ---------------------------------------------------------------------------------------------------------------
# resources
# ---------------------------------------------------------------------------------------------------------------


def trial_resources(recipe: Recipe) -> dict[str, float]:
    """What one trial holds while it runs: its driver, the Train workers, and at least one decode actor per worker
    (Ray Data's pool never goes below one). Decode CPUs count as `decode_CPU` when decoding runs on labelled nodes."""
    scaling, data = recipe.scaling, recipe.data
    need = {"CPU": TRIAL_DRIVER_CPUS + scaling.num_workers * scaling.cpus_per_worker}
    decode = float(scaling.num_workers * data.decode_threads)
    if data.node_label_selector():  # labelled decode nodes (check_capacity resolves an unset label; "any": none)
        need["decode_CPU"] = decode
    else:
        need["CPU"] += decode
    if scaling.use_gpu:
        need["GPU"] = scaling.num_workers * scaling.gpus_per_worker
    return need


def max_trials_that_fit(cluster: dict[str, float], per_trial: dict[str, float]) -> int:
    """How many trials the cluster holds at once (0 when not even one fits)."""
    counts = [math.floor(cluster.get(key, 0.0) / need + 1e-9) for key, need in per_trial.items() if need > 0]
    return min(counts) if counts else 1


def cluster_capacity(decode_node_label: str | None = None) -> dict[str, float]:
    """The live cluster's CPUs and GPUs; when decoding runs on labelled nodes, their CPUs as `decode_CPU` (and only
    the other nodes' in CPU/GPU). The label is resolved as the workflows resolve it (`resolve_decode_nodes`:
    None means the dist-role=decode nodes when there are any, "any" means no label)."""
    from workflows.data.pipeline import resolve_decode_nodes

    decode = resolve_decode_nodes(decode_node_label)
    if decode.label is None:
        return {"CPU": decode.cpus, "GPU": decode.gpus}
    return {"CPU": decode.other_cpus, "GPU": decode.other_gpus, "decode_CPU": decode.cpus}


def resolve_max_concurrent(requested: int | None, cluster: dict[str, float], per_trial: dict[str, float]) -> int:
    """`requested` (None/0 = derive), never above what the cluster holds: trials that cannot all get their workers
    would hold placement groups and wait forever."""
    fits = max_trials_that_fit(cluster, per_trial)
    if fits < 1:
        need = ", ".join(f"{v:g} {k}" for k, v in per_trial.items())
        have = ", ".join(f"{cluster.get(k, 0.0):g} {k}" for k in per_trial)
        raise ConfigError(f"one trial needs {need} (driver, workers, one decode actor per worker) but the cluster has "
                          f"{have}: lower scaling.num_workers / cpus_per_worker or add nodes")
    if requested and requested > fits:
        print(f"{LOG_PREFIX} max_concurrent_trials {requested} lowered to {fits}: the cluster holds {fits} trials of "
              f"{per_trial} at once", flush=True)
    return min(requested, fits) if requested else fits


# ---------------------------------------------------------------------------------------------------------------
# the trial
# ---------------------------------------------------------------------------------------------------------------


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """The unique Train run (and MLflow nested run) name of a trial."""
    return f"{sweep_name}-{trial_id}"


def _attempts_file(sweep_path: str, run_name: str) -> Path | None:
    return None if "://" in sweep_path else Path(sweep_path) / "attempts" / f"{run_name}.log"


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial: the pre-training driver on base + this trial's values, reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from workflows.data.pipeline import drop_counter
    from workflows.pretrain import build_trainer
    from workflows.recipe import with_run_scoped_names

    trial_id = ray.tune.get_context().get_trial_id()
    name = trial_run_name(context["name"], trial_id)
    recipe = build_trial_recipe(context["base"], config, name=name, storage_path=context["train_storage"])
    attempts = _attempts_file(context["path"], name)
    if attempts is not None:  # a journal of starts: a resumed sweep must not start finished trials again
        attempts.parent.mkdir(parents=True, exist_ok=True)
        with attempts.open("a") as f:
            f.write(f"{trial_id}\n")
    print(f"{LOG_PREFIX} trial {trial_id} ({name}): {' '.join(trial_overrides(config))}", flush=True)
    recipe = with_run_scoped_names(recipe)
    counter = drop_counter(recipe.data.drop_counter)  # owned by this trial: survives its worker restarts
    trainer = build_trainer(recipe, extra_config={"mlflow_parent_run_id": context["parent_run_id"]},
                            callbacks=[TuneReportCallback()], name=name)
    trainer.fit()
    del counter


def trial_dirname(trial: Any) -> str:
    """Tune trial directories are named by trial id (module-level: Tune pickles it with the sweep state)."""
    return trial.trial_id


# ---------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------


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


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A fixed-width text table of `rows` (what the console shows)."""
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
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


class _Mlflow:
    """The sweep driver's guarded MLflow client: find or open the parent run, read and annotate nested runs."""

    def __init__(self, uri: str, experiment: str):
        self.ok = True
        self.uri, self.experiment = uri, experiment
        self.client: Any = None
        self.experiment_id: str | None = None
        self._guard("connect", self._connect)

    def _connect(self) -> None:
        import mlflow

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)

    def _guard(self, what: str, fn, *args, **kwargs) -> Any:
        if not self.ok:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a sweep
            self.ok = False
            print(f"{LOG_PREFIX} mlflow {what} failed ({type(exc).__name__}: {exc}); the sweep goes on untracked",
                  flush=True)
            return None

    def parent_run(self, sweep: SweepConfig, path: str) -> str | None:
        """The sweep's parent run: the one tagged with this sweep directory (resume), else a new one."""

        def find_or_create() -> str:
            runs = self.client.search_runs([self.experiment_id], f"tags.`dist.sweep_path` = '{path}'",
                                           order_by=["attributes.start_time DESC"], max_results=1)
            if runs:
                self.client.update_run(runs[0].info.run_id, status="RUNNING")
                return runs[0].info.run_id
            run = self.client.create_run(self.experiment_id, run_name=sweep.name,
                                         tags={"dist.sweep_path": path, "dist.role": "sweep"})
            from workflows.tracking import flatten

            params = flatten({k: v for k, v in to_dict(sweep).items() if k != "search_space"})
            params |= {f"search_space.{k}": json.dumps(v) for k, v in sweep.search_space.items()}
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            self.client.log_batch(run.info.run_id, params=items)
            self.client.log_text(run.info.run_id, dump_yaml(sweep), "sweep.yaml")
            return run.info.run_id

        return self._guard("parent run", find_or_create)

    def nested_runs(self, parent_id: str) -> dict[str, Any]:
        """Run name -> nested run of the parent."""
        runs = self._guard("search nested runs", self.client.search_runs, [self.experiment_id],
                           f"tags.mlflow.parentRunId = '{parent_id}'") or []
        return {r.info.run_name: r for r in runs}

    def metric_history(self, run_id: str, key: str) -> list[float]:
        history = self._guard("metric history", self.client.get_metric_history, run_id, key) or []
        return [m.value for m in history]

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and not math.isnan(v)]
        if items:
            self._guard("log metrics", self.client.log_batch, run_id, metrics=items)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self._guard("set tag", self.client.set_tag, run_id, key, str(value))

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self._guard("log artifact", self.client.log_artifact, run_id, str(path), artifact_path)

    def terminate(self, run_id: str, status: str) -> None:
        self._guard("terminate", self.client.set_terminated, run_id, status)


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def trial_row(result: Any, plan: SweepPlan, keys: list[str]) -> dict[str, Any]:
    """One results-table row from a Tune Result: the trial's values, its best report and its status."""
    sweep = plan.sweep
    trial_id = Path(result.path).name
    row: dict[str, Any] = {"trial_id": trial_id, "run_name": trial_run_name(sweep.name, trial_id)}
    row |= {k: _plain(result.config.get(k)) for k in keys}
    frame = result.metrics_dataframe
    reports = [] if frame is None or sweep.metric not in getattr(frame, "columns", []) else \
        [r for r in frame.to_dict("records") if r.get(sweep.metric) is not None]
    pick = max if sweep.mode == "max" else min
    best = pick(reports, key=lambda r: r[sweep.metric]) if reports else {}
    row["reports"] = len(reports)
    for key in ("val_top1", "val_top5", "val_mean_class_acc"):
        row[key] = float(best.get(key, math.nan))
    row["best_step"] = best.get("step", "")
    row["last_step"] = reports[-1].get("step", "") if reports else ""
    row["checkpoint"] = best.get("checkpoint_path", "")
    if result.error is not None:
        first = str(result.error).strip().splitlines()
        row["status"] = "error: " + (first[-1] if first else type(result.error).__name__)[:120]
    elif not reports:
        row["status"] = "no report"
    else:
        last_ckpt = reports[-1].get("checkpoint_path", "")
        final = _read_json(Path(last_ckpt) / "state.json").get("final") if last_ckpt else None
        row["status"] = "completed" if final or final is None else "stopped early"
    attempts = _attempts_file(plan.path, row["run_name"])
    row["attempts"] = len(attempts.read_text().splitlines()) if attempts is not None and attempts.exists() else ""
    return row


def add_costs(rows: list[dict[str, Any]], plan: SweepPlan, keys: list[str]) -> None:
    """Counted GFLOPs per clip and trainable params for each row (counted once per distinct model config)."""
    from dist_model.flops import count_clip_cost

    cache: dict[str, Any] = {}
    for row in rows:
        recipe = build_trial_recipe(plan.base, {k: row[k] for k in keys if row.get(k) is not None})
        model_key = json.dumps(recipe_to_dict(recipe)["model"], sort_keys=True)
        if model_key not in cache:
            cache[model_key] = count_clip_cost(recipe.model_cfg, recipe.model.variant)
        cost = cache[model_key]
        row.update(dist_gflops=cost.dist_gflops, clip_gflops=cost.clip_gflops, total_gflops=cost.total_gflops,
                   trainable_params=cost.trainable_params)


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
    if "://" not in sweep_path:
        return []
    import pyarrow.fs

    fs, _ = pyarrow.fs.FileSystem.from_uri(sweep_path)
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
    scored = [r for r in rows if not math.isnan(r.get(metric, math.nan))]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r[metric])


def summarize(grid: Any, plan: SweepPlan, tracker: _Mlflow, parent_id: str | None, interrupted: bool) -> SweepResult:
    """Build the results table, annotate the nested runs, and log table, plot and best checkpoint on the parent."""
    sweep = plan.sweep
    keys = list(sweep.search_space)
    rows = [trial_row(result, plan, keys) for result in grid]
    rows.sort(key=lambda r: r["trial_id"])
    add_costs(rows, plan, keys)
    nested = tracker.nested_runs(parent_id) if parent_id else {}
    for row in rows:
        run = nested.get(row["run_name"])
        rates = tracker.metric_history(run.info.run_id, "clips_per_s") if run else []
        row["clips_per_s"] = statistics.median(rates) if rates else math.nan
        if run is None:
            continue
        tracker.log_metrics(run.info.run_id, {"dist_gflops_per_clip": row["dist_gflops"],
                                              "clip_gflops_per_clip": row["clip_gflops"],
                                              "total_gflops_per_clip": row["total_gflops"],
                                              "clips_per_s_median": row["clips_per_s"]})
        tracker.set_tags(run.info.run_id, {"tune.trial_id": row["trial_id"], "tune.status": row["status"]})
        if row["status"].startswith("error") and run.info.status == "RUNNING":
            tracker.terminate(run.info.run_id, "FAILED")
    best = _best_row(rows, sweep.metric, sweep.mode)
    fronts = pareto_front([r["total_gflops"] for r in rows], [r.get(sweep.metric, math.nan) for r in rows],
                          maximize=sweep.mode == "max")
    for row, on in zip(rows, fronts, strict=True):
        row["pareto"] = on
        row["best"] = best is not None and row["trial_id"] == best["trial_id"]
    columns = (["trial_id", "status"] + keys + ["val_top1", "val_top5", "val_mean_class_acc", "best_step",
                                                "reports", "dist_gflops", "clip_gflops", "total_gflops",
                                                "trainable_params", "clips_per_s", "pareto", "best", "attempts",
                                                "run_name", "checkpoint"])
    shown = [c for c in columns if c not in ("run_name", "checkpoint")]
    print(f"{LOG_PREFIX} results ({'interrupted: ' if interrupted else ''}{len(rows)} trials; GFLOPs are counted "
          f"per clip, 2 per multiply-add):\n{format_table(rows, shown)}", flush=True)

    result = SweepResult(path=plan.path, rows=rows, best=best, parent_run_id=parent_id,
                         tracking_uri=plan.tracking_uri, interrupted=interrupted)
    with tempfile.TemporaryDirectory(prefix="dist-sweep-") as tmp:
        # A local sweep keeps its table and plot in the sweep directory; a remote one only in MLflow.
        out_dir = Path(plan.path) if "://" not in plan.path else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        result.table_path, result.plot_path = out_dir / RESULTS_CSV, out_dir / PLOT_PNG
        write_csv(rows, columns, result.table_path)
        label_keys = [k for k in keys if len({json.dumps(r.get(k)) for r in rows}) > 1] or keys[:1]
        save_pareto_png(rows, sweep.metric, label_keys, result.plot_path,
                        f"{sweep.name}: {sweep.metric} against cost ({len(rows)} trials)",
                        best["trial_id"] if best else None)
        if parent_id:
            tracker.log_artifact(parent_id, result.table_path)
            tracker.log_artifact(parent_id, result.plot_path)
            tracker.log_metrics(parent_id, {
                "trials": float(len(rows)),
                "trials_completed": float(sum(r["status"] == "completed" for r in rows)),
                "trials_failed": float(sum(r["status"].startswith("error") for r in rows)),
                **({f"best_{sweep.metric}": best[sweep.metric]} if best else {})})
        if best is not None:
            checkpoint = best.get("checkpoint") or ""
            print(f"{LOG_PREFIX} best trial {best['trial_id']}: {sweep.metric} {best[sweep.metric]:.2f} at step "
                  f"{best['best_step']} ({' '.join(trial_overrides({k: best[k] for k in keys}))}); checkpoint: "
                  f"{checkpoint or 'none kept'}", flush=True)
            if parent_id and checkpoint:
                for path in fetch_checkpoint_files(checkpoint, plan.path, Path(tmp) / "best"):
                    tracker.log_artifact(parent_id, path, "best_checkpoint")
                tracker.set_tags(parent_id, {"best_trial_id": best["trial_id"], "best_checkpoint": checkpoint})
        if "://" in plan.path:
            result.table_path = result.plot_path = None
    if parent_id and not interrupted:
        tracker.terminate(parent_id, "FINISHED")
    return result


# ---------------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------------


def expected_trials(sweep: SweepConfig) -> int:
    """How many trials a complete sweep runs: the grid times num_samples, or num_samples for the samplers."""
    if sweep.searcher != "grid":
        return sweep.num_samples
    sizes = [len(spec["grid"]) for spec in sweep.search_space.values() if "grid" in spec]
    return sweep.num_samples * math.prod(sizes)


def build_param_space(sweep: SweepConfig) -> dict[str, Any]:
    """The Tune search space: grid axes are crossed with `searcher: grid` and sampled otherwise."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, spec in sweep.search_space.items():
        kind, values = next(iter(spec.items()))
        if kind == "grid":
            space[key] = tune.grid_search(values) if sweep.searcher == "grid" else tune.choice(values)
        elif kind == "choice":
            space[key] = tune.choice(values)
        else:
            space[key] = getattr(tune, kind)(*values)
    return space


def _search_alg(sweep: SweepConfig, max_concurrent: int) -> Any:
    """The search algorithm, limited to `max_concurrent` live trials. (Tune ignores TuneConfig's
    max_concurrent_trials, with only a warning, when given a BasicVariantGenerator: it must carry the limit.)"""
    if sweep.searcher == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:  # pragma: no cover - optuna is in requirements.txt
            raise ConfigError("searcher optuna needs the optuna package (pip install optuna)") from exc
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(OptunaSearch(seed=sweep.seed), max_concurrent=max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent)


def _scheduler(sweep: SweepConfig) -> Any:
    if sweep.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    a = sweep.asha
    return ASHAScheduler(time_attr=a.time_attr, max_t=a.max_t, grace_period=a.grace_period,
                         reduction_factor=a.reduction_factor, brackets=a.brackets)


def run_sweep(plan: SweepPlan, resume: bool = False, retry_failed: bool = False,
              callbacks: list | None = None) -> SweepResult:
    """Run (or resume) a validated sweep on Ray Tune and summarise it. A sweep whose directory holds a restorable
    Tune experiment is always resumed; `resume=True` insists on one. `callbacks` go to Tune's RunConfig."""
    from ray import tune

    from workflows.pretrain import check_capacity, validate_before_start

    sweep = plan.sweep
    validate_before_start(plan.base_recipe)
    restorable = tune.Tuner.can_restore(plan.path)
    if resume and not restorable:
        raise ConfigError(f"--resume: no sweep to resume at {plan.path}")
    print(f"{LOG_PREFIX} sweep {sweep.name} in {plan.path} ({'resuming' if restorable else 'new'}); MLflow "
          f"{plan.tracking_uri}, experiment {sweep.mlflow.experiment}\n{dump_yaml(sweep)}", flush=True)
    per_trial = trial_resources(plan.base_recipe)
    from workflows.pretrain import ensure_ray

    ensure_ray(per_trial["CPU"])
    # Resolve data.decode_node_label once, here; every trial starts from the resolved base recipe.
    base_recipe = check_capacity(plan.base_recipe, log_prefix=LOG_PREFIX)
    plan = dataclasses.replace(plan, base_recipe=base_recipe, base=recipe_to_dict(base_recipe))
    per_trial = trial_resources(plan.base_recipe)
    concurrent = resolve_max_concurrent(sweep.max_concurrent_trials,
                                        cluster_capacity(plan.base_recipe.data.decode_node_label), per_trial)
    print(f"{LOG_PREFIX} one trial holds {per_trial}; up to {concurrent} trial(s) at once", flush=True)

    if "://" not in plan.path:
        Path(plan.path).mkdir(parents=True, exist_ok=True)
    tracker = _Mlflow(plan.tracking_uri, sweep.mlflow.experiment)
    parent_id = tracker.parent_run(sweep, plan.path) if tracker.ok else None
    context = {"name": sweep.name, "base": plan.base, "path": plan.path, "train_storage": plan.train_storage,
               "parent_run_id": parent_id}
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": TRIAL_DRIVER_CPUS})
    if restorable:
        tuner = tune.Tuner.restore(plan.path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=retry_failed)
    else:
        storage, name = plan.path.rsplit("/", 1)
        tuner = tune.Tuner(
            trainable,
            param_space=build_param_space(sweep),
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, search_alg=_search_alg(sweep, concurrent),
                                        scheduler=_scheduler(sweep), num_samples=sweep.num_samples,
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=name, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=sweep.trial_max_failures),
                                      callbacks=callbacks or []),
        )
    grid = tuner.fit()
    finished = grid.num_terminated + grid.num_errors
    interrupted = finished < max(len(grid), expected_trials(sweep))
    result = summarize(grid, plan, tracker, parent_id, interrupted)
    if interrupted:
        print(f"{LOG_PREFIX} the sweep was interrupted with {finished} of {expected_trials(sweep)} trial(s) "
              f"finished; continue it with the same command plus --resume", flush=True)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows tune", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="sweep YAML (see workflows/configs/sweep_*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sweep key (num_samples=4) or a base recipe key (data.train_manifest=...); "
                             "repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep (also automatic when its directory holds one)")
    parser.add_argument("--retry-failed", action="store_true", help="when resuming, rerun failed trials from scratch")
    args = parser.parse_args(argv)
    try:
        plan = plan_sweep(load_sweep(args.config, args.overrides))
        result = run_sweep(plan, resume=args.resume, retry_failed=args.retry_failed)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if result.best is not None and not result.interrupted else 1
