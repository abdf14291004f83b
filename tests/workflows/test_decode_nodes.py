"""Where the decoders run: resolving `data.decode_node_label` against the alive nodes (unset: the
dist-role=decode nodes when there are any; "any": anywhere; a label: those nodes or a fail-fast error), on
`ray.nodes()`-shaped dicts, through the drivers' `check_capacity`, and once against a real local Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from workflows.config_loader import ConfigError, from_dict
from workflows.data.data_config import DECODE_ANYWHERE, DECODE_LABEL_AUTO, DataConfig
from workflows.data.decode_nodes import DecodeNodesError, resolve_decode_nodes

SMOKE = Path(__file__).parents[2] / "workflows" / "configs" / "smoke.yaml"


def node(role: str | None, cpus: float, gpus: float = 0.0, alive: bool = True) -> dict:
    """A `ray.nodes()` entry: Ray's own ray.io/node-id label plus dist-role=<role> when given."""
    labels = {"ray.io/node-id": f"{role}-{cpus}-{gpus}"}
    if role:
        labels["dist-role"] = role
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return {"Alive": alive, "Labels": labels, "Resources": resources}


# head (no CPUs), one 8-GPU train node, two decode nodes, a dead decode node and an unlabelled CPU node
CLUSTER = [node("head", 0), node("train", 96, 8), node("decode", 64), node("decode", 32),
           node("decode", 64, alive=False), node(None, 16)]
NO_DECODE = [node("head", 0), node("train", 96, 8)]


def test_config_accepts_a_label_any_or_unset_and_rejects_the_rest() -> None:
    assert DataConfig().node_label_selector() is None
    assert DataConfig(decode_node_label=DECODE_ANYWHERE).node_label_selector() is None
    assert DataConfig(decode_node_label="dist-role=decode").node_label_selector() == {"dist-role": "decode"}
    for bad in ("none", "anywhere", "dist-role", "=decode", "a=b=c", "a=b,c=d"):
        with pytest.raises(ConfigError, match="'any' .*or null"):
            from_dict(DataConfig, {"decode_node_label": bad})


def test_unset_label_finds_the_decode_nodes() -> None:
    found = resolve_decode_nodes(None, CLUSTER)
    assert (found.label, found.auto, found.setting) == (DECODE_LABEL_AUTO, True, DECODE_LABEL_AUTO)
    assert (found.nodes, found.cpus, found.largest_cpus) == (2, 96.0, 64.0)  # the dead node is not counted
    assert (found.other_cpus, found.other_gpus) == (112.0, 8.0)
    assert "found automatically" in found.describe() and "decode_node_label=any" in found.describe()
    found.check(actors=8, threads=1)  # 8 workers x 1 CPU fit on 96 CPUs
    # Without decode nodes an unset label means any node, and the workers get "any".
    anywhere = resolve_decode_nodes(None, NO_DECODE)
    assert (anywhere.label, anywhere.auto, anywhere.setting) == (None, False, DECODE_ANYWHERE)
    assert (anywhere.cpus, anywhere.gpus, anywhere.nodes) == (96.0, 8.0, 2)


def test_any_opts_out_of_the_decode_nodes() -> None:
    found = resolve_decode_nodes(DECODE_ANYWHERE, CLUSTER)
    assert (found.label, found.auto, found.setting) == (None, False, DECODE_ANYWHERE)
    assert (found.nodes, found.cpus, found.other_cpus) == (5, 208.0, 0.0)
    found.check(actors=1000, threads=4)  # no label: nothing to check here (the cluster-wide check covers it)


def test_a_missing_label_fails_fast_naming_the_labels_there_are() -> None:
    found = resolve_decode_nodes("dist-role=decode", NO_DECODE)
    assert (found.label, found.auto, found.nodes) == ("dist-role=decode", False, 0)
    with pytest.raises(DecodeNodesError) as info:
        found.check(actors=1, threads=1)
    message = str(info.value)
    for part in ("'dist-role=decode'", "no alive Ray node carries it", "dist-role=head (1 node)",
                 "dist-role=train (1 node)", "ray start --labels=dist-role=decode", "cluster YAML",
                 "decode_node_label=any", "or unset data.decode_node_label"):
        assert part in message, (part, message)
    assert "ray.io/node-id" not in message  # Ray's own per-node labels are noise here


