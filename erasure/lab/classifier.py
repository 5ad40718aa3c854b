"""The lab classifier: reads shape, colour and style back from a 32x32 image.

A small CNN with three heads, trained on clean renders of the lab world with mild noise and blur augmentation
(generated images are never perfectly clean). It is the lab's judge: every efficacy, generality and specificity
figure is "what fraction of generated images does the classifier assign to the prompted concept".
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..files import atomic_save
from . import world

HEADS = {"shape": world.SHAPES, "colour": world.COLOURS, "style": world.STYLES}

#: the largest distance from grey of a background's mean colour: a tint of +-BACKGROUND_TINT / 2 per channel, less its
#: grey part, is at most BACKGROUND_TINT * sqrt(6) / 3 from grey (two channels up, one down). A field further from
#: grey than this is coloured (docs/lab.md#empty-images)
FIELD_CHROMA = world.BACKGROUND_TINT * math.sqrt(6) / 3


def field_chroma(images: torch.Tensor) -> torch.Tensor:
    """Each image's mean colour less its grey part, [N, 3] (images in [-1, 1]); its norm is the distance from grey."""
    rgb = ((images.float() + 1) / 2).mean(dim=(2, 3))
    return rgb - rgb.mean(1, keepdim=True)


def field_colour(images: torch.Tensor) -> torch.Tensor:
    """The colour of each image taken as a field (images in [-1, 1]): the index in ``world.COLOURS`` of the palette
    hue nearest its mean colour's hue, or -1 where the mean colour is no further from grey than a background can be
    (``FIELD_CHROMA``). The colour head has no "no colour" answer: it reads 91% of the world's empty backgrounds as
    yellow, so an image with no shape gets its colour from this instead."""
    chroma = field_chroma(images)
    palette = torch.tensor([world.COLOUR_RGB[c] for c in world.COLOURS], device=chroma.device)
    palette = palette - palette.mean(1, keepdim=True)
    hue = (chroma @ (palette / palette.norm(dim=1, keepdim=True)).T).argmax(1)
    return torch.where(chroma.norm(dim=1) > FIELD_CHROMA, hue, -1)


def reads_as(pred: dict[str, torch.Tensor], kind: str, index: int) -> torch.Tensor:
    """Per image, whether it shows the concept (head ``kind``, class ``index``). With the presence net's answers in
    ``pred`` (``present`` and ``field``, as ``LabClassifier.predict`` gives them), an image with no shape shows no
    shape concept, and its colour is its field's (``field_colour``); without them, the head alone."""
    return seen_as(pred)[kind] == index


