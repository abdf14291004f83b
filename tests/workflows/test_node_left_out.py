"""A node found without the shared disk during a run is left out of it, not restarted onto again and again.

Its error names it by Ray node id (`video.node_name`); the worker records it as a failure a restart cannot fix,
so the restarted group ends at once; the driver (`pretrain.fit_through_storage_outages`) then fits the run again
from its newest complete checkpoint with the node in `scaling.exclude_nodes`, which keeps the Train workers and
the decoders off it, or, when the driver's node does not see the disk either, waits for the disk. Here: the real
errors raised in Ray tasks, the driver's loop on a real local Ray (its store records) with a stand-in trainer,
and the selectors that Ray honours. A real node without the disk, lost in the middle of a real run:
tests/workflows/test_blind_node.py (`make disk-test`, root)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from workflows.config_loader import ConfigError
from workflows.recipe import load_recipe, with_absolute_paths

REPO = Path(__file__).parents[2]
SMOKE = REPO / "workflows" / "configs" / "smoke.yaml"
SOME_NODE = "ab" * 28  # a Ray node id of no node of this cluster


def _recipe(data, run_root: Path, *overrides: str):
    return with_absolute_paths(load_recipe(SMOKE, [
        f"data.train_manifest={data.train_manifest}", f"data.val_manifest={data.val_manifest}",
        f"data.labels={data.labels}", f"run.storage_path={run_root}", "mlflow.enabled=false",
        "scaling.num_workers=1", *overrides]))


class StandIn:
    """What `fit_through_storage_outages` builds and fits: each fit takes the next scripted outcome. "blind <id>"
    records what a worker on a node without the disk records (`note_failure`, a failure a restart cannot fix) and
    returns, as Ray Train does once the restarted group has ended at once; "done" returns the result."""

    def __init__(self, script: list[str]):
        self.script, self.recipes = script, []

    def __call__(self, recipe):
        self.recipes.append(recipe)
        return self

    def fit(self):
        from workflows.elastic import note_failure
        from workflows.runtime import NODE_ID_LABEL

        outcome = self.script.pop(0)
        if outcome.startswith("blind "):
            node = outcome.split()[1]
            error = OSError(f"cannot read /x.mp4: node 192.0.2.9 (Ray node id {node}) has not seen any of the "
                            f"corpus's videos there for 2 s (e.g. /y.mp4): ...")
            note_failure(self.recipes[-1].run_dir, 0, error, restartable=False, blind_node=node)
            return "ended at once"
        assert outcome == "done"
        return f"result; {NODE_ID_LABEL} kept off {self.recipes[-1].scaling.exclude_nodes}"


@pytest.mark.integration
def test_the_error_of_a_node_without_the_disk_names_it_by_id_and_is_not_restarted(ray_local, tmp_path):
    """The real errors, raised in Ray tasks as a Train worker's first check and a decoder raise them."""
    import ray

    from workflows.data.shared_disk import blind_node, check_run_dir_seen
    from workflows.data.video import StorageUnreachable, wait_for_local_disk
    from workflows.runtime import root_cause
    from workflows.trainer import restart_cannot_fix

    here = ray.get_runtime_context().get_node_id()
    unmarked = tmp_path / "runs" / "it"  # no marker: the run was started where this node does not look
    unmarked.mkdir(parents=True)
    for task, args in ((check_run_dir_seen, (str(unmarked), 0.2)),
                       (wait_for_local_disk, (str(tmp_path / "v.mp4"), [str(tmp_path / "w.mp4")], 0.2))):
        with pytest.raises(ray.exceptions.RayTaskError) as info:
            ray.get(ray.remote(num_cpus=0)(task).remote(*args))
        cause = root_cause(info.value)
        assert cause.startswith("StorageUnreachable: ") and f"(Ray node id {here})" in cause, cause
        assert blind_node(cause) == here and restart_cannot_fix(info.value)
    bucket = StorageUnreachable("cannot read s3://b/v.mp4: the storage did not answer for 120 s")
    assert blind_node(root_cause(bucket)) is None and not restart_cannot_fix(bucket)  # a bucket's outage restarts


@pytest.mark.integration
def test_the_driver_leaves_the_node_out_and_fits_the_run_again(ray_local, sample_data, tmp_path, capsys):
    from workflows.elastic import blind_node_failure, kv_get, kv_key, take_failure, unrestartable_failure
    from workflows.pretrain import fit_through_storage_outages

    recipe = _recipe(sample_data, tmp_path / "runs")
    trainer = StandIn([f"blind {SOME_NODE}", "done"])
    assert fit_through_storage_outages(trainer, recipe) == f"result; ray.io/node-id kept off {[SOME_NODE]}"
    assert [r.scaling.exclude_nodes for r in trainer.recipes] == [[], [SOME_NODE]]
    out = capsys.readouterr().out
    assert (f"node ? (Ray node id {SOME_NODE}) does not see the shared disk, which this node sees (its decoders or "
            f"Train worker waited data.storage_retry_s for it): leaving it out of this run (scaling.exclude_nodes) and "
            f"resuming from the newest complete checkpoint on the other nodes (relaunch 1 of 1, run.max_failures)"
            ) in out, out
    # the restarted group's line says why, and no record is left to end the next group
    assert kv_get(kv_key(recipe.run_dir, "event")) == {
        "reason": f"node ? (Ray node id {SOME_NODE}) left out: it does not see the shared disk"}
    assert unrestartable_failure(recipe.run_dir) is None and blind_node_failure(recipe.run_dir) is None
    assert take_failure(recipe.run_dir) is None


