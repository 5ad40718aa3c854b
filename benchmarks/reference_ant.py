"""ANT's published algorithm, as the benchmark's yardstick (not part of the library; never used to erase).

Single concept, as the reference code does it:

* a frozen copy of the UNet beside the one being trained (two full models in memory);
* saliency: for each prompt augmentation x seed, a trajectory generated from noise, the loss's gradient over the
  *whole* UNet, the top fraction of |grad| kept, the maps intersected (the reference sorts ascending, a bug; the
  cost is the same either way, and this keeps the largest);
* training: every parameter of the UNet trainable under one Adam (full first and second moments), masked gradients;
  at **every iteration** the trajectory is regenerated from noise with the model being trained (guided DDIM, one
  image, up to the drawn mid/late step), then the frozen copy predicts at the two latents; the edited model's
  unconditional predictions are taken under ``no_grad`` (the reference's bug: its preservation terms carry no
  gradient, which also makes its backward cheaper); no preservation prompts (the project's addition).

Multi concept: per concept a rank-64, alpha-1 LoRA (AdamW) with the same per-iteration regeneration and the guided
prediction, then MACE's published fusion (``reference_mace.reference_fuse``). Which projections the reference's LoRA
covers is taken to be the cross-attention K/V that the fusion consumes.

The single-concept draws (trajectory, early and late step) come from the library's ``draw`` with the same generator
and seed as ours, so both train on the same schedule of samples (``counts.py`` replays it).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from erasure.ant import AntSettings, draw, run_trajectory, stage_targets, trajectory_plan
from erasure.backbone import TextConditioning
from erasure.deltas import TrainableLoRA
from erasure.diffusers_backbone import DiffusersBackbone
from erasure.prompts import augmented_prompts
from erasure.sampling import ddim_timesteps, guided_eps


def frozen_copy(bb: DiffusersBackbone) -> DiffusersBackbone:
    """A second backbone over a deep copy of the UNet, sharing the text encoders (the reference's original
    model). Make it before a ``Meter`` starts."""
    return DiffusersBackbone(copy.deepcopy(bb.unet()), bb.text_encoders, bb.tokenizers, bb.schedule.alphas_cumprod,
                             bb.prediction_type, None, bb.hidden_layer, name=bb.name + "-frozen")


@torch.no_grad()
def regenerate(bb: DiffusersBackbone, cond: TextConditioning, uncond: TextConditioning, seed: int,
               ts: torch.Tensor, guidance: float, upto: int) -> list[torch.Tensor]:
    """One trajectory from noise with the model as it is now: the latents before steps 0..upto."""
    xs, _, _ = run_trajectory(bb, cond, uncond, [seed], ts, guidance, upto, None)
    return xs


def _loss(edited: DiffusersBackbone, frozen: DiffusersBackbone, x_e: torch.Tensor, x_l: torch.Tensor,
          t_e: torch.Tensor, t_l: torch.Tensor, cond: TextConditioning, uncond: TextConditioning, s: AntSettings,
          uncond_grad: bool) -> torch.Tensor:
    """The ANT loss with the frozen model's targets; the edited model's predictions at both latents."""
    n = x_e.shape[0]
    un = uncond.repeat(n)
    with torch.no_grad():
        _, eu_e, ec_e = guided_eps(frozen, x_e, t_e, cond, un, 1.0)
        _, eu_l, ec_l = guided_eps(frozen, x_l, t_l, cond, un, 1.0)
    x2, t2 = torch.cat([x_e, x_l]), torch.cat([t_e, t_l])
    if uncond_grad:
        eps = edited.predict_noise(torch.cat([x2, x2]), torch.cat([t2, t2]),
                                   TextConditioning.cat([cond, cond, un, un])).float()
        pc_e, pc_l, pu_e, pu_l = eps.split(n)
    else:
        pc_e, pc_l = edited.predict_noise(x2, t2, TextConditioning.cat([cond, cond])).float().split(n)
        with torch.no_grad():
            pu_e, pu_l = edited.predict_noise(x2, t2, TextConditioning.cat([un, un])).float().split(n)
    if s.prediction == "guided":
        pc_e, pc_l = pu_e + s.guidance * (pc_e - pu_e), pu_l + s.guidance * (pc_l - pu_l)
    enh, erase = stage_targets(eu_e.float(), ec_e.float(), eu_l.float(), ec_l.float(), s.eta,
                               s.guidance if s.prediction == "guided" else 1.0)
    mse = nn.functional.mse_loss
    return (mse(pc_l, erase) + s.a1 * mse(pu_l, eu_l.float())
            + s.a2 * (mse(pc_e, enh) + s.a1 * mse(pu_e, eu_e.float())))


def _sample(edited: DiffusersBackbone, frozen: DiffusersBackbone, prompts: list[str], seeds: list[int],
            enc: dict[str, TextConditioning], uncond: TextConditioning, idx: list[int], ke: list[int], kl: list[int],
            s: AntSettings, uncond_grad: bool) -> torch.Tensor:
    """Regenerate each drawn trajectory (one image at a time, as the reference does), then the loss."""
    ts = ddim_timesteps(s.trajectory_steps, edited.schedule.num_timesteps)
    xe, xl = [], []
    for i, a, b in zip(idx, ke, kl, strict=True):
        xs = regenerate(edited, enc[prompts[i]], uncond, seeds[i], ts, s.guidance, b)
        xe.append(xs[a])
        xl.append(xs[b])
    cond = TextConditioning.cat([enc[prompts[i]] for i in idx])
    dev = edited.device
    return _loss(edited, frozen, torch.cat(xe), torch.cat(xl), ts[ke].to(dev), ts[kl].to(dev), cond, uncond, s,
                 uncond_grad)


def reference_ant_single(bb: DiffusersBackbone, frozen: DiffusersBackbone, concept: str, s: AntSettings,
                         templates: list[str] | None = None, n_preserve: int = 0) -> dict[str, float]:
    """The published single-concept loop. ``bb``'s UNet is trained in place (the benchmark's throwaway model).

    ``n_preserve``: how many preservation prompts ours draws from (it draws one index per sample from the same
    generator after each ``draw``); the reference makes the same draw and ignores it, so that both follow the same
    sequence of trajectories and steps."""
    prompts = augmented_prompts(concept, (), s.kind, templates)
    plan_prompts, seeds = trajectory_plan(prompts, s.trajectories, s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    uncond = bb.encode_text([""])
    enc = {p: bb.encode_text([p]) for p in dict.fromkeys(plan_prompts)}
    unet = bb.unet()
    params = dict(unet.named_parameters())
    unet.requires_grad_(True)
    # saliency over the whole UNet: one map per augmentation x seed, each from a freshly generated trajectory
    n_late = s.trajectory_steps - s.early_steps
    late = sorted({s.early_steps + round(i * (n_late - 1) / 7) for i in range(min(8, n_late))})
    early = [i % s.early_steps for i in range(len(late))]
    mask: dict[str, torch.Tensor] | None = None
    for j in range(min(s.saliency_maps, s.trajectories)):
        unet.zero_grad(set_to_none=True)
        ts = ddim_timesteps(s.trajectory_steps, bb.schedule.num_timesteps)
        xs = regenerate(bb, enc[plan_prompts[j]], uncond, seeds[j], ts, s.guidance, max(late))
        cond = enc[plan_prompts[j]].repeat(len(late))
        loss = _loss(bb, frozen, torch.cat([xs[k] for k in early]), torch.cat([xs[k] for k in late]),
                     ts[early].to(bb.device), ts[late].to(bb.device), cond, uncond, s, uncond_grad=False)
        loss.backward()
        flat = torch.cat([p.grad.detach().abs().float().flatten() for p in params.values() if p.grad is not None])
        keep = max(1, int(s.saliency_fraction * flat.numel()))
        threshold = flat.kthvalue(flat.numel() - keep + 1).values
        del flat
        m = {n: (p.grad.abs().float() >= threshold) if p.grad is not None else torch.zeros_like(p, dtype=torch.bool)
             for n, p in params.items()}
        mask = m if mask is None else {n: mask[n] & m[n] for n in mask}
    assert mask is not None
    unet.zero_grad(set_to_none=True)
    opt = torch.optim.Adam(params.values(), lr=s.lr)
    for _ in range(s.steps):
        idx, ke, kl = draw(gen, s.trajectories, s)
        if n_preserve:
            torch.randint(0, n_preserve, (s.batch_size,), generator=gen)
        loss = _sample(bb, frozen, plan_prompts, seeds, enc, uncond, idx, ke, kl, s, uncond_grad=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                p.grad.mul_(mask[n])
        opt.step()
    kept = sum(int(v.sum()) for v in mask.values()) / sum(v.numel() for v in mask.values())
    return {"selected_fraction": kept}


def reference_ant_multi(bb: DiffusersBackbone, concepts: list[str], s: AntSettings, prior_caches: dict,
                        rank: int = 64) -> None:
    """Per concept a rank-64 LoRA trained with per-iteration regeneration, then the published fusion."""
    from erasure.prompts import Concept

    from .reference_mace import reference_fuse

    uncond = bb.encode_text([""])
    loras = []
    for c in concepts:
        prompts = augmented_prompts(c, (), s.kind)
        plan_prompts, seeds = trajectory_plan(prompts, s.trajectories, s.seed)
        gen = torch.Generator().manual_seed(s.seed)
        enc = {p: bb.encode_text([p]) for p in dict.fromkeys(plan_prompts)}
        with TrainableLoRA(bb.cross_attention_kv(), rank=rank, alpha=1.0, generator=gen) as lora:
            frozen = _Disabled(bb, lora)
            opt = torch.optim.AdamW(lora.parameters(), lr=s.lr)
            for _ in range(s.steps):
                idx, ke, kl = draw(gen, s.trajectories, s)
                loss = _sample(bb, frozen, plan_prompts, seeds, enc, uncond, idx, ke, kl, s, uncond_grad=True)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            loras.append(lora.result())
    reference_fuse(bb, [Concept(c, "", s.kind) for c in concepts], loras, None, prior_caches, lam=0.1, preserve=1.0)


class _Disabled:
    """The frozen model of a LoRA run: the same backbone with the LoRA switched off."""

    def __init__(self, bb: DiffusersBackbone, lora: TrainableLoRA) -> None:
        self.bb, self.lora = bb, lora

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        with self.lora.disabled():
            return self.bb.predict_noise(x, t, cond)
