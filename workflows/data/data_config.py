"""`DataConfig`: the `data:` section of a run config (manifests, decoding, augmentation, bad-video policy).

The clip geometry (dense frames T_d, crop size) belongs to the model and is passed to `build_clip_dataset` by
the training workflow; everything here is about where the videos are and how they are decoded and augmented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from workflows.runtime import label_selector

# Something-Something-V2 direction-sensitive class pairs (reference §5): "Pulling something from left to right"
# <-> "... right to left" (86, 87), "Pushing something from left to right" <-> "... right to left" (93, 94) and
# "Turning the camera left/right while filming something" (166, 167). A horizontal flip swaps each pair.
SSV2_FLIP_PAIRS: list[list[int]] = [[86, 87], [93, 94], [166, 167]]

FlipMode = Literal["plain", "none", "swap_labels"]

# data.decode_node_label: the label an unset key looks for on the alive nodes (what cluster/*.yaml give CPU decode
# nodes), and the value that opts out (decode on any node, never auto-detected).
DECODE_LABEL_AUTO = "dist-role=decode"
DECODE_ANYWHERE = "any"


@dataclass
class DataConfig:
    """Where the videos are and how clips are decoded, sampled and augmented (reference §5)."""

    train_manifest: str = ""  # CSV/Parquet with columns path,label[,start,end]; see manifest.py
    val_manifest: str = ""
    labels: str = ""  # JSON {class name: index}
    # Horizontal flip: "plain" (K400: flip, label unchanged), "none", or "swap_labels" (SSV2: flip and swap
    # the labels of each pair in flip_pairs; use SSV2_FLIP_PAIRS = [[86, 87], [93, 94], [166, 167]]).
    flip: FlipMode = "plain"
    flip_pairs: list[list[int]] = field(default_factory=list)
    flip_p: float = 0.5
    crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])  # random-resized-crop area range
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # and aspect-ratio range
    grayscale_p: float = 0.2  # one draw per clip, the same for all frames
    # Decoding: how many decoders (Ray Data tasks; the key keeps the name it had when they were actors) run at once.
    # None or 0: one per decode_threads CPUs of the (labelled) nodes.
    decode_actors: int | None = None
    decode_threads: int = 1  # decord threads per reader = CPUs reserved per decoder
    # Where the decoders run. "key=value": only on nodes carrying that Ray node label (the cluster YAMLs
    # label CPU decode nodes "dist-role=decode"); the run stops before training when no alive node carries it.
    # None (unset): the training drivers look for alive nodes labelled DECODE_LABEL_AUTO ("dist-role=decode")
    # and use them when there are any, else any node. "any" (DECODE_ANYWHERE): any node, no auto-detection.
    decode_node_label: str | None = None
    # Short side to decode at when the source is much larger (decord's decode-time resize). None: 8/7 of the
    # crop size for training (256 for 224) and the crop size for evaluation. Only used when the source's short
    # side exceeds decode_resize_threshold times this.
    decode_short_side: int | None = None
    decode_resize_threshold: float = 1.25
    batch_size: int = 4  # videos per map_batches call
    train_views: int = 1  # clips sampled per decoded training video (independent positions and augmentation)
    # Training clips held in each worker's local shuffle buffer, so the train_views clips of one video do not land
    # in one micro-batch (measured on the demo: adjacent views cut validation accuracy at 1000 steps from ~60% to
    # ~26%). None = automatic: off with one view, else 4 x train_views x micro-batch clips (memory: that many
    # uint8 clips per worker). 0 = off.
    train_shuffle_clips: int | None = None
    min_frames: int = 4  # videos (or start/end windows) with fewer frames are dropped as too_short
    # Stop with an error once more than this fraction of a split's videos has been dropped.
    max_bad_fraction: float = 0.05
    # A video in a bucket whose storage does not answer is retried this long (after the storage SDK's own retries),
    # then the batch fails and the run restarts from its newest complete checkpoint: never dropped as a bad video.
    storage_retry_s: float = 120.0
    drop_counter: str = "dist-data-drops"  # name of the Ray actor that counts dropped videos

    # Keys this section once had, with where their setting lives now: the strict loader rejects them with this hint
    # (workflows.config_loader.REMOVED_KEYS_ATTR). The evaluation views and crops are the recipe's `eval:` section.
    removed_keys: ClassVar[dict[str, str]] = {
        "eval_views": "use eval.test_views (views of `workflows evaluate`) or eval.views (validation during training)",
        "eval_crops": "use eval.test_crops (crops of `workflows evaluate`)",
    }

    def __post_init__(self) -> None:
        if self.flip == "swap_labels" and not self.flip_pairs:
            raise ValueError("flip='swap_labels' needs flip_pairs, e.g. [[86, 87], [93, 94], [166, 167]] for SSV2")
        seen: set[int] = set()
        for pair in self.flip_pairs:
            if len(pair) != 2 or pair[0] == pair[1] or min(pair) < 0:
                raise ValueError(f"flip_pairs entry {pair!r} must be two different non-negative class indices")
            if seen & set(pair):
                raise ValueError(f"flip_pairs: class {sorted(seen & set(pair))} appears in more than one pair")
            seen |= set(pair)
        if not 0.0 <= self.flip_p <= 1.0 or not 0.0 <= self.grayscale_p <= 1.0:
            raise ValueError("flip_p and grayscale_p must lie in [0, 1]")
        for name, rng in (("crop_scale", self.crop_scale), ("crop_ratio", self.crop_ratio)):
            if len(rng) != 2 or not 0 < rng[0] <= rng[1]:
                raise ValueError(f"{name} must be [low, high] with 0 < low <= high, got {rng!r}")
        if self.crop_scale[1] > 1.0:
            raise ValueError(f"crop_scale upper bound must be <= 1, got {self.crop_scale[1]}")
        if self.decode_actors is not None and self.decode_actors < 0:
            raise ValueError("decode_actors must be >= 0 (0 or null: derive from the cluster's CPUs)")
        if self.decode_threads < 1:
            raise ValueError("decode_threads must be >= 1")
        if self.decode_node_label is not None and self.decode_node_label != DECODE_ANYWHERE:
            label = self.decode_node_label
            key, sep, value = label.partition("=") if isinstance(label, str) else ("", "", "")
            if not sep or not key.strip() or not value.strip() or "=" in value or "," in value:
                raise ValueError(
                    f"decode_node_label must be one Ray node label key=value (e.g. {DECODE_LABEL_AUTO}), "
                    f"{DECODE_ANYWHERE!r} (decode on any node) or null (unset: nodes labelled {DECODE_LABEL_AUTO} "
                    f"when the cluster has any, else any node); got {label!r}")
        if self.decode_short_side is not None and self.decode_short_side < 8:
            raise ValueError("decode_short_side must be >= 8 pixels (or null for automatic)")
        if self.decode_resize_threshold < 1.0:
            raise ValueError("decode_resize_threshold must be >= 1")
        for name in ("batch_size", "train_views", "min_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.train_shuffle_clips is not None and self.train_shuffle_clips < 0:
            raise ValueError(f"train_shuffle_clips must be >= 0 (0 = off) or null, got {self.train_shuffle_clips}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")
        if not self.storage_retry_s >= 0.0:  # NaN too
            raise ValueError(f"storage_retry_s must be >= 0 seconds, got {self.storage_retry_s}")

    def node_label_selector(self) -> dict[str, str] | None:
        """`decode_node_label` as a Ray label selector ({key: value}), or None (any node: unset or "any").

        An unset label is resolved to a label or "any" by the drivers before the workers start
        (`workflows.data.decode_nodes.resolve_decode_nodes`); here, where the workers build their datasets, it means
        any node."""
        return None if self.decode_node_label == DECODE_ANYWHERE else label_selector(self.decode_node_label)
