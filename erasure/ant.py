"""ANT (Li et al., ACMMM 2025): erase a concept by reversing classifier-free guidance in the mid-to-late steps.

The objective (``shared/docs/ALGORITHMS.md``), per training sample: a DDIM trajectory of the concept prompt with
guidance (the spec's: from the frozen model; ours by default: from the edited model, see below); an early step
``k+`` (high noise, lays out the structure) and a mid/late step ``k-``; the frozen predictions ``eps_u``, ``eps_c``
at both latents; targets

    early:      eps_u + eta (eps_c - eps_u)     (keep the guidance direction)
    mid/late:   eps_u - eta (eps_c - eps_u)     (reverse it)

and the loss ``L_erase + a1 L_u(late) + a2 (L_enh + a1 L_u(early))`` with the anchor-free preservation terms
``L_u = ||eps*_u - eps_u||^2`` carrying gradient (the reference single-concept code computes them under no_grad).

Where the project differs from the reference code on purpose:

* Training latents come, by default, from the edited model's own trajectories, regenerated from noise as training
  goes (``sampling="on-policy"``: the reference's loop, over 10 DDIM steps instead of 50; see ``reuse``). The project's
  ``sampling="cached"`` computes frozen-model trajectories and the frozen predictions along them **once**
  (``Trajectories``), so that a step costs only the edited model's forwards and backward, and refreshes them every
  ``refresh_every`` steps; on the concept lab it did not erase (README), so it is an option, not the default.
* Each regenerated on-policy trajectory (run to the last mid/late step) serves ``reuse`` training steps (default 8)
  at newly drawn steps, with the frozen model queried once per latent: 0.56x the UNet evaluations of a new
  trajectory per step (``reuse=1``, the reference's loop); at 150 steps it met every single-concept bar on the lab
  at 5 training seeds of 8, ``reuse=1`` at 6; at 250 steps (the default, the reference's) at 7 of 8 (README, "ANT
  from the command line").
* The saliency mask keeps the entries with the **largest** |grad| of each map (the reference's ascending sort keeps
  the smallest), intersected over prompt augmentations and seeds, and training touches only those entries through a
  sparse delta (``SparseDeltas``): optimizer state is proportional to the selection, not to the UNet.
* Saliency covers the weights of every Linear and Conv2d layer of the UNet (norms and biases, <1% of the
  parameters, are not edited).
* The default scope is dense cross-attention K/V (the layers that read the prompt), not the saliency mask (which
  stays available) nor every cross-attention Linear (``xattn``: Q and the output projection act on the image
  features of every prompt, and cost specificity): measured on the lab.
* The multi-concept path trains each concept's edit on the same K/V projections (dense, or a LoRA), so that MACE's
  closed-form fusion (which combines K/V effects) is exact per concept rather than an approximation.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from . import validation
from .backbone import Backbone, TextConditioning, gradient_checkpointing
from .deltas import SparseDeltas, TrainableDeltas, TrainableLoRA, _HookedDeltas
from .guards import entry_point
from .prompts import CONCEPT_TEMPLATES
from .sampling import ddim_step, ddim_timesteps, guided_eps, initial_noise
from .weights import Delta, ErasureWeights, _meta

SCOPES = ("saliency", "xattn", "non-xattn", "kv", "lora")
PREDICTIONS = ("cond", "guided")
SAMPLINGS = ("on-policy", "cached")
CHECKPOINTING = ("auto", "on", "off")
#: ``gradient_checkpointing="auto"`` turns checkpointing on for UNets of at least this many parameters (SDXL's
#: 2.57 G; SD1.5's 860 M stays off) or latents of more than this many cells (images above 512 px with an 8x VAE).
#: Projected at 16-bit weights with the default 6 training rows (README, Benchmarks): SD1.5 at 512 px needs 7.0 GiB
#: without it (under the 10 GiB target, so the ~1 extra forward per step is not paid), SDXL at 1024 px 48.3 GiB
AUTO_CHECKPOINT_PARAMS, AUTO_CHECKPOINT_CELLS = 1_500_000_000, 64 * 64
#: the multi-concept path's fusion settings. Measured on the lab (circle; green; striped, the same three ANT edits
#: fused, 4-seed evaluation): MACE's lam 0.1 / preserve 1.0 -> efficacy 0.65 (8 seeds), lam 0.1 / 0.1 -> 0.75,
#: lam 0.01 / 0.1 -> 0.79 with specificity 1.00; without prior preservation specificity fell to 0.50
FUSE_LAM, FUSE_PRESERVE = 0.01, 0.1
#: how strongly each concept's edit enters the fusion (its target is ``W0 + strength dW_i``). Where the concepts'
#: prompt tokens overlap (shared words, end token, padding), the least-squares fusion averages their edits and each
#: concept keeps only part of its own; measured on the lab (circle; green; striped, 8-seed evaluation, fusion balanced
#: per concept), training seeds 0 / 1 / 2: strength 1.0 -> efficacy 0.917 / 0.896 / 0.792, 1.25 -> 0.958 / 0.938 /
#: 0.854, specificity 0.964 / 0.955 / 0.982 -> 0.929 / 0.946 / 0.955 (1.5 on seed 0: 0.958, specificity 0.911)
FUSE_STRENGTH = 1.25


class TrainingDivergedError(FloatingPointError):
    """A loss or a weight became NaN/inf; nothing is returned."""


@dataclass(frozen=True)
class AntSettings:
    """Every ANT setting, with the defaults used everywhere (CLI, nodes, lab). Reference values in comments."""

    #: The defaults below were measured on the concept lab (README, "ANT"): erasing ``circle`` with them, over
    #: training seeds 0-7 (8-seed evaluation), gives mean efficacy 0.97, generality 0.94, specificity 0.98,
    #: fidelity 0.912, every single-concept bar met at 7 seeds of 8. Where they differ from the reference, the
    #: reference value is in the comment and the reason in the README.
    #: Training steps. Measured (scope kv, reuse 8, seeds 0-7): 150 -> bars met at 5 of 8 (generality 0.625-0.750
    #: at three seeds, mean 0.852), 250 -> 7 of 8 (mean generality 0.938)
    steps: int = 250  # reference 250
    #: training steps per concept on the multi-concept path (``ant_multi``). Measured on the lab (circle; green;
    #: striped, 8-seed evaluation, before the fusion strength and balance): 150 -> efficacy 0.708, 300 -> 0.896,
    #: 400 -> 0.792 (run-to-run noise is large)
    multi_steps: int = 300
    lr: float = 1e-3  # reference 5e-4 (Adam), for the full-UNet / saliency scope
    batch_size: int = 1  # reference 1
    trajectory_steps: int = 10  # DDIM steps of the training trajectories (reference 50)
    early_steps: int = 1  # the first ``early_steps`` of them are the early (structure) stage (reference ~4 of 50)
    guidance: float = 7.5  # guidance of the trajectories, and of the edited model's guided prediction
    eta: float = 1.0
    a1: float = 2.5
    a2: float = 0.5
    #: weight of the project's preservation term (not in the paper): the edited model's conditional prediction for
    #: prompts *without* the concept must match the frozen one at the same latents (0 = the paper's objective)
    preserve: float = 5.0  # lab sweep (cached sampling): 0 -> specificity 0.81, 1 -> 0.86, 5 -> 0.92
    preserve_prompts: int = 64  # how many of the prior-preservation prompts are used
    #: which prediction of the edited model is regressed: its conditional one, or its guided one
    #: (``eps*_u + guidance (eps*_c - eps*_u)``, as in the reference's multi-concept code). Measured on the lab:
    #: with "cond" the initial loss is tiny (late-step guidance differences are small) and Adam's noise dominates;
    #: "guided" amplifies the concept's direction by the guidance scale and the loss falls (README, ANT table).
    prediction: str = "guided"
    #: where the training latents come from. "on-policy": trajectories regenerated from noise with the edited model
    #: (with ``reuse=1`` at every step, up to the drawn late step: the reference's loop); "cached": frozen-model
    #: trajectories computed once (and refreshed every ``refresh_every`` steps), so that a step costs only the
    #: training forwards.
    #: Measured on the lab (circle): cached never erases (efficacy 0.06; 0.75 refreshed every 25 steps), on-policy
    #: does (1.00) -- the edited model's own samples are what must stop showing the concept
    sampling: str = "on-policy"
    trajectories: int = 16  # cached trajectories and saliency maps: augmentations cycled, new seeds each cycle
    refresh_every: int = 25  # cached sampling: regenerate the trajectories with the edited model every N steps
    #: on-policy sampling: each regenerated trajectory (run to its last mid/late step) serves this many training
    #: steps, each at newly drawn early/late steps, with the frozen predictions at its latents computed once
    #: (1 = the reference's loop: a new trajectory for every step). 8 costs 2,908 UNet forwards for 250 steps
    #: instead of 5,156 (1,744 instead of 3,050 for 150). Measured on the lab (circle, 8-seed evaluation, 1 thread;
    #: README, "ANT from the command line"), runs meeting every single-concept bar at 150 steps: scope kv, training
    #: seeds 0-7: reuse 8 in 5 of 8 (mean H 0.927), reuse 1 in 6 of 8 (mean H 0.944); scope xattn, seeds 0-5:
    #: reuse 8 in 3 of 6, reuse 1 in 2 of 6. Reuse 8 at 250 steps: 7 of 8 (mean H 0.960), in the time reuse 1
    #: takes for 150
    reuse: int = 8  # the reference: 1
    #: ``reuse`` on the multi-concept path (K/V edits). Measured on the lab (circle; green; striped, seeds 0 / 1 / 2):
    #: reuse 1 -> efficacy 0.958 / 0.938 / 0.854, reuse 8 -> 0.875 / 0.812 / 0.812
    multi_reuse: int = 1
    #: what is trained. Measured on the lab (circle, 8-seed evaluation, seeds 0-5, reuse 8, 150 steps): kv (dense
    #: cross-attention K/V, the layers that read the prompt) -> mean specificity 0.966, lowest 0.931, fidelity
    #: 0.913; xattn (every cross-attention Linear, also Q and the output, which act on every prompt's image
    #: features) -> 0.928, lowest 0.875, fidelity 0.899; saliency (the paper's single-concept mask over the whole
    #: UNet; 12.8% kept, seed 0) at this lr erases as well but specificity 0.23 -- it needs a smaller lr (1e-4:
    #: efficacy 0.50 on-policy)
    scope: str = "kv"  # reference: saliency
    saliency_fraction: float = 0.5  # fraction of entries each saliency map keeps (before intersecting)
    saliency_maps: int = 8  # maps intersected: the first N trajectories (prompt augmentations x seeds)
    lora_rank: int = 4
    grad_clip: float = 1.0
    resolution: int | None = None
    seed: int = 0
    kind: str = "object"  # which prompt templates augment the concept (object, person, style, nudity)
    #: gradient checkpointing of the training forward (``ant_loss``): "on" recomputes each UNet block's activations
    #: during backward instead of keeping them (about one extra forward of the training rows per step), "off" keeps
    #: them, "auto" is on for large UNets or latents (``AUTO_CHECKPOINT_PARAMS``, ``AUTO_CHECKPOINT_CELLS``). No-op
    #: on a backbone without checkpointing support
    gradient_checkpointing: str = "auto"

    def override(self, **kw: object) -> AntSettings:
        unknown = [k for k in kw if k not in asdict(self)]
        if unknown:
            raise ValueError(f"unknown ANT settings: {', '.join(unknown)}")
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def validate(self) -> None:
        """Reject bad settings before any expensive work, naming the fix."""
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1 (got {self.steps})")
        if self.multi_steps < 1:
            raise ValueError(f"multi_steps must be >= 1 (got {self.multi_steps})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"the learning rate must be a positive number (got {self.lr})")
        if self.batch_size < 1 or self.trajectories < 1:
            raise ValueError("batch_size and trajectories must be >= 1")
        if not 0 < self.early_steps < self.trajectory_steps:
            raise ValueError(f"early_steps must be between 1 and trajectory_steps - 1 "
                             f"(got {self.early_steps} of {self.trajectory_steps})")
        if not 0 < self.saliency_fraction <= 1:
            raise ValueError(f"saliency_fraction must be in (0, 1] (got {self.saliency_fraction})")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)} (got {self.sampling!r})")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)} (got {self.prediction!r})")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)} (got {self.scope!r})")
        if self.gradient_checkpointing not in CHECKPOINTING:
            raise ValueError(f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING)} "
                             f"(got {self.gradient_checkpointing!r})")
        if self.kind not in CONCEPT_TEMPLATES:
            raise ValueError(f"kind must be one of {', '.join(CONCEPT_TEMPLATES)} (got {self.kind!r})")
        for k in ("eta", "a1", "a2", "guidance", "grad_clip", "preserve"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{k} must be a finite number >= 0 (got {v})")
        if self.reuse < 1 or self.multi_reuse < 1:
            raise ValueError(f"reuse and multi_reuse must be >= 1 (got {self.reuse}, {self.multi_reuse})")
        if self.refresh_every < 0 or self.lora_rank < 1 or self.saliency_maps < 1:
            raise ValueError("refresh_every must be >= 0, lora_rank and saliency_maps >= 1")


# -- the objective -----------------------------------------------------------------------------------------------
def stage_targets(eu_early: torch.Tensor, ec_early: torch.Tensor, eu_late: torch.Tensor, ec_late: torch.Tensor,
                  eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(early target keeping the guidance direction, mid/late target reversing it)."""
    return eu_early + eta * (ec_early - eu_early), eu_late - eta * (ec_late - eu_late)


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


