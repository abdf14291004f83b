"""end_to_end: training clips/s of the pre-training workflow against a plain PyTorch DDP loop, same data and model.

    python -m benchmarks.end_to_end [--recipe workflows/configs/demo.yaml] [--steps 120] [--warmup-steps 20]
                                    [--log-every 10] [--repeats 1] [--no-deepspeed-loop] [--set key=value ...]
                                    [--objects 3] [--cache DIR]

Times `run_pretrain` on a fresh local Ray, a DDP loop fed by DataLoaders, and that loop on the workflow's DeepSpeed
engine (no Ray), on the demo's sample dataset, each in steady state (start-up excluded). Method: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = _REPO_ROOT / "workflows" / "configs" / "demo.yaml"


@dataclass
class RunTiming:
    """Step-end wall-clock times (time.time()) of one training run and what it reported."""

    name: str
    steps: list[int]  # steps whose end time is known (every step for ddp, every log step for the workflow)
    times: list[float]
    global_batch: int
    warmup_steps: int
    started: float  # time.time() when the run was launched
    data_wait: float  # fraction of the timed window spent waiting for data (mean over ranks)
    reported_clips_per_s: float = math.nan  # the workflow's own figure over the same window
    cpu_seconds: float = math.nan  # CPU of the process tree over the window
    cpu_groups: dict[str, float] = field(default_factory=dict)  # the same, by process group (CPU_GROUPS)

    def _window(self) -> tuple[int, float, int, float]:
        pairs = dict(zip(self.steps, self.times, strict=True))
        if self.warmup_steps not in pairs:
            raise RuntimeError(f"{self.name}: no end time for warm-up step {self.warmup_steps} (logged: {self.steps})")
        last = max(self.steps)
        if last <= self.warmup_steps:
            raise RuntimeError(f"{self.name}: no steps after the {self.warmup_steps} warm-up steps")
        return self.warmup_steps, pairs[self.warmup_steps], last, pairs[last]

    @property
    def window(self) -> tuple[float, float]:
        _, start, _, end = self._window()
        return start, end

    @property
    def timed_steps(self) -> int:
        first, _, last, _ = self._window()
        return last - first

    @property
    def seconds(self) -> float:
        start, end = self.window
        return end - start

    @property
    def clips_per_s(self) -> float:
        return self.timed_steps * self.global_batch / self.seconds

    @property
    def startup_seconds(self) -> float:
        return self.window[0] - self.started

    @property
    def cpu_per_clip(self) -> float:
        return self.cpu_seconds / (self.timed_steps * self.global_batch)


CPU_GROUPS = ("training processes", "decode workers", "Ray daemons", "other Ray workers", "driver", "other")


def cpu_group(pid: int, proc: Any) -> str:
    """Which CPU_GROUPS entry a process of the benchmark's tree belongs to (`measure.ProcCPU`)."""
    name = proc.name
    if proc.depth == 0:
        return "driver"
    if "RayTrainWorker" in name:
        return "training processes"
    # Decoders are Ray Data tasks ("ray::MapBatches(decode_clips)" while one runs); between tasks their process
    # reads "ray::IDLE", and in a training run no other tasks run (Ray Train's controller is an actor).
    if "decode_clips" in name or name.startswith("ray::IDLE"):
        return "decode workers"
    if any(k in name for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env",
                               "DashboardAgent", "RuntimeEnvAgent")):
        return "Ray daemons"
    if name.startswith("ray::"):
        return "other Ray workers"  # Ray Train's controller and Ray's internal actors
    if "resource_tracker" in name:
        return "other"
    # The baselines: torch.multiprocessing ranks below the driver, their DataLoader workers below them.
    return "training processes" if proc.depth == 1 else "decode workers"


RAY_GROUPS = ("Ray daemons", "other Ray workers")


def measure_cpu(timing: RunTiming, cpu: Any) -> None:
    """Fill in the run's CPU seconds over its timed window, in total and by process group. The baselines run
    beside the idle local Ray the workflow needs; its background CPU is not counted against them."""
    groups = cpu.between_by(*timing.window, cpu_group)
    if timing.name != "workflow":
        groups = {g: v for g, v in groups.items() if g not in RAY_GROUPS}
    timing.cpu_groups = groups
    timing.cpu_seconds = sum(groups.values())


