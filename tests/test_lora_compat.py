"""LoRA files other tools list and load (docs/lora-files.md): kohya's keys and metadata, ModelSpec, SDXL's ldm names.

Tiny SD1.x / SD2.x / SDXL-layout UNets are built in code with the real block layouts and context widths (768 / 1024 /
2048) at tiny channel counts. Every Linear/Conv2d layer gets a random edit, so every kind of key is written. Checked:
the ldm names against diffusers' own ldm converter; the exact round trip; diffusers' ``load_lora_weights``; and, when
an A1111 checkout is found (``A1111_PATH``, default ``~/stable-diffusion-webui``), A1111's own LoRA loading code
(``extensions-builtin/Lora``) run over the files: every key must reach its module with the same weight change, and
the LoRA browser must file it under the right base model. Without A1111 those tests are skipped loudly.

The A1111 harness below is also used by ``tests/host/test_lora_compat_host.py``, so it imports only torch and
safetensors at module level (the ComfyUI interpreter has no diffusers).
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import importlib.util
import logging
import os
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

A1111 = Path(os.environ.get("A1111_PATH", "~/stable-diffusion-webui")).expanduser()
A1111_SKIPPED = "A1111 LOADER TESTS SKIPPED"
_A1111_FILES = ("extensions-builtin/Lora/networks.py", "extensions-builtin/Lora/network.py",
                "extensions-builtin/Lora/network_lora.py", "extensions-builtin/Lora/lyco_helpers.py",
                "modules/hashes.py", "modules/sd_models.py")


def a1111_unavailable(root: Path = A1111) -> str | None:
    """Why A1111's code cannot be run from ``root``, or ``None``."""
    missing = [f for f in _A1111_FILES if not (root / f).is_file()]
    if missing:
        return (f"no A1111 checkout at {root} (missing {missing[0]}); set A1111_PATH, see docs/lora-files.md "
                "'Reproducing the checks'")
    return None


class _Banner:
    """A pytest plugin that repeats the skip reason at the end of the run, in red, as the host tests do."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.write_sep("!", f"{A1111_SKIPPED}: {self.reason}", red=True, bold=True)


def require_a1111(config: pytest.Config) -> A1111Loader:
    """The A1111 loader, or a loud skip (the reason in the skip list and a red line at the end of the run)."""
    reason = a1111_unavailable()
    if reason:
        if not config.pluginmanager.has_plugin("a1111-banner"):
            config.pluginmanager.register(_Banner(reason), "a1111-banner")
        pytest.skip(f"{A1111_SKIPPED}: {reason}")
    return A1111Loader(A1111)


# -- A1111's own code, without its webui ---------------------------------------------------------------------------
def _exec_parts(path: Path, module: types.ModuleType, names: set[str]) -> None:
    """Execute only the top-level functions and assignments called ``names`` of the file at ``path`` in ``module``
    (A1111's ``networks.py`` and ``modules/*.py`` start the webui on import)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    keep = [n for n in tree.body
            if isinstance(n, ast.FunctionDef) and n.name in names
            or isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in n.targets)]
    found = {n.name if isinstance(n, ast.FunctionDef) else n.targets[0].id for n in keep}  # type: ignore[attr-defined]
    if found != names:
        raise RuntimeError(f"{path} has no {sorted(names - found)}: this A1111 version is not supported by the test")
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), module.__dict__)


