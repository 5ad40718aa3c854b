"""Robustness (issue #7) on tiny models: bad input is refused before any work, faults (NaN, out of memory, Ctrl-C)
leave the model, torch's global state and every file as they were, files are atomic and caches self-checking, and
docs/troubleshooting.md's table quotes messages that exist in the code."""

from __future__ import annotations

import ast
import json
import math
import pickle
import re
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from erasure import files, validation
from erasure.ant import AntSettings, ant, ant_multi
from erasure.errors import ErasureOutOfMemoryError, TrainingDivergedError
from erasure.fusion import fuse
from erasure.guards import torch_state_preserved
from erasure.lora_files import load_lora, save_lora
from erasure.mace import MaceSettings, mace
from erasure.prior import gram
from erasure.progress import Progress
from erasure.prompts import Concept
from erasure.weights import Delta, ErasureWeights

REPO = Path(__file__).resolve().parents[1]
FAST = AntSettings(steps=3, trajectory_steps=6, early_steps=2, trajectories=2, saliency_maps=2, batch_size=1,
                   guidance=3.0, refresh_every=0, preserve=1.0, scope="saliency")
TEMPLATES = ["a {c}", "a red {c}"]
PRES = ["a square", "a blue triangle"]
LAB_TEMPLATES = ("a {c}", "a red {c}")


def _ant(bb, concept="circle", **kw):
    return ant(bb, concept, FAST.override(**kw), templates=TEMPLATES, preserve_prompts=PRES)


def _mace(bb, concepts=("circle",), **kw):
    s = MaceSettings(images_per_concept=2, sample_steps=3, guidance=3.0, lora_steps=2, lora_lr=1e-3).override(**kw)
    items = [Concept(c, "shape", templates=LAB_TEMPLATES, data_prompt="a {c}") for c in concepts]
    return mace(bb, items, s, None)


# -- helpers: what "left as it was" means ------------------------------------------------------------------------
def _snapshot(bb) -> dict:
    unet = bb.unet()
    return {"params": {n: (p, p.detach().clone(), p.requires_grad) for n, p in unet.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in unet.named_buffers()}}


def _assert_untouched(bb, snap: dict) -> None:
    """Same Parameter objects, bit-identical values, same requires_grad flags, no hooks or patched forwards left."""
    unet = bb.unet()
    params = dict(unet.named_parameters())
    assert params.keys() == snap["params"].keys()
    for n, (obj, value, flag) in snap["params"].items():
        assert params[n] is obj, f"{n}: the Parameter object was replaced"
        assert torch.equal(params[n].detach(), value), f"{n} changed"
        assert params[n].requires_grad == flag, f"{n}: requires_grad changed"
    for n, b in unet.named_buffers():
        assert torch.equal(b, snap["buffers"][n]), f"buffer {n} changed"
    for name, m in unet.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"{name}: a hook was left behind"
        assert "forward" not in m.__dict__, f"{name}: a patched forward was left behind"


def _torch_state() -> tuple:
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_default_dtype(),
            torch.random.get_rng_state())


def _assert_state(before: tuple) -> None:
    after = _torch_state()
    assert after[:3] == before[:3], f"torch state leaked: {after[:3]} != {before[:3]}"
    assert torch.equal(after[3], before[3]), "the global RNG state leaked"


@pytest.fixture()
def bb(tiny_backbone):
    """The tiny backbone with its UNet calls counted (``bb.calls``), to prove bad input stops before any work."""
    real = tiny_backbone.predict_noise
    tiny_backbone.calls = 0

    def counted(*a, **kw):
        tiny_backbone.calls += 1
        return real(*a, **kw)

    tiny_backbone.predict_noise = counted
    return tiny_backbone


# -- bad input: a clear message before any UNet call --------------------------------------------------------------
LONG = " ".join(["circle"] * 20)  # the tiny model's text encoder reads 16 tokens

