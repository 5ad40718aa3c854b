"""Capturing cross-attention probabilities during a diffusers UNet forward pass.

MACE needs the cross-attention maps of the concept's tokens twice: without gradient, to derive masks from the
model's own attention during generation (instead of GroundingDINO + SAM), and with gradient, as the attention loss of
its LoRA stage. ``capture_cross_attention`` swaps every ``attn2`` processor for one that computes the attention
probabilities explicitly (the same maths as diffusers' ``AttnProcessor``) and hands them to a sink, then restores the
original processors. The K/V projections are still called as modules, so trainable delta hooks see them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

#: sink(layer_name, probs [B, heads, HW, L], (height, width))
Sink = Callable[[str, torch.Tensor, tuple[int, int]], None]


class CapturingProcessor:
    def __init__(self, name: str, sink: Sink, latent_hw: tuple[int, int]) -> None:
        self.name = name
        self.sink = sink
        self.latent_hw = latent_hw

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs
                 ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)
        hw = probs.shape[1]
        lh, lw = self.latent_hw
        f = (lh * lw / hw) ** 0.5
        self.sink(self.name, probs.view(batch, attn.heads, hw, probs.shape[-1]), (round(lh / f), round(lw / f)))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in unet.named_modules() if n.endswith("attn2") and hasattr(m, "set_processor")}


@contextlib.contextmanager
def capture_cross_attention(unet: nn.Module, sink: Sink, latent_hw: tuple[int, int]) -> Iterator[None]:
    """Within the block every cross-attention layer reports its probabilities to ``sink``."""
    mods = cross_attention_modules(unet)
    if not mods:
        raise ValueError("this UNet has no cross-attention layers (attn2)")
    saved = {n: m.processor for n, m in mods.items()}
    try:
        for n, m in mods.items():
            m.set_processor(CapturingProcessor(n, sink, latent_hw))
        yield
    finally:
        for n, m in mods.items():
            m.set_processor(saved[n])
