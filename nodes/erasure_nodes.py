"""The pack's nodes (ComfyUI V3 schema API). Thin: validate inputs, call the ``erasure`` library, wrap the result.

Every erasure node returns a MODEL (a patched clone: the input MODEL is never modified) and a ``LORA_MODEL`` (ComfyUI's
own LoRA socket type: a dict of kohya-keyed tensors that ``LoraModelLoader`` and ``SaveLoRA`` accept). Ours is a dict
subclass that also carries the erasure metadata (method, concepts, settings, base model), which the Save and Fuse
nodes use and other nodes ignore.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..erasure import validation
from ..erasure.ant import PRESETS as ANT_PRESETS
from ..erasure.ant import AntSettings, ant
from ..erasure.files import cache_dir, read_safetensors
from ..erasure.fusion import fuse
from ..erasure.lora_files import kohya_metadata, load_lora, parse_lora, write_lora
from ..erasure.loss_curve import curve_from_metadata
from ..erasure.mace import PRESETS, MaceSettings, mace
from ..erasure.prior import gram
from ..erasure.progress import Progress
from ..erasure.prompts import CONCEPT_TEMPLATES, Concept, prior_prompts, split_list
from ..erasure.report import (
    ReportSettings,
    add_to_metadata,
    erasure_report,
    report_concept,
    report_from_metadata,
    report_line,
    report_text,
)
from ..erasure.report import report_steps as erasure_report_steps
from ..erasure.sampling import sample
from ..erasure.weights import META_PREFIX, ErasureWeights, metadata
from . import result_cache
from .comfy_backbone import ComfyBackbone, from_lora, patched_model, to_lora_dict, trainable
from .comfy_text import ComfySlotEncoder, clip_trainable
from .settings_nodes import AntSettingsType, MaceSettingsType, resolution_input, resolution_value
from .user_images import user_training_data

CATEGORY = "erasure"
LoraModel = io.Custom("LORA_MODEL")
REPORT_TOOLTIP = ("The erasure report, no classifier needed: how much of the concept's guidance is left on its "
                  "prompts (1 = unchanged, 0 = gone) and how far unrelated prompts moved (0 = unchanged). Connect "
                  "Preview Any to read it. Also in the LoRA's metadata.")
LossMap = io.Custom("LOSS_MAP")  # ComfyUI's loss history socket ({"loss": [...]}), drawn by "Plot Loss Graph"


class ErasureLora(dict):
    """A LORA_MODEL (``dict[str, Tensor]``) that also carries safetensors metadata."""

    metadata: dict[str, str]

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        super().__init__(tensors)
        self.metadata = dict(metadata)


def cache_input() -> io.Boolean.Input:
    return io.Boolean.Input("cache_result", default=False, optional=True,
                            tooltip="Keep the result in output/erasure-cache and reuse it whenever the same model "
                                    "(with its patches), text encoder, settings and concepts come again, also after "
                                    "a restart. Files are as large as the edit.")


def user_image_inputs() -> list[io.Input]:
    """Mass Erase's optional inputs for the user's own training images and masks."""
    return [
        io.String.Input("image_concepts", default="", optional=True,
                        tooltip="With your own images: which concept each image shows, one number per "
                                "image, comma-separated (1 = first concept line), e.g. '1,1,2'. Empty: the "
                                "images are split evenly in concept order (2 concepts, 6 images: 3 each)."),
        io.Latent.Input("latents", optional=True,
                        tooltip="Optional: your own training images of the concepts, as latents (VAE "
                                "Encode with this checkpoint's VAE). They replace the generated images of "
                                "the concepts they show; the others are generated as usual."),
        io.Image.Input("images", optional=True,
                       tooltip="Optional, instead of latents: your own training images as an IMAGE batch "
                               "(e.g. Load Image); they are encoded with the vae input as VAE Encode does."),
        io.Vae.Input("vae", optional=True,
                     tooltip="The checkpoint's VAE, needed only to encode the images input."),
        io.Mask.Input("masks", optional=True,
                      tooltip="Optional: where each image shows its concept (white = concept), one mask "
                              "per image or one for all, at the images' size. Not connected: a mask set "
                              "on the latents (Set Latent Noise Mask), else whole images."),
    ]


def _split(text: str) -> list[str]:
    return split_list(text)


def check_message(check) -> bool | str:
    """A node's ``validate_inputs`` answer: True, or the check's message (shown before the graph runs)."""
    try:
        check()
    except ValueError as e:
        return str(e)
    return True


def node_progress(total: int) -> Progress:
    """ComfyUI's progress bar, its Cancel check and its console, as the library's progress object."""
    bar = comfy.utils.ProgressBar(total)

    def grow(n: int) -> None:  # ProgressBar reads its total at every update
        bar.total += n

    return Progress(update=lambda n=1: bar.update(n),
                    interrupt=comfy.model_management.throw_exception_if_processing_interrupted, log=_console,
                    grow=grow)


def _export(weights: ErasureWeights, model, backbone: ComfyBackbone) -> ErasureLora:
    """The LoRA socket value: exact when it stays under 256 MB, else a rank-64 truncated SVD (error in metadata);
    tensors and metadata (erasure, kohya and ModelSpec keys) as the library writes them to a file."""
    weights.metadata[META_PREFIX + "base_model"] = backbone.fingerprint()
    weights.metadata[META_PREFIX + "base_family"] = backbone.family
    weights.metadata[META_PREFIX + "base_prediction"] = "v" if backbone.v_prediction else "eps"
    return ErasureLora(*to_lora_dict(weights, model, weights.export_rank()))


def _lora_weights(lora: dict, model) -> ErasureWeights:
    """A LORA_MODEL socket value (ours or ComfyUI's) as erasure weights with ComfyUI module names."""
    return from_lora(parse_lora(lora, getattr(lora, "metadata", None)), model)


def _concepts_of(lora: dict) -> list[str]:
    return validation.concepts_from_metadata(getattr(lora, "metadata", None) or {}, META_PREFIX + "concepts")


def run_ant(model, clip, concept: str, synonyms: str, s: AntSettings, cache_result: bool = False,
            report: bool = False) -> tuple[object, ErasureLora, dict, str]:
    """ANT on a ComfyUI model: the patched clone, the LoRA socket value, the loss history (a ``LOSS_MAP``) and, with
    ``report``, the erasure report as text (else an empty string)."""
    concept = validation.check_concept(concept).strip()
    s.validate()
    bb = ComfyBackbone(model, clip, s.resolution)
    s_report = ReportSettings(guidance=7.5, batch_size=4, resolution=s.resolution)  # a real model's guidance
    report_concepts = [report_concept(concept, s.kind)]  # the kind's templates
    progress = node_progress(s.steps + (report_steps(s_report, report_concepts) if report else 0))
    bb.load()
    key = result_cache.result_key("ant", bb, {"concept": concept, "synonyms": _split(synonyms),
                                              "settings": asdict(s)}) if cache_result else None
    weights = result_cache.load(key, bb.unet()) if key else None
    cached = weights is not None
    if cached:
        progress.step(s.steps)  # cached: the bar completes at once
    else:
        # adversarial erasure learns a token through ComfyUI's text encoder: it must pass gradients too
        with trainable(bb), (clip_trainable(clip) if s.adversarial else contextlib.nullcontext()):
            weights = ant(bb, concept, s, synonyms=tuple(_split(synonyms)), progress=progress,
                          slot_encoder=ComfySlotEncoder(bb) if s.adversarial else None).weights
    text = _report(bb, weights, report_concepts, s_report, progress) if report else ""  # before the cache write
    if key and not cached:
        result_cache.save(key, weights)
    return patched_model(model, weights), _export(weights, model, bb), _loss_map(weights), text


def run_mace(model, clip, concepts: str, anchors: str, s: MaceSettings, preserve_prompts: str = "",
             latents=None, masks=None, image_concepts: str = "", images=None, vae=None, cache_result: bool = False,
             resolution: int | None = None, report: bool = False) -> tuple[object, ErasureLora, dict, str]:
    """MACE on a ComfyUI model: the patched clone, the LoRA socket value, the loss history (a ``LOSS_MAP``) and,
    with ``report``, the erasure report as text (else an empty string)."""
    names, anchor_list = validation.node_concepts(concepts, anchors)
    if images is not None:
        if latents is not None:
            raise ValueError("both images and latents are connected: connect one of them")
        if vae is None:
            raise ValueError("images are connected but no vae: connect the checkpoint's VAE to encode them "
                             "(or connect VAE Encode's LATENT to latents instead)")
        if images.dim() != 4 or images.shape[-1] < 3:
            raise ValueError(f"the images have shape {tuple(images.shape)}: expected an IMAGE batch [B, H, W, 3]")
        latents = {"samples": vae.encode(images[:, :, :, :3])}  # exactly what VAE Encode does
    items = [Concept(c, anchor_list[min(i, len(anchor_list) - 1)] if anchor_list else s.anchor, s.kind)
             for i, c in enumerate(names)]
    bb = ComfyBackbone(model, clip, resolution)
    validation.check_mace_inputs(bb, items, s)  # before the prior: a CLIP pass per prompt
    samples = latents.get("samples") if isinstance(latents, dict) else None
    if latents is not None and samples is None:
        raise ValueError("the latents input holds no samples: connect VAE Encode's LATENT output")
    if masks is None and isinstance(latents, dict):
        masks = latents.get("noise_mask")
    x0 = None if samples is None else model.model.latent_format.process_in(samples.float())
    user = user_training_data(names, x0, masks, image_concepts, bb.channels)  # fails before any work
    total = (len(items) - len(user)) * s.sample_steps + len(items) * s.lora_steps
    s_report = ReportSettings(guidance=7.5, batch_size=4, resolution=resolution)
    progress = node_progress(total + (report_steps(s_report, items) if report else 0))
    bb.load()
    key = None
    if cache_result:
        settings = {"concepts": [asdict(c) for c in items], "preserve_prompts": _split_lines(preserve_prompts),
                    "settings": asdict(s)}
        user_tensors = {f"{k}.{i}": t for k, pair in user.items() for i, t in enumerate(pair)}
        key = result_cache.result_key("mace", bb, settings, user_tensors)
    weights = result_cache.load(key, bb.unet()) if key else None
    cached = weights is not None
    if cached:
        progress.step(total)  # cached: the bar completes at once
    else:
        with trainable(bb):
            # ordinary copies: training cannot save inference tensors for backward
            user = {k: (x.clone(), m.clone()) for k, (x, m) in user.items()}
            prior = gram(bb, prior_prompts(exclude=names) + _split_lines(preserve_prompts), cache_dir())
            weights = mace(bb, items, s, prior, user_data=user, progress=progress).weights
    text = _report(bb, weights, items, s_report, progress) if report else ""  # before the cache write
    if key and not cached:
        result_cache.save(key, weights)
    return patched_model(model, weights), _export(weights, model, bb), _loss_map(weights), text


def report_steps(s: ReportSettings, concepts: list) -> int:
    """Progress units of the erasure report (the concepts' prompts and the unrelated ones)."""
    return erasure_report_steps(len(concepts) * s.concept_prompts, s.unrelated_prompts, s)


def _report(bb: ComfyBackbone, weights: ErasureWeights, concepts: list, s: ReportSettings, progress: Progress
            ) -> str:
    """The erasure report (guidance left on the concept's prompts, drift of unrelated ones: docs/audit.md), kept in
    the result's metadata so that the LoRA file and a cached result carry it; one already there is reused."""
    report = report_from_metadata(weights.metadata)
    if report is None:
        _console("erasure report: measuring the guidance left and the drift of unrelated prompts")
        add_to_metadata(weights, erasure_report(bb, weights, concepts, settings=s, progress=progress))
        report = report_from_metadata(weights.metadata)  # as stored: the same text as from a cached result
    else:
        progress.step(report_steps(s, concepts))
    _console(report_line(report))
    return report_text(report)


def _loss_map(weights: ErasureWeights) -> dict:
    """The run's loss history as ComfyUI's LOSS_MAP (``{"loss": [...]}``, what "Plot Loss Graph" draws): from the
    curve in the result's metadata, so that a cached result shows it too (binned to at most 256 points)."""
    curve = curve_from_metadata(weights.metadata)
    return {"loss": list(curve["loss"]) if curve else []}


def _settings_value(value: dict | None) -> tuple[dict, int | None, bool]:
    """A settings node's output: the changed values, the resolution and whether to report (nothing connected: none,
    native, report)."""
    if value is None:
        return {}, None, True
    return dict(value.get("settings", {})), value.get("resolution"), bool(value.get("report", True))


# -- nodes -------------------------------------------------------------------------------------------------------
class EraseConceptANT(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = AntSettings()
        return io.Schema(
            node_id="EraseConceptANTv2", display_name="Erase Concept (ANT)", category=CATEGORY,
            description="Erase one concept by reversing classifier-free guidance in the mid-to-late denoising steps "
                        "(ANT), training the cross-attention keys and values. Advanced settings: connect an ANT "
                        "Settings node.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x / SD2.x / SDXL model to erase from (left unchanged)."),
                io.Clip.Input("clip", tooltip="The model's text encoder (CLIP)."),
                io.String.Input("concept", default="", tooltip="The word or phrase to erase, e.g. 'nudity'."),
                io.String.Input("synonyms", default="", multiline=True,
                                tooltip="Other words for the concept, ';' or one per line: erased with it (they "
                                        "augment the training prompts)."),
                io.Combo.Input("kind", options=list(CONCEPT_TEMPLATES), default="object",
                               tooltip="What the concept is: its prompts are built from this kind's templates "
                                       "('a photo of a ...', 'a painting in the style of ...')."),
                io.Combo.Input("preset", options=list(ANT_PRESETS), default="default",
                               tooltip="default: this pack's settings (cross-attention K/V, a preservation term, "
                                       "a third of the guidance reversed); paper: the published method as "
                                       "specified (saliency mask, the paper's loss and learning rate); robust: "
                                       "this pack's loss on the paper's saliency mask, harder to bring back with a "
                                       "learned token on one lab model but not on the other (check yours with Audit "
                                       "Erasure), with more change to unrelated images."),
                io.Int.Input("steps", default=d.steps, min=1, max=10000, tooltip="Training steps."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the trajectories and of training."),
                cache_input(),
                AntSettingsType.Input("settings", optional=True,
                                      tooltip="Optional ANT Settings node: its changed values override the "
                                              "preset's."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the concept erased."),
                     LoraModel.Output(display_name="LORA", tooltip="The erasure as a LoRA (save it or fuse it)."),
                     LossMap.Output(display_name="LOSS", tooltip="The loss per training step (connect Plot Loss "
                                                                 "Graph)."),
                     io.String.Output(display_name="REPORT", tooltip=REPORT_TOOLTIP)],
        )

    @classmethod
    def validate_inputs(cls, concept: str | None = None) -> bool | str:
        return check_message(lambda: concept is None or validation.check_concept(concept))

    @classmethod
    def execute(cls, model, clip, concept, synonyms="", kind="object", preset="default", steps=AntSettings.steps,
                seed=0, cache_result=False, settings=None) -> io.NodeOutput:
        changes, resolution, report = _settings_value(settings)
        s = ANT_PRESETS[preset].override(**changes, steps=steps, seed=seed, kind=kind, resolution=resolution)
        return io.NodeOutput(*run_ant(model, clip, concept, synonyms, s, cache_result, report))


class MassEraseMACE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MassEraseMACEv2", display_name="Mass Erase (MACE)", category=CATEGORY,
            description="Erase many concepts at once: closed-form cross-attention refinement, one attention-loss "
                        "LoRA per concept, closed-form fusion (MACE). Advanced settings: connect a MACE Settings "
                        "node.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x / SD2.x / SDXL model to erase from (left unchanged)."),
                io.Clip.Input("clip", tooltip="The model's text encoder (CLIP)."),
                io.String.Input("concepts", default="", multiline=True,
                                tooltip="Concepts to erase, one per line (or ';'-separated)."),
                io.Combo.Input("preset", options=list(PRESETS), default="object",
                               tooltip="What the concepts are (object, person, style, nudity): the reference's "
                                       "settings for that kind (anchor, prompt templates, LoRA learning rate, "
                                       "masks)."),
                io.String.Input("anchors", default="",
                                tooltip="What each concept maps to: one anchor for all, or one per concept "
                                        "(';'-separated). Empty: the preset's ('ground', 'a person', 'art', "
                                        "'a person wearing clothes')."),
                io.String.Input("preserve_prompts", default="", multiline=True,
                                tooltip="Extra prompts whose outputs must not change, one per line."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the generated images and of training."),
                cache_input(),
                *user_image_inputs(),
                MaceSettingsType.Input("settings", optional=True,
                                       tooltip="Optional MACE Settings node: its changed values override the "
                                               "preset's."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the concepts erased."),
                     LoraModel.Output(display_name="LORA", tooltip="The erasure as a LoRA."),
                     LossMap.Output(display_name="LOSS", tooltip="The attention loss per LoRA step, the concepts "
                                                                 "one after another (connect Plot Loss Graph)."),
                     io.String.Output(display_name="REPORT", tooltip=REPORT_TOOLTIP)],
        )

    @classmethod
    def validate_inputs(cls, concepts: str | None = None, anchors: str | None = None) -> bool | str:
        return check_message(lambda: concepts is None or validation.node_concepts(concepts, anchors))

    @classmethod
    def execute(cls, model, clip, concepts, preset="object", anchors="", preserve_prompts="", seed=0,
                cache_result=False, image_concepts="", latents=None, images=None, vae=None, masks=None,
                settings=None) -> io.NodeOutput:
        changes, resolution, report = _settings_value(settings)
        s = PRESETS[preset].override(**changes, seed=seed)
        return io.NodeOutput(*run_mace(model, clip, concepts, anchors, s, preserve_prompts, latents, masks,
                                       image_concepts, images, vae, cache_result, resolution, report))


def _console(message: str) -> None:
    """The library's progress lines to ComfyUI's console; its warnings (e.g. a MACE LoRA that did not move the
    attention) as warnings."""
    if message.startswith("warning:"):
        logging.warning("[erasure] %s", message[len("warning:"):].strip())
    else:
        logging.info("[erasure] %s", message)


class FuseErasureLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FuseErasureLoRAs", display_name="Fuse Erasure LoRAs", category=CATEGORY,
            description="Combine erasure LoRAs (ANT and MACE mixed) into one by MACE's closed-form fusion of their "
                        "cross-attention K/V effects.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the LoRAs were made for."),
                io.Clip.Input("clip", tooltip="Its text encoder (the fusion uses the concepts' embeddings)."),
                LoraModel.Input("lora_1", tooltip="An erasure LoRA (from an erase node or Load Erasure LoRA)."),
                LoraModel.Input("lora_2", tooltip="Another erasure LoRA."),
                LoraModel.Input("lora_3", optional=True, tooltip="Optional third LoRA."),
                LoraModel.Input("lora_4", optional=True, tooltip="Optional fourth LoRA."),
                io.String.Input("concepts", default="", multiline=True,
                                tooltip="Only for LoRAs without erasure metadata: their concepts, one line per "
                                        "LoRA in order, ';'-separated within a line."),
                io.Float.Input("preserve", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of prior preservation in the fusion."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the fused erasure."),
                     LoraModel.Output(display_name="LORA", tooltip="The fused erasure as one LoRA.")],
        )

    @classmethod
    def execute(cls, model, clip, lora_1, lora_2, preserve, lora_3=None, lora_4=None, concepts="") -> io.NodeOutput:
        loras = [x for x in (lora_1, lora_2, lora_3, lora_4) if x is not None]
        lines = (concepts or "").splitlines()
        bb = ComfyBackbone(model, clip)
        items = []
        for i, lora in enumerate(loras):
            names = _concepts_of(lora) or (_split(lines[i]) if i < len(lines) else [])
            if not names:
                raise ValueError(f"LoRA {i + 1} carries no erasure metadata: write its concepts on line {i + 1} of "
                                 "'concepts'")
            items.append(([Concept(n, "", "object") for n in names], _lora_weights(lora, model)))
        validation.check_fuse_inputs(bb, items, 0.1, preserve)  # before the prior: a CLIP pass per prompt
        prior = gram(bb, prior_prompts(exclude=[n for c, _ in items for n in (x.text for x in c)]), cache_dir())
        fused = fuse(bb, items, None, prior, preserve=preserve, method="fused")
        return io.NodeOutput(patched_model(model, fused), _export(fused, model, bb))


class ApplyErasedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyErasedModel", display_name="Apply Erased Model", category=CATEGORY,
            description="Apply an erasure LoRA (socket or file in models/loras) to a model, as a patch.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (left unchanged)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="How strongly to apply the erasure."),
                LoraModel.Input("lora", optional=True, tooltip="An erasure LoRA socket (takes precedence)."),
                io.Combo.Input("lora_name", options=["(none)"] + folder_paths.get_filename_list("loras"),
                               optional=True, tooltip="Or a LoRA file from models/loras."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the erasure applied.")],
        )

    @classmethod
    def execute(cls, model, strength, lora=None, lora_name="(none)") -> io.NodeOutput:
        if lora is not None:
            w = _lora_weights(lora, model)
        elif lora_name and lora_name != "(none)":
            w = from_lora(load_lora(folder_paths.get_full_path_or_raise("loras", lora_name)), model)
        else:
            raise ValueError("connect an erasure LoRA or choose a LoRA file")
        return io.NodeOutput(patched_model(model, w, strength))


class SaveErasureLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaveErasureLoRA", display_name="Save Erasure LoRA", category=CATEGORY, is_output_node=True,
            description="Write an erasure LoRA into models/loras with its metadata (atomically).",
            inputs=[
                LoraModel.Input("lora", tooltip="The erasure LoRA to save."),
                io.String.Input("filename", default="erasure", tooltip="File name in models/loras."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
            ],
            outputs=[],
        )

    @classmethod
    def validate_inputs(cls, filename: str | None = None) -> bool | str:
        return check_message(lambda: filename is None or validation.safe_filename(filename))

    @classmethod
    def execute(cls, lora, filename, overwrite) -> io.NodeOutput:
        folder = folder_paths.get_folder_paths("loras")[0]
        validation.check_lora_tensors(lora, "the LoRA", require_lora=False)
        path = str(validation.path_inside(folder, filename))
        if os.path.exists(path) and not overwrite:
            raise ValueError(f"{os.path.basename(path)} already exists in models/loras: choose another name or "
                             "switch on overwrite")
        meta = dict(getattr(lora, "metadata", None) or {}) or metadata({"method": "unknown"})
        if "ss_network_module" not in meta and cls._plain_lora(lora):
            # a LoRA from another node: kohya's keys (base model from its K/V shapes) so A1111/Forge list it
            meta = kohya_metadata(parse_lora(lora, meta)) | meta
        write_lora(lora, meta, path)
        return io.NodeOutput()

    @staticmethod
    def _plain_lora(tensors: dict) -> bool:
        """Only kohya LoRA keys (``lora_up``/``lora_down``/``alpha``): not LoHa, LoKr or other adapters."""
        return bool(tensors) and all(k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in tensors)


class LoadErasureLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadErasureLoRA", display_name="Load Erasure LoRA", category=CATEGORY,
            description="Read a LoRA from models/loras with its erasure metadata (safetensors only).",
            inputs=[io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                                   tooltip="A .safetensors LoRA file in models/loras.")],
            outputs=[LoraModel.Output(display_name="LORA", tooltip="The LoRA, with its metadata.")],
        )

    @classmethod
    def execute(cls, lora_name) -> io.NodeOutput:
        if not lora_name.endswith(".safetensors"):
            raise ValueError(f"{lora_name}: only .safetensors files are read")
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        tensors, meta = read_safetensors(path)
        validation.check_lora_tensors(tensors, lora_name, require_lora=False)
        return io.NodeOutput(ErasureLora(tensors, meta))


class PreviewErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreviewErasure", display_name="Preview Erasure (before/after)", category=CATEGORY,
            description="Render the same seeds through the original and the erased model, for erased and for "
                        "unrelated prompts, as one grid: row pairs original/erased per prompt, one column per seed.",
            inputs=[
                io.Model.Input("original", tooltip="The model before erasure."),
                io.Model.Input("erased", tooltip="The model after erasure (from an erase or apply node)."),
                io.Clip.Input("clip", tooltip="The text encoder."),
                io.Vae.Input("vae", tooltip="The VAE that decodes the images."),
                io.String.Input("erased_prompts", default="", multiline=True,
                                tooltip="Prompts of the erased concept, one per line."),
                io.String.Input("unrelated_prompts", default="", multiline=True,
                                tooltip="Prompts that should not change, one per line."),
                io.Int.Input("seeds", default=4, min=1, max=16, tooltip="Columns: one seed each."),
                io.Int.Input("steps", default=20, min=1, max=150, tooltip="DDIM steps."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.5, tooltip="Guidance scale."),
                resolution_input("Image size: the model's native one, or pixels."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="First seed."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The before/after grid.")],
        )

    @classmethod
    def validate_inputs(cls, resolution: str | int | None = None) -> bool | str:
        return check_message(lambda: resolution_value(resolution))

    @classmethod
    def execute(cls, original, erased, clip, vae, erased_prompts, unrelated_prompts, seeds, steps, cfg, resolution,
                seed) -> io.NodeOutput:
        resolution = resolution_value(resolution)  # also the 0 (native) of workflows saved with an Int widget
        prompts = _split_lines(erased_prompts) + _split_lines(unrelated_prompts)
        if not prompts:
            raise ValueError("no prompts: give at least one erased or unrelated prompt, one per line")
        seed_list = list(range(seed, seed + seeds))
        progress = node_progress(2 * steps * ((len(prompts) * seeds + 127) // 128))
        rows = []
        for model in (original, erased):
            bb = ComfyBackbone(model, clip, resolution)
            bb.load()
            res = sample(bb, prompts, seed_list, steps, cfg, resolution=resolution, decode=False,
                         progress=progress)
            latents = model.model.latent_format.process_out(res.latents.float())
            rows.append(vae.decode(latents).float().cpu())  # [P * S, H, W, 3] in [0, 1]
        h, w = rows[0].shape[1:3]
        a = rows[0].reshape(len(prompts), seeds, h, w, 3)
        b = rows[1].reshape(len(prompts), seeds, h, w, 3)
        grid = torch.stack([a, b], 1).reshape(2 * len(prompts), seeds, h, w, 3)  # original/erased row pairs
        grid = grid.permute(0, 2, 1, 3, 4).reshape(1, 2 * len(prompts) * h, seeds * w, 3)
        return io.NodeOutput(grid.clamp(0, 1))


def _split_lines(text: str) -> list[str]:
    return split_list(text, "\n")


NODES: list[type[io.ComfyNode]] = [EraseConceptANT, MassEraseMACE, FuseErasureLoRAs, ApplyErasedModel,
                                   SaveErasureLoRA, LoadErasureLoRA, PreviewErasure]
