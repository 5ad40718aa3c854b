"""Validate the erasure report (erasure/report.py) on the concept lab: do its two numbers rank erasures as the lab
classifier's efficacy and collateral do?

For each run (a LoRA, the concept it erases, a strength the LoRA is scaled by) this evaluates the edited lab model with
``lab eval``'s settings (efficacy, generality, specificity, fidelity, kept) and computes the erasure report, then the
Spearman rank correlations

    guidance_left    vs  presence = 1 - efficacy     (and 1 - generality)
    unrelated_drift  vs  changed  = 1 - kept

The LoRAs are made with the command line (``python -m erasure ant|mace|lab baseline``) into ``--work`` when missing;
each run's result is kept there too, so an interrupted validation resumes. One command, one thread:

    OMP_NUM_THREADS=1 python scripts/report_validation.py --json reports/report-validation/validation.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: LoRA name -> the command-line arguments that make it (``--out`` is added)
LORAS = {
    "ant-circle-s0": ["ant", "--model", "lab", "--concept", "circle", "--seed", "0"],
    "ant-circle-s3": ["ant", "--model", "lab", "--concept", "circle", "--seed", "3"],
    "ant-square-s0": ["ant", "--model", "lab", "--concept", "square", "--seed", "0"],
    "ant-red-s0": ["ant", "--model", "lab", "--concept", "red", "--seed", "0"],
    "esd-circle-s0": ["lab", "baseline", "--concept", "circle", "--seed", "0"],
    "mace-circle": ["mace", "--model", "lab", "--concepts", "circle"],
    "mace-square": ["mace", "--model", "lab", "--concepts", "square"],
    "mace-green": ["mace", "--model", "lab", "--concepts", "green"],
}

#: (run name, LoRA name, erased concept, strength)
RUNS = [
    ("ant-circle-s0 x0.25", "ant-circle-s0", "circle", 0.25),
    ("ant-circle-s0 x0.5", "ant-circle-s0", "circle", 0.5),
    ("ant-circle-s0 x0.75", "ant-circle-s0", "circle", 0.75),
    ("ant-circle-s0", "ant-circle-s0", "circle", 1.0),
    ("ant-circle-s0 x1.5", "ant-circle-s0", "circle", 1.5),
    ("ant-circle-s3", "ant-circle-s3", "circle", 1.0),
    ("esd-circle-s0 x0.5", "esd-circle-s0", "circle", 0.5),
    ("esd-circle-s0", "esd-circle-s0", "circle", 1.0),
    ("mace-circle", "mace-circle", "circle", 1.0),
    ("ant-square-s0", "ant-square-s0", "square", 1.0),
    ("ant-red-s0 x0.5", "ant-red-s0", "red", 0.5),
    ("ant-red-s0", "ant-red-s0", "red", 1.0),
    ("mace-square", "mace-square", "square", 1.0),
    ("mace-circle x0.5", "mace-circle", "circle", 0.5),
    ("mace-green", "mace-green", "green", 1.0),
]


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the (tie-averaged) ranks."""
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va > 0 and vb > 0 else float("nan")


