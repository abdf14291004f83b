"""DiST model: parameter counts, gradients, frozen CLIP, text classifier, zero-shot, state dicts, compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_model import DiSTConfig, DiSTNet, build_clip, build_dist, build_spatial_only, normalize_video
from dist_model.config import recomputed_layer_count
from dist_model.head import cosine_logits
from dist_model.layers import quick_gelu


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return build_clip(DiSTConfig.from_name("dist_tiny"))


@pytest.fixture()
def tiny(tiny_clip):
    torch.manual_seed(1)
    return build_dist("dist_tiny", clip=tiny_clip)


def tiny_video(batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 8, 32, 32, generator=g)


# --- parameter counts (reference §2.8), built on the meta device: no memory, no CLIP ---
@pytest.mark.parametrize(
    "preset, millions",
    [("dist_b16_k400", 26.11), ("dist_b16_ssv2", 19.00), ("dist_l14_k400", 39.87), ("dist_l14_k400_8x16f", 39.61),
     ("dist_b16_k400_16x32f", 26.15), ("dist_b16_k400_32x64f", 26.25), ("dist_l14_ssv2", 32.75)],
)
def test_trainable_parameter_count_matches_reference(preset, millions):
    cfg = DiSTConfig.from_name(preset)
    with torch.device("meta"):
        net = DiSTNet(cfg)
    count = sum(p.numel() for p in net.parameters())
    # The reference counts one more integration->temporal map than is built (the last fusion layer's, which feeds
    # nothing): with it, the count rounds to the reference's two decimals (within 5 k parameters), so losing the
    # per-frame CLS tokens (37 k at B/16) or the pooling positional embeddings (12 k) fails here.
    unbuilt = sum(p.numel() for p in net.integration2temporal_nets[0].parameters())
    assert len(net.integration2temporal_nets) == len(cfg.layers) - 1
    assert round((count + unbuilt) / 1e6, 2) == millions, f"{preset}: {count + unbuilt:,} vs reference {millions} M"


def test_l14_presets_use_patch_14_stem():
    cfg = DiSTConfig.from_name("dist_l14_k400")
    assert cfg.stem_patch_size == 14 and cfg.num_frames == 64 and cfg.sparse_frames == 32 and len(cfg.layers) == 24
    with torch.device("meta"):
        net = DiSTNet(cfg)
    assert tuple(net.temporal_stem.weight.shape) == (96, 3, 5, 14, 14)


# --- forward/backward, frozen CLIP ---
def test_forward_backward_grads_only_on_trainable(tiny):
    tiny.train()
    assert not tiny.clip.training and not tiny.clip.model.visual.training, "CLIP must stay in eval mode"
    assert tiny.dist_net.training
    logits = tiny(tiny_video(), ["a", "b", "c"])
    assert logits.shape == (2, 3)
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    no_grad = [n for n, p in tiny.dist_net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"trainable parameters without gradient: {no_grad}"
    assert all(not p.requires_grad and p.grad is None for p in tiny.clip.parameters())
    assert tiny.num_trainable_params() == sum(p.numel() for p in tiny.dist_net.parameters())


def test_clip_sees_only_sparse_frames(tiny):
    video = tiny_video()
    changed = video.clone()
    changed[:, :, 1::2] += 1.0  # touch only frames CLIP must not see (gamma = 2)
    names = ["a", "b"]
    with torch.no_grad():
        assert torch.equal(tiny.clip_logits(video, names), tiny.clip_logits(changed, names))
        assert not torch.allclose(tiny(video, names), tiny(changed, names)), "temporal encoder must see dense frames"


def test_clip_stops_after_deepest_needed_block(tiny_clip):
    cfg = DiSTConfig.from_name("dist_tiny", fusion_layers=(0, 1))
    model = build_dist(cfg, clip=tiny_clip)
    calls = []
    hooks = [b.register_forward_hook(lambda *_, i=i: calls.append(i))
             for i, b in enumerate(tiny_clip.model.visual.transformer.resblocks)]
    try:
        model(tiny_video(1), ["x"])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1]


def test_clip_tokens_match_open_clip_intermediates(tiny_clip):
    frames = torch.randn(3, 3, 32, 32)
    ours = tiny_clip.forward_tokens(frames, taps={1, 3}, stop=3)
    ref = tiny_clip.model.visual.forward_intermediates(
        frames, indices=[1, 3], intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
    )
    for i, layer in enumerate((1, 3)):
        expected = torch.cat([ref["image_intermediates_prefix"][i], ref["image_intermediates"][i]], dim=1)
        torch.testing.assert_close(ours[layer], expected)


def test_bf16_clip_runs_and_branch_stays_fp32(tiny_clip):
    cfg = DiSTConfig.from_name("dist_tiny", clip_precision="bf16")
    model = build_dist(cfg)
    assert model.clip.dtype == torch.bfloat16 and model.dist_net.proj.dtype == torch.float32
    logits = model(tiny_video(), ["a", "b"])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_logit_scale_is_clips_temperature_whatever_the_clip_dtype():
    """exp(logit_scale) is 100 for CLIP's ln 100 also with a bf16 CLIP (a bf16 ln 100 is 4.594: 98.9), and a later
    cast of the whole model does not round it either: a video embedding equal to a class's text embedding scores
    exactly 100 (cosine 1)."""
    model = build_dist(DiSTConfig.from_name("dist_tiny", clip_precision="bf16"))
    assert model.clip.logit_scale == pytest.approx(math.log(100))
    model.to(torch.bfloat16)
    text = F.normalize(torch.randn(3, 8), dim=-1)
    logits = cosine_logits(text[1:2] * 3, text, model.clip.logit_scale)
    assert logits[0, 1].item() == pytest.approx(100.0, rel=1e-5)


def test_normalize_video_layout_and_values():
    frames = torch.zeros(2, 4, 5, 6, 3, dtype=torch.uint8)
    frames[..., 0] = 255
    video = normalize_video(frames)
    assert video.shape == (2, 3, 4, 5, 6)
    assert torch.allclose(video[:, 0], torch.tensor((1 - 0.48145466) / 0.26862954))
    assert torch.allclose(video[:, 1], torch.tensor(-0.4578275 / 0.26130258))
    with pytest.raises(ValueError, match="expected uint8 clips \\(0..255\\), got torch.float32"):
        normalize_video(frames.float() / 255)  # would be scaled by 1/255 a second time
    from dist_model import build_dist

    model = build_dist("dist_tiny")
    cfg = model.cfg
    raw = torch.zeros(1, 3, cfg.num_frames, cfg.image_size, cfg.image_size, dtype=torch.uint8)
    with pytest.raises(ValueError, match="expected a normalised float video, got torch.uint8: pass uint8 clips"):
        model(raw, ["a", "b"])  # not normalised: its logits would be wrong without a word


# --- text classifier and zero-shot ---
def test_label_swap_changes_logit_count_without_rebuilding(tiny):
    video = tiny_video()
    with torch.no_grad():
        assert tiny(video, ["a", "b", "c"]).shape == (2, 3)
        assert tiny(video, ["run", "jump", "swim", "walk", "sit"]).shape == (2, 5)


def test_text_cache_keyed_by_texts_not_count(tiny):
    """The authors' cache went stale for two label sets of the same size; ours must not."""
    first = tiny.text_embeddings(["archery", "bowling"])
    second = tiny.text_embeddings(["surfing", "skiing"])
    assert not torch.allclose(first, second)
    assert tiny.text_embeddings(["archery", "bowling"]) is first  # computed once, then cached


