"""Projected peak GPU memory of the methods at full resolution (SD1.5 at 512 px, SDXL at 1024 px).

Method: peak = resident tensors, counted exactly, + activations saved for backward, measured and extrapolated.

* Exact: weights (UNet and text encoders) in 16-bit (the default on GPU: fp16/bf16 weights); trainable parameters
  (ANT's dense float32 deltas), their gradients and Adam's two moments in float32 (16 bytes per entry); for the
  historical cached-saliency configuration also the frozen weights' gradients (saliency maps), the masks and the
  sparse delta's int64 indices.
* Measured: the bytes of the tensors autograd saves for backward in one row's forward (a
  ``saved_tensors_hooks`` sum over distinct storages, parameters excluded), on the real architecture at three
  small latent sizes on this machine, in float32 (SDXL: bfloat16, to fit in memory). Saved activations grow
  linearly with the pixel count once attention is computed without materialising the HW x HW matrix (PyTorch's
  SDPA on GPU and CPU), so a line through the two smallest sizes is extrapolated to the target and checked against
  the third, then scaled to 16 bits (the inputs of the layers a dense delta trains stay float32: the delta casts
  and saves them). Four graphs: ANT's dense deltas with the UNet frozen (on every cross-attention Linear,
  ``xattn``; on the cross-attention K/V, ``kv``, the default of ANT single
  and multi), the whole UNet (gradients for
  every weight: the saliency maps and sparse deltas of the historical configuration, full finetuning) and MACE's
  attention-loss graph (rank-1 K/V LoRA, explicit attention probabilities, gradient only through cross-attention).
* Gradient checkpointing (``AntSettings.gradient_checkpointing``, diffusers' per-block checkpointing): measured
  the same way with it on (``checkpointed_bytes``): what the forward still holds for backward (tensors saved outside
  the checkpointed blocks, and the blocks' inputs, which checkpoint keeps), plus the largest single block's saved
  tensors, which recomputing it during backward materialises again (each block on its own line, the largest at the
  target taken). Projected with and without (``floor``: the peak without any activations).
* Assumptions: no CPU offload, the text encoders resident on the GPU,
  batch rows as the defaults run them (ANT: 6 rows per backward, ``ant_training_rows``; MACE: LoRA batch 1); the
  no-grad forwards (on-policy regeneration, frozen predictions) keep nothing for backward and are not counted.

When the size runs on a GPU, ``--size gpu`` also measures the peak (``torch.cuda.max_memory_allocated``) of ours at
the target resolution in bf16 with the default batch shapes (``measure_peak``), beside the projection.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from erasure.ant import AntSettings, scope_modules
from erasure.deltas import TrainableDeltas, TrainableLoRA
from erasure.mace import AttentionLoss, MaceSettings

from .archs import build_backbone, param_count

TARGET_LATENT = {"sd15": 64, "sdxl": 128}  # 512 px and 1024 px
TARGET_GIB = {"sd15": 10, "sdxl": 20}
PROBE_LATENTS = {"full": (8, 16, 24), "tiny": (8, 16, 24)}


def saved_bytes(fn, params: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, parameters excluded."""
    return sum(saved_storages(fn, params).values())


def saved_storages(fn, params: set[int], seen: dict[int, int] | None = None) -> dict[int, int]:
    """The distinct storages (pointer -> bytes) autograd saves while ``fn`` runs, parameters excluded."""
    seen = {} if seen is None else seen

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


