"""MACE's closed-form fusion of many erasure LoRAs into one set of cross-attention K/V edits, shared by MACE
(stage 4), ANT's many-concept path and the Fuse node. The derivation and the storage rules are in
``docs/fusion.md``.
"""

from __future__ import annotations

import torch

from . import distributed, validation
from .backbone import Backbone
from .closed_form import factor, solve_factored
from .guards import entry_point
from .prompts import Concept
from .weights import Delta, ErasureWeights, metadata


def concept_token_embeddings(backbone: Backbone, concept: Concept) -> torch.Tensor:
    """All tokens of the concept's prompts, [n * L, D] float64 (the ``E_i`` of the fusion)."""
    with torch.no_grad():
        e = backbone.encode_text(concept.prompts()).embeds.double().cpu()
    return e.reshape(-1, e.shape[-1])


def balance_weight(concept: Concept, mean_count: float, balance: bool = True) -> float:
    """The factor on a concept's token embeddings in the fusion: ``sqrt(mean count / its prompt count)``."""
    return (mean_count / len(concept.prompts())) ** 0.5 if balance else 1.0


def mean_prompt_count(groups: list[list[Concept]]) -> float:
    counts = [len(c.prompts()) for g in groups for c in g]
    return sum(counts) / len(counts)


def _lora_times_gram(dl, g: torch.Tensor) -> torch.Tensor:
    """``dW G`` for one layer's delta, without forming a low-rank delta densely first."""
    if dl.up is not None and dl.down is not None and dl.down.dim() == 2:  # low rank: up (down G)
        return (dl.up.double() @ (dl.down.double() @ g)) * dl.scale
    return dl.matrix().double() @ g


