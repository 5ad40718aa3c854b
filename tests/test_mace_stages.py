import json

import torch
from tiny_models import LAB_TEMPLATES, tiny_mace_settings

from erasure.fusion import concept_token_embeddings, fuse
from erasure.mace import (
    generate_data,
    mace,
    masks_from_attention,
    suppressed_positions,
    timestep_weights,
    train_lora,
)
from erasure.prior import gram
from erasure.prompts import Concept, prior_prompts


def _settings(**kw):
    return tiny_mace_settings(25, **kw)


def test_masks_threshold_and_fall_back_to_whole_image():
    maps = torch.zeros(2, 4, 4)
    maps[0, 1:3, 1:3] = 1.0
    m = masks_from_attention(maps)
    assert m[0].sum() == 4 and m[0, 1, 1] == 1 and m[0, 0, 0] == 0
    assert m[1].sum() == 16  # a flat map cannot locate the concept: use the whole image


def test_timestep_distribution_peaks_between_200_and_400():
    p = timestep_weights()
    assert abs(float(p.sum()) - 1) < 1e-9
    median = int((p.cumsum(0) >= 0.5).nonzero()[0])
    assert 250 <= median <= 350
    assert p[300] > 10 * p[100] and p[300] > 10 * p[600]


def test_suppressed_positions_include_end_and_padding(tiny_backbone):
    pos = suppressed_positions(tiny_backbone, "a photo of a circle", "circle")
    assert pos == [5] + list(range(6, 16))
    assert suppressed_positions(tiny_backbone, "a photo of a circle", "circle", end=False) == [5]


def test_suppressed_positions_following_cover_the_words_between_concept_and_end(tiny_backbone):
    # "a green shape": [start, a, green, shape, end, padding...]; the concept ends the prompt -> nothing added
    assert suppressed_positions(tiny_backbone, "a green shape", "green", end=False, following=True) == [2, 3]
    assert suppressed_positions(tiny_backbone, "a green shape", "green", following=True) == [2] + list(range(3, 16))
    assert (suppressed_positions(tiny_backbone, "a photo of a circle", "circle", following=True)
            == suppressed_positions(tiny_backbone, "a photo of a circle", "circle"))


def test_generate_data_shapes_and_masks(tiny_backbone):
    c = Concept("circle", "shape", templates=LAB_TEMPLATES, data_prompt="a photo of a {c}")
    d = generate_data(tiny_backbone, c, _settings(use_masks=True))
    assert d.latents.shape == (2, 3, 16, 16) and d.masks.shape == (2, 16, 16)
    assert set(d.masks.unique().tolist()) <= {0.0, 1.0} and d.masks.sum() > 0
    style = generate_data(tiny_backbone, Concept("striped", "plain", kind="style", templates=LAB_TEMPLATES),
                          _settings(use_masks=True))
    assert bool((style.masks == 1).all())
    # the default (whole images): no masks from attention
    assert bool((generate_data(tiny_backbone, c, _settings()).masks == 1).all())


def test_attention_loss_decreases_during_training(tiny_backbone):
    c = Concept("circle", "shape", templates=LAB_TEMPLATES, data_prompt="a photo of a {c}")
    d = generate_data(tiny_backbone, c, _settings())
    before = {k: v.clone() for k, v in tiny_backbone.unet().state_dict().items()}
    res = train_lora(tiny_backbone, d, None, _settings(lora_steps=40))
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < 0.8 * first, res.losses
    assert all(d.rank == 1 for d in res.weights.deltas.values())
    assert all(torch.equal(before[k], v) for k, v in tiny_backbone.unet().state_dict().items())


