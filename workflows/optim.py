"""Learning-rate schedule and the DeepSpeed config derived from a recipe (reference §4.1)."""

from __future__ import annotations

import copy
import math
from typing import Any

from workflows.config_loader import ConfigError
from workflows.recipe import Recipe


def lr_at(step: int, *, peak: float, total: int, warmup: int, start: float, floor: float = 0.0) -> float:
    """Per-step lr: linear warm-up from `start` to `peak` over `warmup` steps, then half-cosine to `floor`."""
    if warmup > 0 and step < warmup:
        return start + (peak - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deep_merge(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base`, recursing into nested dicts."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


BUCKET_ELEMENTS = 50_000_000


def build_deepspeed_config(recipe: Recipe, world: int | None = None) -> dict[str, Any]:
    """ZeRO stage, precision, micro-batch, accumulation and clipping from the typed recipe at `world` workers (default
    the smallest size the recipe allows), then the raw `train.deepspeed` block deep-merged on top (the escape hatch).

    DeepSpeed's batch numbers describe the largest micro-batch; with uneven shares (workflows/elastic.py) the step's
    real batch is still `train.global_batch_size`, weighted in the loss."""
    train = recipe.train
    precision = recipe.precision()
    plan = recipe.batch_plan(world or recipe.scaling.min_workers)
    config: dict[str, Any] = {
        "train_batch_size": plan.micro * plan.accum * plan.world,
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accum,
        "gradient_clipping": train.grad_clip,
        # ZeRO-2 allocates a reduce buffer of reduce_bucket_size elements at every micro-step: DeepSpeed's 5e8 is
        # 1 GB of GPU memory in bf16 for a 26-40 M parameter branch. 5e7 holds the whole B/16 branch in one bucket.
        "zero_optimization": {"stage": train.zero_stage, "reduce_bucket_size": BUCKET_ELEMENTS,
                              "allgather_bucket_size": BUCKET_ELEMENTS},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "auto_cast": False},
        # We hand DeepSpeed a torch AdamW (its fused Adam needs a JIT build); ZeRO accepts it with this flag.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # progress is printed by the workflow
        "wall_clock_breakdown": False,
    }
    merged = deep_merge(config, train.deepspeed)
    # The trainer steps, accumulates and weights by the recipe's batch plan; DeepSpeed's own copy must agree with it.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if merged[key] != config[key]:
            raise ConfigError(f"train.deepspeed sets {key}: {merged[key]}, but the recipe's batch plan gives "
                              f"{config[key]} (train.global_batch_size {train.global_batch_size} = micro-batch "
                              f"{plan.micro} x accumulation {plan.accum} x {plan.world} workers): set "
                              "train.global_batch_size and train.micro_batch_size instead")
    stage = (merged.get("zero_optimization") or {}).get("stage")
    if stage not in (0, 1, 2):
        raise ConfigError(f"train.deepspeed sets zero_optimization.stage: {stage!r}; use train.zero_stage (0, 1 or 2; "
                          "3 is not supported)")
    return merged
