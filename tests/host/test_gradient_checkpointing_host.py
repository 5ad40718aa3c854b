"""The ComfyUI adapter's gradient checkpointing: same ANT gradients, fewer saved tensors, the model put back."""

from __future__ import annotations

import sys

import torch
from ant_grads import ant_grads, random_batch

from erasure.ant import AntSettings


def test_comfy_checkpointing_gives_the_same_gradients_and_restores_the_blocks(comfy, loaded):
    mod = sys.modules[comfy["nodes"].NODE_CLASS_MAPPINGS["EraseConceptANTv2"].__module__]
    cb = sys.modules[mod.ComfyBackbone.__module__]
    model, clip, _ = loaded
    bb = mod.ComfyBackbone(model, clip)
    bb.load()
    with cb.trainable(bb):
        b = random_batch(bb, (4, 8, 8), [900], [300], "a cat", "a house")
        uncond = bb.encode_text([""])
        plain, n_plain = ant_grads(bb, b, uncond, AntSettings(guidance=3.0), False)
        ckpt, n_ckpt = ant_grads(bb, b, uncond, AntSettings(guidance=3.0), True)
    assert n_ckpt < n_plain / 2
    for a, c in zip(plain, ckpt, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-7)
    assert not any("forward" in m.__dict__ for m in bb.unet().modules())  # every patch removed