@pytest.mark.integration
def test_with_its_relaunches_spent_the_run_ends_naming_the_node(ray_local, sample_data, tmp_path):
    from workflows.elastic import RunNotRestarted, raise_if_not_restarted
    from workflows.pretrain import fit_through_storage_outages

    recipe = _recipe(sample_data, tmp_path / "runs", "run.max_failures=0")
    trainer = StandIn([f"blind {SOME_NODE}"])
    assert fit_through_storage_outages(trainer, recipe) == "ended at once"
    with pytest.raises(RunNotRestarted, match=rf"\(Ray node id {SOME_NODE}\) has not seen any"):
        raise_if_not_restarted(recipe.run_dir)


@pytest.mark.integration
def test_a_node_that_sees_the_disk_again_is_kept(ray_local, sample_data, tmp_path, capsys):
    """The node named, this one, sees the disk when asked after the failure (its mount was lost for a while, longer
    than data.storage_retry_s): the run goes on on the same nodes."""
    import ray

    from workflows.elastic import kv_get, kv_key
    from workflows.pretrain import fit_through_storage_outages

    here = ray.get_runtime_context().get_node_id()
    recipe = _recipe(sample_data, tmp_path / "runs")
    trainer = StandIn([f"blind {here}", "done"])
    assert fit_through_storage_outages(trainer, recipe) == "result; ray.io/node-id kept off []"
    assert (f"(Ray node id {here}) lost the shared disk for longer than data.storage_retry_s, and sees it again: "
            f"resuming the run from its newest complete checkpoint") in capsys.readouterr().out
    assert kv_get(kv_key(recipe.run_dir, "event"))["reason"].endswith("lost the shared disk for a while")


@pytest.mark.integration
def test_without_the_node_a_cluster_too_small_ends_the_run_at_once(ray_local, sample_data, tmp_path, monkeypatch):
    """Left out, the only node there is (made to answer that it does not see the disk): the cluster cannot hold
    the worker, said before any fit."""
    import ray

    from workflows.data import shared_disk
    from workflows.elastic import RunNotRestarted
    from workflows.pretrain import fit_through_storage_outages

    here = ray.get_runtime_context().get_node_id()
    monkeypatch.setattr(shared_disk, "nodes_that_see", lambda paths, nodes, timeout_s=60.0: set())
    recipe = _recipe(sample_data, tmp_path / "runs")
    trainer = StandIn([f"blind {here}", "done"])
    with pytest.raises(RunNotRestarted, match=rf"without node \S+ \(Ray node id {here}\), which does not see the "
                                              r"shared disk: .*cluster"):
        fit_through_storage_outages(trainer, recipe)
    assert len(trainer.recipes) == 1


@pytest.mark.integration
def test_when_the_driver_does_not_see_the_disk_either_it_waits_for_it(ray_local, sample_data, tmp_path, capsys):
    """The disk itself went away (every node lost it): no node is left out; the run is fitted again once the
    driver's node sees the disk, here 2 s after the failure."""
    from workflows.data.sample import write_sample_dataset
    from workflows.elastic import kv_get, kv_key
    from workflows.pretrain import fit_through_storage_outages

    data = write_sample_dataset(tmp_path / "mnt", videos_per_class=2, size=32, num_frames=16, seed=3, workers=1)
    recipe = _recipe(data, tmp_path / "runs")
    videos = Path(data.train_manifest).parent / "videos"

    class Away(StandIn):
        def fit(self):
            result = super().fit()
            if result == "ended at once":  # the disk goes now, and is back 2 s later
                videos.rename(videos.with_name("away"))
                threading.Thread(target=lambda: (time.sleep(2), videos.with_name("away").rename(videos)),
                                 daemon=True).start()
            return result

    trainer = Away([f"blind {SOME_NODE}", "done"])
    started = time.monotonic()
    assert fit_through_storage_outages(trainer, recipe, wait_s=60) == "result; ray.io/node-id kept off []"
    assert time.monotonic() - started >= 1.5
    out = capsys.readouterr().out
    assert "either: the shared disk went away. Waiting up to 60 s for it, then resuming the run from its newest " \
           "complete checkpoint (relaunch 1 of 1, run.max_failures)" in out, out
    assert "[pretrain] the shared disk is back after " in out, out
    assert kv_get(kv_key(recipe.run_dir, "event")) == {"reason": "the shared disk went away and came back"}
    shutil.rmtree(tmp_path / "mnt")


