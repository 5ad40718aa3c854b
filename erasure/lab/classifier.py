"""The lab classifier: reads shape, colour and style back from a 32x32 image.

A small CNN with three heads, trained on clean renders of the lab world with mild noise and blur augmentation
(generated images are never perfectly clean). It is the lab's judge: every efficacy, generality and specificity
figure is "what fraction of generated images does the classifier assign to the prompted concept".
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..files import atomic_save
from . import world

HEADS = {"shape": world.SHAPES, "colour": world.COLOURS, "style": world.STYLES}


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

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        """Class indices per head for images in [-1, 1]."""
        outs: dict[str, list[torch.Tensor]] = {k: [] for k in HEADS}
        for i in range(0, images.shape[0], batch):
            logits = self(images[i : i + batch].float())
            for k in HEADS:
                outs[k].append(logits[k].argmax(-1))
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
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
    clf = LabClassifier()
    clf.load_state_dict(load_file(str(path)))
    return clf.eval()
