"""The erasure report's validation (scripts/report_validation.py) read with lab eval's shape-aware metrics: each run of
a validation JSON evaluated again (the same LoRA at the same strength) and the Spearman correlations recomputed with
an empty image read as showing no shape concept and the colour of its field (docs/lab.md#empty-images).

    OMP_NUM_THREADS=1 python scripts/report_validation_aware.py \
        --validation reports/report-validation/validation-s22.json --work out/report-validation-s22 \
        --out reports/report-validation/aware-s22 [--lane 0/3]
    python scripts/report_validation_aware.py --validation ... --out ... --table   # once every lane is done
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erasure.diffusers_backbone import load_diffusers  # noqa: E402
from erasure.lab.classifier import load_classifier  # noqa: E402
from erasure.lab.evaluate import evaluate  # noqa: E402
from erasure.lab.model import CLASSIFIER_FILE  # noqa: E402
from erasure.lora_files import load_lora, resolve_names  # noqa: E402
from scripts.report_validation import spearman  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--validation", required=True)
    p.add_argument("--work", default="out/report-validation")
    p.add_argument("--out", required=True)
    p.add_argument("--lane", default="0/1")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    runs = json.loads(Path(args.validation).read_text())["runs"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table:
        rows = [{**r, **json.loads((out / f"{r['run'].replace(' ', '_')}.json").read_text())} for r in runs]
        print("| run | efficacy (classifier) | efficacy (shape-aware) | no shape, erased prompts | guidance_left |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['run']} | {r['efficacy']:.3f} | {r['aware_efficacy']:.3f} | {r['no_shape_erased']:.0%} "
                  f"| {r['guidance_left']:.3f} |")
        g = [r["guidance_left"] for r in rows]
        cls = spearman(g, [1 - r["efficacy"] for r in rows])
        print(f"\nSpearman guidance_left ~ 1 - efficacy: classifier {cls:.3f}, "
              f"shape-aware {spearman(g, [1 - r['aware_efficacy'] for r in rows]):.3f}; ~ 1 - generality: classifier "
              f"{spearman(g, [1 - r['generality'] for r in rows]):.3f}, shape-aware "
              f"{spearman(g, [1 - r['aware_generality'] for r in rows]):.3f} ({len(rows)} runs)")
        return
    backbone, clf = load_diffusers("lab"), load_classifier(CLASSIFIER_FILE)
    k, n = (int(x) for x in args.lane.split("/"))
    for i, r in enumerate(runs):
        dest = out / f"{r['run'].replace(' ', '_')}.json"
        if i % n != k or dest.exists():
            continue
        weights = resolve_names(load_lora(Path(args.work) / f"{r['lora']}.safetensors"),
                                dict(backbone.unet().named_modules())).scaled(r["strength"])
        ev = evaluate(backbone, clf, [r["concept"]], weights)
        assert abs(ev["efficacy"] - r["efficacy"]) < 1e-9, (r["run"], ev["efficacy"], r["efficacy"])
        a = ev["shape_aware"]
        dest.write_text(json.dumps({"aware_efficacy": a["efficacy"], "aware_generality": a["generality"],
                                    "aware_specificity": a["specificity"],
                                    "no_shape_erased": ev["no_shape"]["erased_prompts"]}, indent=2))
        print(r["run"], dest.read_text(), flush=True)


if __name__ == "__main__":
    main()
