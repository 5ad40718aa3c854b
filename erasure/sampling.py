"""Guided DDIM sampling (eta 0, classifier-free guidance), batched over prompts and seeds.

Each image's initial noise comes from its own ``torch.Generator`` seeded with its seed, so an image depends only on
(prompt, seed, settings), never on which other images share its batch: the original and an edited model can be
compared on the same seeds, and results are reproducible. The sampler can record the trajectory (the latents
before every step) and the frozen model's unconditional and conditional predictions along it, which is what ANT
caches instead of regenerating trajectories at every training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbone import Backbone, TextConditioning
from .errors import BadInputError
from .progress import Progress, as_progress


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Trailing spacing: starts at T-1 (pure noise), ends at T/num_steps - 1."""
    if num_steps < 1:
        raise ValueError("sampling steps must be >= 1")
    step = num_train_timesteps / num_steps
    return torch.tensor([round(num_train_timesteps - i * step) - 1 for i in range(num_steps)], dtype=torch.long)


def initial_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def ddim_step(schedule_abar: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
              clip: bool) -> torch.Tensor:
    a_t = schedule_abar[t].to(x.dtype)
    a_prev = schedule_abar[t_prev].to(x.dtype) if t_prev >= 0 else torch.ones((), dtype=x.dtype)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


@dataclass
class SampleResult:
    images: torch.Tensor  # [N, 3, H, W] in [-1, 1]
    latents: torch.Tensor  # [N, C, h, w]: the final latents (before decoding)
    timesteps: torch.Tensor  # [S]
    trajectory: torch.Tensor | None = None  # [S, N, C, h, w]: the latent before each step
    eps_uncond: torch.Tensor | None = None  # [S, N, C, h, w]
    eps_cond: torch.Tensor | None = None  # [S, N, C, h, w]
    attention: torch.Tensor | None = None  # [N, h, w]: the chosen tokens' cross-attention, see ``sample``


