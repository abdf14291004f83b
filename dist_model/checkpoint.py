"""The one place that maps the authors' DiST checkpoints onto our modules (reference §2.7).

Their `.pyth` files hold `{"model_state": {...}, ...}` with keys such as
`backbone.base_encoder.dist_net.input_linears.0.weight` (older ones say `ladder_net.*` with other module names,
and DDP-saved ones start with `module.`). Our `DiSTNet` uses their module names, so the mapping is: unwrap,
strip prefixes, rename old names, interpolate the frame-count-dependent tensors along time, and report what did
not match. Files are read with `weights_only=True`: a checkpoint can never run code on load.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# Old internal names (`ladder_net.*`) -> released names (`dist_net.*`), per the authors' process_dist_cpkt.py.
OLD_TO_NEW = {
    "input_map_feat_nets": "input_linears",
    "s2t_fuse_nets": "integration2temporal_nets",
    "t2s_fuse_nets": "temporal2integration_nets",
    "spatial_nets": "integration_nets",
    "final_temporal_nets": "adapooling_nets",
}
_WRAPPER_KEYS = ("model_state", "state_dict", "model", "module")
_BRANCH_RE = re.compile(r"(?:^|\.)(dist_net|ladder_net)\.(.*)$")
# Tensors sized by the sparse frame count T: (1, 1, T, D) and (1, T, D).
_TIME_DIM = {"cls_token": 2, "positional_embedding": 1}


@dataclass
class LoadReport:
    """What happened to every key of a loaded checkpoint."""

    loaded: list[str] = field(default_factory=list)
    interpolated: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (frames in file, frames now)
    missing: list[str] = field(default_factory=list)  # our keys the file lacked (left at their init)
    unexpected: list[str] = field(default_factory=list)  # branch keys we have no module for
    mismatched: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)  # key -> (file shape, our shape)
    unused_by_design: list[str] = field(default_factory=list)  # the last integration->temporal map (see model.py)
    ignored_outside_branch: int = 0  # CLIP and other non-DiST keys (the frozen CLIP is rebuilt from its tag)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} tensors ({len(self.interpolated)} interpolated along time); "
            f"ignored {self.ignored_outside_branch} keys outside the DiST branch"
        ]
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("unused by design", self.unused_by_design)):
            if items:
                lines.append(f"{title} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
        for key, (theirs, ours) in list(self.mismatched.items())[:8]:
            lines.append(f"shape mismatch {key}: file {theirs} vs model {ours}")
        return "\n".join(lines)


def looks_like_torch_file(path: str | Path) -> bool:
    """A torch.save / torch.jit.save file: a complete zip archive, or (torch.save before 1.6) a pickle stream."""
    with open(path, "rb") as f:
        first = f.read(1)
    return zipfile.is_zipfile(path) or first == b"\x80"


def read_state_dict(source: str | Path | dict) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (safely) or take a dict, and unwrap the usual containers."""
    if isinstance(source, (str, Path)):
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file and the reason
            if not looks_like_torch_file(source):  # torch's message would suggest weights_only=False: wrong here
                raise RuntimeError(f"{source} is not a PyTorch checkpoint (a torch.save file): another kind of "
                                   "file, or a truncated download") from None
            raise RuntimeError(
                f"could not read checkpoint {source}: {exc}. Only tensor checkpoints are accepted (weights_only); "
                "re-save untrusted pickles as plain state dicts."
            ) from exc
    else:
        state = source
    while isinstance(state, dict):
        inner = next((state[k] for k in _WRAPPER_KEYS if k in state and isinstance(state[k], dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict):
        raise RuntimeError(f"checkpoint holds a {type(state).__name__}, not a state dict")
    return state


def authors_key_to_ours(key: str) -> str | None:
    """`[module.][backbone.base_encoder.]dist_net.X` or `ladder_net.<old>.X` -> our `X`; None if not a DiST key."""
    match = _BRANCH_RE.search(key)
    if match is None:
        return None
    branch, rest = match.groups()
    if branch == "ladder_net":
        head, _, tail = rest.partition(".")
        rest = f"{OLD_TO_NEW.get(head, head)}.{tail}" if tail else OLD_TO_NEW.get(head, head)
    return rest


def interpolate_frames(tensor: torch.Tensor, dim: int, frames: int) -> torch.Tensor:
    """Linearly resample a per-frame parameter along `dim` to `frames` entries."""
    moved = tensor.float().movedim(dim, -1)  # (..., T)
    shape = moved.shape
    resized = F.interpolate(moved.reshape(1, -1, shape[-1]), size=frames, mode="linear", align_corners=False)
    return resized.reshape(*shape[:-1], frames).movedim(-1, dim).to(tensor.dtype)


def load_authors_checkpoint(model: torch.nn.Module, source: str | Path | dict) -> LoadReport:
    """Load the authors' DiST weights into `model` (a DiST or a bare DiSTNet) and report unmatched keys.

    The frozen CLIP's weights in the file are ignored: CLIP comes from `clip_pretrained`.
    """
    net = getattr(model, "dist_net", model)
    ours = net.state_dict()
    report = LoadReport()
    incoming: dict[str, torch.Tensor] = {}
    for key, value in read_state_dict(source).items():
        mapped = authors_key_to_ours(key)
        if mapped is None:
            report.ignored_outside_branch += 1
            continue
        if mapped not in ours:
            if re.match(rf"integration2temporal_nets\.{len(net.temporal_nets) - 1}\.", mapped):
                report.unused_by_design.append(mapped)
            else:
                report.unexpected.append(mapped)
            continue
        target = ours[mapped]
        if value.shape != target.shape:
            leaf = mapped.rsplit(".", 1)[-1]
            dim = _TIME_DIM.get(leaf)
            same_elsewhere = dim is not None and value.dim() == target.dim() and all(
                a == b for i, (a, b) in enumerate(zip(value.shape, target.shape, strict=True)) if i != dim
            )
            if not same_elsewhere:
                report.mismatched[mapped] = (tuple(value.shape), tuple(target.shape))
                continue
            report.interpolated[mapped] = (value.shape[dim], target.shape[dim])
            value = interpolate_frames(value, dim, target.shape[dim])
        incoming[mapped] = value.to(target.dtype)
    report.loaded = sorted(incoming)
    report.missing = sorted(set(ours) - set(incoming) - set(report.mismatched))
    net.load_state_dict(incoming, strict=False)
    return report


def to_authors_state_dict(model: torch.nn.Module, prefix: str = "backbone.base_encoder.dist_net.",
                          old_names: bool = False) -> dict[str, torch.Tensor]:
    """Our trainable weights under the authors' key layout (for exporting, and for tests of the loader)."""
    net = getattr(model, "dist_net", model)
    new_to_old = {v: k for k, v in OLD_TO_NEW.items()}
    out = {}
    for key, value in net.state_dict().items():
        if old_names:
            head, _, tail = key.partition(".")
            key = f"{new_to_old.get(head, head)}.{tail}" if tail else new_to_old.get(head, head)
        out[prefix + key] = value.clone()
    return out
