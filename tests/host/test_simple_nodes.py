"""The method nodes show what a user decides; the rest comes from the ANT / MACE Settings nodes; the first published
nodes stay loadable; the loss history reaches ComfyUI's "Plot Loss Graph"."""

from __future__ import annotations

import re

import pytest
import torch

from .conftest import run_prompt
from .test_pack import FAST_ANT, FAST_ANT_SETTINGS, _out, ant_prompt_nodes, ant_settings, widget_defaults

WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _widgets(node) -> list[str]:
    spec = node.INPUT_TYPES()
    return [name for section in ("required", "optional") for name, (typ, *rest) in spec.get(section, {}).items()
            if isinstance(typ, list) or typ in WIDGETS]


def _pack(comfy) -> dict:
    return {k: v for k, v in comfy["nodes"].NODE_CLASS_MAPPINGS.items() if v.__module__.endswith(
        ("erasure_nodes", "settings_nodes", "audit_nodes", "legacy_nodes"))}


def test_method_nodes_show_at_most_eight_widgets(comfy):
    nodes = comfy["nodes"].NODE_CLASS_MAPPINGS
    for name in ("EraseConceptANTv2", "MassEraseMACEv2"):
        widgets = _widgets(nodes[name])
        assert len(widgets) <= 8, (name, widgets)
        assert "seed" in widgets and "preset" in widgets


def test_no_current_widget_uses_zero_for_a_default(comfy):
    """Only the deprecated first-layout nodes keep their 0-means-preset widgets (saved workflows hold those values)."""
    zero_default = re.compile(r"\b0\s*(=|means)\s*(the )?(model's|preset|default|native)", re.I)
    checked = 0
    for name, node in _pack(comfy).items():
        if getattr(node, "DEPRECATED", False):
            continue
        for inputs in node.INPUT_TYPES().values():
            for inp, (_typ, *rest) in (inputs.items() if isinstance(inputs, dict) else []):
                tip = (rest[0] if rest else {}).get("tooltip", "")
                assert not zero_default.search(tip), (name, inp, tip)
                checked += 1
    assert checked > 50


def test_first_layout_nodes_are_deprecated_but_registered(comfy):
    nodes = comfy["nodes"].NODE_CLASS_MAPPINGS
    for name in ("EraseConceptANT", "MassEraseMACE"):
        assert nodes[name].DEPRECATED is True
        assert "legacy" in comfy["nodes"].NODE_DISPLAY_NAME_MAPPINGS[name]
    assert comfy["nodes"].NODE_DISPLAY_NAME_MAPPINGS["EraseConceptANTv2"] == "Erase Concept (ANT)"
    assert comfy["nodes"].NODE_DISPLAY_NAME_MAPPINGS["MassEraseMACEv2"] == "Mass Erase (MACE)"


def test_settings_node_passes_on_only_what_was_changed(comfy):
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["ANTSettings"]
    untouched = _out(node.execute(**widget_defaults(node)))
    assert untouched == {"settings": {}, "resolution": None, "report": True}
    changed = _out(node.execute(**(widget_defaults(node) | {"learning_rate": 0.05, "scope": "lora",
                                                            "resolution": "512", "erasure_report": False})))
    assert changed == {"settings": {"lr": 0.05, "scope": "lora"}, "resolution": 512, "report": False}
    with pytest.raises(ValueError, match="early_steps"):
        node.execute(**(widget_defaults(node) | {"trajectory_steps": 4, "early_steps": 4}))
    mace = comfy["nodes"].NODE_CLASS_MAPPINGS["MACESettings"]
    assert _out(mace.execute(**widget_defaults(mace))) == {"settings": {}, "resolution": None, "report": True}
    assert _out(mace.execute(**(widget_defaults(mace) | {"suppress_end": "on"})))["settings"] == {
        "suppress_end": True}


def test_settings_node_force_passes_on_values_at_their_defaults(comfy):
    from erasure.ant import AntSettings
    from erasure.mace import MaceSettings

    node = comfy["nodes"].NODE_CLASS_MAPPINGS["ANTSettings"]
    out = _out(node.execute(**(widget_defaults(node) | {"force": "eta, learning_rate", "preserve": 2.0})))
    assert out["settings"] == {"eta": AntSettings().eta, "lr": AntSettings().lr, "preserve": 2.0}
    with pytest.raises(ValueError, match="force: no setting 'etta'.*learning_rate"):
        node.execute(**(widget_defaults(node) | {"force": "etta"}))
    mace = comfy["nodes"].NODE_CLASS_MAPPINGS["MACESettings"]
    assert _out(mace.execute(**(widget_defaults(mace) | {"force": "lam"})))["settings"] == {"lam": MaceSettings().lam}
    with pytest.raises(ValueError, match="force: no setting 'resolution'"):
        mace.execute(**(widget_defaults(mace) | {"force": "resolution"}))


