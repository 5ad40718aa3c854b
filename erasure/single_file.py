"""Single-file Stable Diffusion checkpoints (what ComfyUI and A1111 users have) as a backbone, fully offline.

Supported: SD1.x, SD2.x (512 eps and 768-v) and SDXL base checkpoints in the original ldm key layout
(``model.diffusion_model.*``; ``cond_stage_model.*`` or ``conditioner.embedders.*``; ``first_stage_model.*``), as
``.safetensors`` only: pickled ``.ckpt``/``.pt`` files can run code when opened and are refused unopened. Nothing is
fetched from the hub (diffusers' ``from_single_file`` would fetch configs): the architecture is read from the keys,
the configs from the tensors' shapes (``ldm_layout.py``), and the tokenizer is the user's folder or the vendored CLIP
BPE (``clip_tokenizer.py``). The result is the same ``DiffusersBackbone`` a diffusers folder gives.

What keys cannot say: whether an SD2.x model predicts v or eps. The file's ``v_pred`` marker (written by ComfyUI)
decides, else the caller's choice, else ComfyUI's heuristic on one norm bias; ``LoadedCheckpoint.summary()`` says
which was used, so the user can override it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import ldm_layout as L
from .clip_tokenizer import PAD_END, PAD_ZERO, builtin_clip_tokenizer, tokenizer_from_folder
from .diffusers_backbone import DiffusersBackbone
from .errors import UnsupportedModelError

SUPPORTED = ("supported single files: Stable Diffusion 1.x, 2.x (512 eps and 768-v) and SDXL base checkpoints in the "
             "original (ldm) key layout, as .safetensors; or give a diffusers model folder")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
#: what a family's text encoders are called in messages
_ENCODERS = {"sd1": "CLIP-L", "sd2": "OpenCLIP-H", "sdxl": "CLIP-L + OpenCLIP-bigG"}
#: default resolution (pixels) by family; SD2.x's depends on the prediction (768-v vs 512 eps)
_RESOLUTION = {"sd1": 512, "sdxl": 1024}
Shapes = L.Shapes


@dataclass
class LoadedCheckpoint:
    """A loaded single file and what was decided while loading it (for the user's summary)."""

    backbone: DiffusersBackbone
    family: str
    prediction: str  # "eps" or "v"
    prediction_source: str
    vae: str
    tokenizer: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        bb = self.backbone
        res = bb.latent_shape()[1] * bb.vae_scale
        text = (f"{Path(bb.name).name}: {FAMILY_NAMES[self.family]} single file ({_ENCODERS[self.family]}), "
                f"{self.prediction}-prediction ({self.prediction_source}), {res} px, VAE {self.vae}, "
                f"tokenizer {self.tokenizer}")
        return "; ".join([text, *self.notes])


def check_path(path: str | Path) -> Path:
    """The checkpoint's path, after the checks that need no reading: exists, is a file, is ``.safetensors``."""
    p = Path(path).expanduser()
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsupportedModelError(
            f"{p.name}: only .safetensors checkpoints are read ({p.suffix} files are Python pickles, which can run "
            "code when opened, so this file was not opened). Convert it to .safetensors with a tool you trust, "
            "or download the model's .safetensors release")
    if not p.exists():
        raise UnsupportedModelError(f"{p} does not exist; give a diffusers model folder, a .safetensors "
                                    "checkpoint, or 'lab'")
    if p.suffix.lower() not in (".safetensors", ".sft"):
        raise UnsupportedModelError(f"{p.name} is not a .safetensors file; {SUPPORTED}")
    return p


def read_shapes(path: Path) -> Shapes:
    """Every tensor's name and shape, from the safetensors header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise UnsupportedModelError(f"{path.name} could not be read as safetensors ({e})") from e


def _any(shapes: Shapes, *fragments: str) -> bool:
    return any(f in k for k in shapes for f in fragments)


def detect_family(shapes: Shapes) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"``; any other model gets an error naming what it looks like."""
    if _any(shapes, "joint_blocks."):
        raise UnsupportedModelError(f"this is a Stable Diffusion 3 (MMDiT) checkpoint: not supported; {SUPPORTED}")
    if _any(shapes, "double_blocks.", "single_blocks.", "double_stream_modulation"):
        raise UnsupportedModelError(f"this is a Flux-type (DiT) checkpoint: not supported; {SUPPORTED}")
    if _any(shapes, "time_stack.", "time_mixer", "motion_modules.", "temporal_transformer"):
        raise UnsupportedModelError(f"this is a video model (SVD/AnimateDiff-type): not supported; {SUPPORTED}")
    if _any(shapes, "lora_up.", "lora_down.", "lora_A.", "lora_B."):
        raise UnsupportedModelError(f"this is a LoRA, not a model checkpoint; {SUPPORTED}")
    if "edm_vpred.sigma_max" in shapes or "edm_mean" in shapes:
        raise UnsupportedModelError(f"this checkpoint uses an EDM noise schedule (e.g. Playground v2.5, CosXL): "
                                    f"not supported; {SUPPORTED}")
    if f"{L.UNET}input_blocks.0.0.weight" not in shapes:
        if "input_blocks.0.0.weight" in shapes or "conv_in.weight" in shapes:
            raise UnsupportedModelError(f"this file holds a UNet alone; erasure also needs the text encoder, so give "
                                        f"the full checkpoint; {SUPPORTED}")
        raise UnsupportedModelError(f"no Stable Diffusion UNet (model.diffusion_model.*) in this file; {SUPPORTED}")
    clip_sd1 = any(k.startswith(L.CLIP_L_SD1) for k in shapes)
    openclip = f"{L.OPENCLIP_SD2}token_embedding.weight" in shapes
    xl_l = any(k.startswith(L.CLIP_L_SDXL) for k in shapes)
    xl_g = f"{L.OPENCLIP_SDXL}token_embedding.weight" in shapes
    if xl_l and xl_g:
        family = "sdxl"
    elif "conditioner.embedders.0.model.token_embedding.weight" in shapes:
        raise UnsupportedModelError(f"this is the SDXL refiner (one OpenCLIP-bigG encoder): not supported; "
                                    f"{SUPPORTED}")
    elif clip_sd1:
        family = "sd1"
    elif openclip:
        family = "sd2"
    else:
        raise UnsupportedModelError(f"this checkpoint has a UNet but no text encoder (cond_stage_model.* or "
                                    f"conditioner.embedders.*); erasure needs it; {SUPPORTED}")
    in_ch = shapes[f"{L.UNET}input_blocks.0.0.weight"][1]
    if in_ch != 4:
        kind = {9: "an inpainting model", 8: "an InstructPix2Pix-type model", 7: "the x4 upscaler"}.get(in_ch, "")
        raise UnsupportedModelError(f"the UNet takes {in_ch} input channels{' (' + kind + ')' if kind else ''}; only "
                                    f"text-to-image models (4 latent channels) are supported")
    return family


def choose_prediction(family: str, shapes: Shapes, get, requested: str | None) -> tuple[str, str]:
    """``(prediction, why)``: ``requested`` (``--model-prediction``) wins, then the file's ``v_pred`` marker; SD2.x
    falls back on ComfyUI's heuristic (``supported_models.SD20.model_type``: std of one norm bias > 0.09 means v)."""
    if requested is not None:
        if requested not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)} (got {requested!r})")
        return requested, "as requested"
    if "v_pred" in shapes:
        return "v", "the file's v_pred marker"
    if family != "sd2":
        return "eps", f"the {FAMILY_NAMES[family]} default; --model-prediction v for v-prediction finetunes"
    key = f"{L.UNET}output_blocks.11.1.transformer_blocks.0.norm1.bias"
    if key in shapes:
        v = float(get(key).float().std(unbiased=False)) > 0.09
        return ("v" if v else "eps"), (f"guessed from the weights as ComfyUI does (768-v models are v, 512-base "
                                       f"models eps); --model-prediction {'eps' if v else 'v'} if that is wrong")
    return "eps", "assumed: SD2.x files do not say; --model-prediction v for 768-v models"


