"""Input checks shared by the library's entry points, the ComfyUI nodes and the command line.

Why one module: a bad input must be refused with the same clear message (naming the fix) wherever it enters, and
*before* any expensive work (sampling, training, loading a model where possible). Everything here is pure and cheap
and never imports ComfyUI, so the nodes' checks run (and are fuzzed) in the default test suite. Checks that need the
model (does the concept fit the text encoder's context? was this LoRA made for this model?) take the backbone or the
UNet and only tokenize or compare shapes.

Every function raises :class:`~erasure.errors.BadInputError` (a ``ValueError``) or returns the cleaned value; nothing
here writes or trains.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import BadInputError, UnsupportedModelError
from .prompts import CONCEPT_TEMPLATES, augmented_prompts, split_list

#: longest concept, anchor or synonym accepted from a user or a file's metadata (characters)
MAX_TEXT = 300
#: most concepts read from a file's metadata
MAX_METADATA_CONCEPTS = 100
#: longest file name written into a model folder (bytes on most file systems: 255)
MAX_FILENAME = 200
#: file names Windows refuses whatever the extension
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


# -- text ------------------------------------------------------------------------------------------------------
def clean_text(text: object, limit: int = MAX_TEXT) -> str:
    """Untrusted text (user input, file metadata) as one plain line: control characters removed, whitespace runs
    collapsed, at most ``limit`` characters."""
    s = "" if text is None else str(text)
    s = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in s)
    return " ".join(s.split())[:limit]


def node_concepts(concepts: str | None, anchors: str | None = None) -> tuple[list[str], list[str]]:
    """The MACE node's text boxes as (concepts, anchors): concepts one per line or ';'-separated, anchors
    ';'-separated (one for all or one per concept; none = the preset's), checked as :func:`check_concepts` and
    :func:`check_anchors` do."""
    names = check_concepts(split_list(concepts))
    anchor_list = [a.strip() for a in anchors.split(";")] if anchors and anchors.strip() else []
    check_anchors(names, anchor_list)
    return names, anchor_list


def check_concepts(concepts: Iterable[str], what: str = "concept") -> list[str]:
    """The concepts stripped; refuses an empty list, an empty or whitespace-only entry, text longer than
    ``MAX_TEXT`` and duplicates (case-insensitive)."""
    raw = list(concepts)
    if not raw:
        raise BadInputError(f"no {what}s given: type the word or phrase to erase (one per line)")
    out = []
    for c in raw:
        if not isinstance(c, str) or not c.strip():
            raise BadInputError(f"a {what} is empty: give the word or phrase to erase")
        if len(c.strip()) > MAX_TEXT:
            raise BadInputError(f"the {what} {c.strip()[:40]!r}... is {len(c.strip())} characters long: shorten it to "
                                 f"a word or phrase (at most {MAX_TEXT} characters)")
        out.append(" ".join(c.split()))
    low = [c.lower() for c in out]
    dup = sorted({c for c in low if low.count(c) > 1})
    if dup:
        raise BadInputError(f"duplicate concepts: {', '.join(dup)}; list each concept once")
    return out


def check_concept(concept: str) -> str:
    """One concept, stripped (see :func:`check_concepts`)."""
    return check_concepts([concept])[0]


def check_anchors(concepts: list[str], anchors: list[str]) -> list[str]:
    """One anchor per concept: ``anchors`` may hold one (for all) or one per concept. An anchor equal to its concept
    would erase nothing."""
    if anchors and len(anchors) not in (1, len(concepts)):
        raise BadInputError(f"{len(anchors)} anchors for {len(concepts)} concepts: give one anchor for all, or one per "
                             "concept")
    out = [anchors[min(i, len(anchors) - 1)] if anchors else "" for i in range(len(concepts))]
    for c, a in zip(concepts, out, strict=True):
        if a.strip().lower() == c.strip().lower():
            raise BadInputError(f"the anchor of {c!r} is the concept itself: choose a different anchor")
    return out


def check_fits_context(backbone, text: str, prompts: Iterable[str]) -> None:
    """``text`` (a concept or anchor) must appear whole in every prompt after tokenization: a concept that the
    text encoder's context cuts off would be erased only in part. Tokenizes only."""
    for p in prompts:
        if text.strip() and not backbone.token_positions(p, text):
            raise BadInputError(f"{text[:60]!r} does not fit in the text encoder's context in the prompt {p[:80]!r} "
                                 "(CLIP reads 75 tokens): shorten it")


def check_ant_concepts_fit(backbone, concepts: list[str], kind: str = "object",
                           templates: Mapping[str, Iterable[str]] | None = None) -> None:
    """Every concept of a multi-concept ANT run fits the context in its prompts, checked before the first concept
    is trained (and before the caller builds the prior)."""
    for c in concepts:
        check_fits_context(backbone, c, augmented_prompts(c, (), kind, (templates or {}).get(c)))


# -- numbers ---------------------------------------------------------------------------------------------------
def check_count(name: str, value: object, low: int = 1) -> int:
    """A whole number >= ``low`` (steps, images, ranks, batch sizes)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadInputError(f"{name} must be a whole number >= {low} (got {value!r})")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (a widget's or flag's options)."""
    if value not in choices:
        raise BadInputError(f"{name} must be one of {', '.join(choices)} (got {value!r})")
    return str(value)


def check_fuse_strength(value: object) -> float:
    """The factor each concept's edit enters ANT's multi-concept fusion with: a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise BadInputError(f"the fusion strength must be a positive number (got {value})")
    return float(value)


def check_learning_rate(value: object) -> float:
    """A positive learning rate no larger than 1 (larger ones diverge at once, and astronomically large ones
    overflow inside the optimizer instead of giving a NaN loss)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise BadInputError(f"the learning rate must be a positive number (got {value})")
    if value > 1:
        raise BadInputError(f"the learning rate {value:g} is far too large (training would diverge at once): use at "
                             "most 1, typically 1e-5 to 1e-3")
    return float(value)


def check_number(name: str, value: object, low: float = 0.0, high: float = math.inf, low_open: bool = False) -> float:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok and high == math.inf:
        raise BadInputError(f"{name} must be a finite number {'>' if low_open else '>='} {low:g} (got {value})")
    if not ok:
        raise BadInputError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}] (got {value})")
    return float(value)


