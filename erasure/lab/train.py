"""Training recipe of the lab model (``python -m erasure lab train``).

Joint training of the UNet and the text encoder from scratch on freshly rendered images each step (the world is
infinite, so there is no overfitting to a fixed set), epsilon-prediction MSE at uniform timesteps, 10% empty
captions for classifier-free guidance, AdamW with warm-up and cosine decay, gradient clipping and an EMA of the
weights (the EMA weights are what is saved). Checkpoints are written every ``save_every`` steps so a long
background run always leaves a usable model.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from . import world
from .model import new_model, save_model


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=False):
            pe.lerp_(pm, 1 - decay)


def optimizer_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor, lr: float) -> None:
    """One step of the lab's training recipes: the scheduled learning rate, backward, clip at norm 1, update."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def train_lab_model(
    out: Path,
    steps: int = 4000,
    batch_size: int = 64,
    lr: float = 5e-4,
    warmup: int = 200,
    ema_decay: float = 0.999,
    p_empty: float = 0.1,
    seed: int = 0,
    save_every: int = 250,
    resume: Path | None = None,
    text_encoder: Path | None = None,
    stop_after: int | None = None,
    log=print,
) -> None:
    """Train from scratch, or continue from a saved lab model folder (``resume``: its EMA weights start both the
    trained and the EMA copy; the optimizer starts afresh with a new warm-up and cosine schedule).

    ``text_encoder``: a folder from ``lab train-text-encoder`` whose text encoder is used frozen, as SD's UNet was
    trained on a frozen CLIP; with ``resume`` only the UNet comes from the resumed folder. ``stop_after``: save and
    stop after this many steps, the learning-rate schedule still spanning ``steps`` (what a run stopped at a
    checkpoint did)."""
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items() if k not in ("out", "log")}
    recipe["command"] = (
        f"python -m erasure lab train --out {out} --steps {steps} --batch-size {batch_size} --lr {lr} --seed {seed}"
        + (f" --resume {resume}" if resume else "")
        + (f" --text-encoder {text_encoder}" if text_encoder else "")
        + (f" --stop-after {stop_after}" if stop_after else "")
    )
    unet, te, tok, sched = new_model(out, seed)
    if resume is not None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(resume / "unet", torch_dtype=torch.float32)
        te = CLIPTextModel.from_pretrained(resume / "text_encoder", torch_dtype=torch.float32)
        previous = json.loads((resume / "recipe.json").read_text()) if (resume / "recipe.json").exists() else {}
        recipe["resumed_from"] = previous
    if text_encoder is not None:
        from transformers import CLIPTextModel

        te = CLIPTextModel.from_pretrained(text_encoder / "text_encoder", torch_dtype=torch.float32).eval()
        te.requires_grad_(False)
        te_recipe = text_encoder / "text-encoder-recipe.json"
        recipe["text_encoder_recipe"] = json.loads(te_recipe.read_text()) if te_recipe.exists() else {}
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    for p in list(ema_unet.parameters()) + list(ema_te.parameters()):
        p.requires_grad_(False)
    params = list(unet.parameters()) + ([] if text_encoder is not None else list(te.parameters()))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    g = torch.Generator().manual_seed(seed)
    abar = sched.alphas_cumprod.float()
    t0, running = time.time(), 0.0
    for step in range(steps if stop_after is None else min(steps, stop_after)):
        images, caps, _ = world.sample_batch(batch_size, g, p_empty=p_empty)
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=g)
        noise = torch.randn(images.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * images + (1 - a).sqrt() * noise
        with torch.set_grad_enabled(text_encoder is None):  # a frozen text encoder needs no graph
            cond = te(ids).last_hidden_state
        pred = unet(x_t, t, cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer_step(opt, params, loss, lr_at(step))
        decay = min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        if text_encoder is None:
            _ema_update(ema_te, te, decay)
        running += loss.item()
        if (step + 1) % 50 == 0:
            log(f"step {step + 1}/{steps} loss {running / 50:.4f} lr {lr_at(step):.2e} {time.time() - t0:.0f}s")
            running = 0.0
        if (step + 1) % save_every == 0 or step + 1 in (steps, stop_after):
            recipe["steps_done"] = step + 1
            recipe["seconds"] = round(time.time() - t0, 1)
            save_model(out, ema_unet, ema_te, sched, recipe)
            log(f"saved {out} at step {step + 1}")
