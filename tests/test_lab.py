"""Tests on the committed lab model and classifier (the project's measurable world)."""

import pytest
import torch

from erasure.diffusers_backbone import load_diffusers
from erasure.lab import world
from erasure.lab.classifier import accuracy, load_classifier, render_labelled
from erasure.lab.evaluate import EvalSettings, evaluate
from erasure.lab.model import CLASSIFIER_FILE

# a reduced seed set of the default evaluation (same sampler settings)
REDUCED = EvalSettings(seeds_own=4, seeds_syn=2)
SHAPE_FLOOR = 0.4


@pytest.fixture(scope="module")
def lab():
    return load_diffusers("lab")


@pytest.fixture(scope="module")
def clf():
    return load_classifier(CLASSIFIER_FILE)


def test_classifier_on_a_fresh_heldout_render(clf):
    images, attrs = render_labelled(1000, seed=424242)  # a seed used neither in training nor in its own check
    acc = accuracy(clf, images, attrs)
    assert min(acc.values()) >= 0.98, acc


def test_lab_backbone_layout(lab):
    kv = lab.cross_attention_kv()
    assert len(kv) == 14  # 7 cross-attention layers (2 down, 1 mid, 4 up), K and V each
    assert lab.latent_shape() == (3, 32, 32) and lab.clip_denoised
    assert lab.token_positions("a photo of a red circle", "red") == [5]


@pytest.mark.slow
def test_original_model_generates_every_concept(lab, clf, tmp_path, monkeypatch):
    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    report = evaluate(lab, clf, settings=REDUCED)
    acc = {c: v["accuracy"] for c, v in report["concepts"].items()}
    syn = {c: v["synonym_accuracy"] for c, v in report["concepts"].items()}
    # colours and styles meet the lab's bar (>= 90%; 7 of 8 images on this reduced seed set)
    for c in world.COLOURS + world.STYLE_CONCEPTS:
        assert acc[c] >= 0.875 and syn[c] >= 0.75, (c, acc[c], syn[c])
    # shapes do NOT meet it yet (the committed model draws rounded shapes; README "Known shortfall"): this guards
    # the level reached so that a regression shows, and must be raised to the bar when the model is retrained
    shapes = [acc[c] for c in world.SHAPES]
    assert sum(shapes) / len(shapes) >= SHAPE_FLOOR, acc


@pytest.mark.slow
def test_sampling_the_lab_model_is_deterministic(lab):
    from erasure.sampling import sample

    a = sample(lab, ["a red circle"], [5, 6], steps=5).images
    b = sample(lab, ["a red circle"], [5, 6], steps=5).images
    assert torch.equal(a, b)


@pytest.mark.slow
def test_esd_baseline_reduces_the_erased_concept(lab, clf, tmp_path, monkeypatch):
    from erasure.lab.baseline import esd

    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    s = EvalSettings(seeds_own=6, seeds_syn=2, concepts=("red", "blue"))
    before = evaluate(lab, clf, ["red"], settings=s)
    weights = esd(lab, "red", iterations=60, seed=0)
    after = evaluate(lab, clf, ["red"], weights, settings=s)
    assert after["concepts"]["red"]["accuracy"] <= before["concepts"]["red"]["accuracy"] - 0.5
    assert all(torch.isfinite(d.matrix()).all() for d in weights.deltas.values())
