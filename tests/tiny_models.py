"""Tiny latent models with the SDXL layout (two text encoders, pooled text and size conditioning, a VAE), built from
configs in code for tests that need more than the lab's pixel-space layout."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from erasure.diffusers_backbone import DiffusersBackbone

#: short concept templates in the lab's words that fit the tiny models' 16-token context (MACE's tests)
LAB_TEMPLATES = ("a {c}", "a photo of a {c}", "a red {c}", "a picture of a blue {c}")


def tiny_mace_settings(default_steps: int, **kw):
    """MACE settings small enough for the tiny models: 2 images of 3 steps, ``default_steps`` LoRA steps (``kw``
    may change them too) at lr 1e-2 with 2 images each."""
    from erasure.mace import MaceSettings

    return MaceSettings(images_per_concept=2, sample_steps=3, guidance=3.0, lora_steps=default_steps, lora_lr=1e-2,
                        lora_batch=2).override(**kw)


def tiny_lab_layout(tokenizer_dir) -> DiffusersBackbone:
    """A randomly initialised pixel-space model with the lab's layout but tiny widths (seeded: the same weights on
    every call, also in another process)."""
    from erasure.lab.model import SCHEDULER_CONFIG, text_config

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
    cfg = text_config(len(tok), tok.bos_token_id, tok.eos_token_id)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 32, 64, 2
    te = CLIPTextModel(cfg)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    return DiffusersBackbone(unet, [te], [tok], sched.alphas_cumprod, name="tiny")


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                         latent_channels=4, norm_num_groups=4)


def tiny_sdxl(tokenizer_dir, transformer_layers_per_block: int | tuple[int, ...] = 1) -> DiffusersBackbone:
    """Seeded: the same arguments give the same weights."""
    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    base = dict(vocab_size=len(tok), intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, **base))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=16, **base))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=2, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
        transformer_layers_per_block=transformer_layers_per_block)
    vae = tiny_vae()
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return DiffusersBackbone(unet, [te1, te2], [tok, tok], sched.alphas_cumprod, vae=vae, hidden_layer=-2)
