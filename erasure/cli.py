"""Command line: ``python -m erasure {demo,mace,ant,audit,lab} ...``.

``--model lab`` (the default everywhere) is the concept lab's model shipped in this package; ``mace``, ``ant`` and
``lab baseline`` also take a diffusers folder or a single-file SD1.x/SD2.x/SDXL ``.safetensors`` checkpoint. Each
command builds its own parser (``add_*_command``); the settings flags of ``ant`` and ``mace`` come from the fields
of their settings classes (``settings_flags``), so a flag's default and type are the library's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__, distributed, loss_curve
from .ant import (
    CHECKPOINTING,
    FUSE_LAM,
    FUSE_PRESERVE,
    FUSE_STRENGTH,
    PREDICTIONS,
    PRESERVE_LATENTS,
    SAMPLINGS,
    SCOPES,
    AntSettings,
    ant_multi,
)
from .ant import PRESETS as ANT_PRESETS
from .ant import ant as ant_one
from .audit import (
    LAB_PRESET,
    AuditPrompts,
    AuditSettings,
    WeightsModels,
    audit_units,
    embedding_tensors,
    find_concept_images,
    general_audit_prompts,
    grid_image,
    load_concept_images,
    run_audit,
    summary,
)
from .audit_text import SLOT, DiffusersSlotEncoder, fill
from .diffusers_backbone import load_diffusers
from .errors import BadInputError, ErasureOutOfMemoryError, TrainingDivergedError
from .esd import esd
from .files import atomic_save, atomic_write_png, atomic_write_text, cache_dir
from .lab import world
from .lab.classifier import PRESENCE_NAME, load_classifier, reads_as, train_classifier, train_presence
from .lab.demo import erase, lab_concept, lab_prior
from .lab.evaluate import EvalSettings, evaluate, format_table
from .lab.model import CLASSIFIER_FILE, is_lab_model
from .lab.train import train_lab_model
from .lora_files import load_lora, resolve_names, save_lora
from .loss_curve import curve_from_metadata
from .mace import PRESETS, MaceSettings, mace, schedule_text
from .prior import gram
from .progress import Progress
from .prompts import CONCEPT_TEMPLATES, Concept, prior_prompts, read_concepts_file, split_list
from .report import ReportSettings, add_to_metadata, erasure_report, report_concept, report_line, report_steps
from .single_file import load_single_file
from .user_images import find_user_images, load_user_data
from .validation import (
    check_anchors,
    check_ant_concepts_fit,
    check_concept,
    check_concepts,
    check_fits_context,
    check_fuse_strength,
    check_mace_inputs,
    check_weights_finite,
    concepts_from_metadata,
)

try:  # POSIX only; elsewhere the summary leaves the peak out
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]


# -- shared pieces -----------------------------------------------------------------------------------------------
def _parse_concepts(text: str | None) -> list[str]:
    """A ';'-separated flag's items; a flag holding only separators or spaces is refused."""
    if not text:
        return []
    items = split_list(text, ";")
    if not items:
        raise SystemExit("error: no concept given (only separators or spaces); separate concepts with ';', "
                         "e.g. \"circle; red\"")
    return items


def _peak_memory() -> str:
    if torch.cuda.is_available():
        return f"peak GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    if resource is None:
        return "peak RSS not measured on this system"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"


def _write_loss_png(weights, lora_path: str | Path, title: str) -> str:
    """The run's loss curve as NAME.loss.png beside the LoRA (from the curve its metadata holds); the words that
    name it in the closing line, or nothing when the method has no loss (closed-form only)."""
    curve = curve_from_metadata(weights.metadata)
    if not curve or not curve["loss"]:
        return ""
    path = loss_curve.write_png(loss_curve.png_beside(lora_path), curve["loss"], title,
                                [(label, start) for label, start in curve.get("segments", [])], curve.get("steps"))
    return f"; loss curve {path}"


def _report(args: argparse.Namespace, backbone, weights, concepts: list, kind: str = "object",
            resolution: int | None = None) -> dict | None:
    """The erasure report (``erasure/report.py``) of ``weights`` on ``backbone``, stored in their metadata
    (``erasure.report``) before the file is written; None with ``--no-report``. ``concepts``: names or
    :class:`Concept` items; on the lab, the lab's templates and preservation captions."""
    if getattr(args, "no_report", False):
        return None
    lab = is_lab_model(getattr(args, "model", "lab"))
    names = [c.text if isinstance(c, Concept) else c for c in concepts]
    if lab:
        items = [lab_concept(n) for n in names]
        unrelated = world.prior_prompts(exclude=names)
        s = ReportSettings(batch_size=64)
    else:
        items = [c if isinstance(c, Concept) else report_concept(c, kind) for c in concepts]
        unrelated = prior_prompts(n=100, exclude=names)
        s = ReportSettings(guidance=7.5, batch_size=4, resolution=resolution)
    n_prompts = sum(min(len(dict.fromkeys(c.prompts())), s.concept_prompts) for c in items)
    with _bar(report_steps(n_prompts, s.unrelated_prompts, s), "erasure report") as bar:
        report = erasure_report(backbone, weights, items, unrelated, s, progress=_progress(bar))
    add_to_metadata(weights, report)
    return report


def _report_summary(report: dict | None) -> str:
    return report_line(report) if report is not None else "erasure report skipped (--no-report)"