class FusionSystem:
    """MACE's closed-form fusion, built up one LoRA at a time.

    ``W* = argmin sum_i ||W E_i - (W_base + dW_i) E_i||^2 + lam ||W - W_base||^2 + preserve ||(W - W0) C^(1/2)||^2``
    has normal equations ``W* M2 = M1`` with ``M2 = sum_i G_i + lam I + preserve C`` (``G_i = E_i^T E_i``, the same
    for every layer) and, per layer, ``M1 = W_base (sum_i G_i + lam I) + sum_i dW_i G_i + preserve W0 C``.

    ``add`` computes an item's ``G_i`` and keeps what the solve needs of each layer's ``dW_i G_i``, whichever is
    smaller:
    - a low-rank item (``up down`` of rank below the layer's width) whose factors ``up`` and rows ``down G_i``
      over all layers take less than ``G_i`` (``D x D``; 33.5 MB in float64 on SDXL, where a rank-1 LoRA's rows
      and ``up`` take 3.6 MB): those, and ``G_i`` is dropped;
    - otherwise, ``keep=True``: the item and ``G_i``, its terms formed per layer at ``solve`` and dropped
      (``fuse``, whose caller holds the weights anyway; e.g. rank-64 LoRAs on SDXL, whose rows would take 221 MB);
    - otherwise, ``keep=False``: each dense ``dW_i G_i`` folded into a running per-layer sum at once and low-rank
      layers' rows kept, so that the item can be freed (ANT's many-concept path, where each finished edit is as
      large as the K/V weights).
    A layer whose stacked low-rank terms reach its width is folded into the dense sum (no longer cheaper).
    ``solve`` consumes the system: call it once.
    """

    def __init__(self, backbone: Backbone, mean_count: float, balance: bool = True) -> None:
        self.backbone = backbone
        kv = backbone.cross_attention_kv()
        self.shapes = {name: tuple(m.weight.shape) for name, m in kv.items()}
        d = next(iter(kv.values())).weight.shape[1]
        self.g_sum = torch.zeros(d, d, dtype=torch.float64)
        self.mean_count, self.balance = mean_count, balance
        self.kept: list[tuple[ErasureWeights, torch.Tensor]] = []
        self.folded: dict[str, torch.Tensor] = {}
        self.low: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # layer -> (ups, rows down G)
        self.groups: list[list[Concept]] = []
        self.solved = False

    def _low_rank(self, name: str, dl: Delta) -> bool:
        return (dl.up is not None and dl.down is not None and dl.down.dim() == 2
                and int(dl.up.shape[1]) < min(self.shapes[name]))

    def _fold(self, name: str, term: torch.Tensor) -> None:
        if name in self.folded:
            self.folded[name] += term
        else:
            self.folded[name] = term

    @staticmethod
    def _stack(ups: list[torch.Tensor], rows: list[torch.Tensor], dl: Delta, g: torch.Tensor, factor: float,
               width: int) -> torch.Tensor | None:
        """Append ``dl``'s ``up`` and ``down G``; past ``width`` stacked ranks, empty the stack into a dense term."""
        ups.append(dl.up.double() * (dl.scale * factor))
        rows.append(dl.down.double() @ g)
        if sum(u.shape[1] for u in ups) < width:
            return None
        term = torch.cat(ups, dim=1) @ torch.cat(rows)
        ups.clear()
        rows.clear()
        return term

    def add(self, group: Concept | list[Concept], weights: ErasureWeights, keep: bool = True,
            factor: float = 1.0, embeddings: torch.Tensor | None = None) -> None:
        """``factor`` scales the item's ``dW_i`` (ANT's fusion strength) without copying its weights.
        ``embeddings``: a single concept's ``concept_token_embeddings``, when already computed."""
        if self.solved:
            raise RuntimeError("this fusion system was solved already: build a new one")
        group = group if isinstance(group, list) else [group]
        if embeddings is not None and len(group) != 1:
            raise ValueError("embeddings can be given for a single concept only")
        e = torch.cat([(concept_token_embeddings(self.backbone, c) if embeddings is None else embeddings)
                       * balance_weight(c, self.mean_count, self.balance) for c in group])
        g = e.T @ e
        d = g.shape[0]
        self.g_sum += g
        self.groups.append(group)
        layers = [(n, dl) for n, dl in weights.deltas.items() if n in self.shapes]
        low = [(n, dl) for n, dl in layers if self._low_rank(n, dl)]
        rows_now = not keep or sum(int(dl.up.shape[1]) * sum(self.shapes[n]) for n, dl in low) < d * d
        for name, dl in low if rows_now else ():
            ups, rows = self.low.setdefault(name, ([], []))
            term = self._stack(ups, rows, dl, g, factor, min(self.shapes[name]))
            if term is not None:
                self._fold(name, term)
        # dW_i (factor G_i) = (factor dW_i) G_i
        if keep and not rows_now:
            self.kept.append((weights, g * factor))
        elif keep and len(low) < len(layers):  # its low-rank layers are stacked already: keep the dense ones
            self.kept.append((ErasureWeights({n: dl for n, dl in layers if not self._low_rank(n, dl)}), g * factor))
        elif not keep:
            for name, dl in layers:
                if not self._low_rank(name, dl):
                    self._fold(name, _lora_times_gram(dl, g) * factor)

    def all_reduce(self, groups: list[list[Concept]]) -> None:
        """Combine the systems that several processes (``distributed.py``) built over their shares of the items:
        each layer's terms (``sum_i dW_i G_i``: low-rank stacks and kept items formed densely) and ``sum_i G_i`` are
        summed over the ranks, so that ``solve`` gives every rank the fused result of all items. ``groups``: all
        items' concepts in their global order (the result's metadata). A no-op in a single process."""
        if not distributed.active():
            return
        if self.solved:
            raise RuntimeError("this fusion system was solved already: build a new one")
        d = self.g_sum.shape[0]
        for name, (out_f, _) in self.shapes.items():
            dense = self.folded.pop(name, None)
            dense = torch.zeros(out_f, d, dtype=torch.float64) if dense is None else dense
            ups, rows = self.low.pop(name, ([], []))
            if ups:
                dense = dense + torch.cat(ups, dim=1) @ torch.cat(rows)
            for lw, g in self.kept:
                if name in lw.deltas:
                    dense = dense + _lora_times_gram(lw.deltas[name], g)
            self.folded[name] = distributed.all_reduce_(dense)
        self.kept = []
        distributed.all_reduce_(self.g_sum)
        self.groups = [list(g) for g in groups]

    def solve(self, base: ErasureWeights | None, prior: torch.Tensor | None, lam: float, preserve: float,
              method: str = "mace-fused") -> ErasureWeights:
        """The fused deltas relative to ``W0``, solved for the change rather than for ``W*``.

        Subtracting ``W_base M2`` from the normal equations leaves ``W* - W_base = (sum_i dW_i G_i - preserve B C)
        M2^-1`` with ``B = W_base - W0`` (the base's delta): the base, ``lam`` and the prior's pull towards ``W0``
        need no per-layer ``out x D x D`` products of their own (the reference forms ``W M2`` per layer and inverts
        ``M2`` per layer). A layer's low-rank terms ``U = [up_i]``, ``R = [down_i G_i]`` change it by
        ``U (R M2^-1)``, which costs ``sum r x D x D`` instead of ``out x D x D``; with no base and no dense item the
        layer's delta is returned as that factorisation (exact, rank ``sum r``, where that is smaller than dense),
        so a fusion of a few LoRAs is itself a small LoRA.
        """
        if self.solved:
            raise RuntimeError("this fusion system was solved already: build a new one")
        self.solved = True
        d = self.g_sum.shape[0]
        m2 = self.g_sum + lam * torch.eye(d, dtype=torch.float64)
        use_prior = prior is not None and preserve != 0
        if use_prior:
            c_prior = prior.double()
            m2 = m2 + preserve * c_prior
        chol = factor(m2)  # once for every layer (the reference rebuilds and inverts it per layer)
        deltas: dict[str, Delta] = {}
        for name, (out_f, _) in self.shapes.items():
            dense = self.folded.pop(name, None)  # freed layer by layer as the result is built
            ups, rows = self.low.pop(name, ([], []))
            for lw, g in self.kept:
                dl = lw.deltas.get(name)
                if dl is None:
                    continue
                term = (self._stack(ups, rows, dl, g, 1.0, min(out_f, d)) if self._low_rank(name, dl)
                        else _lora_times_gram(dl, g))
                if term is not None:
                    dense = term if dense is None else dense + term
            b = base.deltas[name].matrix().double().cpu() if base is not None and name in base.deltas else None
            if b is not None and use_prior:
                dense = -preserve * (b @ c_prior) if dense is None else dense - preserve * (b @ c_prior)
            u = torch.cat(ups, dim=1) if ups else None
            x = solve_factored(torch.cat(rows), chol) if rows else None  # R M2^-1
            if u is not None and dense is None and b is None and u.shape[1] * (out_f + d) < out_f * d:
                deltas[name] = Delta(up=u.float(), down=x.float())
                continue
            change = torch.zeros(out_f, d, dtype=torch.float64) if b is None else b
            if dense is not None:
                change = change + solve_factored(dense, chol)
            if u is not None:
                change = change + u @ x
            deltas[name] = Delta(dense=change.float())
        return ErasureWeights(deltas, metadata({"method": method, "concepts": [c.text for g in self.groups for c in g],
                                             "anchors": [c.anchor for g in self.groups for c in g],
                                             "settings": {"lam": lam, "fuse_preserve": preserve}}))


