"""The Audit Erasure node: does the erased concept come back under concept inversion or a prefix attack?

Thin, like the pack's other nodes: check the inputs, run ``erasure.audit.run_audit`` on the two MODELs, return a
labelled grid and the scores. The learned token on ComfyUI's CLIP, differentiable, is ``comfy_text``'s.
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
from ..erasure.audit_text import fill
from ..erasure.errors import BadInputError
from ..erasure.prompts import CONCEPT_TEMPLATES
from .comfy_backbone import ComfyBackbone, trainable
from .comfy_text import ComfySlotEncoder, clip_trainable
from .erasure_nodes import CATEGORY, check_message, node_progress
from .settings_nodes import resolution_input, resolution_value


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
