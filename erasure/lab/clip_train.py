"""A CLIP-like text encoder for the lab (issue 18, item 4): ``python -m erasure lab train-text-encoder``.

The first lab model trains its text encoder jointly with the UNet, so nothing asks the end token (and the padding,
which repeats it) to summarise the prompt: measured, "a photo of a circle" and "... square" end on the same vector
(cosine 0.998). In SD the text encoder is CLIP, trained contrastively on its end token's output before the UNet ever
saw it, and frozen while the UNet trained; MACE's closed-form refinement acts on exactly those end/padding tokens.

This trains the lab's text encoder the way CLIP was trained: a contrastive (InfoNCE) loss between the end token's
final state (projected) and an image tower's embedding of the rendered image, both towers from scratch. Lab captions
name only some of an image's factors and a batch holds many images with the same factors, so a caption's positives
are every image in the batch that agrees with all the factors it names (soft targets, as in multi-positive
contrastive learning) instead of its own image only. The image tower has the lab classifier's architecture but is
trained here from a fresh initialisation: the classifier stays an independent judge.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import world
from .classifier import LabClassifier, _augment
from .model import new_model
from .train import optimizer_step

EMBED_DIM = 64


def _word_table() -> dict[str, tuple[int, int]]:
    """word -> (factor 0 shape / 1 colour / 2 style, class index)."""
    table: dict[str, tuple[int, int]] = {}
    for kind, names in enumerate((world.SHAPES, world.COLOURS, world.STYLES)):
        for i, name in enumerate(names):
            for w in (name, *world.SYNONYMS.get(name, ())):
                table[w] = (kind, i)
    return table


WORDS = _word_table()


def named_factors(captions: list[str]) -> torch.Tensor:
    """[N, 3] class index of the shape, colour and style each caption names (-1: not named)."""
    out = torch.full((len(captions), 3), -1, dtype=torch.long)
    for i, cap in enumerate(captions):
        for w in cap.split():
            if w in WORDS:
                kind, idx = WORDS[w]
                out[i, kind] = idx
    return out


def positives(named: torch.Tensor, attrs: world.Attributes) -> torch.Tensor:
    """[N captions, N images] True where the image agrees with every factor the caption names."""
    img = torch.stack([attrs.shape, attrs.colour, attrs.style], dim=1)  # [N,3]
    ok = (named[:, None, :] == -1) | (named[:, None, :] == img[None, :, :])
    return ok.all(-1)


class ImageTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = LabClassifier().features
        self.proj = nn.Linear(128, EMBED_DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.proj(self.features(x)), dim=-1)


def end_states(te, ids: torch.Tensor, eos: int) -> torch.Tensor:
    """The final (layer-normed) state of each prompt's first end token, as CLIP pools."""
    h = te(ids).last_hidden_state
    first = (ids == eos).int().argmax(-1)
    return h[torch.arange(ids.shape[0]), first]


@torch.no_grad()
def text_report(te, tok) -> dict[str, float]:
    """How much the end token tells prompts apart: mean cosine of the end-token states (and of the last padding
    token) of the lab's prompts that differ in one concept word, e.g. "a photo of a circle" vs "... square"."""
    pairs = []
    for names, prompt in ((world.SHAPES, "a photo of a {}"), (world.COLOURS, "a {} shape"),
                          (world.STYLE_CONCEPTS, "a shape in {} style")):
        texts = [prompt.format(n) for n in names]
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        h = te(ids).last_hidden_state
        first = (ids == tok.eos_token_id).int().argmax(-1)
        e = nn.functional.normalize(h[torch.arange(len(texts)), first], dim=-1)
        p = nn.functional.normalize(h[:, -1], dim=-1)
        iu = torch.triu_indices(len(texts), len(texts), 1)
        pairs.append(((e @ e.T)[iu[0], iu[1]], (p @ p.T)[iu[0], iu[1]]))
    return {"end_token_cosine": round(torch.cat([a for a, _ in pairs]).mean().item(), 4),
            "last_padding_cosine": round(torch.cat([b for _, b in pairs]).mean().item(), 4)}


