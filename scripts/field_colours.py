"""What colour the empty images of a colour's prompts are (docs/lab.md#empty-images): for each LoRA, the concept's
own and synonym evaluation prompts at `lab eval`'s seeds, how many images have no shape, how many the colour head
reads as the concept, how many `lab eval`'s shape-aware reading does (an empty image has its field's colour), and each
empty image's field colour with its distance from grey (the world's backgrounds are at most FIELD_CHROMA from it).

    python scripts/field_colours.py --model lab-clip --concept blue FILE.safetensors...
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erasure.diffusers_backbone import load_diffusers  # noqa: E402
from erasure.lab import world  # noqa: E402
from erasure.lab.classifier import FIELD_CHROMA, field_chroma, load_classifier, reads_as  # noqa: E402
from erasure.lab.evaluate import EvalSettings  # noqa: E402
from erasure.lab.model import CLASSIFIER_FILE  # noqa: E402
from erasure.lora_files import load_lora, resolve_names  # noqa: E402
from erasure.sampling import sample  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lab-clip")
    p.add_argument("--concept", required=True, choices=world.COLOURS)
    p.add_argument("loras", nargs="*", help="LoRA files (none: the original model)")
    args = p.parse_args()
    clf, bb, s = load_classifier(CLASSIFIER_FILE), load_diffusers(args.model), EvalSettings()
    index = world.concept_index(args.concept)
    print(f"a field is coloured when its mean colour is more than {FIELD_CHROMA:.3f} from grey")
    for f in args.loras or [None]:
        ctx = resolve_names(load_lora(f), dict(bb.unet().named_modules())).applied(bb.unet()) if f else \
            contextlib.nullcontext()
        with ctx:
            sets = {"own": sample(bb, world.concept_prompts(args.concept), s.own_seeds(), s.steps, s.guidance).images,
                    "synonyms": sample(bb, world.concept_prompts(args.concept, synonyms=True), s.syn_seeds(),
                                       s.steps, s.guidance).images}
        for part, images in sets.items():
            pred = clf.predict(images)
            chroma = field_chroma(images).norm(dim=1)
            fields = [(world.COLOURS[c] if c >= 0 else "grey") + f" {float(d):.3f}"
                      for c, d, there in zip(pred["field"].tolist(), chroma, pred["present"].tolist(), strict=True)
                      if not there]
            print(f"{f or 'original model'}, {part} prompts: {len(images)} images, no shape in {len(fields)}; "
                  f"the colour head reads {int((pred['colour'] == index).sum())} as {args.concept}, the shape-aware "
                  f"reading {int(reads_as(pred, 'colour', index).sum())}; empty images' fields: {', '.join(fields)}")


if __name__ == "__main__":
    main()
