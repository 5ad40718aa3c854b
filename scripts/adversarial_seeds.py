"""The learned-token attack's success per audit seed for LoRAs of ``scripts/adversarial_ant.sh`` (docs/audit.md#
adversarial-erasure): audit seed 0 from ``reports/adversarial/audit-NAME.json``, seeds 1-3 from
``reports/adversarial/audit-seedS/NAME.json`` (``bash scripts/adversarial_ant.sh audit-seed S NAME...``), with the
images revived out of all audited, and the LoRA's specificity and kept from its ``eval-NAME.json``.

    python scripts/adversarial_seeds.py default-circle-s0 adversarial-circle-s0 ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "adversarial"
AUDIT_SEEDS = 4
IMAGES = 32  # per rate: the audit's default, used by every run of the script


def row(name: str) -> str:
    cells, revived, audited = [], 0, 0
    for seed in range(AUDIT_SEEDS):
        f = REPORTS / (f"audit-{name}.json" if seed == 0 else f"audit-seed{seed}/{name}.json")
        if not f.exists():
            cells.append("-")
            continue
        a = json.loads(f.read_text())
        k = round(a["attack_success_rate"] * IMAGES)
        revived, audited = revived + k, audited + IMAGES
        cells.append(f"{k}/{IMAGES}")
    e = json.loads((REPORTS / f"eval-{name}.json").read_text())
    share = f"{revived}/{audited} ({revived / audited:.0%})" if audited else "-"
    return f"| {name} | {' | '.join(cells)} | {share} | {e['specificity']:.3f} | {e['kept']:.3f} |"


def main(argv: list[str]) -> int:
    seeds = " | ".join(f"audit seed {s}" for s in range(AUDIT_SEEDS))
    print(f"| LoRA | {seeds} | revived in all | specificity | kept |")
    print("| --- |" + " ---: |" * (AUDIT_SEEDS + 3))
    for name in argv:
        print(row(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