ANT_BAD = [
    ("", {}, "is empty"),
    ("   \t", {}, "is empty"),
    (LONG, {}, "does not fit in the text encoder's context"),
    ("circle", {"lr": 0.0}, "learning rate must be a positive number"),
    ("circle", {"lr": -1e-4}, "learning rate must be a positive number"),
    ("circle", {"lr": math.nan}, "learning rate must be a positive number"),
    ("circle", {"lr": math.inf}, "learning rate must be a positive number"),
    ("circle", {"lr": 2.0}, "learning rate 2 is far too large"),
    ("circle", {"steps": 0}, "steps must be a whole number >= 1"),
    ("circle", {"saliency_fraction": 0.0}, r"saliency_fraction must be in \(0, 1\]"),
    ("circle", {"saliency_fraction": 1.5}, r"saliency_fraction must be in \(0, 1\]"),
    ("circle", {"resolution": 12}, "multiple of 8"),
]


@pytest.mark.parametrize(("concept", "kw", "match"), ANT_BAD)
def test_ant_refuses_bad_input_before_any_work(bb, concept, kw, match):
    with pytest.raises(ValueError, match=match):
        _ant(bb, concept, **kw)
    assert bb.calls == 0


@pytest.mark.parametrize(("concepts", "match"), [(["circle", " Circle "], "duplicate concepts: circle"),
                                                 (["circle", "  "], "is empty"), ([], "no concepts given"),
                                                 (["circle", LONG], "does not fit in the text encoder's context")])
def test_ant_multi_refuses_empty_and_duplicate_concepts(bb, concepts, match):
    with pytest.raises(ValueError, match=match):
        ant_multi(bb, concepts, FAST, None, templates={c: TEMPLATES for c in concepts})
    assert bb.calls == 0


@pytest.mark.parametrize(("kw", "match"), [
    ({"lora_lr": 0.0}, "learning rate must be a positive number"),
    ({"lora_steps": 0}, "lora_steps must be a whole number >= 1"),
    ({"images_per_concept": 0}, "images_per_concept must be a whole number >= 1"),
    ({"lam": 0.0}, "lam must be a finite number > 0"),
    ({"guidance": math.nan}, "guidance must be a finite number >= 0"),
    ({"mask_threshold": 1.5}, r"mask_threshold must be in \[0, 1\]"),
])
def test_mace_refuses_bad_settings_before_any_work(bb, kw, match):
    with pytest.raises(ValueError, match=match):
        _mace(bb, **kw)
    assert bb.calls == 0


def test_mace_refuses_duplicates_long_concepts_and_anchor_equal_to_concept(bb):
    with pytest.raises(ValueError, match="duplicate concepts: circle"):
        _mace(bb, ("circle", "Circle"))
    with pytest.raises(ValueError, match="does not fit in the text encoder's context"):
        _mace(bb, (LONG,))
    with pytest.raises(ValueError, match="is the concept itself"):
        Concept("circle", " Circle")
    with pytest.raises(ValueError, match="is the concept itself"):
        validation.check_anchors(["circle", "red"], ["shape", "RED"])
    with pytest.raises(ValueError, match="2 anchors for 3 concepts"):
        validation.check_anchors(["a", "b", "c"], ["x", "y"])
    assert bb.calls == 0


def test_a_model_with_nan_weights_is_refused_before_training(bb):
    w = bb.unet().conv_in.weight
    keep = w.detach().clone()
    try:
        with torch.no_grad():
            w[0, 0, 0, 0] = math.nan
        with pytest.raises(ValueError, match="conv_in.weight contains NaN"):
            _ant(bb)
    finally:
        with torch.no_grad():
            w.copy_(keep)
    assert bb.calls == 0


def _kv_weights(bb, scale: float = 1e-3) -> ErasureWeights:
    g = torch.Generator().manual_seed(0)
    return ErasureWeights({n: Delta(dense=torch.randn(m.weight.shape, generator=g) * scale)
                           for n, m in bb.cross_attention_kv().items()})


