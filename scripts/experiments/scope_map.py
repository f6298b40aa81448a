"""Where one model per segment pays (configs/experiments/segment_scope_*.yaml, one pipeline per setting): for each
K>1 arm of the reports (a setting's weight/activation bits and its segment_scope, "full" or "activations"), the
paired difference over calibration seeds to the K=1 arm given the same total calibration compute (FID, KID, PSNR vs
FP, held-out x-MSE; mean, 95% t interval, seeds where K>1 is better: ``mmqdiff.evaluation.seeds``), its FID against
the best K=1 at no more compute, the calibration seconds (a warm-started run with its K=1 base), the bytes stored and
resident on the integer runtime, sampling seconds per image, the K of a setting and scope against each other at
equal compute, a per-seed table per setting, and a figure of the FID difference against the activation bits per
variant (K=4) and, where a setting was run at several K, against K.

    .venv/bin/python scripts/experiments/scope_map.py outputs/embedded/report_scope_*/report.json \\
        --out docs/segment_scope_map.png

(scripts/experiments/scope_map.sh runs the pipelines and then this.)

Rows name their seed as ``", seed <n>"``; the K=1 arm a K>1 arm is compared with is the one with the same bits and
the same total iterations (``calib_iters_total``), as ``equal_compute_to`` pairs them. Resident bytes are measured
on the first seed's run folder of each arm (``IntegerSegments.sampling_nbytes``; the pipeline record beside the
report names the folders).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from mmqdiff.evaluation.plots import save_figure
from mmqdiff.evaluation.seeds import mean_sd, paired_difference, runs_by_arm
from mmqdiff.pipeline import RECORD_NAME
from mmqdiff.segments import SegmentedModel
from mmqdiff.segments.run_folder import read_manifest

METRICS = {"fid": ("FID", ".2f"), "kid": ("KID", ".4f"), "psnr_vs_fp": ("PSNR vs FP (dB)", ".2f"),
           "heldout_x_mse": ("held-out x-MSE", ".1e")}
Arm = dict[int, dict[str, Any]]


def first(arm: Arm) -> dict[str, Any]:
    return arm[min(arm)]


def setting(arm: Arm) -> tuple[int, int]:
    return first(arm)["weight_bits"], first(arm)["act_bits"]


def equal_compute_reference(name: str, arm: Arm, arms: dict[str, Arm]) -> str:
    """The K=1 arm with ``arm``'s bits and total iterations."""
    compute = first(arm)["calib_iters_total"]
    found = [other for other, runs in arms.items() if first(runs)["segments"] == 1
             and setting(runs) == setting(arm) and first(runs)["calib_iters_total"] == compute]
    if len(found) != 1:
        raise SystemExit(f"{name!r}: {len(found)} K=1 arms at W{setting(arm)[0]}A{setting(arm)[1]} with its compute "
                         f"{compute} ({found}); the report needs exactly one")
    return found[0]


def strongest_reference(arm: Arm, arms: dict[str, Arm]) -> str:
    """The K=1 arm with ``arm``'s bits, at most its iterations (weight and activation each) and the lowest mean FID
    over the seeds: more iterations do not always help K=1, so this is the comparison a sceptic would pick."""
    compute = first(arm)["calib_iters_total"]
    cheaper = [other for other, runs in arms.items() if first(runs)["segments"] == 1 and setting(runs) == setting(arm)
               and all(o <= c for o, c in zip(first(runs)["calib_iters_total"], compute))]
    return min(cheaper, key=lambda other: statistics.fmean(
        arms[other][seed]["fid"] for seed in set(arms[other]) & set(arm)))


def difference(arm: Arm, reference: Arm, metric: str) -> dict[str, Any]:
    """``paired_difference``; with a single common seed (a smoke run) the difference alone, without an interval."""
    seeds = sorted(set(arm) & set(reference))
    if len(seeds) >= 2:
        return paired_difference(arm, reference, metric)
    diff = float(arm[seeds[0]][metric]) - float(reference[seeds[0]][metric])
    return {"seeds": seeds, "mean": diff, "ci95": None, "wins": None, "resolved": False}


def cell(d: dict[str, Any], fmt: str) -> str:
    if d["ci95"] is None:
        return f"{d['mean']:+{fmt}} (1 seed)"
    lo, hi = d["ci95"]
    mark = "**" if d["resolved"] else ""
    return f"{mark}{d['mean']:+{fmt}}{mark} [{lo:+{fmt}}, {hi:+{fmt}}], {d['wins']}/{len(d['seeds'])}"


