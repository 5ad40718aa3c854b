"""The optional on-disk result cache of the erasure nodes (``cache_result``): a hit skips training and gives the same
result; any change of model patches, settings or user masks misses; a corrupt entry is deleted and rebuilt."""

from __future__ import annotations

import sys

import pytest
import torch

from .test_mace_images import FAST_MACE, _images
from .test_pack import FAST_ANT, _out, _unet_out, ant_settings

CHEAP_ANT = FAST_ANT | {"synonyms": ""}


class Trained(Exception):
    """Raised instead of training: the node did not use the cache."""


@pytest.fixture
def ant_node(comfy, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["EraseConceptANTv2"]
    return node, sys.modules[node.__module__], tmp_path / "erasure-cache"


def _run(node, model, clip, cache_result=False, **settings):
    """The erase node with CHEAP_ANT; ``settings`` go to its ANT Settings node."""
    import nodes

    with torch.inference_mode():
        r = node.execute(model=model, clip=clip, **CHEAP_ANT, cache_result=cache_result,
                         settings=ant_settings({"nodes": nodes}, refresh_every=0, **settings))
    return _out(r, 0), _out(r, 1)


def _forbid(monkeypatch, mod, name: str) -> None:
    def refuse(*a, **kw):
        raise Trained(name)

    monkeypatch.setattr(mod, name, refuse)


def test_ant_cache_hits_misses_and_rebuilds(comfy, loaded, ant_node, monkeypatch):
    node, mod, folder = ant_node
    model, clip, _ = loaded
    for n in (node, comfy["nodes"].NODE_CLASS_MAPPINGS["MassEraseMACEv2"]):  # off by default
        assert n.INPUT_TYPES()["optional"]["cache_result"][1]["default"] is False
    erased, lora = _run(node, model, clip, cache_result=True)
    files = list(folder.glob("*.safetensors"))
    assert len(files) == 1
    real_ant = mod.ant
    _forbid(monkeypatch, mod, "ant")
    again_model, again = _run(node, model, clip, cache_result=True)  # a hit: no training
    assert again.keys() == lora.keys() and all(torch.equal(again[k], lora[k]) for k in lora)
    assert torch.equal(_unet_out(again_model), _unet_out(erased))
    assert again.metadata == lora.metadata
    with pytest.raises(Trained):  # another setting
        _run(node, model, clip, cache_result=True, learning_rate=2e-3)
    with torch.inference_mode():  # the same checkpoint with a patch on it (here: the erasure itself, half strength)
        patched = _out(comfy["nodes"].NODE_CLASS_MAPPINGS["LoraModelLoader"].execute(model, lora, 0.5), 0)
    with pytest.raises(Trained):
        _run(node, patched, clip, cache_result=True)
    # a damaged entry is noticed, deleted and trained again
    data = bytearray(files[0].read_bytes())
    data[-100] ^= 0xFF
    files[0].write_bytes(bytes(data))
    with pytest.raises(Trained):
        _run(node, model, clip, cache_result=True)
    assert not files[0].exists()
    monkeypatch.setattr(mod, "ant", real_ant)
    _run(node, model, clip, cache_result=True)
    assert files[0].exists()
    _forbid(monkeypatch, mod, "ant")
    _run(node, model, clip, cache_result=True)


def test_mace_cache_keys_on_the_user_masks(comfy, loaded, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path / "prior"))
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["MassEraseMACEv2"]
    mod = sys.modules[node.__module__]
    monkeypatch.setattr(mod, "prior_prompts", lambda exclude=(), **kw: ["a house", "a tree", "a man", "a car"])
    model, clip, vae = loaded
    latents = _images(vae, 2)
    full, half = torch.ones(2, 64, 64), torch.ones(2, 64, 64)
    half[:, 32:] = 0

    def run(masks):
        with torch.inference_mode():
            return _out(node.execute(model=model, clip=clip, concepts="cat", latents=latents, masks=masks,
                                     cache_result=True, **FAST_MACE), 1)

    first = run(full)
    assert len(list((tmp_path / "erasure-cache").glob("*.safetensors"))) == 1
    _forbid(monkeypatch, mod, "mace")
    assert all(torch.equal(run(full)[k], first[k]) for k in first)
    with pytest.raises(Trained):
        run(half)
