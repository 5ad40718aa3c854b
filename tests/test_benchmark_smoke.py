"""The benchmark at its smallest size: every method, ours and the reference, on tiny SD1.5/SDXL layouts.

Checks that it runs, writes the JSON interface other tools read, that the ANT rows measure the library's current
defaults, and that the counts mean what they say (the published reference's 50-step trajectories cost more than
ours' 10; full-UNet Adam holds more state than our cross-attention deltas; the replay in ``counts.py`` equals the
hooks' count for every ANT single row; MACE's counted evaluations match its settings). The real measurements are
``--size cpu`` and ``--size gpu`` (docs/benchmarks.md).
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import counts
from benchmarks.archs import build_backbone
from benchmarks.projection import ant_training_rows
from benchmarks.run import main
from erasure.ant import AntSettings, scope_modules

REQUIRED = {"method", "impl", "concepts", "arch", "unet_evals", "wall_s", "peak_mem_bytes", "optimizer_state_bytes",
            "trainable_params"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    assert main(["--size", "smoke", "--in-process", "--no-projection", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _row(result, method, impl, arch="sd15", concepts=None, variant="default"):
    rows = [r for r in result["rows"] if r["method"] == method and r["impl"] == impl and r["arch"] == arch
            and r["variant"] == variant and (concepts is None or r["concepts"] == concepts)]
    assert len(rows) == 1, rows
    return rows[0]


def test_every_cell_ran_and_has_the_interface_fields(result):
    assert {r["method"] for r in result["rows"]} == {"ant-single", "ant-multi", "mace", "fusion"}
    for r in result["rows"]:
        assert "error" not in r, r
        assert REQUIRED <= r.keys()
        assert r["impl"] in ("ours", "reference") and r["arch"] in ("sd15", "sdxl")
        assert r["wall_s"] > 0 and r["peak_mem_bytes"] > 0
    assert result["ratios"]


def test_counts_reflect_the_algorithms(result):
    s = result["settings"]
    ours, ref = _row(result, "ant-single", "ours"), _row(result, "ant-single", "reference")
    # the rows measure the library's defaults, with only the size's cost settings overridden
    default = AntSettings()
    assert ours["ant_settings"]["sampling"] == default.sampling and ours["ant_settings"]["scope"] == default.scope
    assert ours["ant_settings"]["lr"] == default.lr and s["ant"]["lr"] == default.lr
    assert _row(result, "ant-multi", "ours")["ant_settings"]["scope"] == "kv"
    # ours trains the default scope's dense deltas (the cross-attention K/V) and nothing else
    bb = build_backbone("sd15", "tiny", 8, torch.float32, "cpu")
    assert default.scope == "kv"
    assert ours["trainable_params"] == sum(m.weight.numel() for m in scope_modules(bb, "kv").values())
    # one backward per step through the rows the memory projection counts (``projection.ant_training_rows``)
    st = AntSettings(**s["ant"])
    assert ours["unet_backward_evals"] == st.steps * ant_training_rows(st) == st.steps * 6
    # the reference trains every UNet parameter under Adam: two moments of float32 per parameter
    assert ref["trainable_params"] == ref["unet_params"]
    assert ref["optimizer_state_bytes"] >= 8 * ref["unet_params"]
    # Adam: two float32 moments per trained entry (and a step counter per tensor)
    assert 8 * ours["trainable_params"] <= ours["optimizer_state_bytes"] < 8 * ours["trainable_params"] + 4096
    assert 0 < ours["trainable_params"] < ref["trainable_params"]
    # the reference as published regenerates 50-step trajectories: more evaluations than with ours' 10
    assert _row(result, "ant-single", "reference", variant="published")["unet_evals"] > ref["unet_evals"]
    # the cached configuration: the reference regenerates a trajectory one image at a time before every step,
    # ours caches them: more, smaller UNet calls for the reference
    old, old_ref = (_row(result, "ant-single", impl, variant="cached-saliency") for impl in ("ours", "reference"))
    assert old["ant_settings"]["sampling"] == "cached" and old["ant_settings"]["scope"] == "saliency"
    assert old_ref["unet_forward_calls"] / old_ref["unet_evals"] > old["unet_forward_calls"] / old["unet_evals"]
    assert ours["library_unet_forwards"] == ours["unet_evals"]
    assert old["library_unet_forwards"] == old["unet_evals"]
    # MACE: images x sampling steps x 2 (guidance) + one evaluation per LoRA step, per concept; ours also evaluates
    # its fixed probe before and after each LoRA (the stalled-LoRA check), the reference does not
    from erasure.mace import PROBE_CHUNK, PROBE_SAMPLES

    m = s["mace"]
    for n in (1, 3):
        for impl in ("ours", "reference"):
            r = _row(result, "mace", impl, concepts=n)
            probe = 2 * PROBE_SAMPLES if impl == "ours" else 0
            assert r["unet_evals"] == n * (2 * m["images_per_concept"] * m["sample_steps"] + m["lora_steps"] + probe)
            assert r["unet_backward_evals"] == n * m["lora_steps"]
    # unbatched generation: the reference makes one sampling call per image (ours' probe calls left out)
    probe_calls = 3 * 2 * -(-PROBE_SAMPLES // PROBE_CHUNK)
    assert (_row(result, "mace", "reference", concepts=3)["unet_forward_calls"]
            > _row(result, "mace", "ours", concepts=3)["unet_forward_calls"] - probe_calls)
    assert _row(result, "fusion", "ours", concepts=4)["unet_evals"] == 0
    for impl in ("ours", "reference"):  # both encode every concept's prompts: the timer saw it, within the wall time
        fusion = _row(result, "fusion", impl, concepts=4)
        assert 0 < fusion["text_encoding_s"] <= fusion["wall_s"]


def test_replayed_counts_equal_the_measured_ones(result):
    """``counts.py`` (used for the library's default settings) against the hooks, for every ANT single row."""
    settings = {"default": result["settings"]["ant"],
                **{k: v["settings"] for k, v in result["settings"]["ant_variants"].items()}}
    rows = [r for r in result["rows"] if r["method"] == "ant-single"]
    assert {(r["impl"], r["variant"]) for r in rows} == {("ours", "default"), ("reference", "default"),
                                                          ("reference", "published"), ("ours", "cached-saliency"),
                                                          ("reference", "cached-saliency")}
    for r in rows:
        s = AntSettings(**settings[r["variant"]])
        if r["impl"] == "ours":
            expected = counts.ours_ant_single(s)["total"]
        else:
            expected = counts.reference_ant_single(s, n_preserve=s.preserve_prompts)["total"]
        assert r["unet_evals"] == expected, (r["impl"], r["variant"])
    d = result["default_counts"]
    # the replay is of the library's current defaults, against the reference with 50-step trajectories
    assert d["settings"]["steps"] == AntSettings().steps and d["settings"]["sampling"] == AntSettings().sampling
    assert d["reference_published"]["trajectory_steps"] == 50
    # the cached configuration, also run on the tiny layout
    assert d["historical"]["ours"]["total"] == 32656 and d["historical"]["ours_no_refresh"]["total"] == 3856
