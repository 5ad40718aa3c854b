"""The tiny checkpoints' UNets (``tiny_checkpoint.py``) as MODELs without their text encoders, for what touches the
UNet only (patches): built in seconds, loaded by ComfyUI's own diffusion-model loader. Runs inside ComfyUI only."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

#: ``tiny_checkpoint._unet`` arguments of each family's checkpoint
LAYOUTS = {
    "sd15": dict(context_dim=768, linear=False),
    "sdxl": dict(context_dim=2048, linear=True, num_res_blocks=2, channel_mult=(1, 1, 1),
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
                 transformer_depth_middle=1, num_classes="sequential", adm_in_channels=2816),
}


def tiny_unet_model(family: str, dtype: torch.dtype | None = None, seed: int = 0):
    """A MODEL of the family's tiny UNet (weights stored in float16, as in the checkpoint file); ``dtype``: the
    weight dtype ComfyUI keeps (default: ComfyUI's choice, float32 on a CPU)."""
    import comfy.sd

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_checkpoint

    layout = dict(LAYOUTS[family])
    unet = tiny_checkpoint._unet(layout.pop("context_dim"), layout.pop("linear"), seed, **layout)
    sd = {k: v.to(torch.float16) for k, v in unet.state_dict().items()}
    del unet
    return comfy.sd.load_diffusion_model_state_dict(sd, model_options={} if dtype is None else {"dtype": dtype})
