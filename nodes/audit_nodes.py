"""The Audit Erasure node: does the erased concept come back under concept inversion or a prefix attack?

Thin, like the pack's other nodes: check the inputs, run ``erasure.audit.run_audit`` on the two MODELs, return a
labelled grid and the scores. Two pieces are ComfyUI's own: the learned token goes into the prompt as an embedding
tensor in CLIP's token list (``comfy/sd1_clip.py``: ``SDClipModel.process_tokens`` splices tensors found among the
token ids into the input embeddings, which is how ComfyUI applies textual-inversion ``embedding:`` files), and
gradients reach it through the text encoder only after its weights are swapped for non-inference copies, because
ComfyUI runs prompts in inference mode (as ``comfy_backbone.trainable`` does for the UNet).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import numpy as np
import torch
from comfy_api.latest import io
from torch import nn

from ..erasure import validation
from ..erasure.audit import (
    AuditSettings,
    audit_units,
    general_audit_prompts,
    grid_image,
    run_audit,
    summary,
)
from ..erasure.audit_text import check_template, fill
from ..erasure.backbone import TextConditioning
from ..erasure.errors import BadInputError
from ..erasure.guards import model_lock
from ..erasure.prompts import CONCEPT_TEMPLATES
from .comfy_backbone import ComfyBackbone, trainable
from .erasure_nodes import CATEGORY, check_message, node_progress
from .settings_nodes import resolution_input, resolution_value

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


class ComfyAuditModels:
    """``erasure.audit.AuditModels`` on two MODELs sharing one CLIP: each is loaded (ComfyUI patches the shared UNet
    for it) when its turn comes; ``train`` makes UNet and text encoder differentiable for the duration."""

    def __init__(self, original, erased, clip, resolution: int | None) -> None:
        self.original_bb = ComfyBackbone(original, clip, resolution)
        self.erased_bb = ComfyBackbone(erased, clip, resolution)
        self.clip = clip

    def unet(self) -> nn.Module:
        return self.original_bb.unet()

    @contextlib.contextmanager
    def _use(self, bb: ComfyBackbone, train: bool) -> Iterator[ComfyBackbone]:
        bb.load()
        if not train:
            yield bb
            return
        with trainable(bb), clip_trainable(self.clip):
            yield bb

    def original(self, train: bool) -> contextlib.AbstractContextManager[ComfyBackbone]:
        return self._use(self.original_bb, train)

    def erased(self, train: bool) -> contextlib.AbstractContextManager[ComfyBackbone]:
        return self._use(self.erased_bb, train)


def _concept_latents(images: torch.Tensor, vae, model, resolution: int) -> torch.Tensor:
    """An IMAGE batch as the UNet's clean latents: centre-cropped and resized to ``resolution``, VAE-encoded as VAE
    Encode does, then in the model's latent space."""
    import comfy.utils

    if images.dim() != 4 or images.shape[-1] < 3:
        raise BadInputError(f"the images have shape {tuple(images.shape)}: expected an IMAGE batch [B, H, W, 3]")
    if images.shape[0] < 2:
        raise BadInputError("the audit needs at least 2 images of the concept (a quarter are held out to score the "
                            "attacks): connect a batch of 2 or more, or none to generate them")
    x = comfy.utils.common_upscale(images[..., :3].movedim(-1, 1), resolution, resolution, "bilinear", "center")
    return model.model.latent_format.process_in(vae.encode(x.movedim(1, -1)).float())


class AuditErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = AuditSettings()
        return io.Schema(
            node_id="AuditErasure", display_name="Audit Erasure", category=CATEGORY,
            description="Does the erased concept come back? Learns a token for the concept against the erased model "
                        "(concept inversion) and a soft prompt prefix (prefix attack), samples with them, and scores "
                        "how much of the concept they recover on held-out images (docs/audit.md).",
            inputs=[
                io.Model.Input("original", tooltip="The model before erasure (left unchanged)."),
                io.Model.Input("erased", tooltip="The model after erasure (left unchanged)."),
                io.Clip.Input("clip", tooltip="The text encoder (CLIP)."),
                io.Vae.Input("vae", tooltip="The VAE: decodes the grid and encodes the images input."),
                io.String.Input("concept", default="", tooltip="The erased concept, e.g. 'nudity'."),
                io.Int.Input("attack_steps", default=d.steps, min=1, max=10000,
                             tooltip="Concept-inversion steps (the learned token)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the attacks and of the generated concept images."),
                io.Image.Input("images", optional=True,
                               tooltip="Optional: your own images of the concept (2 or more; a quarter are held out "
                                       "for the score). Not connected: the original model generates them."),
                io.Combo.Input("kind", options=sorted(CONCEPT_TEMPLATES), default="object", optional=True,
                               tooltip="The concept's prompt templates."),
                io.Int.Input("prefix_steps", default=d.prefix_steps, min=1, max=1000, optional=True,
                             tooltip="Prefix-attack iterations on one image."),
                io.Int.Input("seeds", default=d.seeds, min=1, max=8, optional=True,
                             tooltip="Grid columns: one seed each."),
                io.Int.Input("steps", default=d.sample_steps, min=1, max=150, optional=True,
                             tooltip="DDIM steps of every sampling."),
                io.Float.Input("cfg", default=d.guidance, min=0.0, max=30.0, step=0.5, optional=True,
                               tooltip="Guidance scale of every sampling."),
                resolution_input("Image size of the generated and attacked images: the model's native one, or "
                                 "pixels.", optional=True),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="Rows: plain prompt on the original model, on "
                                     "the erased model; learned token on the erased model; prefix + prompt on the "
                                     "erased model. One column per seed."),
                     io.String.Output(display_name="STRING", tooltip="The scores (text, then the JSON report).")],
        )

    @classmethod
    def validate_inputs(cls, concept: str | None = None, resolution: str | int | None = None) -> bool | str:
        def check() -> None:
            if concept is not None:
                validation.check_concept(concept)
            resolution_value(resolution)

        return check_message(check)

    @classmethod
    def execute(cls, original, erased, clip, vae, concept, attack_steps, seed, images=None, kind="object",
                prefix_steps=None, seeds=None, steps=None, cfg=None, resolution="native") -> io.NodeOutput:
        resolution = resolution_value(resolution)  # also the 0 (native) of workflows saved with an Int widget
        concept = validation.check_concept(concept)
        s = AuditSettings().override(steps=attack_steps, seed=seed, prefix_steps=prefix_steps, seeds=seeds,
                                     sample_steps=steps, guidance=cfg, resolution=resolution)
        s.validate()
        prompts = general_audit_prompts(concept, kind)
        models = ComfyAuditModels(original, erased, clip, resolution)
        bb = models.original_bb
        validation.check_fits_context(bb, concept, [*prompts.generation, *(fill(t, concept)
                                                                           for t in prompts.eval_templates)])
        latents = None
        if images is not None:
            latents = _concept_latents(images, vae, original, bb.default_resolution)
        progress = node_progress(audit_units(s, prompts, latents is not None, False))
        latent_format = original.model.latent_format

        def decode(x: torch.Tensor) -> torch.Tensor:
            pictures = vae.decode(latent_format.process_out(x.float())).float().cpu()  # [N, H, W, 3] in [0, 1]
            return pictures[..., :3].movedim(-1, 1) * 2 - 1

        result = run_audit(models, ComfySlotEncoder(bb), concept, prompts, s, images=latents, decode=decode,
                           progress=progress)
        grid = np.asarray(grid_image(result.rows), dtype=np.float32) / 255.0
        text = summary(result.report) + "\n\n" + json.dumps(result.report)
        return io.NodeOutput(torch.from_numpy(grid)[None], text)


NODES: list[type[io.ComfyNode]] = [AuditErasure]
