"""``python benchmarks/report.py RESULTS.json``: the README's markdown tables from a run's JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 2**30


def _cell(r: dict) -> str:
    if "error" in r:
        return f"| {r['method']} | {r['impl']} {r.get('variant', '')} | {r['arch']} | {r['concepts']} | " \
               f"error: {r['error']} | | | | | | |"
    scale = "" if r.get("scale", "full") == "full" else f" ({r['scale']})"
    return (f"| {r['method']} | {r['impl']}{'' if r['variant'] == 'default' else ' ' + r['variant']} | "
            f"{r['arch']}{scale} {r['pixels']} px | {r['concepts']} | {r['unet_evals']:,} / "
            f"{r['unet_backward_evals']:,} / {r['unet_forward_calls']:,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['time_per_concept_s']:.1f} / {r['cpu_s'] / r['concepts']:.1f} | {r['peak_mem_bytes'] / GIB:.2f} | "
            f"{r['optimizer_state_bytes'] / 2**20:,.1f} | {r['trainable_params']:,} |")


def tables(d: dict) -> str:
    out = ["| method | impl | arch, resolution | concepts | UNet evals fwd / bwd / calls | wall s | CPU s | "
           "s per concept (wall / CPU) | peak GiB | optimizer MiB | trainable |",
           "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    out += [_cell(r) for r in d["rows"]]
    out += ["", "| method | arch | concepts | ours | UNet evals ref/ours | wall ref/ours | CPU ref/ours | "
            "peak mem ref/ours | optimizer state ours/ref |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in d.get("ratios", []):
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:g}"

        out.append(f"| {r['method']} | {r['arch']} | {r['concepts']} | {r['ours_variant']} | {f(r['unet_evals'])} | "
                   f"{f(r['wall_s'])} | {f(r['cpu_s'])} | {f(r['peak_mem_bytes'])} | {f(r['optimizer_state'])} |")
    return "\n".join(out)


def projection(d: dict) -> str:
    p = d.get("projection")
    if not p:
        return ""
    out = ["| arch, resolution | activations per row (UNet / MACE graph) | ANT single ours: saliency / training "
           "(fraction) | ANT single reference (fp32) | ANT multi ours | MACE ours | target |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for arch, a in p["archs"].items():
        if "projection" not in a:
            out.append(f"| {arch} | probe failed: {a['probe'].get('error')} | | | | | |")
            continue
        pr = a["projection"]
        ant = "; ".join(f"{v['saliency_phase'] / GIB:.1f} / {v['training_phase'] / GIB:.1f} "
                        f"({k.replace('_', ' ')} {v['selected_fraction']:.2f})" for k, v in pr["ant-single"].items())
        out.append(f"| {arch} {pr['pixels']} px | {pr['activation_per_row_full_unet'] / GIB:.2f} / "
                   f"{pr['activation_per_row_mace'] / GIB:.3f} GiB | {ant} | "
                   f"{pr['ant-single-reference']['peak'] / GIB:.1f} | {pr['ant-multi']['peak'] / GIB:.1f} | "
                   f"{pr['mace']['peak'] / GIB:.1f} | < {pr['target_gib']} |")
    for m in p.get("measured", []):
        val = m.get("error") or f"{m['peak_mem_bytes'] / GIB:.2f} GiB"
        out.append(f"\nMeasured on the GPU: {m['method']} {m['arch']} {m['pixels']} px bf16: {val}")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    d = json.loads(Path(argv[0]).read_text())
    print(tables(d))
    print()
    print(projection(d))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