@entry_point("the fusion", "the number of LoRAs fused at once")
def fuse(backbone: Backbone, items: list[tuple[Concept | list[Concept], ErasureWeights]], base: ErasureWeights | None,
         prior: torch.Tensor | None, lam: float = 0.1, preserve: float = 1.0,
         method: str = "mace-fused", balance: bool = True) -> ErasureWeights:
    """Closed-form fusion: ``W* = argmin sum_i ||W E_i - (W_base + dW_i) E_i||^2 + lam ||W - W_base||^2
    + preserve * ||(W - W0) C^(1/2)||^2``; K/V deltas relative to the original weights ``W0`` (dense; an exact
    low-rank factorisation where a layer has only LoRAs and no base: ``FusionSystem.solve``).

    ``base`` is the CFR edit shared by the concepts (``None``: the original model); each ``dW_i`` is a LoRA's K/V
    effect relative to it (modules it does not touch contribute zero). An item may carry several concepts (a file
    that already erases a list): its ``E_i`` is then all of their prompts' tokens. Items made by any method (MACE,
    ANT) mix freely; only their K/V effects are fused.

    ``balance`` (the project's addition; the paper sums every prompt alike) weighs each concept's tokens by
    ``mean count / its prompt count``, so that every concept pulls on the least-squares solution equally however
    many prompt augmentations it has. Concepts with the same templates (one MACE preset) are unchanged
    (docs/fusion.md#balance).
    """
    validation.check_fuse_inputs(backbone, items, lam, preserve)
    groups = [c if isinstance(c, list) else [c] for c, _ in items]
    system = FusionSystem(backbone, mean_prompt_count(groups), balance)
    for group, weights in zip(groups, (w for _, w in items), strict=True):
        system.add(group, weights)
    return system.solve(base, prior, lam, preserve, method)
