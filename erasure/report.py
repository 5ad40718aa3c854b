"""The erasure report: how much of the concept is left and how much else moved, on the user's own model, with no
classifier.

Two numbers, both measured on latents from the **original** model's own guided DDIM trajectories (fixed seeds; the
original and the edited model are asked at the same latents and timesteps, so only the edit differs):

- ``guidance_left``: on the concept's prompts, at the mid/late steps (after the first ``late_from`` of the
  trajectory, where the concept is drawn rather than laid out as noise), how much of the original guidance direction
  ``d_o = eps_o(x, c) - eps_o(x, "")`` the edited model still has: ``sum <d_e, d_o> / sum ||d_o||^2`` over the steps
  and samples. 1 = unchanged, 0 = the concept no longer steers, negative = steered away from it (ANT, ESD).
- ``unrelated_drift``: on unrelated prompts (the preservation prompt set, without the concepts), at every step of
  their own trajectories, how far the edited model's conditional prediction moved relative to the prompts' own
  guidance direction: ``sqrt(sum ||eps_e(x, p) - eps_o(x, p)||^2 / sum ||eps_o(x, p) - eps_o(x, "")||^2)`` over the
  steps and samples. 0 = unrelated prompts predict exactly as before; 1 = a change as large as what the prompts
  themselves do to the prediction.

Both use only the :class:`~erasure.backbone.Backbone` interface and apply the erasure weights as a temporary patch
(:meth:`ErasureWeights.applied`), so they run on any supported model and in the ComfyUI pack. The cost is a few hundred
UNet evaluations at the defaults (``unet_evaluations`` in the report; :func:`report_units` predicts it). Validated on
the concept lab against the classifier's efficacy and collateral (``docs/audit.md#erasure-report``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace

import torch

from .backbone import Backbone, TextConditioning
from .errors import BadInputError
from .progress import Progress, as_progress
from .prompts import CONCEPT_TEMPLATES, Concept, prior_prompts
from .sampling import sample
from .weights import META_PREFIX, ErasureWeights

#: the metadata key of the report in a LoRA file (JSON)
METADATA_KEY = META_PREFIX + "report"


@dataclass(frozen=True)
class ReportSettings:
    #: DDIM steps of the original model's trajectories
    steps: int = 10
    #: classifier-free guidance of those trajectories
    guidance: float = 5.0
    #: seeds per prompt (seed_base, seed_base + 1, ...)
    seeds: int = 2
    seed_base: int = 20000
    #: prompts per concept (spread over the concept's templates)
    concept_prompts: int = 4
    #: unrelated prompts (the first of the preservation set)
    unrelated_prompts: int = 6
    #: guidance_left uses the steps after this fraction of the trajectory
    late_from: float = 0.3
    #: images per UNet batch (each CFG batch holds twice this many rows)
    batch_size: int = 16
    resolution: int | None = None

    def validate(self) -> None:
        if self.steps < 2 or self.seeds < 1 or self.concept_prompts < 1 or self.unrelated_prompts < 0:
            raise BadInputError("report settings: steps >= 2, seeds >= 1, concept_prompts >= 1, "
                                "unrelated_prompts >= 0")
        if not 0.0 <= self.late_from < 1.0:
            raise BadInputError("report settings: late_from must be in [0, 1)")


def _late_steps(s: ReportSettings) -> list[int]:
    return list(range(min(int(math.ceil(s.late_from * s.steps)), s.steps - 1), s.steps))


def report_units(n_concept_prompts: int, n_unrelated: int, s: ReportSettings | None = None) -> int:
    """UNet evaluations (batch rows) the report costs: the original trajectories (2 per image and step), the edited
    model's conditional and unconditional predictions at the late steps of the concept's images, its conditional
    prediction at every step of the unrelated images."""
    s = s or ReportSettings()
    n_c, n_u = n_concept_prompts * s.seeds, n_unrelated * s.seeds
    return 2 * s.steps * (n_c + n_u) + 2 * len(_late_steps(s)) * n_c + s.steps * n_u


def _spread(items: list[str], n: int) -> list[str]:
    """``n`` items spread evenly over ``items`` (all of them if there are at most ``n``), in order, no repeats."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)]


def report_concept(text: str, kind: str = "object") -> Concept:
    """A concept given by name, with the prompt templates the report was validated with (``CONCEPT_TEMPLATES``, the
    same for every method; MACE's own concepts bring theirs)."""
    return Concept(text, "", kind, templates=tuple(CONCEPT_TEMPLATES[kind]))


