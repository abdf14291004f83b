"""CLIP weights from a local file give exactly the tower their pretrained tag gives: the activation (QuickGELU for
OpenAI's weights, GELU for LAION-style open_clip weights) is read from what is known, never guessed.

The tag cannot be downloaded here, so "the tag's tower" is what open_clip builds for the `openai` tag: the
architecture with force_quick_gelu, loaded in-process with the same random weights that the test writes to a file.
"""

from __future__ import annotations

import json
import logging
import warnings

import open_clip
import pytest
import torch

from dist_model import DiSTConfig, build_clip
from dist_model.config import register_clip_configs
from dist_model.spatial import FrozenCLIP, resolve_clip_activation

ARCH = "DiST-Tiny-CLIP"


def _open_clip_model(quick_gelu: bool, seed: int) -> torch.nn.Module:
    register_clip_configs()
    torch.manual_seed(seed)
    kwargs = {"force_quick_gelu": True} if quick_gelu else {}
    return open_clip.create_model(ARCH, **kwargs).eval()


def _weights(quick_gelu: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random CLIP weights (the activation only decides which tower they are meant for; the tensors are the same)."""
    return {k: v.clone() for k, v in _open_clip_model(quick_gelu, seed).state_dict().items()}


def _reference_tower(weights: dict[str, torch.Tensor], quick_gelu: bool) -> torch.nn.Module:
    """The tower the tag builds (openai: QuickGELU), holding `weights`, built in-process."""
    model = _open_clip_model(quick_gelu, seed=123)  # other random init: every value must come from `weights`
    model.load_state_dict(weights)
    return model.requires_grad_(False)  # frozen like FrozenCLIP (attention then takes the same inference path)


@torch.no_grad()
def _tower_outputs(model: torch.nn.Module, frames: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every block's image tokens, CLIP's image embedding and its text embeddings, straight from open_clip."""
    visual = model.visual
    x = visual._embeds(frames)
    out = {}
    for index, block in enumerate(visual.transformer.resblocks):
        x = block(x)
        out[f"block{index}"] = x
    pooled, _ = visual._pool(x)
    out["image"] = pooled @ visual.proj
    out["text"] = model.encode_text(tokens)
    return out


@torch.no_grad()
def _frozen_outputs(clip: FrozenCLIP, frames: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same outputs through DiST's FrozenCLIP."""
    top = clip.num_blocks - 1
    feats = clip.forward_tokens(frames, range(clip.num_blocks), stop=top)
    out = {f"block{i}": feats[i] for i in range(clip.num_blocks)}
    out["image"] = clip.image_embedding(feats[top])
    out["text"] = clip.encode_text(tokens)
    return out


def _assert_same_tower(clip: FrozenCLIP, reference: torch.nn.Module) -> None:
    torch.manual_seed(7)
    frames = torch.randn(3, 3, 32, 32)
    tokens = clip.tokenizer(["massaging person's head", "juggling"])
    got, want = _frozen_outputs(clip, frames, tokens), _tower_outputs(reference, frames, tokens)
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs from the reference tower"


def _openai_jit_archive(weights: dict[str, torch.Tensor], path, quick_gelu: bool = True) -> None:
    """A TorchScript archive laid out like OpenAI's ViT-B-16.pt: the CLIP module itself, QuickGELU in its blocks,
    and OpenAI's input_resolution / context_length / vocab_size entries in its state dict."""
    model = _open_clip_model(quick_gelu, seed=1)
    model.load_state_dict(weights)
    for name, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 49408)):
        if hasattr(model, name):  # open_clip keeps the last two as plain ints; OpenAI's archive has them as tensors
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated, but it is how such archives are made
        torch.jit.save(torch.jit.script(model), str(path))


def _openai_state_dict(weights: dict[str, torch.Tensor], path) -> None:
    """OpenAI's JIT archive's state_dict saved as a plain file (its export entries included)."""
    state = dict(weights)
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16), vocab_size=torch.tensor(49408))
    torch.save(state, path)


