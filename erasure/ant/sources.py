"""Where ANT's training latents come from: interchangeable sources of training batches.

Every source answers ``batch(step, idx, ke, kl)`` (the trajectories, early steps and mid/late steps drawn by
:func:`draw` for this step) with a :class:`~erasure.ant.objective.Batch` and the UNet evaluations it spent:

* :class:`OnPolicy` regenerates each drawn trajectory from noise with the edited model up to its late step (the
  reference's loop);
* :class:`Reused` regenerates the drawn trajectories once and serves ``reuse`` steps from them, querying the frozen
  model once per latent;
* :class:`Cached` serves frozen-model trajectories computed once (:func:`build_trajectories`), rebuilt along the
  edited model every ``refresh_every`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..backbone import Backbone, TextConditioning
from ..deltas import BatchedLoRA, HookedDeltas
from ..progress import Progress, as_progress
from ..sampling import ddim_step, ddim_timesteps, guided_eps, initial_noise, sample
from .objective import Batch
from .settings import AntSettings


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


def run_trajectory(backbone: Backbone, cond: TextConditioning, uncond: TextConditioning, seeds: list[int],
                   ts: torch.Tensor, guidance: float, upto: int, resolution: int | None,
                   progress: Progress | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                              list[torch.Tensor]]:
    """Latents before each of the first ``upto`` + 1 steps, with the current model's eps_u, eps_c at the first
    ``upto``."""
    progress = as_progress(progress)
    abar = backbone.schedule.alphas_cumprod.to(backbone.device)
    x = initial_noise(seeds, backbone.latent_shape(resolution)).to(backbone.device, backbone.dtype)
    xs, eus, ecs = [x], [], []
    for i in range(upto):
        progress.check()  # every step, so that Cancel is answered within one UNet call
        t = int(ts[i])
        g, eu, ec = guided_eps(backbone, x, t, cond, uncond.repeat(len(seeds)), guidance)
        eus.append(eu)
        ecs.append(ec)
        x = ddim_step(abar, x, g, t, int(ts[i + 1]) if i + 1 < len(ts) else -1, backbone.clip_denoised)
        xs.append(x)
    return xs, eus, ecs


@torch.no_grad()
def build_trajectories(backbone: Backbone, prompts: list[str], s: AntSettings, deltas: HookedDeltas | None = None,
                       chunk: int = 8, progress: Progress | None = None) -> tuple[Trajectories, int]:
    """Trajectories of the model as it is now; the predictions stored are the *frozen* model's.

    With ``deltas`` (on-policy refresh) the trajectories follow the edited model and the frozen predictions are
    recomputed along them with the deltas switched off. Returns the trajectories and the UNet evaluations spent.
    """
    progress = as_progress(progress)
    plan_prompts, seeds = trajectory_plan(prompts, s.trajectories, s.seed)
    ts = ddim_timesteps(s.trajectory_steps, backbone.schedule.num_timesteps)
    uncond = backbone.encode_text([""])
    lat, eus, ecs = [], [], []
    evals = 0
    for start in range(0, len(seeds), chunk):
        progress.check()
        ps, ss = plan_prompts[start:start + chunk], seeds[start:start + chunk]
        cond = backbone.encode_text(ps)
        xs, eu, ec = run_trajectory(backbone, cond, uncond, ss, ts, s.guidance, len(ts), s.resolution, progress)
        evals += 2 * len(ss) * len(ts)
        xs = xs[:-1]  # the latent after the last step is a clean image, not a training sample
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
    return Trajectories(plan_prompts, seeds, ts, torch.cat(lat), torch.cat(eus), torch.cat(ecs)), evals


def draw(gen: torch.Generator, n_traj: int, s: AntSettings) -> tuple[list[int], list[int], list[int]]:
    """Which trajectories, early steps and mid/late steps a training step uses (the same draws whatever the
    source). Every step of the trajectory can be drawn, the lowest-noise one included."""
    late_steps = s.trajectory_steps - s.early_steps
    idx = torch.randint(0, n_traj, (s.batch_size,), generator=gen).tolist()
    ke = torch.randint(0, s.early_steps, (s.batch_size,), generator=gen).tolist()
    kl = (s.early_steps + torch.randint(0, late_steps, (s.batch_size,), generator=gen)).tolist()
    return idx, ke, kl


def cached_batch(backbone: Backbone, tr: Trajectories, idx: list[int], ke: list[int], kl: list[int],
                 enc: dict[str, TextConditioning]) -> Batch:
    """A batch read from stored trajectories (no UNet evaluation)."""
    dev, dt = backbone.device, backbone.dtype

    def pick(a: torch.Tensor, ks: list[int]) -> torch.Tensor:
        return torch.stack([a[i, k] for i, k in zip(idx, ks, strict=True)]).to(dev, dt)

    return Batch(pick(tr.latents, ke), tr.timesteps[ke].to(dev), pick(tr.latents, kl), tr.timesteps[kl].to(dev),
                 TextConditioning.cat([enc[tr.prompts[i]] for i in idx]), pick(tr.eps_u, ke), pick(tr.eps_c, ke),
                 pick(tr.eps_u, kl), pick(tr.eps_c, kl))


@torch.no_grad()
def uncached_batch(backbone: Backbone, deltas: HookedDeltas, prompts: list[str], seeds: list[int], idx: list[int],
                   ke: list[int], kl: list[int], enc: dict[str, TextConditioning], uncond: TextConditioning,
                   s: AntSettings, progress: Progress | None = None) -> tuple[Batch, int]:
    """The reference's way: regenerate each drawn trajectory from noise with the edited model, up to its late step,
    then query the frozen model at the two latents. Returns the batch and the UNet evaluations spent."""
    ts = ddim_timesteps(s.trajectory_steps, backbone.schedule.num_timesteps)
    xe, xl, evals = [], [], 0
    for i, a, b in zip(idx, ke, kl, strict=True):
        xs, _, _ = run_trajectory(backbone, enc[prompts[i]], uncond, [seeds[i]], ts, s.guidance, b, s.resolution,
                                  progress)
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


@torch.no_grad()
def uncached_batches(backbone: Backbone, deltas: BatchedLoRA, contexts: list[_Context],
                     draws: list[tuple[list[int], list[int], list[int]]]) -> list[tuple[Batch, int]]:
    """``uncached_batch`` for several concepts at once, concept ``k`` sampling through LoRA slot ``k``: every drawn
    trajectory is regenerated in one batch up to the latest late step drawn (each row as it would alone, to float
    rounding), then the frozen model is queried at all rows' latents together. Returns each concept's batch and the
    UNet evaluations its rows spent (its rows run to the common last step, so more than alone)."""
    c0 = contexts[0]
    s, uncond = c0.s, c0.uncond
    ts = ddim_timesteps(s.trajectory_steps, backbone.schedule.num_timesteps)
    slots, seeds, conds, ke, kl = [], [], [], [], []
    for k, (c, (idx, e, lt)) in enumerate(zip(contexts, draws, strict=True)):
        slots += [k] * len(idx)
        seeds += [c.seeds[i] for i in idx]
        conds += [c.enc[c.prompts[i]] for i in idx]
        ke, kl = ke + e, kl + lt
    cond, rows, upto = TextConditioning.cat(conds), len(seeds), max(kl)
    deltas.slots = torch.tensor(slots).repeat(2)  # guided_eps runs [uncond; cond]
    xs, _, _ = run_trajectory(backbone, cond, uncond, seeds, ts, s.guidance, upto, s.resolution, c0.progress)
    r, steps = torch.arange(rows), torch.stack(xs)  # [upto + 1, rows, ...]
    x_e, x_l = steps[torch.tensor(ke), r], steps[torch.tensor(kl), r]
    t_e, t_l = ts[ke].to(backbone.device), ts[kl].to(backbone.device)
    with deltas.disabled():
        _, eu_e, ec_e = guided_eps(backbone, x_e, t_e, cond, uncond.repeat(rows), 1.0)
        _, eu_l, ec_l = guided_eps(backbone, x_l, t_l, cond, uncond.repeat(rows), 1.0)
    out, start = [], 0
    for idx, _, _ in draws:
        sl = slice(start, start + len(idx))
        out.append((Batch(x_e[sl], t_e[sl], x_l[sl], t_l[sl], cond[sl], eu_e[sl], ec_e[sl],
                          eu_l[sl], ec_l[sl]), 2 * upto * len(idx) + 4 * len(idx)))
        start += len(idx)
    return out


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
               progress: Progress | None = None) -> tuple[ReusedTrajectories, int]:
    """The drawn trajectories with the edited model, up to the last step a draw can pick. Returns them and the UNet
    evaluations spent."""
    ts = ddim_timesteps(s.trajectory_steps, backbone.schedule.num_timesteps)
    upto = s.trajectory_steps - 1
    lat = [run_trajectory(backbone, enc[prompts[i]], uncond, [seeds[i]], ts, s.guidance, upto, s.resolution,
                          progress)[0] for i in idx]
    return ReusedTrajectories(list(idx), lat), 2 * upto * len(idx)


@torch.no_grad()
def reused_batch(backbone: Backbone, deltas: HookedDeltas, tr: ReusedTrajectories, prompts: list[str],
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


# -- the sources -------------------------------------------------------------------------------------------------
class BatchSource(Protocol):
    def batch(self, step: int, idx: list[int], ke: list[int], kl: list[int]) -> tuple[Batch, int]:
        """The batch of training step ``step`` for the drawn trajectories and steps, and the UNet evaluations it
        cost."""
        ...


@dataclass
class _Context:
    """What every source reads: the model, the edit being trained, the trajectory plan and the encoded prompts."""

    backbone: Backbone
    deltas: HookedDeltas
    s: AntSettings
    prompts: list[str]  # one per trajectory (``trajectory_plan``)
    seeds: list[int]
    enc: dict[str, TextConditioning]
    uncond: TextConditioning
    progress: Progress


class OnPolicy:
    """A new trajectory of the edited model for every step (``reuse=1``)."""

    def __init__(self, c: _Context) -> None:
        self.c = c

    def batch(self, step: int, idx: list[int], ke: list[int], kl: list[int]) -> tuple[Batch, int]:
        c = self.c
        return uncached_batch(c.backbone, c.deltas, c.prompts, c.seeds, idx, ke, kl, c.enc, c.uncond, c.s,
                              c.progress)


class Reused:
    """Trajectories of the edited model regenerated every ``reuse`` steps (at the step's draw) and reused between."""

    def __init__(self, c: _Context) -> None:
        self.c = c
        self.current: ReusedTrajectories | None = None

    def batch(self, step: int, idx: list[int], ke: list[int], kl: list[int]) -> tuple[Batch, int]:
        c, evals = self.c, 0
        if step % c.s.reuse == 0 or self.current is None:
            self.current, evals = regenerate(c.backbone, c.prompts, c.seeds, idx, c.enc, c.uncond, c.s, c.progress)
        b, ev = reused_batch(c.backbone, c.deltas, self.current, c.prompts, ke, kl, c.enc, c.uncond, c.s)
        return b, evals + ev


class Cached:
    """Frozen-model trajectories computed once (``tr``), rebuilt along the edited model every ``refresh_every``
    steps."""

    def __init__(self, c: _Context, tr: Trajectories, concept_prompts: list[str]) -> None:
        self.c, self.tr, self.concept_prompts = c, tr, concept_prompts

    def batch(self, step: int, idx: list[int], ke: list[int], kl: list[int]) -> tuple[Batch, int]:
        c, evals = self.c, 0
        if c.s.refresh_every and step > 0 and step % c.s.refresh_every == 0:
            self.tr, evals = build_trajectories(c.backbone, self.concept_prompts, c.s, c.deltas, progress=c.progress)
        return cached_batch(c.backbone, self.tr, idx, ke, kl, c.enc), evals


def make_source(backbone: Backbone, deltas: HookedDeltas, s: AntSettings, concept_prompts: list[str],
                enc: dict[str, TextConditioning], uncond: TextConditioning, cached: bool,
                tr: Trajectories | None, progress: Progress) -> BatchSource:
    """The source for these settings: cached trajectories, reused on-policy ones (``reuse > 1``) or a new on-policy
    trajectory per step."""
    plan_prompts, seeds = trajectory_plan(concept_prompts, s.trajectories, s.seed)
    c = _Context(backbone, deltas, s, plan_prompts, seeds, enc, uncond, progress)
    if cached:
        assert tr is not None
        return Cached(c, tr, concept_prompts)
    return Reused(c) if s.reuse > 1 else OnPolicy(c)


#: seed of the preservation prompts' own images (``preserve_latents="own"``), apart from every trajectory seed
PRESERVE_IMAGE_SEED = 7_000_000


def prompt_latents(backbone: Backbone, prompts: list[str], s: AntSettings, progress: Progress | None = None
                   ) -> tuple[torch.Tensor, int]:
    """One clean latent per prompt from the model as it is (call before any edit): ``s.trajectory_steps`` DDIM steps
    at ``s.guidance``. Returns them and the UNet evaluations spent."""
    progress = as_progress(progress)
    res = sample(backbone, prompts, [PRESERVE_IMAGE_SEED + 1000 * s.seed], s.trajectory_steps, s.guidance,
                 resolution=s.resolution, batch_size=max(s.trajectories, 1), decode=False,
                 progress=Progress(interrupt=progress.interrupt, log=progress.log))  # the bar counts training steps
    return res.latents.cpu(), 2 * len(prompts) * s.trajectory_steps
