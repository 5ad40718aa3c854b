"""LoRA files and LoRA dicts: the one place that reads, names and writes them.

Keys are kohya's (``lora_unet_<module_path_with_underscores>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) with
the module names kohya's sd-scripts use: diffusers names for SD1.x/SD2.x (``lora_unet_down_blocks_0_attentions_0_...``)
and the original ldm/sgm names for SDXL (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k``), because
A1111 maps SDXL files only by ldm names (its diffusers->ldm converter assumes the SD1 block layout). ComfyUI's
LoraLoader, Forge and diffusers' ``load_lora_weights`` read both. A dense delta is written *exactly* as the identity
factorisation (``up = I, down = dW`` or ``up = dW, down = I``, whichever has the smaller rank): ``I @ dW`` reproduces
``dW`` bit for bit. ``rank=r`` writes a truncated SVD instead and reports the relative error.

Metadata: the ``erasure.*`` keys (method, concepts, settings, the module names), kohya's ``ss_*`` keys and ModelSpec
1.0.1's ``modelspec.*`` keys, written as sd-scripts writes them, so A1111/Forge list and filter the files by base model
(``docs/lora-files.md``). The command line, the library and every node write the same tensors and metadata through
:func:`lora_tensors`, :func:`file_metadata` and :func:`write_lora`; read-back metadata is untrusted text.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .errors import BadInputError
from .files import atomic_save, read_safetensors
from .validation import check_lora_tensors, concepts_from_metadata
from .weights import META_PREFIX, Delta, ErasureWeights

KOHYA_PREFIX = "lora_unet_"


def kohya_name(module: str) -> str:
    """``down_blocks.0.attentions.0...to_k`` -> ``lora_unet_down_blocks_0_attentions_0_..._to_k`` (a name that is
    already a kohya key is returned as it is)."""
    return module if module.startswith(KOHYA_PREFIX) else KOHYA_PREFIX + module.replace(".", "_")


# -- diffusers <-> ldm module names --------------------------------------------------------------------------------
@dataclass(frozen=True)
class UNetLayout:
    """What a diffusers module name alone cannot say about its ldm name: res blocks per level, and which up levels
    have cross-attention (an upsampler is the block's second or third child depending on it)."""

    layers_per_block: int
    up_attention: tuple[bool, ...]


#: SDXL base (every SDXL model ComfyUI's ``SDXL`` config matches): 2 res blocks, attention in up levels 0 and 1
SDXL_LAYOUT = UNetLayout(2, (True, True, False))
#: SD1.x and SD2.x: 2 res blocks, attention in up levels 1-3
SD_LAYOUT = UNetLayout(2, (False, True, True, True))

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_BASIC = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
          "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
          "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_SAMPLER = re.compile(r"(down_blocks\.(\d+)\.downsamplers|up_blocks\.(\d+)\.upsamplers)\.0\.conv")
_LDM = re.compile(r"(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)\.")


def ldm_name(name: str, layout: UNetLayout = SDXL_LAYOUT) -> str | None:
    """A diffusers UNet module name as the original (ldm/sgm) UNet's, as diffusers' and ComfyUI's converters map
    them (``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in``); ``None`` for a name with no
    counterpart in ``layout``."""
    if name in _BASIC:
        return _BASIC[name]
    per, levels = layout.layers_per_block + 1, len(layout.up_attention)
    if m := _BLOCK.fullmatch(name):
        side, b, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if kind == "resnets":
            rest = _RESNET.get(rest, "")
        child = 0 if kind == "resnets" else 1
        if not rest or b >= levels:
            return None
        if side == "down":
            return f"input_blocks.{1 + b * per + j}.{child}.{rest}" if j < layout.layers_per_block else None
        if j > layout.layers_per_block or (child and not layout.up_attention[b]):
            return None
        return f"output_blocks.{b * per + j}.{child}.{rest}"
    if m := _MID.fullmatch(name):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}" if j == 0 else None
        return f"middle_block.{2 * j}.{_RESNET[rest]}" if j < 2 and rest in _RESNET else None
    if m := _SAMPLER.fullmatch(name):
        b = int(m[2] if m[2] is not None else m[3])
        if b >= levels - 1:  # the deepest down level and the last up level have no resampler
            return None
        if m[2] is not None:
            return f"input_blocks.{(b + 1) * per}.0.op"
        return f"output_blocks.{b * per + layout.layers_per_block}.{2 if layout.up_attention[b] else 1}.conv"
    return None


