"""Learned tokens without touching the tokenizer: prompt templates whose slot ``{}`` receives trainable embeddings.

Concept inversion and prefix attacks need a "word" the model has never seen. Adding a token to the tokenizer would
resize the text encoder's embedding table of a shared model; instead a template such as ``"a photo of a {}"`` is
tokenized around its slot, the slot gets ``n`` placeholder ids, and while the text encoder runs, a forward hook on its
token-embedding layer replaces those rows by the trainable vectors. Everything after that layer (position embeddings,
the causal transformer, the pooled output, SDXL's second encoder) runs exactly as for an ordinary prompt, so the
conditioning differs from an ordinary prompt's only through the slot's input embeddings.

:class:`SlotEncoder` is what the audit (``erasure/audit.py``) uses; :class:`DiffusersSlotEncoder` implements it for
:class:`~erasure.diffusers_backbone.DiffusersBackbone` (SD1.x, SD2.x, SDXL, the lab). The ComfyUI pack implements it
for ComfyUI's CLIP with its native embedding entries in the token list (``nodes/audit_nodes.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .backbone import TextConditioning
from .errors import BadInputError

#: where a template's learned vectors go
SLOT = "{}"


def fill(template: str, text: str) -> str:
    """``template`` with ``text`` in its slot, spaces collapsed (the ordinary prompt the slot stands for)."""
    return " ".join(template.replace(SLOT, text).split())


def check_template(template: str) -> tuple[str, str]:
    """The text before and after the one slot of ``template``."""
    if template.count(SLOT) != 1:
        raise BadInputError(f"the prompt template {template!r} must contain {SLOT} exactly once (where the learned "
                             "token goes)")
    pre, post = template.split(SLOT)
    return pre.strip(), post.strip()


@runtime_checkable
class SlotEncoder(Protocol):
    """Text encoding with trainable input embeddings in a template's slot; one vector set per text encoder."""

    def widths(self) -> list[int]:
        """Input-embedding width of each text encoder (SDXL: two)."""
        ...

    def scales(self) -> list[float]:
        """Standard deviation of each encoder's token-embedding table: the unit of the attacks' step sizes, so one
        learning rate fits the lab's large embeddings and CLIP's small ones alike."""
        ...

    def word_vectors(self, word: str) -> list[torch.Tensor]:
        """The input embeddings ``[n, D]`` of ``word``'s tokens in each encoder (detached copies)."""
        ...

    def vocabulary_vectors(self, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        """``n`` input embeddings of random vocabulary tokens (the same token ids in every encoder)."""
        ...

    def encode(self, templates: list[str], vectors: list[torch.Tensor]) -> TextConditioning:
        """One conditioning row per template, the slot filled by ``vectors`` (``[n, D]`` per encoder), with
        gradients flowing to them."""
        ...


def init_vectors(encoder: SlotEncoder, n: int, word: str, generator: torch.Generator) -> list[torch.Tensor]:
    """Starting vectors: ``n`` copies of the mean embedding of ``word``'s tokens, or ``n`` random vocabulary
    embeddings when ``word`` is empty."""
    if not word.strip():
        return encoder.vocabulary_vectors(n, generator)
    out = []
    for v in encoder.word_vectors(word):
        if v.shape[0] == 0:
            raise BadInputError(f"the starting word {word!r} has no tokens: give a plain word such as 'object'")
        out.append(v.float().mean(0, keepdim=True).repeat(n, 1))
    return out


class DiffusersSlotEncoder:
    """:class:`SlotEncoder` on a :class:`~erasure.diffusers_backbone.DiffusersBackbone` (its ``text_encoders``,
    ``tokenizers`` and ``hidden_layer``), producing what its ``encode_text`` produces for an ordinary prompt."""

    def __init__(self, backbone) -> None:
        self.backbone = backbone

    def _tables(self) -> list[nn.Embedding]:
        return [enc.get_input_embeddings() for enc in self.backbone.text_encoders]

    def widths(self) -> list[int]:
        return [int(e.weight.shape[1]) for e in self._tables()]

    def scales(self) -> list[float]:
        return [float(e.weight.detach().float().std()) for e in self._tables()]

    def word_vectors(self, word: str) -> list[torch.Tensor]:
        out = []
        for tok, table in zip(self.backbone.tokenizers, self._tables(), strict=True):
            ids = tok(word, add_special_tokens=False).input_ids
            out.append(table.weight.detach()[torch.tensor(ids, dtype=torch.long, device=table.weight.device)]
                       .float().clone())
        return out

    def vocabulary_vectors(self, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        tables = self._tables()
        size = min(int(t.weight.shape[0]) for t in tables)
        special = {i for tok in self.backbone.tokenizers
                   for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)}
        allowed = torch.tensor([i for i in range(size) if i not in special])
        ids = allowed[torch.randint(len(allowed), (n,), generator=generator)]
        return [t.weight.detach()[ids.to(t.weight.device)].float().clone() for t in tables]

    def token_ids(self, tok, template: str, n: int) -> tuple[list[int], list[int]]:
        """The padded ids of ``template`` with ``n`` placeholder ids in its slot, and the slot's positions. The
        placeholder is the start token (its embedding is replaced; it is never the end token, which CLIP's pooled
        output looks for)."""
        pre, post = check_template(template)
        a = tok(pre, add_special_tokens=False).input_ids if pre else []
        b = tok(post, add_special_tokens=False).input_ids if post else []
        ids = [tok.bos_token_id, *a, *[tok.bos_token_id] * n, *b, tok.eos_token_id]
        length = int(tok.model_max_length)
        if len(ids) > length:
            raise BadInputError(f"the prompt {fill(template, '<learned>')!r} with {n} learned tokens is "
                                 f"{len(ids)} tokens long, more than the text encoder reads ({length}): shorten it "
                                 "or use fewer learned tokens")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return ids + [pad] * (length - len(ids)), list(range(1 + len(a), 1 + len(a) + n))

    def encode(self, templates: list[str], vectors: list[torch.Tensor]) -> TextConditioning:
        bb = self.backbone
        embeds, pooled = [], None
        for enc, tok, vec in zip(bb.text_encoders, bb.tokenizers, vectors, strict=True):
            rows = [self.token_ids(tok, t, int(vec.shape[0])) for t in templates]
            ids = torch.tensor([r[0] for r in rows], dtype=torch.long, device=bb.device)
            with slot_embeddings(enc.get_input_embeddings(), [r[1] for r in rows], vec):
                out = enc(ids, output_hidden_states=bb.hidden_layer != -1)
            embeds.append(out.last_hidden_state if bb.hidden_layer == -1 else out.hidden_states[bb.hidden_layer])
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        extras: dict[str, torch.Tensor] = {}
        if bb.is_sdxl:  # as DiffusersBackbone.encode_text: the pooled embedding and the size ids
            res = bb.latent_shape()[1] * bb.vae_scale
            extras["text_embeds"] = pooled
            extras["time_ids"] = torch.tensor([[res, res, 0, 0, res, res]], dtype=pooled.dtype,
                                              device=pooled.device).expand(len(templates), 6)
        return TextConditioning(torch.cat(embeds, dim=-1).to(bb.dtype), extras)


@contextlib.contextmanager
def slot_embeddings(table: nn.Module, positions: list[list[int]], vectors: torch.Tensor) -> Iterator[None]:
    """For the duration, ``table``'s output rows at ``positions[b]`` of batch row ``b`` are ``vectors`` (out of
    place, so gradients reach ``vectors``); the hook is removed on exit."""
    rows = torch.tensor([b for b, pos in enumerate(positions) for _ in pos], dtype=torch.long)
    cols = torch.tensor([p for pos in positions for p in pos], dtype=torch.long)
    if any(len(pos) != vectors.shape[0] for pos in positions):
        raise ValueError("every template's slot must have as many positions as there are vectors")

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        values = vectors.to(output.device, output.dtype).repeat(len(positions), 1)
        return output.index_put((rows.to(output.device), cols.to(output.device)), values)

    handle = table.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
