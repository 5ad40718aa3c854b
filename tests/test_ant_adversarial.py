"""Adversarial ANT (``AntSettings.adversarial``): off by default and inert, the learned token moves, the erasure
loss regresses the learned-token prompts onto the concept's reversed target, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch

from erasure.ant import AntSettings, Batch, ant, ant_loss, ant_multi, stage_targets
from erasure.ant import train as ant_train
from erasure.audit_text import DiffusersSlotEncoder, init_vectors
from erasure.errors import BadInputError

FAST = AntSettings(steps=4, trajectory_steps=6, early_steps=2, trajectories=3, batch_size=2, guidance=3.0,
                   preserve_prompts=4)
ADV = FAST.override(adversarial=1, adversarial_every=2, adversarial_steps=3, protect=0.0)
TEMPLATES = ["a {c}", "a red {c}"]


def _same(a, b) -> bool:
    """Whether two results' edits are bit-identical."""
    da, db = a.weights.deltas, b.weights.deltas
    return da.keys() == db.keys() and all(torch.equal(da[k].matrix(), db[k].matrix()) for k in da)


def test_off_by_default_and_its_knobs_are_inert(tiny_backbone):
    assert AntSettings().adversarial == 0
    base = ant(tiny_backbone, "circle", FAST, templates=TEMPLATES)
    knobs = FAST.override(adversarial_every=1, adversarial_steps=7, adversarial_lr=1.0, adversarial_weight=3.0)
    other = ant(tiny_backbone, "circle", knobs, templates=TEMPLATES)
    assert _same(base, other)  # bit-identical: the attack's knobs do nothing while it is off
    assert base.losses == other.losses and base.unet_forwards == other.unet_forwards
    assert base.adversarial == {} and "erasure.adversarial" not in base.weights.metadata


def test_on_the_token_moves_and_the_edit_differs(tiny_backbone):
    off = ant(tiny_backbone, "circle", FAST, templates=TEMPLATES)
    on = ant(tiny_backbone, "circle", ADV, templates=TEMPLATES)
    adv = on.adversarial
    assert adv["rounds"] == 2  # steps 0 and 2 of 4
    assert all(h["token_moved"] > 0 for h in adv["history"])
    start = init_vectors(DiffusersSlotEncoder(tiny_backbone), 1, "object", torch.Generator())[0]
    assert not torch.allclose(torch.tensor(adv["token"][0]), start)
    assert not _same(off, on)
    assert "erasure.adversarial" in on.weights.metadata
    # images (3 x 6 steps x 2), two rounds of 3 attack steps x 4 images, one learned-token row per sample and step
    assert on.unet_forwards == off.unet_forwards + 3 * 6 * 2 + 2 * 3 * 4 + ADV.steps * ADV.batch_size
    assert on.unet_backwards == off.unet_backwards + 2 * 3


def test_the_erasure_step_regresses_the_current_learned_token_prompts(tiny_backbone, monkeypatch):
    """Every training batch carries one learned-token row per sample, in the template of the sample's trajectory,
    encoded with the token of the latest round; at the last step that is the final token."""
    seen: list[Batch] = []
    real = ant_train.ant_loss

    def spy(backbone, b, uncond, s):
        seen.append(b)
        return real(backbone, b, uncond, s)

    monkeypatch.setattr(ant_train, "ant_loss", spy)
    r = ant(tiny_backbone, "circle", ADV, templates=TEMPLATES)
    assert len(seen) == ADV.steps and all(b.adv_cond is not None for b in seen)
    enc = DiffusersSlotEncoder(tiny_backbone)
    token = [torch.tensor(r.adversarial["token"][0])]
    plain = [tiny_backbone.encode_text([t.replace("{c}", "circle")]).embeds for t in TEMPLATES]
    slots = [t.replace("{c}", "{}") for t in TEMPLATES]
    last = seen[-1]
    for row in range(ADV.batch_size):
        j = next(i for i, p in enumerate(plain) if torch.equal(p[0], last.cond.embeds[row]))
        with torch.no_grad():
            want = enc.encode([slots[j]], token).embeds[0]
        assert torch.allclose(last.adv_cond.embeds[row], want, atol=1e-6)
        assert not torch.allclose(last.adv_cond.embeds[row], last.cond.embeds[row])


