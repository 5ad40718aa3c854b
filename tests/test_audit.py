"""The erasure audit (``erasure/audit.py``, ``python -m erasure audit``) on the committed lab model, with few steps:
the report's keys and ranges, the inversion's loss, refusals that write nothing, and the learned-token mechanism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from erasure import cli
from erasure.audit import (
    AuditPrompts,
    AuditSettings,
    audit_units,
    fit_slot,
    generate_concept_images,
    recoverability,
)
from erasure.audit_text import DiffusersSlotEncoder, init_vectors, slot_embeddings
from erasure.diffusers_backbone import load_diffusers
from erasure.errors import BadInputError
from erasure.lora_files import save_lora
from erasure.progress import Progress
from erasure.weights import ErasureWeights

#: a few steps of everything: the mechanics, not the lab's measurement (docs/audit.md has that)
FAST = ["--steps", "4", "--prefix-steps", "2", "--seeds", "2", "--generated-images", "3", "--heldout", "2",
        "--sample-steps", "4"]


@pytest.fixture(scope="module")
def lab():
    return load_diffusers("lab")


@pytest.fixture(scope="module")
def erasure_lora(lab, tmp_path_factory) -> Path:
    """A small K/V edit of the lab model (random, fixed seed) standing in for an erasure LoRA."""
    g = torch.Generator().manual_seed(0)
    deltas = {n: 0.05 * torch.randn(m.weight.shape, generator=g) for n, m in lab.cross_attention_kv().items()}
    path = tmp_path_factory.mktemp("lora") / "edit.safetensors"
    save_lora(ErasureWeights.dense(deltas, method="test", concepts=["circle"]), path)
    return path


# -- the learned token ------------------------------------------------------------------------------------------
def test_the_word_own_embedding_in_the_slot_gives_the_ordinary_prompt(lab):
    enc = DiffusersSlotEncoder(lab)
    got = enc.encode(["a photo of a {}", "{} a circle"], enc.word_vectors("circle")).embeds
    want = lab.encode_text(["a photo of a circle", "circle a circle"]).embeds
    assert torch.equal(got, want)


def test_the_slot_changes_the_input_embeddings_only_at_its_position(lab):
    enc = DiffusersSlotEncoder(lab)
    tok, table = lab.tokenizers[0], lab.text_encoders[0].get_input_embeddings()
    ids, pos = enc.token_ids(tok, "a photo of a {}", 1)
    assert pos == [5] and lab.token_positions("a photo of a circle", "circle") == pos
    plain = table(torch.tensor([ids]))
    vec = torch.randn(1, plain.shape[-1])
    with slot_embeddings(table, [pos], vec):
        hooked = table(torch.tensor([ids]))
    changed = (hooked != plain).any(-1)[0]
    assert changed.nonzero().flatten().tolist() == pos and torch.equal(hooked[0, 5], vec[0])
    assert torch.equal(table(torch.tensor([ids])), plain), "the hook outlived its context"


def test_the_learned_vector_reaches_the_encoding_from_its_position_on_with_gradients(lab):
    enc = DiffusersSlotEncoder(lab)
    ref = lab.encode_text(["a photo of a circle"]).embeds[0]
    vec = [(enc.word_vectors("circle")[0] + torch.randn(1, 128)).requires_grad_(True)]
    out = enc.encode(["a photo of a {}"], vec).embeds[0]
    diff = (out - ref).abs().amax(-1)
    # the text encoder is causal: the positions before the slot are untouched, the slot itself changes
    assert torch.equal(diff[:5], torch.zeros(5)) and diff[5] > 0.1
    out.sum().backward()
    assert vec[0].grad is not None and vec[0].grad.abs().sum() > 0


def test_a_slot_prompt_too_long_for_the_context_is_refused(lab):
    enc = DiffusersSlotEncoder(lab)  # the lab's context: 16 tokens
    with pytest.raises(BadInputError, match="more than the text encoder reads"):
        enc.encode(["{} a photo of a circle"], init_vectors(enc, 12, "", torch.Generator().manual_seed(0)))
    with pytest.raises(BadInputError, match="exactly once"):
        enc.encode(["a photo of a circle"], enc.word_vectors("circle"))


# -- the attacks and scores --------------------------------------------------------------------------------------
def test_the_inversion_lowers_its_loss(lab):
    enc = DiffusersSlotEncoder(lab)
    prompts = AuditPrompts(("a {}", "a photo of a {}"), ("a photo of a {}",), ("a photo of a circle",))
    s = AuditSettings(generated_images=2, heldout=0, sample_steps=10, guidance=5.0)
    x = generate_concept_images(lab, prompts, s, Progress())
    g = torch.Generator().manual_seed(0)
    _, before, after = fit_slot(lab, enc, x, list(prompts.templates), init_vectors(enc, 1, "object", g), 30, 0.3, 4,
                                g, Progress(), t_min=0.4)
    assert after < 0.97 * before, (before, after)


def test_recoverability_is_clipped_and_undefined_without_a_gap():
    assert recoverability(2.0, 1.5, 1.0) == pytest.approx(0.5)
    assert recoverability(2.0, 0.5, 1.0) == 1.0 and recoverability(2.0, 3.0, 1.0) == 0.0
    assert recoverability(1.0, 0.5, 1.0) is None and recoverability(1.0, 0.5, 1.5) is None


def test_settings_are_checked():
    with pytest.raises(BadInputError, match="steps"):
        AuditSettings(steps=0).validate()
    with pytest.raises(BadInputError, match="t_min"):
        AuditSettings(t_min=1.0).validate()


# -- the command -------------------------------------------------------------------------------------------------
def test_audit_command_writes_the_report_grid_and_token(erasure_lora, tmp_path, monkeypatch):
    counted: list[int] = []
    monkeypatch.setattr(cli, "_progress", lambda bar: Progress(update=counted.append))
    out = tmp_path / "audit"
    rc = cli.main(["audit", "--model", "lab", "--lora", str(erasure_lora), "--concept", "circle", "--out-dir",
                   str(out), "--json", str(tmp_path / "r.json"), *FAST])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report == json.loads((out / "report.json").read_text())
    for key in ("attack_success_rate", "attack_success_rate_original", "plain_success_rate",
                "prefix_attack_success_rate", "original_plain_success_rate"):
        assert 0.0 <= report[key] <= 1.0, key
    for key in ("recoverability", "prefix_recoverability"):
        assert report[key] is None or 0.0 <= report[key] <= 1.0
    assert set(report["losses"]) == {"original_plain", "original_learned", "erased_plain", "erased_learned",
                                     "erased_prefix"}
    assert report["images"] == {"source": "generated", "inversion": 3, "heldout": 2}
    assert (out / "grid.png").stat().st_size > 0 and (out / "learned-token.safetensors").is_file()
    s = AuditSettings(steps=4, prefix_steps=2, seeds=2, generated_images=3, heldout=2, sample_steps=4)
    assert sum(counted) == audit_units(s, cli._lab_audit_inputs("circle")[0], False, True)


@pytest.mark.parametrize("bad", ["concept", "lora", "lora_for_another_model", "steps", "images", "json"])
def test_refused_inputs_write_nothing(bad, erasure_lora, tmp_path, capsys):
    args = {"--lora": str(erasure_lora), "--concept": "circle", "--steps": "4"}
    if bad == "concept":
        args["--concept"] = "hexagon"
    elif bad == "lora":
        args["--lora"] = str(tmp_path / "missing.safetensors")
    elif bad == "lora_for_another_model":
        other = tmp_path / "other.safetensors"
        save_lora(ErasureWeights.dense({"down_blocks.9.attn2.to_k": torch.zeros(4, 4)}, method="test"), other)
        args["--lora"] = str(other)
    elif bad == "steps":
        args["--steps"] = "0"
    elif bad == "images":
        folder = tmp_path / "imgs"
        folder.mkdir()
        from PIL import Image

        Image.new("RGB", (32, 32)).save(folder / "one.png")
        args["--images"] = str(folder)
    else:
        args["--json"] = str(tmp_path)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = cli.main(["audit", "--model", "lab", "--out-dir", str(out), *(x for kv in args.items() for x in kv)])
    assert rc == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before


# -- any model: a tiny SDXL-layout latent model (two text encoders, a VAE), no judge -----------------------------
@pytest.fixture(scope="module")
def tiny_sdxl(lab_tokenizer_dir):
    from tiny_models import tiny_sdxl

    return tiny_sdxl(lab_tokenizer_dir)


def test_sdxl_slot_encoding_matches_the_ordinary_prompt_in_both_encoders(tiny_sdxl):
    enc = DiffusersSlotEncoder(tiny_sdxl)
    assert enc.widths() == [32, 32]
    got = enc.encode(["a photo of a {}"], enc.word_vectors("circle"))
    want = tiny_sdxl.encode_text(["a photo of a circle"])
    assert torch.equal(got.embeds, want.embeds)
    for k in ("text_embeds", "time_ids"):
        assert torch.equal(got.extras[k], want.extras[k])


def test_audit_without_a_judge_on_user_images(tiny_sdxl, tmp_path):
    from PIL import Image

    from erasure.audit import (
        WeightsModels,
        find_concept_images,
        general_audit_prompts,
        load_concept_images,
        run_audit,
    )
    from erasure.audit_text import DiffusersSlotEncoder as Enc

    folder = tmp_path / "imgs" / "circle"  # the mace --image-dir layout is accepted too
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = (torch.rand(20, 24, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    Image.fromarray(pixels).save(folder / "0.mask.png")  # masks are ignored
    files = find_concept_images(tmp_path / "imgs", "circle")
    assert [f.name for f in files] == ["0.png", "1.png", "2.png", "3.png"]
    latents = load_concept_images(tiny_sdxl, files, 16)
    assert latents.shape == (4, 4, 8, 8)
    kv = tiny_sdxl.cross_attention_kv()
    weights = ErasureWeights.dense({n: 0.1 * torch.randn(m.weight.shape, generator=g) for n, m in kv.items()})
    s = AuditSettings(steps=3, prefix_steps=2, seeds=2, sample_steps=2, loss_timesteps=2, resolution=16)
    before = {n: m.weight.clone() for n, m in kv.items()}
    res = run_audit(WeightsModels(tiny_sdxl, weights), Enc(tiny_sdxl), "circle", general_audit_prompts("circle"), s,
                    images=latents)
    r = res.report
    assert r["images"] == {"source": "user", "inversion": 3, "heldout": 1}
    assert "plain_success_rate" not in r and "inversion_original" not in r
    assert r["recoverability"] is None or 0 <= r["recoverability"] <= 1
    assert [label.split(":")[0] for label, _ in res.rows] == ["original", "erased", "erased", "erased"]
    assert res.rows[0][1].shape == (2, 3, 16, 16) and [v.shape for v in res.token] == [(1, 32), (1, 32)]
    assert all(torch.equal(m.weight, before[n]) for n, m in kv.items()), "the erasure stayed applied"


def test_the_lab_judge_reads_an_empty_image_as_no_shape():
    # the shape head reads an empty background as a cross; the audit's judge must not count it as a revived cross
    from erasure.lab import world
    from erasure.lab.classifier import render_empty

    _, judge = cli._lab_audit_inputs("cross")
    g = torch.Generator().manual_seed(7)
    empty = render_empty(64, g)
    attrs = world.sample_attributes(64, g)
    attrs.shape[:] = world.concept_index("cross")
    crosses = world.render(attrs, g)
    assert judge(empty).float().mean() <= 0.05
    assert judge(crosses).float().mean() >= 0.95
