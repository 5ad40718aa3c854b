"""Tiny SD1.5- and SD2-layout checkpoints that ComfyUI's CheckpointLoaderSimple accepts (random weights, built in code).

Detection needs ``model_channels`` 320 and the family's context width (SD1.5: 768, convolutional projections in the
transformers; SD2: 1024, linear projections); depth is free, so the UNet has one level and one res block (~20 M
parameters). The text encoder must be the family's full one, whose size the model config fixes: CLIP-L (123.6 M
parameters) or OpenCLIP ViT-H's text tower (354 M, stored in open_clip's key layout as in real SD2 files). The VAE is
TAESD-keyed. Built with ComfyUI's own modules, so this file only runs inside a ComfyUI environment.
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
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)  # one tensor at a time in float32
            elif name.endswith("weight"):  # norms
                p.fill_(1.0)
            else:
                p.zero_()


def _unet(context_dim: int, linear: bool, seed: int, **layout) -> torch.nn.Module:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = dict(num_res_blocks=1, channel_mult=(1,), transformer_depth=[1], transformer_depth_output=[1, 1],
                  transformer_depth_middle=1) | layout
    heads = {"num_heads": -1, "num_head_channels": 64} if linear else {"num_heads": 8}
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, use_spatial_transformer=True,
                     context_dim=context_dim, use_linear_in_transformer=linear, dtype=torch.float32,
                     operations=comfy.ops.disable_weight_init, **heads, **config)
    _randomise(unet, seed)
    return unet


def _save(path: Path, unet: torch.nn.Module, text: dict[str, torch.Tensor], seed: int) -> Path:
    import comfy.taesd.taesd
    from safetensors.torch import save_file

    vae = comfy.taesd.taesd.TAESD()
    _randomise(vae, seed + 2)
    sd: dict[str, torch.Tensor] = {}
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    sd.update(text)
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    sd = {k: v.to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def build_tiny_sd15(path: Path, seed: int = 0) -> Path:
    import comfy.sd1_clip

    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    _randomise(clip, seed + 1)
    text = {f"cond_stage_model.{k}": v for k, v in clip.state_dict().items() if k.startswith("transformer.")}
    return _save(path, _unet(768, False, seed), text, seed)


def build_tiny_sd2(path: Path, seed: int = 0) -> Path:
    """SD2.x: 1024-d context, linear transformer projections, 64-channel heads, OpenCLIP-H text tower."""
    from comfy.text_encoders.sd2_clip import SD2ClipHModel

    clip = SD2ClipHModel(device="cpu", dtype=torch.float32)
    _randomise(clip, seed + 1)
    return _save(path, _unet(1024, True, seed), _open_clip_keys(clip.state_dict(), "cond_stage_model.model."),
                 seed)


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """SDXL: detection matches the input blocks' transformer depths [0, 0, 2, 2, 10, 10], a 2048-d context and the
    2816-d pooled+size input, but not the channel multipliers: three levels at 320 channels (~120 M parameters)
    instead of SDXL's 1-2-4 (2.6 B). The text encoders are the full CLIP-L and OpenCLIP bigG (695 M): stored in
    float16, built layer by layer in float16 to keep the peak memory near the file's 1.9 GB."""
    import comfy.sd1_clip
    from comfy.sdxl_clip import SDXLClipG

    unet = _unet(2048, True, seed, num_res_blocks=2, channel_mult=(1, 1, 1), transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1,
                 num_classes="sequential", adm_in_channels=2816)
    clip_l = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float16, layer="hidden", layer_idx=-2)
    _randomise(clip_l, seed + 1)
    text = {f"conditioner.embedders.0.{k}": v for k, v in clip_l.state_dict().items()
            if k.startswith("transformer.text_model.")}
    del clip_l
    clip_g = SDXLClipG(device="cpu", dtype=torch.float16)
    _randomise(clip_g, seed + 3)
    text.update(_open_clip_keys(clip_g.state_dict(), "conditioner.embedders.1.model."))
    del clip_g
    return _save(path, unet, text, seed)


def _open_clip_keys(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """ComfyUI's (transformers-layout) text tower in open_clip's layout, the inverse of ComfyUI's
    ``clip_text_transformers_convert``: what real SD2 checkpoints store."""
    tm = "transformer.text_model."
    out = {
        prefix + "positional_embedding": sd[tm + "embeddings.position_embedding.weight"],
        prefix + "token_embedding.weight": sd[tm + "embeddings.token_embedding.weight"],
        prefix + "ln_final.weight": sd[tm + "final_layer_norm.weight"],
        prefix + "ln_final.bias": sd[tm + "final_layer_norm.bias"],
        prefix + "text_projection": sd["transformer.text_projection.weight"].t().contiguous(),
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    layers = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith(tm + "encoder.layers."))
    for i in range(layers):
        src, dst = f"{tm}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for a, b in names.items():
            for y in ("weight", "bias"):
                out[f"{dst}{b}.{y}"] = sd[f"{src}{a}.{y}"]
        for y in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{y}"] = torch.cat([sd[f"{src}self_attn.{p}_proj.{y}"] for p in "qkv"])
    return out
