"""Mass Erase (MACE) with the user's own images and masks: a LATENT batch from VAE Encode, MASKs, image_concepts."""

from __future__ import annotations

import sys

import pytest
import torch

from .test_pack import _out, _unet_out

#: the new node with a MACE Settings node's output (changed values, resolution) connected
#: (one round of LoRA steps: the tests below count them; the rounds rule has its own test at the end)
FAST_MACE = {"preset": "object", "seed": 0, "settings": {"settings": {"lora_steps": 3, "lora_target": 0.0},
                                                         "resolution": 64}}


@pytest.fixture
def mace_env(comfy, loaded, tmp_path, monkeypatch):
    """The MACE node's module with a short prior set, and a record of what reaches stage 1 and the attention loss."""
    node = comfy["nodes"].NODE_CLASS_MAPPINGS["MassEraseMACEv2"]
    mod = sys.modules[node.__module__]
    library = sys.modules[mod.mace.__module__]
    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    monkeypatch.setattr(mod, "prior_prompts", lambda exclude=(), **kw: ["a house", "a tree", "a man", "a car"])
    seen = {"masks": [], "sampled": []}

    class RecordingLoss(library.AttentionLoss):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            if torch.is_grad_enabled():  # training steps; the stalled-LoRA probe runs without grad
                seen["masks"].append(self.masks.detach().clone())

    real_sample = library.sample

    def recording_sample(backbone, prompts, *a, **kw):
        seen["sampled"].append(list(prompts))
        return real_sample(backbone, prompts, *a, **kw)

    monkeypatch.setattr(library, "AttentionLoss", RecordingLoss)
    monkeypatch.setattr(library, "sample", recording_sample)
    return node, seen


def _images(vae, n: int, size: int = 64, seed: int = 0) -> dict:
    """A LATENT as VAE Encode makes it from an IMAGE batch ``[n, size, size, 3]``."""
    import nodes

    pixels = torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return nodes.VAEEncode().encode(vae, pixels)[0]


def _run(node, model, clip, concepts: str, **kw):
    with torch.inference_mode():  # as inside a prompt
        r = node.execute(model=model, clip=clip, concepts=concepts, **(FAST_MACE | kw))
    return _out(r, 0), _out(r, 1)


def test_user_masks_reach_training_and_change_the_result(comfy, loaded, mace_env):
    node, seen = mace_env
    model, clip, vae = loaded
    before = _unet_out(model)
    latents = _images(vae, 2)
    full = torch.ones(2, 64, 64)
    corner = torch.zeros(2, 64, 64)
    corner[:, :32, :32] = 1.0  # the top-left quarter of each image
    erased, lora_full = _run(node, model, clip, "cat", latents=latents, masks=full)
    assert seen["sampled"] == [], "stage 1 generated images although the user gave them"
    assert len(seen["masks"]) == FAST_MACE["settings"]["settings"]["lora_steps"]
    assert all(torch.equal(m, torch.ones(1, 8, 8)) for m in seen["masks"])
    seen["masks"].clear()
    _, lora_corner = _run(node, model, clip, "cat", latents=latents, masks=corner)
    expected = torch.zeros(1, 8, 8)
    expected[:, :4, :4] = 1.0  # the pixel mask at the latents' size
    assert all(torch.equal(m, expected) for m in seen["masks"])
    assert lora_full.keys() == lora_corner.keys()
    assert any(not torch.equal(lora_full[k], lora_corner[k]) for k in lora_full), "the masks changed nothing"
    assert not torch.allclose(_unet_out(erased), before), "the erasure did nothing"
    assert torch.equal(_unet_out(model), before), "the input MODEL changed"