def test_fuse_refuses_loras_for_another_model_damaged_or_without_kv(bb):
    c = [Concept("circle", "", templates=LAB_TEMPLATES)]
    good = _kv_weights(bb)
    name = next(iter(good.deltas))
    other = ErasureWeights({"down_blocks.9.attentions.0.attn2.to_k": Delta(dense=torch.zeros(4, 4))})
    with pytest.raises(ValueError, match="does not exist in this model: it was made for another base model"):
        fuse(bb, [(c, other)], None, None)
    shape = ErasureWeights({name: Delta(dense=torch.zeros(3, 5))})
    with pytest.raises(ValueError, match=r"has shape \(3, 5\), this model's"):
        fuse(bb, [(c, shape)], None, None)
    nan = ErasureWeights({k: Delta(dense=d.dense.clone()) for k, d in good.deltas.items()})
    nan.deltas[name].dense[0, 0] = math.inf
    with pytest.raises(ValueError, match="LoRA 1: the layer .* contains NaN or infinite values"):
        fuse(bb, [(c, nan)], None, None)
    with pytest.raises(ValueError, match="the ANT edit of concept 2 .*: the layer .* contains NaN"):
        validation.check_fuse_inputs(bb, [(c, nan)], 0.1, 1.0, labels=["the ANT edit of concept 2 ('circle')"])
    conv = ErasureWeights({"conv_in": Delta(dense=torch.zeros_like(bb.unet().conv_in.weight))})
    with pytest.raises(ValueError, match="changes no cross-attention key/value layer"):
        fuse(bb, [(c, conv)], None, None)
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        fuse(bb, [(c, good)], None, None, lam=0.0)
    with pytest.raises(ValueError, match="no LoRAs to fuse"):
        fuse(bb, [], None, None)
    assert fuse(bb, [(c, good)], None, None).deltas.keys() == good.deltas.keys()


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_unsupported_model_folders_are_refused_before_loading(tmp_path):
    from erasure.diffusers_backbone import load_diffusers
    from erasure.errors import UnsupportedModelError

    flux = tmp_path / "flux"
    _write_json(flux / "model_index.json", {"_class_name": "FluxPipeline"})
    (flux / "transformer").mkdir()
    (flux / "text_encoder").mkdir()
    with pytest.raises(UnsupportedModelError, match="is a FluxPipeline model .*SD1.x, SD2.x and SDXL"):
        load_diffusers(flux)
    video = tmp_path / "svd"
    _write_json(video / "unet" / "config.json", {"_class_name": "UNetSpatioTemporalConditionModel"})
    with pytest.raises(UnsupportedModelError, match="UNetSpatioTemporalConditionModel .*a video or other model"):
        load_diffusers(video)
    unet_only = tmp_path / "unet-only"
    _write_json(unet_only / "unet" / "config.json", {"_class_name": "UNet2DConditionModel"})
    with pytest.raises(UnsupportedModelError, match="has no text_encoder/ or tokenizer/"):
        load_diffusers(unet_only)
    with pytest.raises(UnsupportedModelError, match="is not a folder"):
        load_diffusers(tmp_path / "missing")


# -- hostile and damaged files -------------------------------------------------------------------------------------
def _lora_file(path: Path, **override: torch.Tensor) -> Path:
    t = {"lora_unet_a.lora_up.weight": torch.ones(4, 2), "lora_unet_a.lora_down.weight": torch.ones(2, 3),
         "lora_unet_a.alpha": torch.tensor(2.0)} | override
    save_file({k: v for k, v in t.items() if v is not None}, str(path))
    return path


def test_only_valid_safetensors_are_read(tmp_path):
    with pytest.raises(ValueError, match="only .safetensors files are read"):
        load_lora(tmp_path / "x.ckpt")
    evil = tmp_path / "evil.safetensors"  # a pickle renamed: never unpickled, refused with what to do
    evil.write_bytes(pickle.dumps({"lora_unet_a.lora_up.weight": [1.0]}))
    with pytest.raises(ValueError, match="is not a valid safetensors file .*download or save it again"):
        load_lora(evil)
    good = _lora_file(tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-7])  # a download that stopped early
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        load_lora(cut)
    with pytest.raises(ValueError, match="no such file"):
        load_lora(tmp_path / "missing.safetensors")
    assert load_lora(good).deltas["lora_unet_a"].matrix().shape == (4, 3)


