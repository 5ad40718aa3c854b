"""MACE's per-concept work with several concepts per UNet batch (``concept_batch``, issue 20): stage 1 (generating
each concept's images) and stage 3 (its attention-loss LoRA) at the real SD1.5/SDXL shapes, for each concept batch
B, on the CPU or a GPU. Prints a Markdown table and writes JSON.

    python benchmarks/mace_batch.py --device cpu --latent 8 --concepts 8 --batches 1,4,8 \
        --json benchmarks/results/cpu-mace-batch-sd15.json
    python benchmarks/mace_batch.py --device cuda --latent 64 --concepts 16 --batches 1,4,8,16   # benchmarks/gpu.sh

The stages between (closed-form refinement, fusion) do not depend on B and are left out; so is the text encoding of
the LoRA prompts (once per concept, whatever B). The model is randomly initialised (``archs.build_backbone``): the
cost does not depend on the weights. Concepts per hour here count these two stages only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.archs import build_backbone, concept_names  # noqa: E402
from benchmarks.meter import Meter  # noqa: E402
from erasure.mace import (  # noqa: E402
    MaceSettings,
    generate_data_batch,
    refine,
    train_lora,
    train_loras,
)
from erasure.prompts import Concept  # noqa: E402


def _chunks(items: list, size: int) -> list[list]:
    return [items[k:k + size] for k in range(0, len(items), size)]


def measure(bb, concepts: list[Concept], s: MaceSettings, batch: int, device: torch.device) -> dict:
    """Stage 1 and stage 3 for every concept at ``batch`` concepts per batch (B = 1: the one-at-a-time path)."""
    row: dict = {"concept_batch": batch, "concepts": len(concepts)}
    with Meter(bb.unet(), device) as gen_meter:
        datas = [d for group in _chunks(concepts, batch) for d in generate_data_batch(bb, group, s)]
    cfr = refine(bb, concepts, None, s.lam, 0.0)  # outside the meters: it does not depend on B
    with Meter(bb.unet(), device) as lora_meter:
        for group in _chunks(datas, batch):
            if len(group) == 1:
                train_lora(bb, group[0], cfr, s)
            else:
                train_loras(bb, group, cfr, s)
    for name, m in (("generate", gen_meter), ("lora", lora_meter)):
        f = m.figures()
        row[name] = {"wall_s": round(m.wall_s, 2), "cpu_s": f["cpu_s"], "unet_calls": f["unet_forward_calls"],
                     "unet_forward_rows": f["unet_evals"], "unet_backward_rows": f["unet_backward_evals"],
                     "peak_gib": round(m.peak_mem_bytes / 2**30, 3)}
    total = gen_meter.wall_s + lora_meter.wall_s
    row["wall_s"] = round(total, 2)
    row["concepts_per_hour"] = round(len(concepts) * 3600 / total, 1)
    return row


def table(rows: list[dict]) -> str:
    base = rows[0]["wall_s"] if rows and rows[0]["concept_batch"] == 1 else None
    out = ["| B | stage 1 s (calls) | stage 3 s (calls) | total s | total CPU s | concepts/hour | speed-up vs B=1 | "
           "UNet rows fwd / bwd | peak GiB stage 1 / 3 |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        g, ll = r["generate"], r["lora"]
        speed = f"{base / r['wall_s']:.2f}x" if base else "-"
        out.append(f"| {r['concept_batch']} | {g['wall_s']} ({g['unet_calls']}) | {ll['wall_s']} "
                   f"({ll['unet_calls']}) | {r['wall_s']} | {g['cpu_s'] + ll['cpu_s']:.1f} | "
                   f"{r['concepts_per_hour']:,} | {speed} | "
                   f"{g['unet_forward_rows'] + ll['unet_forward_rows']:,} / {ll['unet_backward_rows']:,} | "
                   f"{g['peak_gib']} / {ll['peak_gib']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--scale", default="full", help="full (the real architecture) or tiny (its layout, toy widths)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--latent", type=int, default=8, help="latent size (pixels / 8)")
    p.add_argument("--concepts", type=int, default=8)
    p.add_argument("--batches", default="1,4,8", help="concept batches to measure, comma-separated")
    p.add_argument("--images", type=int, default=2, help="images per concept")
    p.add_argument("--sample-steps", type=int, default=4)
    p.add_argument("--lora-steps", type=int, default=10)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    bb = build_backbone(args.arch, args.scale, args.latent, getattr(torch, args.dtype), args.device)
    concepts = [Concept(c, "background") for c in concept_names(args.concepts)]
    s = MaceSettings(images_per_concept=args.images, sample_steps=args.sample_steps, lora_steps=args.lora_steps,
                     lora_lr=1e-5, lora_target=0.0)  # one round each (rounds on random weights mean nothing)
    meta = {"arch": args.arch, "scale": args.scale, "device": str(device), "dtype": args.dtype,
            "latent": args.latent, "pixels": 8 * args.latent, "images_per_concept": args.images,
            "sample_steps": args.sample_steps, "lora_steps": args.lora_steps, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
            else None, "command": " ".join(sys.argv)}
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        t0 = time.time()
        rows.append(measure(bb, concepts, s, b, device))
        print(f"B={b}: {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
        if args.json:  # after every row: a run stopped by a time limit keeps the rows it finished
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"settings": meta, "rows": rows}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