def test_image_concepts_pick_the_concept_and_a_latent_noise_mask_is_used(comfy, loaded, mace_env):
    import nodes

    node, seen = mace_env
    model, clip, vae = loaded
    mask = torch.zeros(1, 64, 64)
    mask[:, 32:, :] = 1.0  # the bottom half, one mask for both images (Set Latent Noise Mask broadcasts it)
    with torch.inference_mode():
        latents = nodes.SetLatentNoiseMask().set_mask(_images(vae, 2), mask)[0]
    _run(node, model, clip, "cat\ndog", latents=latents, image_concepts="2, 2")
    assert seen["sampled"] == [["a photo of the cat"]], "only the concept without images is generated"
    # both concepts' latents are 8x8, so their LoRAs train together (automatic concept batch), cat's sample first
    assert seen["masks"][0].shape == (2, 8, 8)
    cat, dog = seen["masks"][0][:1], seen["masks"][0][1:]
    expected = torch.zeros(1, 8, 8)
    expected[:, 4:, :] = 1.0
    assert torch.equal(dog, expected)
    assert cat.shape == (1, 8, 8) and not torch.equal(cat, expected)  # from the model's own attention


@pytest.mark.parametrize(("concepts", "kw", "message"), [
    ("cat", {"masks": torch.ones(3, 64, 64)}, "3 masks for 2 images"),
    ("cat", {"masks": torch.zeros(1, 64, 64) + 1, "size": 128}, "masks are 64x64 pixels but the images are 128x128"),
    ("cat", {"masks": torch.zeros(2, 64, 64)}, "mask 1 is empty"),
    ("cat\ndog\nbird", {}, "2 images for 3 concepts"),
    ("cat\ndog", {"image_concepts": "1,3"}, "numbers go from 1 to 2"),
    ("cat\ndog", {"image_concepts": "1"}, "1 numbers for 2 images"),
    ("cat\ndog", {"image_concepts": "cat,dog"}, "one concept number per image"),
    ("cat", {"latents": None, "masks": torch.ones(1, 64, 64)}, "masks are connected but no images"),
    ("cat", {"channels": 16}, "16 channels, this model's have 4"),
])
def test_bad_image_batches_get_clear_messages(comfy, loaded, mace_env, concepts, kw, message):
    node, seen = mace_env
    model, clip, vae = loaded
    kw = dict(kw)
    latents = _images(vae, 2, kw.pop("size", 64))
    if "channels" in kw:
        latents = {"samples": torch.zeros(2, kw.pop("channels"), 8, 8)}
    kw.setdefault("latents", latents)
    with pytest.raises(ValueError, match=message):
        _run(node, model, clip, concepts, **kw)
    assert seen["sampled"] == [] and seen["masks"] == [], "the node did work before refusing the input"


def test_images_with_a_vae_equal_their_latents(comfy, loaded, mace_env):
    """The IMAGE + VAE inputs give exactly what VAE Encode's LATENT gives; bad combinations are refused."""
    node, _ = mace_env
    model, clip, vae = loaded
    pixels = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    _, from_latents = _run(node, model, clip, "cat", latents=_images(vae, 2))
    _, from_images = _run(node, model, clip, "cat", images=pixels, vae=vae)
    assert from_latents.keys() == from_images.keys()
    assert all(torch.equal(from_latents[k], from_images[k]) for k in from_latents)
    with pytest.raises(ValueError, match="no vae"):
        _run(node, model, clip, "cat", images=pixels)
    with pytest.raises(ValueError, match="connect one of them"):
        _run(node, model, clip, "cat", images=pixels, vae=vae, latents=_images(vae, 2))


def test_lora_lr_from_the_settings_node_and_the_preset_otherwise(comfy, loaded, mace_env):
    """The learning rate the stalled-LoRA warning points to, set on a MACE Settings node; left at its default, the
    preset's (person: the reference's 1e-4)."""
    import json

    node, _ = mace_env
    model, clip, _ = loaded
    settings = comfy["nodes"].NODE_CLASS_MAPPINGS["MACESettings"]
    from .test_pack import widget_defaults

    def with_settings(**kw):
        out = settings.execute(**(widget_defaults(settings) | {"lora_steps": 3, "resolution": "64"} | kw))
        return _out(out, 0)

    _, preset = _run(node, model, clip, "cat", preset="person", settings=with_settings())
    _, raised = _run(node, model, clip, "cat", preset="person", settings=with_settings(lora_lr=1e-3))
    assert json.loads(preset.metadata["erasure.settings"])["lora_lr"] == 1e-4  # the person preset's (reference)
    assert json.loads(raised.metadata["erasure.settings"])["lora_lr"] == 1e-3
    assert any(not torch.equal(preset[k], raised[k]) for k in preset), "the learning rate changed nothing"


