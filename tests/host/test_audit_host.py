"""The Audit Erasure node in a real ComfyUI, on the tiny SD1.5 checkpoint: it runs, returns a grid and the scores,
puts the learned token into CLIP's token list, and leaves both MODELs (and the CLIP) as they were."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from .conftest import run_prompt
from .test_pack import _out, _unet_out

#: a few steps of everything at 64 px: the mechanics, not a measurement
FAST = {"attack_steps": 3, "seed": 0, "prefix_steps": 2, "seeds": 2, "steps": 2, "cfg": 5.0, "resolution": 64}


def _module(comfy):
    return sys.modules[comfy["nodes"].NODE_CLASS_MAPPINGS["AuditErasure"].__module__]


@pytest.fixture()
def few_images(comfy, monkeypatch):
    """4 + 2 generated images and 2 loss timesteps instead of 16 + 8 and 10 (the node's other defaults kept)."""
    mod = _module(comfy)
    real = mod.AuditSettings
    monkeypatch.setattr(mod, "AuditSettings", lambda: real(generated_images=4, heldout=2, loss_timesteps=2))


@pytest.fixture(scope="module")
def erased(comfy, loaded):
    """The tiny model with a fixed random K/V edit as patches on a clone (what an erase node returns)."""
    mod = _module(comfy)
    cb = sys.modules[mod.ComfyBackbone.__module__]
    weights = sys.modules[mod.AuditSettings.__module__.rsplit(".", 1)[0] + ".weights"]
    model, clip, _ = loaded
    g = torch.Generator().manual_seed(0)
    kv = cb.ComfyBackbone(model, clip).cross_attention_kv()
    deltas = {n: 0.2 * torch.randn(m.weight.shape, generator=g) for n, m in kv.items()}
    return cb.patched_model(model, weights.ErasureWeights.dense(deltas, method="test"))


def _text(clip, prompt: str = "a photo of a cat") -> torch.Tensor:
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(prompt)).clone()


def test_audit_node_returns_a_grid_and_scores_and_leaves_the_models_alone(comfy, loaded, erased, few_images):
    model, clip, vae = loaded
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["AuditErasure"]
    before, before_erased, before_text = _unet_out(model), _unet_out(erased), _text(clip)
    with torch.inference_mode():  # as inside a prompt
        out = node.execute(original=model, erased=erased, clip=clip, vae=vae, concept="cat", **FAST)
    grid, text = _out(out, 0), _out(out, 1)
    assert grid.dim() == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert float(grid.min()) >= 0 and float(grid.max()) <= 1
    assert grid.shape[1] == 4 * 128  # four rows of 64 px images, enlarged twice (the grid's cells are >= 96 px)
    report = json.loads(text.split("\n\n", 1)[1])
    assert report["concept"] == "cat" and "plain_success_rate" not in report  # no classifier outside the lab
    assert report["recoverability"] is None or 0 <= report["recoverability"] <= 1
    assert set(report["losses"]) == {"original_plain", "erased_plain", "erased_learned", "erased_prefix"}
    assert "recoverability" in text.split("\n\n", 1)[0]
    assert torch.equal(_unet_out(model), before), "the original MODEL changed"
    assert torch.equal(_unet_out(erased), before_erased), "the erased MODEL changed"
    assert torch.equal(_text(clip), before_text), "the CLIP changed"


def test_the_learned_token_is_an_embedding_entry_in_clips_token_list(comfy, loaded):
    mod = _module(comfy)
    model, clip, _ = loaded
    with torch.inference_mode():
        bb = mod.ComfyBackbone(model, clip)
        enc = mod.ComfySlotEncoder(bb)
        tokens = enc.tokens("a photo of a {}", enc.word_vectors("cat"))
        plain = clip.tokenize("a photo of a cat")
        assert len(tokens["l"][0]) == len(plain["l"][0]) == 77
        kinds = [torch.is_tensor(t) for t, _ in tokens["l"][0]]
        assert kinds.index(True) == 5 and sum(kinds) == 1
        # the word's own embedding in the slot: the ordinary prompt's encoding
        got = enc.encode(["a photo of a {}"], enc.word_vectors("cat")).embeds
        want = bb.encode_text(["a photo of a cat"]).embeds
    assert torch.allclose(got, want, atol=1e-5)
    vec = [torch.randn(1, 768)]
    with mod.clip_trainable(clip):  # gradients reach the vector through ComfyUI's (inference-mode) CLIP weights
        v = vec[0].clone().requires_grad_(True)
        e = enc.encode(["a photo of a {}"], [v]).embeds
        e.float().sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    diff = (e.detach().float().cpu() - want.float().cpu()).abs().amax(-1)[0]
    assert torch.equal(diff[:5], torch.zeros(5)) and diff[5] > 0


