"""The resumable work directory (issue 20, item 3): a killed MACE run resumes where it stopped and gives the same
fused weights; another run's directory is refused."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import LAB_TEMPLATES

from erasure.errors import BadInputError
from erasure.mace import MaceSettings, mace
from erasure.prior import gram
from erasure.progress import Progress
from erasure.prompts import Concept, prior_prompts
from erasure.workdir import WorkDir

WORDS = ("circle", "square", "star")


class Killed(Exception):
    pass


def _settings(**kw):
    # one concept at a time, so that a run can die between two concepts (batches: the last test)
    # fixed LoRA budgets (lora_target 0), so that the progress counts below are known in advance
    return MaceSettings(images_per_concept=2, sample_steps=3, guidance=3.0, lora_steps=3, lora_lr=1e-2,
                        lora_batch=2, concept_batch=1, lora_target=0.0).override(**kw)


def _concepts():
    return [Concept(w, "shape", templates=LAB_TEMPLATES, data_prompt="a photo of a {c}") for w in WORDS]


def _killer(after: int, log: list[str]):
    """A progress whose log raises at the LoRA stage of concept ``after + 1`` (the process 'dies' there)."""
    def say(msg):
        log.append(msg)
        if msg.startswith("stage 3/4") and sum(m.startswith("stage 3/4") for m in log) > after:
            raise Killed(msg)
    return Progress(log=say)


def _assert_same(a, b, atol=1e-6):
    assert set(a.deltas) == set(b.deltas)
    for n in a.deltas:
        torch.testing.assert_close(a.deltas[n].matrix(), b.deltas[n].matrix(), rtol=0, atol=atol)


def test_killed_run_resumes_with_the_same_result(tiny_backbone, tmp_path):
    bb = tiny_backbone
    prior = gram(bb, prior_prompts(100), tmp_path)
    s = _settings()
    ref = mace(bb, _concepts(), s, prior)
    wd = tmp_path / "work"
    log: list[str] = []
    with pytest.raises(Killed):
        mace(bb, _concepts(), s, prior, progress=_killer(1, log), work_dir=wd)
    assert sorted(p.name for p in wd.iterdir()) == ["concept-00000.safetensors", "manifest.json"]
    manifest = json.loads((wd / "manifest.json").read_text())
    assert manifest["base_model"] == bb.fingerprint() and [c["text"] for c in manifest["concepts"]] == list(WORDS)
    log2: list[str] = []
    steps: list[int] = []
    res = mace(bb, _concepts(), s, prior, progress=Progress(log=log2.append, update=steps.append), work_dir=wd)
    assert sum(steps) == 3 * (s.sample_steps + s.lora_steps) and steps[0] == s.sample_steps + s.lora_steps
    assert any("1 of 3 concepts finished already" in m for m in log2)
    trained = [m for m in log2 if m.startswith("stage 3/4")]
    assert trained[0] == "stage 3/4: attention-loss LoRA for 'square' (1/2)"
    assert trained[1].startswith("stage 3/4: attention-loss LoRA for 'star' (2/2; about ")
    assert not any("'circle'" in m for m in log2 if m.startswith("stage 1/4"))  # its images are not made again
    _assert_same(res.weights, ref.weights, atol=1e-7)
    assert [lr.losses for lr in res.loras] == [lr.losses for lr in ref.loras]
    assert res.weights.metadata["erasure.concepts"] == ref.weights.metadata["erasure.concepts"]
    assert len(res.data) == 2 and res.unet_evaluations < ref.unet_evaluations
    # a third run finds everything finished: no training at all, the same result
    log3: list[str] = []
    again = mace(bb, _concepts(), s, prior, progress=Progress(log=log3.append), work_dir=wd)
    assert not any(m.startswith(("stage 1/4", "stage 3/4")) for m in log3)
    _assert_same(again.weights, ref.weights, atol=1e-7)


def test_another_run_is_refused_and_a_damaged_concept_is_redone(tiny_backbone, tmp_path):
    bb = tiny_backbone
    prior = gram(bb, prior_prompts(100), tmp_path)
    wd = tmp_path / "work"
    first = mace(bb, _concepts()[:2], _settings(), prior, work_dir=wd)
    with pytest.raises(BadInputError, match=r"lora_steps 3 -> 4.*new --work-dir"):
        mace(bb, _concepts()[:2], _settings(lora_steps=4), prior, work_dir=wd)
    with pytest.raises(BadInputError, match="concept list"):
        mace(bb, _concepts(), _settings(), prior, work_dir=wd)
    with pytest.raises(BadInputError, match="prior"):
        mace(bb, _concepts()[:2], _settings(), prior * 2, work_dir=wd)
    # the same prior summed in another order (another thread count or machine: about 1e-7 of it) resumes the run
    moved = prior * (1 + 1e-7 * torch.randn(prior.shape, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(moved, prior)
    log0: list[str] = []
    mace(bb, _concepts()[:2], _settings(), moved, progress=Progress(log=log0.append), work_dir=wd)
    assert not any(m.startswith("stage 3/4") for m in log0)
    # a truncated concept file counts as unfinished: that concept is trained again, with the same result
    f = wd / "concept-00001.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    log: list[str] = []
    again = mace(bb, _concepts()[:2], _settings(), prior, progress=Progress(log=log.append), work_dir=wd)
    assert [m for m in log if m.startswith("stage 3/4")] == ["stage 3/4: attention-loss LoRA for 'square'"]
    _assert_same(again.weights, first.weights, atol=1e-7)
    # another base model (its K/V weights changed)
    with torch.no_grad():
        next(iter(bb.cross_attention_kv().values())).weight.add_(0.01)
    with pytest.raises(BadInputError, match="base model"):
        mace(bb, _concepts()[:2], _settings(), prior, work_dir=wd)


def test_a_low_rank_and_a_dense_entry_round_trip(tmp_path):
    from erasure.weights import Delta, ErasureWeights

    w = ErasureWeights({"a": Delta(up=torch.randn(4, 1), down=torch.randn(1, 3), scale=0.5),
                        "b": Delta(dense=torch.randn(4, 3))}, {"erasure.method": "x"})
    d = WorkDir.open(tmp_path / "w", {"concepts": [{"text": "x"}]})
    assert d.load(0) is None
    d.save(0, w, torch.ones(2, 3, dtype=torch.float64), {"losses": [1.0]})
    got, emb, info = d.load(0)
    assert info == {"losses": [1.0]} and emb.dtype == torch.float64 and got.metadata == w.metadata
    for n in w.deltas:
        torch.testing.assert_close(got.deltas[n].matrix(), w.deltas[n].matrix())
    with pytest.raises(BadInputError, match="belongs to another run"):
        WorkDir.open(tmp_path / "w", {"concepts": [{"text": "y"}]})


def test_a_run_killed_in_a_concept_batch_resumes_with_another_batch(tiny_backbone, tmp_path):
    """Concepts trained two at a time: a run dying in the second batch keeps the first batch's two concepts; the
    resumed run may use another concept batch (it changes the result by float rounding only)."""
    bb = tiny_backbone
    prior = gram(bb, prior_prompts(100), tmp_path)
    ref = mace(bb, _concepts(), _settings(concept_batch=None), prior)
    wd = tmp_path / "work"
    log: list[str] = []
    with pytest.raises(Killed):
        mace(bb, _concepts(), _settings(concept_batch=2), prior, progress=_killer(1, log), work_dir=wd)
    assert "stage 3/4: attention-loss LoRA for 'circle', 'square' (1-2/3)" in log
    assert sorted(p.name for p in wd.iterdir()) == ["concept-00000.safetensors", "concept-00001.safetensors",
                                                    "manifest.json"]
    log2: list[str] = []
    res = mace(bb, _concepts(), _settings(concept_batch=None), prior, progress=Progress(log=log2.append),
               work_dir=wd)
    assert [m for m in log2 if m.startswith("stage 3/4")] == ["stage 3/4: attention-loss LoRA for 'star'"]
    _assert_same(res.weights, ref.weights, atol=1e-5)


_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[4]))
from tiny_models import tiny_lab_layout
from test_workdir import _concepts, _settings
from erasure.mace import mace
from erasure.prior import gram
from erasure.prompts import prior_prompts
bb = tiny_lab_layout(sys.argv[2])
mace(bb, _concepts(), _settings(lora_steps=40), gram(bb, prior_prompts(100)), work_dir=sys.argv[3])
"""


