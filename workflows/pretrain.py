"""Pre-training and fine-tuning: `python -m workflows pretrain --config RECIPE.yaml [--set key=value ...]`.

The driver validates the recipe (before any Ray work), then runs a Ray Train `TorchTrainer`. Each worker builds
DiST, wraps it in a DeepSpeed engine (only the trainable part is optimised; the frozen CLIP rides along
without gradients), and trains on its clip feed (see feeds.py) with the reference recipe: AdamW, warm-up +
cosine per step, mixup/cutmix/label smoothing and CLIP normalisation on the device. Validation every N steps
is distributed (each val clip counted once); every validation reports a checkpoint. Fine-tuning is the same
workflow with `train.init_from` and another label file: only the label texts change.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from workflows.capacity import check_capacity
from workflows.config_loader import ConfigError, add_override_option, dump_yaml
from workflows.recipe import (
    Recipe,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    with_absolute_paths,
    with_run_scoped_names,
)
from workflows.runtime import ensure_ray, is_remote, label_selector, local_cpus_for

LOG_PREFIX = "[pretrain]"


# ---------------------------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------------------------


def _fail_once_marker(recipe: Recipe) -> Path:
    base = Path(recipe.run_dir) if not is_remote(recipe.run_dir) else Path(tempfile.gettempdir()) / recipe.run.name
    return base / ".injected_failure_done"


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: build, (resume,) train, validate, checkpoint."""
    import ray.data
    import ray.train
    import torch

    recipe = recipe_from_dict(config["recipe"])
    ray.data.DataContext.get_current().enable_progress_bars = False  # per-worker pipelines: bars garble the log
    # DeepSpeed's ZeRO calls a deprecated torch collective on every step; one warning per step drowns the progress.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Where each rank landed (one line per rank): shows how the cluster placed the workers.
    print(f"{LOG_PREFIX} worker rank {rank}/{world} on node {ray.get_runtime_context().get_node_id()} "
          f"(ip {ray.util.get_node_ip_address()}, pid {os.getpid()})", flush=True)
    use_gpu = recipe.scaling.use_gpu
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo) on CPU-only runs
    import deepspeed

    from dist_model import PRECISION_DTYPES, build_dist, build_spatial_only, normalize_video
    from workflows.checkpoints import (
        DS_TAG,
        init_model_from,
        install_safe_checkpoint_engine,
        master_weights,
        write_checkpoint,
    )
    from workflows.data.drops import get_drop_report
    from workflows.feeds import ClipFeeds, drop_summary, steps_per_epoch, total_steps
    from workflows.metrics import (
        VideoScores,
        accuracy_summary,
        all_reduce_counts,
        all_reduce_sum,
        save_confusion_png,
        save_curves_png,
    )
    from workflows.mixup import mix_batch, soft_cross_entropy
    from workflows.optim import build_deepspeed_config, lr_at
    from workflows.tracking import Tracker

    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    torch.manual_seed(recipe.train.seed)  # identical init on every rank (DeepSpeed also broadcasts it)
    if not use_gpu:
        torch.set_num_threads(max(1, int(recipe.scaling.cpus_per_worker)))

    # --- model, optimiser, schedule ---
    cfg = recipe.model_cfg
    build = build_spatial_only if recipe.model.variant == "spatial_only" else build_dist
    model = build(cfg)
    if recipe.train.init_from and ray.train.get_checkpoint() is None:
        message = init_model_from(model, recipe.train.init_from)
        if rank == 0:
            print(f"{LOG_PREFIX} {message}", flush=True)
    model.to(device)

    feeds = ClipFeeds(recipe, rank, world, device)
    class_names = feeds.class_names
    # Training and validation score one label set: embed it once, then free the text tower (63 M parameters at
    # B/16, 123 M at L/14) that no step reads.
    model.text_embeddings(class_names, device)
    freed = model.clip.release_text_tower()
    if rank == 0:
        print(f"{LOG_PREFIX} cached {len(class_names)} class embeddings; released CLIP's text tower "
              f"({freed / 1e6:.1f} M parameters)", flush=True)
    if recipe.train.compile:
        problem = compile_toolchain_problem(use_gpu)
        if problem:
            raise ConfigError(f"train.compile on node {ray.util.get_node_ip_address()}: {problem}")
        model.compile_trainable()
        if rank == 0:
            print(f"{LOG_PREFIX} train.compile: the trainable branch is compiled at the first step (a minute or more "
                  f"on a few CPU cores)", flush=True)
    per_epoch = steps_per_epoch(recipe, len(feeds.train_manifest))
    total = total_steps(recipe, len(feeds.train_manifest))
    warmup = round(recipe.train.warmup_epochs * per_epoch) if not recipe.train.max_steps else \
        min(round(recipe.train.warmup_epochs * per_epoch), total // 5)
    peak = recipe.peak_lr
    optimizer = torch.optim.AdamW(model.param_groups(recipe.train.weight_decay), lr=peak,
                                  betas=tuple(recipe.train.betas))
    for group in optimizer.param_groups:
        group.pop("name", None)  # DeepSpeed's ZeRO wrapper copies groups; keep only torch's keys

    def schedule(step: int) -> float:  # LambdaLR scales the optimizer's lr (= peak) by this factor
        if peak <= 0:
            return 0.0
        return lr_at(step, peak=peak, total=total, warmup=warmup, start=recipe.train.warmup_start_lr,
                     floor=recipe.train.min_lr) / peak

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(recipe), dist_init_required=False)
    install_safe_checkpoint_engine(engine)
    dtype = PRECISION_DTYPES[recipe.precision()]

    # --- resume ---
    step, epoch, position = 0, 0, 0
    history: dict[str, list[tuple[int, float]]] = {"loss": [], "lr": [], "val_top1": [], "clips_per_s": []}
    best = {"val_top1": -1.0}
    mlflow_run_id = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            _, client = engine.load_checkpoint(directory, tag=DS_TAG, load_module_strict=False)
        state = client["dist_state"]
        step, epoch, position = state["step"], state["epoch"], state["position"]
        history = {k: [tuple(p) for p in v] for k, v in state.get("history", history).items()}
        best = state.get("best", best)
        mlflow_run_id = state.get("mlflow_run_id")
        if rank == 0:
            print(f"{LOG_PREFIX} resumed from step {step} (epoch {epoch}, micro-batch {position})", flush=True)

    resumed_from = step if checkpoint is not None else None

    # --- tracking (rank 0) ---
    tracker = Tracker(None)
    if rank == 0 and recipe.mlflow.enabled:
        from workflows.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(recipe.mlflow.tracking_uri, recipe.run_dir)
        tracker = Tracker(uri, recipe.mlflow.experiment, run_name=recipe.run.name, run_id=mlflow_run_id,
                          parent_run_id=config.get("mlflow_parent_run_id"))
        if mlflow_run_id is None:
            tracker.log_params(recipe_to_dict(recipe))
            tracker.log_text(dump_yaml(recipe), "recipe.yaml")
            tracker.log_metrics({"trainable_params": float(model.num_trainable_params())}, step=0)
        mlflow_run_id = tracker.run_id
        print(f"{LOG_PREFIX} {model.num_trainable_params():,} trainable parameters; {total} steps "
              f"({per_epoch}/epoch), global batch {recipe.train.global_batch_size} = {recipe.train.micro_batch_size}"
              f" x {world} workers x {recipe.grad_accum_steps} accumulation; peak lr {peak:.3g}; "
              f"precision {recipe.precision()}; ZeRO-{recipe.train.zero_stage}", flush=True)

    def validate() -> dict[str, Any]:
        engine.eval()
        scores = VideoScores(len(class_names))
        with torch.no_grad():
            for batch in feeds.val_batches():
                video = normalize_video(batch["frames"], dtype)
                logits = engine(video, class_names, recipe.eval.zero_shot_fusion)
                scores.add(batch["video_index"], logits, batch["label"])
        engine.train()
        counts = all_reduce_counts(scores.counts())
        return {**accuracy_summary(counts), "confusion": counts["confusion"]}

    def report(metrics: dict[str, float], final: bool = False) -> None:
        """Checkpoint on every rank, then one ray.train.report (a barrier) with the checkpoint."""
        state = {"step": step, "epoch": epoch, "position": position, "resumed_from_step": resumed_from,
                 "history": history, "best": best,
                 "mlflow_run_id": mlflow_run_id, "metrics": metrics, "class_names": class_names,
                 "model": recipe_to_dict(recipe)["model"], "final": final}
        with tempfile.TemporaryDirectory(prefix="dist-ckpt-") as tmp:
            write_checkpoint(Path(tmp), engine=engine, model=model, rank=rank, state=state,
                             recipe_yaml=dump_yaml(recipe))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # --- training loop ---
    micro_per_epoch = feeds.micro_batches_per_epoch()  # a multiple of accum: epochs end on a step boundary
    accum = recipe.grad_accum_steps
    eval_every = recipe.eval.every_steps or per_epoch
    mix_gen = torch.Generator().manual_seed(recipe.train.seed * 1000 + rank + 7 * step)
    engine.train()
    def fresh_window() -> dict[str, Any]:
        """What the next progress line reports on. The loss sums on the device: reading it every micro-batch
        (`.item()`) would stall a GPU once per forward."""
        return {"start": time.perf_counter(), "wait": 0.0, "clips": 0, "micro_batches": 0,
                "loss_sum": torch.zeros((), device=device)}

    window = fresh_window()
    run_start, done_at_start = time.perf_counter(), step
    marker = _fail_once_marker(recipe)

    def log_progress() -> None:
        elapsed = time.perf_counter() - window["start"]
        stats = all_reduce_sum(torch.tensor([float(window["loss_sum"]), window["micro_batches"], window["clips"],
                                             window["wait"], elapsed]))
        loss_avg = float(stats[0] / max(1, stats[1]))
        clips_s = float(stats[2] / max(1e-9, stats[4] / world))  # all ranks' clips over the mean wall time
        wait_frac = float(stats[3] / max(1e-9, stats[4]))
        lr = engine.get_lr()[0]
        history["loss"].append((step, loss_avg))
        history["lr"].append((step, lr))
        history["clips_per_s"].append((step, clips_s))
        if rank == 0:
            rate = (step - done_at_start) / max(1e-9, time.perf_counter() - run_start)
            print(f"{LOG_PREFIX} step {step}/{total} | epoch {epoch} | loss {loss_avg:.4f} | lr {lr:.3g} | "
                  f"{clips_s:.1f} clips/s | data wait {100 * wait_frac:.0f}% | "
                  f"ETA {(total - step) / max(1e-9, rate) / 60:.1f} min", flush=True)
            tracker.log_metrics({"loss": loss_avg, "lr": lr, "clips_per_s": clips_s, "data_wait_fraction": wait_frac,
                                 "epoch": float(epoch)}, step=step)
        window.update(fresh_window())

    wrapped_up = False

    def wrap_up() -> None:
        """Rank 0: final drop report, curves and weights to MLflow. Runs before the final ray.train.report: a Tune
        scheduler may stop the trial as soon as that report lands (ASHA at max_t)."""
        nonlocal wrapped_up
        wrapped_up = True
        final_weights = master_weights(engine, model)  # a collective under ZeRO: before the rank-0 check
        if rank != 0:
            return
        drop_report = get_drop_report("train", None, name=recipe.data.drop_counter)
        if drop_report.total_dropped:
            print(f"{LOG_PREFIX} dropped videos: {drop_report.summary()}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            curves = Path(tmp) / "training_curves.png"
            save_curves_png(history, curves)
            tracker.log_artifact(curves)
            from safetensors.torch import save_file

            weights = Path(tmp) / "weights.safetensors"
            save_file(final_weights, str(weights))
            tracker.log_artifact(weights, "final_checkpoint")
        tracker.finish()

    def validate_and_checkpoint() -> None:
        nonlocal best
        val = validate()
        metrics: dict[str, Any] = {"step": step, "epoch": epoch, "val_top1": val["top1"], "val_top5": val["top5"],
                                   "val_mean_class_acc": val["mean_class_acc"]}
        history["val_top1"].append((step, val["top1"]))
        if val["top1"] > best["val_top1"]:
            best = {"val_top1": val["top1"], "step": step}
        if rank == 0:
            print(f"{LOG_PREFIX} validation at step {step}: top-1 {val['top1']:.2f}% top-5 {val['top5']:.2f}% "
                  f"({int(val['videos'])} videos; best {best['val_top1']:.2f}% at step {best['step']})", flush=True)
            drops = drop_summary(get_drop_report("train", None, name=recipe.data.drop_counter))
            tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("val_")} | drops, step=step)
            if step == total:
                with tempfile.TemporaryDirectory() as tmp:
                    png = Path(tmp) / "confusion_matrix.png"
                    save_confusion_png(val["confusion"], class_names, png,
                                       f"validation, step {step}: top-1 {val['top1']:.1f}%")
                    tracker.log_artifact(png)
        if step == total:
            wrap_up()
        report(metrics, final=step == total)

    while step < total:
        fetch_start = time.perf_counter()
        for batch in feeds.train_batches(epoch, start=position):
            window["wait"] += time.perf_counter() - fetch_start
            video = normalize_video(batch["frames"], dtype)
            video, targets = mix_batch(
                video, batch["label"], len(class_names), mixup_alpha=recipe.train.mixup_alpha,
                cutmix_alpha=recipe.train.cutmix_alpha, prob=recipe.train.mix_prob,
                switch_prob=recipe.train.mix_switch_prob, smoothing=recipe.train.label_smoothing, generator=mix_gen)
            loss = soft_cross_entropy(engine(video, class_names), targets)
            engine.backward(loss)
            engine.step()  # DeepSpeed applies the optimizer and the lr schedule at accumulation boundaries
            window["loss_sum"] += loss.detach().float()
            window["micro_batches"] += 1
            window["clips"] += video.shape[0]
            position += 1
            fetch_start = time.perf_counter()
            if position % accum:
                continue
            step += 1
            if recipe.train.fail_at_step == step and rank == recipe.train.fail_rank and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"injected failure at step {step}\n")
                raise RuntimeError(f"injected failure at step {step} (train.fail_at_step) on rank {rank}")
            if step % recipe.train.log_every_steps == 0 or step == total:
                log_progress()
            epoch_done = position >= micro_per_epoch
            if epoch_done:  # checkpoints taken now must point at the start of the next epoch
                epoch, position = epoch + 1, 0
            if step % eval_every == 0 or step == total:
                validate_and_checkpoint()
                fetch_start = time.perf_counter()
            if epoch_done or step >= total:
                break

    if not wrapped_up:  # e.g. relaunched after the run had already finished
        wrap_up()


