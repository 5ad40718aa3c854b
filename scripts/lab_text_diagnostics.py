"""Where a lab model's prompt carries its concept (issue 18, item 4): in the concept word's token, or also in the
tokens after it (the end token and the padding, which SD's CLIP fills with a summary of the prompt and which MACE's
closed-form refinement edits). For each lab model:

- ``end cos``: mean cosine of the end-token states of prompts that differ in one concept word ("a photo of a
  circle" vs "... square"); 1.0 = the end token says nothing about the concept.
- ``attn word / after``: cross-attention mass (mean over layers, heads, pixels, timesteps of sampling) on the
  concept word's token and on every token after it, for the concept's prompts.
- ``acc``: the classifier's accuracy on the concept's own prompt; ``word only``: the states after the word replaced
  by the anchor prompt's ("a photo of a shape"), so only the word's token says the concept; ``after only``: the
  word's token replaced by the anchor's, so only the tokens after it (end token, padding) can say it.

- with ``--cfr``: MACE's closed-form refinement alone (stage 2 of 4, the object preset's settings; the stage that
  edits every token of the concept's prompts, end token and padding included) on each of ``--cfr-concepts``, judged
  by ``lab eval``'s full evaluation: efficacy, generality, specificity.

    python scripts/lab_text_diagnostics.py                 # both lab models, shapes and styles, 32 seeds each
    python scripts/lab_text_diagnostics.py --cfr           # and CFR alone on circle, triangle, green
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from erasure.diffusers_backbone import load_diffusers
from erasure.lab import world
from erasure.lab.classifier import load_classifier
from erasure.lab.clip_train import text_report
from erasure.lab.model import CLASSIFIER_FILE, LAB_MODELS
from erasure.sampling import sample

#: (concept prompt with {w}, anchor word): the anchor has the concept word's position, so states align token by token
CASES = {**{s: ("a photo of a {w}", "shape") for s in world.SHAPES},
         **{y: ("a shape in {w} style", "plain") for y in world.STYLE_CONCEPTS}}


@contextlib.contextmanager
def spliced(bb, prompt: str, anchor_prompt: str, pos: int, keep: str):
    """``bb.encode_text`` with ``prompt``'s states mixed with ``anchor_prompt``'s: ``keep="word"`` keeps positions
    up to and including ``pos`` from ``prompt``; ``keep="after"`` keeps those after ``pos`` and the anchor's before."""
    original = bb.encode_text

    def encode(prompts):
        enc = original(prompts)
        if prompt not in prompts:
            return enc
        a = original([anchor_prompt]).embeds[0]
        e = enc.embeds.clone()
        for i, p in enumerate(prompts):
            if p == prompt:
                if keep == "word":
                    e[i, pos + 1 :] = a[pos + 1 :]
                else:
                    e[i, : pos + 1] = a[: pos + 1]
        return type(enc)(e, enc.extras)

    bb.encode_text = encode
    try:
        yield
    finally:
        bb.encode_text = original


class Mass:
    def __init__(self, word: int) -> None:
        self.word_pos, self.word, self.after, self.n = word, 0.0, 0.0, 0

    def __call__(self, name, probs, hw) -> None:
        self.word += float(probs[..., self.word_pos].mean())
        self.after += float(probs[..., self.word_pos + 1 :].sum(-1).mean())
        self.n += 1


@torch.no_grad()
def diagnose(name: str, seeds: int) -> list[dict]:
    bb = load_diffusers(name)
    clf = load_classifier(CLASSIFIER_FILE)
    te, tok = bb.text_encoders[0], bb.tokenizers[0]
    cos = text_report(te.float().eval(), tok)
    rows = []
    for concept, (template, anchor) in CASES.items():
        prompt, anchor_prompt = template.format(w=concept), template.format(w=anchor)
        pos = bb.token_positions(prompt, concept)[0]
        kind, index = world.concept_kind(concept), world.concept_index(concept)
        ss = list(range(5000, 5000 + seeds))
        row = {"model": name, "concept": concept, **cos}
        m = Mass(pos)
        with bb.capture_attention(m):
            images = sample(bb, [prompt], ss, steps=10, guidance=5.0).images
        row["attn_word"], row["attn_after"] = m.word / m.n, m.after / m.n
        row["acc"] = float((clf.predict(images)[kind] == index).float().mean())
        for keep in ("word", "after"):
            with spliced(bb, prompt, anchor_prompt, pos, keep):
                images = sample(bb, [prompt], ss, steps=10, guidance=5.0).images
            row[f"{keep}_only"] = float((clf.predict(images)[kind] == index).float().mean())
        rows.append(row)
        print(row, flush=True)
    return rows


def cfr_rows(name: str, concepts: list[str]) -> list[dict]:
    from erasure.lab.demo import erase
    from erasure.lab.evaluate import EvalSettings, evaluate

    bb = load_diffusers(name)
    clf = load_classifier(CLASSIFIER_FILE)
    rows = []
    for c in concepts:
        r = evaluate(bb, clf, [c], erase(bb, c, "cfr"), EvalSettings())
        rows.append({"model": name, "concept": c, **{k: r[k] for k in ("efficacy", "generality", "specificity")}})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(LAB_MODELS))
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--cfr", action="store_true")
    ap.add_argument("--cfr-concepts", default="circle,triangle,green")
    args = ap.parse_args()
    rows = [r for name in args.models.split(",") for r in diagnose(name, args.seeds)]
    print("\n| model | concept | end cos | attn word | attn after | acc | word only | after only |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['concept']} | {r['end_token_cosine']:.3f} | {r['attn_word']:.3f} | "
              f"{r['attn_after']:.3f} | {r['acc']:.2f} | {r['word_only']:.2f} | {r['after_only']:.2f} |")
    if args.cfr:
        cfr = [r for name in args.models.split(",") for r in cfr_rows(name, args.cfr_concepts.split(","))]
        print("\n| model | CFR alone on | efficacy | generality | specificity |")
        print("| --- | --- | ---: | ---: | ---: |")
        for r in cfr:
            print(f"| {r['model']} | {r['concept']} | {r['efficacy']:.3f} | {r['generality']:.3f} | "
                  f"{r['specificity']:.3f} |")


if __name__ == "__main__":
    main()
