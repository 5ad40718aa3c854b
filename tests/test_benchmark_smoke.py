"""The benchmark at its smallest size: every method, ours and the reference, on tiny SD1.5/SDXL layouts.

Checks that it runs, writes the JSON interface other tools read, and that the counts mean what they say (the
reference regenerates trajectories, so it calls the UNet more often per training step; full-UNet Adam holds more
state than our sparse delta; MACE's counted evaluations match its settings). The real measurements are
``--size cpu`` and ``--size gpu`` (README, Benchmarks).
"""

from __future__ import annotations

import json

import pytest

from benchmarks import counts
from benchmarks.run import main
from erasure.ant import AntSettings

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
    # the reference trains every UNet parameter under Adam: two moments of float32 per parameter
    assert ref["trainable_params"] == ref["unet_params"]
    assert ref["optimizer_state_bytes"] >= 8 * ref["unet_params"]
    assert 0 < ours["trainable_params"] < ref["trainable_params"]
    # the reference regenerates a trajectory one image at a time before every step: more, smaller UNet calls
    assert ref["unet_forward_calls"] / ref["unet_evals"] > ours["unet_forward_calls"] / ours["unet_evals"]
    # without refresh, ours runs the trajectories once; with refresh it regenerates them
    assert _row(result, "ant-single", "ours", variant="no-refresh")["unet_evals"] < ours["unet_evals"]
    assert ours["library_unet_forwards"] == ours["unet_evals"]
    # MACE: images x sampling steps x 2 (guidance) + one evaluation per LoRA step, per concept
    m = s["mace"]
    for n in (1, 3):
        for impl in ("ours", "reference"):
            r = _row(result, "mace", impl, concepts=n)
            assert r["unet_evals"] == n * (2 * m["images_per_concept"] * m["sample_steps"] + m["lora_steps"])
            assert r["unet_backward_evals"] == n * m["lora_steps"]
    # unbatched generation: the reference makes one sampling call per image
    assert (_row(result, "mace", "reference", concepts=3)["unet_forward_calls"]
            > _row(result, "mace", "ours", concepts=3)["unet_forward_calls"])
    assert _row(result, "fusion", "ours", concepts=4)["unet_evals"] == 0


def test_replayed_counts_equal_the_measured_ones(result):
    """``counts.py`` (used for the library's default settings) against the hooks, at the smoke settings."""
    s = AntSettings(**result["settings"]["ant"])
    assert _row(result, "ant-single", "ours")["unet_evals"] == counts.ours_ant_single(s)["total"]
    no_refresh = counts.ours_ant_single(s.override(refresh_every=0))["total"]
    assert _row(result, "ant-single", "ours", variant="no-refresh")["unet_evals"] == no_refresh
    ref = counts.reference_ant_single(s, n_preserve=s.preserve_prompts)["total"]
    assert _row(result, "ant-single", "reference")["unet_evals"] == ref
    d = result["default_counts"]
    assert d["ours"]["total"] == 32048 and d["ours_no_refresh"]["total"] == 3824  # also measured on the tiny layout