@torch.no_grad()
def add_preservation(backbone: Backbone, deltas: _HookedDeltas | None, b: Batch, prompts: TextConditioning,
                     which: list[int]) -> int:
    """Attach preservation targets to ``b``: prompts ``which`` (rows of ``prompts``) at the batch's latents, with the
    frozen model's predictions. Returns the UNet evaluations spent."""
    cond = prompts[which]
    x = torch.cat([b.x_early, b.x_late])
    t = torch.cat([b.t_early, b.t_late])
    ctx = deltas.disabled() if deltas is not None else contextlib.nullcontext()
    with ctx:
        eps = backbone.predict_noise(x, t, TextConditioning.cat([cond, cond]))
    b.pres_cond, (b.pres_early, b.pres_late) = cond, eps.split(len(which))
    return 2 * len(which)


def ant_loss(backbone: Backbone, b: Batch, uncond: TextConditioning, s: AntSettings
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """The ANT loss of the backbone as it is now (the edited model), in one batched forward of 4B."""
    n = b.x_early.shape[0]
    xs = [b.x_early, b.x_late, b.x_early, b.x_late]
    ts = [b.t_early, b.t_late, b.t_early, b.t_late]
    conds = [b.cond, b.cond, uncond.repeat(n), uncond.repeat(n)]
    if b.pres_cond is not None:
        xs, ts, conds = xs + [b.x_early, b.x_late], ts + [b.t_early, b.t_late], conds + [b.pres_cond, b.pres_cond]
    eps = backbone.predict_noise(torch.cat(xs), torch.cat(ts), TextConditioning.cat(conds)).float()
    pc_e, pc_l, pu_e, pu_l = eps.split(n)[:4]
    if s.prediction == "guided":
        p_e, p_l = pu_e + s.guidance * (pc_e - pu_e), pu_l + s.guidance * (pc_l - pu_l)
    else:
        p_e, p_l = pc_e, pc_l
    enh, erase = stage_targets(b.eu_early.float(), b.ec_early.float(), b.eu_late.float(), b.ec_late.float(), s.eta)
    mse = nn.functional.mse_loss
    parts = {"erase": mse(p_l, erase), "u_late": mse(pu_l, b.eu_late.float()), "enh": mse(p_e, enh),
             "u_early": mse(pu_e, b.eu_early.float())}
    loss = parts["erase"] + s.a1 * parts["u_late"] + s.a2 * (parts["enh"] + s.a1 * parts["u_early"])
    if b.pres_cond is not None:
        pp_e, pp_l = eps.split(n)[4:]
        parts["preserve"] = 0.5 * (mse(pp_e, b.pres_early.float()) + mse(pp_l, b.pres_late.float()))
        loss = loss + s.preserve * parts["preserve"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def use_checkpointing(backbone: Backbone, s: AntSettings) -> bool:
    """Whether the training forward asks for gradient checkpointing (``s.gradient_checkpointing``; "auto": a UNet
    of at least ``AUTO_CHECKPOINT_PARAMS`` parameters, or a latent of more than ``AUTO_CHECKPOINT_CELLS`` cells)."""
    if s.gradient_checkpointing != "auto":
        return s.gradient_checkpointing == "on"
    _, h, w = backbone.latent_shape(s.resolution)
    params = sum(p.numel() for p in backbone.unet().parameters())
    return params >= AUTO_CHECKPOINT_PARAMS or h * w > AUTO_CHECKPOINT_CELLS


# -- trajectories ------------------------------------------------------------------------------------------------
@dataclass
class Trajectories:
    """Guided DDIM trajectories and the frozen model's predictions along them (``[N, S, C, h, w]``, on CPU)."""

    prompts: list[str]
    seeds: list[int]
    timesteps: torch.Tensor  # [S]
    latents: torch.Tensor
    eps_u: torch.Tensor
    eps_c: torch.Tensor


def trajectory_plan(prompts: list[str], n: int, seed: int) -> tuple[list[str], list[int]]:
    """Trajectory i uses prompt ``i % len(prompts)`` and its own seed, so augmentations are cycled first."""
    return [prompts[i % len(prompts)] for i in range(n)], [seed * 100_003 + i for i in range(n)]


def _run(backbone: Backbone, cond: TextConditioning, uncond: TextConditioning, seeds: list[int], ts: torch.Tensor,
         guidance: float, upto: int, resolution: int | None,
         check_interrupt: Callable[[], None] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                                     list[torch.Tensor]]:
    """Latents before each of the first ``upto`` + 1 steps, with the current model's eps_u, eps_c at the first
    ``upto``."""
    abar = backbone.schedule.alphas_cumprod.to(backbone.device)
    x = initial_noise(seeds, backbone.latent_shape(resolution)).to(backbone.device, backbone.dtype)
    xs, eus, ecs = [x], [], []
    for i in range(upto):
        if check_interrupt is not None:  # every step, so that Cancel is answered within one UNet call
            check_interrupt()
        t = int(ts[i])
        g, eu, ec = guided_eps(backbone, x, t, cond, uncond.repeat(len(seeds)), guidance)
        eus.append(eu)
        ecs.append(ec)
        x = ddim_step(abar, x, g, t, int(ts[i + 1]) if i + 1 < len(ts) else -1, backbone.clip_denoised)
        xs.append(x)
    return xs, eus, ecs


@torch.no_grad()
def build_trajectories(backbone: Backbone, prompts: list[str], s: AntSettings, deltas: _HookedDeltas | None = None,
                       chunk: int = 8, check_interrupt: Callable[[], None] | None = None) -> tuple[Trajectories, int]:
    """Trajectories of the model as it is now; the predictions stored are the *frozen* model's.

    With ``deltas`` (on-policy refresh) the trajectories follow the edited model and the frozen predictions are
    recomputed along them with the deltas switched off. Returns the trajectories and the UNet evaluations spent.
    """
    plan_prompts, seeds = trajectory_plan(prompts, s.trajectories, s.seed)
    ts = ddim_timesteps(s.trajectory_steps, backbone.schedule.num_timesteps)
    uncond = backbone.encode_text([""])
    lat, eus, ecs = [], [], []
    evals = 0
    for start in range(0, len(seeds), chunk):
        if check_interrupt is not None:
            check_interrupt()
        ps, ss = plan_prompts[start:start + chunk], seeds[start:start + chunk]
        cond = backbone.encode_text(ps)
        xs, eu, ec = _run(backbone, cond, uncond, ss, ts, s.guidance, len(ts) - 1, s.resolution, check_interrupt)
        evals += 2 * len(ss) * (len(ts) - 1)
        xs = xs[:-1]
        if deltas is not None:
            with deltas.disabled():
                eu, ec = [], []
                for i, x in enumerate(xs):
                    _, u, c = guided_eps(backbone, x, int(ts[i]), cond, uncond.repeat(len(ss)), 1.0)
                    eu.append(u)
                    ec.append(c)
            evals += 2 * len(ss) * len(xs)
        lat.append(torch.stack(xs, 1).cpu())
        eus.append(torch.stack(eu, 1).cpu())
        ecs.append(torch.stack(ec, 1).cpu())
    # the last DDIM step (t smallest) is never a training sample: it has no successor worth preserving
    return Trajectories(plan_prompts, seeds, ts[:-1], torch.cat(lat), torch.cat(eus), torch.cat(ecs)), evals


def draw(gen: torch.Generator, n_traj: int, s: AntSettings) -> tuple[list[int], list[int], list[int]]:
    """Which trajectories, early steps and mid/late steps a training step uses (the same draws whether or not
    trajectories are cached)."""
    late_steps = s.trajectory_steps - 1 - s.early_steps
    idx = torch.randint(0, n_traj, (s.batch_size,), generator=gen).tolist()
    ke = torch.randint(0, s.early_steps, (s.batch_size,), generator=gen).tolist()
    kl = (s.early_steps + torch.randint(0, late_steps, (s.batch_size,), generator=gen)).tolist()
    return idx, ke, kl


def cached_batch(backbone: Backbone, tr: Trajectories, idx: list[int], ke: list[int], kl: list[int],
                 enc: dict[str, TextConditioning]) -> Batch:
    dev, dt = backbone.device, backbone.dtype

    def pick(a: torch.Tensor, ks: list[int]) -> torch.Tensor:
        return torch.stack([a[i, k] for i, k in zip(idx, ks, strict=True)]).to(dev, dt)

    return Batch(pick(tr.latents, ke), tr.timesteps[ke].to(dev), pick(tr.latents, kl), tr.timesteps[kl].to(dev),
                 TextConditioning.cat([enc[tr.prompts[i]] for i in idx]), pick(tr.eps_u, ke), pick(tr.eps_c, ke),
                 pick(tr.eps_u, kl), pick(tr.eps_c, kl))


@torch.no_grad()
def uncached_batch(backbone: Backbone, deltas: _HookedDeltas, prompts: list[str], seeds: list[int], idx: list[int],
                   ke: list[int], kl: list[int], enc: dict[str, TextConditioning], uncond: TextConditioning,
                   s: AntSettings, check_interrupt: Callable[[], None] | None = None) -> tuple[Batch, int]:
    """The reference's way: regenerate each drawn trajectory from noise with the edited model, up to its late step,
    then query the frozen model at the two latents. Returns the batch and the UNet evaluations spent."""
    ts = ddim_timesteps(s.trajectory_steps, backbone.schedule.num_timesteps)
    xe, xl, evals = [], [], 0
    for i, a, b in zip(idx, ke, kl, strict=True):
        xs, _, _ = _run(backbone, enc[prompts[i]], uncond, [seeds[i]], ts, s.guidance, b, s.resolution,
                        check_interrupt)
        evals += 2 * b
        xe.append(xs[a])
        xl.append(xs[b])
    x_e, x_l = torch.cat(xe), torch.cat(xl)
    cond = TextConditioning.cat([enc[prompts[i]] for i in idx])
    t_e, t_l = ts[ke].to(backbone.device), ts[kl].to(backbone.device)
    with deltas.disabled():
        _, eu_e, ec_e = guided_eps(backbone, x_e, t_e, cond, uncond.repeat(len(idx)), 1.0)
        _, eu_l, ec_l = guided_eps(backbone, x_l, t_l, cond, uncond.repeat(len(idx)), 1.0)
    return Batch(x_e, t_e, x_l, t_l, cond, eu_e, ec_e, eu_l, ec_l), evals + 4 * len(idx)


@dataclass
class ReusedTrajectories:
    """On-policy trajectories regenerated once and reused for ``reuse`` steps: per batch row the latents before each
    DDIM step, and the frozen predictions at the latents used so far (keyed by row and step)."""

    idx: list[int]
    latents: list[list[torch.Tensor]]
    frozen: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@torch.no_grad()
def regenerate(backbone: Backbone, prompts: list[str], seeds: list[int], idx: list[int],
               enc: dict[str, TextConditioning], uncond: TextConditioning, s: AntSettings,
               check_interrupt: Callable[[], None] | None = None) -> tuple[ReusedTrajectories, int]:
    """The drawn trajectories with the edited model, up to the last step a draw can pick. Returns them and the UNet
    evaluations spent."""
    ts = ddim_timesteps(s.trajectory_steps, backbone.schedule.num_timesteps)
    upto = s.trajectory_steps - 2
    lat = [_run(backbone, enc[prompts[i]], uncond, [seeds[i]], ts, s.guidance, upto, s.resolution,
                check_interrupt)[0] for i in idx]
    return ReusedTrajectories(list(idx), lat), 2 * upto * len(idx)


@torch.no_grad()
def reused_batch(backbone: Backbone, deltas: _HookedDeltas, tr: ReusedTrajectories, prompts: list[str],
                 ke: list[int], kl: list[int], enc: dict[str, TextConditioning], uncond: TextConditioning,
                 s: AntSettings) -> tuple[Batch, int]:
    """A batch from reused trajectories (row r of the batch is trajectory ``tr.idx[r]``); frozen predictions only at
    latents not queried before. Returns the batch and the UNet evaluations spent."""
    ts = ddim_timesteps(s.trajectory_steps, backbone.schedule.num_timesteps)
    need = list(dict.fromkeys((r, k) for r, pair in enumerate(zip(ke, kl, strict=True)) for k in pair
                              if (r, k) not in tr.frozen))
    if need:
        x = torch.cat([tr.latents[r][k] for r, k in need])
        cond = TextConditioning.cat([enc[prompts[tr.idx[r]]] for r, _ in need])
        with deltas.disabled():
            _, eu, ec = guided_eps(backbone, x, ts[[k for _, k in need]].to(backbone.device), cond,
                                   uncond.repeat(len(need)), 1.0)
        for j, key in enumerate(need):
            tr.frozen[key] = (eu[j:j + 1], ec[j:j + 1])
    rows = range(len(tr.idx))

    def pick(ks: list[int], which: int) -> torch.Tensor:
        return torch.cat([tr.frozen[(r, k)][which] for r, k in zip(rows, ks, strict=True)])

    x_e = torch.cat([tr.latents[r][k] for r, k in zip(rows, ke, strict=True)])
    x_l = torch.cat([tr.latents[r][k] for r, k in zip(rows, kl, strict=True)])
    cond = TextConditioning.cat([enc[prompts[i]] for i in tr.idx])
    return Batch(x_e, ts[ke].to(backbone.device), x_l, ts[kl].to(backbone.device), cond, pick(ke, 0), pick(ke, 1),
                 pick(kl, 0), pick(kl, 1)), 2 * len(need)


# -- saliency ----------------------------------------------------------------------------------------------------
def scope_modules(backbone: Backbone, scope: str) -> dict[str, nn.Module]:
    """The layers a scope trains: ``saliency`` every Linear/Conv2d of the UNet (entries chosen later), ``xattn``
    the cross-attention projections, ``non-xattn`` every Linear/Conv2d outside cross-attention, ``kv`` (dense) and
    ``lora`` (low rank) the cross-attention K/V projections (what MACE's fusion combines)."""
    mods = {n: m for n, m in backbone.unet().named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if scope == "saliency":
        return mods
    if scope == "xattn":
        return {n: m for n, m in mods.items() if ".attn2." in n and isinstance(m, nn.Linear)}
    if scope == "non-xattn":
        return {n: m for n, m in mods.items() if ".attn2." not in n}
    if scope in ("kv", "lora"):
        return dict(backbone.cross_attention_kv())
    raise ValueError(f"scope must be one of {', '.join(SCOPES)} (got {scope!r})")


def top_fraction_mask(grads: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Per map: True for the entries with the largest |grad| (the top ``fraction`` of all entries of the map,
    ties at the threshold kept)."""
    flat = torch.cat([g.detach().abs().float().flatten().cpu() for g in grads.values()])
    keep = max(1, math.ceil(fraction * flat.numel()))
    threshold = flat.kthvalue(flat.numel() - keep + 1).values
    return {n: (g.detach().abs().float() >= threshold.to(g.device)) for n, g in grads.items()}


def saliency_masks(backbone: Backbone, tr: Trajectories, modules: dict[str, nn.Module], s: AntSettings,
                   check_interrupt: Callable[[], None] | None = None,
                   ) -> tuple[dict[str, torch.Tensor], float, int, int]:
    """Gradients of the ANT loss at the pretrained weights, one map per trajectory (an augmentation x seed pair) of
    the first ``saliency_maps``; each map keeps its top ``saliency_fraction``; the maps are intersected.

    Each map's loss pairs every early step with up to 8 mid/late steps spread over the trajectory. Returns the masks,
    the fraction of entries kept, the UNet forwards and the backwards spent. Weights' ``requires_grad`` flags are
    restored; no optimizer step is taken.
    """
    weights = {n: m.weight for n, m in modules.items()}
    flags = {n: w.requires_grad for n, w in weights.items()}
    uncond = backbone.encode_text([""])
    n_late = s.trajectory_steps - 1 - s.early_steps
    late = sorted({s.early_steps + round(i * (n_late - 1) / 7) for i in range(min(8, n_late))})
    early = [i % s.early_steps for i in range(len(late))]
    mask: dict[str, torch.Tensor] | None = None
    fwd = bwd = 0
    ckpt = use_checkpointing(backbone, s)
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for j in range(min(s.saliency_maps, len(tr.seeds))):
            if check_interrupt is not None:
                check_interrupt()
            enc = {tr.prompts[j]: backbone.encode_text([tr.prompts[j]])}
            b = cached_batch(backbone, tr, [j] * len(late), early, late, enc)
            # 4 x up to 8 rows with gradients for every weight of the UNet: the largest activation footprint of
            # the saliency scope, checkpointed like the training forward when that is
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


# -- training ----------------------------------------------------------------------------------------------------
@dataclass
class AntResult:
    weights: ErasureWeights
    trainable_params: int
    total_params: int  # entries of the layers in scope
    selected_fraction: float | None  # the saliency mask's share of those entries
    unet_forwards: int
    unet_backwards: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    optimizer_state_bytes: int = 0


def concept_prompts_for(concept: str, synonyms: list[str] | tuple[str, ...] = (), kind: str = "object",
                        templates: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The concept's prompt augmentations: every template with the concept and with each synonym."""
    words = [concept] + [w for w in synonyms if w.strip() and w.strip().lower() != concept.strip().lower()]
    temps = list(templates) if templates else list(CONCEPT_TEMPLATES[kind])
    return [t.replace("{c}", w) for t in temps for w in words]


def _trainable(backbone: Backbone, s: AntSettings, masks: dict[str, torch.Tensor] | None,
               gen: torch.Generator) -> _HookedDeltas:
    mods = scope_modules(backbone, s.scope)
    if s.scope == "saliency":
        assert masks is not None
        return SparseDeltas(mods, masks)
    if s.scope == "lora":
        return TrainableLoRA(mods, rank=s.lora_rank, generator=gen)
    return TrainableDeltas(mods)


@entry_point("ANT", "the resolution, batch_size, trajectories or trajectory_steps, or use scope 'lora'")
def ant(backbone: Backbone, concept: str, settings: AntSettings | None = None, synonyms: tuple[str, ...] = (),
        templates: list[str] | tuple[str, ...] | None = None, cache: bool | None = None,
        preserve_prompts: list[str] | None = None,
        progress: Callable[[int], None] | None = None, check_interrupt: Callable[[], None] | None = None,
        log: Callable[[str], None] | None = None) -> AntResult:
    """Erase one concept. ``templates`` (with ``{c}``) and ``synonyms`` make the prompt augmentations: the
    trajectories' prompts and the saliency maps' prompts. ``cache`` overrides ``settings.sampling``: ``False``
    is the on-policy loop (with ``reuse=1``: same draws, same result as cached with ``refresh_every=1``).
    ``preserve_prompts``:
    prompts without the concept for the preservation term (default: the project's prior set minus the concept)."""
    s = settings or AntSettings()
    s.validate()
    validation.check_learning_rate(s.lr)
    concept = validation.check_concept(concept)
    validation.check_resolution(s.resolution)
    if cache is None:
        cache = s.sampling == "cached"
    t0 = time.time()
    prompts = concept_prompts_for(concept.strip(), synonyms, s.kind, templates)
    for word in (concept, *synonyms):  # each word must fit whole in the prompts made from it
        validation.check_fits_context(backbone, word, concept_prompts_for(word, (), s.kind, templates))
    validation.check_model_finite(backbone.unet())
    gen = torch.Generator().manual_seed(s.seed)
    torch_state = torch.random.get_rng_state()
    uncond = backbone.encode_text([""])
    enc = {p: backbone.encode_text([p]) for p in dict.fromkeys(prompts)}
    pres = None
    if s.preserve > 0:
        if preserve_prompts is None:
            from .prompts import prior_prompts

            preserve_prompts = prior_prompts(n=s.preserve_prompts, exclude=[concept, *synonyms])
        pres_list = [p for p in preserve_prompts if p.strip()][: s.preserve_prompts]
        if not pres_list:
            raise ValueError("no preservation prompts: give some, or set preserve to 0")
        pres = backbone.encode_text(pres_list)
    fwd = bwd = 0
    tr = None
    if cache or s.scope == "saliency":
        if log:
            log(f"ant: {s.trajectories} trajectories x {s.trajectory_steps} steps with the frozen model")
        tr, ev = build_trajectories(backbone, prompts, s, check_interrupt=check_interrupt)
        fwd += ev
    masks, fraction = None, None
    if s.scope == "saliency":
        assert tr is not None
        masks, fraction, f2, b2 = saliency_masks(backbone, tr, scope_modules(backbone, "saliency"), s,
                                                 check_interrupt)
        fwd, bwd = fwd + f2, bwd + b2
        if log:
            log(f"ant: saliency keeps {fraction:.2%} of the UNet's Linear/Conv2d weights")
    plan_prompts, seeds = trajectory_plan(prompts, s.trajectories, s.seed)
    total = sum(m.weight.numel() for m in scope_modules(backbone, s.scope).values())
    ckpt = use_checkpointing(backbone, s)
    if log and ckpt:
        log("ant: gradient checkpointing on for the training forward")
    losses: list[float] = []
    try:
        with _trainable(backbone, s, masks, gen) as deltas:
            opt = torch.optim.Adam(deltas.parameters(), lr=s.lr)
            for step in range(s.steps):
                if check_interrupt is not None:
                    check_interrupt()
                if cache and s.refresh_every and step > 0 and step % s.refresh_every == 0:
                    tr, ev = build_trajectories(backbone, prompts, s, deltas, check_interrupt=check_interrupt)
                    fwd += ev
                idx, ke, kl = draw(gen, s.trajectories, s)
                which = torch.randint(0, len(pres), (s.batch_size,), generator=gen).tolist() if pres else []
                if cache:
                    assert tr is not None
                    b = cached_batch(backbone, tr, idx, ke, kl, enc)
                elif s.reuse > 1:
                    if step % s.reuse == 0:
                        reused, ev = regenerate(backbone, plan_prompts, seeds, idx, enc, uncond, s, check_interrupt)
                        fwd += ev
                    b, ev = reused_batch(backbone, deltas, reused, plan_prompts, ke, kl, enc, uncond, s)
                    fwd += ev
                else:
                    b, ev = uncached_batch(backbone, deltas, plan_prompts, seeds, idx, ke, kl, enc, uncond, s,
                                           check_interrupt)
                    fwd += ev
                if pres is not None:
                    fwd += add_preservation(backbone, deltas, b, pres, which)
                # the training forward only; "off" leaves the model's own setting alone
                with gradient_checkpointing(backbone, True) if ckpt else contextlib.nullcontext():
                    loss, _ = ant_loss(backbone, b, uncond, s)
                fwd += (6 if pres is not None else 4) * s.batch_size
                bwd += 1
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"the ANT loss became {loss.item()} at step {step}: lower the "
                                                f"learning rate (now {s.lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if s.grad_clip > 0:
                    nn.utils.clip_grad_norm_(deltas.parameters(), s.grad_clip)
                opt.step()
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(1)
                if log and (step + 1) % 50 == 0:
                    log(f"ant step {step + 1}/{s.steps} loss {loss.item():.4f}")
            if not deltas.all_finite():
                raise TrainingDivergedError("the ANT weights became non-finite: lower the learning rate")
            opt_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                            if torch.is_tensor(t))
            trained = deltas.num_trainable()
            weights = deltas.result(method="ant", concepts=[concept.strip()], synonyms=list(synonyms),
                                    settings=asdict(s), selected_fraction=fraction)
    finally:
        torch.random.set_rng_state(torch_state)
    return AntResult(weights, trained, total, fraction, fwd, bwd, round(time.time() - t0, 2), losses, opt_bytes)


def scaled(w: ErasureWeights, factor: float) -> ErasureWeights:
    """``w`` with every delta multiplied by ``factor`` (a LoRA through its scale: factors are not copied)."""
    if factor == 1.0:
        return w
    return ErasureWeights({n: Delta(dense=d.dense * factor) if d.dense is not None
                           else replace(d, scale=d.scale * factor) for n, d in w.deltas.items()}, dict(w.metadata))


@dataclass
class AntMultiResult:
    weights: ErasureWeights
    per_concept: list[AntResult]
    unet_forwards: int
    unet_backwards: int
    seconds: float


@entry_point("ANT", "the resolution, batch_size, trajectories or trajectory_steps, or the LoRA rank")
def ant_multi(backbone: Backbone, concepts: list[str], settings: AntSettings | None, prior: torch.Tensor | None,
              templates: dict[str, list[str]] | None = None, lam: float = FUSE_LAM, preserve: float = FUSE_PRESERVE,
              preserve_prompts: list[str] | None = None, strength: float = FUSE_STRENGTH,
              progress: Callable[[int], None] | None = None, check_interrupt: Callable[[], None] | None = None,
              log: Callable[[str], None] | None = None, keep_edits: bool = False) -> AntMultiResult:
    """Many concepts: one ANT edit per concept on the cross-attention K/V (dense, or a LoRA with scope ``lora``),
    then MACE's closed-form fusion of their K/V effects, each edit entering it at ``strength`` (``FUSE_STRENGTH``)
    and every concept weighted alike (``fuse(balance=True)``).

    Each finished dense edit is folded into the fusion's normal equations at once (``FusionSystem.add(keep=False)``)
    and then dropped, so host memory does not grow with the number of concepts (a dense K/V edit is as large as the
    K/V weights: 1.27 GiB in float32 on SDXL); LoRA edits (scope ``lora``) are small: the fusion keeps their factors
    (or, for high ranks, the edit and its Gram matrix) until the solve, and the fused result stays low rank.
    ``keep_edits`` keeps each concept's own dense edit in ``per_concept`` too; otherwise their ``weights`` are
    empty."""
    validation.check_fuse_strength(strength)
    validation.check_number("lam", lam, 0.0, low_open=True)
    validation.check_number("preserve", preserve)
    from .mace import Concept, FusionSystem, mean_prompt_count

    names = validation.check_concepts(concepts)
    low = [c.lower() for c in names]
    s = settings or AntSettings()
    s = s.override(scope="lora" if s.scope == "lora" else "kv", steps=s.multi_steps, reuse=s.multi_reuse)
    s.validate()
    validation.check_learning_rate(s.lr)
    validation.check_ant_concepts_fit(backbone, names, s.kind, templates)
    t0 = time.time()
    concepts_ = [Concept(c, "", s.kind, templates=tuple((templates or {}).get(c) or CONCEPT_TEMPLATES[s.kind]))
                 for c in names]
    system = FusionSystem(backbone, mean_prompt_count([[c] for c in concepts_]))
    results = []
    for c, concept in zip(names, concepts_, strict=True):
        if log:
            log(f"ant: concept {len(results) + 1}/{len(names)}: {c!r}")
        temps = (templates or {}).get(c)
        pres = None if preserve_prompts is None else [p for p in preserve_prompts
                                                      if not set(p.lower().split()) & set(low)]
        r = ant(backbone, c, s, templates=temps, preserve_prompts=pres, progress=progress,
                check_interrupt=check_interrupt, log=log)
        validation.check_fuse_inputs(backbone, [(concept, r.weights)], lam, preserve,
                                     labels=[f"the ANT edit of concept {len(results) + 1} ({c!r})"])
        # a LoRA (scope lora) is small: its factors stay until the solve (the result stays low rank); a dense K/V
        # edit is folded in now and freed
        system.add(concept, r.weights, keep=s.scope == "lora", factor=strength)
        results.append(r if keep_edits or s.scope == "lora" else replace(r, weights=ErasureWeights()))
        del r  # the edit must not outlive its concept (it is as large as the K/V weights)
    fused = system.solve(None, prior, lam, preserve, method="ant-fused")
    fused.metadata.update(_meta({"settings": asdict(s), "fuse": {"lam": lam, "preserve": preserve,
                                                                  "strength": strength, "balance": True}}))
    return AntMultiResult(fused, results, sum(r.unet_forwards for r in results),
                          sum(r.unet_backwards for r in results), round(time.time() - t0, 2))