def test_fusion_of_one_lora_reproduces_it_on_its_own_prompts(tiny_backbone, tmp_path):
    bb = tiny_backbone
    c = Concept("circle", "shape", templates=LAB_TEMPLATES, data_prompt="a photo of a {c}")
    d = generate_data(bb, c, _settings())
    lora = train_lora(bb, d, None, _settings()).weights
    prior = gram(bb, prior_prompts(100, exclude=["circle"]), tmp_path)
    fused = fuse(bb, [(c, lora)], None, prior, lam=1e-4, preserve=1e-4)
    e = concept_token_embeddings(bb, c)
    for name, mod in bb.cross_attention_kv().items():
        w0 = mod.weight.detach().double()
        want = e @ (w0 + lora.deltas[name].matrix().double()).T
        got = e @ (w0 + fused.deltas[name].matrix().double()).T
        change = (want - e @ w0.T).norm()
        assert (got - want).norm() < 0.05 * change + 1e-6, name


def test_fusion_solves_the_stacked_least_squares_problem(tiny_backbone, tmp_path):
    """The layer-shared factorisation gives the same W as the per-layer stacked problem of the formula, for a
    LoRA, a dense edit and a CFR base together."""
    from erasure.closed_form import least_squares_edit
    from erasure.weights import ErasureWeights

    bb = tiny_backbone
    g = torch.Generator().manual_seed(0)
    cs = [Concept(w, "shape", templates=LAB_TEMPLATES) for w in ("circle", "square")]
    kv = bb.cross_attention_kv()
    lora = train_lora(bb, generate_data(bb, cs[0], _settings()), None, _settings(lora_steps=3)).weights
    dense = ErasureWeights.dense({n: torch.randn(m.weight.shape, generator=g) * 0.01 for n, m in kv.items()})
    base = ErasureWeights.dense({n: torch.randn(m.weight.shape, generator=g) * 0.01 for n, m in kv.items()})
    prior = gram(bb, prior_prompts(50), tmp_path)
    fused = fuse(bb, [(cs[0], lora), (cs[1], dense)], base, prior, lam=0.05, preserve=0.5)
    es = [concept_token_embeddings(bb, c) for c in cs]
    for name, mod in kv.items():
        w0 = mod.weight.detach().double()
        wb = w0 + base.deltas[name].matrix().double()
        v = torch.cat([e @ (wb + w.deltas[name].matrix().double()).T for e, w in zip(es, (lora, dense), strict=True)])
        want = least_squares_edit(wb, torch.cat(es), v, 0.05, prior, 0.5, w_prior=w0)
        torch.testing.assert_close(w0 + fused.deltas[name].matrix().double(), want, rtol=0, atol=1e-5)


def test_balanced_fusion_weighs_every_concept_alike(tiny_backbone, tmp_path):
    """With unequal prompt counts (2 vs 4 templates), ``balance`` solves the stacked problem whose rows are weighted
    by sqrt(mean count / own count); with equal counts it changes nothing."""
    from erasure.closed_form import least_squares_edit
    from erasure.weights import ErasureWeights

    bb = tiny_backbone
    g = torch.Generator().manual_seed(1)
    kv = bb.cross_attention_kv()
    cs = [Concept("circle", "shape", templates=LAB_TEMPLATES[:2]), Concept("square", "shape", templates=LAB_TEMPLATES)]
    edits = [ErasureWeights.dense({n: torch.randn(m.weight.shape, generator=g) * 0.01 for n, m in kv.items()})
             for _ in cs]
    prior = gram(bb, prior_prompts(50), tmp_path)
    fused = fuse(bb, list(zip(cs, edits, strict=True)), None, prior, lam=0.05, preserve=0.5)
    plain = fuse(bb, list(zip(cs, edits, strict=True)), None, prior, lam=0.05, preserve=0.5, balance=False)
    ws = [(3 / 2) ** 0.5, (3 / 4) ** 0.5]  # mean count 3
    es = [concept_token_embeddings(bb, c) * w for c, w in zip(cs, ws, strict=True)]
    for name, mod in kv.items():
        w0 = mod.weight.detach().double()
        v = torch.cat([e @ (w0 + d.deltas[name].matrix().double()).T for e, d in zip(es, edits, strict=True)])
        want = least_squares_edit(w0, torch.cat(es), v, 0.05, prior, 0.5, w_prior=w0)
        torch.testing.assert_close(w0 + fused.deltas[name].matrix().double(), want, rtol=0, atol=1e-5)
    assert any((fused.deltas[n].matrix() - plain.deltas[n].matrix()).abs().max() > 1e-4 for n in kv)
    same = [Concept("circle", "shape", templates=LAB_TEMPLATES), Concept("square", "shape", templates=LAB_TEMPLATES)]
    a = fuse(bb, list(zip(same, edits, strict=True)), None, prior, lam=0.05, preserve=0.5)
    b = fuse(bb, list(zip(same, edits, strict=True)), None, prior, lam=0.05, preserve=0.5, balance=False)
    for n in kv:
        torch.testing.assert_close(a.deltas[n].matrix(), b.deltas[n].matrix(), rtol=0, atol=1e-7)