def _add_report_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-report", action="store_true", help="skip the erasure report (how much of the concept's "
                   "guidance is left, how far unrelated prompts moved: a few hundred UNet evaluations, stored in the "
                   "LoRA's metadata as erasure.report)")


def _bar(total: int | None, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, disable=None)


def _progress(bar: tqdm) -> Progress:
    def grow(n: int) -> None:
        if bar.total is not None:
            bar.total += n
            bar.refresh()

    return Progress(update=bar.update, log=bar.write, grow=grow)


def settings_flags(p: argparse.ArgumentParser, defaults: object, helps: dict[str, str],
                   flags: dict[str, str] | None = None, choices: dict[str, tuple[str, ...]] | None = None) -> None:
    """One flag per settings field named in ``helps`` (``--field-name``, or ``flags[field]``), typed by the field's
    annotation, default ``None`` (= the settings' own value, shown in the help as ``{default}``)."""
    for f in fields(defaults):  # type: ignore[arg-type]
        if f.name not in helps:
            continue
        name = "--" + (flags or {}).get(f.name, f.name).replace("_", "-")
        text = helps[f.name].format(default=getattr(defaults, f.name))
        kind = str(f.type)
        if kind.startswith("bool"):
            p.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif (choices or {}).get(f.name):
            p.add_argument(name, dest=f.name, choices=choices[f.name], help=text)
        else:
            typ = int if kind.startswith("int") else float if kind.startswith("float") else str
            p.add_argument(name, dest=f.name, type=typ, help=text)


def _given(args: argparse.Namespace, defaults: object) -> dict[str, object]:
    """The settings fields that have a flag on this command, as given (``None`` = not given)."""
    return {f.name: getattr(args, f.name) for f in fields(defaults) if hasattr(args, f.name)}  # type: ignore[arg-type]


MODEL_HELP = ("'lab' or 'lab-clip' (the concept lab's models, docs/lab.md), a diffusers folder, or a single-file "
              "SD1.x/SD2.x/SDXL checkpoint (.safetensors, original ldm keys, as ComfyUI/A1111 use)")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lab", help=MODEL_HELP)
    p.add_argument("--tokenizer", help="single files: a folder with CLIP's vocab.json + merges.txt (e.g. a diffusers "
                   "model's tokenizer/ or ComfyUI's comfy/sd1_tokenizer); default: the built-in copy of CLIP's "
                   "tokenizer (identical)")
    p.add_argument("--model-prediction", choices=("eps", "v"), help="single files: what the model predicts (default: "
                   "eps for SD1.x/SDXL, or v when the file carries ComfyUI's v_pred marker; SD2.x is guessed from "
                   "the weights as ComfyUI does, and the summary says so: 768-v models are v)")
    p.add_argument("--device", default="cpu")


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of the evaluation sampler")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--seeds", type=int, default=8, help="seeds per prompt")


def _eval_settings(args: argparse.Namespace) -> EvalSettings:
    return EvalSettings(steps=args.sample_steps, guidance=args.guidance, seeds_own=args.seeds)


def _load_model(args: argparse.Namespace, need_vae: bool = False):
    """The backbone for ``--model``: 'lab', a diffusers folder, or a single .safetensors/.ckpt file (the latter
    refused unopened). Single files print what was detected and assumed (``args.model_note`` keeps it for the run's
    closing summary); their VAE is loaded only if ``need_vae``."""
    path = Path(args.model).expanduser()
    if is_lab_model(args.model) or path.is_dir():
        for flag in ("tokenizer", "model_prediction"):
            if getattr(args, flag, None):
                raise SystemExit(f"error: --{flag.replace('_', '-')} applies to single-file checkpoints; a diffusers "
                                 "folder brings its own tokenizer/ and scheduler/")
        return load_diffusers(args.model, device=args.device)
    loaded = load_single_file(path, device=args.device, tokenizer=getattr(args, "tokenizer", None),
                              prediction=getattr(args, "model_prediction", None), with_vae=need_vae)
    args.model_note = loaded.summary()
    print(f"model: {args.model_note}", flush=True)
    return loaded.backbone


def _load_lab(model: str):
    if not is_lab_model(model):
        raise SystemExit("error: `lab` commands evaluate the lab's models only (--model lab or lab-clip); the lab "
                         "classifier cannot judge other models")
    return load_diffusers(model), load_classifier(CLASSIFIER_FILE)


def _print_model_note(args: argparse.Namespace) -> None:
    if getattr(args, "model_note", None):
        print(f"model: {args.model_note}")


def _check_out(out: str) -> None:
    """Before any work: the LoRA file to write must be a .safetensors file name, not a folder."""
    if not str(out).endswith(".safetensors"):
        raise ValueError(f"--out {out!r} must end in .safetensors (the only format written)")
    if Path(out).is_dir():
        raise ValueError(f"--out {out!r} is a folder: give a file name ending in .safetensors")


def _export_rank(weights, requested: int | None) -> int | None:
    """The user's ``--export-rank`` (0 = exact), else the weights' own choice (exact up to 256 MB, else 64)."""
    if requested is not None:
        return requested or None
    return weights.export_rank()


