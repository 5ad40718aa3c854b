"""The table of a seed sweep (``scripts/ant_seed_sweep.sh``): per setting, how many runs met every single-concept
bar (efficacy >= 0.9, generality >= 0.8, specificity >= 0.9, fidelity above the ESD baseline's 0.877 at seed 0, and,
where the run measured it, unrelated images keeping all their attributes (``kept``) >= 0.85), the means and the lowest
values; ``--json`` also writes every run's metrics.

    python scripts/seed_sweep_table.py OUTDIR [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BARS = {"efficacy": 0.9, "generality": 0.8, "specificity": 0.9}
BASELINE_FIDELITY = 0.877
METRICS = ("efficacy", "generality", "specificity", "H", "fidelity", "kept")
KEPT_BAR = 0.85


def runs(folder: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in sorted(folder.glob("*-s*.json")):
        m = re.fullmatch(r"(.+)-s(\d+)\.json", f.name)
        if m is None:
            continue
        d = json.loads(f.read_text())
        log = f.with_name(f.name.replace(".json", ".ant.log"))
        times = re.findall(r"^([\d.]+) s$", log.read_text(), re.M) if log.exists() else []
        row = {"seed": int(m.group(2)), **{k: d.get(k) for k in METRICS},
               "train_wall_s": float(times[-1]) if times else None}
        row["meets_bars"] = (all(d[k] >= v for k, v in BARS.items()) and d["fidelity"] > BASELINE_FIDELITY
                             and (d.get("kept") is None or d["kept"] >= KEPT_BAR))
        out.setdefault(m.group(1), []).append(row)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    r = runs(Path(a.folder))
    if not r:
        print(f"no runs in {a.folder}", file=sys.stderr)
        return 1
    print("| setting | seeds | bars met | " + " | ".join(f"mean {k}" for k in METRICS) +
          " | lowest generality | lowest specificity | lowest kept | training wall s |")
    print("| --- | --- | ---: |" + " ---: |" * (len(METRICS) + 4))
    for tag, rows in r.items():
        n = len(rows)
        mean = {k: (sum(x[k] for x in rows) / n if all(x[k] is not None for x in rows) else float("nan"))
                for k in METRICS}
        t = [x["train_wall_s"] for x in rows if x["train_wall_s"] is not None]
        print(f"| {tag} | {rows[0]['seed']}-{rows[-1]['seed']} | {sum(x['meets_bars'] for x in rows)} of {n} | "
              + " | ".join(f"{mean[k]:.3f}" for k in METRICS)
              + f" | {min(x['generality'] for x in rows):.3f} | {min(x['specificity'] for x in rows):.3f} | "
              + (f"{min(x['kept'] for x in rows):.3f} | " if all(x["kept"] is not None for x in rows) else " | ")
              + (f"{sum(t) / len(t):.0f}" if t else "") + " |")
    if a.json:
        # keep the descriptions an existing file carries (what was run, each tag's flags); replace the runs
        out = Path(a.json)
        doc = json.loads(out.read_text()) if out.exists() else {}
        doc.update({"bars": {**BARS, "fidelity_above": BASELINE_FIDELITY, "kept": KEPT_BAR}, "runs": r})
        out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
