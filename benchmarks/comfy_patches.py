"""Memory an erasure result holds as patches on a ComfyUI MODEL: a LoRA result as dense float32 weight diffs
against ComfyUI's LoRA adapters on the factors (what ``nodes/comfy_backbone.patched_model`` gives), and the dense
diff's dtype. Runs inside ComfyUI's interpreter (not the library's venv)::

    COMFYUI_PATH=~/ComfyUI ~/comfy-venv/bin/python -m benchmarks.comfy_patches

Models: the UNets of the host tests' tiny SD1.5 and SDXL checkpoints (``tests/host/tiny_unets.py``), with a random
LoRA on every cross-attention K/V (rank 4: ANT's ``scope lora``; rank 1: one MACE concept). Printed:

- bytes held by the patches (every tensor in the MODEL's patch list), measured, and the same count for the real
  SD1.5/SDXL K/V shapes (computed from the shapes, not run);
- peak memory while the patched MODEL is loaded and sampled (2 Euler steps at 64 px), each case in its own process:
  on CUDA the allocator's peak, on a CPU the peak resident set (``VmHWM``, freed heap memory returned to the
  system first), measured from just before the patches are made (the unpatched model already loaded and sampled
  once);
- for a dense delta on a float16/bfloat16 model: the UNet output's error (relative to the float32-weight model's
  output) with the diff stored in float32 and in the weight's dtype, at ComfyUI's patch dtype on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: real models' cross-attention K/V layers: (output width, count) per context width (SD1.5: 16 transformer blocks,
#: SDXL base: 70), each layer a to_k and a to_v
FULL_KV = {"sd15": (768, [(320, 5), (640, 5), (1280, 6)]), "sdxl": (2048, [(640, 10), (1280, 60)])}
RANKS = (4, 1)
#: processes per peak-memory case (the resident-set peak varies by a few MiB from run to run)
REPEATS = 3


def setup():
    """ComfyUI in-process (CPU unless a GPU is there) with this pack loaded; the pack's modules."""
    comfy_path = Path(os.environ.get("COMFYUI_PATH", "~/ComfyUI")).expanduser()
    sys.path.insert(0, str(comfy_path))
    sys.path.insert(0, str(ROOT / "tests" / "host"))
    import comfy.cli_args
    import torch

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    import folder_paths
    import utils.extra_config  # noqa: F401  (ComfyUI's nodes.py expects these imported first)
    import utils.install_util  # noqa: F401

    tmp = Path(tempfile.mkdtemp(prefix="comfy-patches-"))
    folder_paths.set_output_directory(str(tmp / "output"))
    folder_paths.set_temp_directory(str(tmp / "temp"))
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert asyncio.run(nodes.load_custom_node(str(ROOT))), "the pack failed to load"
    pkg = sys.modules[nodes.NODE_CLASS_MAPPINGS["ApplyErasedModel"].__module__].__package__
    return sys.modules[pkg + ".comfy_backbone"], sys.modules[pkg.rsplit(".", 1)[0] + ".erasure.weights"]


