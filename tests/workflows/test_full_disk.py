"""Real full disks: tmpfs mounts of a few MiB in a private mount namespace (`unshare`, root), under a pre-training run
and under a Ray Tune sweep (filled by its own checkpoints, or by another writer), each run through the CLI as a user
runs it, then resumed on the same disk once space is freed. Also a read-only run directory and a checkpoint whose
bytes rotted.

About 7 minutes on 2 cores: `make disk-test`, not `make test` (which checks the parts: the free-space checks, the
registry rules, the checksums and the sweep's stop on a full disk through Tune's own handler)."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.workflows.registry_rules import check_registry_rules
from workflows.tune.progress import ROOM_FOR_THE_STATE

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.environ.get("DIST_DISK_FAULTS"), reason="real full disks (~7 min): make disk-test"),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                       reason="mounting a small tmpfs needs root and unshare"),
]

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "workflows" / "configs"
SMOKE, SWEEP_SMOKE = CONFIGS / "smoke.yaml", CONFIGS / "sweep_smoke.yaml"
NOT_MOUNTED = 90  # the scripts' exit status when the tmpfs could not be mounted


def _data_overrides(sample) -> str:
    return (f"data.train_manifest={sample.train_manifest} data.val_manifest={sample.val_manifest} "
            f"data.labels={sample.labels}")


def _in_a_private_mount_namespace(script: str, env: dict[str, str]) -> None:
    """Runs a bash script whose mounts vanish with it (nothing is left mounted on the machine, even if it is
    killed)."""
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script], cwd=REPO,
                          env={**os.environ, **env, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode != NOT_MOUNTED, f"could not mount a tmpfs: {done.stderr[-2000:]}"


_FULL_DISK_SCRIPT = """
set -u
mount -t tmpfs -o size=6m tmpfs "$DISK" || exit 90  # NOT_MOUNTED
run() {  # run NAME STORAGE [KEY=VALUE ...]: the smoke recipe, output in $OUT/NAME.log, exit status in NAME.rc
  env RAY_ADDRESS=local "$PYTHON" -m workflows pretrain --config "$SMOKE" --set mlflow.enabled=false \
    run.storage_path="$2" scaling.num_workers=1 $DATA "${@:3}" > "$OUT/$1.log" 2>&1
  echo $? > "$OUT/$1.rc"
}
mount -t tmpfs -o size=1m,ro tmpfs "$READONLY" && run readonly "$READONLY/runs"  # a read-only mount
run full "$DISK/runs"  # 6 MiB hold the step-3 checkpoint (4.2 MiB), not the step-6 one
run refused "$DISK/runs"  # the same command before space is freed
mount -o remount,size=40m "$DISK"  # space freed
# What the full disk left in the first real run of this on 2026-12-06, where Ray's controller met it: its registry
# cut to 0 bytes, which Ray 2.60 then refused at every launch (a JSONDecodeError in the controller).
: > "$DISK/runs/smoke/checkpoint_manager_snapshot.json"
run freed "$DISK/runs"
cp -r "$DISK/runs" "$OUT/runs"
# Bit rot in the newest checkpoint (step 6): the same size, other bytes amid the tensor data of its largest
# DeepSpeed file, which torch.load reads back without a complaint (checked: a flipped byte there loads).
"$PYTHON" -c "import json, os, pathlib, sys
newest = max(pathlib.Path(sys.argv[1]).glob('checkpoint_*/state.json'), key=lambda p: json.loads(p.read_text())['step'])
largest = max((newest.parent / 'ds').rglob('*.pt'), key=lambda p: p.stat().st_size)
with open(largest, 'r+b') as f:
    f.seek(largest.stat().st_size // 2); f.write(os.urandom(256))" "$DISK/runs/smoke"
run corrupt "$DISK/runs" train.max_steps=9
"""


def test_a_full_disk_a_read_only_one_and_a_rotted_checkpoint_end_the_run_clearly_and_it_resumes(sample_data, tmp_path):
    """A real full disk: the run directory on a 6 MiB tmpfs (in a private mount namespace) holds the step-3
    checkpoint, not the step-6 one. The run ends at once (a restart would train to the next checkpoint and fail
    there again) saying what a checkpoint takes, what is free and what to do; once space is freed the same command
    resumes from step 3, also when the full disk had cut Ray's checkpoint registry short. Before any work, a disk
    short of what the run keeps is warned of, one short of a single checkpoint refused, and a read-only one
    refused. And a newest checkpoint whose bytes rotted ends the run at once, naming the one before it."""
    from workflows.checkpoints import RAY_REGISTRY

    disk, out, readonly = tmp_path / "disk", tmp_path / "out", tmp_path / "readonly"
    for folder in (disk, out, readonly):
        folder.mkdir()
    data = _data_overrides(sample_data)
    env = dict(DISK=str(disk), OUT=str(out), READONLY=str(readonly), SMOKE=str(SMOKE), DATA=data)
    _in_a_private_mount_namespace(_FULL_DISK_SCRIPT, env)
    # A run directory that cannot be written fails before any work (it used to fail after Ray had started, with a
    # traceback from writing recipe.yaml).
    assert (out / "readonly.rc").read_text().strip() == "2"
    assert f"error: the run directory under run.storage_path {readonly}/runs/smoke: {readonly} is not writable " \
        "here; give a folder you can write" in (out / "readonly.log").read_text()
    full, freed = (out / "full.log").read_text(), (out / "freed.log").read_text()
    assert (out / "full.rc").read_text().strip() == "1", full[-3000:]
    # Before any work: 6 MiB hold one checkpoint (about 4.1 MiB, estimated from the parameters), not the 3 kept.
    warned = re.search(r"warning: \S+'s disk has 6\.0 MiB free, and a checkpoint of this run takes about "
                       r"(\d\.\d) MiB; run\.keep_checkpoints=2 keeps up to 3, 3 more than are there now", full)
    assert warned, full[:3000]
    error = next(line for line in full.splitlines() if line.startswith("error: "))
    assert "No space left on device" in error and "was not restarted" in error, error
    measured = re.search(r"A checkpoint of this run takes (\d\.\d) MiB, and run\.keep_checkpoints=2 keeps up to 3",
                         error)
    assert measured, error
    assert 0.9 < float(warned[1]) / float(measured[1]) < 1.1  # the estimate from the parameters, against the files
    assert re.search(r"\d\.\d MiB are free there now", error) and "point run.storage_path there" in error
    assert re.search(r"resumes it from its newest complete checkpoint, \S+ \(step 3\)\.$", error), error
    assert "step 5/6" in full and "step 4/6" in full  # trained up to the step-6 checkpoint, once: never restarted
    assert full.count("step 4/6") == 1, "a restart trained to the next checkpoint again"
    refused = (out / "refused.log").read_text()  # what is free now (1.8 MiB) is less than the step-3 checkpoint
    assert (out / "refused.rc").read_text().strip() == "2" and "the next checkpoint would not fit" in refused, refused
    assert "warning:" not in freed  # 40 MiB: room for the checkpoints still to come
    assert (out / "freed.rc").read_text().strip() == "0", freed[-3000:]
    assert f"Ray Train's checkpoint registry {RAY_REGISTRY} is cut short (0 bytes" in freed
    assert "the newest complete checkpoint in storage (Ray Train has none registered)" in freed
    assert "resumed from step 3" in freed and "finished: step 6" in freed
    # A checkpoint whose bytes rotted (amid a tensor, where torch.load notices nothing: its SHA-256 list does) is not
    # read again by restart after restart: the run ends at once, naming it and the complete checkpoint before it,
    # which the same command resumes from once it is moved away.
    corrupt = (out / "corrupt.log").read_text()
    assert (out / "corrupt.rc").read_text().strip() == "1", corrupt[-3000:]
    error = next(line for line in corrupt.splitlines() if line.startswith("error: "))
    assert re.search(r"cannot be loaded: ds/\S+\.pt does not hold the bytes written", error), error
    assert "was not restarted" in error and "CorruptCheckpoint: checkpoint_" in error, error
    assert re.search(r"Move \S+ \(step 6\) out of the run directory, .* the same command then resumes from the "
                     r"complete checkpoint before it, \S+ \(step 3\)\.$", error), error
    runs = out / "runs" / "smoke"
    assert len(list(runs.glob(f"{RAY_REGISTRY}.unusable-*"))) == 1
    check_registry_rules(runs, set_aside_before=1)  # on the registry the resumed run wrote


_SWEEP_SCRIPT = """
set -u
mount -t tmpfs -o size="$SIZE" tmpfs "$DISK" || exit 90  # NOT_MOUNTED
sweep() {  # sweep NAME [ARG ...]: the smoke sweep on the disk, output in $OUT/NAME.log, exit status in NAME.rc
  env RAY_ADDRESS=local "$PYTHON" -m workflows tune --config "$SWEEP" --set storage_path="$DISK/sweeps" $DATA \
    "${@:2}" > "$OUT/$1.log" 2>&1
  echo $? > "$OUT/$1.rc"
}
fill_once_a_trial_completed() {  # another writer takes the disk's last byte as the first trial ends
  until grep -q "^\[tune\] trial .* completed" "$OUT/full.log" 2>/dev/null; do sleep 0.05; done
  dd if=/dev/zero of="$DISK/filler" bs=64k 2>/dev/null
  df -k --output=avail "$DISK" | tail -1 > "$OUT/filled"
}
[ "$FILL" = 1 ] && { fill_once_a_trial_completed & }
sweep full
wait
rm -f "$DISK/filler"; mount -o remount,size=60m "$DISK"  # space freed
sweep retried --retry-failed
cp "$DISK/sweeps/sweep-smoke/results.csv" "$OUT/" 2>/dev/null
ls -a "$DISK/sweeps/sweep-smoke" > "$OUT/left.txt"
"""


@pytest.mark.parametrize("filled_by", ["its_checkpoints", "another_writer"])
def test_a_sweep_on_a_full_disk_stops_and_the_failed_trial_resumes_once_space_is_freed(sample_data, tmp_path,
                                                                                       filled_by):
    """The smoke sweep (3 trials, one at a time) with its storage on a small tmpfs. `its_checkpoints`: 15 MiB, and a
    trial meets the full disk at a checkpoint, where it leaves a partial one. `another_writer`: 60 MiB, filled to the
    last byte as the first trial ends, so the next one fails before it writes a checkpoint (nothing of its to
    delete: Tune's state then goes into the room the sweep held for it; without that room, the driver crashed on the
    failed trial's error file, cut short, checked). The sweep stops at the failed trial, as
    Ctrl-C stops it (no later trial starts to fail the same way), saving Tune's state whole; it says what a trial
    keeps, what is free and what to run. Once space is freed, that command plus --retry-failed resumes the failed
    trial under its own id (from its newest complete checkpoint, when it has one) and runs the trial never started;
    the finished one is not run again."""
    disk, out = tmp_path / "disk", tmp_path / "out"
    for folder in (disk, out):
        folder.mkdir()
    filler = filled_by == "another_writer"
    _in_a_private_mount_namespace(_SWEEP_SCRIPT, dict(DISK=str(disk), OUT=str(out), SWEEP=str(SWEEP_SMOKE),
                                                      DATA=_data_overrides(sample_data), SIZE="60m" if filler else
                                                      "15m", FILL=str(int(filler))))
    full, retried = (out / "full.log").read_text(), (out / "retried.log").read_text()
    assert (out / "full.rc").read_text().strip() == "1", full[-4000:]
    stopped = re.search(r"^\[tune\] stopping the sweep: trial (\w+) met a full disk", full, re.M)
    assert stopped, full[-4000:]
    failed = stopped[1]
    # (the filler's victim fails at its first write: the sweep's journal of trial starts, or the check before it
    # trains, "the first checkpoint would not fit")
    assert re.search(rf"^\[tune\] trial {failed} failed: .*(No space left on device|checkpoint would not fit)", full,
                     re.M), full[-4000:]
    last = next(line for line in reversed(full.splitlines()) if line.startswith("[tune] the sweep stopped"))
    assert f"trial {failed} failed on a full disk" in last and "trial(s) finished" in last, last
    assert re.search(r"Each trial keeps up to 3 checkpoints \(run\.keep_checkpoints=2, plus the latest\) of about "
                     r"\d\.\d MiB", last), last
    assert re.search(r"disk has \d+\.\d MiB free now", last) and "the same command plus --retry-failed" in last
    # Tune's last save of its state went whole, into the space of the failed trial's partial checkpoint or the room
    # the sweep held for it (with the filler, copies of it begun before the stop failed: Tune logs each)
    assert "Wrote the latest version of all result files and experiment state" in full
    if not filler:
        assert "Saving experiment state to storage" not in full  # one begun before the stop: a line of ours
    started = r"\[tune\] trial (\w+) \(sweep-smoke-"  # a trial's first line, from its process (Ray prefixes it)
    started_before = set(re.findall(started, full))
    assert len(started_before) == 2, "the sweep stopped at the failed trial: the third did not start"
    # Tune's state was saved whole: the retry continued this sweep (Tune would have started a new one, or with a
    # state cut short, this project refuses to resume)
    assert (out / "retried.rc").read_text().strip() == "0", retried[-4000:]
    assert "Failed to restore" not in retried
    assert f"trial {failed} completed" in retried or f"trial {failed} stopped early" in retried, retried[-4000:]
    if not filler:  # the filler's victim had no checkpoint: it starts from step 0
        assert re.search(r"restart: 1 -> 1 workers \(the sweep started this trial again\); resuming at step 2",
                         retried), [line for line in retried.splitlines() if "restart:" in line]
    rows = {row["trial_id"]: row for row in csv.DictReader((out / "results.csv").open())}
    # (a start is journaled in the sweep directory: the filler's victim usually failed writing that, counting 1)
    assert len(rows) == 3 and rows[failed]["attempts"] in (("1", "2") if filler else ("2",)), rows
    assert all(row["status"] in ("completed", "stopped early") for row in rows.values()), rows
    finished_first = started_before - {failed}
    assert all(rows[t]["attempts"] == "1" for t in finished_first), "the finished trial was not run again"
    assert set(re.findall(started, retried)) == {failed} | (set(rows) - started_before)  # not the finished one
    assert ROOM_FOR_THE_STATE not in (out / "left.txt").read_text().split()  # given back as the sweep ended
