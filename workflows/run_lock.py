"""One driver per run directory on a cluster. The same command submitted twice (a job retried by a pipeline, a line
from the shell's history) would otherwise train a second run into the first one's directory: both resume from the
same checkpoint, both write checkpoints, and each driver's pruning deletes the other's.

The claim is an entry in the cluster's GCS key-value store naming the driver's Ray job; it is dropped when the
driver is done, and a claim whose job the GCS's job table says has ended (a driver SIGKILLed, a node lost) is taken
over. No process is started for it (a named actor owned by the driver, the first version, needed a worker process
per claim, and once met a Ray error at a hand-off). Drivers on different clusters writing one bucket path are not
seen.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from workflows.config_loader import ConfigError
from workflows.elastic import kv_del, kv_get, kv_put
from workflows.runtime import redact_secrets

KEY_PREFIX = "dist-run-claim:"
# The GCS marks a SIGKILLed driver's job dead within ~1 s here; a claim whose holder still looks alive is checked
# again for this long before the second driver is refused.
WAIT_FOR_A_GONE_DRIVER_S = 5.0


def this_driver() -> dict[str, Any]:
    """{"job": Ray's job id, "who": the submission id of a `ray job submit` job, else pid and host, "since"}."""
    import ray

    submission = (json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("metadata") or {}).get(
        "job_submission_id")
    who = f"job {submission}" if submission else f"a driver (pid {os.getpid()} on {socket.gethostname()})"
    return {"job": ray.get_runtime_context().get_job_id(), "who": who, "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _job_alive(job_id: str) -> bool:
    """Whether the GCS's job table holds `job_id` and not as ended (Ray's debugging view of it, ray._private)."""
    import ray

    return any(job.get("JobID") == job_id and not job.get("IsDead") for job in ray._private.state.jobs())


class RunClaim:
    """This driver's claim on a directory; `release()` (or the end of a `with`) gives it back."""

    def __init__(self, key: bytes, holder: dict[str, Any]):
        self.key, self.holder = key, holder

    def release(self) -> None:
        try:
            if kv_get(self.key) == self.holder:  # not taken over meanwhile
                kv_del(self.key)
        except Exception:  # noqa: BLE001 - Ray already gone (an interrupted driver): the claim's job ends with it,
            pass  # and the next claim takes over a claim of an ended job

    def __enter__(self) -> RunClaim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def claim_key(path: str) -> bytes:
    """The GCS key of a directory's claim: a bucket URI without its user-info and query, so the key holds no
    credentials and one directory named with or without them (`?endpoint_override=...&access_key=...`, or the
    environment's) is one claim."""
    from urllib.parse import urlsplit, urlunsplit

    if "://" in path:
        parts = urlsplit(path)
        path = urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))
    return (KEY_PREFIX + path).encode()


TRAINING_CLASH = ("a second driver would train into the same directory (both resuming from one checkpoint, each "
                  "deleting the other's). Wait for it to end or stop it (`ray job stop <id>`, or Ctrl-C), or choose "
                  "another name")


def claim_run_directory(path: str, what: str, clash: str = TRAINING_CLASH) -> RunClaim:
    """Claim `path` (a run or sweep directory, as the workers name it; an output folder) for this driver until
    `release()`. A claim this driver's job holds already is its own (a second run in one process). ConfigError naming
    the other driver, then `clash` (what a second driver would do, what to do instead), when one on this cluster still
    holds it."""
    key = claim_key(path)
    me = this_driver()
    deadline = time.monotonic() + WAIT_FOR_A_GONE_DRIVER_S
    while True:
        if not kv_put(key, me, overwrite=False):  # created: nobody held it
            return RunClaim(key, me)
        holder = kv_get(key)
        if holder is None or holder.get("job") == me["job"] or not _job_alive(holder.get("job", "")):
            # released meanwhile, ours, or left by a driver that ended without releasing it: take it, unless
            # another driver took it since it was read
            if kv_get(key) == holder:
                kv_put(key, me)
                return RunClaim(key, me)
            continue
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    raise ConfigError(f"{what} {redact_secrets(path)} is being written by {holder['who']} on this cluster, since "
                      f"{holder['since']}: {clash}")
