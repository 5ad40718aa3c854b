"""The erase nodes as they were first published, with every setting as a widget: kept (deprecated, hidden from the
node search) so that workflows saved with them still load and run with the same widget values. New workflows use
"Erase Concept (ANT)" and "Mass Erase (MACE)", whose advanced settings come from the ANT / MACE Settings nodes."""

from __future__ import annotations

from comfy_api.latest import io

from ..erasure import validation
from ..erasure.ant import CHECKPOINTING, PREDICTIONS, SAMPLINGS, SCOPES, AntSettings
from ..erasure.mace import PRESETS
from .erasure_nodes import CATEGORY, LoraModel, cache_input, check_message, run_ant, run_mace, user_image_inputs


class LegacyEraseConceptANT(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = AntSettings()
        return io.Schema(
            node_id="EraseConceptANT", display_name="Erase Concept (ANT, legacy)", category=CATEGORY,
            is_deprecated=True,
            description="Erase one concept by reversing classifier-free guidance in the mid-to-late denoising steps "
                        "(ANT), training the cross-attention keys and values (or only the most salient weights: "
                        "scope saliency).",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x / SD2.x / SDXL model to erase from (left unchanged)."),
                io.Clip.Input("clip", tooltip="The model's text encoder (CLIP)."),
                io.String.Input("concept", default="", tooltip="The word or phrase to erase, e.g. 'nudity'."),
                io.String.Input("synonyms", default="", multiline=True,
                                tooltip="Other words for the concept, ';' or one per line: used as prompt "
                                        "augmentations for the saliency mask and the trajectories."),
                io.Int.Input("steps", default=d.steps, min=1, max=10000, tooltip="Training steps."),
                io.Float.Input("learning_rate", default=d.lr, min=1e-5, max=0.5, step=1e-4,
                               tooltip="Adam's step relative to each layer's weight scale: 0.02 moves a weight by "
                                       "about 2% of its layer's RMS per step, on any model."),
                io.Combo.Input("scope", options=list(SCOPES), default=d.scope,
                               tooltip="kv: the cross-attention keys and values (what reads the prompt; the "
                                       "default); xattn: every cross-attention projection; saliency: only the "
                                       "most salient weights of the UNet (the paper's); non-xattn: everything "
                                       "but cross-attention; lora: a K/V LoRA."),
                io.Float.Input("saliency_fraction", default=d.saliency_fraction, min=0.001, max=1.0, step=0.01,
                               tooltip="Fraction of weights each saliency map keeps before the maps are "
                                       "intersected."),
                io.Float.Input("preserve", default=d.preserve, min=0.0, max=100.0, step=0.5,
                               tooltip="Weight that keeps prompts without the concept unchanged (0 = the paper's "
                                       "loss)."),
                io.Combo.Input("prediction", options=list(PREDICTIONS), default=d.prediction,
                               tooltip="Which prediction of the edited model is trained: guided or conditional."),
                io.Int.Input("resolution", default=0, min=0, max=2048, step=8,
                             tooltip="Training resolution in pixels; 0 = the model's native one."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of trajectories and sampling."),
                io.Int.Input("trajectories", default=d.trajectories, min=1, max=256,
                             tooltip="Seeds x prompt augmentations of the trajectories (and of the saliency maps)."),
                io.Int.Input("trajectory_steps", default=d.trajectory_steps, min=3, max=200,
                             tooltip="DDIM steps of each trajectory."),
                io.Int.Input("early_steps", default=d.early_steps, min=1, max=199,
                             tooltip="The first steps, where the guidance direction is kept (structure)."),
                io.Int.Input("refresh_every", default=d.refresh_every, min=0, max=10000,
                             tooltip="cached sampling only: regenerate the trajectories with the edited model "
                                     "every N steps (0 = never)."),
                io.Int.Input("saliency_maps", default=d.saliency_maps, min=1, max=64,
                             tooltip="Saliency maps (prompt augmentation x seed) intersected."),
                cache_input(),
                io.Combo.Input("sampling", options=list(SAMPLINGS), default=d.sampling, optional=True,
                               tooltip="on-policy: each step follows the edited model's own denoising trajectory; "
                                       "cached: trajectories of the original model made once and reused (cheaper, "
                                       "but it erases far less)."),
                # the last two are newer: kept at the end so that saved workflows keep their widget values in place
                io.Int.Input("reuse", default=d.reuse, min=1, max=64, optional=True,
                             tooltip="on-policy only: each regenerated trajectory serves this many training steps "
                                     "(1 = the reference's loop, a new trajectory every step). The default 8 needs "
                                     "0.56x the UNet evaluations of 1."),
                io.Combo.Input("gradient_checkpointing", options=list(CHECKPOINTING),
                               default=d.gradient_checkpointing, optional=True,
                               tooltip="Recompute activations during backward instead of keeping them: less memory "
                                       "(SDXL at 1024 px), ~10% more time. auto: on for large UNets or latents."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the concept erased."),
                     LoraModel.Output(display_name="LORA", tooltip="The erasure as a LoRA (save it or fuse it).")],
        )

    @classmethod
    def validate_inputs(cls, concept: str | None = None) -> bool | str:
        return check_message(lambda: concept is None or validation.check_concept(concept))

    @classmethod
    def execute(cls, model, clip, concept, steps, learning_rate, scope, saliency_fraction, prediction, resolution,
                seed, synonyms="", trajectories=None, trajectory_steps=None, early_steps=None,
                saliency_maps=None, preserve=None, refresh_every=None, cache_result=False,
                sampling=None, reuse=None, gradient_checkpointing=None) -> io.NodeOutput:
        s = AntSettings().override(
            steps=steps, lr=learning_rate, scope=scope, saliency_fraction=saliency_fraction, prediction=prediction,
            seed=seed, resolution=resolution or None, trajectories=trajectories, trajectory_steps=trajectory_steps,
            early_steps=early_steps, saliency_maps=saliency_maps, preserve=preserve, refresh_every=refresh_every,
            sampling=sampling, reuse=reuse, gradient_checkpointing=gradient_checkpointing)
        model, lora, _, _ = run_ant(model, clip, concept, synonyms, s, cache_result)
        return io.NodeOutput(model, lora)


class LegacyMassEraseMACE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MassEraseMACE", display_name="Mass Erase (MACE, legacy)", category=CATEGORY,
            is_deprecated=True,
            description="Erase many concepts at once: closed-form cross-attention refinement, one attention-loss "
                        "LoRA per concept, closed-form fusion (MACE).",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x / SD2.x / SDXL model to erase from (left unchanged)."),
                io.Clip.Input("clip", tooltip="The model's text encoder (CLIP)."),
                io.String.Input("concepts", default="", multiline=True,
                                tooltip="Concepts to erase, one per line (or ';'-separated)."),
                io.Combo.Input("preset", options=sorted(PRESETS), default="object",
                               tooltip="Reference settings per kind of concept (anchor, learning rate, masks)."),
                io.String.Input("anchors", default="",
                                tooltip="What each concept maps to: one anchor for all, or one per concept "
                                        "(';'-separated). Empty: the preset's."),
                io.String.Input("preserve_prompts", default="", multiline=True,
                                tooltip="Extra prompts whose outputs must not change, one per line."),
                io.Int.Input("lora_steps", default=0, min=0, max=5000,
                             tooltip="LoRA steps per concept; 0 = the preset's."),
                io.Int.Input("resolution", default=0, min=0, max=2048, step=8,
                             tooltip="Generation resolution in pixels; 0 = the model's native one."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the generated images."),
                *user_image_inputs(),
                cache_input(),
                # last, so that workflows saved before it existed keep their widget values in place
                io.Float.Input("lora_lr", default=0.0, min=0.0, max=0.1, step=1e-6, optional=True,
                               tooltip="LoRA learning rate; 0 = the preset's (the reference's: 1e-5 objects and "
                                       "nudity, 1e-4 people and styles). Raise it (e.g. 1e-3) when the console "
                                       "warns that a concept's LoRA barely changed the attention."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the concepts erased."),
                     LoraModel.Output(display_name="LORA", tooltip="The erasure as a LoRA.")],
        )

    @classmethod
    def validate_inputs(cls, concepts: str | None = None, anchors: str | None = None) -> bool | str:
        return check_message(lambda: concepts is None or validation.node_concepts(concepts, anchors))

    @classmethod
    def execute(cls, model, clip, concepts, preset, lora_steps, resolution, seed, anchors="",
                preserve_prompts="", latents=None, masks=None, image_concepts="", cache_result=False,
                images=None, vae=None, lora_lr=0.0) -> io.NodeOutput:
        s = PRESETS[preset].override(lora_steps=lora_steps or None, lora_lr=lora_lr or None, seed=seed)
        model, lora, _, _ = run_mace(model, clip, concepts, anchors, s, preserve_prompts, latents, masks,
                                  image_concepts, images, vae, cache_result, resolution or None)
        return io.NodeOutput(model, lora)


NODES: list[type[io.ComfyNode]] = [LegacyEraseConceptANT, LegacyMassEraseMACE]