# --- data and recipe ------------------------------------------------------------------------------------------
def train_videos_needed(recipe: Any, steps: int) -> int:
    """Training videos for `steps` steps inside one epoch (plus 10% so the timed steps never reach its end)."""
    return math.ceil(1.1 * steps * recipe.train.global_batch_size / recipe.data.train_views)


def ensure_sample(cache: Path, train_videos: int, num_objects: int = 3) -> Any:
    """The demo's sample motion dataset (`workflows.demo.SAMPLE_SETTINGS`, `num_objects` objects per video) with at
    least `train_videos` training videos; two validation videos per class only (validation runs once, after the
    timed steps)."""
    import dataclasses

    from workflows.data.sample import SAMPLE_CLASSES, SampleDataset, write_sample_dataset
    from workflows.demo import SAMPLE_SETTINGS

    per_class = math.ceil(train_videos / len(SAMPLE_CLASSES)) + 2
    root = cache / f"sample_{per_class}_{num_objects}obj"
    info = root / "sample_info.json"
    if info.exists():
        saved = json.loads(info.read_text())
        known = {f.name for f in dataclasses.fields(SampleDataset)}
        if set(saved) <= known and all(saved.get(k) == v for k, v in SAMPLE_SETTINGS.items()):
            return SampleDataset(**saved)
    print(f"  writing the sample motion dataset ({per_class} videos per class) to {root} ...", flush=True)
    return write_sample_dataset(root, videos_per_class=per_class, num_objects=num_objects, val_fraction=2 / per_class,
                                workers=min(4, os.cpu_count() or 1), **SAMPLE_SETTINGS)


def build_recipe(args: argparse.Namespace, sample: Any, storage: Path, name: str) -> Any:
    """The recipe both runs train with: `--recipe` on the sample data, `--steps` steps, validation at the end."""
    from workflows.recipe import load_recipe

    return load_recipe(args.recipe, [
        f"data.train_manifest={sample.train_manifest}", f"data.val_manifest={sample.val_manifest}",
        f"data.labels={sample.labels}", f"run.storage_path={storage}", f"run.name={name}", "run.max_failures=0",
        f"train.max_steps={args.steps}", f"eval.every_steps={args.steps}", f"train.log_every_steps={args.log_every}",
        f"mlflow.tracking_uri=sqlite:///{storage / 'mlflow.db'}", "mlflow.experiment=bench-end-to-end",
        *args.overrides])


# --- the workflow ---------------------------------------------------------------------------------------------
def run_workflow(recipe: Any, warmup_steps: int, cpu: Any) -> RunTiming:
    """`run_pretrain` on a local Ray; step times and reported throughput from its MLflow progress metrics."""
    import mlflow

    from workflows.pretrain import run_pretrain

    started = time.time()
    run_pretrain(recipe)
    client = mlflow.MlflowClient(tracking_uri=recipe.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(recipe.mlflow.experiment)
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == recipe.run.name]
    if len(runs) != 1:
        raise RuntimeError(f"expected one MLflow run named {recipe.run.name!r}, found {len(runs)}")
    run_id = runs[0].info.run_id
    rates = {m.step: (m.timestamp / 1000, m.value) for m in client.get_metric_history(run_id, "clips_per_s")}
    waits = {m.step: m.value for m in client.get_metric_history(run_id, "data_wait_fraction")}
    steps = sorted(rates)
    timing = RunTiming("workflow", steps, [rates[s][0] for s in steps], recipe.train.global_batch_size,
                       warmup_steps, started, math.nan)
    first, _, last, _ = timing._window()
    inside = [s for s in steps if first < s <= last]
    # Each logged value covers the log_every steps before it: all clips over all that time = harmonic mean.
    timing.reported_clips_per_s = len(inside) / sum(1 / rates[s][1] for s in inside)
    timing.data_wait = statistics.fmean(waits[s] for s in inside)
    measure_cpu(timing, cpu)
    return timing


