"""Several processes with ``torch.distributed``: the few calls MACE needs to shard concepts over ranks and add up its
closed-form sums, each a no-op in a single process.

``torchrun --nproc-per-node N -m erasure mace ...`` (or ``accelerate launch``) sets ``WORLD_SIZE``, ``RANK`` and the
rendezvous address in the environment; :func:`init_from_env` joins the process group (NCCL when the model runs on
CUDA, gloo otherwise). Nothing here starts processes. Core module: imports no method.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes the result and prints the summary."""
    return rank() == 0


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join the process group that ``torchrun`` described in the environment (``WORLD_SIZE`` > 1); NCCL for a CUDA
    ``device`` (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. Returns whether several processes run. Already
    initialised: nothing to do; no ``WORLD_SIZE`` or 1: a single process, nothing initialised."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return active()


def owned(n: int) -> list[int]:
    """The indices of ``n`` items this rank works on: round robin (``i % world_size == rank``), so that a sorted
    list of names spreads evenly. All of them in a single process."""
    return list(range(rank(), n, world_size()))


def _device_for_backend() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (the result on every rank); returns it. No-op in a single process.
    Tensors on another device than the backend's (CPU float64 sums under NCCL) travel there and back."""
    if not active():
        return tensor
    dev = _device_for_backend()
    if tensor.device == dev:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    moved = tensor.to(dev)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    tensor.copy_(moved.to(tensor.device))
    return tensor


def all_gather_object(value: T) -> list[T]:
    """Every rank's ``value``, in rank order (``[value]`` in a single process)."""
    if not active():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if active():
        dist.barrier()
