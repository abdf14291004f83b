"""Training checkpoints: what is in one, how it is written and read, and how a model is initialised from one.

A checkpoint directory (one per reported step, managed by Ray Train) holds:

    ds/                    DeepSpeed's own checkpoint (trainable weights, optimizer, lr scheduler), readable by
                           DeepSpeed's tools (e.g. zero_to_fp32.py); written by every rank, merged by Ray
    weights.safetensors    the trainable weights alone (keys `dist_net.*`), for evaluate / predict / init_from
    state.json             step, epoch, steps done in it, metrics, world size; the DiST and data config
                           (the clips trained on per video in the epoch ride in DeepSpeed's client state)
    recipe.yaml            the resolved recipe of the run
    optimizer_full.safetensors  elastic runs only: every trainable parameter's fp32 weight and Adam moments, whole
                           (DeepSpeed's ZeRO files load only at the world size that wrote them)
    complete/rank_<r>.json every file rank r wrote, with its size: written last, so a checkpoint is complete when
                           every rank's list is there and every listed file has its size (`checkpoint_step`)
    complete/rank_<r>.sha256  the same files' SHA-256 in `sha256sum` form (`cd <checkpoint> && sha256sum -c
                           complete/*.sha256`): a file whose bytes changed at the same size (bit rot in its tensor
                           data, which no loader notices) is refused where the checkpoint is resumed or read

Nothing here unpickles arbitrary objects: safetensors and JSON are data-only, and DeepSpeed's files are read
with `torch.load(weights_only=True)` and an explicit allowlist of DeepSpeed's own state classes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from workflows.runtime import is_remote, storage_of

DS_TAG = "ds"
COMPLETE = "complete"
WEIGHTS = "weights.safetensors"
STATE = "state.json"
RECIPE = "recipe.yaml"
CHECKPOINT_PREFIX = "checkpoint_"  # every checkpoint directory of a run: checkpoint_<what Ray Train names it by>
FULL_OPTIMIZER = "optimizer_full.safetensors"  # elastic runs: whole fp32 weights + Adam moments, any world size


def _deepspeed_safe_globals() -> list:
    """DeepSpeed classes that appear in its own checkpoints and are plain state, not code."""
    out: list = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        out += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # a DeepSpeed version that moved them: weights_only will name what is missing
        pass
    import argparse
    import collections

    return out + [collections.OrderedDict, collections.defaultdict, argparse.Namespace, set]


def install_safe_checkpoint_engine(engine: Any) -> None:
    """Make a DeepSpeed engine read checkpoints with `weights_only=True` (its default engine unpickles freely)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine = SafeTorchCheckpointEngine(engine._config)


def write_checkpoint(directory: Path, *, engine: Any, model: torch.nn.Module, rank: int, state: dict[str, Any],
                     recipe_yaml: str, client_extra: dict[str, Any] | None = None, elastic: bool = False) -> None:
    """Write a checkpoint into `directory` (every rank calls this with its own local directory). `client_extra`:
    more entries (tensors or plain values) for DeepSpeed's client state, beside `dist_state`. `elastic`: also the
    whole optimizer state (`full_optimizer_state`), so the checkpoint resumes at any number of workers."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=DS_TAG, client_state={"dist_state": state, **(client_extra or {})},
                           exclude_frozen_parameters=True)
    weights = master_weights(engine, model)  # a collective under ZeRO: every rank takes part
    full = full_optimizer_state(engine, model) if elastic else None  # a collective too
    if rank == 0:
        write_model_files(directory, model=model, state=state, recipe_yaml=recipe_yaml, weights=weights)
        if full is not None:
            save_file(full, str(directory / FULL_OPTIMIZER))
    write_file_list(directory, rank)


OPTIMIZER_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def _base_optimizer(engine: Any) -> Any:
    """The torch optimizer inside DeepSpeed's ZeRO-1/2 wrapper (it steps the flat fp32 partitions)."""
    return engine.optimizer.optimizer