@pytest.mark.parametrize(("override", "match"), [
    ({"lora_unet_a.lora_up.weight": torch.full((4, 2), math.nan)}, "contains NaN or infinite values"),
    ({"lora_unet_a.lora_up.weight": torch.ones(4, 5)}, "which do not multiply"),
    ({"lora_unet_a.alpha": torch.ones(3)}, "alpha is not a single number"),
    ({"lora_unet_a.lora_up.weight": None}, "has lora_down but no lora_up"),
    ({"lora_unet_a.lora_up.weight": torch.ones(4, 2, dtype=torch.int32)}, "is not a floating-point tensor"),
])
def test_damaged_lora_files_get_a_message(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        load_lora(_lora_file(tmp_path / "bad.safetensors", **override))


def test_peft_keys_are_named_in_the_message(tmp_path):
    p = tmp_path / "peft.safetensors"
    save_file({"unet.a.lora_A.weight": torch.ones(2, 3), "unet.a.lora_B.weight": torch.ones(4, 2)}, str(p))
    with pytest.raises(ValueError, match="PEFT lora_A/lora_B keys are not supported"):
        load_lora(p)


def test_metadata_is_untrusted_text():
    meta = validation.concepts_from_metadata
    assert meta({"erasure.concepts": '["cat", " Cat ", "", 3, null, "a\\u0000b\\nc"]'}) == ["cat", "a b c"]
    for junk in ("not json", '{"a": 1}', '"cat"', "[" * 10_000, 42, None):
        assert meta({"erasure.concepts": junk}) == []
    assert len(meta({"erasure.concepts": json.dumps([f"c{i}" for i in range(10_000)])})) == \
        validation.MAX_METADATA_CONCEPTS
    assert len(meta({"erasure.concepts": json.dumps(["x" * 10**6])})[0]) == validation.MAX_TEXT
    assert meta("not a mapping") == []


@pytest.mark.parametrize(("name", "expected"), [
    ("erased-nudity", "erased-nudity.safetensors"),
    ("my lora.safetensors", "my lora.safetensors"),
    ("../../etc/passwd", "passwd.safetensors"),
    ("..\\..\\Windows\\evil", "evil.safetensors"),
    ("/abs/path/x", "x.safetensors"),
    (".hidden", "hidden.safetensors"),
    ("CON", "_CON.safetensors"),
    ("nul.txt", "_nul.txt.safetensors"),
    ("caf\u00e9 \u732b", "caf_ _.safetensors"),
])
def test_user_file_names_stay_inside_the_folder(tmp_path, name, expected):
    assert validation.safe_filename(name) == expected
    assert validation.path_inside(tmp_path, name).parent == tmp_path.resolve()


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    """A name that is a symlink in the folder pointing elsewhere: refused, nothing written through it."""
    folder, outside = tmp_path / "loras", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    (folder / "evil.safetensors").symlink_to(outside / "target.safetensors")
    with pytest.raises(ValueError, match="points outside"):
        validation.path_inside(folder, "evil")
    assert not (outside / "target.safetensors").exists()


@pytest.mark.parametrize("name", ["", "   ", "..", "/", ".safetensors", "../", "___"])
def test_empty_file_names_are_refused(name):
    with pytest.raises(ValueError, match="the file name is empty"):
        validation.safe_filename(name)


def test_long_file_names_are_cut():
    out = validation.safe_filename("x" * 1000)
    assert out.endswith(".safetensors") and len(out) <= validation.MAX_FILENAME


# -- atomic writes ---------------------------------------------------------------------------------------------------
def _crash_after_partial_write(monkeypatch, exc: BaseException) -> None:
    def partial(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # half a file...
        raise exc  # ...then the process dies / the user presses Ctrl-C

    monkeypatch.setattr(files, "save_file", partial)


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_a_crash_mid_write_leaves_the_old_file_or_none(tmp_path, monkeypatch, exc):
    w = ErasureWeights({"a": Delta(dense=torch.ones(3, 3))})
    old = tmp_path / "old.safetensors"
    save_lora(w, old)
    before = old.read_bytes()
    _crash_after_partial_write(monkeypatch, exc)
    for target in (old, tmp_path / "new.safetensors"):
        with pytest.raises(type(exc)):
            save_lora(ErasureWeights({"a": Delta(dense=torch.zeros(3, 3))}), target)
    assert old.read_bytes() == before, "the old file was damaged"
    assert not (tmp_path / "new.safetensors").exists(), "a partial file was left"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.safetensors"], "temporary files were left"


def test_text_writes_are_atomic_and_files_readable(tmp_path, monkeypatch):
    p = tmp_path / "report.json"
    files.atomic_write_text(p, "{}")
    assert p.read_text() == "{}" and (p.stat().st_mode & 0o777) == 0o644

    def boom(self, text, encoding=None):
        Path.write_bytes(self, b"{")
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", boom)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_text(p, '{"a": 1}')
    monkeypatch.undo()
    assert p.read_text() == "{}" and [x.name for x in tmp_path.iterdir()] == ["report.json"]


# -- caches: validated on load, rebuilt when stale or corrupt --------------------------------------------------------
def _flip_last_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))