def test_release_text_tower_keeps_cached_label_sets_and_refuses_new_ones():
    torch.manual_seed(0)
    clip = build_clip(DiSTConfig.from_name("dist_tiny"))  # its own CLIP: releasing must not touch the shared one
    model = build_dist("dist_tiny", clip=clip)
    video = tiny_video()
    with torch.no_grad():
        before = model(video, ["archery", "bowling"])
    image_params = sum(p.numel() for p in clip.model.visual.parameters())
    text_params = sum(p.numel() for p in clip.parameters()) - image_params
    assert text_params > 0
    mask = clip.model.attn_mask.numel()  # a buffer of the text tower, not a parameter
    assert clip.release_text_tower() == text_params + mask
    assert sum(p.numel() for p in clip.parameters()) == image_params  # only the image tower is left
    with torch.no_grad():
        assert torch.equal(model(video, ["archery", "bowling"]), before)  # the cached label set still scores
    with pytest.raises(RuntimeError, match="text tower was released"):
        model.text_embeddings(["surfing"])


@pytest.mark.parametrize("setting", [True, 1])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny, setting):
    video = tiny_video(seed=3)
    labels = torch.tensor([0, 2])

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tiny.zero_grad(set_to_none=True)
        loss = F.cross_entropy(tiny(video, ["a", "b", "c"]), labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None}

    tiny.train()
    plain_loss, plain = loss_and_grads()
    tiny.dist_net.activation_checkpointing = setting  # every fusion layer, or only the first
    recomputed_loss, recomputed = loss_and_grads()
    assert torch.allclose(recomputed_loss, plain_loss, atol=1e-6)
    assert recomputed.keys() == plain.keys() and len(plain) > 0
    for name, grad in plain.items():
        assert torch.allclose(recomputed[name], grad, atol=1e-6, rtol=1e-5), name