class A1111Loader:
    """A1111's LoRA loading (``extensions-builtin/Lora``, v1.10) run on a file against a given set of modules.

    ``network.py``, ``network_lora.py`` and ``lyco_helpers.py`` are imported as they are, with stand-ins for the webui
    modules they import (``modules.shared``, ``devices``, ...). From ``networks.py`` only the key conversion
    (``convert_diffusers_name_to_compvis``) and ``load_network``, which maps every key to a module (with its SDXL and
    ldm-name fallbacks), are executed: importing the file would start the webui's LoRA listing. The stand-ins are in
    ``sys.modules`` only while A1111's code runs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        lora = root / "extensions-builtin" / "Lora"
        self.stubs = self._stubs(root)
        self.mods: dict[str, types.ModuleType] = {}
        with self._installed():
            for name in ("lyco_helpers", "network", "network_lora"):
                spec = importlib.util.spec_from_file_location(name, lora / f"{name}.py")
                assert spec is not None and spec.loader is not None
                mod = importlib.util.module_from_spec(spec)
                sys.modules[name] = self.mods[name] = mod
                spec.loader.exec_module(mod)
        networks = types.ModuleType("networks")
        networks.__dict__.update(re=re, os=os, logging=logging, torch=torch, network=self.mods["network"],
                                 shared=self.stubs["modules.shared"], sd_models=self.stubs["modules.sd_models"],
                                 textual_inversion=None, module_types=[self.mods["network_lora"].ModuleTypeLora()])
        _exec_parts(lora / "networks.py", networks, {
            "re_digits", "re_x_proj", "re_compiled", "suffix_conversion", "convert_diffusers_name_to_compvis",
            "load_network", "available_network_hash_lookup", "forbidden_network_aliases"})
        self.mods["networks"] = networks

    @staticmethod
    def _stubs(root: Path) -> dict[str, types.ModuleType]:
        """Stand-ins for the webui modules A1111's LoRA code imports; the file readers and hashes are A1111's own."""
        names = ["modules", "modules.shared", "modules.devices", "modules.sd_models", "modules.cache", "modules.errors",
                 "modules.hashes", "modules.models", "modules.models.sd3", "modules.models.sd3.mmdit"]
        s = {n: types.ModuleType(n) for n in names}
        for n in names[1:]:
            parent, _, child = n.rpartition(".")
            setattr(s[parent], child, s[n])
        s["modules.models.sd3.mmdit"].QkvLinear = type("QkvLinear", (nn.Linear,), {})
        cpu = torch.device("cpu")
        s["modules.devices"].__dict__.update(cpu=cpu, device=cpu, dtype=torch.float32)
        s["modules.shared"].__dict__.update(sd_model=None, opts=types.SimpleNamespace(
            lora_preferred_name="Alias from file", lora_bundled_ti_to_infotext=False))
        s["modules.errors"].__dict__.update(display=lambda e, task: print(task, e), report=lambda *a, **k: None)
        s["modules.cache"].cached_data_for_file = lambda subsection, title, filename, func: func()
        _exec_parts(root / "modules" / "sd_models.py", s["modules.sd_models"], {"read_metadata_from_safetensors"})
        s["modules.sd_models"].errors = s["modules.errors"]
        s["modules.sd_models"].read_state_dict = lambda filename, **kw: __import__(
            "safetensors.torch", fromlist=["load_file"]).load_file(filename)
        hashes = s["modules.hashes"]
        _exec_parts(root / "modules" / "hashes.py", hashes, {"addnet_hash_safetensors"})
        hashes.__dict__["hashlib"] = __import__("hashlib")
        hashes.sha256_from_cache = lambda *a, **k: None  # nothing cached: the file's own sshs_model_hash is used
        hashes.sha256 = lambda filename, title, use_addnet_hash=False: A1111Loader.file_hash_with(hashes, filename)
        return s

    @staticmethod
    def file_hash_with(hashes: types.ModuleType, filename: str | Path) -> str:
        with open(filename, "rb") as f:
            return hashes.addnet_hash_safetensors(f)

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        """A1111's modules and the stand-ins in ``sys.modules`` for the duration (its code imports some lazily)."""
        table = {**self.stubs, **self.mods}
        saved = {n: sys.modules.get(n) for n in table}
        sys.modules.update(table)
        try:
            yield
        finally:
            for n, m in saved.items():
                if m is None:
                    sys.modules.pop(n, None)
                else:
                    sys.modules[n] = m

    def file_hash(self, path: Path) -> str:
        """A1111's LoRA hash of a file (``hashes.addnet_hash_safetensors``: SHA-256 after the header)."""
        return self.file_hash_with(self.stubs["modules.hashes"], path)

    def listing(self, path: Path) -> dict[str, object]:
        """What A1111's LoRA browser lists for the file (its ``NetworkOnDisk``): the base model it filters by
        (``sd_version``), the alias (``get_alias()``, with the default "Alias from file" setting), the hash, the
        metadata."""
        with self._installed():
            disk = self.mods["network"].NetworkOnDisk(path.stem, str(path))
            return {"sd_version": disk.sd_version.name, "alias": disk.get_alias(), "hash": disk.hash,
                    "metadata": disk.metadata}

    def load(self, path: Path, unet: dict[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """A1111's weight change of every module the file reaches (``calc_updown`` at strength 1), by ldm module
        name, and the file's layer names that reached none. ``unet``: the ldm UNet's Linear/Conv2d module names and
        weight shapes (A1111's SD models are ldm/sgm UNets under ``diffusion_model``)."""
        mapping: dict[str, nn.Module] = {}
        names: dict[str, str] = {}
        for name, shape in unet.items():
            key = "diffusion_model_" + name.replace(".", "_")
            mapping[key], names[key] = _stand_in(shape), name
        self.stubs["modules.shared"].sd_model = types.SimpleNamespace(network_layer_mapping=mapping)
        with self._installed():
            net = self.mods["networks"].load_network(path.stem, types.SimpleNamespace(filename=str(path)))
            out = {}
            for key, module in net.modules.items():
                updown, _ = module.calc_updown(torch.zeros(unet[names[key]]))
                out[names[key]] = updown
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            layers = {k.partition(".")[0] for k in f.keys()}
        matched = {m.network_key.partition(".")[0] for m in net.modules.values()}
        return out, sorted(layers - matched)


def _stand_in(shape: tuple[int, ...]) -> nn.Module:
    """A plain ``nn.Linear``/``nn.Conv2d`` of the weight shape, without memory (A1111 checks the exact class)."""
    if len(shape) == 2:
        return nn.Linear(shape[1], shape[0], bias=False, device="meta")
    return nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=False, device="meta")


# -- tiny models of each family -------------------------------------------------------------------------------------
def tiny_unet(family: str):
    """A random diffusers UNet with the family's real block layout and context width, at tiny channel counts."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=2,
                  norm_num_groups=4)
    if family == "sdxl":
        return UNet2DConditionModel(
            block_out_channels=(8, 16, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                              "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 2), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16, **common)
    return UNet2DConditionModel(
        block_out_channels=(8, 8, 16, 16), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768 if family == "sd1" else 1024, use_linear_projection=family == "sd2", **common)


def every_layer(unet: nn.Module, scale: float = 0.05):
    """Random dense erasure weights on every Linear/Conv2d of ``unet``."""
    from erasure.weights import ErasureWeights

    g = torch.Generator().manual_seed(1)
    return ErasureWeights.dense({n: torch.randn(m.weight.shape, generator=g) * scale for n, m in unet.named_modules()
                                 if isinstance(m, (nn.Linear, nn.Conv2d))}, method="test", concepts=["circle"])


def ldm_shapes(unet: nn.Module) -> dict[str, tuple[int, ...]]:
    """The ldm names and weight shapes of ``unet``'s Linear/Conv2d modules (A1111's module set)."""
    from erasure.lora_files import layout_of, ldm_name

    layout = layout_of(dict(unet.named_modules()))
    assert layout is not None
    out = {}
    for n, m in unet.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            ldm = ldm_name(n, layout)
            assert ldm is not None, n
            out[ldm] = tuple(m.weight.shape)
    return out


def _unet_out(unet, family: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    ctx = torch.randn(1, 4, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if family == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 16, generator=g),
                                      "time_ids": torch.randn(1, 6, generator=g)}
    with torch.no_grad():
        return unet(x, t, ctx, **extra).sample


FAMILIES = ["sd1", "sd2", "sdxl"]


# -- names -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_ldm_names_match_diffusers_converter(family):
    """Our diffusers -> ldm names, run backwards by diffusers' own single-file converter, give back every parameter
    of the UNet: the table is the one diffusers (and ComfyUI, checked in the host tests) use."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from erasure.lora_files import SD_LAYOUT, SDXL_LAYOUT, layout_of, ldm_name

    unet = tiny_unet(family)
    layout = layout_of(dict(unet.named_modules()))
    assert layout == (SDXL_LAYOUT if family == "sdxl" else SD_LAYOUT)
    sd = unet.state_dict()
    ldm = {}
    for k, v in sd.items():
        module, _, param = k.rpartition(".")
        name = ldm_name(module, layout)
        assert name is not None, k
        ldm[f"model.diffusion_model.{name}.{param}"] = v
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k].reshape(sd[k].shape), sd[k]) for k in sd)


