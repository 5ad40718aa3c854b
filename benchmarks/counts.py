"""UNet evaluations of ANT single concept, ours and the reference, for any settings, without running a UNet.

The count depends only on the settings and on the sampled schedule (which trajectory, which early and late step at
each training step), never on the model. Replaying the schedule with the library's own ``draw`` and the same
generator gives the exact count, so the library's default settings (on-policy steps over 10-step trajectories)
or the cached configuration of the measured tables and the reference as published (50-step trajectories) can be
reported on a machine that cannot run them on a real UNet. The smoke test checks these formulas against the counts
measured by the hooks (``meter.py``) for every variant it runs; on the tiny layout the cached configuration was also
run for real: ours 32,048 evaluations with refresh, 3,824 without (both equal to the formula).
"""

from __future__ import annotations

import torch

from erasure.ant import AntSettings, draw


def _late(s: AntSettings) -> list[int]:
    n_late = s.trajectory_steps - s.early_steps
    return sorted({s.early_steps + round(i * (n_late - 1) / 7) for i in range(min(8, n_late))})


def ours_ant_single(s: AntSettings, n_preserve: int | None = None) -> dict[str, int]:
    """``erasure.ant.ant`` for any sampling and scope: cached trajectories (built once, refreshed every
    ``refresh_every`` steps) or on-policy regeneration up to each drawn late step (or, with ``reuse`` > 1, to the
    last late step every ``reuse`` steps); saliency maps only for the
    saliency scope; preservation prompts when ``preserve`` > 0 (``n_preserve``: how many; default
    ``preserve_prompts``)."""
    cached = s.sampling == "cached"
    per_traj = 2 * s.trajectories * s.trajectory_steps  # guided DDIM: two rows per step, every step a sample
    trajectories = per_traj if (cached or s.scope == "saliency") else 0
    saliency = 4 * len(_late(s)) * min(s.saliency_maps, s.trajectories) if s.scope == "saliency" else 0
    # per step: the frozen model's predictions for the preservation prompts (2 rows), then the loss forward of the
    # edited model: conditional and unconditional at two latents (4 rows) + the preservation prompts (2 rows)
    per_step = (8 if s.preserve > 0 else 4) * s.batch_size
    refreshes = (s.steps - 1) // s.refresh_every if (cached and s.refresh_every) else 0
    refresh = refreshes * 2 * per_traj  # regenerate with the edited model + the frozen predictions along it
    regen = 0
    if not cached:  # each drawn trajectory from noise to its late step (2 rows a step), then 4 frozen rows
        gen = torch.Generator().manual_seed(s.seed)
        n_pres = s.preserve_prompts if n_preserve is None else n_preserve
        seen: set[tuple[int, int]] = set()
        for step in range(s.steps):
            _, ke, kl = draw(gen, s.trajectories, s)
            if s.preserve > 0:
                torch.randint(0, n_pres, (s.batch_size,), generator=gen)
            if s.reuse == 1:
                regen += sum(2 * k for k in kl) + 4 * s.batch_size
                continue
            # reuse: every ``reuse`` steps the trajectories run to the last late step; frozen predictions (2 rows)
            # only at latents (row, step) not queried since
            if step % s.reuse == 0:
                regen += 2 * (s.trajectory_steps - 1) * s.batch_size
                seen = set()
            new = {(r, k) for r, pair in enumerate(zip(ke, kl, strict=True)) for k in pair} - seen
            regen += 2 * len(new)
            seen |= new
    training = s.steps * per_step
    return {"trajectories": trajectories, "saliency": saliency, "training": training, "refresh": refresh,
            "regeneration": regen, "total": trajectories + saliency + training + refresh + regen}


def reference_ant_single(s: AntSettings, n_preserve: int = 0) -> dict[str, int]:
    """``reference_ant.reference_ant_single``: a trajectory regenerated to the drawn late step before each step."""
    late = _late(s)
    maps = min(s.saliency_maps, s.trajectories)
    # per map: one trajectory to the last late step, the frozen model's two predictions at every pair, the edited
    # model's conditional (with gradient) and unconditional (without) at every pair
    saliency = maps * (2 * max(late) + 8 * len(late))
    gen = torch.Generator().manual_seed(s.seed)
    regen = 0
    for _ in range(s.steps):
        _, _, kl = draw(gen, s.trajectories, s)
        if n_preserve:
            torch.randint(0, n_preserve, (s.batch_size,), generator=gen)
        regen += sum(2 * k for k in kl)
    training = s.steps * 8 * s.batch_size
    return {"saliency": saliency, "regeneration": regen, "training": training,
            "total": saliency + regen + training}
