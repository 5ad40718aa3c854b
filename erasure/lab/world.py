"""The concept lab's world: procedurally rendered 32x32 images and their captions.

Every image shows one coloured shape on a varied background, with a whole-image style (plain, striped or
checkered). Each factor is a *concept* that an erasure method can target and that the lab classifier can read
back: four shapes (objects), four colours (attributes) and two styles (whole-image textures).

Captions come from several templates and use synonyms for every shape, colour and style. Canonical words dominate
the training captions; synonyms appear in a minority of them (``SYNONYM_RATE``), so a method that erases only the
canonical word and misses its synonyms scores badly on *generality*.

Rendering is vectorised torch code driven by an explicit ``torch.Generator``: the same seed gives bit-identical
images and captions on any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IMAGE_SIZE = 32

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
STYLES: tuple[str, ...] = ("plain", "striped", "checkered")
#: styles that are concepts (``plain`` is the absence of a style)
STYLE_CONCEPTS: tuple[str, ...] = ("striped", "checkered")

SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disk", "ring"),
    "square": ("box", "block"),
    "triangle": ("wedge", "pyramid"),
    "cross": ("plus", "x"),
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "lime"),
    "blue": ("azure", "navy"),
    "yellow": ("golden", "lemon"),
    "striped": ("stripy", "banded"),
    "checkered": ("chequered", "plaid"),
}

#: fraction of mentions that use a synonym instead of the canonical word during training
SYNONYM_RATE = 0.2

#: the width of the background's per-channel tint around grey (``render``): a background is never more coloured than
#: that, which is what tells an erased model's coloured field from one (``classifier.field_colour``)
BACKGROUND_TINT = 0.10

COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.12),
    "green": (0.12, 0.78, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
}

# Training templates. {c} colour word (may be empty), {s} shape noun, {y} style word.
TEMPLATES_SHAPE = (
    "a {c} {s}",
    "a photo of a {c} {s}",
    "a picture of a {c} {s}",
    "an image of a {c} {s}",
    "{c} {s}",
    "a drawing of a {c} {s}",
)
TEMPLATES_STYLE = (
    "a {c} {s} in {y} style",
    "a {y} picture of a {c} {s}",
    "a {c} {s} , {y}",
    "a {y} image of a {c} {s}",
)
#: nouns used when a caption names no shape
GENERIC_NOUNS = ("shape", "object", "thing")


@dataclass(frozen=True)
class Attributes:
    """The factors of one rendered image, as class indices into SHAPES / COLOURS / STYLES."""

    shape: torch.Tensor  # [N] long
    colour: torch.Tensor  # [N] long
    style: torch.Tensor  # [N] long


def concept_kind(concept: str) -> str:
    """Which classifier head reads a concept: ``shape``, ``colour`` or ``style``."""
    if concept in SHAPES:
        return "shape"
    if concept in COLOURS:
        return "colour"
    if concept in STYLES:
        return "style"
    raise KeyError(f"unknown lab concept {concept!r}; lab concepts are {', '.join(ALL_CONCEPTS)}")


ALL_CONCEPTS: tuple[str, ...] = SHAPES + COLOURS + STYLE_CONCEPTS


def concept_index(concept: str) -> int:
    kind = concept_kind(concept)
    return {"shape": SHAPES, "colour": COLOURS, "style": STYLES}[kind].index(concept)


def sample_attributes(n: int, generator: torch.Generator) -> Attributes:
    return Attributes(
        shape=torch.randint(len(SHAPES), (n,), generator=generator),
        colour=torch.randint(len(COLOURS), (n,), generator=generator),
        style=torch.randint(len(STYLES), (n,), generator=generator),
    )


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def render(attrs: Attributes, generator: torch.Generator, supersample: int = 3) -> torch.Tensor:
    """Render images for the given attributes. Returns [N, 3, 32, 32] in [-1, 1].

    Shapes are anti-aliased by supersampling. Backgrounds are low-saturation grey gradients so that the shape's
    colour is never ambiguous; styles modulate the brightness of the whole image.
    """
    n = attrs.shape.shape[0]
    g = generator
    size = IMAGE_SIZE * supersample
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / supersample  # pixel units
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    yy, xx = yy[None], xx[None]

    radius = _uniform(n, 7.0, 11.5, g)[:, None, None]
    margin = radius + 1.0
    cx = margin + torch.rand(n, 1, 1, generator=g) * (IMAGE_SIZE - 2 * margin)
    cy = margin + torch.rand(n, 1, 1, generator=g) * (IMAGE_SIZE - 2 * margin)
    angle = _uniform(n, -0.35, 0.35, g)[:, None, None]
    dx, dy = xx - cx, yy - cy
    cos, sin = torch.cos(angle), torch.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy

    masks = torch.zeros(n, size, size)
    shape = attrs.shape[:, None, None]
    circle = (dx**2 + dy**2) <= radius**2
    square = torch.maximum(u.abs(), v.abs()) <= radius * 0.82
    # equilateral triangle pointing up, centroid at the centre
    r = radius * 1.2
    tri = (v <= r * 0.5) & (math.sqrt(3) * u - v <= r) & (-math.sqrt(3) * u - v <= r)
    arm = radius * 0.34
    cross = ((u.abs() <= radius) & (v.abs() <= arm)) | ((v.abs() <= radius) & (u.abs() <= arm))
    for i, m in enumerate((circle, square, tri, cross)):
        masks = torch.where(shape == i, m.float(), masks)
    mask = torch.nn.functional.avg_pool2d(masks[:, None], supersample)  # [N,1,32,32] coverage

    # background: grey level + slight tint + linear gradient
    base = _uniform(n, 0.25, 0.75, g)[:, None, None, None]
    tint = (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * BACKGROUND_TINT
    gdir = torch.rand(n, generator=g) * 2 * math.pi
    lin = torch.linspace(-1, 1, IMAGE_SIZE)
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    grad = (torch.cos(gdir)[:, None, None] * gx + torch.sin(gdir)[:, None, None] * gy)[:, None]
    bg = (base + tint + 0.12 * _uniform(n, 0.0, 1.0, g)[:, None, None, None] * grad).clamp(0, 1)
    bg = bg.expand(n, 3, IMAGE_SIZE, IMAGE_SIZE)

    rgb = torch.tensor([COLOUR_RGB[c] for c in COLOURS])[attrs.colour]  # [N,3]
    rgb = (rgb + (torch.rand(n, 3, generator=g) - 0.5) * 0.12).clamp(0, 1)
    fg = rgb[:, :, None, None].expand_as(bg)
    img = bg * (1 - mask) + fg * mask

    # style: whole-image brightness texture
    iy = torch.arange(IMAGE_SIZE)[:, None].expand(IMAGE_SIZE, IMAGE_SIZE)
    ix = torch.arange(IMAGE_SIZE)[None, :].expand(IMAGE_SIZE, IMAGE_SIZE)
    phase = torch.randint(0, 8, (n, 1, 1), generator=g)
    stripes = (((iy[None] + phase) // 4) % 2).float()  # horizontal bands of 4 px
    checks = ((((iy[None] + phase) // 6) + ((ix[None] + phase) // 6)) % 2).float()  # 6 px checker
    style = attrs.style[:, None, None]
    pattern = torch.where(style == 1, stripes, torch.where(style == 2, checks, torch.zeros_like(stripes)))
    img = img * (1 - 0.45 * pattern[:, None])
    return (img * 2 - 1).clamp(-1, 1)


def _word(concept: str, g: torch.Generator, synonym_rate: float) -> str:
    syns = SYNONYMS.get(concept, ())
    if syns and torch.rand((), generator=g).item() < synonym_rate:
        return syns[int(torch.randint(len(syns), (), generator=g))]
    return concept


def caption(
    shape: int,
    colour: int,
    style: int,
    g: torch.Generator,
    p_shape: float = 0.85,
    p_colour: float = 0.7,
    p_style: float = 0.8,
    synonym_rate: float = SYNONYM_RATE,
) -> str:
    """One training caption for an image; any factor may be left unnamed."""
    rnd = lambda: torch.rand((), generator=g).item()  # noqa: E731
    s = _word(SHAPES[shape], g, synonym_rate) if rnd() < p_shape else GENERIC_NOUNS[int(rnd() * 3)]
    if s in GENERIC_NOUNS and rnd() < 0.5:
        s = "shape"
    c = _word(COLOURS[colour], g, synonym_rate) if rnd() < p_colour else ""
    y = STYLES[style]
    if y != "plain" and rnd() < p_style:
        y = _word(y, g, synonym_rate)
        t = TEMPLATES_STYLE[int(rnd() * len(TEMPLATES_STYLE))]
    elif y == "plain" and rnd() < 0.3:
        t = TEMPLATES_STYLE[int(rnd() * len(TEMPLATES_STYLE))]
    else:
        t = TEMPLATES_SHAPE[int(rnd() * len(TEMPLATES_SHAPE))]
    return " ".join(t.format(c=c, s=s, y=y).split())


def sample_batch(n: int, generator: torch.Generator,
                 p_empty: float = 0.1) -> tuple[torch.Tensor, list[str], Attributes]:
    """Images, captions (some empty, for classifier-free guidance) and attributes for training."""
    attrs = sample_attributes(n, generator)
    images = render(attrs, generator)
    caps = []
    for i in range(n):
        if torch.rand((), generator=generator).item() < p_empty:
            caps.append("")
        else:
            caps.append(caption(int(attrs.shape[i]), int(attrs.colour[i]), int(attrs.style[i]), generator))
    return images, caps, attrs


# ---------------------------------------------------------------------------------------------------------------
# Evaluation prompts: each concept has its own prompts (canonical word) and synonym prompts (generality).


def concept_prompts(concept: str, synonyms: bool = False) -> list[str]:
    """The lab's fixed evaluation prompts for a concept (canonical word, or its synonyms when ``synonyms``)."""
    kind = concept_kind(concept)
    words = SYNONYMS[concept] if synonyms else (concept,)
    out: list[str] = []
    for w in words:
        if kind == "shape":
            out += [f"a {w}", f"a photo of a {w}"]
        elif kind == "colour":
            out += [f"a {w} shape", f"a photo of a {w} object"]
        else:
            out += [f"a shape in {w} style", f"a {w} picture of a shape"]
    return out


