"""Ray Tune sweeps over DiST's fusion choices: `python -m workflows tune --config SWEEP.yaml [--set k=v] [--resume]`.

This module sizes the trials against the live cluster, runs them on Ray Tune (`run_sweep`) and holds the CLI. Each
trial is the pre-training driver on its own recipe (base + base_overrides + the trial's values):
`pretrain.build_trainer(...).fit()` with Tune's report callback; the training loop itself is trainer.py's only.

Searchers: `grid` crosses the grid axes (the sampled axes are drawn per point), `random` and `optuna` draw
`num_samples` trials, starting with `points_to_evaluate` when given. `scheduler: asha` stops trials whose
validation metric falls behind at a rung (time counted in validations by default).

Tracking (workflows.tracking.Tracker, which never stops a sweep): one MLflow parent run per sweep; each trial's
rank-0 worker opens a nested run holding the trial's resolved config and its metrics per report. When the sweep
ends, report.py adds each trial's cost and status and closes its run; the parent gets the results table, the
accuracy-vs-cost plot and the best trial's checkpoint.

An interrupted sweep (Ctrl-C, a lost driver) resumes from `<storage_path>/<name>` through `Tuner.restore`: finished
trials are kept, unfinished ones continue from their latest checkpoints (`--retry-failed`: failed ones too). A failing
trial is reported in the table (status `error: ...`) and the sweep goes on with the other trials, unless it failed on
a full disk: then the sweep stops as on Ctrl-C (progress.SweepProgress). At most max_concurrent_trials trials hold
cluster resources at once, resumed sweeps included (slots.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from workflows.config_loader import ConfigError, config_parser, dump_yaml, to_dict
from workflows.recipe import Recipe, recipe_to_dict
from workflows.run_lock import claim_run_directory
from workflows.runtime import (
    is_remote,
    redact_secrets,
    stop_like_ctrl_c,
    stop_signal_note,
    storage_of,
    write_text,
)
from workflows.tracking import Tracker
from workflows.tune.report import SweepResult, summarize_sweep
from workflows.tune.sweep_config import (
    LOG_PREFIX,
    SweepConfig,
    SweepPlan,
    attempts_file,
    build_trial_recipe,
    expected_trials,
    load_sweep,
    plan_sweep,
    trial_overrides,
    trial_run_name,
)

TRIAL_DRIVER_CPUS = 0.1  # the trial's driver function only waits on fit(); Tune needs a non-empty request
# Ray Tune 2.60 copies these from the sweep driver's environment into every trial actor's runtime env, which Ray logs
# in each node's runtime_env_agent.log and keeps in the GCS actor table (dashboard, State API).
TUNE_COPIED_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def keep_credentials_out_of_trial_runtime_envs() -> None:
    """Stop Ray Tune from copying AWS credentials into the trials' runtime envs (TUNE_COPIED_CREDENTIALS). The trials
    do not need the copy: they run on the cluster's nodes, whose processes inherit the credentials from `ray start`
    (or the instance profile), or in the job's runtime env, which every actor of the job inherits; the Train
    workers inside a trial never got such a copy either."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # a Ray without that module: nothing to stop
        return
    copied = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(copied, (set, frozenset)):
        class_cache.ENV_VARS_TO_PROPAGATE = type(copied)(set(copied) - set(TUNE_COPIED_CREDENTIALS))


# ---------------------------------------------------------------------------------------------------------------
# resources
# ---------------------------------------------------------------------------------------------------------------


def trial_resources(recipe: Recipe) -> dict[str, float]:
    """What one trial holds while it runs: its driver, the Train workers, and at least one decoder per worker
    (Ray Data's pool never goes below one). Decode CPUs count as `decode_CPU` when decoding runs on labelled nodes."""
    scaling, data = recipe.scaling, recipe.data
    need = {"CPU": TRIAL_DRIVER_CPUS + scaling.max_workers * scaling.cpus_per_worker}
    decode = float(scaling.max_workers * data.decode_threads)
    if data.node_label_selector():  # labelled decode nodes (check_capacity resolves an unset label; "any": none)
        need["decode_CPU"] = decode
    else:
        need["CPU"] += decode
    if scaling.use_gpu:
        need["GPU"] = scaling.max_workers * scaling.gpus_per_worker
    return need