def test_full_pipeline_runs_and_names_its_concepts(tiny_backbone, tmp_path):
    bb = tiny_backbone
    concepts = [Concept(w, "shape", templates=LAB_TEMPLATES, data_prompt="a photo of a {c}")
                for w in ("circle", "square")]
    prior = gram(bb, prior_prompts(100), tmp_path)
    res = mace(bb, concepts, _settings(lora_steps=3), prior)
    assert res.weights.metadata["erasure.method"] == "mace"
    assert len(res.loras) == 2 and set(res.weights.deltas) == set(bb.cross_attention_kv())
    assert json.loads(res.weights.metadata["erasure.concepts"]) == ["circle", "square"]
    from erasure.lora_files import load_lora, save_lora

    save_lora(res.weights, tmp_path / "m.safetensors")
    back = load_lora(tmp_path / "m.safetensors")
    assert json.loads(back.metadata["erasure.concepts"]) == ["circle", "square"]


def test_fusion_of_loras_alone_is_an_exact_low_rank_lora(tiny_backbone, tmp_path):
    """Without a base, LoRAs fuse into a factorisation of rank sum r per layer that solves the stacked problem
    exactly; past min(out, D) stacked ranks the layer is solved densely, with the same result."""
    from erasure.closed_form import least_squares_edit
    from erasure.weights import Delta, ErasureWeights

    bb = tiny_backbone
    g = torch.Generator().manual_seed(2)
    kv = bb.cross_attention_kv()
    width = min(min(m.weight.shape) for m in kv.values())

    def random_lora(rank):
        return ErasureWeights({n: Delta(up=torch.randn(m.weight.shape[0], rank, generator=g) * 0.1,
                                        down=torch.randn(rank, m.weight.shape[1], generator=g) * 0.1, scale=0.5)
                               for n, m in kv.items()})

    prior = gram(bb, prior_prompts(50), tmp_path)
    for ranks in ((1, 1, 2), (1,) * (width + 1)):
        cs = [Concept(w, "shape", templates=LAB_TEMPLATES) for w in ("circle", "square", "triangle", "star")]
        cs = [cs[i % len(cs)] for i in range(len(ranks))]
        loras = [random_lora(r) for r in ranks]
        fused = fuse(bb, list(zip(cs, loras, strict=True)), None, prior, lam=0.05, preserve=0.5)
        es = [concept_token_embeddings(bb, c) for c in cs]
        for name, mod in kv.items():
            w0 = mod.weight.detach().double()
            v = torch.cat([e @ (w0 + w.deltas[name].matrix().double()).T for e, w in zip(es, loras, strict=True)])
            want = least_squares_edit(w0, torch.cat(es), v, 0.05, prior, 0.5, w_prior=w0)
            torch.testing.assert_close(w0 + fused.deltas[name].matrix().double(), want, rtol=0, atol=1e-5)
            low_rank = sum(ranks) * sum(mod.weight.shape) < mod.weight.numel()
            assert fused.deltas[name].rank == (sum(ranks) if low_rank else None), name