def check_resolution(value: object) -> int | None:
    """``None``/0 (the model's own) or a positive multiple of 8 pixels."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
        raise BadInputError(f"resolution must be a positive multiple of 8 pixels (got {value}): use e.g. 512 for "
                             "SD1.x, or 0 for the model's own")
    return value


def check_mace_settings(s) -> None:
    """Every MACE setting (``erasure.mace.MaceSettings``), before stage 1 starts."""
    for k in ("images_per_concept", "sample_steps", "lora_steps", "lora_rank", "lora_batch", "lora_max_rounds"):
        check_count(k, getattr(s, k))
    check_learning_rate(s.lora_lr)
    # a fraction of the probe's start; 1 or more would stop after the first round anyway
    check_number("lora_target (0 = the preset's steps only)", s.lora_target, 0.0, 0.99)
    check_number("lam", s.lam, 0.0, low_open=True)
    for k in ("guidance", "preserve", "fuse_preserve"):
        check_number(k, getattr(s, k))
    check_number("grad_clip", s.grad_clip, 0.0, low_open=True)  # clipping to 0 would zero every gradient
    check_number("mask_threshold", s.mask_threshold, 0.0, 1.0)
    check_number("protect", s.protect, 0.0, 0.99999)  # 1 would leave no direction to change
    check_choice("kind", s.kind, tuple(CONCEPT_TEMPLATES))
    if s.concept_batch is not None:
        check_count("concept_batch", s.concept_batch)


def check_mace_inputs(backbone, concepts: list, settings) -> None:
    """MACE's concepts (``erasure.mace.Concept``) and settings, before stage 1: no duplicates, every concept and
    anchor fits the text encoder's context in every prompt that uses it, a finite model."""
    check_concepts([c.text for c in concepts])
    check_mace_settings(settings)
    for c in concepts:
        check_fits_context(backbone, c.text, [*c.prompts(), c.generation_prompt()])
        if c.anchor.strip():
            check_fits_context(backbone, c.anchor, c.anchor_prompts())
    check_model_finite(backbone.unet())


