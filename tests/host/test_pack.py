"""The pack in a real ComfyUI: registration, execution in the real executor, LoRA interop, safety of the input."""

from __future__ import annotations

import threading

import pytest
import torch

from .conftest import StubServer, run_prompt

PACK_NODES = ("EraseConceptANTv2", "MassEraseMACEv2", "ANTSettings", "MACESettings", "FuseErasureLoRAs",
              "ApplyErasedModel", "SaveErasureLoRA", "LoadErasureLoRA", "PreviewErasure", "AuditErasure",
              "EraseConceptANT", "MassEraseMACE")
#: the erase node's widgets, and what its connected ANT Settings node changes (cheap on a CPU)
FAST_ANT = {"concept": "cat", "synonyms": "kitten", "steps": 2, "seed": 0}
FAST_ANT_SETTINGS = {"learning_rate": 1e-3, "scope": "saliency", "resolution": "64", "trajectories": 2,
                     "trajectory_steps": 6, "early_steps": 2, "saliency_maps": 2, "refresh_every": 1,
                     "erasure_report": False}


def widget_defaults(node) -> dict:
    """A node's widget values as the editor creates them."""
    spec = node.INPUT_TYPES()
    return {name: rest[0]["default"] for section in ("required", "optional")
            for name, (typ, *rest) in spec.get(section, {}).items() if rest and "default" in rest[0]}


def ant_settings(comfy, **kw):
    """An ANT Settings node's output with FAST_ANT_SETTINGS and ``kw`` set on it."""
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["ANTSettings"]
    out = node.execute(**(widget_defaults(node) | FAST_ANT_SETTINGS | kw))
    return (out.result if hasattr(out, "result") else out)[0]


def ant_prompt_nodes(**kw) -> dict:
    """The erase node (id 2) and its ANT Settings node (id 20) of an API prompt, model and CLIP from node 1."""
    import nodes as comfy_nodes

    settings = comfy_nodes.NODE_CLASS_MAPPINGS["ANTSettings"]
    erase = comfy_nodes.NODE_CLASS_MAPPINGS["EraseConceptANTv2"]
    return {"2": {"class_type": "EraseConceptANTv2",
                  "inputs": widget_defaults(erase) | {"model": ["1", 0], "clip": ["1", 1], "settings": ["20", 0]}
                  | FAST_ANT | kw},
            "20": {"class_type": "ANTSettings", "inputs": widget_defaults(settings) | FAST_ANT_SETTINGS}}


def test_pack_registers_every_node(comfy):
    mapping = comfy["nodes"].NODE_CLASS_MAPPINGS
    for n in PACK_NODES:
        assert n in mapping, f"{n} not registered"


def _unet_out(model, seed: int = 0) -> torch.Tensor:
    import comfy.model_management

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    config = model.model.model_config.unet_config
    dtype = model.model.get_dtype()
    ctx = torch.randn(1, 77, config["context_dim"], generator=g)
    adm = config.get("adm_in_channels")  # SDXL: pooled text + size vector
    y = torch.randn(1, adm, generator=g).to(dtype) if adm else None
    with torch.inference_mode():
        dm = model.model.diffusion_model
        return dm(x.to(dtype), timesteps=torch.tensor([500.0]), context=ctx.to(dtype), y=y).float().clone()


def _ant(comfy, model, clip, **kw):
    """Erase Concept (ANT) with FAST settings; keywords of the ANT Settings node go to it. MODEL and LORA."""
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["EraseConceptANTv2"]
    mine = {k: kw.pop(k) for k in list(kw) if k in FAST_ANT or k in ("kind", "preset", "cache_result")}
    with torch.inference_mode():  # as inside a prompt
        out = node.execute(model=model, clip=clip, **(FAST_ANT | mine), settings=ant_settings(comfy, **kw))
    return (out.result if hasattr(out, "result") else out)[:2]