def test_activation_checkpointing_is_a_config_field():
    cfg = DiSTConfig.from_name("dist_tiny", activation_checkpointing=True)
    assert DiSTNet(cfg).activation_checkpointing
    assert not DiSTNet(DiSTConfig.from_name("dist_tiny")).activation_checkpointing
    depth = len(cfg.layers)
    assert DiSTNet(DiSTConfig.from_name("dist_tiny", activation_checkpointing=depth)).activation_checkpointing == depth
    with pytest.raises(ValueError, match="activation_checkpointing"):
        DiSTConfig.from_name("dist_tiny", activation_checkpointing=depth + 1)


@pytest.mark.parametrize("setting, expected", [(False, 0), (True, 12), (0, 0), (3, 3), (12, 12)])
def test_recomputed_layer_count(setting, expected):
    assert recomputed_layer_count(setting, 12) == expected


def test_partial_checkpointing_recomputes_only_the_first_layers(tiny, monkeypatch):
    """With N, exactly the first N fusion layers run under torch.utils.checkpoint (each runs twice: forward, and
    again in the backward), the rest once."""
    calls = []
    original = tiny.dist_net.fusion_layer
    monkeypatch.setattr(tiny.dist_net, "fusion_layer", lambda k, *a: calls.append(k) or original(k, *a))
    tiny.train()
    tiny.dist_net.activation_checkpointing = 1
    F.cross_entropy(tiny(tiny_video(seed=4), ["a", "b", "c"]), torch.tensor([0, 1])).backward()
    depth = len(tiny.cfg.layers)
    assert sorted(calls) == sorted([0, 0, *range(1, depth)])


def test_prompt_template_and_quote_stripping(tiny_clip):
    """Double quotes go (as the authors strip them); apostrophes stay. This test used to assert "it's" -> "its",
    which encoded the bug."""
    model = build_dist(DiSTConfig.from_name("dist_tiny", prompt_template="a video of {}."), clip=tiny_clip)
    assert model.classifier.prompts(['"dancing"', "it's", "\u201cjuggling\u201d"]) == (
        "a video of dancing.", "a video of it's.", "a video of juggling.")


