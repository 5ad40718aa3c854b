"""Helpers for the SD2.x and SDXL host tests: a tiny checkpoint of the family through CheckpointLoaderSimple, the
v-prediction variant through the stock ModelSamplingDiscrete node (how users run v-prediction models), the
adapter's noise prediction against ComfyUI's own denoiser, and the checks every erasure must pass."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .test_pack import FAST_ANT, _out, _unet_out, ant_settings

#: the library's text costs dominate on CPU (an OpenCLIP-H prompt ~1.5 s, bigG ~4 s on one core): the refresh
#: path and synonyms are tested on SD1.5, and ``cheap_text`` cuts the prompt sets
FAMILY_ANT = FAST_ANT | {"synonyms": ""}
PROMPTS = ["a house", "a tree", "a man", "a car"]


def load_tiny(comfy, builder: str, filename: str) -> Iterator[tuple]:
    """Build the checkpoint, load it as a prompt would, and unload it again after the module's tests."""
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_checkpoint
    from comfy import model_management

    name = getattr(tiny_checkpoint, builder)(comfy["root"] / "checkpoints" / filename).name
    with torch.inference_mode():
        loaded = comfy["nodes"].CheckpointLoaderSimple().load_checkpoint(name)[:3]
    yield loaded
    del loaded
    model_management.unload_all_models()
    gc.collect()


def cheap_text(comfy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four prior/preservation prompts instead of 64-1,200, and two concept templates instead of ten (ANT's) or
    thirty (MACE's)."""
    mod = sys.modules[comfy["nodes"].NODE_CLASS_MAPPINGS["MassEraseMACEv2"].__module__]
    prompts = sys.modules[mod.prior_prompts.__module__]
    monkeypatch.setattr(mod, "prior_prompts", lambda exclude=(), **kw: list(PROMPTS))
    monkeypatch.setattr(prompts, "prior_prompts", lambda n=4, exclude=(), **kw: list(PROMPTS))
    monkeypatch.setitem(prompts.CONCEPT_TEMPLATES, "object", ("a photo of a {c}", "a {c} in a park"))
    monkeypatch.setitem(prompts.MACE_TEMPLATES, "object", ("a photo of a {c}", "a {c} in a park"))


def variant(comfy, model, prediction: str):
    """The model as sampled with ``prediction``: "v" goes through the stock ModelSamplingDiscrete node."""
    if prediction == "eps":
        return model
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]()
    with torch.inference_mode():
        return node.patch(model, "v_prediction", False)[0]


def backbone(comfy, model, clip):
    mod = sys.modules[comfy["nodes"].NODE_CLASS_MAPPINGS["EraseConceptANTv2"].__module__]
    return mod.ComfyBackbone(model, clip)


def check_noise_matches_comfy(comfy, model, clip, prediction: str) -> None:
    """The adapter's epsilon (v converted to eps) against the noise implied by ComfyUI's own denoiser
    (``apply_model``: input scaling, timestep mapping and ``calculate_denoised`` of the MODEL's sampling object)."""
    from comfy import model_management

    m = variant(comfy, model, prediction)
    bb = backbone(comfy, m, clip)
    bb.load()  # applies this patcher's object patches (the v-prediction sampling) to the shared model
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    cond = bb.encode_text(["a cat", "a house"])
    extras = {k: v.float() for k, v in cond.extras.items()}  # SDXL: y, the pooled text + size vector
    t = torch.tensor([300, 700])
    sigma = m.get_model_object("model_sampling").sigmas[t].float()
    x = x0 + sigma.view(-1, 1, 1, 1) * eps  # ComfyUI's (variance-exploding) latent for these sigmas
    with torch.inference_mode():
        denoised = m.model.apply_model(x, sigma, c_crossattn=cond.embeds.float(), **extras).float()
        x_t = x / (1 + sigma**2).sqrt().view(-1, 1, 1, 1)  # the library's variance-preserving latent
        ours = bb.predict_noise(x_t, t, cond).float()
        raw = bb.unet()(x_t, timesteps=t.float(), context=cond.embeds, y=extras.get("y")).float()
    comfy_eps = (x - denoised) / sigma.view(-1, 1, 1, 1)
    assert torch.allclose(ours, comfy_eps, atol=1e-3, rtol=1e-3), float((ours - comfy_eps).abs().max())
    assert (prediction == "v") == (not torch.allclose(raw, comfy_eps, atol=1e-3, rtol=1e-3)), \
        "the test cannot tell epsilon from v-prediction"
    model_management.load_models_gpu([model], force_full_load=True)  # put the plain sampling back


def check_erasure(comfy, model, clip, erased, lora, before: torch.Tensor, filename: str) -> None:
    """The erasure changed the MODEL output, the input is bit-identical, and the saved LoRA file gives the same UNet
    output through ComfyUI's stock LoraLoader: the MODEL's when the LoRA is exact, else (a rank-64 truncated SVD,
    for dense edits over 256 MB) the output of the same LoRA through ComfyUI's LORA_MODEL socket loader."""
    nodes = comfy["nodes"]
    edited = _unet_out(erased)
    # outside the band the loaders are compared in below: a loader that ignored the LoRA would fail them
    assert not torch.allclose(edited, before, atol=1e-4, rtol=1e-3), "the erasure did nothing"
    assert torch.equal(_unet_out(model), before), "the input MODEL changed"
    nodes.NODE_CLASS_MAPPINGS["SaveErasureLoRA"].execute(lora=lora, filename=filename, overwrite=True)
    with torch.inference_mode():
        stock, _ = nodes.LoraLoader().load_lora(model, clip, f"{filename}.safetensors", 1.0, 0.0)
        socket = _out(nodes.NODE_CLASS_MAPPINGS["LoraModelLoader"].execute(model, lora, 1.0), 0)
    from_file = _unet_out(stock)
    if float(lora.metadata["erasure.lora_relative_error"]) == 0.0:
        assert torch.allclose(from_file, edited, atol=1e-4, rtol=1e-3)
    else:
        assert not torch.allclose(from_file, before), "LoraLoader applied none of the file's keys"
        assert torch.allclose(from_file, _unet_out(socket), atol=1e-4, rtol=1e-3)
    assert torch.equal(_unet_out(model), before)


def run_ant(comfy, model, clip, prediction: str, family: str, **settings) -> None:
    m = variant(comfy, model, prediction)
    before = _unet_out(m)
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["EraseConceptANTv2"]
    with torch.inference_mode():  # ``settings`` go to the ANT Settings node
        r = node.execute(model=m, clip=clip, **FAMILY_ANT, settings=ant_settings(comfy, refresh_every=0, **settings))
    erased, lora = _out(r, 0), _out(r, 1)
    assert lora.metadata["erasure.base_family"] == family
    print(f"{family} {prediction} ANT LoRA: relative error {lora.metadata['erasure.lora_relative_error']}, "
          f"{sum(v.numel() for v in lora.values()) / 1e6:.1f} M values")
    check_erasure(comfy, m, clip, erased, lora, before, f"{family}-{prediction}-ant")
