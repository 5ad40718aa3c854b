"""The advanced settings of the method nodes, as nodes of their own ("ANT Settings", "MACE Settings"): connected to an
erase node's optional ``settings`` socket, the values a user changed on them override the chosen preset; nothing
connected means the preset as it is (ComfyUI's convention for advanced options, which keeps the method nodes short).

A settings node passes on only the values that differ from the library's defaults (its widgets' defaults), so that a
preset keeps every value the user did not touch: "paper" stays the paper's configuration with one value changed. Its
``force`` widget names the values to pass on even at their defaults (a preset's value set back to the library's)."""

from __future__ import annotations

import math
from dataclasses import fields

from comfy_api.latest import io

from ..erasure.ant import CHECKPOINTING, PREDICTIONS, SAMPLINGS, SCOPES, AntSettings
from ..erasure.errors import BadInputError
from ..erasure.mace import MaceSettings

CATEGORY = "erasure/settings"
AntSettingsType = io.Custom("ERASURE_ANT_SETTINGS")
MaceSettingsType = io.Custom("ERASURE_MACE_SETTINGS")

#: the resolution choices: the model's native one, or a size in pixels (64 is for quick tests on tiny models)
NATIVE = "native"
RESOLUTIONS = [NATIVE, *(str(r) for r in range(64, 2049, 64))]
SUPPRESS_END = {"auto": None, "on": True, "off": False}
AUTO = "auto"
#: MACE's concepts per batch: automatic, or a fixed number
CONCEPT_BATCHES = [AUTO, *(str(2**k) for k in range(7))]


def resolution_value(value: object) -> int | None:
    """A resolution widget's value in pixels, None for the model's native one. Accepts the integers that the
    legacy nodes' widgets stored (0 = native), so that their saved values keep their meaning."""
    if value in (None, NATIVE, 0, "0"):
        return None
    try:
        px = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise BadInputError(f"resolution must be '{NATIVE}' or a size in pixels (got {value!r})") from None
    if px < 8 or px % 8:
        raise BadInputError(f"resolution must be a positive multiple of 8 pixels (got {px}): choose e.g. 512 for "
                            f"SD1.x, 1024 for SDXL, or '{NATIVE}'")
    return px


def check_resolution(value: object) -> bool | str:
    """A node's ``validate_inputs`` answer for its resolution widget: True, or the message."""
    try:
        resolution_value(value)
    except ValueError as e:
        return str(e)
    return True


def report_input() -> io.Boolean.Input:
    return io.Boolean.Input("erasure_report", default=True,
                            tooltip="After training, measure how much of the concept's guidance is left and how far "
                                    "unrelated prompts moved (a few hundred UNet evaluations; the REPORT output).")


def resolution_input(tooltip: str, optional: bool = False) -> io.Combo.Input:
    return io.Combo.Input("resolution", options=RESOLUTIONS, default=NATIVE, tooltip=tooltip, optional=optional)


#: the ANT Settings widgets named otherwise than the settings they set
ANT_WIDGET_NAMES = {"learning_rate": "lr", "relative_learning_rate": "lr_relative"}


def force_input(example: str) -> io.String.Input:
    return io.String.Input("force", default="", optional=True,
                           tooltip="Widget names, comma-separated, whose values are passed on even where they equal "
                                   f"the default shown here ({example}): a value left at its default otherwise "
                                   "keeps the preset's.")


def forced(defaults: object, text: str | None, values: dict[str, object], renamed: dict[str, str] | None = None
           ) -> dict[str, object]:
    """The settings named in a ``force`` widget (widget names, comma- or space-separated), with their values: passed
    on whatever they are. An unknown name is refused, naming the valid ones."""
    renamed = renamed or {}
    known = {f.name for f in fields(defaults)} & set(values)  # type: ignore[arg-type]
    out = {}
    for name in (text or "").replace(",", " ").split():
        field = renamed.get(name, name)
        if field not in known:
            shown = sorted(next((w for w, f in renamed.items() if f == k), k) for k in known)
            raise BadInputError(f"force: no setting '{name}' on this node; write widget names separated by commas, "
                                f"e.g. '{shown[0]}, {shown[1]}' (all: {', '.join(shown)})")
        out[field] = values[field]
    return out


def changed(defaults: object, values: dict[str, object]) -> dict[str, object]:
    """The settings a user changed: the values that differ from the library's defaults (floats compared to 1e-9,
    since the editor stores widget floats rounded to their step)."""
    out = {}
    for f in fields(defaults):  # type: ignore[arg-type]
        if f.name not in values:
            continue
        v, d = values[f.name], getattr(defaults, f.name)
        same = (math.isclose(float(v), float(d), rel_tol=1e-9, abs_tol=1e-12)
                if isinstance(v, float) and isinstance(d, (int, float)) and not isinstance(d, bool) else v == d)
        if not same:
            out[f.name] = v
    return out