def layout_of(names: Iterable[str]) -> UNetLayout | None:
    """The layout of a diffusers UNet from its module (or weight) names, all of them; ``None`` when the names are
    not a diffusers UNet's."""
    names = list(names)
    res = [int(m[1]) for n in names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)(\.|$)", n))]
    ups = [int(m[1]) for n in names if (m := re.match(r"up_blocks\.(\d+)(\.|$)", n))]
    if not res or not ups:
        return None
    attn = {int(m[1]) for n in names if (m := re.match(r"up_blocks\.(\d+)\.attentions(\.|$)", n))}
    return UNetLayout(max(res) + 1, tuple(b in attn for b in range(max(ups) + 1)))


def _file_keys(names: Iterable[str], family: str | None) -> dict[str, str]:
    """Module name -> the key it is written under: SDXL layers by their ldm names (what A1111 maps), the rest by
    their own. Names that are already ldm stay; if one name has no SDXL counterpart the file keeps diffusers names
    throughout (diffusers' loader drops sgm keys from a file that mixes both)."""
    names = list(names)
    if family == "sdxl":
        ldm = {n: n if _LDM.match(n) else ldm_name(n, SDXL_LAYOUT) for n in names}
        if all(ldm.values()):
            return {n: kohya_name(str(ldm[n])) for n in names}
    return {n: kohya_name(n) for n in names}


# -- base model ------------------------------------------------------------------------------------------------------
#: cross-attention context width -> family: CLIP-L (SD1.x), OpenCLIP-H (SD2.x), CLIP-L + OpenCLIP-bigG (SDXL)
CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_FAMILY_IDS = {"sd1": "sd1", "sd1.x": "sd1", "sd_v1": "sd1", "sd2": "sd2", "sd2.x": "sd2", "sd_v2": "sd2",
               "sdxl": "sdxl", "sdxl_base_v1-0": "sdxl"}
_KV = re.compile(r"attn2[._]to_[kv]$")


def family_id(name: str | None) -> str | None:
    """``"sd1"``/``"sd2"``/``"sdxl"`` for any spelling this project or kohya uses (``SD1.x``, ``sd_v2_v``, ...)."""
    if not name:
        return None
    key = name.strip().lower()
    return _FAMILY_IDS.get(key[: -len("_v")] if key.endswith("_v") else key)


def base_family(weights: ErasureWeights, family: str | None = None) -> str | None:
    """The base model family: ``family`` if given, else the cross-attention K/V layers' context width (768 SD1.x,
    1024 SD2.x, 2048 SDXL), else what the metadata says (``erasure.base_family`` or kohya's base model version);
    ``None`` when none says (e.g. the lab model, or a LoRA without K/V layers and without metadata)."""
    if family is not None:
        if family_id(family) is None:
            raise BadInputError(f"unknown model family {family!r}: use sd1, sd2 or sdxl")
        return family_id(family)
    widths = {s[1] for n, d in weights.deltas.items() if _KV.search(n) and len(s := d.shape) == 2}
    if len(widths) == 1 and (by_width := CONTEXT_WIDTHS.get(widths.pop())):
        return by_width
    meta = weights.metadata
    return family_id(meta.get(META_PREFIX + "base_family")) or family_id(meta.get("ss_base_model_version"))