def calibration_seconds(run_dir: str) -> float:
    """A run's calibration wall time, with that of the K=1 run it was warm-started from."""
    manifest = read_manifest(run_dir)
    base = manifest.get("init_from")
    return manifest["wall_seconds"] + (0.0 if base is None else read_manifest(base["path"])["wall_seconds"])


def resident_bytes(run_dir: str) -> int:
    """Bytes the run's segment models hold on the integer runtime while sampling (``pack="active"``)."""
    return SegmentedModel.load(run_dir).to_integer().models.sampling_nbytes()


def fid_spread(arm: Arm) -> str:
    """The arm's FID over its seeds: mean ± sd (number of seeds)."""
    m, sd = mean_sd([r["fid"] for r in arm.values()])
    return f"{m:.2f} ± {sd:.2f} ({len(arm)} seeds)"


def seed_tables(arms: dict[str, Arm]) -> None:
    """Per setting: FID / PSNR vs FP of every arm in every seed, and FID's mean and sd over the seeds."""
    for bits in dict.fromkeys(setting(a) for a in arms.values()):
        names = [name for name, arm in arms.items() if setting(arm) == bits]
        seeds = list(dict.fromkeys(seed for name in names for seed in arms[name]))
        print(f"\nW{bits[0]}A{bits[1]}, FID / PSNR vs FP (dB) per calibration seed\n")
        print("| seed | " + " | ".join(f"{n} ({'/'.join(map(str, first(arms[n])['calib_iters_total']))})"
                                      for n in names) + " |")
        print("|---|" + "---|" * len(names))
        for seed in seeds:
            print(f"| {seed} | " + " | ".join(f"{arms[n][seed]['fid']:.2f} / {arms[n][seed]['psnr_vs_fp']:.1f}"
                                             if seed in arms[n] else "-" for n in names) + " |")
        print("| FID mean ± sd | " + " | ".join(fid_spread(arms[n]) for n in names) + " |")


def across_k(arms: dict[str, Arm]) -> None:
    """Per setting and scope run at several K with the same total compute: each K's FID and its paired difference to
    the K with the lowest mean FID (is more segments better, or is one K enough?)."""
    groups: dict[tuple, list[str]] = {}
    for name, arm in arms.items():
        if first(arm)["segments"] > 1:
            key = (*setting(arm), first(arm).get("segment_scope", "full"), tuple(first(arm)["calib_iters_total"]))
            groups.setdefault(key, []).append(name)
    for (w, a, scope, compute), names in groups.items():
        if len(names) < 2:
            continue
        names.sort(key=lambda n: first(arms[n])["segments"])
        best = min(names, key=lambda n: statistics.fmean(r["fid"] for r in arms[n].values()))
        print(f"\nW{w}A{a}, segment_scope {scope}, {compute[0]}/{compute[1]} iterations: FID per K, and K minus "
              f"{best} paired by seed\n")
        print("| arm | FID mean ± sd | minus the best K |")
        print("|---|---|---|")
        for n in names:
            versus = "-" if n == best else cell(difference(arms[n], arms[best], "fid"), ".2f")
            print(f"| {n} | {fid_spread(arms[n])} | {versus} |")


def _interval(points: list[tuple[float, dict[str, Any]]]) -> list[list[float]] | None:
    """Error bars (below, above) of the 95% intervals, or None when a point has none (a single seed)."""
    if any(d["ci95"] is None for _, d in points):
        return None
    return [[d["mean"] - d["ci95"][0] for _, d in points], [d["ci95"][1] - d["mean"] for _, d in points]]


