"""Which weights ANT trains: the layers of each scope, and the paper's weight-saliency mask for single concepts."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..backbone import Backbone, gradient_checkpointing
from ..errors import BadInputError
from ..progress import Progress, as_progress
from .objective import ant_loss, use_checkpointing
from .settings import SCOPES, AntSettings
from .sources import Trajectories, cached_batch


def scope_modules(backbone: Backbone, scope: str) -> dict[str, nn.Module]:
    """The layers a scope trains: ``saliency`` every Linear/Conv2d of the UNet (entries chosen later), ``xattn``
    the cross-attention projections, ``non-xattn`` every Linear/Conv2d outside cross-attention, ``kv`` (dense) and
    ``lora`` (low rank) the cross-attention K/V projections (what the fusion combines)."""
    mods = {n: m for n, m in backbone.unet().named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if scope == "saliency":
        return mods
    if scope == "xattn":
        return {n: m for n, m in mods.items() if ".attn2." in n and isinstance(m, nn.Linear)}
    if scope == "non-xattn":
        return {n: m for n, m in mods.items() if ".attn2." not in n}
    if scope in ("kv", "lora"):
        return dict(backbone.cross_attention_kv())
    raise BadInputError(f"scope must be one of {', '.join(SCOPES)} (got {scope!r})")


def top_fraction_mask(grads: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Per weight tensor: True for its entries with the largest |grad|, the top ``fraction`` of that tensor (ties at
    the threshold kept), as the reference ranks (one threshold over all layers is SalUn's rule). The reference's
    ascending sort keeps the smallest: a bug not copied."""
    out = {}
    for n, g in grads.items():
        flat = g.detach().abs().float().flatten()
        keep = max(1, math.ceil(fraction * flat.numel()))
        threshold = flat.kthvalue(flat.numel() - keep + 1).values if flat.is_cpu else \
            flat.cpu().kthvalue(flat.numel() - keep + 1).values.to(flat.device)
        out[n] = g.detach().abs().float() >= threshold
    return out


def saliency_masks(backbone: Backbone, tr: Trajectories, modules: dict[str, nn.Module], s: AntSettings,
                   progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], float, int, int]:
    """Gradients of the ANT loss at the pretrained weights, one map per trajectory (an augmentation x seed pair) of
    the first ``saliency_maps``; each map keeps its top ``saliency_fraction``; the maps are intersected.

    Each map's loss pairs every early step with up to 8 mid/late steps spread over the trajectory. Returns the masks,
    the fraction of entries kept, the UNet forwards and the backwards spent. Weights' ``requires_grad`` flags are
    restored; no optimizer step is taken.
    """
    progress = as_progress(progress)
    weights = {n: m.weight for n, m in modules.items()}
    flags = {n: w.requires_grad for n, w in weights.items()}
    uncond = backbone.encode_text([""])
    n_late = s.trajectory_steps - s.early_steps
    late = sorted({s.early_steps + round(i * (n_late - 1) / 7) for i in range(min(8, n_late))})
    early = [i % s.early_steps for i in range(len(late))]
    mask: dict[str, torch.Tensor] | None = None
    fwd = bwd = 0
    ckpt = use_checkpointing(backbone, s)
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for j in range(min(s.saliency_maps, len(tr.seeds))):
            progress.check()
            enc = {tr.prompts[j]: backbone.encode_text([tr.prompts[j]])}
            b = cached_batch(backbone, tr, [j] * len(late), early, late, enc)
            # 4 x up to 8 rows with gradients for every weight of the UNet: checkpointed like the training forward
            with torch.enable_grad(), gradient_checkpointing(backbone, True) if ckpt else contextlib.nullcontext():
                loss, _ = ant_loss(backbone, b, uncond, s)
                grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            fwd += 4 * len(late)
            bwd += 1
            g = {n: (gr if gr is not None else torch.zeros_like(weights[n])) for n, gr in zip(weights, grads,
                                                                                               strict=True)}
            m = top_fraction_mask(g, s.saliency_fraction)
            mask = m if mask is None else {n: mask[n] & m[n] for n in mask}
    finally:
        for n, w in weights.items():
            w.requires_grad_(flags[n])
    assert mask is not None
    total = sum(v.numel() for v in mask.values())
    kept = sum(int(v.sum()) for v in mask.values())
    return mask, kept / total, fwd, bwd