def test_keys_are_named_as_kohya_names_them(tmp_path):
    """SD1.x/SD2.x: diffusers names; SDXL: ldm names throughout (what kohya's sd-scripts write)."""
    from safetensors import safe_open

    from erasure.lora_files import save_lora

    for family in FAMILIES:
        path = tmp_path / f"{family}.safetensors"
        save_lora(every_layer(tiny_unet(family)), path)
        with safe_open(str(path), "pt") as f:
            keys = {k.partition(".")[0] for k in f.keys()}
        ldm = {k for k in keys if re.match(r"lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|"
                                           r"out)_", k)}
        assert all(k.startswith("lora_unet_") for k in keys)
        assert ldm == (keys if family == "sdxl" else set()), family


# -- metadata --------------------------------------------------------------------------------------------------------
EXPECTED = {  # kohya's sd-scripts (train_network.py, library/sai_model_spec.py) for these bases
    ("sd1", None): {"ss_v2": "False", "ss_base_model_version": "sd_v1",
                    "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.implementation": "diffusers",
                    "modelspec.resolution": "512x512", "modelspec.prediction_type": "epsilon"},
    ("sd2", "v"): {"ss_v2": "True", "ss_base_model_version": "sd_v2_v",
                   "modelspec.architecture": "stable-diffusion-v2-768-v/lora",
                   "modelspec.implementation": "diffusers", "modelspec.resolution": "768x768",
                   "modelspec.prediction_type": "v"},
    ("sd2", "eps"): {"ss_v2": "True", "ss_base_model_version": "sd_v2",
                     "modelspec.architecture": "stable-diffusion-v2-512/lora",
                     "modelspec.implementation": "diffusers", "modelspec.resolution": "512x512",
                     "modelspec.prediction_type": "epsilon"},
    ("sdxl", None): {"ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0",
                     "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                     "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                     "modelspec.resolution": "1024x1024", "modelspec.prediction_type": "epsilon"},
}


