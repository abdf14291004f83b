"""Which checkpoints in a run directory are complete (every rank's files at their written sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs

from workflows.checkpoints import checkpoint_step, newest_complete_checkpoint, write_file_list


def _checkpoint(run: Path, name: str, step: int, world: int = 2, val_top1: float | None = None,
                **metrics: float) -> Path:
    """A checkpoint as Ray merges it: each rank's files, then each rank's file list (written last by that rank)."""
    for rank in range(world):
        local = run / f"rank{rank}-{name}"
        (local / "ds").mkdir(parents=True)
        (local / "ds" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(b"x" * (1000 + rank))
        if rank == 0:
            (local / "state.json").write_text(json.dumps({"step": step, "world_size": world,
                                                          "metrics": {"val_top1": val_top1, **metrics}}))
            (local / "weights.safetensors").write_bytes(b"w" * 500)
        write_file_list(local, rank)
        merged = run / name
        for path in local.rglob("*"):
            if path.is_file():
                target = merged / path.relative_to(local)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    return run / name


def test_a_checkpoint_is_complete_only_with_every_ranks_files_at_their_sizes(tmp_path):
    fs = pyarrow.fs.LocalFileSystem()
    run = tmp_path / "run"
    good = _checkpoint(run, "checkpoint_a", step=4)
    assert checkpoint_step(fs, str(good)) == 4
    truncated = _checkpoint(run, "checkpoint_b", step=8)
    optim = truncated / "ds" / "zero_pp_rank_1_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:10])  # an upload cut short
    assert checkpoint_step(fs, str(truncated)) is None
    missing_rank = _checkpoint(run, "checkpoint_c", step=12)
    (missing_rank / "complete" / "rank_1.json").unlink()  # rank 1 died before its list landed
    assert checkpoint_step(fs, str(missing_rank)) is None
    no_state = _checkpoint(run, "checkpoint_d", step=16)
    (no_state / "state.json").unlink()
    assert checkpoint_step(fs, str(no_state)) is None
    _, path, step = newest_complete_checkpoint(str(run))
    assert (Path(path), step) == (good, 4)
    newer = _checkpoint(run, "checkpoint_e", step=20)
    assert newest_complete_checkpoint(run.as_uri())[1:] == (str(newer), 20)  # a URI works as well as a path


def test_the_newest_lookup_reads_the_rank_lists_of_the_newest_checkpoints_only(tmp_path, monkeypatch):
    """In a bucket each rank's file list is one request: finding the newest complete checkpoint reads the lists of
    the newest ones down to the first complete one, not every checkpoint's."""
    from workflows import checkpoints

    run = tmp_path / "run"
    for i, step in enumerate([3, 6, 9, 12]):
        _checkpoint(run, f"checkpoint_{i}", step=step)
    partial = _checkpoint(run, "checkpoint_9", step=15)
    (partial / "complete" / "rank_1.json").unlink()  # the newest step, not complete
    read = []
    real = checkpoints._read_json_at
    monkeypatch.setattr(checkpoints, "_read_json_at", lambda fs, path: (read.append(path), real(fs, path))[1])
    _, path, step = newest_complete_checkpoint(str(run))
    assert (Path(path).name, step) == ("checkpoint_3", 12)
    lists = sorted(str(Path(p).relative_to(run)) for p in read if "/complete/" in p)
    assert lists == ["checkpoint_3/complete/rank_0.json", "checkpoint_3/complete/rank_1.json",  # 2 of 4 complete
                     "checkpoint_9/complete/rank_0.json", "checkpoint_9/complete/rank_1.json"], lists  # (not there)


def test_a_restart_resumes_from_a_complete_checkpoint_newer_than_rays_registry(tmp_path):
    """A worker killed between writing a checkpoint and Ray Train's collection of its report: the restart resumes from
    the newest complete checkpoint in storage, not Ray's registered one (nor a partial newer one); with Ray's
    registered one the newest complete, from it. (Rank 0 alone: no process group.)"""
    import ray.train

    from workflows.trainer import checkpoint_to_resume

    run = tmp_path / "run"
    registered = ray.train.Checkpoint(str(_checkpoint(run, "checkpoint_a", step=2)))
    lines: list[str] = []
    assert checkpoint_to_resume(registered, str(run), lines.append) is registered and not lines
    newer = _checkpoint(run, "checkpoint_b", step=4)
    partial = _checkpoint(run, "checkpoint_c", step=6)
    (partial / "complete" / "rank_1.json").unlink()
    chosen = checkpoint_to_resume(registered, str(run), lines.append)
    assert Path(chosen.path) == newer, chosen
    assert lines == [f"resuming from {newer}: complete in storage and newer than Ray's newest registered checkpoint "
                     f"({registered.path}): its report never reached Ray Train (a worker lost, or the run stopped, "
                     f"between its upload and its report)"], lines
    assert Path(checkpoint_to_resume(None, str(run), lines.append).path) == newer  # nothing registered at all
    assert "(Ray Train has none registered)" in lines[-1]


