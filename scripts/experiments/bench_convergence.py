"""Convergence of W4A8 calibration on the embedded default: held-out noise-prediction error against FP as a function
of the reconstruction budget, for K=1 and K>1, and the wall time each budget costs (measured in this run).

    .venv/bin/python scripts/experiments/bench_convergence.py --k 1 --iters 160 320 640 1280 \\
        --out outputs/convergence/k1.jsonl
    .venv/bin/python scripts/experiments/bench_convergence.py --k 1 --iters 160 --set lr_w=0.008 --out ...
    .venv/bin/python scripts/experiments/bench_convergence.py --k 4 --iters 120 \\
        --init-from outputs/embedded/calib_k1 ...

``--init-from`` warm-starts every segment from a finished K=1 calibration run (``SegmentCalibration(init_from=)``)
and fine-tunes it with ``--iters``; the row's ``compute`` adds the base run's iterations. ``--iters 0`` scores the
base model itself.

Each spec calibrates every segment in this process (1 thread per item unless --threads says otherwise) on the
calibration file's first ``cali_n`` trajectories and scores on trajectories ``--heldout`` (never used by
calibration). One JSON line per run: settings, seconds, per-step held-out MSE and its quarter means.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from mmqdiff.data import CalibrationFile, segment_of_step, timestep_segments
from mmqdiff.diffusion import build_model, eps_sensitivity, linear_betas, load_checkpoint, state_dict_sha256, timesteps
from mmqdiff.evaluation.heldout import heldout_step_error, quarter_means, sample_space_error
from mmqdiff.segments.run_folder import warm_start_state
from mmqdiff.quant import QuantConfig, WarmStart, calibrate
from mmqdiff.quant.reconstruction import ReconSettings


def parse_overrides(pairs: list[str]) -> dict:
    types = {f.name: f.type for f in fields(ReconSettings)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            raise SystemExit(f"unknown ReconSettings field {key!r}; known: {sorted(types)}")
        kind = types[key] if isinstance(types[key], type) else eval(types[key])  # noqa: S307 (annotation strings)
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def calibrate_segments(fp, calib: CalibrationFile, k: int, cali_st: int, cali_n: int, quant: QuantConfig,
                       settings: ReconSettings, seed: int, scale: list[float] | None = None,
                       init_state: dict | None = None, warm: WarmStart = WarmStart()) -> tuple[list, list]:
    """K segment models as ``SegmentCalibration`` makes them (same seeds, per-segment budgets and warm start)."""
    segments = timestep_segments(calib.num_steps, k)
    models = []
    for s, steps in enumerate(segments):
        xs, ts = calib.select(cali_st, cali_n, steps)
        q = calibrate(fp, quant, xs, ts, settings if scale is None else settings.scaled(scale[s]), seed=seed,
                      segment=s, init_state=init_state, warm=warm)
        q.freeze()
        models.append(q)
    return models, segments


def compute(settings: ReconSettings, k: int, scale: list[float] | None, base: dict | None) -> list[int]:
    """[weight, act] iterations per unit over all segments plus the warm start's base run (as
    ``mmqdiff.manifest.calibration_compute`` counts a run)."""
    segs = [settings if scale is None else settings.scaled(f) for f in (scale or [1.0] * k)]
    extra = [0, 0] if base is None else base["compute"]
    return [extra[0] + sum(s.cali_iters for s in segs), extra[1] + sum(s.cali_iters_a for s in segs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", default="outputs/embedded/calib.pt")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--iters", type=int, nargs="+", default=[160, 320, 640, 1280])
    ap.add_argument("--act-ratio", type=float, default=0.3125, help="activation iterations per weight iteration "
                    "(0.3125: the shipped 160/50 and the issue's 1280/400)")
    ap.add_argument("--cali-st", type=int, default=4)
    ap.add_argument("--cali-n", type=int, default=32)
    ap.add_argument("--heldout", type=int, nargs=2, default=(192, 256), metavar=("FIRST", "END"))
    ap.add_argument("--weight-bits", type=int, default=4)
    ap.add_argument("--weight-symmetric", action="store_true",
                    help="symmetric per-channel weights (zero point 0: the integer runtime needs no offsets at W8)")
    ap.add_argument("--set", nargs="*", default=[], help="ReconSettings overrides, e.g. lr_w=0.008")
    ap.add_argument("--segment-scale", type=float, nargs="*", help="per-segment iteration factors")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--init-from", type=Path, help="warm start: a finished K=1 calibration run folder")
    ap.add_argument("--soft-margin", default=str(WarmStart.soft_margin), help="warm start: alphas restart at "
                    "h = 0.5 +- this from the loaded rounding; 'none' keeps the loaded alphas")
    ap.add_argument("--warm-act-init", action="store_true", help="warm start: new activation ranges from the "
                    "segment's data instead of the loaded step sizes")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, default=Path("outputs/convergence/runs.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fp = load_checkpoint(build_model("configs/embedded.yaml"), "checkpoints/embedded_unet.pt").eval()
    calib = CalibrationFile(args.calibration)
    quant = QuantConfig(weight_bits=args.weight_bits, act_bits=8, weight_symmetric=args.weight_symmetric)
    overrides = parse_overrides(args.set)
    warm = WarmStart(None if args.soft_margin.lower() == "none" else float(args.soft_margin), args.warm_act_init)
    base, init_state = (None, None) if args.init_from is None else \
        warm_start_state(args.init_from, state_dict_sha256(fp), asdict(quant))
    heldout = range(*args.heldout)
    sensitivity = eps_sensitivity(timesteps(calib.num_steps, "quad"), linear_betas())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for iters in args.iters:
        settings = replace(ReconSettings(cali_iters=iters,
                                         cali_iters_a=max(min(1, iters), round(iters * args.act_ratio))), **overrides)
        start = time.perf_counter()
        models, segments = calibrate_segments(fp, calib, args.k, args.cali_st, args.cali_n, quant, settings,
                                              args.seed, args.segment_scale, init_state, warm)
        seconds = time.perf_counter() - start
        step_seg = segment_of_step(segments)
        err = heldout_step_error(lambda i: models[step_seg[i]], fp, calib, heldout)
        row = {"label": args.label, "k": args.k, "cali_st": args.cali_st, "cali_n": args.cali_n,
               "weight_bits": args.weight_bits, "weight_symmetric": args.weight_symmetric, "recon": asdict(settings), "overrides": overrides,
               "segment_scale": args.segment_scale,
               "init_from": None if base is None else {**base, "warm": asdict(warm)},
               "compute": compute(settings, args.k, args.segment_scale, base),
               "seconds": seconds, "threads": args.threads, "seed": args.seed, "heldout_mse": sum(err) / len(err),
               "heldout_x_mse": sample_space_error(err, sensitivity),
               "quarters": quarter_means(err), "per_step": err}
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        q = " ".join(f"{v:.5f}" for v in row["quarters"])
        print(f"K={args.k} {iters}/{settings.cali_iters_a} {overrides} compute {row['compute']} {seconds:.0f}s heldout {row['heldout_mse']:.5f} x-space {row['heldout_x_mse']:.6f}"
              f" quarters {q}", flush=True)


if __name__ == "__main__":
    main()
