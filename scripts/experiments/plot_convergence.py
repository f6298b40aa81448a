"""Plot and tabulate bench_convergence.py results: held-out error against FP versus reconstruction iterations.

    .venv/bin/python scripts/experiments/plot_convergence.py outputs/convergence/runs.jsonl --out docs/convergence.png

One line per (K, lr_w, per-segment budget shape); x: weight iterations per unit (activation iterations in each row's ratio), y: held-out
sample-space error (left) and the plain mean over steps (right). Prints a markdown table of every row.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mmqdiff.diffusion import eps_sensitivity, linear_betas, timesteps  # noqa: E402
from mmqdiff.evaluation.heldout import sample_space_error  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=Path("docs/convergence.png"))
    ap.add_argument("--labels", nargs="*", help="only rows with these labels")
    args = ap.parse_args()
    rows = [json.loads(line) for path in args.runs for line in path.read_text().splitlines() if line.strip()]
    sensitivity = eps_sensitivity(timesteps(100, "quad"), linear_betas())
    for r in rows:  # rows written before the sample-space error existed
        r.setdefault("heldout_x_mse", sample_space_error(r["per_step"], sensitivity))
    if args.labels:
        rows = [r for r in rows if r["label"] in args.labels]
    series = defaultdict(list)  # one line per (K, learning rate, budget shape, warm start's base, calibration data)
    for r in rows:
        base = tuple((r.get("init_from") or {}).get("compute", ()))
        data = (r["cali_st"], r["cali_n"])
        bits = (r.get("weight_bits", 4), r.get("weight_symmetric", False))
        series[(r["k"], r["recon"]["lr_w"], tuple(r.get("segment_scale") or ()), base, data, bits)].append(r)
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=plt.cm.tab20.colors)  # one colour per series
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    for (k, lr, scale, base, data, bits), rs in sorted(series.items()):
        rs.sort(key=lambda r: r["recon"]["cali_iters"])
        x = [r["recon"]["cali_iters"] for r in rs]
        name = f"K={k}, lr_w {lr:g}" + (" (reference)" if lr == 1e-3 else "") + (f", scale {list(scale)}" if scale else "")
        name += f", warm from K=1 {base[0]}/{base[1]}" if base else ""
        name += f", cali_st {data[0]} x cali_n {data[1]}" if data != (4, 32) else ""
        name += f", W{bits[0]}A8" + (" symmetric weights" if bits[1] else "") if bits != (4, False) else ""
        axes[0].plot(x, [r["heldout_x_mse"] for r in rs], marker="o", label=name)
        axes[1].plot(x, [r["heldout_mse"] for r in rs], marker="o", label=name)
    for ax, title in zip(axes, ("held-out sample-space error", "held-out noise-prediction MSE (mean over steps)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("weight iterations per unit and segment")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout(rect=(0, 0.22, 1, 1))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7.5, frameon=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print("| K | label | lr_w | iters (w/a) | cali_st x cali_n | held-out x-space | held-out MSE | quarters "
          "(noisy..clean) | calib s | threads |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["k"], r["recon"]["lr_w"], r["recon"]["cali_iters"])):
        q = " / ".join(f"{v:.4f}" for v in r["quarters"])
        scale = f" scale {r['segment_scale']}" if r.get("segment_scale") else ""
        scale += f" from K=1 {r['init_from']['compute'][0]}/{r['init_from']['compute'][1]}" if r.get("init_from") else ""
        scale += f" W{r['weight_bits']}A8" + (" sym-w" if r.get("weight_symmetric") else "") \
            if r.get("weight_bits", 4) != 4 else ""
        print(f"| {r['k']} | {r['label']}{scale} | {r['recon']['lr_w']:g} | {r['recon']['cali_iters']}/"
              f"{r['recon']['cali_iters_a']} | {r['cali_st']}x{r['cali_n']} | {r['heldout_x_mse']:.2e} | "
              f"{r['heldout_mse']:.4f} | {q} | {r['seconds']:.0f} | {r['threads']} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
