"""SD2.x in a real ComfyUI: a tiny SD2-layout checkpoint through CheckpointLoaderSimple, epsilon and v-prediction
(the latter via the stock ModelSamplingDiscrete node, as users run v-prediction models), erased with ANT and MACE."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from .test_pack import FAST_ANT, _out, _unet_out

#: an OpenCLIP-H prompt costs ~1.5 s on one CPU core: no synonyms (half the prompts); refreshing is tested on SD1.5
SD2_ANT = FAST_ANT | {"synonyms": "", "refresh_every": 0}


@pytest.fixture(scope="session")
def sd2(comfy):
    """(MODEL, CLIP, VAE, checkpoint name) of the tiny SD2 checkpoint, loaded as a prompt would."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_checkpoint import build_tiny_sd2

    name = build_tiny_sd2(comfy["root"] / "checkpoints" / "tiny-sd2.safetensors").name
    with torch.inference_mode():
        model, clip, vae = comfy["nodes"].CheckpointLoaderSimple().load_checkpoint(name)[:3]
    return model, clip, vae, name


def _variant(comfy, model, prediction: str):
    """The model as sampled with ``prediction``: "v" goes through the stock ModelSamplingDiscrete node."""
    if prediction == "eps":
        return model
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]()
    with torch.inference_mode():
        return node.patch(model, "v_prediction", False)[0]


def _backbone(comfy, model, clip):
    mod = sys.modules[comfy["nodes"].NODE_CLASS_MAPPINGS["EraseConceptANT"].__module__]
    return mod.ComfyBackbone(model, clip)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_tiny_sd2_is_detected_and_adapted(comfy, sd2, prediction):
    model, clip, _, _ = sd2
    m = _variant(comfy, model, prediction)
    assert type(m.model.model_config).__name__ == "SD20"
    bb = _backbone(comfy, m, clip)
    assert bb.family == "SD2.x" and bb.v_prediction == (prediction == "v")
    assert bb.encode_text(["a cat", "a dog in a park"]).embeds.shape == (2, 77, 1024)
    # OpenCLIP pads with 0, not with the end token: the word is still found
    assert bb.token_positions("a cat in a park", "cat") == [2]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_noise_prediction_matches_comfyui_denoiser(comfy, sd2, prediction):
    """The adapter's epsilon (v converted to eps) against the noise implied by ComfyUI's own denoiser
    (``apply_model``: input scaling, timestep mapping and ``calculate_denoised`` of the MODEL's sampling object)."""
    from comfy import model_management

    model, clip, _, _ = sd2
    m = _variant(comfy, model, prediction)
    bb = _backbone(comfy, m, clip)
    bb.load()  # applies this patcher's object patches (the v-prediction sampling) to the shared model
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    cond = bb.encode_text(["a cat", "a house"])
    t = torch.tensor([300, 700])
    sampling = m.get_model_object("model_sampling")
    sigma = sampling.sigmas[t].float()
    x = x0 + sigma.view(-1, 1, 1, 1) * eps  # ComfyUI's (variance-exploding) latent for these sigmas
    with torch.inference_mode():
        denoised = m.model.apply_model(x, sigma, c_crossattn=cond.embeds.float()).float()
        x_t = x / (1 + sigma**2).sqrt().view(-1, 1, 1, 1)  # the library's variance-preserving latent
        ours = bb.predict_noise(x_t, t, cond).float()
        raw = bb.unet()(x_t, timesteps=t.float(), context=cond.embeds).float()
    comfy_eps = (x - denoised) / sigma.view(-1, 1, 1, 1)
    assert torch.allclose(ours, comfy_eps, atol=1e-3, rtol=1e-3), float((ours - comfy_eps).abs().max())
    assert (prediction == "v") == (not torch.allclose(raw, comfy_eps, atol=1e-3, rtol=1e-3)), \
        "the test cannot tell epsilon from v-prediction"
    model_management.load_models_gpu([model], force_full_load=True)  # put the plain sampling back


def _check(comfy, model, clip, erased, lora, before: torch.Tensor, filename: str) -> None:
    """The erasure changed the MODEL output, the input is bit-identical, and the saved LoRA file gives the same UNet
    output through ComfyUI's stock LoraLoader."""
    nodes = comfy["nodes"]
    edited = _unet_out(erased)
    assert not torch.allclose(edited, before), "the erasure did nothing"
    assert torch.equal(_unet_out(model), before), "the input MODEL changed (TRAP 1)"
    nodes.NODE_CLASS_MAPPINGS["SaveErasureLoRA"].execute(lora=lora, filename=filename, overwrite=True)
    with torch.inference_mode():
        stock, _ = nodes.LoraLoader().load_lora(model, clip, f"{filename}.safetensors", 1.0, 0.0)
    assert torch.allclose(_unet_out(stock), edited, atol=1e-4, rtol=1e-3)
    assert torch.equal(_unet_out(model), before)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ant_on_sd2(comfy, sd2, prediction, monkeypatch):
    model, clip, _, _ = sd2
    m = _variant(comfy, model, prediction)
    before = _unet_out(m)
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["EraseConceptANT"]
    # 4 preservation prompts stand in for the 64 of the prior set (64 OpenCLIP-H encodings: ~90 s on one core)
    prompts = sys.modules[sys.modules[node.__module__].prior_prompts.__module__]
    monkeypatch.setattr(prompts, "prior_prompts", lambda n=4, exclude=(), **kw: ["a house", "a tree", "a man", "a car"])
    with torch.inference_mode():
        r = node.execute(model=m, clip=clip, **SD2_ANT)
    erased, lora = _out(r, 0), _out(r, 1)
    assert lora.metadata["erasure.base_family"] == "SD2.x"
    _check(comfy, m, clip, erased, lora, before, f"sd2-{prediction}-ant")


def test_mace_on_sd2(comfy, sd2, tmp_path, monkeypatch):
    model, clip, _, _ = sd2
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["MassEraseMACE"]
    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    mod = sys.modules[node.__module__]
    monkeypatch.setattr(mod, "prior_prompts", lambda exclude=(), **kw: ["a house", "a tree", "a man", "a car"])
    before = _unet_out(model)
    with torch.inference_mode():
        r = node.execute(model=model, clip=clip, concepts="cat", preset="object", lora_steps=2, resolution=64, seed=0)
    _check(comfy, model, clip, _out(r, 0), _out(r, 1), before, "sd2-mace")