class AttentionAccumulator:
    """Sums, over the calls it sees, the cross-attention of chosen token positions in the conditional half of a
    CFG batch: mean over heads, sum over the tokens, layers at the mid resolutions (latent/2 and latent/4; models
    with no cross-attention there use all of theirs), upsampled to the latent size."""

    def __init__(self, positions: list[list[int]], latent_hw: tuple[int, int]) -> None:
        self.positions = positions
        self.latent_hw = latent_hw
        self.total: torch.Tensor | None = None
        self.active = False
        self.seen_mid = False

    def __call__(self, name: str, probs: torch.Tensor, hw: tuple[int, int]) -> None:
        lh, lw = self.latent_hw
        if not self.active:
            return
        mid = hw in ((lh // 2, lw // 2), (lh // 4, lw // 4))
        if not mid:
            # models without cross-attention at the mid resolutions (tiny test UNets) fall back to the others
            if self.seen_mid:
                return
        elif not self.seen_mid:
            self.seen_mid, self.total = True, None
        n = len(self.positions)
        cond = probs[-n:].detach().float().mean(1)  # [n, HW, L]
        maps = torch.stack([cond[i][:, pos].sum(-1) for i, pos in enumerate(self.positions)])
        maps = torch.nn.functional.interpolate(maps.view(n, 1, *hw), size=self.latent_hw, mode="bilinear",
                                               align_corners=False)[:, 0]
        self.total = maps.cpu() if self.total is None else self.total + maps.cpu()


def guided_eps(backbone: Backbone, x: torch.Tensor, t: int | torch.Tensor, cond: TextConditioning,
               uncond: TextConditioning, guidance: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batched forward on [uncond; cond]. Returns (guided, eps_uncond, eps_cond)."""
    n = x.shape[0]
    tt = torch.as_tensor(t, device=x.device).expand(2 * n) if torch.as_tensor(t).dim() == 0 else torch.cat([t, t])
    eps = backbone.predict_noise(torch.cat([x, x]), tt, TextConditioning.cat([uncond, cond]))
    eu, ec = eps[:n], eps[n:]
    return eu + guidance * (ec - eu), eu, ec


@torch.no_grad()
def sample(
    backbone: Backbone,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance: float = 5.0,
    negative: str = "",
    resolution: int | None = None,
    batch_size: int = 128,
    record: bool = False,
    progress: Progress | None = None,
    attention_word: str | list[str] | None = None,
    attention_from: float = 0.5,
    decode: bool = True,
) -> SampleResult:
    """Images for every (prompt, seed) pair, prompt-major: index = prompt_index * len(seeds) + seed_index.

    With ``attention_word``, ``result.attention`` holds each image's cross-attention map of that word's tokens (a
    list: one word per prompt, so that several concepts' images are made in one batch), accumulated over the steps
    after the fraction ``attention_from`` of sampling (the later steps, where the map sits on the object).
    ``decode=False`` skips decoding (``images`` is then empty).
    """
    progress = as_progress(progress)
    shape = backbone.latent_shape(resolution)
    pairs = [(p, s) for p in prompts for s in seeds]
    ts = ddim_timesteps(steps, backbone.schedule.num_timesteps)
    abar = backbone.schedule.alphas_cumprod.to(backbone.device)
    unique = list(dict.fromkeys(prompts + [negative]))
    enc = backbone.encode_text(unique)
    index = {p: i for i, p in enumerate(unique)}
    images, finals, trajs, eus, ecs, maps = [], [], [], [], [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        x = initial_noise([s for _, s in chunk], shape).to(backbone.device, backbone.dtype)
        cond = enc[[index[p] for p, _ in chunk]]
        uncond = enc[[index[negative]] * len(chunk)]
        traj, eu_l, ec_l = [], [], []
        acc = None
        if attention_word is not None:
            words = ([attention_word] * len(prompts) if isinstance(attention_word, str) else list(attention_word))
            if len(words) != len(prompts):
                raise ValueError(f"{len(words)} attention words for {len(prompts)} prompts")
            positions = [backbone.token_positions(p, words[(start + j) // len(seeds)])
                         for j, (p, _) in enumerate(chunk)]
            missing = next((j for j, pos in enumerate(positions) if not pos), None)
            if missing is not None:
                word, prompt = words[(start + missing) // len(seeds)], chunk[missing][0]
                raise BadInputError(f"{word!r} does not occur in the prompt {prompt!r}")
            acc = AttentionAccumulator(positions, shape[1:])
        for i, t in enumerate(ts.tolist()):
            progress.check()
            if acc is not None:
                acc.active = i >= int(attention_from * len(ts))
                with backbone.capture_attention(acc, resolution):
                    g, eu, ec = guided_eps(backbone, x, t, cond, uncond, guidance)
            else:
                g, eu, ec = guided_eps(backbone, x, t, cond, uncond, guidance)
            if record:
                traj.append(x.cpu())
                eu_l.append(eu.cpu())
                ec_l.append(ec.cpu())
            t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
            x = ddim_step(abar, x, g, t, t_prev, backbone.clip_denoised)
            progress.step()
        if decode:
            images.append(backbone.decode(x).float().cpu())
        finals.append(x.float().cpu())
        if acc is not None:
            maps.append(acc.total)
        if record:
            trajs.append(torch.stack(traj, 1))
            eus.append(torch.stack(eu_l, 1))
            ecs.append(torch.stack(ec_l, 1))
    res = SampleResult(torch.cat(images) if images else torch.empty(0), torch.cat(finals), ts)
    if maps:
        res.attention = torch.cat(maps)
    if record:
        res.trajectory = torch.cat(trajs).transpose(0, 1)
        res.eps_uncond = torch.cat(eus).transpose(0, 1)
        res.eps_cond = torch.cat(ecs).transpose(0, 1)
    return res