# -- demo --------------------------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    concept = args.concept
    out = Path(args.out)
    backbone, clf = _load_lab("lab")
    s = _eval_settings(args)
    print(f"erasure {__version__} demo: erase {concept!r} from the concept lab's model with {args.method} "
          "(--method esd|mace|cfr for the others)")
    t0 = time.time()
    before = evaluate(backbone, clf, [concept], None, s)
    with _bar(None, f"erasing {concept}") as bar:
        weights = erase(backbone, concept, args.method, steps=args.steps, seed=args.seed, progress=_progress(bar))
    out.mkdir(parents=True, exist_ok=True)
    weights.metadata["erasure.base_model"] = backbone.fingerprint()
    report = _report(args, backbone, weights, [concept])
    save_lora(weights, out / f"erase-{concept}.safetensors")
    curve = _write_loss_png(weights, out / f"erase-{concept}.safetensors", f"{args.method} loss per training step")
    after = evaluate(backbone, clf, [concept], weights, s, grid=out / "grid.png")
    print(format_table(after, before))
    print(f"before: efficacy {before['efficacy']:.3f}  after: efficacy {after['efficacy']:.3f}")
    print(_report_summary(report))
    atomic_write_text(out / "report.json", json.dumps({"before": before, "after": after, "erasure_report": report},
                                                      indent=2))
    print(f"wrote {out / f'erase-{concept}.safetensors'}, {out / 'grid.png'}, {out / 'report.json'}{curve} "
          f"in {time.time() - t0:.0f} s ({_peak_memory()})")
    return 0


