import torch
from safetensors.torch import load_file

from erasure.deltas import TrainableDeltas
from erasure.lora_files import load_lora, save_lora
from erasure.sampling import ddim_timesteps, sample
from erasure.weights import ErasureWeights


def test_ddim_timesteps():
    ts = ddim_timesteps(10)
    assert ts[0] == 999 and ts[-1] == 99 and len(ts) == 10 and bool((ts[:-1] > ts[1:]).all())


def test_sampling_is_deterministic_and_batch_independent(tiny_backbone):
    a = sample(tiny_backbone, ["a red circle", "a square"], [1, 2], steps=4, batch_size=4).images
    b = sample(tiny_backbone, ["a red circle", "a square"], [1, 2], steps=4, batch_size=1).images
    c = sample(tiny_backbone, ["a square"], [2], steps=4).images
    assert a.shape == (4, 3, 16, 16)
    # same noise and maths whatever the batch; only the BLAS summation order may differ with the batch size
    torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
    torch.testing.assert_close(a[3:], c, rtol=0, atol=2e-3)
    assert torch.equal(a, sample(tiny_backbone, ["a red circle", "a square"], [1, 2], steps=4, batch_size=4).images)


def test_sampler_records_trajectory(tiny_backbone):
    r = sample(tiny_backbone, ["a circle"], [0, 1], steps=3, record=True)
    assert r.trajectory.shape == (3, 2, 3, 16, 16)
    assert r.eps_uncond.shape == r.eps_cond.shape == r.trajectory.shape
    assert not torch.equal(r.eps_uncond, r.eps_cond)


def test_token_positions(tiny_backbone):
    assert tiny_backbone.token_positions("a photo of a red circle", "circle") == [6]
    assert tiny_backbone.token_positions("a circle and a circle", "circle") == [2, 5]
    assert tiny_backbone.token_positions("a square", "circle") == []


def _random_weights(bb, scale=0.05):
    g = torch.Generator().manual_seed(0)
    kv = bb.cross_attention_kv()
    return ErasureWeights.dense({n: torch.randn(m.weight.shape, generator=g) * scale for n, m in kv.items()},
                                method="test", concepts=["circle"])


def test_applied_restores_weights_bit_identically(tiny_backbone):
    unet = tiny_backbone.unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    w = _random_weights(tiny_backbone)
    with w.applied(unet):
        changed = any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert changed
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_lora_file_round_trip_is_exact(tiny_backbone, tmp_path):
    w = _random_weights(tiny_backbone)
    err = save_lora(w, tmp_path / "e.safetensors")
    assert err == 0.0
    back = load_lora(tmp_path / "e.safetensors")
    assert sorted(back.deltas) == w.modules()
    for n in w.modules():
        assert torch.equal(back.deltas[n].matrix(), w.deltas[n].matrix())
    assert back.metadata["erasure.method"] == "test"
    keys = load_file(str(tmp_path / "e.safetensors")).keys()
    assert all(k.startswith("lora_unet_") for k in keys)
    # saving the loaded LoRA again gives the same tensors
    save_lora(back, tmp_path / "f.safetensors")
    a, b = load_file(str(tmp_path / "e.safetensors")), load_file(str(tmp_path / "f.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_lora_reports_error(tiny_backbone, tmp_path):
    w = _random_weights(tiny_backbone)
    err = save_lora(w, tmp_path / "r1.safetensors", rank=1)
    assert 0.1 < err < 1.0


def test_trainable_deltas_leave_weights_untouched(tiny_backbone):
    bb = tiny_backbone
    before = {k: v.clone() for k, v in bb.unet().state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([500, 500])
    cond = bb.encode_text(["a circle", "a square"])
    ref = bb.predict_noise(x, t, cond)
    with TrainableDeltas(bb.cross_attention_kv()) as d:
        for p in d.deltas:
            torch.nn.init.normal_(p, std=0.1)
        moved = bb.predict_noise(x, t, cond)
        with d.disabled():
            same = bb.predict_noise(x, t, cond)
        # the delta hook computes the same as adding the delta to the weight
        w = d.result()
        with d.disabled(), w.applied(bb.unet()):
            merged = bb.predict_noise(x, t, cond)
    assert not torch.allclose(moved, ref)
    torch.testing.assert_close(same, ref)
    torch.testing.assert_close(merged, moved, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bb.predict_noise(x, t, cond), ref)
    assert all(torch.equal(before[k], v) for k, v in bb.unet().state_dict().items())


class _PointMassBackbone:
    """The exact eps-predictor of a data distribution concentrated on one image: DDIM must land on it."""

    clip_denoised = False

    def __init__(self, target):
        from diffusers import DDPMScheduler

        from erasure.backbone import NoiseSchedule
        from erasure.lab.model import SCHEDULER_CONFIG

        self.target = target
        self.schedule = NoiseSchedule(DDPMScheduler(**SCHEDULER_CONFIG).alphas_cumprod.double())
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def latent_shape(self, resolution=None):
        return tuple(self.target.shape)

    def encode_text(self, prompts):
        from erasure.backbone import TextConditioning

        return TextConditioning(torch.zeros(len(prompts), 1, 1))

    def predict_noise(self, x, t, cond):
        a = self.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.target) / (1 - a).sqrt()

    def decode(self, x):
        return x


def test_ddim_recovers_the_data_under_an_exact_predictor():
    target = torch.rand(3, 4, 4) * 2 - 1
    out = sample(_PointMassBackbone(target), ["x"], [0, 1], steps=7, guidance=3.0).images
    torch.testing.assert_close(out, target.expand(2, 3, 4, 4), rtol=1e-3, atol=1e-3)


def test_attention_capture_matches_the_normal_forward(tiny_backbone):
    bb = tiny_backbone
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([300, 300])
    cond = bb.encode_text(["a red circle", "a square"])
    ref = bb.predict_noise(x, t, cond)
    seen = []
    with bb.capture_attention(lambda n, p, hw: seen.append((n, p, hw))):
        out = bb.predict_noise(x, t, cond)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert len(seen) == 4  # tiny model: 1 down, 1 mid and 2 up cross-attention layers
    name, probs, hw = seen[0]
    assert probs.shape == (2, 2, 64, 16) and hw == (8, 8)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 64))
    # the original processors are back
    assert all(type(p).__name__ != "CapturingProcessor" for p in bb.unet().attn_processors.values())


def test_export_rank_is_exact_until_the_file_would_be_large():
    w = ErasureWeights.dense({"a": torch.ones(8, 4), "b": torch.ones(3, 2, 3, 3)})
    # identity factorisation: a 8x4 -> 4*(32 + 16) bytes, b 3x18 -> 4*(54 + 9) bytes
    assert w.export_rank() is None
    assert w.export_rank(exact_limit_bytes=4 * (48 + 63)) == 64
    assert w.export_rank(exact_limit_bytes=4 * (48 + 63) + 1) is None
