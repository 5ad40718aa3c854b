"""``lab eval``: generate the fixed evaluation set, classify it, and report per-concept accuracy and erasure metrics.

The evaluation set is every lab concept's own prompts (``world.concept_prompts``) with ``seeds_own`` seeds each, and
its synonym prompts with ``seeds_syn`` seeds each; the seeds are fixed, so the original and an edited model are
compared image for image: beside the erasure metrics (``metrics.py``), ``collateral`` counts the unrelated images
whose shape, colour and style all stayed as they were (``kept``). The original model's images are cached on disk
(keyed by the model's fingerprint and the settings), so evaluating an edited model costs one generation pass.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from ..backbone import Backbone
from ..files import atomic_write_png, cache_dir, load_cache, save_cache
from ..progress import Progress
from ..sampling import sample
from ..weights import ErasureWeights
from . import world
from .classifier import HEADS, LabClassifier, reads_as, seen_as
from .metrics import fidelity, summarise


@dataclass(frozen=True)
class EvalSettings:
    steps: int = 10
    guidance: float = 5.0
    seeds_own: int = 8
    seeds_syn: int = 4
    seed_base: int = 1000
    concepts: tuple[str, ...] = field(default=world.ALL_CONCEPTS)

    def own_seeds(self) -> list[int]:
        return list(range(self.seed_base, self.seed_base + self.seeds_own))

    def syn_seeds(self) -> list[int]:
        return list(range(self.seed_base + 500, self.seed_base + 500 + self.seeds_syn))


def _prompt_sets(s: EvalSettings) -> tuple[list[str], list[str]]:
    own = [p for c in s.concepts for p in world.concept_prompts(c)]
    syn = [p for c in s.concepts for p in world.concept_prompts(c, synonyms=True)]
    return own, syn


def generate(backbone: Backbone, s: EvalSettings, desc: str = "generating") -> dict[str, torch.Tensor]:
    """Images of the evaluation set: ``own`` [len(own prompts) * seeds_own, ...] and ``syn`` likewise."""
    own, syn = _prompt_sets(s)
    total = (len(own) * s.seeds_own + len(syn) * s.seeds_syn + 127) // 128 * s.steps
    with tqdm(total=total, desc=desc, leave=False, disable=None) as bar:
        a = sample(backbone, own, s.own_seeds(), s.steps, s.guidance, progress=Progress(bar.update)).images
        b = sample(backbone, syn, s.syn_seeds(), s.steps, s.guidance, progress=Progress(bar.update)).images
    return {"own": a, "syn": b}


def _cached_images(backbone: Backbone, s: EvalSettings, expect: dict[str, int], make, use_cache: bool,
                   *what: str) -> dict[str, torch.Tensor]:
    """The unedited model's images ``make()``, from the disk cache when valid (fingerprint, settings, ``what``,
    shapes)."""
    fp = backbone.fingerprint() if hasattr(backbone, "fingerprint") else "unknown"
    key = hashlib.sha256(json.dumps([fp, asdict(s), torch.__version__, *what], sort_keys=True).encode()).hexdigest()
    path = cache_dir() / "lab-eval" / f"{key[:20]}.safetensors"
    if use_cache:
        cached = load_cache(path, {k: (n, None, None, None) for k, n in expect.items()})
        if cached is not None:  # None: missing, corrupt (content hash) or stale (shapes); rebuilt below
            return cached
    images = make()
    if use_cache:
        save_cache(images, path, {"fingerprint": fp})
    return images


def original_images(backbone: Backbone, s: EvalSettings, use_cache: bool = True) -> dict[str, torch.Tensor]:
    """The unedited model's evaluation images, from the disk cache when valid (fingerprint, settings, shapes)."""
    own, syn = _prompt_sets(s)
    expect = {"own": len(own) * s.seeds_own, "syn": len(syn) * s.seeds_syn}
    return _cached_images(backbone, s, expect, lambda: generate(backbone, s, desc="original model"), use_cache)


