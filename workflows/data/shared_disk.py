"""Whether a cluster's nodes see this machine's local paths: data tools whose Ray tasks read local videos or write a
local folder (`data transcode`, `data check`) must run where those files are.

On a shared disk (NFS, one machine) every node sees the same files and may take a share of the work; on a cloud
cluster without one, a task on another node would find no video (counted missing) or write its copies into its own
disk, out of the manifest's reach. Each node is asked (`nodes_that_see`); when one does not see them, the tasks run
on the driver's node alone and a note says so.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

from workflows.data.video import StorageUnreachable, node_name, wait_for_local_disk
from workflows.runtime import NODE_ID_LABEL, is_remote

# Written into a local run directory where the run is started; every training worker looks for it at its start.
RUN_DIR_MARKER = ".dist-run-dir"


# How a node that does not see the shared disk names itself in its error (video.wait_for_local_disk,
# check_run_dir_seen): "node <address> (Ray node id <id>) has not seen / does not see ...".
_BLIND_NODE = re.compile(r"\(Ray node id ([0-9a-f]{56})\) (?:has not seen any of the corpus's videos|does not see the "
                         r"run directory)")


def blind_node(error: str) -> str | None:
    """The Ray node id an error (its text: a remote error arrives as text) names as not seeing the shared disk, or
    None when it is another error."""
    found = _BLIND_NODE.search(error)
    return found[1] if found else None


def mark_run_dir(run_dir: str) -> None:
    """Where a run (or a sweep's trial) is started: the marker its workers must see in a local run directory."""
    marker = Path(run_dir) / RUN_DIR_MARKER
    if not is_remote(run_dir) and not marker.exists():  # written once: a relaunch onto a full disk writes nothing
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("the training workers of this run look for this file\n")


def check_run_dir_seen(run_dir: str, retry_s: float | None = None) -> None:
    """A training worker's first check: a local run directory is the one its run was started in (a node that joined
    later without the shared disk would write its checkpoint shards into its own disk, and every checkpoint would
    be partial). Waited for as a lost mount for `retry_s`, then StorageUnreachable naming this node."""
    if is_remote(run_dir):
        return
    marker = os.path.join(run_dir, RUN_DIR_MARKER)
    try:
        wait_for_local_disk(marker, [marker], retry_s)
    except StorageUnreachable:
        raise StorageUnreachable(
            f"node {node_name()} does not see the run directory {run_dir} (its {RUN_DIR_MARKER}, written where "
            f"the run was started, is not there): its checkpoints would land on the node's own disk. Mount that "
            f"disk at the same path on every node, or put run.storage_path in a bucket (s3://...; cluster/README.md, "
            f"\"No shared disk\")") from None


def where_tasks_see(local: list[tuple[str, str]]) -> tuple[dict[str, Any], int, str]:
    """For Ray tasks that use the paths of `local` ((what to call it, path): an existing file or folder; bucket URIs
    are left out): (their placement arguments for `map_batches`, the CPUs they may use, a note or ""). Any node when
    every alive node sees the paths (or there is one node); else the driver's node alone, named in the note."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    local = [(what, path) for what, path in local if not is_remote(path)]
    alive = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
    if not local or len(alive) < 2:
        return {}, cpus, ""
    here = ray.get_runtime_context().get_node_id()
    blind = sorted(set(alive) - nodes_that_see([path for _, path in local], list(alive)) - {here})
    if not blind:
        return {}, cpus, ""
    mine = max(1, int(alive.get(here, {}).get("Resources", {}).get("CPU", 1)))
    named = " and ".join(f"{what} {path}" for what, path in local)
    note = (f"{len(blind)} of the cluster's {len(alive)} nodes do not see {named} (no shared disk): this node does "
            f"the work alone, on its {mine} CPUs; put them in a bucket (s3://...), or on a disk every node mounts, "
            f"for every node to take a share")
    return {"label_selector": {NODE_ID_LABEL: here}}, mine, note


def nodes_that_see(paths: list[str], nodes: list[str], timeout_s: float = 60.0) -> set[str]:
    """The Ray nodes (of `nodes`, by id) on which every one of the local `paths` (existing here) exists. A folder
    among them gets a marker file of its own for the question, so that a folder of the same name on another node's
    disk is not taken for this one. A node that does not answer in `timeout_s`, or is gone when asked, counts as
    not seeing them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    markers, asked = [], []
    for path in paths:
        if Path(path).is_dir():
            marker = Path(path) / f".dist-shared-{uuid.uuid4().hex}"
            marker.write_text("")
            markers.append(marker)
            path = str(marker)
        asked.append(path)

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(wanted: list[str]) -> bool:
        return all(os.path.exists(p) for p in wanted)

    try:
        refs = {node: sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(asked)
                for node in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        answers = {node: ref in ready and _answer(ref) for node, ref in refs.items()}
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)
    return {node for node, yes in answers.items() if yes}


def spread_local_paths(paths: list[str], tries: int = 30) -> list[str]:
    """Of `tries` of `paths` spread over the whole list (the first included), the local ones, as paths on this
    machine (a file: URI resolved)."""
    from workflows.data.manifest import resolve_filesystem

    step = max(1, len(paths) // tries)
    return [resolve_filesystem(p)[1] for p in paths[::step][:tries] if not is_remote(p) or p[:5].lower() == "file:"]


VIDEOS_PROBED = 64


def absent_videos(paths: list[str]) -> list[str]:
    """The local videos of `paths` probed here (up to VIDEOS_PROBED, spread over them) when none of them exists: a
    manifest moved away from its videos, or the disk that holds them gone; [] when one is there (some missing videos
    are the data pipeline's to count and drop) or none is local."""
    probe = spread_local_paths(paths, VIDEOS_PROBED)
    return [] if any(os.path.isfile(p) for p in probe) else probe


def check_videos_reachable(manifest: Any, key: str) -> None:
    """ConfigError when none of a manifest's local videos probed here exists (`absent_videos`): a manifest moved
    away from its videos, or paths relative to another folder (before any work: the decoders would otherwise wait
    for a disk that is not gone). Videos in a bucket are not probed here."""
    from workflows.config_loader import ConfigError

    probe = absent_videos(manifest.table.column("path").to_pylist())
    if probe:
        raise ConfigError(f"{key} {manifest.source}: none of the {len(probe)} videos checked exists (e.g. {probe[0]}). "
                          "Relative paths in a manifest resolve against the manifest's own folder: keep the manifest "
                          "beside its videos, or write absolute paths (`data check` reports every missing one)")


def witness_files(paths: list[str], count: int = 3, tries: int = 30) -> list[str]:
    """Up to `count` of `paths` that are local files here, taken from `tries` of them spread over the whole list
    (one deleted folder does not take them all): what a decoder that finds a local video missing looks at to tell a
    missing video from a disk that is not there (`video.wait_for_local_disk`), and (the first) what the nodes are
    asked about a manifest's videos (a missing one would ask nothing)."""
    return [p for p in spread_local_paths(paths, tries) if os.path.isfile(p)][:count]


def _answer(ref: Any) -> bool:
    import ray

    try:
        return bool(ray.get(ref))
    except ray.exceptions.RayError:  # the node went away while asked
        return False