def test_gram_cache_is_rebuilt_when_corrupt_stale_or_truncated(bb, tmp_path):
    prompts = ["a circle", "a red square"]
    fresh = gram(bb, prompts, tmp_path)
    (path,) = (tmp_path / "gram").iterdir()
    assert files.load_cache(path) is not None
    damages = {
        "flipped": _flip_last_byte,
        "truncated": lambda p: p.write_bytes(p.read_bytes()[:-10]),
        "garbage": lambda p: p.write_bytes(b"junk"),
        "wrong shape": lambda p: files.save_cache({"gram": torch.eye(3, dtype=torch.float64)}, p),
        "no hash (old format)": lambda p: save_file({"gram": torch.zeros(32, 32, dtype=torch.float64)}, str(p)),
    }
    for why, damage in damages.items():
        damage(path)
        assert files.load_cache(path, {"gram": (32, 32)}) is None, why
        assert torch.equal(gram(bb, prompts, tmp_path), fresh), why
        assert files.load_cache(path, {"gram": (32, 32)}) is not None, f"{why}: the cache was not rewritten"


# -- faults during training ----------------------------------------------------------------------------------------
def test_nan_loss_stops_ant_with_a_message_and_returns_nothing(bb, monkeypatch):
    import erasure.ant.saliency as saliency_mod
    import erasure.ant.train as ant_mod

    real, calls = ant_mod.ant_loss, []

    def poisoned(*a, **kw):
        loss, parts = real(*a, **kw)
        calls.append(1)
        return (loss * math.nan if len(calls) > 3 else loss), parts  # the saliency maps use 2, then training

    monkeypatch.setattr(ant_mod, "ant_loss", poisoned)
    monkeypatch.setattr(saliency_mod, "ant_loss", poisoned)
    snap, state = _snapshot(bb), _torch_state()
    with pytest.raises(TrainingDivergedError, match="lower the learning rate"):
        _ant(bb)
    _assert_untouched(bb, snap)
    _assert_state(state)


def test_a_weight_that_becomes_nan_stops_ant_and_huge_learning_rates_are_refused(bb, monkeypatch):
    real, steps = torch.optim.Adam.step, []

    def poisoned_step(self, *a, **kw):  # the last update turns a trained weight into NaN
        out = real(self, *a, **kw)
        steps.append(1)
        if len(steps) == FAST.steps:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = math.nan
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned_step)
    snap = _snapshot(bb)
    with pytest.raises(TrainingDivergedError, match="the ANT weights became non-finite: lower the learning rate"):
        _ant(bb)
    _assert_untouched(bb, snap)
    with pytest.raises(ValueError, match="is far too large"):
        _ant(bb, lr=1e38)  # Adam would overflow ("value cannot be converted to type float") instead of a NaN
    with pytest.raises(ValueError, match="is far too large"):
        _mace(bb, lora_lr=10.0)


def test_nan_attention_loss_stops_mace(bb, monkeypatch):
    import erasure.mace as mace_mod

    real = mace_mod.AttentionLoss.__call__

    def poisoned(self, name, probs, hw):
        real(self, name, probs * math.nan, hw)

    monkeypatch.setattr(mace_mod.AttentionLoss, "__call__", poisoned)
    snap, state = _snapshot(bb), _torch_state()
    with pytest.raises(FloatingPointError, match="lower lora_lr"):
        _mace(bb)
    _assert_untouched(bb, snap)
    _assert_state(state)


def _fail_at(bb, n: int, exc: BaseException) -> None:
    """Make the ``n``-th UNet call raise ``exc``."""
    real = bb.predict_noise
    count = [0]

    def failing(*a, **kw):
        count[0] += 1
        if count[0] == n:
            raise exc
        return real(*a, **kw)

    bb.predict_noise = failing