@pytest.mark.parametrize(("family", "prediction"), list(EXPECTED))
def test_kohya_and_modelspec_metadata(tmp_path, family, prediction):
    """The family comes from the K/V layers' context width alone (no argument); the prediction type from the
    argument (SD2.x without one: 768-v)."""
    from safetensors import safe_open

    from erasure.lora_files import load_lora, save_lora

    w = every_layer(tiny_unet(family))
    path = tmp_path / f"erase-{family}.safetensors"
    assert save_lora(w, path, prediction=prediction) == 0.0
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert not any(k.endswith(".alpha") for k in f.keys())  # per-layer ranks: every loader's alpha = rank
    assert {k: meta[k] for k in EXPECTED[family, prediction]} == EXPECTED[family, prediction]
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"  # identity factorisations: per-layer ranks
    assert meta["ss_output_name"] == meta["modelspec.title"] == "erase-" + family
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert "circle" in meta["modelspec.description"]
    date = datetime.datetime.fromisoformat(meta["modelspec.date"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - date).total_seconds()) < 600
    assert re.fullmatch(r"[0-9a-f]{64}", meta["sshs_model_hash"]) and re.fullmatch(r"[0-9a-f]{8}",
                                                                                  meta["sshs_legacy_hash"])
    with open(path, "rb") as f:  # kohya's / A1111's hash: SHA-256 of everything after the header
        import hashlib

        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        assert hashlib.sha256(f.read()).hexdigest() == meta["sshs_model_hash"]
    assert load_lora(path).metadata["erasure.method"] == "test"  # the erasure keys are still there
    from safetensors.torch import load_file

    from erasure.lora_files import write_lora

    write_lora(load_file(str(path)), meta, tmp_path / "copy.safetensors")  # saved again (the Load -> Save nodes)
    with safe_open(str(tmp_path / "copy.safetensors"), "pt") as f:
        again = f.metadata()
    assert again["modelspec.date"] == meta["modelspec.date"] and again["ss_output_name"] == "copy"
    assert again["sshs_model_hash"] == meta["sshs_model_hash"]  # the same tensors


