"""Issue 19, item 5, for MACE's LoRA stage: the audit's concept-inversion attack inside the attention-loss LoRA
(an experiment, not a product option; docs/audit.md#in-maces-lora-stage).

``python -m erasure mace`` as it is, with one change to stage 3 (one concept): every ``--every`` LoRA steps,
``--attack-steps`` steps of the audit's concept inversion (ANT's ``attack_round``: a learned token in the concept's
templates, fitted with the denoising loss on the concept's MACE images) run against the model as it is then (the
CFR edit plus the LoRA so far), and each LoRA step also suppresses the attention the learned token's positions (and,
as for the word, the end token, padding and following words) receive, weighted by ``--weight``. The learned-token
prompts' embeddings then enter the closed-form fusion beside the concept's, so that the fused edit keeps what the
LoRA does to them. Everything after (fusion, ``protect``, the file) is the library's.

    OMP_NUM_THREADS=1 python scripts/mace_adversarial.py --model lab-clip --concepts circle --seed 0 --protect 0 \
        --no-report --out out/mace-adv/circle-s0.safetensors [--every 25 --attack-steps 20 --weight 1]

then ``python -m erasure lab eval`` and ``python -m erasure audit`` on the file, as for any erasure.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from erasure import mace as M  # noqa: E402
from erasure.ant.adversarial import attack_round, slot_encoder_for, slot_templates, start_token  # noqa: E402
from erasure.ant.settings import AntSettings  # noqa: E402
from erasure.backbone import TextConditioning  # noqa: E402
from erasure.deltas import TrainableLoRA  # noqa: E402
from erasure.errors import TrainingDivergedError  # noqa: E402
from erasure.progress import as_progress  # noqa: E402
from erasure.weights import ErasureWeights  # noqa: E402

OPTS = {"every": 25, "attack_steps": 20, "weight": 1.0, "lr": 0.3}


def slot_positions(encoder, template: str, end: bool, following: bool) -> list[int]:
    """The learned token's positions in ``template`` (one vector) and, as ``suppressed_positions`` does for the
    word, the end token and padding (``end``) and the tokens between the slot and the end token (``following``)."""
    tok = encoder.backbone.tokenizers[0]
    ids, slot = encoder.token_ids(tok, template, 1)
    first_eos = ids.index(tok.eos_token_id)
    pos = set(slot)
    if end:
        pos |= set(range(first_eos, len(ids)))
    if following:
        pos |= set(range(max(slot) + 1, first_eos))
    return sorted(pos)


def train_lora_adversarial(backbone, data, base, s, progress=None, probe=True, keep=None):
    """``erasure.mace.train_lora`` with the attack inside (see the module's docstring); the rest line for line."""
    progress = as_progress(progress)
    gen = torch.Generator().manual_seed(s.seed)
    end = M.resolve_suppress_end(backbone, data.concept, s)
    pt = M._timestep_distribution(backbone, s)
    unet = backbone.unet()
    losses: list[float] = []
    base = base or ErasureWeights()
    prompts, cond_all, positions = M._lora_inputs(backbone, data, s, end)
    ant = AntSettings(adversarial=1, adversarial_steps=OPTS["attack_steps"], adversarial_lr=OPTS["lr"], seed=s.seed)
    encoder = slot_encoder_for(backbone, None)
    templates = slot_templates(data.concept.template_list())
    slot_pos = torch.zeros(len(templates), cond_all.embeds.shape[1])
    for i, t in enumerate(templates):
        slot_pos[i, slot_positions(encoder, t, end, s.suppress_following)] = 1.0
    with base.applied(unet), TrainableLoRA(backbone.cross_attention_kv(), rank=s.lora_rank, generator=gen) as lora:
        tok = start_token(backbone, encoder, templates, data.latents, ant)
        opt = torch.optim.AdamW(lora.parameters(), lr=s.lora_lr)
        if keep is not None:
            lora.project_inputs(keep)
        n = data.latents.shape[0]
        probe_before = M.probe_loss(backbone, data, cond_all, positions, pt, s.seed) if probe else None
        rounds = M.LoraRounds(s, probe_before)
        step = 0
        while True:
            for _step in range(s.lora_steps):
                progress.check()
                if step % OPTS["every"] == 0:
                    attack_round(backbone, tok, ant, False, progress)
                step += 1
                idx = torch.randint(0, n, (s.lora_batch,), generator=gen)
                x0 = data.latents[idx].to(backbone.device, backbone.dtype)
                t = torch.multinomial(pt, s.lora_batch, replacement=True, generator=gen).to(backbone.device)
                noise = torch.randn(x0.shape, generator=gen).to(x0)
                x_t = backbone.schedule.add_noise(x0, noise, t)
                pidx = (torch.randint(0, len(prompts), (s.lora_batch,), generator=gen) if len(prompts) > 1
                        else torch.zeros(s.lora_batch, dtype=torch.long))
                loss_fn = M.AttentionLoss(positions[pidx], data.masks[idx])
                with backbone.capture_attention(loss_fn):
                    backbone.predict_noise(x_t, t, cond_all[pidx].to(backbone.device))
                which = torch.randint(0, len(templates), (s.lora_batch,), generator=gen).tolist()
                adv_fn = M.AttentionLoss(slot_pos[which], data.masks[idx])
                with backbone.capture_attention(adv_fn):
                    backbone.predict_noise(x_t, t, tok.conditioning(which))
                loss = loss_fn.total + OPTS["weight"] * adv_fn.total
                if not torch.isfinite(loss):
                    raise TrainingDivergedError("the loss became non-finite")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if keep is not None:
                    lora.project_input_grads(keep)
                torch.nn.utils.clip_grad_norm_(lora.parameters(), s.grad_clip)
                opt.step()
                if keep is not None:
                    lora.project_inputs(keep)
                losses.append(float(loss_fn.total.detach()))
                progress.step()
            now = M.probe_loss(backbone, data, cond_all, positions, pt, s.seed) if probe else None
            if rounds.finished(now):
                break
            progress.say(rounds.note(data.concept.text))
            progress.extend(s.lora_steps)
            for group in opt.param_groups:
                group["lr"] = rounds.lr
        # the last token against the finished LoRA, and its prompts' embeddings for the fusion
        attack_round(backbone, tok, ant, False, progress)
        print(f"adversarial: {len(tok.history)} attack rounds; last attack loss {tok.history[-1]['attack_loss']:.4f}, "
              f"token moved {tok.history[-1]['token_moved']:.2f} std", flush=True)
        w = lora.result(method="mace-lora", concepts=[data.concept.text], anchors=[data.concept.anchor],
                        settings={**asdict(s), "suppress_end": end}, schedule=rounds.info())
        token_cond: TextConditioning = tok.conditioning(list(range(len(templates))))
    measured = (probe_before, now) if probe else None
    embeds = M._fusion_embeds(data, prompts, cond_all)
    if embeds is not None:
        extra = token_cond.embeds.double().cpu()
        embeds = torch.cat([embeds, extra.reshape(-1, extra.shape[-1])])
    return M.LoraResult(w, losses, end, measured, embeds, rounds.info())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--every", type=int, default=OPTS["every"])
    p.add_argument("--attack-steps", type=int, default=OPTS["attack_steps"])
    p.add_argument("--weight", type=float, default=OPTS["weight"])
    p.add_argument("--attack-lr", type=float, default=OPTS["lr"])
    mine, rest = p.parse_known_args()
    OPTS.update(every=mine.every, attack_steps=mine.attack_steps, weight=mine.weight, lr=mine.attack_lr)
    M.train_lora = train_lora_adversarial  # mace() calls it for a single concept
    from erasure.cli import main as cli_main

    return cli_main(["mace", *rest])


if __name__ == "__main__":
    raise SystemExit(main())
