"""Pre-training and fine-tuning: `python -m workflows pretrain --config RECIPE.yaml [--set key=value ...]`.

The driver: validate the recipe (before any Ray work), start or join Ray, check the cluster can hold the run, then
run a Ray Train `TorchTrainer` whose workers run `trainer.train_fn_per_worker`. Fine-tuning is the same workflow
with `train.init_from` and another label file: only the label texts change.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workflows.capacity import check_capacity, elastic_max_without_excluded, worker_bundle
from workflows.config_loader import ConfigError, config_parser, dump_yaml
from workflows.console import quiet_forwarded_ray_lines, quiet_ray_console, recipe_summary, train_logging_config
from workflows.elastic import (
    RunNotRestarted,
    blind_node_failure,
    forget_unrestartable_failure,
    grow_checkpoint_callback,
    kv_key,
    kv_put,
    raise_if_not_restarted,
    take_failure,
)
from workflows.recipe import (
    Recipe,
    check_clip_file,
    load_recipe,
    model_config,
    recipe_to_dict,
    with_absolute_paths,
    with_run_scoped_names,
)
from workflows.relaunch import RELAUNCHED, Relaunch, relaunch_changes
from workflows.run_lock import claim_run_directory
from workflows.runtime import (
    CHECKPOINT_WOULD_NOT_FIT,
    avoiding,
    compile_toolchain_problem,
    ensure_ray,
    free_bytes,
    interrupted_exit_code,
    is_disk_full,
    is_remote,
    label_selector,
    local_cpus_for,
    redact_secrets,
    root_cause,
    stop_like_ctrl_c,
    stop_signal_note,
    storage_of,
    write_text,
)
from workflows.tracking import check_tracking_uri, resolve_tracking_uri

if TYPE_CHECKING:
    from workflows.data.manifest import Manifest

LOG_PREFIX = "[pretrain]"
PREEMPTION_GRACE_S = 15.0
# Ray Train 2.60 ends fit() with a ControllerError when the controller cannot write its checkpoint registry
# (checkpoint_manager_snapshot.json) to storage; FailureConfig does not cover the controller. The driver then waits
# for the run's storage to answer again and fits the same run once more, which resumes from its newest complete
# checkpoint (at most run.max_failures times).
STORAGE_WAIT_S = 900.0
STORAGE_PROBE_S = 5.0


def build_trainer(recipe: Recipe, extra_config: dict[str, Any] | None = None, callbacks: list | None = None,
                  name: str | None = None, verbose: bool = False) -> Any:
    """The Ray Train TorchTrainer for a recipe (also what a Tune trial runs)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workflows.trainer import train_fn_per_worker

    recipe = with_absolute_paths(recipe)
    # Ray 2.60's Train workers replace `print` with one that logs through the root logger *and*, because Ray core
    # wraps the worker's sys.stdout, also prints: every progress line reached the console twice. Ray propagates
    # this switch from the process that starts the run to its workers; a value the user set is kept.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    scaling = recipe.scaling
    resources = worker_bundle(recipe)
    selector = avoiding(label_selector(scaling.worker_node_label), scaling.exclude_nodes)
    workers: int | tuple[int, int] = (scaling.min_workers, scaling.max_workers) if scaling.elastic else \
        scaling.min_workers
    if scaling.elastic and scaling.exclude_nodes:
        import ray

        if ray.is_initialized():
            workers = (scaling.min_workers, elastic_max_without_excluded(recipe, ray.nodes()))
    if scaling.elastic:  # the running group checkpoints before Ray Train grows it
        callbacks = [*(callbacks or []), grow_checkpoint_callback(recipe.run_dir)]
    return TorchTrainer(
        train_loop_per_worker=train_fn_per_worker,
        train_loop_config={"recipe": recipe_to_dict(recipe), "verbose": verbose, **(extra_config or {})},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources, placement_strategy=scaling.placement_strategy,
                                     elastic_resize_monitor_interval_s=scaling.resize_check_s,
                                     **({"label_selector": selector} if selector else {})),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name or recipe.run.name,
            storage_path=recipe.run.storage_path,
            # Node preemptions (drain notices, spot reclaims) restart the group without limit (Ray Train's default
            # max_preemption_failures=-1); max_failures counts the other failures.
            # The restart after a drain waits PREEMPTION_GRACE_S past the deadline: the drained node must be gone
            # by then, or Ray's elastic policy still counts it and the new group waits for a placement on it.
            failure_config=FailureConfig(max_failures=recipe.run.max_failures, preemption_grace_s=PREEMPTION_GRACE_S),
            # Checkpoints are written at every validation: keep the best k by eval.best_metric (Ray keeps the
            # latest too).
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.run.keep_checkpoints,
                                               checkpoint_score_attribute=recipe.eval.best_metric,
                                               checkpoint_score_order="max"),
            callbacks=callbacks or [],
            logging_config=train_logging_config(verbose),  # the Train controller's own lines
        ),
    )


