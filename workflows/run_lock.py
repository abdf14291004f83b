"""One driver per run directory on a cluster. The same command submitted twice (a job retried by a pipeline, a line
from the shell's history) would otherwise train a second run into the first one's directory: both resume from the
same checkpoint, both write checkpoints, and each driver's pruning deletes the other's.

The claim is a named Ray actor (in one namespace for every job) owned by the driver that trains into the
directory. Ray ends an actor with its owner however the owner ends (a return, Ctrl-C, `ray job stop`, SIGKILL), so
no stale claim outlives a driver; a driver that ends abruptly leaves its claim for the moment the GCS takes to see
it gone, which a new claim waits out. Drivers on different clusters writing one bucket path are not seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Any

from workflows.config_loader import ConfigError
from workflows.runtime import redact_secrets

NAMESPACE = "dist-run-claims"
# A claim whose driver just ended is gone within this: 0.6-1.1 s after a SIGKILL here (Ray ends owned actors).
WAIT_FOR_A_GONE_DRIVER_S = 5.0


class RunClaim:
    """The actor that stands for a driver's claim on a run directory."""

    def __init__(self, holder: dict[str, Any]):
        self.holder = holder

    def who(self) -> dict[str, Any]:
        return self.holder


def this_driver() -> dict[str, Any]:
    """{"job": Ray's job id, "who": the submission id of a `ray job submit` job, else pid and host}."""
    import ray

    submission = (json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("metadata") or {}).get(
        "job_submission_id")
    who = f"job {submission}" if submission else f"a driver (pid {os.getpid()} on {socket.gethostname()})"
    return {"job": ray.get_runtime_context().get_job_id(), "who": who, "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def claim_run_directory(path: str, what: str) -> Any:
    """Claim `path` (a run or sweep directory, as the workers name it) for this driver; returns the claim, to keep
    while writing there (dropped with the driver). A claim this driver's job already holds is its own (a second
    run in one process). ConfigError naming the other driver when one on this cluster holds it."""
    import ray

    name = "dist-run:" + hashlib.sha256(path.encode()).hexdigest()[:32]
    me = this_driver()
    deadline = time.monotonic() + WAIT_FOR_A_GONE_DRIVER_S
    holder: dict[str, Any] | None = None
    while True:
        try:
            claim = ray.remote(num_cpus=0)(RunClaim).options(name=name, namespace=NAMESPACE, get_if_exists=True,
                                                             max_restarts=0).remote(me)
            holder = ray.get(claim.who.remote())
        except Exception:  # noqa: BLE001 - its driver ended as this one looked (seen: RayActorError, or an
            pass  # AssertionError from Ray loading the class of an actor being removed): claim again
        else:
            if holder["job"] == me["job"]:
                return claim
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    who = f"{holder['who']} on this cluster, since {holder['since']}" if holder else "another driver on this cluster"
    raise ConfigError(
        f"{what} {redact_secrets(path)} is being written by {who}: a second driver would train into the same "
        f"directory (both resuming from one checkpoint, each deleting the other's). Wait for it to end or stop it "
        f"(`ray job stop <id>`, or Ctrl-C), or choose another name")
