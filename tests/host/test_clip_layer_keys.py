"""The caches are keyed by the layer the CLIP really encodes with: CLIP Set Last Layer variants of one CLIP get their
own prior Gram matrix and result-cache key, the same variant hits, and a CLIP's own patches count."""

from __future__ import annotations

import sys

import pytest
import torch

PROMPTS = ["a house", "a tree"]


@pytest.fixture
def mods(comfy):
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["ApplyErasedModel"]
    pkg = sys.modules[node.__module__].__package__
    return sys.modules[pkg + ".comfy_backbone"], sys.modules[pkg.rsplit(".", 1)[0] + ".erasure.prior"]


def _last_layer(comfy, clip, layer: int):
    with torch.inference_mode():
        return comfy["nodes"].CLIPSetLastLayer().set_last_layer(clip, layer)[0]


def test_prior_gram_is_keyed_by_the_clip_layer(comfy, loaded, mods, tmp_path, monkeypatch):
    cb, prior = mods
    model, clip, _ = loaded
    skip1, skip2 = _last_layer(comfy, clip, -1), _last_layer(comfy, clip, -2)
    assert cb.clip_layers(clip) == cb.clip_layers(skip1) == [["last", None]]  # -1 on SD1.x: the same output
    assert cb.clip_layers(skip2) == [["hidden", 10]]
    assert cb.clip_layers(_last_layer(comfy, clip, -24)) == [["last", None]]  # beyond the depth: the last layer
    with torch.inference_mode():
        g1 = prior.gram(cb.ComfyBackbone(model, skip1), PROMPTS, tmp_path)
        g2 = prior.gram(cb.ComfyBackbone(model, skip2), PROMPTS, tmp_path)
    assert len(list((tmp_path / "gram").glob("*.safetensors"))) == 2  # one entry per layer
    assert not torch.allclose(g1, g2)

    def refuse(*a, **kw):
        raise AssertionError("the cached Gram matrix was not used")

    monkeypatch.setattr(prior, "token_embeddings", refuse)
    with torch.inference_mode():
        assert torch.equal(prior.gram(cb.ComfyBackbone(model, _last_layer(comfy, clip, -2)), PROMPTS, tmp_path), g2)
        assert torch.equal(prior.gram(cb.ComfyBackbone(model, clip), PROMPTS, tmp_path), g1)


def test_prior_key_counts_the_clips_own_patches(comfy, loaded, mods):
    """Clones share the text encoder module: the key must hash this CLIP's patched weights, whichever clone ran
    last."""
    cb, prior = mods
    model, clip, _ = loaded
    name = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    w = clip.cond_stage_model.state_dict()[name]
    patched = clip.clone()
    assert patched.add_patches({name: ("diff", (torch.full_like(w, 1e-2),))}, 1.0) == [name]
    with torch.inference_mode():
        plain_key = prior.text_encoder_hash(cb.ComfyBackbone(model, clip))
        patched_key = prior.text_encoder_hash(cb.ComfyBackbone(model, patched))
        assert plain_key != patched_key
        assert prior.text_encoder_hash(cb.ComfyBackbone(model, clip)) == plain_key


def test_result_cache_key_follows_the_clip_layer(comfy, loaded, mods):
    cb, _ = mods
    rc = sys.modules[cb.__package__ + ".result_cache"]
    model, clip, _ = loaded

    def key(c):
        bb = cb.ComfyBackbone(model, c)
        bb.load()
        with torch.inference_mode():
            return rc.result_key("ant", bb, {"concept": "cat"})

    default, skip2 = key(clip), key(_last_layer(comfy, clip, -2))
    assert default != skip2
    assert key(_last_layer(comfy, clip, -1)) == default
