"""Scale from zero: `check_capacity` waits for the autoscaler when `scaling.wait_for_nodes_s` > 0 (asking it for
exactly the run's bundles, polling the alive nodes, clearing the request at the end) and fails at once with 0.
Everything runs on injected node snapshots, a fake clock and a recording requester; one integration test asks a
real local Ray (autoscaler v2, no node types) and gets the autoscaler's "infeasible" verdict back."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workflows.capacity import WAIT_HINT, Cluster, NodeRequest, check_capacity, infeasible_in_reply, node_request
from workflows.config_loader import ConfigError
from workflows.recipe import load_recipe

REPO = Path(__file__).parents[2]
CONFIGS = REPO / "workflows" / "configs"
K710 = CONFIGS / "k710_b16_8x16f.yaml"
FIXED_8 = "scaling.num_workers=8"
SMOKE = CONFIGS / "smoke.yaml"
CLUSTER_RECIPES = ("k710_b16_8x16f", "k710_l14_32x64f", "k400_b16_8x16f_from_k710", "ssv2_b16_8x16f_from_k710",
                   "k400_b16_8x16f", "ssv2_b16_8x16f")


def node(role: str | None, cpus: float, gpus: float = 0.0, alive: bool = True) -> dict:
    labels = {"ray.io/node-id": f"{role}-{cpus}-{gpus}"}
    if role:
        labels["dist-role"] = role
    return {"Alive": alive, "Labels": labels, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


HEAD = node("head", 0)
GPU_NODE = node("train", 96, 8)
DECODE_NODE = node("decode", 64)
COLD = [HEAD, node("decode", 64, alive=False)]  # a fresh cluster: the head only (and a decode node long gone)
WARM = [HEAD, GPU_NODE, DECODE_NODE]


class Fake:
    """A cluster whose node snapshots follow a script (one per `nodes()` call; the last one repeats), with a fake
    clock that only `sleep` advances, a recording requester and a scripted infeasible verdict."""

    def __init__(self, snapshots: list[list[dict]], infeasible: bool | None = None, started_here: bool = False,
                 request_error: Exception | None = None) -> None:
        self.snapshots, self.calls, self.now = snapshots, 0, 0.0
        self.requests: list[NodeRequest] = []
        self.sleeps: list[float] = []
        self.verdict, self.here, self.request_error = infeasible, started_here, request_error

    def nodes(self) -> list[dict]:
        snapshot = self.snapshots[min(self.calls, len(self.snapshots) - 1)]
        self.calls += 1
        return snapshot

    def request(self, request: NodeRequest) -> None:
        self.requests.append(request)
        if self.request_error and request.bundles:
            raise self.request_error

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def cluster(self) -> Cluster:
        return Cluster(nodes=self.nodes, request=self.request, infeasible=lambda _: self.verdict,
                       started_here=lambda: self.here, clock=lambda: self.now, sleep=self.sleep)


def k710(wait: float | None = None) -> object:
    """The K710 recipe at a fixed 8 workers (it ships elastic, [4, 8]: see the elastic test below)."""
    overrides = [FIXED_8] if wait is None else [FIXED_8, f"scaling.wait_for_nodes_s={wait}"]
    return load_recipe(K710, overrides, check_files=False)


def test_an_elastic_run_asks_for_its_most_workers_and_starts_with_its_fewest() -> None:
    recipe = load_recipe(K710, check_files=False)  # scaling.num_workers: [4, 8]
    assert node_request(recipe, "dist-role=decode") == K710_REQUEST
    half = node("train", 48, 4)  # 4 GPUs: enough for the minimum
    check_capacity(recipe, "[pretrain]", Fake([[HEAD, half, DECODE_NODE]]).cluster())
    with pytest.raises(ConfigError, match="scaling asks for 4 workers"):
        check_capacity(recipe, "[pretrain]", Fake([[HEAD, node("train", 48, 3), DECODE_NODE]]).cluster())


def test_custom_worker_resources_are_counted_and_asked_for() -> None:
    """scaling.worker_resources (e.g. a `train_slot` the training nodes offer) are part of each worker's bundle:
    the autoscaler is asked for them and only nodes offering them count for the workers."""
    recipe = load_recipe(SMOKE, ["scaling.num_workers=[2, 3]", "scaling.worker_resources={train_slot: 1}"],
                         check_files=False)
    assert node_request(recipe, None).bundles[:3] == [{"CPU": 1.0, "train_slot": 1.0}] * 3
    slotted = {**node(None, 4), "Resources": {"CPU": 4.0, "train_slot": 1.0}}
    plain = node(None, 8)
    check_capacity(recipe, "[pretrain]", Fake([[slotted, dict(slotted, Labels={"ray.io/node-id": "b"}), plain]])
                   .cluster())
    with pytest.raises(ConfigError, match=r"workers of 1 CPUs and 1 train_slot each.*hold only 1 of them.*"
                                          r"must offer train_slot"):
        check_capacity(recipe, "[pretrain]", Fake([[slotted, plain]]).cluster())


# The K710 recipe pins its workers to dist-role=train (scaling.worker_node_label): on a cold cluster that is what is
# missing first.
NO_TRAIN_NODES = "scaling.worker_node_label 'dist-role=train': no alive Ray node carries it"
K710_REQUEST = NodeRequest(bundles=[{"CPU": 4.0, "GPU": 1.0}] * 8 + [{"CPU": 1.0}] * 8,
                           selectors=[{"dist-role": "train"}] * 8 + [{"dist-role": "decode"}] * 8)


def test_the_key_defaults_to_no_wait_and_the_cluster_recipes_wait() -> None:
    assert load_recipe(SMOKE, check_files=False).scaling.wait_for_nodes_s == 0
    for name in CLUSTER_RECIPES:
        assert load_recipe(CONFIGS / f"{name}.yaml", check_files=False).scaling.wait_for_nodes_s >= 300, name
    assert load_recipe(SMOKE, ["scaling.wait_for_nodes_s=45"], check_files=False).scaling.wait_for_nodes_s == 45.0
    with pytest.raises(ConfigError, match="wait_for_nodes_s must be >= 0"):
        load_recipe(SMOKE, ["scaling.wait_for_nodes_s=-1"], check_files=False)


def test_the_request_is_exactly_what_the_run_needs() -> None:
    assert node_request(k710(), "dist-role=decode") == K710_REQUEST
    assert K710_REQUEST.describe() == "8 x {CPU: 4, GPU: 1} on dist-role=train + 8 x {CPU: 1} on dist-role=decode"
    smoke = load_recipe(SMOKE, check_files=False)  # 2 CPU workers, no worker label; no decode label: one actor
    assert node_request(smoke, None) == NodeRequest([{"CPU": 1.0}] * 3, [{}] * 3)
    assert node_request(smoke, None).describe() == "3 x {CPU: 1} on any node"
    assert NodeRequest().describe() == "nothing"


def test_nodes_that_come_up_after_some_polls_are_waited_for(capsys) -> None:
    fake = Fake([COLD] * 11 + [WARM])  # the check's own snapshot, then 10 polls short, the 11th has the nodes
    resolved = check_capacity(k710(), "[pretrain]", fake.cluster())
    assert resolved.data.decode_node_label == "dist-role=decode"
    assert fake.now == 55.0 and set(fake.sleeps) == {5.0}
    # Asked at once and again at every short poll (another caller may replace the request), then cleared.
    assert fake.requests[:-1] == [K710_REQUEST] * 11 and fake.requests[-1] == NodeRequest()
    out = capsys.readouterr().out.splitlines()
    assert "asked the autoscaler for 8 x {CPU: 4, GPU: 1} on dist-role=train + 8 x {CPU: 1} on dist-role=decode; " \
           "waiting up to 900 s" in out[0] and "0/8 GPUs" in out[0] and "0/8 CPUs labelled dist-role=decode" in out[0]
    progress = [line for line in out if "still waiting" in line]
    assert len(progress) == 1 and "after 30 of 900 s" in progress[0]  # at most one line per 30 s
    assert "the nodes are up after 55 s" in out[-2] and "8/8 GPUs" in out[-2]
    assert "decoders run on the 1 alive node(s) labelled dist-role=decode" in out[-1]


def test_nodes_that_never_come_time_out_with_the_checks_message(capsys) -> None:
    fake = Fake([COLD])
    with pytest.raises(ConfigError) as info:
        check_capacity(k710(wait=62), "[pretrain]", fake.cluster())
    message = str(info.value)
    assert message.startswith(NO_TRAIN_NODES)
    assert "waited 62 s (scaling.wait_for_nodes_s=62) for the autoscaler to add 8 x {CPU: 4, GPU: 1}" in message
    assert "set scaling.wait_for_nodes_s=0 there to fail at once" in message
    assert fake.now == 62.0 and fake.sleeps[-1] == 2.0  # the last poll lands on the deadline
    assert fake.requests[-1] == NodeRequest() and fake.requests.count(K710_REQUEST) == len(fake.requests) - 1
    assert sum("still waiting" in line for line in capsys.readouterr().out.splitlines()) == 2  # at 30 s and 60 s


def test_the_decode_nodes_can_come_later_than_the_gpus() -> None:
    fake = Fake([[HEAD, GPU_NODE]] * 3 + [WARM])
    check_capacity(k710(), "[pretrain]", fake.cluster())
    assert fake.now == 15.0 and fake.requests[0] == K710_REQUEST and fake.requests[-1] == NodeRequest()
    fake = Fake([[HEAD, GPU_NODE]])
    with pytest.raises(ConfigError, match=r"'dist-role=decode' \(set in data.decode_node_label\): no alive Ray node "
                                          r"carries it.*; waited 20 s"):
        check_capacity(k710(wait=20), "[pretrain]", fake.cluster())


def test_zero_fails_at_once_and_enough_nodes_never_wait() -> None:
    fake = Fake([COLD])
    with pytest.raises(ConfigError) as info:
        check_capacity(k710(wait=0), "[pretrain]", fake.cluster())
    assert NO_TRAIN_NODES in str(info.value) and WAIT_HINT in str(info.value)
    assert fake.requests == [] and fake.sleeps == [] and fake.calls == 1
    fake = Fake([WARM])
    assert check_capacity(k710(), "[pretrain]", fake.cluster()).data.decode_node_label == "dist-role=decode"
    assert fake.requests == [] and fake.sleeps == []


def test_an_infeasible_request_fails_without_waiting_out_the_time() -> None:
    fake = Fake([COLD], infeasible=True)
    with pytest.raises(ConfigError) as info:
        check_capacity(k710(), "[pretrain]", fake.cluster())
    message = str(info.value)
    assert message.startswith(NO_TRAIN_NODES)
    assert "the Ray autoscaler reports that no node type of this cluster can provide 8 x {CPU: 4, GPU: 1}" in message
    assert message.endswith("waited 10 s")  # two polls in a row, not 900 s
    assert fake.requests[-1] == NodeRequest()


def test_a_cluster_this_driver_started_is_not_waited_for() -> None:
    fake = Fake([COLD], started_here=True)
    with pytest.raises(ConfigError, match="no alive Ray node carries it.*Not waiting for nodes.*this driver started "
                                          "Ray itself"):
        check_capacity(k710(), "[pretrain]", fake.cluster())
    assert fake.requests == [] and fake.sleeps == []


def test_a_failing_request_is_reported_once_and_the_wait_goes_on(capsys) -> None:
    fake = Fake([COLD] * 4 + [WARM], request_error=RuntimeError("no GCS"))
    check_capacity(k710(), "[pretrain]", fake.cluster())
    out = capsys.readouterr().out
    assert out.count("could not ask the autoscaler for nodes (RuntimeError: no GCS)") == 1
    assert fake.requests[-1] != NodeRequest()  # nothing was ever sent, so nothing to clear


def test_only_the_nodes_the_worker_label_selects_count() -> None:
    """K710 pins its 8 workers (4 CPUs + 1 GPU each) to dist-role=train. GPUs on nodes without that label do not
    count: the run would wait forever for its placement group. The message names the label, what the nodes carry,
    and how to fix it."""
    unlabelled = node(None, 96, 8)  # GPUs enough, but not labelled for training
    for nodes, seen in (([HEAD, unlabelled, DECODE_NODE], "dist-role=head (1 node), no label (1 node)"),
                        ([HEAD, node("gpu", 96, 8), DECODE_NODE], "dist-role=gpu (1 node), dist-role=head (1 node)")):
        with pytest.raises(ConfigError) as info:
            check_capacity(k710(wait=0), "[pretrain]", Fake([nodes]).cluster())
        message = str(info.value)
        assert message.startswith(NO_TRAIN_NODES), message
        assert f"the alive nodes carry: dist-role=decode (1 node), {seen}." in message
        assert "`ray start --labels=dist-role=train`" in message and "`labels: {dist-role: train}`" in message
        assert "unset scaling.worker_node_label" in message


@pytest.mark.parametrize("train_nodes, message", [
    ([node("train", 96, 4)], r"8 workers x 1 GPU on the nodes labelled dist-role=train "
                             r"\(scaling.worker_node_label\), but the 1 alive node\(s\) carrying it have 4 GPUs"),
    ([node("train", 16, 8)], r"8 workers x 4 CPUs on the nodes labelled dist-role=train .* have 16 CPUs"),
    # 8 GPUs and 36 CPUs in all, but a 7-CPU node holds one 4-CPU worker and the GPU-less one none: 4 in all
    ([node("train", 7, 2)] * 4 + [node("train", 8, 0)],
     r"8 workers of 4 CPUs and 1 GPU each, but a worker cannot span nodes and the 5 alive node\(s\) labelled "
     r"dist-role=train hold only 4 of them"),
    ([node("train", 3, 2)] * 4 + [node("train", 20, 0)],
     r"a worker cannot span nodes and the 5 alive node\(s\) labelled dist-role=train hold only 0 of them"),
])
def test_labelled_worker_nodes_that_are_too_small_fail(train_nodes, message) -> None:
    fake = Fake([[HEAD, *train_nodes, DECODE_NODE, node(None, 96, 8)]])  # the unlabelled GPU node does not help
    with pytest.raises(ConfigError, match=message) as info:
        check_capacity(k710(wait=0), "[pretrain]", fake.cluster())
    assert "`ray start --labels=dist-role=train`" in str(info.value)
    assert "unset scaling.worker_node_label" in str(info.value)


def test_enough_labelled_worker_nodes_pass_and_the_decode_nodes_stay_separate(capsys) -> None:
    two = [node("train", 48, 4), {**node("train", 48, 4), "Labels": {"dist-role": "train", "ray.io/node-id": "b"}}]
    resolved = check_capacity(k710(wait=0), "[pretrain]", Fake([[HEAD, *two, DECODE_NODE]]).cluster())
    assert resolved.data.decode_node_label == "dist-role=decode"
    assert "decoders run on the 1 alive node(s) labelled dist-role=decode" in capsys.readouterr().out
    # Without the decode nodes the training nodes' spare CPUs do not count for the decode label...
    with pytest.raises(ConfigError, match="'dist-role=decode' .*no alive Ray node carries it"):
        check_capacity(k710(wait=0), "[pretrain]", Fake([[HEAD, *two]]).cluster())
    # ...and with the label unset the workers may use any node again.
    anywhere = load_recipe(K710, [FIXED_8, "scaling.worker_node_label=null"], check_files=False)
    check_capacity(anywhere, "[pretrain]", Fake([[HEAD, node(None, 96, 8), DECODE_NODE]]).cluster())


def test_workers_and_decoders_on_one_label_share_its_cpus() -> None:
    """Workers and decoders both on dist-role=train: 8 x 4 worker CPUs + 8 x 1 decode CPUs = 40 > 36."""
    recipe = load_recipe(K710, [FIXED_8, "data.decode_node_label=dist-role=train"], check_files=False)
    with pytest.raises(ConfigError, match="the nodes labelled dist-role=train or dist-role=train have 36 CPUs; the 8 "
                                          "training workers take 32, leaving 4 for video decoding \\(needs 8\\)"):
        check_capacity(recipe, "[pretrain]", Fake([[HEAD, node("train", 36, 8), node("x", 64)]]).cluster())
    check_capacity(recipe, "[pretrain]", Fake([[HEAD, node("train", 40, 8), node("x", 64)]]).cluster())


def test_waiting_for_labelled_worker_nodes_asks_for_them_by_label(capsys) -> None:
    """Unlabelled GPU nodes are up, the labelled ones are not: the driver waits (it used to start at once and hang),
    asking the autoscaler for the worker bundles with the dist-role=train selector, until they come."""
    unlabelled = [HEAD, node(None, 96, 8), DECODE_NODE]
    fake = Fake([unlabelled] * 3 + [[*unlabelled, GPU_NODE]])
    check_capacity(k710(), "[pretrain]", fake.cluster())
    assert fake.requests[:-1] == [K710_REQUEST] * 3 and fake.requests[-1] == NodeRequest()
    assert all(s == {"dist-role": "train"} for s in K710_REQUEST.selectors[:8])
    out = capsys.readouterr().out
    assert "0/8 GPUs labelled dist-role=train, 0/32 worker CPUs labelled dist-role=train" in out
    assert "the nodes are up after 15 s" in out


def test_an_unlabelled_gpu_run_still_counts_every_node() -> None:
    smoke = load_recipe(SMOKE, ["scaling.use_gpu=true"], check_files=False)
    with pytest.raises(ConfigError, match="scaling asks for 2 workers x 1 GPU but the cluster has 1 GPUs on its alive "
                                          "nodes"):
        check_capacity(smoke, "[pretrain]", Fake([[node(None, 8, 1)]]).cluster())
    check_capacity(smoke, "[pretrain]", Fake([[node(None, 8, 1), node("other", 8, 1)]]).cluster())


def test_infeasible_constraints_are_read_from_the_autoscaler_reply() -> None:
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    reply = GetClusterStatusReply()
    constraint = reply.autoscaling_state.infeasible_cluster_resource_constraints.add()
    for bundle, count in (({"CPU": 4.0, "GPU": 1.0}, 8), ({"CPU": 1.0}, 8)):
        by_count = constraint.resource_requests.add()
        by_count.request.resources_bundle.update(bundle)
        by_count.count = count
    assert infeasible_in_reply(reply, K710_REQUEST.bundles)
    assert not infeasible_in_reply(reply, K710_REQUEST.bundles[:-1])  # another request's shape: not ours
    assert not infeasible_in_reply(GetClusterStatusReply(), K710_REQUEST.bundles)
    assert not infeasible_in_reply(reply, [])


@pytest.mark.integration
def test_a_real_autoscaler_reports_an_impossible_request() -> None:
    """A real local Ray with autoscaler v2 and no node types to add: the request goes out, the autoscaler calls it
    infeasible, the driver stops long before the wait is over and clears the request. Its own process: a second
    Ray cluster, never the session's."""
    script = textwrap.dedent(f"""
        import os
        os.environ["RAY_enable_autoscaler_v2"] = "1"
        import ray
        from ray._raylet import GcsClient
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply
        from workflows.capacity import Cluster, check_capacity
        from workflows.config_loader import ConfigError
        from workflows.recipe import load_recipe

        ray.init(address="local", num_cpus=2, include_dashboard=False)
        recipe = load_recipe({str(SMOKE)!r}, ["scaling.use_gpu=true", "scaling.wait_for_nodes_s=120"],
                             check_files=False)
        try:
            check_capacity(recipe, "[test]", Cluster(poll_s=1.0))
        except ConfigError as exc:
            print("ERROR", exc)
        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=10))
        left = [r for c in reply.cluster_resource_state.cluster_resource_constraints for r in c.resource_requests]
        print("LEFT", len(left))
        ray.shutdown()
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    assert "asked the autoscaler for 2 x {CPU: 1, GPU: 1} on any node + 1 x {CPU: 1} on any node" in out, out
    error = next(line for line in out.splitlines() if line.startswith("ERROR"))
    # The infeasible branch, not the wait's timeout (which says "for the autoscaler to add"): it stopped early.
    assert "the cluster has 0 GPUs" in error and "the Ray autoscaler reports that no node type" in error, error
    assert "for the autoscaler to add" not in error, error
    assert "LEFT 0" in out, out  # the constraint is cleared in GCS at once


def test_pretrain_and_tune_use_the_one_check() -> None:
    import workflows.pretrain
    import workflows.tune.driver  # noqa: F401 - imports check_capacity from workflows.capacity inside run_sweep

    assert workflows.pretrain.check_capacity is check_capacity
    source = (REPO / "workflows" / "tune" / "driver.py").read_text()
    assert "from workflows.capacity import check_capacity" in source