def validate_before_start(recipe: Recipe, warn_space: bool = True) -> int:
    """Everything that can be checked without Ray: files, labels, the DeepSpeed config, the tracking store, room for
    checkpoints (`warn_space`: also warn when the disk cannot hold what the run keeps). Returns the number of
    training videos (what the run's length is counted from)."""
    from workflows.data.manifest import check_output_folder, class_names, load_labels, load_manifest
    from workflows.data.shared_disk import check_videos_reachable
    from workflows.feeds import validation_videos
    from workflows.inference import scoring_warnings
    from workflows.optim import build_deepspeed_config

    check_no_placeholders(recipe)
    try:
        labels = load_labels(recipe.data.labels)
        if len(labels) < 2:  # softmax over one class: its loss is 0 whatever the weights
            raise ConfigError(f"data.labels {recipe.data.labels} has {len(labels)} class: training needs two or more "
                              f"to tell apart (a folder import of one class folder writes one; add the other classes)")
        manifests = {key: load_manifest(getattr(recipe.data, key), labels, strict=True)
                     for key in ("train_manifest", "val_manifest")}
    except (ValueError, OSError) as exc:  # ManifestError: names the file and what is wrong with it
        raise ConfigError(str(exc)) from None
    check_flip_pairs(recipe, labels)
    for key, manifest in manifests.items():
        if len(manifest) == 0:
            raise ConfigError(f"data.{key} {getattr(recipe.data, key)} lists no videos")
        check_videos_reachable(manifest, f"data.{key}")
        for line in manifest.duplicate_warnings():
            warn_once(f"warning: data.{key}: {line}")
    overlap = shared_clips(manifests["train_manifest"], manifests["val_manifest"])
    if overlap:
        warn_once(f"warning: data.val_manifest: {len(overlap)} of its {len(manifests['val_manifest'])} rows are clips "
                  f"data.train_manifest lists too (e.g. {overlap[0]}): validation would score clips the model trains "
                  f"on, and its accuracy would overstate what it learned. Split the videos into two disjoint sets "
                  f"(`data import folders` does)")
    validated = validation_videos(recipe, manifests["val_manifest"])
    check_best_metric(recipe, validated)
    if len(validated) < len(manifests["val_manifest"]):
        warn_once(f"{LOG_PREFIX} validation during training reads {len(validated):,} of the "
                  f"{len(manifests['val_manifest']):,} videos of data.val_manifest, each class its share, the same "
                  f"ones each time (eval.max_videos); `evaluate` reads them all", file=sys.stdout)
    # validation scores eval.views clips per video, as evaluate scores its views: the same warnings
    for line in scoring_warnings(views=recipe.eval.views, views_from="eval.views",
                                 fix_views="Lower eval.views (--set eval.views=1; `evaluate` takes the final test's "
                                           "views from eval.test_views)",
                                 crops=1, num_frames=model_config(recipe.model).num_frames,
                                 class_names=class_names(labels), labels_from=f"data.labels {recipe.data.labels}"):
        warn_once(line)
    if recipe.train.micro_batch_size == "auto":  # the workers probe it; the rest is checked with one micro-batch each
        build_deepspeed_config(recipe.with_probed_micro_batch(recipe.train.global_batch_size))
    else:
        build_deepspeed_config(recipe)
    problem = recipe.train.compile != "off" and \
        compile_toolchain_problem(recipe.scaling.use_gpu, recipe.train.compile_backend)
    if problem:
        raise ConfigError(f"train.compile: {problem}")
    check_model_weights(recipe)
    if is_remote(recipe.run_dir):
        check_storage_answers(recipe.run_dir)
    else:  # a read-only mount or a folder the user may not write fails here, not after Ray has started
        check_output_folder(recipe.run_dir, "the run directory under run.storage_path")
        check_free_space(recipe, warn=warn_space)
    if recipe.mlflow.enabled and is_remote(recipe.run_dir):  # a remote run directory needs a tracking server
        resolve_tracking_uri(recipe.mlflow.tracking_uri, recipe.run_dir)
    configured = recipe.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if recipe.mlflow.enabled and configured:  # (unset: the run directory's own sqlite store, made by the run)
        check_tracking_uri(configured, "mlflow.tracking_uri" if recipe.mlflow.tracking_uri else "MLFLOW_TRACKING_URI")
    return len(manifests["train_manifest"])


def check_no_placeholders(recipe: Recipe) -> None:
    """ConfigError naming each key that still holds the shipped recipes' PLACEHOLDER (run.storage_path,
    train.init_from), before anything tries to reach a bucket of that name (an AWS error about DNS otherwise)."""
    from workflows.recipe import PLACEHOLDER, recipe_to_dict
    from workflows.tracking import flatten

    keys = {key: value for key, value in flatten(recipe_to_dict(recipe)).items()
            if isinstance(value, str) and PLACEHOLDER in value}
    if keys:
        sets = " ".join(f"{key}={value.replace(PLACEHOLDER, '<your-bucket>')}" for key, value in keys.items())
        raise ConfigError(f"{', '.join(keys)} still name{'s' if len(keys) == 1 else ''} the placeholder bucket "
                          f"{PLACEHOLDER} of the shipped recipes: set your own bucket (or a shared disk path), e.g. "
                          f"--set {sets}")


def shared_clips(train: Manifest, val: Manifest) -> list[str]:
    """The rows of `val` (a path, or a path and its [start, end] window) that `train` lists too."""
    def clips(manifest: Manifest) -> list[tuple[str, float | None, float | None]]:
        t = manifest.table  # a row without a window has NaN start/end, which equal nothing: None instead
        return [(p, None if math.isnan(s) else s, None if math.isnan(e) else e)
                for p, s, e in zip(t["path"].to_pylist(), t["start"].to_pylist(), t["end"].to_pylist(), strict=True)]

    trained = set(clips(train))
    return [p if s is None else f"{p} [{s:g}, {e:g}] s" for p, s, e in clips(val) if (p, s, e) in trained]


def check_flip_pairs(recipe: Recipe, labels: dict[str, int]) -> None:
    """data.flip_pairs index data.labels' classes: each must be one of them, and the pairs are printed by name, so a
    recipe reused on another label set (the SSV2 or sample pairs) shows which classes its flips would swap."""
    from workflows.data.manifest import class_names

    data = recipe.data
    if data.flip != "swap_labels":
        return
    names = class_names(labels)
    outside = [pair for pair in data.flip_pairs if max(pair) >= len(names)]
    if outside:
        raise ConfigError(f"data.flip_pairs {outside}: data.labels {data.labels} has {len(names)} classes "
                          f"(0..{len(names) - 1}), so a flipped clip would get a label that does not exist. Name the "
                          f"pairs of this label set whose classes a horizontal flip swaps (e.g. 'left'/'right'), or "
                          f"--set data.flip=none")
    swaps = "; ".join(f"{names[a]!r} <-> {names[b]!r}" for a, b in data.flip_pairs)
    warn_once(f"{LOG_PREFIX} data.flip swap_labels: a flipped clip (data.flip_p {data.flip_p:g}) swaps {swaps}",
              file=sys.stdout)


def check_best_metric(recipe: Recipe, validated: Manifest) -> None:
    """eval.best_metric val_file_* ranks by files scored as the mean of their clips: the validation set (`validated`,
    the manifest validation reads) must cut some file into several clips, or there are no per-file metrics."""
    from workflows.metrics import FileIndex

    if not recipe.eval.ranks_by_files:
        return
    table = validated.table
    if FileIndex.of(table.column("path").to_pylist(), table.column("label").to_pylist()) is None:
        raise ConfigError(f"eval.best_metric {recipe.eval.best_metric} ranks checkpoints by files scored over their "
                          f"clips, but the videos validation reads from data.val_manifest {recipe.data.val_manifest} "
                          f"name each file once, so there are no per-file metrics. Rank by "
                          f"{recipe.eval.best_metric.replace('val_file_', 'val_')} (the same score on whole videos), "
                          f"or cut the validation videos into clips (`workflows data clips`)")