# ---------------------------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------------------------


def build_trainer(recipe: Recipe, extra_config: dict[str, Any] | None = None, callbacks: list | None = None,
                  name: str | None = None) -> Any:
    """The Ray Train TorchTrainer for a recipe (also what a Tune trial runs)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    recipe = with_absolute_paths(recipe)
    # Ray 2.60's Train workers replace `print` with one that logs through the root logger *and*, because Ray core
    # wraps the worker's sys.stdout, also prints: every progress line reached the console twice. Ray propagates
    # this switch from the process that starts the run to its workers; a value the user set is kept.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    scaling = recipe.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    selector = label_selector(scaling.worker_node_label)
    return TorchTrainer(
        train_loop_per_worker=train_fn_per_worker,
        train_loop_config={"recipe": recipe_to_dict(recipe), **(extra_config or {})},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources, placement_strategy=scaling.placement_strategy,
                                     **({"label_selector": selector} if selector else {})),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name or recipe.run.name,
            storage_path=recipe.run.storage_path,
            failure_config=FailureConfig(max_failures=recipe.run.max_failures),
            # Checkpoints are written at every validation: keep the best k by val top-1 (Ray keeps the latest too).
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.run.keep_checkpoints,
                                               checkpoint_score_attribute="val_top1",
                                               checkpoint_score_order="max"),
            callbacks=callbacks or [],
        ),
    )


def compile_toolchain_problem(use_gpu: bool) -> str | None:
    """Why torch.compile cannot build kernels on this machine, or None. Inductor writes C++ for CPU kernels; on a
    GPU its kernels are Triton's, and Triton builds a small C launcher for each with the system C compiler."""
    import shutil

    if use_gpu:
        if os.environ.get("CC") or any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
            return None
        return ("torch.compile on GPU needs a C compiler (Triton builds its kernel launchers with cc/gcc); install "
                "one or set train.compile=false")
    if os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++"):
        return None
    return "torch.compile needs a C++ compiler (g++) for CPU kernels; install one or set train.compile=false"