def test_ant_node_patches_a_clone_and_the_lora_loads_in_the_stock_loader(comfy, loaded):
    model, clip, _ = loaded
    before = _unet_out(model)
    erased, lora = _ant(comfy, model, clip)
    assert erased is not model
    assert torch.equal(_unet_out(model), before), "the input MODEL changed"
    edited = _unet_out(erased)
    # outside the band the loaders are compared in below: a loader that ignored the LoRA would fail them
    assert not torch.allclose(edited, before, atol=1e-4, rtol=1e-3), "the erasure did nothing"
    # save with our node, load with ComfyUI's stock LoraLoader: same UNet output as the node's MODEL
    nodes = comfy["nodes"]
    nodes.NODE_CLASS_MAPPINGS["SaveErasureLoRA"].execute(lora=lora, filename="ant-cat", overwrite=True)
    import folder_paths

    assert "ant-cat.safetensors" in folder_paths.get_filename_list("loras")
    # an existing file is not replaced without overwrite, and is left as it was
    path = folder_paths.get_full_path("loras", "ant-cat.safetensors")
    saved = open(path, "rb").read()
    with pytest.raises(ValueError, match="already exists in models/loras: choose another name or switch on overwrite"):
        nodes.NODE_CLASS_MAPPINGS["SaveErasureLoRA"].execute(lora=lora, filename="ant-cat", overwrite=False)
    assert open(path, "rb").read() == saved
    with torch.inference_mode():
        stock, _ = nodes.LoraLoader().load_lora(model, clip, "ant-cat.safetensors", 1.0, 0.0)
    assert torch.allclose(_unet_out(stock), edited, atol=1e-4, rtol=1e-3)
    # ComfyUI's own LORA_MODEL socket (LoraModelLoader) accepts the node's LoRA output directly
    with torch.inference_mode():
        via_socket = nodes.NODE_CLASS_MAPPINGS["LoraModelLoader"].execute(model, lora, 1.0)
    via_socket = via_socket.result[0] if hasattr(via_socket, "result") else via_socket[0]
    assert torch.allclose(_unet_out(via_socket), edited, atol=1e-4, rtol=1e-3)
    # our Apply node on the file, and Load Erasure LoRA keeps the metadata
    with torch.inference_mode():
        applied = nodes.NODE_CLASS_MAPPINGS["ApplyErasedModel"].execute(model, 1.0, None, "ant-cat.safetensors")
        back = nodes.NODE_CLASS_MAPPINGS["LoadErasureLoRA"].execute("ant-cat.safetensors")
    applied = applied.result[0] if hasattr(applied, "result") else applied[0]
    back = back.result[0] if hasattr(back, "result") else back[0]
    assert torch.allclose(_unet_out(applied), edited, atol=1e-4, rtol=1e-3)
    assert back.metadata["erasure.method"] == "ant" and "cat" in back.metadata["erasure.concepts"]
    assert torch.equal(_unet_out(model), before)


def test_workflow_executes_in_the_real_executor_with_progress(comfy, tiny_ckpt):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_ckpt}},
        **ant_prompt_nodes(),
        "3": {"class_type": "SaveErasureLoRA", "inputs": {"lora": ["2", 1], "filename": "wf-cat", "overwrite": True}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "seed": 0, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    ex, server = run_prompt(prompt)
    assert ex.success, ex.status_messages
    steps = [(d["value"], d["max"]) for e, d in server.events if e == "progress" and d["node"] == "2"]
    assert steps and steps[-1][0] == steps[-1][1] >= FAST_ANT["steps"], \
        f"no step-by-step progress from the erasure node reached the client: {steps}"


def test_cancel_stops_training_and_leaves_the_model_untouched(comfy, loaded):
    import time

    import comfy.model_management as mm

    model, clip, _ = loaded
    before = _unet_out(model)
    fired: list[float] = []

    def cancel() -> None:
        fired.append(time.monotonic())
        mm.interrupt_current_processing(True)

    for delay in (0.3, 3.0):  # during the trajectories/saliency phase, and during training
        timer = threading.Timer(delay, cancel)
        timer.start()
        try:
            with pytest.raises(mm.InterruptProcessingException):
                _ant(comfy, model, clip, steps=100000, trajectories=8, trajectory_steps=50)
            stopped = time.monotonic()
        finally:
            timer.cancel()
            mm.interrupt_current_processing(False)
        assert stopped - fired[-1] < 1.0, f"Cancel took {stopped - fired[-1]:.2f} s"
    assert torch.equal(_unet_out(model), before)


def test_rerun_with_unchanged_inputs_does_not_retrain(comfy, tiny_ckpt):
    import execution

    from .conftest import _install_progress_hook

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_ckpt}},
        **ant_prompt_nodes(),
        "3": {"class_type": "SaveErasureLoRA", "inputs": {"lora": ["2", 1], "filename": "cached", "overwrite": True}},
    }
    server = StubServer()
    _install_progress_hook(server)
    ex = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
    for run in range(2):
        n_before = len(server.events)
        ex.execute(prompt, f"p{run}", {"client_id": None}, ["3"])
        assert ex.success
        trained = [d for e, d in server.events[n_before:] if e == "progress" and d["node"] == "2"]
        assert bool(trained) == (run == 0), f"run {run}: {len(trained)} progress events from the erasure node"