def test_no_run_directory_means_no_checkpoint(tmp_path):
    assert newest_complete_checkpoint(str(tmp_path / "absent")) is None


def test_init_from_a_uri_fetches_the_weights_and_leaves_no_copy(tmp_path, monkeypatch):
    """train.init_from as a URI (s3://, gs://; here file://, the same fetch through pyarrow's filesystems): the
    weights alone are fetched (not DeepSpeed's optimizer files, several times their size) and loaded, and the fetched
    copy is deleted as soon as they are in memory (each worker would otherwise leave one in its temp folder per
    run)."""
    import tempfile

    import pyarrow.fs as pafs
    import torch

    from dist_model import build_dist
    from workflows.checkpoints import init_model_from, write_model_files
    from workflows.recipe import load_recipe

    cfg = load_recipe(Path(__file__).parents[2] / "workflows/configs/smoke.yaml", [], check_files=False).model_cfg
    torch.manual_seed(1)
    source = build_dist(cfg)
    write_model_files(tmp_path / "ckpt", model=source, state={"step": 1}, recipe_yaml="")
    (tmp_path / "ckpt" / "ds").mkdir()
    (tmp_path / "ckpt" / "ds" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"o" * 1000)
    torch.manual_seed(2)
    target = build_dist(cfg)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    copied: list[str] = []
    copy_files = pafs.copy_files
    monkeypatch.setattr(pafs, "copy_files", lambda src, *a, **k: copied.append(src) or copy_files(src, *a, **k))
    report = init_model_from(target, f"file://{tmp_path / 'ckpt'}")
    assert f"file://{tmp_path / 'ckpt'}" in report and str(scratch) not in report
    assert [Path(c).name for c in copied] == ["weights.safetensors"], copied
    assert not list(scratch.iterdir()), "the fetched copy is gone"
    theirs, ours = source.dist_net.state_dict(), target.dist_net.state_dict()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_a_finished_run_keeps_what_ray_retains_or_would_have(tmp_path):
    """After the run: partial uploads are deleted; a complete checkpoint Ray never registered is deleted only where
    Ray's rule (best run.keep_checkpoints by val top-1, plus the latest) would have dropped it; nothing is deleted
    when the retained paths do not match the listing; a checkpoint_* directory not named as Ray Train names its
    own (a user's backup copy, partial or complete) is never deleted."""
    from workflows.checkpoints import prune_unretained_checkpoints

    def ray_name(step: int) -> str:  # as Ray Train 2.60 names them
        return f"checkpoint_2026-12-07_22-15-0{step}.29290{step}"

    def run_dir(name: str) -> tuple[Path, dict[str, Path]]:
        run = tmp_path / name
        dirs = {"best_unregistered": _checkpoint(run, ray_name(1), step=1, val_top1=60.0),
                "worse_unregistered": _checkpoint(run, ray_name(2), step=2, val_top1=10.0),
                "retained": _checkpoint(run, ray_name(3), step=3, val_top1=50.0),
                "partial": _checkpoint(run, ray_name(4), step=4, val_top1=70.0),
                "backup": _checkpoint(run, "checkpoint_mybackup", step=0, val_top1=1.0),
                "backup_partial": run / "checkpoint_x"}
        (dirs["partial"] / "ds" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"x" * 10)  # cut by an outage
        (dirs["backup_partial"] / "weights.safetensors").parent.mkdir(parents=True)
        (dirs["backup_partial"] / "weights.safetensors").write_bytes(b"w" * 500)
        (run / "mlflow.db").write_bytes(b"")
        return run, dirs

    run, dirs = run_dir("one")
    assert prune_unretained_checkpoints(str(run), [], keep=1) is None
    assert prune_unretained_checkpoints(str(run), [str(run / "elsewhere" / ray_name(3))], keep=1) is None
    assert len(list(run.glob("checkpoint_*"))) == 6
    # keep 1: the retained one beats checkpoint 2 and is newer, so Ray would have dropped it; checkpoint 1 is better
    removed = prune_unretained_checkpoints(str(run), [f"{dirs['retained']}/"], keep=1)
    assert removed == {str(dirs["worse_unregistered"]): 2, str(dirs["partial"]): None}
    assert sorted(p.name for p in run.glob("checkpoint_*")) == [ray_name(1), ray_name(3), "checkpoint_mybackup",
                                                                  "checkpoint_x"]
    assert (run / "mlflow.db").exists() and newest_complete_checkpoint(str(run))[2] == 3

    run, dirs = run_dir("two")  # keep 2: both unregistered complete ones are within the best two
    assert prune_unretained_checkpoints(str(run), [str(dirs["retained"])], keep=2) == {str(dirs["partial"]): None}

    # Ranked by eval.best_metric: by its files' top-1 the unregistered checkpoint 2 is the better one, so it stays
    # and checkpoint 1 (worse by files, however good its clips) goes. A checkpoint with no such metric ranks last.
    run = tmp_path / "by-files"
    worse = _checkpoint(run, ray_name(1), step=1, val_top1=60.0, val_file_top1=20.0)
    better = _checkpoint(run, ray_name(2), step=2, val_top1=10.0, val_file_top1=80.0)
    unscored = _checkpoint(run, ray_name(3), step=3, val_top1=90.0)
    retained = _checkpoint(run, ray_name(4), step=4, val_top1=50.0, val_file_top1=50.0)
    removed = prune_unretained_checkpoints(str(run), [str(retained)], keep=1, metric="val_file_top1")
    assert removed == {str(worse): 1, str(unscored): 3}
    assert better.exists() and retained.exists()