def figure(rows: list[dict[str, Any]]) -> Figure:
    """FID difference to K=1 at equal compute (95% interval over seeds): against the activation bits for the K=4 arms,
    one series per weight bits and segment_scope; and, where a setting and scope were run at several K, against K."""
    by_k = {(r["weight_bits"], r["act_bits"], r["scope"]) for r in rows if r["segments"] != 4}
    fig = Figure(figsize=(10.4 if by_k else 6.4, 4.0))
    axes = fig.subplots(1, 2 if by_k else 1, squeeze=False)[0]
    ax = axes[0]
    k4 = [r for r in rows if r["segments"] == 4]
    series = sorted({(r["weight_bits"], r["scope"]) for r in k4})
    for i, (w, scope) in enumerate(series):
        points = sorted((r["act_bits"], r["fid"]) for r in k4 if (r["weight_bits"], r["scope"]) == (w, scope))
        x = [a + 0.12 * (i - (len(series) - 1) / 2) for a, _ in points]
        ax.errorbar(x, [d["mean"] for _, d in points], yerr=_interval(points), marker="o" if scope == "full" else "s",
                    capsize=3, linestyle="-" if w == 4 else ":", label=f"W{w}, segment_scope {scope}")
    bits = sorted({r["act_bits"] for r in k4})
    ax.set_xticks(bits)
    ax.set_xlim(bits[0] - 1, bits[-1] + 1)
    ax.set_xlabel("activation bits")
    ax.set_ylabel("FID, K=4 minus K=1 at equal compute")
    ax.set_title("K=4 segments; below 0: one model per segment pays", fontsize=9)
    ax.legend(fontsize=8)
    if by_k:
        ax = axes[1]
        for w, a, scope in sorted(by_k):
            points = sorted((r["segments"], r["fid"]) for r in rows
                            if (r["weight_bits"], r["act_bits"], r["scope"]) == (w, a, scope))
            ax.errorbar([k for k, _ in points], [d["mean"] for _, d in points], yerr=_interval(points), marker="s",
                        capsize=3, label=f"W{w}A{a}, segment_scope {scope}")
        ks = sorted({r["segments"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("segments K")
        ax.set_ylabel("FID, K minus K=1 at equal compute")
        ax.set_title("same total compute for every K", fontsize=9)
        ax.legend(fontsize=8)
    for ax in axes:
        ax.axhline(0.0, color="grey", linewidth=0.8)
    fig.tight_layout()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reports", nargs="+", type=Path,
                    help="report.json of configs/experiments/segment_scope_*.yaml (or of a shrunken copy)")
    ap.add_argument("--default-seed", type=int, default=1234, help="seed of rows without a ', seed <n>' suffix")
    ap.add_argument("--out", help="PNG of the FID difference against activation bits")
    ap.add_argument("--no-resident", action="store_true", help="skip loading run folders for the resident bytes")
    args = ap.parse_args()
    runs = [run for report in args.reports for run in json.loads(report.read_text())["runs"]]
    run_dirs = {row["name"]: row["run_dir"] for report in args.reports
                for row in json.loads((report.parent / RECORD_NAME).read_text())["rows"] if "run_dir" in row}
    arms = runs_by_arm(runs, args.default_seed)

    rows = []
    for name, arm in arms.items():
        if first(arm)["segments"] == 1:
            continue
        ref_name = equal_compute_reference(name, arm, arms)
        ref = arms[ref_name]
        strongest = strongest_reference(arm, arms)
        row = {"arm": name, "reference": ref_name, "scope": first(arm).get("segment_scope", "full"),
               "segments": first(arm)["segments"],
               "strongest": strongest, "fid_strongest": difference(arm, arms[strongest], "fid"),
               "weight_bits": setting(arm)[0], "act_bits": setting(arm)[1],
               **{m: difference(arm, ref, m) for m in METRICS},
               "seconds": [statistics.fmean(calibration_seconds(run_dirs[r["name"]]) for r in a.values())
                           for a in (arm, ref)],
               "stored": [first(a)["model_bytes"] for a in (arm, ref)],
               "s_per_image": [statistics.fmean(r["sampling_seconds_per_image"] for r in a.values())
                               for a in (arm, ref)],
               "resident": None if args.no_resident else [resident_bytes(run_dirs[first(a)["name"]])
                                                          for a in (arm, ref)]}
        rows.append(row)

    print("Paired by calibration seed, K>1 minus K=1 at equal compute (mean [95% t interval], seeds where K>1 is "
          "better); mean calibration wall time (K>1 with its K=1 base) and sampling seconds per image; "
          "K>1 / K=1\n")
    print("| arm | K=1 at its compute | " + " | ".join(label for label, _ in METRICS.values())
          + " | FID vs the best K=1 at no more compute | calibration s | stored bytes | resident bytes | "
          "sampling s/image |")
    print("|---|---|" + "---|" * (len(METRICS) + 5))
    for r in rows:
        resident = "-" if r["resident"] is None else f"{r['resident'][0]:,} / {r['resident'][1]:,}"
        print(f"| {r['arm']} | {r['reference']} | " + " | ".join(cell(r[m], fmt) for m, (_, fmt) in METRICS.items())
              + f" | {cell(r['fid_strongest'], '.2f')} ({r['strongest']})"
              + f" | {r['seconds'][0]:.0f} / {r['seconds'][1]:.0f} | {r['stored'][0]:,} / {r['stored'][1]:,} | "
              f"{resident} | {r['s_per_image'][0]:.3f} / {r['s_per_image'][1]:.3f} |")
    print("\n(bold: the interval excludes 0)")
    across_k(arms)
    seed_tables(arms)
    if args.out:
        print(save_figure(figure(rows), args.out))


if __name__ == "__main__":
    main()
