"""Tests on the committed lab model and classifier (the project's measurable world)."""

import pytest
import torch

from erasure.diffusers_backbone import load_diffusers
from erasure.lab import world
from erasure.lab.classifier import (
    FIELD_CHROMA,
    accuracy,
    field_colour,
    load_classifier,
    render_empty,
    render_labelled,
    seen_as,
)
from erasure.lab.evaluate import EvalSettings, _hits, collateral, evaluate, format_table
from erasure.lab.model import CLASSIFIER_FILE

# a reduced seed set of the default evaluation (same sampler settings)
REDUCED = EvalSettings(seeds_own=4, seeds_syn=2)


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


def test_presence_head_tells_a_shape_from_an_empty_image(clf):
    # the shape head alone reads empty backgrounds as a shape (mostly a cross): what the presence head is for
    g = torch.Generator().manual_seed(31337)
    empty = render_empty(500, g)
    images, attrs = render_labelled(500, seed=31338)
    pred_empty, pred = clf.predict(empty), clf.predict(images)
    assert float((~pred_empty["present"]).float().mean()) >= 0.95
    assert float(pred["present"].float().mean()) >= 0.98
    # the other heads are the classifier's own, untouched by the presence head
    with torch.no_grad():
        logits = clf(images)
    for k in ("shape", "colour", "style"):
        assert torch.equal(pred[k], logits[k].argmax(-1))


def test_shape_aware_hits_count_an_empty_image_as_no_shape():
    concepts = ("circle", "cross", "red", "striped")
    per = 1
    n = {c: len(world.concept_prompts(c)) for c in concepts}
    rows = sum(n.values())
    prompts = [p for c in concepts for p in world.concept_prompts(c)]
    cross = world.concept_index("cross")
    red = world.concept_index("red")
    pred = {"shape": torch.full((rows,), cross), "colour": torch.full((rows,), red),
            "style": torch.full((rows,), world.concept_index("striped")),
            "present": torch.zeros(rows, dtype=torch.bool), "field": torch.full((rows,), -1)}
    plain = _hits(pred, prompts, concepts, per, False)
    aware = _hits(pred, prompts, concepts, per, False, shape_aware=True)
    assert plain["cross"] == 1.0 and aware["cross"] == 0.0  # an empty image "read as a cross" shows no cross
    assert plain["red"] == 1.0 and aware["red"] == 0.0  # nor the red the colour head reads in a grey field
    assert plain["striped"] == aware["striped"] == 1.0  # a style is read from the image with or without a shape
    no_field = {k: v for k, v in pred.items() if k != "field"}  # shapes need only the presence answer
    assert _hits(no_field, prompts, concepts, per, False, shape_aware=True)["cross"] == 0.0
    pred["field"][:] = red  # a red field is red
    assert _hits(pred, prompts, concepts, per, False, shape_aware=True)["red"] == 1.0
    pred["present"][:] = True  # with a shape, the heads read as before
    assert _hits(pred, prompts, concepts, per, False, shape_aware=True) == plain


def test_shape_aware_collateral_reads_an_empty_image_as_empty():
    sq, red, blue = world.concept_index("square"), world.concept_index("red"), world.concept_index("blue")
    style = world.concept_index("striped")
    n = 4
    # four images of unrelated prompts: the original draws a red striped square in each; the edit draws empty fields
    # that the heads still read as red striped squares (guesses), two of them with a red field, one a blue one
    orig = {"shape": torch.full((n,), sq), "colour": torch.full((n,), red), "style": torch.full((n,), style),
            "present": torch.ones(n, dtype=torch.bool), "field": torch.full((n,), -1)}
    edited = {**{k: v.clone() for k, v in orig.items()}, "present": torch.zeros(n, dtype=torch.bool),
              "field": torch.tensor([red, red, blue, -1])}
    unrelated = torch.ones(n, dtype=torch.bool)
    plain = collateral(orig, edited, unrelated, ["circle"])["unrelated"]
    aware = collateral(seen_as(orig), seen_as(edited), unrelated, ["circle"])["unrelated"]
    assert plain["all"] == plain["shape"] == plain["colour"] == 1.0  # the heads' guesses match the original
    assert aware["shape"] == 0.0 and aware["all"] == 0.0  # no square is left
    assert aware["colour"] == 0.5 and aware["style"] == 1.0  # two red fields keep the colour; style as read
    assert seen_as({k: v for k, v in edited.items() if k not in ("present", "field")})["shape"].tolist() == [sq] * n


def test_field_colour_tells_a_coloured_field_from_any_background():
    g = torch.Generator().manual_seed(4242)
    attrs = world.sample_attributes(2000, g)
    attrs.shape[:] = len(world.SHAPES)
    # every background the world renders (grey, tinted, with gradients and styles) is no colour
    assert bool((field_colour(world.render(attrs, g)) == -1).all())
    for i, c in enumerate(world.COLOURS):
        grey = torch.tensor([0.5, 0.5, 0.5])
        rgb = torch.tensor(world.COLOUR_RGB[c])
        # a field a third of the way from grey to the colour, and a darker one, read as the colour
        fields = torch.stack([grey + (rgb - grey) / 3, 0.5 * (grey + (rgb - grey) / 3)])
        images = (fields[:, :, None, None].expand(2, 3, 32, 32)) * 2 - 1
        assert field_colour(images).tolist() == [i, i], c
    # just inside the background's range (a tint two channels up, one down, at its largest): no colour; just
    # beyond it: the nearest hue (yellow, red and green up, blue down)
    for scale, expect in ((0.99, -1), (1.01, world.concept_index("yellow"))):
        edge = torch.tensor([0.5, 0.5, 0.5]) + scale * FIELD_CHROMA * torch.tensor([1.0, 1.0, -2.0]) / 6**0.5
        assert field_colour((edge[None, :, None, None].expand(1, 3, 32, 32)) * 2 - 1).tolist() == [expect]


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
    # every concept meets the lab's bar (>= 90% on its prompts, >= 75% on synonyms; on this reduced set of 8 and 4
    # images per concept that is at least 7 of 8 and 3 of 4; the full evaluation measured 100% everywhere)
    for c in world.ALL_CONCEPTS:
        assert acc[c] >= 0.875 and syn[c] >= 0.75, (c, acc[c], syn[c])


