"""Issue 18, item 2: MACE's LoRA stage trains in rounds of ``lora_steps`` until the attention loss on the fixed
probe is at most ``lora_target`` of its start, raising the learning rate after a round that stalled, with a cap on
rounds; a concept that reaches the target in the first round is trained exactly as with a fixed budget."""

import json

import pytest
import torch
from tiny_models import LAB_TEMPLATES, tiny_mace_settings

from erasure.backbone import TextConditioning
from erasure.errors import BadInputError
from erasure.fusion import concept_token_embeddings
from erasure.mace import (
    LAM_REFERENCE_EIGENVALUE,
    LORA_LR_MAX,
    LORA_LR_RAISE,
    LoraRounds,
    generate_data,
    lam_scale,
    mace,
    train_lora,
    train_loras,
)
from erasure.progress import Progress
from erasure.prompts import Concept


def _settings(**kw):
    return tiny_mace_settings(4, **kw)


def _concept(word="circle"):
    return Concept(word, "shape", templates=LAB_TEMPLATES, data_prompt="a photo of a {c}")


def _data(bb, word="circle"):
    return generate_data(bb, _concept(word), _settings())


def test_rounds_rule_stops_at_the_target_and_raises_the_rate_only_after_a_stall():
    s = _settings(lora_target=0.1, lora_max_rounds=5)
    r = LoraRounds(s, 2.0)
    assert not r.finished(1.9)  # 95% of the round's start: a stall
    assert r.lr == pytest.approx(s.lora_lr * LORA_LR_RAISE) and r.steps == 4
    assert not r.finished(1.0)  # halved: progress, the same rate
    assert r.lr == pytest.approx(s.lora_lr * LORA_LR_RAISE)
    assert r.finished(0.2)  # 10% of the start
    assert r.info() == {"steps": 12, "lr": pytest.approx(s.lora_lr * LORA_LR_RAISE), "fraction": 0.1,
                        "target_reached": True}
    slow = LoraRounds(s, 1.0)
    assert not slow.finished(0.8)  # 20% a round: no stall, but 10% would take 9 more rounds, and 4 are left
    assert slow.lr == pytest.approx(s.lora_lr * LORA_LR_RAISE)
    assert not slow.finished(0.4)  # halved: 2 more rounds at this pace, 3 left
    assert slow.lr == pytest.approx(s.lora_lr * LORA_LR_RAISE)
    capped = LoraRounds(s.override(lora_max_rounds=20), 1.0)
    while not capped.finished(1.0):
        pass
    assert capped.steps == 20 * s.lora_steps and capped.info()["target_reached"] is False
    assert capped.lr == pytest.approx(s.lora_lr * LORA_LR_MAX)  # raised, never past the cap
    off = LoraRounds(s.override(lora_target=0.0), 1.0)
    assert off.finished(1.0) and off.info()["target_reached"] is None  # one round: the reference's budget
    assert LoraRounds(s, None).finished(None)  # no probe: one round
    assert LoraRounds(s, 0.0).finished(0.0)  # nothing to suppress


def test_a_concept_at_its_target_after_one_round_is_trained_exactly_as_with_a_fixed_budget(tiny_backbone):
    d = _data(tiny_backbone)
    s = _settings(lora_steps=30)
    fixed = train_lora(tiny_backbone, d, None, s.override(lora_target=0.0))
    assert fixed.probe[1] / fixed.probe[0] < 0.9  # it trained
    target = fixed.probe[1] / fixed.probe[0] + 0.01  # reached in the first round
    ruled = train_lora(tiny_backbone, d, None, s.override(lora_target=target))
    assert ruled.losses == fixed.losses and ruled.probe == fixed.probe
    for name, delta in fixed.weights.deltas.items():
        assert torch.equal(ruled.weights.deltas[name].up, delta.up)
        assert torch.equal(ruled.weights.deltas[name].down, delta.down)
    assert ruled.schedule == {"steps": 30, "lr": s.lora_lr, "fraction": round(fixed.probe[1] / fixed.probe[0], 4),
                              "target_reached": True}


def test_a_stalled_concept_gets_more_rounds_at_a_raised_rate_and_the_progress_total_grows(tiny_backbone):
    d = _data(tiny_backbone)
    s = _settings(lora_lr=1e-7, lora_target=0.1, lora_max_rounds=3)  # far too low a rate to move anything
    steps, grown, log = [], [], []
    res = train_lora(tiny_backbone, d, None, s, progress=Progress(update=steps.append, grow=grown.append,
                                                                 log=log.append))
    assert res.schedule["steps"] == 12 and len(res.losses) == 12 and res.schedule["target_reached"] is False
    assert res.schedule["lr"] == pytest.approx(1e-7 * LORA_LR_RAISE ** 2)
    assert sum(steps) == 12 and grown == [4, 4]  # the bar's total follows the extra rounds
    assert any("more at learning rate" in line for line in log)
    fixed = train_lora(tiny_backbone, d, None, s.override(lora_target=0.0))
    assert res.losses[:4] == fixed.losses  # the first round is the fixed budget