def test_an_unreadable_checkpoint_file_is_named_with_the_runs_other_checkpoints(tmp_path):
    """weights.safetensors, state.json or recipe.yaml cut short or overwritten: one CorruptCheckpoint (a ValueError,
    so the CLIs report it as an error line) naming the file, the bytes its file list recorded, the reader's
    complaint on one line, and the run's other checkpoints to use instead; it pickles (raised in Ray workers)."""
    import pickle

    import pytest
    import torch

    from workflows.checkpoints import (
        CorruptCheckpoint,
        read_recipe,
        read_state,
        read_weights,
        weight_shapes,
        write_model_files,
    )

    run = tmp_path / "run"
    for step in (1, 2, 3):
        write_model_files(run / f"checkpoint_00000{step}", model=torch.nn.Linear(4, 3), state={"step": step},
                          recipe_yaml="train:\n  seed: 1\n")
        write_file_list(run / f"checkpoint_00000{step}", 0)
    good, bad = run / "checkpoint_000001", run / "checkpoint_000003"
    assert weight_shapes(good) == {"weight": (3, 4), "bias": (3,)} and read_recipe(good) == {"train": {"seed": 1}}
    weights = bad / "weights.safetensors"
    written = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:written - 5])  # a copy cut short: the header no longer covers the file
    for read in (read_weights, weight_shapes):
        with pytest.raises(CorruptCheckpoint) as caught:
            read(bad)
        message = str(caught.value)
        assert message.startswith(f"{weights} is corrupt or truncated ({written - 5} of the {written} bytes written; ")
        assert f"another checkpoint of the run (in {run}: checkpoint_000002, checkpoint_000001)" in message
        assert "\n" not in message and str(pickle.loads(pickle.dumps(caught.value))) == message
    (bad / "state.json").write_text('{"step": 3,')
    with pytest.raises(CorruptCheckpoint, match=r"state.json is corrupt or truncated \(11 of the .*Expecting"):
        read_state(bad)
    (bad / "state.json").write_text("[3]")
    with pytest.raises(CorruptCheckpoint, match="state.json is corrupt or truncated.*a JSON list, not an object"):
        read_state(bad)
    (bad / "recipe.yaml").write_text("train: [\n")
    with pytest.raises(CorruptCheckpoint, match=r"recipe.yaml is corrupt.*while parsing a flow node: expected"):
        read_recipe(bad)
    (bad / "recipe.yaml").unlink()
    assert read_recipe(bad) == {}  # no recipe.yaml: the caller's recipe applies


