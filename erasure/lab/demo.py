"""Erasure methods on the lab model, with the lab's own prompts (templates, anchors, prior set).

``esd``: the anchor-free ESD baseline (``erasure/esd.py``). ``cfr``: MACE's closed-form cross-attention refinement
alone (stage 2 of 4). ``mace``: all four MACE stages with the object preset. ``ant``: ANT with its default
settings (on-policy, dense cross-attention for one concept; one K/V edit per concept and closed-form fusion for
several).
"""

from __future__ import annotations

from ..ant import AntSettings, ant, ant_multi
from ..backbone import Backbone
from ..errors import BadInputError
from ..esd import esd
from ..files import cache_dir
from ..mace import PRESETS, MaceSettings, mace, refine, resolved_lam
from ..prior import gram
from ..progress import Progress
from ..prompts import Concept
from ..weights import ErasureWeights
from . import world

METHODS = ("esd", "cfr", "mace", "ant")

#: default anchors for lab concepts: a shape maps onto the generic noun "shape", a colour onto no word at all (the
#: caption without a colour), a style onto "plain"
LAB_ANCHORS = {"shape": "shape", "colour": "", "style": "plain"}


def lab_anchor(concept: str) -> str:
    return LAB_ANCHORS[world.concept_kind(concept)]


def lab_concept(concept: str, anchor: str | None = None, with_other_concepts: bool = False) -> Concept:
    """A lab concept with the lab's templates, generation prompt and default anchor.

    By default the templates name no other lab concept (as ANT's): in MACE's fusion every token of a concept's
    prompts is pulled towards that concept's LoRA, so "a green {c}" among the circle's prompts pulls "green" towards
    the circle's edit and away from green's own (measured: docs/lab.md#templates-that-name-other-concepts)."""
    head = compound_head(concept)
    kind = world.concept_kind(head)
    return Concept(concept, lab_anchor(head) if anchor is None else anchor,
                   "style" if kind == "style" else "object",
                   templates=tuple(world.concept_templates(head, with_other_concepts)),
                   data_prompt=world.concept_prompts(head)[1].replace(head, "{c}"))


def compound_head(concept: str) -> str:
    """The lab concept that decides a concept's kind, templates and anchor: the concept itself, or for a phrase of
    lab words and synonyms ("red striped circle", "crimson disk": many distinct concepts for the scale benchmarks)
    the canonical concept of its last word. Anything else is refused, naming the lab's concepts."""
    if concept in world.ALL_CONCEPTS:
        return concept
    canonical = {w: c for c, ws in world.SYNONYMS.items() for w in ws} | {c: c for c in world.ALL_CONCEPTS}
    words = concept.split()
    if not words or any(w not in canonical for w in words):
        world.concept_kind(concept)  # raises, naming the lab's concepts
    return canonical[words[-1]]


def lab_prior(backbone: Backbone, concepts: list[str]):
    return gram(backbone, world.prior_prompts(exclude=concepts), cache_dir())


def erase(backbone: Backbone, concepts: str | list[str], method: str = "ant", steps: int | None = None,
          seed: int = 0, progress: Progress | None = None,
          settings: MaceSettings | None = None) -> ErasureWeights:
    names = [concepts] if isinstance(concepts, str) else list(concepts)
    if method == "esd":
        if len(names) != 1:
            raise BadInputError("the ESD baseline erases one concept at a time")
        return esd(backbone, names[0], iterations=steps or 150, seed=seed, progress=progress)
    if method == "ant":
        a = AntSettings().override(steps=steps, multi_steps=steps, seed=seed)
        if len(names) == 1:
            return ant(backbone, names[0], a, templates=world.concept_templates(names[0], False),
                       preserve_prompts=world.prior_prompts(exclude=names), progress=progress).weights
        return ant_multi(backbone, names, a, lab_prior(backbone, names),
                         templates={c: world.concept_templates(c, False) for c in names},
                         preserve_prompts=world.prior_prompts(exclude=names), progress=progress).weights
    s = settings or PRESETS["object"]
    if steps is not None:
        s = s.override(lora_steps=steps)
    items = [lab_concept(c) for c in names]
    prior = lab_prior(backbone, names)
    if method == "cfr":
        return refine(backbone, items, prior, lam=resolved_lam(backbone, items, s)[0], preserve=s.preserve)
    if method == "mace":
        return mace(backbone, items, s.override(seed=seed), prior, progress=progress).weights
    raise BadInputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
