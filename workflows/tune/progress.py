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

A trial that failed on a full disk (or one too full for its next checkpoint) stops the sweep as Ctrl-C does: each
trial after it would train up to its first checkpoint and fail there. Tune saves the sweep's state, and once space
is freed the same command plus --retry-failed continues it (`sweep_stopped_for` says why, for the driver's last
line).

A trial's own start line and its training progress come from the trial itself (driver.run_trial and the trainer).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from typing import Any

from ray import tune

from workflows.runtime import is_disk_full
from workflows.tune.report import stopped_before_its_last_step, trial_failure
from workflows.tune.sweep_config import LOG_PREFIX

STATUS_EVERY_S = 300.0
_stopped_for: str | None = None  # why a SweepProgress of this process stopped the sweep


def sweep_stopped_for() -> str | None:
    """Why the last sweep run in this process was stopped by its SweepProgress (a full disk), else None. (Tune
    unpickles a resumed sweep's callbacks from its saved state: the driver holds no reference to that one.)"""
    return _stopped_for


class _SaveBeforeTheStop(logging.Filter):
    """Tune copies its state to the sweep directory in the background, and its last save waits for the copy before
    it: one begun on the full disk fails there, and Tune logs that with a traceback, then saves again (saying
    "Wrote the latest version ..." when that worked, else an error of its own). During a full-disk stop, one line
    says so instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _stopped_for is None or not str(record.msg).startswith("Saving experiment state to storage"):
            return True
        print(f"{LOG_PREFIX} a copy of the sweep's state begun before the stop met the full disk; Tune saves the "
              f"state once more now", flush=True)
        return False


# Disk space held in the sweep directory while its trials run, freed when a trial meets a full disk: Tune then saves
# the sweep's state there once more, and the failed trial may have left no partial checkpoint to delete.
ROOM_FOR_THE_STATE = ".room_for_the_sweep_state"
_room: str | None = None  # the file holding it, in this process's sweep


def hold_room_for_the_sweep_state(sweep_path: str, trials: int) -> None:
    """Tune's state takes a few KiB per trial (20 kB for 3 trials), plus the error files and results.csv written as
    the sweep stops: 1 MiB and 64 KiB per trial. Nothing is held where the disk has no room for it already."""
    from workflows.runtime import reserve_disk_space

    global _room
    path = f"{sweep_path}/{ROOM_FOR_THE_STATE}"
    _room = path if reserve_disk_space(path, 2**20 + trials * 2**16) else None


def give_back_room_for_the_sweep_state() -> None:
    """Free what `hold_room_for_the_sweep_state` held: as a trial's full disk stops the sweep, and as it ends."""
    import contextlib
    import os

    global _room
    if _room is not None:
        with contextlib.suppress(OSError):
            os.remove(_room)
        _room = None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


class SweepProgress(tune.Callback):
    """One console line per trial event (module-level: Tune pickles its callbacks with the sweep's state)."""

    def __init__(self, metric: str, mode: str, expected_trials: int, status_every_s: float = STATUS_EVERY_S,
                 trial_storage: str | None = None, sweep_name: str | None = None):
        self.metric, self.mode, self.expected = metric, mode, expected_trials
        self.status_every_s = status_every_s
        self.trial_storage, self.sweep_name = trial_storage, sweep_name  # where a trial's Train run writes
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
        global _stopped_for
        self._last_status = time.monotonic()  # a resumed sweep's callback comes unpickled with another process's clock
        _stopped_for = None

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
        cause = self._cause(trial)
        where = getattr(trial, "path", None)  # the trial's folder in the sweep's storage: Tune writes error.txt there
        traceback = f"; its traceback: {where}/error.txt" if where else ""
        self._say(f"trial {trial.trial_id} failed: {cause}; {self._standing(trials, trial)}{traceback}")
        if self._can_stop_for(cause):
            self._stop(trial, cause)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cause = self._cause(trial)
        if not self._can_stop_for(cause):
            self._say(f"trial {trial.trial_id} failed and starts again (trial_max_failures): {cause}")
            return
        self._say(f"trial {trial.trial_id} failed: {cause}")  # its retry would meet the same disk
        self._stop(trial, cause)

    @staticmethod
    def _can_stop_for(cause: str) -> bool:
        """A full disk, not yet stopped for, where Tune's handler of SIGUSR1 (its Ctrl-C: it ends the run after this
        step and saves the sweep's state) is installed: the driver's main thread, where Tune calls back."""
        return _stopped_for is None and is_disk_full(cause) and callable(signal.getsignal(signal.SIGUSR1)) and \
            threading.current_thread() is threading.main_thread()

    def _stop(self, trial: Any, cause: str) -> None:
        global _stopped_for
        _stopped_for = f"trial {trial.trial_id} failed on a full disk"
        self._say(f"stopping the sweep: trial {trial.trial_id} met a full disk, which would fail each trial after it "
                  f"at its first checkpoint")
        give_back_room_for_the_sweep_state()
        self._free_what_the_trial_left_half_written(trial)
        state_logger = logging.getLogger("ray.tune.execution.experiment_state")
        if not any(isinstance(f, _SaveBeforeTheStop) for f in state_logger.filters):
            state_logger.addFilter(_SaveBeforeTheStop())
        signal.raise_signal(signal.SIGUSR1)


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

    def _free_what_the_trial_left_half_written(self, trial: Any) -> None:
        """Delete the failed trial's partial checkpoints: Tune saves the sweep's state once more as it stops, into
        the sweep directory, often on the same disk (where the room held for it may be too little for a very large
        sweep). Seen with the disk left full: that save and the trial's error file were cut short, the driver failed
        reading the error back, and the resumed sweep found a state Tune could not read and started the sweep anew."""
        from workflows.checkpoints import remove_partial_checkpoints
        from workflows.tune.sweep_config import trial_run_name

        storage, name = getattr(self, "trial_storage", None), getattr(self, "sweep_name", None)
        if not (storage and name):  # a callback pickled by an older version of this class
            return
        try:
            removed = remove_partial_checkpoints(f"{storage}/{trial_run_name(name, trial.trial_id)}")
        except OSError as exc:
            self._say(f"could not delete trial {trial.trial_id}'s partial checkpoints: {exc}")
            return
        if removed:
            self._say(f"deleted trial {trial.trial_id}'s {len(removed)} partial checkpoint(s), to make room for the "
                      f"sweep's state: {', '.join(path.rsplit('/', 1)[-1] for path in removed)}")