def make_lora(work: Path, name: str) -> Path:
    path = work / f"{name}.safetensors"
    if not path.exists():
        cmd = [sys.executable, "-m", "erasure", *LORAS[name], "--out", str(path)]
        print("making", name, ":", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return path


def run_one(work: Path, run: tuple[str, str, str, float], backbone, clf) -> dict:
    from erasure.lab import world
    from erasure.lab.demo import lab_concept
    from erasure.lab.evaluate import evaluate
    from erasure.lora_files import load_lora, resolve_names
    from erasure.report import ReportSettings, erasure_report

    name, lora, concept, strength = run
    path = make_lora(work, lora)
    weights = resolve_names(load_lora(path), dict(backbone.unet().named_modules())).scaled(strength)
    # the lab evaluation (the slow part) is kept per run; the report is always computed anew
    cached = work / "results" / f"{name.replace(' ', '_')}.json"
    row = json.loads(cached.read_text()) if cached.exists() else {}
    if "kept" not in row:
        t1 = time.time()
        ev = evaluate(backbone, clf, [concept], weights)
        row = {"efficacy": ev["efficacy"], "generality": ev["generality"], "specificity": ev["specificity"],
               "fidelity": ev["fidelity"], "kept": ev["kept"], "eval_seconds": round(time.time() - t1, 1)}
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(row, indent=2))
    t0 = time.time()
    report = erasure_report(backbone, weights, [lab_concept(concept)], world.prior_prompts(exclude=[concept]),
                            ReportSettings(batch_size=64))
    g, d = report["guidance_left_by_stage"], report["unrelated_drift_by_stage"]
    row = {"run": name, "lora": lora, "concept": concept, "strength": strength,
           **{k: row[k] for k in ("efficacy", "generality", "specificity", "fidelity", "kept", "eval_seconds")},
           "guidance_left": report["guidance_left"], "guidance_left_mid": g["mid"], "guidance_left_late": g["late"],
           "unrelated_drift": report["unrelated_drift"], "unrelated_drift_early": d["early"],
           "unrelated_drift_mid": d["mid"], "unrelated_drift_late": d["late"],
           "unet_evaluations": report["unet_evaluations"], "report_seconds": round(time.time() - t0, 1)}
    print(json.dumps(row), flush=True)
    return row


def correlations(rows: list[dict]) -> dict[str, float]:
    presence = [1 - r["efficacy"] for r in rows]
    syn = [1 - r["generality"] for r in rows]
    changed = [1 - r["kept"] for r in rows]
    out = {
        "guidance_left~presence": spearman([r["guidance_left"] for r in rows], presence),
        "guidance_left~synonym_presence": spearman([r["guidance_left"] for r in rows], syn),
        "guidance_left_mid~presence": spearman([r["guidance_left_mid"] for r in rows], presence),
        "guidance_left_late~presence": spearman([r["guidance_left_late"] for r in rows], presence),
        "unrelated_drift~changed": spearman([r["unrelated_drift"] for r in rows], changed),
        "unrelated_drift_early~changed": spearman([r["unrelated_drift_early"] for r in rows], changed),
        "unrelated_drift_mid~changed": spearman([r["unrelated_drift_mid"] for r in rows], changed),
        "unrelated_drift_late~changed": spearman([r["unrelated_drift_late"] for r in rows], changed),
        "unrelated_drift~1-fidelity": spearman([r["unrelated_drift"] for r in rows], [1 - r["fidelity"] for r in rows]),
        "unrelated_drift~1-specificity": spearman([r["unrelated_drift"] for r in rows],
                                                  [1 - r["specificity"] for r in rows]),
    }
    return {k: round(v, 3) for k, v in out.items()}


def table(rows: list[dict]) -> str:
    lines = ["| run | efficacy | generality | specificity | kept | guidance_left (mid / late) | unrelated_drift |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['efficacy']:.3f} | {r['generality']:.3f} | {r['specificity']:.3f} | "
                     f"{r['kept']:.3f} | {r['guidance_left']:.3f} ({r['guidance_left_mid']:.2f} / "
                     f"{r['guidance_left_late']:.2f}) | {r['unrelated_drift']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="out/report-validation", help="LoRAs and per-run results (resumable)")
    p.add_argument("--json", default="reports/report-validation/validation.json")
    p.add_argument("--only", help="comma-separated run names (default: all)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from erasure.diffusers_backbone import load_diffusers
    from erasure.lab.classifier import load_classifier
    from erasure.lab.model import CLASSIFIER_FILE

    work = (ROOT / args.work) if not Path(args.work).is_absolute() else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = [r for r in RUNS if not args.only or r[0] in args.only.split(",")]
    for name in dict.fromkeys(r[1] for r in runs):
        make_lora(work, name)
    backbone, clf = load_diffusers("lab"), load_classifier(CLASSIFIER_FILE)
    rows = [run_one(work, r, backbone, clf) for r in runs]
    result = {"runs": rows, "spearman": correlations(rows),
              "command": "OMP_NUM_THREADS=1 python scripts/report_validation.py",
              "threads": os.environ.get("OMP_NUM_THREADS")}
    print(table(rows))
    print(json.dumps(result["spearman"], indent=2))
    out = ROOT / args.json if not Path(args.json).is_absolute() else Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