def _concept_prompts(concepts: list[str | Concept], n: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in concepts:
        item = c if isinstance(c, Concept) else report_concept(str(c))
        out[item.text] = _spread(list(dict.fromkeys(item.prompts())), n)
    return out


def _predict(backbone: Backbone, x: torch.Tensor, t: int, cond: TextConditioning, batch: int) -> torch.Tensor:
    outs = []
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch].to(backbone.device, backbone.dtype)
        tt = torch.full((xb.shape[0],), t, device=backbone.device, dtype=torch.long)
        outs.append(backbone.predict_noise(xb, tt, cond[list(range(i, i + xb.shape[0]))]).float().cpu())
    return torch.cat(outs)


@torch.no_grad()
def erasure_report(backbone: Backbone, weights: ErasureWeights | None, concepts: list[str | Concept] | str,
                   unrelated_prompts: list[str] | None = None, settings: ReportSettings | None = None,
                   progress: Progress | None = None, originals: dict | None = None) -> dict:
    """The report of an erasure (see the module's docstring). ``concepts``: the erased concepts (words, or
    :class:`Concept` with their own templates); ``unrelated_prompts``: prompts the erasure should leave alone
    (default: the general preservation set without the concepts); ``weights`` None or empty: the model unchanged.

    ``originals``: a dict that keeps the original model's trajectories between reports of several edits of the same
    model (frozen model, fixed seeds: they are the same every time); filled on first use, read after, and only the
    edited predictions are counted in ``unet_evaluations`` then.

    Returns ``{"guidance_left", "guidance_left_by_stage": {"mid", "late"}, "guidance_left_by_concept",
    "unrelated_drift", "unrelated_drift_by_stage": {"early", "mid", "late"}, "unet_evaluations", "seconds",
    "settings", "prompts"}``."""
    s = settings or ReportSettings()
    s.validate()
    progress = as_progress(progress)
    items = [concepts] if isinstance(concepts, str) else list(concepts)
    if not items:
        raise BadInputError("the erasure report needs at least one concept")
    t0 = time.time()
    per_concept = _concept_prompts(items, s.concept_prompts)
    names = list(per_concept)
    if unrelated_prompts is None:
        unrelated_prompts = prior_prompts(n=max(4 * s.unrelated_prompts, 50), exclude=names)
    lowered = [n.lower() for n in names]
    unrelated = [p for p in dict.fromkeys(unrelated_prompts)
                 if not any(f" {n} " in f" {p.lower()} " for n in lowered)][: s.unrelated_prompts]
    seeds = list(range(s.seed_base, s.seed_base + s.seeds))
    c_prompts = [p for ps in per_concept.values() for p in ps]
    evals = 0

    def trajectories(prompts: list[str]):
        nonlocal evals
        key = (tuple(prompts), tuple(seeds), s.steps, s.guidance, s.resolution)
        if originals is not None and key in originals:
            return originals[key]
        res = sample(backbone, prompts, seeds, s.steps, s.guidance, resolution=s.resolution, batch_size=s.batch_size,
                     record=True, progress=progress, decode=False)
        evals += 2 * s.steps * len(prompts) * len(seeds)
        if originals is not None:
            originals[key] = res
        return res

    enc = backbone.encode_text(list(dict.fromkeys(c_prompts + unrelated + [""])))
    index = {p: i for i, p in enumerate(dict.fromkeys(c_prompts + unrelated + [""]))}

    def conds(prompts: list[str]) -> TextConditioning:
        return enc[[index[p] for p in prompts for _ in seeds]]

    unet = backbone.unet()
    edit = weights if weights is not None and weights.deltas else None
    late = _late_steps(s)
    mid_cut = late[0] + (len(late) + 1) // 2  # the late steps' first half is "mid", the rest "late"

    # -- guidance left on the concept's prompts --------------------------------------------------------------------
    ct = trajectories(c_prompts)
    n_c = len(c_prompts) * len(seeds)
    dot = torch.zeros(len(late), n_c, dtype=torch.float64)
    sq = torch.zeros(len(late), n_c, dtype=torch.float64)
    cond_c, uncond_c = conds(c_prompts), enc[[index[""]] * n_c]
    for j, i in enumerate(late):
        progress.check()
        x, t = ct.trajectory[i], int(ct.timesteps[i])
        d_o = (ct.eps_cond[i] - ct.eps_uncond[i]).double().flatten(1)
        if edit is None:
            d_e = d_o
        else:
            with edit.applied(unet):
                e_c = _predict(backbone, x, t, cond_c, s.batch_size)
                e_u = _predict(backbone, x, t, uncond_c, s.batch_size)
            d_e = (e_c - e_u).double().flatten(1)
            evals += 2 * n_c
        dot[j], sq[j] = (d_e * d_o).sum(1), (d_o * d_o).sum(1)
        progress.step()

    def ratio(rows: slice, cols: slice = slice(None)) -> float:
        den = float(sq[rows, cols].sum())
        return float(dot[rows, cols].sum()) / den if den > 0 else 1.0

    by_concept = {}
    start = 0
    for name, ps in per_concept.items():
        n = len(ps) * len(seeds)
        by_concept[name] = ratio(slice(None), slice(start, start + n))
        start += n
    split = mid_cut - late[0]

    # -- drift of unrelated prompts --------------------------------------------------------------------------------
    num = torch.zeros(s.steps, dtype=torch.float64)
    den = torch.zeros(s.steps, dtype=torch.float64)
    if unrelated:
        ut = trajectories(unrelated)
        n_u = len(unrelated) * len(seeds)
        cond_u = conds(unrelated)
        for i in range(s.steps):
            progress.check()
            if edit is not None:
                with edit.applied(unet):
                    e_p = _predict(backbone, ut.trajectory[i], int(ut.timesteps[i]), cond_u, s.batch_size)
                num[i] = (e_p - ut.eps_cond[i]).double().pow(2).sum()
                evals += n_u
            den[i] = (ut.eps_cond[i] - ut.eps_uncond[i]).double().pow(2).sum()
            progress.step()

    def drift(steps: slice) -> float | None:
        # pooled over the images and steps: an image whose prompt barely steers (a tiny denominator) cannot dominate
        d = float(den[steps].sum())
        return math.sqrt(float(num[steps].sum()) / d) if d > 0 else (0.0 if unrelated else None)

    return {
        "guidance_left": round(ratio(slice(None)), 4),
        "guidance_left_by_stage": {"mid": round(ratio(slice(0, split)), 4),
                                   "late": round(ratio(slice(split, None)), 4) if split < len(late) else None},
        "guidance_left_by_concept": {k: round(v, 4) for k, v in by_concept.items()},
        "unrelated_drift": round(drift(slice(None)) or 0.0, 4),
        "unrelated_drift_by_stage": {k: None if v is None else round(v, 4) for k, v in (
            ("early", drift(slice(0, late[0])) if late[0] > 0 else None), ("mid", drift(slice(late[0], mid_cut))),
            ("late", drift(slice(mid_cut, None)) if mid_cut < s.steps else None))},
        "unet_evaluations": evals,
        "seconds": round(time.time() - t0, 2),
        "settings": asdict(s),
        "prompts": {"concepts": per_concept, "unrelated": unrelated},
    }