def max_trials_that_fit(cluster: dict[str, float], per_trial: dict[str, float]) -> int:
    """How many trials the cluster holds at once (0 when not even one fits)."""
    counts = [math.floor(cluster.get(key, 0.0) / need + 1e-9) for key, need in per_trial.items() if need > 0]
    return min(counts) if counts else 1


def cluster_capacity(decode_node_label: str | None = None) -> dict[str, float]:
    """The live cluster's CPUs and GPUs; when decoding runs on labelled nodes, their CPUs as `decode_CPU` (and only
    the other nodes' in CPU/GPU). The label is resolved as the workflows resolve it (`resolve_decode_nodes`:
    None means the dist-role=decode nodes when there are any, "any" means no label)."""
    from workflows.data.decode_nodes import resolve_decode_nodes

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
        raise ConfigError(f"one trial needs {need} (driver, workers, one decoder per worker) but the cluster has "
                          f"{have}: lower scaling.num_workers / cpus_per_worker or add nodes")
    if requested and requested > fits:
        print(f"{LOG_PREFIX} max_concurrent_trials {requested} lowered to {fits}: the cluster holds {fits} trials of "
              f"{per_trial} at once", flush=True)
    return min(requested, fits) if requested else fits


# ---------------------------------------------------------------------------------------------------------------
# the trial
# ---------------------------------------------------------------------------------------------------------------


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial: the pre-training driver on base + this trial's values, reporting to Tune."""
    import ray.tune

    from workflows.recipe import with_run_scoped_names
    from workflows.tune.slots import give_back_slot, take_slot

    trial_id = ray.tune.get_context().get_trial_id()
    name = trial_run_name(context["name"], trial_id)
    recipe = build_trial_recipe(context["base"], config, name=name, storage_path=context["train_storage"])
    print(f"{LOG_PREFIX} trial {trial_id} ({name}): {' '.join(trial_overrides(config))}", flush=True)
    attempts = attempts_file(context["path"], name)
    if attempts is not None:  # a journal of starts: a resumed sweep must not start finished trials again
        attempts.parent.mkdir(parents=True, exist_ok=True)
        with attempts.open("a") as f:
            f.write(f"{trial_id}\n")
    recipe = with_run_scoped_names(recipe)
    take_slot(context["path"], trial_id)  # before the Train run reserves workers and decoders
    try:
        run_trial_holding_a_slot(recipe, context, trial_id, name)
    finally:
        give_back_slot(context["path"], trial_id)