def test_too_few_labelled_cpus_fail_fast() -> None:
    found = resolve_decode_nodes("dist-role=decode", CLUSTER)
    found.check(actors=96, threads=1)
    with pytest.raises(DecodeNodesError, match=r"have 96 CPUs \(largest 64\), but the decoders need 128"):
        found.check(actors=64, threads=2)
    with pytest.raises(DecodeNodesError, match="need 128"):  # one 128-thread actor fits on no single node
        found.check(actors=1, threads=128)


def _fake_cluster(monkeypatch, nodes: list[dict]) -> None:
    import ray

    alive = [n for n in nodes if n["Alive"]]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {
        "CPU": sum(n["Resources"].get("CPU", 0) for n in alive),
        "GPU": sum(n["Resources"].get("GPU", 0) for n in alive)})


def test_drivers_resolve_once_and_hand_the_label_to_the_workers(monkeypatch, capsys) -> None:
    from workflows.pretrain import check_capacity
    from workflows.recipe import load_recipe
    from workflows.tune.driver import cluster_capacity, trial_resources

    recipe = load_recipe(SMOKE, check_files=False)
    assert recipe.data.decode_node_label is None
    _fake_cluster(monkeypatch, CLUSTER)
    resolved = check_capacity(recipe)
    assert resolved.data.decode_node_label == DECODE_LABEL_AUTO  # what build_trainer puts in the workers' recipe
    assert capsys.readouterr().out.count("found automatically") == 1
    assert cluster_capacity(resolved.data.decode_node_label) == {"CPU": 112.0, "GPU": 8.0, "decode_CPU": 96.0}
    assert "decode_CPU" in trial_resources(resolved)
    opted_out = check_capacity(load_recipe(SMOKE, ["data.decode_node_label=any"], check_files=False))
    assert opted_out.data.decode_node_label == DECODE_ANYWHERE and "found automatically" not in capsys.readouterr().out
    assert "decode_CPU" not in trial_resources(opted_out)
    assert cluster_capacity(DECODE_ANYWHERE) == {"CPU": 208.0, "GPU": 8.0}
    _fake_cluster(monkeypatch, NO_DECODE)
    with pytest.raises(ConfigError, match="'dist-role=decode'.*no alive Ray node carries it.*dist-role=train"):
        check_capacity(load_recipe(SMOKE, ["data.decode_node_label=dist-role=decode"], check_files=False))
    assert check_capacity(recipe).data.decode_node_label == DECODE_ANYWHERE


@pytest.mark.integration
def test_resolution_on_a_real_cluster(ray_local) -> None:
    """The real `ray.nodes()`: the local cluster carries no dist-role label, only Ray's own ray.io/node-id."""
    from workflows.pretrain import check_capacity
    from workflows.recipe import load_recipe

    node_id = ray_local.get_runtime_context().get_node_id()
    cpus = ray_local.cluster_resources()["CPU"]
    unset = resolve_decode_nodes(None)
    assert (unset.label, unset.setting, unset.cpus) == (None, DECODE_ANYWHERE, cpus)
    assert check_capacity(load_recipe(SMOKE, check_files=False)).data.decode_node_label == DECODE_ANYWHERE
    with pytest.raises(ConfigError, match="'dist-role=decode'.*no alive Ray node carries it.*no label \\(1 node\\)"):
        check_capacity(load_recipe(SMOKE, ["data.decode_node_label=dist-role=decode"], check_files=False))
    by_id = resolve_decode_nodes(f"ray.io/node-id={node_id}")
    assert (by_id.nodes, by_id.cpus) == (1, cpus)
    by_id.check(actors=2, threads=1)