def checkpointed_bytes(bb, fn, params: set[int], counter: list[int] | None = None
                       ) -> tuple[int, list[int], list[int]]:
    """One row's forward with the backbone's gradient checkpointing on (diffusers': every ResNet and transformer
    block through non-reentrant ``torch.utils.checkpoint``). Returns (bytes held for backward after the forward: the
    tensors saved outside checkpointed blocks plus the blocks' inputs, which checkpoint keeps for recomputation;
    distinct storages), and per checkpointed block, in call order, the bytes its own forward saves when run with
    grad: what recomputing that block during backward materialises again, one block at a time. Each block is run
    once more, uncheckpointed, under a nested hook to measure it (the probe's cost only). ``counter``: a one-item
    list some forward hooks increase; its increase during each block's measuring run is returned per block too."""
    held: dict[int, int] = {}
    blocks: list[int] = []
    counts: list[int] = []
    counter = [0] if counter is None else counter
    unet = bb.unet()

    def ckpt(module, *args):
        for a in args:
            if torch.is_tensor(a) and a.untyped_storage().data_ptr() not in params:
                held[a.untyped_storage().data_ptr()] = a.untyped_storage().nbytes()
        before = counter[0]
        blocks.append(saved_bytes(lambda: module(*args), params))
        counts.append(counter[0] - before)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    flags = {m: m.gradient_checkpointing for m in unet.modules() if hasattr(m, "gradient_checkpointing")}
    unet.enable_gradient_checkpointing(ckpt)
    try:
        saved_storages(fn, params, held)
    finally:
        for m, f in flags.items():
            m.gradient_checkpointing = f
    return sum(held.values()), blocks, counts


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
    full, attn, xattn, kv, xattn_in, kv_in = [], [], [], [], [], []
    ckpt: dict[str, list] = {k: [] for s in ("xattn", "kv") for k in (s, f"{s}_blocks", f"{s}_block_inputs")}
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
        # ANT's dense deltas, UNet frozen: the graph from the output back to the first layer in scope (ANT single:
        # every cross-attention Linear, ``xattn``; ANT multi: the cross-attention K/V, ``kv``)
        for scope, out, inp in (("xattn", xattn, xattn_in), ("kv", kv, kv_in)):
            mods = scope_modules(bb, scope)
            seen = [0]  # elements of the scoped layers' inputs (the delta saves each, in float32, for its gradient)
            hooks = [m.register_forward_pre_hook(lambda m, a, seen=seen: seen.__setitem__(0, seen[0] + a[0].numel()))
                     for m in mods.values()]
            with TrainableDeltas(mods) as deltas:
                d_params = params | {p.untyped_storage().data_ptr() for p in deltas.parameters()}
                out.append(saved_bytes(lambda x=x, t=t, cond=cond: bb.predict_noise(x, t, cond), d_params))
                inp.append(seen[0])
                # the same graph with checkpointing: what the forward holds, and each block's recomputation (with
                # the elements of the scoped layers' inputs in it, which the delta saves in float32)
                held, blocks, counts = checkpointed_bytes(
                    bb, lambda x=x, t=t, cond=cond: bb.predict_noise(x, t, cond), d_params, seen)
                ckpt[scope].append(held)
                ckpt[f"{scope}_blocks"].append(blocks)
                ckpt[f"{scope}_block_inputs"].append(counts)
            for h in hooks:
                h.remove()
    te = sum(param_count(e) for e in bb.text_encoders)
    layers = {n: m.weight.numel() for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    return {"arch": arch, "scale": scale, "latents": list(latents), "dtype_bytes": dtype.itemsize,
            "full_unet_bytes_per_row": full,
            "mace_graph_bytes_per_row": attn, "xattn_deltas_bytes_per_row": xattn, "kv_deltas_bytes_per_row": kv,
            "xattn_input_elems_per_row": xattn_in, "kv_input_elems_per_row": kv_in,
            "xattn_ckpt_bytes_per_row": ckpt["xattn"], "kv_ckpt_bytes_per_row": ckpt["kv"],
            "xattn_ckpt_block_bytes_per_row": ckpt["xattn_blocks"], "kv_ckpt_block_bytes_per_row": ckpt["kv_blocks"],
            "xattn_ckpt_block_input_elems_per_row": ckpt["xattn_block_inputs"],
            "kv_ckpt_block_input_elems_per_row": ckpt["kv_block_inputs"],
            "xattn_params": sum(m.weight.numel() for m in scope_modules(bb, "xattn").values()),
            "kv_params": sum(m.weight.numel() for m in scope_modules(bb, "kv").values()),
            "unet_params": param_count(unet), "text_encoder_params": te,
            "linear_conv_params": sum(layers.values()), "largest_layer_params": max(layers.values())}


def _line(latents: list[int], values: list[int], target: int) -> tuple[float, float]:
    """Extrapolate linearly in pixel count through the two smallest probes; relative error at the third."""
    p = [lat * lat for lat in latents]
    b = (values[1] - values[0]) / (p[1] - p[0])
    a = values[0] - b * p[0]
    check = abs(a + b * p[2] - values[2]) / values[2] if len(p) > 2 and values[2] else math.nan
    return a + b * target * target, check


def _late_steps(s: AntSettings) -> set[int]:
    """The mid/late steps each saliency map pairs with early ones (as ``erasure.ant.saliency_masks``)."""
    n_late = s.trajectory_steps - 1 - s.early_steps
    return {s.early_steps + round(i * (n_late - 1) / 7) for i in range(min(8, n_late))}


def ant_training_rows(s: AntSettings) -> int:
    """Rows of ANT's training forward, which one backward goes through (``erasure.ant.ant_loss``): the edited
    model's conditional and unconditional predictions at the early and the late latent (4 per sample), plus the
    preservation prompts at both latents (2 per sample, attached by ``add_preservation``) when ``preserve`` > 0.
    The regeneration and the frozen predictions run under ``no_grad`` and keep nothing for backward."""
    return (6 if s.preserve > 0 else 4) * s.batch_size


def _act16(probe: dict, key: str, inputs_key: str | None, lat: int, weight_bytes: int) -> tuple[float, float]:
    """Saved bytes per row at ``lat`` in ``weight_bytes``-wide activations. A probe run in float32 is scaled down,
    except the inputs of the scoped layers, which a dense delta casts to float32 and saves whatever the model's
    dtype (counted exactly from the probe's element count, linear in pixels like the rest)."""
    act, err = _line(probe["latents"], probe[key], lat)
    scale = weight_bytes / probe.get("dtype_bytes", 4)
    if inputs_key is None or scale == 1:
        return act * scale, err
    inputs, _ = _line(probe["latents"], probe[inputs_key], lat)
    f32 = 4 * inputs
    return (act - f32 * probe.get("dtype_bytes", 4) / 4) * scale + f32, err


def _ckpt16(probe: dict, scope: str, lat: int, weight_bytes: int) -> tuple[float, float, float, int]:
    """With gradient checkpointing, per row at ``lat`` in ``weight_bytes``-wide activations: (bytes the forward
    holds for backward, the largest single block's recomputation, the held line's check error, that block's index).
    Each block's bytes are extrapolated on their own line (which block is largest changes with the size); its
    float32 copies of scoped layers' inputs stay at 4 bytes, as in ``_act16``."""
    lats, scale = probe["latents"], weight_bytes / probe.get("dtype_bytes", 4)
    held, err = _line(lats, probe[f"{scope}_ckpt_bytes_per_row"], lat)
    per_lat = probe[f"{scope}_ckpt_block_bytes_per_row"]
    elems = probe[f"{scope}_ckpt_block_input_elems_per_row"]
    best, arg = 0.0, -1
    for i in range(len(per_lat[0])):
        b, _ = _line(lats, [v[i] for v in per_lat], lat)
        f32 = 4 * _line(lats, [v[i] for v in elems], lat)[0]
        v = (b - f32 * probe.get("dtype_bytes", 4) / 4) * scale + f32 if scale != 1 else b
        if v > best:
            best, arg = v, i
    return held * scale, best, err, arg


def project_arch(probe: dict, selected_fraction: float | None, weight_bytes: int = 2) -> dict:
    """Projected peaks (bytes) at the arch's target resolution: ANT with the library's defaults (single: dense
    deltas on its default scope's layers; multi: dense K/V deltas), MACE, and the historical cached-saliency
    configuration."""
    arch = probe["arch"]
    lat = TARGET_LATENT[arch]
    act_full, err_full = _act16(probe, "full_unet_bytes_per_row", None, lat, weight_bytes)
    act_mace, err_mace = _act16(probe, "mace_graph_bytes_per_row", None, lat, weight_bytes)
    from .cases import MEASURED_DEFAULTS

    d, m = AntSettings(), MaceSettings()
    weights = (probe["unet_params"] + probe["text_encoder_params"]) * weight_bytes
    rows = ant_training_rows(d)
    out = {"arch": arch, "pixels": 8 * lat, "weight_bytes": weight_bytes, "weights": weights,
           "activation_per_row_full_unet": act_full, "activation_per_row_mace": act_mace,
           "line_check_rel_error": {"full_unet": round(err_full, 3), "mace": round(err_mace, 3)},
           "target_gib": TARGET_GIB[arch]}
    # the library's defaults: float32 deltas, their gradients and Adam's two moments (16 bytes per entry), the
    # training forward's rows' saved activations; no gradient checkpointing (the library enables none). "floor":
    # the same without activations, the bound that checkpointing every UNet block approaches from above
    for method, scope in (("ant-single", d.scope), ("ant-multi", "kv")):
        if f"{scope}_deltas_bytes_per_row" not in probe:
            continue
        act, err = _act16(probe, f"{scope}_deltas_bytes_per_row", f"{scope}_input_elems_per_row", lat, weight_bytes)
        out["line_check_rel_error"][scope] = round(err, 3)
        n = probe[f"{scope}_params"]
        state = 16 * n
        e = {"scope": scope, "trainable_params": n, "rows": rows, "activation_per_row": act,
             "trainable_state": state, "activations": rows * act, "peak": weights + state + rows * act,
             "floor": weights + state}
        if f"{scope}_ckpt_bytes_per_row" in probe:
            # gradient checkpointing on (``AntSettings.gradient_checkpointing``): every row's held tensors, plus
            # one block's recomputation for all rows at once (the rows go through each block together)
            held, block, err_c, arg = _ckpt16(probe, scope, lat, weight_bytes)
            out["line_check_rel_error"][f"{scope}_ckpt"] = round(err_c, 3)
            e["checkpointed"] = {"held_per_row": held, "block_recompute_per_row": block, "largest_block": arg,
                                 "activations": rows * (held + block), "peak": weights + state + rows * (held + block)}
        if method == "ant-multi":
            # each finished concept's K/V edit is copied to the CPU (``ErasureWeights.dense``), folded into the
            # fusion's float64 running sum there (``FusionSystem.add(keep=False)``) and freed: the GPU peak is the
            # same for every concept, and host memory peaks at the float64 sum (8 bytes an entry) plus one float32
            # edit while it is folded in, or the float32 result while the sum is solved layer by layer (4)
            e["host_fusion_peak"] = 12 * n
        out[method] = e
    # historical: the cached-saliency configuration at the defaults first measured (``MEASURED_DEFAULTS``)
    s = AntSettings().override(**MEASURED_DEFAULTS)
    lc = probe["linear_conv_params"]
    saliency_rows = 4 * len(_late_steps(s))
    train_rows = ant_training_rows(s)
    saliency = weights + lc * weight_bytes + 2 * lc + saliency_rows * act_full
    fractions = {"upper_bound": s.saliency_fraction}
    if selected_fraction is not None:
        fractions["measured"] = selected_fraction
    hist = {}
    for label, f in fractions.items():
        sel = f * lc
        train = weights + sel * (4 + 8 + 4 + 8) + 4 * probe["largest_layer_params"] + train_rows * act_full
        hist[label] = {"selected_fraction": round(f, 4), "saliency_phase": saliency, "training_phase": train,
                       "peak": max(saliency, train)}
    out["ant-single-cached-saliency"] = hist
    # the reference in float32 as published: two UNets, full gradients, a mask (1 byte per parameter); saliency with
    # the conditional rows of 8 pairs carrying gradient (16 rows), then training (2 rows) with Adam's two moments
    p32 = probe["unet_params"]
    act32 = act_full * 4 / weight_bytes  # the reference runs in float32
    ref_sal = p32 * (4 + 4 + 4 + 1) + probe["text_encoder_params"] * 4 + 2 * len(_late_steps(s)) * act32
    ref_train = p32 * (4 + 4 + 4 + 8 + 1) + probe["text_encoder_params"] * 4 + 2 * act32
    out["ant-single-reference"] = {"saliency_phase": ref_sal, "training_phase": ref_train,
                                   "peak": max(ref_sal, ref_train)}
    out["ant-multi-lora-upper-bound"] = {"peak": weights + train_rows * act_full}
    out["mace"] = {"peak": weights + m.lora_batch * act_mace}
    out["rows"] = {"ant_training": rows, "saliency": saliency_rows, "mace_lora": m.lora_batch}
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
        probe = json.loads(cached.read_text()) if cached is not None and cached.exists() else {}
        if "xattn_ckpt_bytes_per_row" not in probe:  # none yet, or from before the checkpointed graphs
            probe = _probe_in_subprocess(arch, size.scale)
            if cached is not None and "error" not in probe:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(probe, indent=1))
        if "error" in probe:
            res["archs"][arch] = {"probe": probe}
            continue
        fr = [r.get("selected_fraction") for r in rows if r.get("method") == "ant-single" and r.get("arch") == arch
              and r.get("impl") == "ours" and r.get("variant") == "cached-saliency"
              and r.get("selected_fraction") is not None]
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
    from erasure.mace import mace
    from erasure.prior import gram
    from erasure.prompts import Concept, prior_prompts

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
                     MaceSettings(images_per_concept=1, sample_steps=2, lora_steps=2, lora_target=0.0),
                     gram(bb, prior_list))
        return {"arch": arch, "method": method, "pixels": 8 * lat, "peak_mem_bytes": meter.peak_mem_bytes}
    except torch.cuda.OutOfMemoryError as e:
        return {"arch": arch, "method": method, "pixels": 8 * lat, "error": f"out of memory: {str(e)[:200]}"}


