"""ANT's training loop for one concept (:func:`ant`) and for many, fused (:func:`ant_multi`)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .. import prompts as prompt_sets
from .. import validation
from ..audit_text import SlotEncoder
from ..backbone import Backbone, TextConditioning, gradient_checkpointing
from ..deltas import BatchedLoRA, HookedDeltas, SparseDeltas, TrainableDeltas, TrainableLoRA
from ..errors import BadInputError, TrainingDivergedError
from ..files import cache_dir
from ..fusion import FusionSystem, mean_prompt_count
from ..guards import entry_point
from ..loss_curve import curve_metadata, joined_curve
from ..prior import gram
from ..prior import protected_complement as prior_complement
from ..progress import Progress, as_progress
from ..prompts import CONCEPT_TEMPLATES, Concept, augmented_prompts
from ..report import ReportSettings, calibrated_strength
from ..weights import ErasureWeights, change_text, metadata, relative_change
from .adversarial import attack_round, concept_images, slot_encoder_for, slot_templates, start_token
from .objective import add_preservation, ant_loss, ant_losses, cat_batches, use_checkpointing
from .saliency import saliency_masks, scope_modules
from .settings import (
    CALIBRATE_EVALUATIONS,
    CALIBRATE_MAX,
    FUSE_LAM,
    FUSE_PRESERVE,
    FUSE_STRENGTH,
    PROTECTABLE_SCOPES,
    AntSettings,
)
from .sources import (
    OnPolicy,
    Trajectories,
    build_trajectories,
    draw,
    make_source,
    prompt_latents,
    uncached_batches,
)


@dataclass
class AntResult:
    weights: ErasureWeights
    trainable_params: int
    total_params: int  # entries of the layers in scope
    selected_fraction: float | None  # the saliency mask's share of those entries
    unet_forwards: int
    unet_backwards: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    optimizer_state_bytes: int = 0
    #: ``||dW|| / ||W||`` per layer group (``relative_change``): how much of the model the edit changed
    relative_change: dict[str, float] = field(default_factory=dict)
    #: adversarial erasure: the attack's rounds (mean loss, how far the token moved) and the final learned token
    adversarial: dict[str, object] = field(default_factory=dict)


def trainable(mods: dict[str, nn.Module], s: AntSettings, masks: dict[str, torch.Tensor] | None,
              gen: torch.Generator) -> HookedDeltas:
    """The edit of the scope's modules being trained, zero at the start: sparse (saliency), a LoRA (scope lora) or
    dense."""
    if s.scope == "saliency":
        assert masks is not None
        return SparseDeltas(mods, masks)
    if s.scope == "lora":
        return TrainableLoRA(mods, rank=s.lora_rank, generator=gen)
    return TrainableDeltas(mods)


def protected_complement(backbone: Backbone, prompts: list[str], energy: float) -> tuple[torch.Tensor, int]:
    """``(I - V V^T, k)`` for the prompts' token Gram (``prior.protected_complement``): a K/V edit multiplied by it
    on the right leaves the keys and values of what those prompts are made of as they were."""
    return prior_complement(gram(backbone, prompts, cache_dir()), energy)


def optimizer(deltas: HookedDeltas, modules: dict[str, nn.Module], s: AntSettings) -> torch.optim.Adam:
    """Adam over the edit, one parameter group per layer: with ``lr_relative`` each layer's step is ``s.lr`` times
    the RMS of its weights, so the setting means the same relative change on any model."""
    groups = []
    for i, name in enumerate(deltas.names):
        w = modules[name].weight.detach()
        scale = float(w.float().pow(2).mean().sqrt()) if s.lr_relative else 1.0
        groups.append({"params": deltas.layer_parameters(i), "lr": s.lr * scale})
    return torch.optim.Adam(groups, lr=s.lr)


@dataclass
class _Run:
    """One concept's inputs to the training loop (``_prepare``), and what it has spent so far."""

    concept: str
    prompts: list[str]  # the augmented prompts: trajectories and saliency maps
    enc: dict[str, TextConditioning]
    gen: torch.Generator  # the LoRA's start, then every step's draws
    cache: bool
    pres: TextConditioning | None = None
    pres_own: torch.Tensor | None = None
    pres_gen: torch.Generator | None = None
    tr: Trajectories | None = None
    keep: torch.Tensor | None = None  # protect's projector, on the model's device
    fwd: int = 0
    bwd: int = 0
    losses: list[float] = field(default_factory=list)