def test_class_names_keep_their_apostrophes_in_the_text_tower(tiny_clip):
    """Kinetics' "massaging person's head" must reach CLIP's tokenizer as written, not as "massaging persons head"."""
    model = build_dist(DiSTConfig.from_name("dist_tiny"), clip=tiny_clip)
    name = "massaging person's head"
    assert model.classifier.prompts([name]) == (name,)
    tokenize = tiny_clip.tokenizer
    assert not torch.equal(tokenize([name]), tokenize(["massaging persons head"]))
    torch.testing.assert_close(model.text_embeddings([name]),
                               F.normalize(tiny_clip.encode_text(tokenize([name])).float(), dim=-1), rtol=0, atol=0)


def test_text_cache_serves_float32_whatever_the_tower_dtype():
    """The cache key is (prompt texts, device), no dtype: entries are float32 and a tower cast after caching (as
    DeepSpeed's bf16 casts the module, after training has cached its labels and released the text tower) keeps
    being served what was cached."""
    model = build_dist(DiSTConfig.from_name("dist_tiny", clip_precision="bf16"))
    first = model.text_embeddings(["archery", "bowling"])
    assert first.dtype == torch.float32
    model.clip.release_text_tower()
    model.to(torch.float16)
    assert model.text_embeddings(["archery", "bowling"]) is first


def test_zero_shot_fusion_blends_with_frozen_clip(tiny):
    tiny.eval()
    video, names = tiny_video(), ["a", "b", "c"]
    with torch.no_grad():
        plain, clip_only = tiny(video, names), tiny.clip_logits(video, names)
        fused = tiny(video, names, zero_shot_fusion=True)
    w = tiny.cfg.zero_shot_weight
    torch.testing.assert_close(fused, (1 - w) * plain + w * clip_only)


def test_spatial_only_baseline_ignores_frame_order(tiny_clip):
    base = build_spatial_only("dist_tiny", clip=tiny_clip)
    video = tiny_video()
    shuffled = video[:, :, [6, 7, 4, 5, 2, 3, 0, 1]]  # permute the sparse frames (0,2,4,6 -> 6,4,2,0)
    with torch.no_grad():
        torch.testing.assert_close(base(video, ["a", "b"]), base(shuffled, ["a", "b"]))
    assert set(base.state_dict()) == {"head.proj_spatial_cls_token.weight", "head.proj_spatial_cls_token.bias",
                                      "head.ln_post.weight", "head.ln_post.bias", "head.proj"}


# --- trainable surface ---
def test_state_dict_holds_trainable_weights_only_and_round_trips(tiny, tiny_clip):
    state = tiny.state_dict()
    assert state and all(k.startswith("dist_net.") for k in state)
    assert sum(v.numel() for v in state.values()) == tiny.num_trainable_params()
    other = build_dist("dist_tiny", clip=tiny_clip)
    other.load_state_dict(state)
    video = tiny_video()
    with torch.no_grad():
        torch.testing.assert_close(other(video, ["a", "b"]), tiny(video, ["a", "b"]))
    with pytest.raises(RuntimeError, match="unexpected keys"):
        other.load_state_dict({**state, "clip.model.logit_scale": torch.zeros(())})


