"""LoRA files and LoRA dicts: the one place that reads, names and writes them.

Keys are kohya's (``lora_unet_<module_path_with_underscores>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``),
which ComfyUI's LoraLoader, A1111/Forge and diffusers' ``load_lora_weights`` all read. A dense delta is written
*exactly* as the identity factorisation (``up = I, down = dW`` or ``up = dW, down = I``, whichever has the smaller
rank): ``I @ dW`` reproduces ``dW`` bit for bit. ``rank=r`` writes a truncated SVD instead and reports the relative
error. The command line, the library and every node write the same tensors and metadata through
:func:`lora_tensors` and :func:`file_metadata`; read-back metadata is untrusted text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .errors import BadInputError
from .files import atomic_save, read_safetensors
from .validation import check_lora_tensors
from .weights import META_PREFIX, Delta, ErasureWeights

KOHYA_PREFIX = "lora_unet_"


def kohya_name(module: str) -> str:
    """``down_blocks.0.attentions.0...to_k`` -> ``lora_unet_down_blocks_0_attentions_0_..._to_k``."""
    return KOHYA_PREFIX + module.replace(".", "_")


# -- writing -----------------------------------------------------------------------------------------------------
def lora_tensors(weights: ErasureWeights, rank: int | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """Kohya-keyed LoRA tensors and the relative Frobenius error of the factorisation (0.0 when exact)."""
    tensors: dict[str, torch.Tensor] = {}
    err_num, err_den = 0.0, 0.0
    for name in weights.modules():
        d = weights.deltas[name]
        full = d.matrix().float()
        dw = full.flatten(1)  # a convolution's delta as [out, in * kh * kw]
        if d.up is not None and (rank is None or d.rank <= rank):
            up, down = d.up.float().flatten(1) * d.scale, d.down.float().flatten(1)
        elif rank is None:
            out_f, in_f = dw.shape
            if out_f <= in_f:
                up, down = torch.eye(out_f), dw.clone()
            else:
                up, down = dw.clone(), torch.eye(in_f)
        else:
            u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
            r = min(rank, s.shape[0])
            root = s[:r].sqrt()
            up, down = (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()
        err_num += float(((up @ down) - dw).pow(2).sum())
        err_den += float(dw.pow(2).sum())
        key = kohya_name(name)
        if full.dim() == 4:
            up, down = up[:, :, None, None], down.reshape(down.shape[0], *full.shape[1:])
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(up.shape[1]))
    return tensors, (err_num / err_den) ** 0.5 if err_den > 0 else 0.0


def file_metadata(weights: ErasureWeights, error: float) -> dict[str, str]:
    """The metadata every LoRA file of this library carries: the weights' own (method, concepts, settings, base
    model), the module names its keys stand for, the library version, the factorisation error, and the network
    module other tools read."""
    meta = dict(weights.metadata)
    meta[META_PREFIX + "modules"] = json.dumps(weights.modules())
    meta[META_PREFIX + "version"] = __version__
    meta[META_PREFIX + "lora_relative_error"] = f"{error:.3e}"
    meta["ss_network_module"] = "networks.lora"
    return meta


def write_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str | Path) -> None:
    """Write LoRA tensors and metadata atomically (a crash or Cancel never leaves a truncated file)."""
    atomic_save({k: v.contiguous() for k, v in tensors.items()}, Path(path), {str(k): str(v) for k, v in
                                                                             metadata.items()})


def save_lora(weights: ErasureWeights, path: str | Path, rank: int | None = None) -> float:
    """Write ``weights`` as a kohya LoRA file. Returns the relative error of the factorisation."""
    tensors, err = lora_tensors(weights, rank)
    write_lora(tensors, file_metadata(weights, err), path)
    return err


# -- reading -----------------------------------------------------------------------------------------------------
def parse_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
               source: str = "the LoRA") -> ErasureWeights:
    """A kohya-style LoRA dict (a file's tensors, ComfyUI's LORA_MODEL socket) as LoRA deltas, checked. Layers
    keep their kohya names unless the metadata lists the module names (files of this library): resolve the rest
    against a model with :func:`resolve_names`."""
    check_lora_tensors(tensors, source)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    names: dict[str, str] = {}
    try:
        listed = json.loads(meta.get(META_PREFIX + "modules", "[]"))
        if isinstance(listed, list):
            names = {kohya_name(str(m)): str(m) for m in listed}
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
    same forms of an alias (``aliases``: another layout's name -> the module's name, e.g. diffusers -> ldm). A layer
    that matches no module, or whose shape differs, means the LoRA was made for another base model: refused with
    that reason."""
    lookup: dict[str, str] = {}
    for alias, name in [*((n, n) for n in modules), *(aliases or {}).items()]:
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
