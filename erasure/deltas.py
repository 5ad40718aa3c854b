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

    def input_factors(self) -> list[torch.Tensor]:
        """Per layer, the tensor whose last dimension meets the layer's input: the dense delta, or a LoRA's down
        factor (every slot's, stacked)."""
        raise NotImplementedError

    @torch.no_grad()
    def project_inputs(self, p: torch.Tensor, names: set[str] | None = None) -> None:
        """Each Linear delta (of ``names``; default all) ``dW <- dW P`` (``P``: ``[in, in]``), through
        ``input_factors``: what the edit does to inputs in ``P``'s null space is removed (``protect``)."""
        for n, d in zip(self.names, self.input_factors(), strict=True):
            if names is None or n in names:
                d.copy_(d @ p.to(d))

    @torch.no_grad()
    def project_input_grads(self, p: torch.Tensor, names: set[str] | None = None) -> None:
        """The gradients of ``input_factors`` (of ``names``) projected as ``project_inputs`` projects the
        deltas, so the optimizer sees only the part of the gradient the projection keeps."""
        for n, d in zip(self.names, self.input_factors(), strict=True):
            if (names is None or n in names) and d.grad is not None:
                d.grad.copy_(d.grad @ p.to(d.grad))

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

    def input_factors(self) -> list[torch.Tensor]:
        return list(self.deltas)

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

    def input_factors(self) -> list[torch.Tensor]:
        return list(self.downs)

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


class BatchedLoRA(HookedDeltas):
    """Several independent LoRAs ("slots") on the same Linear layers, trained in one forward: sample ``b`` of a batch
    goes through the LoRA of slot ``self.slots[b]`` (per-sample low-rank deltas), so that a batch holds many concepts
    instead of one (issue 20; docs/mace.md#concept-batch).

    Slot ``k`` starts exactly as ``TrainableLoRA(modules, rank, generator=generators[k])`` would, and its
    gradients only come from its own samples, so with an element-wise optimiser and ``clip_grad_norm_per_slot``
    training the slots together equals training each alone (to float rounding: the test compares them).
    """

    def __init__(self, modules: dict[str, nn.Linear], rank: int, generators: list[torch.Generator | None],
                 alpha: float | None = None) -> None:
        super().__init__(modules)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1 (got {rank})")
        if not generators:
            raise ValueError("BatchedLoRA needs at least one slot")
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        # each slot draws its layers' starting values from its own generator, in TrainableLoRA's order
        per_slot = [[torch.randn(rank, modules[n].weight.shape[1], generator=g) / rank for n in self.names]
                    for g in generators]
        downs, ups = [], []
        for i, n in enumerate(self.names):
            w = modules[n].weight
            downs.append(nn.Parameter(torch.stack([s[i] for s in per_slot]).to(w.device)))
            ups.append(nn.Parameter(torch.zeros(len(generators), w.shape[0], rank, device=w.device)))
        self.downs = nn.ParameterList(downs)
        self.ups = nn.ParameterList(ups)
        #: the slot of each sample of the next forward ([B], long), or one slot for every sample (an int); set before
        #: every forward
        self.slots: torch.Tensor | int | None = None
        self._attach(modules)

    @property
    def num_slots(self) -> int:
        return self.downs[0].shape[0]

    def _delta_output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.slots, int):  # every sample through one slot's LoRA (sampling with one concept's edit)
            down, up = self.downs[i][self.slots], self.ups[i][self.slots]
            return nn.functional.linear(nn.functional.linear(x.to(down.dtype), down), up) * self.scale
        if self.slots is None or x.shape[0] != len(self.slots):
            raise RuntimeError(f"BatchedLoRA: set .slots to one slot per sample of the batch (batch {x.shape[0]}, "
                               f"slots {None if self.slots is None else len(self.slots)})")
        idx = self.slots.to(x.device)
        down, up = self.downs[i][idx], self.ups[i][idx]  # [B, r, in], [B, out, r]
        flat = x.to(down.dtype).reshape(x.shape[0], -1, x.shape[-1])
        out = torch.bmm(torch.bmm(flat, down.transpose(1, 2)), up.transpose(1, 2)) * self.scale
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def layer_parameters(self, i: int) -> list[nn.Parameter]:
        return [self.downs[i], self.ups[i]]

    def input_factors(self) -> list[torch.Tensor]:
        return list(self.downs)

    def clip_grad_norm_per_slot(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` applied to each slot's gradients separately (a slot alone would be
        clipped by its own norm). Returns the slots' norms before clipping."""
        params = [p for p in self.parameters() if p.grad is not None]
        sq = torch.stack([p.grad.flatten(1).float().pow(2).sum(1) for p in params]).sum(0)  # [slots]
        norms = sq.sqrt()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.view(-1, *([1] * (p.grad.dim() - 1))).to(p.grad.dtype))
        return norms

    def slot_finite(self, k: int) -> bool:
        return all(bool(torch.isfinite(p[k]).all()) for p in self.parameters())

    def result(self, k: int, **values: object) -> ErasureWeights:
        """Slot ``k``'s LoRA, in the same form as ``TrainableLoRA.result``."""
        deltas = {n: Delta(up=u[k].detach().float().cpu().clone(), down=d[k].detach().float().cpu().clone(),
                           scale=self.scale) for n, u, d in zip(self.names, self.ups, self.downs, strict=True)}
        return ErasureWeights(deltas, metadata(values))
