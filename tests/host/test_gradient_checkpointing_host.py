"""The ComfyUI adapter's gradient checkpointing: same ANT gradients, fewer saved tensors, the model put back."""

from __future__ import annotations

import sys

import torch

from erasure.ant import AntSettings, Batch, ant_loss, scope_modules
from erasure.backbone import gradient_checkpointing
from erasure.deltas import TrainableDeltas


def _grads(bb, b: Batch, uncond, on: bool) -> tuple[list[torch.Tensor], int]:
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += 1
        return t

    with TrainableDeltas(scope_modules(bb, "xattn")) as deltas:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in deltas.parameters():
                p.copy_(1e-2 * torch.randn(p.shape, generator=g))
        with gradient_checkpointing(bb, on) as active, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            assert active == on
            loss, _ = ant_loss(bb, b, uncond, AntSettings(guidance=3.0))
        return [x.clone() for x in torch.autograd.grad(loss, list(deltas.parameters()))], saved[0]


def test_comfy_checkpointing_gives_the_same_gradients_and_restores_the_blocks(comfy, loaded):
    mod = sys.modules[comfy["nodes"].NODE_CLASS_MAPPINGS["EraseConceptANT"].__module__]
    cb = sys.modules[mod.ComfyBackbone.__module__]
    model, clip, _ = loaded
    bb = mod.ComfyBackbone(model, clip)
    bb.load()
    with cb.trainable(bb):
        g = torch.Generator().manual_seed(1)
        shape = (1, 4, 8, 8)

        def r() -> torch.Tensor:
            return torch.randn(shape, generator=g)

        b = Batch(r(), torch.tensor([900]), r(), torch.tensor([300]), bb.encode_text(["a cat"]), r(), r(), r(), r())
        b.pres_cond, b.pres_early, b.pres_late = bb.encode_text(["a house"]), r(), r()
        uncond = bb.encode_text([""])
        plain, n_plain = _grads(bb, b, uncond, False)
        ckpt, n_ckpt = _grads(bb, b, uncond, True)
    assert n_ckpt < n_plain / 2
    for a, c in zip(plain, ckpt, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-7)
    assert not any("forward" in m.__dict__ for m in bb.unet().modules())  # every patch removed
