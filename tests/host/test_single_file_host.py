"""The library's single-file loader against ComfyUI's own loader, on the same SD1.5-layout checkpoint.

Two independent readers of one file (ours: ldm -> diffusers/transformers; ComfyUI's: its own ldm modules) must
agree on the tokens, the text embeddings and the UNet's noise prediction. The checkpoint's VAE is TAESD-keyed, so
our loader takes it as latent-only.
"""

from __future__ import annotations

import sys

import torch


def test_single_file_loader_agrees_with_comfyui(comfy, tiny_ckpt, loaded):
    from erasure.single_file import load_single_file

    model, clip, _ = loaded
    mod = sys.modules[comfy["nodes"].NODE_CLASS_MAPPINGS["EraseConceptANTv2"].__module__]
    theirs = mod.ComfyBackbone(model, clip)
    ours_loaded = load_single_file(comfy["root"] / "checkpoints" / tiny_ckpt)
    ours = ours_loaded.backbone
    assert ours_loaded.family == "sd1" and ours.latent_only and "latents only" in ours_loaded.summary()
    prompts = ["a photo of a cat", "Van Gogh, starry night", ""]
    for p in prompts:
        assert ours.tokenize(p) == theirs.tokenize(p), p
    with torch.no_grad():
        a, b = ours.encode_text(prompts).embeds, theirs.encode_text(prompts).embeds.float()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([10, 500, 990])
        cond = ours.encode_text(prompts)
        torch.testing.assert_close(ours.predict_noise(x, t, cond), theirs.predict_noise(x, t, cond).float(),
                                   rtol=0, atol=1e-4)
    assert ours.schedule.alphas_cumprod.float().allclose(theirs.schedule.alphas_cumprod.float(), atol=1e-6)