def run_trial_holding_a_slot(recipe: Recipe, context: dict[str, Any], trial_id: str, name: str) -> None:
    """The trial's Train run, fitted once this trial holds one of the sweep's slots."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from workflows.checkpoints import newest_complete_checkpoint
    from workflows.data.drops import drop_counter
    from workflows.elastic import forget_unrestartable_failure, kv_key, kv_put, raise_if_not_restarted
    from workflows.pretrain import build_trainer, check_free_space, fit_through_storage_outages

    counter = drop_counter(recipe.data.drop_counter)  # owned by this trial: survives its worker restarts
    forget_unrestartable_failure(recipe.run_dir)
    if newest_complete_checkpoint(recipe.run_dir):  # resumed (--resume, --retry-failed, trial_max_failures): the
        # first worker group's restart line says so, not "a worker or node was lost"
        kv_put(kv_key(recipe.run_dir, "event"), {"reason": "the sweep started this trial again"})
    if not is_remote(recipe.run_dir):  # a disk without room for the next checkpoint fails the trial now, not after
        check_free_space(recipe, warn=False)  # training up to it (the sweep warned of the whole sweep's need)
    # As `pretrain` fits: a Train controller that could not write to storage is waited out and fitted again, and
    # one that met a full disk ends the trial as RunNotRestarted (which stops the sweep); before each fit, a
    # checkpoint registry Ray could not start from (a retried trial's, cut short by a full disk) is set aside; a
    # node found without the shared disk is left out of the trial.
    fit_through_storage_outages(
        lambda fitted: build_trainer(fitted, extra_config={"mlflow_parent_run_id": context["parent_run_id"]},
                                     callbacks=[TuneReportCallback()], name=name,
                                     verbose=context.get("verbose", False)),
        recipe)
    del counter
    raise_if_not_restarted(recipe.run_dir)  # the trial errors with the reason, not a finish without results


def trial_dirname(trial: Any) -> str:
    """Tune trial directories are named by trial id (module-level: Tune pickles it with the sweep state)."""
    return trial.trial_id


# ---------------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------------


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
    """The search algorithm, limited to `max_concurrent` live trials, starting with `points_to_evaluate`. (Tune
    ignores TuneConfig's max_concurrent_trials, with only a warning, when given a BasicVariantGenerator: it must
    carry the limit.)"""
    points = [dict(p) for p in sweep.points_to_evaluate] or None
    if sweep.searcher == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:  # pragma: no cover - optuna is in requirements.txt
            raise ConfigError("searcher optuna needs the optuna package (pip install optuna)") from exc
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=points, seed=sweep.seed),
                                  max_concurrent=max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points, random_state=sweep.seed,
                                 max_concurrent=max_concurrent)


def _scheduler(sweep: SweepConfig) -> Any:
    if sweep.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    a = sweep.asha
    return ASHAScheduler(time_attr=a.time_attr, max_t=a.max_t, grace_period=a.grace_period,
                         reduction_factor=a.reduction_factor, brackets=a.brackets)


def open_parent_run(plan: SweepPlan) -> Tracker:
    """The sweep's MLflow parent run: the one tagged with this sweep directory (a resumed sweep), else a new one
    holding the sweep's settings as params and the sweep file as sweep.yaml. A no-op Tracker when MLflow cannot
    be reached: the sweep goes on untracked."""
    sweep = plan.sweep
    parent = Tracker(plan.tracking_uri, sweep.mlflow.experiment, run_name=sweep.name, tags={"dist.role": "sweep"},
                     reuse_tags={"dist.sweep_path": plan.path}, who="the sweep")
    if parent.created:
        params = {k: v for k, v in to_dict(sweep).items() if k != "search_space"}
        params |= {f"search_space.{k}": json.dumps(v) for k, v in sweep.search_space.items()}
        parent.log_params(params)
        parent.log_text(dump_yaml(sweep), "sweep.yaml")
    return parent


MANY_TRIALS = 100  # more trials than this: the start says so
SHOWN_VALUES = 8  # values of one search-space axis the start-up banner lists


def banner_yaml(sweep: SweepConfig) -> str:
    """The sweep as YAML for the start-up banner, an axis' long list of values cut short (the whole sweep file is
    the MLflow parent run's sweep.yaml)."""
    shown = to_dict(sweep)
    for spec in shown["search_space"].values():
        for kind, values in spec.items():
            if isinstance(values, list) and len(values) > SHOWN_VALUES:
                spec[kind] = values[:SHOWN_VALUES - 1] + [f"... ({len(values)} values)"]
    return dump_yaml(shown)


DEFINITION_FILE = "sweep_definition.json"  # in the sweep directory: what the sweep was started as
# What makes a sweep the sweep it is; the rest (concurrency, retries, tracking) may change when it resumes.
DEFINING_KEYS = ("search_space", "searcher", "num_samples", "seed", "points_to_evaluate", "metric", "mode",
                 "scheduler", "asha")


