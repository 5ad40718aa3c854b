"""How much of a concept's token lies outside the directions ANT's ``protect`` keeps off (docs/ant.md#protect): for
each energy fraction, the number of eigen-directions of the unrelated prompts' token Gram that hold it, and the share
of the concept token's energy (over its prompts) outside them, which is what a protected edit can still reach.
With ``--learned``, the same share for audits' learned tokens (``learned-token.safetensors``: the token's encoder
output at its slot, in the concept's prompts with the token in the word's place; the first concept only).
With ``--synonyms``, a second table at ``protect`` 0.999: for each of the concept's lab synonyms, the share of the
synonym token's energy outside the kept-off directions and how well that part lines up with the concept word's own
(cosine of the two parts in the same prompt, averaged over the concept's prompts): a protected edit trained on the
word reaches a synonym only along that common part (docs/ant.md#synonyms-under-protect).

    python scripts/protect_diagnostics.py [--model lab|lab-clip] [--concepts circle,triangle,green,striped]
        [--learned FILE ...] [--synonyms]
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import load_file

from erasure.ant.train import protected_complement
from erasure.audit_text import DiffusersSlotEncoder
from erasure.diffusers_backbone import load_diffusers
from erasure.lab import world
from erasure.lab.demo import lab_concept


def outside_share(backbone, concept: str, proj: torch.Tensor) -> float:
    c = lab_concept(concept)
    prompts = c.prompts()
    emb = backbone.encode_text(prompts).embeds.float()
    rows = torch.cat([emb[i, backbone.token_positions(p, concept)] for i, p in enumerate(prompts)])
    return float((rows @ proj).pow(2).sum() / rows.pow(2).sum())


def learned_share(backbone, concept: str, file: str, proj: torch.Tensor) -> float:
    enc = DiffusersSlotEncoder(backbone)
    templates = [p.replace(concept, "{}") for p in lab_concept(concept).prompts() if concept in p]
    emb = enc.encode(templates, [load_file(file)["emb_params"]]).embeds.float()
    tok = backbone.tokenizers[0]
    rows = torch.cat([emb[i, enc.token_ids(tok, t, 1)[1]] for i, t in enumerate(templates)])
    return float((rows @ proj).pow(2).sum() / rows.pow(2).sum())


def synonym_alignment(backbone, concept: str, synonym: str, proj: torch.Tensor) -> tuple[float, float]:
    """(share of the synonym token's energy outside the kept-off directions, mean cosine between its part there and
    the concept word's in the same prompt)."""
    prompts = lab_concept(concept).prompts()
    swapped = [" ".join(synonym if w == concept else w for w in q.split()) for q in prompts]
    ec = backbone.encode_text(prompts).embeds.float()
    es = backbone.encode_text(swapped).embeds.float()
    cos, num, den = [], 0.0, 0.0
    for i, (q, r) in enumerate(zip(prompts, swapped, strict=True)):
        rc = ec[i, backbone.token_positions(q, concept)].mean(0)
        rows = es[i, backbone.token_positions(r, synonym)]
        num += float((rows @ proj).pow(2).sum())
        den += float(rows.pow(2).sum())
        cos.append(float(torch.nn.functional.cosine_similarity(rc @ proj, rows.mean(0) @ proj, dim=0)))
    return num / den, sum(cos) / len(cos)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lab")
    p.add_argument("--concepts", default="circle,triangle,green,striped")
    p.add_argument("--energies", default="0.9,0.99,0.999,0.9999")
    p.add_argument("--learned", nargs="*", default=[], help="audits' learned-token.safetensors files")
    p.add_argument("--synonyms", action="store_true", help="only the synonyms' table (protect 0.999)")
    a = p.parse_args(argv)
    bb = load_diffusers(a.model)
    if a.synonyms:
        print("| model | concept | directions kept off | word's energy outside | synonym | synonym's energy outside | "
              "alignment with the word's part |")
        print("| --- | --- | ---: | ---: | --- | ---: | ---: |")
        for concept in a.concepts.split(","):
            proj, k = protected_complement(bb, world.prior_prompts(exclude=[concept]), 0.999)
            word = outside_share(bb, concept, proj)
            for syn in world.SYNONYMS[concept]:
                share, cos = synonym_alignment(bb, concept, syn, proj)
                print(f"| {a.model} | {concept} | {k} of {proj.shape[0]} | {word:.3f} | {syn} | {share:.3f} | "
                      f"{cos:.2f} |")
        return 0
    print("| model | concept | protect | directions kept off | concept token energy outside |")
    print("| --- | --- | ---: | ---: | ---: |")
    for concept in a.concepts.split(","):
        keep = world.prior_prompts(exclude=[concept])
        for energy in (float(e) for e in a.energies.split(",")):
            proj, k = protected_complement(bb, keep, energy)
            print(f"| {a.model} | {concept} | {energy:g} | {k} of {proj.shape[0]} | "
                  f"{outside_share(bb, concept, proj):.3f} |")
            for f in a.learned if concept == a.concepts.split(",")[0] else []:
                print(f"| {a.model} | learned token, {f} | {energy:g} | {k} of {proj.shape[0]} | "
                      f"{learned_share(bb, concept, f, proj):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
