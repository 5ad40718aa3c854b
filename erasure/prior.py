"""The prior-preservation Gram matrix ``C = sum_p p p^T`` over the tokens of general prompts, cached on disk.

``C`` depends only on the text encoder and the prompt set, never on a UNet layer: one ``D x D`` matrix serves all
K/V matrices of all layers (MACE's reference recomputes and caches two matrices per layer). It is normalised per
prompt (divided by the number of prompts), so the preservation weight means the same whatever the set's size. The
cache key hashes the text encoder's weights, the prompts and the conditioning layer; a stale or corrupt file is
rebuilt (the file carries its content hash, checked on load with its shape: ``files.load_cache``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .backbone import Backbone
from .files import load_cache, save_cache


def text_encoder_hash(backbone: Backbone) -> str:
    h = hashlib.sha256()
    for enc in getattr(backbone, "text_encoders", []):
        for name, p in enc.state_dict().items():
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(str(getattr(backbone, "hidden_layer", "")).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def token_embeddings(backbone: Backbone, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """All token embeddings (padding included: the UNet sees it) of the prompts, [n_prompts, L, D] float64."""
    out = []
    for i in range(0, len(prompts), batch_size):
        out.append(backbone.encode_text(prompts[i : i + batch_size]).embeds.double().cpu())
    return torch.cat(out)


def gram(backbone: Backbone, prompts: list[str], cache_dir: Path | None = None) -> torch.Tensor:
    """``C`` (float64, D x D) for ``prompts``, from the disk cache when valid."""
    if not prompts:
        raise ValueError("the prior-preservation prompt set is empty")
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([text_encoder_hash(backbone), prompts]).encode()).hexdigest()[:24]
        path = Path(cache_dir) / "gram" / f"{key}.safetensors"
        d = backbone.cross_attention_kv()
        dim = next(iter(d.values())).weight.shape[1] if d else None
        cached = load_cache(path, {"gram": (dim, dim)})  # None when missing, corrupt (hash) or of another shape
        if cached is not None and bool(torch.isfinite(cached["gram"]).all()):
            return cached["gram"]
    e = token_embeddings(backbone, prompts)
    flat = e.reshape(-1, e.shape[-1])
    c = (flat.T @ flat) / len(prompts)
    if path is not None:
        save_cache({"gram": c}, path, {"prompts": str(len(prompts))})
    return c


def protected_complement(g: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    """``(I - V V^T, k)`` for a token Gram ``g``: ``V`` its top-``k`` eigenvectors, the fewest holding ``energy`` of
    its trace. A K/V change multiplied by it on the right leaves the keys and values of those directions (what the
    prompts behind ``g`` are made of) as they were (``protect`` of ANT and MACE: docs/ant.md#protect)."""
    ev, vec = torch.linalg.eigh(g.double())
    ev, vec = ev.flip(0).clamp_min(0), vec.flip(1)
    k = min(int((ev.cumsum(0) / ev.sum() < energy).sum()) + 1, g.shape[0])
    v = vec[:, :k]
    return (torch.eye(g.shape[0], dtype=torch.float64) - v @ v.T).float(), k
