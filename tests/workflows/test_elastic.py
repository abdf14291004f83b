"""Elastic training's arithmetic and state (workflows/elastic.py): the global batch at any world size, what an epoch
has left after a resize, and ZeRO optimizer state that loads at another number of workers (real DeepSpeed engines in
real gloo process groups)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workflows.config_loader import ConfigError
from workflows.elastic import (
    batch_plan,
    epoch_order,
    legacy_consumed,
    remaining_assignment,
    workable_sizes,
)
from workflows.recipe import load_recipe

SMOKE = Path(__file__).parents[2] / "workflows" / "configs" / "smoke.yaml"


# --- the global batch at a world size ---


def test_an_even_split_is_the_fixed_size_split():
    plan = batch_plan(32, 4, 2)
    assert (plan.accum, plan.shares, plan.micro, plan.even) == (4, (16, 16), 4, True)
    assert plan.micro_sizes(1) == [4, 4, 4, 4] and plan.loss_weight(4) == 1.0


def test_an_uneven_split_keeps_the_global_batch_and_weights_every_clip_alike():
    plan = batch_plan(32, 4, 3)
    assert plan.shares == (11, 11, 10) and plan.accum == 3 and not plan.even
    assert plan.micro_sizes(0) == [4, 4, 3] and plan.micro_sizes(2) == [4, 3, 3]
    assert sum(sum(plan.micro_sizes(r)) for r in range(3)) == 32
    # DeepSpeed divides each micro-batch's (mean) loss by accum and averages over the world: with the weight, every
    # clip ends up with 1/global of the gradient.
    per_clip = {plan.loss_weight(n) / (n * plan.accum * plan.world) for r in range(3) for n in plan.micro_sizes(r)}
    assert all(w == pytest.approx(1 / 32) for w in per_clip)


def test_weighted_uneven_micro_batches_give_the_full_batch_gradient():
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randn(32)
    w = torch.randn(5, requires_grad=True)
    full = torch.autograd.grad(((x @ w - y) ** 2).mean(), w)[0]
    plan = batch_plan(32, 4, 3)
    total, start = torch.zeros(5), 0
    for rank in range(3):
        for n in plan.micro_sizes(rank):  # each rank's micro-batches, as DeepSpeed scales and averages them
            xs, ys = x[start:start + n], y[start:start + n]
            loss = ((xs @ w - ys) ** 2).mean() * plan.loss_weight(n) / plan.accum
            total += torch.autograd.grad(loss, w)[0] / plan.world
            start += n
    assert start == 32 and torch.allclose(total, full, atol=1e-6)


def test_sizes_that_cannot_hold_the_global_batch():
    with pytest.raises(ValueError, match="cannot give each of 3 workers 2 micro-batches"):
        batch_plan(4, 1, 3)
    assert workable_sizes(4, 1, 1, 4) == ([1, 2, 4], [1, 2, 4])
    assert workable_sizes(32, 4, 2, 5) == ([2, 3, 4, 5], [2, 4])


def test_elastic_recipes_are_checked_before_any_work():
    base = ["train.micro_batch_size=1", "train.global_batch_size=4"]
    recipe = load_recipe(SMOKE, [*base, "scaling.num_workers=[1, 2]"], check_files=False)
    assert (recipe.scaling.min_workers, recipe.scaling.max_workers, recipe.scaling.elastic) == (1, 2, True)
    with pytest.raises(ConfigError, match=r"cannot be split over 3 workers.*sizes that hold it: 1, 2, 4"):
        load_recipe(SMOKE, [*base, "scaling.num_workers=[1, 4]"], check_files=False)
    with pytest.raises(ConfigError, match="needs train.zero_stage 1 or 2"):
        load_recipe(SMOKE, [*base, "scaling.num_workers=[1, 2]", "train.zero_stage=0"], check_files=False)
    with pytest.raises(ConfigError, match=r"\[min, max\] with 1 <= min <= max"):
        load_recipe(SMOKE, [*base, "scaling.num_workers=[2, 1]"], check_files=False)
    fixed = load_recipe(SMOKE, check_files=False)  # an int stays a fixed size, checked as before
    assert not fixed.scaling.elastic and fixed.scaling.min_workers == fixed.scaling.max_workers == 2
    with pytest.raises(ConfigError, match="must be a multiple of train.micro_batch_size x scaling.num_workers"):
        load_recipe(SMOKE, ["scaling.num_workers=3"], check_files=False)


# --- what an epoch has left ---


def test_a_fresh_epoch_is_shared_out_as_the_fixed_size_shards():
    order = epoch_order(10, seed=0, epoch=1)
    plan = batch_plan(4, 2, 2)
    fresh = np.zeros(10, dtype=np.int32)
    for rank in range(2):
        assert remaining_assignment(order, fresh, 1, plan, rank).tolist() == list(range(rank, 10, 2))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_what_is_left_is_shared_out_once_at_any_size(world):
    n, views = 23, 2
    order = epoch_order(n, seed=3, epoch=0)
    consumed = np.zeros(n, dtype=np.int32)
    consumed[order[:9]] = views  # trained on before the resize
    consumed[order[9]] = 1  # one view of this one
    plan = batch_plan(12, 2, world)
    shares = [remaining_assignment(order, consumed, views, plan, r) for r in range(world)]
    every = np.concatenate(shares)
    assert sorted(every.tolist()) == list(range(9, n)), "each video with clips left goes to exactly one rank"
    if not plan.even:  # contiguous runs in the epoch's order, in rank order, each sized by the rank's share
        assert every.tolist() == list(range(9, n))
        for share, got in zip(plan.shares, shares, strict=True):
            assert abs(len(got) - share * (n - 9) / plan.global_batch) < 1, (plan.shares, [len(s) for s in shares])


def test_legacy_positions_mark_each_ranks_first_videos():
    consumed = legacy_consumed(10, seed=0, epoch=0, world=2, skipped_per_rank=2, views=3)
    order = epoch_order(10, 0, 0)
    assert sorted(np.flatnonzero(consumed).tolist()) == sorted(order[:4].tolist())
    assert set(consumed[consumed > 0].tolist()) == {3}


# --- ZeRO optimizer state across world sizes (real DeepSpeed, real process groups) ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zero_worker(rank: int, world: int, port: int, jobs: list[tuple[str, int, str, str]]) -> None:
    """One rank of one process group, running `jobs` (phase, ZeRO stage, checkpoint directory, output file) in turn,
    each on a fresh engine (one spawn per world size: each spawn pays torch's and DeepSpeed's imports, ~6 s a rank).
    A job builds the engine the workflow builds (its DeepSpeed config at this world size), trains two steps and
    writes a checkpoint as an elastic run does (phase "save"), loads it as the trainer does at another size (phase
    "load") or at the same size (phase "load_same_size": DeepSpeed's own files, as Trainer.resume) and trains one
    more step; then gathers every parameter's whole Adam moments and fp32 weights (a collective) and writes them
    from rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed

    from workflows.checkpoints import DS_TAG, full_optimizer_state, restore_full_optimizer_state, write_checkpoint
    from workflows.optim import build_deepspeed_config
    from workflows.trainer import skip_deepspeed_shm_op

    skip_deepspeed_shm_op()  # as the workflow's CPU workers do (else the suite's first engine compiles it, ~30 s)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for phase, stage, directory, out in jobs:
            recipe = load_recipe(SMOKE, ["train.micro_batch_size=1", "train.global_batch_size=12",
                                         "scaling.num_workers=[1, 4]", f"train.zero_stage={stage}"],
                                 check_files=False)
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.GELU(), torch.nn.Linear(13, 3))
            # Two parameter groups, as DiST has (with and without weight decay).
            decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
            rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
            optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                           {"params": rest, "weight_decay": 0.0}], lr=1e-2)
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False,
                                                   config=build_deepspeed_config(recipe, world))
            plan = recipe.batch_plan(world)
            gen = torch.Generator().manual_seed(rank)

            def train(steps: int, engine=engine, plan=plan, gen=gen) -> None:
                for _ in range(steps * plan.accum):
                    engine.backward(engine(torch.randn(2, 7, generator=gen)).pow(2).mean())
                    engine.step()

            if phase == "save":
                train(2)
                write_checkpoint(Path(directory), engine=engine, model=model, rank=rank, state={"world_size": world},
                                 recipe_yaml="", elastic=True)
            elif phase == "load_same_size":
                engine.load_checkpoint(directory, tag=DS_TAG, load_module_strict=False)
            else:
                engine.load_checkpoint(directory, tag=DS_TAG, load_optimizer_states=False)
                restore_full_optimizer_state(engine, model, directory)
            state = full_optimizer_state(engine, model)
            if phase != "save":
                train(1)  # the restored state steps like any other
                state["after"] = torch.cat([p.detach().flatten() for p in model.parameters()])
            if rank == 0:
                torch.save(state, out)
            dist.barrier()  # every rank's checkpoint files are written before any rank's next job reads them
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def zero_states(tmp_path_factory) -> dict[tuple[str, int, int | str], dict]:
    """Every ZeRO checkpoint save and load the tests below compare, run in three spawns (one per world size):
    at 2 workers a ZeRO-1 and a ZeRO-2 checkpoint are saved and each loaded at the other stage; at 3 and at 1 worker
    each is loaded at its own stage (grow, then shrink below the size that saved). Keyed (phase, stage, world or
    the saved stage it loaded)."""
    root = tmp_path_factory.mktemp("zero")
    ckpt = {stage: str(root / f"ckpt_{stage}") for stage in (1, 2)}
    out = {}

    def job(phase: str, stage: int, saved: int, key) -> tuple[str, int, str, str]:
        out[(phase, stage, key)] = path = str(root / f"{phase}_{stage}_{key}.pt")
        return phase, stage, ckpt[saved], path

    by_world = {
        2: [job("save", 1, 1, 2), job("save", 2, 2, 2),
            job("load_same_size", 2, 1, "from_1"), job("load_same_size", 1, 2, "from_2")],
        3: [job("load", stage, stage, 3) for stage in (1, 2)],
        1: [job("load", stage, stage, 1) for stage in (1, 2)],
    }
    for world, jobs in by_world.items():
        mp.spawn(_zero_worker, args=(world, _free_port(), jobs), nprocs=world, join=True)
    return {key: torch.load(path) for key, path in out.items()}


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_zero_optimizer_state_loads_bitwise_at_another_number_of_workers(zero_states, zero_stage):
    saved = zero_states[("save", zero_stage, 2)]
    assert float(saved["step"][0]) == 2.0
    assert all(float(v.abs().sum()) > 0 for k, v in saved.items() if k.startswith("exp_avg_sq/")), "moments trained"
    for world in (3, 1):  # grow, then shrink below the size that saved
        loaded = zero_states[("load", zero_stage, world)]
        for key, tensor in saved.items():
            assert torch.equal(loaded[key], tensor), f"{key} at {world} workers"
        assert torch.isfinite(loaded["after"]).all()