def test_param_groups_cover_trainable_once_with_no_decay_rules(tiny):
    groups = tiny.param_groups(weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["decay", "no_decay"] and all(g["params"] for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in tiny.dist_net.parameters()}
    names = {id(p): n for n, p in tiny.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert "dist_net.temporal2integration_nets.0.cls_token" in no_decay
    assert "dist_net.adapooling_nets.0.positional_embedding" in no_decay
    assert "dist_net.aggregated_cls_token" in no_decay and "dist_net.ln_post.weight" in no_decay
    assert "dist_net.input_linears.0.bias" in no_decay
    decay = {names[id(p)] for p in groups[0]["params"]}
    assert "dist_net.input_linears.0.weight" in decay and "dist_net.proj" in decay
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0


def test_param_groups_drop_empty_groups(tiny_clip):
    base = build_spatial_only("dist_tiny", clip=tiny_clip)
    base.head.proj_spatial_cls_token.requires_grad_(False)
    base.head.ln_post.requires_grad_(False)
    groups = base.param_groups(0.1)
    assert [g["name"] for g in groups] == ["decay"]


# --- torch.compile ---
def test_torch_compile_matches_eager(tiny):
    """The whole inference forward traced by dynamo (fp32, breaks allowed) gives eager's embedding. aot_eager runs the
    traced graphs with eager kernels: inductor's C++ code generation is test_compile_step's (the same modules under
    bf16 autocast, forward and backward), and building its kernels again here cost ~25 s of a cold CI run."""
    tiny.eval()
    video = tiny_video()
    with torch.no_grad():
        eager = tiny.encode_video(video)
        compiled = torch.compile(tiny.encode_video, fullgraph=False, backend="aot_eager")(video)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compiled_frozen_clip_matches_eager():
    """FrozenCLIP.compile_forward (the train_step benchmark's --compile-frozen): the same tapped tokens as eager."""
    torch.manual_seed(0)
    clip = build_clip(DiSTConfig.from_name("dist_tiny"))  # its own: compiling mutates it
    # An input that asks for a gradient: the tower's tokens must still come without one (its own no_grad).
    frames = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)).requires_grad_()
    taps, stop = {0, clip.num_blocks - 1}, clip.num_blocks - 1
    eager = clip.forward_tokens(frames, taps, stop)
    clip.compile_forward()
    compiled = clip.forward_tokens(frames, taps, stop)
    assert compiled.keys() == eager.keys()
    for block, tokens in eager.items():
        torch.testing.assert_close(compiled[block], tokens, rtol=1e-4, atol=1e-4)
    assert not compiled[stop].requires_grad  # still under no_grad


def test_each_pass_is_one_cuda_graph_iteration_when_a_part_runs_as_cuda_graphs(tiny_clip, monkeypatch):
    """Compiled in a CUDA-graph mode, the frozen CLIP and the branch are two graphs and the branch reads the first's
    outputs: torch would take the branch's call for a new iteration and reclaim them. Each pass (train, validation,
    zero-shot) marks one iteration, before the frozen forward; eager and plain-compiled models mark nothing."""
    import copy

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(len(marks)))
    video, names = tiny_video(), ["a", "b", "c"]

    def passes(model) -> int:
        marks.clear()
        with torch.compiler.set_stance("force_eager"):  # the marks, not the compilation, are under test
            model(video, names)
            model.encode_video(video)
            model(video, names, zero_shot_fusion=True)
        return len(marks)

    eager = build_dist("dist_tiny", clip=copy.deepcopy(tiny_clip))
    assert passes(eager) == 0
    eager.compile_trainable()  # compiled, no CUDA graphs
    eager.clip.compile_forward("max-autotune-no-cudagraphs")
    assert passes(eager) == 0
    for part in ("frozen", "branch"):
        model = build_dist("dist_tiny", clip=copy.deepcopy(tiny_clip))
        if part == "frozen":
            model.clip.compile_forward("reduce-overhead")
        else:
            model.compile_trainable("max-autotune")  # captures CUDA graphs too
        assert passes(model) == 3, part