def test_fusion_keeps_the_cheaper_of_a_loras_rows_and_its_gram(tiny_backbone, tmp_path):
    """A low-rank LoRA is stored as its rows ``down G`` while they take less than its D x D Gram, else as the Gram
    (a high-rank LoRA's rows over every layer would take more); both give the stacked problem's solution, and a
    solved system refuses to be solved or extended again."""
    import math

    import pytest

    from erasure.closed_form import least_squares_edit
    from erasure.fusion import FusionSystem, mean_prompt_count
    from erasure.weights import Delta, ErasureWeights

    bb = tiny_backbone
    g = torch.Generator().manual_seed(3)
    kv = bb.cross_attention_kv()
    d = next(iter(kv.values())).weight.shape[1]
    big = math.ceil(d * d / sum(sum(m.weight.shape) for m in kv.values()))
    assert big < min(min(m.weight.shape) for m in kv.values())  # still low rank in every layer

    def random_lora(rank):
        return ErasureWeights({n: Delta(up=torch.randn(m.weight.shape[0], rank, generator=g) * 0.1,
                                        down=torch.randn(rank, m.weight.shape[1], generator=g) * 0.1)
                               for n, m in kv.items()})

    cs = [Concept(w, "shape", templates=LAB_TEMPLATES) for w in ("circle", "square")]
    loras = [random_lora(1), random_lora(big)]
    prior = gram(bb, prior_prompts(50), tmp_path)
    system = FusionSystem(bb, mean_prompt_count([[c] for c in cs]))
    system.add(cs[0], loras[0])
    assert not system.kept and len(system.low) == len(kv)
    system.add(cs[1], loras[1], factor=0.5)
    assert len(system.kept) == 1
    fused = system.solve(None, prior, 0.05, 0.5)
    es = [concept_token_embeddings(bb, c) for c in cs]
    for name, mod in kv.items():
        w0 = mod.weight.detach().double()
        v = torch.cat([e @ (w0 + f * w.deltas[name].matrix().double()).T
                       for e, w, f in zip(es, loras, (1.0, 0.5), strict=True)])
        want = least_squares_edit(w0, torch.cat(es), v, 0.05, prior, 0.5, w_prior=w0)
        torch.testing.assert_close(w0 + fused.deltas[name].matrix().double(), want, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="solved already"):
        system.solve(None, prior, 0.05, 0.5)
    with pytest.raises(RuntimeError, match="solved already"):
        system.add(cs[0], loras[0])


def test_fusion_of_an_item_with_low_rank_and_dense_layers(tiny_backbone, tmp_path):
    """One item may hold LoRA factors on some layers and dense deltas on others (a merged file): each layer takes
    its own path, kept (``fuse``) or folded at once (``keep=False``), with the stacked problem's solution."""
    from erasure.closed_form import least_squares_edit
    from erasure.fusion import FusionSystem, mean_prompt_count
    from erasure.weights import Delta, ErasureWeights

    bb = tiny_backbone
    g = torch.Generator().manual_seed(4)
    kv = bb.cross_attention_kv()
    names = list(kv)
    mixed = ErasureWeights({n: (Delta(dense=torch.randn(m.weight.shape, generator=g) * 0.01) if i % 2 else
                                Delta(up=torch.randn(m.weight.shape[0], 2, generator=g) * 0.1,
                                      down=torch.randn(2, m.weight.shape[1], generator=g) * 0.1))
                            for i, (n, m) in enumerate(kv.items())})
    cs = [Concept(w, "shape", templates=LAB_TEMPLATES) for w in ("circle", "square")]
    other = ErasureWeights({names[0]: Delta(up=torch.randn(kv[names[0]].weight.shape[0], 1, generator=g),
                                            down=torch.randn(1, kv[names[0]].weight.shape[1], generator=g) * 0.01)})
    prior = gram(bb, prior_prompts(50), tmp_path)
    es = [concept_token_embeddings(bb, c) for c in cs]
    for keep in (True, False):
        system = FusionSystem(bb, mean_prompt_count([[c] for c in cs]))
        system.add(cs[0], mixed, keep=keep, factor=1.5)
        system.add(cs[1], other, keep=keep)
        fused = system.solve(None, prior, 0.05, 0.5)
        for name, mod in kv.items():
            w0 = mod.weight.detach().double()
            v = torch.cat([e @ (w0 + f * w.deltas[name].matrix().double() if name in w.deltas else w0).T
                           for e, w, f in zip(es, (mixed, other), (1.5, 1.0), strict=True)])
            want = least_squares_edit(w0, torch.cat(es), v, 0.05, prior, 0.5, w_prior=w0)
            torch.testing.assert_close(w0 + fused.deltas[name].matrix().double(), want, rtol=0, atol=1e-5)