def _hits(pred: dict[str, torch.Tensor], prompts: list[str], concepts: tuple[str, ...], per_prompt: int,
          synonyms: bool, shape_aware: bool = False) -> dict[str, float]:
    """Per concept, the fraction of its prompts' images read as the concept. ``shape_aware``: an image with no shape
    (the presence head) shows no shape concept, whatever the shape head reads, and the colour of its field
    (``classifier.reads_as``)."""
    out: dict[str, float] = {}
    i = 0
    for c in concepts:
        n = len(world.concept_prompts(c, synonyms=synonyms)) * per_prompt
        rows = {k: v[i : i + n] for k, v in pred.items()}
        kind, index = world.concept_kind(c), world.concept_index(c)
        hit = reads_as(rows, kind, index) if shape_aware else rows[kind] == index
        out[c] = float(hit.float().mean())
        i += n
    assert i == len(prompts) * per_prompt
    return out


def _shape_presence(pred_orig: dict[str, torch.Tensor], pred_own: dict[str, torch.Tensor],
                    pred_syn: dict[str, torch.Tensor], s: EvalSettings, erased: list[str], fid: float) -> dict:
    """Images with no shape in them (the presence head), and the metrics with those images read as showing no shape
    concept (docs/lab.md#empty-images)."""
    own, syn = _prompt_sets(s)
    keep = _unrelated_mask(s, erased)
    syn_rows = ~_unrelated_mask(s, erased, synonyms=True)
    empty = {"erased_prompts": float((~pred_own["present"][~keep]).float().mean()),
             "synonym_prompts": float((~pred_syn["present"][syn_rows]).float().mean()),
             "unrelated": float((~pred_own["present"][keep]).float().mean()),
             "unrelated_original": float((~pred_orig["present"][keep]).float().mean())}
    acc_a = _hits(pred_own, own, s.concepts, s.seeds_own, False, True)
    syn_a = _hits(pred_syn, syn, s.concepts, s.seeds_syn, True, True)
    aware = summarise(acc_a, syn_a, erased, fid)
    coll = collateral(seen_as(pred_orig), seen_as(pred_own), keep, erased)
    return {"no_shape": empty, "shape_aware": {**{k: aware[k] for k in ("efficacy", "generality", "specificity", "H")},
                                               "kept": coll["unrelated"]["all"], "collateral": coll}}


def without_words(prompt: str, words: set[str] | tuple[str, ...]) -> str:
    """The prompt with every occurrence of the given words taken out ("a green shape" -> "a shape")."""
    return " ".join(w for w in prompt.split() if w not in words)


def _sample_sets(backbone: Backbone, s: EvalSettings, prompts: dict[str, list[str]], seeds: dict[str, list[int]]
                 ) -> dict[str, torch.Tensor]:
    return {k: sample(backbone, prompts[k], seeds[k], s.steps, s.guidance).images for k in prompts}


def word_removed(backbone: Backbone, clf: LabClassifier, erased: list[str], s: EvalSettings,
                 use_cache: bool = True) -> dict:
    """The concept-free reference of an erasure: the original model on the erased concepts' evaluation prompts with
    the concept's word (own prompts) or synonym (synonym prompts) taken out, at the same seeds, scored as efficacy and
    generality are (and, with the presence net, ``shape_aware`` as ``lab eval``'s). It is what an erasure that makes
    the model read the prompt as if the word were not there gets: where the model draws the concept from a starting
    noise with no word for it (a colour, a style), it keeps it there (docs/lab.md#metrics). The original model's
    images of those prompts are cached on disk as its evaluation images are."""
    by: dict[str, dict[str, float]] = {}
    for c in erased:
        prompts = {"own": [without_words(p, {c}) for p in world.concept_prompts(c)],
                   "syn": [without_words(p, set(world.SYNONYMS[c])) for p in world.concept_prompts(c, synonyms=True)]}
        seeds = {"own": s.own_seeds(), "syn": s.syn_seeds()}
        images = _cached_images(backbone, s, {k: len(prompts[k]) * len(seeds[k]) for k in prompts},
                                partial(_sample_sets, backbone, s, prompts, seeds), use_cache, "word_removed", c)
        kind, index = world.concept_kind(c), world.concept_index(c)
        pred = {k: clf.predict(images[k]) for k in ("own", "syn")}
        parts = (("efficacy", "own"), ("generality", "syn"))
        by[c] = {part: 1.0 - float((pred[k][kind] == index).float().mean()) for part, k in parts}
        if "present" in pred["own"]:
            by[c]["shape_aware"] = {part: 1.0 - float(reads_as(pred[k], kind, index).float().mean())
                                    for part, k in parts}
    mean: dict = {k: sum(v[k] for v in by.values()) / len(by) for k in ("efficacy", "generality")}
    if all("shape_aware" in v for v in by.values()):
        mean["shape_aware"] = {k: sum(v["shape_aware"][k] for v in by.values()) / len(by)
                               for k in ("efficacy", "generality")}
    return {**mean, "by_concept": by}


