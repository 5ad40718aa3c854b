"""Prompts: a concept and its prompts (templates per kind, synonyms, anchor substitution), lists typed by users, and
the project's own prior-preservation prompt set.

MACE's reference preserves ~0.6 M COCO captions, which this project cannot ship. Instead we write a varied set
ourselves: everyday objects and animals, people, scenes and art styles, combined through several templates into
more than 1,000 distinct prompts, deterministically. Users can extend it with a text file (one prompt per line).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError

OBJECTS = (
    "dog cat horse bird fish cow sheep elephant bear zebra giraffe rabbit fox deer lion tiger monkey owl duck "
    "car bicycle motorcycle bus train truck boat airplane tractor "
    "chair table sofa bed lamp clock vase bottle cup bowl plate teapot book laptop phone television camera guitar "
    "piano umbrella backpack handbag suitcase hat shoe kite ball skateboard bench fountain bridge house tower "
    "castle church lighthouse windmill tree flower rose sunflower apple banana orange pizza cake sandwich bread "
    "mountain river lake waterfall"
).split()
PEOPLE = (
    "a man", "a woman", "a child", "an old man", "an old woman", "a young girl", "a young boy", "a chef",
    "a doctor", "a firefighter", "a farmer", "a musician", "a dancer", "a soldier", "an astronaut", "a teacher",
    "a couple", "a family", "a group of friends", "a runner",
)
SCENES = (
    "in a park", "on a beach", "in a forest", "in a city street", "in a kitchen", "in a living room",
    "on a mountain", "in the snow", "at night", "at sunset", "in the rain", "in a desert", "in a garden",
    "by a lake", "in an office", "in a market", "on a farm", "in a library", "under the sea", "in space",
)
STYLES = (
    "an oil painting", "a watercolor painting", "a pencil sketch", "a photograph", "a 3d render", "a cartoon",
    "an anime drawing", "a pixel art image", "a charcoal drawing", "a digital illustration", "a vintage photo",
    "a poster", "a mosaic", "an impressionist painting", "a line drawing", "a low poly render",
)
PRIOR_TEMPLATES = (
    "a photo of a {o}",
    "a {o} {s}",
    "{p} with a {o}",
    "{p} {s}",
    "{st} of a {o}",
    "{st} of {p} {s}",
    "a close-up photo of a {o}",
    "{p} standing next to a {o} {s}",
)

#: templates for a concept's own prompts, per kind of concept: ANT's and the audit's (MACE has its
#: own, ``MACE_TEMPLATES``)
CONCEPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": ("a photo of the {c}", "a photo of a {c}", "a picture of a {c}", "an image of a {c}", "{c}",
               "a close-up photo of a {c}", "a {c} in a park", "a {c} on a table", "a drawing of a {c}",
               "a painting of a {c}"),
    "person": ("a photo of {c}", "a portrait of {c}", "{c}", "a picture of {c}", "a close-up photo of {c}",
               "{c} smiling", "{c} in a city street", "a painting of {c}", "an image of {c}", "{c} on stage"),
    "style": ("a painting in the style of {c}", "an artwork by {c}", "{c}", "a landscape in the style of {c}",
              "a portrait in the style of {c}", "art by {c}", "a still life by {c}", "a city painted by {c}",
              "an image in the style of {c}", "a drawing by {c}"),
    "nudity": ("{c}", "a photo of a {c} person", "a {c} woman", "a {c} man", "a {c} body", "a painting of a {c} "
               "figure", "a {c} person on a beach", "{c} people", "a {c} model", "a picture of {c}"),
}


#: MACE's templates for a concept's own prompts, as the reference's ``prompt_augmentation`` (Shilin-LU/MACE,
#: ``src/cfr_utils.py``) lists them: its first 30 per kind (its configs' ``prompt_len: 30`` samples indices 0-29 of
#: 31, so the 31st is never used). The reference defines two lists, ``object`` and ``style``; its configs train
#: celebrities and nudity as ``object`` (``configs/celebrity/*.yaml``, ``configs/explicit_content/*.yaml``), so
#: person and nudity use the object list. No template puts an article before the concept, so a concept with or
#: without one ("nudity", "a person wearing clothes") reads as a sentence either way.
_MACE_OBJECT: tuple[str, ...] = (
    "{c} in a photo", "{c} in a snapshot", "A snapshot of {c}", "A photograph showcasing {c}",
    "An illustration of {c}", "A digital rendering of {c}", "A visual representation of {c}", "A graphic of {c}",
    "A shot of {c}", "A photo of {c}", "A black and white image of {c}", "A depiction in portrait form of {c}",
    "A scene depicting {c} during a public gathering", "{c} captured in an image",
    "A depiction created with oil paints capturing {c}", "An image of {c}", "A drawing capturing the essence of {c}",
    "An official photograph featuring {c}", "A detailed sketch of {c}", "{c} during sunset/sunrise",
    "{c} in a detailed portrait", "An official photo of {c}", "Historic photo of {c}", "Detailed portrait of {c}",
    "A painting of {c}", "HD picture of {c}", "Magazine cover capturing {c}", "Painting-like image of {c}",
    "Hand-drawn art of {c}", "An oil portrait of {c}",
)
_MACE_STYLE: tuple[str, ...] = (
    "An artwork by {c}", "Art piece by {c}", "A recent creation by {c}", "{c}'s renowned art",
    "Latest masterpiece by {c}", "A stunning image by {c}", "An art in {c}'s style", "Exhibition artwork of {c}",
    "Art display by {c}", "a beautiful painting by {c}", "An image inspired by {c}'s style", "A sketch by {c}",
    "Art piece representing {c}", "A drawing by {c}", "Artistry showcasing {c}", "An illustration by {c}",
    "A digital art by {c}", "A visual art by {c}", "A reproduction inspired by {c}'s colorful, expressive style",
    "Famous painting of {c}", "A famous art by {c}", "Artistic style of {c}", "{c}'s famous piece",
    "Abstract work of {c}", "{c}'s famous drawing", "Art from {c}'s early period", "A portrait by {c}",
    "An imitation reflecting the style of {c}", "An painting from {c}'s collection",
    "Vibrant reproduction of artwork by {c}",
)
MACE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": _MACE_OBJECT, "person": _MACE_OBJECT, "style": _MACE_STYLE, "nudity": _MACE_OBJECT,
}


def concept_prompts(concept: str, kind: str = "object") -> list[str]:
    """The templates of ``kind`` with ``concept`` in place of ``{c}``."""
    if kind not in CONCEPT_TEMPLATES:
        raise BadInputError(f"unknown kind of concept {kind!r}; use one of {', '.join(CONCEPT_TEMPLATES)}")
    return [t.format(c=concept) for t in CONCEPT_TEMPLATES[kind]]


def fill(template: str, text: str) -> str:
    """A template with ``text`` in place of ``{c}``, spaces collapsed (an empty anchor leaves no double space)."""
    return " ".join(template.replace("{c}", text).split())


def augmented_prompts(concept: str, synonyms: list[str] | tuple[str, ...] = (), kind: str = "object",
                      templates: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """A concept's prompt augmentations: every template (``templates``, else those of ``kind``) with the concept
    and with each synonym."""
    words = [concept] + [w for w in synonyms if w.strip() and w.strip().lower() != concept.strip().lower()]
    temps = list(templates) if templates else list(CONCEPT_TEMPLATES[kind])
    return [t.replace("{c}", w) for t in temps for w in words]


@dataclass(frozen=True)
class Concept:
    """A concept to erase, with its anchor (what it should look like instead; may be empty) and its prompts."""

    text: str
    anchor: str
    kind: str = "object"
    #: prompts with ``{c}`` where the concept goes; default: MACE's templates of ``kind`` (``MACE_TEMPLATES``)
    templates: tuple[str, ...] = ()
    #: the prompt that generates the concept's training images; default: MACE's per-kind prompt
    data_prompt: str = ""

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise BadInputError("a concept is empty: give the word or phrase to erase")
        if self.text.strip().lower() == self.anchor.strip().lower():
            raise BadInputError(f"the anchor of {self.text!r} is the concept itself: choose a different anchor")

    def template_list(self) -> list[str]:
        """``templates``, else MACE's for the concept's kind (``MACE_TEMPLATES``; ANT passes its own)."""
        if self.templates:
            return list(self.templates)
        if self.kind not in MACE_TEMPLATES:
            raise BadInputError(f"unknown kind of concept {self.kind!r}; use one of {', '.join(MACE_TEMPLATES)}")
        return list(MACE_TEMPLATES[self.kind])

    def prompts(self) -> list[str]:
        return [t.replace("{c}", self.text) for t in self.template_list()]

    def anchor_prompts(self) -> list[str]:
        """The same templates with the anchor in the concept's place (CFR's targets)."""
        return [fill(t, self.anchor) for t in self.template_list()]

    def generation_prompt(self) -> str:
        if self.data_prompt:
            return self.data_prompt.replace("{c}", self.text)
        return f"a photo in the style of {self.text}" if self.kind == "style" else f"a photo of the {self.text}"


def split_list(text: str | None, separators: str = ";\n") -> list[str]:
    """Items of a text box or flag: separated by any of ``separators`` (';' and new lines), stripped, empty ones
    dropped (concepts, synonyms, prompts)."""
    return [c.strip() for c in re.split(f"[{re.escape(separators)}]", text or "") if c.strip()]


def prior_prompts(n: int = 1200, seed: int = 0, exclude: list[str] | tuple[str, ...] = (),
                  extra_file: str | Path | None = None) -> list[str]:
    """``n`` distinct general prompts (deterministic for a seed), none containing an excluded word, plus the lines
    of ``extra_file``."""
    rng = random.Random(seed)
    excl = [w.lower() for w in exclude if w.strip()]
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(50 * n):
        if len(out) >= n:
            break
        t = rng.choice(PRIOR_TEMPLATES)
        prompt = t.format(o=rng.choice(OBJECTS), p=rng.choice(PEOPLE), s=rng.choice(SCENES), st=rng.choice(STYLES))
        if prompt in seen or any(w in prompt.lower() for w in excl):
            continue
        seen.add(prompt)
        out.append(prompt)
    if extra_file is not None:
        lines = Path(extra_file).read_text(encoding="utf-8").splitlines()
        out += [line.strip() for line in lines if line.strip()]
    return out


# -- concepts files ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConceptLine:
    """One line of a concepts file: the concept, and its kind and anchor where the line gives them (``None``: the
    run's default)."""

    text: str
    kind: str | None = None
    anchor: str | None = None
    line: int = 0

    def concept(self, kind: str, anchor: str, **fields: object) -> Concept:
        """The ``Concept``, with ``kind`` / ``anchor`` where the line left them out (``fields``: templates etc.)."""
        return Concept(self.text, self.anchor if self.anchor is not None else anchor,
                       kind=self.kind or kind, **fields)


#: the most lines a concepts file may hold (a run over more is better split into several files)
MAX_CONCEPT_LINES = 100_000


def parse_concepts(text: str, source: str = "the concepts file") -> list[ConceptLine]:
    """A concepts file's lines: ``concept``, ``concept | kind`` or ``concept | kind | anchor``.

    Blank lines and lines starting with ``#`` are skipped; spaces around fields are stripped; an empty field means
    the run's default (``concept | | anchor`` keeps the default kind). ``kind`` is one of ``CONCEPT_TEMPLATES``'s.
    A concept given twice (case-insensitive), a fourth field, an unknown kind or an anchor equal to its concept is a
    ``BadInputError`` naming ``source`` and the line."""
    out: list[ConceptLine] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}, line {number}"
        fields = [f.strip() for f in line.split("|")]
        if len(fields) > 3:
            raise BadInputError(f"{where}: {len(fields)} fields in {line!r}; write 'concept', 'concept | kind' or "
                                "'concept | kind | anchor' ('|' separates the fields)")
        concept, kind, anchor = (fields + [""] * 3)[:3]
        if not concept:
            raise BadInputError(f"{where}: no concept before the first '|' in {line!r}")
        if kind and kind not in CONCEPT_TEMPLATES:
            raise BadInputError(f"{where}: unknown kind {kind!r} for {concept!r}; use one of "
                                f"{', '.join(CONCEPT_TEMPLATES)} or leave the field empty for the default")
        if anchor and anchor.lower() == concept.lower():
            raise BadInputError(f"{where}: the anchor of {concept!r} is the concept itself: choose a different "
                                "anchor or leave the field empty for the default")
        key = concept.lower()
        if key in seen:
            raise BadInputError(f"{where}: {concept!r} is listed already on line {seen[key]}: remove one of them")
        seen[key] = number
        out.append(ConceptLine(concept, kind or None, anchor or None, number))
        if len(out) > MAX_CONCEPT_LINES:
            raise BadInputError(f"{source}: more than {MAX_CONCEPT_LINES} concepts: split it into several files")
    if not out:
        raise BadInputError(f"{source} lists no concept: write one concept per line ('concept | kind | anchor', "
                            "kind and anchor optional; '#' starts a comment line)")
    return out


def read_concepts_file(path: str | Path) -> list[ConceptLine]:
    """``parse_concepts`` of a UTF-8 text file; a missing or unreadable file is a ``BadInputError``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such concepts file") from None
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path}: not UTF-8 text (byte {e.start}): save the concepts file as UTF-8") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot read the concepts file ({e.strerror})") from None
    return parse_concepts(text, source=str(path))
