"""A video in a bucket is read from a real S3 API (moto's server on loopback) through a proxy that takes the endpoint
away: a storage outage shorter than STORAGE_RETRY_S is waited out and the video decodes as if nothing happened; a
longer one fails with StorageUnreachable, never a BadVideo (a good video must not be dropped as "missing" or
"corrupt" because the network went away), and the decode actors' batch function lets it through (the batch fails;
Ray Data fails the pipeline on a batch function's error, and Ray Train restarts the run from its newest complete
checkpoint). A remote video is fetched once per read, not once to probe and again to decode. No Ray here: the decode
actors call exactly this."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from tests.workflows.conftest import GOOD_VIDEOS
from tests.workflows.object_store import FaultyProxy, MotoServer, S3Credentials
from workflows.data import video
from workflows.data.data_config import DataConfig
from workflows.data.pipeline import ClipSpec, decode_batch
from workflows.data.sampling import segment_indices
from workflows.data.video import BadVideo, StorageUnreachable, read_frames

BUCKET = "videos"


@pytest.fixture(scope="module")
def bucket(tmp_path_factory, video_dir):
    """moto behind the faulty proxy, a bucket holding one good video: (proxy, its s3:// URI, the credentials)."""
    import boto3

    root = tmp_path_factory.mktemp("s3")
    moto = MotoServer(root)
    moto.start()
    proxy = FaultyProxy(moto.port)
    proxy.start()
    try:
        creds = S3Credentials(endpoint=proxy.url)
        client = boto3.client("s3", endpoint_url=moto.url, aws_access_key_id=creds.access_key,
                              aws_secret_access_key=creds.secret_key, region_name=creds.region)
        client.create_bucket(Bucket=BUCKET)
        name = next(iter(GOOD_VIDEOS))
        body = (video_dir / "clips" / f"{name}.mp4").read_bytes()
        client.put_object(Bucket=BUCKET, Key=f"clips/{name}.mp4", Body=body)
        yield proxy, f"s3://{BUCKET}/clips/{name}.mp4", creds
    finally:
        proxy.stop()
        moto.stop()


def _read(uri: str) -> np.ndarray:
    def choose(first: int, last: int, fps: float) -> np.ndarray:
        return segment_indices(first, last, 4, mode="test", view=0, num_views=1, rng=np.random.default_rng(0))

    return read_frames(uri, choose).frames


def _gets(proxy: FaultyProxy, uri: str) -> int:
    key = uri.removeprefix(f"s3://{BUCKET}")
    return sum(1 for _, method, path in proxy.requests if method == "GET" and path.split("?")[0].endswith(key))


def test_an_outage_is_waited_out_and_a_longer_one_is_not_a_bad_video(bucket, monkeypatch):
    proxy, uri, creds = bucket
    for name, value in creds.env().items():
        monkeypatch.setenv(name, value)
    before = _gets(proxy, uri)
    frames = _read(uri)
    assert _gets(proxy, uri) - before == 1, "fetched once: the probe's bytes are the decoder's"

    # The endpoint goes away for 15 s just before the read, longer than the S3 SDK's own retries (~6 s here): the
    # read waits it out and decodes the same frames.
    resets = proxy.resets
    proxy.outage(15)
    assert np.array_equal(_read(uri), frames)
    assert proxy.resets > resets, "the outage never reset a connection: nothing was retried"

    # Longer than the retry budget: the storage's problem, said as such, never a dropped video. The decode actors'
    # batch function (what Ray Data runs) lets it through, so the batch fails instead of shrinking.
    # The decode actors take the budget from the recipe (data.storage_retry_s, through ClipSpec): 2 s here while the
    # module default stays 120 s, so a budget that did not reach the read would wait the outage out instead.
    proxy.outage(60)
    drops: list = []
    batch = {"path": np.array([uri], object), "label": np.array([0]), "video_index": np.array([0]),
             "start": np.array([np.nan]), "end": np.array([np.nan])}
    spec = ClipSpec.from_config(DataConfig(storage_retry_s=2.0), split="eval", num_frames=4, crop_size=24)
    try:
        with pytest.raises(StorageUnreachable, match=r"did not answer for [2-9] s"):
            decode_batch(batch, spec, lambda *args: drops.append(args))
        monkeypatch.setattr(video, "STORAGE_RETRY_S", 2.0)  # what `data check` and `predict` wait
        with pytest.raises(StorageUnreachable, match=rf"cannot read {uri}: its storage did not answer for \d+ s "
                                                     r"\(.*\); check the bucket and key, and set AWS_ENDPOINT_URL"):
            _read(uri)
    finally:
        proxy.outage(0)  # back at once for the next test
    assert drops == []
    assert not issubclass(StorageUnreachable, BadVideo) and issubclass(StorageUnreachable, OSError)


def test_a_missing_object_is_still_missing_at_once(bucket, monkeypatch):
    """pyarrow reports a missing object as NotFound, not an OSError: dropped as missing, without a single retry."""
    proxy, uri, creds = bucket
    for name, value in creds.env().items():
        monkeypatch.setenv(name, value)
    pauses: list[float] = []
    monkeypatch.setattr(video, "time", SimpleNamespace(monotonic=time.monotonic, sleep=pauses.append))
    with pytest.raises(BadVideo) as info:
        _read(uri.replace(".mp4", "_gone.mp4"))
    assert info.value.reason == "missing" and pauses == []
