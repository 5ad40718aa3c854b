import pytest
import torch

from erasure.mace import aligned_pairs, refine
from erasure.prior import gram
from erasure.prompts import CONCEPT_TEMPLATES, Concept, prior_prompts

#: short templates that fit the tiny model's 16-token context (MACE's own, the reference's 30, do not all fit)
SHORT = CONCEPT_TEMPLATES["object"]


def _lab_prior(bb, tmp_path, exclude=()):
    prompts = [p for p in prior_prompts(300, exclude=exclude)]
    return gram(bb, prompts, cache_dir=tmp_path)


def test_no_concepts_leave_weights_unchanged(tiny_backbone, tmp_path):
    w = refine(tiny_backbone, [], _lab_prior(tiny_backbone, tmp_path))
    assert all(float(d.matrix().abs().max()) < 1e-6 for d in w.deltas.values())


def test_aligned_pairs_skip_the_concept_tokens(tiny_backbone):
    ef, eg = aligned_pairs(tiny_backbone, Concept("circle", "shape", templates=("a photo of a {c}",)))
    assert ef.shape == eg.shape == (15, 32)  # 16 positions minus the concept's one token


def test_cfr_maps_concept_onto_anchor_and_keeps_prior(tiny_backbone, tmp_path):
    bb = tiny_backbone
    c = Concept("circle", "square", templates=SHORT)
    prior = _lab_prior(bb, tmp_path, exclude=["circle"])
    w = refine(bb, [c], prior, lam=0.1, preserve=1.0)
    ef, eg = aligned_pairs(bb, c)
    general = bb.encode_text(prior_prompts(50, seed=7, exclude=["circle"])).embeds.double().reshape(-1, 32)
    for name, mod in bb.cross_attention_kv().items():
        w0 = mod.weight.detach().double()
        w1 = w0 + w.deltas[name].matrix().double()
        before = (ef @ w0.T - eg @ w0.T).norm() / (eg @ w0.T).norm()
        after = (ef @ w1.T - eg @ w0.T).norm() / (eg @ w0.T).norm()
        assert after < 0.5 * before, (name, float(before), float(after))
        drift = (general @ w1.T - general @ w0.T).norm() / (general @ w0.T).norm()
        # a random tiny text encoder has little structure, so the trade-off is loose here; the lab model's is tight
        assert drift < 0.3, (name, float(drift))


def test_cfr_solves_each_layers_least_squares_problem(tiny_backbone, tmp_path):
    """One D x D solve shared by all layers gives each layer's own minimiser (and its normal equations hold)."""
    from erasure.closed_form import least_squares_edit, normal_matrices

    bb = tiny_backbone
    cs = [Concept("circle", "square", templates=SHORT), Concept("red", "blue", templates=SHORT)]
    prior = _lab_prior(bb, tmp_path, exclude=["circle", "red"])
    w = refine(bb, cs, prior, lam=0.1, preserve=0.7)
    pairs = [aligned_pairs(bb, c) for c in cs]
    ef, eg = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    for name, mod in bb.cross_attention_kv().items():
        w0 = mod.weight.detach().double()
        got = w0 + w.deltas[name].matrix().double()
        want = least_squares_edit(w0, ef, eg @ w0.T, 0.1, prior, 0.7)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        m1, m2 = normal_matrices(w0, ef, eg @ w0.T, 0.1, prior, 0.7)
        assert float((want @ m2 - m1).abs().max()) < 1e-8 * float(m1.abs().max())


def test_gram_is_cached_and_rebuilt_when_corrupt(tiny_backbone, tmp_path):
    prompts = prior_prompts(20)
    a = gram(tiny_backbone, prompts, cache_dir=tmp_path)
    files = list((tmp_path / "gram").glob("*.safetensors"))
    assert len(files) == 1
    files[0].write_bytes(b"garbage")
    b = gram(tiny_backbone, prompts, cache_dir=tmp_path)
    torch.testing.assert_close(a, b)
    assert torch.allclose(a, a.T)


def test_concept_validation():
    with pytest.raises(ValueError):
        Concept("  ", "shape")
    with pytest.raises(ValueError):
        Concept("circle", "Circle")
