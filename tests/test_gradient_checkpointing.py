"""Gradient checkpointing of ANT's training forward: same gradients, the user's model left as it was, the setting."""

from __future__ import annotations

import pytest
import torch
from ant_grads import ant_grads, random_batch

from erasure.ant import AntSettings, ant, use_checkpointing
from erasure.backbone import gradient_checkpointing

FAST = AntSettings(steps=2, trajectory_steps=6, early_steps=2, trajectories=2, batch_size=2, guidance=3.0,
                   scope="xattn", preserve_prompts=4)
TEMPLATES = ["a {c}", "a red {c}"]


def test_checkpointed_gradients_equal_the_plain_ones(tiny_backbone):
    bb = tiny_backbone
    b = random_batch(bb, bb.latent_shape(), [990, 950], [500, 200], "a circle", "a square")
    uncond = bb.encode_text([""])
    plain, n_plain = ant_grads(bb, b, uncond, FAST, False)
    ckpt, n_ckpt = ant_grads(bb, b, uncond, FAST, True)
    assert n_ckpt < n_plain / 2  # it did checkpoint: the blocks' internals are not kept for backward
    for a, c in zip(plain, ckpt, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scope", ["xattn", "lora", "saliency"])
def test_ant_with_checkpointing_trains_the_same_edit_and_restores_the_model(tiny_backbone, scope):
    bb = tiny_backbone
    s = FAST.override(scope=scope, saliency_maps=2)
    unet = bb.unet()
    seen: list[bool] = []
    hook = unet.register_forward_pre_hook(
        lambda m, a: seen.append(m.is_gradient_checkpointing) if torch.is_grad_enabled() else None)
    try:
        on = ant(bb, "circle", s.override(gradient_checkpointing="on"), templates=TEMPLATES)
        # every forward with grad was checkpointed: the training steps and, for saliency, its gradient maps
        assert all(seen) and len(seen) == s.steps + (s.saliency_maps if scope == "saliency" else 0)
        assert not unet.is_gradient_checkpointing  # and the model is back as it was
        seen.clear()
        off = ant(bb, "circle", s.override(gradient_checkpointing="off"), templates=TEMPLATES)
        assert seen and not any(seen)
    finally:
        hook.remove()
    assert on.losses == pytest.approx(off.losses, rel=1e-4, abs=1e-7)
    assert on.unet_forwards == off.unet_forwards
    for n in on.weights.deltas:
        torch.testing.assert_close(on.weights.deltas[n].matrix(), off.weights.deltas[n].matrix(), rtol=1e-3,
                                   atol=1e-6)


def test_a_users_own_checkpointing_is_kept(tiny_backbone):
    bb = tiny_backbone
    unet = bb.unet()

    def mine(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    unet.enable_gradient_checkpointing(mine)
    ant(bb, "circle", FAST.override(gradient_checkpointing="on", steps=1), templates=TEMPLATES)
    blocks = [m for m in unet.modules() if hasattr(m, "gradient_checkpointing")]
    assert all(m.gradient_checkpointing and m._gradient_checkpointing_func is mine for m in blocks)
    unet.disable_gradient_checkpointing()


def test_the_setting_validates_and_auto_follows_size(tiny_backbone):
    with pytest.raises(ValueError, match="gradient_checkpointing must be one of"):
        AntSettings(gradient_checkpointing="yes").validate()
    with pytest.raises(ValueError, match="gradient_checkpointing must be one of"):
        ant(tiny_backbone, "circle", AntSettings(gradient_checkpointing="true"))
    assert not use_checkpointing(tiny_backbone, AntSettings())  # tiny UNet at its 16 px: off
    assert use_checkpointing(tiny_backbone, AntSettings(resolution=72))  # 72 x 72 cells > 64 x 64: on
    assert use_checkpointing(tiny_backbone, AntSettings(gradient_checkpointing="on"))
    assert not use_checkpointing(tiny_backbone, AntSettings(gradient_checkpointing="off", resolution=72))


def test_backbones_without_support_do_nothing():
    class Plain:
        pass

    with gradient_checkpointing(Plain(), True) as active:  # type: ignore[arg-type]
        assert active is False