def calibrated_strength(backbone: Backbone, weights: ErasureWeights, concepts: list[str | Concept] | str,
                        target: float = 0.0, max_strength: float = 2.0, evaluations: int = 4,
                        settings: ReportSettings | None = None, progress: Progress | None = None) -> dict:
    """The smallest strength (at least 1, at most ``max_strength``) at which the edit's guidance left on the
    concept's prompts is at most ``target`` at the mid and at the late steps alike (the report's two stages; 0 = the
    concept no longer steers towards itself anywhere after the layout), found with at most ``evaluations`` reports
    of the concept's prompts only (the unrelated prompts are not sampled; the original model's trajectories are
    sampled once and every strength is measured on them). An edit already there keeps strength 1.

    Returns ``{"strength", "reached", "target", "history": [[strength, mid, late], ...], "unet_evaluations"}``;
    ``reached`` False: no strength measured (up to ``max_strength``) got there, and the strongest measured is
    returned. docs/ant.md#calibrate"""
    s = replace(settings or ReportSettings(), unrelated_prompts=0)
    progress = as_progress(progress)
    items = [concepts] if isinstance(concepts, str) else list(concepts)
    units = report_steps(sum(len(p) for p in _concept_prompts(items, s.concept_prompts).values()), 0, s)
    history: list[list[float]] = []
    evals = 0
    originals: dict = {}  # the concept's original trajectories, sampled by the first report and reused

    def worst(strength: float) -> float:
        nonlocal evals
        progress.extend(units if not originals else len(_late_steps(s)))  # each report's steps, on the caller's bar
        r = erasure_report(backbone, weights.scaled(strength), items, [], s, progress, originals)
        evals += r["unet_evaluations"]
        g = r["guidance_left_by_stage"]
        history.append([round(strength, 4), g["mid"], g["late"]])
        return max(v for v in (g["mid"], g["late"]) if v is not None)

    below, f_below = 1.0, worst(1.0)  # the strongest edit measured that is still above the target
    above: tuple[float, float] | None = None  # the weakest one that reaches it
    if f_below > target:
        # guidance left is 1 without the edit: the first guess is on the line through (0, 1) and (1, f)
        guess = (1.0 - target) / (1.0 - f_below) if f_below < 1.0 else max_strength
        last = (1.0, f_below)
        for _ in range(evaluations - 1):
            guess = round(min(max(guess, below), above[0] if above else max_strength), 4)  # as recorded
            f = worst(guess)
            if f <= target:
                above = (guess, f)
            else:
                below, f_below = guess, f
            if (above and f >= target - 0.02) or (not above and guess >= max_strength):
                break  # close enough below the target, or the cap reached without it
            # the secant through the last two measurements (between the bracket's ends once there is one)
            (s0, f0), last = last, (guess, f)
            guess = guess + (target - f) * (guess - s0) / (f - f0) if f != f0 else guess * 1.25
    strength = 1.0 if f_below <= target else (above[0] if above else below)
    return {"strength": strength, "reached": f_below <= target or above is not None, "target": target,
            "history": history, "unet_evaluations": evals}


