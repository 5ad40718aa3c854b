"""SDXL in a real ComfyUI: a tiny SDXL-layout checkpoint (SDXL's transformer depths at 320 channels, full CLIP-L and
OpenCLIP bigG) through CheckpointLoaderSimple: the adapter's pooled-text + size conditioning, its noise prediction
against ComfyUI's denoiser (epsilon and v-prediction), and an ANT erasure whose LoRA loads in the stock LoraLoader."""

from __future__ import annotations

import pytest

from .families import backbone, cheap_text, check_noise_matches_comfy, load_tiny, run_ant, variant


@pytest.fixture(scope="module")
def sdxl(comfy):
    """(MODEL, CLIP, VAE) of the tiny SDXL checkpoint (a 2 GB file, built in ~25 s, unloaded after this module)."""
    yield from load_tiny(comfy, "build_tiny_sdxl", "tiny-sdxl.safetensors")


def test_tiny_sdxl_is_detected_and_adapted(comfy, sdxl):
    model, clip, _ = sdxl
    assert type(model.model.model_config).__name__ == "SDXL"
    bb = backbone(comfy, variant(comfy, model, "eps"), clip)
    assert bb.family == "SDXL" and not bb.v_prediction
    cond = bb.encode_text(["a cat", "a dog in a park"])
    assert cond.embeds.shape == (2, 77, 2048) and cond.extras["y"].shape == (2, 2816)
    assert bb.token_positions("a cat in a park", "cat") == [2]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_noise_prediction_matches_comfyui_denoiser(comfy, sdxl, prediction):
    model, clip, _ = sdxl
    check_noise_matches_comfy(comfy, model, clip, prediction)


def test_ant_on_sdxl(comfy, sdxl, monkeypatch):
    """Cross-attention scope: its dense edit exports exactly (the saliency scope's, over 256 MB here, would be a
    rank-64 SVD taking ~35 s; the truncated export is host-independent and tested in the library suite)."""
    cheap_text(comfy, monkeypatch)
    model, clip, _ = sdxl
    run_ant(comfy, model, clip, "eps", "SDXL", scope="xattn")