def test_protect_keeps_the_fused_change_off_the_prior_prompts_directions(tiny_backbone, tmp_path):
    from erasure.prior import protected_complement

    bb = tiny_backbone
    concepts = [Concept("circle", "shape", templates=LAB_TEMPLATES, data_prompt="a photo of a {c}")]
    prior = gram(bb, prior_prompts(100), tmp_path)
    free = mace(bb, concepts, _settings(lora_steps=3, protect=0.0), prior).weights
    kept = mace(bb, concepts, _settings(lora_steps=3, protect=0.9), prior).weights
    keep, k = protected_complement(prior, 0.9)
    v = torch.linalg.eigh(prior)[1].flip(1)[:, :k].float()
    assert 0 < k < prior.shape[0]
    assert kept.metadata["erasure.protect_used"] == "true" and free.metadata["erasure.protect_used"] == "false"
    for name in bb.cross_attention_kv():
        d, d0 = kept.deltas[name].matrix(), free.deltas[name].matrix()
        assert (d @ v).abs().max() <= 1e-5 * d0.abs().max()  # nothing left on the kept directions
        assert (d0 @ v).abs().max() > 1e-3 * d0.abs().max()  # which the unprotected result does reach


def test_protect_trains_each_lora_in_the_directions_it_keeps(tiny_backbone, tmp_path):
    """protect is projected gradient descent for the LoRA stage, as for ANT: each concept's LoRA lies in the
    protected complement (its input side projected from the start and after every step), so the fused result's
    projection removes nothing of it; without protect the same LoRA reaches into those directions."""
    from erasure.prior import protected_complement

    bb = tiny_backbone
    concepts = [Concept("circle", "shape", templates=LAB_TEMPLATES, data_prompt="a photo of a {c}")]
    prior = gram(bb, prior_prompts(100), tmp_path)
    _, k = protected_complement(prior, 0.9)
    v = torch.linalg.eigh(prior)[1].flip(1)[:, :k].float()
    for protect in (0.9, 0.0):
        lora = mace(bb, concepts, _settings(lora_steps=3, protect=protect), prior).loras[0].weights
        offs = [float((d.matrix() @ v).abs().max()) / max(float(d.matrix().abs().max()), 1e-12)
                for d in lora.deltas.values()]
        if protect:
            assert max(offs) <= 1e-5
        else:  # (the last layer's value LoRA gets no gradient: the loss reads attention probabilities only)
            assert max(offs) > 1e-3


def test_the_fused_edit_reports_how_much_it_changed_the_weights(tiny_backbone):
    """||dW|| / ||W|| of the fused edit per layer group: in the result, the file's metadata and the console, as
    ANT's runs report it (a number that means the same on any model; docs/mace.md#the-value-lora)."""
    from erasure.progress import Progress
    from erasure.weights import relative_change

    bb = tiny_backbone
    said: list[str] = []
    concepts = [Concept("circle", "shape", templates=LAB_TEMPLATES, data_prompt="a photo of a {c}")]
    r = mace(bb, concepts, _settings(lora_steps=3), None, progress=Progress(log=said.append))
    assert r.relative_change == relative_change(r.weights, dict(bb.unet().named_modules()))
    assert r.relative_change["all"] > 0 and {"down.to_k", "up.to_v"} <= set(r.relative_change)
    assert json.loads(r.weights.metadata["erasure.relative_change"]) == r.relative_change
    assert any(line.startswith("the MACE edit: weights changed by ||dW|| / ||W|| = ") for line in said)
