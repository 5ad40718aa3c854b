"""MACE over several processes (issue 20, item 2): two CPU processes on gloo give the single-process fused weights."""

from __future__ import annotations

import datetime
import re
import socket

import pytest
import torch
from tiny_models import LAB_TEMPLATES, tiny_lab_layout

from erasure import distributed
from erasure.mace import MaceSettings, mace
from erasure.prior import gram
from erasure.progress import Progress
from erasure.prompts import Concept, prior_prompts

WORDS = ("circle", "square", "star")  # 3 concepts on 2 ranks: rank 0 owns two, rank 1 one


def _settings():
    # a fixed LoRA budget: with lora_target the rounds raise the rate, and the float rounding between one process's
    # concept batches and two processes' grows past the tolerance below
    return MaceSettings(images_per_concept=2, sample_steps=3, guidance=3.0, lora_steps=3, lora_lr=1e-2, lora_batch=2,
                        lora_target=0.0)


def _concepts():
    return [Concept(w, "shape", templates=LAB_TEMPLATES, data_prompt="a photo of a {c}") for w in WORDS]


def _worker(rank: int, world: int, port: int, tokenizer_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=120))
    try:
        assert distributed.active() and distributed.rank() == rank and distributed.world_size() == world
        assert distributed.owned(3) == ([0, 2] if rank == 0 else [1])
        bb = tiny_lab_layout(tokenizer_dir)
        prior = gram(bb, prior_prompts(100))
        log: list[str] = []
        res = mace(bb, _concepts(), _settings(), prior, progress=Progress(log=log.append),
                   work_dir=f"{out_dir}/work")
        # concept names of every LoRA-stage message (one message names a whole concept batch)
        trained = [w for m in log if m.startswith("stage 3/4") for w in re.findall(r"'([^']*)'", m)]
        torch.save({"deltas": {n: d.matrix() for n, d in res.weights.deltas.items()},
                    "cfr": {n: d.matrix() for n, d in res.cfr.deltas.items()},
                    "losses": [lr.losses for lr in res.loras], "trained": trained,
                    "concepts": res.weights.metadata["erasure.concepts"], "evals": res.unet_evaluations},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    # float rounding (sums in another order), relative to the layer's largest entry: an absolute 1e-6 was met by
    # 1.08e-6 on an entry of 0.06 in one run (a relative 1.8e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()) + 1e-7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_helpers_are_no_ops():
    t = torch.ones(3)
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.all_reduce_(t) is t and t.tolist() == [1.0, 1.0, 1.0]
    assert distributed.owned(3) == [0, 1, 2] and distributed.all_gather_object("x") == ["x"]
    assert distributed.init_from_env() is False  # no WORLD_SIZE: nothing initialised
    distributed.barrier()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_processes_give_the_single_process_result(tiny_backbone, lab_tokenizer_dir, tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(lab_tokenizer_dir), str(tmp_path)), nprocs=2,
                                join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["trained"] == ["circle", "star"] and r1["trained"] == ["square"]  # sharded, each concept once
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count: what differs is then only the all-reduce's order
    try:
        _check_against_one_process(tiny_backbone, r0, r1, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _check_against_one_process(bb, r0: dict, r1: dict, tmp_path) -> None:
    prior = gram(bb, prior_prompts(100))
    ref = mace(bb, _concepts(), _settings(), prior)
    for r in (r0, r1):  # every rank holds the same, single-process result
        assert set(r["deltas"]) == set(ref.weights.deltas)
        for n, m in r["deltas"].items():
            _close(m, ref.weights.deltas[n].matrix())
        for n, m in r["cfr"].items():
            _close(m, ref.cfr.deltas[n].matrix())
        # float32 training, the concepts batched otherwise on the ranks: equal to rounding
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor([lr.losses for lr in ref.loras]),
                                   rtol=1e-4, atol=1e-6)
        assert r["concepts"] == ref.weights.metadata["erasure.concepts"] and r["evals"] == ref.unet_evaluations
    # the work directory the two ranks filled resumes in one process: nothing left to train, the same result
    log: list[str] = []
    again = mace(bb, _concepts(), _settings(), prior, progress=Progress(log=log.append), work_dir=tmp_path / "work")
    assert not any(m.startswith("stage 3/4") for m in log)
    for n, d in again.weights.deltas.items():
        _close(d.matrix(), ref.weights.deltas[n].matrix())
