"""Controls for the lab's collateral measure (``kept``, docs/lab.md#metrics): how much of what an erasure changes on
unrelated prompts any edit of its size would change. From an erasure LoRA, writes

- ``random``: per layer, a random Gaussian change with the same Frobenius norm as the erasure's (no concept in it);
- ``scaled``: the erasure itself at ``--strength`` (how ``kept`` and efficacy move together).

Evaluate each with ``lab eval --erased CONCEPT`` (the control erases nothing, so its efficacy is the original's).

    python scripts/kept_control.py LORA OUT_DIR [--seed 0] [--strength 0.5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from erasure.lora_files import load_lora, save_lora
from erasure.weights import ErasureWeights


def random_like(w: ErasureWeights, seed: int) -> ErasureWeights:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in w.modules():
        d = w.deltas[name].matrix().float()
        r = torch.randn(d.shape, generator=gen)
        out[name] = r * (d.norm() / r.norm())
    return ErasureWeights.dense(out, method="kept-control-random", concepts=[])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lora")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strength", type=float, default=0.5)
    a = p.parse_args(argv)
    w = load_lora(a.lora)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_lora(random_like(w, a.seed), out / f"random-s{a.seed}.safetensors")
    scaled = w.scaled(a.strength)
    save_lora(scaled, out / f"scaled-{a.strength:g}.safetensors")
    print(f"wrote {out}/random-s{a.seed}.safetensors and {out}/scaled-{a.strength:g}.safetensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
