"""train_step: one optimizer step of DiST against full fine-tuning and an adapter baseline, on the same input.

    python -m benchmarks.train_step [--preset dist_b16_k400] [--batch 1|max [--max-batch 1024]] [--steps 5]
                                    [--warmup 2] [--repeats 1] [--device cpu|cuda] [--dtype fp32|bf16] [--threads N]
                                    [--matmul-size 2048] [--keep-text-tower] [--activation-checkpointing [N]]
                                    [--compile [--compile-mode M] [--compile-frozen]]

Each variant (`dist`, and `adapter` and `full` from benchmarks/baselines.py) runs in a fresh subprocess and reports
its median step time, peak memory, counted FLOPs and their share of the machine's matmul rate; the ratios compare
them. Method: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

VARIANTS = ("dist", "adapter", "full")
PROFILE_STEPS = 3  # --profile: steps run under torch.profiler, after (never among) the timed ones
_RESULT_TAG = "TRAIN_STEP_RESULT "
_REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class VariantResult:
    """What one variant's subprocess measured."""

    variant: str
    trainable_params: int
    total_params: int
    step_seconds: list[float]
    step_cpu_seconds: list[float]  # process CPU time of the same steps (all threads)
    peak_memory_bytes: int
    model_memory_bytes: int  # resident after building the model, optimizer and input, before the first step
    flops_per_step: float  # counted, forward + backward
    matmul_flops_per_s: float  # the machine's measured matmul rate, same dtype and threads
    memory_method: str
    batch: int = 1  # clips per step
    ops_per_step: int = 0  # aten ops dispatched by one forward + backward (eager)
    profiled: bool = False  # --profile: the step ran under torch.profiler after the timed steps
    device_busy_s: float = 0.0  # per profiled step: time with a kernel running on the GPU (0 on a CPU)
    kernels_per_step: float = 0.0

    @property
    def device_busy(self) -> float:
        """The share of the (unprofiled) median step in which the GPU ran a kernel: near 1 the step waits on the
        device's arithmetic, well below it on the host launching ops."""
        return self.device_busy_s / self.step_time

    @property
    def step_time(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def step_cpu_time(self) -> float:
        return statistics.median(self.step_cpu_seconds)

    @property
    def clips_per_s(self) -> float:
        return self.batch / self.step_time

    @property
    def achieved_flops_per_s(self) -> float:
        return self.flops_per_step / self.step_time

    @property
    def utilisation(self) -> float:
        return self.achieved_flops_per_s / self.matmul_flops_per_s


# --- one variant, in its own process ---
def build_variant(variant: str, preset: str, dtype: str, activation_checkpointing: bool | int = False):
    """Build one variant's model (CLIP weights seeded identically across variants). `activation_checkpointing`
    (true, or the first N fusion layers) recomputes the DiST branch's activations in the backward, in both variants
    that have the branch (dist, full)."""
    import torch

    from benchmarks.baselines import FullFineTune, STAdapterBaseline
    from dist_model import DiST, DiSTConfig, build_clip

    # Frozen towers may be stored in bf16; a full fine-tune needs fp32 master weights (it runs under autocast).
    frozen = variant in ("dist", "adapter") and dtype == "bf16"
    cfg = DiSTConfig.from_name(preset, clip_precision="bf16" if frozen else "fp32",
                               activation_checkpointing=activation_checkpointing)
    torch.manual_seed(0)
    clip = build_clip(cfg)
    torch.manual_seed(1)
    if variant == "dist":
        return DiST(cfg, clip)
    if variant == "full":
        return FullFineTune(cfg, clip)
    if variant == "adapter":
        return STAdapterBaseline(cfg, clip)
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")


@dataclass
class ProbeResult:
    """A probe worker's answer (`--batch max`): the largest batch of one variant's eager step under the memory
    budget (workflows.micro_batch's search, which `train.micro_batch_size: auto` uses too)."""

    variant: str
    cap: int
    limit: int  # the largest batch it tried
    stopped: str  # "limit": the limit fits; "budget" or "out of memory": memory ended the search
    tried: dict[int, int | None]  # batch -> peak bytes (None: out of memory)

    def summary(self) -> str:
        from workflows.micro_batch import format_peaks

        why = f"limit {self.limit}" if self.stopped == "limit" else self.stopped
        return f"{self.variant} {self.cap} ({why}; {format_peaks(self.tried)})"


@dataclass
class _Prepared:
    """One variant built on its device, ready to step (what `_prepare` returns)."""

    device: Any
    compute_dtype: Any
    rate_before: float  # the matmul rate, measured before the model was built
    base: int  # memory in use before the model was built
    method: str  # how peak memory is measured
    model: Any
    optimizer: Any
    make_input: Callable[[int], tuple[Any, Any]]  # batch -> (video, labels) on the device
    forward_backward: Callable[[Any, Any], None]  # zero_grad, forward, loss, backward


def _prepare(variant: str, preset: str, device_name: str, dtype: str, matmul_size: int, classes: int,
             keep_text_tower: bool, activation_checkpointing: bool | int, compile_model: bool,
             compile_mode: str | None, compile_frozen: bool) -> _Prepared:
    """Build `variant` on the device, ready to step: the matmul rate measured first, the memory baseline, the model
    (compiled as asked), its optimizer, and `forward_backward(video, labels)` / `make_input(batch)`."""
    import torch
    import torch.nn.functional as F

    import benchmarks.baselines  # noqa: F401
    from benchmarks import measure
    from dist_model import DiSTConfig

    # Imports (open_clip pulls in ~200 MiB of libraries on first use) happen before the memory baseline.
    DiSTConfig.from_name(preset)

    device = torch.device(device_name)
    compute_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    # The machine's matmul rate, measured before the memory baseline so its buffers never count as the model's.
    rate_before = measure.matmul_rate(device, compute_dtype, matmul_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        method = "cuda max_memory_allocated"
    else:
        measure.trim_allocator()
        base = measure.rss_bytes()
        method = "VmHWM - RSS before build" if measure.reset_peak_rss() else "ru_maxrss - RSS before build"

    model = build_variant(variant, preset, dtype, activation_checkpointing).to(device)
    model.train()
    cfg = model.cfg
    class_names = [f"action {i}" for i in range(classes)]
    if not keep_text_tower:
        # Every variant caches the class embeddings, then frees the text tower a train step never touches.
        model.text_embeddings(class_names, device)
        model.clip.release_text_tower()
    if compile_model:  # what autograd runs through: DiST's branch only; the baselines' backward crosses CLIP
        # fullgraph: a graph break raises rather than leaving eager dispatch inside the measured step
        if variant == "dist":
            model.compile_trainable(compile_mode, fullgraph=True)
            if compile_frozen:
                model.clip.compile_forward(compile_mode, fullgraph=True)
        else:
            model.compile(mode=compile_mode, fullgraph=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # garbage of the build (fp32 weights cast to bf16, the text tower) is not the step's memory
        measure.trim_allocator()
        measure.reset_peak_rss()
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4, fused=True)

    def make_input(batch: int):
        gen = torch.Generator().manual_seed(2)
        video = torch.randn(batch, 3, cfg.num_frames, cfg.image_size, cfg.image_size, generator=gen).to(device)
        return video, (torch.arange(batch) % classes).to(device)

    def autocast():
        if dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=compute_dtype)

    def forward_backward(video, labels) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(video, class_names).float(), labels)
        loss.backward()

    return _Prepared(device=device, compute_dtype=compute_dtype, rate_before=rate_before, base=base, method=method,
                     model=model, optimizer=optimizer, make_input=make_input, forward_backward=forward_backward)