@pytest.mark.parametrize("prediction", ["cond", "guided"])
def test_the_learned_token_term_is_the_concepts_reversed_target(tiny_backbone, prediction):
    bb = tiny_backbone
    g = torch.Generator().manual_seed(1)
    shape = (2, *bb.latent_shape())

    def r() -> torch.Tensor:
        return torch.randn(shape, generator=g)

    b = Batch(r(), torch.tensor([990, 950]), r(), torch.tensor([500, 200]), bb.encode_text(["a circle"] * 2),
              r(), r(), r(), r())
    uncond = bb.encode_text([""])
    s = AntSettings(eta=0.7, guidance=4.0, prediction=prediction, adversarial=1, adversarial_weight=2.0)
    with torch.no_grad():
        plain_loss, plain_parts = ant_loss(bb, b, uncond, s)
        b.adv_cond = bb.encode_text(["a disk", "a red disk"])  # stands in for the learned-token prompts
        loss, parts = ant_loss(bb, b, uncond, s)
        pa = bb.predict_noise(b.x_late, b.t_late, b.adv_cond)
        pu = bb.predict_noise(b.x_late, b.t_late, uncond.repeat(2))
    w = 4.0 if prediction == "guided" else 1.0
    if prediction == "guided":
        pa = pu + 4.0 * (pa - pu)
    _, erase = stage_targets(b.eu_early, b.ec_early, b.eu_late, b.ec_late, 0.7, w)
    assert parts["adversarial"] == pytest.approx(float(((pa - erase) ** 2).mean()), rel=1e-4)
    assert parts["erase"] == pytest.approx(plain_parts["erase"], rel=1e-5)
    assert float(loss) == pytest.approx(float(plain_loss) + 2.0 * parts["adversarial"], rel=1e-5)
    assert "adversarial" not in plain_parts


@pytest.mark.parametrize(("field", "value", "words"), [
    ("adversarial", -1, "adversarial must be a whole number >= 0"),
    ("adversarial_every", 0, "adversarial_every must be a whole number >= 1"),
    ("adversarial_steps", 0, "adversarial_steps must be a whole number >= 1"),
    ("adversarial_lr", 0.0, "adversarial_lr must be in (0, 10]"),
    ("adversarial_lr", 50.0, "adversarial_lr must be in (0, 10]"),
    ("adversarial_weight", 0.0, "adversarial_weight must be a finite number > 0"),
])
def test_bad_settings_are_refused_naming_the_field(field, value, words):
    with pytest.raises(BadInputError, match=words.replace("(", r"\(").replace("]", r"\]")):
        AntSettings(**{field: value}).validate()


def test_protect_is_refused_with_it_naming_the_fix():
    """Under protect the attack still revives the concept and its term can undo the erasure (measured on the lab,
    docs/audit.md#adversarial-with-protect): refused before work starts; a scope protect does not apply to is fine."""
    with pytest.raises(BadInputError, match="Set protect to 0 for adversarial erasure"):
        AntSettings(adversarial=1).validate()
    with pytest.raises(BadInputError, match="protect 0.99"):
        AntSettings(adversarial=1, protect=0.99, scope="kv").validate()
    AntSettings(adversarial=1, protect=0.0).validate()
    AntSettings(adversarial=1, scope="saliency").validate()
    AntSettings(protect=0.999).validate()


def test_refusals_name_the_fix(tiny_backbone):
    with pytest.raises(BadInputError, match="adversarial erasure is for one concept"):
        ant_multi(tiny_backbone, ["circle", "square"], ADV, None)

    class Other:  # a backbone that is not a diffusers one: no slot encoder of its own
        def __init__(self, inner) -> None:
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

    with pytest.raises(BadInputError, match="pass slot_encoder= to ant"):
        ant(Other(tiny_backbone), "circle", ADV, templates=TEMPLATES)
    with pytest.raises(BadInputError, match="exactly once"):
        ant(tiny_backbone, "circle", ADV, templates=["a {c} and a {c}"])
