"""The diffusers adapter on tiny SD1.x / SD2.x (v-prediction) / SDXL configurations built in code."""

import types

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from tiny_models import tiny_sdxl as build_tiny_sdxl
from tiny_models import tiny_vae

from erasure.diffusers_backbone import DiffusersBackbone, load_diffusers
from erasure.errors import UnsupportedModelError
from erasure.lora_files import save_lora
from erasure.sampling import sample
from erasure.weights import ErasureWeights


def _random_edit(bb, scale=0.05):
    g = torch.Generator().manual_seed(0)
    return ErasureWeights.dense({n: torch.randn(m.weight.shape, generator=g) * scale
                                 for n, m in bb.cross_attention_kv().items()}, method="test", concepts=["circle"])


def test_lora_file_loads_in_diffusers_with_the_same_unet_output(tiny_backbone, tmp_path):
    bb = tiny_backbone
    w = _random_edit(bb)
    save_lora(w, tmp_path / "e.safetensors")
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=bb.text_encoders[0], tokenizer=bb.tokenizers[0],
                                   unet=bb.unet(), scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    c = bb.encode_text(["a red circle"]).embeds
    with torch.no_grad():
        ref = bb.unet()(x, t, c).sample
        with w.applied(bb.unet()):
            edited = bb.unet()(x, t, c).sample
        pipe.load_lora_weights(str(tmp_path / "e.safetensors"))
        loaded = pipe.unet(x, t, c).sample
    assert (edited - ref).abs().max() > 1e-3
    torch.testing.assert_close(loaded, edited, rtol=1e-4, atol=1e-5)


class _VUnet(torch.nn.Module):
    """Returns the exact v-target of known (x0, eps): the adapter must turn it into eps."""

    def __init__(self, x0, eps, abar):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.x0, self.eps, self.abar = x0, eps, abar
        self.config = types.SimpleNamespace(in_channels=3, sample_size=8)

    def forward(self, x, t, encoder_hidden_states=None):
        a = self.abar[t].float().view(-1, 1, 1, 1)
        return types.SimpleNamespace(sample=a.sqrt() * self.eps - (1 - a).sqrt() * self.x0)


def test_v_prediction_is_converted_to_eps(tiny_backbone):
    abar = DDPMScheduler(beta_schedule="scaled_linear").alphas_cumprod
    x0, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t = torch.tensor([100, 900])
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    bb = DiffusersBackbone(_VUnet(x0, eps, abar), tiny_backbone.text_encoders, tiny_backbone.tokenizers, abar,
                           prediction_type="v_prediction")
    out = bb.predict_noise(x_t, t, tiny_backbone.encode_text(["a", "b"]))
    torch.testing.assert_close(out, eps, rtol=1e-4, atol=1e-4)


def test_unknown_prediction_type_is_refused(tiny_backbone):
    with pytest.raises(UnsupportedModelError):
        DiffusersBackbone(tiny_backbone.unet(), tiny_backbone.text_encoders, tiny_backbone.tokenizers,
                          torch.linspace(0.99, 0.01, 1000), prediction_type="flow")


@pytest.fixture()
def tiny_sdxl(lab_tokenizer_dir):
    return build_tiny_sdxl(lab_tokenizer_dir, transformer_layers_per_block=(1, 2))


def test_sdxl_two_encoders_pooled_and_size_conditioning(tiny_sdxl):
    bb = tiny_sdxl
    cond = bb.encode_text(["a red circle", "a square"])
    assert cond.embeds.shape == (2, 16, 64)
    assert cond.extras["text_embeds"].shape == (2, 16) and cond.extras["time_ids"].shape == (2, 6)
    assert bb.latent_shape(32) == (4, 16, 16)  # the tiny VAE downsamples by 2
    assert len(bb.cross_attention_kv()) == 2 * (2 + 2 + 4)  # transformer blocks: 2 down, 2 mid, 4 up (depth 2)
    out = sample(bb, ["a red circle"], [0], steps=2, resolution=32)
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()
    with _random_edit(bb).applied(bb.unet()):
        edited = sample(bb, ["a red circle"], [0], steps=2, resolution=32)
    assert not torch.equal(edited.images, out.images)


def test_load_diffusers_folder_offline(tiny_backbone, tmp_path):
    bb = tiny_backbone
    bb.unet().save_pretrained(tmp_path / "unet")
    bb.text_encoders[0].save_pretrained(tmp_path / "text_encoder")
    bb.tokenizers[0].save_pretrained(tmp_path / "tokenizer")
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "scheduler")
    loaded = load_diffusers(tmp_path)
    assert loaded.prediction_type == "v_prediction" and loaded.vae is None
    assert loaded.fingerprint() == bb.fingerprint()
    with pytest.raises(UnsupportedModelError):
        load_diffusers(tmp_path / "unet")
