"""The rows of docs/ant.md#protect's table from seed sweeps (``scripts/ant_seed_sweep.sh``): per folder and tag, the
seeds run, how many met every single-concept bar (``scripts/seed_sweep_table.py``'s bars, collateral included) and
the means, with the erased prompts' other heads kept (``collateral.erased_prompts.all``).

    python scripts/protect_rows.py LABEL=FOLDER:TAG ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from seed_sweep_table import runs  # noqa: E402


def mean(rows: list[dict], k: str) -> str:
    return f"{sum(r[k] for r in rows) / len(rows):.3f}"


def main(argv: list[str]) -> int:
    for arg in argv:
        label, where = arg.split("=", 1)
        folder, tag = where.split(":")
        rows = runs(Path(folder)).get(tag, [])
        if not rows:
            continue
        erased = [json.loads((Path(folder) / f"{tag}-s{r['seed']}.json").read_text())["collateral"]["erased_prompts"]
                  ["all"] for r in rows]
        seeds = ", ".join(str(r["seed"]) for r in rows)
        met = sum(r["meets_bars"] for r in rows)

        low = min(r["kept"] for r in rows)
        print(f"| {label} | {seeds} | {met} of {len(rows)} | {mean(rows, 'efficacy')} | {mean(rows, 'generality')} | "
              f"{mean(rows, 'specificity')} | {mean(rows, 'fidelity')} | {mean(rows, 'kept')} (lowest {low:.3f}) | "
              f"{sum(erased) / len(erased):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