def shared_local_paths(recipe: Recipe, run_dir: str | None = None) -> list[tuple[str, str]]:
    """(what, path) of what the run reads and writes at local paths, which every node its workers or decoders use
    must see as the same files (a shared disk): a video of each manifest, the run directory (or `run_dir`, a
    sweep's), a CLIP or init_from file. Bucket URIs are left out."""
    from workflows.data.manifest import load_manifest
    from workflows.data.shared_disk import witness_files

    local = []
    for key in ("train_manifest", "val_manifest"):
        paths = load_manifest(getattr(recipe.data, key), None, strict=False).table.column("path").to_pylist()
        local += [(f"data.{key}'s videos, e.g.", path) for path in witness_files(paths, count=1)]
    run_dir = run_dir or recipe.run_dir
    if not is_remote(run_dir):
        local.append(("the run directory", run_dir))
    for key, path in (("model.clip_pretrained", recipe.model_cfg.clip_pretrained),
                      ("train.init_from", recipe.train.init_from)):
        if path and not is_remote(path) and os.path.exists(path):
            local.append((key, path))
    return local


def check_nodes_see_local_paths(recipe: Recipe, run_dir: str | None = None) -> None:
    """On a cluster of several nodes, what the run reads and writes at local paths (`shared_local_paths`) must be
    the same files on every node its workers or decoders may use (a shared disk), or their reads find no video and
    their checkpoints land on their own disks. Each such node (less scaling.exclude_nodes) is asked
    (`shared_disk.nodes_that_see`); ConfigError naming those that do not see them, before any training work. On the
    driver's node alone there is nothing to ask."""
    import ray

    from workflows.data.shared_disk import nodes_that_see
    from workflows.runtime import node_matches, without_nodes

    selectors = [label_selector(recipe.scaling.worker_node_label), recipe.data.node_label_selector()]
    used = [n for n in without_nodes(ray.nodes(), recipe.scaling.exclude_nodes)
            if n.get("Alive") and any(node_matches(n, s) for s in selectors)]
    here = ray.get_runtime_context().get_node_id()
    others = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in used if n["NodeID"] != here}
    if not others:
        return
    run_dir = run_dir or recipe.run_dir
    if not is_remote(run_dir):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    local = shared_local_paths(recipe, run_dir)
    if not local:
        return
    blind = sorted(set(others) - nodes_that_see([path for _, path in local], list(others)))
    if blind:
        named = "; ".join(f"{what} {redact_secrets(path)}" for what, path in local)
        addresses = ", ".join(others[n] for n in blind)
        raise ConfigError(
            f"{len(blind)} of the {len(used)} nodes this run's workers and decoders may use ({addresses}) do not "
            f"see the local paths it reads and writes ({named}): there each video would count as missing and "
            f"checkpoints would land on the node's own disk. On a cluster without a shared disk put the data and "
            f"run.storage_path in a bucket (`data upload DIR s3://...`, run.storage_path: s3://...; cluster/README.md, "
            f"\"No shared disk\"), or mount one disk at the same path on every node, or leave those nodes out: "
            f"--set 'scaling.exclude_nodes=[{','.join(blind)}]'")


def check_free_space(recipe: Recipe, warn: bool = True) -> None:
    """A local run directory's disk must hold the run's checkpoints: with less free than one, the run would train
    up to its next checkpoint and fail there (ConfigError, before any work); with less than the run still adds
    (run.keep_checkpoints + 1 are kept, the best and the latest, less those already there), a warning unless
    `warn` is off. A checkpoint's size is the newest complete one's when the run resumes, else
    `estimated_checkpoint_bytes`."""
    from workflows.checkpoints import newest_complete_checkpoint

    run_dir = Path(recipe.run_dir).absolute()
    free = free_bytes(run_dir)
    newest = newest_complete_checkpoint(str(run_dir))
    if newest:
        size, there = checkpoint_bytes(newest), len(list(run_dir.glob("checkpoint_*/")))
    else:
        size, there = estimated_run_checkpoint_bytes(recipe), 0
    keep, mib = recipe.run.keep_checkpoints, 2**20
    what = (f"{run_dir}'s disk has {free / mib:.1f} MiB free, and a checkpoint of this run takes "
            f"{'' if newest else 'about '}{size / mib:.1f} MiB")
    if free < size:
        raise ConfigError(f"{what}: the {'next' if newest else 'first'} {CHECKPOINT_WOULD_NOT_FIT}, after training "
                          f"up to it. Free space, or set run.storage_path to a larger disk")
    adds = max(1, keep + 1 - there)
    if warn and free < adds * size:
        warn_once(f"warning: {what}; run.keep_checkpoints={keep} keeps up to {keep + 1}, {adds} more than are there "
                  f"now ({adds * size / mib:.1f} MiB): the first that does not fit ends the run (free space, lower "
                  f"run.keep_checkpoints, or set run.storage_path to a larger disk)")


def estimated_run_checkpoint_bytes(recipe: Recipe) -> int:
    """What one checkpoint of a run of `recipe` will take, from its trainable parameters (built on the meta device)."""
    from workflows.checkpoints import estimated_checkpoint_bytes
    from workflows.inference import trainable_shapes

    params = sum(math.prod(shape) for shape in trainable_shapes(recipe).values())
    return estimated_checkpoint_bytes(params, 4 if recipe.precision() == "fp32" else 2, recipe.scaling.elastic)


def checkpoint_bytes(checkpoint: tuple[Any, str, int]) -> int:
    """The bytes of every file in a checkpoint (a `newest_complete_checkpoint` answer)."""
    import pyarrow.fs

    fs, path, _ = checkpoint
    files = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    return sum(f.size or 0 for f in files if f.type == pyarrow.fs.FileType.File)


def list_run_dir(run_dir: str) -> None:
    """One listing of the run directory's storage (a missing directory is fine: the run creates it); raises what
    the storage raises (OSError: unreachable, no credentials)."""
    fs, path = storage_of(run_dir)
    fs.get_file_info(path)


def check_storage_answers(run_dir: str) -> None:
    """`list_run_dir` once, before Ray: unreachable storage or missing credentials fail here, not at the run's
    first write on the cluster."""
    import pyarrow

    from workflows.data.manifest import storage_hint

    try:
        list_run_dir(run_dir)
    except (OSError, pyarrow.ArrowInvalid) as exc:
        raise ConfigError(f"run.storage_path: cannot reach {redact_secrets(run_dir)}: "
                          f"{redact_secrets(str(exc))}{storage_hint(run_dir)}") from None