def lora_erasure(wmod, model, rank: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, m in model.model.diffusion_model.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            out_f, in_f = m.weight.shape
            deltas[name] = wmod.Delta(up=torch.randn(out_f, rank, generator=g) * 0.03,
                                      down=torch.randn(rank, in_f, generator=g) * 0.03, scale=1.0)
    return wmod.ErasureWeights(deltas)


def dense_patched(model, weights, dtype=None):
    """Every delta as a dense weight diff (float32, or ``dtype``)."""
    import torch

    m = model.clone()
    m.add_patches({f"diffusion_model.{n}.weight": ("diff", (d.matrix().to(dtype or torch.float32),))
                   for n, d in weights.deltas.items()})
    return m


def patch_bytes(m) -> int:
    import torch
    from comfy.weight_adapter import WeightAdapterBase

    total = 0
    for entries in m.patches.values():
        for _, patch, *_ in entries:
            items = patch.weights if isinstance(patch, WeightAdapterBase) else patch[1]
            total += sum(t.nbytes for t in items if isinstance(t, torch.Tensor))
    return total


def full_size_bytes(family: str, rank: int) -> tuple[int, int]:
    """(dense float32, rank-``rank`` factors in float32) bytes of a K/V LoRA on the real model's shapes."""
    ctx, widths = FULL_KV[family]
    layers = [(w, ctx) for w, n in widths for _ in range(2 * n)]
    return sum(4 * o * i for o, i in layers), sum(4 * rank * (o + i) for o, i in layers)


def sample(model, family: str) -> None:
    import torch

    import nodes

    g = torch.Generator().manual_seed(0)
    ctx = model.model.model_config.unet_config["context_dim"]
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
    pos, neg = [[torch.randn(1, 77, ctx, generator=g), dict(extra)]], [[torch.zeros(1, 77, ctx), dict(extra)]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode():
        nodes.common_ksampler(model, 0, 2, 5.0, "euler", "normal", pos, neg, latent)


def peak_case(family: str, variant: str) -> dict:
    """One process: the unpatched model loaded and sampled, then the patched one made, loaded and sampled."""
    import ctypes
    import ctypes.util
    import gc

    from benchmarks.meter import peak_bytes, reset_peak

    cb, wmod = setup()
    import comfy.model_management
    from tiny_unets import tiny_unet_model

    model = tiny_unet_model(family)
    weights = lora_erasure(wmod, model, RANKS[0])
    sample(model, family)
    gc.collect()
    if model.load_device.type == "cpu":  # freed memory back to the system, so that reusing it counts as growth
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    device = model.load_device
    reset_peak(device)
    start = peak_bytes(device)
    m = cb.patched_model(model, weights) if variant == "adapter" else dense_patched(model, weights)
    held = patch_bytes(m)
    sample(m, family)
    comfy.model_management.load_models_gpu([m], force_full_load=True)
    return {"family": family, "variant": variant, "patch_bytes": held, "peak_above_start": peak_bytes(device) - start}


def unet_out(model):
    """One UNet evaluation of ``model`` as ComfyUI loads it (its patches applied)."""
    import comfy.model_management
    import torch

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    g = torch.Generator().manual_seed(0)
    dtype = model.model.get_dtype()
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.inference_mode():
        return model.model.diffusion_model(x.to(dtype), timesteps=torch.tensor([500.0]),
                                           context=ctx.to(dtype)).float().clone()


def dtype_errors(cb, wmod) -> list[dict]:
    """UNet output error of a dense K/V delta on float16/bfloat16 weights, diff in float32 vs in the weight dtype."""
    import comfy.model_management
    import torch
    from tiny_unets import tiny_unet_model

    m32 = tiny_unet_model("sd15")
    lora = lora_erasure(wmod, m32, 4)
    weights = wmod.ErasureWeights({n: wmod.Delta(dense=d.matrix()) for n, d in lora.deltas.items()})
    mods = dict(m32.model.diffusion_model.named_modules())
    rel = max(float(d.dense.norm() / mods[n].weight.detach().float().norm()) for n, d in weights.deltas.items())
    exact = unet_out(dense_patched(m32, weights))
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        model = tiny_unet_model("sd15", dtype)
        compute = comfy.model_management.lora_compute_dtype(model.load_device)
        row = {"weights": str(dtype).removeprefix("torch."), "patch_dtype": str(compute).removeprefix("torch."),
               "delta_rel_norm": rel}
        for name, m in (("float32", dense_patched(model, weights)), ("weight", dense_patched(model, weights, dtype)),
                        ("pack", cb.patched_model(model, weights))):
            row[f"err_{name}"] = float((unet_out(m) - exact).norm() / exact.norm())
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peak", nargs=2, metavar=("FAMILY", "VARIANT"), help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if args.peak:
        print("ROW " + json.dumps(peak_case(*args.peak)), flush=True)
        return
    cb, wmod = setup()
    from tiny_unets import tiny_unet_model

    out = {"bytes": [], "peak": [], "dtype": []}
    print("| model | K/V layers | LoRA rank | dense float32 diffs | LoRA adapters | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for family in ("sd15", "sdxl"):
        model = tiny_unet_model(family)
        for rank in RANKS:
            w = lora_erasure(wmod, model, rank)
            dense, ours = patch_bytes(dense_patched(model, w)), patch_bytes(cb.patched_model(model, w))
            out["bytes"].append({"family": family, "scale": "tiny", "rank": rank, "layers": len(w.deltas),
                                 "dense": dense, "adapter": ours})
            print(f"| tiny {family} | {len(w.deltas)} | {rank} | {dense:,} | {ours:,} | {dense / ours:.0f}x |")
        del model
    for family in ("sd15", "sdxl"):
        for rank in RANKS:
            dense, ours = full_size_bytes(family, rank)
            layers = 2 * sum(n for _, n in FULL_KV[family][1])
            out["bytes"].append({"family": family, "scale": "full (computed)", "rank": rank, "layers": layers,
                                 "dense": dense, "adapter": ours})
            print(f"| {family}, real shapes (computed) | {layers} | {rank} | {dense:,} | {ours:,} | "
                  f"{dense / ours:.0f}x |")
    print(f"\n| model (rank {RANKS[0]}) | patches | bytes held | peak memory above the loaded model, median of "
          f"{REPEATS} (range) |")
    print("| --- | --- | ---: | ---: |")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for family in ("sd15", "sdxl"):
        for variant in ("dense", "adapter"):
            runs = []
            for _ in range(REPEATS):
                p = subprocess.run([sys.executable, "-m", "benchmarks.comfy_patches", "--peak", family, variant],
                                   cwd=ROOT, env=env, capture_output=True, text=True, check=False)
                rows = [ln[4:] for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
                if not rows:
                    raise RuntimeError(f"{family} {variant} failed: {p.stderr[-2000:]}")
                runs.append(json.loads(rows[-1]))
            peaks = sorted(r["peak_above_start"] / 2**20 for r in runs)
            out["peak"].append({k: v for k, v in runs[0].items() if k != "peak_above_start"}
                               | {"peak_above_start_mib": peaks})
            print(f"| tiny {family} | {variant} | {runs[0]['patch_bytes']:,} | {statistics.median(peaks):.1f} MiB "
                  f"({peaks[0]:.1f}-{peaks[-1]:.1f}) |")
    print("\n| weights | ComfyUI patches in | dW/W | error: diff in float32 | in the weight dtype | as stored |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in dtype_errors(cb, wmod):
        out["dtype"].append(r)
        print(f"| {r['weights']} | {r['patch_dtype']} | {r['delta_rel_norm']:.3f} | {r['err_float32']:.2e} | "
              f"{r['err_weight']:.2e} | {r['err_pack']:.2e} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