def sweep_definition(plan: SweepPlan) -> dict[str, Any]:
    """The sweep's search, objective and schedule, and the base recipe every trial starts from, as plain JSON."""
    from workflows.relaunch import NOT_COMPARED, flat_settings

    definition = {k: v for k, v in to_dict(plan.sweep).items() if k in DEFINING_KEYS}
    definition["base"] = {k: v for k, v in flat_settings(plan.base).items() if not k.startswith(NOT_COMPARED)}
    return json.loads(json.dumps(definition, default=str))


def check_sweep_unchanged(plan: SweepPlan) -> None:
    """A sweep directory is resumed as it was started: Tune restores the recorded search and trials whatever the
    sweep file now says. Refuse a changed definition before any Ray work, naming each change, instead of reporting
    the old trials under the new settings (or, with num_samples raised, calling the sweep unfinished forever)."""
    from workflows.data.manifest import read_bytes
    from workflows.relaunch import flat_settings

    try:
        recorded = json.loads(read_bytes(f"{plan.path}/{DEFINITION_FILE}"))
    except (OSError, ValueError):  # a sweep started before this file existed: nothing to compare
        return
    old, new = flat_settings(recorded), flat_settings(sweep_definition(plan))
    # A base-recipe key that a newer version of this code added (recorded nowhere) at its default, or one it
    # dropped (recorded only), is not a change: the sweep's trials ran with that behaviour.
    defaults = {f"base.{k}": v for k, v in flat_settings(recipe_to_dict(Recipe())).items()}
    upgraded = {key for key in new.keys() - old.keys() if key in defaults and new[key] == defaults[key]} | \
        {key for key in old.keys() - new.keys() if key.startswith("base.")}
    changed = [f"{key}: {redact_secrets(old.get(key))!r} -> {redact_secrets(new.get(key))!r}"
               for key in sorted((old.keys() | new.keys()) - upgraded) if old.get(key) != new.get(key)]
    if changed:
        raise ConfigError(
            f"sweep {plan.sweep.name} in {redact_secrets(plan.path)} exists and would be resumed as it was started, "
            f"but these settings changed: {'; '.join(changed)}. To run the changed sweep, give it another name "
            f"(--set name=...); to resume this one, put the settings back (its definition: "
            f"{redact_secrets(plan.path)}/{DEFINITION_FILE})")


def warn_if_the_sweep_may_not_fit(plan: SweepPlan, trial_recipe: Recipe) -> None:
    """A warning when the trials' local disk cannot hold what the trials still to start keep: run.keep_checkpoints
    + 1 checkpoints each, sized from the base recipe (a trial that changes the model's widths differs)."""
    from workflows.pretrain import estimated_run_checkpoint_bytes, warn_once
    from workflows.runtime import free_bytes

    if is_remote(plan.train_storage):
        return
    storage = Path(plan.train_storage)
    started = len([d for d in storage.iterdir() if d.is_dir()]) if storage.is_dir() else 0
    to_start = max(0, expected_trials(plan.sweep) - started)
    size, kept, free = estimated_run_checkpoint_bytes(trial_recipe), trial_recipe.run.keep_checkpoints + 1, \
        free_bytes(storage)
    if to_start and free < to_start * kept * size:
        mib = 2**20
        warn_once(f"warning: {storage}'s disk has {free / mib:.1f} MiB free, and the {to_start} trial(s) still to "
                  f"start keep up to {kept} checkpoints each (run.keep_checkpoints + 1) of about {size / mib:.1f} MiB: "
                  f"{to_start * kept * size / mib:.1f} MiB. A trial whose checkpoint does not fit stops the sweep "
                  f"(free space, lower run.keep_checkpoints, or set storage_path to a larger disk)")