def _prepare(backbone: Backbone, concept: str, s: AntSettings, synonyms: tuple[str, ...],
             templates: list[str] | tuple[str, ...] | None, cache: bool, preserve_prompts: list[str] | None,
             progress: Progress, keep: torch.Tensor | None = None) -> _Run:
    """Everything one concept's training needs before its first step: its prompts and their encodings, the
    preservation prompts, protect's projector (``keep``: one already made from the same preservation prompts),
    and (cached sampling) the frozen model's trajectories."""
    prompts = augmented_prompts(concept.strip(), synonyms, s.kind, templates)
    run = _Run(concept.strip(), prompts, {}, torch.Generator().manual_seed(s.seed), cache)
    run.enc = {p: backbone.encode_text([p]) for p in dict.fromkeys(prompts)}
    pres_list: list[str] = []
    if s.preserve > 0:
        if preserve_prompts is None:
            preserve_prompts = prompt_sets.prior_prompts(n=s.preserve_prompts, exclude=[concept, *synonyms])
        pres_list = [p for p in preserve_prompts if p.strip()][: s.preserve_prompts]
        if not pres_list:
            raise BadInputError("no preservation prompts: give some, or set preserve to 0")
        run.pres = backbone.encode_text(pres_list)
    if s.protect > 0 and s.scope not in PROTECTABLE_SCOPES:
        progress.say(f"ant: protect is for K/V edits (scopes {', '.join(PROTECTABLE_SCOPES)}); scope {s.scope} trains "
                     "without it")
    elif s.protect > 0 and keep is not None:
        run.keep = keep
    elif s.protect > 0:
        keep_prompts = (preserve_prompts if preserve_prompts is not None
                        else prompt_sets.prior_prompts(exclude=[concept, *synonyms]))
        keep, k = protected_complement(backbone, [p for p in keep_prompts if p.strip()], s.protect)
        run.keep = keep.to(backbone.device)  # once: the step loop projects with it every step
        progress.say(f"ant: the K/V edit kept off {k} of {keep.shape[0]} text-embedding directions "
                     f"({s.protect:.2%} of {len(keep_prompts)} unrelated prompts' token energy)")
    if run.pres is not None and s.preserve_latents == "own":
        # one image per preservation prompt from the frozen model; its own stream keeps ANT's draws as without it
        run.pres_own, ev = prompt_latents(backbone, pres_list, s, progress)
        run.pres_gen = torch.Generator().manual_seed(1_000_003 * 7 + s.seed)
        run.fwd += ev
    if cache or s.scope == "saliency":
        progress.say(f"ant: {s.trajectories} trajectories x {s.trajectory_steps} steps with the frozen model")
        run.tr, ev = build_trajectories(backbone, prompts, s, progress=progress)
        run.fwd += ev
    return run


def _check_words(backbone: Backbone, concept: str, s: AntSettings, synonyms: tuple[str, ...],
                 templates: list[str] | tuple[str, ...] | None) -> None:
    for word in (concept, *synonyms):  # each word must fit whole in the prompts made from it
        validation.check_fits_context(backbone, word, augmented_prompts(word, (), s.kind, templates))


