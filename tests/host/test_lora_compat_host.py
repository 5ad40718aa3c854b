"""LoRA files from the nodes in a real ComfyUI (docs/lora-files.md): the Save node's file names every layer as kohya
does (SDXL: ComfyUI's own ldm names), carries the same tensors and metadata as the library writes for the same edit,
loads in ComfyUI's stock LoraLoader with every layer applied, and (with an A1111 checkout, ``A1111_PATH``) reaches
every module through A1111's own loading code with the same weight change.

The edit touches every Linear/Conv2d of the UNet: rank-2 LoRAs, plus dense layers of other ranks (so the file has
per-layer ranks and no ``alpha``). Families: the tiny SD1.5 checkpoint and the tiny SDXL-layout one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from .families import backbone, load_tiny
from .test_pack import _unet_out

#: dense edits (ranks 36, 320, 4: min(out, in)); every other layer gets a rank-2 LoRA
DENSE = ("input_blocks.0.0", "time_embed.0", "out.2")


def _harness():
    """``tests/test_lora_compat.py`` (the A1111 loader harness), imported by path: ``tests`` is not a package."""
    name = "lora_compat_harness"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "test_lora_compat.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _pack(comfy, name: str):
    """A module of the pack as ComfyUI loaded it (the package is named after the pack's folder)."""
    nodes_mod = sys.modules[comfy["nodes"].NODE_CLASS_MAPPINGS["EraseConceptANTv2"].__module__]
    return sys.modules[nodes_mod.__name__.rsplit(".", 2)[0] + "." + name]


@pytest.fixture(scope="module")
def sdxl(comfy):
    yield from load_tiny(comfy, "build_tiny_sdxl", "tiny-sdxl-compat.safetensors")


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def saved(request, comfy):
    """(family, MODEL, erasure weights in ComfyUI names, the LORA_MODEL, the saved file's path)."""
    family = request.param
    model, clip, _ = request.getfixturevalue("loaded" if family == "sd1" else "sdxl")
    W = _pack(comfy, "erasure.weights")
    g = torch.Generator().manual_seed(0)
    deltas = {}
    with torch.inference_mode(False):
        for n, m in model.model.diffusion_model.named_modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            shape = tuple(m.weight.shape)
            if n in DENSE:
                deltas[n] = W.Delta(dense=torch.randn(shape, generator=g) * 0.01)
            else:
                up = torch.randn(shape[0], 2, *([1, 1] if len(shape) == 4 else []), generator=g)
                deltas[n] = W.Delta(up=up, down=torch.randn(2, *shape[1:], generator=g) / shape[1], scale=0.05)
    weights = W.ErasureWeights(deltas, W.metadata({"method": "test", "concepts": ["cat"]}))
    nodes_mod = _pack(comfy, "nodes.erasure_nodes")
    lora = nodes_mod._export(weights, model, backbone(comfy, model, clip))
    name = f"compat-{family}"
    comfy["nodes"].NODE_CLASS_MAPPINGS["SaveErasureLoRA"].execute(lora=lora, filename=name, overwrite=True)
    path = Path(comfy["folder_paths"].get_folder_paths("loras")[0]) / f"{name}.safetensors"
    return family, model, clip, weights, lora, path


def test_names_invert_comfyui_map(comfy, saved):
    """The library's diffusers -> ldm table gives back ComfyUI's module for every weight ComfyUI's own
    ``unet_to_diffusers`` map names; SDXL files carry exactly ComfyUI's (ldm) names, SD1.x files diffusers names."""
    family, model, _, weights, lora, _ = saved
    lf = _pack(comfy, "erasure.lora_files")
    to_diffusers = _pack(comfy, "nodes.comfy_backbone").ldm_to_diffusers(model)
    layout = lf.SDXL_LAYOUT if family == "sdxl" else lf.layout_of(to_diffusers.values())
    unet_mods = {n for n, m in model.model.diffusion_model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert unet_mods <= set(to_diffusers)  # (the map also names resamplers the last level does not have)
    assert {m: lf.ldm_name(to_diffusers[m], layout) for m in unet_mods} == {m: m for m in unet_mods}
    layers = {k.partition(".")[0] for k in lora}
    expected = {lf.kohya_name(n if family == "sdxl" else to_diffusers[n]) for n in weights.deltas}
    assert layers == expected and not any(k.endswith(".alpha") for k in lora)


def test_file_is_the_library_file(comfy, saved, tmp_path):
    """The Save node's file holds the tensors and metadata the library writes for the same edit from diffusers
    names (the command line's path), the date aside; kohya's and ModelSpec's keys name the family."""
    from safetensors import safe_open

    family, model, _, weights, lora, path = saved
    assert "modelspec.date" not in lora.metadata  # file keys: a cached result's socket value is the same
    lf = _pack(comfy, "erasure.lora_files")
    to_diffusers = _pack(comfy, "nodes.comfy_backbone").ldm_to_diffusers(model)
    lib = tmp_path / path.name
    lf.save_lora(weights.renamed(to_diffusers), lib)
    with safe_open(str(path), "pt") as a, safe_open(str(lib), "pt") as b:
        ma, mb = a.metadata(), b.metadata()
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert {k: v for k, v in ma.items() if k != "modelspec.date"} == {k: v for k, v in mb.items()
                                                                       if k != "modelspec.date"}
    version, arch = {"sd1": ("sd_v1", "stable-diffusion-v1"), "sdxl": ("sdxl_base_v1-0",
                                                                      "stable-diffusion-xl-v1-base")}[family]
    assert ma["ss_base_model_version"] == version and ma["modelspec.architecture"] == f"{arch}/lora"
    assert ma["ss_network_module"] == "networks.lora" and ma["ss_network_dim"] == "Dynamic"
    assert ma["ss_output_name"] == ma["modelspec.title"] == path.stem
    assert ma["erasure.base_family"] == {"sd1": "SD1.x", "sdxl": "SDXL"}[family]


def test_stock_lora_loader_applies_every_layer(comfy, saved):
    """ComfyUI's LoraLoader patches every layer of the file, and the UNet output is the nodes' own patched MODEL's;
    so is the Apply Erased Model node's on the file (names resolved back from the keys)."""
    family, model, clip, weights, _, path = saved
    patched = _pack(comfy, "nodes.comfy_backbone").patched_model(model, weights)
    with torch.inference_mode():
        stock, _ = comfy["nodes"].LoraLoader().load_lora(model, clip, path.name, 1.0, 0.0)
        applied = comfy["nodes"].NODE_CLASS_MAPPINGS["ApplyErasedModel"].execute(model, 1.0, None, path.name)
    applied = (applied.result if hasattr(applied, "result") else applied)[0]
    assert set(stock.patches) == {f"diffusion_model.{n}.weight" for n in weights.deltas}
    assert set(applied.patches) == set(stock.patches)
    ref, ours, theirs = _unet_out(model), _unet_out(patched), _unet_out(stock)
    assert not torch.allclose(ours, ref)
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=1e-3), float((theirs - ours).abs().max())
    assert torch.allclose(_unet_out(applied), ours, atol=1e-4, rtol=1e-3)


def test_a1111_reaches_every_module(request, comfy, saved):
    """A1111's own ``load_network`` (v1.10) against the UNet's modules under their ldm names (what A1111's SD models
    are): no key unmatched, the same weight change per module, and the browser files it under the right model."""
    h = _harness()
    a1111 = h.require_a1111(request.config)
    family, model, _, weights, _, path = saved
    unet = {n: tuple(m.weight.shape) for n, m in model.model.diffusion_model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}
    changes, unmatched = a1111.load(path, unet)
    assert unmatched == []
    assert changes.keys() == weights.deltas.keys()
    for n, d in weights.deltas.items():
        torch.testing.assert_close(changes[n], d.matrix().float(), rtol=1e-4, atol=1e-6)
    listed = a1111.listing(path)
    assert listed["sd_version"] == {"sd1": "SD1", "sdxl": "SDXL"}[family] and listed["alias"] == path.stem
    assert listed["hash"] == a1111.file_hash(path)