def evaluate(backbone: Backbone, clf: LabClassifier, erased: list[str] | None = None,
             weights: ErasureWeights | None = None, settings: EvalSettings | None = None,
             grid: Path | None = None, use_cache: bool = True) -> dict:
    """Evaluate the model (edited by ``weights`` if given). Returns the lab's JSON layout."""
    s = settings or EvalSettings()
    erased = list(erased or [])
    for c in erased:
        world.concept_kind(c)  # raises with the list of lab concepts
    t0 = time.time()
    orig = original_images(backbone, s, use_cache)
    if weights is not None:
        with weights.applied(backbone.unet()):
            edited = generate(backbone, s, desc="edited model")
    else:
        edited = orig
    own, syn = _prompt_sets(s)
    pred_own, pred_syn = clf.predict(edited["own"]), clf.predict(edited["syn"])
    acc = _hits(pred_own, own, s.concepts, s.seeds_own, False)
    syn_acc = _hits(pred_syn, syn, s.concepts, s.seeds_syn, True)
    report: dict = {"concepts": {c: {"accuracy": acc[c], "synonym_accuracy": syn_acc[c]} for c in s.concepts}}
    if erased:
        keep = _unrelated_mask(s, erased)
        pred_orig = clf.predict(orig["own"])
        report.update(summarise(acc, syn_acc, erased, fidelity(edited["own"][keep], orig["own"][keep])))
        report["collateral"] = collateral(pred_orig, pred_own, keep, erased)
        report["kept"] = report["collateral"]["unrelated"]["all"]
        if "present" in pred_own:
            report.update(_shape_presence(pred_orig, pred_own, pred_syn, s, erased, report["fidelity"]))
        report["word_removed"] = word_removed(backbone, clf, erased, s, use_cache)
        report["erased"] = erased
    report["seconds"] = round(time.time() - t0, 2)
    report["settings"] = asdict(s)
    if grid is not None:
        write_grid(grid, s, orig["own"], edited["own"] if weights is not None else None, erased)
    return report


def collateral(orig: dict[str, torch.Tensor], edited: dict[str, torch.Tensor], unrelated: torch.Tensor,
               erased: list[str]) -> dict[str, dict[str, float]]:
    """What else changed, image by image (same prompts and seeds), as the classifier reads shape, colour and style.

    ``unrelated``: of the other concepts' images whose original shows no erased concept, the fraction whose
    prediction on each head (and on all three) equals the original's. ``erased_prompts``: of the erased concepts' own
    images, the same on the heads that are not erased (an erased circle prompt should keep its colour and style)."""
    shows_erased = torch.zeros_like(unrelated)
    for c in erased:
        shows_erased |= orig[world.concept_kind(c)] == world.concept_index(c)
    erased_heads = {world.concept_kind(c) for c in erased}

    def kept(rows: torch.Tensor, heads: list[str]) -> dict[str, float]:
        n = int(rows.sum())
        same = {h: (edited[h] == orig[h]) & rows for h in heads}
        out = {h: float(same[h].sum()) / n if n else 1.0 for h in heads}
        every = rows.clone()
        for h in heads:
            every &= same[h]
        out["all"] = float(every.sum()) / n if n and heads else 1.0
        out["images"] = n
        return out

    return {"unrelated": kept(unrelated & ~shows_erased, list(HEADS)),
            "erased_prompts": kept(~unrelated, [h for h in HEADS if h not in erased_heads])}


def _unrelated_mask(s: EvalSettings, erased: list[str], synonyms: bool = False) -> torch.Tensor:
    """Per image of the own-prompt set (or the synonym set): True where its concept is not erased."""
    flags = []
    for c in s.concepts:
        flags += [c not in erased] * (len(world.concept_prompts(c, synonyms=synonyms))
                                      * (s.seeds_syn if synonyms else s.seeds_own))
    return torch.tensor(flags, dtype=torch.bool)


