"""``python benchmarks/run.py --size smoke|cpu|gpu --json OUT.json``: one table per method, written as JSON too.

Each cell (method x implementation x architecture x concepts) runs in its own process (``--in-process`` runs them
in this one, as the smoke test does), so that its peak memory is its own. The JSON holds ``rows`` (the interface
other tools read: method, impl, concepts, arch, unet_evals, wall_s, peak_mem_bytes, optimizer_state_bytes,
trainable_params, plus more figures per row; ANT rows also ``variant`` and the ``ant_settings`` they ran with),
``ratios`` (reference / ours for each pair in ``COMPARISONS``: the defaults against the reference with the same
settings and as published, the historical variants against theirs), ``skipped`` (cells a size does not run, with
the reason), ``settings``, ``default_counts`` (ANT single at the library's full defaults, replayed) and the memory
``projection``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cases import SIZES, Size, run_cell, size_settings  # noqa: E402


def _worker(spec: str) -> int:
    a = json.loads(spec)
    row = run_cell(sized(a["size"], a.get("ant_steps")), a["method"], a["impl"], a["arch"], a["concepts"],
                   a.get("variant", "default"), a.get("scale"))
    print("ROW " + json.dumps(row), flush=True)
    return 0


def sized(name: str, ant_steps: int | None = None) -> Size:
    """A size, with ANT single's training steps replaced by ``ant_steps`` (``--ant-steps``: the same cells at
    another number of steps, to separate one-off costs from per-step ones)."""
    size = SIZES[name]
    return replace(size, ant={**size.ant, "steps": ant_steps}) if ant_steps else size


def _subprocess_cell(size: str, method: str, impl: str, arch: str, n: int, variant: str, scale: str | None,
                     timeout: float, ant_steps: int | None = None) -> dict:
    spec = json.dumps({"size": size, "method": method, "impl": impl, "arch": arch, "concepts": n,
                       "variant": variant, "scale": scale, "ant_steps": ant_steps})
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        p = subprocess.run([sys.executable, "-m", "benchmarks.run", "--worker", spec], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("ROW "):
            return json.loads(line[4:])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    reason = "killed (out of memory?)" if p.returncode in (-9, 137) else " | ".join(tail)
    return {"error": f"exit {p.returncode}: {reason}"}


def _in_process_cell(size: Size, method: str, impl: str, arch: str, n: int, variant: str,
                     scale: str | None) -> dict:
    import gc

    import torch

    try:
        return run_cell(size, method, impl, arch, n, variant, scale)
    except Exception as e:  # a failed cell (e.g. out of memory) is reported, and the others still run
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:  # the next cell starts from an empty device
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def plan(size: Size) -> list[tuple[str, str, str, int, str, str]]:
    """(method, impl, arch, concepts, variant, scale) for every run of a size: ours and the reference at the
    defaults, the size's ANT variants (``cases._variants``), then its extra runs at another scale."""
    out = []
    for method, arch, n in size.cells:
        scale = size.scale_of(method, arch)
        out += [(method, "ours", arch, n, "default", scale), (method, "reference", arch, n, "default", scale)]
        for name, v in size.variants.items():
            if method in v.methods:
                out += [(method, impl, arch, n, name, scale) for impl in v.impls]
    out += [(m, i, a, n, v, sc) for m, i, a, n, v, sc in size.also if (m, a, n) in size.cells]
    return out


#: which rows are compared: (ours' variant, the reference's variant) -> what the comparison means
COMPARISONS = {
    ("default", "default"): "same settings",
    ("default", "published"): "ours' defaults vs the reference as published (50-step trajectories)",
    ("cached-saliency", "cached-saliency"): "historical configuration, same settings",
    ("cached-lora", "cached-lora"): "historical configuration, same settings",
}


def ratios(rows: list[dict]) -> list[dict]:
    """reference / ours for each comparison in ``COMPARISONS`` (same method, arch, concepts, scale and, for
    ANT, training steps)."""
    out = []
    for r in rows:
        if r["impl"] != "reference" or "error" in r:
            continue
        for o in rows:
            label = COMPARISONS.get((o.get("variant"), r.get("variant")))
            if (label and o["impl"] == "ours" and "error" not in o and o["method"] == r["method"]
                    and o["arch"] == r["arch"] and o["concepts"] == r["concepts"]
                    and o.get("scale") == r.get("scale")
                    and o.get("ant_settings", {}).get("steps") == r.get("ant_settings", {}).get("steps")):
                def ratio(k: str, o: dict = o, r: dict = r) -> float | None:
                    return round(r[k] / o[k], 2) if o.get(k) else None

                if label == "same settings" and r["method"] == "ant-single":
                    label = "same settings (same trajectory steps)"
                out.append({"method": r["method"], "arch": r["arch"], "concepts": r["concepts"],
                            "scale": r.get("scale"), "ours_variant": o["variant"], "reference_variant": r["variant"],
                            "comparison": label, "unet_evals": ratio("unet_evals"),
                            "wall_s": ratio("wall_s"), "cpu_s": ratio("cpu_s"),
                            "peak_mem_bytes": ratio("peak_mem_bytes"),
                            "optimizer_state": (round(o["optimizer_state_bytes"] / r["optimizer_state_bytes"], 4)
                                                if r.get("optimizer_state_bytes") else None)})
    return out


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def _arch(r: dict) -> str:
    """``sd15``, or ``sd15/h`` for a row on another scale than the real architecture."""
    return r["arch"] + ("" if r.get("scale", "full") == "full" else "/" + r["scale"][0])


