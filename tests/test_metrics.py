import pytest
import torch

from erasure.lab.metrics import fidelity, harmonic_mean, summarise


def test_summary_by_hand():
    acc = {"circle": 0.1, "square": 0.9, "red": 0.8}
    syn = {"circle": 0.2, "square": 0.7, "red": 0.6}
    m = summarise(acc, syn, ["circle"], 0.95)
    assert m["efficacy"] == pytest.approx(0.9)
    assert m["generality"] == pytest.approx(0.8)
    assert m["specificity"] == pytest.approx(0.85)
    assert m["H"] == pytest.approx(3 / (1 / 0.9 + 1 / 0.8 + 1 / 0.85))
    assert m["fidelity"] == 0.95


def test_summary_of_several_erased():
    acc = {"a": 0.0, "b": 0.5, "c": 1.0, "d": 0.5}
    m = summarise(acc, {"a": 0.5, "b": 0.5, "c": 0.0, "d": 0.0}, ["a", "b"], 1.0)
    assert m["efficacy"] == pytest.approx(0.75) and m["generality"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(0.75)


def test_harmonic_mean_zero_and_unknown_concept():
    assert harmonic_mean([0.0, 1.0, 1.0]) == 0.0
    with pytest.raises(KeyError):
        summarise({"a": 1.0}, {"a": 1.0}, ["b"], 1.0)


def test_fidelity_scale():
    x = torch.zeros(2, 3, 4, 4)
    assert fidelity(x, x) == 1.0
    assert fidelity(x + 1, x - 1) == pytest.approx(0.0)
    assert fidelity(x + 0.2, x) == pytest.approx(0.9)


def test_collateral_counts_images_that_keep_every_attribute():
    """Unrelated images whose original shows an erased concept are left out; erased prompts are judged on the heads
    that were not erased."""
    import torch

    from erasure.lab import world
    from erasure.lab.evaluate import collateral

    circle, red = world.concept_index("circle"), world.concept_index("red")
    other = (circle + 1) % len(world.SHAPES)
    orig = {"shape": torch.tensor([other, other, circle, circle]), "colour": torch.tensor([red, 0, 1, 1]),
            "style": torch.tensor([0, 0, 0, 0])}
    edited = {"shape": torch.tensor([other, other, other, other]), "colour": torch.tensor([red, 2, 1, 2]),
              "style": torch.tensor([0, 0, 0, 1])}
    unrelated = torch.tensor([True, True, True, False])  # rows 0-2: other concepts' prompts; row 3: circle's
    c = collateral(orig, edited, unrelated, ["circle"])
    # row 2's original shows a circle: left out; row 0 keeps everything, row 1 changed its colour
    assert c["unrelated"] == {"shape": 1.0, "colour": 0.5, "style": 1.0, "all": 0.5, "images": 2}
    # row 3 (a circle prompt): shape is erased, colour and style both changed
    assert c["erased_prompts"] == {"colour": 0.0, "style": 0.0, "all": 0.0, "images": 1}