def check_sweep_state_readable(plan: SweepPlan) -> None:
    """Refuse to resume a sweep whose saved Tune state does not parse (Tune writes it in place: a full disk cut one
    short here). Tune itself logs that it failed to restore and starts the sweep anew, over its finished trials."""
    import pyarrow.fs

    fs, root = storage_of(plan.path)
    states = sorted((f for f in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
                     if f.base_name.startswith("experiment_state-") and f.base_name.endswith(".json")),
                    key=lambda f: f.base_name)
    if not states:
        return
    newest = states[-1]
    try:
        with fs.open_input_stream(newest.path) as f:
            json.loads(f.readall())
    except ValueError as exc:
        raise ConfigError(
            f"sweep {plan.sweep.name}: Tune's saved state {redact_secrets(plan.path)}/{newest.base_name} cannot be "
            f"read ({newest.size} bytes; {exc}): cut short, most likely by a full disk while Tune wrote it. Tune "
            f"would start the sweep anew over the trials it finished. Their checkpoints stay in "
            f"{redact_secrets(plan.train_storage)} and their runs in MLflow; start the sweep anew under another name "
            f"(--set name=...), or put back a good copy of that file") from None


def template_trial_recipe(plan: SweepPlan) -> Recipe:
    """A trial's recipe before its search-space values: the base recipe where the trials write."""
    return build_trial_recipe(plan.base, {}, name=f"{plan.sweep.name}-trial", storage_path=plan.train_storage)


def check_sweep_before_ray(plan: SweepPlan, resume: bool = False) -> bool:
    """Everything about a planned sweep that can be checked without Ray, then its banner printed: a trial's recipe
    where the trials write (`validate_before_start`), room for what all trials keep, and for a sweep to resume its
    saved state and definition. Returns whether the sweep directory holds a sweep to resume."""
    from ray import tune

    from workflows.pretrain import validate_before_start

    sweep = plan.sweep
    # Checked where the trials write (a writable folder, room for a checkpoint), not at the base recipe's
    # run.storage_path.
    trial_recipe = template_trial_recipe(plan)
    validate_before_start(trial_recipe, warn_space=False)
    warn_if_the_sweep_may_not_fit(plan, trial_recipe)  # what all trials keep, not one run
    restorable = tune.Tuner.can_restore(plan.path)
    if resume and not restorable:
        raise ConfigError(f"--resume: no sweep to resume at {plan.path}")
    if restorable:
        check_sweep_state_readable(plan)
        check_sweep_unchanged(plan)
    trials = expected_trials(sweep)
    print(f"{LOG_PREFIX} sweep {sweep.name} in {plan.path} ({'resuming' if restorable else 'new'}), {trials} "
          f"trial(s); MLflow {plan.tracking_uri}, experiment {sweep.mlflow.experiment}\n{banner_yaml(sweep)}",
          flush=True)
    if trials > MANY_TRIALS:
        print(f"{LOG_PREFIX} warning: {trials} trials at one trial's cost each (the grid's sizes multiply, times "
              f"num_samples); Ctrl-C stops the sweep and the same command resumes it", flush=True)
    return restorable


def run_sweep(plan: SweepPlan, resume: bool = False, retry_failed: bool = False,
              callbacks: list | None = None, verbose: bool = False) -> SweepResult:
    """Run (or resume) a validated sweep on Ray Tune and summarise it. A sweep whose directory holds a restorable
    Tune experiment is always resumed; `resume=True` insists on one. `callbacks` go to Tune's RunConfig. The
    console gets a line per trial event (progress.SweepProgress); `verbose` adds Tune's own status tables and
    result boxes, and Ray Data's and Ray Train's INFO lines, for a sweep started with it (a resumed sweep keeps
    the console it was started with: Tune restores its settings)."""
    from workflows.runtime import ensure_ray

    restorable = check_sweep_before_ray(plan, resume)
    ensure_ray(trial_resources(plan.base_recipe)["CPU"])
    with claim_run_directory(plan.path, f"sweep {plan.sweep.name}: its directory"):
        return _run_claimed_sweep(plan, retry_failed, callbacks, verbose, restorable)


