"""MACE's presets and prompts are the reference's (Shilin-LU/MACE ``configs/*.yaml``, ``src/cfr_utils.py``), and its
attention loss is the reference's (issue 18, item 1). Which reference file each value comes from:
docs/mace.md#presets."""

from __future__ import annotations

import re

import pytest
import torch

from erasure.mace import PRESETS, AttentionLoss
from erasure.prompts import CONCEPT_TEMPLATES, MACE_TEMPLATES, Concept

#: one concept per kind, with the preset's anchor: the prompts must read as sentences both ways
EXAMPLES = {"object": "ship", "person": "Tom Hanks", "style": "Van Gogh", "nudity": "nudity"}
#: an article followed by another (or by the concept "nudity", as in "a nudity woman")
DOUBLED = re.compile(r"\b(a|an|the)\s+(a|an|the|nudity)\b", re.IGNORECASE)
COCO_CAPTIONS = 616_767  # COCO 2014 train + val captions: what the reference's src/cache_coco.py sums


def test_mace_templates_are_the_reference_lists():
    """30 per kind, the reference's first 30 (its prompt_len 30 of 31); person and nudity train as the reference's
    configs declare them, as ``object``."""
    for kind, temps in MACE_TEMPLATES.items():
        assert len(temps) == 30 == len(set(temps)), kind
        assert all(t.count("{c}") == 1 for t in temps), kind
    assert MACE_TEMPLATES["person"] == MACE_TEMPLATES["nudity"] == MACE_TEMPLATES["object"]
    assert MACE_TEMPLATES["object"][0] == "{c} in a photo"
    assert MACE_TEMPLATES["object"][-1] == "An oil portrait of {c}"  # the 31st, "{c} in a sketch painting", unused
    assert MACE_TEMPLATES["style"][0] == "An artwork by {c}"
    assert MACE_TEMPLATES["style"][-1] == "Vibrant reproduction of artwork by {c}"
    assert set(MACE_TEMPLATES) == set(CONCEPT_TEMPLATES)  # every kind a concepts file accepts


def test_ant_keeps_its_own_templates():
    """MACE's lists are separate: ANT and the audit still read ``CONCEPT_TEMPLATES`` (ten per kind)."""
    assert all(len(t) == 10 for t in CONCEPT_TEMPLATES.values())
    assert CONCEPT_TEMPLATES["object"][0] == "a photo of the {c}"


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_prompts_read_as_sentences_with_the_concept_and_with_its_anchor(kind):
    c = Concept(EXAMPLES[kind], PRESETS[kind].anchor, kind)
    assert c.template_list() == list(MACE_TEMPLATES[kind])
    for prompts, word in ((c.prompts(), c.text), (c.anchor_prompts(), c.anchor)):
        assert len(prompts) == 30 == len(set(prompts))
        for p in prompts:
            assert word in p, p
            assert not DOUBLED.search(p), p
            assert "  " not in p and p == p.strip(), p
    assert "a photo of a a person" not in " ".join(Concept("nudity", "a person wearing clothes", "nudity").prompts())


def test_every_prompt_fits_clip_and_holds_the_concept_tokens():
    """Each prompt holds the concept's CLIP tokens in one run (the reference finds them so) within 77 tokens."""
    from erasure.clip_tokenizer import builtin_clip_tokenizer

    tok = builtin_clip_tokenizer()
    for kind, text in EXAMPLES.items():
        c = Concept(text, PRESETS[kind].anchor, kind)
        for p, word in [(p, c.text) for p in c.prompts()] + [(p, c.anchor) for p in c.anchor_prompts()]:
            ids = tok(p).input_ids
            want = tok(word, add_special_tokens=False).input_ids
            assert len(ids) <= 77
            assert any(ids[i:i + len(want)] == want for i in range(len(ids))), (p, word)


