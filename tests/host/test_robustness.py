"""Robustness of the pack inside a real ComfyUI (issue #7): bad input refused when the graph is queued, two erasures
of one MODEL (one graph, or parallel runs) not interfering, faults (out of memory, NaN) leaving the MODEL as it
was, no torch state leaking out of a node, hostile file names and files handled."""

from __future__ import annotations

import asyncio
import copy
import pickle
import sys
import threading
from pathlib import Path

import pytest
import torch

from .conftest import StubServer, _install_progress_hook

#: the cheapest real run: 3 trajectory steps, 2 training steps, no preservation prompts (each costs a CLIP-L pass)
FAST = {"synonyms": "", "steps": 2, "learning_rate": 1e-3, "scope": "xattn", "preserve": 0.0,
        "saliency_fraction": 0.5, "prediction": "guided", "resolution": 32, "seed": 0, "trajectories": 1,
        "trajectory_steps": 4, "early_steps": 1, "saliency_maps": 1, "refresh_every": 0}


def _nodes(comfy):
    return comfy["nodes"].NODE_CLASS_MAPPINGS


def _out(result, i=0):
    return (result.result if hasattr(result, "result") else result)[i]


def _ant(comfy, model, clip, concept, **kw):
    with torch.inference_mode():  # as inside a prompt
        r = _nodes(comfy)["EraseConceptANT"].execute(model=model, clip=clip, concept=concept, **(FAST | kw))
    return _out(r, 0), _out(r, 1)


def _pack_module(comfy, name: str):
    """A module of the pack as ComfyUI loaded it (the package is named after the pack's folder)."""
    nodes_mod = sys.modules[_nodes(comfy)["EraseConceptANTv2"].__module__]
    return sys.modules[nodes_mod.__name__.rsplit(".", 2)[0] + "." + name]


def _snapshot(model) -> dict:
    return {n: (p, p.detach().clone()) for n, p in model.model.diffusion_model.named_parameters()}


def _assert_untouched(model, snap: dict) -> None:
    unet = model.model.diffusion_model
    for n, p in unet.named_parameters():
        obj, value = snap[n]
        assert p is obj, f"{n}: the MODEL's Parameter was replaced"
        assert torch.equal(p.detach(), value), f"{n}: the MODEL changed"
    for name, m in unet.named_modules():
        assert not m._forward_hooks and "forward" not in m.__dict__, f"{name}: left patched"


def _torch_state() -> tuple:
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_default_dtype(),
            torch.random.get_rng_state())


def _same_lora(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _validate(prompt: dict):
    import execution

    return asyncio.run(execution.validate_prompt("test", prompt, None))


def test_bad_text_inputs_are_refused_when_the_graph_is_queued(comfy, tiny_ckpt):
    def graph(ant_concept="cat", mace_concepts="cat", anchors="", filename="x") -> dict:
        return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_ckpt}},
            "2": {"class_type": "EraseConceptANT", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                              "concept": ant_concept} | FAST},
            "3": {"class_type": "SaveErasureLoRA", "inputs": {"lora": ["2", 1], "filename": filename,
                                                              "overwrite": True}},
            "4": {"class_type": "MassEraseMACE", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                            "concepts": mace_concepts, "preset": "object",
                                                            "anchors": anchors, "preserve_prompts": "",
                                                            "lora_steps": 1, "resolution": 64, "seed": 0}},
            "5": {"class_type": "SaveErasureLoRA", "inputs": {"lora": ["4", 1], "filename": "y", "overwrite": True}},
        }

    assert _validate(graph())[0], "a good graph must validate"
    for kw, node, says in [({"ant_concept": "  "}, "2", "a concept is empty"),
                           ({"mace_concepts": "cat\nCat"}, "4", "duplicate concepts: cat"),
                           ({"anchors": "Cat"}, "4", "is the concept itself"),
                           ({"anchors": "a; b"}, "4", "2 anchors for 1 concepts"),
                           ({"filename": "../.."}, "3", "the file name is empty")]:
        _, _, good_outputs, node_errors = _validate(graph(**kw))
        assert node in node_errors, (kw, node_errors)
        assert not set(node_errors[node]["dependent_outputs"]) & set(good_outputs), "a refused branch would run"
        details = " ".join(e["details"] for e in node_errors[node]["errors"])
        assert says in details, (kw, details)