#: words the lab tokenizer knows (everything in captions and evaluation prompts, plus words that the erasure
#: methods use as anchors and prior-preservation prompts on the lab model)
EXTRA_WORDS = (
    "a an the of in on with and , . photo picture image drawing shape object thing style plain art "
    "person people man woman wearing clothes scene background painting sketch colour color pattern "
    "small big large little bright dark"
).split()


def vocabulary() -> list[str]:
    words: set[str] = set(EXTRA_WORDS) | set(GENERIC_NOUNS)
    for t in TEMPLATES_SHAPE + TEMPLATES_STYLE:
        words |= {w for w in t.replace("{c}", "").replace("{s}", "").replace("{y}", "").split()}
    for c in SHAPES + COLOURS + STYLES:
        words.add(c)
        words |= set(SYNONYMS.get(c, ()))
    return sorted(words)


def prior_prompts(exclude: list[str] | tuple[str, ...] = (), n: int = 1000, seed: int = 0) -> list[str]:
    """General lab captions for prior preservation (the lab's counterpart of ``erasure.prompts.prior_prompts``):
    ``n`` distinct training-style captions, none that names an excluded concept or one of its synonyms."""
    banned = set()
    for c in exclude:
        banned.add(c)
        banned |= set(SYNONYMS.get(c, ()))
    g = torch.Generator().manual_seed(seed)
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(50 * n):
        if len(out) >= n:
            break
        a = sample_attributes(1, g)
        cap = caption(int(a.shape), int(a.colour), int(a.style), g)
        if cap in seen or banned & set(cap.split()):
            continue
        seen.add(cap)
        out.append(cap)
    return out


