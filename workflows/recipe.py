"""The training recipe schema: what a `workflows/configs/*.yaml` file holds, section by section.

    model:    a DiST preset plus any DiSTConfig field to override (same names as DiSTConfig)
    data:     workflows.data.data_config.DataConfig (manifests, decoding, augmentation, bad-video policy)
    train:    optimisation recipe (reference §4): batch, lr scaling, schedule, mixing, precision, DeepSpeed
    eval:     validation during training and final multi-view testing
    scaling:  Ray Train workers, their resources, and how long to wait for the nodes (scale from zero)
    run:      name, storage, fault tolerance, checkpoint retention
    mlflow:   tracking

`load_recipe` validates everything (including the model config and the batch arithmetic) before any Ray work.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from dist_model import DiSTConfig
from workflows.config_loader import ConfigError, from_dict, load_config, to_dict
from workflows.data.data_config import DataConfig
from workflows.elastic import BatchPlan, batch_plan, workable_sizes
from workflows.runtime import is_remote

# The model section: `preset` and `variant`, plus every DiSTConfig field as an optional override (None = the
# preset's value). Derived from DiSTConfig so the two can never drift apart.
_MODEL_HINTS = get_type_hints(DiSTConfig)

# What ranks a run's validations: which checkpoints run.keep_checkpoints keeps, the best one named at the end, the
# best a sweep's trial reached. val_file_*: a validation set of clips cut from longer files, each file scored as the
# mean of its clips (workflows.metrics.FileIndex).
ValidationMetric = Literal["val_top1", "val_top5", "val_mean_class_acc", "val_file_top1", "val_file_top5",
                           "val_file_mean_class_acc"]
VALIDATION_METRICS: tuple[str, ...] = get_args(ValidationMetric)
_MODEL_FIELDS = [(f.name, _MODEL_HINTS[f.name] | None, dataclasses.field(default=None))
                 for f in dataclasses.fields(DiSTConfig)]


@dataclass
class _ModelBase:
    preset: str = "dist_tiny"
    variant: Literal["dist", "spatial_only"] = "dist"  # spatial_only: the frozen-CLIP, frames-averaged baseline


ModelSection = dataclasses.make_dataclass("ModelSection", _MODEL_FIELDS, bases=(_ModelBase,))
ModelSection.__doc__ = "A DiST preset plus optional overrides of any DiSTConfig field."


def model_config(section: Any) -> DiSTConfig:
    """The DiSTConfig a model section describes (raises ValueError with the reason when invalid)."""
    overrides = {f.name: getattr(section, f.name) for f in dataclasses.fields(DiSTConfig)
                 if getattr(section, f.name) is not None}
    if isinstance(overrides.get("fusion_layers"), list):
        overrides["fusion_layers"] = tuple(overrides["fusion_layers"])
    return DiSTConfig.from_name(section.preset, **overrides)


PLACEHOLDER = "YOUR-BUCKET"  # what the shipped cluster recipes and sweeps hold where a user's bucket goes


def check_folder_name(name: str, key: str, what: str) -> None:
    """ValueError unless `name` is a plain folder name: Ray names the folder itself for an empty run name, and a
    path (`a/b`, `..`) would put a run or sweep outside its storage_path, where a relaunch would not find it."""
    if not name or name != name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{key} names {what}: give a plain folder name such as k400-b16, not empty, without / or \\ "
                         f"or spaces around it, not . or .., got {name!r}")


@dataclass
class TrainSection:
    """Optimisation (reference §4.1). `lr` None = base_lr scaled linearly by global_batch_size / 256."""

    epochs: float = 36.0
    max_steps: int | None = None  # overrides epochs when set
    global_batch_size: int = 256
    # Clips per worker per forward; accumulation = global / (micro * workers). "auto": the largest that fits the
    # device, probed by each worker at the run's first start (workflows/micro_batch.py).
    micro_batch_size: int | Literal["auto"] = 32
    lr: float | None = None
    base_lr: float = 3.2e-4  # peak lr at global batch 256 (BASE_LR 3.2e-5 x NEW_NET_LRMULT 10)
    warmup_epochs: float = 6.0  # with max_steps set, capped at max_steps // 5 (a short run still reaches the peak lr)
    warmup_start_lr: float = 8e-7
    min_lr: float = 0.0
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 0.0  # 0 = off (the reference recipe does not clip)
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    zero_stage: Literal[0, 1, 2, 3] = 2
    # torch.compile parts of the step (the first step pays the compile): "branch" (the trainable branch, forward and
    # backward; `true` means this), "frozen" (the frozen CLIP's forward), "all" (both), "off" (`false`).
    compile: bool | Literal["off", "branch", "frozen", "all"] = "off"
    # CUDA graphs for the compiled parts (torch.compile's "reduce-overhead"): the step replays recorded kernels
    # instead of launching each op from Python. GPU only; one graph is recorded per micro-batch shape.
    cuda_graphs: bool = False
    # torch.compile's backend for the compiled parts. "inductor" generates the fused kernels (the speed); "aot_eager"
    # traces the same forward and backward graphs and runs them with eager kernels, "eager" traces the forward only:
    # torch's troubleshooting ladder for finding which layer of the compiler a failure comes from, and a quick check
    # that a recipe's compile works at all (no kernels to build, no C++ compiler needed).
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    seed: int = 0
    # Reproducible kernels (the reference's cudnn.deterministic, mmaction2's `deterministic`): cuDNN's deterministic
    # algorithms without autotuning, torch's deterministic implementations where they exist (a warning where none
    # does) and cuBLAS's fixed workspace. Costs GPU speed; off by default.
    deterministic: bool = False
    log_every_steps: int = 10
    init_from: str | None = None  # a checkpoint of ours (directory) or an authors' .pyth file
    fail_at_step: int | None = None  # debug: rank `fail_rank` raises once at this step, to exercise recovery
    fail_rank: int = 0
    # debug/audit: each rank appends the video indices of every optimizer step to <dir>/rank_<r>_pid_<p>.jsonl (a
    # local directory on its node), e.g. to prove every video is trained on once per epoch across resizes
    data_audit_dir: str | None = None
    deepspeed: dict = field(default_factory=dict)  # raw DeepSpeed config, deep-merged over the derived one

    def __post_init__(self) -> None:
        if self.epochs <= 0 and not self.max_steps:
            raise ValueError("train.epochs must be positive (or set train.max_steps)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("train.max_steps must be >= 1")
        for name in ("global_batch_size", "micro_batch_size", "log_every_steps"):
            if getattr(self, name) != "auto" and getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        for name in ("base_lr", "warmup_start_lr", "min_lr", "weight_decay", "grad_clip", "warmup_epochs"):
            if not getattr(self, name) >= 0:  # also rejects NaN
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and not self.lr >= 0:  # 0 is allowed: a run that must leave the weights as they are
            raise ValueError(f"train.lr must be >= 0 (or null: base_lr scaled by the global batch), got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("train.label_smoothing must lie in [0, 1)")
        if min(self.mixup_alpha, self.cutmix_alpha) < 0 or not 0 <= self.mix_prob <= 1:
            raise ValueError("mixup/cutmix alphas must be >= 0 and mix_prob in [0, 1]")
        self.compile = {True: "branch", False: "off"}.get(self.compile, self.compile)  # the booleans of old recipes
        if self.cuda_graphs and self.compile == "off":
            raise ValueError("train.cuda_graphs needs compiled parts to capture: set train.compile to branch, frozen "
                             "or all")
        if self.cuda_graphs and self.compile_backend != "inductor":
            raise ValueError(f"train.cuda_graphs needs train.compile_backend inductor, got {self.compile_backend!r}: "
                             "CUDA graphs are captured by inductor's reduce-overhead mode")
        if self.cuda_graphs and self.zero_stage != 2:
            # The backward's CUDA graph writes the gradients into its own memory, which the next micro-batch's graphs
            # reuse. ZeRO-2 copies each gradient out during the backward; ZeRO-0/1 accumulate in it across
            # micro-batches, which torch's CUDA graphs break (pytorch/pytorch#169545).
            raise ValueError(f"train.cuda_graphs needs train.zero_stage 2, got {self.zero_stage}: with ZeRO-0/1 the "
                             "gradients would accumulate in CUDA-graph memory that the next micro-batch overwrites")
        if self.zero_stage == 3:
            raise ValueError("train.zero_stage 3 is not supported: DeepSpeed ZeRO-3 mishandles the frozen CLIP "
                             "inside the engine; use 1 or 2 (the trainable part is small)")


@dataclass
class EvalSection:
    every_steps: int = 0  # validation every N steps during training; 0 = at the end of every epoch
    views: int = 1  # temporal views during training-time validation (final test: see `test_views`)
    batch_size: int = 16
    test_views: int = 3  # `workflows evaluate`: 3 temporal views x test_crops, softmax scores summed
    test_crops: int = 1
    cache_val_clips: bool = True  # keep decoded val clips in worker memory when they fit (val sampling is fixed)
    cache_limit_mb: int = 2048
    zero_shot_fusion: bool = False  # blend with frozen-CLIP logits at evaluation (unseen label sets)
    # Validation during training on at most this many videos of data.val_manifest (0: all): a seeded subset in
    # which each class keeps its share, the same at every validation, so a large validation set (K710's tens of
    # thousands of videos) is not decoded whole every eval.every_steps. `workflows evaluate` always reads every video.
    max_videos: int = 0
    # The validation metric that ranks checkpoints (run.keep_checkpoints keeps the best by it, plus the latest). A
    # validation set of clips of longer recordings ranks better by its files (val_file_top1); an imbalanced one by
    # val_mean_class_acc, which weighs each class the same.
    best_metric: ValidationMetric = "val_top1"

    @property
    def ranks_by_files(self) -> bool:
        return self.best_metric.startswith("val_file_")

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"eval.every_steps must be >= 0 (0: at the end of every epoch), got {self.every_steps}")
        if self.max_videos < 0:
            raise ValueError(f"eval.max_videos must be >= 0 (0: every validation video), got {self.max_videos}")
        for name in ("views", "batch_size", "test_views", "test_crops"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.test_crops not in (1, 3):
            raise ValueError(f"eval.test_crops must be 1 (centre) or 3 (left, centre, right), got {self.test_crops}")
        if self.cache_limit_mb < 0:
            raise ValueError(f"eval.cache_limit_mb must be >= 0, got {self.cache_limit_mb}")


@dataclass
class ScalingSection:
    # An int (a fixed size) or [min, max] (elastic: Ray Train runs at any size in between that the cluster holds,
    # shrinking when nodes go, growing when they come back; the global batch and lr schedule stay the recipe's).
    num_workers: int | list[int] = 2
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Ray node label (key=value) the training workers must run on, e.g. "dist-role=train"; None: anywhere.
    worker_node_label: str | None = None
    # Seconds the driver waits for nodes when the alive ones cannot hold the run (workers, decoders): it asks
    # the autoscaler for exactly those (scale from zero) and polls. 0: fail at once (local runs, tests). See
    # workflows/capacity.py.
    wait_for_nodes_s: float = 0.0
    # Elastic runs: how often (seconds) Ray Train looks for room to grow the worker group (its resize monitor).
    resize_check_s: float = 60.0
    # Extra Ray resources each Train worker holds, e.g. {train_slot: 1} on nodes started with --resources. Ray's
    # elastic policy counts a size from resources alone (not labels): on CPU-only clusters, a custom resource is
    # what keeps it from counting the head's or decode nodes' CPUs as room for workers.
    worker_resources: dict = field(default_factory=dict)
    # Ray node ids (as `ray list nodes` shows them) that the Train workers and the decoders must not use. The
    # driver adds a node found without the shared disk during the run (its mount lost, or a node added later
    # without it) and fits the run again on the others, from its newest complete checkpoint.
    exclude_nodes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [node for node in self.exclude_nodes if not re.fullmatch(r"[0-9a-f]{56}", str(node))]
        if bad:
            raise ValueError(f"scaling.exclude_nodes takes Ray node ids (56 hex digits, the NodeID column of `ray "
                             f"list nodes`), got {bad}")
        sizes = self.num_workers if isinstance(self.num_workers, list) else [self.num_workers]
        if len(sizes) not in (1, 2) or min(sizes) < 1 or sizes[0] > sizes[-1]:
            raise ValueError(f"scaling.num_workers must be a number of workers >= 1 or [min, max] with 1 <= min <= "
                             f"max, got {self.num_workers}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if not self.resize_check_s >= 0:
            raise ValueError(f"scaling.resize_check_s must be >= 0 seconds, got {self.resize_check_s}")
        if self.use_gpu and self.gpus_per_worker != 1:
            # DeepSpeed drives one GPU per rank (cuda:LOCAL_RANK): a share of one breaks NCCL ("Duplicate GPU"), and
            # a second one would put the batches and the model on different devices.
            raise ValueError(f"scaling.gpus_per_worker must be 1 with scaling.use_gpu (one GPU per DeepSpeed rank), "
                             f"got {self.gpus_per_worker}; use more workers for more GPUs")
        if not self.wait_for_nodes_s >= 0:  # also rejects NaN
            raise ValueError(f"scaling.wait_for_nodes_s must be >= 0 seconds (0 = fail at once), got "
                             f"{self.wait_for_nodes_s}")

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def elastic(self) -> bool:
        return self.min_workers < self.max_workers


@dataclass
class RunSection:
    name: str = "dist-run"
    storage_path: str = "./runs"  # local path or a URI (s3://, gs://) shared by all nodes
    max_failures: int = 1  # automatic restarts of the worker group from the latest checkpoint; -1: no limit
    keep_checkpoints: int = 2  # checkpoints come with every validation: best k by eval.best_metric, plus the latest

    def __post_init__(self) -> None:
        check_folder_name(self.name, "run.name", "the run's folder under run.storage_path (its checkpoints, and "
                                                  "what a relaunch resumes)")
        if self.max_failures < -1:
            raise ValueError(f"run.max_failures must be >= 0 (0: no automatic restart) or -1 (no limit), got "
                             f"{self.max_failures}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"run.keep_checkpoints must be >= 1 (the newest is what a restart resumes from), got "
                             f"{self.keep_checkpoints}")


@dataclass
class MlflowSection:
    enabled: bool = True
    tracking_uri: str | None = None  # None: sqlite:///<storage_path>/<name>/mlflow.db
    experiment: str = "dist"
    # A finished run registers its final weights as a new version of this MLflow registered model (None: the run
    # name), loadable with `--checkpoint models:/NAME/VERSION`. Sweeps turn it off for their trials.
    register_model: bool = True
    registered_model_name: str | None = None


@dataclass
class Recipe:
    """A complete, validated training run."""

    model: ModelSection = field(default_factory=ModelSection)  # type: ignore[valid-type]
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    mlflow: MlflowSection = field(default_factory=MlflowSection)

    def __post_init__(self) -> None:
        try:
            self._model_cfg = model_config(self.model)
        except ValueError as exc:
            raise ValueError(f"model: {exc}") from exc
        self._check_batch_splits()
        self._probed_micro: int | None = None
        if self.train.cuda_graphs and not self.scaling.use_gpu:
            raise ValueError("train.cuda_graphs needs GPUs (scaling.use_gpu: true); CUDA graphs do not exist on CPU")

    def _check_batch_splits(self) -> None:
        """A fixed size must split the global batch evenly (as always); an elastic range must hold it at every size
        (uneven shares are weighted, see workflows/elastic.py) and keep ZeRO's optimizer state re-partitionable."""
        train, scaling = self.train, self.scaling
        batch, low, high = train.global_batch_size, scaling.min_workers, scaling.max_workers
        auto = train.micro_batch_size == "auto"
        micro = batch if auto else train.micro_batch_size  # auto: any micro-batch the share allows (one at least)
        if not scaling.elastic:
            if auto and batch % low:
                raise ValueError(f"train.global_batch_size {batch} must be a multiple of scaling.num_workers {low}")
            if not auto and batch % (micro * low):
                raise ValueError(f"train.global_batch_size {batch} must be a multiple of train.micro_batch_size x "
                                 f"scaling.num_workers = {micro} x {low}")
            return
        fits, even = workable_sizes(batch, micro, low, high)
        if len(fits) < high - low + 1:
            bad = sorted(set(range(low, high + 1)) - set(fits))
            raise ValueError(f"train.global_batch_size {batch} with micro-batches of up to {micro} clips cannot be "
                             f"split over {', '.join(map(str, bad))} workers (each needs a clip per micro-batch); "
                             f"scaling.num_workers {scaling.num_workers} must stay within sizes that hold it: "
                             f"{', '.join(map(str, fits)) or 'none in that range'}")
        if train.zero_stage not in (1, 2):
            raise ValueError(f"an elastic scaling.num_workers {scaling.num_workers} needs train.zero_stage 1 or 2 "
                             f"(their optimizer state re-partitions to any number of workers), got "
                             f"{train.zero_stage}")

    @property
    def model_cfg(self) -> DiSTConfig:
        return self._model_cfg

    @property
    def micro_batch(self) -> int:
        """Clips per forward: train.micro_batch_size, or what `auto` resolved to in this worker (`with_probed`)."""
        if self.train.micro_batch_size != "auto":
            return self.train.micro_batch_size
        if self._probed_micro is None:
            raise ValueError("train.micro_batch_size auto is resolved by the workers' memory probe "
                             "(workflows/micro_batch.py); this recipe has not been through it")
        return self._probed_micro

    def with_probed_micro_batch(self, size: int) -> Recipe:
        """A copy whose `auto` micro-batch is `size`. The recipe itself still says auto (that is what is logged and
        saved); the size may split a rank's share unevenly, weighted like an elastic run's (workflows/elastic.py)."""
        resolved = copy.copy(self)
        resolved._probed_micro = size
        return resolved

    def batch_plan(self, world: int) -> BatchPlan:
        """How each optimizer step's global batch is split over `world` workers (accumulation, micro-batches)."""
        return batch_plan(self.train.global_batch_size, self.micro_batch, world)

    @property
    def peak_lr(self) -> float:
        """lr, or base_lr scaled linearly with the global batch (reference: 3.2e-4 at 256)."""
        if self.train.lr is not None:
            return self.train.lr
        return self.train.base_lr * self.train.global_batch_size / 256

    @property
    def run_dir(self) -> str:
        return f"{self.run.storage_path.rstrip('/')}/{self.run.name}"

    def precision(self) -> str:
        if self.train.precision != "auto":
            return self.train.precision
        return "bf16" if self.scaling.use_gpu else "fp32"


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, check_files: bool = True) -> Recipe:
    """Load and validate a recipe; with `check_files`, the manifests and label file must exist (local paths)."""
    try:
        recipe = load_config(Recipe, path, overrides)
    except ConfigError as exc:
        if "unknown key(s)" in str(exc) and "search_space" in str(exc):  # a sweep file given as a recipe
            raise ConfigError(f"{exc}. {path} is a Tune sweep, not a recipe: run it with `python -m workflows tune "
                              f"--config {path}`") from None
        raise
    if check_files:
        check_data_files(recipe)
    return recipe


