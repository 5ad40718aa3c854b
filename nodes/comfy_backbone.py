"""ComfyUI's MODEL (a ModelPatcher) and CLIP as the erasure library's backbone, and erasure results as patches.

The library's methods see epsilon predictions on VP latents ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` at integer
DDPM timesteps, which is exactly what ComfyUI's SD1.x/SD2.x/SDXL ``diffusion_model(x_t, t, context, y)`` computes;
v-prediction models are converted with ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``.

Module names are ComfyUI's (ldm layout, ``input_blocks.1.1.transformer_blocks.0.attn2.to_k``). At the edges
(LoRA sockets and files) they are translated to diffusers names through ComfyUI's own ``unet_to_diffusers`` map and
written by the library exactly as from a diffusers model (SD1.x/SD2.x keys in diffusers names, SDXL keys in ldm
names, as kohya writes them), so a LoRA made here is the same file as one made from the command line, and loads in
LoraLoader, A1111/Forge and diffusers alike.

Three facts of the host are handled here: results become patches on a ``clone()`` (never writes into the shared
weights); ComfyUI runs graphs in inference mode, so training swaps each weight for a non-inference copy for its
duration and puts the original Parameter objects back (``trainable``); progress and Cancel go through ComfyUI's
ProgressBar and interrupt check (in the node modules).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterator

import comfy.model_management
import comfy.utils
import torch
import torch.utils.checkpoint
from comfy.weight_adapter import LoRAAdapter
from torch import nn

from ..erasure import errors
from ..erasure.backbone import NoiseSchedule, TextConditioning
from ..erasure.guards import model_lock
from ..erasure.lora_files import file_metadata, lora_tensors, resolve_names
from ..erasure.weights import Delta, ErasureWeights

#: prompts whose embeddings a backbone keeps (SDXL: 128 x 77 x 2048 values, 40 MB in fp16)
TEXT_CACHE_SIZE = 128

#: ComfyUI model configs this pack supports (class names in comfy/supported_models.py)
SUPPORTED = {"SD15": "SD1.x", "SD20": "SD2.x", "SDXL": "SDXL"}
#: the families' names in LoRA files (``erasure.lora_files``: kohya's base model versions, ModelSpec architectures)
FAMILY_IDS = {"SD1.x": "sd1", "SD2.x": "sd2", "SDXL": "sdxl"}


class UnsupportedModelError(errors.UnsupportedModelError):
    """A MODEL this pack cannot edit (the library's error, raised from ComfyUI's side)."""


def prediction_type(model) -> str | None:
    """``"eps"`` or ``"v"``: what the MODEL's UNet predicts, read from its ``model_sampling`` object (which is what
    ComfyUI samples with: a ModelSamplingDiscrete node can turn an SD1.x/SD2.x checkpoint detected as epsilon into
    v-prediction without touching its ``model_type``). ``None`` for anything else (LCM, x0, EDM, flow schedules)."""
    import comfy.model_sampling as ms

    sampling = model.get_model_object("model_sampling")
    kind = type(sampling)
    discrete = (isinstance(sampling, ms.ModelSamplingDiscrete) and kind.sigma is ms.ModelSamplingDiscrete.sigma
                and kind.timestep is ms.ModelSamplingDiscrete.timestep)
    if not discrete or kind.calculate_input is not ms.EPS.calculate_input:
        return None
    if kind.calculate_denoised is ms.EPS.calculate_denoised:
        return "eps"
    if kind.calculate_denoised is ms.V_PREDICTION.calculate_denoised:
        return "v"
    return None


def check_supported(model) -> str:
    """The family name of a supported MODEL, or a clear error naming what is supported."""
    config = type(getattr(model.model, "model_config", None)).__name__
    pred = prediction_type(model) if config in SUPPORTED else None
    if pred is None:
        mtype = getattr(model.model, "model_type", None)
        raise UnsupportedModelError(
            f"this model ({config}, {getattr(mtype, 'name', mtype)}) is not supported: concept erasure works on "
            f"SD1.x, SD2.x and SDXL UNets with the discrete epsilon or v-prediction schedule; load one of those "
            "with a checkpoint loader (Model Sampling Discrete: eps or v_prediction only)")
    return SUPPORTED[config]


def ldm_to_diffusers(model) -> dict[str, str]:
    """ComfyUI module name -> diffusers module name, for every weight of the UNet. ComfyUI's map also names SDXL's
    ``label_emb`` as unCLIP's ``class_embedding`` (in set order, which varies between runs): the supported models
    have ``add_embedding`` only, so that name is skipped."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {v[: -len(".weight")]: k[: -len(".weight")] for k, v in mapping.items()
            if k.endswith(".weight") and not k.startswith("class_embedding.")}


