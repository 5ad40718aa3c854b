"""The numbers of docs/lab.md#empty-images: what the classifier's heads read on renders with no shape, and where the
shape-presence net finds no shape in the original lab models' evaluation images.

    python scripts/empty_images.py [--models lab lab-clip]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erasure.diffusers_backbone import load_diffusers  # noqa: E402
from erasure.lab import world  # noqa: E402
from erasure.lab.classifier import load_classifier  # noqa: E402
from erasure.lab.evaluate import EvalSettings, original_images  # noqa: E402
from erasure.lab.model import CLASSIFIER_FILE  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=["lab", "lab-clip"])
    args = p.parse_args()
    clf = load_classifier(CLASSIFIER_FILE)
    g = torch.Generator().manual_seed(123)
    attrs = world.sample_attributes(512, g)
    attrs.shape[:] = len(world.SHAPES)  # the world's backgrounds and styles, no shape
    pred = clf.predict(world.render(attrs, g))
    for head, names in (("shape", world.SHAPES), ("colour", world.COLOURS)):
        counts = torch.bincount(pred[head], minlength=len(names)).tolist()
        print(f"512 empty renders, {head} head: " + ", ".join(f"{n} {c}" for n, c in zip(names, counts, strict=True)))
    print(f"presence net: {int((~pred['present']).sum())} of 512 read as empty")
    for model in args.models:
        orig = original_images(load_diffusers(model), EvalSettings())
        for part in ("own", "syn"):
            empty = ~clf.predict(orig[part])["present"]
            print(f"{model}, original model, {part} prompts: no shape in {int(empty.sum())} of {len(empty)} "
                  f"(image indices {empty.nonzero()[:, 0].tolist()})")


if __name__ == "__main__":
    main()
