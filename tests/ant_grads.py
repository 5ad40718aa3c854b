"""Shared by the default and the host tests of gradient checkpointing: an ANT batch of random latents and the
gradients of the ANT loss with checkpointing on or off."""

from __future__ import annotations

import torch

from erasure.ant import AntSettings, Batch, ant_loss, scope_modules
from erasure.backbone import TextConditioning, gradient_checkpointing
from erasure.deltas import TrainableDeltas


def random_batch(backbone, shape: tuple[int, ...], t_early: list[int], t_late: list[int], prompt: str,
                 other: str) -> Batch:
    """Random latents and frozen predictions at the given timesteps, with preservation samples of ``other``."""
    g = torch.Generator().manual_seed(1)
    n = len(t_early)

    def r() -> torch.Tensor:
        return torch.randn((n, *shape), generator=g)

    b = Batch(r(), torch.tensor(t_early), r(), torch.tensor(t_late), backbone.encode_text([prompt] * n),
              r(), r(), r(), r())
    b.pres_cond, b.pres_early, b.pres_late = backbone.encode_text([other] * n), r(), r()
    return b


def ant_grads(bb, b: Batch, uncond: TextConditioning, settings: AntSettings,
              on: bool) -> tuple[list[torch.Tensor], int]:
    """Gradients of the ANT loss for dense cross-attention deltas nudged away from zero (so every path carries
    gradient), and the number of tensors autograd saved in the forward."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += 1
        return t

    with TrainableDeltas(scope_modules(bb, "xattn")) as deltas:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in deltas.parameters():
                p.copy_(1e-2 * torch.randn(p.shape, generator=g))
        with gradient_checkpointing(bb, on) as active, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            assert active == on
            loss, _ = ant_loss(bb, b, uncond, settings)
        return [x.clone() for x in torch.autograd.grad(loss, list(deltas.parameters()))], saved[0]