def _link_optimizer_state(engine: Any) -> None:
    """Point every parameter's optimizer-state view at its partition's Adam state. DeepSpeed (0.19) links them
    once, right after the first parameter group's first step, when the other groups have no state yet: their views
    stay empty (DiST has two groups, with and without weight decay)."""
    zero = engine.optimizer
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def full_optimizer_state(engine: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter's fp32 master weight and Adam moments, whole ("<key>/<name>"), and the Adam step
    ("step"), gathered from ZeRO's partitions: a collective, every rank calls it in step. About 3 x 4 bytes per
    trainable parameter (~300 MB for the B/16 branch)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _link_optimizer_state(engine)
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():  # the same order on every rank
        if not param.requires_grad:
            continue
        out[f"fp32/{name}"] = safe_get_full_fp32_param(param)
        for key in OPTIMIZER_KEYS[1:]:
            out[f"{key}/{name}"] = safe_get_full_optimizer_state(param, key)
    out = {k: v.detach().float().cpu().contiguous() for k, v in out.items()}
    states = [s for s in _base_optimizer(engine).state.values() if "step" in s]
    out["step"] = torch.tensor([float(states[0]["step"]) if states else 0.0], dtype=torch.float64)
    return out


def restore_full_optimizer_state(engine: Any, model: torch.nn.Module, directory: str | Path) -> None:
    """Put a checkpoint's whole optimizer state (`full_optimizer_state`) into an engine built at another world
    size, after `engine.load_checkpoint(..., load_optimizer_states=False)` loaded the weights and lr schedule:
    the Adam state of each of this rank's flat partitions is created, linked, then filled from the whole tensors."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors.torch import load_file

    path = Path(directory) / FULL_OPTIMIZER
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {FULL_OPTIMIZER}: it was written by a fixed-size run, whose "
                                f"ZeRO optimizer files load only at the number of workers that wrote them; resume "
                                f"with that scaling.num_workers (state.json: world_size)")
    full = load_file(str(path))
    base = _base_optimizer(engine)
    for group in base.param_groups:  # torch's AdamW creates its state at the first step; create it now
        for flat in group["params"]:
            base.state[flat] = {"step": torch.tensor(float(full["step"][0]), dtype=torch.float32),
                                "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    zero = engine.optimizer
    zero._link_all_hp_params()  # each parameter's view into this rank's flat partitions...
    _link_optimizer_state(engine)  # ...and into their (now existing) Adam state
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        safe_set_full_fp32_param(param, full[f"fp32/{name}"].to(param.device))
        for key in OPTIMIZER_KEYS[1:]:
            safe_set_full_optimizer_state(param, full[f"{key}/{name}"].to(param.device), key)
    zero.update_lp_params()  # the module's weights from the restored fp32 masters


def write_file_list(directory: Path, rank: int) -> None:
    """complete/rank_<rank>.json: every file under `directory` (this rank's part of the checkpoint) and its size;
    complete/rank_<rank>.sha256 their SHA-256 (written first: the size list, last, makes the checkpoint complete)."""
    files = {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / COMPLETE).mkdir(exist_ok=True)
    (directory / COMPLETE / f"rank_{rank}{CHECKSUMS}").write_text(
        "".join(f"{_sha256(directory / name)}  {name}\n" for name in files))
    (directory / COMPLETE / f"rank_{rank}.json").write_text(json.dumps(files, indent=1))


CHECKSUMS = ".sha256"
WEIGHTS_CHECKSUM = f"{COMPLETE}/rank_0{CHECKSUMS}"  # rank 0 writes weights.safetensors


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def written_checksums(directory: str | Path) -> dict[str, str]:
    """{file: SHA-256 as written} over every rank's complete/rank_<r>.sha256 ({} for a checkpoint written before
    these lists, or whose lists are unreadable)."""
    digests: dict[str, str] = {}
    for listing in sorted((Path(directory) / COMPLETE).glob(f"rank_*{CHECKSUMS}")):
        try:
            lines = listing.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            digest, sep, name = line.partition("  ")
            if sep and len(digest) == 64:
                digests[name] = digest
    return digests


def changed_files(directory: str | Path, names: list[str] | None = None) -> list[str]:
    """The files of a checkpoint directory (all listed, or `names`) whose bytes are not those written: their SHA-256
    differs from the rank's list (a listed file that is gone counts too). A full read of each file checked."""
    digests = written_checksums(directory)
    changed = []
    for name in (digests if names is None else [n for n in names if n in digests]):
        path = Path(directory) / name
        if not path.is_file() or _sha256(path) != digests[name]:
            changed.append(name)
    return changed


def check_written_bytes(directory: str | Path, checkpoint_path: str) -> None:
    """CorruptCheckpoint when a file of the checkpoint to resume from (at `checkpoint_path` in the run's storage;
    read in `directory`, a local copy for a remote one) is not what was written (`changed_files`), before DeepSpeed
    reads a possibly rotted tensor without a complaint."""
    changed = changed_files(directory)
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise CorruptCheckpoint(f"{checkpoint_path.rstrip('/').rsplit('/', 1)[-1]} cannot be loaded: {shown} "
                                f"{'does' if len(changed) == 1 else 'do'} not hold the bytes written (SHA-256 against "
                                f"{COMPLETE}/rank_*{CHECKSUMS})")


def _read_json_at(fs: Any, path: str) -> Any:
    """A JSON file on pyarrow filesystem `fs`; raises OSError or ValueError when it is missing or unreadable."""
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def read_state_at(fs: Any, path: str) -> dict[str, Any]:
    """state.json of the checkpoint at `path` on pyarrow filesystem `fs` ({} when it has none or it is unreadable)."""
    try:
        return _read_json_at(fs, f"{path}/{STATE}")
    except (OSError, ValueError):
        return {}


def checkpoint_step(fs: Any, path: str) -> int | None:
    """The step of the checkpoint at `path` on pyarrow filesystem `fs` when it is complete: its state.json names
    the world size, and every rank's file list is there with every listed file at its listed size. None when it
    is not (a partial upload, a rank that died while writing, or a checkpoint from before these lists)."""
    state = complete_checkpoint_state(fs, path)
    return None if state is None else int(state["step"])


def complete_checkpoint_state(fs: Any, path: str, state: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The state.json of the checkpoint at `path` when it is complete (see `checkpoint_step`), else None. `state`:
    that state.json when it was read already."""
    import pyarrow.fs

    try:
        state = state or read_state_at(fs, path)
        listed: dict[str, int] = {}
        for rank in range(int(state["world_size"])):
            listed.update(_read_json_at(fs, f"{path}/{COMPLETE}/rank_{rank}.json"))
    except (OSError, KeyError, ValueError):
        return None
    infos = fs.get_file_info([f"{path}/{name}" for name in listed])
    if any(i.type != pyarrow.fs.FileType.File or i.size != listed[name] for i, name in zip(infos, listed, strict=True)):
        return None
    return state


def newest_complete_checkpoint(run_dir: str, but: str | None = None) -> tuple[Any, str, int] | None:
    """(pyarrow filesystem, path, step) of the complete checkpoint_* directory with the highest step in a run
    directory (a local path or a URI), other than the one at path `but`; or None."""
    try:
        fs, root = storage_of(run_dir)
        paths = checkpoint_dirs(fs, root)
    except (OSError, ValueError):
        return None
    # Newest step first, and every rank's file list read for those down to the first complete one only: in a bucket
    # each list is a request, and a lookup used to read them all for every checkpoint (ranks x checkpoints).
    # Of two at one step (a step redone after a restart), the later one written.
    states = [(state, path) for path in paths if path != (but or "").rstrip("/")
              for state in [read_state_at(fs, path)] if isinstance(state.get("step"), int)]
    for state, path in sorted(states, key=lambda sp: (sp[0]["step"], sp[1]), reverse=True):
        if complete_checkpoint_state(fs, path, state) is not None:
            return fs, path, int(state["step"])
    return None


def checkpoint_dirs(fs: Any, root: str) -> list[str]:
    """The paths of the checkpoint_* directories in the run directory `root` on pyarrow filesystem `fs` (none when
    it does not exist)."""
    import pyarrow.fs

    entries = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    return [e.path.rstrip("/") for e in entries
            if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith(CHECKPOINT_PREFIX)]


def estimated_checkpoint_bytes(trainable_params: int, module_bytes: int, elastic: bool) -> int:
    """What one checkpoint takes in storage, per trainable parameter: weights.safetensors (fp32, 4 bytes),
    DeepSpeed's module states (`module_bytes`: 2 in bf16/fp16 runs, 4 in fp32), its ZeRO optimizer partitions (fp32
    weights and two Adam moments, 12) and, in elastic runs, optimizer_full.safetensors (12 more). dist_tiny's
    0.21 M parameters in fp32: 4.24 MB estimated, 4.38 MB written by 2 workers (DeepSpeed's helper scripts are
    most of the rest)."""
    return trainable_params * (4 + module_bytes + 12 + (12 if elastic else 0))


# Ray Train's list of the checkpoints it registered, in the run directory; its controller reads it at every start.
RAY_REGISTRY = "checkpoint_manager_snapshot.json"


def _ray_reads_registry(registry: dict[str, Any]) -> bool:
    """Whether Ray Train's own model of its registry takes `registry` (what its controller checks first; an internal
    of Ray 2.60: where it is not found, the registry is taken as readable)."""
    try:
        from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState
    except ImportError:
        return True
    try:
        _CheckpointManagerState.parse_obj(registry)
    except Exception:  # noqa: BLE001 - pydantic's ValidationError, or a TypeError on a wrong shape
        return False
    return True


def set_aside_unusable_registry(run_dir: str) -> str | None:
    """Move Ray Train's checkpoint registry aside when its controller could not start from it, so the run can
    resume (from its newest complete checkpoint, `checkpoint_to_resume`) instead of failing at every launch; returns
    the line that says so, or None when the registry is usable or absent. Unusable: cut short (Ray writes it in
    place: a full disk, or a driver killed mid-write, leaves it empty or truncated), naming a checkpoint that is
    no longer in the run directory (deleted by hand, to free space), or in a form this Ray cannot read (another
    version's: an upgrade would otherwise strand every interrupted run). Ray's retention then no longer knows the older
    checkpoints; the driver's pruning at the end of the run applies its rule to them."""
    import time

    import pyarrow.fs
    import ray

    try:
        fs, root = storage_of(run_dir)
        path = f"{root.rstrip('/')}/{RAY_REGISTRY}"
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            text = f.read()
    except (OSError, ValueError):  # no storage to read: the run's own start will say so
        return None
    try:
        registry = json.loads(text)
    except ValueError:
        registry = None
    if registry is None:
        why = f"is cut short ({len(text)} bytes: written while the disk filled up, or by a process killed mid-write)"
    elif not isinstance(registry, dict) or not _ray_reads_registry(registry):  # an upgrade moved Ray on
        version = registry.get("ray_version", "(unknown)") if isinstance(registry, dict) else "(unknown)"
        why = f"was written by Ray {version} in a form Ray {ray.__version__} cannot read"
    else:
        names = sorted({r.get("checkpoint_dir_name") for r in registry.get("checkpoint_results", [])} - {None})
        infos = fs.get_file_info([f"{root.rstrip('/')}/{name}" for name in names])
        gone = [i.base_name for i in infos if i.type != pyarrow.fs.FileType.Directory]
        if not gone:
            return None
        why = f"names checkpoints no longer in the run directory ({', '.join(gone)}: moved or deleted by hand?)"
    aside = f"{path}.unusable-{time.strftime('%Y%m%d-%H%M%S')}"
    while fs.get_file_info(aside).type != pyarrow.fs.FileType.NotFound:  # one set aside in the same second
        aside += "-1"
    fs.move(path, aside)
    return (f"Ray Train's checkpoint registry {RAY_REGISTRY} {why}; Ray would refuse to start the run from it, so it "
            f"was moved aside to {aside.rsplit('/', 1)[-1]}: the run resumes from its newest complete checkpoint")


def remove_partial_checkpoints(run_dir: str) -> list[str]:
    """Delete the checkpoint_* directories of a run that are not complete (`checkpoint_step` is None): what a run
    that failed on a full disk left half-written. Nothing resumes from them, and the space they hold is what the
    run's driver needs to save its own state. Only for a run none of whose workers still writes. Returns the
    deleted paths."""
    fs, root = storage_of(run_dir)
    partial = [path for path in checkpoint_dirs(fs, root) if checkpoint_step(fs, path) is None]
    for path in partial:
        fs.delete_dir(path)
    return partial


def metric_score(metrics: dict[str, Any] | None, metric: str) -> float:
    """A report's `metric` to rank checkpoints by (eval.best_metric): -inf when it has none or NaN (a checkpoint
    written without a validation, before a resize), as Ray Train ranks those last."""
    value = (metrics or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else -math.inf


# How Ray Train 2.60 names the checkpoint directories it writes (StorageContext.make_default_checkpoint_dir_name):
# only those are pruned, so a directory a user put in the run directory (a backup, `checkpoint_best`) is never
# deleted, whatever it holds.
RAY_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}\d{{4}}-\d{{2}}-\d{{2}}_\d{{2}}-\d{{2}}-\d{{2}}\.\d{{6}}")


def prune_unretained_checkpoints(run_dir: str, retained: list[str], keep: int,
                                 metric: str = "val_top1") -> dict[str, int | None] | None:
    """Delete the checkpoint_* directories of a finished run that Ray Train neither retains (`retained`: the paths of
    its kept checkpoints) nor would have: partial uploads cut by a storage outage, and complete checkpoints whose
    report Ray never collected (a worker lost in between) where Ray's own rule would have dropped them too: `keep`
    retained ones score at least as high by `metric` (eval.best_metric) and a retained one is newer. Ray's
    retention never sees those directories, so they would stay in storage for good. Only directories named as Ray
    Train names its own (RAY_CHECKPOINT_NAME) are deleted. Returns {deleted path: its
    step, None when partial}. Deletes nothing and returns None when `retained` names a directory that is not there
    (paths in another form than the listing's: better keep than guess), or when it is empty."""
    kept = {path.rstrip("/") for path in retained}
    if not kept:
        return None
    fs, root = storage_of(run_dir)
    found = set(checkpoint_dirs(fs, root))
    if not kept <= found:
        return None

    def score(state: dict[str, Any]) -> float:
        return metric_score(state.get("metrics"), metric)

    states = {path: read_state_at(fs, path) for path in kept}
    newest = max(int(state.get("step", -1)) for state in states.values())
    scores = [score(state) for state in states.values()]
    removed: dict[str, int | None] = {}
    for path in sorted(found - kept):
        if not RAY_CHECKPOINT_NAME.fullmatch(path.rsplit("/", 1)[-1]):
            continue  # not written by Ray Train: the user's
        state = complete_checkpoint_state(fs, path)
        step = None
        if state is not None:
            step, mine = int(state["step"]), score(state)
            if step >= newest or sum(s >= mine for s in scores) < keep:
                continue  # Ray would have kept it: the latest, or among the best `keep`
        fs.delete_dir(path)
        removed[path] = step
    return removed


def master_weights(engine: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` (the trainable weights) as fp32 CPU tensors (`engine` None: the module's own values).
    In bf16/fp16 the module holds only a rounding of each trainable parameter; the values training reached are
    DeepSpeed's fp32 master copy, partitioned over the ranks under ZeRO, so gathering them is a collective: every
    rank calls this, in step."""
    weights = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    if engine is None or not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return weights
    from deepspeed.utils import safe_get_full_fp32_param

    for name, param in model.named_parameters():  # the same order on every rank
        if param.requires_grad and name in weights:
            master = safe_get_full_fp32_param(param)
            if master is not None:
                weights[name] = master.detach().float().cpu().contiguous()
    return weights


def write_model_files(directory: Path, *, model: torch.nn.Module, state: dict[str, Any], recipe_yaml: str,
                      weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write the DeepSpeed-free part of a checkpoint (weights.safetensors, state.json, recipe.yaml): all that
    evaluate / predict / init_from read. `state` needs at least `model` (the recipe's model section) and
    `class_names`; `weights` defaults to the model's own (see `master_weights` for reduced precision)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(master_weights(None, model) if weights is None else weights, str(directory / WEIGHTS))
    (directory / STATE).write_text(json.dumps(state, indent=2, default=str))
    (directory / RECIPE).write_text(recipe_yaml)


class CorruptCheckpoint(ValueError):
    """A checkpoint file that is there but cannot be read: truncated (a copy or an upload cut short), overwritten,
    or not what its name says. Built by `corrupt_checkpoint` (reading one file of a checkpoint: the message names
    the file, what is wrong and what to use instead) or `unreadable_checkpoint` (a training run resuming from the
    whole checkpoint: its loader's complaint). A plain ValueError otherwise: it pickles, e.g. raised in a Ray Train
    worker."""


# What torch.load (DeepSpeed's files), safetensors and json say of bytes that are not what was written: a checkpoint
# whose files have their listed sizes (complete) but not their content (bit rot, a partial overwrite, a bad copy).
_UNREADABLE = re.compile(r"UnpicklingError|Weights only load failed|PytorchStreamReader|invalid load key|central "
                         r"directory|Ran out of input|SafetensorError|deserializ|EOFError|JSONDecodeError|"
                         r"not a zip file|corrupt", re.IGNORECASE)


def unreadable_checkpoint(checkpoint_path: str, exc: BaseException) -> CorruptCheckpoint | None:
    """A CorruptCheckpoint when `exc`, raised while loading the checkpoint at `checkpoint_path` to resume from it,
    says its bytes cannot be read; None for anything else (storage that does not answer, memory, a bug), which a
    restart may still fix."""
    text = f"{type(exc).__name__}: {exc}"
    if not _UNREADABLE.search(text):
        return None
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return CorruptCheckpoint(f"{checkpoint_path.rstrip('/').rsplit('/', 1)[-1]} cannot be loaded: its files have the "
                             f"sizes they were written with, not their content ({type(exc).__name__}: {first[:160]})")


def corrupt_checkpoint(directory: str | Path, name: str, problem: Any) -> CorruptCheckpoint:
    """The one error for an unreadable file `name` (weights.safetensors, state.json, recipe.yaml) of the checkpoint
    `directory`: the reader's complaint (on one line), the size the checkpoint's file list records when it
    differs, and the run's other checkpoints (siblings holding state.json and weights.safetensors) to use instead."""
    directory = Path(directory)
    lines = [line.strip() for line in str(problem).splitlines() if line.strip() and not line[0].isspace()]
    detail = ": ".join(lines[:2]) or type(problem).__name__  # a YAML error's context and problem, not its excerpt
    written, size = _listed_size(directory, name), (directory / name).stat().st_size
    if written is not None and written != size:
        detail = f"{size} of the {written} bytes written; {detail}"
    others = sorted((d.name for d in _model_checkpoints(directory.parent) if d.resolve() != directory.resolve()),
                    reverse=True)
    instead = (f"another checkpoint of the run (in {directory.parent}: {', '.join(others[:3])}"
               f"{', ...' if len(others) > 3 else ''})" if others else "another checkpoint")
    return CorruptCheckpoint(f"{directory / name} is corrupt or truncated ({detail}): use {instead}, or copy this "
                             f"one again from where the run stored it")


def _listed_size(directory: Path, name: str) -> int | None:
    """The size the checkpoint's complete/rank_*.json lists record for file `name` (None: not listed)."""
    for listing in sorted((directory / COMPLETE).glob("rank_*.json")):
        try:
            size = json.loads(listing.read_text()).get(name)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(size, int):
            return size
    return None


def read_state(directory: str | Path) -> dict[str, Any]:
    """state.json of a checkpoint directory; CorruptCheckpoint when it is not a JSON object."""
    path = Path(directory) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a DiST checkpoint (no {STATE})")
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise corrupt_checkpoint(directory, STATE, exc) from None
    if not isinstance(state, dict):
        raise corrupt_checkpoint(directory, STATE, f"a JSON {type(state).__name__}, not an object")
    return state


def read_recipe(directory: str | Path) -> dict[str, Any]:
    """recipe.yaml of a checkpoint directory as written ({} when it has none); CorruptCheckpoint when it is not a
    YAML mapping."""
    from workflows.config_loader import ConfigError, load_yaml

    path = Path(directory) / RECIPE
    if not path.is_file():
        return {}
    try:
        return load_yaml(path)
    except (ConfigError, UnicodeDecodeError) as exc:  # the YAML parser's own words, without load_yaml's prefix
        raise corrupt_checkpoint(directory, RECIPE, exc.__cause__ or exc) from None


def _read_weights_file(directory: str | Path, read: Any) -> Any:
    """`read(path)` of a checkpoint's weights.safetensors; FileNotFoundError without one, CorruptCheckpoint when
    the safetensors reader refuses it."""
    from safetensors import SafetensorError

    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a DiST checkpoint (no {WEIGHTS})")
    try:
        return read(str(path))
    except SafetensorError as exc:
        raise corrupt_checkpoint(directory, WEIGHTS, exc) from None


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """Trainable weights of a checkpoint directory (safetensors: data only); CorruptCheckpoint when unreadable, or
    when its bytes are not those written (a checkpoint's SHA-256 list; safetensors checks the header, not the
    tensors)."""
    from safetensors.torch import load_file

    weights = _read_weights_file(directory, load_file)
    if changed_files(directory, [WEIGHTS]):
        raise corrupt_checkpoint(directory, WEIGHTS, f"its bytes are not those written: its SHA-256 differs from "
                                                     f"{WEIGHTS_CHECKSUM}'s")
    return weights


def weight_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a checkpoint's trainable weights, from the safetensors header alone (no tensor is read; a
    truncated file is caught too: the header must cover the file); CorruptCheckpoint when unreadable."""
    from safetensors import safe_open

    def header(path: str) -> dict[str, tuple[int, ...]]:
        with safe_open(path, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}

    return _read_weights_file(directory, header)


def child_uri(uri: str, root: str, path: str) -> str:
    """`uri` (whose filesystem path is `root`) with its path replaced by `path`, a path below `root` on the same
    filesystem: the scheme, user-info and query (endpoint_override=..., credentials) are kept, as workers need them."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + path[len(root.rstrip("/")):]))


def remote_checkpoint(uri: str) -> tuple[Any, str, str]:
    """(pyarrow filesystem, path, URI) of the checkpoint `uri` names in a bucket: `uri` itself when it holds
    state.json and the weights, else, for a run directory, its newest complete checkpoint (every rank's file list
    there with every file at its size, so a partial upload is never used). FileNotFoundError saying what was
    expected otherwise. Credentials and endpoint come from the URI or the environment (AWS_*, GOOGLE_*)."""
    import pyarrow.fs as pafs

    from workflows.runtime import redact_secrets

    shown = redact_secrets(uri)
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        root = root.rstrip("/")
        state, weights, folder = fs.get_file_info([f"{root}/{STATE}", f"{root}/{WEIGHTS}", root])
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"checkpoint {shown} cannot be read: {exc}") from None
    if state.type == pafs.FileType.File:
        if weights.type != pafs.FileType.File:
            raise FileNotFoundError(f"{shown} has {STATE} but no {WEIGHTS}: an incomplete DiST checkpoint")
        return fs, root, uri
    if folder.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"checkpoint {shown} does not exist")
    found = newest_complete_checkpoint(uri)
    if found is None:
        raise FileNotFoundError(f"{shown} is not a DiST checkpoint (no {STATE}) and holds no complete checkpoint_* "
                                f"directory (a partial upload is never used); pass a checkpoint directory")
    return fs, found[1], child_uri(uri, root, found[1])


def fetch_remote_checkpoint(uri: str, names: tuple[str, ...] = (STATE, WEIGHTS, RECIPE, WEIGHTS_CHECKSUM),
                            into: str | Path | None = None) -> tuple[Path, str]:
    """Download the files `names` (by default what scoring reads, and rank 0's checksums, which cover the weights;
    never DeepSpeed's optimizer files) of the checkpoint `uri` names in a bucket (see `remote_checkpoint`) into
    `into` (default a new scratch directory). Returns (local directory, URI of the checkpoint used)."""
    import pyarrow.fs as pafs

    from workflows.runtime import scratch_dir

    fs, chosen, chosen_uri = remote_checkpoint(uri)
    local = Path(into) if into is not None else scratch_dir("dist-checkpoint-")
    for name in names:
        if fs.get_file_info(f"{chosen}/{name}").type == pafs.FileType.File:
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{chosen}/{name}", str(local / name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
    return local, chosen_uri


def resolve_init_from(source: str) -> tuple[str, int | None]:
    """The one checkpoint `train.init_from` names, chosen once on the driver so every worker (and every restart)
    reads the same one, and the resolved recipe records it: a run directory (local or in a bucket) becomes its newest
    checkpoint (as `evaluate --checkpoint` takes it); a checkpoint directory or an authors' file stays as given.
    Returns (source, step of the chosen checkpoint when a run directory was resolved, else None); FileNotFoundError
    when there is nothing to start from."""
    if is_remote(source):
        fs, chosen, chosen_uri = remote_checkpoint(source)
        return (source, None) if chosen_uri == source else (chosen_uri, int(read_state_at(fs, chosen)["step"]))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source} does not exist (a checkpoint or run directory of ours, or an authors' "
                                ".pyth file)")
    if path.is_file() or (path / STATE).is_file() or (path / WEIGHTS).is_file():
        return source, None
    chosen = find_checkpoint(path)
    return str(chosen), int(read_state(chosen).get("step", 0))


def init_model_from(model: torch.nn.Module, source: str | Path) -> str:
    """Initialise trainable weights from one of our checkpoint directories or an authors' checkpoint file.

    Only the label texts differ between pre-training and fine-tuning, so every weight transfers; frame-count
    dependent tensors are interpolated. Returns a one-paragraph report.
    """
    from dist_model.checkpoint import load_authors_checkpoint

    if is_remote(str(source)):  # a checkpoint in a bucket (s3://, gs://): fetch its weights alone
        import tempfile

        with tempfile.TemporaryDirectory(prefix="dist-init-") as local:  # the weights are read into memory below
            _, chosen = fetch_remote_checkpoint(str(source), names=(WEIGHTS, WEIGHTS_CHECKSUM), into=local)
            from workflows.runtime import redact_secrets

            return init_model_from(model, local).replace(local, redact_secrets(chosen))  # workers log this line
    source = Path(source)
    state: Any = read_weights(source) if source.is_dir() else source
    if getattr(model, "trainable_name", "dist_net") != "dist_net":
        result = model.load_state_dict(state if source.is_dir() else {}, strict=True)
        return f"loaded {source} into {model.trainable_name} ({result})"
    report = load_authors_checkpoint(model, state)
    if report.mismatched or len(report.loaded) == 0:
        raise RuntimeError(f"init_from {source} does not fit this model:\n{report.summary()}")
    return f"initialised from {source}: {report.summary()}"


def _model_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint_* directories of a local run that hold the model files (state.json and weights)."""
    return [d for d in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if (d / STATE).is_file() and (d / WEIGHTS).is_file()]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from `path`: a checkpoint itself, or a run directory (its latest checkpoint by
    step). Raises FileNotFoundError saying what was expected."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is a file; expected a checkpoint directory (with {STATE} and "
                                f"{WEIGHTS}) or a run directory holding checkpoint_* directories")
    if (path / STATE).is_file():
        if not (path / WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} has {STATE} but no {WEIGHTS}: an incomplete DiST checkpoint")
        return path
    found = _model_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} is not a DiST checkpoint: no {STATE}/{WEIGHTS} in it, and no checkpoint_* "
                                f"directories holding them (pass a <run>/checkpoint_* directory of a training run)")
    return max(found, key=lambda d: (int(read_state(d).get("step", 0)), d.name))
