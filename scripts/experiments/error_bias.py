"""Systematic vs random part of calibrated runs' noise-prediction error against FP, on held-out trajectories.

Per step i the error d = eps_q - eps_fp over the held-out samples splits into its mean over samples b_i (the part
every image shares) and the rest. Both are weighted by the step's effect on the sample, ``eps_sensitivity`` s_i, as
the held-out x-MSE is. Systematic errors of successive steps push every sample the same way, so they can add up
coherently along the trajectory: ``mean(|sum_i s_i b_i|^2)`` measures that, against ``sum_i s_i^2 mean(b_i^2)`` if
they did not. This tests whether one model per segment loses fidelity to FP through segment-specific biases.

    .venv/bin/python scripts/experiments/error_bias.py outputs/embedded/calib_k1 outputs/embedded/calib_k4 \
        outputs/embedded/calib_k1_eq [--calibration outputs/embedded/calib.pt] [--trajectories 192 256]
"""
from __future__ import annotations

import argparse

import torch

from mmqdiff.evaluation.heldout import load_run


@torch.no_grad()
def decompose(run_dir: str, calibration: str, trajectories: torch.Tensor) -> dict[str, float | list[float]]:
    calib, fp, model_for_step, sens = load_run(run_dir, calibration)
    total = shared = 0.0
    coherent = torch.zeros((), dtype=torch.float64)
    quarters = [[0.0, 0.0] for _ in range(4)]
    for i in range(calib.num_steps):
        x, t = (v[trajectories].float() for v in calib.at_step(i))
        d = (model_for_step(i)(x, t) - fp(x, t)).double()
        b = d.mean(0)
        mse, bias = float(d.square().mean()), float(b.square().mean())
        total, shared, coherent = total + sens[i] ** 2 * mse, shared + sens[i] ** 2 * bias, coherent + sens[i] * b
        quarters[i * 4 // calib.num_steps][0] += mse
        quarters[i * 4 // calib.num_steps][1] += bias
    return {"x_mse": total, "systematic": shared, "coherent": float(coherent.square().mean()),
            "systematic_share_by_quarter": [b / m for m, b in quarters]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="finished calibration run folders")
    ap.add_argument("--calibration", default="outputs/embedded/calib.pt")
    ap.add_argument("--trajectories", type=int, nargs=2, default=(192, 256), metavar=("FIRST", "END"),
                    help="held-out trajectories (beyond every run's cali_n)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    idx = torch.arange(*args.trajectories)
    print(f"{len(idx)} held-out trajectories of {args.calibration}; s_i = eps_sensitivity, b_i = error mean over "
          "samples\n")
    print("| run | held-out x-MSE | systematic part | share | coherent sum of systematic parts | systematic share "
          "per quarter (noisy to clean) |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        r = decompose(run, args.calibration, idx)
        print(f"| {run} | {r['x_mse']:.3e} | {r['systematic']:.3e} | {r['systematic'] / r['x_mse']:.0%} | "
              f"{r['coherent']:.3e} | " + " / ".join(f"{v:.0%}" for v in r["systematic_share_by_quarter"]) + " |",
              flush=True)


if __name__ == "__main__":
    main()
