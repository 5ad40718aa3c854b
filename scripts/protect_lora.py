"""Apply ``protect`` to an erasure LoRA that was made without it: every cross-attention K/V change multiplied on the
right by ``I - V V^T``, ``V`` the text-embedding directions holding ``--protect`` of the prior prompts' token energy
(the prompts without the concepts, as the run's own prior). For a MACE file this is what ``--protect`` did before
it was also applied while each LoRA trains (the projection of the result only), so the "result only" rows of
docs/mace.md#protect were measured on the protect-0 runs' files this way; today's ``--protect`` trains the LoRAs in
the kept directions and gives another result.

    python scripts/protect_lora.py LORA MODEL "circle; green" OUT [--protect 0.999]
"""

from __future__ import annotations

import argparse

from erasure.diffusers_backbone import load_diffusers
from erasure.files import cache_dir
from erasure.lab import world
from erasure.lab.model import is_lab_model
from erasure.lora_files import load_lora, save_lora
from erasure.prior import gram, protected_complement
from erasure.prompts import prior_prompts, split_list


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lora")
    p.add_argument("model", help="lab, lab-clip or a diffusers folder")
    p.add_argument("concepts", help="';'-separated: left out of the prior prompts")
    p.add_argument("out")
    p.add_argument("--protect", type=float, default=0.999)
    a = p.parse_args(argv)
    concepts = split_list(a.concepts)
    bb = load_diffusers(a.model)
    prompts = world.prior_prompts(exclude=concepts) if is_lab_model(a.model) else prior_prompts(exclude=concepts)
    keep, k = protected_complement(gram(bb, prompts, cache_dir()), a.protect)
    w = load_lora(a.lora)
    out = w.projected(keep, bb.cross_attention_kv())
    out.metadata["erasure.protect_used"] = "true"
    save_lora(out, a.out)
    print(f"wrote {a.out}: the K/V change kept off {k} of {keep.shape[0]} directions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
