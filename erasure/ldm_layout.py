"""The original (ldm) key layout of Stable Diffusion checkpoints -> diffusers/transformers configs and weights.

Configs are inferred from the tensors' shapes, so real checkpoints and tiny test ones go through the same code. What
shapes cannot say is fixed by the family, as in the original configs and in ComfyUI's model detection: SD1.x uses 8
attention heads everywhere; SD2.x and SDXL use 64 channels per head; CLIP encoders use 64 channels per head; GroupNorm
has 32 groups. The UNet and VAE weights are renamed by diffusers' own converters
(``diffusers.loaders.single_file_utils``); the text encoders by the small mappings here (diffusers' OpenCLIP converter
hard-codes SD2's 24 layers).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from .errors import UnsupportedModelError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
#: the text encoders' key prefixes by family
CLIP_L_SD1 = "cond_stage_model.transformer."
OPENCLIP_SD2 = "cond_stage_model.model."
CLIP_L_SDXL = "conditioner.embedders.0.transformer."
OPENCLIP_SDXL = "conditioner.embedders.1.model."

Shapes = dict[str, tuple[int, ...]]
Getter = Callable[[str], torch.Tensor]


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (a regex with one group) over the keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def _depth(shapes: Shapes, block: str) -> int:
    """Transformer blocks in ``block`` (e.g. ``model.diffusion_model.input_blocks.4.1``), 0 when it has none."""
    return len(_indices(shapes, re.escape(block) + r"\.transformer_blocks\.(\d+)\."))


# -- UNet ------------------------------------------------------------------------------------------------------------
def unet_config(shapes: Shapes, family: str) -> dict:
    """``UNet2DConditionModel`` keyword arguments for the ldm UNet under ``model.diffusion_model.``."""
    u = UNET
    n_in = len(_indices(shapes, re.escape(u) + r"input_blocks\.(\d+)\."))
    ops = [i for i in range(1, n_in) if f"{u}input_blocks.{i}.0.op.weight" in shapes]
    per_level = ops[0] if ops else n_in  # resnets + the downsampler, per level
    nrb = per_level - 1
    levels = len(ops) + 1
    if nrb < 1 or n_in != 1 + levels * nrb + len(ops):
        raise UnsupportedModelError("the UNet's input blocks do not follow the Stable Diffusion layout")
    first = [1 + lv * per_level for lv in range(levels)]
    channels = [shapes[f"{u}input_blocks.{i}.0.out_layers.3.weight"][0] for i in first]
    depths = [_depth(shapes, f"{u}input_blocks.{i}.1") for i in first]
    mid = _depth(shapes, f"{u}middle_block.1")
    if not mid:
        raise UnsupportedModelError("the UNet has no middle cross-attention block (not a Stable Diffusion UNet)")
    if depths[-1] and depths[-1] != mid:
        raise UnsupportedModelError(f"the UNet's deepest level has {depths[-1]} transformer blocks and its middle "
                                    f"block {mid}: no Stable Diffusion model is built like that")
    attn = [d > 0 for d in depths]
    if not any(attn):
        raise UnsupportedModelError("the UNet has no cross-attention in its input blocks")
    block = f"{u}input_blocks.{first[attn.index(True)]}.1"
    cfg: dict = {
        "sample_size": 64,
        "in_channels": shapes[f"{u}input_blocks.0.0.weight"][1],
        "out_channels": shapes[f"{u}out.2.weight"][0],
        "block_out_channels": tuple(channels),
        "layers_per_block": nrb,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "cross_attention_dim": shapes[f"{block}.transformer_blocks.0.attn2.to_k.weight"][1],
        "use_linear_projection": len(shapes[f"{block}.proj_in.weight"]) == 2,
        "transformer_layers_per_block": tuple(d or (mid if i == levels - 1 else 1) for i, d in enumerate(depths)),
    }
    out_depths = []
    for lv in range(levels):  # output blocks run from the deepest level up, nrb + 1 per level
        ds = {_depth(shapes, f"{u}output_blocks.{lv * (nrb + 1) + j}.1") for j in range(nrb + 1)}
        if len(ds) != 1:
            raise UnsupportedModelError("the UNet's output blocks mix transformer depths within a level")
        out_depths.append(ds.pop())
    if [bool(d) for d in out_depths] != list(reversed(attn)):
        raise UnsupportedModelError("the UNet's output blocks do not mirror its input blocks")
    if any(d and d != e for d, e in zip(out_depths, reversed(depths), strict=True)):
        cfg["reverse_transformer_layers_per_block"] = tuple((d or 1,) * (nrb + 1) for d in out_depths)
    if family == "sd1":
        cfg["attention_head_dim"] = 8  # diffusers' legacy name: 8 heads, whatever the width
    else:
        if any(c % 64 for c in channels):
            raise UnsupportedModelError(f"UNet widths {channels} are not multiples of 64 channels per head")
        cfg["attention_head_dim"] = tuple(c // 64 for c in channels)  # heads per level
        cfg["upcast_attention"] = family == "sd2"  # as SD2's own config; matters only in half precision
    t_dim = shapes[f"{u}time_embed.0.weight"][0]
    if t_dim != 4 * channels[0]:
        cfg["time_embedding_dim"] = t_dim
    if family == "sdxl":
        adm = shapes[f"{u}label_emb.0.0.weight"][1]
        pooled = shapes[f"{OPENCLIP_SDXL}text_projection"][1]
        if (adm - pooled) % 6:
            raise UnsupportedModelError(f"SDXL size conditioning of {adm - pooled} features is not 6 embeddings")
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=(adm - pooled) // 6,
                   projection_class_embeddings_input_dim=adm)
    elif f"{u}label_emb.0.0.weight" in shapes:
        raise UnsupportedModelError("the UNet takes a class/image embedding (unCLIP or upscaler): not supported")
    return cfg


def unet_weights(get: Getter, shapes: Shapes, config: dict) -> dict[str, torch.Tensor]:
    """The UNet's weights in diffusers names, through diffusers' ``convert_ldm_unet_checkpoint``."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ldm = {k: get(k) for k in shapes if k.startswith(UNET)}
    out = convert_ldm_unet_checkpoint(ldm, config)
    if len(out) != len(ldm):
        raise UnsupportedModelError(f"{len(ldm) - len(out)} UNet tensors have no diffusers counterpart "
                                    "(not a Stable Diffusion 1.x/2.x/XL UNet)")
    return out


