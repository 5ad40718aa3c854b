"""The lab model: a pixel-space text-to-image diffusion model small enough to train and evaluate on a CPU.

It is stored as an ordinary diffusers folder (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) with no
VAE, so the library loads it through the same diffusers adapter as a user's Stable Diffusion folder. The UNet is a
``UNet2DConditionModel`` with cross-attention at the 16x16 and 8x8 levels (7 cross-attention layers, 14 K/V
matrices, counting the mid block); the text encoder is a causal ``CLIPTextModel`` like SD's, with a CLIP-format
tokenizer built from the lab vocabulary (see ``tokenizer.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import world
from .tokenizer import write_tokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS / "model"
#: the second lab model (issue 18, item 4): a CLIP-like text encoder trained contrastively first, frozen while its
#: UNet trained, so that the end token and the padding summarise the prompt as in SD (``--model lab-clip``)
CLIP_MODEL_DIR = ASSETS / "model-clip"
#: ``--model`` names of the lab's models, and their folders
LAB_MODELS = {"lab": MODEL_DIR, "lab-clip": CLIP_MODEL_DIR}
CLASSIFIER_FILE = ASSETS / "classifier.safetensors"

CONTEXT_LENGTH = 16
TEXT_DIM = 128

UNET_CONFIG = dict(
    sample_size=world.IMAGE_SIZE,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=4,
    norm_num_groups=8,
)

# DDPM's linear schedule for 32x32 pixels (as for CIFAR-10). A cosine schedule keeps images recognisable for most
# timesteps, so training spends little signal where the text matters: measured at step 1,000, the cosine-trained
# model's loss with the true captions was within 1% of its loss with shuffled captions, and it ignored colours.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=False,
)


def is_lab_model(name: object) -> bool:
    """True for the ``--model`` names of the lab's own models (judged by the lab classifier)."""
    return str(name) in LAB_MODELS


def text_config(vocab_size: int, bos: int, eos: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=CONTEXT_LENGTH,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_act="quick_gelu",
    )


def new_model(folder: Path, seed: int) -> tuple[UNet2DConditionModel, CLIPTextModel, CLIPTokenizer, DDPMScheduler]:
    """Fresh (randomly initialised) lab model; writes the tokenizer and scheduler config into ``folder``."""
    write_tokenizer(folder / "tokenizer", world.vocabulary(), CONTEXT_LENGTH)
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    te = CLIPTextModel(text_config(len(tok), tok.bos_token_id, tok.eos_token_id))
    # CLIP initialises token and position embeddings alike (std 0.02), so at first every prompt encodes to nearly
    # the same vectors: measured after 500 steps, "a red circle" and "" still differed by only 16% and the UNet's
    # prediction by 0.2%, and the model drew the wrong colours. Larger word embeddings make words distinct from the
    # first step, so the UNet learns to use the text early.
    torch.nn.init.normal_(te.get_input_embeddings().weight, std=0.5)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    return unet, te, tok, sched


def save_model(folder: Path, unet: UNet2DConditionModel, te: CLIPTextModel, sched: DDPMScheduler,
               recipe: dict, dtype: torch.dtype = torch.float16) -> None:
    """Write a diffusers folder (weights in ``dtype`` safetensors) plus ``recipe.json``, atomically per file."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    unet.to(dtype).save_pretrained(tmp / "unet", safe_serialization=True)
    te.to(dtype).save_pretrained(tmp / "text_encoder", safe_serialization=True)
    unet.to(torch.float32)
    te.to(torch.float32)
    sched.save_pretrained(tmp / "scheduler")
    (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))
    import shutil

    for sub in ("unet", "text_encoder", "scheduler"):
        if (folder / sub).exists():
            shutil.rmtree(folder / sub)
        (tmp / sub).rename(folder / sub)
    (tmp / "recipe.json").replace(folder / "recipe.json")
    shutil.rmtree(tmp)
