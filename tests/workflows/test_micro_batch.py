"""train.micro_batch_size auto (workflows/micro_batch.py): the probe runs the real DiST training step on the CPU and
measures real memory. The probes run in their own processes: the host's memory gauge is the process's resident
high-water mark, and the out-of-memory case needs an address-space limit (RLIMIT_AS) that must not bind pytest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workflows.micro_batch import is_out_of_memory, micro_for_share, probe_in_dtype
from workflows.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "workflows" / "configs" / "smoke.yaml"

# One probe in a fresh process: the tiny preset at 32 frames (about 6 MB a clip in fp32), its real step
# (normalise, mixup, forward, loss, backward). argv: "budget" MB above the first clip's peak, or "rlimit" MB of
# address space above what the process holds after one clip. Prints the probe and what running past it does.
PROBE_SCRIPT = r"""
import json, resource, sys
import psutil, torch
torch.set_num_threads(1)
from dist_model import build_dist
from workflows.micro_batch import MemoryGauge, find_micro_batch, probe_runner
from workflows.recipe import load_recipe

mode, megabytes = sys.argv[1], int(sys.argv[2])
recipe = load_recipe(sys.argv[3], ["model.num_frames=32", "train.global_batch_size=512"],
                     check_files=False)
cfg = recipe.model_cfg
model = build_dist(cfg)
names = [f"class {i}" for i in range(5)]
model.text_embeddings(names, torch.device("cpu"))
model.clip.release_text_tower()
run = probe_runner(model, names, recipe.train, torch.float32, torch.device("cpu"), cfg.num_frames, cfg.image_size)
run(1)
first = MemoryGauge(torch.device("cpu")).peak_bytes()
budget = first + megabytes * 2**20 if mode == "budget" else 2**62

class Gauge(MemoryGauge):
    def budget_bytes(self):
        return budget

if mode == "rlimit":
    held = psutil.Process().memory_info().vms
    resource.setrlimit(resource.RLIMIT_AS, (held + megabytes * 2**20, resource.RLIM_INFINITY))
probe = find_micro_batch(run, Gauge(torch.device("cpu")), limit=256)
out = {"cap": probe.cap, "stopped": probe.stopped, "tried": probe.tried, "budget": budget}
run(probe.cap)  # the memory of a failed size was given back: the cap still runs (else no PROBE line, exit 1)
if mode == "budget":
    run(2 * probe.cap)
    out["peak_at_twice_the_cap"] = MemoryGauge(torch.device("cpu")).peak_bytes()
print("PROBE " + json.dumps(out))
"""


def _probe(mode: str, megabytes: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if mode == "rlimit":
        # Every tensor mmapped, and unmapped when freed, as a device allocator gives its cache back (MemoryGauge
        # .release). glibc's default threshold grows as big blocks are freed, which put them in its heap instead, and
        # after the failed size that heap's fragments left the cap too little address space in ~1 run of 4 under load.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    done = subprocess.run([sys.executable, "-c", PROBE_SCRIPT, mode, str(megabytes), str(SMOKE)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("PROBE "))
    result["tried"] = {int(k): v for k, v in result["tried"].items()}
    return result


def test_the_probe_stops_where_memory_would_pass_the_budget():
    found = _probe("budget", 150)
    assert found["stopped"] == "budget", found
    cap, budget = found["cap"], found["budget"]
    assert 2 <= cap < 256, found
    assert found["tried"][cap] <= budget, "the cap was measured under the budget"
    assert all(p is not None for p in found["tried"].values()), "no size ran out of memory"
    # Not far below what fits: twice the cap, really run, takes more than the budget.
    assert found["peak_at_twice_the_cap"] > budget, found


def test_a_real_out_of_memory_error_ends_the_doubling_and_the_cap_still_runs():
    found = _probe("rlimit", 300)
    assert found["stopped"] == "out of memory", found
    assert None in found["tried"].values(), "a size failed to allocate"
    failed = min(b for b, p in found["tried"].items() if p is None)
    assert 1 <= found["cap"] < failed, found  # and the cap ran again after the failure: _probe saw exit 0


def test_one_clip_that_fails_to_allocate_is_named_with_the_allocators_words():
    """A failure to allocate at one clip ends the probe with the allocator's own words and how to see the error
    itself: oneDNN says "could not create a primitive" both when its memory runs out and when it fails otherwise."""
    from workflows.micro_batch import MemoryGauge, find_micro_batch

    def run(size: int) -> None:
        raise RuntimeError("could not create a primitive\nmore lines of oneDNN's")

    with pytest.raises(RuntimeError) as info:
        find_micro_batch(run, MemoryGauge(torch.device("cpu")), limit=8)
    message = str(info.value)
    assert "peaks {1: None}, and it failed to allocate (RuntimeError: could not create a primitive; to see a " \
           "failure that is not about memory, run with train.micro_batch_size=1)" in message, message


def test_out_of_memory_errors_are_told_from_other_failures():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("could not create a primitive"))  # oneDNN's, seen under RLIMIT_AS
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only the allocators' errors


@pytest.mark.parametrize("share, cap, micro", [
    (32, 64, 32),  # the share fits: one micro-batch
    (32, 20, 16),  # two steps of 16, not 20 + 12
    (30, 7, 6),  # five even steps
    (28, 8, 7),  # four even steps
    (27, 8, 7),  # 4 steps can't split 27 evenly, 5 neither: 7 + 7 + 7 + 6
    (5, 1, 1),
])
def test_the_micro_batch_takes_the_fewest_steps_and_splits_evenly_where_it_can(share, cap, micro):
    assert micro_for_share(share, cap) == micro
    assert micro <= cap


def test_an_auto_recipe_checks_its_batch_before_any_work_and_resolves_per_worker():
    recipe = load_recipe(SMOKE, ["train.micro_batch_size=auto"], check_files=False)
    with pytest.raises(ValueError, match="memory probe"):
        recipe.batch_plan(2)
    resolved = recipe.with_probed_micro_batch(micro_for_share(4, 3))  # a cap of 3 for a share of 4: 2 + 2
    plan = resolved.batch_plan(2)
    assert (plan.micro, plan.accum, plan.shares, plan.even) == (2, 2, (4, 4), True)
    assert resolved.train.micro_batch_size == "auto", "the recipe still says what the user wrote"
    with pytest.raises(Exception, match="multiple of scaling.num_workers 2"):
        load_recipe(SMOKE, ["train.micro_batch_size=auto", "train.global_batch_size=9"], check_files=False)
    elastic = load_recipe(SMOKE, ["train.micro_batch_size=auto", "scaling.num_workers=[1, 3]"], check_files=False)
    assert elastic.with_probed_micro_batch(4).batch_plan(3).shares == (3, 3, 2)


def test_the_probe_trains_in_the_run_precision_and_leaves_the_weights_untouched():
    from dist_model import build_dist

    model = build_dist(load_recipe(SMOKE, [], check_files=False).model_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = probe_in_dtype(model, torch.bfloat16, lambda: {p.dtype for p in model.parameters()})
    assert seen == {torch.bfloat16}
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
