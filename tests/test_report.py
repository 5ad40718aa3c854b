"""The erasure report (erasure/report.py): its two numbers on edits whose effect is known, the metadata in a LoRA
file, and the command line's summary."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest

from erasure.report import (
    METADATA_KEY,
    ReportSettings,
    add_to_metadata,
    calibrated_strength,
    erasure_report,
    report_from_metadata,
    report_text,
    report_units,
)
from erasure.weights import ErasureWeights

SMALL = ReportSettings(steps=4, seeds=2, concept_prompts=2, unrelated_prompts=2, batch_size=8)
UNRELATED = ["a red square", "a blue cross", "a green triangle"]


def _values_off(backbone, factor: float = 1.0) -> ErasureWeights:
    """Deltas that scale every cross-attention value projection by (1 - factor): factor 1 makes the cross-attention
    output zero for every prompt, so the text no longer steers the model."""
    return ErasureWeights.dense({n: -factor * m.weight.detach().clone()
                                 for n, m in backbone.cross_attention_kv().items() if n.endswith("to_v")})


def test_no_edit_leaves_everything(tiny_backbone):
    for weights in (None, ErasureWeights(), _values_off(tiny_backbone).scaled(0.0)):
        r = erasure_report(tiny_backbone, weights, ["circle"], UNRELATED, SMALL)
        assert r["guidance_left"] == pytest.approx(1.0, abs=1e-4)
        assert r["unrelated_drift"] == pytest.approx(0.0, abs=1e-4)
        assert r["guidance_left_by_concept"] == {"circle": pytest.approx(1.0, abs=1e-4)}
    assert r["prompts"]["unrelated"] == UNRELATED[:2]


def test_edits_move_the_numbers_as_expected(tiny_backbone):
    gone = erasure_report(tiny_backbone, _values_off(tiny_backbone), ["circle"], UNRELATED, SMALL)
    assert abs(gone["guidance_left"]) < 1e-4  # no text reaches the UNet: no guidance direction at all
    assert gone["unrelated_drift"] > 0.1  # ...and unrelated prompts lost theirs too
    half = erasure_report(tiny_backbone, _values_off(tiny_backbone, 0.5), ["circle"], UNRELATED, SMALL)
    assert 0.05 < half["guidance_left"] < 0.95
    assert 0 < half["unrelated_drift"] < gone["unrelated_drift"]
    assert half["unet_evaluations"] == report_units(2, 2, SMALL)
    assert set(half["guidance_left_by_stage"]) == {"mid", "late"}


def _worst(r: dict) -> float:
    return max(v for v in r["guidance_left_by_stage"].values() if v is not None)


def test_calibrated_strength_finds_the_weakest_strength_that_reaches_the_target(tiny_backbone):
    """calibrated_strength (ANT's ``calibrate``): strength 1 when the edit is already there; otherwise a strength
    whose measured guidance left (worst of mid and late) is at the target, near where it crosses it; the cap said."""
    bb, edit = tiny_backbone, _values_off(tiny_backbone, 0.4)  # values x (1 - 0.4 strength): less text each step
    only = replace(SMALL, unrelated_prompts=0)
    at = {st: _worst(erasure_report(bb, edit.scaled(st), ["circle"], [], only)) for st in (1.0, 1.5, 2.0)}
    assert 1.0 > at[1.0] > at[1.5] > at[2.0]
    there = calibrated_strength(bb, edit, ["circle"], target=at[1.0] + 0.01, settings=SMALL)
    assert there["strength"] == 1.0 and there["reached"] and len(there["history"]) == 1
    cal = calibrated_strength(bb, edit, ["circle"], target=at[1.5], settings=SMALL, evaluations=6)
    measured = {st: max(mid, late) for st, mid, late in cal["history"]}
    assert cal["reached"] and measured[cal["strength"]] <= at[1.5] + 1e-4
    assert 1.4 < cal["strength"] < 1.6  # guidance left falls with strength: the crossing is near 1.5
    # the original trajectories are sampled by the first report only; every strength is measured on them, and gives
    # what a report of its own gives
    sampling = 2 * SMALL.steps * 2 * SMALL.seeds
    n = len(cal["history"])
    assert cal["unet_evaluations"] == n * report_units(2, 0, SMALL) - (n - 1) * sampling
    for st, mid, late in cal["history"][1:]:
        alone = erasure_report(bb, edit.scaled(st), ["circle"], [], only)["guidance_left_by_stage"]
        assert (alone["mid"], alone["late"]) == (mid, late)
    capped = calibrated_strength(bb, edit, ["circle"], target=at[2.0] - 0.1, max_strength=2.0, settings=SMALL)
    assert not capped["reached"] and 1.0 < capped["strength"] <= 2.0


def test_report_text_and_metadata_round_trip(tiny_backbone, tmp_path):
    from erasure.lora_files import load_lora, save_lora

    weights = _values_off(tiny_backbone, 0.5)
    r = erasure_report(tiny_backbone, weights, ["circle"], UNRELATED, SMALL)
    text = report_text(r)
    assert "guidance left" in text and "unrelated prompts" in text and '"guidance_left"' in text
    add_to_metadata(weights, r)
    save_lora(weights, tmp_path / "w.safetensors")
    back = load_lora(tmp_path / "w.safetensors")
    assert METADATA_KEY in back.metadata and report_from_metadata(back.metadata) == r
    assert report_from_metadata({}) is None and report_from_metadata({METADATA_KEY: "not json"}) is None


def test_settings_are_checked():
    from erasure.errors import BadInputError

    with pytest.raises(BadInputError):
        ReportSettings(late_from=1.0).validate()
    with pytest.raises(BadInputError):
        ReportSettings(steps=1).validate()


def test_command_line_summary_and_file(tmp_path, monkeypatch, capsys):
    """`python -m erasure ant` on the lab: the closing summary has the report, the LoRA's metadata holds it;
    --no-report skips it."""
    from erasure import cli
    from erasure.lora_files import load_lora

    monkeypatch.setattr(cli, "ReportSettings", functools.partial(ReportSettings, steps=3, seeds=1, concept_prompts=1,
                                                                 unrelated_prompts=1))
    out = tmp_path / "e.safetensors"
    args = ["ant", "--model", "lab", "--concept", "circle", "--steps", "1", "--trajectories", "1",
            "--trajectory-steps", "4", "--early-steps", "1", "--batch-size", "1", "--reuse", "1", "--out", str(out)]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "erasure report: guidance left" in text and "unrelated prompts' drift" in text
    r = report_from_metadata(load_lora(out).metadata)
    assert r is not None and r["prompts"]["concepts"] == {"circle": ["a circle"]}
    assert f"guidance left {r['guidance_left']:.2f}" in text
    assert cli.main([*args, "--no-report"]) == 0
    assert "erasure report skipped" in capsys.readouterr().out
    assert report_from_metadata(load_lora(out).metadata) is None