def test_scaling_exclude_nodes_keeps_the_workers_the_decoders_and_the_capacity_check_off_them(tmp_path):
    from workflows.capacity import Cluster, check_capacity
    from workflows.pretrain import build_trainer
    from workflows.relaunch import NOT_COMPARED
    from workflows.runtime import avoiding

    with pytest.raises(ConfigError, match=r"scaling.exclude_nodes takes Ray node ids \(56 hex digits"):
        load_recipe(SMOKE, ["scaling.exclude_nodes=[10.0.0.5]"], check_files=False)
    other = "cd" * 28
    recipe = load_recipe(SMOKE, [f"scaling.exclude_nodes=[{SOME_NODE},{other}]", "scaling.worker_node_label=a=b",
                                 f"run.storage_path={tmp_path}"], check_files=False)
    selector = build_trainer(recipe).scaling_config.label_selector
    assert selector == {"a": "b", "ray.io/node-id": f"!in({SOME_NODE},{other})"}
    assert avoiding(None, []) is None and avoiding({"a": "b"}, []) == {"a": "b"}
    assert "scaling.exclude_nodes" in NOT_COMPARED  # a relaunch without them is not "changed settings"
    # the capacity check counts the nodes left, so a run the others cannot hold fails before a fit
    left_out = {"NodeID": SOME_NODE, "Alive": True, "Labels": {"a": "b"}, "Resources": {"CPU": 8.0}}
    small = {"NodeID": other[:-2] + "00", "Alive": True, "Labels": {"a": "b"}, "Resources": {"CPU": 1.0}}
    fake = Cluster(nodes=lambda: [left_out, small], started_here=lambda: True)
    assert check_capacity(load_recipe(SMOKE, ["scaling.worker_node_label=a=b"], check_files=False), cluster=fake)
    with pytest.raises(ConfigError, match="worker"):
        check_capacity(recipe, cluster=fake)


def test_an_elastic_run_does_not_count_a_left_out_node_as_room_to_grow(tmp_path):
    """Ray Train's elastic policy counts room by resources alone (not label selectors): the range's max is what the
    other nodes hold, or it would try to grow onto the left-out node's slots at every resize check."""
    from workflows.capacity import elastic_max_without_excluded

    def slot_node(node_id: str, slots: int) -> dict:
        return {"NodeID": node_id, "Alive": True, "Labels": {}, "Resources": {"CPU": 8.0, "train_slot": slots}}

    recipe = load_recipe(SMOKE, ["scaling.num_workers=[1,4]", "scaling.worker_resources={train_slot: 1}",
                                 f"scaling.exclude_nodes=[{SOME_NODE}]"], check_files=False)
    kept, left_out = slot_node("cd" * 28, 2), slot_node(SOME_NODE, 2)
    assert elastic_max_without_excluded(recipe, [kept, left_out]) == 2  # uncapped, Ray would count 4
    assert elastic_max_without_excluded(recipe, [kept, left_out, slot_node("ef" * 28, 8)]) == 4  # the range's max
    assert elastic_max_without_excluded(recipe, [left_out]) == 1  # never below its min


@pytest.mark.integration
def test_an_elastic_trainer_asks_for_no_more_than_the_other_nodes_hold(ray_local, tmp_path):
    import ray

    from workflows.pretrain import build_trainer

    here = ray.get_runtime_context().get_node_id()
    elastic = ["scaling.num_workers=[1,3]", f"run.storage_path={tmp_path}"]
    assert build_trainer(load_recipe(SMOKE, elastic, check_files=False)).scaling_config.num_workers == (1, 3)
    assert build_trainer(load_recipe(SMOKE, [*elastic, f"scaling.exclude_nodes=[{SOME_NODE}]"], check_files=False)
                         ).scaling_config.num_workers == (1, 3)  # this node (4 CPUs) holds 3
    assert build_trainer(load_recipe(SMOKE, [*elastic, f"scaling.exclude_nodes=[{here}]"], check_files=False)
                         ).scaling_config.num_workers == (1, 1)


@pytest.mark.integration
def test_decoders_told_to_avoid_a_node_still_run_on_the_others(ray_local, sample_data):
    """Ray takes the selector the pipeline builds from `avoid_nodes` (its syntax: `!in(...)`): the clips come."""
    from workflows.data.data_config import DataConfig
    from workflows.data.pipeline import build_clip_dataset

    ds = build_clip_dataset(DataConfig(batch_size=2, drop_counter="avoid-test"), sample_data.val_manifest,
                            sample_data.labels, split="eval", num_frames=4, crop_size=32, avoid_nodes=[SOME_NODE])
    assert len(ds.take_all()) > 0
