"""docs/mace.md#protect's table: per lab model and concept set, the mean over training seeds of MACE's default
preset without protect (``reports/mace-bars*``) and with it (``reports/mace-protect/MODEL``: the same runs' files
with ``scripts/protect_lora.py`` applied, which is what ``--protect`` does at the end of a run), and whether the
issue-18 bars are met (mean efficacy 0.9, generality 0.8, specificity 0.85, no seed more than 0.05 below).

    python scripts/mace_protect_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

KEYS = ("efficacy", "generality", "specificity", "fidelity", "kept")
BARS = {"efficacy": 0.90, "generality": 0.80, "specificity": 0.85}
SOURCES = {"lab": Path("reports/mace-bars"), "lab-clip": Path("reports/mace-bars-lab-clip")}


def runs(folder: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in sorted(folder.glob("*.eval.json")):
        concepts = f.name.removesuffix(".eval.json").rsplit("-s", 1)[0]
        out.setdefault(concepts, []).append(json.loads(f.read_text()))
    return out


def row(model: str, concepts: str, label: str, rows: list[dict]) -> str:
    means = {k: sum(d[k] for d in rows) / len(rows) for k in KEYS}
    worst = {k: min(d[k] for d in rows) for k in KEYS}
    met = all(means[k] >= b and worst[k] >= b - 0.05 for k, b in BARS.items())
    cells = " | ".join(f"{means[k]:.3f}" + (f" (lowest {worst[k]:.3f})" if k == "efficacy" else "") for k in KEYS)
    return (f"| {model} | `{concepts.replace('+', '; ')}` | {label} | {len(rows)} | {cells} | "
            f"{'met' if met else 'not met'} |")


def main() -> None:
    print("| model | concepts | protect | seeds | efficacy | generality | specificity | fidelity | kept | bars |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for model, base in SOURCES.items():
        kept = runs(Path("reports/mace-protect") / model)
        for concepts, rows in runs(base).items():
            print(row(model, concepts, "0 (the reference)", rows))
            if concepts in kept:
                print(row(model, concepts, "**0.999 (default)**", kept[concepts]))


if __name__ == "__main__":
    main()