def test_a_process_killed_by_the_system_resumes_with_the_same_result(tiny_backbone, lab_tokenizer_dir, tmp_path):
    """Item 3 with a real process: SIGKILL (no exception handler, no cleanup) right after its first concept is
    written; a rerun on the directory trains only the others and gives the uninterrupted run's result."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    wd = tmp_path / "work"
    tests_dir = str(Path(__file__).parent)
    # the parent's thread count: the result moves with it (float sums in another order), and the resumed result
    # must equal one made in this process
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": os.pathsep.join([str(Path(tests_dir).parent),
                                                                              os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, tests_dir, str(lab_tokenizer_dir), str(wd), threads],
                             env=env, stderr=subprocess.PIPE)
    first = wd / "concept-00000.safetensors"
    deadline = time.time() + 300
    while not first.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    _, err = child.communicate()
    assert first.exists(), f"the child died before its first concept: {err.decode()[-2000:]}"
    assert child.returncode == -signal.SIGKILL
    assert not (wd / "concept-00002.safetensors").exists(), "the child finished before it was killed"
    s = _settings(lora_steps=40)
    prior = gram(tiny_backbone, prior_prompts(100))
    log: list[str] = []
    resumed = mace(tiny_backbone, _concepts(), s, prior, progress=Progress(log=log.append), work_dir=wd)
    trained = [m for m in log if m.startswith("stage 3/4")]
    assert "'circle'" not in " ".join(trained) and len(trained) in (1, 2)
    _assert_same(resumed.weights, mace(tiny_backbone, _concepts(), s, prior).weights, atol=1e-7)


def test_a_manifest_from_before_sketches_resumes_on_the_same_prior_only():
    from erasure.workdir import matrix_sketch, same_matrix, tensor_hash

    g = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    prior = g @ g.T
    assert same_matrix(tensor_hash(prior), matrix_sketch(prior))  # a bare hash, as manifests held before
    assert not same_matrix(tensor_hash(prior), matrix_sketch(prior * (1 + 1e-7)))
    assert not same_matrix(matrix_sketch(prior), matrix_sketch(prior * 1.01))
    assert not same_matrix(None, matrix_sketch(prior)) and same_matrix(None, None)
