"""Erasure results as ComfyUI patches: low-rank deltas as ComfyUI's LoRA adapters (factors only), dense ones as
weight diffs in the weight's dtype; the patched model equals the dense float32 diff patch, at any strength."""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from .tiny_unets import tiny_unet_model


def library(comfy):
    """The pack's ``comfy_backbone`` and ``erasure.weights`` modules, as ComfyUI loaded them."""
    pkg = sys.modules[comfy["nodes"].NODE_CLASS_MAPPINGS["ApplyErasedModel"].__module__].__package__
    return sys.modules[pkg + ".comfy_backbone"], sys.modules[pkg.rsplit(".", 1)[0] + ".erasure.weights"]


def erasure(weights_mod, model, rank: int = 4, dense: bool = True, seed: int = 0):
    """A rank-``rank`` LoRA on every cross-attention K/V (ANT's scope lora, MACE's LoRAs); with ``dense``, one of them
    a dense (full-rank) delta and another an exact file's identity factorisation (rank = the layer's width)."""
    Delta, ErasureWeights = weights_mod.Delta, weights_mod.ErasureWeights
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, m in model.model.diffusion_model.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            out_f, in_f = m.weight.shape
            deltas[name] = Delta(up=torch.randn(out_f, rank, generator=g) * 0.05,
                                 down=torch.randn(rank, in_f, generator=g) * 0.05, scale=0.7)
    if dense:
        names = sorted(deltas)
        out_f, in_f = deltas[names[0]].shape
        deltas[names[0]] = Delta(dense=torch.randn(out_f, in_f, generator=g) * 1e-2)
        out_f, in_f = deltas[names[1]].shape
        deltas[names[1]] = Delta(up=torch.randn(out_f, out_f, generator=g) * 0.05,
                                 down=torch.randn(out_f, in_f, generator=g) * 0.05, scale=0.5)
    return ErasureWeights(deltas)


def dense_patched(model, weights, strength: float = 1.0):
    """Every delta as a dense float32 weight diff: the reference."""
    m = model.clone()
    m.add_patches({f"diffusion_model.{n}.weight": ("diff", (d.matrix().float(),)) for n, d in weights.deltas.items()},
                  strength)
    return m


def patched_weights(model, keys) -> dict[str, torch.Tensor]:
    """The weights ComfyUI computes when it loads ``model`` (its patches applied)."""
    import comfy.model_management
    import comfy.utils

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    return {k: comfy.utils.get_attr(model.model, k).detach().float().clone() for k in keys}


def unet_out(model) -> torch.Tensor:
    import comfy.model_management

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    g = torch.Generator().manual_seed(0)
    config = model.model.model_config.unet_config
    dtype = model.model.get_dtype()
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, config["context_dim"], generator=g)
    adm = config.get("adm_in_channels")
    y = torch.randn(1, adm, generator=g).to(dtype) if adm else None
    with torch.inference_mode():
        return model.model.diffusion_model(x.to(dtype), timesteps=torch.tensor([500.0]), context=ctx.to(dtype),
                                           y=y).float().clone()


@pytest.fixture(scope="module")
def sdxl_unet(comfy):
    from comfy import model_management

    model = tiny_unet_model("sdxl")
    yield model
    del model
    model_management.unload_all_models()
    gc.collect()


@pytest.fixture(params=["sd15", "sdxl"])
def family_model(request, loaded):
    return loaded[0] if request.param == "sd15" else request.getfixturevalue("sdxl_unet")