def add_demo_command(sub) -> None:
    demo = sub.add_parser("demo", help="erase one concept from the lab model and show before/after")
    demo.add_argument("--concept", default="circle", help="a lab concept: a shape, colour or style")
    demo.add_argument("--method", choices=("ant", "esd", "cfr", "mace"), default="ant",
                      help="ant: ANT (the default method); esd: the anchor-free baseline; cfr: MACE's closed-form "
                      "refinement alone; mace: all of MACE")
    demo.add_argument("--steps", type=int, help="training iterations (ant: 250; esd: 150; mace: the preset's LoRA "
                      "steps)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="out/demo")
    _add_eval_flags(demo)
    _add_report_flag(demo)
    demo.set_defaults(func=_demo)


# -- mace --------------------------------------------------------------------------------------------------------
MACE_FLAGS = {"images_per_concept": "images", "lora_steps": "steps", "lora_lr": "lr", "lora_rank": "rank",
              "use_masks": "masks", "lora_target": "target", "lora_max_rounds": "max-rounds"}
MACE_HELP = {
    "images_per_concept": "generated images per concept (default {default})",
    "sample_steps": "DDIM steps when generating them (default {default})",
    "guidance": "guidance when generating them (default {default})",
    "use_masks": "restrict the attention loss to the concept's mask (the reference's objects and people; styles "
                 "never use masks); default --no-masks: the whole image (docs/mace.md#where-and-when-the-loss-looks)",
    "mask_threshold": "threshold of the normalised attention map (default {default})",
    "lam": "closed-form regulariser (default: the preset's)",
    "lam_relative": "read --lam relative to this model's text-token energy, as the reference's values read on SD1.x "
                    "(default); --no-lam-relative: the same absolute number on every model",
    "preserve": "prior-preservation weight of the refinement (default: the preset's)",
    "fuse_preserve": "prior-preservation weight of the fusion (default: the preset's)",
    "lora_steps": "LoRA training steps per concept (default: the preset's)",
    "lora_lr": "LoRA learning rate to start from (default: the preset's)",
    "lora_target": "train each LoRA in rounds of --steps until its attention loss on a fixed probe is at most this "
                   "fraction of its start, raising the learning rate after a round that stalled (default "
                   "{default}); 0: --steps only, as the reference",
    "lora_max_rounds": "at most this many rounds of --steps per concept (default {default})",
    "lora_rank": "LoRA rank per concept (MACE: {default})",
    "lora_batch": "images per LoRA step (default {default})",
    "grad_clip": "LoRA gradient-norm clip (default {default})",
    "suppress_end": "the attention loss also suppresses the end token and padding (the reference's positions); "
                    "default: only where they carry the concept (measured per concept)",
    "suppress_following": "the attention loss also suppresses the words between the concept and the end token "
                          "(\"a green *shape*\": a causal text encoder carries the concept into them; default); "
                          "--no-suppress-following: the reference's positions",
    "protect": "keep the K/V change off the text-embedding directions holding this fraction of the prior prompts' "
               "token energy, e.g. 0.999: each LoRA trained in the other directions, the result projected "
               "(0 = off, the reference; docs/mace.md#protect; default {default})",
    "augment": "each LoRA step uses one of the concept's prompt templates (the reference; default); "
               "--no-augment: the generation prompt only",
    "importance_sampling": "LoRA timesteps from MACE's p(t), median ~300 (the reference's objects, people and "
                           "styles); default --no-importance-sampling: uniform, as the reference's nudity config",
    "concept_batch": "concepts trained (and their images generated) together in one UNet batch; the same result as "
                     "one at a time (default: automatic, 4 on the CPU, from free memory on a GPU)",
    "seed": "(default {default})",
}


def _mace(args: argparse.Namespace) -> int:
    if bool(args.concepts) == bool(args.concepts_file):
        raise SystemExit("error: give --concepts \"a; b; c\" or --concepts-file FILE (one of them)")
    lines = read_concepts_file(args.concepts_file) if args.concepts_file else None
    concepts = [ln.text for ln in lines] if lines is not None else _parse_concepts(args.concepts)
    if not concepts:
        raise SystemExit("error: no concepts given; use --concepts \"a; b; c\"")
    concepts = check_concepts(concepts)
    anchors = _parse_concepts(args.anchors) if args.anchors else []
    check_anchors(concepts, anchors)
    _check_out(args.out)
    s = PRESETS[args.preset].override(**_given(args, MaceSettings()))
    s.validate()
    if args.image_dir:
        find_user_images(args.image_dir, concepts)  # the layout's errors before a long model load
    distributed.init_from_env(args.device)  # under torchrun: before the model, so "cuda" is this rank's GPU
    main = distributed.is_main()
    backbone = _load_model(args, need_vae=bool(args.image_dir))
    lab = is_lab_model(args.model)
    items = []
    for i, c in enumerate(concepts):
        anchor = anchors[min(i, len(anchors) - 1)] if anchors else None
        if lines is not None and lines[i].anchor is not None:
            anchor = lines[i].anchor
        if lab:
            items.append(lab_concept(c, anchor))
        else:
            kind = lines[i].kind if lines is not None and lines[i].kind else s.kind
            items.append(Concept(c, anchor or s.anchor, kind))
    check_mace_inputs(backbone, items, s)  # before the prior, which costs a text-encoder pass per prompt
    user_data = (load_user_data(backbone, args.image_dir, concepts, Progress(log=print)) if args.image_dir
                 else {})
    prior = (lab_prior(backbone, concepts) if lab
             else gram(backbone, prior_prompts(exclude=concepts, extra_file=args.prior_file), cache_dir()))
    mine = [concepts[i] for i in distributed.owned(len(concepts))]  # all of them in one process
    total = sum((0 if c in user_data else s.sample_steps) + s.lora_steps for c in mine)
    t0 = time.time()
    with _bar(total, "MACE") if main else tqdm(disable=True) as bar:
        res = mace(backbone, items, s, prior, user_data=user_data, progress=_progress(bar) if main else Progress(),
                   work_dir=args.work_dir)
    if not main:  # rank 0 writes the file and the summary
        distributed.barrier()
        return 0
    res.weights.metadata["erasure.base_model"] = backbone.fingerprint()
    elapsed = time.time() - t0
    report = _report(args, backbone, res.weights, items)
    err = save_lora(res.weights, args.out, rank=args.export_rank)
    curve = _write_loss_png(res.weights, args.out, "MACE attention loss per LoRA step")
    print(f"MACE erased {', '.join(repr(c) for c in concepts)} (anchors: "
          f"{', '.join(repr(c.anchor) for c in items)}) in {elapsed:.1f} s; "
          f"{res.unet_evaluations} UNet evaluations in {res.unet_calls} UNet calls ({res.concept_batch} "
          f"concept(s) per batch); {_peak_memory()}")
    for c, lr in zip(concepts, res.loras, strict=True):
        where = ("concept tokens, end token and padding" if lr.suppress_end else "concept tokens only")
        where += ", following words" if s.suppress_following else ""
        print(f"  {c!r}: attention loss ({where}) {_loss_span(lr)}; {schedule_text(lr.schedule, s)}")
    if distributed.world_size() > 1 or args.work_dir:
        print(f"  {distributed.world_size()} process(es); work directory {args.work_dir or '(none)'}")
    print(_report_summary(report))
    print(f"wrote {args.out} ({len(res.weights.deltas)} K/V matrices; LoRA relative error {err:.1e}){curve}")
    _print_model_note(args)
    distributed.barrier()  # the other ranks exit after the file is written
    return 0


def _loss_span(lora) -> str:
    if lora.probe is None:
        return "(not measured)"
    a, b = lora.probe
    return f"{a:.3g} -> {b:.3g} on a fixed probe ({b / a:.0%} of the start)" if a > 0 else f"{a:.3g} -> {b:.3g}"


def add_mace_command(sub) -> None:
    mc = sub.add_parser("mace", help="MACE: mass concept erasure -> LoRA file")
    _add_model_flags(mc)
    mc.add_argument("--concepts", help="';'-separated, e.g. \"circle; red; striped\"")
    mc.add_argument("--concepts-file", metavar="FILE",
                    help="one concept per line: 'concept | kind | anchor' (kind and anchor optional; '#' comments)")
    mc.add_argument("--work-dir", metavar="DIR",
                    help="keep each finished concept here; rerun the same command to resume after a stop")
    mc.add_argument("--anchors", help="';'-separated: one for all concepts or one per concept (default: preset's)")
    mc.add_argument("--preset", choices=sorted(PRESETS), default="object")
    mc.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    mc.add_argument("--image-dir", help="your own images instead of generated ones: DIR/<concept>/NAME.png with an "
                    "optional DIR/<concept>/NAME.mask.png (white = concept); concepts without a folder are generated")
    settings_flags(mc, MaceSettings(), MACE_HELP, MACE_FLAGS)
    mc.add_argument("--prior-file", help="extra prior-preservation prompts, one per line")
    mc.add_argument("--export-rank", type=int, help="truncate the saved LoRA to this rank (default: exact)")
    _add_report_flag(mc)
    mc.set_defaults(func=_mace)


# -- ant ---------------------------------------------------------------------------------------------------------
ANT_FLAGS = {"lora_rank": "rank"}
ANT_HELP = {
    "kind": "prompt templates (default {default})",
    "lr": "Adam step size; relative to each layer's weight RMS unless --no-lr-relative (default {default})",
    "lr_relative": "scale each layer's step by the RMS of its weights, so --lr means the same relative change on "
                   "any model (default; --no-lr-relative: the same absolute step everywhere, as the reference)",
    "batch_size": "trajectories per step (default {default})",
    "trajectory_steps": "DDIM steps of the trajectories (default {default})",
    "early_steps": "early (kept) steps of them (default {default})",
    "guidance": "guidance of the trajectories (default {default})",
    "eta": "strength of the guidance targets (default {default})",
    "a1": "weight of the unconditional preservation (default {default})",
    "a2": "weight of the early stage (default {default})",
    "preserve": "weight of the preservation of prompts without the concept (the project's addition; 0 = the "
                "paper's loss; default {default})",
    "prediction": "regressed prediction (default {default})",
    "concept_batch": "--concepts with --scope lora: this many concepts' LoRAs trained together, one training forward "
                     "per step; the same result as one at a time (default {default})",
    "protect": "keep the K/V edit off the text-embedding directions holding this fraction of unrelated prompts' "
               "token energy: each step's gradient and the edit projected (0 = off; scopes kv, lora, xattn; "
               "docs/ant.md#protect; default {default})",
    "preserve_latents": "where the preservation prompts are evaluated: at the concept's latents (concept) or at "
                        "their own images from the frozen model (own) (default {default})",
    "sampling": "where training latents come from: on-policy (the edited model's trajectories) or cached (frozen "
                "once) (default {default})",
    "trajectories": "trajectory seeds x augmentations (default {default})",
    "refresh_every": "cached sampling: regenerate trajectories with the edited model every N steps (default "
                     "{default}; 0: never)",
    "scope": "what is trained, one concept (default {default})",
    "saliency_fraction": "kept per saliency map (default {default})",
    "saliency_maps": "maps intersected (default {default})",
    "lora_rank": "LoRA rank (scope lora and --concepts; default {default})",
    "resolution": "training resolution in pixels (default: the model's)",
    "gradient_checkpointing": "recompute the UNet's activations in backward instead of keeping them (less memory, "
                              "about one extra forward per step; auto: on for SDXL-sized UNets or above 512 px; "
                              "default {default})",
    "adversarial": "adversarial erasure: learned tokens of a concept-inversion attack run inside training (0 = off; "
                   "needs --protect 0; default {default}; docs/audit.md#adversarial-erasure)",
    "adversarial_every": "erasure steps between attack rounds (default {default})",
    "adversarial_steps": "attack steps per round (default {default})",
    "adversarial_lr": "the attack's step in embedding-table std units (default {default})",
    "adversarial_weight": "weight of the learned-token erase term (default {default})",
    "seed": "(default {default})",
    "calibrate": "after training, raise the edit's strength (at most 2x) until the concept's guidance left is at "
                 "most 0 at the mid and late steps, measured by the erasure report (one concept; off by default; "
                 "docs/ant.md#calibrate)",
}
ANT_CHOICES = {"kind": tuple(sorted(CONCEPT_TEMPLATES)), "prediction": PREDICTIONS, "sampling": SAMPLINGS,
               "preserve_latents": PRESERVE_LATENTS,
               "scope": SCOPES, "gradient_checkpointing": CHECKPOINTING}


def _ant_settings(args: argparse.Namespace) -> AntSettings:
    """The ANT settings of the command line; ``--steps`` and ``--reuse`` set the many-concept path's own fields
    with ``--concepts``."""
    many = bool(args.concepts)
    given = _given(args, AntSettings()) | {"steps": None if many else args.steps,
                                           "multi_steps": args.steps if many else None,
                                           "reuse": None if many else args.reuse,
                                           "multi_reuse": args.reuse if many else None}
    return ANT_PRESETS[args.preset].override(**given)


def _ant(args: argparse.Namespace) -> int:
    if bool(args.concept) == bool(args.concepts):
        raise SystemExit("error: give either --concept \"one concept\" or --concepts \"a; b; c\"")
    concepts = check_concepts(_parse_concepts(args.concepts) if args.concepts else _parse_concepts(args.concept))
    synonyms = _parse_concepts(args.synonyms) if args.synonyms else []
    _check_out(args.out)
    s = _ant_settings(args)
    s.validate()
    if args.concepts:
        check_fuse_strength(args.fuse_strength)
    backbone = _load_model(args)
    lab = is_lab_model(args.model)
    templates = {c: world.concept_templates(c, with_other_concepts=False) for c in concepts
                 if lab and c in world.SYNONYMS}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    if len(concepts) == 1 and not args.concepts:
        with _bar(s.steps, "ANT") as bar:
            r = ant_one(backbone, concepts[0], s, synonyms=tuple(synonyms), templates=templates.get(concepts[0]),
                        preserve_prompts=world.prior_prompts(exclude=concepts) if lab else
                        prior_prompts(exclude=[*concepts, *synonyms], extra_file=args.prior_file),
                        progress=_progress(bar))
        weights, fwd, bwd = r.weights, r.unet_forwards, r.unet_backwards
        trained = f"{r.trainable_params:,} parameters trained of {r.total_params:,} in scope"
        if r.selected_fraction is not None:
            trained += f" (saliency kept {r.selected_fraction:.2%})"
    else:
        if synonyms:
            raise SystemExit("error: --synonyms goes with --concept (one concept); for several concepts, list "
                             "each synonym as a concept of its own")
        check_ant_concepts_fit(backbone, concepts, s.kind, templates)  # before the prior (a pass per prompt)
        prior = (lab_prior(backbone, concepts) if lab
                 else gram(backbone, prior_prompts(exclude=concepts, extra_file=args.prior_file), cache_dir()))
        with _bar(s.multi_steps * len(concepts), "ANT") as bar:
            m = ant_multi(backbone, concepts, s, prior, templates=templates, lam=args.lam,
                          preserve=args.fuse_preserve, strength=args.fuse_strength,
                          preserve_prompts=world.prior_prompts(exclude=concepts) if lab else
                          prior_prompts(exclude=concepts, extra_file=args.prior_file),
                          progress=_progress(bar))
        weights, fwd, bwd = m.weights, m.unet_forwards, m.unet_backwards
        kind = f"rank-{s.lora_rank} LoRA" if s.scope == "lora" else "dense K/V"
        trained = (f"{sum(r.trainable_params for r in m.per_concept):,} parameters trained ({len(concepts)} "
                   f"concepts, {kind} each), fused into {len(weights.deltas)} K/V matrices")
    weights.metadata["erasure.base_model"] = backbone.fingerprint()
    elapsed = time.time() - t0
    report = _report(args, backbone, weights, concepts, s.kind, s.resolution)
    err = save_lora(weights, args.out, rank=_export_rank(weights, args.export_rank))
    curve = _write_loss_png(weights, args.out, "ANT loss per training step")
    print(f"ANT erased {', '.join(repr(c) for c in concepts)} in {elapsed:.1f} s: {trained}; "
          f"{fwd:,} UNet forwards, {bwd:,} backwards; {_peak_memory()}")
    print(_report_summary(report))
    print(f"wrote {args.out} ({len(weights.deltas)} layers; LoRA relative error {err:.1e}){curve}")
    _print_model_note(args)
    return 0


def add_ant_command(sub) -> None:
    d = AntSettings()
    an = sub.add_parser("ant", help="ANT: trajectory-aware erasure -> LoRA file")
    _add_model_flags(an)
    an.add_argument("--concept", help="one concept (dense cross-attention K/V finetuning by default; --scope saliency "
                    "for the paper's weight-saliency mask)")
    an.add_argument("--concepts", help="';'-separated: one ANT edit per concept, fused in closed form")
    an.add_argument("--synonyms", help="';'-separated synonyms of --concept, used as prompt augmentations")
    an.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    an.add_argument("--preset", choices=sorted(ANT_PRESETS), default="default",
                    help="default: the library's defaults; paper: the published configuration (saliency mask, "
                    "conditional prediction, 50-step trajectories, absolute lr 5e-4); robust: harder to revive "
                    "with a learned token on one lab model, not on the other (audit it), more change to unrelated "
                    "images (docs/audit.md#robust); other flags "
                    "override it")
    an.add_argument("--steps", type=int, help=f"training steps per concept (default {d.steps}; with --concepts "
                    f"{d.multi_steps})")
    an.add_argument("--reuse", type=int, help="on-policy: training steps each regenerated trajectory serves "
                    f"(default {d.reuse}; with --concepts {d.multi_reuse}: a new trajectory every step)")
    settings_flags(an, d, ANT_HELP, ANT_FLAGS, ANT_CHOICES)
    an.add_argument("--lam", type=float, default=FUSE_LAM, help=f"fusion regulariser (--concepts; default {FUSE_LAM})")
    an.add_argument("--fuse-preserve", type=float, default=FUSE_PRESERVE,
                    help=f"fusion prior-preservation weight (default {FUSE_PRESERVE})")
    an.add_argument("--fuse-strength", type=float, default=FUSE_STRENGTH,
                    help=f"each concept's edit enters the fusion times this (--concepts; default {FUSE_STRENGTH})")
    an.add_argument("--prior-file", help="extra prior-preservation prompts (preservation term and fusion), one "
                    "per line")
    an.add_argument("--export-rank", type=int, help="LoRA rank of the file (0: exact; default: exact up to "
                    "256 MB, else 64)")
    _add_report_flag(an)
    an.set_defaults(func=_ant)


# -- lab ---------------------------------------------------------------------------------------------------------
def _lab_eval(args: argparse.Namespace) -> int:
    erased = _parse_concepts(args.erased)
    backbone, clf = _load_lab(args.model)
    weights = None
    if args.lora:
        weights = resolve_names(load_lora(args.lora), dict(backbone.unet().named_modules()))
        if not erased:
            erased = concepts_from_metadata(weights.metadata)
    report = evaluate(backbone, clf, erased, weights, _eval_settings(args), Path(args.grid) if args.grid else None,
                      use_cache=not args.no_cache)
    print(format_table(report))
    print(f"{report['seconds']:.1f} s")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
    if args.grid:
        print(f"grid: {args.grid}")
    return 0


def _lab_baseline(args: argparse.Namespace) -> int:
    backbone = _load_model(args)
    t0 = time.time()
    with _bar(args.steps, f"ESD {args.concept}") as bar:
        w = esd(backbone, args.concept, iterations=args.steps, lr=args.lr, scope=args.scope, seed=args.seed,
                progress=_progress(bar))
    w.metadata["erasure.base_model"] = backbone.fingerprint()
    err = save_lora(w, args.out)
    print(f"ESD erased {args.concept!r} in {time.time() - t0:.1f} s, {_peak_memory()}; "
          f"wrote {args.out} (LoRA relative error {err:.1e})")
    _print_model_note(args)
    return 0


def _lab_train(args: argparse.Namespace) -> int:
    train_lab_model(Path(args.out), steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    save_every=args.save_every, resume=Path(args.resume) if args.resume else None,
                    text_encoder=Path(args.text_encoder) if args.text_encoder else None,
                    stop_after=args.stop_after, log=lambda m: print(m, flush=True))
    return 0


def _lab_train_text_encoder(args: argparse.Namespace) -> int:
    from .lab.clip_train import train_text_encoder

    train_text_encoder(Path(args.out), steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       log=lambda m: print(m, flush=True))
    return 0


def _lab_train_classifier(args: argparse.Namespace) -> int:
    log = lambda m: print(m, flush=True)  # noqa: E731
    out = Path(args.out)
    if not args.presence_only:
        train_classifier(out, steps=args.steps, seed=args.seed, log=log)
    # then the shape-presence net, beside it (docs/lab.md#empty-images)
    train_presence(out.with_name(PRESENCE_NAME), seed=args.seed, log=log)
    return 0


def add_lab_command(sub) -> None:
    lab = sub.add_parser("lab", help="the concept lab: train, evaluate, baseline")
    labsub = lab.add_subparsers(dest="lab_command", required=True)

    ev = labsub.add_parser("eval", help="evaluate the lab model, optionally with an erasure LoRA")
    ev.add_argument("--model", default="lab", help="'lab' or 'lab-clip' (the lab model with a CLIP-like text "
                    "encoder; docs/lab.md#the-second-lab-model-lab-clip)")
    ev.add_argument("--lora", help="erasure LoRA (.safetensors) to apply")
    ev.add_argument("--erased", help="erased concepts, ';'-separated (default: those in the LoRA's metadata)")
    ev.add_argument("--json", help="write the report here")
    ev.add_argument("--grid", default="out/lab-eval-grid.png", help="PNG grid of original vs edited")
    ev.add_argument("--no-cache", action="store_true", help="regenerate the original model's images")
    _add_eval_flags(ev)
    ev.set_defaults(func=_lab_eval)

    bl = labsub.add_parser("baseline", help="ESD-style anchor-free baseline erasure -> LoRA file")
    _add_model_flags(bl)
    bl.add_argument("--concept", required=True)
    bl.add_argument("--steps", type=int, default=150)
    bl.add_argument("--lr", type=float, default=1e-3)
    bl.add_argument("--scope", choices=("xattn", "unet"), default="xattn")
    bl.add_argument("--seed", type=int, default=0)
    bl.add_argument("--out", required=True)
    bl.set_defaults(func=_lab_baseline)

    tr = labsub.add_parser("train", help="train (or with --resume, continue training) the lab model; 3,000 steps take "
                           "about 55 minutes on 2 CPU cores")
    tr.add_argument("--out", default="runs/lab-model")
    tr.add_argument("--steps", type=int, default=4500)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--lr", type=float, default=5e-4)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--save-every", type=int, default=250)
    tr.add_argument("--resume", help="continue training from a saved lab model folder")
    tr.add_argument("--text-encoder", help="a folder from 'lab train-text-encoder': its text encoder is used frozen "
                    "(SD's UNet trained on a frozen CLIP); with --resume only the UNet comes from that folder")
    tr.add_argument("--stop-after", type=int, help="save and stop after this many steps, the learning-rate schedule "
                    "still spanning --steps (what the committed lab-clip model did)")
    tr.set_defaults(func=_lab_train)

    tt = labsub.add_parser("train-text-encoder", help="train a CLIP-like lab text encoder contrastively (end token "
                           "summarises the prompt); 1,500 steps take about 15 minutes on 2 CPU cores")
    tt.add_argument("--out", default="runs/lab-text-encoder")
    tt.add_argument("--steps", type=int, default=1500)
    tt.add_argument("--batch-size", type=int, default=256)
    tt.add_argument("--lr", type=float, default=1e-3)
    tt.add_argument("--seed", type=int, default=0)
    tt.set_defaults(func=_lab_train_text_encoder)

    tc = labsub.add_parser("train-classifier",
                           help="train the lab classifier and its shape-presence net (about 15 minutes on a CPU)")
    tc.add_argument("--out", default=str(CLASSIFIER_FILE))
    tc.add_argument("--steps", type=int, default=1500,
                    help="the classifier's training steps (the shape-presence net always trains 800, as committed)")
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--presence-only", action="store_true",
                    help="train only the shape-presence net, beside the classifier at --out (about 4 minutes)")
    tc.set_defaults(func=_lab_train_classifier)