def _build(cls_or_factory, weights: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Construct a module without initialising its parameters, then take ``weights`` as its parameters.

    Every parameter must be given and every given tensor used (a strict key check); buffers the file does not carry
    (e.g. CLIP's position ids) keep their constructed values.
    """
    from accelerate import init_empty_weights  # a dependency of peft, hence always present

    with init_empty_weights():
        m = cls_or_factory()
    model_keys = set(m.state_dict())
    if weights and all(k.startswith("text_model.") for k in model_keys - {"text_projection.weight"}):
        weights = {k if k == "text_projection.weight" else f"text_model.{k}": v for k, v in weights.items()}
    params = {n for n, _ in m.named_parameters()}
    missing = sorted(params - set(weights))
    unexpected = sorted(set(weights) - model_keys)
    if missing or unexpected:
        raise UnsupportedModelError(
            f"the {what} does not match its inferred configuration ({len(missing)} missing tensors, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); {SUPPORTED}")
    for name, t in weights.items():
        want = m.get_parameter(name).shape if name in params else m.get_buffer(name).shape
        if tuple(t.shape) != tuple(want):
            raise UnsupportedModelError(f"the {what}'s tensor {name} has shape {tuple(t.shape)}, expected "
                                        f"{tuple(want)} from the inferred configuration; {SUPPORTED}")
    m.load_state_dict(weights, strict=False, assign=True)
    return m


def _schedule(shapes: Shapes) -> tuple[torch.Tensor, list[str]]:
    """SD's scaled-linear schedule (all three families), rescaled to zero terminal SNR when the file says so."""
    from diffusers import DDPMScheduler

    ztsnr = "ztsnr" in shapes
    ac = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                       rescale_betas_zero_snr=ztsnr).alphas_cumprod.clone()
    if ztsnr:
        ac[-1] = 4.8973451890853435e-08  # as ComfyUI: the last step keeps a sliver of signal (finite eps/x0)
    return ac, (["zero-terminal-SNR schedule (the file's ztsnr marker)"] if ztsnr else [])


def load_single_file(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     tokenizer: str | Path | None = None, prediction: str | None = None,
                     with_vae: bool = True) -> LoadedCheckpoint:
    """Load an SD1.x/SD2.x/SDXL ``.safetensors`` checkpoint (ldm keys) offline as a ``DiffusersBackbone``.

    ``tokenizer``: a folder with CLIP's ``vocab.json`` + ``merges.txt`` (default: the vendored CLIP BPE, identical to
    ComfyUI's). ``prediction``: ``"eps"`` or ``"v"`` (default: see ``choose_prediction``). ``with_vae=False`` skips
    the VAE (the methods work in latent space; only user images and decoded previews need it).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    p = check_path(path)
    shapes = read_shapes(p)
    family = detect_family(shapes)
    dev = torch.device(device)
    with safe_open(str(p), framework="pt", device="cpu") as f:

        def get(k: str) -> torch.Tensor:
            return f.get_tensor(k).to(dev, dtype)

        pred, why = choose_prediction(family, shapes, get, prediction)
        vae_ok = with_vae and L.has_ldm_vae(shapes)
        vcfg = L.vae_config(shapes, family) if vae_ok else None
        ucfg = L.unet_config(shapes, family)
        # the default resolution in latent cells (what diffusers calls the UNet's sample size)
        scale = 2 ** (len(vcfg["block_out_channels"]) - 1) if vcfg else 8
        ucfg["sample_size"] = _RESOLUTION.get(family, 768 if pred == "v" else 512) // scale
        unet = _build(lambda: UNet2DConditionModel(**ucfg), L.unet_weights(get, shapes, ucfg), "UNet")

        if family == "sd1":
            cfg = L.clip_config(shapes, L.CLIP_L_SD1, pad_token_id=49407)
            encoders = [_build(lambda: CLIPTextModel(cfg), L.clip_weights(get, shapes, L.CLIP_L_SD1),
                               "text encoder")]
            pads, hidden_layer = [PAD_END], -1
        elif family == "sd2":
            cfg = L.openclip_config(shapes, L.OPENCLIP_SD2, drop_last=True, pad_token_id=0, with_projection=False)
            w = L.openclip_weights(get, shapes, L.OPENCLIP_SD2, cfg.num_hidden_layers, with_projection=False)
            encoders = [_build(lambda: CLIPTextModel(cfg), w, "text encoder")]
            pads, hidden_layer = [PAD_ZERO], -1
        else:
            cfg1 = L.clip_config(shapes, L.CLIP_L_SDXL, pad_token_id=49407)
            cfg2 = L.openclip_config(shapes, L.OPENCLIP_SDXL, drop_last=False, pad_token_id=0, with_projection=True)
            w2 = L.openclip_weights(get, shapes, L.OPENCLIP_SDXL, cfg2.num_hidden_layers, with_projection=True)
            encoders = [_build(lambda: CLIPTextModel(cfg1), L.clip_weights(get, shapes, L.CLIP_L_SDXL),
                               "first text encoder"),
                        _build(lambda: CLIPTextModelWithProjection(cfg2), w2, "second text encoder")]
            pads, hidden_layer = [PAD_END, PAD_ZERO], -2
        widths = sum(e.config.hidden_size for e in encoders)
        if widths != ucfg["cross_attention_dim"]:
            raise UnsupportedModelError(f"the text encoders give {widths}-d embeddings but the UNet's cross-attention "
                                        f"expects {ucfg['cross_attention_dim']}; {SUPPORTED}")

        vae, vae_note = None, "not loaded (not needed)"
        if vcfg is not None:
            vae = _build(lambda: AutoencoderKL(**vcfg), L.vae_weights(get, shapes, vcfg), "VAE")
            vae_note = "converted"
        elif with_vae:
            vae_note = "missing or not in the standard layout (latents only: no user images, no previews)"

    lengths = [e.config.max_position_embeddings for e in encoders]
    if tokenizer is not None:
        toks = [tokenizer_from_folder(tokenizer, n, pad) for n, pad in zip(lengths, pads, strict=True)]
        tok_note = f"from {tokenizer}"
    else:
        toks = [builtin_clip_tokenizer(n, pad) for n, pad in zip(lengths, pads, strict=True)]
        tok_note = "built-in CLIP BPE"
    for e, t in zip(encoders, toks, strict=True):
        if e.config.vocab_size != len(t):
            raise UnsupportedModelError(f"the text encoder has {e.config.vocab_size} tokens, the tokenizer "
                                        f"{len(t)}: not a CLIP text encoder; {SUPPORTED}")
    ac, notes = _schedule(shapes)
    bb = DiffusersBackbone(unet, encoders, toks, ac, PREDICTIONS[pred], vae, hidden_layer, name=str(p),
                           latent_scale=None if vae is not None else 8)
    for m in [unet, *encoders] + ([vae] if vae is not None else []):
        m.to(dev)
    return LoadedCheckpoint(bb, family, pred, why, vae_note, tok_note, notes)
