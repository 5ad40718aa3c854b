"""Test helpers: tiny SD1.x / SD2.x / SDXL models built in code, written out in the original (ldm) key layout.

The mapping here runs diffusers/transformers -> ldm, written independently of the loader (which goes ldm ->
diffusers through diffusers' own converters), so a round trip that reproduces the model's outputs checks both. Every
export asserts that each source tensor got exactly one ldm name (key coverage).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from erasure.clip_tokenizer import PAD_END, PAD_ZERO, builtin_clip_tokenizer
from erasure.diffusers_backbone import DiffusersBackbone

_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
        "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
        "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RES[head]}.{tail}"


def _unique(out: dict, src: dict) -> dict:
    assert len(out) == len(src), f"{len(src) - len(out)} tensors lost or renamed onto each other"
    return out


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    cfg = unet.config
    per = cfg.layers_per_block + 1
    attn_up = [t.startswith("CrossAttn") for t in cfg.up_block_types]
    out = {}
    for k, v in unet.state_dict().items():
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            n = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", k):
            n = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
            n = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", k):
            n = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", k):
            n = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            n = f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", k):
            n = f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
            lv = int(m[1])
            n = f"output_blocks.{lv * per + per - 1}.{2 if attn_up[lv] else 1}.conv.{m[2]}"
        else:
            prefix = next(p for p in _TOP if k.startswith(p))
            n = _TOP[prefix] + k[len(prefix):]
        out[f"model.diffusion_model.{n}"] = v
    return _unique(out, unet.state_dict())


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    n_up = len(vae.config.block_out_channels)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in vae.state_dict().items():
        n = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", n):
            n = f"encoder.down.{m[1]}.block.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", n):
            n = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", n):
            n = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", n):
            n = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", n):
            n = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", n):
            n = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if v.dim() == 2:
                v = v[:, :, None, None]  # ldm's attention projections are 1x1 convolutions
        out[f"first_stage_model.{n}"] = v
    return _unique(out, vae.state_dict())


def _flat(te: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text model's tensors without the ``text_model.`` prefix (transformers >= 5.6 has none)."""
    return {k.removeprefix("text_model."): v for k, v in te.state_dict().items()}


def clip_to_ldm(te: CLIPTextModel, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}text_model.{k}": v for k, v in _flat(te).items()}


def openclip_to_ldm(te: torch.nn.Module, prefix: str, extra_layer: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower keys; ``extra_layer`` appends a random last block and projection (SD2.x files carry
    24 blocks while the conditioning uses 23)."""
    sd = _flat(te)
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {f"{prefix}token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           f"{prefix}positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           f"{prefix}ln_final.weight": sd.pop("final_layer_norm.weight"),
           f"{prefix}ln_final.bias": sd.pop("final_layer_norm.bias"),
           f"{prefix}logit_scale": torch.tensor(4.6)}
    if "text_projection.weight" in sd:
        out[f"{prefix}text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    n = te.config.num_hidden_layers
    for i in range(n):
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"encoder.layers.{i}.self_attn.{x}_proj.{kind}") for x in "qkv"]
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv)
        for hf, oc in names.items():
            for kind in ("weight", "bias"):
                out[f"{prefix}transformer.resblocks.{i}.{oc}.{kind}"] = sd.pop(f"encoder.layers.{i}.{hf}.{kind}")
    assert not sd, f"unexported tensors: {sorted(sd)}"
    if extra_layer:
        g = torch.Generator().manual_seed(seed)
        for k in [k for k in out if k.startswith(f"{prefix}transformer.resblocks.{n - 1}.")]:
            out[k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}.")] = torch.randn(out[k].shape, generator=g)
        d = te.config.hidden_size
        out[f"{prefix}text_projection"] = torch.randn(d, d, generator=g)
    return out


def _clip(width: int, layers: int, act: str, pad: int, projection: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=width // 64, max_position_embeddings=77, hidden_act=act,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=pad,
                         **({"projection_dim": projection} if projection else {}))
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_vae(seed: int = 0, scaling_factor: float = 0.18215) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
                        layers_per_block=1, latent_channels=4, scaling_factor=scaling_factor).eval()
    _randomise_norms(vae, seed + 200)
    return vae


def _randomise_norms(m: torch.nn.Module, seed: int) -> None:
    """Non-trivial norm/bias values (freshly built models have ones and zeros, which hide swapped tensors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def tiny_model(family: str, seed: int = 0, attention_first: bool = True) -> tuple[DiffusersBackbone, dict]:
    """A tiny model of ``family`` ("sd1", "sd2", "sdxl") as a reference backbone, and its ldm-keyed state dict.

    ``attention_first=False`` (SD1 only) moves the cross-attention to the second level, where the default 512 px
    gives 32x32 attention maps instead of 64x64: end-to-end runs of the methods stay fast.
    """
    ac = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    vae = tiny_vae(seed, 0.13025 if family == "sdxl" else 0.18215)
    torch.manual_seed(seed)
    if family == "sd1":
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")[:: 1 if attention_first else -1],
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")[:: 1 if attention_first else -1],
            cross_attention_dim=128, attention_head_dim=8)
        te = _clip(128, 2, "quick_gelu", 49407, seed=seed)
        encoders, pads, hidden, pred = [te], [PAD_END], -1, "epsilon"
        ldm = clip_to_ldm(te, "cond_stage_model.transformer.")
    elif family == "sd2":
        unet = UNet2DConditionModel(
            sample_size=96, block_out_channels=(64, 128), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
            attention_head_dim=(1, 2), use_linear_projection=True, upcast_attention=True)
        te = _clip(128, 2, "gelu", 0, seed=seed)
        encoders, pads, hidden, pred = [te], [PAD_ZERO], -1, "v_prediction"
        ldm = openclip_to_ldm(te, "cond_stage_model.model.", extra_layer=True, seed=seed)
    elif family == "sdxl":
        te1 = _clip(128, 2, "quick_gelu", 49407, seed=seed)
        te2 = _clip(128, 3, "gelu", 0, projection=64, seed=seed + 1)
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(64, 128), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=256, attention_head_dim=(1, 2), use_linear_projection=True,
            transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 64)
        encoders, pads, hidden, pred = [te1, te2], [PAD_END, PAD_ZERO], -2, "epsilon"
        ldm = {**clip_to_ldm(te1, "conditioner.embedders.0.transformer."),
               **openclip_to_ldm(te2, "conditioner.embedders.1.model.", extra_layer=False)}
    else:
        raise ValueError(family)
    _randomise_norms(unet, seed + 10)
    ldm.update(unet_to_ldm(unet))
    ldm.update(vae_to_ldm(vae))
    toks = [builtin_clip_tokenizer(77, pad) for pad in pads]
    return DiffusersBackbone(unet.eval(), encoders, toks, ac, pred, vae, hidden, name=family), ldm


def write_checkpoint(ldm: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> Path:
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in ldm.items()}
    save_file(sd, str(path))
    return path
