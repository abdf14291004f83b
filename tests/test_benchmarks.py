"""Benchmark machinery on the tiny preset: the real entry point runs, its last line parses, its counts make sense.

No timing assertions: wall-clock goals live in the benchmarks' printed ratios, never in tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import time
from pathlib import Path

import pytest
import torch

from benchmarks.measure import finite_positive, parse_ratios, ratios_line, spread
from benchmarks.train_step import VARIANTS, main

SMOKE_RECIPE = Path(__file__).parents[1] / "workflows" / "configs" / "smoke.yaml"
RATIO_NAMES = ("dist_vs_full_time", "dist_vs_full_mem", "dist_vs_adapter_time", "dist_utilisation")


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory) -> Path:
    """Where `tiny_run` writes its --profile tables (in a folder that does not exist yet)."""
    return tmp_path_factory.mktemp("profile") / "sub" / "tiny.txt"


@pytest.fixture(scope="module")
def tiny_run(tiny_profile):
    """One real run of `python -m benchmarks.train_step` on dist_tiny (a probe and a timed worker subprocess per
    variant: `--batch max` up to 2 clips, then 3 profiled steps into `tiny_profile`), stdout captured."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = main(["--preset", "dist_tiny", "--steps", "2", "--warmup", "1", "--matmul-size", "256",
                        "--batch", "max", "--max-batch", "2", "--profile", str(tiny_profile)])
    return results, out.getvalue()


def test_batch_max_probes_every_variant_then_runs_them_at_the_smallest_cap(tiny_run):
    results, stdout = tiny_run
    # dist_tiny holds 2 clips in any variant: each probe's search ends at its limit, --max-batch for the first
    # (the full fine-tune) and the smallest cap so far for the next.
    probe_line = next(line for line in stdout.splitlines() if line.startswith("largest batch that fits: "))
    assert probe_line.startswith("largest batch that fits: full 2 (limit 2; 1: "), probe_line
    for variant in VARIANTS:
        assert f"{variant} 2 (limit 2; 1: " in probe_line, probe_line
    assert probe_line.endswith("-> every variant at batch 2")
    assert "batch=2 (max)" in stdout
    assert {r.batch for r in results.values()} == {2}


def test_batch_max_probes_the_hungriest_first_and_caps_the_rest_at_its_batch(monkeypatch, capsys):
    import benchmarks.train_step as train_step

    holds = {"full": 40, "adapter": 90, "dist": 300}  # what each variant's memory would hold
    limits = []

    def probe(variant, args, probe=False):
        assert probe
        limits.append((variant, args.max_batch))
        cap = min(holds[variant], args.max_batch)
        return train_step.ProbeResult(variant, cap, args.max_batch, "budget" if cap < args.max_batch else "limit",
                                      {cap: 2**30})

    monkeypatch.setattr(train_step, "run_in_subprocess", probe)
    assert train_step.largest_common_batch(train_step.parse_args(["--batch", "max", "--max-batch", "64"])) == 40
    assert limits == [("full", 64), ("adapter", 40), ("dist", 40)]
    assert "full 40 (budget; 40: 1.00 GiB); adapter 40 (limit 40;" in capsys.readouterr().out


