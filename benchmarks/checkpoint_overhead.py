"""Time cost of ANT's gradient checkpointing: the training forward + backward alone, and whole ANT steps.

``python -m benchmarks.checkpoint_overhead [arch] [scale] [latent] [steps]`` (default: sd15 half 8 4). Process CPU
time (``time.process_time``), so that other jobs on shared cores count less; each measurement is taken with
checkpointing off, then on, then off and on again, and the best of the two is kept. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from erasure.ant import AntSettings, Batch, ant, ant_loss, scope_modules
from erasure.backbone import gradient_checkpointing
from erasure.deltas import TrainableDeltas
from erasure.prompts import prior_prompts

from .archs import build_backbone


def _batch(bb, n: int) -> Batch:
    """A training batch of the defaults' shape (``n`` samples, with preservation rows: 6 n rows)."""
    g = torch.Generator().manual_seed(0)
    shape = (n, *bb.latent_shape())

    def r() -> torch.Tensor:
        return torch.randn(shape, generator=g).to(bb.dtype)

    b = Batch(r(), torch.full((n,), 900), r(), torch.full((n,), 300), bb.encode_text(["a photo of a dog"] * n),
              r(), r(), r(), r())
    b.pres_cond, b.pres_early, b.pres_late = bb.encode_text(["a photo of a cat"] * n), r(), r()
    return b


def training_step_seconds(bb, on: bool, repeats: int = 3) -> float:
    """CPU seconds of ``repeats`` training forwards + backwards (dense cross-attention deltas, the defaults' rows)."""
    s = AntSettings()
    b, uncond = _batch(bb, s.batch_size), bb.encode_text([""])
    with TrainableDeltas(scope_modules(bb, s.scope)) as deltas:
        t0 = time.process_time()
        for _ in range(repeats):
            with gradient_checkpointing(bb, on):
                loss, _ = ant_loss(bb, b, uncond, s)
            loss.backward()
            for p in deltas.parameters():
                p.grad = None
        return time.process_time() - t0


def ant_seconds(bb, on: bool, steps: int) -> float:
    """CPU seconds of ``ant()`` at the defaults with ``steps`` steps, 2 trajectories, 16 preservation prompts."""
    s = AntSettings(steps=steps, trajectories=2, gradient_checkpointing="on" if on else "off")
    t0 = time.process_time()
    ant(bb, "dog", s, preserve_prompts=prior_prompts(n=16))
    return time.process_time() - t0


def main(arch: str = "sd15", scale: str = "half", latent: int = 8, steps: int = 4) -> dict:
    bb = build_backbone(arch, scale, latent)
    out: dict = {"arch": arch, "scale": scale, "latent": latent, "ant_steps": steps}
    training_step_seconds(bb, False, 1)  # warm-up
    for name, fn in (("train_fwd_bwd_x3", lambda on: training_step_seconds(bb, on)),
                     ("ant", lambda on: ant_seconds(bb, on, steps))):
        off1, on1, off2, on2 = fn(False), fn(True), fn(False), fn(True)
        out[name] = {"off_s": round(min(off1, off2), 2), "on_s": round(min(on1, on2), 2),
                     "runs": [round(v, 2) for v in (off1, on1, off2, on2)],
                     "overhead": round(min(on1, on2) / min(off1, off2) - 1, 3)}
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(*(args[:2]), *(int(a) for a in args[2:4]))), flush=True)
