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
from torch.utils.checkpoint import checkpoint

from .weights import Delta, ErasureWeights, metadata


class HookedDeltas(nn.Module):
    """Shared machinery: one forward hook per chosen Linear adding ``self._delta_output(i, x)`` while enabled."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        if not modules:
            raise ValueError("no layers selected to train")
        self.names = sorted(modules)
        self.enabled = True
        self._handles: list = []

    def _attach(self, modules: dict[str, nn.Module]) -> None:
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

    def layer_parameters(self, i: int) -> list[nn.Parameter]:
        """The trainable parameters of layer ``self.names[i]`` (for per-layer learning rates)."""
        raise NotImplementedError

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters())

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class TrainableDeltas(HookedDeltas):
    """Dense trainable deltas (zero at start) on Linear and Conv2d layers."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__(modules)
        self.deltas = nn.ParameterList(
            [nn.Parameter(torch.zeros_like(modules[n].weight, dtype=torch.float32)) for n in self.names])
        self._attach(modules)

        self._convs = {i: modules[n] for i, n in enumerate(self.names) if isinstance(modules[n], nn.Conv2d)}

    def _delta_output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        d = self.deltas[i]
        conv = self._convs.get(i)
        if conv is not None:
            return nn.functional.conv2d(x.to(d.dtype), d, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return nn.functional.linear(x.to(d.dtype), d)

    def layer_parameters(self, i: int) -> list[nn.Parameter]:
        return [self.deltas[i]]

    def result(self, **metadata: object) -> ErasureWeights:
        return ErasureWeights.dense({n: p.detach() for n, p in zip(self.names, self.deltas, strict=True)}, **metadata)


class TrainableLoRA(HookedDeltas):
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

    def layer_parameters(self, i: int) -> list[nn.Parameter]:
        return [self.downs[i], self.ups[i]]

    def result(self, **values: object) -> ErasureWeights:
        deltas = {n: Delta(up=u.detach().float().cpu().clone(), down=d.detach().float().cpu().clone(),
                           scale=self.scale) for n, u, d in zip(self.names, self.ups, self.downs, strict=True)}
        return ErasureWeights(deltas, metadata(values))


def _sparse_dense(values: torch.Tensor, index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return torch.zeros(shape.numel(), dtype=values.dtype, device=values.device).index_put((index,), values).view(shape)


def _linear_delta(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return nn.functional.linear(x.to(values.dtype), _sparse_dense(values, index, shape))


class SparseDeltas(HookedDeltas):
    """Trainable deltas on chosen *entries* of Linear and Conv2d weights (ANT's saliency mask).

    Only the selected entries are parameters (one flat vector per layer plus its indices), so an optimizer's state is
    proportional to the selection, not to the model; every other entry's delta is exactly zero, so unselected
    weights stay bit-identical when the result is applied. The dense delta of a layer exists only transiently inside
    its forward (and is recomputed in backward through activation checkpointing instead of being kept alive).
    """

    def __init__(self, modules: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
        chosen = {n: m for n, m in modules.items() if n in masks and bool(masks[n].any())}
        super().__init__(chosen)
        self.shapes = [modules[n].weight.shape for n in self.names]
        self.indices = [masks[n].to(modules[n].weight.device).flatten().nonzero().squeeze(1) for n in self.names]
        self.values = nn.ParameterList([nn.Parameter(torch.zeros(len(i), device=i.device)) for i in self.indices])
        self._convs = {i: modules[n] for i, n in enumerate(self.names) if isinstance(modules[n], nn.Conv2d)}
        self._attach(chosen)

    def _delta_output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        conv = self._convs.get(i)
        if conv is None:
            return checkpoint(_linear_delta, x, self.values[i], self.indices[i], self.shapes[i], use_reentrant=False)

        def conv_delta(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            w = _sparse_dense(v, self.indices[i], self.shapes[i])
            return nn.functional.conv2d(x.to(v.dtype), w, None, conv.stride, conv.padding, conv.dilation, conv.groups)

        return checkpoint(conv_delta, x, self.values[i], use_reentrant=False)

    def layer_parameters(self, i: int) -> list[nn.Parameter]:
        return [self.values[i]]

    def selected(self) -> int:
        return sum(len(i) for i in self.indices)

    def result(self, **metadata: object) -> ErasureWeights:
        return ErasureWeights.dense({n: _sparse_dense(v.detach().float(), i, s) for n, v, i, s in
                                     zip(self.names, self.values, self.indices, self.shapes, strict=True)}, **metadata)
