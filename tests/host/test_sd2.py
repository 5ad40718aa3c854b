"""SD2.x in a real ComfyUI: a tiny SD2-layout checkpoint (OpenCLIP-H text encoder) through CheckpointLoaderSimple,
epsilon and v-prediction, erased with ANT and MACE."""

from __future__ import annotations

import sys

import pytest
import torch

from .families import backbone, cheap_text, check_erasure, check_noise_matches_comfy, load_tiny, run_ant, variant
from .test_pack import _out, _unet_out


@pytest.fixture(scope="module")
def sd2(comfy):
    """(MODEL, CLIP, VAE) of the tiny SD2 checkpoint."""
    yield from load_tiny(comfy, "build_tiny_sd2", "tiny-sd2.safetensors")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_tiny_sd2_is_detected_and_adapted(comfy, sd2, prediction):
    model, clip, _ = sd2
    m = variant(comfy, model, prediction)
    assert type(m.model.model_config).__name__ == "SD20"
    bb = backbone(comfy, m, clip)
    assert bb.family == "SD2.x" and bb.v_prediction == (prediction == "v")
    assert bb.encode_text(["a cat", "a dog in a park"]).embeds.shape == (2, 77, 1024)
    # OpenCLIP pads with 0, not with the end token: the word is found, and MACE suppresses the end token (index 6)
    assert bb.token_positions("a cat in a park", "cat") == [2]
    library = sys.modules[sys.modules[comfy["nodes"].NODE_CLASS_MAPPINGS["MassEraseMACEv2"].__module__].mace.__module__]
    assert library.suppressed_positions(bb, "a cat in a park", "cat") == [2, *range(6, 77)]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_noise_prediction_matches_comfyui_denoiser(comfy, sd2, prediction):
    model, clip, _ = sd2
    check_noise_matches_comfy(comfy, model, clip, prediction)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ant_on_sd2(comfy, sd2, prediction, monkeypatch):
    cheap_text(comfy, monkeypatch)
    model, clip, _ = sd2
    run_ant(comfy, model, clip, prediction, "SD2.x")


def test_mace_on_sd2(comfy, sd2, tmp_path, monkeypatch):
    cheap_text(comfy, monkeypatch)
    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    model, clip, _ = sd2
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["MassEraseMACE"]
    before = _unet_out(model)
    with torch.inference_mode():
        r = node.execute(model=model, clip=clip, concepts="cat", preset="object", lora_steps=2, resolution=64, seed=0)
    assert _out(r, 1).metadata["erasure.base_family"] == "SD2.x"
    check_erasure(comfy, model, clip, _out(r, 0), _out(r, 1), before, "sd2-mace")
