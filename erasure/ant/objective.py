"""ANT's objective: the stage targets, a batch of training samples, and the loss of the edited model on it.

Per sample, a guided DDIM trajectory of the concept prompt gives an early latent ``x+`` (high noise: the image's
structure) and a mid/late one ``x-``; the frozen model's predictions ``eps_u``, ``eps_c`` there give the targets

    early:      eps_u + w eta (eps_c - eps_u)     (keep the guidance direction)
    mid/late:   eps_u - w eta (eps_c - eps_u)     (reverse it)

regressed by the edited model's conditional prediction (``w = 1``) or its guided one ``eps*_u + w (eps*_c - eps*_u)``
(``w`` the guidance scale): at ``eta = 1`` the early target and the ``L_u`` terms are fixed points of the unedited
model, so the structure stage is kept, not shrunk,

and the loss is ``L_erase + a1 L_u(late) + a2 (L_enh + a1 L_u(early))`` with the anchor-free preservation terms
``L_u = ||eps*_u - eps_u||^2`` carrying gradient (the reference's single-concept code computes them under no_grad),
plus the project's optional preservation term on prompts without the concept (docs/ant.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..backbone import Backbone, TextConditioning
from ..deltas import HookedDeltas
from .settings import AUTO_CHECKPOINT_CELLS, AUTO_CHECKPOINT_PARAMS, AntSettings


def stage_targets(eu_early: torch.Tensor, ec_early: torch.Tensor, eu_late: torch.Tensor, ec_late: torch.Tensor,
                  eta: float, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(early target keeping the guidance direction, mid/late target reversing it), at ``scale`` times the concept's
    direction: 1 for the conditional prediction, the guidance scale for the guided one. The early target is what the
    unedited model predicts (a fixed point, whatever ``eta``); the late one reverses ``eta`` of the direction (the
    paper scales both by ``eta``: at its value, 1, the two agree)."""
    return eu_early + scale * (ec_early - eu_early), eu_late - scale * eta * (ec_late - eu_late)


@dataclass
class Batch:
    """Training samples: the early and late latents of some trajectories, their timesteps, conditionings and the
    frozen model's predictions there."""

    x_early: torch.Tensor
    t_early: torch.Tensor
    x_late: torch.Tensor
    t_late: torch.Tensor
    cond: TextConditioning
    eu_early: torch.Tensor
    ec_early: torch.Tensor
    eu_late: torch.Tensor
    ec_late: torch.Tensor
    #: optional preservation samples: other prompts at the same latents, with the frozen model's predictions
    pres_cond: TextConditioning | None = None
    pres_early: torch.Tensor | None = None
    pres_late: torch.Tensor | None = None
    #: the preservation samples' own latents (``preserve_latents="own"``); None: the batch's latents
    pres_x_early: torch.Tensor | None = None
    pres_x_late: torch.Tensor | None = None
    #: optional learned-token prompts (adversarial erasure), one per sample: regressed at the late latents onto the
    #: concept prompt's reversed target (docs/ant.md#adversarial)
    adv_cond: TextConditioning | None = None


@torch.no_grad()
def add_preservation(backbone: Backbone, deltas: HookedDeltas | None, b: Batch, prompts: TextConditioning,
                     which: list[int], own: torch.Tensor | None = None, gen: torch.Generator | None = None) -> int:
    """Attach preservation targets to ``b``: prompts ``which`` (rows of ``prompts``) at the batch's latents, or
    (``own``: one clean latent per prompt) at those prompts' own latents noised with ``gen`` to the batch's
    timesteps, with the frozen model's predictions. Returns the UNet evaluations spent."""
    cond = prompts[which]
    if own is not None:
        x0 = own[which].to(b.x_early)
        noise = torch.randn((2, *x0.shape), generator=gen).to(x0)
        b.pres_x_early = backbone.schedule.add_noise(x0, noise[0], b.t_early)
        b.pres_x_late = backbone.schedule.add_noise(x0, noise[1], b.t_late)
    x = torch.cat([b.x_early, b.x_late]) if own is None else torch.cat([b.pres_x_early, b.pres_x_late])
    t = torch.cat([b.t_early, b.t_late])
    ctx = deltas.disabled() if deltas is not None else contextlib.nullcontext()
    with ctx:
        eps = backbone.predict_noise(x, t, TextConditioning.cat([cond, cond]))
    b.pres_cond, (b.pres_early, b.pres_late) = cond, eps.split(len(which))
    return 2 * len(which)