# -- audit -------------------------------------------------------------------------------------------------------
AUDIT_HELP = {
    "steps": "concept-inversion steps (default {default})",
    "lr": "inversion step size, in units of the token embeddings' standard deviation (default {default})",
    "batch_size": "images per inversion step (default {default})",
    "tokens": "learned token embeddings (default {default})",
    "init_word": "the learned tokens start at this word's embedding ('' = random tokens; default {default})",
    "prefix_tokens": "soft prefix embeddings of the prefix attack (default {default})",
    "prefix_steps": "prefix-attack iterations on one image (default {default})",
    "prefix_lr": "prefix-attack step size (default {default})",
    "generated_images": "without --images: concept images the original model generates for the inversion "
                        "(default {default})",
    "heldout": "further generated images held out for the recoverability score (default {default})",
    "t_min": "attacks and held-out loss use timesteps in [t_min*T, T) (default {default})",
    "sample_steps": "DDIM steps of every sampling (default: lab 10, else {default})",
    "guidance": "guidance of every sampling (default: lab 5.0, else {default})",
    "seeds": "seeds per evaluation prompt (default: lab 16, else {default})",
    "resolution": "sampling resolution in pixels (default: the model's)",
    "seed": "(default {default})",
}


def _lab_audit_inputs(concept: str) -> tuple:
    """``(AuditPrompts, judge)``: the lab's prompts for ``concept``, and its classifier as the judge (images -> does
    the head of the concept's kind read the concept; for a shape, in an image that has a shape at all; an image with no
    shape has its field's colour: ``classifier.reads_as``)."""
    if concept not in world.ALL_CONCEPTS:
        raise BadInputError(f"{concept!r} is not a lab concept; lab concepts are {', '.join(world.ALL_CONCEPTS)}")
    prompts = AuditPrompts(
        templates=tuple(t.replace("{c}", SLOT) for t in world.concept_templates(concept, with_other_concepts=False)),
        eval_templates=tuple(" ".join(SLOT if w == concept else w for w in p.split())
                             for p in world.concept_prompts(concept)),
        generation=tuple(world.concept_prompts(concept)))
    clf = load_classifier(CLASSIFIER_FILE)
    kind, index = world.concept_kind(concept), world.concept_index(concept)

    def judge(images: torch.Tensor) -> torch.Tensor:
        # an empty image shows no shape, whatever the shape head reads, and its field's colour
        # (docs/lab.md#empty-images)
        return reads_as(clf.predict(images), kind, index)

    return prompts, judge