def _run_claimed_sweep(plan: SweepPlan, retry_failed: bool, callbacks: list | None, verbose: bool,
                       restorable: bool) -> SweepResult:
    """run_sweep's part on Ray with the sweep directory claimed."""
    from ray import tune

    from workflows.capacity import check_capacity
    from workflows.pretrain import check_nodes_see_local_paths, with_resolved_init_from
    from workflows.tune.progress import (
        SweepProgress,
        give_back_room_for_the_sweep_state,
        hold_room_for_the_sweep_state,
        sweep_stopped_for,
    )
    from workflows.tune.slots import open_slots

    sweep = plan.sweep
    trials, trial_recipe = expected_trials(sweep), template_trial_recipe(plan)
    if not verbose:
        from workflows.console import quiet_forwarded_ray_lines, quiet_tune_console

        quiet_forwarded_ray_lines()
        quiet_tune_console()
    # Resolve data.decode_node_label once, here; every trial starts from the resolved base recipe. With the base
    # recipe's scaling.wait_for_nodes_s > 0, wait (asking the autoscaler) until one trial's nodes are up.
    # A train.init_from run directory is pinned to its newest checkpoint: every trial starts from the same one.
    base_recipe = with_resolved_init_from(check_capacity(plan.base_recipe, log_prefix=LOG_PREFIX), LOG_PREFIX)
    plan = dataclasses.replace(plan, base_recipe=base_recipe, base=recipe_to_dict(base_recipe))
    check_nodes_see_local_paths(base_recipe, run_dir=plan.path)  # the trials' nodes see its data and the sweep
    per_trial = trial_resources(plan.base_recipe)
    concurrent = resolve_max_concurrent(sweep.max_concurrent_trials,
                                        cluster_capacity(plan.base_recipe.data.decode_node_label), per_trial)
    print(f"{LOG_PREFIX} one trial holds {per_trial}; up to {concurrent} trial(s) at once", flush=True)

    if not is_remote(plan.path):
        Path(plan.path).mkdir(parents=True, exist_ok=True)
    if not restorable:
        write_text(f"{plan.path}/{DEFINITION_FILE}", json.dumps(sweep_definition(plan), indent=1) + "\n")
    parent = open_parent_run(plan)
    parent_id = parent.run_id
    context = {"name": sweep.name, "base": plan.base, "path": plan.path, "train_storage": plan.train_storage,
               "parent_run_id": parent_id, "verbose": verbose}
    keep_credentials_out_of_trial_runtime_envs()
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": TRIAL_DRIVER_CPUS})
    if restorable:
        # --retry-failed resumes a failed trial as it is (its id, so its run directory): from its newest complete
        # checkpoint, as the same `pretrain` command resumes a failed run; Tune's restart_errored would start it anew
        # under another id.
        tuner = tune.Tuner.restore(plan.path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=retry_failed, restart_errored=False)
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
                                      callbacks=[SweepProgress(sweep.metric, sweep.mode, trials,
                                                               trial_storage=plan.train_storage, sweep_name=sweep.name),
                                                 *(callbacks or [])],
                                      verbose=1 if verbose else 0),
        )
    slots = open_slots(plan.path, concurrent)  # held until the sweep ends: the actor lives while a handle does
    if not is_remote(plan.path):  # buckets do not fill up
        hold_room_for_the_sweep_state(plan.path, trials)
    try:
        grid = tuner.fit()
    finally:
        give_back_room_for_the_sweep_state()
    del slots
    interrupted = grid.num_terminated + grid.num_errors < max(len(grid), expected_trials(sweep))
    result = summarize_sweep(grid, plan, parent, interrupted)
    failed = [r for r in result.rows if r["status"].startswith("error")]
    if result.rows and len(failed) == len(result.rows):
        print(f"{LOG_PREFIX} all {len(failed)} trial(s) failed; the first: {failed[0]['status']}", flush=True)
    if interrupted:  # counted from the table: a trial Tune ended mid-run without a report is not finished
        finished = sum(r["status"] in ("completed", "stopped early") or r["status"].startswith("error")
                       for r in result.rows)
        of = f"with {finished} of {expected_trials(sweep)} trial(s) finished"
        full_disk = sweep_stopped_for()
        if full_disk:
            print(f"{LOG_PREFIX} the sweep stopped {of}: {full_disk}. {full_disk_advice(plan, trial_recipe)} Then "
                  f"continue it with the same command plus --retry-failed: failed trials resume from their newest "
                  f"complete checkpoints, the others as they were", flush=True)
        else:
            print(f"{LOG_PREFIX} the sweep was interrupted{stop_signal_note()} {of}; continue it with the same "
                  f"command plus --resume", flush=True)
    return result


