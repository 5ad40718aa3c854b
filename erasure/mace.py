"""MACE stage 2: closed-form cross-attention refinement (CFR) on every cross-attention K/V matrix.

For each concept, template prompts containing it are encoded next to the same templates with its anchor. The
inputs ``e_f`` are the concept prompts' token embeddings at every position EXCEPT the concept's own tokens (prefix,
following words, end token and padding: through the causal text encoder they carry the concept's residue); the
targets are ``W0 e_g``, the anchor prompts' aligned embeddings projected by the original matrix. With the prior
Gram matrix ``C`` (``prior.py``) each matrix is solved in closed form (``closed_form.py``).

Stages 1 (data and masks), 3 (attention-loss LoRAs) and 4 (fusion) are issue #3's remaining work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbone import Backbone
from .closed_form import least_squares_edit
from .prompts import concept_prompts
from .weights import ErasureWeights


@dataclass(frozen=True)
class Concept:
    text: str
    anchor: str
    kind: str = "object"
    #: prompts with ``{c}`` where the concept goes; default: the templates of ``kind`` (``prompts.py``)
    templates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ValueError("a concept is empty: give the word or phrase to erase")
        if self.text.strip().lower() == self.anchor.strip().lower():
            raise ValueError(f"the anchor of {self.text!r} is the concept itself: choose a different anchor")


def aligned_pairs(backbone: Backbone, concept: Concept, templates: list[str] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e_f, e_g)``: concept-prompt embeddings at non-concept positions and the anchor prompts' aligned ones.

    Positions before the concept map to themselves; positions after it shift by the difference in token count
    between concept and anchor; positions that fall off the context are dropped.
    """
    prompts = templates or list(concept.templates) or concept_prompts("{c}", concept.kind)
    src = [p.replace("{c}", concept.text) for p in prompts]
    dst = [p.replace("{c}", concept.anchor) for p in prompts]
    ef_all = backbone.encode_text(src).embeds.double().cpu()
    eg_all = backbone.encode_text(dst).embeds.double().cpu()
    length = ef_all.shape[1]
    ef, eg = [], []
    for i, (ps, pd) in enumerate(zip(src, dst, strict=True)):
        cpos = backbone.token_positions(ps, concept.text)
        apos = backbone.token_positions(pd, concept.anchor) if concept.anchor.strip() else []
        if not cpos:
            raise ValueError(f"{concept.text!r} was cut off in {ps!r}: shorten the concept")
        start = cpos[0]
        k = _span(cpos)
        m = _span(apos) if apos else 0
        for p in range(length):
            if start <= p < start + k:
                continue
            q = p if p < start else p - k + m
            if 0 <= q < length:
                ef.append(ef_all[i, p])
                eg.append(eg_all[i, q])
    return torch.stack(ef), torch.stack(eg)


def _span(positions: list[int]) -> int:
    """Length of the first contiguous run of positions (the first occurrence of a word)."""
    n = 1
    while n < len(positions) and positions[n] == positions[0] + n:
        n += 1
    return n


def refine(backbone: Backbone, concepts: list[Concept], prior: torch.Tensor | None, lam: float = 0.1,
           preserve: float = 1.0) -> ErasureWeights:
    """CFR for all concepts at once; dense K/V deltas. With no concepts the deltas are zero."""
    kv = backbone.cross_attention_kv()
    d = next(iter(kv.values())).weight.shape[1]
    ef_list, eg_list = [torch.zeros(0, d, dtype=torch.float64)], [torch.zeros(0, d, dtype=torch.float64)]
    for c in concepts:
        ef, eg = aligned_pairs(backbone, c)
        ef_list.append(ef)
        eg_list.append(eg)
    ef, eg = torch.cat(ef_list), torch.cat(eg_list)
    deltas = {}
    for name, mod in kv.items():
        w0 = mod.weight.detach().double().cpu()
        w = least_squares_edit(w0, ef, eg @ w0.T, lam, prior, preserve)
        deltas[name] = (w - w0).float()
    return ErasureWeights.dense(deltas, method="mace-cfr", concepts=[c.text for c in concepts],
                                anchors=[c.anchor for c in concepts],
                                settings={"lam": lam, "preserve": preserve})