def test_bytes_that_rotted_at_the_same_size_are_found_by_the_checksums(tmp_path):
    """Every rank writes its files' SHA-256 beside their sizes, in `sha256sum` form. A tensor's bytes changed in
    place pass the size check and safetensors' header check, and load: the checksums refuse them, for evaluate's
    read (read_weights) and for a resume (check_written_bytes, naming the checkpoint as stored)."""
    import shutil
    import subprocess

    import pyarrow.fs
    import pytest
    import torch

    from workflows.checkpoints import (
        CorruptCheckpoint,
        changed_files,
        check_written_bytes,
        checkpoint_step,
        read_weights,
        write_model_files,
    )

    run = tmp_path / "run"
    ckpt = run / "checkpoint_000002"
    write_model_files(ckpt, model=torch.nn.Linear(64, 64), state={"step": 2, "world_size": 2},
                      recipe_yaml="train:\n  seed: 1\n")
    write_file_list(ckpt, 0)
    other = tmp_path / "rank1"  # rank 1's part, written in its own folder
    (other / "ds").mkdir(parents=True)
    torch.save({"exp_avg": torch.randn(64, 64)}, other / "ds" / "rank_1_optim_states.pt")
    write_file_list(other, 1)
    shutil.copytree(other, ckpt, dirs_exist_ok=True)  # as Ray merges the ranks' uploads
    assert checkpoint_step(pyarrow.fs.LocalFileSystem(), str(ckpt)) == 2
    assert changed_files(ckpt) == [] and read_weights(ckpt).keys() == {"weight", "bias"}
    check_written_bytes(ckpt, str(ckpt))
    if shutil.which("sha256sum"):  # the lists are what `sha256sum -c` reads
        done = subprocess.run("sha256sum -c complete/*.sha256", shell=True, cwd=ckpt, capture_output=True, text=True)
        assert done.returncode == 0 and "weights.safetensors: OK" in done.stdout, done.stdout + done.stderr

    def rot(path: Path, at: int) -> None:  # one byte of tensor data, the file's size unchanged
        data = bytearray(path.read_bytes())
        data[at] ^= 0x10
        path.write_bytes(bytes(data))

    weights = ckpt / "weights.safetensors"
    rot(weights, weights.stat().st_size - 100)
    from safetensors.torch import load_file

    assert load_file(str(weights)).keys() == {"weight", "bias"}  # safetensors reads it without a word
    assert checkpoint_step(pyarrow.fs.LocalFileSystem(), str(ckpt)) == 2  # and the sizes still match
    with pytest.raises(CorruptCheckpoint, match=r"weights.safetensors is corrupt or truncated \(its bytes are not "
                                                r"those written: its SHA-256 differs from complete/rank_0.sha256's\)"):
        read_weights(ckpt)
    optim = ckpt / "ds" / "rank_1_optim_states.pt"
    rot(optim, optim.stat().st_size // 2)
    assert sorted(changed_files(ckpt)) == ["ds/rank_1_optim_states.pt", "weights.safetensors"]
    with pytest.raises(CorruptCheckpoint, match=r"^checkpoint_000002 cannot be loaded: (weights.safetensors|ds/"
                                                r"rank_1_optim_states.pt), \S+ do not hold the bytes written"):
        check_written_bytes(ckpt, "s3://bucket/runs/it/checkpoint_000002")  # named as stored, not as read


def test_init_from_a_run_directory_pins_its_newest_checkpoint_once(tmp_path):
    """train.init_from may name a run directory, as `evaluate --checkpoint` may: the driver resolves it to the newest
    checkpoint (complete, in a bucket), which the workers then read; a checkpoint directory or an authors' file
    stays as given, and a directory with neither says what it expected."""
    import pytest

    from workflows.checkpoints import resolve_init_from

    run = tmp_path / "k710"
    _checkpoint(run, "checkpoint_a", step=4)
    newest = _checkpoint(run, "checkpoint_b", step=8)
    assert resolve_init_from(str(run)) == (str(newest), 8)
    assert resolve_init_from(str(newest)) == (str(newest), None)
    authors = tmp_path / "k710.pyth"
    authors.write_bytes(b"x")
    assert resolve_init_from(str(authors)) == (str(authors), None)
    # In a bucket (file:// goes through the same pyarrow path as s3://): only a complete checkpoint is chosen.
    partial = _checkpoint(run, "checkpoint_c", step=12)
    (partial / "complete" / "rank_1.json").unlink()
    assert resolve_init_from(run.as_uri()) == (newest.as_uri(), 8)
    assert resolve_init_from(newest.as_uri()) == (newest.as_uri(), None)
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint_"):
        resolve_init_from((tmp_path / "empty").mkdir() or (tmp_path / "empty").as_uri())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_init_from(str(tmp_path / "absent"))


def test_a_checkpoint_uri_below_a_run_uri_keeps_its_credentials_and_endpoint():
    from workflows.checkpoints import child_uri

    uri = "s3://KEY:SECRET@bucket/runs/k710?endpoint_override=http://127.0.0.1:9000&region=x"
    assert child_uri(uri, "bucket/runs/k710", "bucket/runs/k710/checkpoint_2026") == \
        "s3://KEY:SECRET@bucket/runs/k710/checkpoint_2026?endpoint_override=http://127.0.0.1:9000&region=x"
    assert child_uri("gs://b/r/", "b/r", "b/r/checkpoint_1") == "gs://b/r/checkpoint_1"