def _v_prediction(weights: ErasureWeights, family: str, prediction: str | None) -> bool:
    """Whether the base model predicts v: ``prediction`` (``eps``/``epsilon``/``v``/``v_prediction``), else the
    metadata, else SD2.x means 768-v (its flagship models; what kohya's extraction tool assumes for v2)."""
    said = prediction or weights.metadata.get(META_PREFIX + "base_prediction") or ""
    if said.lower() in ("v", "v_prediction", "v-prediction"):
        return True
    if said.lower() in ("eps", "epsilon"):
        return False
    return family == "sd2"


# -- writing -----------------------------------------------------------------------------------------------------
def _keeps_factors(d: Delta, rank: int | None) -> bool:
    """A LoRA delta within ``rank`` is written with its own factors."""
    return d.up is not None and (rank is None or int(d.up.shape[1]) <= rank)


def _rank_written(d: Delta, rank: int | None) -> int:
    """The rank :func:`lora_tensors` writes ``d`` with: its own (a LoRA within ``rank``), else the identity
    factorisation's ``min(out, in)``, else the truncated SVD's ``min(rank, out, in)``."""
    if d.up is not None and _keeps_factors(d, rank):
        return int(d.up.shape[1])
    out_f, in_f = d.shape[0], int(torch.Size(d.shape[1:]).numel())
    return min(out_f, in_f) if rank is None else min(rank, out_f, in_f)


def lora_tensors(weights: ErasureWeights, rank: int | None = None, family: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], float]:
    """Kohya-keyed LoRA tensors and the relative Frobenius error of the factorisation (0.0 when exact). ``family``
    (else :func:`base_family`) decides the key names: SDXL's are ldm names. Every layer has scale 1: ``alpha =
    rank``, written when all layers share one rank (kohya's usual file). Layers of different ranks (exact
    factorisations) are written without ``alpha``, which every loader reads as ``alpha = rank``: diffusers' kohya
    converter drops the alphas of attention layers whose alpha differs from the file's most common one."""
    keys = _file_keys(weights.modules(), base_family(weights, family))
    with_alpha = len({_rank_written(d, rank) for d in weights.deltas.values()}) == 1
    tensors: dict[str, torch.Tensor] = {}
    err_num, err_den = 0.0, 0.0
    for name in weights.modules():
        d = weights.deltas[name]
        full = d.matrix().float()
        dw = full.flatten(1)  # a convolution's delta as [out, in * kh * kw]
        r = _rank_written(d, rank)
        if d.up is not None and d.down is not None and _keeps_factors(d, rank):
            up, down = d.up.float().flatten(1) * d.scale, d.down.float().flatten(1)
        elif rank is None:
            out_f, in_f = dw.shape
            if out_f <= in_f:
                up, down = torch.eye(out_f), dw.clone()
            else:
                up, down = dw.clone(), torch.eye(in_f)
        else:
            u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
            root = s[:r].sqrt()
            up, down = (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()
        err_num += float(((up @ down) - dw).pow(2).sum())
        err_den += float(dw.pow(2).sum())
        key = keys[name]
        if full.dim() == 4:
            up, down = up[:, :, None, None], down.reshape(down.shape[0], *full.shape[1:])
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        if with_alpha:
            tensors[f"{key}.alpha"] = torch.tensor(float(up.shape[1]))
    return tensors, (err_num / err_den) ** 0.5 if err_den > 0 else 0.0


#: ModelSpec architecture, implementation and resolution by family (kohya's ``library/sai_model_spec.py``)
_ARCH = {"sd1": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}
_IMPL = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}


