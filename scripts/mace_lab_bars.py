"""The table of scripts/mace_lab_bars.sh's runs (issue 18, item 3): one row per concept set and training seed, the
mean over seeds, and each concept's LoRA schedule. Usage: python scripts/mace_lab_bars.py [REPORT_DIR]"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

KEYS = ("efficacy", "generality", "specificity", "fidelity", "kept")
BARS = {"efficacy": 0.90, "generality": 0.80, "specificity": 0.85}


def main() -> None:
    rep = Path(sys.argv[1] if len(sys.argv) > 1 else "reports/mace-bars")
    runs: dict[str, list[tuple[int, dict, str]]] = {}
    for f in sorted(rep.glob("*.eval.json")):
        name = f.name.removesuffix(".eval.json")
        concepts, seed = name.rsplit("-s", 1)
        log = (rep / f"{name}.train.txt").read_text()
        sched = re.findall(r"^  '([\w ]+)'.*LoRA (\d+) steps, learning rate ([0-9.e-]+), attention loss at ([0-9.]+)%",
                           log, re.M)
        text = "; ".join(f"{w} {s} / {float(lr):.2g} / {p}%" for w, s, lr, p in sched)
        runs.setdefault(concepts, []).append((int(seed), json.loads(f.read_text()), text))
    print("| concepts | seed | " + " | ".join(KEYS) + " | LoRA steps / rate / probe |")
    print("| --- | ---: | " + " | ".join("---:" for _ in KEYS) + " | --- |")
    for concepts, rows in runs.items():
        label = concepts.replace("+", "; ")
        for seed, d, text in sorted(rows):
            print(f"| `{label}` | {seed} | " + " | ".join(f"{d[k]:.3f}" for k in KEYS) + f" | {text} |")
        means = {k: sum(d[k] for _, d, _ in rows) / len(rows) for k in KEYS}
        worst = {k: min(d[k] for _, d, _ in rows) for k in KEYS}
        met = all(means[k] >= b and worst[k] >= b - 0.05 for k, b in BARS.items())
        print(f"| `{label}` | mean of {len(rows)} | " + " | ".join(f"**{means[k]:.3f}**" for k in KEYS)
              + f" | bars {'met' if met else 'not met'} |")


if __name__ == "__main__":
    main()
