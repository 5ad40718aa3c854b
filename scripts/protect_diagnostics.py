"""How much of a concept's token lies outside the directions ANT's ``protect`` keeps off (docs/ant.md#protect): for
each energy fraction, the number of eigen-directions of the unrelated prompts' token Gram that hold it, and the share
of the concept token's energy (over its prompts) outside them, which is what a protected edit can still reach.
With ``--learned``, the same share for audits' learned tokens (``learned-token.safetensors``: the token's encoder
output at its slot, in the concept's prompts with the token in the word's place; the first concept only).

    python scripts/protect_diagnostics.py [--model lab|lab-clip] [--concepts circle,triangle,green,striped]
        [--learned FILE ...]
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lab")
    p.add_argument("--concepts", default="circle,triangle,green,striped")
    p.add_argument("--energies", default="0.9,0.99,0.999,0.9999")
    p.add_argument("--learned", nargs="*", default=[], help="audits' learned-token.safetensors files")
    a = p.parse_args(argv)
    bb = load_diffusers(a.model)
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
