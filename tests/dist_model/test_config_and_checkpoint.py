"""DiSTConfig invariants and presets; loading the authors' checkpoint layout."""

from __future__ import annotations

import pytest
import torch

from dist_model import DiSTConfig, build_clip, build_dist, fusion_layers_for
from dist_model.checkpoint import authors_key_to_ours, load_authors_checkpoint, to_authors_state_dict


# --- config ---
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stem_patch_size": 16, "clip_arch": "ViT-L-14"}, "must equal the CLIP patch size 14"),
        ({"integration_dim": 400}, "multiple of head_dim=64"),
        ({"num_frames": 15}, "divisible by sparse_ratio"),
        ({"fusion_layers": (3, 1)}, "strictly increasing"),
        ({"fusion_layers": (0, 12)}, "out of range"),
        ({"clip_precision": "fp8"}, "clip_precision must be fp32, bf16 or fp16, got 'fp8'"),
        ({"fusion_layers": (1.5, 3)}, r"block indices \(whole numbers\) or a preset name, got \[1.5, 3\]"),
        ({"fusion_layers": "every5"}, "unknown fusion preset"),
        ({"clip_arch": "ViT-Q-99"}, "unknown open_clip architecture"),
        ({"clip_arch": "RN50"}, "not an open_clip ViT"),
        ({"temporal_kernel_size": 4}, "must be odd"),
        ({"prompt_template": "a video"}, "must contain"),
    ],
)
def test_invalid_configs_fail_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        DiSTConfig.from_name("dist_b16_k400", **overrides)


def test_unknown_preset_and_field_are_named():
    with pytest.raises(ValueError, match="unknown DiST preset 'dist_b17'.*dist_b16_k400"):
        DiSTConfig.from_name("dist_b17")
    with pytest.raises(ValueError, match="unknown DiSTConfig field"):
        DiSTConfig.from_name("dist_tiny", fusion="all")
    from dist_model import presets

    frames = DiSTConfig.from_name("dist_tiny").num_frames
    presets()["dist_tiny"].num_frames = frames // 2  # a copy: the preset itself is left as it is
    assert DiSTConfig.from_name("dist_tiny").num_frames == frames


def test_required_presets_exist_with_their_frame_counts():
    for dataset, pooling in (("k400", 4), ("ssv2", 2)):
        for sparse, dense in ((8, 16), (16, 32), (32, 64)):
            cfg = DiSTConfig.from_name(f"dist_b16_{dataset}_{sparse}x{dense}f")
            assert (cfg.sparse_frames, cfg.num_frames, cfg.pooling_layers) == (sparse, dense, pooling)
        assert DiSTConfig.from_name(f"dist_l14_{dataset}").num_frames == 64
    assert DiSTConfig.from_name("dist_tiny").image_size == 32


def test_fusion_presets_for_b16_follow_the_reference():
    assert fusion_layers_for("all", 12) == tuple(range(12))
    assert fusion_layers_for("every2", 12) == (1, 3, 5, 7, 9, 11)
    assert fusion_layers_for("every3", 12) == (2, 5, 8, 11)
    assert fusion_layers_for("last6", 12) == tuple(range(6, 12))
    assert fusion_layers_for("last4", 12) == (8, 9, 10, 11)
    assert fusion_layers_for("first6", 12) == tuple(range(6))
    assert fusion_layers_for("last_half", 24) == tuple(range(12, 24))  # L/14 scales by 2


def test_first_half_keeps_the_top_block_cls():
    cfg = DiSTConfig.from_name("dist_b16_k400", fusion_layers="first_half")
    assert cfg.layers == tuple(range(6)) and cfg.head_cls_layer == 11
    assert DiSTConfig.from_name("dist_b16_k400", fusion_layers="last_third").head_cls_layer == 11
    assert DiSTConfig.from_name("dist_b16_k400", fusion_layers=(2, 4)).head_cls_layer == 4


# --- authors' checkpoints ---
@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return build_clip(DiSTConfig.from_name("dist_tiny"))


def test_key_mapping_handles_prefixes_and_old_names():
    assert authors_key_to_ours("module.backbone.base_encoder.dist_net.proj") == "proj"
    assert authors_key_to_ours("ladder_net.s2t_fuse_nets.3.linear_fuse.bias") \
        == "integration2temporal_nets.3.linear_fuse.bias"
    assert authors_key_to_ours("backbone.base_encoder.ladder_net.final_temporal_nets.0.ln_out_temp_cls_token.weight") \
        == "adapooling_nets.0.ln_out_temp_cls_token.weight"
    assert authors_key_to_ours("backbone.base_encoder.visual.conv1.weight") is None