def test_unsupported_and_bad_inputs_get_clear_messages(comfy, loaded):
    model, clip, _ = loaded
    with pytest.raises(ValueError, match="empty"):
        _ant(comfy, model, clip, concept="   ")
    with pytest.raises(ValueError, match="CLIP"):
        _ant(comfy, model, None)
    with pytest.raises(ValueError, match="Set protect to 0 for adversarial erasure"):  # the default protect is on
        _ant(comfy, model, clip, scope="kv", adversarial=1)
    import copy

    fake = copy.copy(model)
    fake.model = type("Flux", (), {"model_config": object(), "model_type": None})()
    with pytest.raises(ValueError, match="SD1.x, SD2.x"):
        _ant(comfy, fake, clip)


def _out(result, i=0):
    return (result.result if hasattr(result, "result") else result)[i]


def test_batched_text_encoding_equals_one_prompt_at_a_time(comfy, loaded):
    import sys

    model, clip, _ = loaded
    mod = sys.modules[comfy["nodes"].NODE_CLASS_MAPPINGS["EraseConceptANTv2"].__module__]
    bb = mod.ComfyBackbone(model, clip)
    prompts = ["a cat", "a photo of a dog in a park", ""]
    together = bb.encode_text(prompts).embeds
    alone = torch.cat([mod.ComfyBackbone(model, clip).encode_text([p]).embeds for p in prompts])  # no shared cache
    assert together.shape == (3, 77, 768)
    assert torch.allclose(together, alone, atol=1e-5)
    calls = []
    real = clip.encode_from_tokens
    clip.encode_from_tokens = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        again = bb.encode_text(["", "a cat", "a cat"]).embeds  # remembered: the encoder is not run again
        fresh = bb.encode_text(["a house", "a cat"]).embeds
    finally:
        del clip.encode_from_tokens
    assert calls == [1], f"{len(calls)} encoder runs for one new prompt"
    assert torch.equal(again, together[[2, 0, 0]]) and torch.equal(fresh[1], together[0])


def test_mace_and_fuse_nodes_mix_ant_and_mace_loras(comfy, loaded, tmp_path, monkeypatch):
    import sys

    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    nodes = comfy["nodes"].NODE_CLASS_MAPPINGS
    # the prior set is 1,200 prompts through the full CLIP-L: too slow for a CPU test; a few stand in
    mod = sys.modules[nodes["MassEraseMACEv2"].__module__]
    monkeypatch.setattr(mod, "prior_prompts", lambda exclude=(), **kw: ["a house", "a tree", "a man", "a car"])
    model, clip, _ = loaded
    before = _unet_out(model)
    with torch.inference_mode():
        mace_model, mace_lora = (_out(r, 0), _out(r, 1)) if (r := nodes["MassEraseMACE"].execute(
            model=model, clip=clip, concepts="cat\ndog", preset="object", lora_steps=2, resolution=64, seed=0)) else ()
    assert mace_lora.metadata["erasure.method"] == "mace"
    assert not torch.allclose(_unet_out(mace_model), before)
    _, ant_lora = _ant(comfy, model, clip, concept="bird", synonyms="", scope="lora")
    with torch.inference_mode():
        r = nodes["FuseErasureLoRAs"].execute(model=model, clip=clip, lora_1=mace_lora, lora_2=ant_lora, preserve=1.0)
    fused_model, fused = _out(r, 0), _out(r, 1)
    assert set(__import__("json").loads(fused.metadata["erasure.concepts"])) == {"cat", "dog", "bird"}
    assert not torch.allclose(_unet_out(fused_model), before)
    assert torch.equal(_unet_out(model), before)


def test_preview_grid_pairs_original_and_erased_rows(comfy, loaded):
    nodes = comfy["nodes"].NODE_CLASS_MAPPINGS
    model, clip, vae = loaded
    erased, _ = _ant(comfy, model, clip)
    with torch.inference_mode():
        grid = _out(nodes["PreviewErasure"].execute(model, erased, clip, vae, "a cat", "a dog\na house", 2, 2, 5.0,
                                                    64, 0))
        again = _out(nodes["PreviewErasure"].execute(model, model, clip, vae, "a cat", "", 2, 2, 5.0, 64, 0))
    assert grid.shape == (1, 6 * 64, 2 * 64, 3)
    assert float(grid.min()) >= 0 and float(grid.max()) <= 1
    assert torch.equal(again[:, :64], again[:, 64:128]), "same model, same seeds: rows must match"
    assert not torch.equal(grid[:, :64], grid[:, 64:128]), ("the erased row equals the original",
                                                            float(grid.mean()), float(grid.std()),
                                                            float((grid[:, :64] - grid[:, 64:128]).abs().max()))


