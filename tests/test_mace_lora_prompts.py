"""MACE stage 3's prompts and positions: template-drawn LoRA prompts (the reference's ``augment``) and the
measured choice of whether the end token and padding are suppressed."""

from __future__ import annotations

import torch

from erasure import mace as mace_mod
from erasure.mace import (
    END_RESIDUE_MIN,
    AttentionLoss,
    ConceptData,
    MaceSettings,
    end_residue,
    lora_prompts,
    resolve_suppress_end,
    train_lora,
)
from erasure.progress import Progress
from erasure.prompts import Concept

TEMPLATES = ("a photo of a {c}", "a red {c}", "a {c} on a plain background")


def _data(bb, templates=TEMPLATES) -> ConceptData:
    c = Concept("circle", "shape", templates=templates)
    lat = torch.randn(2, *bb.latent_shape(), generator=torch.Generator().manual_seed(0))
    return ConceptData(c, c.generation_prompt(), lat, torch.ones(2, *lat.shape[2:]))


def test_lora_prompts_are_the_templates_or_the_generation_prompt(tiny_backbone):
    d = _data(tiny_backbone)
    assert lora_prompts(d) == ["a photo of a circle", "a red circle", "a circle on a plain background"]
    assert lora_prompts(d, augment=False) == [d.prompt]


def test_each_step_pairs_its_prompt_with_that_prompt_s_positions(tiny_backbone, monkeypatch):
    """Over enough steps every template is drawn, and each step's loss sees the concept position of the prompt that
    conditioned that step (not of another template)."""
    seen: list[torch.Tensor] = []
    conds: list[torch.Tensor] = []

    class Recording(AttentionLoss):
        def __init__(self, positions, masks, *a, **kw) -> None:
            super().__init__(positions, masks, *a, **kw)
            seen.append(positions.clone())

    real_predict = tiny_backbone.predict_noise

    def recording_predict(x_t, t, cond):
        conds.append(cond.embeds.detach().clone())
        return real_predict(x_t, t, cond)

    monkeypatch.setattr(mace_mod, "AttentionLoss", Recording)
    monkeypatch.setattr(tiny_backbone, "predict_noise", recording_predict)
    # one round; the concept's own positions only (no end token, no following words)
    s = MaceSettings(lora_steps=24, lora_lr=1e-3, suppress_end=False, suppress_following=False, lora_target=0.0)
    d = _data(tiny_backbone)
    train_lora(tiny_backbone, d, None, s)
    prompts = lora_prompts(d)
    with torch.no_grad():
        enc = tiny_backbone.encode_text(prompts).embeds
    pos = {i: tuple(tiny_backbone.token_positions(p, "circle")) for i, p in enumerate(prompts)}
    assert len(set(pos.values())) == 3  # "circle" sits at a different position in each template
    steps = [(p, c) for p, c in zip(seen, conds, strict=True) if c.shape[0] == 1]  # training steps (batch 1)
    assert len(steps) == s.lora_steps
    drawn = set()
    for p, c in steps:
        i = next(i for i in range(len(prompts)) if torch.equal(c[0], enc[i]))  # which prompt conditioned the step
        drawn.add(i)
        assert tuple(int(j) for j in p[0].nonzero().flatten()) == pos[i]
    assert drawn == {0, 1, 2}


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
    """The reference's learning rate moves nothing on some models (the lab's): the run says so and names the fix.
    The judgement uses the fixed probe (the same samples before and after), not the noisy training losses."""
    from erasure.mace import LoraResult, mace

    assert LoraResult(None, probe=(1.0, 0.95)).stalled()
    assert not LoraResult(None, probe=(1.0, 0.5)).stalled()
    assert not LoraResult(None, [1.0] * 20).stalled()  # not measured: no verdict

    c = Concept("circle", "shape", templates=TEMPLATES, data_prompt="a photo of a {c}")
    s = MaceSettings(images_per_concept=1, sample_steps=2, guidance=3.0, lora_steps=2)
    real = mace_mod.train_lora

    def flat(*a, **kw):
        r = real(*a, **kw)
        r.probe = (0.5, 0.49)
        return r

    logged: list[str] = []
    monkeypatch.setattr(mace_mod, "train_lora", flat)
    res = mace(tiny_backbone, [c], s, None, progress=Progress(log=logged.append))
    assert res.loras[0].stalled()
    warning = [m for m in logged if m.startswith("warning:")]
    assert len(warning) == 1 and "'circle'" in warning[0] and "raise the LoRA learning rate" in warning[0]
    used = __import__("json").loads(res.weights.metadata["erasure.settings"])["suppress_end_used"]
    assert used == {"circle": res.loras[0].suppress_end}  # the resolved choice is recorded in the file