def _audit(args: argparse.Namespace) -> int:
    concept = check_concept(args.concept)
    lab = is_lab_model(args.model)
    base = AuditSettings().override(**LAB_PRESET) if lab else AuditSettings()
    s = base.override(**_given(args, AuditSettings()))
    s.validate()
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInputError(f"--out-dir {out_dir} is a file: give a folder (it is created if missing)")
    if args.json and (not args.json.endswith(".json") or Path(args.json).is_dir()):
        raise BadInputError(f"--json {args.json!r} must be a file name ending in .json")
    lora = load_lora(args.lora)  # a missing, damaged or non-safetensors file is refused before the model loads
    files = find_concept_images(args.images, concept) if args.images else None
    prompts, judge = _lab_audit_inputs(concept) if lab else (general_audit_prompts(concept, args.kind), None)
    backbone = _load_model(args, need_vae=True)
    weights = resolve_names(lora, dict(backbone.unet().named_modules()))
    check_weights_finite(weights, Path(args.lora).name)
    check_fits_context(backbone, concept, [*prompts.generation, *(fill(t, concept) for t in prompts.eval_templates)])
    images = load_concept_images(backbone, files, s.resolution) if files else None
    total = audit_units(s, prompts, images is not None, judge is not None)
    with _bar(total, f"audit {concept}") as bar:
        result = run_audit(WeightsModels(backbone, weights), DiffusersSlotEncoder(backbone), concept, prompts, s,
                           images=images, judge=judge, progress=_progress(bar))
    report = {"model": args.model, "lora": str(args.lora), **result.report}
    text = json.dumps(report, indent=2)
    atomic_write_png(out_dir / "grid.png", grid_image(result.rows))
    atomic_save(embedding_tensors(result.token), out_dir / "learned-token.safetensors",
                {"erasure.concept": concept, "erasure.audit": "the concept inversion's learned token (erased model)"})
    atomic_write_text(out_dir / "report.json", text)
    if args.json:
        atomic_write_text(args.json, text)
    print(summary(report))
    print(f"wrote {out_dir / 'grid.png'} (rows: {', '.join(label for label, _ in result.rows)}), "
          f"{out_dir / 'report.json'}, {out_dir / 'learned-token.safetensors'}"
          + (f", {args.json}" if args.json else "") + f"; {_peak_memory()}")
    _print_model_note(args)
    return 0