def format_tables(rows: list[dict]) -> str:
    """One table per method."""
    lines = []
    head = (f"{'impl':<10}{'variant':<16}{'arch':<7}{'px':>5}{'n':>4}{'evals':>8}{'bwd':>6}{'calls':>7}"
            f"{'wall s':>9}{'cpu s':>9}{'s/concept':>10}{'peak GiB':>9}{'opt MiB':>10}{'trainable':>12}")
    for method in ("ant-single", "ant-multi", "mace", "fusion"):
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        lines += ["", f"== {method} ==", head]
        for r in mine:
            if "error" in r:
                lines.append(f"{r['impl']:<10}{r.get('variant', ''):<16}{r['arch']:<5}{'':>5}{r['concepts']:>4}  "
                             f"ERROR {r['error']}")
                continue
            lines.append(
                f"{r['impl']:<10}{r['variant']:<16}{_arch(r):<7}{r['pixels']:>5}{r['concepts']:>4}"
                f"{r['unet_evals']:>8}{r['unet_backward_evals']:>6}{r['unet_forward_calls']:>7}{r['wall_s']:>9.2f}{r['cpu_s']:>9.2f}"
                f"{r['time_per_concept_s']:>10.2f}{_gib(r['peak_mem_bytes']):>9}"
                f"{r['optimizer_state_bytes'] / 2**20:>10.1f}{r['trainable_params']:>12,}")
    return "\n".join(lines)


def format_ratios(rs: list[dict]) -> str:
    lines = ["", "== reference / ours (same machine) ==",
             f"{'method':<12}{'arch':<6}{'scale':<6}{'n':>4}  {'ours':<16}{'reference':<16}{'evals':>7}{'wall':>7}"
             f"{'cpu':>7}{'peak mem':>9}{'opt state ours/ref':>20}"]
    for r in rs:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:g}"

        lines.append(f"{r['method']:<12}{r['arch']:<6}{r.get('scale') or '':<6}{r['concepts']:>4}  "
                     f"{r['ours_variant']:<16}{r.get('reference_variant', 'default'):<16}"
                     f"{f(r['unet_evals']):>7}{f(r['wall_s']):>7}{f(r['cpu_s']):>7}{f(r['peak_mem_bytes']):>9}"
                     f"{f(r['optimizer_state']):>20}")
    return "\n".join(lines)


def _ant_keys(s) -> dict:
    return {k: getattr(s, k) for k in ("steps", "trajectory_steps", "early_steps", "trajectories", "saliency_maps",
                                       "refresh_every", "reuse", "batch_size", "preserve", "preserve_prompts",
                                       "sampling", "scope")}


def default_counts() -> dict:
    """ANT single's UNet evaluations for the library's default settings (``AntSettings()``: on-policy steps over
    10-step trajectories), against the reference with the same trajectory steps (a) and as published,
    50-step trajectories (b), both for the same training steps; and the cached configuration the benchmark
    tables were measured with (``cases.MEASURED_DEFAULTS``). Replayed (``counts.py``), not run."""
    from benchmarks.cases import MEASURED_DEFAULTS, PUBLISHED
    from benchmarks.counts import ours_ant_single, reference_ant_single
    from erasure.ant import AntSettings

    s = AntSettings()
    ours = ours_ant_single(s)
    ref_same = reference_ant_single(s, n_preserve=s.preserve_prompts)
    pub = s.override(**PUBLISHED)
    ref_pub = reference_ant_single(pub, n_preserve=s.preserve_prompts)
    h = AntSettings().override(**MEASURED_DEFAULTS)
    h_ours, h_ref = ours_ant_single(h), reference_ant_single(h, n_preserve=h.preserve_prompts)
    h_no_refresh = ours_ant_single(h.override(refresh_every=0))
    return {"settings": _ant_keys(s), "ours": ours,
            "reference_same_trajectory_steps": ref_same,
            "reference_published": {"trajectory_steps": pub.trajectory_steps, "early_steps": pub.early_steps,
                                    **ref_pub},
            "ratio_a_same_trajectory_steps": round(ref_same["total"] / ours["total"], 2),
            "ratio_b_published": round(ref_pub["total"] / ours["total"], 2),
            "historical": {"settings": _ant_keys(h), "ours": h_ours, "ours_no_refresh": h_no_refresh,
                           "reference": h_ref,
                           "ratio_reference_over_ours": round(h_ref["total"] / h_ours["total"], 2),
                           "ratio_reference_over_ours_no_refresh": round(h_ref["total"] / h_no_refresh["total"], 2)}}


