"""`data check` on a bucket that stops answering (moto's real S3 API behind the proxy that takes the endpoint away).

The doctor reports videos, so the storage's failure must not read as theirs: a video whose read gave up is counted as
unreachable, never as a drop; the rest of its batch is not tried (each would wait the whole retry budget again), and
the check stops at the first such batch, says why, and exits 1. The CLI runs as a real subprocess with the AWS_*
variables a user exports and `--address local`: a new local Ray, whose workers inherit them (without it the CLI
joins any Ray already running on the machine, such as this test session's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.workflows.conftest import GOOD_VIDEOS
from tests.workflows.object_store import proxied_bucket
from workflows.data import doctor
from workflows.data.cli import _format_check
from workflows.data.doctor import UNREACHABLE, _check_batch, check_video
from workflows.data.manifest import write_manifest

REPO = Path(__file__).resolve().parents[2]
BUCKET = "checked"


@pytest.fixture(scope="module")
def videos_in_a_bucket(tmp_path_factory, video_dir):
    """moto behind the faulty proxy, the good videos in a bucket: (proxy, their s3:// URIs, the credentials)."""
    with proxied_bucket(tmp_path_factory.mktemp("s3-check"), BUCKET) as (proxy, creds, client):
        uris = []
        for name in GOOD_VIDEOS:
            client.put_object(Bucket=BUCKET, Key=f"clips/{name}.mp4",
                              Body=(video_dir / "clips" / f"{name}.mp4").read_bytes())
            uris.append(f"s3://{BUCKET}/clips/{name}.mp4")
        yield proxy, uris, creds


def _batch(uris: list[str]) -> dict[str, np.ndarray]:
    n = len(uris)
    return {"path": np.array(uris, object), "start": np.full(n, np.nan), "end": np.full(n, np.nan),
            "video_index": np.arange(n)}


def test_a_batch_stops_reading_once_its_storage_gave_up(videos_in_a_bucket, monkeypatch):
    proxy, uris, creds = videos_in_a_bucket
    for name, value in creds.env().items():
        monkeypatch.setenv(name, value)
    assert _check_batch(_batch(uris), 4, 1)["ok"].all()  # the bucket answers: every video is fine

    tried: list[str] = []

    def counted(path, *args, **kwargs):
        tried.append(path)
        return check_video(path, *args, **kwargs)

    monkeypatch.setattr(doctor, "check_video", counted)
    proxy.outage(120)
    try:
        out = _check_batch(_batch(uris), 4, 1, storage_retry_s=1.0)
    finally:
        proxy.outage(0)
    assert list(out["reason"]) == [UNREACHABLE] * len(uris) and not out["ok"].any()
    assert "did not answer for" in out["detail"][0] and "AWS_ENDPOINT_URL" in out["detail"][0]
    assert all(d.startswith("not tried: cannot read ") for d in out["detail"][1:])
    assert tried == uris[:1]  # the others did not each wait out the budget again


@pytest.mark.integration
def test_data_check_on_a_bucket_that_stopped_answering(videos_in_a_bucket, tmp_path):
    proxy, uris, creds = videos_in_a_bucket
    manifest = tmp_path / "in_bucket.csv"
    write_manifest([{"path": uri, "label": f"cls{i}"} for i, uri in enumerate(uris)], manifest)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(creds.env(), PYTHONPATH=str(REPO))
    proxy.outage(600)
    try:
        proc = subprocess.run([sys.executable, "-m", "workflows", "data", "check", "--manifest", str(manifest),
                               "--json", "--storage-retry-s", "2", "--address", "local"],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    finally:
        proxy.outage(0)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert (report["videos"], report["ok"], report["unreachable"]) == (len(uris), 0, len(uris))
    assert report["dropped"] == {} and report["examples"] == {}  # none of them is a bad video
    assert f"cannot read s3://{BUCKET}/clips/" in report["storage_error"]
    assert "did not answer" in report["storage_error"]
    text = _format_check(report)
    assert "dropped: 0" in text and f"NOT CHECKED: {len(uris)} videos" in text and "run it again" in text


def test_reading_durations_waits_out_a_short_outage_and_names_a_long_one(videos_in_a_bucket, monkeypatch, capsys,
                                                                         tmp_path):
    """The header reads behind `--clip-seconds` (`data import folders`, `data clips`, `predict`) go to the bucket
    as decoding does: an outage shorter than the retry budget is waited out, a longer one is one clear error (exit
    2, nothing written), never a traceback or a video counted as unreadable."""
    import threading

    import workflows.data.video as video
    from workflows.data.cli import main as data_main
    from workflows.data.video import header_duration
    from workflows.predict import main as predict_main

    proxy, uris, creds = videos_in_a_bucket
    for name, value in creds.env().items():
        monkeypatch.setenv(name, value)
    proxy.outage(2.0)
    assert header_duration(uris[0], retry_s=30) == pytest.approx(31 / 25, abs=0.05)  # wide.mp4: 31 frames at 25 fps
    monkeypatch.setattr(video, "STORAGE_RETRY_S", 1.5)  # what the commands read; 120 s by default
    write_manifest([{"path": uris[0], "label": "a"}], tmp_path / "clips.csv")  # each failing read: ~6 s of SDK retries
    out = tmp_path / "cut.csv"
    stop = threading.Event()

    def keep_down() -> None:  # the endpoint away until `stop` (each outage ends on its own)
        while not stop.wait(0.2):
            proxy.outage(1.0)

    for command, run in ((["clips", "--manifest", str(tmp_path / "clips.csv"), "--clip-seconds", "0.5", "--out",
                           str(out)], data_main),
                         (["--checkpoint", "nowhere", uris[0], "--clip-seconds", "0.5"], predict_main)):
        stop.clear()
        proxy.outage(1.0)
        holder = threading.Thread(target=keep_down, daemon=True)
        holder.start()
        try:
            assert run(command) == 2
        finally:
            stop.set()
            holder.join()
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot read s3://{BUCKET}/clips/") and "did not answer for" in err, err
        assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.integration
def test_transcode_into_a_bucket_waits_out_an_upload_outage_and_resumes(videos_in_a_bucket, tmp_path, monkeypatch):
    """`data transcode --out s3://...` (a cluster without a shared disk): every output is uploaded when complete and
    the new manifest is written beside them, naming them relative to itself; an endpoint gone in the middle of an
    upload (longer than the S3 SDK's own retries) is waited out; a second run makes only what is missing; a bucket
    that does not exist is one clear error before any work."""
    from tests.workflows.conftest import frame_ids
    from workflows.data.manifest import load_manifest
    from workflows.data.video import read_frames

    proxy, uris, creds = videos_in_a_bucket
    wide, mid = uris[0], uris[2]  # 31 frames at 25 fps, 28 at 12 fps
    write_manifest([{"path": wide, "label": "a", "start": 0.0, "end": 0.6},
                    {"path": wide, "label": "a", "start": 0.6, "end": 1.24},
                    {"path": mid, "label": "b"}], tmp_path / "clips.csv")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(creds.env(), PYTHONPATH=str(REPO))

    def transcode(out: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "workflows", "data", "transcode", "--manifest",
                               str(tmp_path / "clips.csv"), "--out", out, "--short-side", "32", "--cut", "--json",
                               "--address", "local", *extra], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=env)

    out = f"s3://{BUCKET}/small"
    proxy.arm(r"/small/videos/", 8.0, method="PUT")  # the first upload cut, the endpoint gone for 8 s
    proc = transcode(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proxy.cut is not None and proxy.cut[1] == "PUT"
    result = json.loads(proc.stdout)
    assert (result["manifest"], result["videos"], result["ok"], result["dropped"]) == (f"{out}/clips.csv", 3, 3, {})
    for name, value in creds.env().items():
        monkeypatch.setenv(name, value)
    made = load_manifest(result["manifest"], None).table.column("path").to_pylist()
    assert made == [f"{out}/videos/00000000_wide_0-0.6s.mp4", f"{out}/videos/00000000_wide_0.6-1.24s.mp4",
                    f"{out}/videos/00000002_mid.mp4"]

    def ids(path: str) -> list[int]:
        return frame_ids(read_frames(path, lambda a, b, fps: np.arange(a, b), min_frames=1).frames).tolist()

    assert ids(made[0]) == list(range(15)) and ids(made[1]) == list(range(15, 31))  # 0.6 s at 25 fps: frame 15
    assert ids(made[2]) == list(range(28))

    client = creds.client(proxy.url)
    client.delete_object(Bucket=BUCKET, Key="small/videos/00000000_wide_0.6-1.24s.mp4")
    before = len(proxy.requests)
    proc = transcode(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    puts = sorted(path.split("?")[0] for _, method, path in proxy.requests[before:] if method == "PUT")
    assert puts == [f"/{BUCKET}/small/clips.csv", f"/{BUCKET}/small/videos/00000000_wide_0.6-1.24s.mp4"], puts

    proc = transcode("s3://no-such-bucket/small")
    assert proc.returncode == 2 and "there is no bucket 'no-such-bucket'" in proc.stderr, proc.stderr[-2000:]

    proxy.arm(r"/lost/videos/", 600.0, method="PUT")  # gone for good at the first upload: one clear error
    try:
        proc = transcode(f"s3://{BUCKET}/lost", "--storage-retry-s", "1")
    finally:
        proxy.outage(0)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: cannot write s3://{BUCKET}/lost/videos/" in proc.stderr and "did not answer for" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_upload_copies_several_files_at_once_waits_out_an_outage_and_resumes(videos_in_a_bucket, tmp_path,
                                                                               monkeypatch, capsys):
    """`data upload` of a dataset folder: files go several at a time (one filesystem shared by the threads), an
    endpoint gone in the middle of an upload (longer than the S3 SDK's own retries) is waited out, the same command
    run again copies only what is not there at its size, and a bucket gone for good is one clear error."""
    from workflows.data.cli import main as data_main
    from workflows.data.sample import write_sample_dataset
    from workflows.data.upload import upload_dataset
    from workflows.data.video import StorageUnreachable

    proxy, _, creds = videos_in_a_bucket
    for name, value in creds.env().items():
        monkeypatch.setenv(name, value)
    root = Path(write_sample_dataset(tmp_path / "s", videos_per_class=2, size=32, num_frames=8, workers=1).root)
    local = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    client = creds.client(proxy.url)

    def in_bucket(prefix: str) -> dict[str, int]:
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/").get("Contents", [])
        return {o["Key"].removeprefix(f"{prefix}/"): o["Size"] for o in listed if not o["Key"].endswith("/")}

    proxy.arm(r"/up/videos/", 8.0, method="PUT")  # an upload cut, the endpoint gone for 8 s
    report = upload_dataset(root, f"s3://{BUCKET}/up", progress=True, threads=4)
    assert proxy.cut is not None and (report.files, report.skipped) == (len(local), 0)
    assert in_bucket("up") == local
    assert f"uploaded {len(local)}/{len(local)} files" in capsys.readouterr().out

    for key in ("train.csv", "videos/growing/train_0000.mp4"):
        client.delete_object(Bucket=BUCKET, Key=f"up/{key}")
    before = len(proxy.requests)
    assert data_main(["upload", str(root), f"s3://{BUCKET}/up"]) == 0
    said = capsys.readouterr().out
    assert f"{len(local) - 2} of {len(local)} files are in s3://{BUCKET}/up already at their size" in said, said
    assert f", {len(local) - 2} of them there already" in said
    puts = sorted(path.split("?")[0] for _, method, path in proxy.requests[before:] if method == "PUT")
    puts = [path for path in puts if not path.endswith("/")]  # the prefix's directory marker
    assert puts == [f"/{BUCKET}/up/train.csv", f"/{BUCKET}/up/videos/growing/train_0000.mp4"], puts
    assert in_bucket("up") == local

    proxy.arm(r"/gone/videos/", 600.0, method="PUT")  # gone for good at the first file: the others not tried
    try:
        with pytest.raises(StorageUnreachable, match=f"cannot write s3://{BUCKET}/gone/.*did not answer for"):
            upload_dataset(root, f"s3://{BUCKET}/gone", retry_s=1.0)
    finally:
        proxy.outage(0)
