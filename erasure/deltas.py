"""Trainable weight deltas on a frozen model, without writing into its weights.

``TrainableDeltas`` attaches a forward hook to each chosen ``nn.Linear`` that adds ``x @ dW^T`` to its output, where
``dW`` is a trainable parameter owned by this object. The frozen weights are never touched, so the frozen model's
predictions (the training targets of ESD and ANT) come from the same modules with the deltas switched off
(:meth:`disabled`), with no second copy of the model in memory. ``result()`` turns the deltas into an
:class:`erasure.weights.ErasureWeights`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .weights import ErasureWeights


class _HookedDeltas(nn.Module):
    """Shared machinery: one forward hook per chosen Linear adding ``self._delta_output(i, x)`` while enabled."""

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        super().__init__()
        if not modules:
            raise ValueError("no layers selected to train")
        self.names = sorted(modules)
        self.enabled = True
        self._handles: list = []

    def _attach(self, modules: dict[str, nn.Linear]) -> None:
        self._handles = [modules[n].register_forward_hook(self._hook(i)) for i, n in enumerate(self.names)]

    def _delta_output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return output
            return output + self._delta_output(i, inputs[0]).to(output.dtype)

        return hook

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters())

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class TrainableDeltas(_HookedDeltas):
    """Dense trainable deltas (zero at start)."""

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        super().__init__(modules)
        self.deltas = nn.ParameterList(
            [nn.Parameter(torch.zeros_like(modules[n].weight, dtype=torch.float32)) for n in self.names])
        self._attach(modules)

    def _delta_output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        d = self.deltas[i]
        return nn.functional.linear(x.to(d.dtype), d)

    def result(self, **metadata: object) -> ErasureWeights:
        return ErasureWeights.dense({n: p.detach() for n, p in zip(self.names, self.deltas, strict=True)}, **metadata)


class TrainableLoRA(_HookedDeltas):
    """Low-rank trainable deltas ``dW = up @ down * (alpha / rank)`` on frozen Linear layers, via forward hooks.

    ``up`` starts at zero, so the model is unchanged before the first step (the usual LoRA initialisation).
    """

    def __init__(self, modules: dict[str, nn.Linear], rank: int = 1, alpha: float | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(modules)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1 (got {rank})")
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        downs, ups = [], []
        for n in self.names:
            w = modules[n].weight
            downs.append(nn.Parameter((torch.randn(rank, w.shape[1], generator=generator) / rank).to(w.device)))
            ups.append(nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device)))
        self.downs = nn.ParameterList(downs)
        self.ups = nn.ParameterList(ups)
        self._attach(modules)

    def _delta_output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.downs[i].dtype)
        return nn.functional.linear(nn.functional.linear(x, self.downs[i]), self.ups[i]) * self.scale

    def result(self, **metadata: object) -> ErasureWeights:
        from .weights import Delta, _meta

        deltas = {n: Delta(up=u.detach().float().cpu().clone(), down=d.detach().float().cpu().clone(),
                           scale=self.scale) for n, u, d in zip(self.names, self.ups, self.downs, strict=True)}
        return ErasureWeights(deltas, _meta(metadata))