def _hf_snapshot(weights: dict[str, torch.Tensor], folder, quick_gelu: bool) -> str:
    """A Hugging Face snapshot in open_clip's layout: open_clip_config.json beside open_clip_pytorch_model.bin."""
    folder.mkdir()
    model_cfg = open_clip.get_model_config(ARCH)
    if quick_gelu:
        model_cfg["quick_gelu"] = True  # what open_clip's push_to_hf_hub writes for the openai weights
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    torch.save(weights, folder / "open_clip_pytorch_model.bin")
    return str(folder / "open_clip_pytorch_model.bin")


@pytest.mark.parametrize("layout", ["jit_archive", "openai_state_dict", "hf_snapshot"])
def test_openai_weights_from_a_file_build_the_same_tower_as_the_tag(tmp_path, layout):
    """The regression: a file used to build nn.GELU (or fail to load) where the `openai` tag builds QuickGELU."""
    weights = _weights(quick_gelu=True)
    path = tmp_path / "ViT-B-16.pt"
    if layout == "jit_archive":
        _openai_jit_archive(weights, path)
    elif layout == "openai_state_dict":
        _openai_state_dict(weights, path)
    else:
        path = _hf_snapshot(weights, tmp_path / "snapshot", quick_gelu=True)
    clip = build_clip(DiSTConfig.from_name("dist_tiny", clip_pretrained=str(path)))  # clip_activation: auto
    _assert_same_tower(clip, _reference_tower(weights, quick_gelu=True))
    assert clip.activation == "quick_gelu" and str(tmp_path) in clip.activation_source  # says which file


def test_gelu_weights_from_a_file_keep_gelu(tmp_path):
    """A GELU-trained open_clip checkpoint (LAION-style) is never turned into QuickGELU."""
    weights = _weights(quick_gelu=False)
    reference = _reference_tower(weights, quick_gelu=False)
    snapshot = _hf_snapshot(weights, tmp_path / "laion", quick_gelu=False)  # its config records no quick_gelu
    clip = build_clip(DiSTConfig.from_name("dist_tiny", clip_pretrained=snapshot))
    assert clip.activation == "gelu"
    _assert_same_tower(clip, reference)
    archive = tmp_path / "gelu_scripted.pt"  # an open_clip GELU model saved as a TorchScript archive
    _openai_jit_archive(weights, archive, quick_gelu=False)
    clip = build_clip(DiSTConfig.from_name("dist_tiny", clip_pretrained=str(archive)))
    assert clip.activation == "gelu"
    _assert_same_tower(clip, reference)
    with pytest.raises(ValueError, match="contradicts"):  # an explicit choice must agree with what the file says
        build_clip(DiSTConfig.from_name("dist_tiny", clip_pretrained=str(archive), clip_activation="quick_gelu"))


def test_a_plain_state_dict_needs_an_explicit_activation(tmp_path):
    """A plain CLIP state dict has the same keys and shapes with either activation: "auto" must refuse, not guess;
    an explicit clip_activation then builds exactly that tower."""
    weights = _weights(quick_gelu=True)
    assert set(weights) == set(_weights(quick_gelu=False))  # nothing in the keys tells the two apart
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(weights, path)
    with pytest.raises(ValueError, match="cannot tell which activation.*clip_activation: quick_gelu"):
        build_clip(DiSTConfig.from_name("dist_tiny", clip_pretrained=str(path)))
    for activation, quick in (("quick_gelu", True), ("gelu", False)):
        clip = build_clip(DiSTConfig.from_name("dist_tiny", clip_pretrained=str(path), clip_activation=activation))
        assert clip.activation == activation and clip.activation_source == f"clip_activation: {activation}"
        _assert_same_tower(clip, _reference_tower(weights, quick_gelu=quick))