def test_batched_concepts_follow_their_own_schedules_as_alone(tiny_backbone):
    """Each concept's rate rises on its own, one stops earlier and leaves the batch, and its LoRA stays as it was
    (SlotAdamW leaves it alone) while the other trains on."""
    s = _settings(lora_lr=3e-3, lora_target=0.5, lora_max_rounds=8)
    datas = [_data(tiny_backbone, w) for w in ("circle", "square")]
    together = train_loras(tiny_backbone, datas, None, s)
    # circle stops after 4 rounds, square after 5 (both at raised rates): circle's slot sits still for a round
    assert len({t.schedule["steps"] for t in together}) == 2
    assert all(t.schedule["lr"] > s.lora_lr for t in together)
    for d, t in zip(datas, together, strict=True):
        alone = train_lora(tiny_backbone, d, None, s)
        assert t.schedule == alone.schedule
        assert torch.allclose(torch.tensor(t.losses), torch.tensor(alone.losses), rtol=1e-4, atol=1e-6)
        for name, delta in alone.weights.deltas.items():
            assert torch.allclose(t.weights.deltas[name].matrix(), delta.matrix(), rtol=1e-4, atol=1e-7), name


def test_the_schedule_reaches_the_summary_metadata_and_a_resumed_run(tiny_backbone, tmp_path):
    s = _settings(lora_lr=1e-3, lora_target=0.5, lora_max_rounds=3, concept_batch=1)
    concepts = [_concept("circle"), _concept("square")]
    log: list[str] = []
    res = mace(tiny_backbone, concepts, s, None, progress=Progress(log=log.append), work_dir=tmp_path / "w")
    meta = json.loads(res.weights.metadata["erasure.lora_schedule"])
    assert set(meta) == {"circle", "square"}
    for c, lr in zip(concepts, res.loras, strict=True):
        assert meta[c.text] == lr.schedule and lr.schedule["steps"] % s.lora_steps == 0
        assert any(line.startswith(f"{c.text!r}: LoRA {lr.schedule['steps']} steps") for line in log)
    again = mace(tiny_backbone, concepts, s, None, work_dir=tmp_path / "w")  # every concept from the directory
    assert json.loads(again.weights.metadata["erasure.lora_schedule"]) == meta


@pytest.mark.parametrize("field,value", [("lora_target", 1.0), ("lora_target", -0.1), ("lora_max_rounds", 0)])
def test_bad_schedule_settings_are_refused(field, value):
    with pytest.raises(BadInputError, match=field):
        _settings(**{field: value}).validate()


def test_lam_is_read_relative_to_the_model_s_token_energy(tiny_backbone, monkeypatch):
    """lam_relative: lam_scale is the mean eigenvalue of a concept's token Gram over SD1.x's (30 prompts x 77
    tokens of unit RMS), so a text encoder whose outputs are k times larger gets k^2 times the lam; and MACE with a
    relative lam equals MACE with the absolute lam it stands for."""
    concepts = [_concept("circle"), _concept("square")]
    scale = lam_scale(tiny_backbone, concepts)
    e = concept_token_embeddings(tiny_backbone, concepts[0])
    assert scale == pytest.approx((float(e.pow(2).sum()) / e.shape[1] + float(
        concept_token_embeddings(tiny_backbone, concepts[1]).pow(2).sum()) / e.shape[1]) / 2 / LAM_REFERENCE_EIGENVALUE)
    real = tiny_backbone.encode_text
    monkeypatch.setattr(tiny_backbone, "encode_text",
                        lambda prompts: TextConditioning(real(prompts).embeds * 3.0))
    assert lam_scale(tiny_backbone, concepts) == pytest.approx(9 * scale, rel=1e-6)
    monkeypatch.setattr(tiny_backbone, "encode_text", real)
    s = _settings(lam=10.0, lora_target=0.0)
    relative = mace(tiny_backbone, concepts, s, None)
    absolute = mace(tiny_backbone, concepts, s.override(lam=10.0 * scale, lam_relative=False), None)
    assert json.loads(relative.weights.metadata["erasure.lam_scale"]) == pytest.approx(scale)
    for name, d in absolute.weights.deltas.items():
        torch.testing.assert_close(relative.weights.deltas[name].matrix(), d.matrix(), rtol=1e-5, atol=1e-8)
