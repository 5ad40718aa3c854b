"""The backbone interface for diffusers models: SD1.x, SD2.x (eps and v-prediction), SDXL, and the lab model.

Loads a diffusers folder offline (``local_files_only``); ``"lab"`` and ``"lab-clip"`` name the concept lab's models
shipped in this package. The lab model is pixel-space (no VAE), so ``decode`` is the identity there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .attention import capture_cross_attention
from .backbone import NoiseSchedule, TextConditioning
from .errors import UnsupportedModelError
from .lab.model import LAB_MODELS
from .validation import check_model_folder


class DiffusersBackbone:
    """Adapter from diffusers components to :class:`erasure.backbone.Backbone`.

    ``text_encoders``/``tokenizers`` hold one entry for SD1.x/SD2.x and two for SDXL (whose second encoder is a
    ``CLIPTextModelWithProjection`` that also supplies the pooled embedding). ``hidden_layer`` selects which hidden
    state conditions the UNet: -1 is the final layer-normed output (SD1.x, the lab), -2 the penultimate (SD2.x, SDXL).
    ``latent_scale``: pixels per latent cell of a latent model loaded without its VAE (a single-file checkpoint whose
    VAE is missing or not in the standard layout); such a backbone is ``latent_only`` and cannot decode.
    """

    def __init__(self, unet: nn.Module, text_encoders: list[nn.Module], tokenizers: list, alphas_cumprod: torch.Tensor,
                 prediction_type: str = "epsilon", vae: nn.Module | None = None, hidden_layer: int = -1,
                 name: str = "model", latent_scale: int | None = None) -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise UnsupportedModelError(f"prediction type {prediction_type!r} is not supported (epsilon or "
                                        "v_prediction)")
        self._unet = unet
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.schedule = NoiseSchedule(alphas_cumprod.double())
        self.prediction_type = prediction_type
        self.vae = vae
        self.hidden_layer = hidden_layer
        self.name = name
        self.latent_scale = latent_scale if vae is None else None
        #: a latent model without a VAE: methods must not ask for decoded images
        self.latent_only = self.latent_scale is not None
        self.clip_denoised = vae is None and not self.latent_only
        self.is_sdxl = len(text_encoders) == 2
        for m in [unet, *text_encoders] + ([vae] if vae is not None else []):
            m.requires_grad_(False)
            m.eval()

    # -- basic properties ---------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self._unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._unet.parameters()).dtype

    def unet(self) -> nn.Module:
        return self._unet

    @property
    def context_length(self) -> int:
        return int(self.tokenizers[0].model_max_length)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for SD's VAE, 1 for pixel-space models)."""
        if self.vae is None:
            return self.latent_scale or 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        cfg = self._unet.config
        res = resolution or cfg.sample_size * self.vae_scale
        return (cfg.in_channels, res // self.vae_scale, res // self.vae_scale)

    # -- text -----------------------------------------------------------------------------------------------------
    def _ids(self, tok, prompts: list[str]) -> torch.Tensor:
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device)

    def encode_text(self, prompts: list[str]) -> TextConditioning:
        embeds, pooled = [], None
        for enc, tok in zip(self.text_encoders, self.tokenizers, strict=False):
            out = enc(self._ids(tok, prompts), output_hidden_states=self.hidden_layer != -1)
            h = out.last_hidden_state if self.hidden_layer == -1 else out.hidden_states[self.hidden_layer]
            embeds.append(h)
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        extras: dict[str, torch.Tensor] = {}
        if self.is_sdxl:
            res = self.latent_shape()[1] * self.vae_scale
            extras["text_embeds"] = pooled
            extras["time_ids"] = torch.tensor([[res, res, 0, 0, res, res]], dtype=pooled.dtype,
                                              device=pooled.device).expand(len(prompts), 6)
        return TextConditioning(torch.cat(embeds, dim=-1).to(self.dtype), extras)

    def tokenize(self, prompt: str) -> list[int]:
        tok = self.tokenizers[0]
        return tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids

    def token_positions(self, prompt: str, word: str) -> list[int]:
        """Positions in the padded token sequence of ``prompt`` where ``word``'s tokens occur (every occurrence)."""
        tok = self.tokenizers[0]
        ids = self.tokenize(prompt)
        sub = tok(word, add_special_tokens=False).input_ids
        if not sub:
            return []
        out: list[int] = []
        for i in range(len(ids) - len(sub) + 1):
            if ids[i : i + len(sub)] == sub:
                out.extend(range(i, i + len(sub)))
        return out

    # -- UNet ------------------------------------------------------------------------------------------------------
    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        t = t.to(self.device)
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        kwargs = {}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.extras["text_embeds"],
                                           "time_ids": cond.extras["time_ids"]}
        out = self._unet(x_t.to(self.dtype), t, encoder_hidden_states=cond.embeds, **kwargs).sample
        if self.prediction_type == "v_prediction":
            a = self.schedule.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1).to(out.dtype)
            out = a.sqrt() * out + (1 - a).sqrt() * x_t.to(out.dtype)
        return out

    @contextlib.contextmanager
    def gradient_checkpointing(self, enabled: bool) -> Iterator[bool]:
        """Diffusers' own gradient checkpointing on (or off) for the duration; yields whether it is on. Diffusers
        (0.42) checkpoints each ResNet and transformer block only when ``torch.is_grad_enabled()`` (train mode is not
        required), non-reentrant, so no-grad forwards run unchanged. Every block's flag and checkpoint function is
        put back on exit: a user's model that had checkpointing on keeps it, one that had it off gets it back off."""
        mods = [m for m in self._unet.modules() if hasattr(m, "gradient_checkpointing")]
        if not mods or not getattr(self._unet, "_supports_gradient_checkpointing", False):
            yield False
            return
        key = "_gradient_checkpointing_func"
        saved = [(m, m.gradient_checkpointing, key in m.__dict__, m.__dict__.get(key)) for m in mods]
        try:
            if enabled:
                self._unet.enable_gradient_checkpointing()
            else:
                self._unet.disable_gradient_checkpointing()
            yield enabled
        finally:
            for m, flag, had, func in saved:
                m.gradient_checkpointing = flag
                if had:
                    m.__dict__[key] = func
                else:
                    m.__dict__.pop(key, None)

    def cross_attention_kv(self) -> dict[str, nn.Linear]:
        """Every cross-attention key/value projection, by module name in the UNet (diffusers naming)."""
        return {name: m for name, m in self._unet.named_modules()
                if name.endswith(("attn2.to_k", "attn2.to_v")) and isinstance(m, nn.Linear)}

    def capture_attention(self, sink, resolution: int | None = None):
        """Context manager: cross-attention probabilities [B, heads, HW, L] of every layer go to ``sink``."""
        _, h, w = self.latent_shape(resolution)
        return capture_cross_attention(self._unet, sink, (h, w))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.latent_only:
            raise UnsupportedModelError(f"{self.name} was loaded without a VAE, so latents cannot be decoded")
        if self.vae is None:
            return latents.clamp(-1, 1)
        sf = self.vae.config.scaling_factor
        return self.vae.decode(latents.to(self.vae.dtype) / sf).sample.clamp(-1, 1)

    def fingerprint(self) -> str:
        """A short hash identifying the base model: every UNet parameter's name and shape, and the values of the
        cross-attention K/V weights (what erasure edits). Cheap even for SDXL."""
        h = hashlib.sha256()
        for name, p in self._unet.state_dict().items():
            h.update(f"{name}:{tuple(p.shape)};".encode())
        for _, m in sorted(self.cross_attention_kv().items()):
            h.update(m.weight.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def lab_model_dir(name: str = "lab") -> Path:
    """The folder of a concept lab model (``--model lab`` or ``lab-clip``), shipped in the package."""
    return LAB_MODELS[name]


def load_diffusers(path: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> DiffusersBackbone:
    """Load a diffusers folder (or ``"lab"``) offline as a backbone."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    name = str(path)
    folder = lab_model_dir(name) if name in LAB_MODELS else Path(path)
    check_model_folder(folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, torch_dtype=dtype)
    encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True, torch_dtype=dtype)]
    tokenizers = [CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)]
    hidden_layer = -1
    if (folder / "text_encoder_2").is_dir():
        encoders.append(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", local_files_only=True,
                                                                    torch_dtype=dtype))
        tokenizers.append(CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True))
        hidden_layer = -2
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    sched = DDPMScheduler.from_config(sched_cfg)
    # SD1.x and SD2.x condition on the final (layer-normed) output: diffusers stores SD2's OpenCLIP encoder already
    # truncated to 23 layers. SDXL conditions on the penultimate hidden state of both encoders.
    vae = None
    if (folder / "vae").is_dir():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True, torch_dtype=dtype)
    bb = DiffusersBackbone(unet, encoders, tokenizers, sched.alphas_cumprod, sched.config.prediction_type, vae,
                           hidden_layer, name=name)
    for m in [unet, *encoders] + ([vae] if vae is not None else []):
        m.to(device)
    return bb
