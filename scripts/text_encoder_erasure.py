"""Experiment (issue 19, item 5; docs/audit.md#in-the-text-encoder): erase a lab concept in the *text encoder*
instead of the UNet, optionally with the audit's concept inversion inside training (AdvUnlearn's setting), then judge
it with `lab eval` and the audit exactly as a LoRA is judged.

The objective needs no UNet except for the attack: the concept's prompt templates' encoder outputs are regressed onto
the frozen encoder's outputs for the same templates with an anchor word (`shape`; colours and styles `plain`), and
1,000 unrelated lab prompts' outputs onto their own (weight `--retain`). With `--adversarial`, every `--every` steps a
round of `--attack-steps` concept-inversion steps (ANT's `attack_round`: a learned input token, the denoising loss on
16 images of the concept from the frozen model) runs against the encoder as it is, and the learned-token prompts'
outputs are regressed onto the anchor's too (weight `--adv-weight`); `--reinit` starts every round from the audit's
own start (the word `object`) instead of carrying the token over. Every parameter of the encoder but its embeddings
is trained (Adam, `--lr`). Not a product option: the encoder's change is not written as a LoRA.

    python scripts/text_encoder_erasure.py OUT_DIR --concept circle [--adversarial [--reinit] ...] [--seed 0]

writes OUT_DIR/eval.json (`lab eval`'s report), OUT_DIR/eval.png and OUT_DIR/result.json (settings, losses, the
relative change of the encoder's weights, the lab numbers and the audit's rates).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path

import torch

from erasure.ant.adversarial import attack_round, concept_images, slot_templates, start_token
from erasure.ant.settings import AntSettings
from erasure.audit import LAB_PRESET, AuditSettings, WeightsModels, run_audit
from erasure.audit_text import DiffusersSlotEncoder
from erasure.cli import _lab_audit_inputs
from erasure.diffusers_backbone import load_diffusers
from erasure.lab import world
from erasure.lab.classifier import load_classifier
from erasure.lab.evaluate import evaluate
from erasure.lab.model import CLASSIFIER_FILE
from erasure.progress import Progress

ANCHOR = {"shape": "shape", "colour": "plain", "style": "plain"}


class TEPatch:
    """Duck-typed erasure weights: `applied(unet)` swaps the text encoder's trained state in."""

    def __init__(self, te, state):
        self.te, self.state = te, state

    @contextlib.contextmanager
    def applied(self, unet, strength: float = 1.0):
        orig = {k: v.clone() for k, v in self.te.state_dict().items()}
        self.te.load_state_dict(self.state)
        try:
            yield unet
        finally:
            self.te.load_state_dict(orig)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--model", default="lab")
    p.add_argument("--concept", default="circle")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--retain", type=float, default=1.0)
    p.add_argument("--adversarial", action="store_true")
    p.add_argument("--adv-weight", type=float, default=1.0)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--attack-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", default="all", help="'all' or comma list of encoder layer indices to train")
    p.add_argument("--no-audit", action="store_true")
    p.add_argument("--reinit", action="store_true", help="every attack round starts again from the audit's start")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    bb = load_diffusers(a.model)
    te, tok = bb.text_encoders[0], bb.tokenizers[0]
    te0 = copy.deepcopy(te).requires_grad_(False)
    state0 = {k: v.clone() for k, v in te.state_dict().items()}
    names = []
    for n, prm in te.named_parameters():
        train = "embeddings" not in n and (a.layers == "all" or any(f"layers.{i}." in n for i in a.layers.split(",")))
        prm.requires_grad_(train)
        if train:
            names.append(n)
    params = [prm for prm in te.parameters() if prm.requires_grad]
    print(f"training {sum(x.numel() for x in params):,} text-encoder parameters in {len(names)} tensors")

    def enc(model, prompts):
        return model(bb._ids(tok, prompts)).last_hidden_state

    kind = world.concept_kind(a.concept)
    anchor = ANCHOR[kind]
    templates = world.concept_templates(a.concept, with_other_concepts=False)
    cprompts = [t.replace("{c}", a.concept) for t in templates]
    aprompts = [t.replace("{c}", anchor) for t in templates]
    with torch.no_grad():
        target_c = enc(te0, aprompts)
    retain = world.prior_prompts(exclude=[a.concept])
    opt = torch.optim.Adam(params, lr=a.lr)
    tokn = None
    s = AntSettings(seed=a.seed, adversarial=1, adversarial_steps=a.attack_steps, protect=0)
    if a.adversarial:
        slot_t = slot_templates(templates)
        enc_slot = DiffusersSlotEncoder(bb)
        imgs, _ = concept_images(bb, world.concept_prompts(a.concept), s, Progress())
        tokn = start_token(bb, enc_slot, slot_t, imgs, s)
    t0 = time.time()
    log = []
    for step in range(a.steps):
        if tokn is not None and step % a.every == 0:
            if a.reinit and step > 0:
                tokn = start_token(bb, enc_slot, slot_t, imgs, s)
            attack_round(bb, tokn, s, False, Progress())
            opt.zero_grad(set_to_none=True)
        idx = torch.randint(len(cprompts), (min(16, len(cprompts)),), generator=g).tolist()
        le = torch.nn.functional.mse_loss(enc(te, [cprompts[i] for i in idx]), target_c[idx])
        ridx = torch.randint(len(retain), (32,), generator=g).tolist()
        rp = [retain[i] for i in ridx]
        with torch.no_grad():
            rt = enc(te0, rp)
        lr_ = torch.nn.functional.mse_loss(enc(te, rp), rt)
        loss = le + a.retain * lr_
        la = torch.zeros(())
        if tokn is not None:
            j = torch.randint(len(slot_t), (8,), generator=g).tolist()
            cond = tokn.encoder.encode([slot_t[i] for i in j], [v.detach() for v in tokn.vectors]).embeds
            la = torch.nn.functional.mse_loss(cond.float(), target_c[j].float())  # slot template j -> its anchor prompt
            loss = loss + a.adv_weight * la
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == a.steps - 1:
            rec = {"step": step, "erase": float(le.detach()), "retain": float(lr_.detach()), "adv": float(la.detach())}
            log.append(rec)
            print(rec, flush=True)
    train_s = time.time() - t0
    for prm in te.parameters():
        prm.requires_grad_(False)
    state = {k: v.clone() for k, v in te.state_dict().items()}
    num = sum(float((state[k] - state0[k]).float().norm() ** 2) for k in names)
    den = sum(float(state0[k].float().norm() ** 2) for k in names)
    rel = (num / den) ** 0.5
    te.load_state_dict(state0)
    patch = TEPatch(te, state)
    torch.save(state, out / "te.pt")
    clf = load_classifier(CLASSIFIER_FILE)
    rep = evaluate(bb, clf, [a.concept], weights=patch, grid=out / "eval.png")
    res = {"args": vars(a), "train_s": round(train_s, 1), "relative_change": rel, "log": log,
           "eval": {k: rep[k] for k in ("efficacy", "generality", "specificity", "fidelity", "kept") if k in rep},
           "eval_aware": rep.get("shape_aware")}
    print(json.dumps(res["eval"]), flush=True)
    (out / "eval.json").write_text(json.dumps(rep, indent=1))
    if not a.no_audit:
        prompts, judge = _lab_audit_inputs(a.concept)
        sa = AuditSettings().override(**LAB_PRESET)
        ar = run_audit(WeightsModels(bb, patch), DiffusersSlotEncoder(bb), a.concept, prompts, sa, judge=judge)
        res["audit"] = {k: v for k, v in ar.report.items() if isinstance(v, (int, float))}
        print(json.dumps(res["audit"]), flush=True)
    (out / "result.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