@pytest.mark.slow
def test_sampling_the_lab_model_is_deterministic(lab):
    from erasure.sampling import sample

    a = sample(lab, ["a red circle"], [5, 6], steps=5).images
    b = sample(lab, ["a red circle"], [5, 6], steps=5).images
    assert torch.equal(a, b)


@pytest.mark.slow
def test_esd_baseline_reduces_the_erased_concept(lab, clf, tmp_path, monkeypatch):
    from erasure.esd import esd

    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    s = EvalSettings(seeds_own=6, seeds_syn=2, concepts=("red", "blue"))
    before = evaluate(lab, clf, ["red"], settings=s)
    weights = esd(lab, "red", iterations=60, seed=0)
    after = evaluate(lab, clf, ["red"], weights, settings=s)
    assert after["concepts"]["red"]["accuracy"] <= before["concepts"]["red"]["accuracy"] - 0.5
    # the concept-free reference is the original model's (the edit does not touch it); seed 1005 of these six draws
    # red from "a shape" (docs/ant.md#why-colours-resist), so it is not 1
    assert after["word_removed"] == before["word_removed"]
    assert 0.5 < after["word_removed"]["by_concept"]["red"]["efficacy"] < 1.0
    # read as lab eval's shape-aware metrics too (an empty image: no shape, its field's colour)
    assert set(after["word_removed"]["shape_aware"]) == {"efficacy", "generality"}
    assert "(read as above:" in format_table(after)
    assert all(torch.isfinite(d.matrix()).all() for d in weights.deltas.values())


def test_without_words_takes_the_concept_out_of_the_prompt():
    from erasure.lab.evaluate import without_words

    assert without_words("a photo of a green object", {"green"}) == "a photo of a object"
    assert [without_words(p, set(world.SYNONYMS["green"])) for p in world.concept_prompts("green", synonyms=True)] == [
        "a shape", "a photo of a object", "a shape", "a photo of a object"]
    assert without_words("a greenish shape", {"green"}) == "a greenish shape"  # whole words only


@pytest.mark.slow
def test_ant_defaults_erase_the_concept_and_leave_another(lab, clf, tmp_path, monkeypatch):
    """ANT at its defaults (protect included) on the lab: the concept's prompts lose it, another concept's keep
    theirs, and the erasure report sees the concept's guidance reversed. Measured at seed 0 on this reduced
    evaluation: circle accuracy 1.0 -> 0.0, square 1.0 -> 1.0, guidance left -0.11 at two threads (-0.16 before
    the gradient projection; at 120 steps, before it, nothing was erased yet: +0.23). The full evaluation:
    docs/ant.md#the-defaults-on-the-lab."""
    from erasure.lab.demo import erase
    from erasure.report import erasure_report

    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    s = EvalSettings(seeds_own=6, seeds_syn=2, concepts=("circle", "square"))
    before = evaluate(lab, clf, ["circle"], settings=s)
    weights = erase(lab, "circle", seed=0)  # the demo's erasure: ANT's defaults with the lab's templates
    after = evaluate(lab, clf, ["circle"], weights, settings=s)
    assert before["concepts"]["circle"]["accuracy"] == 1.0 and after["concepts"]["circle"]["accuracy"] <= 0.25
    assert after["concepts"]["square"]["accuracy"] >= before["concepts"]["square"]["accuracy"] - 0.2
    report = erasure_report(lab, weights, ["circle"])
    assert report["guidance_left"] < 0, report["guidance_left"]


@pytest.mark.slow
def test_mace_object_preset_erases_the_concept_and_leaves_another(lab, clf, tmp_path, monkeypatch):
    """MACE's object preset on the lab (as `python -m erasure demo --method mace`): the concept's prompts lose it,
    another concept's keep theirs, the report sees the guidance gone. Measured at seed 0 on this reduced evaluation,
    with protect 0.999 (the default): circle accuracy 1.0 -> 0.0, square 1.0 -> 1.0, guidance left -0.001 (-0.18
    with protect 0; docs/mace.md#protect)."""
    from erasure.lab.demo import erase
    from erasure.report import erasure_report

    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    s = EvalSettings(seeds_own=6, seeds_syn=2, concepts=("circle", "square"))
    before = evaluate(lab, clf, ["circle"], settings=s)
    weights = erase(lab, "circle", method="mace", seed=0)
    after = evaluate(lab, clf, ["circle"], weights, settings=s)
    assert before["concepts"]["circle"]["accuracy"] == 1.0 and after["concepts"]["circle"]["accuracy"] <= 0.25
    assert after["concepts"]["square"]["accuracy"] >= before["concepts"]["square"]["accuracy"] - 0.2
    assert erasure_report(lab, weights, ["circle"])["guidance_left"] < 0.25
