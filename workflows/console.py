"""What a training run prints: a compact recipe summary, and Ray's own chatter kept off the console.

The console carries what a user reads (the recipe's non-default values, progress, validation and checkpoint lines,
warnings). Ray Data and Ray Train print INFO lines of their own in every process that runs them: per dataset
execution "Starting execution of Dataset ...", "Execution plan of Dataset ..." and "Dataset ... execution finished
in ..." (printed in each Train worker, which builds its own streaming pipeline, and forwarded to the driver), and
per `ray.train.report` "Reporting training result N: ..." and "Checkpoint successfully created at: ..." (workers),
plus worker-group start-up lines from the Train controller actor. By default those records still reach Ray's log
files (`<session>/logs/ray-data/`, `<session>/logs/train/`) but not the console; `verbose` brings them back.

- `quiet_ray_console(verbose)`: call in the driver (before or after `ray.init`) and at the top of every Ray Train
  worker function; it acts on the calling process only.
- `train_logging_config(verbose)`: the Train `RunConfig(logging_config=...)`; the only switch that reaches the
  Train controller actor, where no code of ours runs.
- `quiet_forwarded_ray_lines()`: after `ray.init` in a driver, drops two lines Ray's own actors print per run
  (Ray Train's preemption watcher's "E ... core_worker.cc" note, its placement-group cleaner's) from the output
  forwarded to the console; they stay in those actors' log files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from workflows.config_loader import to_dict
from workflows.runtime import redact_secrets

if TYPE_CHECKING:
    from ray.train import LoggingConfig

    from workflows.recipe import Recipe

SUMMARY_WIDTH = 120
ALWAYS_SHOWN = ("model.preset", "run.name")  # what the run is, even at their default values

# Ray's INFO hints about the console settings we chose ourselves: noise once the choice is made.
_SETTING_HINTS = ("Progress bars disabled.",)


# ---------------------------------------------------------------------------------------------------------------
# the recipe summary
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def stdout_kept_for_json(enabled: bool) -> Iterator[None]:
    """With `enabled` (a command's --json), what is printed to stdout inside goes to stderr, so stdout holds the
    JSON printed after it alone."""
    if not enabled:
        yield
        return
    real, sys.stdout = sys.stdout, sys.stderr
    try:
        yield
    finally:
        sys.stdout = real


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys down to the fields of each section; dict-valued fields (train.deepspeed) stay whole."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and not prefix:  # a section
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _format_value(value: Any) -> str:
    """A value as `--set` would take it: YAML-ish scalars, compact JSON for lists and mappings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, str) and (not value or any(c.isspace() for c in value)):
        return repr(value)
    return str(value)


def recipe_changes(recipe: Recipe) -> dict[str, Any]:
    """The recipe's values that differ from the schema defaults, as dotted keys in schema order (plus
    ALWAYS_SHOWN). In the model section None means "the preset's value", so only the fields set are listed."""
    from workflows.recipe import Recipe

    actual = _flatten(redact_secrets(to_dict(recipe)))
    defaults = _flatten(to_dict(Recipe()))
    return {key: value for key, value in actual.items()
            if key in ALWAYS_SHOWN or key not in defaults or value != defaults[key]}


def recipe_summary(recipe: Recipe, width: int = SUMMARY_WIDTH) -> str:
    """A few lines for the console: the recipe's non-default values as `section.key=value`, one section per line
    (wrapped at `width`). The full resolved YAML goes to the run directory and MLflow instead."""
    head = "recipe: "
    indent = " " * len(head)
    sections: dict[str, list[str]] = {}
    for key, value in recipe_changes(recipe).items():
        sections.setdefault(key.split(".", 1)[0], []).append(f"{key}={_format_value(value)}")
    lines: list[str] = []
    for items in sections.values():
        line = ""
        for item in items:
            if line and len(indent) + len(line) + 2 + len(item) > width:
                lines.append(line)
                line = item
            else:
                line = f"{line}  {item}" if line else item
        lines.append(line)
    if not lines:
        return head + "all defaults"
    return "\n".join((head if i == 0 else indent) + line for i, line in enumerate(lines))


# ---------------------------------------------------------------------------------------------------------------
# Ray's console lines
# ---------------------------------------------------------------------------------------------------------------


def _ray_dir(*parts: str) -> str:
    import ray

    return os.path.join(os.path.dirname(ray.__file__), *parts) + os.sep