def test_batch_takes_a_number_or_max():
    from benchmarks.train_step import parse_args

    assert parse_args(["--batch", "max"]).batch == "max" and parse_args(["--batch", "3"]).batch == 3
    for bad in (["--batch", "big"], ["--batch", "0"], ["--batch", "max", "--max-batch", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_last_line_is_the_ratios_line_with_finite_positive_values(tiny_run):
    _, stdout = tiny_run
    last = stdout.strip().splitlines()[-1]
    ratios = parse_ratios(last)
    for name in RATIO_NAMES:
        assert name in ratios, f"{name} missing from {last!r}"
        assert finite_positive(ratios[name]), f"{name}={ratios[name]} is not finite and positive"
    assert "| dist |" in stdout and "| full |" in stdout and "| adapter |" in stdout, "the table lists every variant"


def test_repeats_pool_steps_and_take_median_ratios(tiny_run):
    from benchmarks.train_step import median_ratios, merge_repeats, summarise

    results, _ = tiny_run
    slower = {k: dataclasses.replace(v, step_seconds=[3 * t for t in v.step_seconds]) for k, v in results.items()}
    slower["dist"] = dataclasses.replace(results["dist"], step_seconds=[9 * t for t in results["dist"].step_seconds])
    merged = merge_repeats([results, slower, results])
    assert len(merged["dist"].step_seconds) == 6
    assert merged["full"].peak_memory_bytes == results["full"].peak_memory_bytes
    # Two repeats of one ratio and one of 3x it: the median is the first; a pooled-time ratio would not be.
    expected = summarise(results)["dist_vs_full_time"]
    assert median_ratios([results, slower, results])["dist_vs_full_time"] == pytest.approx(expected)


def test_counted_flops_and_trainable_parameters(tiny_run):
    results, _ = tiny_run
    assert set(results) == set(VARIANTS)
    for r in results.values():
        assert r.flops_per_step > 0, f"{r.variant}: no FLOPs counted"
        assert r.peak_memory_bytes > 0 and r.matmul_flops_per_s > 0
        assert len(r.step_seconds) == 2
    dist, full, adapter = results["dist"], results["full"], results["adapter"]
    assert dist.trainable_params < full.trainable_params
    assert dist.total_params == full.total_params, "the same model, only the frozen set differs"
    # Backward through CLIP makes the baselines' counted work larger than DiST's.
    assert full.flops_per_step > dist.flops_per_step and adapter.flops_per_step > 0
    # The full fine-tune runs DiST's branch and, on top, CLIP's backward: more ops dispatched.
    assert full.ops_per_step > dist.ops_per_step > 0 and adapter.ops_per_step > 0
    assert dist.clips_per_s == pytest.approx(dist.batch / dist.step_time)


def test_dispatched_ops_are_counted_exactly():
    from benchmarks.measure import count_dispatched_ops

    x = torch.randn(4)
    assert count_dispatched_ops(lambda: (x + 1).sum()) == 2  # aten.add, aten.sum
    assert count_dispatched_ops(lambda: None) == 0


def test_compile_options_need_compile():
    from benchmarks.train_step import parse_args

    for extra in (["--compile-frozen"], ["--compile-mode", "reduce-overhead"]):
        with pytest.raises(SystemExit):
            parse_args(["--warmup", "1", *extra])
    args = parse_args(["--compile", "--compile-frozen", "--compile-mode", "reduce-overhead", "--warmup", "1"])
    assert args.compile_frozen and args.compile_mode == "reduce-overhead"


def test_ratios_line_round_trips():
    line = ratios_line({"a_vs_b": 0.25, "util": 0.5})
    assert line == "ratios: a_vs_b=0.25 util=0.5"
    assert parse_ratios(line) == {"a_vs_b": 0.25, "util": 0.5}
    with pytest.raises(ValueError):
        parse_ratios("dist: 1.0 s/step")


def test_spread_gives_each_repeat_then_the_mean_and_two_standard_errors():
    # stdev of (0.9, 1.0, 1.1) is 0.1: two standard errors of the mean of three are 2 * 0.1 / sqrt(3) = 0.115
    assert spread([0.9, 1.0, 1.1]) == "0.90 1.00 1.10 (mean 1.00 ± 0.12)"
    assert spread([1.234]) == "1.23"  # one repeat: no interval to give


def test_machine_idle_is_a_share_and_drops_while_this_process_spins():
    import os

    from benchmarks.measure import MachineIdle

    assert math.isnan(MachineIdle().fraction)  # never started
    if not Path("/proc/stat").exists():
        pytest.skip("the machine-idle share reads /proc/stat (Linux)")
    meter = MachineIdle()
    meter.start()
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:  # keep one core busy
        pass
    meter.sample()
    spinning = meter.fraction
    # One busy core of n leaves at most (n - 1) / n of the machine idle (plus scheduling slack).
    cores = os.cpu_count() or 1
    assert 0.0 <= spinning <= (cores - 1) / cores + 0.1, spinning


def test_baselines_freeze_and_unfreeze_the_right_parameters():
    from benchmarks.train_step import build_variant

    full = build_variant("full", "dist_tiny", "fp32")
    visual = full.clip.model.visual
    assert all(p.requires_grad for p in visual.transformer.parameters())
    assert not any(p.requires_grad for p in full.clip.model.transformer.parameters()), "the text tower stays frozen"
    adapter = build_variant("adapter", "dist_tiny", "fp32")
    assert not any(p.requires_grad for p in adapter.clip.parameters())
    video = torch.randn(2, 3, 8, 32, 32)
    adapter.train()
    adapter(video, ["a", "b"]).sum().backward()
    first = adapter.adapter_net.adapters[0]
    # The lowest adapter's up-projection gets a gradient only if the backward ran through every frozen block.
    assert first.up.weight.grad is not None and first.up.weight.grad.abs().sum() > 0


def test_baseline_clip_forward_matches_frozen_clip_tokens():
    from benchmarks.baselines import clip_tokens_with_grad
    from dist_model import DiSTConfig, build_clip

    torch.manual_seed(0)
    clip = build_clip(DiSTConfig.from_name("dist_tiny"))
    frames = torch.randn(4, 3, 32, 32)
    taps = {1, 3}
    expected = clip.forward_tokens(frames, taps, stop=3)
    got = clip_tokens_with_grad(clip, frames, taps, stop=3)
    for block in taps:
        torch.testing.assert_close(got[block], expected[block], rtol=1e-5, atol=1e-5)


def test_memory_efficient_quick_gelu_gradient_matches_autograd():
    from dist_model.layers import _QuickGELU, quick_gelu

    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_QuickGELU.apply, (x,))
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x), rtol=0, atol=0)