def check_fuse_inputs(backbone, items: list, lam: float, preserve: float, labels: list[str] | None = None) -> None:
    """The fusion's LoRAs (``(Concept or [Concept], ErasureWeights)`` pairs): each made for this model, finite, and
    touching at least one cross-attention K/V layer (the only layers the fusion combines). ``labels`` name the
    items in messages (default ``LoRA 1``, ``LoRA 2``, ...)."""
    if not items:
        raise BadInputError("no LoRAs to fuse: connect at least one erasure LoRA")
    if labels is not None and len(labels) != len(items):
        raise BadInputError(f"{len(labels)} labels for {len(items)} LoRAs")
    check_number("lam", lam, 0.0, low_open=True)
    check_number("preserve", preserve)
    kv = set(backbone.cross_attention_kv())
    for i, (group, weights) in enumerate(items):
        label = labels[i] if labels else f"LoRA {i + 1}"
        texts = check_concepts([c.text for c in (group if isinstance(group, list) else [group])])
        check_weights_finite(weights, label)
        check_weights_fit(weights, backbone.unet())
        if not set(weights.deltas) & kv:
            raise BadInputError(f"{label} ({', '.join(texts)[:80]}) changes no cross-attention key/value layer: "
                                 "the fusion combines only those; use LoRAs made by MACE or ANT (scope kv, lora or "
                                 "xattn)")


# -- models and LoRAs ------------------------------------------------------------------------------------------
def check_model_finite(unet: nn.Module) -> None:
    """Refuse a model whose weights hold NaN/inf: every result trained from it would be NaN."""
    for name, p in unet.named_parameters():
        try:
            bad = not bool(torch.isfinite(p.detach()).all())
        except (RuntimeError, TypeError):  # dtypes without isfinite (fp8 storage): convert this one tensor
            bad = not bool(torch.isfinite(p.detach().float()).all())
        if bad:
            raise BadInputError(f"the model's weight {name} contains NaN or infinite values: the checkpoint is damaged "
                                 "or was saved in a precision that overflowed; load another copy")


