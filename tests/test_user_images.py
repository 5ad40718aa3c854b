"""MACE with the user's own images and masks (``--image-dir``): the layout, the encoding, and that the masks from
the files are the masks the attention loss is computed under."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import erasure.mace as mace_mod
from erasure.mace import ConceptData, MaceSettings, train_lora
from erasure.prompts import Concept
from erasure.user_images import find_user_images, load_user_data


def _png(path, size=(40, 32), value=None, seed=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if value is None:
        arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    else:
        arr = value
    Image.fromarray(arr, mode if arr.ndim == 3 else "L").save(path)
    return path


def _left_half_mask(size=(40, 32)):
    w, h = size
    m = np.zeros((h, w), dtype=np.uint8)
    m[:, : w // 2] = 255  # white = concept; the centre crop keeps columns 4..35, so 4..19 are white
    return m


def test_layout_is_read_per_concept(tmp_path):
    _png(tmp_path / "Circle" / "a.png")
    _png(tmp_path / "Circle" / "a.mask.png", value=_left_half_mask())
    _png(tmp_path / "Circle" / "b.jpg")
    (tmp_path / "Circle" / "notes.txt").write_text("ignored")
    found = find_user_images(tmp_path, ["circle", "red"])
    assert list(found) == ["circle"]  # letter case ignored; "red" has no folder: generated as usual
    assert [(i.name, m.name if m else None) for i, m in found["circle"]] == [("a.png", "a.mask.png"), ("b.jpg", None)]


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: None, "is not a folder"),
    (lambda d: _png(d / "x.png"), "holds images directly"),
    (lambda d: _png(d / "squares" / "x.png"), "matches no concept"),
    (lambda d: _png(d / "circle" / "x.mask.png"), "has no image beside it"),
    (lambda d: (_png(d / "circle" / "x.png"), _png(d / "circle" / "x.jpg")), "two images named 'x'"),
    (lambda d: (d / "circle").mkdir(parents=True), "has no images"),
    (lambda d: d.mkdir(), "has no concept folders"),
])
def test_bad_layouts_get_clear_messages(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(ValueError, match=message):
        find_user_images(root, ["circle"])


def test_pixels_and_masks_at_the_model_resolution(tiny_backbone, tmp_path):
    # tiny_backbone: a pixel-space model at 16 px, so the latents are the resized pixels themselves
    _png(tmp_path / "circle" / "a.png", value=np.full((32, 40, 3), 255, dtype=np.uint8))
    _png(tmp_path / "circle" / "a.mask.png", value=_left_half_mask())
    _png(tmp_path / "circle" / "b.png", value=np.zeros((16, 16, 3), dtype=np.uint8))
    data = load_user_data(tiny_backbone, tmp_path, ["circle"])
    latents, masks = data["circle"]
    assert latents.shape == (2, 3, 16, 16) and masks.shape == (2, 16, 16)
    torch.testing.assert_close(latents[0], torch.ones(3, 16, 16))
    torch.testing.assert_close(latents[1], -torch.ones(3, 16, 16))
    # 32 px crop -> 16 cells of 2 px; white columns 4..19 of the original are cells 0..7 of the crop
    assert masks[0, :, :8].eq(1).all() and masks[0, :, 8:].eq(0).all()
    assert masks[1].eq(1).all()  # no mask file: the whole image


def test_mask_errors(tiny_backbone, tmp_path):
    _png(tmp_path / "circle" / "a.png")
    _png(tmp_path / "circle" / "a.mask.png", value=np.zeros((32, 40), dtype=np.uint8))
    with pytest.raises(ValueError, match="every mask of 'circle' is black"):
        load_user_data(tiny_backbone, tmp_path, ["circle"])
    _png(tmp_path / "circle" / "a.mask.png", value=np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="a mask must have its image's size"):
        load_user_data(tiny_backbone, tmp_path, ["circle"])
    (tmp_path / "circle" / "a.mask.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="could not read"):
        load_user_data(tiny_backbone, tmp_path, ["circle"])


def test_latent_models_encode_with_their_vae(tmp_path):
    from ldm_export import tiny_model

    from erasure.diffusers_backbone import DiffusersBackbone

    ref, _ = tiny_model("sd1")
    ref.unet().register_to_config(sample_size=4)  # 32 px with the tiny VAE's 8x downsampling
    _png(tmp_path / "cat" / "a.png", size=(48, 32))
    latents, masks = load_user_data(ref, tmp_path, ["cat"])["cat"]
    assert latents.shape == (1, 4, 4, 4) and masks.shape == (1, 4, 4)
    img = np.asarray(Image.open(tmp_path / "cat" / "a.png").convert("RGB").crop((8, 0, 40, 32)), dtype=np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        want = ref.vae.encode(x).latent_dist.mean * ref.vae.config.scaling_factor
    torch.testing.assert_close(latents, want, rtol=0, atol=1e-5)
    no_vae = DiffusersBackbone(ref.unet(), ref.text_encoders, ref.tokenizers, ref.schedule.alphas_cumprod,
                               latent_scale=8)
    with pytest.raises(ValueError, match="needs the model's VAE"):
        load_user_data(no_vae, tmp_path, ["cat"])
    folder_without_vae = DiffusersBackbone(ref.unet(), ref.text_encoders, ref.tokenizers, ref.schedule.alphas_cumprod)
    with pytest.raises(ValueError, match="4-channel latents but no VAE"):
        load_user_data(folder_without_vae, tmp_path, ["cat"])


def _data(backbone, masks: torch.Tensor) -> ConceptData:
    c = Concept("circle", "shape", templates=("a {c}",), data_prompt="a photo of a {c}")
    g = torch.Generator().manual_seed(0)
    return ConceptData(c, c.generation_prompt(), torch.rand(len(masks), 3, 16, 16, generator=g) * 2 - 1, masks)


def test_a_zero_mask_trains_nothing(tiny_backbone):
    s = MaceSettings(lora_steps=4, lora_lr=1e-2)
    res = train_lora(tiny_backbone, _data(tiny_backbone, torch.zeros(1, 16, 16)), None, s)
    assert res.losses == [0.0] * 4
    assert all(float(d.matrix().abs().max()) == 0 for d in res.weights.deltas.values())
    res = train_lora(tiny_backbone, _data(tiny_backbone, torch.ones(1, 16, 16)), None, s)
    assert min(res.losses) > 0 and any(float(d.matrix().abs().max()) > 0 for d in res.weights.deltas.values())


def test_cli_masks_reach_the_attention_loss(tmp_path, monkeypatch, capsys):
    """``python -m erasure mace --model lab --image-dir``: the loss sees exactly the masks of the files."""
    from erasure.cli import main

    seen: list[torch.Tensor] = []

    class Recording(mace_mod.AttentionLoss):
        def __init__(self, positions, masks, *args, **kwargs) -> None:
            super().__init__(positions, masks, *args, **kwargs)
            if torch.is_grad_enabled():  # training steps; the stalled-LoRA probe runs without grad
                seen.append(masks.clone())

    monkeypatch.setattr(mace_mod, "AttentionLoss", Recording)
    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    _png(data / "circle" / "one.png", size=(32, 32), seed=1)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 4:12] = 255
    _png(data / "circle" / "one.mask.png", value=mask)
    out = tmp_path / "mace.safetensors"
    rc = main(["mace", "--model", "lab", "--concepts", "circle", "--image-dir", str(data), "--steps", "3",
               "--target", "0", "--out", str(out)])
    assert rc == 0 and out.exists()
    assert "1 images from" in capsys.readouterr().out
    want = torch.from_numpy(mask >= 128).float()  # the lab model is 32 px, pixel space: the mask as drawn
    assert len(seen) == 3 and all(torch.equal(m, want[None]) for m in seen)
