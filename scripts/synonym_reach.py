"""Could a protected edit be taught a concept's synonyms without being told them? (docs/ant.md#synonyms-under-protect)

A protected K/V edit changes a token only through its part outside the kept-off directions (``protect`` 0.999). For
each way of widening what the edit is trained on, this prints how many directions the trained-on parts span (99% of
their energy, every position of the concept's templates) and the share of the lab synonyms' own parts (every position
of "a photo of a SYN" and "a SYN", or the colour prompts) that lies in that span:

- the word itself (ANT's prompts);
- the word's input embedding plus Gaussian noise (``--sigmas``, in units of the token table's std; 16 draws each);
- tokens learned by the audit's concept inversion on the *original* model (``--tokens`` of them, 200 steps each,
  ANT's adversarial round on 16 images of the concept), added to the word's prompts.

    python scripts/synonym_reach.py [--model lab] [--concept square] [--sigmas 0.5,1,2] [--tokens 3]
"""

from __future__ import annotations

import argparse

import torch

from erasure.ant.adversarial import attack_round, concept_images, slot_templates, start_token
from erasure.ant.settings import AntSettings
from erasure.audit_text import DiffusersSlotEncoder
from erasure.diffusers_backbone import load_diffusers
from erasure.files import cache_dir
from erasure.lab import world
from erasure.prior import gram, protected_complement
from erasure.progress import Progress


def span(rows: torch.Tensor, energy: float = 0.99) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(rows.T, full_matrices=False)
    k = int(((s**2).cumsum(0) / (s**2).sum() < energy).sum()) + 1
    return u[:, :k]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lab")
    p.add_argument("--concept", default="square")
    p.add_argument("--sigmas", default="0.5,1,2")
    p.add_argument("--tokens", type=int, default=3)
    a = p.parse_args(argv)
    bb = load_diffusers(a.model)
    enc = DiffusersSlotEncoder(bb)
    keep, k = protected_complement(gram(bb, world.prior_prompts(exclude=[a.concept]), cache_dir()), 0.999)
    keep = keep.double()
    d = keep.shape[0]
    templates = world.concept_templates(a.concept, with_other_concepts=False)
    slots = slot_templates(templates)
    syn = world.SYNONYMS[a.concept]
    if world.concept_kind(a.concept) == "colour":
        syn_prompts = [f"a {s} shape" for s in syn] + [f"a photo of a {s} object" for s in syn]
    else:
        syn_prompts = [f"a photo of a {s}" for s in syn] + [f"a {s}" for s in syn]

    def reach(prompts_or_vecs) -> torch.Tensor:
        if isinstance(prompts_or_vecs, list) and isinstance(prompts_or_vecs[0], str):
            e = bb.encode_text(prompts_or_vecs).embeds
        else:
            e = enc.encode(slots, [prompts_or_vecs]).embeds
        return (e.double() @ keep).reshape(-1, d)

    def cover(rows: torch.Tensor) -> str:
        u = span(rows)
        inside = float((target @ u).norm() ** 2 / target.norm() ** 2)
        return f"span {u.shape[1]} of the {d - k} reachable directions, synonyms' part inside {inside:.3f}"

    print(f"{a.model} {a.concept}: protect 0.999 keeps {k} of {d} directions off")
    with torch.no_grad():
        target = reach(syn_prompts)
        word_prompts = [t.replace("{c}", a.concept) for t in templates]
        word = reach(word_prompts)
        e = bb.encode_text(word_prompts).embeds.double()
        at = torch.cat([e[i, bb.token_positions(q, a.concept)] for i, q in enumerate(word_prompts)])
        word_share = float((at @ keep).norm() ** 2 / at.norm() ** 2)
        print(f"the word: {cover(word)}")
        w = enc.word_vectors(a.concept)[0].float()
        g = torch.Generator().manual_seed(0)
        for sigma in (float(x) for x in a.sigmas.split(",")):
            rows = torch.cat([word] + [reach(w + sigma * enc.scales()[0] * torch.randn(w.shape, generator=g))
                                       for _ in range(16)])
            print(f"+ noise sigma {sigma:g}: {cover(rows)}")
    rows = word
    for seed in range(a.tokens):
        s = AntSettings(seed=seed, adversarial=1, protect=0)
        images, _ = concept_images(bb, world.concept_prompts(a.concept), s, Progress())
        tok = start_token(bb, enc, slots, images, s)
        for _ in range(10):
            attack_round(bb, tok, s, False, Progress())
        with torch.no_grad():
            full = enc.encode(slots, [v.detach() for v in tok.vectors]).embeds.double()
            rows = torch.cat([rows, (full @ keep).reshape(-1, d)])
            at = torch.cat([full[i, enc.token_ids(bb.tokenizers[0], t, 1)[1]] for i, t in enumerate(slots)])
            print(f"+ learned token {seed} (attack loss {tok.history[-1]['attack_loss']:.4f}; at its slot "
                  f"{float((at @ keep).norm() ** 2 / at.norm() ** 2):.3f} of its energy reachable, the word "
                  f"{word_share:.3f} at its own): {cover(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