# -- VAE -------------------------------------------------------------------------------------------------------------
def has_ldm_vae(shapes: Shapes) -> bool:
    """True for the standard ``AutoencoderKL`` layout (not e.g. the TAESD-keyed stand-ins some tools write)."""
    return all(f"{VAE}{k}" in shapes for k in ("encoder.conv_in.weight", "decoder.conv_in.weight",
                                               "encoder.down.0.block.0.conv1.weight", "quant_conv.weight"))


def vae_config(shapes: Shapes, family: str) -> dict:
    """``AutoencoderKL`` keyword arguments for the ldm VAE under ``first_stage_model.``."""
    levels = _indices(shapes, re.escape(VAE) + r"encoder\.down\.(\d+)\.")
    channels = tuple(shapes[f"{VAE}encoder.down.{i}.block.0.conv2.weight"][0] for i in levels)
    return {
        "in_channels": shapes[f"{VAE}encoder.conv_in.weight"][1],
        "out_channels": shapes[f"{VAE}decoder.conv_out.weight"][0],
        "down_block_types": ("DownEncoderBlock2D",) * len(channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(channels),
        "block_out_channels": channels,
        "layers_per_block": len(_indices(shapes, re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": shapes[f"{VAE}post_quant_conv.weight"][0],
        "sample_size": 1024 if family == "sdxl" else 512,
        "scaling_factor": 0.13025 if family == "sdxl" else 0.18215,
    }


def vae_weights(get: Getter, shapes: Shapes, config: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ldm = {k: get(k) for k in shapes if k.startswith(VAE)}
    return convert_ldm_vae_checkpoint(ldm, config)


# -- text encoders ---------------------------------------------------------------------------------------------------
def clip_prefix(shapes: Shapes, prefix: str) -> str:
    """The prefix of the Hugging Face CLIP keys: ``<prefix>text_model.`` (current) or ``<prefix>`` (old files)."""
    return prefix + "text_model." if f"{prefix}text_model.embeddings.token_embedding.weight" in shapes else prefix


def clip_config(shapes: Shapes, prefix: str, pad_token_id: int):
    """``CLIPTextConfig`` of a Hugging Face-format CLIP text model stored under ``prefix`` (CLIP-L: SD1.x, SDXL)."""
    from transformers import CLIPTextConfig

    p = clip_prefix(shapes, prefix)
    vocab, width = shapes[f"{p}embeddings.token_embedding.weight"]
    return _text_config(CLIPTextConfig, vocab, width, shapes[f"{p}embeddings.position_embedding.weight"][0],
                        shapes[f"{p}encoder.layers.0.mlp.fc1.weight"][0],
                        len(_indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")), "quick_gelu", pad_token_id)


def _text_config(cls, vocab: int, width: int, positions: int, inner: int, layers: int, act: str, pad: int,
                 projection: int | None = None):
    if width % 64:
        raise UnsupportedModelError(f"text encoder width {width} is not a multiple of 64 channels per head")
    kw = {"projection_dim": projection} if projection else {}
    return cls(vocab_size=vocab, hidden_size=width, intermediate_size=inner, num_hidden_layers=layers,
               num_attention_heads=width // 64, max_position_embeddings=positions, hidden_act=act,
               bos_token_id=49406, eos_token_id=49407, pad_token_id=pad, **kw)


def clip_weights(get: Getter, shapes: Shapes, prefix: str) -> dict[str, torch.Tensor]:
    """CLIP text-model weights keyed as in ``CLIPTextModel`` without the ``text_model.`` prefix."""
    p = clip_prefix(shapes, prefix)
    parts = ("embeddings.", "encoder.", "final_layer_norm.")  # not text_projection (ComfyUI saves one), logit_scale
    return {k[len(p):]: get(k) for k in shapes
            if k.startswith(p) and k[len(p):].startswith(parts) and not k.endswith("position_ids")}


def openclip_config(shapes: Shapes, prefix: str, drop_last: bool, pad_token_id: int, with_projection: bool):
    """Config of an OpenCLIP text tower as a transformers CLIP model (SD2.x: ViT-H, SDXL: ViT-bigG).

    ``drop_last``: SD2.x conditions on the penultimate layer followed by the final layer norm, which is exactly a
    model with one layer fewer (as diffusers stores SD2's encoder).
    """
    from transformers import CLIPTextConfig

    vocab, width = shapes[f"{prefix}token_embedding.weight"]
    layers = len(_indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
    proj = shapes[f"{prefix}text_projection"][1] if with_projection else None
    return _text_config(CLIPTextConfig, vocab, width, shapes[f"{prefix}positional_embedding"][0],
                        shapes[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"][0], layers - int(drop_last),
                        "gelu", pad_token_id, proj)


#: per-layer OpenCLIP names -> transformers CLIP names (the fused q/k/v projection is split separately)
_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
#: OpenCLIP tensors the text model does not use
_OPENCLIP_UNUSED = ("logit_scale", "attn_mask")


def openclip_weights(get: Getter, shapes: Shapes, prefix: str, layers: int,
                     with_projection: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower weights as ``CLIPTextModel`` keys (no ``text_model.`` prefix), plus ``text_projection``
    when ``with_projection``. Every tensor under ``prefix`` is either mapped or known to be unused (a leftover image
    tower under ``visual.`` is ignored)."""
    out: dict[str, torch.Tensor] = {
        "embeddings.token_embedding.weight": get(f"{prefix}token_embedding.weight"),
        "embeddings.position_embedding.weight": get(f"{prefix}positional_embedding"),
        "final_layer_norm.weight": get(f"{prefix}ln_final.weight"),
        "final_layer_norm.bias": get(f"{prefix}ln_final.bias"),
    }
    used = {f"{prefix}{k}" for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight",
                                      "ln_final.bias", "text_projection", *_OPENCLIP_UNUSED)}
    if with_projection:
        out["text_projection.weight"] = get(f"{prefix}text_projection").T.contiguous()
    rx = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
    for k in shapes:
        m = rx.match(k)
        if not m:
            continue
        i, name, kind = int(m.group(1)), m.group(2), m.group(3)
        used.add(k)
        if i >= layers:
            continue  # SD2.x: the last layer is not used
        if name not in _OPENCLIP_LAYER:
            raise UnsupportedModelError(f"unknown OpenCLIP text-encoder tensor {k}")
        out[f"encoder.layers.{i}.{_OPENCLIP_LAYER[name]}.{kind}"] = get(k)
    for i in range(layers):
        for kind in ("weight", "bias"):
            k = f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"
            for name, part in zip(("q", "k", "v"), get(k).chunk(3, dim=0), strict=True):
                out[f"encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = part.clone()
    used |= {k for k in shapes if k.startswith(prefix) and ".attn.in_proj_" in k}
    left = sorted(k for k in shapes if k.startswith(prefix) and k not in used and not k.startswith(prefix + "visual."))
    if left:
        raise UnsupportedModelError(f"unknown OpenCLIP text-encoder tensors, e.g. {left[0]}")
    return out
