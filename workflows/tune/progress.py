"""A sweep's console: one line per trial event instead of Ray Tune's box tables.

Tune's own reporter prints, per trial, a configuration box when it starts and a result box when it ends, and a
status table of every trial every few seconds while anything runs: most of a sweep's console, and most of it
repeated. `SweepProgress` (a Tune callback; Tune's reporter is silenced with `verbose=0` unless `tune --verbose`)
prints instead, each on one line:

- each report of a trial (a validation): `[tune] trial 9e24e_00000: val_top1 12.50 at step 2 (report 1)`;
- a trial's end: completed, stopped early by the scheduler, or failed with its root cause, and where the sweep
  stands (`2 of 3 trials finished; best so far 9e24e_00000 val_top1 12.50`);
- a trial restarted after a failure (`trial_max_failures`);
- while trials run, a status line at most every `status_every_s` seconds (5 minutes by default).

A trial's own start line and its training progress come from the trial itself (driver.run_trial and the trainer).
"""

from __future__ import annotations

import math
import time
from typing import Any

from ray import tune

from workflows.tune.report import stopped_before_its_last_step, trial_failure
from workflows.tune.sweep_config import LOG_PREFIX

STATUS_EVERY_S = 300.0


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


class SweepProgress(tune.Callback):
    """One console line per trial event (module-level: Tune pickles its callbacks with the sweep's state)."""

    def __init__(self, metric: str, mode: str, expected_trials: int, status_every_s: float = STATUS_EVERY_S):
        self.metric, self.mode, self.expected = metric, mode, expected_trials
        self.status_every_s = status_every_s
        self._last_status = time.monotonic()

    # --- what the lines say (from Tune's trials, so a resumed sweep counts the trials finished before) ---
    def _standing(self, trials: list, ending: Any = None) -> str:
        """`ending`: the trial whose end is being reported (Tune calls back before it changes the trial's status)."""
        finished = sum(trial.status in ("TERMINATED", "ERROR") or trial is ending for trial in trials)
        best = None
        for trial in trials:
            value = _number(trial.metric_analysis.get(self.metric, {}).get(self.mode))
            if value is not None and (best is None or (value > best[0] if self.mode == "max" else value < best[0])):
                best = (value, trial.trial_id)
        note = f"; best so far {best[1]} {self.metric} {best[0]:.2f}" if best else ""
        return f"{finished} of {max(self.expected, len(trials))} trials finished{note}"

    def _say(self, line: str) -> None:
        print(f"{LOG_PREFIX} {line}", flush=True)

    # --- Tune's events ---
    def setup(self, **info: Any) -> None:
        self._last_status = time.monotonic()  # a resumed sweep's callback comes unpickled with another process's clock

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = _number(result.get(self.metric))
        if value is None:
            return
        step = _number(result.get("step"))
        at = f" at step {int(step)}" if step is not None else ""
        self._say(f"trial {trial.trial_id}: {self.metric} {value:.2f}{at} (report {result.get('training_iteration')})")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        how = "stopped early by the scheduler" if stopped_before_its_last_step(last) else "completed"
        self._say(f"trial {trial.trial_id} {how} after {last.get('training_iteration', 0)} report(s); "
                  f"{self._standing(trials, trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(f"trial {trial.trial_id} failed: {self._cause(trial)}; {self._standing(trials, trial)}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(f"trial {trial.trial_id} failed and starts again (trial_max_failures): {self._cause(trial)}")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last_status < self.status_every_s:
            return
        self._last_status = now
        counts: dict[str, int] = {}
        for trial in trials:
            counts[trial.status.lower()] = counts.get(trial.status.lower(), 0) + 1
        if counts.get("running"):
            self._say(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) +
                      f"; {self._standing(trials)}")

    @staticmethod
    def _cause(trial: Any) -> str:
        """The trial's error as it was raised: Tune has just written it beside the driver (its copy in the sweep's
        storage, which `Trial.get_error` reads, comes later)."""
        import os

        import cloudpickle

        pickled = getattr(trial, "pickled_error_file", None)
        if pickled and os.path.exists(pickled):
            try:
                with open(pickled, "rb") as f:
                    return trial_failure(cloudpickle.load(f))[:300]
            except Exception:  # noqa: BLE001 - an error that does not unpickle here: point at its text instead
                pass
        return f"see {trial.error_file}" if trial.error_file else "no error recorded"