def test_uniform_rank_and_unknown_family(tmp_path):
    """A LoRA of one rank says so (kohya: dim = alpha = rank, an alpha per layer); weights that name no base model
    (the lab's 32-wide context) get the network keys only, and an explicit family wins."""
    from erasure.lora_files import file_metadata, kohya_metadata, lora_tensors
    from erasure.weights import Delta, ErasureWeights

    w = ErasureWeights({"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k":
                        Delta(up=torch.randn(16, 4), down=torch.randn(4, 32), scale=0.5)})
    meta = kohya_metadata(w)
    assert meta == {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0"}
    tensors, _ = lora_tensors(w)
    assert float(tensors["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha"]) == 4.0
    assert kohya_metadata(w, rank=2)["ss_network_dim"] == "2"
    assert file_metadata(w, 0.0, family="SDXL")["ss_base_model_version"] == "sdxl_base_v1-0"
    w.metadata["erasure.base_family"] = "SD2.x"  # what the nodes record
    w.metadata["erasure.base_prediction"] = "eps"
    assert kohya_metadata(w)["modelspec.architecture"] == "stable-diffusion-v2-512/lora"


# -- round trip ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact_and_names_resolve(tmp_path, family):
    """load_lora(save_lora(w)) gives the same deltas under the same names; the layers resolve against the diffusers
    model, and against an ldm-named model; a file without our module list (another tool's) resolves too."""
    from safetensors.torch import load_file, save_file

    from erasure.lora_files import layout_of, ldm_name, load_lora, resolve_names, save_lora
    from erasure.weights import Delta

    unet = tiny_unet(family)
    w = every_layer(unet)
    k = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"  # a low-rank delta keeps its own factors
    w.deltas[k] = Delta(up=torch.randn(16, 3), down=torch.randn(3, unet.config.cross_attention_dim), scale=0.25)
    path = tmp_path / "e.safetensors"
    assert save_lora(w, path) == 0.0
    back = load_lora(path)
    assert sorted(back.deltas) == w.modules()
    assert all(torch.equal(back.deltas[n].matrix(), w.deltas[n].matrix()) for n in w.modules())
    mods = dict(unet.named_modules())
    assert sorted(resolve_names(back, mods).deltas) == w.modules()
    layout = layout_of(mods)
    ldm_mods = {ldm_name(n, layout): m for n, m in mods.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    to_ldm = {n: ldm_name(n, layout) for n in mods}
    resolved = resolve_names(back, ldm_mods, {n: a for n, a in to_ldm.items() if a})  # type: ignore[arg-type]
    assert sorted(resolved.deltas) == sorted(str(to_ldm[n]) for n in w.modules())
    foreign = tmp_path / "foreign.safetensors"  # the same tensors without any metadata
    save_file(load_file(str(path)), str(foreign))
    theirs = resolve_names(load_lora(foreign), mods)
    assert all(torch.equal(theirs.deltas[n].matrix(), w.deltas[n].matrix()) for n in w.modules())
    save_lora(back, tmp_path / "again.safetensors")  # saving what was read gives the same tensors
    a, b = load_file(str(path)), load_file(str(tmp_path / "again.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)


# -- diffusers -------------------------------------------------------------------------------------------------------
def _pipeline(unet, family: str, tmp: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from erasure.lab import world
    from erasure.lab.tokenizer import write_tokenizer

    tok_dir = tmp / "tokenizer"
    write_tokenizer(tok_dir, world.vocabulary(), 16)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4)
    if family == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)),
                                         text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=16,
                                                                                                   **cfg)),
                                         tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=DDIMScheduler())
    return StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)), tokenizer=tok,
                                   unet=unet, scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_loads_every_layer(tmp_path, family):
    """diffusers' ``load_lora_weights`` reads the file (SDXL through its kohya/sgm converter) and gives the UNet
    output of the edit applied directly."""
    from erasure.lora_files import save_lora

    unet = tiny_unet(family)
    w = every_layer(unet, scale=0.02)
    save_lora(w, tmp_path / "e.safetensors")
    ref = _unet_out(unet, family)
    with w.applied(unet):
        edited = _unet_out(unet, family)
    pipe = _pipeline(unet, family, tmp_path)
    pipe.load_lora_weights(str(tmp_path / "e.safetensors"))
    loaded = _unet_out(pipe.unet, family)
    assert (edited - ref).abs().max() > 1e-3
    torch.testing.assert_close(loaded, edited, rtol=1e-4, atol=1e-5)


