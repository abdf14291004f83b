"""Scale from zero: `check_capacity` waits for the autoscaler when `scaling.wait_for_nodes_s` > 0 (asking it for
exactly the run's bundles, polling the alive nodes, clearing the request at the end) and fails at once with 0.
Everything runs on injected node snapshots, a fake clock and a recording requester; one integration test asks a
real local Ray (autoscaler v2, no node types) and gets the autoscaler's "infeasible" verdict back."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from workflows.capacity import WAIT_HINT, Cluster, NodeRequest, check_capacity, infeasible_in_reply, node_request
from workflows.config_loader import ConfigError
from workflows.recipe import load_recipe

REPO = Path(__file__).parents[2]
CONFIGS = REPO / "workflows" / "configs"
K710 = CONFIGS / "k710_b16_8x16f.yaml"
SMOKE = CONFIGS / "smoke.yaml"
CLUSTER_RECIPES = ("k710_b16_8x16f", "k710_l14_32x64f", "k400_b16_8x16f_from_k710", "ssv2_b16_8x16f_from_k710")


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
    overrides = [] if wait is None else [f"scaling.wait_for_nodes_s={wait}"]
    return load_recipe(K710, overrides, check_files=False)


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
    assert "decode actors run on the 1 alive node(s) labelled dist-role=decode" in out[-1]


def test_nodes_that_never_come_time_out_with_the_checks_message(capsys) -> None:
    fake = Fake([COLD])
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        check_capacity(k710(wait=62), "[pretrain]", fake.cluster())
    assert time.monotonic() - started < 2  # the fake clock, not real time
    message = str(info.value)
    assert message.startswith("scaling asks for 8 workers x 1 GPU but the cluster has 0 GPUs on its alive nodes")
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
    assert "the cluster has 0 GPUs" in str(info.value) and WAIT_HINT in str(info.value)
    assert fake.requests == [] and fake.sleeps == [] and fake.calls == 1
    fake = Fake([WARM])
    assert check_capacity(k710(), "[pretrain]", fake.cluster()).data.decode_node_label == "dist-role=decode"
    assert fake.requests == [] and fake.sleeps == []


def test_an_infeasible_request_fails_without_waiting_out_the_time() -> None:
    fake = Fake([COLD], infeasible=True)
    with pytest.raises(ConfigError) as info:
        check_capacity(k710(), "[pretrain]", fake.cluster())
    message = str(info.value)
    assert message.startswith("scaling asks for 8 workers x 1 GPU but the cluster has 0 GPUs")
    assert "the Ray autoscaler reports that no node type of this cluster can provide 8 x {CPU: 4, GPU: 1}" in message
    assert message.endswith("waited 10 s")  # two polls in a row, not 900 s
    assert fake.requests[-1] == NodeRequest()


def test_a_cluster_this_driver_started_is_not_waited_for() -> None:
    fake = Fake([COLD], started_here=True)
    with pytest.raises(ConfigError, match="0 GPUs.*Not waiting for nodes.*this driver started Ray itself"):
        check_capacity(k710(), "[pretrain]", fake.cluster())
    assert fake.requests == [] and fake.sleeps == []


def test_a_failing_request_is_reported_once_and_the_wait_goes_on(capsys) -> None:
    fake = Fake([COLD] * 4 + [WARM], request_error=RuntimeError("no GCS"))
    check_capacity(k710(), "[pretrain]", fake.cluster())
    out = capsys.readouterr().out
    assert out.count("could not ask the autoscaler for nodes (RuntimeError: no GCS)") == 1
    assert fake.requests[-1] != NodeRequest()  # nothing was ever sent, so nothing to clear


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
        import os, time
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
        start = time.monotonic()
        try:
            check_capacity(recipe, "[test]", Cluster(poll_s=1.0))
        except ConfigError as exc:
            print("ERROR", exc)
        print("SECONDS", time.monotonic() - start)
        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=10))
        left = [r for c in reply.cluster_resource_state.cluster_resource_constraints for r in c.resource_requests]
        print("LEFT", len(left))
        ray.shutdown()
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180)
    print(done.stdout)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    assert "asked the autoscaler for 2 x {CPU: 1, GPU: 1} on any node + 1 x {CPU: 1} on any node" in out, out
    error = next(line for line in out.splitlines() if line.startswith("ERROR"))
    assert "the cluster has 0 GPUs" in error and "the Ray autoscaler reports that no node type" in error, error
    assert float(out.split("SECONDS")[1].split()[0]) < 60, out
    assert "LEFT 0" in out, out  # the constraint is cleared in GCS at once


def test_pretrain_and_tune_use_the_one_check() -> None:
    import workflows.pretrain
    import workflows.tune  # noqa: F401 - imports check_capacity from workflows.capacity inside run_sweep

    assert workflows.pretrain.check_capacity is check_capacity
    source = (REPO / "workflows" / "tune.py").read_text()
    assert "from workflows.capacity import check_capacity" in source
