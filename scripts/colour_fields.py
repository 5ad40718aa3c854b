"""What colour a lab model draws when a prompt names none, and what colours an erasure's images of a colour are
(docs/mace.md#what-colour-nothing-is). For the original model: the empty prompt and the colour evaluation prompts with
the colour word taken out ("a shape", "a photo of a object", `lab eval`'s concept-free reference), at N seeds each.
For each LORA=CONCEPT given: the concept's own and synonym evaluation prompts at `lab eval`'s seeds. Every image is
read the shape-aware way (`lab eval`'s: an image with no shape has its field's colour, none where the field is grey).

    python scripts/colour_fields.py --model lab-clip [--seeds 64] [FILE.safetensors=blue ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erasure.diffusers_backbone import load_diffusers  # noqa: E402
from erasure.lab import world  # noqa: E402
from erasure.lab.classifier import load_classifier, seen_as  # noqa: E402
from erasure.lab.evaluate import EvalSettings, without_words  # noqa: E402
from erasure.lab.model import CLASSIFIER_FILE  # noqa: E402
from erasure.lora_files import load_lora, resolve_names  # noqa: E402
from erasure.sampling import sample  # noqa: E402


def row(name: str, images: torch.Tensor, clf) -> str:
    seen = seen_as(clf.predict(images))
    n = len(images)
    cells = [f"{int((seen['colour'] == i).sum())}" for i in range(len(world.COLOURS))]
    return (f"| {name} | {n} | {int((seen['shape'] < 0).sum())} | " + " | ".join(cells)
            + f" | {int((seen['colour'] < 0).sum())} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lab-clip")
    p.add_argument("--seeds", type=int, default=64, help="seeds per prompt for the original model's rows (0: none)")
    p.add_argument("loras", nargs="*", metavar="FILE=CONCEPT", help="erasure files and the colour each erased")
    args = p.parse_args()
    clf, bb, s = load_classifier(CLASSIFIER_FILE), load_diffusers(args.model), EvalSettings()
    print(f"{args.model}: images read the shape-aware way (no shape: the field's colour, 'none' where it is grey)\n")
    print("| prompts | images | no shape | " + " | ".join(world.COLOURS) + " | none |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in world.COLOURS) + " | ---: |")
    seeds = list(range(args.seeds))
    free = list(dict.fromkeys(without_words(q, set(world.COLOURS)) for q in world.concept_prompts("red")))
    for prompts in ([""], *[[q] for q in free]) if seeds else ():
        print(row(f"original, {prompts[0]!r}", sample(bb, prompts, seeds, s.steps, s.guidance).images, clf),
              flush=True)
    for spec in args.loras:
        f, concept = spec.rsplit("=", 1)
        if concept not in world.COLOURS:
            raise SystemExit(f"{spec}: the concept after '=' must be one of the lab's colours {world.COLOURS}")
        with resolve_names(load_lora(f), dict(bb.unet().named_modules())).applied(bb.unet()):
            for part, syn, seeds_ in (("own", False, s.own_seeds()), ("synonyms", True, s.syn_seeds())):
                images = sample(bb, world.concept_prompts(concept, synonyms=syn), seeds_, s.steps, s.guidance).images
                print(row(f"{Path(f).parent.name}/{Path(f).stem}, {concept}'s {part} prompts", images, clf),
                      flush=True)


if __name__ == "__main__":
    main()