# -- A1111 -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_a1111_maps_every_key_to_its_module(request, tmp_path, family):
    """A1111's ``load_network`` reaches a module with every layer of the file, and its weight change is ours."""
    a1111 = require_a1111(request.config)
    from erasure.lora_files import layout_of, ldm_name, save_lora

    unet = tiny_unet(family)
    w = every_layer(unet)
    path = tmp_path / f"{family}.safetensors"
    save_lora(w, path)
    changes, unmatched = a1111.load(path, ldm_shapes(unet))
    assert unmatched == []
    layout = layout_of(dict(unet.named_modules()))
    ours = {ldm_name(n, layout): w.deltas[n].matrix() for n in w.modules()}
    assert changes.keys() == ours.keys()
    for n, d in ours.items():
        torch.testing.assert_close(changes[n], d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("family", "version"), [("sd1", "SD1"), ("sd2", "SD2"), ("sdxl", "SDXL")])
def test_a1111_browser_files_it_under_its_base_model(request, tmp_path, family, version):
    """A1111's ``NetworkOnDisk``: the base model its LoRA browser filters by, the alias of ``<lora:alias:1>`` (the
    file's name) and the hash (our ``sshs_model_hash``, equal to A1111's own hash of the file)."""
    a1111 = require_a1111(request.config)
    from erasure.lora_files import save_lora

    path = tmp_path / f"erase-{family}.safetensors"
    save_lora(every_layer(tiny_unet(family)), path)
    listed = a1111.listing(path)
    assert listed["sd_version"] == version
    assert listed["alias"] == path.stem
    assert listed["hash"] == a1111.file_hash(path)
    assert listed["metadata"]["erasure.concepts"] == '["circle"]'


def test_a1111_drops_layers_of_diffusers_named_sdxl_files(request, tmp_path):
    """Why SDXL files use ldm names: the same edit written with diffusers names loses, in A1111, the layers its
    SD1-layout converter maps wrongly (up_blocks.0's upsampler) or not at all (add_embedding)."""
    a1111 = require_a1111(request.config)
    from erasure.lora_files import file_metadata, lora_tensors, write_lora

    unet = tiny_unet("sdxl")
    w = every_layer(unet)
    tensors, err = lora_tensors(w, family="sd1")  # diffusers names
    write_lora(tensors, file_metadata(w, err), tmp_path / "diffusers-named.safetensors")
    _, unmatched = a1111.load(tmp_path / "diffusers-named.safetensors", ldm_shapes(unet))
    assert unmatched == ["lora_unet_add_embedding_linear_1", "lora_unet_add_embedding_linear_2",
                         "lora_unet_up_blocks_0_upsamplers_0_conv"]