class _SettingsNode(io.ComfyNode):
    """What both settings nodes check when the graph is queued: the resolution."""

    @classmethod
    def validate_inputs(cls, resolution: str | None = None) -> bool | str:
        return check_resolution(resolution)


class AntSettingsNode(_SettingsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = AntSettings()
        return io.Schema(
            node_id="ANTSettings", display_name="ANT Settings", category=CATEGORY,
            description="Advanced settings of Erase Concept (ANT). Connect to its settings input: the values you "
                        "change here override the preset; values left at their defaults keep the preset's (name "
                        "them in force to pass them on anyway).",
            inputs=[
                io.Float.Input("learning_rate", default=d.lr, min=1e-6, max=1.0, step=0.001,
                               tooltip="Adam's step, relative to each layer's weight scale: 0.02 moves a weight by "
                                       "about 2% of its layer's RMS per step on any model (absolute when "
                                       "relative_learning_rate is off)."),
                io.Boolean.Input("relative_learning_rate", default=d.lr_relative,
                                 tooltip="On: the learning rate is relative to each layer's weights, so it means the "
                                         "same on SD1.5, SDXL or the lab. Off: one absolute step for all weights "
                                         "(the paper's 5e-4)."),
                io.Float.Input("eta", default=d.eta, min=0.0, max=10.0, step=0.05,
                               tooltip="Fraction of the concept's guidance direction reversed in the mid/late steps "
                                       "(the early steps always keep it). Higher erases harder and changes more "
                                       "unrelated images; the paper uses 1."),
                io.Float.Input("preserve", default=d.preserve, min=0.0, max=100.0, step=0.5,
                               tooltip="Weight that keeps prompts without the concept unchanged (0 = the paper's "
                                       "loss)."),
                io.Combo.Input("scope", options=list(SCOPES), default=d.scope,
                               tooltip="kv: the cross-attention keys and values (what reads the prompt); xattn: "
                                       "every cross-attention projection; saliency: only the most salient weights "
                                       "of the UNet (the paper's); non-xattn: everything but cross-attention; lora: "
                                       "a K/V LoRA."),
                io.Float.Input("saliency_fraction", default=d.saliency_fraction, min=0.001, max=1.0, step=0.01,
                               tooltip="scope saliency: fraction of weights each saliency map keeps before the maps "
                                       "are intersected."),
                io.Int.Input("saliency_maps", default=d.saliency_maps, min=1, max=64,
                             tooltip="scope saliency: maps (prompt augmentation x seed) intersected."),
                io.Int.Input("lora_rank", default=d.lora_rank, min=1, max=256, tooltip="scope lora: the LoRA's rank."),
                io.Combo.Input("prediction", options=list(PREDICTIONS), default=d.prediction,
                               tooltip="Which prediction of the edited model is trained: guided or conditional."),
                io.Combo.Input("sampling", options=list(SAMPLINGS), default=d.sampling,
                               tooltip="on-policy: training follows the edited model's own denoising trajectories; "
                                       "cached: the original model's trajectories made once (cheaper, erases far "
                                       "less)."),
                io.Int.Input("trajectories", default=d.trajectories, min=1, max=256,
                             tooltip="Seeds x prompt augmentations of the trajectories."),
                io.Int.Input("trajectory_steps", default=d.trajectory_steps, min=2, max=200,
                             tooltip="DDIM steps of each trajectory."),
                io.Int.Input("early_steps", default=d.early_steps, min=1, max=199,
                             tooltip="The first steps of each trajectory, where the guidance direction is kept "
                                     "(structure); fewer than trajectory_steps."),
                io.Int.Input("reuse", default=d.reuse, min=1, max=64,
                             tooltip="on-policy: each regenerated trajectory serves this many training steps (1 = "
                                     "the paper's loop, a new trajectory every step)."),
                io.Int.Input("refresh_every", default=d.refresh_every, min=0, max=10000,
                             tooltip="cached sampling: regenerate the trajectories with the edited model every N "
                                     "steps; 0 never regenerates them."),
                io.Float.Input("guidance", default=d.guidance, min=1.0, max=30.0, step=0.5,
                               tooltip="Guidance scale of the trajectories and of the guided prediction."),
                io.Int.Input("batch_size", default=d.batch_size, min=1, max=64, tooltip="Samples per step."),
                io.Int.Input("preserve_prompts", default=d.preserve_prompts, min=1, max=1024,
                             tooltip="How many prompts without the concept the preservation term draws from."),
                io.Float.Input("grad_clip", default=d.grad_clip, min=0.0, max=100.0, step=0.1,
                               tooltip="Gradient-norm clip per step; 0 does not clip."),
                io.Combo.Input("gradient_checkpointing", options=list(CHECKPOINTING), default=d.gradient_checkpointing,
                               tooltip="Recompute activations in backward: less memory (SDXL at 1024 px), about 10% "
                                       "more time. auto: on for large UNets or latents."),
                resolution_input("Training resolution: the model's native one, or a size in pixels."),
                report_input(),
                io.Int.Input("adversarial", default=d.adversarial, min=0, max=8, optional=True,
                             tooltip="Adversarial erasure (one concept): this many learned tokens of a concept-"
                                     "inversion attack are trained inside the erasure and erased too, so the concept "
                                     "is harder to bring back with a learned token (Audit Erasure). 0 = off. Needs "
                                     "protect 0 (scopes kv, lora, xattn). Costs "
                                     f"{d.adversarial_steps} attack steps every {d.adversarial_every} erasure steps "
                                     "(docs/audit.md#adversarial-erasure)."),
                io.Float.Input("protect", default=d.protect, min=0.0, max=0.9999, step=0.0001, round=0.0001,
                               optional=True,
                               tooltip="Keep the K/V edit off what unrelated prompts feed the cross-attention: "
                                       "every step's gradient and the edit after it are projected off the "
                                       "text-embedding directions holding this fraction of unrelated prompts' token "
                                       "energy, so their images change less. 0 = off. Scopes kv, lora, xattn "
                                       "(docs/ant.md#protect)."),
                io.Boolean.Input("calibrate", default=d.calibrate, optional=True,
                                 tooltip="After training, raise the edit's strength (at most 2x) until the erasure "
                                         "report says the concept no longer steers its prompts at the mid and late "
                                         "steps; up to 4 extra reports of the concept's prompts. Off by default: on "
                                         "the lab it erased more of every colour but met every bar in only 3 runs "
                                         "of 7 (docs/ant.md#calibrate)."),
                force_input("e.g. 'eta' with the paper preset trains at eta 0.3, not the paper's 1"),
            ],
            outputs=[AntSettingsType.Output(display_name="SETTINGS",
                                            tooltip="Connect to Erase Concept (ANT)'s settings input.")],
        )


    @classmethod
    def execute(cls, learning_rate, relative_learning_rate, resolution, erasure_report=True, force="", **values
                ) -> io.NodeOutput:
        values.update(lr=learning_rate, lr_relative=relative_learning_rate)
        changes = changed(AntSettings(), values) | forced(AntSettings(), force, values, ANT_WIDGET_NAMES)
        AntSettings().override(**changes).validate()  # a bad combination is named here, not in the erase node
        return io.NodeOutput({"settings": changes, "resolution": resolution_value(resolution),
                              "report": erasure_report})


class MaceSettingsNode(_SettingsNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = MaceSettings()
        return io.Schema(
            node_id="MACESettings", display_name="MACE Settings", category=CATEGORY,
            description="Advanced settings of Mass Erase (MACE). Connect to its settings input: the values you change "
                        "here override the preset; values left at their defaults keep the preset's unless named in "
                        "force (the presets, "
                        "the reference's configurations, differ in lam, the prior weights, the LoRA learning rate "
                        "and steps: docs/mace.md, Presets).",
            inputs=[
                io.Int.Input("lora_steps", default=d.lora_steps, min=1, max=5000,
                             tooltip="LoRA training steps per concept (presets: 50; nudity 120)."),
                io.Float.Input("lora_lr", default=d.lora_lr, min=1e-8, max=0.1, step=1e-6, round=1e-8,
                               tooltip="LoRA learning rate to start from (presets: 1e-5 objects and nudity, 1e-4 "
                                       "people and styles); raised by the LoRA stage after a round that stalled "
                                       "(lora_target)."),
                io.Int.Input("lora_rank", default=d.lora_rank, min=1, max=64, tooltip="Rank of each concept's LoRA."),
                io.Int.Input("lora_batch", default=d.lora_batch, min=1, max=64, tooltip="Images per LoRA step."),
                io.Int.Input("images_per_concept", default=d.images_per_concept, min=1, max=256,
                             tooltip="Images generated per concept (when none of yours are connected)."),
                io.Int.Input("sample_steps", default=d.sample_steps, min=1, max=200,
                             tooltip="Sampling steps of the generated images."),
                io.Float.Input("guidance", default=d.guidance, min=1.0, max=30.0, step=0.5,
                               tooltip="Guidance scale of the generated images."),
                io.Boolean.Input("use_masks", default=d.use_masks,
                                 tooltip="Train the attention loss inside the concept's region (from its own "
                                         "attention maps; the reference's objects and people) instead of whole "
                                         "images (default off; your own masks are used either way)."),
                io.Float.Input("mask_threshold", default=d.mask_threshold, min=0.0, max=1.0, step=0.05,
                               tooltip="Where a normalised attention map counts as the concept's region."),
                io.Float.Input("lam", default=d.lam, min=1e-6, max=1e6, step=0.01,
                               tooltip="Closed-form refinement and fusion: pull towards the original weights (the "
                                       "object preset: 10; relative to the model's token energy, lam_relative)."),
                io.Float.Input("preserve", default=d.preserve, min=0.0, max=1e6, step=0.1,
                               tooltip="Prior-preservation weight of the closed-form refinement."),
                io.Float.Input("fuse_preserve", default=d.fuse_preserve, min=0.0, max=1e6, step=0.1,
                               tooltip="Prior-preservation weight of the fusion."),
                io.Boolean.Input("augment", default=d.augment,
                                 tooltip="Each LoRA step uses a prompt drawn from the concept's templates (off: "
                                         "the generation prompt every step)."),
                io.Boolean.Input("importance_sampling", default=d.importance_sampling,
                                 tooltip="Draw LoRA timesteps mostly from t 200-400, as the reference's objects, "
                                         "people and styles (default off: uniform, as its nudity config)."),
                io.Combo.Input("suppress_end", options=list(SUPPRESS_END), default="auto",
                               tooltip="Also suppress the end token and padding: auto where the text encoder "
                                       "carries the concept into them; on; off."),
                io.Float.Input("grad_clip", default=d.grad_clip, min=0.01, max=100.0, step=0.1,
                               tooltip="Gradient-norm clip per LoRA step."),
                resolution_input("Generation and training resolution: the model's native one, or pixels."),
                report_input(),
                # last and optional: workflows saved before it existed keep their widget values in place
                io.Combo.Input("concept_batch", options=CONCEPT_BATCHES, default=AUTO, optional=True,
                               tooltip="Concepts trained together in one UNet batch, each with its own LoRA: the "
                                       "same result as one at a time, in fewer and larger UNet calls. auto: as many "
                                       "as fit in 60% of the free GPU memory, 4 on the CPU. Lower it if you run out "
                                       "of memory."),
                io.Float.Input("lora_target", default=d.lora_target, min=0.0, max=0.99, step=0.01, optional=True,
                               tooltip="Train each concept's LoRA in rounds of lora_steps until the attention its "
                                       "tokens receive (on a fixed probe; whole images, or its region with "
                                       "use_masks) is at most this fraction of the start, raising the learning "
                                       "rate after a round that stalled. 0: lora_steps only, as the reference."),
                io.Int.Input("lora_max_rounds", default=d.lora_max_rounds, min=1, max=100, optional=True,
                             tooltip="At most this many rounds of lora_steps per concept."),
                io.Boolean.Input("lam_relative", default=d.lam_relative, optional=True,
                                 tooltip="Read lam relative to this model's text-token energy, as the reference's "
                                         "values read on SD1.x (on). Off: the same absolute number on every model."),
                io.Float.Input("protect", default=d.protect, min=0.0, max=0.9999, step=0.0001, round=0.0001,
                               optional=True,
                               tooltip="Keep the erasure's K/V change off what unrelated prompts feed the cross-"
                                       "attention: each concept's LoRA trains in, and the result is projected onto, "
                                       "the text-embedding directions outside this fraction of the prior prompts' "
                                       "token energy, so their images change less (on the CLIP-like lab model "
                                       "66-83% of unrelated images kept whole instead of 25-58%). 0 = off, the "
                                       "reference's result (docs/mace.md#protect)."),
                force_input("e.g. 'lam' with the object preset uses lam 0.1, not the preset's 10"),
                # last and optional: workflows saved before it existed keep their widget values in place
                io.Boolean.Input("suppress_following", default=d.suppress_following, optional=True,
                                 tooltip="Also suppress the words after the concept (\"a green *car*\"), which "
                                         "CLIP's causal text encoder fills with the concept (on; off: the "
                                         "reference's positions)."),
            ],
            outputs=[MaceSettingsType.Output(display_name="SETTINGS",
                                             tooltip="Connect to Mass Erase (MACE)'s settings input.")],
        )


    @classmethod
    def execute(cls, resolution, suppress_end, erasure_report=True, concept_batch=AUTO, force="", **values
                ) -> io.NodeOutput:
        values["suppress_end"] = SUPPRESS_END[suppress_end]
        values["concept_batch"] = None if concept_batch == AUTO else int(concept_batch)
        changes = changed(MaceSettings(), values) | forced(MaceSettings(), force, values)
        MaceSettings().override(**changes).validate()
        return io.NodeOutput({"settings": changes, "resolution": resolution_value(resolution),
                              "report": erasure_report})


NODES: list[type[io.ComfyNode]] = [AntSettingsNode, MaceSettingsNode]
