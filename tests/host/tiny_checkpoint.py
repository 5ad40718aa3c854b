"""A tiny SD1.5-layout checkpoint that ComfyUI's CheckpointLoaderSimple accepts (random weights, built in code).

Detection needs ``model_channels`` 320 and a 768-d context; depth is free, so the UNet has one level and one res
block (~20 M parameters). The text encoder must be the full CLIP-L (123.6 M parameters); the VAE is TAESD-keyed.
Built with ComfyUI's own modules, so this file only runs inside a ComfyUI environment.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 0:  # scalars (TAESD's vae_scale/vae_shift) keep their initial values
                continue
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("weight"):  # norms
                p.fill_(1.0)
            else:
                p.zero_()


def build_tiny_sd15(path: Path, seed: int = 0) -> Path:
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file

    ops = comfy.ops.disable_weight_init
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=1,
                     channel_mult=(1,), num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                     transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
                     use_linear_in_transformer=False, operations=ops, dtype=torch.float32)
    _randomise(unet, seed)
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    _randomise(clip, seed + 1)
    vae = comfy.taesd.taesd.TAESD()
    _randomise(vae, seed + 2)
    sd: dict[str, torch.Tensor] = {}
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    sd.update({f"cond_stage_model.{k}": v for k, v in clip.state_dict().items() if k.startswith("transformer.")})
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    sd = {k: v.to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path
