"""One driver per run directory on a cluster. The same command submitted twice (a job retried by a pipeline, a line
from the shell's history) would otherwise train a second run into the first one's directory: both resume from the
same checkpoint, both write checkpoints, and each driver's pruning deletes the other's.

The claim is an entry in the cluster's GCS key-value store naming the driver's Ray job; it is dropped when the
driver is done, and a claim whose job the GCS's job table says has ended (a driver SIGKILLed, a node lost) is taken
over. No process is started for it (a named actor owned by the driver, the first version, needed a worker process
per claim, and once met a Ray error at a hand-off).

A bucket path can also be written from another cluster (no shared disk: each cluster sees only its own GCS). There
the claim is also a lease object in the bucket, `<path>/.dist-driver.json`, naming the driver and its cluster,
renewed every HEARTBEAT_S seconds by a thread of the driver and deleted at release. A driver of another cluster that
finds one watches it for up to WATCH_S: renewed meanwhile, its holder is alive and this driver is refused; not
renewed, its holder is gone (SIGKILLed, its cluster lost) and this driver takes it over. The comparison is of the
lease's own renewal count, so the clusters' clocks do not matter. Two drivers starting within a second of each other
are told apart by reading the lease back after writing it (S3's reads after a write are consistent). A driver that
was only cut off from the bucket for WATCH_S finds its lease taken over at its next renewal: it says so on stderr
and stops renewing, never overwriting the new holder's lease.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from workflows.config_loader import ConfigError
from workflows.elastic import kv_del, kv_get, kv_put
from workflows.runtime import redact_secrets

KEY_PREFIX = "dist-run-claim:"
# The GCS marks a SIGKILLed driver's job dead within ~1 s here; a claim whose holder still looks alive is checked
# again for this long before the second driver is refused.
WAIT_FOR_A_GONE_DRIVER_S = 5.0
LEASE_NAME = ".dist-driver.json"  # in a bucket path: the cross-cluster claim
HEARTBEAT_S = 15.0  # the lease is renewed this often
WATCH_S = 2 * HEARTBEAT_S + 5  # a lease not renewed for this long is a gone driver's
READ_BACK_S = 1.0  # after writing a lease: a driver of another cluster writing at the same moment has written
CLUSTER_KEY = b"dist-cluster-id"


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


def cluster_id() -> str:
    """This Ray cluster's own id: drawn by the first driver that asks, kept in its GCS (Ray's job ids restart at 1
    on every cluster, and GCS addresses repeat across private networks)."""
    kv_put(CLUSTER_KEY, {"id": uuid.uuid4().hex}, overwrite=False)
    return kv_get(CLUSTER_KEY)["id"]


class BucketLease:
    """The lease object of a bucket path (see the module's docstring); `holder` is this driver as this_driver() says,
    with its cluster's id."""

    def __init__(self, uri: str, holder: dict[str, Any]) -> None:
        from workflows.data.manifest import resolve_filesystem

        self.uri = uri
        self.fs, prefix = resolve_filesystem(uri)
        self.key = f"{prefix.rstrip('/')}/{LEASE_NAME}"
        self.mine = {**holder, "host": socket.gethostname(), "token": uuid.uuid4().hex, "renewals": 0}
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost: dict[str, Any] | None = None  # the lease of the driver that took this one over

    @property
    def shown(self) -> str:
        return redact_secrets(self.uri.rstrip("/")) + "/" + LEASE_NAME

    def read(self, retry: bool = True) -> dict[str, Any] | None:
        """The lease as the bucket holds it now (None: there is none); `retry`: through the storage retries (else
        one attempt, an OSError when the bucket does not answer)."""
        import pyarrow.fs as pafs

        from workflows.data.video import from_storage

        def get() -> dict[str, Any] | None:
            if self.fs.get_file_info(self.key).type != pafs.FileType.File:
                return None
            with self.fs.open_input_stream(self.key) as f:
                try:
                    return json.loads(f.read())
                except ValueError:  # a partial upload cannot be read by S3's design; a hand-edited one can
                    return {}

        return from_storage(self.uri, self.fs, get, action="read the claim of") if retry else get()

    def write(self) -> None:
        with self.fs.open_output_stream(self.key) as f:
            f.write(json.dumps({**self.mine, "renewed": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())

    def take(self) -> None:
        """Write this driver's lease (retried as any storage write), then keep renewing it until `release`."""
        from workflows.data.video import from_storage

        from_storage(self.uri, self.fs, self.write, action="write the claim of")
        self._renewer = threading.Thread(target=self._renew, name="dist-bucket-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        failing = False
        while not self._stop.wait(HEARTBEAT_S):
            self.mine["renewals"] += 1
            try:
                now = self.read(retry=False)
                if now is not None and now.get("token") != self.mine["token"]:
                    # Taken over: this driver's renewals stopped for longer than WATCH_S (the bucket unreachable
                    # from here) and another cluster's driver took the path. Renewing would hide the clash.
                    print(f"error: the claim {self.shown} was taken over by {now.get('who', 'a driver')} on another "
                          f"Ray cluster (head {now.get('host', '?')}) while this driver could not renew it: both now "
                          f"write there. Stop one of them", file=sys.stderr, flush=True)
                    self.lost = now
                    return
                self.write()
                failing = False
            except OSError as exc:  # the bucket not answering: said once; the next renewal tries again
                if not failing:
                    print(f"note: could not renew the claim {self.shown} ({exc}); trying again in {HEARTBEAT_S:.0f} s",
                          file=sys.stderr, flush=True)
                failing = True

    def release(self) -> None:
        """Stop renewing; delete the lease unless another driver has taken it over."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=HEARTBEAT_S)
        try:  # one attempt: a driver ending while the bucket is away is not held for the storage retry budget
            if (self.read(retry=False) or {}).get("token") == self.mine["token"]:
                self.fs.delete_file(self.key)
        except OSError:  # the bucket gone: the lease expires unrenewed, and the next driver takes it over
            pass


def claim_bucket_path(uri: str, what: str, clash: str, holder: dict[str, Any]) -> BucketLease:
    """Take the lease of bucket path `uri` for `holder` (this_driver() with "cluster"), renewed until released.
    A lease of this cluster is taken over at once (the GCS claim has decided its driver is gone); another
    cluster's is watched for up to WATCH_S. ConfigError naming the other driver, then `clash`, when it is renewed
    meanwhile, or when another driver writes its own at the same moment."""
    lease = BucketLease(uri, holder)
    found = lease.read()
    if found and found.get("cluster") != holder["cluster"]:
        print(f"note: {what} {redact_secrets(uri)} holds the claim of {found.get('who', 'a driver')} on another Ray "
              f"cluster (head {found.get('host', '?')}), renewed {found.get('renewed', '?')}; checking for up to "
              f"{WATCH_S:.0f} s whether that driver is alive", file=sys.stderr, flush=True)
        deadline = time.monotonic() + WATCH_S
        while time.monotonic() < deadline:
            time.sleep(min(1.0, WATCH_S / 10))
            now = lease.read()
            if now is None:  # released meanwhile
                break
            if now != found:  # renewed, or taken by yet another driver: alive
                raise _held_elsewhere(what, uri, now, clash)
    lease.take()
    time.sleep(READ_BACK_S)
    now = lease.read()
    if (now or {}).get("token") != lease.mine["token"]:  # another driver wrote its own after this one
        lease.release()  # stops renewing; the other's lease is left
        raise _held_elsewhere(what, uri, now or {}, clash)
    return lease


def _held_elsewhere(what: str, uri: str, holder: dict[str, Any], clash: str) -> ConfigError:
    return ConfigError(f"{what} {redact_secrets(uri)} is being written by {holder.get('who', 'a driver')} on another "
                       f"Ray cluster (head {holder.get('host', '?')}), since {holder.get('since', '?')}; its claim in "
                       f"the bucket is being renewed: {clash}")


class RunClaim:
    """This driver's claim on a directory; `release()` (or the end of a `with`) gives it back."""

    def __init__(self, key: bytes, holder: dict[str, Any], lease: BucketLease | None = None):
        self.key, self.holder, self.lease = key, holder, lease

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
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
    `release()`: on this cluster, and for a bucket path across clusters too (`claim_bucket_path`). A claim this
    driver's job holds already is its own (a second run in one process). ConfigError naming the other driver, then
    `clash` (what a second driver would do, what to do instead), when one still holds it."""
    from workflows.runtime import in_bucket

    key = claim_key(path)
    me = this_driver()
    _claim_on_this_cluster(key, me, path, what, clash)
    claim = RunClaim(key, me)
    if in_bucket(path):
        try:
            claim.lease = claim_bucket_path(path, what, clash, {**me, "cluster": cluster_id()})
        except BaseException:
            claim.release()
            raise
    return claim


def _claim_on_this_cluster(key: bytes, me: dict[str, Any], path: str, what: str, clash: str) -> None:
    """Take `key` in this cluster's GCS for `me`, or raise ConfigError naming the live driver holding it."""
    deadline = time.monotonic() + WAIT_FOR_A_GONE_DRIVER_S
    while True:
        if not kv_put(key, me, overwrite=False):  # created: nobody held it
            return
        holder = kv_get(key)
        if holder is None or holder.get("job") == me["job"] or not _job_alive(holder.get("job", "")):
            # released meanwhile, ours, or left by a driver that ended without releasing it: take it, unless
            # another driver took it since it was read
            if kv_get(key) == holder:
                kv_put(key, me)
                return
            continue
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    raise ConfigError(f"{what} {redact_secrets(path)} is being written by {holder['who']} on this cluster, since "
                      f"{holder['since']}: {clash}")
