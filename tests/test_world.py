import torch
from transformers import CLIPTokenizer

from erasure.lab import world


def test_render_is_deterministic_under_a_seed():
    a = world.sample_batch(16, torch.Generator().manual_seed(3))
    b = world.sample_batch(16, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    c = world.sample_batch(16, torch.Generator().manual_seed(4))
    assert not torch.equal(a[0], c[0])


def test_render_range_and_colours():
    g = torch.Generator().manual_seed(0)
    attrs = world.Attributes(torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([0, 0]))
    img = world.render(attrs, g)
    assert img.shape == (2, 3, 32, 32) and img.min() >= -1 and img.max() <= 1
    # the centre region of the shape carries its colour: red dominates in image 0, blue in image 1
    assert (img[0, 0] - img[0, 2]).max() > 1.0
    assert (img[1, 2] - img[1, 0]).max() > 1.0


def test_captions_use_synonyms_in_a_minority():
    g = torch.Generator().manual_seed(0)
    caps = [world.caption(0, 0, 0, g) for _ in range(2000)]
    canonical = sum(" circle" in c for c in caps)
    synonyms = sum((" disk" in c) or (" ring" in c) for c in caps)
    assert synonyms > 100 and canonical > 3 * synonyms


def test_every_lab_word_is_one_token(lab_tokenizer_dir):
    tok = CLIPTokenizer.from_pretrained(lab_tokenizer_dir)
    for w in world.vocabulary():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    # anything else still tokenizes (byte-level fallback)
    assert len(tok("zebra", add_special_tokens=False).input_ids) > 1


def test_concept_prompts_cover_every_concept():
    for c in world.ALL_CONCEPTS:
        own, syn = world.concept_prompts(c), world.concept_prompts(c, synonyms=True)
        assert own and syn and all(c in p for p in own)
        assert not any(f" {c} " in f" {p} " for p in syn)


def test_lab_phrases_take_their_last_words_kind_and_unknown_words_are_refused():
    import pytest

    from erasure.lab.demo import lab_concept

    c = lab_concept("crimson striped disk")  # synonyms and a style before a shape: a shape's templates and anchor
    assert (c.kind, c.anchor, c.templates) == ("object", "shape", lab_concept("circle").templates)
    assert lab_concept("red striped").anchor == "plain"
    assert lab_concept("green").anchor == ""  # single concepts as before
    with pytest.raises(KeyError, match="lab concepts are circle"):
        lab_concept("red dog")