def test_the_activation_follows_tags_and_architectures_without_downloading():
    assert resolve_clip_activation("ViT-B-16", "openai")[0] == "quick_gelu"
    assert resolve_clip_activation("ViT-B-16", "laion2b_s34b_b88k")[0] == "gelu"
    assert resolve_clip_activation("ViT-B-16-quickgelu", None)[0] == "quick_gelu"
    assert resolve_clip_activation("ViT-B-16", None)[0] == "gelu"  # random init: open_clip's default
    assert resolve_clip_activation("ViT-L-14", "openai", "quick_gelu")[0] == "quick_gelu"
    with pytest.raises(ValueError, match="contradicts.*'openai'"):
        DiSTConfig.from_name("dist_b16_k400", clip_pretrained="openai", clip_activation="gelu")
    with pytest.raises(ValueError, match="contradicts.*ViT-B-16-quickgelu"):
        DiSTConfig(clip_arch="ViT-B-16-quickgelu", clip_activation="gelu")
    with pytest.raises(ValueError, match="clip_activation must be one of auto, quick_gelu, gelu"):
        DiSTConfig.from_name("dist_tiny", clip_activation="relu")


def test_random_init_honours_an_explicit_activation():
    assert build_clip(DiSTConfig.from_name("dist_tiny")).activation == "gelu"
    clip = build_clip(DiSTConfig.from_name("dist_tiny", clip_activation="quick_gelu"))
    assert {type(b.mlp.gelu).__name__ for b in clip.model.visual.transformer.resblocks} == {"QuickGELU"}


def test_unreadable_and_other_architecture_files_say_what_is_wrong(tmp_path):
    """Not a checkpoint at all (random bytes, an empty file, a truncated download): named as such, never torch's
    advice to load with weights_only=False. Another CLIP's weights: how many keys and shapes differ, with examples,
    not a list of hundreds of names. check_clip_weights (what the training drivers run before Ray) raises the same."""
    from dist_model.spatial import check_clip_weights

    full = tmp_path / "clip.pt"
    torch.save(_weights(quick_gelu=False), full)
    for name, data in (("random.pt", bytes(range(256)) * 64), ("empty.pt", b""),
                       ("truncated.pt", full.read_bytes()[: full.stat().st_size // 2])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name} is not a PyTorch file.*truncated download") as info:
            check_clip_weights(ARCH, str(tmp_path / name), "gelu")
        assert "weights_only" not in str(info.value)
    register_clip_configs()
    other = tmp_path / "small.pt"  # DiST-Small-CLIP: wider, deeper
    torch.save(open_clip.create_model("DiST-Small-CLIP").state_dict(), other)
    with pytest.raises(RuntimeError, match=r"the CLIP weights in .*small.pt do not fit DiST-Tiny-CLIP: \d+ unexpected "
                                           r"key\(s\) \(e\.g\. .*\); \d+ tensor\(s\) of another shape \(e\.g\. .*: "
                                           r"\[\d+.*\] in the file, \[\d+.*\] here\)"):
        check_clip_weights(ARCH, str(other), "gelu")
    partial = tmp_path / "partial.pt"  # the right architecture, two tensors short
    torch.save({k: v for k, v in _weights(quick_gelu=False).items() if k not in ("visual.proj", "logit_scale")},
               partial)
    with pytest.raises(RuntimeError, match=r"partial.pt do not fit DiST-Tiny-CLIP: 2 missing key\(s\) \(e\.g\. "
                                           r"(visual.proj, logit_scale|logit_scale, visual.proj)\)\. Use the file"):
        check_clip_weights(ARCH, str(partial), "gelu")
    check_clip_weights(ARCH, str(full), "gelu")  # the right file passes
    check_clip_weights("ViT-B-16", "openai")  # a tag is not fetched here
    with pytest.raises(RuntimeError, match="neither a pretrained tag of ViT-B-16"):
        check_clip_weights("ViT-B-16", "opnai")


def test_a_random_init_or_a_loaded_file_logs_no_random_init_warning(tmp_path, caplog):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" whenever it gets no tag, also where the
    weights are loaded right after (OpenAI's exported files): it is kept out of the log."""
    path = tmp_path / "openai_state.pt"
    _openai_state_dict(_weights(quick_gelu=True), path)  # the test's own open_clip call warns: not counted
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build_clip(DiSTConfig.from_name("dist_tiny"))
        build_clip(DiSTConfig.from_name("dist_tiny", clip_pretrained=str(path)))
    assert "No pretrained weights loaded" not in caplog.text
    assert "random init" in caplog.text  # FrozenCLIP's own line says when the init is random