def test_probe_is_fixed_and_falls_when_the_lora_learns(tiny_backbone):
    d = _data(tiny_backbone)
    a = train_lora(tiny_backbone, d, None, MaceSettings(lora_steps=30, lora_lr=1e-2, lora_batch=2))
    b = train_lora(tiny_backbone, d, None, MaceSettings(lora_steps=30, lora_lr=1e-2, lora_batch=2, seed=0))
    assert a.probe == b.probe  # deterministic
    assert a.probe[1] < 0.8 * a.probe[0] and not a.stalled()
    frozen = train_lora(tiny_backbone, d, None, MaceSettings(lora_steps=3, lora_lr=1e-12))
    assert frozen.probe[0] == a.probe[0]  # the same samples before training, whatever the settings
    assert frozen.stalled()


def test_uniform_timesteps_reach_the_noisy_end(tiny_backbone, monkeypatch):
    """``importance_sampling=False`` (the default) draws timesteps over the whole schedule; MACE's p(t) stays below
    ~600."""
    ts: list[int] = []
    real = tiny_backbone.schedule.add_noise.__func__

    class Schedule(type(tiny_backbone.schedule)):
        def add_noise(self, x0, noise, t):
            ts.extend(int(v) for v in t)
            return real(self, x0, noise, t)

    monkeypatch.setattr(tiny_backbone, "schedule", Schedule(tiny_backbone.schedule.alphas_cumprod))
    d = _data(tiny_backbone)
    train_lora(tiny_backbone, d, None, MaceSettings(lora_steps=40, lora_lr=1e-3, importance_sampling=True))
    assert max(ts) < 650
    ts.clear()
    train_lora(tiny_backbone, d, None, MaceSettings(lora_steps=40, lora_lr=1e-3))
    assert max(ts) > 700 and min(ts) < 150


def test_grad_clip_zero_is_refused():
    import pytest

    from erasure.validation import check_mace_settings

    with pytest.raises(ValueError, match="grad_clip must be a finite number > 0"):
        check_mace_settings(MaceSettings(grad_clip=0.0))


def test_cli_flags_reach_the_settings(monkeypatch, tmp_path, capsys):
    """Every new MACE flag ends up in the settings the pipeline runs with."""
    from erasure import cli

    captured = {}

    def fake_mace(backbone, items, s, prior, **kw):
        captured["s"] = s
        raise SystemExit(0)

    monkeypatch.setattr(cli, "mace", fake_mace)
    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    try:
        cli.main(["mace", "--model", "lab", "--concepts", "circle", "--out", str(tmp_path / "x.safetensors"),
                  "--no-augment", "--importance-sampling", "--masks", "--mask-threshold", "0.3",
                  "--lora-batch", "2", "--grad-clip", "0.5", "--suppress-end", "--no-suppress-following"])
    except SystemExit:
        pass
    s = captured["s"]
    assert (s.augment, s.importance_sampling, s.use_masks, s.mask_threshold, s.lora_batch, s.grad_clip,
            s.suppress_end, s.suppress_following) == (False, True, True, 0.3, 2, 0.5, True, False)


def test_mace_encodes_each_concepts_prompt_pairs_once(tiny_backbone, monkeypatch):
    """CFR and the end-token check read the same encodings of the concept/anchor prompt pairs (they were encoded
    twice); the choice made from them is the one ``resolve_suppress_end`` makes on its own."""
    from erasure.fusion import fuse
    from erasure.mace import mace

    c = Concept("circle", "shape", templates=TEMPLATES, data_prompt="a photo of a {c}")
    s = MaceSettings(images_per_concept=1, sample_steps=2, guidance=3.0, lora_steps=2)
    src, dst = c.prompts(), c.anchor_prompts()
    calls: list[list[str]] = []
    real = tiny_backbone.encode_text

    def counting(prompts):
        calls.append(list(prompts))
        return real(prompts)

    monkeypatch.setattr(tiny_backbone, "encode_text", counting)
    res = mace(tiny_backbone, [c], s, None)
    # the anchor prompts once (were twice); the concept's prompts once for CFR with the end check (were twice) and
    # once for the LoRA, whose embeddings the fusion reuses (it encoded them again); and once for lam_scale, which
    # reads the first LAM_SCALE_CONCEPTS concepts only
    assert calls.count(dst) == 1 and calls.count(src) == 3
    monkeypatch.setattr(tiny_backbone, "encode_text", real)
    assert res.loras[0].suppress_end == resolve_suppress_end(tiny_backbone, c, MaceSettings())
    assert res.loras[0].prompt_embeds is None  # dropped once added to the fusion
    lam = s.lam * float(res.weights.metadata["erasure.lam_scale"])  # lam_relative: the lam the run used
    again = fuse(tiny_backbone, [(c, res.loras[0].weights)], res.cfr, None, lam, s.fuse_preserve)
    for name, d in again.deltas.items():
        assert torch.equal(d.matrix(), res.weights.deltas[name].matrix()), name