def run_variant(
    variant: str,
    preset: str,
    batch: int,
    steps: int,
    warmup: int,
    device_name: str,
    dtype: str,
    matmul_size: int = 2048,
    classes: int = 10,
    keep_text_tower: bool = False,
    activation_checkpointing: bool | int = False,
    compile_model: bool = False,
    compile_mode: str | None = None,
    compile_frozen: bool = False,
    profile_path: str | None = None,
) -> VariantResult:
    """Build `variant`, time `steps` optimizer steps after `warmup`, measure peak memory, count FLOPs; with
    `profile_path`, profile `PROFILE_STEPS` more steps and append their operator table to that file."""
    import torch

    from benchmarks import measure
    from dist_model.flops import count_flops

    built = _prepare(variant, preset, device_name, dtype, matmul_size, classes, keep_text_tower,
                     activation_checkpointing, compile_model, compile_mode, compile_frozen)
    device, base, model, optimizer = built.device, built.base, built.model, built.optimizer
    video, labels = built.make_input(batch)

    def forward_backward() -> None:
        built.forward_backward(video, labels)

    def step() -> None:
        forward_backward()
        optimizer.step()

    measure.synchronize(device)
    model_memory = (torch.cuda.memory_allocated(device) if device.type == "cuda" else measure.rss_bytes()) - base
    measure.time_calls(step, warmup, device)
    timed = measure.time_calls_with_cpu(step, steps, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = measure.peak_rss_bytes() - base
    profile = measure.profile_calls(step, PROFILE_STEPS, device) if profile_path else None
    if profile:
        with open(profile_path, "a") as f:
            seen = (f"per step {profile.device_busy_s * 1e3:.2f} ms with a kernel running, {profile.kernels:.0f} "
                    f"kernels" if profile.kernels else "host operator times (no device kernels)")
            f.write(f"=== {variant}, batch {batch}: {PROFILE_STEPS} steps profiled after the timed ones; {seen}\n"
                    f"{profile.table}\n\n")
    rate_after = measure.matmul_rate(device, built.compute_dtype, matmul_size)
    with torch.compiler.set_stance("force_eager"):  # FlopCounterMode counts eager ops; compiled code is the same math
        flops = count_flops(forward_backward)  # counting only, not timing
        ops = measure.count_dispatched_ops(forward_backward)
    return VariantResult(
        variant=variant,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        step_seconds=[wall for wall, _ in timed],
        step_cpu_seconds=[cpu for _, cpu in timed],
        peak_memory_bytes=peak,
        model_memory_bytes=model_memory,
        flops_per_step=flops,
        matmul_flops_per_s=(built.rate_before + rate_after) / 2,
        memory_method=built.method,
        batch=batch,
        ops_per_step=ops,
        profiled=profile is not None,
        device_busy_s=profile.device_busy_s if profile else 0.0,
        kernels_per_step=profile.kernels if profile else 0.0,
    )


def probe_variant(variant: str, preset: str, limit: int, device_name: str, dtype: str, classes: int = 10,
                  keep_text_tower: bool = False, activation_checkpointing: bool | int = False) -> ProbeResult:
    """The largest batch (at most `limit`) of `variant`'s eager step that stays under the device's memory budget.
    One optimizer step at batch 1 first, so the optimizer state is resident while the sizes are measured; the margin
    the search keeps (15%) covers what compiled code or CUDA graphs add."""
    from workflows.micro_batch import MemoryGauge, find_micro_batch

    built = _prepare(variant, preset, device_name, dtype, 256, classes, keep_text_tower, activation_checkpointing,
                     False, None, False)
    built.forward_backward(*built.make_input(1))
    built.optimizer.step()
    probe = find_micro_batch(lambda b: built.forward_backward(*built.make_input(b)), MemoryGauge(built.device), limit)
    return ProbeResult(variant=variant, cap=probe.cap, limit=limit, stopped=probe.stopped, tried=probe.tried)


# --- the driver ---
def checkpointed_layers_arg(args: argparse.Namespace) -> list[str]:
    """`--activation-checkpointing`'s optional N, as the worker's command line needs it."""
    setting = args.activation_checkpointing
    return [] if isinstance(setting, bool) else [str(setting)]


def checkpointing_label(setting: bool | int) -> str:
    if not setting:
        return "off"
    return "on (DiST branch, every fusion layer)" if setting is True else f"on (DiST branch, first {setting} layers)"


def run_in_subprocess(variant: str, args: argparse.Namespace, probe: bool = False) -> VariantResult | ProbeResult:
    """Run one variant in a fresh Python process (clean peak memory) and parse its result; `probe`: find its
    largest batch instead (--batch max)."""
    cmd = [
        sys.executable, "-m", "benchmarks.train_step", "--worker", variant, "--preset", args.preset,
        *(["--probe", "--max-batch", str(args.max_batch)] if probe else []),
        "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
        "--matmul-size", str(args.matmul_size), *(["--keep-text-tower"] if args.keep_text_tower else []),
        *(["--activation-checkpointing", *checkpointed_layers_arg(args)] if args.activation_checkpointing else []),
        *(["--compile"] if args.compile else []),
        *(["--compile-mode", args.compile_mode] if args.compile_mode else []),
        *(["--compile-frozen"] if args.compile_frozen else []),
        *(["--profile", args.profile] if args.profile and not probe else []),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=_REPO_ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        what = "probe" if probe else "worker"
        raise RuntimeError(f"train_step {what} {variant!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    fields = json.loads(lines[-1][len(_RESULT_TAG):])
    if probe:
        return ProbeResult(**{**fields, "tried": {int(b): p for b, p in fields["tried"].items()}})
    return VariantResult(**fields)


def largest_common_batch(args: argparse.Namespace) -> int:
    """`--batch max`: each variant's largest batch (up to --max-batch), probed in its own process; the ratios compare
    the variants at the smallest of them, the largest batch all three hold (the full fine-tune's, as a rule)."""
    # The hungriest first: each later probe stops at the smallest cap so far, the only batch that can matter.
    probes, limit = [], args.max_batch
    for variant in ("full", "adapter", "dist"):
        probes.append(run_in_subprocess(variant, argparse.Namespace(**{**vars(args), "max_batch": limit}), probe=True))
        limit = min(limit, probes[-1].cap)
    print(f"largest batch that fits: {'; '.join(p.summary() for p in probes)} -> every variant at batch {limit}",
          flush=True)
    return limit


def merge_repeats(repeats: list[dict[str, VariantResult]]) -> dict[str, VariantResult]:
    """One result per variant over all repeats: every timed step pooled, the median peak and resident memory."""
    merged = {}
    for variant in VARIANTS:
        runs = [r[variant] for r in repeats]
        merged[variant] = VariantResult(
            variant=variant,
            trainable_params=runs[0].trainable_params,
            total_params=runs[0].total_params,
            step_seconds=[t for r in runs for t in r.step_seconds],
            step_cpu_seconds=[t for r in runs for t in r.step_cpu_seconds],
            peak_memory_bytes=int(statistics.median(r.peak_memory_bytes for r in runs)),
            model_memory_bytes=int(statistics.median(r.model_memory_bytes for r in runs)),
            flops_per_step=runs[0].flops_per_step,
            matmul_flops_per_s=statistics.median(r.matmul_flops_per_s for r in runs),
            memory_method=runs[0].memory_method,
            batch=runs[0].batch,
            ops_per_step=runs[0].ops_per_step,
            profiled=runs[0].profiled,
            device_busy_s=statistics.median(r.device_busy_s for r in runs),
            kernels_per_step=statistics.median(r.kernels_per_step for r in runs),
        )
    return merged


def median_ratios(repeats: list[dict[str, VariantResult]]) -> dict[str, float]:
    """Each ratio's median over repeats, every ratio taken within one repeat."""
    per_repeat = [summarise(r) for r in repeats]
    return {key: statistics.median(r[key] for r in per_repeat) for key in per_repeat[0]}


def summarise(results: dict[str, VariantResult]) -> dict[str, float]:
    """The ratios line's values: DiST against each baseline, and DiST's utilisation of the matmul rate."""
    dist, full, adapter = results["dist"], results["full"], results["adapter"]
    return {
        "dist_vs_full_time": dist.step_time / full.step_time,
        "dist_vs_full_mem": dist.peak_memory_bytes / full.peak_memory_bytes,
        "dist_vs_adapter_time": dist.step_time / adapter.step_time,
        "dist_utilisation": dist.utilisation,
        "dist_vs_adapter_mem": dist.peak_memory_bytes / adapter.peak_memory_bytes,
        "dist_vs_full_flops": dist.flops_per_step / full.flops_per_step,
        "dist_vs_full_cpu_time": dist.step_cpu_time / full.step_cpu_time,
        "dist_vs_adapter_cpu_time": dist.step_cpu_time / adapter.step_cpu_time,
        "dist_gflops_per_s": dist.achieved_flops_per_s / 1e9,
        "dist_clips_per_s": dist.clips_per_s,
        "dist_vs_adapter_ops": dist.ops_per_step / max(1, adapter.ops_per_step),
        "matmul_gflops_per_s": dist.matmul_flops_per_s / 1e9,
    }


def format_table(results: dict[str, VariantResult]) -> str:
    """A markdown table of the measured variants."""
    head = (
        "| variant | trainable params | step s (median) | step s (min..max) | CPU s/step | peak mem MiB "
        "| resident before step MiB | GFLOP/step | GFLOP/s | % of matmul | clips/s | aten ops/step |"
    )
    rows = [head, "|" + "---|" * 12]
    for r in results.values():
        rows.append(
            f"| {r.variant} | {r.trainable_params / 1e6:.2f} M | {r.step_time:.3f} | "
            f"{min(r.step_seconds):.3f}..{max(r.step_seconds):.3f} | "
            f"{r.step_cpu_time:.2f} | {r.peak_memory_bytes / 2**20:.0f} | "
            f"{r.model_memory_bytes / 2**20:.0f} | {r.flops_per_step / 1e9:.1f} | {r.achieved_flops_per_s / 1e9:.1f} | "
            f"{100 * r.utilisation:.0f}% | {r.clips_per_s:.2f} | {r.ops_per_step} |"
        )
    return "\n".join(rows)


def profile_summary(r: VariantResult) -> str:
    """One line of what --profile saw for a variant (the tables are in the --profile file)."""
    if not r.kernels_per_step:  # a CPU: no kernels to time, only the operator table
        return f"{r.variant}: operator table written (CPU: no device-busy time)"
    return (f"{r.variant}: device busy {100 * r.device_busy:.0f}% of the step ({r.device_busy_s * 1e3:.1f} ms of "
            f"{r.step_time * 1e3:.1f}), {r.kernels_per_step:.0f} kernels/step")


def _compile_summary(args: argparse.Namespace) -> str:
    if not args.compile:
        return "off"
    return "on" + (f" mode={args.compile_mode}" if args.compile_mode else "") + (
        " (DiST's frozen CLIP too)" if args.compile_frozen else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="dist_b16_k400", help="DiST preset (dist_tiny for a smoke run)")
    parser.add_argument("--batch", type=_batch_arg, default=1,
                        help="clips per step, or `max`: the largest batch every variant holds, probed first")
    parser.add_argument("--max-batch", type=int, default=1024, help="with --batch max: the largest batch tried")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (optimizer state, caches)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the three variants this many times, alternating their order; ratios are medians "
                             "over repeats of within-repeat ratios")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="square matmul that measures the machine's rate")
    parser.add_argument("--keep-text-tower", action="store_true",
                        help="keep CLIP's text tower resident during the steps (by default every variant caches the "
                             "class embeddings and releases it first)")
    parser.add_argument("--activation-checkpointing", nargs="?", type=int, const=True, default=False, metavar="N",
                        help="recompute the DiST branch's activations in the backward (dist and full variants): in "
                             "every fusion layer, or in the first N")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile what autograd runs through in each variant, fullgraph=True (a graph "
                             "break fails the run; needs --warmup >= 1: the first step compiles)")
    parser.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"),
                        help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs on a GPU)")
    parser.add_argument("--compile-frozen", action="store_true",
                        help="with --compile, also compile DiST's frozen CLIP forward (baselines: compiled anyway)")
    parser.add_argument("--profile", metavar="FILE",
                        help="after the timed steps, run 3 more of each variant under torch.profiler and write "
                             "their operator tables to FILE; on a GPU, also report how much of the step a kernel "
                             "was running (device busy)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant here
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # internal: the worker probes
    args = parser.parse_args(argv)
    if (args.batch != "max" and args.batch < 1) or args.steps < 1 or args.warmup < 0 or args.repeats < 1 \
            or args.max_batch < 1:
        parser.error("--batch, --max-batch, --steps and --repeats must be >= 1 and --warmup >= 0")
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup >= 1: the first step compiles and must not be timed")
    if (args.compile_mode or args.compile_frozen) and not args.compile:
        parser.error("--compile-mode and --compile-frozen go with --compile")
    return args


def _batch_arg(value: str) -> int | str:
    if value == "max":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch takes a number of clips or `max`, not {value!r}") from None


def main(argv: list[str] | None = None) -> dict[str, VariantResult]:
    """Run the benchmark (or, with --worker, one variant), print the table and the ratios line last."""
    args = parse_args(argv)
    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.probe:
            found = probe_variant(args.worker, args.preset, args.max_batch, args.device, args.dtype,
                                  keep_text_tower=args.keep_text_tower,
                                  activation_checkpointing=args.activation_checkpointing)
            print(_RESULT_TAG + json.dumps(asdict(found)), flush=True)
            return {}
        result = run_variant(args.worker, args.preset, args.batch, args.steps, args.warmup, args.device, args.dtype,
                             args.matmul_size, keep_text_tower=args.keep_text_tower,
                             activation_checkpointing=args.activation_checkpointing, compile_model=args.compile,
                             compile_mode=args.compile_mode, compile_frozen=args.compile_frozen,
                             profile_path=args.profile)
        print(_RESULT_TAG + json.dumps(asdict(result)), flush=True)
        return {args.worker: result}

    from benchmarks.measure import ratios_line

    threads = args.threads or _default_threads()
    args.threads = threads
    probed = args.batch == "max"
    if args.profile:  # each variant's worker appends its table
        Path(args.profile).parent.mkdir(parents=True, exist_ok=True)
        Path(args.profile).write_text("")
    if probed:
        args.batch = largest_common_batch(args)
    print(
        f"train_step: preset={args.preset} batch={args.batch}{' (max)' if probed else ''} steps={args.steps} "
        f"warmup={args.warmup} "
        f"device={args.device} dtype={args.dtype} threads={threads} repeats={args.repeats} "
        f"text_tower={'kept' if args.keep_text_tower else 'released after caching the class embeddings'} "
        f"activation_checkpointing={checkpointing_label(args.activation_checkpointing)} "
        f"compile={_compile_summary(args)}",
        flush=True,
    )
    repeats = []
    for repeat in range(args.repeats):
        order = VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]
        results = {}
        for variant in order:
            results[variant] = r = run_in_subprocess(variant, args)
            print(f"  {'' if args.repeats == 1 else f'repeat {repeat + 1}/{args.repeats} '}{variant}: "
                  f"{r.step_time:.3f} s/step, peak {r.peak_memory_bytes / 2**20:.0f} MiB", flush=True)
            if r.profiled:
                print(f"  profile: {profile_summary(r)}", flush=True)
        repeats.append(results)
    results = merge_repeats(repeats)
    print(f"peak memory: {results['dist'].memory_method}")
    if args.repeats > 1:
        print(f"(step times pooled over {args.repeats} repeats; memory: the median repeat; ratios: the median over "
              f"repeats of each repeat's ratio)")
    print(format_table(results))
    print(ratios_line(median_ratios(repeats)), flush=True)
    return results


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