def test_audit_node_takes_images_and_refuses_a_single_one(comfy, loaded, erased):
    model, clip, vae = loaded
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["AuditErasure"]
    images = torch.rand(3, 80, 72, 3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        with pytest.raises(ValueError, match="at least 2 images"):
            node.execute(original=model, erased=erased, clip=clip, vae=vae, concept="cat", images=images[:1], **FAST)
        out = node.execute(original=model, erased=erased, clip=clip, vae=vae, concept="cat", images=images, **FAST)
    report = json.loads(_out(out, 1).split("\n\n", 1)[1])
    assert report["images"] == {"source": "user", "inversion": 2, "heldout": 1}


def test_audit_node_in_the_real_executor_reports_progress(comfy, tiny_ckpt, few_images):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_ckpt}},
        "2": {"class_type": "AuditErasure", "inputs": {"original": ["1", 0], "erased": ["1", 0], "clip": ["1", 1],
                                                       "vae": ["1", 2], "concept": "cat"} | FAST},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    ex, server = run_prompt(prompt)
    assert ex.success, ex.status_messages
    steps = [(d["value"], d["max"]) for e, d in server.events if e == "progress" and d["node"] == "2"]
    assert steps and steps[-1][0] == steps[-1][1], steps


def test_cancel_stops_the_audit_and_leaves_the_models_alone(comfy, loaded, erased):
    import threading
    import time

    import comfy.model_management as mm

    model, clip, vae = loaded
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["AuditErasure"]
    before, before_erased, before_text = _unet_out(model), _unet_out(erased), _text(clip)
    fired: list[float] = []

    def cancel() -> None:
        fired.append(time.monotonic())
        mm.interrupt_current_processing(True)

    images = torch.rand(4, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    timer = threading.Timer(4.0, cancel)  # with images: straight into the inversion (grad through CLIP and UNet)
    timer.start()
    try:
        with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
            node.execute(original=model, erased=erased, clip=clip, vae=vae, concept="cat", images=images,
                         **(FAST | {"attack_steps": 100000}))
        stopped = time.monotonic()
    finally:
        timer.cancel()
        mm.interrupt_current_processing(False)
    assert fired and stopped - fired[-1] < 3.0, f"Cancel took {stopped - fired[-1]:.2f} s"
    assert torch.equal(_unet_out(model), before) and torch.equal(_unet_out(erased), before_erased)
    assert torch.equal(_text(clip), before_text)


@pytest.fixture(scope="module")
def sdxl(comfy):
    from .families import load_tiny

    yield from load_tiny(comfy, "build_tiny_sdxl", "tiny-sdxl.safetensors")


def test_sdxl_learned_token_in_both_token_lists_matches_the_ordinary_prompt(comfy, sdxl):
    mod = _module(comfy)
    model, clip, _ = sdxl
    with torch.inference_mode():
        bb = mod.ComfyBackbone(model, clip)
        enc = mod.ComfySlotEncoder(bb)
        assert sorted(enc.keys) == ["g", "l"] and sorted(enc.widths()) == [768, 1280]
        tokens = enc.tokens("a photo of a {}", enc.word_vectors("cat"))
        assert all(len(tokens[k][0]) == 77 and torch.is_tensor(tokens[k][0][5][0]) for k in ("g", "l"))
        got = enc.encode(["a photo of a {}"], enc.word_vectors("cat"))
        want = bb.encode_text(["a photo of a cat"])
    assert torch.allclose(got.embeds, want.embeds, atol=1e-4)
    assert torch.allclose(got.extras["y"], want.extras["y"], atol=1e-4)  # pooled text + size vector