def test_two_erasures_of_one_model_in_a_graph_and_in_parallel_do_not_interfere(comfy, tiny_ckpt, loaded):
    import execution
    from safetensors.torch import load_file

    model, clip, _ = loaded
    snap = _snapshot(model)

    # one graph, two erasure nodes on the same MODEL output (run one after the other by ComfyUI's executor)
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_ckpt}}}
    for i, c in enumerate(("cat", "dog")):
        prompt[f"{2 + 2 * i}"] = {"class_type": "EraseConceptANT",
                                  "inputs": {"model": ["1", 0], "clip": ["1", 1], "concept": c} | FAST}
        prompt[f"{3 + 2 * i}"] = {"class_type": "SaveErasureLoRA",
                                  "inputs": {"lora": [f"{2 + 2 * i}", 1], "filename": f"two-{c}", "overwrite": True}}
    server = StubServer()
    _install_progress_hook(server)
    ex = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
    ex.execute(prompt, "two", {"client_id": None}, ["3", "5"])
    assert ex.success, ex.status_messages
    loras = Path(comfy["folder_paths"].get_folder_paths("loras")[0])
    alone = {c: load_file(str(loras / f"two-{c}.safetensors")) for c in ("cat", "dog")}
    assert any(not torch.equal(alone["cat"][k], alone["dog"][k]) for k in alone["cat"]), "cat and dog gave one LoRA"

    # the same node run twice at once (two queues) on one MODEL: they take turns, results as when run alone
    got: dict[str, dict] = {}
    errors: list[BaseException] = []

    def run(c: str) -> None:
        try:
            got[c] = _ant(comfy, model, clip, c)[1]
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in ("cat", "dog")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for c in ("cat", "dog"):
        _same_lora(got[c], alone[c])
    _assert_untouched(model, snap)


def test_no_torch_state_leaks_out_of_a_node(comfy, loaded):
    model, clip, _ = loaded
    torch.manual_seed(5)
    with torch.inference_mode():
        before = _torch_state()
        _ant(comfy, model, clip, "bird", steps=1)
        after = _torch_state()
    assert after[:3] == before[:3], (before[:3], after[:3])
    assert torch.equal(after[3], before[3]), "the global RNG state leaked out of the node"


def test_out_of_memory_and_nan_in_a_node_leave_the_model_as_it_was(comfy, loaded, monkeypatch):
    model, clip, _ = loaded
    snap = _snapshot(model)
    backbone = _pack_module(comfy, "nodes.comfy_backbone").ComfyBackbone
    real = backbone.predict_noise
    calls = [0]

    def oom_on_the_fourth_call(self, *a, **kw):  # the first training step, after 3 trajectory steps
        calls[0] += 1
        if calls[0] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, *a, **kw)

    monkeypatch.setattr(backbone, "predict_noise", oom_on_the_fourth_call)
    with pytest.raises(torch.OutOfMemoryError, match="ANT ran out of memory: lower the resolution"):
        _ant(comfy, model, clip, "cat")
    assert calls[0] == 4
    _assert_untouched(model, snap)
    monkeypatch.undo()

    ant_mod = _pack_module(comfy, "erasure.ant.train")
    real_loss = ant_mod.ant_loss
    monkeypatch.setattr(ant_mod, "ant_loss", lambda *a, **kw: (lambda r: (r[0] * float("nan"), r[1]))(
        real_loss(*a, **kw)))
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        _ant(comfy, model, clip, "cat")
    _assert_untouched(model, snap)


def test_wrong_models_loras_and_files_get_clear_messages(comfy, loaded, tmp_path):
    nodes = _nodes(comfy)
    model, clip, _ = loaded
    snap = _snapshot(model)
    for config in ("Flux", "SD3", "SVD_img2vid", "WAN21_T2V"):
        fake = copy.copy(model)
        fake.model = type("M", (), {"model_config": type(config, (), {})(), "model_type": None})()
        with pytest.raises(ValueError, match=f"this model \\({config}, None\\) is not supported"):
            _ant(comfy, fake, clip, "cat")
    with torch.inference_mode(), pytest.raises(ValueError, match="no CLIP given"):
        nodes["MassEraseMACE"].execute(model=model, clip=None, concepts="cat", preset="object", lora_steps=1,
                                       resolution=64, seed=0)

    # a LoRA made for another base model: unknown layer, or a known layer of another shape
    to_diffusers = _pack_module(comfy, "nodes.comfy_backbone").ldm_to_diffusers(model)
    name = next(d for d in to_diffusers.values() if d.endswith("attn2.to_k")).replace(".", "_")  # 768 -> 320
    for lora, says in [({"lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k.lora_up.weight":
                         torch.zeros(1280, 1), "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k"
                         ".lora_down.weight": torch.zeros(1, 2048)}, "does not exist in this model"),
                       ({f"lora_unet_{name}.lora_up.weight": torch.zeros(640, 1),
                         f"lora_unet_{name}.lora_down.weight": torch.zeros(1, 2048)}, "has shape")]:
        with torch.inference_mode(), pytest.raises(ValueError, match=says):
            nodes["ApplyErasedModel"].execute(model, 1.0, lora, "(none)")

    # hostile files and names
    loras = Path(comfy["folder_paths"].get_folder_paths("loras")[0])
    (loras / "evil.safetensors").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        nodes["LoadErasureLoRA"].execute("evil.safetensors")
    good = {"lora_unet_a.lora_up.weight": torch.ones(2, 1), "lora_unet_a.lora_down.weight": torch.ones(1, 2)}
    nodes["SaveErasureLoRA"].execute(good, "../../escaped", True)
    assert (loras / "escaped.safetensors").is_file() and not (loras.parent.parent / "escaped.safetensors").exists()
    with pytest.raises(ValueError, match="contains NaN or infinite values"):
        nodes["SaveErasureLoRA"].execute(good | {"lora_unet_a.alpha": torch.tensor(float("nan"))}, "nan", True)
    assert not (loras / "nan.safetensors").exists()
    _assert_untouched(model, snap)