@torch.no_grad()
def zero_shot(te, tok, tower: ImageTower, n: int = 1000, seed: int = 20_000) -> dict[str, float]:
    """Zero-shot accuracy per factor on fresh renders: the image's nearest prompt among one prompt per class."""
    g = torch.Generator().manual_seed(seed)
    attrs = world.sample_attributes(n, g)
    img = tower.eval()(world.render(attrs, g))
    out = {}
    for key, names, prompt in (("shape", world.SHAPES, "a photo of a {}"), ("colour", world.COLOURS, "a {} shape"),
                               ("style", world.STYLES, "a {} picture of a shape")):
        ids = tok([prompt.format(x) for x in names], padding="max_length", max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        txt = nn.functional.normalize(te.text_proj(end_states(te, ids, tok.eos_token_id)), dim=-1)
        pred = (img @ txt.T).argmax(-1)
        out[key] = round((pred == getattr(attrs, key)).float().mean().item(), 4)
    tower.train()
    return out


def train_text_encoder(out: Path, steps: int = 2000, batch_size: int = 256, lr: float = 1e-3, warmup: int = 100,
                       seed: int = 0, log=print) -> dict:
    """Train a lab text encoder contrastively (see the module's docstring); writes ``out/text_encoder``,
    ``out/tokenizer`` (the lab's), ``out/image_tower.safetensors`` and ``out/text-encoder-recipe.json``."""
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items() if k not in ("out", "log")}
    recipe["command"] = (f"python -m erasure lab train-text-encoder --out {out} --steps {steps} "
                         f"--batch-size {batch_size} --lr {lr} --seed {seed}")
    _, te, tok, _ = new_model(out, seed)
    te.text_proj = nn.Linear(te.config.hidden_size, EMBED_DIM, bias=False)
    tower = ImageTower()
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*te.parameters(), *tower.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    g = torch.Generator().manual_seed(seed + 1)
    eos = tok.eos_token_id
    t0, running = time.time(), 0.0
    log(f"before training: {text_report(te, tok)}")
    for step in range(steps):
        images, caps, attrs = world.sample_batch(batch_size, g, p_empty=0.0)
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        pos = positives(named_factors(caps), attrs).float()
        t = nn.functional.normalize(te.text_proj(end_states(te, ids, eos)), dim=-1)
        v = tower(_augment(images, g))
        logits = logit_scale.exp().clamp(max=100) * t @ v.T
        loss = 0.5 * (-(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
                      - (pos.T / pos.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean())
        optimizer_step(opt, params, loss, lr_at(step))
        running += loss.item()
        if (step + 1) % 50 == 0:
            log(f"step {step + 1}/{steps} loss {running / 50:.4f} lr {lr_at(step):.2e} {time.time() - t0:.0f}s")
            running = 0.0
        if (step + 1) % 500 == 0 or step + 1 == steps:
            te.eval()
            report = {**text_report(te, tok), "zero_shot": zero_shot(te, tok, tower)}
            te.train()
            log(f"step {step + 1}: {report}")
    te.eval()
    recipe.update(report, seconds=round(time.time() - t0, 1))
    proj = te.text_proj
    del te.text_proj  # the saved encoder is a plain CLIPTextModel, loadable like SD's
    te.save_pretrained(out / "text_encoder", safe_serialization=True)
    save_file({**{f"tower.{k}": v.contiguous() for k, v in tower.state_dict().items()},
               "text_proj.weight": proj.weight.detach().contiguous(), "logit_scale": logit_scale.detach()[None]},
              str(out / "image_tower.safetensors"))
    (out / "text-encoder-recipe.json").write_text(json.dumps(recipe, indent=2))
    log(f"saved {out}: {report}")
    return report