def test_ant_reuse_and_checkpointing_widgets_reach_the_settings(comfy, loaded):
    """The two newest ANT widgets: absent (old workflows) = the library's defaults; set = recorded and used."""
    import json

    from erasure.ant import AntSettings

    model, clip, _ = loaded
    _, default = _ant(comfy, model, clip)
    # reuse 1 regenerates at the second of the 2 steps; the default (8) trains it on the first step's trajectory
    _, set_ = _ant(comfy, model, clip, reuse=1, gradient_checkpointing="on")
    d = json.loads(default.metadata["erasure.settings"])
    s = json.loads(set_.metadata["erasure.settings"])
    assert AntSettings().reuse > 1
    assert (d["reuse"], d["gradient_checkpointing"]) == (AntSettings().reuse, "auto")
    assert (s["reuse"], s["gradient_checkpointing"]) == (1, "on")
    assert any(not torch.equal(default[k], set_[k]) for k in default), "reuse 1 trained the same as the default"


def test_ant_node_protect_projects_the_edit_through_comfys_clip(comfy, loaded):
    """The ANT Settings node's protect widget: the unrelated prompts' token Gram comes from ComfyUI's CLIP, the edit
    differs from the unprotected one and the file records the setting; the input MODEL is left as it was."""
    import json

    model, clip, _ = loaded
    before = _unet_out(model)
    _, plain = _ant(comfy, model, clip, scope="kv", protect=0.0)
    _, kept = _ant(comfy, model, clip, scope="kv", protect=0.99)
    assert json.loads(kept.metadata["erasure.settings"])["protect"] == pytest.approx(0.99)
    assert any(not torch.equal(plain[k], kept[k]) for k in plain), "protect trained the same as without it"
    assert torch.equal(_unet_out(model), before), "the input MODEL changed"


def test_ant_node_calibrate_scales_the_edit_through_comfys_clip(comfy, loaded):
    """The ANT Settings node's calibrate widget: the erasure report runs through ComfyUI's model and CLIP after
    training, the LoRA is the plain one times the strength it chose (recorded in the file); the input MODEL is left
    as it was."""
    import json

    model, clip, _ = loaded
    before = _unet_out(model)
    _, plain = _ant(comfy, model, clip, scope="kv")
    _, cal = _ant(comfy, model, clip, scope="kv", calibrate=True)
    assert json.loads(cal.metadata["erasure.settings"])["calibrate"] is True
    info = json.loads(cal.metadata["erasure.calibration"])
    assert info["history"][0][0] == 1.0 and 1.0 <= info["strength"] <= 2.0 and info["unet_evaluations"] > 0, info
    assert plain.keys() == cal.keys()
    for k in (k for k in plain if k.endswith(".lora_down.weight")):  # each layer's up @ down, times the strength
        base = k[: -len(".lora_down.weight")]
        product = {n: (f[base + ".lora_up.weight"].flatten(1).double() @ f[k].flatten(1).double())
                   for n, f in (("plain", plain), ("cal", cal))}
        torch.testing.assert_close(product["cal"], info["strength"] * product["plain"], rtol=1e-4, atol=1e-9)
    if info["strength"] == 1.0:  # an edit already there is left bit-identical
        assert all(torch.equal(plain[k], cal[k]) for k in plain)
    assert torch.equal(_unet_out(model), before), "the input MODEL changed"


def test_ant_node_with_adversarial_erasure_learns_a_token_through_comfys_clip(comfy, loaded):
    """The ANT Settings node's adversarial widget: the attack's token is learned through ComfyUI's (inference-mode)
    text encoder inside training; the result differs from the plain erasure, records the attack's rounds, and the
    input MODEL and CLIP are left as they were."""
    import json

    model, clip, _ = loaded

    def text() -> torch.Tensor:
        with torch.inference_mode():
            return clip.encode_from_tokens(clip.tokenize("a photo of a cat")).clone()

    before, before_text = _unet_out(model), text()
    _, plain = _ant(comfy, model, clip)
    _, adv = _ant(comfy, model, clip, adversarial=1)
    assert json.loads(adv.metadata["erasure.settings"])["adversarial"] == 1
    record = json.loads(adv.metadata["erasure.adversarial"])
    assert record["rounds"] >= 1 and record["history"][0]["token_moved"] > 0, record  # gradients reached the token
    assert any(not torch.equal(plain[k], adv[k]) for k in plain), "adversarial trained the same as plain"
    assert torch.equal(_unet_out(model), before), "the input MODEL changed"
    assert torch.equal(text(), before_text), "the CLIP changed"