_WARNED: set[str] = set()


def warn_once(line: str, file: Any = None) -> None:
    """Print a warning on stderr (or a note on `file`) once per process (the driver validates a recipe more than
    once)."""
    if line not in _WARNED:
        _WARNED.add(line)
        print(line, file=file or sys.stderr, flush=True)


def check_model_weights(recipe: Recipe) -> None:
    """Read the weights the workers will start from, here, so a wrong file fails before any Ray work: the CLIP
    weights (`check_clip_weights`: a local file is loaded once on the driver) and, unless the run resumes from its own
    checkpoint, `train.init_from`: a local one is fitted against the trainable module's shapes (built on the meta
    device: no memory); one in a bucket is found (a checkpoint directory with its files, or a run directory with a
    complete checkpoint) and read by the workers."""
    import warnings

    import torch

    from dist_model import DiSTNet
    from workflows.checkpoints import init_model_from, newest_complete_checkpoint

    cfg = recipe.model_cfg
    check_clip_file(recipe, "model.clip_pretrained")
    # A relaunch resumes from its own checkpoint and reads no init_from (with_recorded_init_from): the run it named
    # may be gone by now (a fine-tune's pre-training run cleaned up), which must not stop the resume.
    if not recipe.train.init_from or newest_complete_checkpoint(recipe.run_dir) is not None:
        return
    init_from, _ = resolved_init_from(recipe)
    if is_remote(init_from):  # read by the workers
        return
    theirs = _init_from_model(init_from)
    if theirs is not None and theirs.variant != recipe.model.variant:
        raise ConfigError(f"train.init_from {init_from} is a checkpoint of a {theirs.variant} model, and this recipe "
                          f"trains a {recipe.model.variant} one (model.variant): their trainable weights have nothing "
                          f"in common. Start from a {recipe.model.variant} run's checkpoint, or drop train.init_from")
    if recipe.model.variant != "dist":  # the baseline's head: read by the workers only
        return
    with torch.device("meta"):
        net = DiSTNet(cfg)
    try:
        with warnings.catch_warnings():  # loading into meta tensors copies nothing, which torch warns about
            warnings.simplefilter("ignore", UserWarning)
            report = init_model_from(net, init_from)
    except Exception as exc:  # noqa: BLE001 - whatever reading it raised, the file is what to fix
        built = "" if theirs is None else (f" (the checkpoint's model is {describe_model(theirs)}; this recipe "
                                           f"builds {describe_model(recipe.model)})")
        raise ConfigError(f"train.init_from{built}: {exc}") from None
    # Weights load by position along the fusion layers (the authors' checkpoints transfer so), so another layer
    # choice loads, with the extra modules' weights left out or left at their init: said before the run, not after.
    if any(line.startswith(("missing (", "unexpected (")) for line in report.splitlines()):
        mine = f"{describe_model(recipe.model)}" + ("" if theirs is None else
                                                     f"; the checkpoint's: {describe_model(theirs)}")
        warn_once(f"warning: train.init_from {init_from} does not fill this model exactly ({mine}): {report}")


def _init_from_model(init_from: str) -> Any:
    """The model section (workflows.recipe.ModelSection) a checkpoint of ours recorded in its state.json, or None
    (an authors' checkpoint file, or a state.json without one)."""
    from workflows.checkpoints import read_state
    from workflows.config_loader import from_dict
    from workflows.recipe import ModelSection

    try:
        section = read_state(init_from).get("model") if Path(init_from).is_dir() else None
        return from_dict(ModelSection, section, prefix="model.") if isinstance(section, dict) else None
    except (OSError, ValueError, ConfigError):  # the fit below says what is wrong with the file
        return None


def describe_model(section: Any) -> str:
    """'dist_b16_k400, dist (fusion layers 1, 2, 3, 4; 8+16 frames)': a model section's preset, variant and what
    tells two checkpoints of one preset apart."""
    cfg = model_config(section)
    return (f"{section.preset}, {section.variant} (fusion layers {', '.join(map(str, cfg.layers))}; "
            f"{cfg.sparse_frames}+{cfg.num_frames} frames)")


def resolved_init_from(recipe: Recipe) -> tuple[str, int | None]:
    """`train.init_from` as the one checkpoint it names (`checkpoints.resolve_init_from`: a run directory becomes its
    newest checkpoint), and that checkpoint's step when a run directory was resolved; ConfigError when it names
    nothing to start from."""
    from workflows.checkpoints import resolve_init_from

    try:
        return resolve_init_from(with_absolute_paths(recipe).train.init_from)
    except FileNotFoundError as exc:
        raise ConfigError(f"train.init_from: {redact_secrets(str(exc))}") from None


def with_resolved_init_from(recipe: Recipe, log_prefix: str = LOG_PREFIX) -> Recipe:
    """The recipe with `train.init_from` pinned to the checkpoint it names now, chosen once here so every worker and
    every restart starts from the same one (a run directory still being written to would give later readers a newer
    one) and the run's recipe.yaml records which; prints the choice when a run directory was resolved."""
    if not recipe.train.init_from:
        return recipe
    init_from, step = resolved_init_from(recipe)
    if step is not None:
        print(f"{log_prefix} train.init_from {redact_secrets(recipe.train.init_from)} is a run directory: starting "
              f"from its newest checkpoint, {redact_secrets(init_from)} (step {step})", flush=True)
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, init_from=init_from))


def with_recorded_init_from(recipe: Recipe, relaunch: Relaunch, log_prefix: str = LOG_PREFIX) -> Recipe:
    """A relaunched run's recipe with `train.init_from` as its first launch pinned it: the run resumes from its own
    checkpoint and reads no other, so resolving a run directory again would only record (and print) a checkpoint it
    never started from. Says so when the recipe names one."""
    if recipe.train.init_from:
        started = (f"its first launch started from {redact_secrets(relaunch.init_from)}" if relaunch.init_from
                   else "it started without one")
        print(f"{log_prefix} train.init_from is not read: run {recipe.run.name} resumes from its own checkpoint "
              f"(step {relaunch.step}); {started}. To start from {redact_secrets(recipe.train.init_from)}, choose "
              f"another run.name", flush=True)
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, init_from=relaunch.init_from))


