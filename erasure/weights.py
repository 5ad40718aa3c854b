"""The erasure-weights object: what every method returns.

An :class:`ErasureWeights` holds per-module weight deltas keyed by the module's name in the model
(``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``): dense deltas ``dW`` or low-rank factors
``(up, down)`` with ``dW = up @ down * scale``, and metadata (method, concepts, settings, base model). It never writes
into a model permanently: :meth:`ErasureWeights.applied` patches a module's weights for the duration of a ``with``
block and puts the original tensors back (bit-identical). Files: ``lora_files.py``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn

#: prefix of this library's metadata keys in LoRA files
META_PREFIX = "erasure."


@dataclass
class Delta:
    """A weight change of one Linear: dense ``dense`` or ``up @ down * scale``."""

    dense: torch.Tensor | None = None
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    scale: float = 1.0

    def matrix(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        assert self.up is not None and self.down is not None
        m = (self.up.float().flatten(1) @ self.down.float().flatten(1)) * self.scale
        # convolution LoRAs: down [r, in, kh, kw], up [out, r, 1, 1]
        return m.view(self.up.shape[0], *self.down.shape[1:]) if self.down.dim() == 4 else m

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the full delta, without forming it."""
        if self.dense is not None:
            return tuple(self.dense.shape)
        assert self.up is not None and self.down is not None
        return (int(self.up.shape[0]), *(int(n) for n in self.down.shape[1:]))

    def scaled(self, factor: float) -> Delta:
        """This delta times ``factor`` (a LoRA through its scale: its factors are not copied)."""
        return Delta(dense=self.dense * factor) if self.dense is not None else replace(self, scale=self.scale * factor)

    @property
    def rank(self) -> int | None:
        return None if self.up is None else int(self.up.shape[1])

    def right_multiplied(self, p: torch.Tensor) -> Delta:
        """``delta @ p`` for a Linear's delta (``p``: [in, in]); a LoRA keeps its rank (its down factor is
        multiplied)."""
        if self.dense is not None:
            return Delta(dense=self.dense.float() @ p.to(self.dense.device, torch.float32))
        assert self.down is not None and self.down.dim() == 2, "a Linear's delta"
        return replace(self, down=(self.down.float() @ p.to(self.down.device, torch.float32)).to(self.down.dtype))


@dataclass
class ErasureWeights:
    deltas: dict[str, Delta] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def dense(cls, deltas: dict[str, torch.Tensor], **values: object) -> ErasureWeights:
        return cls({k: Delta(dense=v.detach().float().cpu()) for k, v in deltas.items()}, metadata(values))

    def modules(self) -> list[str]:
        return sorted(self.deltas)

    @contextlib.contextmanager
    def applied(self, unet: nn.Module, strength: float = 1.0) -> Iterator[nn.Module]:
        """Temporarily add the deltas to ``unet``'s weights; the original tensors are restored on exit."""
        mods = dict(unet.named_modules())
        missing = [k for k in self.deltas if k not in mods]
        if missing:
            raise KeyError(f"these erasure weights do not fit this model (missing modules, e.g. {missing[0]}); "
                           "they were made for another base model")
        saved: dict[str, torch.Tensor] = {}
        try:
            for name, d in self.deltas.items():
                w = mods[name].weight
                dw = d.matrix().to(w.device, torch.float32)
                if dw.shape != w.shape:
                    raise ValueError(f"delta for {name} has shape {tuple(dw.shape)}, the model's weight "
                                     f"{tuple(w.shape)}: these erasure weights were made for another base model")
                saved[name] = w.data
                w.data = (w.data.float() + strength * dw).to(w.dtype)
            yield unet
        finally:
            for name, data in saved.items():
                mods[name].weight.data = data

    def scaled(self, factor: float) -> ErasureWeights:
        """Every delta multiplied by ``factor`` (LoRAs through their scale: factors are not copied)."""
        if factor == 1.0:
            return self
        return ErasureWeights({n: d.scaled(factor) for n, d in self.deltas.items()}, dict(self.metadata))

    def projected(self, p: torch.Tensor, names: Iterable[str]) -> ErasureWeights:
        """The layers ``names`` (K/V of the cross-attention) multiplied by ``p`` on the right; the others as they
        are."""
        names = set(names)
        return ErasureWeights({n: d.right_multiplied(p) if n in names else d for n, d in self.deltas.items()},
                              dict(self.metadata))

    def renamed(self, names: dict[str, str]) -> ErasureWeights:
        """The same deltas with layers renamed through ``names`` (others keep theirs)."""
        return ErasureWeights({names.get(k, k): d for k, d in self.deltas.items()}, dict(self.metadata))

    def export_rank(self, exact_limit_bytes: int = 256 * 2**20, fallback: int = 64) -> int | None:
        """The rank for a shareable file: ``None`` (exact) while the exact file stays under ``exact_limit_bytes``
        (dense deltas are stored as identity factorisations), else ``fallback`` (truncated SVD, error reported)."""
        size = 0
        for d in self.deltas.values():
            if d.up is not None:
                size += 4 * (d.up.numel() + d.down.numel())
            else:
                out_f, in_f = d.dense.shape[0], d.dense[0].numel()
                size += 4 * (d.dense.numel() + min(out_f, in_f) ** 2)
        return None if size < exact_limit_bytes else fallback


def layer_group(name: str) -> str:
    """A layer's group for ``relative_change``: its part of the UNet and its kind (``down.to_k``, ``up.conv1``)."""
    parts = name.split(".")
    where = {"down_blocks": "down", "input_blocks": "down", "mid_block": "mid", "middle_block": "mid",
             "up_blocks": "up", "output_blocks": "up"}.get(parts[0], "other")
    return f"{where}.{parts[-1] if not parts[-1].isdigit() else parts[-2]}"


def relative_change(weights: ErasureWeights, modules: dict[str, nn.Module]) -> dict[str, float]:
    """``||dW|| / ||W||`` per layer group and over all edited layers (``"all"``), Frobenius norms: how much of the
    model an edit changes, a number that means the same on any model (the summary, the LoRA's metadata)."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for name, d in weights.deltas.items():
        dw2 = float(d.matrix().double().pow(2).sum())
        w2 = float(modules[name].weight.detach().double().pow(2).sum())
        for g in (layer_group(name), "all"):
            num[g] = num.get(g, 0.0) + dw2
            den[g] = den.get(g, 0.0) + w2
    return {g: round((num[g] / den[g]) ** 0.5, 6) if den[g] > 0 else 0.0 for g in sorted(num)}


def change_text(change: dict[str, float], show: int = 3) -> str:
    """One line for ``relative_change``: the whole edit and its ``show`` largest layer groups."""
    groups = sorted(((v, g) for g, v in change.items() if g != "all"), reverse=True)[:show]
    parts = ", ".join(f"{g} {v:.3g}" for v, g in groups)
    text = f"weights changed by ||dW|| / ||W|| = {change.get('all', 0.0):.3g}"
    return text + (f" (largest: {parts})" if parts else "")


def metadata(values: dict[str, object]) -> dict[str, str]:
    """Settings and facts as safetensors metadata: ``erasure.<key>`` -> the text, or its JSON."""
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
