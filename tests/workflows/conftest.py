"""Data fixtures for the workflow tests: tiny real mp4 files written once per session.

Every test video encodes its frame index in the red channel (R = 8 * index) and a left-dark/right-bright green
ramp, so a decoded clip tells which frames were sampled and whether it was mirrored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

INDEX_STEP = 8  # at most 31 frames per test video

# name -> (width, height, fps, frames): several resolutions, frame rates, lengths and a portrait video. The 48 px
# wide one hits decord 0.6.0's copy bug for that width and exercises the PyAV fallback.
GOOD_VIDEOS = {
    "wide": (96, 64, 25, 31),
    "tall": (64, 96, 30, 24),
    "mid": (160, 120, 12, 28),
    "big": (340, 256, 24, 16),
    "narrow": (48, 64, 10, 20),
}


def index_frames(width: int, height: int, num_frames: int) -> np.ndarray:
    """(T, H, W, 3) uint8 frames: R = 8 * t, G = horizontal ramp 0..255, B = 96."""
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[..., 0] = (INDEX_STEP * np.arange(num_frames) % 256)[:, None, None]
    frames[..., 1] = np.linspace(0, 255, width).astype(np.uint8)[None, None, :]
    frames[..., 2] = 96
    return frames


def frame_ids(clip: np.ndarray) -> np.ndarray:
    """Recover the source frame index of each frame of a decoded (T, H, W, 3) clip."""
    return np.rint(clip[..., 0].reshape(len(clip), -1).mean(1) / INDEX_STEP).astype(np.int64)


def is_mirrored(clip: np.ndarray) -> bool:
    """True when the green ramp runs right-to-left (the clip was flipped horizontally)."""
    g = clip[..., 1].astype(np.float64)
    half = g.shape[2] // 2
    return g[:, :, :half].mean() > g[:, :, half:].mean()


SMOKE = Path(__file__).resolve().parents[2] / "workflows" / "configs" / "smoke.yaml"
CLASSES = [f"cls{i}" for i in range(len(GOOD_VIDEOS))]  # the classes of video_dir's labels.json


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, video_dir: Path) -> Path:
    """(evaluate, predict) A run directory with two checkpoints (steps 1 and 2) of the tiny DiST, trained on
    nothing: its weights are the seeded init plus a fixed perturbation, so a wrongly loaded model shows."""
    import torch

    from dist_model import build_dist
    from workflows.checkpoints import write_model_files
    from workflows.config_loader import dump_yaml
    from workflows.recipe import load_recipe, recipe_to_dict

    root = tmp_path_factory.mktemp("eval-runs")
    good, labels = video_dir / "good.csv", video_dir / "labels.json"
    recipe = load_recipe(SMOKE, [f"data.train_manifest={good}", f"data.val_manifest={good}", f"data.labels={labels}",
                                 f"run.storage_path={root}", "run.name=evaltest"])
    torch.manual_seed(recipe.train.seed)  # as pretrain does: the random-init frozen CLIP follows the seed
    model = build_dist(recipe.model_cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    for step in (1, 2):
        state = {"step": step, "epoch": 0, "position": 0, "model": recipe_to_dict(recipe)["model"],
                 "class_names": CLASSES, "metrics": {}}
        write_model_files(root / "evaltest" / f"checkpoint_00000{step - 1}", model=model, state=state,
                          recipe_yaml=dump_yaml(recipe))
    return root / "evaltest"


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of good index videos (GOOD_VIDEOS), bad ones, a labels.json and manifests:
    good.csv (all good, labels cls0..cls4), bad.csv (good ones plus missing, empty, truncated, random bytes)."""
    from workflows.data.manifest import save_labels, write_manifest
    from workflows.data.sample import write_video

    root = tmp_path_factory.mktemp("videos")
    (root / "clips").mkdir()
    rows = []
    for i, (name, (w, h, fps, n)) in enumerate(GOOD_VIDEOS.items()):
        write_video(root / "clips" / f"{name}.mp4", index_frames(w, h, n), fps, crf=8)  # near-lossless
        rows.append({"path": f"clips/{name}.mp4", "label": f"cls{i}"})
    save_labels({f"cls{i}": i for i in range(len(GOOD_VIDEOS))}, root / "labels.json")
    write_manifest(rows, root / "good.csv")
    # Bad files of every kind the issue names.
    data = (root / "clips" / "wide.mp4").read_bytes()
    (root / "clips" / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "clips" / "empty.mp4").write_bytes(b"")
    (root / "clips" / "random.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    bad_rows = rows + [
        {"path": "clips/missing.mp4", "label": "cls0"},
        {"path": "clips/empty.mp4", "label": "cls1"},
        {"path": "clips/truncated.mp4", "label": "cls2"},
        {"path": "clips/random.mp4", "label": "cls3"},
    ]
    write_manifest(bad_rows, root / "bad.csv")
    return root


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    """The motion sample dataset, small (3 videos per class, 48 px, 24 frames): the real runs' data (test_pretrain,
    test_full_disk)."""
    from workflows.data.sample import write_sample_dataset

    return write_sample_dataset(tmp_path_factory.mktemp("sample"), videos_per_class=3, size=48, num_frames=24,
                                seed=1, workers=1)