def check_lora_tensors(tensors: Mapping[str, torch.Tensor], source: str = "the LoRA", require_lora: bool = True
                       ) -> None:
    """A kohya-style LoRA as read from a file or a socket: every tensor is finite floating point, every
    ``lora_down`` has its ``lora_up`` of the same rank, alphas are single numbers. ``require_lora=False`` lets other
    adapter formats (LoHa, LoKr: ComfyUI's Load/Save LoRA sockets carry them too) through the pair checks."""
    bases = [k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")]
    if not bases and require_lora:
        raise BadInputError(f"{source} holds no LoRA (lora_up/lora_down) weights (PEFT lora_A/lora_B keys are not "
                             "supported: convert it to kohya keys)")
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise BadInputError(f"{source}: {k} is not a floating-point tensor: the file is damaged")
        if not bool(torch.isfinite(t).all()):
            raise BadInputError(f"{source}: {k} contains NaN or infinite values: the file is damaged or came from a "
                                 "training run that diverged; use another file")
    for base in bases:
        up, down, alpha = (tensors.get(base + s) for s in (".lora_up.weight", ".lora_down.weight", ".alpha"))
        if up is None:
            raise BadInputError(f"{source}: {base} has lora_down but no lora_up: the LoRA is incomplete")
        if up.dim() not in (2, 4) or down.dim() not in (2, 4) or up.shape[1] != down.shape[0]:
            raise BadInputError(f"{source}: {base} has lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)}, "
                                 "which do not multiply: the file is damaged")
        if alpha is not None and alpha.numel() != 1:
            raise BadInputError(f"{source}: {base}.alpha is not a single number: the file is damaged")


def check_weights_finite(weights, source: str = "the erasure") -> None:
    """Erasure weights (``ErasureWeights``) with NaN/inf would poison every layer they touch."""
    for name, d in weights.deltas.items():
        if not bool(torch.isfinite(d.matrix()).all()):
            raise BadInputError(f"{source}: the layer {name} contains NaN or infinite values: the file is damaged or "
                                 "came from a training run that diverged; use another file")


def check_weights_fit(weights, unet: nn.Module) -> None:
    """Every layer of ``weights`` (an ``ErasureWeights``) exists in ``unet`` with the same shape; otherwise the
    weights were made for another base model (SD1.5 vs SD2 vs SDXL)."""
    mods = dict(unet.named_modules())
    for name, d in weights.deltas.items():
        m = mods.get(name)
        if m is None or not isinstance(getattr(m, "weight", None), torch.Tensor):
            raise BadInputError(f"the erasure layer {name!r} does not exist in this model: it was made for another "
                                 "base model (e.g. SD1.5 vs SDXL); use it with the model it was made for")
        shape = tuple(d.matrix().shape)
        if shape != tuple(m.weight.shape):
            raise BadInputError(f"the erasure layer {name!r} has shape {shape}, this model's {tuple(m.weight.shape)}: "
                                 "it was made for another base model (e.g. SD1.5 vs SDXL); use it with the model it "
                                 "was made for")


def check_model_folder(folder: Path) -> None:
    """A diffusers folder this library can edit: an SD1.x/SD2.x/SDXL ``UNet2DConditionModel`` with its CLIP text
    encoder and tokenizer. Reads only the JSON configs, so a Flux, SD3 or video model is refused before loading."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnsupportedModelError(f"{folder} is not a folder; give a diffusers model folder or 'lab'")
    supported = ("concept erasure works on SD1.x, SD2.x and SDXL UNet models (diffusers folders with unet/, "
                 "text_encoder/ and tokenizer/)")
    index = _json(folder / "model_index.json")
    pipeline = str(index.get("_class_name", ""))
    if (folder / "transformer").is_dir() and not (folder / "unet").is_dir():
        raise UnsupportedModelError(f"{folder} is a {pipeline or 'transformer'} model (Flux, SD3 and other DiT "
                                    f"models have no UNet): {supported}")
    if not (folder / "unet").is_dir():
        raise UnsupportedModelError(f"{folder} has no unet/ subfolder: {supported}")
    unet_class = str(_json(folder / "unet" / "config.json").get("_class_name", "UNet2DConditionModel"))
    if unet_class != "UNet2DConditionModel":
        raise UnsupportedModelError(f"{folder}'s UNet is a {unet_class} (a video or other model), not a "
                                    f"text-to-image UNet2DConditionModel: {supported}")
    if not (folder / "text_encoder").is_dir() or not (folder / "tokenizer").is_dir():
        raise UnsupportedModelError(f"{folder} has no text_encoder/ or tokenizer/: erasure needs the model's CLIP "
                                    "text encoder; use the full pipeline folder, not a UNet-only one")


def _json(path: Path) -> dict:
    try:
        got = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


# -- files and metadata ----------------------------------------------------------------------------------------
def safe_filename(name: str, suffix: str = ".safetensors") -> str:
    """A user's file name as a plain name inside the target folder: no folders (``/``, ``\\``, ``..``), no leading
    dot, no characters outside letters, digits, ``._ -``, no Windows device names, at most ``MAX_FILENAME``
    characters, ending in ``suffix``."""
    base = os.path.basename(str(name or "").replace("\\", "/")).strip()
    if base.lower().endswith(suffix):
        base = base[: -len(suffix)]
    base = re.sub(r"[^A-Za-z0-9._ -]", "_", base).strip(" .")
    if not base.strip("_ -"):
        raise BadInputError("the file name is empty: type a name such as 'erased-nudity'")
    if base.split(".")[0].strip().lower() in _WINDOWS_RESERVED:
        base = "_" + base
    return base[: MAX_FILENAME - len(suffix)].rstrip(" .") + suffix


def path_inside(folder: str | Path, name: str) -> Path:
    """``folder / safe_filename(name)``, checked to resolve inside ``folder`` (symlinks included)."""
    root = Path(folder).resolve()
    path = (root / safe_filename(name)).resolve()
    if path.parent != root:
        raise BadInputError(f"the file name {name!r} points outside {root}: type a plain name such as 'erased-nudity'")
    return path


def concepts_from_metadata(metadata: Mapping[str, object], key: str = "erasure.concepts") -> list[str]:
    """The concepts listed in a file's metadata, treated as untrusted text: anything that is not a JSON list of
    strings gives ``[]``; entries are cleaned, empty ones and duplicates dropped, at most
    ``MAX_METADATA_CONCEPTS``."""
    raw = metadata.get(key, "[]") if isinstance(metadata, Mapping) else "[]"
    try:
        got = json.loads(raw) if isinstance(raw, str) else []
    except (ValueError, RecursionError):
        return []
    if not isinstance(got, list):
        return []
    out: list[str] = []
    for c in got[: 4 * MAX_METADATA_CONCEPTS]:
        t = clean_text(c) if isinstance(c, str) else ""
        if t and t.lower() not in {o.lower() for o in out}:
            out.append(t)
    return out[:MAX_METADATA_CONCEPTS]