def check_data_files(recipe: Recipe) -> None:
    """Fail early (before Ray starts) when a local manifest or label file is missing."""
    for key in ("train_manifest", "val_manifest", "labels"):
        value = getattr(recipe.data, key)
        if not value:
            raise ConfigError(f"data.{key} is not set; point it at your {key.replace('_', ' ')} file")
        if not is_remote(value) and not Path(value).expanduser().exists():
            folder = Path(value).parent
            fix = (f"`python -m workflows data sample --out {folder}` writes the sample dataset the smoke and demo "
                   f"recipes read" if folder.name == "sample" else
                   f"point it at your own with --set data.{key}=PATH (docs/data.md: manifests and label files)")
            raise ConfigError(f"data.{key}: {value} does not exist; {fix}")


def check_clip_file(recipe: Recipe, key: str) -> None:
    """The recipe's frozen CLIP as the workers will build it, read here first (`check_clip_weights`: a local file
    is loaded once, a tag only checked), so a missing, truncated or wrong file fails before Ray, named as `key`."""
    from dist_model.spatial import check_clip_weights

    cfg = recipe.model_cfg
    try:
        check_clip_weights(cfg.clip_arch, cfg.clip_pretrained, cfg.clip_activation)
    except ValueError as exc:  # ClipWeightsError, or an explicit clip_activation the file contradicts
        raise ConfigError(f"{key}: {exc}") from None


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """A copy whose local, relative file paths are absolute: Ray workers do not run in the driver's directory."""

    def absolute(value: str | None) -> str | None:
        if not value or is_remote(value):
            return value
        path = Path(value).expanduser()  # ~/runs: the home directory, not a folder named "~" in the working directory
        return str(path) if path.is_absolute() else str(path.resolve())

    data = dataclasses.replace(recipe.data, **{k: absolute(getattr(recipe.data, k))
                                                for k in ("train_manifest", "val_manifest", "labels")})
    train = dataclasses.replace(recipe.train, init_from=absolute(recipe.train.init_from))
    run = dataclasses.replace(recipe.run, storage_path=absolute(recipe.run.storage_path))
    return dataclasses.replace(recipe, data=data, train=train, run=run)


def with_run_scoped_names(recipe: Recipe) -> Recipe:
    """A copy whose cluster-wide names (the drop-counter actor) carry the run name, so concurrent runs
    (Tune trials) never share counts."""
    name = f"{recipe.data.drop_counter}:{recipe.run.name}"
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, drop_counter=name))


def recipe_from_dict(data: dict) -> Recipe:
    """Rebuild a recipe from the plain dict Ray passed to a worker."""
    return from_dict(Recipe, data)


def recipe_to_dict(recipe: Recipe) -> dict:
    return to_dict(recipe)
