"""AdamW over stacked per-slot parameters (``erasure.deltas.BatchedLoRA``): each slot has its own learning rate and
step count, and slots left out of a step keep their values and their moments.

``torch.optim.AdamW`` takes one learning rate per parameter tensor, but a ``BatchedLoRA`` stacks every concept's
LoRA into one tensor per layer, and MACE's LoRA stage raises each concept's rate on its own and stops each concept
when its target is reached (``erasure.mace.LoraRounds``). This is AdamW's update (torch's defaults: betas 0.9 and
0.999, eps 1e-8, weight decay 0.01, no amsgrad), written per slot, so that slot ``k`` follows exactly the steps a
``torch.optim.AdamW`` on that concept alone would take (to float rounding: ``tests/test_mace_batched.py``).
"""

from __future__ import annotations

import torch
from torch import nn


class SlotAdamW:
    def __init__(self, params: list[nn.Parameter], lrs: list[float], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        self.params = list(params)
        self.lr = torch.tensor(lrs, dtype=torch.float64)  # [slots]
        self.steps = torch.zeros(len(lrs), dtype=torch.float64)  # [slots]: steps taken by each slot
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: list[int]) -> None:
        """One AdamW step for the slots in ``active`` (the others are left exactly as they are)."""
        if not active:
            return
        b1, b2 = self.betas
        idx = torch.tensor(active)
        self.steps[idx] += 1
        n = self.steps[idx]
        lr = self.lr[idx]
        step_size = lr / (1 - b1 ** n)
        bc2_sqrt = (1 - b2 ** n).sqrt()
        decay = 1 - lr * self.weight_decay
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            dev = p.device
            i = idx.to(dev)
            shape = (-1, *([1] * (p.dim() - 1)))
            g = p.grad[i]
            mi = m[i].lerp_(g, 1 - b1)
            vi = v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (vi.sqrt() / bc2_sqrt.to(dev, p.dtype).view(shape)).add_(self.eps)
            pi = p[i].mul_(decay.to(dev, p.dtype).view(shape))
            pi.addcdiv_(mi * step_size.to(dev, p.dtype).view(shape), denom, value=-1.0)
            m[i], v[i], p[i] = mi, vi, pi