@entry_point("ANT", "the resolution, batch_size, trajectories or trajectory_steps, or use scope 'lora'")
def ant(backbone: Backbone, concept: str, settings: AntSettings | None = None, synonyms: tuple[str, ...] = (),
        templates: list[str] | tuple[str, ...] | None = None, cache: bool | None = None,
        preserve_prompts: list[str] | None = None, progress: Progress | None = None,
        slot_encoder: SlotEncoder | None = None) -> AntResult:
    """Erase one concept. ``templates`` (with ``{c}``) and ``synonyms`` make the prompt augmentations: the
    trajectories' prompts and the saliency maps' prompts. ``cache`` overrides ``settings.sampling`` (``False``: the
    on-policy loop). ``preserve_prompts``: prompts without the concept for the preservation term (default: the
    project's prior set minus the concept and its synonyms). ``slot_encoder``: the learned-token text encoding of
    adversarial erasure (``settings.adversarial``; default: the diffusers backbone's own)."""
    s = settings or AntSettings()
    s.validate()
    concept = validation.check_concept(concept)
    progress = as_progress(progress)
    if cache is None:
        cache = s.sampling == "cached"
    t0 = time.time()
    _check_words(backbone, concept, s, synonyms, templates)
    validation.check_model_finite(backbone.unet())
    prompts = augmented_prompts(concept.strip(), synonyms, s.kind, templates)
    adv_templates: list[int] = []  # adversarial: the ANT template of each augmented prompt
    encoder, slots = None, []
    if s.adversarial:
        encoder = slot_encoder_for(backbone, slot_encoder)
        temps = list(templates) if templates else list(CONCEPT_TEMPLATES[s.kind])
        slots = slot_templates(temps)
        # augmented_prompts is template-major: prompt j is template j // (number of words)
        adv_templates = [j * len(temps) // len(prompts) for j in range(len(prompts))]
    torch_state = torch.random.get_rng_state()
    uncond = backbone.encode_text([""])
    run = _prepare(backbone, concept, s, synonyms, templates, cache, preserve_prompts, progress)
    gen, enc, pres, tr, keep = run.gen, run.enc, run.pres, run.tr, run.keep
    fwd, bwd = run.fwd, 0
    kv_names = set(backbone.cross_attention_kv()) if keep is not None else None  # xattn: only its K/V projected
    masks, fraction = None, None
    if s.scope == "saliency":
        assert tr is not None
        masks, fraction, f2, b2 = saliency_masks(backbone, tr, scope_modules(backbone, "saliency"), s, progress)
        fwd, bwd = fwd + f2, bwd + b2
        progress.say(f"ant: saliency keeps {fraction:.2%} of the UNet's Linear/Conv2d weights")
    mods = scope_modules(backbone, s.scope)
    total = sum(m.weight.numel() for m in mods.values())
    ckpt = use_checkpointing(backbone, s)
    if ckpt:
        progress.say("ant: gradient checkpointing on for the training forward")
    losses: list[float] = []
    tok = None
    if encoder is not None:
        # the attack's images of the concept, from the model before any edit
        progress.say(f"ant: adversarial erasure, {s.trajectories} images of the concept for the attack")
        images, ev = concept_images(backbone, prompts, s, progress)
        fwd += ev
        tok = start_token(backbone, encoder, slots, images, s)
    try:
        with trainable(mods, s, masks, gen) as deltas:
            source = make_source(backbone, deltas, s, prompts, enc, uncond, cache, tr, progress)
            opt = optimizer(deltas, mods, s)
            plan = [adv_templates[i % len(prompts)] for i in range(s.trajectories)] if tok else []
            adv_table = None
            for step in range(s.steps):
                progress.check()
                if tok is not None and step % s.adversarial_every == 0:
                    # the attack's round against the model as it is now; its prompts are then encoded once
                    ev = attack_round(backbone, tok, s, ckpt, progress)
                    fwd, bwd = fwd + ev, bwd + s.adversarial_steps
                    adv_table = tok.conditioning(list(range(len(slots))))
                idx, ke, kl = draw(gen, s.trajectories, s)
                which = torch.randint(0, len(pres), (s.batch_size,), generator=gen).tolist() if pres else []
                b, ev = source.batch(step, idx, ke, kl)
                fwd += ev
                if pres is not None:
                    fwd += add_preservation(backbone, deltas, b, pres, which, run.pres_own, run.pres_gen)
                if adv_table is not None:
                    b.adv_cond = adv_table[[plan[i] for i in idx]]
                # the training forward only; "off" leaves the model's own setting alone
                with gradient_checkpointing(backbone, True) if ckpt else contextlib.nullcontext():
                    loss, _ = ant_loss(backbone, b, uncond, s)
                fwd += (6 if pres is not None else 4) * s.batch_size + (s.batch_size if tok is not None else 0)
                bwd += 1
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"the ANT loss became {loss.item()} at step {step}: lower the "
                                                f"learning rate (now {s.lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if keep is not None:  # Adam and the clip see only what the projection keeps (docs/ant.md#protect)
                    deltas.project_input_grads(keep, kv_names)
                if s.grad_clip > 0:
                    nn.utils.clip_grad_norm_(deltas.parameters(), s.grad_clip)
                opt.step()
                if keep is not None:
                    deltas.project_inputs(keep, kv_names)
                losses.append(float(loss.detach()))
                progress.step()
                if (step + 1) % 50 == 0:
                    progress.say(f"ant step {step + 1}/{s.steps} loss {loss.item():.4f}")
            if not deltas.all_finite():
                raise TrainingDivergedError("the ANT weights became non-finite: lower the learning rate")
            opt_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                            if torch.is_tensor(t))
            trained = deltas.num_trainable()
            weights = deltas.result(method="ant", concepts=[concept.strip()], synonyms=list(synonyms),
                                    settings=s.as_dict(), selected_fraction=fraction)
            if s.calibrate:
                with deltas.disabled():  # the report compares the unedited model with the edit it applies
                    weights, ev = _calibrate(backbone, weights, concept.strip(), s, templates, progress)
                fwd += ev
            change = _annotate(weights, mods, keep is not None, losses)
            progress.say(f"ant: {change_text(change)}")
            adv = tok.report() if tok is not None else {}
            if adv:
                weights.metadata.update(metadata({"adversarial": {"rounds": adv["rounds"],
                                                                  "history": adv["history"]}}))
    finally:
        torch.random.set_rng_state(torch_state)
    return AntResult(weights, trained, total, fraction, fwd, bwd, round(time.time() - t0, 2), losses, opt_bytes,
                     change, adv)


