"""The anchor-free baseline: ESD-style negative guidance at every timestep (Gandikota et al., ICCV 2023).

The reference point that ANT and MACE must beat on fidelity and specificity. Per iteration: sample a latent x_t from
the *edited* model's own trajectory for the concept prompt (DDIM with guidance, stopped at a random step), then
regress the edited model's conditional prediction onto the frozen model's negatively guided one:

    eps*(x_t, t, c)  ->  eps(x_t, t, "") - eta * (eps(x_t, t, c) - eps(x_t, t, ""))

at every timestep alike (no early/late distinction: that is what ANT adds). ``scope="xattn"`` trains every
cross-attention projection (ESD-x, the variant for specific concepts); ``scope="unet"`` every attention and
linear projection outside cross-attention (ESD-u style, for global concepts). Written against the backbone
interface, so it runs on any supported model, not only the lab's.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .backbone import Backbone
from .deltas import TrainableDeltas
from .errors import BadInputError, TrainingDivergedError
from .progress import Progress, as_progress
from .sampling import ddim_step, ddim_timesteps, guided_eps, initial_noise
from .weights import ErasureWeights


def esd_modules(backbone: Backbone, scope: str = "xattn") -> dict[str, nn.Linear]:
    mods = {n: m for n, m in backbone.unet().named_modules() if isinstance(m, nn.Linear)}
    if scope == "xattn":
        sel = {n: m for n, m in mods.items() if ".attn2." in n}
    elif scope == "unet":
        sel = {n: m for n, m in mods.items() if ".attn1." in n or ".ff." in n or n.endswith("proj_in")
               or n.endswith("proj_out")}
    else:
        raise BadInputError(f"unknown ESD scope {scope!r}: use 'xattn' or 'unet'")
    return sel


def esd(
    backbone: Backbone,
    concept: str,
    iterations: int = 150,
    lr: float = 1e-3,
    eta: float = 1.0,
    batch_size: int = 4,
    sample_steps: int = 10,
    guidance: float = 3.0,
    scope: str = "xattn",
    seed: int = 0,
    progress: Progress | None = None,
) -> ErasureWeights:
    """Erase ``concept`` (the prompt is the concept text itself, as in ESD) and return the dense deltas."""
    if not concept.strip():
        raise BadInputError("the concept is empty: give the word or phrase to erase")
    progress = as_progress(progress)
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    cond = backbone.encode_text([concept]).repeat(batch_size)
    uncond = backbone.encode_text([""]).repeat(batch_size)
    ts = ddim_timesteps(sample_steps, backbone.schedule.num_timesteps)
    abar = backbone.schedule.alphas_cumprod.to(backbone.device)
    shape = backbone.latent_shape()
    evals = 0
    with TrainableDeltas(esd_modules(backbone, scope)) as deltas:
        opt = torch.optim.Adam(deltas.parameters(), lr=lr)
        for it in range(iterations):
            progress.check()
            stop = int(torch.randint(0, sample_steps, (), generator=gen))
            seeds = torch.randint(0, 2**31 - 1, (batch_size,), generator=gen).tolist()
            with torch.no_grad():
                x = initial_noise(seeds, shape).to(backbone.device, backbone.dtype)
                for i in range(stop):
                    g, _, _ = guided_eps(backbone, x, int(ts[i]), cond, uncond, guidance)
                    x = ddim_step(abar, x, g, int(ts[i]), int(ts[i + 1]), backbone.clip_denoised)
                t = torch.full((batch_size,), int(ts[stop]), device=backbone.device)
                with deltas.disabled():
                    _, eu, ec = guided_eps(backbone, x, t, cond, uncond, 1.0)
                target = eu - eta * (ec - eu)
            pred = backbone.predict_noise(x, t, cond)
            loss = nn.functional.mse_loss(pred.float(), target.float())
            evals += batch_size * (2 * stop + 2 + 1)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"ESD loss became {loss.item()} at iteration {it}: lower the learning "
                                            f"rate (now {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress.step()
            if (it + 1) % 50 == 0:
                progress.say(f"esd iteration {it + 1}/{iterations} loss {loss.item():.4f}")
        if not deltas.all_finite():
            raise TrainingDivergedError("ESD weights became non-finite: lower the learning rate")
        return deltas.result(method="esd", concepts=[concept], settings={
            "iterations": iterations, "lr": lr, "eta": eta, "batch_size": batch_size, "sample_steps": sample_steps,
            "guidance": guidance, "scope": scope, "seed": seed}, unet_evaluations=evals,
            seconds=round(time.time() - t0, 1))