# --- an independent transcription of the authors' sequence-first forward (reference §2.3-2.5) ---
def _authors_forward(model, video: torch.Tensor) -> torch.Tensor:
    """Written from the spec in the authors' (N+1, B*T, C) layout with torch's own nn.MultiheadAttention."""
    cfg, net = model.cfg, model.dist_net
    b, gamma, t = video.shape[0], cfg.sparse_ratio, cfg.sparse_frames
    g = cfg.image_size // cfg.patch_size
    n1, d, dt = g * g + 1, cfg.integration_dim, cfg.temporal_dim
    sparse = video[:, :, ::gamma].permute(0, 2, 1, 3, 4).reshape(b * t, 3, cfg.image_size, cfg.image_size)
    feats = model.clip.forward_tokens(sparse, taps=set(cfg.layers) | {cfg.head_cls_layer}, stop=cfg.head_cls_layer)
    x = {k: v.transpose(0, 1) for k, v in feats.items()}  # (N+1, B*T, C)

    z = net.temporal_stem(video)
    r = 0
    for k, layer in enumerate(cfg.layers):
        tb = net.temporal_nets[k]
        zz = tb.ln(z.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        z = quick_gelu(z + tb.temporal_net.c_fc2(quick_gelu(tb.temporal_net.c_fc1(zz))))
        y = net.input_linears[k](x[layer]) + r
        z_new = None
        if k < len(cfg.layers) - 1:
            m = net.integration2temporal_nets[k].linear_fuse(y[1:])  # (N, B*T, Dt)
            m = m.permute(1, 2, 0).reshape(b, t, dt, g, g).permute(0, 2, 1, 3, 4)
            z_new = z + F.interpolate(m, scale_factor=(gamma, 1, 1), mode="nearest")
        t2i = net.temporal2integration_nets[k]
        s = t2i.linear_fuse(z).flatten(3).permute(3, 0, 2, 1)  # (N, B, T, D)
        s = torch.cat([t2i.cls_token.expand(1, b, t, d), s], 0).reshape(n1, b * t, d)
        y = y + s
        z = z_new
        ib = net.integration_nets[k]
        ffn = ib.ffn.c_proj(quick_gelu(ib.ffn.c_fc(ib.ln(y))))
        u = ib.ln_temporal(y).reshape(n1, b, t, d).permute(1, 3, 2, 0).unsqueeze(-1)  # (B, D, T, N+1, 1)
        tf = ib.temporal_ffn
        u = tf.c_proj(quick_gelu(tf.c_fc2(tf.c_fc1(u))))
        r = ffn + u.squeeze(-1).permute(3, 0, 2, 1).reshape(n1, b * t, d)
    feat = r + y

    def mha(attn_module):
        ref = nn.MultiheadAttention(d, d // cfg.head_dim)
        ref.load_state_dict(attn_module.state_dict())
        return ref

    q_s = net.aggregated_spatial_cls_token.expand(1, b * t, d)
    q_v = net.aggregated_cls_token.expand(1, b, d)
    for pool in net.adapooling_nets:
        ln, attn = pool.spatial_transformer.ln_1, mha(pool.spatial_transformer.attn)
        q_s = q_s + attn(ln(q_s), ln(feat), ln(feat), need_weights=False)[0]
        mlp = pool.output_map_spatial_cls_token
        q_s = q_s + mlp.c_proj(quick_gelu(mlp.c_fc(pool.ln_out_spat_cls_token(q_s))))
        f = (q_s.reshape(b, t, d) + pool.positional_embedding).permute(1, 0, 2)  # (T, B, D)
        ln, attn = pool.temporal_transformer.ln_1, mha(pool.temporal_transformer.attn)
        q_v = q_v + attn(ln(q_v), ln(f), ln(f), need_weights=False)[0]
        mlp = pool.output_map_cls_token
        q_v = q_v + mlp.c_proj(quick_gelu(mlp.c_fc(pool.ln_out_temp_cls_token(q_v))))
    cls = x[cfg.head_cls_layer][0].reshape(b, t, -1).mean(1)
    return net.ln_post(q_v[0] + net.proj_spatial_cls_token(cls)) @ net.proj


@pytest.mark.parametrize("overrides", [{}, {"fusion_layers": "every2"}, {"num_frames": 12, "sparse_ratio": 3}])
def test_matches_transcription_of_authors_forward(tiny_clip, overrides):
    torch.manual_seed(3)
    model = build_dist(DiSTConfig.from_name("dist_tiny", pooling_layers=2, **overrides), clip=tiny_clip).eval()
    video = torch.randn(2, 3, model.cfg.num_frames, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_video(video), _authors_forward(model, video), rtol=1e-4, atol=1e-5)


def test_quick_gelu_custom_backward_matches_autograd():
    from dist_model.layers import quick_gelu

    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(quick_gelu, (x,))
    y = x.detach().clone().requires_grad_(True)
    (y * torch.sigmoid(1.702 * y)).sum().backward()
    x.grad = None
    quick_gelu(x).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_temporal_conv_channels_last_matches_conv3d(k):
    from dist_model.layers import temporal_conv_channels_last

    torch.manual_seed(4)
    conv = nn.Conv3d(6, 10, (k, 1, 1), padding=(k // 2, 0, 0)).double()
    x = torch.randn(2, 6, 7, 5, 3, dtype=torch.float64, requires_grad=True)  # (B, C, T, H, W)
    expected = conv(x)
    got = temporal_conv_channels_last(x.permute(0, 2, 3, 4, 1), conv).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(expected.square().sum(), (x, conv.weight, conv.bias))
    torch.testing.assert_close(torch.autograd.grad(got.square().sum(), (x, conv.weight, conv.bias)), grads)
    with pytest.raises(ValueError, match="temporal conv"):
        temporal_conv_channels_last(x, nn.Conv3d(6, 6, (3, 1, 1)))  # no padding: not a 'same' conv


def test_bf16_autocast_keeps_the_integration_stream_in_bf16(tiny):
    """A float32 learned token joining the bf16 stream would promote every integration token to float32 (twice the
    saved activations, a cast before every matmul)."""
    seen = []
    tiny.dist_net.integration_nets[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiny(tiny_video(), ["a", "b"]).float().sum().backward()
    assert seen == [torch.bfloat16]
    assert all(p.grad.dtype == torch.float32 for p in tiny.dist_net.parameters() if p.grad is not None)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_linears_match_the_plain_ops_and_store_less(with_bias):
    """layer_norm_linear / quick_gelu_linear: same values and gradients as the unfused ops (float64), and they store
    only their input for the backward, not the normalised tokens or the activation as well."""
    from dist_model.layers import layer_norm_linear, quick_gelu_linear

    torch.manual_seed(5)
    norm = nn.LayerNorm(12).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    weight = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True) if with_bias else None
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    leaves = [x, weight, norm.weight, norm.bias] + ([bias] if with_bias else [])
    cases = [
        (lambda: layer_norm_linear(x, norm, weight, bias), lambda: F.linear(norm(x), weight, bias)),
        (lambda: quick_gelu_linear(x, weight, bias), lambda: F.linear(quick_gelu(x), weight, bias)),
    ]
    for fused, plain in cases:
        stored: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, out=stored: out.append(t.numel()) or t, lambda t: t):
            got = fused()
        expected = plain()
        torch.testing.assert_close(got, expected)
        used = [t for t in leaves if t is not norm.weight and t is not norm.bias] if fused is cases[1][0] else leaves
        torch.testing.assert_close(torch.autograd.grad(got.square().sum(), used),
                                   torch.autograd.grad(expected.square().sum(), used))
        # x, the weights, LayerNorm's per-token statistics; no second (3, 5, 12) tensor (the plain ops store two)
        assert sum(n == x.numel() for n in stored) == 1, stored


def test_fused_linears_under_bf16_autocast_follow_autocast():
    from dist_model.layers import layer_norm_linear, quick_gelu_linear

    torch.manual_seed(6)
    norm = nn.LayerNorm(16)
    linear = nn.Linear(16, 8)
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    for fused, plain in [
        (lambda: layer_norm_linear(x, norm, linear.weight, linear.bias), lambda: linear(norm(x))),
        (lambda: quick_gelu_linear(x, linear.weight, linear.bias), lambda: linear(quick_gelu(x))),
    ]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, expected = fused(), plain()
        assert got.dtype == expected.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
        grads = torch.autograd.grad(got.float().sum(), (x, linear.weight, linear.bias))
        ref = torch.autograd.grad(expected.float().sum(), (x, linear.weight, linear.bias))
        assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
        for g, r in zip(grads, ref, strict=True):
            torch.testing.assert_close(g.float(), r.float(), atol=5e-2, rtol=5e-2)
