"""Which of a lab concept's evaluation images (prompt, seed) still show it under each erasure LoRA, beside the seeds
whose starting noise the original model draws the concept from with no prompt at all (the empty prompt, the same
seeds) (docs/ant.md#why-colours-resist).

    python scripts/concept_survivors.py CONCEPT LORA [LORA ...]
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

from erasure.diffusers_backbone import load_diffusers
from erasure.lab import world
from erasure.lab.classifier import load_classifier
from erasure.lab.evaluate import EvalSettings
from erasure.lab.model import CLASSIFIER_FILE
from erasure.lora_files import load_lora
from erasure.sampling import sample


def main(argv: list[str]) -> int:
    concept, files = argv[0], argv[1:]
    bb, clf, s = load_diffusers("lab"), load_classifier(CLASSIFIER_FILE), EvalSettings()
    head, index = world.concept_kind(concept), world.concept_index(concept)
    sets = {"own": (world.concept_prompts(concept), s.own_seeds()),
            "synonyms": (world.concept_prompts(concept, synonyms=True), s.syn_seeds())}

    def showing(prompts: list[str], seeds: list[int], weights=None) -> list[tuple[str, int]]:
        with weights.applied(bb.unet()) if weights is not None else nullcontext():
            got = clf.predict(sample(bb, prompts, seeds, s.steps, s.guidance).images)[head]
        return [(prompts[i // len(seeds)], seeds[i % len(seeds)]) for i in range(len(got)) if int(got[i]) == index]

    for part, (prompts, seeds) in sets.items():
        base = sorted({sd for _, sd in showing([""], seeds)})
        print(f"{part}: {len(prompts)} prompts x seeds {seeds}; the original model shows {concept} in "
              f"{len(showing(prompts, seeds))} of {len(prompts) * len(seeds)} images, and with the empty prompt at "
              f"seeds {base}")
        for f in files:
            left = showing(prompts, seeds, load_lora(f))
            at = sorted({sd for _, sd in left})
            print(f"  {f}: {len(left)} still show it, at seeds {at}"
                  f"{' (all of them seeds the empty prompt draws it at)' if left and set(at) <= set(base) else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