def test_presets_are_the_reference_configs():
    obj, person, style, nudity = (PRESETS[k] for k in ("object", "person", "style", "nudity"))
    # configs/object/erase_bird.yaml's lamb 10 (ship's is 1e3, automobile's 1e2), erase_ship.yaml's mapping
    # 'ground'; the prior of the person and style configs, which the object configs leave out (docs/mace.md#presets)
    assert (obj.kind, obj.anchor, obj.lam, obj.lam_relative) == ("object", "ground", 10.0, True)
    assert obj.preserve == obj.fuse_preserve == pytest.approx(1e-4 * COCO_CAPTIONS)
    assert (obj.lora_lr, obj.lora_steps) == (1e-5, 50)
    # not the reference's: every kind trains on whole images at uniform timesteps (its nudity config's timesteps;
    # docs/mace.md#where-and-when-the-loss-looks); the reference's p(t) and masks are one setting away
    for s in PRESETS.values():
        assert (s.importance_sampling, s.use_masks, s.suppress_following) == (False, False, True)
    # configs/celebrity/erase_cele_{5,10,100}.yaml: mapping 'a person', scales 1e-4, lr 1e-4, 50 steps
    assert (person.anchor, person.lora_lr, person.lora_steps) == ("a person", 1e-4, 50)
    # configs/art/erase_art_100.yaml: mapping 'art', scales 1e-4, lr 1e-4, 50 steps, no masks
    assert (style.anchor, style.lora_lr, style.lora_steps, style.use_masks) == ("art", 1e-4, 50, False)
    for s in (person, style):
        assert s.preserve == pytest.approx(1e-4 * COCO_CAPTIONS) and s.fuse_preserve == pytest.approx(
            1e-4 * COCO_CAPTIONS)
    # configs/explicit_content/erase_explicit_content.yaml: scales 7e-7, lr 1e-5, 120 steps, uniform timesteps
    assert (nudity.anchor, nudity.lora_lr, nudity.lora_steps) == ("a person wearing clothes", 1e-5, 120)
    assert nudity.importance_sampling is False
    assert nudity.preserve == pytest.approx(7e-7 * COCO_CAPTIONS)
    assert nudity.fuse_preserve == pytest.approx(7e-7 * COCO_CAPTIONS)
    # the reference's lamb 0: the smallest lam the closed forms take here (they need lam > 0)
    for s in (person, style, nudity):
        assert 0 < s.lam <= 1e-3
    for name, s in PRESETS.items():
        assert s.kind == name and s.augment and s.lora_rank == 1 and s.grad_clip == 1.0
        s.validate()


def _reference_loss(probs: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, layers: int) -> torch.Tensor:
    """The reference's ``AttnController`` with a mask, batch 1: ``probs`` in diffusers' layout ``[heads, HW, L]``."""
    keep = mask.view(-1) > 0.5
    target = probs[:, keep, :][:, :, positions.bool()]
    return sum(torch.norm(target) for _ in range(layers))


def test_attention_loss_is_the_reference_unsquared_norm_summed_over_layers():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(1, 4, 16, 8, generator=g).softmax(-1)  # [B, heads, HW, L]
    mask = (torch.rand(1, 4, 4, generator=g) > 0.4).float()
    pos = torch.zeros(1, 8)
    pos[0, [2, 3, 7]] = 1
    loss = AttentionLoss(pos, mask)
    for _ in range(3):
        loss("layer", probs, (4, 4))
    torch.testing.assert_close(loss.total, _reference_loss(probs[0], pos[0], mask[0], 3))
    assert loss.layers == 3


def test_attention_loss_groups_equal_each_group_alone_and_an_empty_mask_has_zero_gradient():
    """Batched concepts (``train_loras``): each group's norm is over its own samples, as alone; a group whose mask
    selects nothing has loss 0 and a zero, finite gradient (``sqrt`` at 0 would give an infinite one)."""
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(5, 2, 16, 6, generator=g).softmax(-1).requires_grad_()
    masks = (torch.rand(5, 4, 4, generator=g) > 0.5).float()
    masks[4] = 0.0
    pos = (torch.rand(5, 6, generator=g) > 0.5).float()
    groups = torch.tensor([0, 0, 1, 1, 2])
    both = AttentionLoss(pos, masks, groups=groups, n_groups=3)
    both("l", probs, (4, 4))
    for k, sl in enumerate((slice(0, 2), slice(2, 4))):
        alone = AttentionLoss(pos[sl], masks[sl])
        alone("l", probs[sl], (4, 4))
        torch.testing.assert_close(both.total[k], alone.total)
    assert float(both.total[2].detach()) == 0.0
    both.total.sum().backward()
    assert probs.grad is not None and bool(torch.isfinite(probs.grad).all())
    assert float(probs.grad[4].abs().sum()) == 0.0