def format_projection(p: dict) -> str:
    g = 2**30
    lines = ["", "== projected peak GPU memory (GiB), 16-bit weights, float32 trainables and Adam =="]
    for arch, d in p["archs"].items():
        if "projection" not in d:
            lines.append(f"{arch}: probe failed ({d['probe'].get('error')})")
            continue
        pr = d["projection"]
        lines.append(f"{arch} at {pr['pixels']} px (target < {pr['target_gib']} GiB): weights {pr['weights'] / g:.2f}; "
                     f"line check error {pr['line_check_rel_error']}")
        for method in ("ant-single", "ant-multi"):
            a = pr.get(method)
            if a is None:
                continue
            host = a.get("host_fusion_peak")
            extra = (f"; host memory {host / g:.2f} for the fusion (its float64 sum + one float32 edit), whatever "
                     "the number of concepts" if host is not None else "")
            lines.append(f"  {method} ours ({a['scope']} dense deltas, {a['trainable_params']:,} entries): "
                         f"state {a['trainable_state'] / g:.2f} + activations {a['rows']} rows x "
                         f"{a['activation_per_row'] / g:.2f} = {a['activations'] / g:.2f} -> peak {a['peak'] / g:.1f} "
                         f"(without activations {a['floor'] / g:.1f}){extra}")
            c = a.get("checkpointed")
            if c is not None:
                lines.append(f"    with gradient checkpointing: {a['rows']} rows x ({c['held_per_row'] / g:.3f} held + "
                             f"{c['block_recompute_per_row'] / g:.3f} one block's recomputation) = "
                             f"{c['activations'] / g:.2f} -> peak {c['peak'] / g:.1f}")
        lines.append(f"  mace ours: {pr['mace']['peak'] / g:.1f} (MACE graph "
                     f"{pr['activation_per_row_mace'] / g:.3f}/row)")
        for label, a in pr["ant-single-cached-saliency"].items():
            lines.append(f"  historical ant-single cached-saliency ({label} fraction {a['selected_fraction']}): "
                         f"saliency phase {a['saliency_phase'] / g:.1f} ({pr['rows']['saliency']} rows), training "
                         f"{a['training_phase'] / g:.1f} -> peak {a['peak'] / g:.1f}")
        lines.append(f"  ant-single reference (fp32): {pr['ant-single-reference']['peak'] / g:.1f}")
    for m in p.get("measured", []):
        val = m.get("error") or f"{m['peak_mem_bytes'] / g:.2f} GiB"
        lines.append(f"measured on GPU: {m['method']} {m['arch']} {m['pixels']} px bf16: {val}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print("PROBE " + json.dumps(probe_activations(sys.argv[1], sys.argv[2])), flush=True)