@pytest.mark.parametrize("old_names", [False, True])
def test_authors_checkpoint_round_trips_exactly(tiny_clip, tmp_path, old_names):
    torch.manual_seed(5)
    source = build_dist("dist_tiny", clip=tiny_clip).eval()
    state = to_authors_state_dict(source, prefix="backbone.base_encoder.ladder_net." if old_names else
                                  "backbone.base_encoder.dist_net.", old_names=old_names)
    state["backbone.base_encoder.visual.conv1.weight"] = torch.zeros(1)  # CLIP keys are ignored
    # The authors' model also has the last layer's (unused) integration->temporal map.
    last = len(source.cfg.layers) - 1
    head = "s2t_fuse_nets" if old_names else "integration2temporal_nets"
    branch = "ladder_net" if old_names else "dist_net"
    state[f"backbone.base_encoder.{branch}.{head}.{last}.linear_fuse.weight"] = torch.zeros(16, 64)
    path = tmp_path / "dist.pyth"
    torch.save({"model_state": state, "epoch": 36}, path)

    torch.manual_seed(6)
    target = build_dist("dist_tiny", clip=tiny_clip).eval()
    report = load_authors_checkpoint(target, path)
    assert report.ok, report.summary()
    assert report.ignored_outside_branch == 1 and len(report.unused_by_design) == 1
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    video = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(video, ["a", "b"]), target(video, ["a", "b"]))


def test_frame_dependent_tensors_are_interpolated(tiny_clip):
    source = build_dist("dist_tiny", clip=tiny_clip)  # 8 dense / 4 sparse frames
    target = build_dist(DiSTConfig.from_name("dist_tiny", num_frames=16), clip=tiny_clip)  # 8 sparse
    # Known per-frame values: the pooling's positional embedding a ramp in time (frame t, channel c: t * (c + 1)),
    # the integration's CLS token constant in time (channel c: c).
    pos_src = source.dist_net.adapooling_nets[0].positional_embedding  # (1, T, D)
    cls_src = source.dist_net.temporal2integration_nets[0].cls_token  # (1, 1, T, D)
    channels = torch.arange(pos_src.shape[-1], dtype=torch.float32)
    with torch.no_grad():
        pos_src.copy_(torch.arange(4.0)[None, :, None] * (channels + 1))
        cls_src.copy_(channels.expand_as(cls_src))
    report = load_authors_checkpoint(target, to_authors_state_dict(source))
    assert report.ok, report.summary()
    assert report.interpolated["temporal2integration_nets.0.cls_token"] == (4, 8)
    assert report.interpolated["adapooling_nets.0.positional_embedding"] == (4, 8)
    # Linear resampling with half-pixel centres (align_corners=False): output frame i of 8 reads source position
    # (i + 0.5) * 4 / 8 - 0.5, clamped to the first and last frame, so the ramp's times are:
    times = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0])
    pos = target.dist_net.adapooling_nets[0].positional_embedding
    assert pos.shape == (1, 8, 64)
    torch.testing.assert_close(pos.detach(), times[None, :, None] * (channels + 1))
    cls = target.dist_net.temporal2integration_nets[0].cls_token
    assert cls.shape == (1, 1, 8, 64)
    torch.testing.assert_close(cls.detach(), channels.expand(1, 1, 8, 64))


def test_shape_mismatch_and_missing_are_reported(tiny_clip):
    model = build_dist("dist_tiny", clip=tiny_clip)
    state = to_authors_state_dict(model)
    state["backbone.base_encoder.dist_net.proj"] = torch.zeros(64, 999)
    del state["backbone.base_encoder.dist_net.ln_post.weight"]
    state["backbone.base_encoder.dist_net.something_new.weight"] = torch.zeros(1)
    report = load_authors_checkpoint(model, state)
    assert not report.ok
    assert report.mismatched == {"proj": ((64, 999), (64, 64))}
    assert report.missing == ["ln_post.weight"] and report.unexpected == ["something_new.weight"]


def test_checkpoints_never_unpickle_objects(tiny_clip, tmp_path):
    import argparse  # any importable class stands in for an arbitrary pickled object

    path = tmp_path / "evil.pyth"
    torch.save({"model_state": {}, "payload": argparse.Namespace(x=1)}, path)
    with pytest.raises(RuntimeError, match="weights_only"):
        load_authors_checkpoint(build_dist("dist_tiny", clip=tiny_clip), path)


def test_a_field_changed_after_construction_is_checked_and_refused_when_invalid():
    """DiSTConfig is checked when made; a field set afterwards was not (a model built from it failed later or
    silently): it is checked the same way, and a refused change leaves the old value."""
    import dataclasses

    cfg = DiSTConfig.from_name("dist_tiny")
    cfg.num_frames = cfg.num_frames * 2  # a valid change is taken
    cfg.fusion_layers = [0, 1]
    assert cfg.fusion_layers == (0, 1)
    frames = cfg.num_frames
    with pytest.raises(ValueError, match=r"num_frames \(dense, 7\) must be divisible by sparse_ratio \(2\) "
                                         r"\(DiSTConfig.num_frames = 7 refused; to change several fields together, use "
                                         r"dataclasses.replace\(config, num_frames=\.\.\., \.\.\.\)\)"):
        cfg.num_frames = 7
    assert cfg.num_frames == frames
    with pytest.raises(ValueError, match="fusion_layers must be strictly increasing"):
        cfg.fusion_layers = (1, 0)
    with pytest.raises(ValueError, match="clip_precision must be fp32, bf16 or fp16"):
        cfg.clip_precision = "int8"
    assert (cfg.fusion_layers, cfg.clip_precision) == ((0, 1), "fp32")
    # Two fields that only fit together: dataclasses.replace checks them once, together.
    assert dataclasses.replace(cfg, num_frames=12, sparse_ratio=3).num_frames == 12
    assert dataclasses.asdict(cfg) == dataclasses.asdict(DiSTConfig(**dataclasses.asdict(cfg)))
