"""ComfyUI's text encoder with learned token embeddings in a prompt, differentiable: what concept inversion needs
(the Audit Erasure node) and what adversarial erasure needs inside training (Erase Concept (ANT) with
``adversarial``).

The learned token goes into the prompt as an embedding tensor in CLIP's token list (``comfy/sd1_clip.py``:
``SDClipModel.process_tokens`` splices tensors found among the token ids into the input embeddings, which is how
ComfyUI applies textual-inversion ``embedding:`` files), and gradients reach it through the text encoder only after
its weights are swapped for non-inference copies, because ComfyUI runs prompts in inference mode (as
``comfy_backbone.trainable`` does for the UNet).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..erasure.audit_text import check_template
from ..erasure.backbone import TextConditioning
from ..erasure.errors import BadInputError
from ..erasure.guards import model_lock
from .comfy_backbone import ComfyBackbone

#: the word that marks the slot while ComfyUI tokenizes a template (replaced by the learned embeddings)
PLACEHOLDER = "sks"


class ComfySlotEncoder:
    """``erasure.audit_text.SlotEncoder`` on ComfyUI's CLIP: the slot's token entries become embedding tensors,
    one ``[n, D]`` set per text encoder of the token dict (SD1.x ``l``, SD2.x ``h``, SDXL ``l`` and ``g``)."""

    def __init__(self, backbone: ComfyBackbone) -> None:
        self.backbone = backbone
        self.clip = backbone.clip
        empty = self.clip.tokenize("")
        self.keys = list(empty)
        first = {k: empty[k][0] for k in self.keys}  # [start, end, pad, ...]
        self.end = {k: first[k][1][0] for k in self.keys}
        self.pad = {k: first[k][-1][0] for k in self.keys}
        self.special = {k: {t for t, *_ in first[k]} for k in self.keys}

    def _table(self, key: str) -> nn.Module:
        """The token-embedding layer of the text encoder behind ``key`` (``cond_stage_model.clip_<key>``)."""
        model = getattr(self.clip.cond_stage_model, f"clip_{key}", None)
        if model is None:
            raise BadInputError(f"this CLIP has no text encoder for its token key {key!r}: the audit supports the "
                                "CLIP of SD1.x, SD2.x and SDXL checkpoints")
        return model.transformer.get_input_embeddings()

    def _ids(self, key: str, text: str) -> list[int]:
        return [t for t, *_ in self.clip.tokenize(text)[key][0] if t not in self.special[key]]

    def widths(self) -> list[int]:
        return [int(self._table(k).weight.shape[1]) for k in self.keys]

    def scales(self) -> list[float]:
        return [float(self._table(k).weight.detach().float().std()) for k in self.keys]

    def word_vectors(self, word: str) -> list[torch.Tensor]:
        out = []
        for k in self.keys:
            w = self._table(k).weight.detach()
            out.append(w[torch.tensor(self._ids(k, word), dtype=torch.long, device=w.device)].float().clone())
        return out

    def vocabulary_vectors(self, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        tables = [self._table(k).weight.detach() for k in self.keys]
        size = min(int(w.shape[0]) for w in tables)
        special = set().union(*self.special.values())
        allowed = torch.tensor([i for i in range(size) if i not in special])
        ids = allowed[torch.randint(len(allowed), (n,), generator=generator)]
        return [w[ids.to(w.device)].float().clone() for w in tables]

    def tokens(self, template: str, vectors: list[torch.Tensor]) -> dict[str, list]:
        """ComfyUI's token dict for ``template`` with the learned vectors as embedding entries in its slot (one
        77-token section per key, the same length as the ordinary prompt's)."""
        pre, post = check_template(template)
        text = " ".join(x for x in (pre, PLACEHOLDER, post) if x)
        toks = self.clip.tokenize(text)
        out: dict[str, list] = {}
        for k, vec in zip(self.keys, vectors, strict=True):
            if len(toks[k]) > 1:
                raise BadInputError(f"the prompt {text[:60]!r} is longer than the text encoder's 75 tokens: "
                                    "shorten it")
            section = [tuple(e[:2]) for e in toks[k][0]]
            ids = [t for t, _ in section]
            ph = self._ids(k, PLACEHOLDER)
            at = next((i for i in range(len(ids)) if ids[i : i + len(ph)] == ph), None)
            if at is None:  # the text encoder's context cut the placeholder off
                raise BadInputError(f"the prompt {text[:60]!r} is longer than the text encoder's 75 tokens: "
                                    "shorten it")
            new = section[:at] + [(vec[j], 1.0) for j in range(vec.shape[0])] + section[at + len(ph) :]
            trailing = 0  # removable padding at the end (the end token itself is kept)
            while trailing < len(new) and isinstance(new[-1 - trailing][0], int) and \
                    new[-1 - trailing][0] == self.pad[k]:
                trailing += 1
            if self.pad[k] == self.end[k]:
                trailing -= 1
            excess = len(new) - len(section)
            if excess > trailing:
                raise BadInputError(f"the prompt {text[:60]!r} with {vec.shape[0]} learned tokens is longer than the "
                                    "text encoder's 75 tokens: shorten it or use fewer learned tokens")
            new = new[: len(new) - excess] if excess > 0 else new + [(self.pad[k], 1.0)] * -excess
            out[k] = [new]
        return out

    def encode(self, templates: list[str], vectors: list[torch.Tensor]) -> TextConditioning:
        """As ``ComfyBackbone._encode`` does for ordinary prompts: SD1.x/SD2.x prompts as the sections of one
        batch, SDXL one by one with the pooled output and its size vector."""
        bb = self.backbone
        rows = [self.tokens(t, vectors) for t in templates]
        extras: dict[str, torch.Tensor] = {}
        if bb.family == "SDXL":
            embeds, ys = [], []
            r = bb.default_resolution
            for tokens in rows:
                cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
                embeds.append(cond)
                ys.append(bb.patcher.model.encode_adm(pooled_output=pooled, width=r, height=r, target_width=r,
                                                      target_height=r, crop_w=0, crop_h=0))
            e = torch.cat(embeds)
            extras["y"] = torch.cat(ys).to(bb.device, bb.dtype)
        else:
            cond = self.clip.encode_from_tokens({k: [row[k][0] for row in rows] for k in self.keys})
            e = cond.reshape(len(rows), -1, cond.shape[-1])
        return TextConditioning(e.to(bb.device, bb.dtype), extras)


