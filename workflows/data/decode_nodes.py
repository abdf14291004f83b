"""Where the decoders may run: `data.decode_node_label` resolved against the alive Ray nodes.

`resolve_decode_nodes(cfg.decode_node_label)` reads the alive nodes' labels and CPUs: an unset label becomes
"dist-role=decode" when some alive node carries it (the label cluster/*.yaml give CPU decode nodes), else "any";
`DecodeNodes.check` fails fast, naming the labels the nodes do carry, when the label matches no alive node or too
few CPUs. The drivers (pretrain, tune) resolve and check before any training work, through
`workflows.capacity.check_capacity` (which first waits for the autoscaler when scaling.wait_for_nodes_s > 0), and
hand the result to the workers in the recipe; in a worker, an unset label means any node (`decode_pool_size`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workflows.data.data_config import DECODE_ANYWHERE, DECODE_LABEL_AUTO, DataConfig
from workflows.runtime import (
    alive_nodes,
    label_selector,
    node_labels,
    node_matches,
    node_resources,
    parse_node_label,
)


class DecodeNodesError(RuntimeError):
    """The nodes that `data.decode_node_label` selects cannot hold the decoders (none alive, or too few CPUs)."""


def _selector(label: str | None) -> dict[str, str] | None:
    return None if label == DECODE_ANYWHERE else label_selector(label)


@dataclass(frozen=True)
class DecodeNodes:
    """Where the decoders may run, resolved against the alive Ray nodes by `resolve_decode_nodes`."""

    label: str | None  # the node label they are restricted to ("key=value"); None: any node
    auto: bool  # the label was found on the cluster because data.decode_node_label was unset
    nodes: int  # alive nodes they may use
    cpus: float  # CPUs of those nodes
    largest_cpus: float  # CPUs of the largest of them (one actor needs decode_threads CPUs on one node)
    gpus: float  # GPUs of those nodes
    other_cpus: float  # CPUs and GPUs of the alive nodes outside the label (both 0 without a label)
    other_gpus: float
    cluster_labels: dict[str, int] = field(default_factory=dict)  # "key=value" -> alive nodes carrying it
    unlabelled_nodes: int = 0  # alive nodes carrying no label of their own (Ray's ray.io/* ones not counted)

    @property
    def setting(self) -> str:
        """The resolved `data.decode_node_label` to hand to the workers: the label, or "any"."""
        return self.label or DECODE_ANYWHERE

    def labels_seen(self) -> str:
        """The labels the alive nodes carry, for messages: 'dist-role=train (2 nodes), dist-role=head (1 node)'."""
        def count(n: int) -> str:
            return f"{n} node{'s' if n != 1 else ''}"

        parts = [f"{label} ({count(n)})" for label, n in sorted(self.cluster_labels.items())]
        if self.unlabelled_nodes:
            parts.append(f"no label ({count(self.unlabelled_nodes)})")
        return ", ".join(parts) or "no alive nodes"

    def describe(self) -> str:
        """One line for the console: where the decoders go and why."""
        if self.label is None:
            return f"decoders may run on any node ({self.nodes} alive, {self.cpus:g} CPUs)"
        where = (f"decoders run on the {self.nodes} alive node(s) labelled {self.label} "
                 f"({self.cpus:g} CPUs)")
        if self.auto:
            return (f"{where}, found automatically (data.decode_node_label is unset); set "
                    f"data.decode_node_label={DECODE_ANYWHERE} to decode on any node")
        return where

    def check(self, actors: int, threads: int) -> None:
        """Raise DecodeNodesError, naming the label, the labels the nodes do carry and what to do, when the
        selected nodes cannot hold `actors` decoders of `threads` CPUs each (they would wait forever)."""
        if self.label is None:
            return  # any node: the cluster-wide CPU check (capacity.check_capacity) covers it
        key, value = parse_node_label(self.label)
        label_them = (f"`ray start --labels={self.label}`, or `labels: {{{key}: {value}}}` on the node type in the "
                      f"cluster YAML; see cluster/README.md")
        other = f"or set data.decode_node_label={DECODE_ANYWHERE} to decode on any node"
        if not self.auto:
            other = (f"or unset data.decode_node_label (null: the nodes labelled {DECODE_LABEL_AUTO} when there are "
                     f"any, else any node), {other}")
        origin = "found automatically" if self.auto else "set in data.decode_node_label"
        if self.nodes == 0:
            raise DecodeNodesError(f"decode node label {self.label!r} ({origin}): no alive Ray node carries it; the "
                                   f"alive nodes carry: {self.labels_seen()}. Label nodes for decoding ({label_them}), "
                                   f"{other}.")
        need = actors * threads
        if self.cpus < need or self.largest_cpus < threads:
            raise DecodeNodesError(
                f"decode node label {self.label!r} ({origin}): the {self.nodes} alive node(s) carrying it have "
                f"{self.cpus:g} CPUs (largest {self.largest_cpus:g}), but the decoders need {need:g}: {actors} "
                f"actor(s) (at least one per training worker) x data.decode_threads={threads}, each on one node. "
                f"Add or enlarge nodes with that label ({label_them}), lower data.decode_threads, or set "
                f"data.decode_node_label={DECODE_ANYWHERE} to decode on any node.")


def resolve_decode_nodes(setting: str | None, nodes: list[dict[str, Any]] | None = None) -> DecodeNodes:
    """Resolve `data.decode_node_label` against the alive nodes (`nodes`: `ray.nodes()` entries; default: ask
    the running cluster). "key=value": those nodes, however many there are (`DecodeNodes.check` fails on none);
    None (unset): DECODE_LABEL_AUTO when some alive node carries it, else any node; "any": any node.
    Never raises for missing nodes: `DecodeNodes.check` does, with the labels the cluster has."""
    alive = alive_nodes(nodes)
    auto = setting is None
    label = setting if setting != DECODE_ANYWHERE else None
    if auto:
        label = DECODE_LABEL_AUTO
        if not any(node_matches(node, _selector(label)) for node in alive):
            label = None
    selector = _selector(label)
    cluster_labels: dict[str, int] = {}
    unlabelled = 0
    cpus = gpus = other_cpus = other_gpus = largest = 0.0
    count = 0
    for node in alive:
        own = {k: v for k, v in node_labels(node).items() if not k.startswith("ray.io/")}
        for k, v in own.items():
            cluster_labels[f"{k}={v}"] = cluster_labels.get(f"{k}={v}", 0) + 1
        unlabelled += not own
        node_cpus, node_gpus = node_resources(node)
        if node_matches(node, selector):
            count += 1
            cpus, gpus, largest = cpus + node_cpus, gpus + node_gpus, max(largest, node_cpus)
        else:
            other_cpus, other_gpus = other_cpus + node_cpus, other_gpus + node_gpus
    return DecodeNodes(label=label, auto=auto and label is not None, nodes=count, cpus=cpus, largest_cpus=largest,
                       gpus=gpus, other_cpus=other_cpus, other_gpus=other_gpus, cluster_labels=cluster_labels,
                       unlabelled_nodes=unlabelled)


def decode_cpus(label_selector: dict[str, str] | None = None) -> float:
    """CPUs of the alive nodes that may run decoders (all nodes, or those carrying every selected label)."""
    return sum(node_resources(node)[0] for node in alive_nodes() if node_matches(node, label_selector))


def decode_pool_size(cfg: DataConfig) -> int:
    """Number of decoders: cfg.decode_actors, or one per decode_threads CPUs of the eligible nodes.
    An unset decode_node_label means any node here: the drivers resolve it before the workers start."""
    if cfg.decode_actors:
        return cfg.decode_actors
    selector = cfg.node_label_selector()
    if selector:
        found = resolve_decode_nodes(cfg.decode_node_label)
        found.check(1, cfg.decode_threads)
        cpus = found.cpus
    else:
        cpus = decode_cpus()
    return max(1, int(cpus // cfg.decode_threads))