def test_resolution_widgets_accept_the_first_layouts_zero(comfy):
    preview = comfy["nodes"].NODE_CLASS_MAPPINGS["PreviewErasure"]
    assert preview.validate_inputs(resolution=0) is True  # saved by the Int widget: the native size
    assert preview.validate_inputs(resolution="native") is True
    assert "multiple of 8" in preview.validate_inputs(resolution=100)


def _lora_and_loss(comfy, model, clip, **kw):
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["EraseConceptANTv2"]
    settings = kw.pop("settings", None)
    with torch.inference_mode():
        out = node.execute(model=model, clip=clip, **(FAST_ANT | kw), settings=settings)
    return _out(out, 1), _out(out, 2)


def test_new_node_with_settings_equals_first_layout_node(comfy, loaded):
    """The same settings through the ANT Settings node and through the deprecated all-widget node: the same LoRA."""
    model, clip, _ = loaded
    new, loss = _lora_and_loss(comfy, model, clip, settings=ant_settings(comfy))
    legacy = comfy["nodes"].NODE_CLASS_MAPPINGS["EraseConceptANT"]
    old = {k: v for k, v in FAST_ANT_SETTINGS.items() if k != "erasure_report"} | {"resolution": 64}
    with torch.inference_mode():
        r = legacy.execute(model=model, clip=clip, **FAST_ANT, **old, preserve=5.0, saliency_fraction=0.5,
                           prediction="guided")
    old_lora = _out(r, 1)
    assert new.keys() == old_lora.keys()
    for k in new:
        assert torch.equal(new[k], old_lora[k]), k
    assert len(loss["loss"]) == FAST_ANT["steps"] and all(isinstance(v, float) for v in loss["loss"])


def test_preset_keeps_what_the_settings_node_left_alone(comfy, loaded):
    import json

    model, clip, _ = loaded
    lora, _ = _lora_and_loss(comfy, model, clip, preset="paper",
                             settings=ant_settings(comfy, scope="kv", learning_rate=0.02))
    s = json.loads(lora.metadata["erasure.settings"])
    # scope kv and lr 0.02 are the library defaults: left to the paper preset; the FAST values that differ apply
    assert s["scope"] == "saliency" and s["lr"] == 5e-4 and s["eta"] == 1.0 and s["trajectory_steps"] == 6
    lora, _ = _lora_and_loss(comfy, model, clip, preset="paper", settings=ant_settings(comfy, scope="xattn"))
    s = json.loads(lora.metadata["erasure.settings"])
    assert s["scope"] == "xattn" and s["lr"] == 1e-3 and s["prediction"] == "cond"
    # force: the library's eta (the widget's default) replaces the paper's 1
    lora, _ = _lora_and_loss(comfy, model, clip, preset="paper", settings=ant_settings(comfy, force="eta"))
    s = json.loads(lora.metadata["erasure.settings"])
    assert s["eta"] == 0.3 and s["scope"] == "saliency" and s["prediction"] == "cond"


def test_loss_reaches_plot_loss_graph_also_from_the_result_cache(comfy, tiny_ckpt, monkeypatch, tmp_path):
    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_ckpt}},
        **ant_prompt_nodes(cache_result=True),
        "3": {"class_type": "LossGraphNode", "inputs": {"loss": ["2", 2], "filename_prefix": "erasure-loss"}},
    }
    for _ in range(2):  # trained, then from the result cache (a new executor: no in-memory cache)
        ex, _server = run_prompt(prompt)
        assert ex.success, ex.status_messages[-3:]
        # the stock node divides by the loss range: an empty or constant history would have failed it
        assert ex.history_result["outputs"]["3"]["images"], "Plot Loss Graph showed no picture"


def test_erasure_report_output_metadata_and_cache(comfy, loaded, monkeypatch, tmp_path):
    """The REPORT output: measured after training, stored in the LoRA's metadata, reused from the result cache."""
    import json
    import sys

    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    model, clip, _ = loaded
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["EraseConceptANTv2"]
    settings = ant_settings(comfy, erasure_report=True)
    with torch.inference_mode():
        out = node.execute(model=model, clip=clip, **FAST_ANT, cache_result=True, settings=settings)
    lora, text = _out(out, 1), _out(out, 3)
    assert text.startswith("erasure report: guidance left")
    report = json.loads(lora.metadata["erasure.report"])
    # measured on the edited model (2 training steps: some change, not an erasure): the stored numbers are the text's
    assert report["unet_evaluations"] > 0 and report["guidance_left"] != 1.0 and report["unrelated_drift"] > 0
    assert f"guidance left {report['guidance_left']:.2f}" in text
    mod = sys.modules[node.__module__]
    monkeypatch.setattr(mod, "erasure_report", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
    with torch.inference_mode():  # from the result cache: the stored report, not measured again
        again = node.execute(model=model, clip=clip, **FAST_ANT, cache_result=True, settings=settings)
    assert _out(again, 3) == text
    with torch.inference_mode():  # switched off on the settings node: no report, no cost
        off = node.execute(model=model, clip=clip, **FAST_ANT, settings=ant_settings(comfy))
    assert _out(off, 3) == ""
