"""The erasure-weights object: what every method returns, and its LoRA files.

An :class:`ErasureWeights` holds per-module weight deltas keyed by the module's name in the diffusers UNet
(``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``): dense deltas ``dW`` or low-rank factors
``(up, down)`` with ``dW = up @ down``. It never writes into a model permanently: :meth:`applied` patches a
backbone's weights for the duration of a ``with`` block and puts the original tensors back (bit-identical).

Files are safetensors in kohya's LoRA key format (``lora_unet_<module_path_with_underscores>.lora_down.weight``,
``.lora_up.weight``, ``.alpha``), which ComfyUI's LoraLoader, A1111/Forge and diffusers' ``load_lora_weights`` all
read. A dense delta is written *exactly* as the identity factorisation (``up = I, down = dW`` or ``up = dW,
down = I``, whichever has the smaller rank): ``I @ dW`` reproduces ``dW`` bit for bit. ``rank=r`` writes a truncated
SVD instead and reports the relative error. Metadata carries the method, concepts, settings, base-model hash and the
library version; when read back it is treated as untrusted text.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .files import atomic_save, read_safetensors
from .validation import check_lora_tensors

KOHYA_PREFIX = "lora_unet_"
META_PREFIX = "erasure."


def kohya_name(module: str) -> str:
    return KOHYA_PREFIX + module.replace(".", "_")


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
    def rank(self) -> int | None:
        return None if self.up is None else int(self.up.shape[1])


@dataclass
class ErasureWeights:
    deltas: dict[str, Delta] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def dense(cls, deltas: dict[str, torch.Tensor], **metadata: object) -> ErasureWeights:
        return cls({k: Delta(dense=v.detach().float().cpu()) for k, v in deltas.items()}, _meta(metadata))

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

    # -- LoRA export ----------------------------------------------------------------------------------------------
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

    def to_lora(self, rank: int | None = None) -> tuple[dict[str, torch.Tensor], float]:
        """Kohya-keyed LoRA tensors and the relative Frobenius error of the factorisation (0.0 when exact)."""
        tensors: dict[str, torch.Tensor] = {}
        err_num, err_den = 0.0, 0.0
        for name in self.modules():
            d = self.deltas[name]
            full = d.matrix().float()
            dw = full.flatten(1)  # a convolution's delta as [out, in * kh * kw]
            if d.up is not None and (rank is None or d.rank <= rank):
                up, down = d.up.float().flatten(1) * d.scale, d.down.float().flatten(1)
            elif rank is None:
                out_f, in_f = dw.shape
                if out_f <= in_f:
                    up, down = torch.eye(out_f), dw.clone()
                else:
                    up, down = dw.clone(), torch.eye(in_f)
            else:
                u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
                r = min(rank, s.shape[0])
                root = s[:r].sqrt()
                up, down = (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()
            err_num += float(((up @ down) - dw).pow(2).sum())
            err_den += float(dw.pow(2).sum())
            key = kohya_name(name)
            if full.dim() == 4:
                up, down = up[:, :, None, None], down.reshape(down.shape[0], *full.shape[1:])
            tensors[f"{key}.lora_up.weight"] = up.contiguous()
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(up.shape[1]))
        return tensors, (err_num / err_den) ** 0.5 if err_den > 0 else 0.0

    def save(self, path: str | Path, rank: int | None = None) -> float:
        """Write a kohya LoRA safetensors file atomically. Returns the relative error of the factorisation."""
        tensors, err = self.to_lora(rank)
        meta = dict(self.metadata)
        meta[META_PREFIX + "modules"] = json.dumps(self.modules())
        meta[META_PREFIX + "version"] = __version__
        meta[META_PREFIX + "lora_relative_error"] = f"{err:.3e}"
        meta["ss_network_module"] = "networks.lora"
        atomic_save(tensors, Path(path), meta)
        return err

    @classmethod
    def load(cls, path: str | Path) -> ErasureWeights:
        """Read a kohya-format LoRA (ours or anyone's) back as LoRA deltas. Only safetensors are read."""
        path = Path(path)
        tensors, meta = read_safetensors(path)
        check_lora_tensors(tensors, path.name)
        keys = list(tensors)
        names: dict[str, str] = {}
        try:
            listed = json.loads(meta.get(META_PREFIX + "modules", "[]"))
            if isinstance(listed, list):
                names = {kohya_name(str(m)): str(m) for m in listed}
        except (json.JSONDecodeError, TypeError):
            names = {}
        deltas: dict[str, Delta] = {}
        for k in keys:
            if not k.endswith(".lora_down.weight"):
                continue
            base = k[: -len(".lora_down.weight")]
            up, down = tensors.get(base + ".lora_up.weight"), tensors[k]
            alpha = tensors.get(base + ".alpha")
            r = down.shape[0]
            scale = float(alpha) / r if alpha is not None else 1.0
            deltas[names.get(base, base)] = Delta(up=up, down=down, scale=scale)
        return cls(deltas, meta)

    def resolve_names(self, unet: nn.Module) -> ErasureWeights:
        """Map kohya names that could not be resolved from metadata onto ``unet``'s module names."""
        by_kohya = {kohya_name(n): n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        deltas = {}
        for k, d in self.deltas.items():
            if k.startswith(KOHYA_PREFIX):
                if k not in by_kohya:
                    raise KeyError(f"LoRA key {k} matches no layer of this model: the LoRA was made for another "
                                   "base model")
                k = by_kohya[k]
            deltas[k] = d
        return ErasureWeights(deltas, self.metadata)


def _meta(values: dict[str, object]) -> dict[str, str]:
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
