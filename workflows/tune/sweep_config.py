"""The sweep file of `python -m workflows tune`: its schema and search space, loading with `--set`, and every check
done before Ray starts.

A sweep YAML names a base pre-training recipe and a search space over the same dotted keys `--set` uses
(`model.fusion_layers`, `model.integration_dim`, `train.lr`, ...). `plan_sweep` checks everything that can be
checked without Ray (the base recipe, every search-space key against the recipe schema, the recipe of every grid
point and of every point in `points_to_evaluate`, the searcher's needs, the data files) and returns a `SweepPlan`
that `workflows.tune.driver.run_sweep` runs. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

from workflows.config_loader import ConfigError, apply_overrides, from_dict, load_yaml, parse_override
from workflows.recipe import (
    Recipe,
    ValidationMetric,
    check_data_files,
    check_folder_name,
    recipe_to_dict,
    with_absolute_paths,
)
from workflows.runtime import is_remote

LOG_PREFIX = "[tune]"
DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
# Keys the sweep itself sets on every trial; a search space may not touch them.
RESERVED_KEYS = ("run.name", "run.storage_path", "mlflow.enabled", "mlflow.tracking_uri", "mlflow.experiment")
MAX_VALIDATED_COMBINATIONS = 4096  # beyond this many grid/choice combinations, values are checked axis by axis


# ---------------------------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class AshaSection:
    """ASHA early stopping (used when `scheduler: asha`). Time is counted in validations by default."""

    time_attr: Literal["training_iteration", "step"] = "training_iteration"  # training_iteration = reports
    grace_period: int = 1  # every trial runs at least this long before it can be stopped
    reduction_factor: float = 3.0  # keep the top 1/reduction_factor at each rung
    # No trial runs longer than this (in time_attr units). Tune stops a trial that reaches it at once; the training
    # loop logs its final curves and weights to MLflow before its last report, so nothing is lost when that is max_t.
    max_t: int = 100
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
    # random/optuna: whole trial configs ({key: value} for every search-space key) run first, in this order, as the
    # first of the num_samples trials (e.g. the paper's choice); the searcher suggests the rest.
    points_to_evaluate: list[dict] = field(default_factory=list)
    # what ranks the trials, and each trial's checkpoints (its eval.best_metric): val_file_* for a validation set of
    # clips cut from longer files
    metric: ValidationMetric = "val_top1"
    mode: Literal["max", "min"] = "max"  # every metric above is an accuracy: min is refused
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
        check_folder_name(self.name, "name", "the sweep's folder under storage_path")
        if self.mode == "min":  # the trials keep their checkpoints best by the metric, highest first
            raise ValueError(f"mode: min would rank the worst trial best: {self.metric}, like every metric a sweep "
                             f"ranks by, is an accuracy (higher is better); leave mode out (max)")
        self.search_space = flatten_space(self.search_space)
        if not self.search_space:
            raise ValueError("search_space is empty: give at least one axis, e.g. model.fusion_layers: {grid: [...]}")
        for key, spec in self.search_space.items():
            check_domain(key, spec)
        if self.points_to_evaluate and self.searcher == "grid":
            raise ValueError("points_to_evaluate needs searcher random or optuna (a grid already runs every point)")
        if len(self.points_to_evaluate) > self.num_samples:
            raise ValueError(f"points_to_evaluate has {len(self.points_to_evaluate)} points but num_samples is "
                             f"{self.num_samples}: the points are the first of the num_samples trials")
        self.points_to_evaluate = [check_point(i, p, self.search_space) for i, p in enumerate(self.points_to_evaluate)]


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


def _in_domain(value: Any, spec: dict) -> bool:
    kind, values = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        return value in values
    if isinstance(value, bool) or not isinstance(value, (int,) if kind == "randint" else (int, float)):
        return False
    low, high = values
    return low <= value < high if kind == "randint" else low <= value <= high


def check_point(index: int, point: Any, space: dict[str, dict]) -> dict[str, Any]:
    """points_to_evaluate[index] flattened like the search space: a value for every axis, inside its domain."""
    where = f"points_to_evaluate[{index}]"
    if not isinstance(point, dict):
        raise ValueError(f"{where}: expected a mapping of search-space keys to values, got {point!r}")

    def flat(data: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = f"{prefix}{key}"
            out.update(flat(value, name + ".") if isinstance(value, dict) and name not in space else {name: value})
        return out

    values = flat(point)
    extra, missing = sorted(set(values) - set(space)), sorted(set(space) - set(values))
    if extra or missing:
        raise ValueError(f"{where}: give a value for every search-space key and no other"
                         f"{'; not in search_space: ' + ', '.join(extra) if extra else ''}"
                         f"{'; missing: ' + ', '.join(missing) if missing else ''}")
    for key, value in values.items():
        if not _in_domain(value, space[key]):
            raise ValueError(f"{where}.{key}: {value!r} is outside its search-space domain {space[key]!r}")
    return values


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
        parts = parse_override(text)[0]
        head, key = parts[0], ".".join(parts)
        if head in sweep_keys:  # (mlflow.* too: the sweep's own section)
            to_sweep.append(text)
        elif key in RESERVED_KEYS:  # the sweep sets them per trial: a --set of them would change nothing
            raise ConfigError(f"--set {text!r}: {key} is set by the sweep itself for each trial (run name, storage, "
                              f"tracking); set the sweep's own keys instead: name, storage_path, mlflow.*")
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
    raw = load_yaml(path)
    recipe_only = {f.name for f in dataclasses.fields(Recipe)} - {f.name for f in dataclasses.fields(SweepConfig)}
    if not {"base", "search_space"} & set(raw) and set(raw) & recipe_only:  # the reverse of load_recipe's hint
        raise ConfigError(f"{path} is a training recipe, not a Tune sweep (it has the recipe sections "
                          f"{', '.join(sorted(set(raw) & recipe_only))} and no base or search_space): run it with "
                          f"`python -m workflows pretrain --config {path}`, or sweep over it from a sweep file whose "
                          f"base names it")
    data = apply_overrides(SweepConfig, raw, to_sweep)
    sweep = from_dict(SweepConfig, data)
    for key in [".".join(parse_override(text)[0]) for text in to_base]:
        if key in sweep.search_space:  # it sets the base recipe (checked as a whole), not what a trial runs with
            print(f"note: --set {key} sets the base recipe only: the search space sweeps this key, and each trial "
                  f"takes its value from the axis (search_space: {key}: ... in {path})", file=sys.stderr)
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
    if is_remote(sweep.storage_path):
        return f"{sweep.storage_path.rstrip('/')}/{sweep.name}"
    return str(Path(sweep.storage_path).expanduser().resolve() / sweep.name)  # ~/sweeps: the home directory


def tracking_uri(sweep: SweepConfig) -> str:
    """The one MLflow store of the parent and all trials (a sqlite one's directory, the sweep's, is made when the
    sweep starts)."""
    from workflows.tracking import resolve_tracking_uri

    try:
        return resolve_tracking_uri(sweep.mlflow.tracking_uri, sweep_dir(sweep), make_dir=False)
    except ConfigError:
        raise ConfigError("storage_path is remote: set mlflow.tracking_uri to a tracking server (http://...)") from None


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


def plain_value(value: Any) -> Any:
    """Numpy scalars (Tune's samplers) as Python numbers, tuples as lists."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return value


def trial_overrides(trial_config: dict[str, Any]) -> list[str]:
    """A trial's values as `key=value` overrides (JSON is YAML, so values round-trip exactly)."""
    return [f"{key}={json.dumps(plain_value(value))}" for key, value in sorted(trial_config.items())]


def build_trial_recipe(base: dict[str, Any], trial_config: dict[str, Any], **run: Any) -> Recipe:
    """The recipe of one trial: the resolved base dict, the trial's values, then `run` section fields."""
    data = apply_overrides(Recipe, base, trial_overrides(trial_config))
    recipe = from_dict(Recipe, data)
    if run:
        recipe = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, **run))
    return recipe