def format_counts(c: dict) -> str:
    st, h = c["settings"], c["historical"]
    return ("\n== ANT single at the library's defaults: UNet evaluations (replayed, counts.py) ==\n"
            f"settings: {st}\n"
            f"ours: {c['ours']}\n"
            f"reference, same {st['trajectory_steps']}-step trajectories: {c['reference_same_trajectory_steps']}\n"
            f"reference as published ({c['reference_published']['trajectory_steps']}-step trajectories): "
            f"{c['reference_published']}\n"
            f"reference / ours: (a) same trajectory steps {c['ratio_a_same_trajectory_steps']}, "
            f"(b) as published {c['ratio_b_published']}\n"
            f"the measured tables' configuration ({h['settings']['sampling']}, {h['settings']['scope']}, "
            f"{h['settings']['steps']} steps): ours {h['ours']['total']}, without refresh "
            f"{h['ours_no_refresh']['total']}, reference {h['reference']['total']}")


def _write(path: Path, out: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="smoke")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--only", help="run only the cells whose method is in this comma-separated list")
    ap.add_argument("--arch", help="run only this architecture (sd15 or sdxl)")
    ap.add_argument("--impl", choices=("ours", "reference"), help="run only this implementation")
    ap.add_argument("--concepts", type=int, help="run only the cells with this many concepts")
    ap.add_argument("--scale", help="run only the cells at this model scale (tiny, half or full)")
    ap.add_argument("--variant", help="run only the rows of these comma-separated variants (default, published, "
                                      "cached-saliency, cached-lora)")
    ap.add_argument("--ant-steps", type=int, help="ANT single's training steps instead of the size's")
    ap.add_argument("--in-process", action="store_true", help="run every cell in this process (the smoke test)")
    ap.add_argument("--no-projection", action="store_true", help="skip the memory projection")
    ap.add_argument("--probe-dir", help="reuse (or keep) the projection's activation probes in this folder")
    ap.add_argument("--cell-timeout", type=float, default=3600, help="seconds before a cell is abandoned")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="combine the rows of earlier runs of this size (run in parts, e.g. --only/--arch in "
                         "parallel) instead of running cells; ratios and the projection are recomputed")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    size = sized(args.size, args.ant_steps)
    only = set(args.only.split(",")) if args.only else None
    rows: list[dict] = []
    t0 = time.perf_counter()
    merged_from = []
    for f in args.merge or []:
        part = json.loads(Path(f).read_text())
        if part.get("size") != size.name:
            raise SystemExit(f"error: {f} is a --size {part.get('size')} run, not {size.name}")
        rows += part["rows"]
        merged_from.append({"file": Path(f).name, "total_s": part.get("total_s")})
    for method, impl, arch, n, variant, scale in ([] if args.merge else plan(size)):
        if ((only and method not in only) or (args.arch and arch != args.arch) or (args.impl and impl != args.impl)
                or (args.concepts and n != args.concepts) or (args.scale and scale != args.scale)
                or (args.variant and variant not in args.variant.split(","))):
            continue
        t = time.perf_counter()
        if args.in_process:
            row = _in_process_cell(size, method, impl, arch, n, variant, scale)
        else:
            row = _subprocess_cell(size.name, method, impl, arch, n, variant, scale, args.cell_timeout,
                                   args.ant_steps)
        row = {"method": method, "impl": impl, "concepts": n, "arch": arch, "variant": variant, "scale": scale,
               **row}
        rows.append(row)
        status = row.get("error") or f"{row['wall_s']:.1f} s, {row['unet_evals']} evals"
        print(f"[{time.perf_counter() - t0:7.0f} s] {method:<10} {impl:<9} {variant:<15} {arch} ({scale}) n={n}: "
              f"{status} "
              f"(cell {time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        if args.json:  # partial results survive an interrupted run
            _write(Path(args.json), {"size": size.name, "settings": size_settings(size), "rows": rows,
                                     "partial": True})
    rs = ratios(rows)
    out = {"size": size.name, "settings": size_settings(size), "rows": rows, "ratios": rs,
           "skipped": [{"method": m, "arch": a, "reason": r} for m, a, r in size.skipped],
           "total_s": round(time.perf_counter() - t0, 1)}
    if merged_from:
        out["merged_from"] = merged_from
    out["default_counts"] = default_counts()
    if not args.no_projection:
        from benchmarks.projection import project

        out["projection"] = project(size, rows, Path(args.probe_dir) if args.probe_dir else None)
    print(format_tables(rows))
    print(format_ratios(rs))
    print(format_counts(out["default_counts"]))
    if "projection" in out:
        from benchmarks.projection import format_projection

        print(format_projection(out["projection"]))
    if args.json:
        _write(Path(args.json), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