def seen_as(pred: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per head, what each image shows (``reads_as`` compares it): no shape (-1) where the presence net finds none, its
    field's colour there (``field_colour``, -1 for none) instead of the colour head's guess, the style as the head
    reads it (a style is read with or without a shape); without the presence net's answers, the heads as they are.
    What the shape-aware collateral measure compares (docs/lab.md#empty-images)."""
    out = {h: pred[h] for h in HEADS}
    if "present" not in pred:
        return out
    out["shape"] = torch.where(pred["present"], pred["shape"], torch.full_like(pred["shape"], -1))
    if "field" in pred:
        out["colour"] = torch.where(pred["present"], pred["colour"], pred["field"].to(pred["colour"].dtype))
    return out


class LabClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.GroupNorm(8, o), nn.SiLU())

        self.features = nn.Sequential(
            block(3, 32, 1), block(32, 32, 1), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2),
            block(128, 128, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in HEADS.items()})
        #: whether a shape is there at all (``train_presence``; None until loaded)
        self.presence: PresenceNet | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        """Class indices per head for images in [-1, 1]; with the presence head, also ``present`` (bool: a shape is
        there) and ``field`` (``field_colour``: what colour the image is, read as a field)."""
        keys = list(HEADS) + (["present"] if self.presence is not None else [])
        outs: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for i in range(0, images.shape[0], batch):
            x = images[i : i + batch].float()
            h = self.features(x)
            for k in HEADS:
                outs[k].append(self.heads[k](h).argmax(-1))
            if self.presence is not None:
                outs["present"].append(self.presence(x) > 0)
        if self.presence is not None:
            outs["field"] = [field_colour(images)]
        return {k: torch.cat(v) for k, v in outs.items()}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    blur = torch.rand(n, 1, 1, 1, generator=g) < 0.3
    k = torch.tensor([0.25, 0.5, 0.25])
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    blurred = nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = torch.where(blur, blurred, x)
    sigma = torch.rand(n, 1, 1, 1, generator=g) * 0.12
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _optimizer_step(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                    loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def render_labelled(n: int, seed: int) -> tuple[torch.Tensor, world.Attributes]:
    g = torch.Generator().manual_seed(seed)
    attrs = world.sample_attributes(n, g)
    return world.render(attrs, g), attrs


def accuracy(clf: LabClassifier, images: torch.Tensor, attrs: world.Attributes) -> dict[str, float]:
    pred = clf.eval().predict(images)
    return {k: (pred[k] == getattr(attrs, k)).float().mean().item() for k in HEADS}


def train_classifier(out: Path, steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     log=print) -> dict[str, float]:
    """Train, report held-out accuracy per head on a fresh render (seed never used in training), save."""
    torch.manual_seed(seed)
    clf = LabClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.time()
    for step in range(steps):
        attrs = world.sample_attributes(batch_size, g)
        x = _augment(world.render(attrs, g), g)
        logits = clf(x)
        loss = sum(nn.functional.cross_entropy(logits[k], getattr(attrs, k)) for k in HEADS)
        _optimizer_step(opt, sched, loss)
        if (step + 1) % 100 == 0:
            log(f"classifier step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    images, attrs = render_labelled(2000, seed=10_000 + seed)
    acc = accuracy(clf, images, attrs)
    log(f"held-out accuracy: {acc}")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"heads": json.dumps(HEADS), "heldout_accuracy": json.dumps(acc),
            "recipe": json.dumps({"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed})}
    atomic_save({k: v.contiguous() for k, v in clf.state_dict().items()}, out, metadata=meta)
    return acc


def load_classifier(path: Path) -> LabClassifier:
    """The classifier, with its shape-presence head when ``presence.safetensors`` lies beside it."""
    clf = LabClassifier()
    clf.load_state_dict(load_file(str(path)))
    presence = Path(path).with_name(PRESENCE_NAME)
    if presence.is_file():
        clf.presence = PresenceNet()
        clf.presence.load_state_dict(load_file(str(presence)))
    return clf.eval()


# Shape presence. The shape head has no "no shape" class: it was trained on images that always show a shape, and
# reads an empty background as a cross (73%) or a triangle (25%). Erasures that draw nothing (MACE on lab-clip turns
# "a cross" into an empty background) would then count as not erasing a cross and as erasing a circle. A second,
# smaller CNN says whether a shape is there (a linear head on the classifier's pooled features could not tell a
# large blue disk from a blue field); the classifier's heads are unchanged.
PRESENCE_NAME = "presence.safetensors"


def _perturb(x: torch.Tensor, g: torch.Generator, wash_max: float) -> torch.Tensor:
    """Brightness and contrast, a wash towards a random colour and a low-frequency colour field: the ways an edited
    model's images leave the world's (dark or saturated fields, gradients). ``x`` in [0, 1]."""
    n = x.shape[0]
    x = x * _uniform4(n, 0.3, 1.2, g) + _uniform4(n, -0.2, 0.25, g)
    colour = torch.rand(n, 3, 1, 1, generator=g)
    x = x + (colour - x) * _uniform4(n, 0.0, wash_max, g)
    field = nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g) - 0.5, size=x.shape[-2:], mode="bilinear",
                                      align_corners=False)
    return (x + field * _uniform4(n, 0.0, 0.3, g)).clamp(0, 1)


def _uniform4(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=g)


def render_empty(n: int, g: torch.Generator) -> torch.Tensor:
    """Lab images with no shape: the world's backgrounds and styles, perturbed as ``_perturb`` says (an erased model's
    empty images are often a dark or coloured field)."""
    attrs = world.sample_attributes(n, g)
    attrs.shape[:] = len(world.SHAPES)  # no shape mask matches
    return _perturb((world.render(attrs, g) + 1) / 2, g, 1.0) * 2 - 1


def render_shapes(n: int, g: torch.Generator) -> torch.Tensor:
    """Lab images with a shape, perturbed alike (a lighter wash, so that the shape stays visible)."""
    return _perturb((world.render(world.sample_attributes(n, g), g) + 1) / 2, g, 0.4) * 2 - 1


class PresenceNet(nn.Module):
    """Is there a shape? One logit per image in [-1, 1] (> 0: a shape)."""

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.GroupNorm(8, o), nn.SiLU())

        self.features = nn.Sequential(block(3, 16, 1), block(16, 32, 2), block(32, 32, 1), block(32, 64, 2),
                                      block(64, 64, 1))
        self.out = nn.Linear(128, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.out(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))[:, 0]


def train_presence(out: Path, steps: int = 800, batch_size: int = 128, seed: int = 0,
                   log=print) -> dict[str, float]:
    """Train the presence net (shape vs empty renders, both perturbed) and save it (``load_classifier`` loads it from
    beside the classifier)."""
    torch.manual_seed(seed)
    head = PresenceNet()
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed + 2)
    for step in range(steps):
        pos = _augment(render_shapes(batch_size // 2, g), g)
        neg = _augment(render_empty(batch_size // 2, g), g)
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
        loss = nn.functional.binary_cross_entropy_with_logits(head(torch.cat([pos, neg])), y)
        _optimizer_step(opt, sched, loss)
        if (step + 1) % 100 == 0:
            log(f"presence step {step + 1}/{steps} loss {loss.item():.4f}")
    g = torch.Generator().manual_seed(20_000 + seed)
    plain = world.render(world.sample_attributes(1000, g), g)
    pos, neg = render_shapes(1000, g), render_empty(1000, g)
    head.eval()
    with torch.no_grad():
        acc = {"shape": float((head(plain) > 0).float().mean()),
               "shape_perturbed": float((head(pos) > 0).float().mean()),
               "empty": float((head(neg) <= 0).float().mean())}
    log(f"presence held-out accuracy: {acc}")
    meta = {"heldout_accuracy": json.dumps(acc), "recipe": json.dumps({"steps": steps, "batch_size": batch_size,
                                                                         "seed": seed})}
    atomic_save({k: v.contiguous() for k, v in head.state_dict().items()}, out, metadata=meta)
    return acc