# --- the DDP baseline -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loop_worker(rank: int, world: int, engine_name: str, recipe_dict: dict, port: int, out_dir: str) -> None:
    """One rank of a plain training loop: the workflow's model, optimizer, batch and per-step math, fed by a
    DataLoader. engine_name "ddp": DistributedDataParallel + torch AdamW; "deepspeed": the workflow's DeepSpeed
    engine (same config, `build_deepspeed_config`) around the same model and optimizer, without Ray."""
    import torch.distributed as dist

    from benchmarks.ingest import dataloader_batches, manifest_videos
    from dist_model import build_dist
    from workflows.data.pipeline import ClipSpec
    from workflows.feeds import ClipFeeds
    from workflows.recipe import recipe_from_dict
    from workflows.runtime import tools_of_this_interpreter_first
    from workflows.step import train_micro_step

    recipe = recipe_from_dict(recipe_dict)
    tools_of_this_interpreter_first()  # the ninja the workflow's workers use: DeepSpeed's CPU op is built once
    # As the workflow does: DeepSpeed's ZeRO calls a deprecated collective on every step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    torch.set_num_threads(max(1, int(recipe.scaling.cpus_per_worker)))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(recipe.train.seed)  # identical init on every rank, as in the workflow
        model = build_dist(recipe.model_cfg)
        train = recipe.train
        optimizer = torch.optim.AdamW(model.param_groups(train.weight_decay), lr=recipe.peak_lr,
                                      betas=tuple(train.betas))
        if engine_name == "deepspeed":
            import deepspeed

            from workflows.optim import build_deepspeed_config
            from workflows.trainer import skip_deepspeed_shm_op

            skip_deepspeed_shm_op()  # as the workflow's CPU workers do

            for group in optimizer.param_groups:
                group.pop("name", None)  # as the workflow does for DeepSpeed's ZeRO wrapper
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False,
                                                   config=build_deepspeed_config(recipe, world))
        else:
            engine = DDPEngine(model, optimizer, recipe.batch_plan(world).accum, train.grad_clip)
        # The workflow's feed for this rank, for its geometry, class names and share of the decoders.
        feeds = ClipFeeds(recipe, rank, world, torch.device("cpu"))
        spec = ClipSpec.from_config(feeds.data_cfg, split="train", num_frames=feeds.num_frames, crop_size=feeds.crop,
                                    num_views=recipe.data.train_views, seed=train.seed, epoch=0)
        videos = manifest_videos(recipe.data.train_manifest, recipe.data.labels)[rank::world]
        class_names, accum = feeds.class_names, recipe.batch_plan(world).accum
        mix_gen = torch.Generator().manual_seed(train.seed * 1000 + rank)
        times, waits, step, position = [], [], 0, 0
        loss_sum = torch.zeros(())
        fetch = time.perf_counter()
        for batch in dataloader_batches(videos, spec, feeds.data_cfg.decode_actors, train.micro_batch_size,
                                        drop_last=True):
            waits.append(time.perf_counter() - fetch)
            # The workflow's own micro-step; the loss sums on the device and is read when a progress line would be.
            loss_sum += train_micro_step(engine, batch, class_names, train, torch.float32, mix_gen)
            position += 1
            if position % accum == 0:
                step += 1
                if step % train.log_every_steps == 0:
                    float(loss_sum)
                times.append(time.time())
                if step >= train.max_steps:
                    break
            fetch = time.perf_counter()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"times": times, "waits": waits, "accum": accum}))
    finally:
        dist.destroy_process_group()


