"""`lab eval` reports side by side as the classifier reads them and with empty images read as showing no shape
(docs/lab.md#empty-images). Usage: python scripts/presence_table.py REPORT.json... (or a folder of *.eval.json)"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def kept_aware(a: dict) -> str:
    """``kept`` with empty images read as empty (reports made before it existed: a dash)."""
    return f"{a['kept']:.3f}" if "kept" in a else "-"


def main() -> None:
    files: list[Path] = []
    for a in sys.argv[1:]:
        p = Path(a)
        files += sorted(p.glob("*.eval.json")) if p.is_dir() else [p]
    print("| run | efficacy | generality | specificity | read as no shape: efficacy / generality / specificity "
          "| no shape: erased prompts / synonyms / unrelated (original) | kept: classifier / empty read as empty |")
    print("| --- | ---: | ---: | ---: | --- | --- | --- |")
    for f in files:
        d = json.loads(f.read_text())
        if "shape_aware" not in d:
            print(f"| {f.name} | (no presence fields: evaluated before docs/lab.md#empty-images) | | | | | |")
            continue
        a, e = d["shape_aware"], d["no_shape"]
        name = f.name.removesuffix(".json").removesuffix(".eval")
        print(f"| {name} | {d['efficacy']:.3f} | {d['generality']:.3f} | {d['specificity']:.3f} "
              f"| {a['efficacy']:.3f} / {a['generality']:.3f} / {a['specificity']:.3f} "
              f"| {e['erased_prompts']:.0%} / {e['synonym_prompts']:.0%} / {e['unrelated']:.0%} "
              f"({e['unrelated_original']:.0%}) | {d['kept']:.3f} / {kept_aware(a)} |")


if __name__ == "__main__":
    main()
