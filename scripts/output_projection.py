"""Experiment (issue 19, item 5; docs/audit.md#in-the-text-encoder): a closed-form edit that takes out of each
cross-attention K/V *output* space the directions the concept's tokens use far more than unrelated prompts' tokens
(the top generalized eigenvectors of the concept prompts' output Gram against the unrelated prompts'), so that no
input token, learned or not, can write them. Writes the change as an erasure LoRA (optionally on top of one).

    python scripts/output_projection.py OUT.safetensors --concept circle [--rank 2] [--which v|k|kv] [--base LORA]

Measured: it erases nothing (the concept's distinguishing part lies in directions unrelated prompts use too).
"""
from __future__ import annotations

import argparse

import torch

from erasure.diffusers_backbone import load_diffusers
from erasure.files import cache_dir
from erasure.lab import world
from erasure.lora_files import load_lora, save_lora
from erasure.prior import gram, token_embeddings
from erasure.weights import ErasureWeights


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--model", default="lab")
    p.add_argument("--concept", required=True)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.0, help="also require eigenvalue >= ratio (0: rank only)")
    p.add_argument("--which", default="v", choices=["v", "k", "kv"])
    p.add_argument("--base", default=None)
    p.add_argument("--eps", type=float, default=1e-3)
    a = p.parse_args()
    bb = load_diffusers(a.model)
    cu = gram(bb, world.prior_prompts(exclude=[a.concept]), cache_dir())
    prompts = sorted({t.replace("{c}", a.concept) for t in world.concept_templates(a.concept)})
    e = token_embeddings(bb, prompts)
    flat = e.reshape(-1, e.shape[-1])
    cc = flat.T @ flat / len(prompts)
    base = load_lora(a.base) if a.base else None
    deltas = {}
    for name, m in bb.cross_attention_kv().items():
        kind = name.rsplit(".", 1)[-1][-1]
        w0 = m.weight.detach().double()
        w = w0 + (base.deltas[name].matrix().double() if base and name in base.deltas else 0)
        if kind not in a.which:
            if base and name in base.deltas:
                deltas[name] = (w - w0).float()
            continue
        A = w @ cc @ w.T
        B = w @ cu @ w.T
        B = B + a.eps * B.trace() / B.shape[0] * torch.eye(B.shape[0], dtype=B.dtype)
        L = torch.linalg.cholesky(B)
        Li = torch.linalg.inv(L)
        ev, y = torch.linalg.eigh(Li @ A @ Li.T)
        ev, y = ev.flip(0), y.flip(1)
        u = Li.T @ y  # generalized eigenvectors (columns)
        r = a.rank if a.ratio <= 0 else min(a.rank, int((ev >= a.ratio).sum()))
        if r == 0:
            deltas[name] = (w - w0).float()
            continue
        q, _ = torch.linalg.qr(u[:, :r])
        w1 = w - q @ (q.T @ w)
        # share of unrelated / concept output energy removed
        ru = float((q.T @ (w @ cu @ w.T) @ q).trace() / (w @ cu @ w.T).trace())
        rc = float((q.T @ A @ q).trace() / A.trace())
        top = [round(float(x), 2) for x in ev[:4]]
        print(f"{name}: r={r} top ratios {top} removed concept {rc:.3f} unrelated {ru:.4f}")
        deltas[name] = (w1 - w0).float()
    if base:
        for name, d in base.deltas.items():
            if name not in deltas:
                deltas[name] = d.matrix().float()
    save_lora(ErasureWeights.dense(deltas, method="output-projection", concepts=[a.concept]), a.out)
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