def save_resolved_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML at `<run dir>/recipe.yaml` (a local path or a URI); returns where."""
    recipe = with_absolute_paths(recipe)
    path = f"{recipe.run_dir.rstrip('/')}/recipe.yaml"
    write_text(path, dump_yaml(recipe))
    return path


def storage_failure(exc: BaseException) -> OSError | None:
    """The storage error behind a Ray Train ControllerError (the controller's own write failed), else None."""
    from ray.train import ControllerError

    failure = exc.controller_failure if isinstance(exc, ControllerError) else None
    return failure if isinstance(failure, OSError) else None


def wait_for_storage(run_dir: str, timeout_s: float = STORAGE_WAIT_S, probe_s: float = STORAGE_PROBE_S) -> bool:
    """Whether the run directory's storage answers (`list_run_dir`) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            list_run_dir(run_dir)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(probe_s)


def fit_through_storage_outages(make_trainer: Any, recipe: Recipe, wait_s: float = STORAGE_WAIT_S) -> Any:
    """`make_trainer(recipe).fit()`, fitted again (a new trainer of the same run, which resumes from its newest
    complete checkpoint) at most run.max_failures times:

    - when the Train controller failed on a storage write, after the storage answers again;
    - when the workers stopped because a node does not see the shared disk (`blind_node_failure`): without that
      node (`leave_out_blind_node`), or after the disk is back when this node does not see it either.

    Any other failure, or storage still away after `wait_s`, is raised; a full disk is raised as RunNotRestarted
    (waiting does not free space). Before each fit, a checkpoint registry Ray could not start from is moved aside
    (`set_aside_unusable_registry`)."""
    from workflows.checkpoints import set_aside_unusable_registry
    from workflows.data.shared_disk import mark_run_dir

    relaunches, limit = 0, recipe.run.max_failures
    mark_run_dir(recipe.run_dir)  # every worker, on whatever node, must see it (a node may join later)
    while True:
        note = set_aside_unusable_registry(recipe.run_dir)
        if note:
            print(f"{LOG_PREFIX} {note}", flush=True)
        try:
            result, failed = make_trainer(recipe).fit(), None
        except Exception as exc:
            result, failed = None, exc
        spent = 0 <= limit <= relaunches  # -1: no limit, as Ray Train's FailureConfig reads it
        blind = blind_node_failure(recipe.run_dir)
        if blind is not None and not spent:
            relaunches += 1
            recipe = leave_out_blind_node(recipe, *blind, f"relaunch {relaunches} of {_limit_text(limit)}", wait_s)
            continue
        if failed is None:
            return result  # (a group that ended on a failure a restart cannot fix: raise_if_not_restarted says why)
        failure = storage_failure(failed)
        where = redact_secrets(recipe.run_dir)
        if failure is not None and is_disk_full(str(failure)):  # (a worker's record of it is cleared, or
            # outdone by the relaunch's own, at the next launch)
            raise RunNotRestarted(f"the Train controller could not write to {where}: "
                                  f"{redact_secrets(str(failure))}") from failed
        if failure is None or spent:
            raise failed
        relaunches += 1
        print(f"{LOG_PREFIX} the Train controller could not write to {where} ({redact_secrets(str(failure))}); "
              f"waiting up to {wait_s:.0f} s for the storage, then resuming the run from its newest complete "
              f"checkpoint (relaunch {relaunches} of {_limit_text(limit)}, run.max_failures)", flush=True)
        if not wait_for_storage(recipe.run_dir, wait_s):
            raise failed
        print(f"{LOG_PREFIX} {where} answers again: relaunching the run", flush=True)


def _limit_text(limit: int) -> str:
    return str(limit) if limit >= 0 else "unlimited"


def local_paths_gone(recipe: Recipe) -> list[str]:
    """What this node does not see of the run's local paths: the run directory, and for each manifest of local
    videos, one of them when none of those probed is there (`absent_videos`: a missing video or two is not a disk
    gone). Empty when it sees them all."""
    from workflows.data.manifest import load_manifest
    from workflows.data.shared_disk import absent_videos

    gone = [] if is_remote(recipe.run_dir) or os.path.isdir(recipe.run_dir) else [recipe.run_dir]
    for manifest in (recipe.data.train_manifest, recipe.data.val_manifest):
        try:
            paths = load_manifest(manifest, None, strict=False).table.column("path").to_pylist()
        except OSError:  # the manifest was on that disk too (a bucket's that does not answer: not this question)
            gone += [] if is_remote(manifest) else [manifest]
            continue
        gone += absent_videos(paths)[:1]
    return gone


def leave_out_blind_node(recipe: Recipe, node: str, reason: str, relaunch: str, wait_s: float) -> Recipe:
    """After the workers stopped because node `node` (a Ray node id) does not see the shared disk (`reason`, the
    failing rank's error): the recipe to fit the run again with, from its newest complete checkpoint.

    - This node does not see the run's local paths either: the disk itself went away. It is waited for up to
      `wait_s`, and the run goes on on the same nodes.
    - That node, asked now, sees them again (a mount lost for a while): the run goes on on the same nodes.
    - Else only that node lost them (its mount, or a node added without it): it joins scaling.exclude_nodes, so
      neither the Train workers nor the decoders are placed there, and the cluster must hold the run without it
      (`check_capacity`, which waits for the autoscaler when scaling.wait_for_nodes_s allows).

    RunNotRestarted when none of these can be."""
    import ray

    from workflows.data.shared_disk import nodes_that_see
    from workflows.data.video import StorageUnreachable, wait_for_local_disk

    forget_unrestartable_failure(recipe.run_dir)
    take_failure(recipe.run_dir)  # the restart line below says why, not the failing rank's error again
    gone = local_paths_gone(recipe)
    if gone:
        print(f"{LOG_PREFIX} {redact_secrets(reason)}; this node does not see {redact_secrets(gone[0])} either: the "
              f"shared disk went away. Waiting up to {wait_s:.0f} s for it, then resuming the run from its newest "
              f"complete checkpoint ({relaunch}, run.max_failures)", flush=True)
        started = time.monotonic()
        try:
            wait_for_local_disk(gone[0], gone, wait_s)
        except StorageUnreachable:
            raise RunNotRestarted(f"{reason}; the shared disk ({redact_secrets(gone[0])}) was not back on the "
                                  f"driver's node either after {wait_s:.0f} s") from None
        print(f"{LOG_PREFIX} the shared disk is back after {time.monotonic() - started:.0f} s: relaunching the run",
              flush=True)
        kv_put(kv_key(recipe.run_dir, "event"), {"reason": "the shared disk went away and came back"})
        return recipe
    address = next((n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("NodeID") == node), "?")
    named = f"node {address} (Ray node id {node})"
    if nodes_that_see([path for _, path in shared_local_paths(recipe)], [node]):  # asked now: the disk is back
        print(f"{LOG_PREFIX} {named} lost the shared disk for longer than data.storage_retry_s, and sees it again: "
              f"resuming the run from its newest complete checkpoint ({relaunch}, run.max_failures)", flush=True)
        kv_put(kv_key(recipe.run_dir, "event"), {"reason": f"{named} lost the shared disk for a while"})
        return recipe
    excluded = [*recipe.scaling.exclude_nodes, node]
    print(f"{LOG_PREFIX} {named} does not see the shared disk, which this node sees (its decoders or Train worker "
          f"waited data.storage_retry_s for it): leaving it out of this run (scaling.exclude_nodes) and resuming from "
          f"the newest complete checkpoint on the other nodes ({relaunch}, run.max_failures)", flush=True)
    recipe = dataclasses.replace(recipe, scaling=dataclasses.replace(recipe.scaling, exclude_nodes=excluded))
    try:
        recipe = check_capacity(recipe, log_prefix=LOG_PREFIX)
    except ConfigError as exc:
        raise RunNotRestarted(f"{reason}; without {named}, which does not see the shared disk: {exc}") from None
    kv_put(kv_key(recipe.run_dir, "event"), {"reason": f"{named} left out: it does not see the shared disk"})
    return recipe


def describe_training_failure(exc: Exception, recipe: Recipe) -> str:
    """One paragraph for a run Ray Train gave up on (its restarts spent) or that was not restarted
    (`RunNotRestarted`, a failure a restart cannot fix): the root cause the first failing rank
    recorded (`elastic.note_failure`; else `root_cause` of the error: the lowest failing rank's) and where the
    same command would resume."""
    from workflows.checkpoints import newest_complete_checkpoint

    limit = recipe.run.max_failures
    if isinstance(exc, RunNotRestarted):
        why, restarts = str(exc), " and was not restarted, as a restart cannot fix this"
    else:
        try:
            why = take_failure(recipe.run_dir)
        except Exception:  # noqa: BLE001 - no Ray to ask: fall back on the error in hand
            why = None
        why = why or root_cause(exc)
        restarts = f" after {limit} restart{'s' * (limit != 1)} (run.max_failures)" if limit > 0 else ""
    newest = newest_complete_checkpoint(recipe.run_dir)
    if "CorruptCheckpoint" in why and newest is not None:  # the checkpoint it resumes from is the one to remove
        before = newest_complete_checkpoint(recipe.run_dir, but=newest[1])
        then = (f"{redact_secrets(before[1])} (step {before[2]})" if before else
                "nothing: no other complete checkpoint is there, so it would start anew")
        return (f"the run failed{restarts}: {redact_secrets(why)}. Move {redact_secrets(newest[1])} (step "
                f"{newest[2]}) out of the run directory, or rename it so it no longer starts with checkpoint_: the "
                f"same command then resumes from the complete checkpoint before it, {then}.")
    fix = f" {disk_full_advice(recipe, newest)}" if is_disk_full(why) else ""
    return (f"the run failed{restarts}: {redact_secrets(why)}.{fix} Once that is fixed, "
            f"{where_it_resumes(recipe, newest)}.")


def disk_full_advice(recipe: Recipe, newest: tuple[Any, str, int] | None) -> str:
    """What to do about a full disk: how much a checkpoint of this run takes (its newest complete one), what the
    run directory's disk has free (a local one), and the ways out."""
    from workflows.checkpoints import RAY_REGISTRY

    size = checkpoint_bytes(newest) if newest is not None else None
    takes = f"A checkpoint of this run takes {size / 2**20:.1f} MiB" if size else "Each checkpoint takes space"
    keep = recipe.run.keep_checkpoints
    advice = (f"{takes}, and run.keep_checkpoints={keep} keeps up to {keep + 1} (the best and the latest). Free space "
              f"(this run's older checkpoints may go: it resumes from its newest complete one, and Ray's "
              f"{RAY_REGISTRY} is set aside at the next launch if it names a deleted one), lower "
              f"run.keep_checkpoints, or move the run directory to a larger disk and point run.storage_path there.")
    if is_remote(recipe.run_dir):
        return advice
    free = free_bytes(recipe.run_dir)
    if size and free > 2 * size:  # the run directory has room now: a node's temporary folder may be what filled
        return (f"{advice} The run directory's disk has {free / 2**20:.0f} MiB free now; each worker writes its "
                f"part of a checkpoint to its node's temporary folder first (TMPDIR), which may be what filled up.")
    return f"{advice} {free / 2**20:.1f} MiB are free there now."


def where_it_resumes(recipe: Recipe, newest: tuple[Any, str, int] | None) -> str:
    """"the same command resumes ..." for a run that stopped, `newest` its newest complete checkpoint (or None)."""
    # (a run directory in a bucket that does not answer lists nothing either: hence "found", not "is")
    return (f"the same command resumes it from its newest complete checkpoint, {redact_secrets(newest[1])} (step "
            f"{newest[2]})" if newest else f"the same command resumes from the newest complete checkpoint in "
            f"{redact_secrets(recipe.run_dir)} (none was found there now: it would start anew)")


def run_pretrain(recipe: Recipe, verbose: bool = False, validated_videos: int | None = None) -> Any:
    """Validate, start (or join) Ray, train; returns the Ray Train Result (None, without starting Ray, for a run
    that has finished its steps already). `verbose`: Ray Data's and Ray Train's own INFO lines on the console too
    (by default they go to Ray's log files only). `validated_videos`: what `validate_before_start` returned for this
    recipe's absolute paths, when the caller ran it already (the CLI, to tell a bad recipe by its exit code); it
    reads the manifests, probes videos and loads the weights the run starts from, so it is not run twice."""
    from workflows.feeds import total_steps

    # The driver names every path as its workers do (they run elsewhere). With a relative run.storage_path (the
    # default, ./runs) the relaunch check found no checkpoint (a changed architecture went unrefused), the keys the
    # driver and the workers share in Ray's store differed (a relaunch's restart line, an unrestartable failure's
    # report), and the run crashed after its last step, at the pruning.
    given, recipe = recipe, with_absolute_paths(recipe)
    videos = validate_before_start(recipe) if validated_videos is None else validated_videos
    relaunch = relaunch_changes(recipe)  # a relaunch of an existing run: what changed, or a refusal naming it
    quiet_ray_console(verbose)
    print(f"{LOG_PREFIX} {recipe_summary(given)}", flush=True)
    steps = total_steps(recipe, videos)
    if relaunch and relaunch.step >= steps:  # Ray would resume, train nothing and register the weights again
        print(f"{LOG_PREFIX} run {recipe.run.name} has finished: its newest checkpoint, "
              f"{redact_secrets(relaunch.checkpoint)}, is at step {relaunch.step} of {steps}. Nothing to train; to "
              f"train on, raise train.max_steps or train.epochs; to train anew, choose another run.name", flush=True)
        return None
    if relaunch and relaunch.changes:
        print(f"{LOG_PREFIX} resuming run {recipe.run.name} from step {relaunch.step} with changed settings: "
              f"{'; '.join(relaunch.changes)} (the lr, betas and weight decay are the recipe's, and the lr schedule "
              f"from step {relaunch.step} on is the new recipe's)", flush=True)
    ensure_ray(local_cpus_for(recipe))
    if not verbose:
        quiet_forwarded_ray_lines()
    claim = claim_run_directory(recipe.run_dir, f"run {recipe.run.name}: its directory")
    try:
        return _fit_and_report(recipe, relaunch, verbose)
    finally:
        claim.release()


def _fit_and_report(recipe: Recipe, relaunch: Relaunch | None, verbose: bool) -> Any:
    """run_pretrain's part on Ray with the run directory claimed: the recipe resolved on the cluster, the fit, the
    pruning of what Ray Train does not retain, and the finish line."""
    from workflows.checkpoints import prune_unretained_checkpoints
    from workflows.data.drops import drop_counter

    if relaunch:  # the first worker group's restart line says why it resumes (not "a worker or node was lost"), and
        # rank 0 records the changed settings in the MLflow run (whose params keep the first launch's values)
        kv_put(kv_key(recipe.run_dir, "event"), {"reason": RELAUNCHED, "changes": relaunch.changes})
    # Waits for nodes when scaling.wait_for_nodes_s > 0 (scale from zero); resolves data.decode_node_label: the
    # workers get the resolved recipe.
    recipe = check_capacity(recipe, log_prefix=LOG_PREFIX)
    recipe = with_run_scoped_names(with_recorded_init_from(recipe, relaunch) if relaunch
                                   else with_resolved_init_from(recipe))
    check_nodes_see_local_paths(recipe)
    print(f"{LOG_PREFIX} the full resolved recipe: {redact_secrets(save_resolved_recipe(recipe))}", flush=True)
    counter = drop_counter(recipe.data.drop_counter)  # owned by the driver: survives worker restarts
    forget_unrestartable_failure(recipe.run_dir)
    result = fit_through_storage_outages(lambda fitted: build_trainer(fitted, verbose=verbose), recipe)
    del counter
    raise_if_not_restarted(recipe.run_dir)
    retained = [c.path for c, _ in result.best_checkpoints or []] + ([result.checkpoint.path] if result.checkpoint
                                                                     else [])
    removed = prune_unretained_checkpoints(recipe.run_dir, retained, recipe.run.keep_checkpoints,
                                           recipe.eval.best_metric)
    if removed is None:
        print(f"{LOG_PREFIX} checkpoint pruning skipped: Ray Train retains {retained or 'no checkpoint'}, not all of "
              f"them found in {redact_secrets(recipe.run_dir)}", flush=True)
    elif removed:
        names = ", ".join(f"{path.rsplit('/', 1)[-1]} ({'partial' if step is None else f'step {step}'})"
                          for path, step in removed.items())
        print(f"{LOG_PREFIX} removed {len(removed)} checkpoint directories Ray Train did not register and would not "
              f"keep (run.keep_checkpoints={recipe.run.keep_checkpoints}): {names}", flush=True)
    metrics, metric = result.metrics or {}, recipe.eval.best_metric
    ranked = "" if metric == "val_top1" else f", {metric} {metrics.get(metric, float('nan')):.2f}%"
    print(f"{LOG_PREFIX} finished: step {metrics.get('step')}, val top-1 {metrics.get('val_top1', float('nan')):.2f}%"
          f"{ranked}; checkpoint: {result.checkpoint.path if result.checkpoint else None}"
          f"{best_checkpoint_note(result, metric)}", flush=True)
    return result


def best_checkpoint_note(result: Any, metric: str = "val_top1") -> str:
    """"; best: ..." naming the retained checkpoint with the highest `metric` (eval.best_metric) when it is not the
    latest one (what to fine-tune or evaluate from instead of the final weights), else ""."""
    from workflows.checkpoints import metric_score

    scored = [(c, m) for c, m in result.best_checkpoints or [] if metric_score(m, metric) > -math.inf]
    if not scored:
        return ""
    best, metrics = max(scored, key=lambda cm: (metric_score(cm[1], metric), cm[1].get("step", -1)))
    if result.checkpoint is not None and best.path == result.checkpoint.path:
        return ""
    name = "val top-1" if metric == "val_top1" else metric
    return f"; best: {best.path} ({name} {metric_score(metrics, metric):.2f}% at step {metrics.get('step')})"


DECODE_SAMPLE = 8  # videos of each manifest `pretrain --check` decodes


def check_sample_decodes(recipe: Recipe) -> None:
    """`--check`'s look at the videos themselves: DECODE_SAMPLE rows of each manifest, spread over it, decoded here
    as `data check` decodes them (the model's frame count over each row's window). ConfigError when none decodes (a
    corpus of broken files, the wrong data.min_frames or start/end in other units: the run would stop at its first
    epoch); a warning when more than one fails and their share is above data.max_bad_fraction; one line saying what
    was found."""
    from collections import Counter

    import numpy as np

    from workflows.data.doctor import check_video
    from workflows.data.manifest import load_manifest

    data = recipe.data
    for key in ("train_manifest", "val_manifest"):
        table = load_manifest(getattr(data, key), None, strict=False).table
        rows = sorted({round(i) for i in np.linspace(0, table.num_rows - 1, min(DECODE_SAMPLE, table.num_rows))})
        got = [check_video(table["path"][i].as_py(), table["start"][i].as_py(), table["end"][i].as_py(),
                           num_frames=recipe.model_cfg.num_frames, min_frames=data.min_frames,
                           storage_retry_s=data.storage_retry_s) for i in rows]
        bad = [row for row in got if row["reason"]]
        reasons = Counter(row["reason"] for row in bad)
        said = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
        example = f"; e.g. {bad[0]['path']}: {bad[0]['reason']}: {bad[0]['detail']}" if bad else ""
        doctor = (f"`python -m workflows data check --manifest {getattr(data, key)} --bad-list bad.csv` decodes "
                  f"them all and lists the bad ones")
        if len(bad) == len(got):
            raise ConfigError(f"data.{key}: none of {len(got)} videos sampled from it could be decoded ({said}"
                              f"{example}); the run would stop at its first epoch. {doctor}")
        print(f"{LOG_PREFIX} check: data.{key}: decoded {len(got) - len(bad)} of {len(got)} sampled videos"
              + (f" ({said}{example})" if bad else ""), flush=True)
        if len(bad) > max(1.0, data.max_bad_fraction * len(got)):  # one in a small sample says little
            warn_once(f"warning: data.{key}: {len(bad)} of {len(got)} sampled videos could not be decoded, more "
                      f"than data.max_bad_fraction={data.max_bad_fraction:g} of them: the run stops when its share "
                      f"of bad videos passes that. {doctor}")


def check_recipe(recipe: Recipe, videos: int) -> None:
    """`pretrain --check`: print what the run would do, from what `validate_before_start` found (`videos` training
    videos) and the run directory, without starting Ray or writing anything. The cluster's room for the workers is
    the one check left to the start."""
    import torch

    from dist_model import DiSTNet
    from workflows.feeds import steps_per_epoch, total_steps

    given, recipe = recipe, with_absolute_paths(recipe)
    relaunch = relaunch_changes(recipe)  # raises, naming the keys, when the run directory holds another run
    train, scaling = recipe.train, recipe.scaling
    print(f"{LOG_PREFIX} {recipe_summary(given)}", flush=True)
    steps = total_steps(recipe, videos)
    workers = f"{scaling.min_workers}-{scaling.max_workers}" if scaling.elastic else str(scaling.min_workers)
    if train.micro_batch_size == "auto":
        split = f"over {workers} workers, its micro-batch probed on them (train.micro_batch_size auto)"
    else:
        split = "= " + " or ".join(recipe.batch_plan(world).describe()
                                   for world in sorted({scaling.min_workers, scaling.max_workers}))
    check_sample_decodes(recipe)
    print(f"{LOG_PREFIX} check: {videos} training videos, {steps_per_epoch(recipe, videos)} steps per epoch; {steps} "
          f"steps; global batch {train.global_batch_size} {split}; peak lr {recipe.peak_lr:.3g}; precision "
          f"{recipe.precision()}; ZeRO-{train.zero_stage}", flush=True)
    if recipe.model.variant == "dist":
        with torch.device("meta"):  # shapes only: no memory, no weights read
            trainable = sum(p.numel() for p in DiSTNet(recipe.model_cfg).parameters())
        print(f"{LOG_PREFIX} check: model {recipe.model.preset}: {trainable:,} trainable parameters", flush=True)
    where = redact_secrets(recipe.run_dir)
    if relaunch is None:
        start = ""
        if train.init_from:
            init_from, step = resolved_init_from(recipe)
            start = f", starting from {redact_secrets(init_from)}" + (f" (step {step})" if step is not None else "")
        print(f"{LOG_PREFIX} check: a new run in {where}{start}", flush=True)
    elif relaunch.step >= steps:
        print(f"{LOG_PREFIX} check: run {recipe.run.name} has finished (step {relaunch.step} of {steps}): the "
              f"command would train nothing", flush=True)
    else:
        changed = f" with changed settings: {'; '.join(relaunch.changes)}" if relaunch.changes else ""
        print(f"{LOG_PREFIX} check: a relaunch: resumes run {recipe.run.name} in {where} from step {relaunch.step} "
              f"of {steps}{changed}", flush=True)
    print(f"{LOG_PREFIX} check: the recipe, its files, labels, weights and storage are ready. Left to the start: "
          f"the cluster's room for {workers} workers (scaling.*), and on several nodes whether each sees the recipe's "
          f"local paths; without --check the same command starts the run",
          flush=True)


def main(argv: list[str]) -> int:
    parser = config_parser("python -m workflows pretrain", __doc__.split("\n")[0].rstrip(":"),
                           "recipe YAML (see workflows/configs/)", "override a recipe key, e.g. --set train.lr=1e-4")
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray Data's and Ray Train's own INFO lines (default: only in Ray's log files)")
    parser.add_argument("--check", action="store_true",
                        help="check the recipe, its files, labels, weights and storage, print what the run would do "
                             "(steps, batch split, a new run or a relaunch), and exit without starting Ray: 0 when "
                             "it would start, 2 naming what is wrong")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
        absolute = with_absolute_paths(recipe)  # the paths run_pretrain and the workers use (and their keys in Ray)
        videos = validate_before_start(absolute)
        if args.check:
            check_recipe(recipe, videos)
            return 0
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ray.train import TrainingFailedError

    stop_like_ctrl_c()  # `ray job stop` sends SIGTERM
    try:
        run_pretrain(recipe, verbose=args.verbose, validated_videos=videos)
    except ConfigError as exc:  # the cluster cannot hold the recipe (check_capacity), before any training work
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingFailedError, RunNotRestarted) as exc:  # the workers' tracebacks are above; Ray's is cut short
        print(f"error: {describe_training_failure(exc, absolute)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C or SIGTERM: Ray Train's SIGINT handler aborts the run, and the
        # driver's wait for it ends in a SystemExit (before the fit started: a KeyboardInterrupt)
        print(f"interrupted{stop_signal_note()}: {describe_interruption(absolute)}", file=sys.stderr, flush=True)
        return interrupted_exit_code()
    return 0


def describe_interruption(recipe: Recipe) -> str:
    """Where an interrupted run stands: its MLflow run marked KILLED (rank 0, which kept it open, is gone), and
    what the same command resumes from."""
    from workflows.checkpoints import newest_complete_checkpoint, read_state_at

    newest = newest_complete_checkpoint(recipe.run_dir)
    run_id = read_state_at(newest[0], newest[1]).get("mlflow_run_id") if newest else None
    if run_id and recipe.mlflow.enabled:
        try:
            from mlflow import MlflowClient

            uri = resolve_tracking_uri(recipe.mlflow.tracking_uri, recipe.run_dir, create=False)
            if uri:
                MlflowClient(uri).set_terminated(run_id, "KILLED")
        except Exception:  # noqa: BLE001 - the record only; the message below matters more
            pass
    return f"the run was stopped; {where_it_resumes(recipe, newest)}"
