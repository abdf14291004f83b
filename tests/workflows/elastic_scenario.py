"""An elastic pre-training run on a real multi-raylet Ray cluster, with the node events of a spot fleet, run as its
own process by test_elastic_cluster.py (a pytest process holds the session's own Ray instance).

    python tests/workflows/elastic_scenario.py OUT_DIR

A head node (driver, decoders) and two worker raylets labelled dist-role=train, one Train worker each, run
`scaling.num_workers: [1, 2]`. While training:
  1. drain: `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds 60` of one worker
     node, whose raylet is then killed (SIGKILL) 60 s later;
  2. grow: a new worker raylet is added once the run goes on at one worker;
  3. loss: once the run is back at two workers, one worker raylet is killed without notice.
OUT_DIR gets result.json (the final metrics and the events' times), the run's console log, the data audit
(train.data_audit_dir) and the run directory. Nodes are Ray's own test cluster (`ray.cluster_utils.Cluster`): real
raylet processes, killed with real signals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DRAIN_DEADLINE_S = 60  # a spot notice is 30 s (GCP) to 2 min (AWS); steps here take seconds on 2 busy cores
TRAIN = {"dist-role": "train"}
SLOT = {"train_slot": 1}  # Ray's elastic policy counts room for workers by resources, not labels


def main(out_dir: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from workflows.data.sample import write_sample_dataset
    from workflows.elastic import kv_get, kv_key
    from workflows.pretrain import run_pretrain
    from workflows.recipe import load_recipe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sample = write_sample_dataset(out / "sample", videos_per_class=3, size=48, num_frames=24, seed=1, workers=1)
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
           # steps of at least 1 s: a node added joins Ray Train's view up to 20 s later (its autoscaling
           # coordinator's tick), and 52 steps of 0.2 s ended one run before it could grow
           "DIST_TEST_MIN_STEP_S": "1"}
    os.environ.update(env)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "object_store_memory": 400_000_000})
    workers = [cluster.add_node(num_cpus=1, labels=TRAIN, resources=SLOT, object_store_memory=200_000_000)
               for _ in range(2)]
    os.environ["RAY_ADDRESS"] = cluster.address  # other Ray instances may run on this machine: never guess
    ray.init(address=cluster.address, runtime_env={"env_vars": env})  # the Train controller polls drains each second
    recipe = load_recipe(REPO / "workflows" / "configs" / "smoke.yaml", [
        f"data.train_manifest={sample.train_manifest}", f"data.val_manifest={sample.val_manifest}",
        f"data.labels={sample.labels}", f"run.storage_path={out / 'runs'}", "run.name=elastic",
        "scaling.num_workers=[1, 2]", "scaling.worker_node_label=dist-role=train", "scaling.resize_check_s=5",
        "scaling.worker_resources={train_slot: 1}",
        # 72 steps: a tiny step at one worker takes under a second and a grow 20-40 s; the grow and the loss after it
        # must land with steps to spare (at 36, one run grew at step 33 and ended before the loss leg)
        "train.global_batch_size=4", "train.micro_batch_size=1", "data.train_views=1", "train.max_steps=72",
        "train.log_every_steps=1", "eval.every_steps=1000", "run.max_failures=3", "data.decode_actors=1",
        f"train.data_audit_dir={out / 'audit'}", "mlflow.register_model=false"])
    result: dict = {"events": []}

    def train() -> None:
        try:
            res = run_pretrain(recipe)
            result["metrics"] = {k: v for k, v in (res.metrics or {}).items() if isinstance(v, (int, float, str))}
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            result["error"] = repr(exc)

    def progress() -> dict:
        return kv_get(kv_key(recipe.run_dir, "progress")) or {}

    def wait_for(what: str, ok, limit_s: float = 600) -> dict:
        give_up = time.monotonic() + limit_s
        while time.monotonic() < give_up and runner.is_alive():
            seen = progress()
            if ok(seen):
                return seen
            time.sleep(0.5)
        raise TimeoutError(f"waiting for {what}: last progress {progress()}; result {result}")

    def event(name: str, **info) -> None:
        result["events"].append({"event": name, "time": time.time(), "progress": progress(), **info})
        print(f"[scenario] {name} {info} at {progress()}", flush=True)

    runner = threading.Thread(target=train, daemon=True)
    runner.start()
    try:
        wait_for("two workers training", lambda p: p.get("world") == 2 and p.get("step", 0) >= 4)
        victim = workers.pop()
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", cluster.address,
                        "--node-id", victim.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                        "--reason-message", "spot reclaim (test)",
                        "--deadline-remaining-seconds", str(DRAIN_DEADLINE_S)], check=True)
        event("drain", node=victim.node_id, deadline_s=DRAIN_DEADLINE_S)
        time.sleep(DRAIN_DEADLINE_S)
        cluster.remove_node(victim, allow_graceful=False)
        event("drained node killed", node=victim.node_id)
        at_one = wait_for("one worker training", lambda p: p.get("world") == 1)
        wait_for("one worker stepping", lambda p: p.get("world") == 1 and p.get("step", 0) >= at_one["step"] + 2)
        workers.append(cluster.add_node(num_cpus=1, labels=TRAIN, resources=SLOT, object_store_memory=200_000_000))
        event("node added", node=workers[-1].node_id)
        at_two = wait_for("two workers again", lambda p: p.get("world") == 2)
        wait_for("two workers stepping", lambda p: p.get("world") == 2 and p.get("step", 0) >= at_two["step"] + 2)
        victim = workers.pop()
        cluster.remove_node(victim, allow_graceful=False)
        event("node lost", node=victim.node_id)
        runner.join(timeout=900)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result["error"] = result.get("error") or repr(exc)
    finally:
        (out / "result.json").write_text(json.dumps(result, indent=1))
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