class DDPEngine:
    """DeepSpeed's engine interface (call, `backward`, `step` at accumulation boundaries) over DistributedDataParallel
    and a torch optimizer, so the DDP baseline runs the workflow's own `train_micro_step`. Gradients are all-reduced
    only at accumulation boundaries (`no_sync` around the other micro-batches' forward and backward)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, accum: int, grad_clip: float):
        from torch.nn.parallel import DistributedDataParallel

        self.module, self.model, self.optimizer = DistributedDataParallel(model), model, optimizer
        self.accum, self.grad_clip, self.micro = accum, grad_clip, 0
        self._no_sync = contextlib.ExitStack()

    def __call__(self, *args: Any) -> torch.Tensor:
        self.micro += 1
        if self.micro % self.accum:
            self._no_sync.enter_context(self.module.no_sync())
        return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()  # DeepSpeed scales by the accumulation too
        self._no_sync.close()

    def step(self) -> None:
        if self.micro % self.accum:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def run_loop(engine_name: str, recipe: Any, warmup_steps: int, cpu: Any, out_dir: Path) -> RunTiming:
    """`scaling.num_workers` processes of `_loop_worker`; step times from rank 0, data wait from all ranks."""
    import torch.multiprocessing as mp

    from benchmarks.ingest import thread_env
    from workflows.recipe import recipe_to_dict, with_absolute_paths

    if not recipe.data.decode_actors:
        raise ValueError("the baselines need data.decode_actors set (their DataLoader workers per rank)")
    world = recipe.scaling.num_workers
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    # Ray gives a training worker OMP_NUM_THREADS = its CPUs; the ranks get the same.
    with thread_env(max(1, int(recipe.scaling.cpus_per_worker))):
        mp.spawn(_loop_worker, nprocs=world, join=True, args=(
            world, engine_name, recipe_to_dict(with_absolute_paths(recipe)), _free_port(), str(out_dir)))
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    times = ranks[0]["times"]
    timing = RunTiming(LOOP_NAMES[engine_name], list(range(1, len(times) + 1)), times,
                       recipe.train.global_batch_size, warmup_steps, started, math.nan)
    first, _, last, _ = timing._window()
    accum = ranks[0]["accum"]
    # Micro-batches first * accum + 1 .. last * accum are the timed ones; their waits over the window, per rank.
    timing.data_wait = statistics.fmean(sum(r["waits"][first * accum: last * accum]) / timing.seconds
                                        for r in ranks)
    measure_cpu(timing, cpu)
    return timing


LOOP_NAMES = {"ddp": "ddp", "deepspeed": "deepspeed_loop"}


# --- the benchmark --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def local_ray(recipe: Any):
    """A fresh local Ray sized as the workflow sizes one (or the one already running in this process)."""
    import ray

    from workflows.runtime import ensure_ray, local_cpus_for

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")  # a busy 2-core machine is slow
    started = not ray.is_initialized()
    ensure_ray(local_cpus_for(recipe), fresh_local=True)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def summarise(pairs: list[dict[str, RunTiming]]) -> dict[str, float]:
    """workflow_vs_ddp first: the median over repeats of the clips/s ratio measured in the same repeat; then how the
    gap splits (the DeepSpeed loop without Ray, when run), CPU per clip, data-wait fractions."""
    def median(fn) -> float:
        return statistics.median(fn(p) for p in pairs)

    ratios = {
        "workflow_vs_ddp": median(lambda p: p["workflow"].clips_per_s / p["ddp"].clips_per_s),
        "workflow_vs_ddp_cpu_per_clip": median(lambda p: p["workflow"].cpu_per_clip / p["ddp"].cpu_per_clip),
    }
    if "deepspeed_loop" in pairs[0]:
        ratios["workflow_vs_deepspeed_loop"] = median(
            lambda p: p["workflow"].clips_per_s / p["deepspeed_loop"].clips_per_s)
        ratios["deepspeed_loop_vs_ddp"] = median(lambda p: p["deepspeed_loop"].clips_per_s / p["ddp"].clips_per_s)
    for name in pairs[0]:
        ratios[f"{name}_data_wait"] = median(lambda p, name=name: p[name].data_wait)
    ratios["workflow_reported_vs_timed"] = median(
        lambda p: p["workflow"].reported_clips_per_s / p["workflow"].clips_per_s)
    return ratios


def format_table(pairs: list[dict[str, RunTiming]]) -> str:
    rows = ["| repeat | run | timed steps | clips/s | vs ddp | start-up s | data wait | CPU s/clip | "
            "workflow-reported clips/s |", "|" + "---|" * 9]
    for i, pair in enumerate(pairs):
        for t in pair.values():
            reported = "" if math.isnan(t.reported_clips_per_s) else f"{t.reported_clips_per_s:.2f}"
            rows.append(f"| {i} | {t.name} | {t.timed_steps} | {t.clips_per_s:.2f} | "
                        f"{t.clips_per_s / pair['ddp'].clips_per_s:.2f} | {t.startup_seconds:.0f} | "
                        f"{100 * t.data_wait:.0f}% | {t.cpu_per_clip:.3f} | {reported} |")
    rows += ["", "CPU ms per clip over the timed window, by process group:", "",
             "| repeat | run | " + " | ".join(CPU_GROUPS) + " |", "|" + "---|" * (2 + len(CPU_GROUPS))]
    for i, pair in enumerate(pairs):
        for t in pair.values():
            clips = t.timed_steps * t.global_batch
            rows.append(f"| {i} | {t.name} | " + " | ".join(f"{1000 * t.cpu_groups.get(g, 0.0) / clips:.1f}"
                                                             for g in CPU_GROUPS) + " |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.end_to_end", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="training recipe (default: the demo's)")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=20, help="steps before the clock starts")
    parser.add_argument("--log-every", type=int, default=10, help="the workflow's train.log_every_steps")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every run (alternating order)")
    parser.add_argument("--deepspeed-loop", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the DeepSpeed engine in the plain loop (no Ray): splits the gap")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key for both runs (repeatable)")
    parser.add_argument("--objects", type=int, default=3, help="moving objects per sample video (the demo's 3)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dist-bench-sample"),
                        help="folder for the generated sample dataset (reused across runs)")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup_steps or args.warmup_steps < 1 or args.log_every < 1 or args.repeats < 1:
        parser.error("need --steps > --warmup-steps >= 1, --log-every >= 1 and --repeats >= 1")
    if args.warmup_steps % args.log_every or args.steps % args.log_every:
        parser.error("--warmup-steps and --steps must be multiples of --log-every (the workflow logs those steps)")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, RunTiming]]:
    """Run the workflow, the DDP loop (and the DeepSpeed loop), print the table and the ratios line last."""
    from benchmarks.measure import CPUSampler, load_average, print_results
    from workflows.recipe import load_recipe

    args = parse_args(argv)
    load = load_average()
    probe = load_recipe(args.recipe, args.overrides, check_files=False)
    sample = ensure_sample(Path(args.cache), train_videos_needed(probe, args.steps), args.objects)
    pairs: list[dict[str, RunTiming]] = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        storage = Path(tmp)
        recipes = [build_recipe(args, sample, storage, f"e2e-{i}") for i in range(args.repeats)]
        r0 = recipes[0]
        print(f"end_to_end: recipe={Path(args.recipe).name} preset={r0.model.preset} workers={r0.scaling.num_workers}"
              f" cpus_per_worker={r0.scaling.cpus_per_worker:g} decode_actors={r0.data.decode_actors} "
              f"global_batch={r0.train.global_batch_size} micro_batch={r0.train.micro_batch_size} "
              f"views={r0.data.train_views} zero={r0.train.zero_stage} steps={args.steps} "
              f"warmup_steps={args.warmup_steps} train_videos={sample.train_videos} load={load:.2f}", flush=True)
        from workflows.feeds import steps_per_epoch

        if steps_per_epoch(r0, sample.train_videos) < args.steps:
            raise RuntimeError("the sample dataset is too small for one epoch of --steps steps")
        with local_ray(r0), CPUSampler() as cpu:
            names = ["workflow", "ddp", *(["deepspeed"] if args.deepspeed_loop else [])]
            for i, recipe in enumerate(recipes):
                runs: dict[str, RunTiming] = {}
                for name in names if i % 2 == 0 else names[::-1]:  # alternate who goes first
                    if name == "workflow":
                        t = run_workflow(recipe, args.warmup_steps, cpu)
                    else:
                        t = run_loop(name, recipe, args.warmup_steps, cpu, storage / f"{name}-{i}")
                    runs[t.name] = t
                    print(f"  repeat {i}: {t.name} {t.clips_per_s:.2f} clips/s over steps {args.warmup_steps}.."
                          f"{max(t.steps)} ({t.seconds:.1f} s), data wait {100 * t.data_wait:.0f}%, "
                          f"{t.cpu_per_clip:.3f} CPU s/clip", flush=True)
                pairs.append({k: runs[k] for k in ("workflow", "ddp", "deepspeed_loop") if k in runs})
    print_results(load, "clips/s = (steps - warm-up) x global batch / seconds between the ends of those steps",
                  format_table(pairs), summarise(pairs))
    return pairs


if __name__ == "__main__":
    main()