def add_audit_command(sub) -> None:
    au = sub.add_parser("audit", help="audit an erasure: concept inversion and a prefix attack against the erased "
                        "model; does the concept come back?")
    _add_model_flags(au)
    au.add_argument("--lora", required=True, help="the erasure LoRA (.safetensors) to audit")
    au.add_argument("--concept", required=True, help="the erased concept")
    au.add_argument("--images", help="a folder of your own images of the concept (or DIR/<concept>/); default: "
                    "images generated by the original model")
    au.add_argument("--kind", choices=tuple(sorted(CONCEPT_TEMPLATES)), default="object",
                    help="prompt templates of the concept (not the lab; default object)")
    au.add_argument("--json", help="also write the report here")
    au.add_argument("--out-dir", default="out/audit", help="grid.png, report.json and learned-token.safetensors "
                    "(default out/audit)")
    settings_flags(au, AuditSettings(), AUDIT_HELP)
    au.set_defaults(func=_audit)


# -- entry -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m erasure", description="Concept erasure for diffusion models.")
    p.add_argument("--version", action="version", version=f"erasure {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (add_demo_command, add_mace_command, add_ant_command, add_lab_command, add_audit_command):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except (TrainingDivergedError, ErasureOutOfMemoryError, FloatingPointError) as e:
        print(f"error: {e}; nothing was written", file=sys.stderr)
        return 1
    except (ValueError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