def _calibrate(backbone: Backbone, weights: ErasureWeights, concept: str, s: AntSettings,
               templates: list[str] | tuple[str, ...] | None, progress: Progress) -> tuple[ErasureWeights, int]:
    """``calibrate``: the edit at the strength where the concept's guidance left reaches 0 at the mid and late steps
    (``report.calibrated_strength``, on the concept's own templates), and the UNet evaluations it cost."""
    item = Concept(concept, "", s.kind, templates=tuple(templates or CONCEPT_TEMPLATES[s.kind]))
    cal = calibrated_strength(backbone, weights, [item], target=0.0, max_strength=CALIBRATE_MAX,
                              evaluations=CALIBRATE_EVALUATIONS,
                              settings=ReportSettings(batch_size=8, resolution=s.resolution), progress=progress)
    tried = ", ".join(f"x{st:g}: mid {m:+.2f} late {lt:+.2f}" for st, m, lt in cal["history"])
    progress.say(f"ant: calibrate: strength {cal['strength']:g} ({tried}"
                 f"{'' if cal['reached'] else '; not reached: the strongest measured'})")
    out = weights.scaled(cal["strength"])
    out.metadata.update(metadata({"calibration": cal}))
    return out, cal["unet_evaluations"]


def _annotate(weights: ErasureWeights, mods: dict[str, nn.Module], protected: bool, losses: list[float]
              ) -> dict[str, float]:
    """A finished edit's metadata: its relative change per layer group (returned), protect, the loss curve."""
    change = relative_change(weights, mods)
    weights.metadata.update(metadata({"relative_change": change, "protect_used": protected}))
    weights.metadata.update(curve_metadata(losses))
    return change


