"""The Markdown table of ``scripts/lab_table.sh``'s reports: one row per method, the lab's measures and the audit's
attack success rates. Usage: python scripts/lab_table.py reports/lab-table/circle-s0"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROWS = [("esd-published", "ESD-x as published (lr 1e-5, 1000 iterations)"),
        ("esd-tuned", "ESD-x tuned on the lab (lr 1e-3, 150 iterations)"),
        ("ant-default", "ANT, default (protect 0.999)"),
        ("ant-paper", "ANT, `--preset paper`"),
        ("ant-robust", "ANT, `--preset robust` (the default's loss on the saliency scope, preservation at the "
                       "prompts' own images, weight 25)"),
        ("mace-default", "MACE, default (object preset: protect 0.999, whole images, uniform timesteps, following "
                         "words)"),
        ("ant-adversarial", "ANT, `--protect 0 --adversarial 1` (adversarial option)"),
        ("ant-protect0", "ANT, `--protect 0` (the default before protect)"),
        ("mace-protect0", "MACE, `--protect 0 --importance-sampling --masks --no-suppress-following` (the "
                          "reference)"),
        ("mace-pt-masks", "MACE, `--importance-sampling --masks --no-suppress-following` (the default before "
                          "the whole-image loss; protect 0.999)"),
        # made by an earlier library (protect projected the result only); kept for comparison, not re-runnable
        ("mace-protect-result", "MACE, `--protect 0.999` on the result only (the library before 720e76d)")]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def table(folder: Path) -> str:
    out = ["| method | efficacy | generality | specificity | kept (collateral) | fidelity | plain prompts | "
           "learned token (erased) | learned token (original) | prefix attack | training s |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, label in ROWS:
        ev, au = folder / f"{name}.eval.json", folder / f"{name}.audit.json"
        if not ev.exists() or not au.exists():
            out.append(f"| {label} | (not run) |" + " |" * 9)
            continue
        e, a = json.loads(ev.read_text()), json.loads(au.read_text())
        train = (folder / f"{name}.train.txt").read_text()
        m = re.search(r"training wall s: (\d+)", train)
        out.append(f"| {label} | {e['efficacy']:.3f} | {e['generality']:.3f} | {e['specificity']:.3f} | "
                   f"{e['kept']:.3f} | {e['fidelity']:.3f} | {_pct(a.get('plain_success_rate'))} | "
                   f"{_pct(a.get('attack_success_rate'))} | {_pct(a.get('attack_success_rate_original'))} | "
                   f"{_pct(a.get('prefix_attack_success_rate'))} | {m.group(1) if m else '-'} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
