"""``python benchmarks/report.py RESULTS.json [--only METHODS]``: the markdown tables of docs/benchmarks.md from a
run's JSON.

``--only ant-single,ant-multi`` keeps the rows and ratios of those methods (docs/benchmarks.md shows ANT and MACE
from different runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GIB = 2**30


def _variant(r: dict) -> str:
    return "" if r.get("variant", "default") == "default" else " " + r["variant"]


def _cell(r: dict) -> str:
    if "error" in r:
        return f"| {r['method']} | {r['impl']}{_variant(r)} | {r['arch']} | {r['concepts']} | " \
               f"error: {r['error']} | | | | | | |"
    scale = "" if r.get("scale", "full") == "full" else f" ({r['scale']})"
    # the fusion's wall time is mostly text encoding (the same work in both implementations): shown beside it
    text = (f" ({r['text_encoding_s']:.1f} text encoding)" if r["method"] == "fusion" and "text_encoding_s" in r
            else "")
    return (f"| {r['method']} | {r['impl']}{_variant(r)} | "
            f"{r['arch']}{scale} {r['pixels']} px | {r['concepts']} | {r['unet_evals']:,} / "
            f"{r['unet_backward_evals']:,} / {r['unet_forward_calls']:,} | {r['wall_s']:.1f}{text} | "
            f"{r['cpu_s']:.1f} | "
            f"{r['time_per_concept_s']:.1f} / {r['cpu_s'] / r['concepts']:.1f} | {r['peak_mem_bytes'] / GIB:.2f} | "
            f"{r['optimizer_state_bytes'] / 2**20:,.1f} | {r['trainable_params']:,} |")


def tables(d: dict, only: set[str] | None = None) -> str:
    def keep(r: dict) -> bool:
        return only is None or r["method"] in only

    out = ["| method | impl | arch, resolution | concepts | UNet evals fwd / bwd / calls | wall s | CPU s | "
           "s per concept (wall / CPU) | peak GiB | optimizer MiB | trainable |",
           "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    out += [_cell(r) for r in d["rows"] if keep(r)]
    out += ["", "| method | arch | concepts | ours | reference | comparison | UNet evals ref/ours | wall ref/ours | "
            "CPU ref/ours | peak mem ref/ours | optimizer state ours/ref |",
            "| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in d.get("ratios", []):
        if not keep(r):
            continue

        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:g}"

        scale = "" if r.get("scale", "full") in ("full", None) else f" ({r['scale']})"
        out.append(f"| {r['method']} | {r['arch']}{scale} | {r['concepts']} | {r['ours_variant']} | "
                   f"{r.get('reference_variant', 'default')} | {r.get('comparison', 'same settings')} | "
                   f"{f(r['unet_evals'])} | {f(r['wall_s'])} | {f(r['cpu_s'])} | {f(r['peak_mem_bytes'])} | "
                   f"{f(r['optimizer_state'])} |")
    return "\n".join(out)


def counts(d: dict) -> str:
    """ANT single's UNet evaluations at the library's defaults, replayed (``run.default_counts``)."""
    c = d.get("default_counts")
    if not c or "reference_published" not in c:
        return ""
    st, pub = c["settings"], c["reference_published"]
    out = [f"| ANT single, {st['steps']} training steps | trajectories | saliency | regeneration / refresh | "
           "training | total | reference / ours |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
           f"| ours: library defaults ({st['sampling']}, {st['scope']}, {st['trajectory_steps']}-step "
           f"trajectories) | {c['ours']['trajectories']:,} | {c['ours']['saliency']:,} | "
           f"{c['ours']['regeneration'] + c['ours']['refresh']:,} | {c['ours']['training']:,} | "
           f"{c['ours']['total']:,} | |"]
    for label, r, ratio in ((f"reference, same {st['trajectory_steps']}-step trajectories (a)",
                             c["reference_same_trajectory_steps"], c["ratio_a_same_trajectory_steps"]),
                            (f"reference as published, {pub['trajectory_steps']}-step trajectories (b)", pub,
                             c["ratio_b_published"])):
        out.append(f"| {label} | | {r['saliency']:,} | {r['regeneration']:,} | {r['training']:,} | {r['total']:,} "
                   f"| {ratio:g} |")
    return "\n".join(out)


def projection(d: dict) -> str:
    p = d.get("projection")
    if not p:
        return ""
    scope = next((a["projection"]["ant-single"].get("scope", "xattn") for a in p["archs"].values()
                  if "projection" in a and "ant-single" in a["projection"]), "xattn")
    out = [f"| arch, resolution | weights | ANT single ours ({scope}): state + activations = peak (without "
           "activations) | ANT multi ours (kv), 1st concept | ANT single / multi ours with gradient checkpointing: "
           "rows x (held + one block's recomputation) = peak | MACE ours | historical cached-saliency ours | "
           "ANT single reference (fp32) | target |",
           "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for arch, a in p["archs"].items():
        if "projection" not in a:
            out.append(f"| {arch} | probe failed: {a['probe'].get('error')} | | | | | | | |")
            continue
        pr = a["projection"]
        if "ant-single-cached-saliency" not in pr:  # a JSON from before the dense-delta projection
            out.append(f"| {arch} | (older projection format: see this JSON's `projection`) | | | | | | | |")
            continue

        def ant(e: dict) -> str:
            return (f"{e['trainable_state'] / GIB:.2f} + {e['rows']} x {e['activation_per_row'] / GIB:.2f} = "
                    f"**{e['peak'] / GIB:.1f}** ({e['floor'] / GIB:.1f})")

        def ckpt(e: dict) -> str:
            c = e.get("checkpointed")
            if c is None:
                return "(not probed)"
            return (f"{e['rows']} x ({c['held_per_row'] / GIB:.3f} + {c['block_recompute_per_row'] / GIB:.3f}) = "
                    f"**{c['peak'] / GIB:.1f}**")

        hist = max(v["peak"] for v in pr["ant-single-cached-saliency"].values())
        # the fusion's host peak: float64 sum + one float32 edit, 12 bytes an entry (older results store the float32
        # edit's 4 bytes an entry as per_finished_concept)
        e = pr["ant-multi"]
        host = e.get("host_fusion_peak", 3 * e.get("per_finished_concept", 0))
        out.append(f"| {arch} {pr['pixels']} px | {pr['weights'] / GIB:.2f} | {ant(pr['ant-single'])} | "
                   f"{ant(e)}; host {host / GIB:.2f} for the fusion, any number of "
                   f"concepts | {ckpt(pr['ant-single'])} / {ckpt(e)} | {pr['mace']['peak'] / GIB:.1f} | "
                   f"{hist / GIB:.1f} | "
                   f"{pr['ant-single-reference']['peak'] / GIB:.1f} | < {pr['target_gib']} |")
    for m in p.get("measured", []):
        val = m.get("error") or f"{m['peak_mem_bytes'] / GIB:.2f} GiB"
        out.append(f"\nMeasured on the GPU: {m['method']} {m['arch']} {m['pixels']} px bf16: {val}")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--only", help="comma-separated methods to show (default: all)")
    args = ap.parse_args(argv)
    d = json.loads(Path(args.json).read_text())
    only = set(args.only.split(",")) if args.only else None
    print(tables(d, only))
    for part in (counts(d), projection(d)):
        if part:
            print()
            print(part)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