def _train_together(backbone: Backbone, runs: list[_Run], s: AntSettings, uncond: TextConditioning,
                    progress: Progress) -> list[AntResult]:
    """Several concepts' K/V LoRAs (scope lora) with one training forward per step: concept ``k``'s samples go
    through LoRA slot ``k`` (``BatchedLoRA``), each with its own draws, trajectories (on-policy: regenerated in one
    batch, each row through its concept's slot), preservation samples, loss, gradient clip and Adam state, so each
    LoRA trains as it would alone (to float rounding: ``tests/test_ant.py``). docs/ant.md#concept-batch"""
    t0, n = time.time(), len(runs)
    mods = scope_modules(backbone, "lora")
    total = sum(m.weight.numel() for m in mods.values())
    ckpt = use_checkpointing(backbone, s)
    keep = runs[0].keep  # the same unrelated prompts for every concept of the run
    kv_names = set(backbone.cross_attention_kv()) if keep is not None else None
    torch_state = torch.random.get_rng_state()
    try:
        with BatchedLoRA(mods, s.lora_rank, [r.gen for r in runs]) as deltas:
            sources = [make_source(backbone, deltas, s, r.prompts, r.enc, uncond, r.cache, r.tr, progress)
                       for r in runs]
            opt = optimizer(deltas, mods, s)  # element-wise: each slot's entries step as its own Adam would
            together = all(isinstance(src, OnPolicy) for src in sources)
            groups = 6 if runs[0].pres is not None else 4  # the training forward's row groups (ant_loss)
            rows = torch.arange(n).repeat_interleave(s.batch_size).repeat(groups)
            for step in range(s.steps):
                progress.check()
                draws, whiches = [], []
                for r in runs:
                    draws.append(draw(r.gen, s.trajectories, s))
                    whiches.append(torch.randint(0, len(r.pres), (s.batch_size,), generator=r.gen).tolist()
                                   if r.pres else [])
                if together:  # every concept's trajectories regenerated in one batch, each through its own slot
                    made = uncached_batches(backbone, deltas, [src.c for src in sources], draws)
                else:
                    made = []
                    for k, (source, (idx, ke, kl)) in enumerate(zip(sources, draws, strict=True)):
                        deltas.slots = k  # its trajectories follow its own edit
                        made.append(source.batch(step, idx, ke, kl))
                batches = []
                for r, (b, ev), which in zip(runs, made, whiches, strict=True):
                    r.fwd += ev
                    if r.pres is not None:
                        r.fwd += add_preservation(backbone, deltas, b, r.pres, which, r.pres_own, r.pres_gen)
                    batches.append(b)
                deltas.slots = rows
                with gradient_checkpointing(backbone, True) if ckpt else contextlib.nullcontext():
                    losses = ant_losses(backbone, cat_batches(batches), uncond, s, n)
                if not bool(torch.isfinite(losses).all()):
                    raise TrainingDivergedError(f"the ANT loss became {losses.tolist()} at step {step}: lower the "
                                                f"learning rate (now {s.lr})")
                opt.zero_grad(set_to_none=True)
                losses.sum().backward()  # slot k's gradient comes from its own loss only
                if keep is not None:
                    deltas.project_input_grads(keep, kv_names)
                if s.grad_clip > 0:
                    deltas.clip_grad_norm_per_slot(s.grad_clip)
                opt.step()
                if keep is not None:
                    deltas.project_inputs(keep, kv_names)
                for r, value in zip(runs, losses.detach().tolist(), strict=True):
                    r.losses.append(value)
                    r.fwd, r.bwd = r.fwd + groups * s.batch_size, r.bwd + 1
                progress.step(n)
                if (step + 1) % 50 == 0:
                    progress.say(f"ant step {step + 1}/{s.steps} losses "
                                 + " ".join(f"{v:.4f}" for v in losses.tolist()))
            opt_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                            if torch.is_tensor(t)) // n
            out = []
            for k, r in enumerate(runs):
                if not deltas.slot_finite(k):
                    raise TrainingDivergedError(f"the ANT weights of {r.concept!r} became non-finite: lower the "
                                                "learning rate")
                weights = deltas.result(k, method="ant", concepts=[r.concept], synonyms=[], settings=s.as_dict(),
                                        selected_fraction=None)
                change = _annotate(weights, mods, keep is not None, r.losses)
                out.append(AntResult(weights, deltas.num_trainable() // n, total, None, r.fwd, r.bwd,
                                     round(time.time() - t0, 2), r.losses, opt_bytes, change))
    finally:
        torch.random.set_rng_state(torch_state)
    return out


@dataclass
class AntMultiResult:
    weights: ErasureWeights
    per_concept: list[AntResult]
    unet_forwards: int
    unet_backwards: int
    seconds: float
    relative_change: dict[str, float] = field(default_factory=dict)  # of the fused edit