def full_disk_advice(plan: SweepPlan, trial_recipe: Recipe) -> str:
    """What to do about the full disk a sweep stopped on: what a trial's checkpoints take, what is free."""
    from workflows.pretrain import estimated_run_checkpoint_bytes
    from workflows.runtime import free_bytes

    mib, keep = 2**20, trial_recipe.run.keep_checkpoints
    advice = (f"Each trial keeps up to {keep + 1} checkpoints (run.keep_checkpoints={keep}, plus the latest) of about "
              f"{estimated_run_checkpoint_bytes(trial_recipe) / mib:.1f} MiB. Free space, lower run.keep_checkpoints "
              f"(--set run.keep_checkpoints=1), or move the sweep directory to a larger disk and point storage_path "
              f"there.")
    if is_remote(plan.train_storage):
        return advice
    free = free_bytes(plan.train_storage)
    return f"{advice} {plan.train_storage}'s disk has {free / mib:.1f} MiB free now."


def check_sweep_storage(sweep: Any) -> None:
    """ConfigError when the sweep's storage_path still names the shipped sweeps' placeholder bucket, with the key to
    set: the sweep's own, as it sets run.storage_path for its trials (checked first, before the tracking server a
    bucket needs is asked for)."""
    from workflows.recipe import PLACEHOLDER

    if PLACEHOLDER in sweep.storage_path:
        mine = sweep.storage_path.replace(PLACEHOLDER, "<your-bucket>")
        raise ConfigError(f"storage_path {sweep.storage_path} names the placeholder bucket {PLACEHOLDER} of the "
                          f"shipped sweeps: set your own with the sweep's key (it sets run.storage_path for its "
                          f"trials), e.g. --set storage_path={mine}")


def main(argv: list[str]) -> int:
    parser = config_parser("python -m workflows tune", __doc__.split("\n")[0].rstrip(":"),
                           "sweep YAML (see workflows/configs/sweep_*.yaml)",
                           "override a sweep key (num_samples=4) or a base recipe key (data.train_manifest=...)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep (also automatic when its directory holds one)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="when resuming, run failed trials again, from their newest complete checkpoints")
    parser.add_argument("--verbose", action="store_true",
                        help="also Tune's status tables and result boxes, and Ray Data's and Ray Train's INFO lines")
    parser.add_argument("--check", action="store_true",
                        help="check the sweep (every trial's recipe, the files, room for what the trials keep, a "
                             "sweep to resume), print its banner and what one trial holds, and exit without "
                             "starting Ray: 0 when it would start, 2 naming what is wrong")
    args = parser.parse_args(argv)
    try:  # everything checked before Ray (ValueError: a bad manifest or label file, ManifestError)
        sweep = load_sweep(args.config, args.overrides)
        check_sweep_storage(sweep)
        plan = plan_sweep(sweep)
        if args.check:
            check_sweep_before_ray(plan, resume=args.resume)
            print(f"{LOG_PREFIX} check: one trial holds {trial_resources(plan.base_recipe)}. Left to the start: the "
                  f"cluster's room for it, and how many trials run at once (max_concurrent_trials); without "
                  f"--check the same command starts the sweep", flush=True)
            return 0
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop_like_ctrl_c()  # `ray job stop` sends SIGTERM: Tune saves the sweep's state as on Ctrl-C
    try:
        result = run_sweep(plan, resume=args.resume, retry_failed=args.retry_failed, verbose=args.verbose)
    except (ConfigError, FileNotFoundError) as exc:  # the recipe checks and the cluster's capacity, before trials
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if result.best is not None and not result.interrupted else 1
