"""Runtime guards of the library's entry points: one erasure per model at a time, no leaked torch state, and out of
memory answered with what to lower.

Why: an erasure temporarily hooks the model's layers (and, in ComfyUI, swaps its weights for trainable copies), so
two erasures of the same model running at once (two nodes on one MODEL, the same graph queued twice) would see each
other's hooks; a per-model lock makes them take turns. Training flips grad mode and draws random numbers, which
must not leak into the host (ComfyUI runs every prompt in inference mode and seeds its own sampling). An
out-of-memory error deep inside a UNet says nothing about which setting to lower; the entry point re-raises it as an
:class:`ErasureOutOfMemoryError` (still a ``torch.OutOfMemoryError``, so hosts that unload models on OOM still do)
whose message names the settings.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from .errors import ErasureOutOfMemoryError

F = TypeVar("F", bound=Callable)

_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(module: object) -> threading.RLock:
    """The re-entrant lock of one model (keyed by its UNet module object, which ComfyUI's clones share)."""
    with _locks_guard:
        lock = _locks.get(module)
        if lock is None:
            lock = _locks[module] = threading.RLock()
        return lock


@contextlib.contextmanager
def torch_state_preserved() -> Iterator[None]:
    """Grad mode, default dtype and the CPU (and initialised CUDA) random generators are as before on exit, on
    error and on interrupt alike."""
    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def oom_message(method: str, advice: str) -> str:
    return f"{method} ran out of memory: lower {advice}; or close other programs that use the GPU"


def entry_point(method: str, advice: str) -> Callable[[F], F]:
    """Decorate a library entry point whose first argument is the backbone: the model's lock is held for the call,
    torch's global state is restored afterwards, and out of memory becomes an :class:`ErasureOutOfMemoryError`
    naming ``advice`` (the settings to lower). The memory of the failed call is released before re-raising."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(backbone, *args, **kwargs):
            unet = backbone.unet() if hasattr(backbone, "unet") else backbone
            with model_lock(unet), torch_state_preserved():
                try:
                    return fn(backbone, *args, **kwargs)
                except ErasureOutOfMemoryError:
                    raise
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if not _is_oom(e):
                        raise
            # only out of memory gets here; raised outside the handler so that the failed call's frames (and the
            # tensors they hold) are freed first, and the accelerator's cached blocks given back
            if torch.cuda.is_available():
                gc.collect()
                torch.cuda.empty_cache()
            raise ErasureOutOfMemoryError(oom_message(method, advice))

        return guarded  # type: ignore[return-value]

    return wrap