def _package_dir(name: str) -> tuple[str, ...]:
    """A package's directory (with a trailing separator) without importing it; () when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return ()
    return tuple(os.path.join(location, "") for location in spec.submodule_search_locations)


class RayInfoToFiles(logging.Filter):
    """A console-handler filter: drops Ray Data's and Ray Train's records below WARNING (and Ray's hints about
    settings we chose), and open_clip's INFO lines (seven per worker about building the tiny or named CLIP, which
    the trainer's own line already names). Records are matched by source file, not logger name: Train logs its
    per-report line through a logger named after the file path, which propagates to the root logger, and open_clip
    logs through the root logger. Ray Train's public API (`ray/train/v2/api`, the driver side: Ctrl-C messages)
    passes. File handlers keep every record."""

    def __init__(self) -> None:
        super().__init__()
        self._sources = (_ray_dir("data"), _ray_dir("train"), *_package_dir("open_clip"))
        self._kept = _ray_dir("train", "v2", "api")

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname
        if not path.startswith(self._sources) or path.startswith(self._kept):
            return True
        if record.levelno < logging.WARNING:
            return False
        return not (record.levelno == logging.WARNING and record.getMessage().startswith(_SETTING_HINTS))


_FILTER: RayInfoToFiles | None = None


def _console_handlers() -> list[logging.Handler]:
    """Ray's console handlers in this process: on the `ray` logger (set up at `import ray`), on `ray.data` (at
    `import ray.data`), and those Train's worker set-up puts on the root and `ray.train` loggers."""
    from ray._private.log import PlainRayHandler

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in ("ray", "ray.data", "ray.train"))]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, PlainRayHandler)]


def quiet_ray_console(verbose: bool = False) -> None:
    """Keep Ray Data's and Ray Train's INFO lines (dataset start / plan / finish, per-report and checkpoint lines)
    off this process's console and in Ray's log files; `verbose` puts them back. Acts on the calling process:
    call it in the driver and at the top of each Ray Train worker function (their console output is forwarded to
    the driver). Idempotent; a later call with the other `verbose` undoes the earlier one (Ray reuses processes)."""
    global _FILTER
    import ray.data  # noqa: F401  (its import installs the ray.data handlers; attach to those, not replaced later)

    if _FILTER is None:
        _FILTER = RayInfoToFiles()
    for handler in _console_handlers():
        handler.removeFilter(_FILTER)
        if not verbose:
            handler.addFilter(_FILTER)


# Lines Ray's own actors print once per run, forwarded to the driver's console: nothing a user can act on, and the
# first reads as an error ("E ... core_worker.cc"). Both stay in the actors' log files.
_RAY_ACTOR_NOISE = (
    # Ray Train's preemption watcher is created with its arguments in the object store and restarts allowed
    re.compile(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .*max_restarts > 0"),
    # Ray Train's placement-group cleaner, as every run ends
    re.compile(r"^Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group"),
)
_FORWARDED_FILTER = "dist_quiet_forwarded"


def quiet_forwarded_ray_lines() -> None:
    """Drop _RAY_ACTOR_NOISE from the worker output Ray forwards to this driver's console. Call after `ray.init`
    (which installs the printing handler it wraps); idempotent. Ray's dispatcher of forwarded lines is internal
    (ray._private.ray_logging): where it is not as expected, nothing is changed."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        handlers = list(dispatcher.handlers)
    except (ImportError, AttributeError, TypeError):
        return
    if any(name == _FORWARDED_FILTER for name, _ in handlers):
        return
    printing = [(name, handler) for name, handler in handlers if name == "ray_print_logs"]
    if not printing:
        return

    def filtered(data: dict, handle=printing[0][1]) -> None:
        lines = data.get("lines")
        if isinstance(lines, list):
            kept = [line for line in lines if not any(p.search(line) for p in _RAY_ACTOR_NOISE)]
            if not kept:
                return
            data = {**data, "lines": kept}
        handle(data)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler(_FORWARDED_FILTER, filtered)


# What Ray Tune's driver prints besides our sweep console (workflows/tune/progress.py), which says it in a line each:
# "Trials did not complete: [...]", and at an interruption "Stop signal received (e.g. via SIGINT/Ctrl+C) ..." and
# "Experiment has been interrupted ... Resume experiment with: Tuner.restore(...)" (the tune CLI resumes with
# --resume; a sweep that stopped itself on a full disk was no Ctrl-C).
_TUNE_DRIVER_NOISE = ("Trials did not complete", "Stop signal received", "Experiment has been interrupted")


class TuneLinesToFiles(logging.Filter):
    """Drops _TUNE_DRIVER_NOISE from Ray Tune's driver logger (`ray.tune.tune`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TUNE_DRIVER_NOISE)


def quiet_tune_console(verbose: bool = False) -> None:
    """A sweep driver's console without Ray Tune's own boxes and tracebacks, unless `verbose`: Tune's output engine
    prints a start box and a box per trial result and failure even at verbose=0 (its older reporter prints nothing
    there), and each failed trial's traceback (kept in the trial's error.txt; the sweep's failure line names its root
    cause). Call before the sweep starts: Tune reads both switches then. Idempotent."""
    if verbose:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    tune_logger = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, TuneLinesToFiles) for f in tune_logger.filters):
        tune_logger.addFilter(TuneLinesToFiles())


def train_logging_config(verbose: bool = False) -> LoggingConfig:
    """For `RunConfig(logging_config=...)`: Ray Train's own INFO lines (worker-group start-up from the controller
    actor, process-group set-up in the workers) only in Train's system log files unless `verbose`."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose else "WARNING")
