"""The synthetic motion dataset: decodable, balanced, deterministic, and no class signal in a single frame."""

from __future__ import annotations

import numpy as np
import pytest

from workflows.data.manifest import load_labels, load_manifest
from workflows.data.sample import SAMPLE_CLASSES, render_motion, write_sample_dataset
from workflows.data.video import read_frames

SIZE, FRAMES, PER_CLASS = 32, 16, 32


@pytest.fixture(scope="module", params=[1, 3], ids=["1-object", "3-objects"])
def sample(tmp_path_factory, request):
    """The sample dataset at test size (one object per video, and three as the demo writes), with every video
    decoded (all frames) per split."""
    info = write_sample_dataset(tmp_path_factory.mktemp("sample"), videos_per_class=PER_CLASS, size=SIZE,
                                num_frames=FRAMES, seed=0, workers=2, num_objects=request.param)
    assert info.num_objects == request.param
    labels = load_labels(info.labels)
    decoded = {}
    for split, manifest in (("train", info.train_manifest), ("val", info.val_manifest)):
        m = load_manifest(manifest, labels)
        clips = [read_frames(p, lambda a, b, fps: np.arange(a, b)).frames for p in m.table.column("path").to_pylist()]
        decoded[split] = (np.stack(clips), np.asarray(m.table.column("label").to_pylist()))  # (N, T, H, W, 3), (N,)
    return info, decoded


def test_sample_is_decodable_balanced_and_labelled(sample) -> None:
    info, decoded = sample
    assert load_labels(info.labels) == {name: i for i, name in enumerate(SAMPLE_CLASSES)}
    assert info.flip_pairs == [[0, 1], [4, 5]]
    for split, per_class in (("train", PER_CLASS - 8), ("val", 8)):
        clips, labels = decoded[split]
        assert clips.shape == (per_class * len(SAMPLE_CLASSES), FRAMES, SIZE, SIZE, 3)
        assert np.bincount(labels, minlength=len(SAMPLE_CLASSES)).tolist() == [per_class] * len(SAMPLE_CLASSES)


def test_sample_is_deterministic_by_seed() -> None:
    a = render_motion(4, np.random.default_rng([0, 4, 1]), size=SIZE, num_frames=FRAMES)
    b = render_motion(4, np.random.default_rng([0, 4, 1]), size=SIZE, num_frames=FRAMES)
    c = render_motion(4, np.random.default_rng([1, 4, 1]), size=SIZE, num_frames=FRAMES)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[-1])  # it moves


def _ridge_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    """Linear (ridge, one-vs-all) classifier fitted on train, accuracy on val."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xt = np.c_[(train_x - mu) / sd, np.ones(len(train_x))]
    xv = np.c_[(val_x - mu) / sd, np.ones(len(val_x))]
    targets = np.eye(len(SAMPLE_CLASSES))[train_y]
    w = np.linalg.solve(xt.T @ xt + 1.0 * np.eye(xt.shape[1]), xt.T @ targets)
    return float(((xv @ w).argmax(1) == val_y).mean())


def _frame_features(clips: np.ndarray, t: int) -> np.ndarray:
    """What a spatial model sees in frame t: a 8x8 colour thumbnail plus colour statistics."""
    f = clips[:, t].astype(np.float64)  # (N, H, W, 3)
    n, h, w, _ = f.shape
    thumb = f.reshape(n, 8, h // 8, 8, w // 8, 3).mean((2, 4)).reshape(n, -1)
    return np.c_[thumb, f.reshape(n, -1, 3).mean(1), f.reshape(n, -1, 3).std(1)]


def _flow_features(clips: np.ndarray) -> np.ndarray:
    """A crude temporal feature: the global brightness-constancy flow (vx, vy), averaged over frame pairs."""
    g = clips.astype(np.float64).mean(-1)  # (N, T, H, W)
    gx, gy = np.gradient(g, axis=3), np.gradient(g, axis=2)
    gt = g[:, 1:] - g[:, :-1]
    gx, gy = (gx[:, 1:] + gx[:, :-1]) / 2, (gy[:, 1:] + gy[:, :-1]) / 2
    vx = -(gt * gx).sum((2, 3)) / ((gx * gx).sum((2, 3)) + 1e-6)
    vy = -(gt * gy).sum((2, 3)) / ((gy * gy).sum((2, 3)) + 1e-6)
    return np.c_[np.median(vx, 1), np.median(vy, 1)]


def _cv_accuracy(x: np.ndarray, y: np.ndarray, folds: int = 4) -> float:
    """Mean held-out accuracy of the ridge classifier over `folds` interleaved folds of all videos."""
    fold = np.arange(len(y)) % folds
    return float(np.mean([_ridge_accuracy(x[fold != k], y[fold != k], x[fold == k], y[fold == k])
                          for k in range(folds)]))


def test_single_frames_carry_no_class_signal_but_motion_does(sample) -> None:
    _, decoded = sample
    clips = np.concatenate([decoded["train"][0], decoded["val"][0]])
    labels = np.concatenate([decoded["train"][1], decoded["val"][1]])
    chance = 1 / len(SAMPLE_CLASSES)  # 0.125; 256 held-out predictions give a standard error of ~0.02
    for t in (0, FRAMES // 2, FRAMES - 1):  # any single frame: the linear classifier stays at chance
        acc = _cv_accuracy(_frame_features(clips, t), labels)
        assert acc < chance + 0.1, (t, acc)
    # The same classifier on two numbers of motion separates the four translations: the data is learnable and
    # this test would notice a leak.
    motion = _cv_accuracy(_flow_features(clips), labels)
    assert motion > 0.4, motion
