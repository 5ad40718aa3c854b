"""The demo's erasure methods on the lab model, with the lab's own prompts.

``esd``: the anchor-free ESD baseline (``baseline.py``). ``cfr``: MACE's closed-form cross-attention refinement
alone (stage 2 of 4; the attention-loss LoRAs and fusion are not built yet), mapping the concept onto an anchor
with the lab's prior prompts preserved.
"""

from __future__ import annotations

from collections.abc import Callable

from ..backbone import Backbone
from ..mace import Concept, refine
from ..prior import gram
from ..weights import ErasureWeights
from . import world
from .baseline import esd
from .evaluate import cache_dir

METHODS = ("esd", "cfr")

#: anchors for the lab's concepts in CFR: another word of the same kind that the classifier does not confuse
LAB_ANCHORS = {"shape": "shape", "colour": "", "style": "plain"}


def lab_anchor(concept: str) -> str:
    return LAB_ANCHORS[world.concept_kind(concept)]


def erase(backbone: Backbone, concept: str, method: str = "esd", steps: int = 150, seed: int = 0,
          progress: Callable[[int], None] | None = None, lam: float = 0.1, preserve: float = 1.0) -> ErasureWeights:
    if method == "esd":
        return esd(backbone, concept, iterations=steps, seed=seed, progress=progress)
    if method == "cfr":
        world.concept_kind(concept)
        c = Concept(concept, lab_anchor(concept), templates=tuple(world.concept_templates(concept)))
        prior = gram(backbone, world.prior_prompts(exclude=[concept]), cache_dir())
        return refine(backbone, [c], prior, lam=lam, preserve=preserve)
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
