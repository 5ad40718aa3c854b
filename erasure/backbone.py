"""The small interface every erasure method is written against.

A method needs five things from a text-to-image model, whatever its host: noise prediction for a batch of
latents, timesteps and text conditionings (always in epsilon space, whatever the model predicts natively); text
encoding with the token positions of a word; the cross-attention key/value projections it may edit; the noise
schedule; and the decoder from latents to pixels for evaluation. ``erasure/diffusers_backbone.py`` implements it
for diffusers models; ``nodes/comfy_backbone.py`` (the ComfyUI pack) implements it for ComfyUI's MODEL and CLIP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class TextConditioning:
    """Per-token embeddings ``[B, L, D]`` plus model-specific extras (SDXL: pooled embedding, size ids)."""

    embeds: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, idx: slice | torch.Tensor | list[int]) -> TextConditioning:
        return TextConditioning(self.embeds[idx], {k: v[idx] for k, v in self.extras.items()})

    def repeat(self, n: int) -> TextConditioning:
        """Each row repeated ``n`` times consecutively (``repeat_interleave``)."""
        return TextConditioning(self.embeds.repeat_interleave(n, 0),
                                {k: v.repeat_interleave(n, 0) for k, v in self.extras.items()})

    @staticmethod
    def cat(items: list[TextConditioning]) -> TextConditioning:
        keys = items[0].extras.keys()
        return TextConditioning(torch.cat([i.embeds for i in items]),
                                {k: torch.cat([i.extras[k] for i in items]) for k in keys})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextConditioning:
        return TextConditioning(self.embeds.to(device, dtype),
                                {k: v.to(device, dtype) for k, v in self.extras.items()})


@dataclass(frozen=True)
class NoiseSchedule:
    """Discrete DDPM schedule: ``alphas_cumprod[t]`` for t = 0 (clean) .. T-1 (noise)."""

    alphas_cumprod: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


@runtime_checkable
class Backbone(Protocol):
    """What the erasure methods use. All predictions are epsilon, whatever the model's native target."""

    schedule: NoiseSchedule
    #: True for pixel-space models whose denoised estimate may be clamped to [-1, 1]
    clip_denoised: bool

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]: ...

    def encode_text(self, prompts: list[str]) -> TextConditioning: ...

    def tokenize(self, prompt: str) -> list[int]: ...

    def token_positions(self, prompt: str, word: str) -> list[int]: ...

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning) -> torch.Tensor: ...

    def cross_attention_kv(self) -> dict[str, nn.Linear]: ...

    def unet(self) -> nn.Module: ...

    def capture_attention(self, sink, resolution: int | None = None):
        """Context manager within which every cross-attention layer calls ``sink(name, probs, (h, w))`` with
        probabilities ``[B, heads, h*w, L]`` (carrying gradient when grad mode is on)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    # Optional (not part of the protocol, so that adapters without it still satisfy it):
    # ``gradient_checkpointing(enabled: bool)``, a context manager within which the UNet's forwards *with grad
    # enabled* recompute their blocks' activations during backward instead of keeping them, yielding whether
    # checkpointing is in effect, and leaving the model's own setting as it was on exit. Use it through
    # :func:`gradient_checkpointing`, which falls back to doing nothing.


@contextlib.contextmanager
def gradient_checkpointing(backbone: Backbone, enabled: bool) -> Iterator[bool]:
    """The backbone's ``gradient_checkpointing(enabled)`` if it has one, else nothing; yields whether checkpointing
    is in effect. Only forwards under grad are affected: no-grad forwards keep nothing for backward anyway."""
    fn = getattr(backbone, "gradient_checkpointing", None)
    if fn is None:
        yield False
        return
    with fn(enabled) as on:
        yield bool(on)
