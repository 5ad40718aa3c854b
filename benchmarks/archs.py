"""SD1.5- and SDXL-shaped models with random weights, built from configs written here (no downloads).

Speed and memory depend on the shapes, not on the weights, so the real architectures with random initialisation
measure what a real checkpoint costs. ``scale="tiny"`` keeps each layout (blocks, attention placement, text encoders
with the same hidden-state choice) at toy widths for the smoke test.

The backbone has no VAE: the benchmark works in latent space. The UNet's ``sample_size`` is the latent size, so the
library's default resolution is that latent; a latent of ``n`` cells stands for an image of ``8 n`` pixels.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from erasure.diffusers_backbone import DiffusersBackbone
from erasure.lab.tokenizer import write_tokenizer
from erasure.prompts import CONCEPT_TEMPLATES, OBJECTS, PEOPLE, PRIOR_TEMPLATES, SCENES, STYLES

ARCHS = ("sd15", "sdxl")
#: Stable Diffusion's training schedule (SD1.x and SDXL alike)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
#: "full": the real architecture; "half": SD1.5's layout at half the channels (a quarter of the parameters), for the
#: machines where full-UNet gradients of the real one do not fit; "tiny": toy widths for the smoke test
SCALES = ("full", "half", "tiny")


def unet_config(arch: str, scale: str, latent: int) -> dict:
    """diffusers ``UNet2DConditionModel`` kwargs: SD1.5 (860 M parameters) or SDXL base (2.6 G)."""
    if arch == "sd15":
        cfg = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                   cross_attention_dim=768, attention_head_dim=8)
        if scale == "half":
            cfg.update(block_out_channels=(160, 320, 640, 640))
        if scale == "tiny":
            cfg.update(block_out_channels=(16, 32, 32, 32), layers_per_block=1, cross_attention_dim=32,
                       attention_head_dim=4, norm_num_groups=8)
    elif arch == "sdxl":
        cfg = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   cross_attention_dim=2048, attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=2816)
        if scale == "half":
            raise ValueError("the half scale is defined for sd15 only")
        if scale == "tiny":
            cfg.update(block_out_channels=(16, 32, 64), layers_per_block=1, cross_attention_dim=48,
                       attention_head_dim=[2, 4, 8], transformer_layers_per_block=[1, 1, 2], norm_num_groups=8,
                       addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    else:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)} (got {arch!r})")
    cfg["sample_size"] = latent
    return cfg


def text_configs(arch: str, scale: str) -> list[dict]:
    """CLIP ViT-L/14's text tower (both archs) and, for SDXL, OpenCLIP ViT-bigG/14's (with projection)."""
    clip_l = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, hidden_act="quick_gelu")
    big_g = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")
    if scale == "tiny":
        clip_l.update(hidden_size=16 if arch == "sdxl" else 32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, projection_dim=16)
        big_g.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     projection_dim=32)
    return [clip_l] if arch == "sd15" else [clip_l, big_g]


def vocabulary() -> list[str]:
    """Every word of the prompts the benchmark uses, so each is one token (other text still tokenizes)."""
    words: set[str] = set()
    texts = list(PRIOR_TEMPLATES) + [t for ts in CONCEPT_TEMPLATES.values() for t in ts]
    texts += list(OBJECTS) + list(PEOPLE) + list(SCENES) + list(STYLES) + concept_names(100)
    texts += ["background", "art", "a person", "the", "style"]
    for t in texts:
        words |= set(t.replace("{c}", "").replace("{o}", "").replace("{p}", "").replace("{s}", "")
                     .replace("{st}", "").split())
    return sorted(words)


def concept_names(n: int) -> list[str]:
    """``n`` distinct one-word concept names, none of them a word of the prior prompts."""
    return [f"concept{i:03d}" for i in range(n)]


@lru_cache
def tokenizer_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="erasure-bench-tok-"))
    write_tokenizer(d, vocabulary(), 77)
    return d


def build_backbone(arch: str, scale: str, latent: int, dtype: torch.dtype = torch.float32,
                   device: str = "cpu", seed: int = 0) -> DiffusersBackbone:
    """A randomly initialised model of the given shape as a library backbone."""
    from diffusers.utils import logging as dlog
    from transformers import CLIPTokenizer

    dlog.set_verbosity_error()
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)} (got {scale!r})")
    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir())
    from diffusers import DDPMScheduler

    alphas_cumprod = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
    previous = torch.get_default_dtype()
    # initialised where it runs (seconds on a GPU instead of half a minute on a CPU) and in its dtype (a float32
    # copy of SDXL alone would be 13 GiB)
    torch.set_default_dtype(dtype)
    try:
        return _build(arch, scale, latent, device, tok, alphas_cumprod)
    finally:
        torch.set_default_dtype(previous)


def _build(arch: str, scale: str, latent: int, device: str, tok, alphas_cumprod: torch.Tensor) -> DiffusersBackbone:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(arch, scale, latent))
        encoders, tokenizers = [], []
        for i, tc in enumerate(text_configs(arch, scale)):
            cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **tc)
            encoders.append(CLIPTextModelWithProjection(cfg) if i == 1 else CLIPTextModel(cfg))
            tokenizers.append(tok)
    return DiffusersBackbone(unet, encoders, tokenizers, alphas_cumprod,
                             hidden_layer=-2 if arch == "sdxl" else -1, name=f"bench-{arch}-{scale}")


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
