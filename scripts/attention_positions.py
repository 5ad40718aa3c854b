"""Where a prompt's cross-attention goes, token position by token position, before and after an erasure, and how
much the erasure changes each position's keys and values (docs/mace.md#the-value-lora).

For ``--prompt`` on ``--model``: images from the original model (``--images``, DDIM 10 steps, guidance 5), noised at
two timestep bands; the attention probability each token position receives, averaged over layers, heads and pixels;
then the same with the LoRA applied. And for the first K/V layers the LoRA changes: ``||dW e|| / ||W e||`` per
position ``e`` of the prompt's encoding (1.0: the key or value changes by as much as its own size).

    python scripts/attention_positions.py --model lab-clip --prompt "a green shape" --lora FILE
"""

from __future__ import annotations

import argparse

import torch
from mace_attention_by_timestep import banded  # scripts/: the same banded capture

from erasure.diffusers_backbone import load_diffusers
from erasure.lora_files import load_lora, resolve_names
from erasure.sampling import sample

BANDS = ((200, 400), (600, 800))


class PositionMass:
    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.layers = 0

    def __call__(self, name: str, probs: torch.Tensor, hw: tuple[int, int]) -> None:
        p = probs.float().reshape(-1, probs.shape[-1]).mean(0)
        self.total = p if self.total is None else self.total + p
        self.layers += 1


def masses(bb, prompt: str, x0: torch.Tensor) -> list[torch.Tensor]:
    return [m.total / max(m.layers, 1) for m in banded(bb, prompt, x0, PositionMass, BANDS, 0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lab-clip")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--lora", required=True)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--positions", type=int, default=6, help="positions shown one by one (the rest summed)")
    ap.add_argument("--layers", type=int, default=4, help="K/V layers whose per-position change is shown")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    bb = load_diffusers(args.model)
    n = args.positions
    x0 = sample(bb, [args.prompt], list(range(1000, 1000 + args.images)), 10, 5.0).latents
    mods = dict(bb.unet().named_modules())
    weights = resolve_names(load_lora(args.lora), mods)
    before = masses(bb, args.prompt, x0)
    with weights.applied(bb.unet()):
        after = masses(bb, args.prompt, x0)
    print(f"{args.model}, {args.prompt!r}: attention per token position (0 = start token), mean over layers, heads "
          f"and pixels of {args.images} images; {args.lora}")
    print("| t | | " + " | ".join(str(i) for i in range(n)) + f" | {n}+ |")
    print("| --- | --- |" + " ---: |" * (n + 1))
    for (lo, hi), b, a in zip(BANDS, before, after, strict=True):
        for tag, p in (("before", b), ("after", a)):
            cells = [f"{v:.3f}" for v in p[:n].tolist()] + [f"{float(p[n:].sum()):.3f}"]
            print(f"| {lo}-{hi} | {tag} | " + " | ".join(cells) + " |")
    enc = bb.encode_text([args.prompt]).embeds[0, :n].float()
    print(f"\nK/V change per position, ||dW e|| / ||W e|| (first {args.layers} layers the LoRA changes):")
    print("| layer | ||dW|| / ||W|| | " + " | ".join(str(i) for i in range(n)) + " |")
    print("| --- | ---: |" + " ---: |" * n)
    for name in sorted(weights.deltas)[: args.layers]:
        w = mods[name].weight.float()
        dw = weights.deltas[name].matrix().float()
        change = (enc @ dw.T).norm(dim=-1) / (enc @ w.T).norm(dim=-1)
        print(f"| {name} | {float(dw.norm() / w.norm()):.2f} | " + " | ".join(f"{v:.2f}" for v in change.tolist())
              + " |")


if __name__ == "__main__":
    main()