def test_concepts_trained_together_in_comfyui_equal_one_at_a_time(comfy, loaded, mace_env):
    """Issue 20, item 6: the node trains several concepts in one UNet batch (ComfyUI's own attention layers, each
    sample through its concept's LoRA) with the result of one at a time."""
    node, seen = mace_env
    model, clip, _ = loaded

    def settings(batch: int) -> dict:
        return {"settings": {"lora_steps": 3, "concept_batch": batch, "lora_target": 0.0}, "resolution": 64}

    _, alone = _run(node, model, clip, "cat\ndog", settings=settings(1))
    assert [m.shape[0] for m in seen["masks"]] == [1] * 6 and seen["sampled"] == [["a photo of the cat"],
                                                                                  ["a photo of the dog"]]
    seen["masks"].clear()
    seen["sampled"].clear()
    _, together = _run(node, model, clip, "cat\ndog", settings=settings(2))
    assert [m.shape[0] for m in seen["masks"]] == [2] * 3, "the two concepts did not share the LoRA steps"
    assert seen["sampled"] == [["a photo of the cat", "a photo of the dog"]], "their images were not made together"
    assert alone.keys() == together.keys()
    for k in alone:
        scale = float(alone[k].abs().max())
        assert float((alone[k] - together[k]).abs().max()) <= 1e-3 * scale + 1e-7, k


def test_the_lora_rounds_rule_runs_in_comfyui_and_its_schedule_reaches_the_lora(comfy, loaded, mace_env):
    """Issue 18, item 2, through the node: MACE Settings' lora_target and lora_max_rounds reach the LoRA stage, a
    stalled concept (a rate far too low to move anything) trains its rounds at raised rates, and what it did is in
    the exported LoRA's metadata."""
    node, seen = mace_env
    model, clip, _ = loaded
    settings = comfy["nodes"].NODE_CLASS_MAPPINGS["MACESettings"]
    import json

    from .test_pack import widget_defaults

    values = widget_defaults(settings) | {"lora_steps": 2, "lora_lr": 1e-7, "lora_target": 0.1,
                                          "lora_max_rounds": 3, "resolution": "64"}
    _, lora = _run(node, model, clip, "cat", settings=_out(settings.execute(**values), 0))
    schedule = json.loads(lora.metadata["erasure.lora_schedule"])["cat"]
    assert schedule["steps"] == 6 and schedule["target_reached"] is False
    assert schedule["lr"] == pytest.approx(1e-7 * 10 ** 0.5 * 10 ** 0.5)
    assert len(seen["masks"]) == 6  # three rounds of two steps


def test_protect_from_the_settings_node_projects_the_result_through_comfys_clip(comfy, loaded, mace_env):
    """MACE Settings' protect: on by default (0.999), with the prior prompts' Gram from ComfyUI's CLIP; 0 gives the
    reference's unprojected result; the file records which."""
    import json

    node, _ = mace_env
    model, clip, _ = loaded
    settings = comfy["nodes"].NODE_CLASS_MAPPINGS["MACESettings"]
    from .test_pack import widget_defaults

    def run(**kw):
        values = widget_defaults(settings) | {"lora_steps": 2, "lora_target": 0.0, "resolution": "64"} | kw
        return _run(node, model, clip, "cat", settings=_out(settings.execute(**values), 0))[1]

    kept, plain = run(), run(protect=0.0)
    assert kept.metadata["erasure.protect_used"] == "true" and plain.metadata["erasure.protect_used"] == "false"
    assert json.loads(kept.metadata["erasure.settings"])["protect"] == 0.999
    assert any(not torch.equal(plain[k], kept[k]) for k in plain), "protect changed nothing"