def concept_templates(concept: str, with_other_concepts: bool = True) -> list[str]:
    """Training-style prompts with ``{c}`` where the concept goes (what erasure methods edit on the lab model).

    ``with_other_concepts=False`` leaves out the prompts that also name another lab concept ("a red {c}"): a method
    that pushes the whole prompt's guidance direction away (ANT) would erase those concepts too."""
    kind = concept_kind(concept)
    out: list[str] = []
    colours = COLOURS if with_other_concepts else ()
    nouns = GENERIC_NOUNS + SHAPES if with_other_concepts else GENERIC_NOUNS
    if kind == "shape":
        for col in ("",) + colours:
            out += [" ".join(t.format(c=col, s="{c}", y="").split()) for t in TEMPLATES_SHAPE]
        if with_other_concepts:
            out += [" ".join(t.format(c="", s="{c}", y=y).split()) for t in TEMPLATES_STYLE
                    for y in STYLE_CONCEPTS]
    elif kind == "colour":
        for s in nouns:
            out += [" ".join(t.format(c="{c}", s=s, y="").split()) for t in TEMPLATES_SHAPE]
    else:
        for s in nouns:
            out += [" ".join(t.format(c="", s=s, y="{c}").split()) for t in TEMPLATES_STYLE]
    return list(dict.fromkeys(out))
