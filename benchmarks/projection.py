"""Projected peak GPU memory of the methods at full resolution (SD1.5 at 512 px, SDXL at 1024 px).

Method: peak = resident tensors, counted exactly, + activations saved for backward, measured and extrapolated.

* Exact: weights (UNet and text encoders) in 16-bit (the default on GPU: fp16/bf16 weights); gradients in the
  weights' dtype where the method takes gradients of frozen weights (ANT's saliency maps); saliency masks (1 byte per
  entry, one map plus the running intersection); trainable parameters, their gradients and Adam's two moments in
  float32; a sparse delta's int64 indices.
* Measured: the bytes of the tensors autograd saves for backward in one row's forward (a
  ``saved_tensors_hooks`` sum over distinct storages, parameters excluded), on the real architecture at three
  small latent sizes on this machine, in float32 (SDXL: bfloat16, to fit in memory). Saved activations grow
  linearly with the pixel count once attention is computed without materialising the HW x HW matrix (PyTorch's
  SDPA on GPU and CPU), so a line through the two smallest sizes is extrapolated to the target and checked against
  the third, then scaled to 16 bits.
  Two graphs are measured: the whole UNet (gradients for every weight: ANT's saliency maps and sparse deltas,
  full finetuning) and MACE's attention-loss graph (rank-1 K/V LoRA, explicit attention probabilities, gradient
  only through cross-attention).
* Assumptions: no UNet gradient checkpointing (the library enables none), no CPU offload of the UNet, the text
  encoders resident on the GPU, the measured ANT configuration (``cases.MEASURED_DEFAULTS``: saliency maps of
  4 x 8 rows, training forwards of 6 rows with the preservation term; MACE: LoRA batch 1). The sparse delta's size
  depends on the model's gradients: it is shown at the selected fraction measured in this run (random weights) and
  at its upper bound (a single map's ``saliency_fraction``).

When the size runs on a GPU, ``--size gpu`` also measures the peak (``torch.cuda.max_memory_allocated``) of ours at
the target resolution in bf16 with the default batch shapes (``measure_peak``), beside the projection.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from erasure.ant import AntSettings
from erasure.deltas import TrainableLoRA
from erasure.mace import AttentionLoss, MaceSettings

from .archs import build_backbone, param_count

TARGET_LATENT = {"sd15": 64, "sdxl": 128}  # 512 px and 1024 px
TARGET_GIB = {"sd15": 10, "sdxl": 20}
PROBE_LATENTS = {"full": (8, 16, 24), "tiny": (8, 16, 24)}


def saved_bytes(fn, params: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, parameters excluded."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _inputs(bb, latent: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *bb.latent_shape(latent), generator=g).to(bb.device, bb.dtype)
    return x, torch.tensor([500], device=bb.device), bb.encode_text(["a photo of a dog"])


def probe_dtype(arch: str, scale: str) -> torch.dtype:
    """float32, except the real SDXL, probed in bfloat16 so that it fits beside other work in 24 GiB."""
    return torch.bfloat16 if (arch, scale) == ("sdxl", "full") else torch.float32


def probe_activations(arch: str, scale: str, device: str = "cpu") -> dict:
    """Saved bytes per row (in ``probe_dtype``) at the probe latents, for the full-UNet graph and MACE's graph."""
    latents = PROBE_LATENTS[scale]
    dtype = probe_dtype(arch, scale)
    bb = build_backbone(arch, scale, latents[0], dtype, device)
    unet = bb.unet()
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    full, attn = [], []
    for lat in latents:
        x, t, cond = _inputs(bb, lat)
        # gradients for every weight: each layer keeps its input, as ANT's saliency maps (and full finetuning) do,
        # and as ANT's sparse deltas do (their hook on every Linear/Conv2d keeps the layer's input for backward)
        unet.requires_grad_(True)
        full.append(saved_bytes(lambda x=x, t=t, cond=cond: bb.predict_noise(x, t, cond), params))
        unet.requires_grad_(False)
        with TrainableLoRA(bb.cross_attention_kv(), rank=1) as lora:
            lora_params = params | {p.untyped_storage().data_ptr() for p in lora.parameters()}
            loss = AttentionLoss([5, 6, 7], torch.ones(1, lat, lat))

            def mace_fwd(x=x, t=t, cond=cond, loss=loss, lat=lat) -> None:
                with bb.capture_attention(loss, lat):
                    bb.predict_noise(x, t, cond)

            attn.append(saved_bytes(mace_fwd, lora_params))
    te = sum(param_count(e) for e in bb.text_encoders)
    layers = {n: m.weight.numel() for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    return {"arch": arch, "scale": scale, "latents": list(latents), "dtype_bytes": dtype.itemsize,
            "full_unet_bytes_per_row": full,
            "mace_graph_bytes_per_row": attn, "unet_params": param_count(unet), "text_encoder_params": te,
            "linear_conv_params": sum(layers.values()), "largest_layer_params": max(layers.values())}


def _line(latents: list[int], values: list[int], target: int) -> tuple[float, float]:
    """Extrapolate linearly in pixel count through the two smallest probes; relative error at the third."""
    p = [lat * lat for lat in latents]
    b = (values[1] - values[0]) / (p[1] - p[0])
    a = values[0] - b * p[0]
    check = abs(a + b * p[2] - values[2]) / values[2] if len(p) > 2 else math.nan
    return a + b * target * target, check


def _late_steps(s: AntSettings) -> set[int]:
    """The mid/late steps each saliency map pairs with early ones (as ``erasure.ant.saliency_masks``)."""
    n_late = s.trajectory_steps - 1 - s.early_steps
    return {s.early_steps + round(i * (n_late - 1) / 7) for i in range(min(8, n_late))}


def project_arch(probe: dict, selected_fraction: float | None, weight_bytes: int = 2) -> dict:
    """Projected peaks (bytes) at the arch's target resolution with the library's default settings."""
    arch = probe["arch"]
    lat = TARGET_LATENT[arch]
    act_full, err_full = _line(probe["latents"], probe["full_unet_bytes_per_row"], lat)
    act_mace, err_mace = _line(probe["latents"], probe["mace_graph_bytes_per_row"], lat)
    half = weight_bytes / probe.get("dtype_bytes", 4)  # activations scale with the dtype the probe ran in
    act_full, act_mace = act_full * half, act_mace * half
    from .cases import MEASURED_DEFAULTS

    s, m = AntSettings().override(**MEASURED_DEFAULTS), MaceSettings()
    weights = (probe["unet_params"] + probe["text_encoder_params"]) * weight_bytes
    lc = probe["linear_conv_params"]
    saliency_rows = 4 * len(_late_steps(s))
    train_rows = 6 if s.preserve > 0 else 4
    out = {"arch": arch, "pixels": 8 * lat, "weight_bytes": weight_bytes, "weights": weights,
           "activation_per_row_full_unet": act_full, "activation_per_row_mace": act_mace,
           "line_check_rel_error": {"full_unet": round(err_full, 3), "mace": round(err_mace, 3)},
           "target_gib": TARGET_GIB[arch]}
    saliency = weights + lc * weight_bytes + 2 * lc + saliency_rows * act_full
    fractions = {"upper_bound": s.saliency_fraction}
    if selected_fraction is not None:
        fractions["measured"] = selected_fraction
    ant_single = {}
    for label, f in fractions.items():
        sel = f * lc
        train = weights + sel * (4 + 8 + 4 + 8) + 4 * probe["largest_layer_params"] + train_rows * act_full
        ant_single[label] = {"selected_fraction": round(f, 4), "saliency_phase": saliency, "training_phase": train,
                             "peak": max(saliency, train)}
    out["ant-single"] = ant_single
    # the reference in float32 as published: two UNets, full gradients, a mask (1 byte per parameter); saliency with
    # the conditional rows of 8 pairs carrying gradient (16 rows), then training (2 rows) with Adam's two moments
    p32 = probe["unet_params"]
    act32 = act_full * 4 / weight_bytes  # the reference runs in float32
    ref_sal = p32 * (4 + 4 + 4 + 1) + probe["text_encoder_params"] * 4 + 2 * len(_late_steps(s)) * act32
    ref_train = p32 * (4 + 4 + 4 + 8 + 1) + probe["text_encoder_params"] * 4 + 2 * act32
    out["ant-single-reference"] = {"saliency_phase": ref_sal, "training_phase": ref_train,
                                   "peak": max(ref_sal, ref_train)}
    out["ant-multi"] = {"peak": weights + train_rows * act_full}
    out["mace"] = {"peak": weights + m.lora_batch * act_mace}
    out["rows"] = {"saliency": saliency_rows, "ant_training": train_rows, "mace_lora": m.lora_batch}
    return out


def _probe_in_subprocess(arch: str, scale: str) -> dict:
    """The probe in its own process: SDXL's weights alone are 13 GiB in float32, and a process killed for memory
    must not take the whole benchmark's results with it."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "benchmarks.projection", arch, scale], cwd=root, capture_output=True,
                       text=True)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    return {"arch": arch, "error": f"exit {p.returncode}: {(p.stderr or '').strip().splitlines()[-1:]}"}


def project(size, rows: list[dict], probe_dir: Path | None = None) -> dict:
    """Probe both archs at the size's scale on CPU and project; ``measured`` holds GPU peaks when on a GPU.
    ``probe_dir``: reuse (or keep) each probe's result there as ``probe-<arch>-<scale>.json``."""
    res = {"method": __doc__.split("\n\n")[1].strip(), "archs": {}}
    for arch in ("sd15", "sdxl"):
        cached = probe_dir / f"probe-{arch}-{size.scale}.json" if probe_dir else None
        if cached is not None and cached.exists():
            probe = json.loads(cached.read_text())
        else:
            probe = _probe_in_subprocess(arch, size.scale)
            if cached is not None and "error" not in probe:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(probe, indent=1))
        if "error" in probe:
            res["archs"][arch] = {"probe": probe}
            continue
        fr = [r.get("selected_fraction") for r in rows if r.get("method") == "ant-single" and r.get("arch") == arch
              and r.get("impl") == "ours" and r.get("selected_fraction") is not None]
        res["archs"][arch] = {"probe": probe, "projection": project_arch(probe, fr[0] if fr else None)}
    if size.device == "cuda" and size.scale == "full":
        res["measured"] = []
        for arch in ("sd15", "sdxl"):
            for method in ("ant-single", "mace"):
                res["measured"].append(measure_peak(arch, method))
                torch.cuda.empty_cache()
    return res