def _out_of_place(layer: nn.Module):
    """ComfyUI's ``CLIPLayer.forward`` with out-of-place residual additions: its ``x += ...`` overwrites the input
    that the layer norm keeps for backward, so gradients cannot pass through the original (same numbers)."""

    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))

    return forward


@contextlib.contextmanager
def clip_trainable(clip) -> Iterator[None]:
    """Gradients through ComfyUI's text encoder inside a prompt: grad on, inference mode off, every CLIP weight
    swapped for a non-inference copy (requires_grad False) and every transformer layer given an out-of-place forward
    (an instance attribute) for the duration; the original Parameter objects and forwards are put back on exit, even
    on error or Cancel."""
    from comfy.clip_model import CLIPLayer

    clip.load_model()
    module = clip.cond_stage_model
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    layers: list[tuple[nn.Module, object]] = []
    with model_lock(module), torch.inference_mode(False), torch.enable_grad():
        try:
            for mod in module.modules():
                for name, p in list(mod._parameters.items()):
                    if p is not None:
                        swapped.append((mod, name, p))
                        mod._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
                if type(mod) is CLIPLayer:
                    layers.append((mod, mod.__dict__.get("forward")))
                    mod.forward = _out_of_place(mod)
            yield
        finally:
            for mod, name, p in swapped:
                mod._parameters[name] = p
            for mod, fwd in layers:
                if fwd is None:
                    mod.__dict__.pop("forward", None)
                else:
                    mod.forward = fwd