def validate_before_start(recipe: Recipe) -> None:
    """Everything that can be checked without Ray: files, labels, the DeepSpeed config, the tracking store."""
    from workflows.data.manifest import load_labels, load_manifest
    from workflows.optim import build_deepspeed_config

    labels = load_labels(recipe.data.labels)
    for key in ("train_manifest", "val_manifest"):
        manifest = load_manifest(getattr(recipe.data, key), labels, strict=True)
        if len(manifest) == 0:
            raise ConfigError(f"data.{key} {getattr(recipe.data, key)} lists no videos")
    build_deepspeed_config(recipe)
    problem = recipe.train.compile and compile_toolchain_problem(recipe.scaling.use_gpu)
    if problem:
        raise ConfigError(f"train.compile: {problem}")
    init_from = recipe.train.init_from
    if init_from and not is_remote(init_from) and not Path(init_from).exists():
        raise ConfigError(f"train.init_from: {init_from} does not exist (a checkpoint directory of ours, or an "
                          "authors' .pyth file)")
    remote = is_remote(recipe.run.storage_path)
    if recipe.mlflow.enabled and remote and not (recipe.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ConfigError("run.storage_path is remote: set mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to a tracking "
                          "server, e.g. http://<head>:5000")


def run_pretrain(recipe: Recipe) -> Any:
    """Validate, start (or join) Ray, train; returns the Ray Train Result."""
    from workflows.data.drops import drop_counter

    validate_before_start(recipe)
    print(f"{LOG_PREFIX} resolved recipe:\n{dump_yaml(recipe)}", flush=True)
    ensure_ray(local_cpus_for(recipe))
    # Waits for nodes when scaling.wait_for_nodes_s > 0 (scale from zero); resolves data.decode_node_label: the
    # workers get the resolved recipe.
    recipe = check_capacity(recipe, log_prefix=LOG_PREFIX)
    recipe = with_run_scoped_names(recipe)
    counter = drop_counter(recipe.data.drop_counter)  # owned by the driver: survives worker restarts
    result = build_trainer(recipe).fit()
    del counter
    metrics = result.metrics or {}
    print(f"{LOG_PREFIX} finished: step {metrics.get('step')}, val top-1 {metrics.get('val_top1', float('nan')):.2f}%;"
          f" checkpoint: {result.checkpoint.path if result.checkpoint else None}", flush=True)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="recipe YAML (see workflows/configs/)")
    add_override_option(parser, "override a recipe key, e.g. --set train.lr=1e-4")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
        validate_before_start(recipe)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        run_pretrain(recipe)
    except ConfigError as exc:  # the cluster cannot hold the recipe (check_capacity), before any training work
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