def clip_layers(clip) -> list[list]:
    """``[layer, layer_idx]`` of each text encoder of ``clip`` as ``encode_from_tokens`` sets them: the encoders'
    defaults (SD1.x: the last layer; SD2.x, SDXL: the penultimate one) overridden by ``clip.layer_idx``, which CLIP
    Set Last Layer (or a checkpoint's config) sets on each CLIP object; clones share the encoder module, so the layer
    is read from the object, not from the module's state. An index beyond the encoder's depth means the last
    layer, as in ComfyUI."""
    enc = clip.cond_stage_model
    enc.reset_clip_options()
    try:
        if clip.layer_idx is not None:
            enc.set_clip_options({"layer": clip.layer_idx})
        return [_layer(m) for m in enc.modules() if hasattr(m, "options_default") and hasattr(m, "num_layers")]
    finally:
        enc.reset_clip_options()


def _layer(m) -> list:
    """One encoder's layer in one spelling per output: the index counted from the first layer, and the last layer
    with the final layer norm (SD1.x's CLIP Set Last Layer -1) as ``"last"``, which encodes the same."""
    if m.layer != "hidden":
        return [m.layer, None]
    i = m.layer_idx if m.layer_idx >= 0 else m.num_layers + m.layer_idx
    if i == m.num_layers - 1 and m.layer_norm_hidden_state:
        return ["last", None]
    return ["hidden", i]