def _rows_for(s: EvalSettings, concept: str) -> slice:
    i = 0
    for c in s.concepts:
        n = len(world.concept_prompts(c)) * s.seeds_own
        if c == concept:
            return slice(i, i + s.seeds_own)  # the first prompt's seeds
        i += n
    raise KeyError(concept)


def write_grid(path: Path, s: EvalSettings, orig: torch.Tensor, edited: torch.Tensor | None,
               erased: list[str], scale: int = 3) -> None:
    """PNG grid: for each shown prompt a row of seeds from the original model and, below it, the edited model."""
    from PIL import Image, ImageDraw

    shown = erased + [c for c in s.concepts if c not in erased][: max(2, 4 - len(erased))]
    rows: list[tuple[str, torch.Tensor]] = []
    for c in shown:
        sl = _rows_for(s, c)
        prompt = world.concept_prompts(c)[0]
        tag = "erased" if c in erased else "unrelated"
        rows.append((f"original: {prompt}", orig[sl]))
        if edited is not None:
            rows.append((f"edited ({tag})", edited[sl]))
    cell, label_w = world.IMAGE_SIZE * scale, 190
    canvas = Image.new("RGB", (label_w + cell * s.seeds_own, cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, imgs) in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), label, fill="black")
        for j, img in enumerate(imgs):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_w + j * cell, r * cell))
    atomic_write_png(path, canvas)  # a temporary name of its own: two evaluations may write the same grid


def format_table(report: dict, before: dict | None = None) -> str:
    """A plain-text table of per-concept accuracies (and the summary metrics when present)."""
    lines = []
    head = f"{'concept':<11}{'kind':<8}{'accuracy':>10}{'synonyms':>10}"
    if before is not None:
        head = f"{'concept':<11}{'kind':<8}{'acc before':>11}{'acc after':>11}{'syn before':>11}{'syn after':>11}"
    lines.append(head)
    erased = set(report.get("erased", []))
    for c, v in report["concepts"].items():
        mark = " *" if c in erased else ""
        kind = world.concept_kind(c)
        if before is None:
            lines.append(f"{c + mark:<11}{kind:<8}{v['accuracy']:>10.1%}{v['synonym_accuracy']:>10.1%}")
        else:
            b = before["concepts"][c]
            lines.append(f"{c + mark:<11}{kind:<8}{b['accuracy']:>11.1%}{v['accuracy']:>11.1%}"
                         f"{b['synonym_accuracy']:>11.1%}{v['synonym_accuracy']:>11.1%}")
    if "efficacy" in report:
        lines.append("")
        lines.append("  ".join(f"{k} {report[k]:.3f}" for k in ("efficacy", "generality", "specificity", "H",
                                                                  "fidelity", "kept")))
        for part, what in (("unrelated", "unrelated images"), ("erased_prompts", "erased prompts' images")):
            c = report["collateral"][part]
            heads = " ".join(f"{h} {v:.3f}" for h, v in c.items() if h not in ("all", "images"))
            lines.append(f"{what} keeping {heads or '(no head left)'}: all {c['all']:.3f} of {c['images']}")
        if "no_shape" in report:
            e, a = report["no_shape"], report["shape_aware"]
            lines.append(f"images with no shape: erased prompts {e['erased_prompts']:.1%}, their synonyms "
                         f"{e['synonym_prompts']:.1%}, unrelated {e['unrelated']:.1%} (original "
                         f"{e['unrelated_original']:.1%}); read as no shape, the field's colour: efficacy "
                         f"{a['efficacy']:.3f}  generality {a['generality']:.3f}  specificity {a['specificity']:.3f}"
                         + (f"  kept {a['kept']:.3f} (erased prompts' images keeping their other heads "
                            f"{a['collateral']['erased_prompts']['all']:.3f})" if "kept" in a else ""))
        if "word_removed" in report:
            r = report["word_removed"]
            aware = r.get("shape_aware")
            lines.append(f"reference, the original model with the erased words taken out of the prompts: efficacy "
                         f"{r['efficacy']:.3f}  generality {r['generality']:.3f}"
                         + (f" (read as above: {aware['efficacy']:.3f}  {aware['generality']:.3f})" if aware else ""))
    if erased:
        lines.append("(* erased)")
    return "\n".join(lines)


__all__ = ["EvalSettings", "HEADS", "collateral", "evaluate", "format_table", "generate", "original_images",
           "without_words", "word_removed", "write_grid"]
