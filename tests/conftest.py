"""Shared fixtures: tiny diffusers models built from configs in code (no hub, no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def lab_tokenizer_dir(tmp_path_factory):
    from erasure.lab import world
    from erasure.lab.tokenizer import write_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d, world.vocabulary(), 16)
    return d


@pytest.fixture()
def tiny_backbone(lab_tokenizer_dir):
    """A randomly initialised pixel-space model with the lab's layout but tiny widths."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from erasure.diffusers_backbone import DiffusersBackbone
    from erasure.lab.model import SCHEDULER_CONFIG, text_config

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(lab_tokenizer_dir)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
    cfg = text_config(len(tok), tok.bos_token_id, tok.eos_token_id)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 32, 64, 2
    te = CLIPTextModel(cfg)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    return DiffusersBackbone(unet, [te], [tok], sched.alphas_cumprod, name="tiny")
