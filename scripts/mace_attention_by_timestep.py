"""How much cross-attention a concept's tokens receive, by timestep band, before and after a MACE erasure (issue 18,
item 4: does a LoRA trained on MACE's timesteps, p(t) around 200-400, also suppress the concept at the high-noise
steps where the lab lays out its shapes?). Images of the concept from the original model, noised at each band's
timesteps; the attention probability of the concept's tokens, averaged over layers, heads and pixels.

    python scripts/mace_attention_by_timestep.py --concept triangle \
        --lora out/mace-bars/triangle+checkered-s0.safetensors
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from erasure.diffusers_backbone import load_diffusers
from erasure.lora_files import load_lora, resolve_names
from erasure.sampling import sample

BANDS = ((0, 200), (200, 400), (400, 600), (600, 800), (800, 1000))


class Mass:
    def __init__(self, positions: list[int]) -> None:
        self.positions, self.total, self.layers = positions, 0.0, 0

    def __call__(self, name: str, probs: torch.Tensor, hw: tuple[int, int]) -> None:
        self.total += float(probs[..., self.positions].sum(-1).mean())
        self.layers += 1


@torch.no_grad()
def banded(bb, prompt: str, x0: torch.Tensor, sink: Callable[[], Any], bands, seed: int) -> list[Any]:
    """One attention sink per timestep band: ``x0`` noised at random timesteps of the band, one UNet call with
    ``prompt``, every cross-attention layer's probabilities into a fresh ``sink()`` (also used by
    scripts/attention_positions.py)."""
    cond = bb.encode_text([prompt] * len(x0))
    g = torch.Generator().manual_seed(seed)
    out = []
    for lo, hi in bands:
        t = torch.randint(lo, hi, (len(x0),), generator=g)
        x_t = bb.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        m = sink()
        with bb.capture_attention(m):
            bb.predict_noise(x_t, t, cond)
        out.append(m)
    return out


def masses(bb, prompt: str, word: str, x0: torch.Tensor, seed: int) -> list[float]:
    pos = bb.token_positions(prompt, word)
    return [m.total / max(m.layers, 1) for m in banded(bb, prompt, x0, lambda: Mass(pos), BANDS, seed)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora", required=True)
    ap.add_argument("--concept", required=True)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    bb = load_diffusers("lab")
    prompt = f"a photo of a {args.concept}"
    x0 = sample(bb, [prompt] * args.images, list(range(1000, 1000 + args.images)), 30, 7.5).latents
    before = masses(bb, prompt, args.concept, x0, args.seed)
    weights = resolve_names(load_lora(args.lora), dict(bb.unet().named_modules()))
    with weights.applied(bb.unet()):
        after = masses(bb, prompt, args.concept, x0, args.seed)
    print(f"{args.concept}: attention of its tokens, mean over layers, heads and pixels ({args.lora})")
    print("| t | before | after | after / before |")
    print("| --- | ---: | ---: | ---: |")
    for (lo, hi), b, a in zip(BANDS, before, after, strict=True):
        print(f"| {lo}-{hi} | {b:.4f} | {a:.4f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
