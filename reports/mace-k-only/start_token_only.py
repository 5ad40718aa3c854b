"""Sample the original lab-clip model with every prompt position from `keep` on replaced by the start token's
encoding (keep 16: the prompt as it is; keep 2: start token and "a" only) and print the classifier's colours and
shapes for "a green shape", "a photo of a circle" and "" at seeds 1000-1007 (docs/mace.md#the-value-lora).

    python reports/mace-k-only/start_token_only.py
"""
import torch
from erasure.diffusers_backbone import load_diffusers
from erasure.lab.classifier import load_classifier
from erasure.lab.model import CLASSIFIER_FILE
from erasure.lab import world
from erasure.sampling import sample
torch.set_grad_enabled(False)
bb = load_diffusers("lab-clip"); clf = load_classifier(CLASSIFIER_FILE)
orig = bb.encode_text
for keep in (16, 4, 3, 2, 1):
    def enc(prompts, keep=keep):
        t = orig(prompts); c = t.embeds.clone()
        if keep < c.shape[1]:
            c[:, keep:] = c[:, :1]
        t.embeds = c
        return t
    bb.encode_text = enc
    out = sample(bb, ["a green shape", "a photo of a circle", ""], list(range(1000, 1008)), 10, 5.0)
    p = clf.predict(out.images)
    print("keep", keep, "colours", [world.COLOURS[j] for j in p["colour"].tolist()])
    print("        shapes", [world.SHAPES[j] for j in p["shape"].tolist()])
