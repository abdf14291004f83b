"""Can the cluster hold a run? The drivers' (pretrain, tune) check before any training work, and, on a cluster that
scales from zero, the wait for the autoscaler to add the nodes.

    check_capacity(recipe, log_prefix) -> the recipe with data.decode_node_label resolved (what the workers get)

It counts the Train workers and their decoders against the alive nodes that their labels select and fails
naming what is missing; with `scaling.wait_for_nodes_s` > 0 it first asks the autoscaler for exactly those bundles
and waits (0, the default, fails at once). What it counts, how it waits and when it gives up: cluster/README.md,
"Scale from zero". Everything that talks to Ray goes through a `Cluster`, so tests replace the nodes, the clock and
the requester.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workflows.config_loader import ConfigError
from workflows.recipe import Recipe
from workflows.runtime import (
    alive_nodes,
    label_selector,
    node_matches,
    node_resource,
    node_resources,
    parse_node_label,
    ray_started_here,
    without_nodes,
)

POLL_S = 5.0  # how often the alive nodes are checked while waiting (the autoscaler itself updates every 5 s)
PROGRESS_S = 30.0  # at most one progress line per this many seconds
INFEASIBLE_POLLS = 2  # consecutive polls the autoscaler must report the request infeasible before giving up

# ---------------------------------------------------------------------------------------------------------------
# what a run needs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRequest:
    """Resource bundles for the autoscaler (one per Train worker and per decoder) with a label selector each
    ({} = any node): the shape of `ray.autoscaler.sdk.request_resources(bundles, bundle_label_selectors)`."""

    bundles: list[dict[str, float]] = field(default_factory=list)
    selectors: list[dict[str, str]] = field(default_factory=list)

    def describe(self) -> str:
        """'8 x {CPU: 4, GPU: 1} on dist-role=train + 8 x {CPU: 1} on dist-role=decode'."""
        pairs = zip(self.bundles, self.selectors, strict=True)
        groups: Counter[tuple[tuple[tuple[str, float], ...], tuple[tuple[str, str], ...]]] = Counter(
            (tuple(sorted(b.items())), tuple(sorted(s.items()))) for b, s in pairs)
        parts = []
        for (bundle, selector), count in groups.items():
            shape = "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle) + "}"
            where = " on " + ",".join(f"{k}={v}" for k, v in selector) if selector else " on any node"
            parts.append(f"{count} x {shape}{where}")
        return " + ".join(parts) or "nothing"


def worker_bundle(recipe: Recipe) -> dict[str, float]:
    """One Train worker's resources as Ray Train is asked for them: its CPUs, its GPUs on a GPU run, and the
    custom resources of scaling.worker_resources."""
    scaling = recipe.scaling
    bundle = {"CPU": float(scaling.cpus_per_worker), **{k: float(v) for k, v in scaling.worker_resources.items()}}
    if scaling.use_gpu:
        bundle["GPU"] = float(scaling.gpus_per_worker)
    return bundle


def node_request(recipe: Recipe, decode_label: str | None) -> NodeRequest:
    """What to ask the autoscaler for: one bundle per Train worker, as many as an elastic run may use (its CPUs and
    GPUs, on scaling.worker_node_label)
    and the decode CPUs that `check_capacity` requires: one actor of data.decode_threads CPUs per worker on the
    resolved decode label (`decode_label`, "key=value"), or a single actor anywhere when there is none."""
    scaling, data = recipe.scaling, recipe.data
    worker = {k: v for k, v in worker_bundle(recipe).items() if v > 0}
    bundles: list[dict[str, float]] = []
    selectors: list[dict[str, str]] = []
    if worker:
        bundles += [dict(worker) for _ in range(scaling.max_workers)]
        selectors += [label_selector(scaling.worker_node_label) or {} for _ in range(scaling.max_workers)]
    decode_actors = scaling.max_workers if decode_label else 1
    bundles += [{"CPU": float(data.decode_threads)} for _ in range(decode_actors)]
    selectors += [label_selector(decode_label) or {} for _ in range(decode_actors)]
    return NodeRequest(bundles, selectors)


# ---------------------------------------------------------------------------------------------------------------
# the cluster, as the check sees it (tests replace every part)
# ---------------------------------------------------------------------------------------------------------------


def _ray_nodes() -> list[dict[str, Any]]:
    import ray

    return ray.nodes()


def request_resources(request: NodeRequest) -> None:
    """Ask the autoscaler for `request` (replacing any earlier request); an empty request clears it."""
    from ray.autoscaler.sdk import request_resources as ray_request_resources

    if any(request.selectors):
        ray_request_resources(bundles=request.bundles, bundle_label_selectors=request.selectors)
    else:
        ray_request_resources(bundles=request.bundles)


def _shape(bundle: dict[str, float]) -> frozenset[tuple[str, float]]:
    return frozenset((k, float(v)) for k, v in bundle.items())


def infeasible_in_reply(reply: Any, bundles: list[dict[str, float]]) -> bool:
    """Whether a `GetClusterStatusReply` (Ray's autoscaler v2 state) lists a cluster constraint with exactly these
    bundle shapes and counts among the infeasible ones (no node type can provide it within max_workers)."""
    if not bundles:
        return False
    ours = Counter(_shape(b) for b in bundles)
    for constraint in reply.autoscaling_state.infeasible_cluster_resource_constraints:
        theirs: Counter[frozenset[tuple[str, float]]] = Counter()
        for by_count in constraint.resource_requests:
            theirs[_shape(dict(by_count.request.resources_bundle))] += by_count.count
        if theirs == ours:
            return True
    return False


def autoscaler_reports_infeasible(request: NodeRequest) -> bool | None:
    """True when Ray's autoscaler v2 reports `request` (as sent by `request_resources`) infeasible; False when it
    does not; None when it cannot tell (autoscaler v1, which reports no such thing, or any error)."""
    try:
        import ray
        from ray._raylet import GcsClient
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        if not is_autoscaler_v2(fetch_from_server=True):
            return None
        address = ray.get_runtime_context().gcs_address
        if not address:
            return None
        # ray.autoscaler.v2.sdk.get_cluster_status makes this call too, but its parsed ClusterStatus drops the
        # infeasible requests; the reply itself carries them.
        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(address).get_cluster_status(timeout_s=10))
        return infeasible_in_reply(reply, request.bundles)
    except Exception:  # noqa: BLE001 - a Ray internals change must only cost the early verdict, never the run
        return None


@dataclass
class Cluster:
    """What `check_capacity` reads and talks to. The defaults are the running Ray cluster."""

    nodes: Callable[[], list[dict[str, Any]]] = _ray_nodes  # `ray.nodes()` entries (dead ones are skipped)
    request: Callable[[NodeRequest], None] = request_resources
    infeasible: Callable[[NodeRequest], bool | None] = autoscaler_reports_infeasible
    started_here: Callable[[], bool] = ray_started_here  # True: no autoscaler, waiting cannot help
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    poll_s: float = POLL_S
    progress_s: float = PROGRESS_S


# ---------------------------------------------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------------------------------------------


def _selected(nodes: list[dict[str, Any]], label: str | None) -> list[dict[str, Any]]:
    """The alive nodes carrying `label`; all alive nodes when it is None."""
    return [n for n in alive_nodes(nodes) if node_matches(n, label_selector(label))]


def _totals(nodes: list[dict[str, Any]]) -> tuple[int, float, float]:
    """(alive nodes, their CPUs, their GPUs)."""
    alive = alive_nodes(nodes)
    return len(alive), sum(node_resources(n)[0] for n in alive), sum(node_resources(n)[1] for n in alive)


def _workers_that_fit(recipe: Recipe, nodes: list[dict[str, Any]]) -> int | None:
    """How many Train workers (one `worker_bundle` each, custom resources included; a bundle cannot span nodes)
    the alive `nodes` hold at most; None when a worker takes no resources."""
    need = {k: v for k, v in worker_bundle(recipe).items() if v > 0}
    if not need:
        return None
    return sum(min(int(node_resource(n, k) / amount + 1e-9) for k, amount in need.items()) for n in alive_nodes(nodes))


def elastic_max_without_excluded(recipe: Recipe, nodes: list[dict[str, Any]]) -> int:
    """The most workers an elastic run with scaling.exclude_nodes may ask Ray Train for, given the cluster's
    `nodes` (`ray.nodes()` entries): what the alive nodes it does not keep off hold now, within its range. Ray
    Train's elastic policy counts room on every node by resources alone (its autoscaling coordinator reads no label
    selector): uncapped, it would count a left-out node's GPUs, grow onto them, fail to place the group there and
    fall back, again at every resize check. The cost: such a run does not grow past this until it is fitted again."""
    scaling = recipe.scaling
    room = _workers_that_fit(recipe, without_nodes(alive_nodes(nodes), scaling.exclude_nodes))
    return scaling.max_workers if room is None else max(scaling.min_workers, min(scaling.max_workers, room))


def _worker_label_fix(label: str, action: str = "Add or enlarge nodes with that label") -> str:
    """What to do when the nodes `scaling.worker_node_label` selects are missing or too small."""
    key, value = parse_node_label(label)
    return (f"{action} (`ray start --labels={key}={value}`, or "
            f"`labels: {{{key}: {value}}}` on the node type in the cluster YAML; see cluster/README.md), or unset "
            f"scaling.worker_node_label (null: the workers run on any node)")


def _assess(recipe: Recipe, nodes: list[dict[str, Any]]) -> tuple[Recipe, Any]:
    """The check itself, on one snapshot of the nodes: the recipe with the resolved decode label and the
    `DecodeNodes`, or a ConfigError saying what is missing.

    The Train workers count only the alive nodes that `scaling.worker_node_label` selects (all of them when it is
    unset), the decoders only those that the resolved `data.decode_node_label` selects. Where the two sets
    overlap the CPUs are shared, so: workers' CPUs <= the worker nodes' CPUs, decode CPUs <= the decode nodes'
    (`DecodeNodes.check`), and both together <= the CPUs of the nodes in either set."""
    from workflows.data.decode_nodes import DecodeNodesError, resolve_decode_nodes

    scaling, data = recipe.scaling, recipe.data
    decode = resolve_decode_nodes(data.decode_node_label, nodes)  # never raises; `decode.check` below does
    label = scaling.worker_node_label
    workers = _selected(nodes, label)
    count, worker_cpus, worker_gpus = _totals(workers)
    labelled = f"the nodes labelled {label} (scaling.worker_node_label)"
    if label and not workers:
        raise ConfigError(f"scaling.worker_node_label {label!r}: no alive Ray node carries it, so the "
                          f"{scaling.min_workers} training workers have nowhere to run; the alive nodes carry: "
                          f"{decode.labels_seen()}. {_worker_label_fix(label, 'Label the training nodes with it')}")
    if scaling.use_gpu and worker_gpus < scaling.min_workers * scaling.gpus_per_worker:
        if label:
            raise ConfigError(f"scaling asks for {scaling.min_workers} workers x {scaling.gpus_per_worker:g} GPU on "
                              f"{labelled}, but the {count} alive node(s) carrying it have {worker_gpus:g} GPUs. "
                              f"{_worker_label_fix(label)}")
        raise ConfigError(f"scaling asks for {scaling.min_workers} workers x {scaling.gpus_per_worker:g} GPU but the "
                          f"cluster has {worker_gpus:g} GPUs on its alive nodes (on an autoscaling cluster, also check "
                          f"the GPU node type's max_workers)")
    need_cpu = scaling.min_workers * scaling.cpus_per_worker
    if label and worker_cpus < need_cpu:
        raise ConfigError(f"scaling asks for {scaling.min_workers} workers x {scaling.cpus_per_worker:g} CPUs on "
                          f"{labelled}, but the {count} alive node(s) carrying it have {worker_cpus:g} CPUs. "
                          f"{_worker_label_fix(label)}, or lower scaling.cpus_per_worker")
    fit = _workers_that_fit(recipe, workers)
    if fit is not None and fit < scaling.min_workers:
        gpu = f" and {scaling.gpus_per_worker:g} GPU" if scaling.use_gpu else ""
        custom = "".join(f" and {v:g} {k}" for k, v in scaling.worker_resources.items())
        shape = f"{scaling.cpus_per_worker:g} CPUs{gpu}{custom}"
        nodes_held = f"the {count} alive node(s) labelled {label}" if label else "the alive nodes"
        fix = (f"{_worker_label_fix(label, 'Use larger nodes with that label')}, or lower scaling.cpus_per_worker"
               if label else "Use larger nodes or lower scaling.cpus_per_worker")
        if scaling.worker_resources:
            fix += (f" (scaling.worker_resources: the nodes must offer {', '.join(scaling.worker_resources)}, e.g. "
                    f"`ray start --resources='{{\"{next(iter(scaling.worker_resources))}\": 1}}'`)")
        raise ConfigError(f"scaling asks for {scaling.min_workers} workers of {shape} each, but a worker cannot span "
                          f"nodes and {nodes_held} hold only {fit} of them. {fix}")
    try:  # each worker's pipeline keeps at least one decoder
        decode.check(scaling.min_workers, data.decode_threads)
    except DecodeNodesError as exc:
        raise ConfigError(str(exc)) from None
    need_decode = data.decode_threads if decode.label is None else scaling.min_workers * data.decode_threads
    cpus = sum(node_resources(n)[0] for n in alive_nodes(nodes)
               if node_matches(n, label_selector(label)) or node_matches(n, label_selector(decode.label)))
    if cpus - need_cpu < need_decode:
        scope = (f"the nodes labelled {label} or {decode.label} have" if label and decode.label else
                 "the cluster has")
        raise ConfigError(
            f"{scope} {cpus:g} CPUs; the {scaling.min_workers} training workers take {need_cpu:g}, leaving "
            f"{max(cpus - need_cpu, 0):g} for video decoding (needs {need_decode:g}). Lower scaling.cpus_per_worker, "
            f"add CPU nodes (labelled for decoding: data.decode_node_label), or start Ray with more logical CPUs")
    resolved = dataclasses.replace(recipe, data=dataclasses.replace(data, decode_node_label=decode.setting))
    return resolved, decode


def _have(recipe: Recipe, nodes: list[dict[str, Any]], decode_label: str | None) -> str:
    """One line on what the alive nodes hold against what the run needs."""
    from workflows.data.decode_nodes import resolve_decode_nodes

    scaling, data = recipe.scaling, recipe.data
    count, cpus, _ = _totals(nodes)
    parts = [f"{count} alive node{'s' if count != 1 else ''}"]
    label = scaling.worker_node_label
    _, worker_cpus, worker_gpus = _totals(_selected(nodes, label))
    if scaling.use_gpu:
        parts.append(f"{worker_gpus:g}/{scaling.min_workers * scaling.gpus_per_worker:g} GPUs"
                     + (f" labelled {label}" if label else ""))
    if label:
        parts.append(f"{worker_cpus:g}/{scaling.min_workers * scaling.cpus_per_worker:g} worker CPUs labelled {label}")
    if decode_label:
        found = resolve_decode_nodes(decode_label, nodes)
        parts.append(f"{found.cpus:g}/{scaling.min_workers * data.decode_threads:g} CPUs labelled {decode_label}")
    need = scaling.min_workers * (scaling.cpus_per_worker + data.decode_threads) if decode_label else \
        scaling.min_workers * scaling.cpus_per_worker + data.decode_threads
    parts.append(f"{cpus:g}/{need:g} CPUs in all")
    return ", ".join(parts)


def _decode_label_to_request(recipe: Recipe, nodes: list[dict[str, Any]]) -> str | None:
    """The decode label to ask nodes for: the recipe's, resolved as the check resolves it (an unset label finds
    dist-role=decode only among alive nodes, so on a cold cluster it means any node)."""
    from workflows.data.decode_nodes import resolve_decode_nodes

    return resolve_decode_nodes(recipe.data.decode_node_label, nodes).label


def _sentence(exc: Exception) -> str:
    return str(exc).rstrip(". ")


WAIT_HINT = ("Only alive nodes count: on a cluster whose nodes scale from zero, set scaling.wait_for_nodes_s "
             "(e.g. 900) so the driver asks the autoscaler for them and waits.")


def check_capacity(recipe: Recipe, log_prefix: str = "[pretrain]", cluster: Cluster | None = None) -> Recipe:
    """Fail fast, instead of hanging, when the cluster cannot hold the workers and the decoders beside them;
    with `scaling.wait_for_nodes_s` > 0, first ask the autoscaler for the missing nodes and wait for them (see the
    module docstring).

    Resolves `data.decode_node_label` against the alive nodes (`resolve_decode_nodes`: unset means the nodes
    labelled dist-role=decode when the cluster has any, else any node; "any" opts out), stops with a ConfigError
    when the cluster is short, prints where decoding runs, and returns the recipe with the resolved label
    ("key=value" or "any"): that recipe is what the workers must get."""
    cluster = cluster or Cluster()
    if recipe.scaling.exclude_nodes:  # nodes the run keeps off do not count
        listed = cluster.nodes
        cluster = dataclasses.replace(cluster, nodes=lambda: without_nodes(listed(), recipe.scaling.exclude_nodes))
    wait_s = float(recipe.scaling.wait_for_nodes_s)
    nodes = cluster.nodes()
    try:
        resolved, decode = _assess(recipe, nodes)
    except ConfigError as exc:
        if wait_s <= 0:
            raise ConfigError(f"{_sentence(exc)}. {WAIT_HINT}") from None
        if cluster.started_here():
            raise ConfigError(f"{_sentence(exc)}. Not waiting for nodes (scaling.wait_for_nodes_s={wait_s:g}): this "
                              f"driver started Ray itself, and such a local cluster has no autoscaler to add them"
                              ) from None
        resolved, decode = _wait_for_nodes(recipe, nodes, exc, cluster, log_prefix)
    print(f"{log_prefix} {decode.describe()}", flush=True)
    return resolved


def _wait_for_nodes(recipe: Recipe, nodes: list[dict[str, Any]], first: ConfigError, cluster: Cluster,
                    log_prefix: str) -> tuple[Recipe, Any]:
    wait_s = float(recipe.scaling.wait_for_nodes_s)
    start = cluster.clock()
    label = _decode_label_to_request(recipe, nodes)
    request = node_request(recipe, label)
    state = {"asked": False, "warned": False}

    def ask(req: NodeRequest) -> None:
        try:
            cluster.request(req)
            state["asked"] = True
        except Exception as exc:  # noqa: BLE001 - without the request, nodes may still come (min_workers, a human)
            if not state["warned"]:
                print(f"{log_prefix} could not ask the autoscaler for nodes ({type(exc).__name__}: {exc}); waiting "
                      f"for them anyway", flush=True)
                state["warned"] = True

    error = first
    try:
        ask(request)
        print(f"{log_prefix} the cluster cannot hold the run yet ({_have(recipe, nodes, label)}): asked the "
              f"autoscaler for {request.describe()}; waiting up to {wait_s:g} s for the nodes "
              f"(scaling.wait_for_nodes_s; 0 fails at once)", flush=True)
        last_progress, infeasible_polls = start, 0
        while True:
            elapsed = cluster.clock() - start
            if elapsed >= wait_s:
                raise ConfigError(
                    f"{_sentence(error)}; waited {elapsed:.0f} s (scaling.wait_for_nodes_s={wait_s:g}) for the "
                    f"autoscaler to add {request.describe()}. A cluster without an autoscaler (nodes joined with "
                    f"`ray start`) never adds nodes: set scaling.wait_for_nodes_s=0 there to fail at once")
            cluster.sleep(max(0.0, min(cluster.poll_s, wait_s - elapsed)))
            nodes = cluster.nodes()
            try:
                result = _assess(recipe, nodes)
            except ConfigError as exc:
                error = exc
            else:
                print(f"{log_prefix} the nodes are up after {cluster.clock() - start:.0f} s "
                      f"({_have(recipe, nodes, result[1].label)})", flush=True)
                return result
            label = _decode_label_to_request(recipe, nodes)
            request = node_request(recipe, label)
            ask(request)  # again: another request_resources caller may have replaced ours
            infeasible_polls = infeasible_polls + 1 if cluster.infeasible(request) else 0
            elapsed = cluster.clock() - start
            if infeasible_polls >= INFEASIBLE_POLLS:
                raise ConfigError(
                    f"{_sentence(error)}; the Ray autoscaler reports that no node type of this cluster can provide "
                    f"{request.describe()} (check the node types' resources, labels and max_workers in the cluster "
                    f"YAML, or lower the recipe's scaling); waited {elapsed:.0f} s")
            if cluster.clock() - last_progress >= cluster.progress_s:
                last_progress = cluster.clock()
                print(f"{log_prefix} still waiting for nodes after {elapsed:.0f} of {wait_s:g} s: "
                      f"{_have(recipe, nodes, label)}", flush=True)
    finally:
        if state["asked"]:
            try:
                cluster.request(NodeRequest())  # clear it, so the cluster can scale down later
            except Exception as exc:  # noqa: BLE001
                print(f"{log_prefix} could not clear the autoscaler request ({type(exc).__name__}: {exc}); it "
                      f"holds until another request_resources call replaces it", flush=True)
