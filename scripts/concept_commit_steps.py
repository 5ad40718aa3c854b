"""When does the lab model commit to a concept? Each concept's evaluation prompts are sampled (the lab's 10 DDIM steps,
guidance 5, its 8 evaluation seeds) with the concept's guidance for the first ``k`` steps and then

- ``uncond``: the unconditional prediction only (what the first ``k`` steps alone decided), or
- ``reverse``: the guidance reversed, ``eps_u - eta * 7.5 * (eps_c - eps_u)`` (ANT's mid/late target at the training
  guidance, as if an edit reached it exactly from step ``k`` on),

and the lab classifier reads what share of the images still shows the concept, for ``k`` = 0 .. 10. ANT keeps the
first ``early_steps`` (1 of 10) and reverses the rest: the ``reverse`` row at ``k = 1`` is what a perfect ANT edit
would give. docs/ant.md#why-colours-resist

    python scripts/concept_commit_steps.py [--model lab] [--concepts circle,green,...] [--eta 0.3] [--synonyms]
"""

from __future__ import annotations

import argparse

import torch

from erasure.diffusers_backbone import load_diffusers
from erasure.lab import world
from erasure.lab.classifier import load_classifier
from erasure.lab.evaluate import EvalSettings
from erasure.lab.model import CLASSIFIER_FILE
from erasure.sampling import ddim_step, ddim_timesteps, guided_eps, initial_noise

TRAIN_GUIDANCE = 7.5  # AntSettings.guidance: the scale ANT's targets are at


@torch.no_grad()
def switched(bb, prompts: list[str], seeds: list[int], k: int, mode: str, eta: float, s: EvalSettings) -> torch.Tensor:
    ts = ddim_timesteps(s.steps, bb.schedule.num_timesteps)
    abar = bb.schedule.alphas_cumprod
    enc = bb.encode_text(prompts + [""])
    pairs = [(i, sd) for i in range(len(prompts)) for sd in seeds]
    x = initial_noise([sd for _, sd in pairs], bb.latent_shape())
    cond, unc = enc[[i for i, _ in pairs]], enc[[len(prompts)] * len(pairs)]
    for j, t in enumerate(ts.tolist()):
        g, eu, ec = guided_eps(bb, x, t, cond, unc, s.guidance)
        if j >= k:
            g = eu if mode == "uncond" else eu - eta * TRAIN_GUIDANCE * (ec - eu)
        x = ddim_step(abar, x, g, t, int(ts[j + 1]) if j + 1 < len(ts) else -1, bb.clip_denoised)
    return bb.decode(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lab")
    p.add_argument("--concepts", default="circle,triangle,striped,green,blue,red")
    p.add_argument("--eta", type=float, default=0.3)
    p.add_argument("--synonyms", action="store_true", help="the synonym prompts too")
    a = p.parse_args(argv)
    bb, clf, s = load_diffusers(a.model), load_classifier(CLASSIFIER_FILE), EvalSettings()
    print(f"share of images showing the concept; guidance {s.guidance}, {s.steps} steps, seeds {s.own_seeds()}")
    print("| concept | after step k: | " + " | ".join(str(k) for k in range(s.steps + 1)) + " |")
    print("| --- | --- |" + " ---: |" * (s.steps + 1))
    for c in a.concepts.split(","):
        head, index = world.concept_kind(c), world.concept_index(c)
        for syn in (False, True) if a.synonyms else (False,):
            prompts = world.concept_prompts(c, synonyms=syn)
            for mode in ("uncond", "reverse"):
                row = [float((clf.predict(switched(bb, prompts, s.own_seeds(), k, mode, a.eta, s))[head] == index)
                             .float().mean()) for k in range(s.steps + 1)]
                label = "unconditional" if mode == "uncond" else f"reversed (eta {a.eta:g})"
                print(f"| `{c}`{' synonyms' if syn else ''} | {label} | " + " | ".join(f"{v:.2f}" for v in row)
                      + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
