"""Optional on-disk cache of erasure results, so a finished erasure is not trained again after a restart.

ComfyUI's own cache already skips a node whose inputs did not change, but only while the server runs and only for
the exact graph. This one is keyed by what determines the result, hashed in full:

- the UNet's weights as loaded (so a LoRA or any patch applied upstream counts), the text encoder's weights as
  loaded and the layer each of its encoders conditions with (CLIP Set Last Layer: ``comfy_backbone.clip_layers``),
  and the sampling schedule (prediction type, sigmas);
- every setting and text of the node, the user's images and masks (MACE);
- the pack's own source code and the library version (any change of the code invalidates every entry).

Entries are safetensors files in ``output/erasure-cache/<key>.safetensors`` (the output folder survives restarts,
ComfyUI empties its temp folder at start), written atomically. Dense deltas that are mostly zero (ANT's saliency
scope) are stored as index/value pairs. On load the key, a digest of every tensor and each delta's shape against the
model are checked; an entry that fails is deleted and the result is trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import folder_paths
import torch

from ..erasure import __version__
from ..erasure.files import atomic_save
from ..erasure.weights import Delta, ErasureWeights
from .comfy_backbone import clip_layers

FOLDER = "erasure-cache"
FORMAT = "1"
_META = "cache."
_PACK = Path(__file__).resolve().parents[1]


def cache_folder() -> Path:
    return Path(folder_paths.get_output_directory()) / FOLDER


def _update(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu().reshape(-1)
    h.update(f"{name}|{t.dtype}|{t.numel()}".encode())
    h.update(t.view(torch.uint8).numpy())


def _source_digest() -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in sorted([*(_PACK / "erasure").rglob("*.py"), *(_PACK / "nodes").rglob("*.py")]):
        h.update(p.relative_to(_PACK).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def result_key(method: str, backbone, settings: dict, tensors: dict[str, torch.Tensor] | None = None) -> str:
    """The entry's name: a hash of the loaded weights, schedule, settings, user tensors and code. Call it after
    ``backbone.load()``, so that the UNet's weights include the MODEL's patches."""
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps({"format": FORMAT, "library": __version__, "code": _source_digest(), "method": method,
                         "family": backbone.family, "v_prediction": backbone.v_prediction,
                         "clip_layers": clip_layers(backbone.clip), "settings": settings},
                        sort_keys=True, default=str).encode())
    _update(h, "sigmas", backbone.patcher.get_model_object("model_sampling").sigmas)
    for name, t in backbone.unet().state_dict().items():
        _update(h, "unet." + name, t)
    backbone.clip.load_model()  # applies the CLIP's own patches (a LoRA's text-encoder part)
    for name, t in backbone.clip.cond_stage_model.state_dict().items():
        _update(h, "clip." + name, t)
    for name, t in sorted((tensors or {}).items()):
        _update(h, "user." + name, t)
    backbone.load()  # the UNet back on its device, should loading the CLIP have moved it
    return h.hexdigest()


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(tensors):
        _update(h, name, tensors[name])
    return h.hexdigest()


def save(key: str, weights: ErasureWeights) -> Path:
    """Write the result atomically (exact: float32, sparse deltas as indices and values)."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, list] = {}
    for i, (name, d) in enumerate(sorted(weights.deltas.items())):
        if d.dense is None:
            tensors[f"{i}.up"], tensors[f"{i}.down"] = d.up.float().contiguous(), d.down.float().contiguous()
            layout[name] = [i, "lora", d.scale]
            continue
        m = d.dense.detach().float().cpu()
        nz = m.reshape(-1).nonzero().reshape(-1)
        if nz.numel() * 3 < m.numel():  # index (8 bytes) + value (4) beats 4 bytes per entry below 1/3 density
            tensors[f"{i}.index"], tensors[f"{i}.value"] = nz, m.reshape(-1)[nz].contiguous()
            layout[name] = [i, "sparse", list(m.shape)]
        else:
            tensors[f"{i}.dense"] = m.contiguous()
            layout[name] = [i, "dense"]
    meta = dict(weights.metadata) | {_META + "key": key, _META + "layout": json.dumps(layout),
                                     _META + "digest": _tensor_digest(tensors)}
    path = cache_folder() / f"{key}.safetensors"
    atomic_save(tensors, path, meta)
    return path


def load(key: str, unet: torch.nn.Module) -> ErasureWeights | None:
    """The cached result for ``key``, or ``None`` when there is none or it fails a check (then it is deleted)."""
    from safetensors import safe_open

    path = cache_folder() / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get(_META + "key") != key:
            raise ValueError("the key inside differs from the file name")
        if meta.get(_META + "digest") != _tensor_digest(tensors):
            raise ValueError("the tensors do not match their digest")
        modules = dict(unet.named_modules())
        deltas = {}
        for name, (i, kind, *rest) in json.loads(meta[_META + "layout"]).items():
            if kind == "lora":
                d = Delta(up=tensors[f"{i}.up"], down=tensors[f"{i}.down"], scale=float(rest[0]))
            elif kind == "sparse":
                dense = torch.zeros(int(torch.tensor(rest[0]).prod()))
                dense[tensors[f"{i}.index"]] = tensors[f"{i}.value"]
                d = Delta(dense=dense.view(*rest[0]))
            else:
                d = Delta(dense=tensors[f"{i}.dense"])
            if name not in modules or tuple(d.matrix().shape) != tuple(modules[name].weight.shape):
                raise ValueError(f"its layer {name} does not fit this model")
            deltas[name] = d
    except Exception as e:  # noqa: BLE001 - any unreadable entry is rebuilt, never trusted
        logging.warning("erasure cache: %s is unreadable or corrupt (%s); training again", path.name, e)
        path.unlink(missing_ok=True)
        return None
    return ErasureWeights(deltas, {k: v for k, v in meta.items() if not k.startswith(_META)})