RANDINT_PROBES = 64  # a randint axis is built at up to this many values between its ends (every one when as many)


def _probe_values(spec: dict) -> list[Any]:
    """The values of an axis that validation builds: every grid/choice value, both ends of a range."""
    kind, values = next(iter(spec.items()))
    if kind == "randint":
        return [values[0], values[1] - 1]
    return list(values)


def check_space_values(base: dict[str, Any], space: dict[str, dict], check_files: bool = False) -> int:
    """Build the recipe of every combination of probe values (all of them up to MAX_VALIDATED_COMBINATIONS, else
    each axis alone) so that an invalid value (integration_dim not a multiple of head_dim, an unknown preset) fails
    now; with `check_files`, the data files each one names must exist. A real-valued axis (uniform, loguniform) is
    also built at a value between its ends: its ends may be whole numbers that an integer key takes while every
    draw is not. Returns the number of recipes built."""
    for key, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind in ("uniform", "loguniform"):
            lo, hi = float(values[0]), float(values[1])
            inside = lo * (hi / lo) ** 0.37 if kind == "loguniform" else lo + 0.37 * (hi - lo)
            try:
                build_trial_recipe(base, {key: inside})
            except ConfigError as exc:
                raise ConfigError(f"search_space.{key}: {kind} draws real numbers such as {inside:.4g}, which {key} "
                                  f"does not take ({exc}); use randint for whole numbers, or choice") from None
        elif kind == "randint":  # its ends are built below; a value between them may not fit (a head-width multiple)
            lo, hi = int(values[0]), int(values[1])
            step = max(1, (hi - lo) // RANDINT_PROBES)
            for inside in range(lo + 1, hi - 1, step):
                try:
                    build_trial_recipe(base, {key: inside})
                except ConfigError as exc:
                    raise ConfigError(f"search_space.{key}: randint draws every whole number in [{lo}, {hi}), such "
                                      f"as {inside}, which {key} does not take ({exc}); use choice with the values "
                                      f"that fit") from None
    keys = list(space)
    probes = [_probe_values(space[k]) for k in keys]
    total = math.prod(len(p) for p in probes)
    if total <= MAX_VALIDATED_COMBINATIONS:
        combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*probes)]
    else:
        combos = [{k: v} for k, p in zip(keys, probes, strict=True) for v in p]
    for combo in combos:
        try:
            recipe = build_trial_recipe(base, combo)
            if check_files and any(k.startswith("data.") for k in combo):  # a file the search space chooses
                check_data_files(with_absolute_paths(recipe))
        except ConfigError as exc:
            shown = ", ".join(f"{k}={plain_value(v)!r}" for k, v in combo.items())
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
    raw = apply_overrides(Recipe, load_yaml(sweep.base), list(sweep.base_overrides),
                          where="the sweep's base_overrides (or a recipe key given with --set)")
    check_space_keys(sweep.search_space)
    uri = tracking_uri(sweep)
    raw = apply_overrides(Recipe, raw, ["mlflow.enabled=true", f"mlflow.tracking_uri={json.dumps(uri)}",
                                        f"mlflow.experiment={json.dumps(sweep.mlflow.experiment)}",
                                        "mlflow.register_model=false",  # trials are candidates, not results
                                        # a trial keeps its checkpoints best by the sweep's metric: the table names one
                                        f"eval.best_metric={sweep.metric}"])
    recipe = with_absolute_paths(from_dict(Recipe, raw))
    if check_files:
        check_data_files(recipe)
    base = recipe_to_dict(recipe)
    for i, point in enumerate(sweep.points_to_evaluate):  # first: a value the user wrote out is the one to name
        try:
            build_trial_recipe(base, point)
        except ConfigError as exc:
            raise ConfigError(f"points_to_evaluate[{i}] is invalid: {exc}") from exc
    check_space_values(base, sweep.search_space, check_files)
    if sweep.searcher == "optuna":
        for key, spec in sweep.search_space.items():
            kind, values = next(iter(spec.items()))
            if kind in ("grid", "choice") and not all(v is None or isinstance(v, (bool, int, float, str))
                                                      for v in values):
                raise ConfigError(f"search_space.{key}: optuna needs choices that are numbers or strings (use a "
                                  f"fusion preset name rather than a list of blocks), got {values!r}")
    return SweepPlan(sweep=sweep, base_recipe=recipe, base=base, path=sweep_dir(sweep), tracking_uri=uri)


def expected_trials(sweep: SweepConfig) -> int:
    """How many trials a complete sweep runs: the grid times num_samples, or num_samples for the samplers."""
    if sweep.searcher != "grid":
        return sweep.num_samples
    sizes = [len(spec["grid"]) for spec in sweep.search_space.values() if "grid" in spec]
    return sweep.num_samples * math.prod(sizes)


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """The unique Train run (and MLflow nested run) name of a trial."""
    return f"{sweep_name}-{trial_id}"


def attempts_file(sweep_path: str, run_name: str) -> Path | None:
    """The journal of a trial's starts (one line per start of its driver); None for a remote sweep."""
    return None if is_remote(sweep_path) else Path(sweep_path) / "attempts" / f"{run_name}.log"
