"""Every example workflow (UI format, as shipped) converts to the API format, validates and executes in ComfyUI's
real executor on the tiny checkpoint; so do workflows saved with the first published node layout (legacy_workflows/:
the erase nodes with every setting as a widget). Only the checkpoint name and the cost settings (steps, sizes) are
changed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .conftest import REPO, run_prompt

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
LEGACY = sorted((Path(__file__).parent / "legacy_workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

#: cheap settings for a CPU test, per node type (everything else runs as shipped)
FAST = {
    "EraseConceptANT": {"steps": 2, "resolution": 64, "trajectories": 2, "trajectory_steps": 6, "early_steps": 2,
                        "saliency_maps": 2},
    "MassEraseMACE": {"lora_steps": 2, "resolution": 64},
    "EraseConceptANTv2": {"steps": 2},
    "ANTSettings": {"resolution": "64", "trajectories": 2, "trajectory_steps": 6, "early_steps": 2,
                    "saliency_maps": 2},
    "MACESettings": {"lora_steps": 2, "resolution": "64"},
    "PreviewErasure": {"seeds": 2, "steps": 2, "resolution": "64"},
    "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": 64, "height": 64},
}


def ui_to_api(workflow: dict, mappings: dict) -> dict:
    """What ComfyUI's frontend does when it queues a UI workflow: links become [node, slot] inputs and
    ``widgets_values`` fill the widget inputs in order (required, then optional; a seed's 'control after generate'
    value is skipped: any INT named seed/noise_seed has one unless its spec sets control_after_generate)."""
    links = {lk[0]: (str(lk[1]), lk[2]) for lk in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        spec = mappings[node["type"]].INPUT_TYPES()
        inputs = {i["name"]: list(links[i["link"]]) for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        k = 0
        for section in ("required", "optional"):
            for name, (typ, *rest) in spec.get(section, {}).items():
                opts = rest[0] if rest else {}
                if name in inputs or not (isinstance(typ, list) or typ in WIDGET_TYPES) or opts.get("forceInput"):
                    continue
                if k < len(values):
                    inputs[name] = values[k]
                    k += 1
                    # the frontend's rule (useIntWidget): an explicit control_after_generate, else any INT named
                    # seed/noise_seed gets the extra 'control after generate' widget, whose value follows it
                    if typ == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
                        k += 1
        assert k == len(values), f"{node['type']}: {len(values)} widget values for {k} widgets"
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def test_there_are_three_example_workflows():
    assert len(WORKFLOWS) >= 3


def test_legacy_workflows_are_the_first_published_layout():
    assert {p.name for p in LEGACY} == {p.name for p in WORKFLOWS}
    types = {n["type"] for p in LEGACY for n in json.loads(p.read_text())["nodes"]}
    assert {"EraseConceptANT", "MassEraseMACE"} <= types


@pytest.mark.parametrize("path", WORKFLOWS + LEGACY, ids=[p.name for p in WORKFLOWS] +
                         ["legacy-" + p.name for p in LEGACY])
def test_example_workflow_executes(comfy, tiny_ckpt, path: Path, monkeypatch, tmp_path):
    nodes = comfy["nodes"].NODE_CLASS_MAPPINGS
    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    mod = sys.modules[nodes["MassEraseMACEv2"].__module__]  # the legacy nodes run the same code
    monkeypatch.setattr(mod, "prior_prompts", lambda exclude=(), **kw: ["a house", "a tree", "a man", "a car"])
    workflow = json.loads(path.read_text())
    if "3-fuse" in path.name:
        # the fuse example loads the LoRAs that examples 1 and 2 save (run them first if they have not run yet)
        import folder_paths

        if not {"erase-nudity.safetensors", "erase-characters.safetensors"} <= set(
                folder_paths.get_filename_list("loras")):
            for prior in (LEGACY if path in LEGACY else WORKFLOWS)[:2]:
                _execute(json.loads(prior.read_text()), nodes, tiny_ckpt)
        assert {"erase-nudity.safetensors", "erase-characters.safetensors"} <= set(
            folder_paths.get_filename_list("loras"))
    _execute(workflow, nodes, tiny_ckpt)


def _execute(workflow: dict, nodes: dict, ckpt: str) -> None:
    api = ui_to_api(workflow, nodes)
    for node in api.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = ckpt
        node["inputs"].update(FAST.get(node["class_type"], {}))
    ex, _ = run_prompt(api)
    assert ex.success, ex.status_messages[-3:]


def test_pack_seeds_have_no_control_after_generate_widget(comfy):
    """The frontend gives every INT named seed a 'control after generate' widget (default: randomize) unless the
    spec says otherwise: an erasure node would then retrain with a new seed at every queue, and the example
    workflows' widget values would shift by one. Ours declare it off."""
    mappings = comfy["nodes"].NODE_CLASS_MAPPINGS
    checked = 0
    for name in ("EraseConceptANTv2", "MassEraseMACEv2", "EraseConceptANT", "MassEraseMACE", "PreviewErasure"):
        spec = mappings[name].INPUT_TYPES()
        for section in ("required", "optional"):
            for inp, (typ, *rest) in spec.get(section, {}).items():
                if typ == "INT" and inp in ("seed", "noise_seed"):
                    assert (rest[0] if rest else {}).get("control_after_generate") is False, (name, inp)
                    checked += 1
    assert checked == 5