# --- ingest and end_to_end: the real entry points at tiny sizes on the session's local Ray ---
def _run(main, argv: list[str]) -> tuple[object, dict[str, float], str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = main(argv)
    stdout = out.getvalue()
    return results, parse_ratios(stdout.strip().splitlines()[-1]), stdout


@pytest.mark.integration
def test_ingest_smoke_prints_the_ratios_line(ray_local, tmp_path):
    from benchmarks.ingest import main as ingest_main

    results, ratios, stdout = _run(ingest_main, [
        "--videos", "24", "--sizes", "96x64", "--video-frames", "24", "--frames", "4", "--crop", "32",
        "--batch", "4", "--map-batch", "2", "--warmup-clips", "4", "--tail-clips", "4", "--single-videos", "3",
        "--repeats", "1", "--workers", "2", "--cache", str(tmp_path)])
    for name in ("ray_vs_dataloader", "ray_vs_decode_limit", "ray_vs_dataloader_96x64",
                 "dataloader_vs_decode_limit_96x64", "ray_select_columns_vs_dataloader_96x64", "decord_share_96x64"):
        assert name in ratios, f"{name} missing"
        assert finite_positive(ratios[name]), f"{name}={ratios[name]}"
    (size,) = results
    # Every pipeline made the same clips from the same videos, and timed the same window.
    assert {r.total_clips for runs in size.runs.values() for r in runs} == {24}
    assert len({r.clips for runs in size.runs.values() for r in runs}) == 1
    assert "| 96x64 | DataLoader |" in stdout and "| 96x64 | Ray Data |" in stdout
    assert "| vs DataLoader, each repeat |" in stdout and "| machine idle |" in stdout
    if Path("/proc/stat").exists():  # the machine-idle share is measured on Linux only (NaN elsewhere)
        assert all(0.0 <= r.machine_idle <= 1.0 for runs in size.runs.values() for r in runs)


@pytest.mark.integration
def test_end_to_end_smoke_prints_the_ratios_line(ray_local, tmp_path):
    from benchmarks.end_to_end import main as e2e_main

    (pair,), ratios, stdout = _run(e2e_main, [
        "--recipe", str(SMOKE_RECIPE), "--steps", "3", "--warmup-steps", "1", "--log-every", "1",
        "--no-deepspeed-loop", "--cache", str(tmp_path)])
    for name in ("workflow_vs_ddp", "workflow_vs_ddp_cpu_per_clip"):
        assert finite_positive(ratios[name]), f"{name}={ratios[name]}"
    assert 0 <= ratios["workflow_data_wait"] <= 1 and 0 <= ratios["ddp_data_wait"] <= 1
    for run in pair.values():
        assert run.timed_steps == 2 and run.global_batch == 8
    assert "| 0 | workflow |" in stdout and "| 0 | ddp |" in stdout


# --- benchmarks.targets and gpu_checks.sh's `targets` mode ---
def test_profile_appends_each_variants_operator_table_after_the_timed_steps(tiny_run, tiny_profile):
    """--profile: every variant's worker profiles 3 steps after its timed ones (the timings stay unprofiled) and
    appends a section to one file; on a CPU there are no kernels, so no device-busy share is claimed."""
    from benchmarks.train_step import PROFILE_STEPS

    results, stdout = tiny_run
    sections = tiny_profile.read_text().split("=== ")[1:]
    assert [s.split(",")[0] for s in sections] == list(VARIANTS)
    for section in sections:
        assert f"{PROFILE_STEPS} steps profiled after the timed ones; host operator times" in section
        assert "Self CPU" in section and "aten::" in section and "autograd::engine" in section  # the backward too
    assert "aten::_fused_adamw_" in sections[0]  # the optimizer step is in the profiled step
    for variant, result in results.items():
        assert result.profiled and result.device_busy_s == result.kernels_per_step == 0
        assert f"  profile: {variant}: operator table written (CPU: no device-busy time)" in stdout


def test_device_busy_time_counts_overlapping_kernels_once():
    from benchmarks.measure import busy_length

    assert busy_length([]) == 0
    assert busy_length([(0, 2), (1, 3), (5, 6)]) == 4  # two streams overlapping, then a gap
    assert busy_length([(5, 6), (0, 10), (2, 3)]) == 10  # inside an earlier one: not counted again


def test_targets_reads_a_train_step_log(tiny_run, tmp_path):
    from benchmarks.targets import parse_log

    results, stdout = tiny_run
    log = tmp_path / "tiny_max.log"
    log.write_text(stdout)
    run = parse_log(log)
    assert (run.name, run.preset, run.batch, run.largest, run.mode) == ("tiny_max", "dist_tiny", 2, True, "eager")
    assert run.ratios == parse_ratios(stdout.strip().splitlines()[-1])
    assert run.utilisation["dist"] == run.ratios["dist_utilisation"], "not the table's whole percent"
    for variant, result in results.items():
        assert run.step_s[variant] == pytest.approx(result.step_time, abs=5e-4)
        assert run.clips_per_s[variant] == pytest.approx(result.clips_per_s, abs=5e-3)
    assert run.profile == [f"{v}: operator table written (CPU: no device-busy time)" for v in VARIANTS]
    from benchmarks.targets import render

    assert "Profiled in tiny_max (`--profile`): dist: operator table" in render([run], [])
    (tmp_path / "cut.log").write_text(stdout.split("ratios: ")[0])  # cut off before its ratios line
    assert parse_log(tmp_path / "cut.log") is None


def _target_run(name, batch, mode, dist, adapter, full, largest=False, clips=100.0, util=0.1, mem=0.3):
    from benchmarks.targets import B16, Run

    return Run(name=name, preset=B16, batch=batch, largest=largest, mode=mode,
               step_s={"dist": dist, "adapter": adapter, "full": full}, clips_per_s={"dist": clips},
               utilisation={"dist": util}, ratios={"dist_vs_full_mem": mem})


def test_targets_compare_each_variant_in_its_best_mode():
    from benchmarks.targets import check_targets

    runs = [  # compiled DiST is fastest; the adapter's best is under CUDA graphs, the full fine-tune's compiled
        _target_run("compiled", 16, "compiled", dist=0.05, adapter=0.10, full=0.20, clips=320, util=0.2, mem=0.34),
        _target_run("graphs", 16, "compiled mode=reduce-overhead", dist=0.06, adapter=0.07, full=0.25, clips=267),
        _target_run("max", 128, "compiled", dist=0.16, adapter=0.30, full=0.50, largest=True, clips=800, util=0.45,
             mem=0.40),
    ]
    verdicts = {target: (value, where, verdict) for target, value, where, verdict in check_targets(runs)}

    def row(start):
        return next(v for t, v in verdicts.items() if t.startswith(start))

    value, where, verdict = row("`dist_vs_adapter_time` <= 0.6 at batch 16")
    assert (value, verdict) == ("0.71", "not met") and "adapter compiled mode=reduce-overhead (graphs)" in where
    assert row("`dist_vs_full_time` <= 0.45 at batch 16")[::2] == ("0.25", "met")
    assert row("`dist_vs_full_mem` <= 0.35 at batch 16")[::2] == ("0.34", "met")
    assert row("`dist_vs_adapter_time` <= 0.6 at the largest batch (batch 128)")[::2] == ("0.53", "met")
    assert row("`dist_vs_full_mem` <= 0.35 at the largest batch")[::2] == ("0.40", "not met")
    assert row("DiST's share")[::2] == ("0.45", "met") and row("DiST >= 750")[::2] == ("800", "met")
    # Without the largest-batch run its targets are not measured, never met.
    missing = check_targets(runs[:2])
    assert [v for t, _, _, v in missing if "largest" in t] == ["not measured"] * 3


def test_gpu_checks_targets_skips_runs_past_its_budget_and_still_writes_the_table(tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).parents[1]
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, OUT=str(tmp_path), MIN_STEP_S="1000000",
               PYTHONPATH=str(repo))
    proc = subprocess.run(["bash", "benchmarks/gpu_checks.sh", "targets"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = ["b16_bs16_compiled", "b16_max_compiled", "b16_bs16_cudagraphs", "l14_max_compiled"]
    for name in names:
        assert "SKIPPED" in (tmp_path / f"{name}.log").read_text()
    table = (tmp_path / "targets.md").read_text()
    assert table.count("| not measured |") == 8 and "| met |" not in table
    assert "No ratios line (failed, or cut by the time budget): " + ", ".join(names) in table


def test_prediction_tables_prints_sizes_and_the_ratios_line(capsys):
    """The real tables on a few rows: a line per format and --top, then Parquet / CSV ratios (no timing asserted;
    the bytes of --top all at 50 classes are smaller as Parquet: a float32 each, against ~15 characters as CSV)."""
    from benchmarks.prediction_tables import main as tables_main

    ratios = tables_main(["--classes", "50", "--rows", "200"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert parse_ratios(lines[-1]) == pytest.approx(ratios, rel=1e-3)
    assert set(ratios) == {"parquet_vs_csv_bytes_all", "parquet_vs_csv_write_time_all", "parquet_vs_csv_bytes_top5",
                           "parquet_vs_csv_write_time_top5"}
    assert all(finite_positive(v) for v in ratios.values())
    assert ratios["parquet_vs_csv_bytes_all"] < 0.6
    assert [line.split(" | ")[:2] for line in lines if line.startswith("| csv") or line.startswith("| parquet")] == [
        ["| csv", "all"], ["| parquet", "all"], ["| csv", "top 5"], ["| parquet", "top 5"]]