def report_steps(n_concept_prompts: int, n_unrelated: int, s: ReportSettings | None = None) -> int:
    """Progress units of :func:`erasure_report` (sampling steps and measured steps), for a progress bar's total."""
    s = s or ReportSettings()
    batches = -(-n_concept_prompts * s.seeds // s.batch_size)
    ubatches = -(-n_unrelated * s.seeds // s.batch_size) if n_unrelated else 0
    return s.steps * (batches + ubatches) + len(_late_steps(s)) + (s.steps if n_unrelated else 0)


def report_line(report: dict) -> str:
    """One line for a command's closing summary."""
    stage = report.get("guidance_left_by_stage", {})
    stages = ", ".join(f"{k} {v:.2f}" for k, v in stage.items() if v is not None)
    return (f"erasure report: guidance left {report['guidance_left']:.2f} on the concept's prompts ({stages}; 1 = "
            f"unchanged, 0 = gone, < 0 = reversed); unrelated prompts' drift {report['unrelated_drift']:.3f} (0 = "
            f"unchanged); {report['unet_evaluations']} UNet evaluations, {report['seconds']:.0f} s")


def report_text(report: dict) -> str:
    """The report as text for a node's STRING output or a log: a short reading, then the JSON."""
    g, d = report["guidance_left"], report["unrelated_drift"]
    if g <= 0:
        reading = "the concept's prompts no longer steer towards it (reversed)" if g < 0 else "the concept is gone"
    elif g < 0.5:
        reading = "most of the concept's guidance is gone"
    elif g < 0.9:
        reading = "part of the concept's guidance is left: a weak erasure"
    else:
        reading = "the concept's guidance is nearly unchanged: the erasure did little"
    lines = [report_line(report), f"concept: {reading}."]
    per = report.get("guidance_left_by_concept", {})
    if len(per) > 1:
        lines.append("per concept: " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()))
    lines.append(f"unrelated prompts: predictions moved by {d:.1%} of their own guidance direction.")
    return "\n".join(lines) + "\n\n" + json.dumps(report, indent=2)


def add_to_metadata(weights: ErasureWeights, report: dict) -> None:
    """Store ``report`` in ``weights.metadata`` (``erasure.report``, JSON) so that the LoRA file carries it; call
    before ``save_lora``."""
    weights.metadata[METADATA_KEY] = json.dumps(report, sort_keys=True)


def report_from_metadata(metadata: dict[str, str]) -> dict | None:
    """The report stored by :func:`add_to_metadata`, or None."""
    text = metadata.get(METADATA_KEY)
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


__all__ = ["METADATA_KEY", "ReportSettings", "add_to_metadata", "erasure_report", "report_from_metadata",
           "report_line", "report_steps", "report_text", "report_units"]