def measure_peak(arch: str, method: str) -> dict:
    """On a GPU: ours at the target resolution in bf16, default batch shapes, few steps; the allocator's peak."""
    from erasure.ant import ant
    from erasure.mace import Concept, mace
    from erasure.prior import gram
    from erasure.prompts import prior_prompts

    from .meter import Meter

    lat = TARGET_LATENT[arch]
    bb = build_backbone(arch, "full", lat, torch.bfloat16, "cuda")
    prior_list = prior_prompts(n=64)
    try:
        with Meter(bb.unet(), torch.device("cuda")) as meter:
            if method == "ant-single":
                ant(bb, "concept000", AntSettings(steps=2, trajectories=2, saliency_maps=1, refresh_every=0),
                    preserve_prompts=prior_list)
            else:
                mace(bb, [Concept("concept000", "background")],
                     MaceSettings(images_per_concept=1, sample_steps=2, lora_steps=2), gram(bb, prior_list))
        return {"arch": arch, "method": method, "pixels": 8 * lat, "peak_mem_bytes": meter.peak_mem_bytes}
    except torch.cuda.OutOfMemoryError as e:
        return {"arch": arch, "method": method, "pixels": 8 * lat, "error": f"out of memory: {str(e)[:200]}"}


def format_projection(p: dict) -> str:
    g = 2**30
    lines = ["", "== projected peak GPU memory (GiB), 16-bit weights, default settings, no checkpointing =="]
    for arch, d in p["archs"].items():
        if "projection" not in d:
            lines.append(f"{arch}: probe failed ({d['probe'].get('error')})")
            continue
        pr = d["projection"]
        lines.append(f"{arch} at {pr['pixels']} px (target < {pr['target_gib']} GiB): weights {pr['weights'] / g:.2f}, "
                     f"activations/row {pr['activation_per_row_full_unet'] / g:.2f} (UNet), "
                     f"{pr['activation_per_row_mace'] / g:.3f} (MACE graph); line check error "
                     f"{pr['line_check_rel_error']}")
        for label, a in pr["ant-single"].items():
            lines.append(f"  ant-single ours ({label} fraction {a['selected_fraction']}): saliency phase "
                         f"{a['saliency_phase'] / g:.1f} ({pr['rows']['saliency']} rows), training phase "
                         f"{a['training_phase'] / g:.1f} ({pr['rows']['ant_training']} rows) "
                         f"-> peak {a['peak'] / g:.1f}")
        lines.append(f"  ant-single reference (fp32): {pr['ant-single-reference']['peak'] / g:.1f}")
        lines.append(f"  ant-multi ours: {pr['ant-multi']['peak'] / g:.1f}    mace ours: {pr['mace']['peak'] / g:.1f}")
    for m in p.get("measured", []):
        val = m.get("error") or f"{m['peak_mem_bytes'] / g:.2f} GiB"
        lines.append(f"measured on GPU: {m['method']} {m['arch']} {m['pixels']} px bf16: {val}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print("PROBE " + json.dumps(probe_activations(sys.argv[1], sys.argv[2])), flush=True)
