"""Ray Train's checkpoint registry as `checkpoints.set_aside_unusable_registry` judges it, checked on a registry a
real run wrote (by test_pretrain's SIGKILL test and by the full-disk test, `make disk-test`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def check_registry_rules(runs: Path, set_aside_before: int) -> None:
    """`runs`: a run directory whose registry Ray wrote and names its checkpoints; `set_aside_before`: how many
    registries were set aside there already. Leaves the run directory changed (a checkpoint deleted)."""
    import ray

    from workflows.checkpoints import RAY_REGISTRY, set_aside_unusable_registry

    set_aside = lambda: len(list(runs.glob(f"{RAY_REGISTRY}.unusable-*")))  # noqa: E731
    assert set_aside() == set_aside_before
    assert set_aside_unusable_registry(str(runs)) is None
    # A checkpoint the registry names, deleted by hand (to free space), makes it unusable too: Ray refuses a
    # registry naming a missing checkpoint, so it is set aside at the next launch.
    named = json.loads((runs / RAY_REGISTRY).read_text())["checkpoint_results"]
    shutil.rmtree(runs / named[0]["checkpoint_dir_name"])
    note = set_aside_unusable_registry(str(runs))
    assert note and f"({named[0]['checkpoint_dir_name']}: moved or deleted by hand?)" in note
    assert not (runs / RAY_REGISTRY).exists() and set_aside() == set_aside_before + 1
    # One in a form this Ray cannot read (another version's): an upgrade must not strand interrupted runs. Another
    # version's in this form is read, and kept.
    # the one just set aside (one cut short to 0 bytes may be there too)
    registry = json.loads(max(runs.glob(f"{RAY_REGISTRY}.unusable-*"), key=lambda p: p.stat().st_size).read_text())
    registry["checkpoint_results"] = [r for r in registry["checkpoint_results"]  # the ones still there
                                      if (runs / r["checkpoint_dir_name"]).is_dir()]
    (runs / RAY_REGISTRY).write_text(json.dumps({**registry, "ray_version": "2.59.0"}))
    assert set_aside_unusable_registry(str(runs)) is None
    older = {k: v for k, v in registry.items() if k != "current_report_index"}
    (runs / RAY_REGISTRY).write_text(json.dumps({**older, "ray_version": "2.59.0"}))
    note = set_aside_unusable_registry(str(runs))
    assert note and f"was written by Ray 2.59.0 in a form Ray {ray.__version__} cannot read" in note
