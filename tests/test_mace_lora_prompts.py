"""MACE stage 3's prompts and positions: template-drawn LoRA prompts (the reference's ``augment``) and the
measured choice of whether the end token and padding are suppressed."""

from __future__ import annotations

import torch

from erasure import mace as mace_mod
from erasure.mace import (
    END_RESIDUE_MIN,
    AttentionLoss,
    Concept,
    ConceptData,
    MaceSettings,
    end_residue,
    lora_prompts,
    resolve_suppress_end,
    train_lora,
)

TEMPLATES = ("a photo of a {c}", "a red {c}", "a {c} on a plain background")


def _data(bb, templates=TEMPLATES) -> ConceptData:
    c = Concept("circle", "shape", templates=templates)
    lat = torch.randn(2, *bb.latent_shape(), generator=torch.Generator().manual_seed(0))
    return ConceptData(c, c.generation_prompt(), lat, torch.ones(2, *lat.shape[2:]))


def test_lora_prompts_are_the_templates_or_the_generation_prompt(tiny_backbone):
    d = _data(tiny_backbone)
    assert lora_prompts(d) == ["a photo of a circle", "a red circle", "a circle on a plain background"]
    assert lora_prompts(d, augment=False) == [d.prompt]


def test_every_template_reaches_the_loss_with_its_own_positions(tiny_backbone, monkeypatch):
    """Over enough steps each template is drawn, and each step's loss sees that prompt's concept position."""
    seen: list[torch.Tensor] = []

    class Recording(AttentionLoss):
        def __init__(self, positions, masks, *a, **kw) -> None:
            super().__init__(positions, masks, *a, **kw)
            seen.append(positions.clone())

    monkeypatch.setattr(mace_mod, "AttentionLoss", Recording)
    s = MaceSettings(lora_steps=24, lora_lr=1e-3, suppress_end=False)
    train_lora(tiny_backbone, _data(tiny_backbone), None, s)
    rows = {tuple(int(i) for i in p[0].nonzero().flatten()) for p in seen}
    expected = {tuple(tiny_backbone.token_positions(p, "circle")) for p in lora_prompts(_data(tiny_backbone))}
    assert rows == expected and len(expected) == 3  # "circle" sits at a different position in each template


def test_attention_loss_per_sample_positions_equal_shared_positions():
    probs = torch.rand(2, 3, 16, 8)
    masks = torch.ones(2, 4, 4)
    shared = AttentionLoss([1, 5], masks)
    shared("l", probs, (4, 4))
    rows = torch.zeros(2, 8)
    rows[:, [1, 5]] = 1
    per = AttentionLoss(rows, masks)
    per("l", probs, (4, 4))
    torch.testing.assert_close(shared.total, per.total)
    only_first = rows.clone()
    only_first[1] = 0
    part = AttentionLoss(only_first, masks)
    part("l", probs, (4, 4))
    assert float(part.total) < float(per.total)


def test_end_residue_tells_a_mixing_encoder_from_one_that_does_not_mix(tiny_backbone):
    """A randomly initialised causal CLIP mixes every earlier token into the end token (as SD's does); making the
    end and padding embeddings independent of the prompt (as on the lab model) drops the residue to zero."""
    c = Concept("circle", "shape", templates=TEMPLATES)
    mixing = end_residue(tiny_backbone, c)
    assert mixing >= END_RESIDUE_MIN and resolve_suppress_end(tiny_backbone, c, MaceSettings())

    real = tiny_backbone.encode_text
    eos = tiny_backbone.tokenize("")[1]

    def no_mixing(prompts):
        cond = real(prompts)
        fixed = real([""]).embeds[0, -1]
        for i, p in enumerate(prompts):
            ids = tiny_backbone.tokenize(p)
            first = next(j for j, t in enumerate(ids) if t == eos and j > 0)
            cond.embeds[i, first:] = fixed
        return cond

    tiny_backbone.encode_text = no_mixing
    try:
        assert end_residue(tiny_backbone, c) < 1e-6
        assert not resolve_suppress_end(tiny_backbone, c, MaceSettings())
        assert resolve_suppress_end(tiny_backbone, c, MaceSettings(suppress_end=True))  # an explicit choice wins
    finally:
        tiny_backbone.encode_text = real
    assert not resolve_suppress_end(tiny_backbone, c, MaceSettings(suppress_end=False))


def test_a_lora_that_barely_moves_the_attention_is_reported(tiny_backbone, monkeypatch):
    """The reference's learning rate moves nothing on some models (the lab's): the run says so and names the fix."""
    from erasure.mace import LoraResult, mace

    assert LoraResult(None, [1.0] * 10 + [0.95] * 10).stalled()
    assert not LoraResult(None, [1.0] * 10 + [0.5] * 10).stalled()
    assert LoraResult(None, []).loss_fall() is None and not LoraResult(None, []).stalled()
    assert LoraResult(None, [2.0, 1.0, 1.0, 0.5]).loss_fall() == (1.5, 0.75, 2)

    c = Concept("circle", "shape", templates=TEMPLATES, data_prompt="a photo of a {c}")
    s = MaceSettings(images_per_concept=1, sample_steps=2, guidance=3.0, lora_steps=2)
    real = mace_mod.train_lora

    def flat_loss(*a, **kw):  # single steps are noisy: give the run a loss that did not fall
        r = real(*a, **kw)
        r.losses = [0.5] * 20
        return r

    logged: list[str] = []
    monkeypatch.setattr(mace_mod, "train_lora", flat_loss)
    res = mace(tiny_backbone, [c], s, None, log=logged.append)
    assert res.loras[0].stalled()
    warning = [m for m in logged if m.startswith("warning:")]
    assert len(warning) == 1 and "'circle'" in warning[0] and "raise the learning rate" in warning[0]