OOM = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
       RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"),
       RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")]


@pytest.mark.parametrize(("at", "exc"), [(1, OOM[0]), (6, OOM[0]), (9, OOM[0]), (14, OOM[0]), (1, OOM[1]),
                                         (1, OOM[2])],
                         ids=["trajectories", "saliency", "training", "refresh", "mps", "cpu"])
def test_out_of_memory_in_ant_names_what_to_lower_and_restores_the_model(bb, at, exc):
    snap, state = _snapshot(bb), _torch_state()
    _fail_at(bb, at, exc)
    with pytest.raises(ErasureOutOfMemoryError, match="ANT ran out of memory: lower the resolution, batch_size, "
                       "trajectories or trajectory_steps") as info:
        _ant(bb, refresh_every=2)
    assert isinstance(info.value, torch.OutOfMemoryError)  # hosts that unload models on OOM still recognise it
    _assert_untouched(bb, snap)
    _assert_state(state)


@pytest.mark.parametrize("at", [1, 5])  # generating images, training the LoRA
def test_out_of_memory_in_mace_names_what_to_lower(bb, at):
    snap = _snapshot(bb)
    _fail_at(bb, at, torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(ErasureOutOfMemoryError, match="MACE ran out of memory: lower the resolution, "
                       "images_per_concept or lora_batch"):
        _mace(bb)
    _assert_untouched(bb, snap)


def test_other_runtime_errors_pass_through_unchanged(bb):
    _fail_at(bb, 3, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        _ant(bb)


def _interrupt_at(at: int):
    calls = [0]

    def interrupt() -> None:
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt

    return interrupt, calls


@pytest.mark.parametrize("at", [1, 7, 10, 14])  # trajectories, saliency, training, refreshing the trajectories
def test_interrupt_at_any_point_of_ant_leaves_the_model_as_it_was(bb, at):
    interrupt, calls = _interrupt_at(at)
    snap, state = _snapshot(bb), _torch_state()
    with pytest.raises(KeyboardInterrupt):
        ant(bb, "circle", FAST.override(refresh_every=2, sampling="cached"), templates=TEMPLATES, preserve_prompts=PRES,
            progress=Progress(interrupt=interrupt))
    assert calls[0] == at
    _assert_untouched(bb, snap)
    _assert_state(state)


@pytest.mark.parametrize("at", [1, 5])  # generating the images, training the LoRA
def test_interrupt_at_any_point_of_mace_leaves_the_model_as_it_was(bb, at):
    interrupt, calls = _interrupt_at(at)
    snap, state = _snapshot(bb), _torch_state()
    s = MaceSettings(images_per_concept=2, sample_steps=3, lora_steps=3)
    with pytest.raises(KeyboardInterrupt):
        mace(bb, [Concept("circle", "shape", templates=LAB_TEMPLATES, data_prompt="a {c}")], s, None,
             progress=Progress(interrupt=interrupt))
    assert calls[0] == at
    _assert_untouched(bb, snap)
    _assert_state(state)


# -- shared state ----------------------------------------------------------------------------------------------------
def test_no_global_torch_state_leaks_even_from_code_that_changes_it(bb, monkeypatch):
    import erasure.ant.train as ant_mod

    real = ant_mod.AntResult

    def careless(*a, **kw):  # a last step that changes global state and never puts it back
        torch.manual_seed(1234)
        torch.set_grad_enabled(not torch.is_grad_enabled())
        torch.set_default_dtype(torch.float64)
        return real(*a, **kw)

    monkeypatch.setattr(ant_mod, "AntResult", careless)
    torch.manual_seed(7)
    state = _torch_state()
    _ant(bb)
    _assert_state(state)


def test_torch_state_preserved_on_error():
    state = _torch_state()
    with pytest.raises(ZeroDivisionError), torch_state_preserved():
        torch.set_grad_enabled(False)
        torch.randn(3)
        raise ZeroDivisionError
    _assert_state(state)


def test_two_erasures_of_one_model_at_once_do_not_interfere(bb):
    snap = _snapshot(bb)
    alone = {c: _ant(bb, c, steps=2).weights for c in ("circle", "square")}
    results: dict[str, ErasureWeights] = {}
    errors: list[BaseException] = []

    def run(c: str) -> None:
        try:
            results[c] = _ant(bb, c, steps=2).weights
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in ("circle", "square")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for c, w in alone.items():
        for k, d in w.deltas.items():
            assert torch.equal(results[c].deltas[k].matrix(), d.matrix()), f"{c}: {k} differs when run in parallel"
    _assert_untouched(bb, snap)


# -- docs/troubleshooting.md quotes the code --------------------------------------------------------------
def _code_messages() -> list[re.Pattern]:
    """Every string literal of the library and the nodes as a regex; f-string fields match any text."""
    out = []
    for path in [*(REPO / "erasure").rglob("*.py"), *(REPO / "nodes").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr):
                parts = [re.escape(v.value) if isinstance(v, ast.Constant) else ".+?" for v in node.values]
                if sum(len(v.value) for v in node.values if isinstance(v, ast.Constant)) >= 20:  # not f"{x}: {y}"
                    out.append(re.compile("".join(parts), re.S))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 15:
                out.append(re.compile(re.escape(node.value)))
    return out


def _troubleshooting_rows() -> list[tuple[str, str]]:
    text = (REPO / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    section = text.split("## Messages", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 3 and cells[1].startswith("`") and cells[1].endswith("`"):
            rows.append((cells[0], cells[1]))
    return rows


def test_every_troubleshooting_message_exists_in_the_code():
    rows = _troubleshooting_rows()
    assert len(rows) >= 25, "docs/troubleshooting.md's table is missing or short"
    code = _code_messages()
    for case, cell in rows:
        for quoted in re.findall(r"`([^`]+)`", cell):
            # `<...>` marks a value that the message fills in (a name, a number)
            msg = re.sub(r"<[^<>]*>", "X", quoted.replace("error: ", "", 1))
            assert any(p.fullmatch(msg) for p in code), f"{case}: the message {quoted!r} is not in the code"


# -- the command line: faults end with a message and write nothing ---------------------------------------------------
@pytest.mark.parametrize(("exc", "rc", "says"), [
    (TrainingDivergedError("the ANT loss became nan at step 3: lower the learning rate (now 0.1)"), 1,
     "error: the ANT loss became nan at step 3: lower the learning rate (now 0.1); nothing was written"),
    (ErasureOutOfMemoryError("ANT ran out of memory: lower the resolution"), 1,
     "error: ANT ran out of memory: lower the resolution; nothing was written"),
    (KeyboardInterrupt(), 130, "interrupted: nothing was written"),
])
def test_command_line_faults_write_nothing(tmp_path, monkeypatch, capsys, exc, rc, says):
    from erasure import cli

    monkeypatch.setattr(cli, "_load_model", lambda *a: object())
    monkeypatch.setattr(cli, "ant_one", lambda *a, **kw: (_ for _ in ()).throw(exc))
    out = tmp_path / "erased.safetensors"
    assert cli.main(["ant", "--concept", "circle", "--out", str(out)]) == rc
    assert says in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_command_line_prints_key_errors_without_quotes(monkeypatch, capsys):
    from erasure import cli

    def missing(*a):
        raise KeyError("LoRA key lora_unet_x matches no layer of this model: the LoRA was made for another base model")

    monkeypatch.setattr(cli, "_load_lab", missing)
    assert cli.main(["lab", "eval", "--lora", "x.safetensors"]) == 2
    assert capsys.readouterr().err.startswith("error: LoRA key lora_unet_x matches no layer")


def test_other_adapter_formats_pass_the_socket_checks_but_not_nan():
    lokr = {"lora_unet_a.lokr_w1": torch.ones(2, 2), "lora_unet_a.lokr_w2": torch.ones(3, 3)}
    validation.check_lora_tensors(lokr, "x", require_lora=False)
    with pytest.raises(ValueError, match="holds no LoRA"):
        validation.check_lora_tensors(lokr, "x")
    with pytest.raises(ValueError, match="contains NaN"):
        validation.check_lora_tensors(lokr | {"lora_unet_a.alpha": torch.tensor(math.nan)}, "x", require_lora=False)