@entry_point("ANT", "the resolution, batch_size, trajectories or trajectory_steps, or the LoRA rank")
def ant_multi(backbone: Backbone, concepts: list[str], settings: AntSettings | None, prior: torch.Tensor | None,
              templates: dict[str, list[str]] | None = None, lam: float = FUSE_LAM, preserve: float = FUSE_PRESERVE,
              preserve_prompts: list[str] | None = None, strength: float = FUSE_STRENGTH,
              progress: Progress | None = None, keep_edits: bool = False) -> AntMultiResult:
    """Many concepts: one ANT edit per concept on the cross-attention K/V (dense, or a LoRA with scope ``lora``),
    then the closed-form fusion of their K/V effects (``erasure.fusion``), each edit entering it at ``strength`` and
    every concept weighted alike.

    Each finished dense edit is folded into the fusion's normal equations at once and dropped, so host memory does
    not grow with the number of concepts (a dense K/V edit is as large as the K/V weights); LoRA edits stay low rank
    until the solve. ``keep_edits`` keeps each concept's own dense edit in ``per_concept`` too; otherwise their
    ``weights`` are empty. The preservation prompts (default: the project's prior set) never name any concept of the
    run, so that one concept's preservation cannot protect another being erased."""
    validation.check_fuse_strength(strength)
    validation.check_number("lam", lam, 0.0, low_open=True)
    validation.check_number("preserve", preserve)
    names = validation.check_concepts(concepts)
    low = [c.lower() for c in names]
    s = settings or AntSettings()
    s = s.override(scope="lora" if s.scope == "lora" else "kv", steps=s.multi_steps, reuse=s.multi_reuse)
    s.validate()
    if s.adversarial:
        # one attack per concept inside the fused path is not built (nor measured)
        raise BadInputError("adversarial erasure is for one concept: set adversarial to 0 for several concepts, or "
                            "erase each concept on its own (ant) and join the LoRAs with Fuse Erasure LoRAs")
    if s.calibrate:
        # the fusion sets the edits' strength (fuse strength); a calibration per concept before it is not measured
        raise BadInputError("calibrate is for one concept: turn it off for several concepts (their fused strength "
                            "is the fuse strength), or erase each concept on its own (ant)")
    validation.check_ant_concepts_fit(backbone, names, s.kind, templates)
    progress = as_progress(progress)
    t0 = time.time()
    if preserve_prompts is None and (s.preserve > 0 or s.protect > 0):
        # the whole set: protect's Gram uses it all, the preservation term its first preserve_prompts
        preserve_prompts = prompt_sets.prior_prompts(exclude=names)
    concepts_ = [Concept(c, "", s.kind, templates=tuple((templates or {}).get(c) or CONCEPT_TEMPLATES[s.kind]))
                 for c in names]
    system = FusionSystem(backbone, mean_prompt_count([[c] for c in concepts_]))
    results: list[AntResult] = []
    pres = None if preserve_prompts is None else [p for p in preserve_prompts
                                                  if not set(p.lower().split()) & set(low)]
    batch = s.concept_batch if s.scope == "lora" else 1  # dense edits one at a time (each as large as the K/V)
    shared_keep: torch.Tensor | None = None
    if batch > 1:
        validation.check_model_finite(backbone.unet())
        uncond = backbone.encode_text([""])
    for start in range(0, len(names), batch):
        chunk = list(range(start, min(start + batch, len(names))))
        progress.say(f"ant: concept{'s' if len(chunk) > 1 else ''} {', '.join(str(i + 1) for i in chunk)}"
                     f"/{len(names)}: {', '.join(repr(names[i]) for i in chunk)}")
        if batch == 1:
            done = [ant(backbone, names[start], s, templates=(templates or {}).get(names[start]),
                        preserve_prompts=pres, progress=progress)]
        else:
            for i in chunk:
                _check_words(backbone, names[i], s, (), (templates or {}).get(names[i]))
            runs = []
            for i in chunk:  # protect's projector made once: every concept has the same preservation prompts
                runs.append(_prepare(backbone, names[i], s, (), (templates or {}).get(names[i]),
                                     s.sampling == "cached", pres, progress, keep=shared_keep))
                shared_keep = runs[-1].keep
            done = _train_together(backbone, runs, s, uncond, progress)
        for i, r in zip(chunk, done, strict=True):
            validation.check_fuse_inputs(backbone, [(concepts_[i], r.weights)], lam, preserve,
                                         labels=[f"the ANT edit of concept {i + 1} ({names[i]!r})"])
            # a LoRA (scope lora) is small: its factors stay until the solve (the result stays low rank); a dense
            # K/V edit is folded in now and freed
            system.add(concepts_[i], r.weights, keep=s.scope == "lora", factor=strength)
            results.append(r if keep_edits or s.scope == "lora" else replace(r, weights=ErasureWeights()))
        del done, r  # a dense edit must not outlive its concept (it is as large as the K/V weights)
    fused = system.solve(None, prior, lam, preserve, method="ant-fused")
    fused.metadata.update(joined_curve([(c, r.losses) for c, r in zip(names, results, strict=True)]))
    change = relative_change(fused, dict(backbone.unet().named_modules()))
    progress.say(f"ant: fused: {change_text(change)}")
    fused.metadata.update(metadata({"settings": s.as_dict(), "relative_change": change,
                                    "fuse": {"lam": lam, "preserve": preserve, "strength": strength,
                                             "balance": True}}))
    return AntMultiResult(fused, results, sum(r.unet_forwards for r in results),
                          sum(r.unet_backwards for r in results), round(time.time() - t0, 2), change)
