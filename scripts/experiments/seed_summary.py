"""Arms of a pipeline report compared over calibration seeds: per-arm mean ± sd over seeds, and every arm's
paired difference to a reference arm with its 95% t interval over seeds (``mmqdiff.evaluation.seeds``), plus a PNG with each
seed's runs joined across arms.

    .venv/bin/python scripts/experiments/seed_summary.py outputs/embedded/report_seeds/report.json \\
        --reference "W4A8 K=4" --out docs/embedded_seeds.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmqdiff.evaluation.plots import save_figure, seed_comparison_figure
from mmqdiff.evaluation.seeds import METRICS, mean_sd, paired_difference, runs_by_arm

LABELS = {"fid": "FID", "kid": "KID", "psnr_vs_fp": "PSNR vs FP (dB)", "heldout_x_mse": "held-out x-MSE"}
FORMATS = {"fid": ".2f", "kid": ".4f", "psnr_vs_fp": ".2f", "heldout_x_mse": ".3e"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report", help="report.json of a pipeline run whose arms carry ', seed <n>' name suffixes")
    ap.add_argument("--reference", required=True, help="the arm every other is compared with")
    ap.add_argument("--default-seed", type=int, default=1234, help="seed of rows without a suffix")
    ap.add_argument("--out", help="PNG of the per-seed values")
    args = ap.parse_args()
    runs = json.loads(Path(args.report).read_text())["runs"]
    arms = runs_by_arm(runs, args.default_seed)
    if args.reference not in arms:
        raise SystemExit(f"--reference {args.reference!r} is not an arm of {args.report}: {list(arms)}")

    print("| arm | seeds | " + " | ".join(LABELS[m] for m in METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for arm, by_seed in arms.items():
        cells = []
        for m, fmt in FORMATS.items():
            mean, sd = mean_sd([float(r[m]) for r in by_seed.values()])
            cells.append(f"{mean:{fmt}} ± {sd:{fmt}}")
        print(f"| {arm} | {len(by_seed)} | " + " | ".join(cells) + " |")

    print(f"\nPaired by seed, arm minus {args.reference!r} (mean, 95% t interval over seeds; better on n of N seeds):\n")
    print("| arm | " + " | ".join(LABELS[m] for m in METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for arm, by_seed in arms.items():
        if arm == args.reference:
            continue
        cells = []
        for m, fmt in FORMATS.items():
            d = paired_difference(by_seed, arms[args.reference], m)
            lo, hi = d["ci95"]
            mark = "**" if d["resolved"] else ""
            cells.append(f"{mark}{d['mean']:+{fmt}}{mark} [{lo:+{fmt}}, {hi:+{fmt}}], {d['wins']}/{len(d['seeds'])}")
        print(f"| {arm} | " + " | ".join(cells) + " |")
    print("\n(bold: the interval excludes 0)")
    if args.out:
        print(save_figure(seed_comparison_figure(arms, [(m, LABELS[m]) for m in METRICS],
                                                        next((r for r in runs if not r.get("segments")), None)), args.out))


if __name__ == "__main__":
    main()
