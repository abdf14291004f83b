"""One driver per run directory on a cluster (workflows/run_lock.py): a second driver, a real process with its own
Ray job on the session's cluster, is refused while the first holds the directory, and the claim is taken over once
the first driver is SIGKILLed (its job ended, it never gave the claim back)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workflows.config_loader import ConfigError
from workflows.recipe import load_recipe

REPO = Path(__file__).parents[2]
SMOKE = REPO / "workflows" / "configs" / "smoke.yaml"
HOLD = """
import sys, time, ray
from workflows.run_lock import claim_run_directory
ray.init(logging_level="ERROR")
claim = claim_run_directory(sys.argv[1], "run it: its directory")
print("claimed", flush=True)
time.sleep(600)
"""


@pytest.mark.integration
def test_a_second_driver_is_refused_until_the_first_is_gone(ray_local, sample_data, tmp_path, monkeypatch):
    from workflows import run_lock
    from workflows.pretrain import run_pretrain

    monkeypatch.setattr(run_lock, "WAIT_FOR_A_GONE_DRIVER_S", 2.0)
    storage = tmp_path / "runs"
    recipe = load_recipe(SMOKE, [f"data.train_manifest={sample_data.train_manifest}",
                                 f"data.val_manifest={sample_data.val_manifest}", f"data.labels={sample_data.labels}",
                                 f"run.storage_path={storage}", "run.name=it", "train.max_steps=1"])
    run_dir = str((storage / "it").absolute())
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline().strip()
        assert line == "claimed", line + holder.stderr.read()[-3000:] if holder.poll() is not None else line
        with pytest.raises(ConfigError) as info:
            run_pretrain(recipe)
        message = str(info.value)
        assert message.startswith(f"run it: its directory {run_dir} is being written by a driver (pid {holder.pid} "
                                  f"on "), message
        assert "Wait for it to end or stop it" in message
        assert not (storage / "it").exists()  # refused before the run wrote anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # Its job ended without giving the claim back: this process takes it over (what the next run_pretrain does).
    run_lock.WAIT_FOR_A_GONE_DRIVER_S = 30.0  # (monkeypatch restores it) the GCS's time to see the driver gone
    assert run_lock.claim_run_directory(run_dir, "run it: its directory") is not None


def test_a_submitted_job_is_named_by_its_submission_id(ray_local, monkeypatch):
    """What the refusal names: a `ray job submit` job by the id `ray job stop` takes (Ray gives the driver its job
    config, metadata included, in RAY_JOB_CONFIG_JSON_ENV_VAR; a real job's refusal was checked by hand), another
    driver by its pid and host."""
    import json

    from workflows.run_lock import this_driver

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc", "job_name": "raysubmit_abc"}}))
    assert this_driver()["who"] == "job raysubmit_abc"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert this_driver()["who"].startswith(f"a driver (pid {os.getpid()} on ")


def test_a_claim_key_holds_no_credentials_and_one_directory_is_one_key():
    """The key lives in the GCS (whose keys `ray` debugging tools list): a bucket URI's access key, secret and
    password stay out of it, and naming the directory with or without them claims the same directory."""
    from workflows.run_lock import claim_key

    bare = claim_key("s3://bucket/runs/it")
    assert claim_key("s3://bucket/runs/it?endpoint_override=127.0.0.1:9000&access_key=AKIA1&secret_key=s3cr3t") == bare
    assert claim_key("s3://AKIA1:s3cr3t@bucket/runs/it") == bare
    assert b"s3cr3t" not in claim_key("gs://bucket/runs/it?secret_key=s3cr3t")
    assert claim_key("s3://bucket/runs/other") != bare
    assert claim_key("/mnt/shared/runs/it") == b"dist-run-claim:/mnt/shared/runs/it"


HOLD_LEASE = """
import sys, time, ray
from workflows import run_lock
run_lock.HEARTBEAT_S = 0.5
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")  # cluster A: a GCS of its own
claim = run_lock.claim_run_directory(sys.argv[1], "run it: its directory", clash="CLASH")
print("claimed", run_lock.cluster_id(), flush=True)
time.sleep(600)
"""


@pytest.mark.integration
def test_a_bucket_path_is_claimed_across_clusters(ray_local, tmp_path, monkeypatch, capsys):
    """Two clusters share no GCS, only the bucket: a driver of cluster A (a real process with a Ray cluster of its
    own, claiming through `claim_run_directory` into a moto bucket) makes a driver of this session's cluster refused
    (its GCS claim given back); once A is SIGKILLed (its head's processes die with it) its lease goes unrenewed and it
    is taken over; a driver of the same cluster takes a lease
    over at once (its GCS claim decided); a released lease is gone."""
    import json

    from tests.workflows.object_store import proxied_bucket
    from workflows import run_lock

    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.5)
    monkeypatch.setattr(run_lock, "WATCH_S", 3.0)
    uri, key = "s3://results/runs/it", "runs/it/.dist-driver.json"
    (tmp_path / "s3").mkdir()
    with proxied_bucket(tmp_path / "s3", "results") as (_, creds, client):
        for name, value in creds.env().items():
            monkeypatch.setenv(name, value)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, uri], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        b = {"who": "a driver (pid 222)", "since": "now", "cluster": "cluster-B", "job": "01000000"}
        try:
            line = holder.stdout.readline().split()
            assert line[:1] == ["claimed"], holder.stderr.read()[-3000:] if holder.poll() is not None else line
            a_cluster = line[1]
            assert a_cluster != run_lock.cluster_id()  # two GCSs, two ids
            assert json.loads(client.get_object(Bucket="results", Key=key)["Body"].read())["cluster"] == a_cluster
            with pytest.raises(ConfigError) as info:
                run_lock.claim_run_directory(uri, "run it: its directory", clash="CLASH")
            assert str(info.value).startswith("run it: its directory s3://results/runs/it is being written by a "
                                              f"driver (pid {holder.pid} on "), str(info.value)
            assert " on another Ray cluster (head " in str(info.value)
            assert str(info.value).endswith("its claim in the bucket is being renewed: CLASH")
            assert "checking for up to 3 s whether that driver is alive" in capsys.readouterr().err
            assert run_lock.kv_get(run_lock.claim_key(uri)) is None  # the GCS claim given back with the refusal
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
        claim = run_lock.claim_run_directory(uri, "run it: its directory", clash="CLASH")  # A's lease unrenewed
        held = json.loads(client.get_object(Bucket="results", Key=key)["Body"].read())
        assert (held["cluster"], held["token"]) == (run_lock.cluster_id(), claim.lease.mine["token"])
        claim.release()
        assert "Contents" not in client.list_objects_v2(Bucket="results", Prefix=key)
        lease = run_lock.claim_bucket_path(uri, "run it: its directory", "CLASH", b)
        capsys.readouterr()
        lease._stop.set()  # B's driver gone without releasing (the GCS claim saw its job end)
        lease._renewer.join()
        again = run_lock.claim_bucket_path(uri, "run it: its directory", "CLASH", {**b, "who": "a driver (pid 333)"})
        assert "checking" not in capsys.readouterr().err  # the same cluster: taken over at once
        lease.release()  # no longer its lease: left in place
        assert json.loads(client.get_object(Bucket="results", Key=key)["Body"].read())["who"] == "a driver (pid 333)"
        again.release()
        assert "Contents" not in client.list_objects_v2(Bucket="results", Prefix=key)
        late = run_lock.claim_bucket_path(uri, "run it: its directory", "CLASH", {**b, "cluster": "cluster-C"})
        assert "checking" not in capsys.readouterr().err  # released: nothing to watch
        # Taken over while this driver could not renew (as another cluster's driver does after WATCH_S): its
        # renewals stop, saying so, and never overwrite the other's lease.
        other = {**late.mine, "token": "theirs", "who": "a driver (pid 444)", "cluster": "cluster-D"}
        client.put_object(Bucket="results", Key=key, Body=json.dumps(other).encode())
        for _ in range(100):
            if late.lost:
                break
            time.sleep(0.1)
        assert late.lost == other
        assert "was taken over by a driver (pid 444) on another Ray cluster" in capsys.readouterr().err
        time.sleep(1.5)  # three renewal periods
        assert json.loads(client.get_object(Bucket="results", Key=key)["Body"].read()) == other
        late.release()  # not its lease: left to its holder
        assert json.loads(client.get_object(Bucket="results", Key=key)["Body"].read()) == other
