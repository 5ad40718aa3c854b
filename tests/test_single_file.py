"""Single-file (ldm-keyed .safetensors) checkpoints: tiny SD1.x / SD2.x / SDXL models round-trip to the same outputs,
and everything else is refused with a message that names what is supported."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from ldm_export import tiny_model, write_checkpoint
from safetensors.torch import save_file

from erasure.errors import UnsupportedModelError
from erasure.single_file import load_single_file

PROMPTS = ["a photo of a cat", "Van Gogh, starry night", ""]


@lru_cache
def _model(family: str):
    return tiny_model(family)


def model(family: str):
    """A cached tiny model and a fresh copy of its ldm state dict (tests may edit the dict)."""
    ref, ldm = _model(family)
    return ref, dict(ldm)


def _same_outputs(ref, bb) -> None:
    with torch.no_grad():
        a, b = ref.encode_text(PROMPTS), bb.encode_text(PROMPTS)
        torch.testing.assert_close(b.embeds, a.embeds, rtol=0, atol=1e-5)
        assert a.extras.keys() == b.extras.keys()
        for k in a.extras:
            torch.testing.assert_close(b.extras[k], a.extras[k], rtol=0, atol=1e-5)
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([5, 400, 990])
        torch.testing.assert_close(bb.predict_noise(x, t, b), ref.predict_noise(x, t, a), rtol=0, atol=1e-5)
        torch.testing.assert_close(bb.decode(x[:1]), ref.decode(x[:1]), rtol=0, atol=1e-5)
    assert bb.fingerprint() == ref.fingerprint()
    assert len(bb.cross_attention_kv()) == len(ref.cross_attention_kv())


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_ldm_file_loads_to_the_same_model(family, tmp_path):
    ref, ldm = model(family)
    path = write_checkpoint(ldm, tmp_path / f"{family}.safetensors")
    loaded = load_single_file(path, prediction="v" if family == "sd2" else None)
    bb = loaded.backbone
    assert loaded.family == family and bb.prediction_type == ref.prediction_type
    assert bb.hidden_layer == ref.hidden_layer and bb.is_sdxl == (family == "sdxl")
    assert [t.pad_token_id for t in bb.tokenizers] == [t.pad_token_id for t in ref.tokenizers]
    assert bb.latent_shape() == ref.latent_shape()  # 512 / 768 / 1024 px by family
    _same_outputs(ref, bb)


def test_sd2_prediction_is_assumed_and_said(tmp_path):
    _, ldm = model("sd2")
    path = write_checkpoint(ldm, tmp_path / "sd2.safetensors")
    loaded = load_single_file(path, with_vae=False)
    assert loaded.prediction == "eps" and "assumed" in loaded.summary() and "--model-prediction v" in loaded.summary()
    assert loaded.backbone.latent_shape() == (4, 64, 64)  # 512 px for an eps SD2.x (2-base)
    ldm["v_pred"] = torch.tensor([])  # what ComfyUI writes into v-prediction checkpoints it saves
    loaded = load_single_file(write_checkpoint(ldm, tmp_path / "sd2v.safetensors"), with_vae=False)
    assert loaded.prediction == "v" and loaded.backbone.prediction_type == "v_prediction"
    assert loaded.backbone.latent_shape() == (4, 96, 96)


def test_half_precision_file_and_no_vae(tmp_path):
    ref, ldm = model("sd1")
    ldm = {k: v for k, v in ldm.items() if not k.startswith("first_stage_model.")}
    loaded = load_single_file(write_checkpoint(ldm, tmp_path / "fp16.safetensors", torch.float16))
    bb = loaded.backbone
    assert bb.dtype == torch.float32 and bb.vae is None and bb.latent_only and not bb.clip_denoised
    assert bb.latent_shape() == (4, 64, 64) and "latents only" in loaded.summary()
    with torch.no_grad():
        c = ref.encode_text(PROMPTS[:1])
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        torch.testing.assert_close(bb.predict_noise(x, t, c), ref.predict_noise(x, t, c), rtol=0, atol=2e-2)
    with pytest.raises(UnsupportedModelError, match="without a VAE"):
        bb.decode(x)


def test_pickle_checkpoints_are_refused_unopened(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    def guarded(file, *a, **kw):
        assert not str(file).endswith(".ckpt"), "the .ckpt file was opened"
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(torch, "load", lambda *a, **kw: pytest.fail("torch.load was called"))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not a pickle")
    for path in (ckpt, tmp_path / "missing.ckpt", tmp_path / "model.pt"):
        with pytest.raises(UnsupportedModelError, match=r"only \.safetensors .* Convert it to \.safetensors"):
            load_single_file(path)


def _tiny_file(tmp_path, keys: list[str]):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


@pytest.mark.parametrize(("keys", "what"), [
    (["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
      "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight"], "Stable Diffusion 3"),
    (["model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"], "Flux"),
    (["double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.linear1.weight"], "Flux"),
    (["model.diffusion_model.input_blocks.1.0.time_stack.0.in_layers.0.weight"], "video"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"], "LoRA"),
    (["input_blocks.0.0.weight", "out.2.weight"], "UNet alone"),
    (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"], "no text encoder"),
    (["encoder.conv_in.weight", "decoder.conv_in.weight"], "no Stable Diffusion UNet"),
])
def test_other_architectures_get_a_clear_message(tmp_path, keys, what):
    with pytest.raises(UnsupportedModelError, match=what) as e:
        load_single_file(_tiny_file(tmp_path, keys))
    assert "SD1.x" not in str(e.value) and "Stable Diffusion 1.x, 2.x" in str(e.value)


def test_inpainting_model_is_refused(tmp_path):
    _, ldm = model("sd1")
    w = ldm["model.diffusion_model.input_blocks.0.0.weight"]
    ldm["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([w, w, w[:, :1]], dim=1)  # 9 channels
    with pytest.raises(UnsupportedModelError, match=r"9 input channels \(an inpainting model\)"):
        load_single_file(write_checkpoint(ldm, tmp_path / "inpaint.safetensors"))


def test_damaged_or_foreign_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}     ")
    with pytest.raises(UnsupportedModelError, match="could not be read as safetensors"):
        load_single_file(bad)
    other = tmp_path / "model.gguf"
    other.write_bytes(b"GGUF")
    with pytest.raises(UnsupportedModelError, match="not a .safetensors file"):
        load_single_file(other)


def test_cli_runs_mace_and_ant_on_a_single_file(tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    from erasure.cli import main
    from erasure.clip_tokenizer import write_clip_tokenizer_files

    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path / "cache"))
    ref, ldm = tiny_model("sd1", attention_first=False)
    ckpt = write_checkpoint(ldm, tmp_path / "tiny-sd15.safetensors")
    tok = tmp_path / "tok"
    write_clip_tokenizer_files(tok)
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 64, 3), dtype=np.uint8)).save(
        tmp_path / "imgs" / "cat" / "x.png")
    out = tmp_path / "mace.safetensors"
    assert main(["mace", "--model", str(ckpt), "--tokenizer", str(tok), "--concepts", "cat", "--image-dir",
                 str(tmp_path / "imgs"), "--steps", "2", "--no-report", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SD1.x single file" in text and f"tokenizer from {tok}" in text and "VAE converted" in text
    from erasure.lora_files import load_lora

    w = load_lora(out)
    assert w.metadata["erasure.base_model"] == ref.fingerprint() and len(w.deltas) == len(ref.cross_attention_kv())
    # the attention loss per LoRA step, drawn beside the LoRA
    assert f"loss curve {tmp_path / 'mace.loss.png'}" in text and (tmp_path / "mace.loss.png").stat().st_size > 0
    out = tmp_path / "ant.safetensors"
    assert main(["ant", "--model", str(ckpt), "--concept", "cat", "--scope", "xattn", "--steps", "2",
                 "--trajectories", "1", "--trajectory-steps", "4", "--early-steps", "1", "--batch-size", "1",
                 "--resolution", "64", "--no-report", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "built-in CLIP BPE" in text and "VAE not loaded" in text and out.exists()
    assert f"loss curve {tmp_path / 'ant.loss.png'}" in text and (tmp_path / "ant.loss.png").stat().st_size > 0
    assert text.count("model: tiny-sd15.safetensors: SD1.x") == 2  # at the start and in the closing summary


def test_cli_flag_errors(tmp_path, capsys):
    from erasure.cli import main

    with pytest.raises(SystemExit, match="--tokenizer applies to single-file checkpoints"):
        main(["ant", "--model", "lab", "--concept", "circle", "--tokenizer", str(tmp_path),
              "--out", "x.safetensors"])
    assert main(["ant", "--model", str(tmp_path / "m.ckpt"), "--concept", "c", "--out", "x.safetensors"]) == 2
    assert "only .safetensors checkpoints are read" in capsys.readouterr().err
    _, ldm = model("sd1")
    ckpt = write_checkpoint(ldm, tmp_path / "m.safetensors")
    assert main(["ant", "--model", str(ckpt), "--tokenizer", str(tmp_path), "--concept", "c",
                 "--out", "x.safetensors"]) == 2
    assert "vocab.json and merges.txt not found" in capsys.readouterr().err


def test_older_sd1_key_forms_and_position_ids(tmp_path):
    """Files written before transformers moved CLIP under ``text_model.``, and files that keep ``position_ids``."""
    ref, ldm = model("sd1")
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in ldm.items()}
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    old["cond_stage_model.transformer.text_projection.weight"] = torch.eye(128)  # as ComfyUI saves SD1.x files
    bb = load_single_file(write_checkpoint(old, tmp_path / "old.safetensors")).backbone
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_text(PROMPTS).embeds, ref.encode_text(PROMPTS).embeds, rtol=0, atol=1e-5)


def test_sd2_prediction_heuristic_and_zero_snr_schedule():
    from erasure.single_file import _schedule, choose_prediction

    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    shapes = {key: (320,)}
    for std, want in ((0.2, "v"), (0.02, "eps")):
        pred, why = choose_prediction("sd2", shapes, lambda k, s=std: torch.randn(320) * s, None)
        assert pred == want and "guessed" in why
    assert choose_prediction("sd2", shapes, lambda k: torch.randn(320), "eps") == ("eps", "as requested")
    assert choose_prediction("sdxl", {"v_pred": (0,)}, None, None)[0] == "v"
    plain, notes = _schedule({})
    zsnr, znotes = _schedule({"ztsnr": (0,)})
    assert notes == [] and "zero-terminal-SNR" in znotes[0]
    assert 0 < float(zsnr[-1]) < 1e-7 < float(plain[-1]) and abs(float(zsnr[0] - plain[0])) < 1e-3


REAL_UNETS = {  # the released models' diffusers UNet configs
    "sd1": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8),
    "sd2": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True),
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_real_size_layouts_give_the_released_configs(family):
    """The shapes of SD1.5, SD2.1 and SDXL base (built on the meta device: no weights) infer their own configs."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from ldm_export import unet_to_ldm

    from erasure.ldm_layout import unet_config

    with init_empty_weights():
        real = UNet2DConditionModel(**REAL_UNETS[family])
    shapes = {k: tuple(v.shape) for k, v in unet_to_ldm(real).items()}
    shapes["conditioner.embedders.1.model.text_projection"] = (1280, 1280)  # SDXL's pooled width
    cfg = unet_config(shapes, family)
    with init_empty_weights():
        inferred = UNet2DConditionModel(**cfg)
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types",
                "up_block_types", "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim"):
        assert _seq(inferred.config[key]) == _seq(real.config[key]), key
    heads = [m.heads for n, m in inferred.named_modules() if n.endswith("attn2")]
    assert heads == [m.heads for n, m in real.named_modules() if n.endswith("attn2")]
    assert len(heads) == {"sd1": 16, "sd2": 16, "sdxl": 70}[family]
    assert {k: tuple(v.shape) for k, v in inferred.state_dict().items()} == {
        k: tuple(v.shape) for k, v in real.state_dict().items()}


def _seq(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


@pytest.mark.parametrize(("prefix", "width", "layers", "drop_last", "heads"), [
    ("cond_stage_model.model.", 1024, 24, True, 16),  # SD2.x: OpenCLIP ViT-H, conditioned on its 23rd layer
    ("conditioner.embedders.1.model.", 1280, 32, False, 20),  # SDXL: OpenCLIP ViT-bigG
])
def test_real_size_openclip_configs(prefix, width, layers, drop_last, heads):
    from erasure.ldm_layout import openclip_config

    shapes = {f"{prefix}token_embedding.weight": (49408, width), f"{prefix}positional_embedding": (77, width),
              f"{prefix}text_projection": (width, width)}
    for i in range(layers):
        shapes[f"{prefix}transformer.resblocks.{i}.mlp.c_fc.weight"] = (4 * width, width)
    cfg = openclip_config(shapes, prefix, drop_last, 0, with_projection=not drop_last)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        width, layers - drop_last, heads, 4 * width)
    assert cfg.hidden_act == "gelu" and cfg.max_position_embeddings == 77 and cfg.pad_token_id == 0