def kohya_metadata(weights: ErasureWeights, rank: int | None = None, family: str | None = None,
                   prediction: str | None = None) -> dict[str, str]:
    """kohya's ``ss_*`` keys and ModelSpec 1.0.1's ``modelspec.*`` keys for a LoRA written with ``rank`` (as
    :func:`lora_tensors`), in sd-scripts' formats. A1111 and Forge list and filter LoRAs by ``ss_base_model_version``,
    ``ss_v2`` and ``modelspec.architecture``. Without a known family only the network keys are written. The keys
    that depend on the file (``ss_output_name``, ``modelspec.title``, ``modelspec.date``, the hashes) are added by
    :func:`write_lora`, so the same edit (e.g. a cached result) always has the same socket metadata."""
    ranks = {_rank_written(d, rank) for d in weights.deltas.values()}
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"  # resize_lora's word for per-layer ranks
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": dim,
            "ss_network_alpha": str(float(dim)) if dim != "Dynamic" else dim}  # alpha = rank: scale 1 everywhere
    fam = base_family(weights, family)
    if fam is None:
        return meta
    v = _v_prediction(weights, fam, prediction)
    version = "sdxl_base_v1-0" if fam == "sdxl" else f"sd_{'v2' if fam == 'sd2' else 'v1'}{'_v' if v else ''}"
    arch = _ARCH.get(fam) or ("stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512")
    res = 1024 if fam == "sdxl" else 768 if fam == "sd2" and v else 512
    meta.update({"ss_v2": str(fam == "sd2"), "ss_base_model_version": version,
                 "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": f"{arch}/lora",
                 "modelspec.implementation": _IMPL[fam], "modelspec.resolution": f"{res}x{res}",
                 "modelspec.prediction_type": "v" if v else "epsilon"})
    concepts = concepts_from_metadata(weights.metadata, META_PREFIX + "concepts")
    if concepts:
        method = weights.metadata.get(META_PREFIX + "method", "erasure")
        meta["modelspec.description"] = (f"Concept erasure ({method}) of: {', '.join(concepts)}. Made with "
                                         f"comfyui-concept-erasure {__version__}.")
    return meta


def file_metadata(weights: ErasureWeights, error: float, rank: int | None = None, family: str | None = None,
                  prediction: str | None = None) -> dict[str, str]:
    """The metadata every LoRA file of this library carries: the weights' own (method, concepts, settings, base
    model), the module names its keys stand for, the library version, the factorisation error, and kohya's and
    ModelSpec's keys (:func:`kohya_metadata`; ``rank`` as given to :func:`lora_tensors`)."""
    meta = {k: v for k, v in weights.metadata.items() if not k.startswith(("ss_", "sshs_", "modelspec."))}
    meta[META_PREFIX + "modules"] = json.dumps(weights.modules())
    meta[META_PREFIX + "version"] = __version__
    meta[META_PREFIX + "lora_relative_error"] = f"{error:.3e}"
    meta.update(kohya_metadata(weights, rank, family, prediction))
    return meta


def model_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """kohya's ``sshs_model_hash`` (SHA-256 of the file after its header: A1111's LoRA hash, Civitai's AutoV3) and
    ``sshs_legacy_hash``, computed as sd-scripts does (``precalculate_safetensors_hashes``)."""
    from safetensors.torch import save

    data = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def write_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str | Path) -> None:
    """Write LoRA tensors and metadata atomically (a crash or Cancel never leaves a truncated file). The file's name
    becomes ``ss_output_name`` (A1111's alias for ``<lora:NAME:1>``) and, with ModelSpec keys, ``modelspec.title``;
    ``modelspec.date`` is now (UTC) unless the metadata has one (a file saved again keeps its date); the hashes are
    added."""
    path = Path(path)
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["ss_output_name"] = path.stem
    if "modelspec.sai_model_spec" in meta:
        meta["modelspec.title"] = path.stem
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        meta.setdefault("modelspec.date", now.isoformat())
    data = {k: v.contiguous() for k, v in tensors.items()}
    meta.update(model_hashes(data, meta))
    atomic_save(data, path, meta)