class ComfyBackbone:
    """The library's Backbone protocol on a ModelPatcher + CLIP (see ``erasure/backbone.py``)."""

    clip_denoised = False
    #: no VAE in a MODEL: the library keeps latents (previews decode with the VAE socket)
    latent_only = True

    def __init__(self, model, clip, resolution: int | None = None) -> None:
        if clip is None:
            raise ValueError("no CLIP given: connect the checkpoint's CLIP output (erasure needs the text encoder)")
        self.family = check_supported(model)
        self.patcher = model
        self.clip = clip
        self._text_cache: OrderedDict[str, TextConditioning] = OrderedDict()
        base = model.model
        sampling = model.get_model_object("model_sampling")
        sigmas = sampling.sigmas.detach().float().cpu()
        self.schedule = NoiseSchedule(1.0 / (1.0 + sigmas**2))
        self.v_prediction = prediction_type(model) == "v"
        self.channels = base.latent_format.latent_channels
        self.default_resolution = resolution or (1024 if self.family == "SDXL" else
                                                 768 if self.v_prediction else 512)
        #: latent size of the UNet input being evaluated (the attention maps' layout); set by predict_noise
        self._hw = (self.default_resolution // 8, self.default_resolution // 8)

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The text encoder with this CLIP's own patches applied (a LoRA's text-encoder part), as the prior cache's
        key hashes it: clones of one CLIP share the module, whose weights are those of whichever clone was loaded
        last."""
        self.clip.load_model()
        return [self.clip.cond_stage_model]

    @property
    def hidden_layer(self) -> list[list]:
        """The layer each text encoder conditions with (CLIP Set Last Layer), for the prior cache's key:
        :func:`clip_layers`."""
        return clip_layers(self.clip)

    # -- devices -------------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Put the UNet on ComfyUI's device under its memory management (full load: training needs every layer)."""
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

    @property
    def dtype(self) -> torch.dtype:
        return self.patcher.model.get_dtype()

    def unet(self) -> nn.Module:
        return self.patcher.model.diffusion_model

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        r = resolution or self.default_resolution
        if r % 8:
            raise ValueError(f"resolution must be a multiple of 8 (got {r})")
        return (self.channels, r // 8, r // 8)

    # -- text ----------------------------------------------------------------------------------------------------
    def _tokens(self, prompt: str, word_ids: bool = False):
        return self.clip.tokenize(prompt, return_word_ids=word_ids)

    def encode_text(self, prompts: list[str], batch: int = 32) -> TextConditioning:
        """Per-token embeddings ``[B, 77, D]``; the last ``TEXT_CACHE_SIZE`` prompts are remembered, because the
        methods encode the same few prompts many times (the empty prompt, trajectory prompts at every refresh) and
        the text encoder never changes during a node's run (on CPU an OpenCLIP-H prompt costs over a second)."""
        cache = self._text_cache
        missing = list(dict.fromkeys(p for p in prompts if p not in cache))
        if len(missing) > TEXT_CACHE_SIZE:  # a prior set: encoded once, not kept
            return self._encode(prompts, batch)
        if missing:
            got = self._encode(missing, batch)
            for i, p in enumerate(missing):
                cache[p] = got[i : i + 1]
        for p in prompts:
            cache.move_to_end(p)
        out = TextConditioning.cat([cache[p] for p in prompts])
        while len(cache) > TEXT_CACHE_SIZE:
            cache.popitem(last=False)
        return out

    def _encode(self, prompts: list[str], batch: int) -> TextConditioning:
        """Without pooled outputs to keep (SD1.x/2.x), up to ``batch`` prompts go through the encoder at once as the
        77-token sections of one long prompt (ComfyUI encodes the sections of a prompt as one batch and
        concatenates them), which is then cut back into prompts."""
        toks = []
        for p in prompts:
            tokens = self._tokens(p)
            if any(len(sections) > 1 for sections in tokens.values()):
                raise ValueError(f"the prompt {p[:60]!r} is longer than the text encoder's 75 tokens: shorten it")
            toks.append(tokens)
        embeds, pooled = [], []
        if self.family == "SDXL":
            for tokens in toks:
                cond, pool = self.clip.encode_from_tokens(tokens, return_pooled=True)
                embeds.append(cond)
                pooled.append(pool)
        else:
            for i in range(0, len(toks), batch):
                group = toks[i : i + batch]
                packed = {k: [t[k][0] for t in group] for k in group[0]}
                cond = self.clip.encode_from_tokens(packed)
                embeds.append(cond.reshape(len(group), -1, cond.shape[-1]))
        e = torch.cat(embeds).to(self.device, self.dtype)
        extras = {}
        if self.family == "SDXL":
            r = self.default_resolution
            y = [self.patcher.model.encode_adm(pooled_output=p, width=r, height=r, target_width=r, target_height=r,
                                               crop_w=0, crop_h=0) for p in pooled]
            extras["y"] = torch.cat(y).to(self.device, self.dtype)
        return TextConditioning(e, extras)

    def tokenize(self, prompt: str) -> list[int]:
        return [t[0] for t in next(iter(self._tokens(prompt).values()))[0]]

    def token_positions(self, prompt: str, word: str) -> list[int]:
        """Positions (in the 77-token sequence) of the tokens of ``word`` inside ``prompt``'s tokens."""
        full = self.tokenize(prompt)
        ids = self.tokenize(word)
        special = set(self.tokenize(""))  # start, end and padding (SD2's OpenCLIP pads with 0, not with end)
        sub = [t for t in ids if t not in special]
        if not word.strip() or not sub:
            return []
        for i in range(len(full) - len(sub) + 1):
            if full[i : i + len(sub)] == sub:
                return list(range(i, i + len(sub)))
        return []

    # -- prediction ----------------------------------------------------------------------------------------------
    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        x = x_t.to(self.device, self.dtype)
        self._hw = (x.shape[-2], x.shape[-1])
        t = torch.as_tensor(t, device=self.device).expand(x.shape[0]) if torch.as_tensor(t).dim() == 0 else t
        t = t.to(self.device)
        out = self.unet()(x, timesteps=t.float(), context=cond.embeds.to(self.device, self.dtype),
                          y=cond.extras.get("y"))
        if self.v_prediction:
            a = self.schedule.alphas_cumprod.to(self.device)[t.long()].view(-1, 1, 1, 1).to(out.dtype)
            out = a.sqrt() * out + (1 - a).sqrt() * x
        return out

    def cross_attention_kv(self) -> dict[str, nn.Linear]:
        return {n: m for n, m in self.unet().named_modules()
                if isinstance(m, nn.Linear) and (n.endswith("attn2.to_k") or n.endswith("attn2.to_v"))}

    @contextlib.contextmanager
    def capture_attention(self, sink, resolution: int | None = None) -> Iterator[None]:
        """Explicit softmax attention in every cross-attention layer for the duration, reporting probabilities
        ``[B, heads, HW, L]`` to ``sink(name, probs, (h, w))``; the layers' own forwards are put back on exit.
        The map layout follows the latents actually evaluated (user images may differ from ``resolution``)."""
        self._hw = self.latent_shape(resolution)[1:]
        mods = {n[: -len(".to_k")]: None for n in self.cross_attention_kv() if n.endswith("to_k")}
        named = dict(self.unet().named_modules())
        saved = {}
        try:
            for name in mods:
                m = named[name]
                saved[name] = m.__dict__.get("forward")
                m.forward = _capturing_forward(m, name, sink, lambda: self._hw)
            yield
        finally:
            for name, fwd in saved.items():
                if fwd is None:
                    named[name].__dict__.pop("forward", None)
                else:
                    named[name].forward = fwd

    @contextlib.contextmanager
    def gradient_checkpointing(self, enabled: bool) -> Iterator[bool]:
        """For the duration, every transformer block and ResBlock of the UNet runs its forward through
        ``torch.utils.checkpoint`` (non-reentrant) whenever grad is enabled, so backward recomputes its activations
        instead of keeping them; no-grad forwards call the block directly. Done by an instance-level ``forward`` on
        each block (as ``capture_attention`` does), removed on exit: the shared model is never changed for good.
        ComfyUI's own ``use_checkpoint`` flag is not used: its reentrant ``CheckpointFunction`` differentiates only
        with respect to the block's parameters, not the hooked deltas that ANT trains. ``enabled=False`` changes
        nothing (ComfyUI's blocks do not checkpoint by default)."""
        from comfy.ldm.modules.attention import BasicTransformerBlock
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

        blocks = [m for m in self.unet().modules() if isinstance(m, (BasicTransformerBlock, ResBlock))]
        if not enabled or not blocks:
            yield False
            return
        saved: list[tuple[nn.Module, object]] = []
        try:
            for m in blocks:
                saved.append((m, m.__dict__.get("forward")))
                m.forward = _checkpointed(m.forward)
            yield True
        finally:
            for m, fwd in saved:
                if fwd is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = fwd

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("decoding needs a VAE: the preview node decodes with the VAE socket")

    def fingerprint(self) -> str:
        """A short hash of the UNet's and text encoder's weights (samples of every tensor), for caches and files."""
        h = hashlib.sha256()
        for n, p in list(self.unet().state_dict().items())[::7]:
            h.update(n.encode())
            h.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def _checkpointed(forward):
    """``forward`` through non-reentrant ``torch.utils.checkpoint`` when grad is enabled, directly otherwise."""

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _capturing_forward(m: nn.Module, name: str, sink, latent_hw):
    def forward(x, context=None, value=None, mask=None, transformer_options=None):
        q = m.to_q(x)
        ctx = x if context is None else context
        k = m.to_k(ctx)
        v = m.to_v(ctx if value is None else value)
        b, n, inner = q.shape
        h = m.heads
        d = inner // h
        q, k, v = (z.reshape(b, -1, h, d).transpose(1, 2) for z in (q, k, v))
        probs = (q.float() @ k.float().transpose(-1, -2) * d**-0.5).softmax(-1)
        lh, lw = latent_hw()
        f = round(math.sqrt(lh * lw / n))
        sink(name, probs, (-(-lh // f), -(-lw // f)))  # each downsampling rounds up (stride-2 conv, padding 1)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, inner)
        return m.to_out(out)

    return forward


@contextlib.contextmanager
def trainable(backbone: ComfyBackbone) -> Iterator[None]:
    """Training inside a prompt, which ComfyUI runs in inference mode: grad on, inference mode off, and every UNet
    weight swapped for a non-inference copy (requires_grad False) for the duration. The original Parameter objects,
    which other branches of the graph share, are put back untouched on exit, even on error or Cancel. The model's lock
    (``erasure.guards.model_lock``) is held throughout, so two erasures of one MODEL (or of its clones, which share
    the UNet) take turns instead of swapping each other's weights."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    with model_lock(backbone.unet()), torch.inference_mode(False), torch.enable_grad():
        try:
            for mod in backbone.unet().modules():
                for pname, p in list(mod._parameters.items()):
                    if p is None:
                        continue
                    swapped.append((mod, pname, p))
                    mod._parameters[pname] = nn.Parameter(p.detach().clone(), requires_grad=False)
            yield
        finally:
            for mod, pname, p in swapped:
                mod._parameters[pname] = p


def to_lora_dict(weights: ErasureWeights, model, rank: int | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Kohya tensors and file metadata of ``weights`` (ComfyUI names), exactly as the library writes them for the
    same layers of a diffusers model: keys named as kohya names them for the model's family, kohya/ModelSpec
    metadata for its family and prediction type (``rank``: see ``ErasureWeights.export_rank``)."""
    family = FAMILY_IDS[check_supported(model)]
    prediction = prediction_type(model)
    named = weights.renamed(ldm_to_diffusers(model))
    tensors, err = lora_tensors(named, rank, family)
    return tensors, file_metadata(named, err, rank, family, prediction)


def from_lora(weights: ErasureWeights, model) -> ErasureWeights:
    """A LoRA read from a file or socket (diffusers, ldm or kohya names) with ComfyUI module names, checked against
    the model: a LoRA for another base model is refused with the reason."""
    to_ldm = {v: k for k, v in ldm_to_diffusers(model).items()}
    return resolve_names(weights, dict(model.model.diffusion_model.named_modules()), to_ldm)


def weight_patch(d: Delta, weight: torch.Tensor, compute_dtype: torch.dtype):
    """What ``ModelPatcher.add_patches`` gets for one delta. A low-rank delta: ComfyUI's ``LoRAAdapter`` on its
    factors, as LoraLoader builds it for a LoRA file (ComfyUI forms ``up @ down`` only while it patches the weight),
    unless the factors hold more numbers than the dense matrix (an exact file of a dense edit). A dense delta: a
    ``"diff"``, in the weight's dtype when ComfyUI applies patches in that dtype (``compute_dtype``, its
    ``lora_compute_dtype``: float16 on most GPUs), since it casts the diff to it anyway, else in float32; either
    way the patched weight is the one a float32 diff gives (docs/comfyui-integration.md)."""
    if d.up is not None and d.down is not None:
        out_f, rank = d.up.shape[0], d.down.shape[0]
        if rank * (out_f + d.down[0].numel()) < weight.numel():
            return LoRAAdapter(set(), (d.up.detach(), d.down.detach(), d.scale * rank, None, None, None))
    dtype = weight.dtype if weight.dtype == compute_dtype else torch.float32
    return ("diff", (d.matrix().detach().to(dtype),))


def patched_model(model, weights: ErasureWeights, strength: float = 1.0):
    """A clone of ``model`` with the erasure as weight patches at ``strength`` (the input's weights are untouched):
    LoRA adapters for low-rank deltas, weight diffs for dense ones (``weight_patch``)."""
    m = model.clone()
    compute = comfy.model_management.lora_compute_dtype(m.load_device)
    patches = {}
    for name, d in weights.deltas.items():
        key = f"diffusion_model.{name}.weight"
        try:
            w = comfy.utils.get_attr(m.model, key)
        except AttributeError:
            w = None
        patches[key] = (weight_patch(d, w, compute) if w is not None and tuple(d.shape) == tuple(w.shape)
                        else ("diff", (d.matrix().to(torch.float32),)))
    missing = set(patches) - set(m.add_patches(patches, strength))
    if missing:
        raise ValueError(f"{len(missing)} erasure layers did not match this model (e.g. {sorted(missing)[0]}): "
                         "the erasure was made for another base model")
    return m