def test_low_rank_deltas_patch_as_lora_adapters(comfy, family_model):
    from comfy.weight_adapter import LoRAAdapter

    cb, wmod = library(comfy)
    model = family_model
    weights = erasure(wmod, model)
    keys = [f"diffusion_model.{n}.weight" for n in weights.deltas]
    base = patched_weights(model, keys)
    for strength in (1.0, 0.5, -1.0):
        m = cb.patched_model(model, weights, strength)
        kinds = {}
        for name, d in weights.deltas.items():
            ((s, patch, *_),) = m.patches[f"diffusion_model.{name}.weight"]
            assert s == strength
            kinds[name] = "lora" if isinstance(patch, LoRAAdapter) else patch[0]
            if d.dense is not None or d.rank >= min(d.shape):
                assert kinds[name] == "diff" and patch[1][0].dtype == base[keys[0]].dtype
        assert list(kinds.values()).count("diff") == 2 and list(kinds.values()).count("lora") == len(kinds) - 2
        ours = patched_weights(m, keys)
        ref = patched_weights(dense_patched(model, weights, strength), keys)
        for k, d in zip(keys, weights.deltas.values(), strict=True):
            expect = base[k] + strength * d.matrix().float()
            assert torch.allclose(ours[k], ref[k], rtol=0, atol=1e-6), k
            assert torch.allclose(ours[k], expect, rtol=0, atol=1e-6), k
        if strength == -1.0:  # the UNet's output as well
            out, out_ref = unet_out(m), unet_out(dense_patched(model, weights, strength))
            assert torch.allclose(out, out_ref, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(out, unet_out(model), rtol=1e-3, atol=1e-4)  # the patches changed the model
    patched_weights(model, keys)  # the plain model back


def test_apply_erased_model_patches_a_lora_socket_as_adapters(comfy, loaded):
    """Apply Erased Model with a LoRA socket (a kohya dict, as from a file) at strengths 0.5 and -1."""
    from comfy.weight_adapter import LoRAAdapter

    cb, wmod = library(comfy)
    model = loaded[0]
    weights = erasure(wmod, model, rank=2, dense=False)
    lora, _ = cb.to_lora_dict(weights, model)
    keys = [f"diffusion_model.{n}.weight" for n in weights.deltas]
    base = patched_weights(model, keys)
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["ApplyErasedModel"]
    for strength in (0.5, -1.0):
        with torch.inference_mode():
            r = node.execute(model=model, strength=strength, lora=lora)
        m = (r.result if hasattr(r, "result") else r)[0]
        assert all(isinstance(m.patches[k][0][1], LoRAAdapter) and m.patches[k][0][0] == strength for k in keys)
        ours = patched_weights(m, keys)
        for k, d in zip(keys, weights.deltas.values(), strict=True):
            assert torch.allclose(ours[k], base[k] + strength * d.matrix(), rtol=0, atol=1e-6), k
    patched_weights(model, keys)


@pytest.mark.parametrize(("dtype", "compute", "stored"), [
    (torch.float16, torch.float16, torch.float16),  # most GPUs: ComfyUI patches float16 weights in float16
    (torch.float16, torch.float32, torch.float32),  # a CPU: in float32
    (torch.bfloat16, torch.float16, torch.float32),
])
def test_dense_diffs_in_the_dtype_comfyui_patches_in(comfy, monkeypatch, dtype, compute, stored):
    """A dense diff is kept in the weight's dtype where ComfyUI applies patches in that dtype (it casts the diff to
    it anyway), else in float32: the patched weights are bit-identical to those of a float32 diff."""
    from comfy import model_management

    cb, wmod = library(comfy)
    model = tiny_unet_model("sd15", dtype)
    assert model.model.get_dtype() == dtype
    monkeypatch.setitem(model_management.LORA_COMPUTE_DTYPES, model.load_device, compute)
    weights = erasure(wmod, model, rank=4)
    weights = wmod.ErasureWeights({n: wmod.Delta(dense=d.matrix()) for n, d in weights.deltas.items()})
    keys = [f"diffusion_model.{n}.weight" for n in weights.deltas]
    m = cb.patched_model(model, weights)
    assert all(m.patches[k][0][1][1][0].dtype == stored for k in keys)
    ours, ref = patched_weights(m, keys), patched_weights(dense_patched(model, weights), keys)
    assert all(torch.equal(ours[k], ref[k]) for k in keys)
    assert not torch.equal(ours[keys[0]], patched_weights(model, keys[:1])[keys[0]])
    del m, model
    gc.collect()