def save_lora(weights: ErasureWeights, path: str | Path, rank: int | None = None, family: str | None = None,
              prediction: str | None = None) -> float:
    """Write ``weights`` as a kohya LoRA file. Returns the relative error of the factorisation. ``family``
    (``sd1``/``sd2``/``sdxl``) and ``prediction`` (``eps``/``v``) override what the weights and metadata say."""
    tensors, err = lora_tensors(weights, rank, family)
    write_lora(tensors, file_metadata(weights, err, rank, family, prediction), path)
    return err


# -- reading -----------------------------------------------------------------------------------------------------
def parse_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
               source: str = "the LoRA") -> ErasureWeights:
    """A kohya-style LoRA dict (a file's tensors, ComfyUI's LORA_MODEL socket) as LoRA deltas, checked. Layers
    keep their kohya names unless the metadata lists the module names (files of this library, whose SDXL keys are
    the listed names' ldm forms): resolve the rest against a model with :func:`resolve_names`."""
    check_lora_tensors(tensors, source)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    names: dict[str, str] = {}
    try:
        listed = json.loads(meta.get(META_PREFIX + "modules", "[]"))
        if isinstance(listed, list):
            for m in map(str, listed):
                names[kohya_name(m)] = m
                ldm = ldm_name(m, SDXL_LAYOUT)
                if ldm is not None:
                    names.setdefault(kohya_name(ldm), m)
    except (json.JSONDecodeError, TypeError):
        names = {}
    deltas: dict[str, Delta] = {}
    for k in tensors:
        if not k.endswith(".lora_down.weight"):
            continue
        base = k[: -len(".lora_down.weight")]
        up, down = tensors[base + ".lora_up.weight"], tensors[k]
        alpha = tensors.get(base + ".alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        deltas[names.get(base, base)] = Delta(up=up, down=down, scale=scale)
    return ErasureWeights(deltas, meta)


def load_lora(path: str | Path) -> ErasureWeights:
    """Read a kohya-format LoRA file (ours or anyone's) as LoRA deltas. Only safetensors are read."""
    path = Path(path)
    tensors, meta = read_safetensors(path)
    return parse_lora(tensors, meta, path.name)


def resolve_names(weights: ErasureWeights, modules: Mapping[str, nn.Module],
                  aliases: Mapping[str, str] | None = None) -> ErasureWeights:
    """``weights`` renamed to the module names of ``modules`` (a model's ``named_modules()``), checked.

    A layer may be named by the module's own name, its kohya name, or its name with dots as underscores, and the
    same forms of an alias (``aliases``: another layout's name -> the module's name, e.g. diffusers -> ldm). A
    diffusers UNet's modules also answer to their ldm names (SDXL files of kohya and of this library use them). A
    layer that matches no module, or whose shape differs, means the LoRA was made for another base model: refused
    with that reason."""
    layout = layout_of(modules)
    ldm = {a: n for n in modules if layout is not None and (a := ldm_name(n, layout)) is not None}
    lookup: dict[str, str] = {}
    for alias, name in [*((n, n) for n in modules), *(aliases or {}).items(), *ldm.items()]:
        for form in (alias, kohya_name(alias), alias.replace(".", "_")):
            lookup.setdefault(form, name)
    out: dict[str, Delta] = {}
    for k, d in weights.deltas.items():
        name = lookup.get(k)
        weight = getattr(modules.get(name), "weight", None) if name is not None else None
        if not isinstance(weight, torch.Tensor):
            raise BadInputError(f"the LoRA layer {k!r} does not exist in this model: the LoRA was made for another "
                                "base model (e.g. SD1.5 vs SDXL); use it with the model it was made for")
        if d.shape != tuple(weight.shape):
            raise BadInputError(f"the LoRA layer {k!r} has shape {d.shape}, this model's "
                                f"{tuple(weight.shape)}: the LoRA was made for another base model")
        out[name] = d
    return ErasureWeights(out, dict(weights.metadata))