def _predictions(backbone: Backbone, b: Batch, uncond: TextConditioning, s: AntSettings
                 ) -> tuple[torch.Tensor, int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """One batched forward of the edited model over the batch's rows: the UNet output and, per loss term, the
    (prediction, target) pair it regresses."""
    n = b.x_early.shape[0]
    xs = [b.x_early, b.x_late, b.x_early, b.x_late]
    ts = [b.t_early, b.t_late, b.t_early, b.t_late]
    conds = [b.cond, b.cond, uncond.repeat(n), uncond.repeat(n)]
    if b.pres_cond is not None:
        px_e = b.x_early if b.pres_x_early is None else b.pres_x_early
        px_l = b.x_late if b.pres_x_late is None else b.pres_x_late
        xs, ts, conds = xs + [px_e, px_l], ts + [b.t_early, b.t_late], conds + [b.pres_cond, b.pres_cond]
    if b.adv_cond is not None:  # appended last: without it the forward is the same rows as before
        xs, ts, conds = xs + [b.x_late], ts + [b.t_late], conds + [b.adv_cond]
    eps = backbone.predict_noise(torch.cat(xs), torch.cat(ts), TextConditioning.cat(conds)).float()
    pc_e, pc_l, pu_e, pu_l = eps.split(n)[:4]
    if s.prediction == "guided":
        p_e, p_l = pu_e + s.guidance * (pc_e - pu_e), pu_l + s.guidance * (pc_l - pu_l)
    else:
        p_e, p_l = pc_e, pc_l
    scale = s.guidance if s.prediction == "guided" else 1.0
    enh, erase = stage_targets(b.eu_early.float(), b.ec_early.float(), b.eu_late.float(), b.ec_late.float(), s.eta,
                               scale)
    pairs = {"erase": (p_l, erase), "u_late": (pu_l, b.eu_late.float()), "enh": (p_e, enh),
             "u_early": (pu_e, b.eu_early.float())}
    if b.pres_cond is not None:
        pp_e, pp_l = eps.split(n)[4:6]
        pairs["pres_early"], pairs["pres_late"] = (pp_e, b.pres_early.float()), (pp_l, b.pres_late.float())
    if b.adv_cond is not None:
        # the learned token's prediction, guided with the same unconditional one, onto the concept's reversed
        # target: whatever brings the concept back is pushed where the concept word is
        pa_l = eps.split(n)[-1]
        pairs["adversarial"] = (pu_l + s.guidance * (pa_l - pu_l) if s.prediction == "guided" else pa_l, erase)
    return eps, n, pairs


def _combine(parts: dict[str, torch.Tensor], s: AntSettings) -> torch.Tensor:
    """The loss from its terms (scalars, or one value per group of rows)."""
    loss = parts["erase"] + s.a1 * parts["u_late"] + s.a2 * (parts["enh"] + s.a1 * parts["u_early"])
    if "preserve" in parts:
        loss = loss + s.preserve * parts["preserve"]
    if "adversarial" in parts:
        loss = loss + s.adversarial_weight * parts["adversarial"]
    return loss


def ant_loss(backbone: Backbone, b: Batch, uncond: TextConditioning, s: AntSettings
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """The ANT loss of the backbone as it is now (the edited model), in one batched forward of 4B rows (6B with
    preservation samples, B more with learned-token prompts)."""
    _, _, pairs = _predictions(backbone, b, uncond, s)
    mse = nn.functional.mse_loss
    parts = {k: mse(*pairs[k]) for k in ("erase", "u_late", "enh", "u_early")}
    if "pres_early" in pairs:
        parts["preserve"] = 0.5 * (mse(*pairs["pres_early"]) + mse(*pairs["pres_late"]))
    if "adversarial" in pairs:
        parts["adversarial"] = mse(*pairs["adversarial"])
    return _combine(parts, s), {k: float(v.detach()) for k, v in parts.items()}


def ant_losses(backbone: Backbone, b: Batch, uncond: TextConditioning, s: AntSettings, groups: int
               ) -> torch.Tensor:
    """The ANT loss of each of ``groups`` equal runs of the batch's samples (``cat_batches`` of several concepts'
    batches, each trained by its own LoRA slot), from one forward: ``[groups]``, entry ``k`` what ``ant_loss`` gives
    for concept ``k``'s batch alone (to float rounding)."""
    _, _, pairs = _predictions(backbone, b, uncond, s)

    def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # per group: its rows' elements
        return (pred - target).pow(2).reshape(groups, -1).mean(1)

    parts = {k: mse(*pairs[k]) for k in ("erase", "u_late", "enh", "u_early")}
    if "pres_early" in pairs:
        parts["preserve"] = 0.5 * (mse(*pairs["pres_early"]) + mse(*pairs["pres_late"]))
    if "adversarial" in pairs:
        raise ValueError("adversarial erasure trains one concept at a time")
    return _combine(parts, s)


def cat_batches(batches: list[Batch]) -> Batch:
    """Several batches as one, field by field (the same optional fields set in all)."""
    out = {}
    for f in dataclasses.fields(Batch):
        vals = [getattr(b, f.name) for b in batches]
        if vals[0] is None:
            out[f.name] = None
        elif isinstance(vals[0], TextConditioning):
            out[f.name] = TextConditioning.cat(vals)
        else:
            out[f.name] = torch.cat(vals)
    return Batch(**out)


def use_checkpointing(backbone: Backbone, s: AntSettings) -> bool:
    """Whether the training forward asks for gradient checkpointing (``s.gradient_checkpointing``; "auto": a UNet
    of at least ``AUTO_CHECKPOINT_PARAMS`` parameters, or a latent of more than ``AUTO_CHECKPOINT_CELLS`` cells)."""
    if s.gradient_checkpointing != "auto":
        return s.gradient_checkpointing == "on"
    _, h, w = backbone.latent_shape(s.resolution)
    params = sum(p.numel() for p in backbone.unet().parameters())
    return params >= AUTO_CHECKPOINT_PARAMS or h * w > AUTO_CHECKPOINT_CELLS
