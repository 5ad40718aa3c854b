"""What one benchmark run measures, taken from outside the library (hooks only; no library code is changed).

- UNet evaluations: a forward pre-hook on the UNet counts the rows of every batch (one row = one noise prediction of
  one latent, so a classifier-free-guidance step of one image counts 2, as the library counts), and the calls, which
  shows how well work is batched. A forward hook puts a gradient hook on the output, which counts the rows that
  backward goes through (``torch.autograd.grad`` included), also when a loss on attention maps reaches only the
  cross-attention layers (MACE's stage 3: a partial backward, counted as one).
- Trainable parameters and optimizer state: a global optimizer step post-hook reads every optimizer that steps
  (Adam, AdamW, whatever code created it) and keeps the largest parameter count and state size seen.
- Peak memory: on CUDA the allocator's peak (``max_memory_allocated``), reset when the run starts; on CPU the
  process's peak resident set size (``VmHWM``), reset through ``/proc/self/clear_refs`` when the run starts. Each run
  is its own process (``run.py``), so no run sees another's memory. Both include the model's weights.
- Time: wall-clock, and the process's CPU time (``cpu_s``), which on a shared machine is the steadier figure when
  other work competes for the cores (with one thread per process it is the compute time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


def _rows(args: tuple, kwargs: dict) -> int:
    x = args[0] if args else kwargs.get("sample")
    return int(x.shape[0])


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def optimizer_params(opt: torch.optim.Optimizer) -> int:
    return sum(p.numel() for g in opt.param_groups for p in g["params"])


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # not Linux: the peak then includes model construction
            pass


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return _vm_hwm()


@dataclass
class Meter:
    """Counts while active (``with Meter(unet, device) as m``); ``m.figures()`` is the row's measured part."""

    unet: nn.Module
    device: torch.device
    forward_rows: int = 0
    forward_calls: int = 0
    backward_rows: int = 0
    trainable_params: int = 0
    optimizer_state_bytes: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_mem_bytes: int = 0
    _handles: list = field(default_factory=list)
    _call: dict | None = None
    _t0: float = 0.0
    _c0: float = 0.0

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        rows = _rows(args, kwargs)
        self.forward_calls += 1
        self.forward_rows += rows
        self._call = {"rows": rows, "counted": False}

    def _watch_output(self, out: object) -> None:
        """Count the current forward's rows once, when backward first reaches any watched output of it."""
        sample = getattr(out, "sample", out[0] if isinstance(out, tuple) else out)
        call = self._call
        if call is None or not (torch.is_tensor(sample) and sample.requires_grad):
            return

        def count(grad: torch.Tensor) -> None:
            if not call["counted"]:
                call["counted"] = True
                self.backward_rows += call["rows"]

        sample.register_hook(count)

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        self._watch_output(out)

    def _post_inner(self, module: nn.Module, args: tuple, out: object) -> None:
        self._watch_output(out)

    def _opt_step(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.trainable_params = max(self.trainable_params, optimizer_params(opt))
        self.optimizer_state_bytes = max(self.optimizer_state_bytes, optimizer_state_bytes(opt))

    def watch(self, unet: nn.Module) -> None:
        """Count another UNet too (a reference implementation's frozen copy). Copy a UNet *before* the meter
        starts: ``copy.deepcopy`` would copy these hooks with it."""
        self._handles += [unet.register_forward_pre_hook(self._pre, with_kwargs=True),
                          unet.register_forward_hook(self._post, with_kwargs=True)]
        # losses on attention maps (MACE) reach the cross-attention layers without reaching the UNet's output
        self._handles += [m.register_forward_hook(self._post_inner) for n, m in unet.named_modules()
                          if n.endswith("attn2")]

    def __enter__(self) -> Meter:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handles = [register_optimizer_step_post_hook(self._opt_step)]
        self.watch(self.unet)
        reset_peak(self.device)
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = time.process_time() - self._c0
        self.peak_mem_bytes = peak_bytes(self.device)
        for h in self._handles:
            h.remove()
        self._handles = []

    def figures(self) -> dict[str, float | int]:
        return {"unet_evals": self.forward_rows, "unet_forward_calls": self.forward_calls,
                "unet_backward_evals": self.backward_rows, "wall_s": round(self.wall_s, 3),
                "cpu_s": round(self.cpu_s, 3),
                "peak_mem_bytes": self.peak_mem_bytes, "optimizer_state_bytes": self.optimizer_state_bytes,
                "trainable_params": self.trainable_params}
