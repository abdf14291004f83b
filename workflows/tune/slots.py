"""At most max_concurrent_trials trials of a sweep hold cluster resources at once, resumed sweeps included.

Ray Tune limits concurrency through the searcher (it only suggests a new trial while fewer than the limit are live),
and each trial asks Tune for a sliver of a CPU only: its Train workers and decoders reserve their own resources
inside the trial. A resumed sweep's restored trials are queued around the searcher, though: resumed failed trials
(`--retry-failed`) are not counted as live by it, so it suggests new trials beside them. Seen on a sweep stopped by a
full disk and resumed with one CPU-sized trial slot: two trials started, the second's workers took the CPU the
first's decoders needed, and neither ever trained a step.

So each trial takes a slot from the sweep's TrialSlots actor before its Train run reserves anything, and gives it back
when it ends. A trial the scheduler stops is killed before its own `finally` runs: a slot whose trial's process is
gone is taken back when another trial waits for one.
"""

from __future__ import annotations

import time
from typing import Any

from workflows.tune.sweep_config import LOG_PREFIX

WAIT_S = 2.0  # between a waiting trial's tries


class TrialSlots:
    """`limit` slots, each held by one trial (a Ray actor in the driver's job: it ends with the driver)."""

    def __init__(self, limit: int):
        self.limit, self.holders = limit, {}  # trial id -> the trial's actor handle

    def take(self, trial_id: str, trial_actor: Any) -> bool:
        if trial_id not in self.holders and len(self.holders) >= self.limit:
            self.holders = {t: a for t, a in self.holders.items() if not _is_gone(a)}
        if trial_id in self.holders or len(self.holders) < self.limit:
            self.holders[trial_id] = trial_actor
            return True
        return False

    def give_back(self, trial_id: str) -> None:
        self.holders.pop(trial_id, None)

    def held(self) -> list[str]:
        return sorted(self.holders)


def _is_gone(actor: Any) -> bool:
    """Whether a trial's actor died: a call to it fails at once. A busy one (Tune's trainable serves one call at a
    time) does not answer within the second, and counts as alive."""
    import ray

    ready, _ = ray.wait([actor.__ray_ready__.remote()], timeout=1.0)
    if not ready:
        return False
    try:
        ray.get(ready[0])
    except ray.exceptions.RayActorError:
        return True
    return False


def slots_name(sweep_path: str) -> str:
    return f"dist-sweep-slots:{sweep_path}"


def open_slots(sweep_path: str, limit: int) -> Any:
    """The sweep's TrialSlots actor, new for this driver (a resumed sweep's trials take slots again)."""
    import ray

    slots = ray.remote(num_cpus=0)(TrialSlots).options(name=slots_name(sweep_path)).remote(limit)
    # Started before it is returned: a driver that ends at once (a finished sweep run again, which only reports)
    # shut Ray down with the actor still starting, and the GCS printed "Failed to kill actor ... Socket closed" as
    # the run's last line.
    ray.get(slots.held.remote())
    return slots


def take_slot(sweep_path: str, trial_id: str) -> None:
    """Wait until this trial holds a slot of the sweep's TrialSlots (none open, e.g. a driver of an older version:
    no limit here), saying once that it waits and for whom."""
    import ray

    try:
        slots = ray.get_actor(slots_name(sweep_path))
    except ValueError:
        return
    said, me = False, ray.get_runtime_context().current_actor
    while not ray.get(slots.take.remote(trial_id, me)):
        if not said:
            print(f"{LOG_PREFIX} trial {trial_id} waits for a trial slot (max_concurrent_trials), held by "
                  f"{', '.join(ray.get(slots.held.remote()))}", flush=True)
            said = True
        time.sleep(WAIT_S)


def give_back_slot(sweep_path: str, trial_id: str) -> None:
    import ray

    try:
        ray.get(ray.get_actor(slots_name(sweep_path)).give_back.remote(trial_id))
    except ValueError:
        pass