def test_a_relaunch_between_zero_1_and_2_loads_the_optimizer_state_bitwise(zero_states):
    """A relaunch may change train.zero_stage between 1 and 2 (relaunch.py lists it, does not refuse it): DeepSpeed
    loads the other stage's optimizer files at the same number of workers, every Adam moment and fp32 weight
    intact, and trains on."""
    for saved_stage, loaded_stage in ((1, 2), (2, 1)):
        saved = zero_states[("save", saved_stage, 2)]
        loaded = zero_states[("load_same_size", loaded_stage, f"from_{saved_stage}")]
        for key, tensor in saved.items():
            assert torch.equal(loaded[key], tensor), f"{key}: ZeRO-{saved_stage} -> ZeRO-{loaded_stage}"
        assert torch.isfinite(loaded["after"]).all()


def test_the_root_cause_of_a_failure_follows_direct_causes_only():
    """What a restart line and a failed run's last line name (runtime.root_cause): through `raise ... from` (and the
    text of a chain, as Ray carries a remote one) back to its root, but an error raised while handling another is
    the failure itself, not that other one."""
    import traceback

    from workflows.runtime import _root_in_text, root_cause

    def raised(body) -> BaseException:
        try:
            body()
        except Exception as exc:  # noqa: BLE001
            return exc
        raise AssertionError("nothing raised")

    def storage_then_wrapped() -> None:
        try:
            raise OSError("cannot read s3://b/v.mp4: its storage did not answer for 6 s\nsecond line")
        except OSError as storage:
            raise ValueError("UDF failed to process a data block.") from storage

    def bad_video_then_too_many() -> None:
        try:
            raise KeyError("corrupt")
        except KeyError:
            raise RuntimeError("4 of 12 train videos are unusable")  # noqa: B904 - the context is the point

    def too_many_then_wrapped() -> None:
        try:
            bad_video_then_too_many()
        except RuntimeError as too_many:
            raise ValueError("UDF failed to process a data block.") from too_many

    storage = "OSError: cannot read s3://b/v.mp4: its storage did not answer for 6 s"
    too_many = "RuntimeError: 4 of 12 train videos are unusable"
    for body, root in ((storage_then_wrapped, storage), (too_many_then_wrapped, too_many),
                       (bad_video_then_too_many, too_many)):
        exc = raised(body)
        assert root_cause(exc) == root, body.__name__
        text = "".join(traceback.format_exception(exc))  # the chain as Ray carries a remote one
        assert _root_in_text(text).group(0) == root, (body.__name__, text)
    wrapped_text = "".join(traceback.format_exception(raised(too_many_then_wrapped)))
    assert "During handling of the above exception" in wrapped_text and "direct cause" in wrapped_text
    assert root_cause(RuntimeError("injected failure at step 3")) == "RuntimeError: injected failure at step 3"
    # Ray Train's ControllerError puts its cause on the line after "...controller error:" (seen on a full disk)
    from ray.train import ControllerError

    full = ControllerError(OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device"))
    assert str(full).splitlines()[0].endswith("error:"), str(full)
    assert root_cause(full).startswith("ControllerError: Training failed due to controller error: [Errno 28] Error "
                                       "writing bytes"), root_cause(full)
    # ... also as the text of a remote chain: a sweep's trial raised RunNotRestarted from it (seen on a full disk)
    from ray.exceptions import RayTaskError

    from workflows.elastic import RunNotRestarted

    def controller_then_not_restarted() -> None:
        try:
            raise full
        except ControllerError as exc:
            raise RunNotRestarted("the Train controller could not write to /x") from exc

    remote = RayTaskError("train", "".join(traceback.format_exception(raised(controller_then_not_restarted))),
                          RunNotRestarted("the Train controller could not write to /x"))
    assert "No space left on device" in root_cause(remote) and \
        root_cause(remote).startswith("ControllerError: Training failed due to controller error: [Errno 28]"), \
        root_cause(remote)
