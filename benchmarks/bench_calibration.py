"""Calibration cost: seconds per reconstruction iteration (weight / activation phase), per cached sample, per whole
segment, and peak memory; for the embedded model (trained weights and its calibration file when present) and for
full-size CIFAR-10 blocks (random weights and inputs: cost does not depend on values).

    .venv/bin/python benchmarks/bench_calibration.py [--threads 2] [--batch 32] [--iters 30]
        [--segment-iters 160 50] [--cifar-units up.0.block.0 down.1.block.0] [--append docs/benchmarks.md]
    .venv/bin/python benchmarks/bench_calibration.py --threads 1 --convergence outputs/convergence/runs.jsonl
    .venv/bin/python benchmarks/bench_calibration.py --threads 1 --autocast none bfloat16

The second form times the reconstruction schedules of a convergence sweep (scripts/experiments/bench_convergence.py)
side by side and reports each one's wall time to the reference schedule's converged held-out error.

Runs on CUDA when available (``--device cpu`` to force). Peak memory: CUDA max allocated per measurement (reset
before each); on CPU the process peak RSS, which only grows (so each row reports the peak so far).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from mmqdiff.quant.allocator import keep_freed_memory
from mmqdiff.data import load_calibration, timestep_segments
from mmqdiff.diffusion import build_model, eps_sensitivity, linear_betas, load_checkpoint, timesteps
from mmqdiff.evaluation.heldout import sample_space_error
from mmqdiff.quant import QuantConfig, calibrate, quantize_model
from mmqdiff.quant.reconstruction import (ReconSettings, cache_unit_io, calibrate_item, init_act_quantizers,
                                          item_seed, reconstruct_activations, reconstruct_weights, work_items)

EMBEDDED_CALIB = Path("outputs/embedded/calib.pt")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10


def timed(device: torch.device, fn):
    """(seconds, result) of ``fn()``, synchronised on CUDA."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def unit_rows(label: str, fp, xs, ts, names: list[str], batch: int, iters: int, device: torch.device,
              autocasts: list[str]) -> list[str]:
    """Per unit: caching (weight phase: FP targets + quantized-network inputs), then seconds per weight-phase and
    activation-phase iteration (after a short warm-up), for each ``recon.autocast`` mode in turn, with the time of
    both phases relative to the first mode."""
    q = quantize_model(fp, QuantConfig()).to(device).eval()
    init_act_quantizers(q, xs, ts, samples=min(8, len(xs)), generator=torch.Generator().manual_seed(0))
    q.set_quant_state(True, False)
    rows = []
    for name in names:
        unit = q.model.get_submodule(name)
        first = None
        for mode in autocasts:
            g = torch.Generator().manual_seed(0)
            reset_peak(device)
            cache_s, cache = timed(device, lambda: cache_unit_io(q, fp, name, xs, ts, asym=True))
            reconstruct_weights(unit, cache, iters=3, batch_size=batch, generator=g, autocast=mode)  # warm-up
            w_s, _ = timed(device, lambda: reconstruct_weights(unit, cache, iters=iters, batch_size=batch, generator=g,
                                                               autocast=mode))
            a_s, _ = timed(device, lambda: reconstruct_activations(unit, cache, iters=iters, batch_size=batch,
                                                                   generator=g, autocast=mode))
            first = first or w_s + a_s
            rows.append(f"| {label} | {name} | {mode} | {batch} | {1e3 * w_s / iters:.1f} | {1e3 * a_s / iters:.1f} | "
                        f"{(w_s + a_s) / first:.2f}x | {1e3 * cache_s / len(xs):.2f} | {cache.nbytes / 2 ** 20:.1f} | "
                        f"{peak_mib(device):.0f} |")
            print(rows[-1], flush=True)
    return rows


def segment_rows(label: str, fp, xs, ts, iters: tuple[int, int], batch: int, device: torch.device,
                 autocasts: list[str]) -> list[str]:
    """One whole segment (every unit, both phases, caching included) at the given iterations, per autocast mode."""
    rows, first = [], None
    for mode in autocasts:
        q = quantize_model(fp, QuantConfig()).to(device).eval()
        settings = ReconSettings(cali_iters=iters[0], cali_iters_a=iters[1], batch_size=batch, autocast=mode)
        reset_peak(device)
        items = work_items(len(q.units()), True)
        seconds, _ = timed(device, lambda: [calibrate_item(q, fp, xs, ts, u, p, settings, item_seed(0, 0, u, p))
                                         for u, p in items])
        first = first or seconds
        rows.append(f"| {label} segment, {len(xs)} pairs, {len(q.units())} units, {iters[0]}/{iters[1]} iters | "
                    f"{mode} | {batch} | {seconds:.1f} | {seconds / first:.2f}x | {peak_mib(device):.0f} |")
        print(rows[-1], flush=True)
    return rows


def schedule_seconds(fp, xs, ts, lr_w: float, budgets: tuple[int, int], act_ratio: float, repeats: int,
                     device: torch.device) -> list[float]:
    """Seconds of a whole embedded segment at each weight budget (activation budget in ``act_ratio``), min over
    ``repeats``."""
    out = []
    for w in budgets:
        settings = ReconSettings(cali_iters=w, cali_iters_a=max(1, round(w * act_ratio)), lr_w=lr_w)
        times = []
        for _ in range(repeats):
            times.append(timed(device, lambda: calibrate(fp, QuantConfig(), xs, ts, settings, seed=0))[0])
        out.append(min(times))
    return out


def time_to_target(fp, xs, ts, convergence: Path, repeats: int, device: torch.device) -> list[str]:
    """Wall time to the reference schedule's converged held-out error (its largest budget in the convergence
    results): the schedules differ only in learning rate, so both are timed here side by side, interleaved, as
    ``fixed + per-iteration x iterations`` from two budgets; the iterations each needs come from
    scripts/experiments/bench_convergence.py's held-out results (K=1)."""
    rows = [json.loads(line) for line in convergence.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["k"] == 1 and r.get("segment_scale") is None and not r.get("init_from")]
    sensitivity = eps_sensitivity(timesteps(100, "quad"), linear_betas())
    for r in rows:  # rows written before the sample-space error existed
        r.setdefault("heldout_x_mse", sample_space_error(r["per_step"], sensitivity))
    ref = [r for r in rows if r["recon"]["lr_w"] == 1e-3]
    if not ref:
        raise SystemExit(f"{convergence}: no K=1 reference-schedule (lr_w 0.001) rows")
    target = max(ref, key=lambda r: r["recon"]["cali_iters"])
    lines = ["", f"Target: held-out sample-space error {target['heldout_x_mse']:.3e} of the reference schedule at "
             f"{target['recon']['cali_iters']}/{target['recon']['cali_iters_a']} iterations ({convergence}).", "",
             "| schedule (lr_w) | iterations to target (w/a) | held-out there | s/segment at 40 iters | s at 120 "
             "| modelled s to target | vs reference |", "|---|---|---|---|---|---|---|"]
    budgets = (40, 120)
    ratio = target["recon"]["cali_iters_a"] / target["recon"]["cali_iters"]
    seconds = {}
    for _ in range(repeats):  # interleave the schedules so load drifts hit both alike
        for lr in sorted({r["recon"]["lr_w"] for r in rows if r["heldout_x_mse"] <= target["heldout_x_mse"]}):
            t = schedule_seconds(fp, xs, ts, lr, budgets, ratio, 1, device)
            seconds[lr] = [min(a, b) for a, b in zip(seconds.get(lr, t), t)]
    modelled = {}  # lr -> (the fewest-iterations row reaching the target, modelled seconds to it)
    for lr, (t1, t2) in seconds.items():
        row = min((r for r in rows if r["recon"]["lr_w"] == lr and r["heldout_x_mse"] <= target["heldout_x_mse"]),
                  key=lambda r: r["recon"]["cali_iters"])
        modelled[lr] = (row, t1 + (t2 - t1) / (budgets[1] - budgets[0]) * (row["recon"]["cali_iters"] - budgets[0]))
    ref_s = modelled[1e-3][1]
    for lr, (t1, t2) in sorted(seconds.items()):
        row, sec = modelled[lr]
        lines.append(f"| {lr:g} | {row['recon']['cali_iters']}/{row['recon']['cali_iters_a']} | "
                     f"{row['heldout_x_mse']:.3e} | {t1:.1f} | {t2:.1f} | {sec:.1f} | {sec / ref_s:.2f}x |")
    print("\n".join(lines), flush=True)
    return lines


def embedded_data(fp, k: int = 4) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first of k segments' pairs from the main job's calibration file (cali_st 4, cali_n 32 as
    configs/embedded/calibrate_k1.yaml), or random inputs of that size when the file is missing."""
    if EMBEDDED_CALIB.is_file():
        xs, ts = load_calibration(EMBEDDED_CALIB, 4, 32, steps=timestep_segments(100, k)[0])
        return xs, ts, str(EMBEDDED_CALIB)
    g = torch.Generator().manual_seed(0)
    return torch.randn(160, 3, fp.resolution, fp.resolution, generator=g), torch.randint(0, 800, (160,)).float(), \
        "random"


def main() -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=30, help="timed iterations per phase and unit")
    ap.add_argument("--segment-iters", type=int, nargs=2, default=(160, 50), metavar=("W", "A"))
    ap.add_argument("--cifar-units", nargs="*", default=["up.0.block.0", "down.1.block.0"])
    ap.add_argument("--cifar-samples", type=int, default=64, help="cached samples for the CIFAR-10 blocks")
    ap.add_argument("--cifar-segment", type=int, nargs=3, metavar=("PAIRS", "W", "A"),
                    help="also time a whole CIFAR-10 segment (random data) at these sizes, e.g. 5120 200 50 (GPU)")
    ap.add_argument("--append", type=Path, help="append the tables to this markdown file")
    ap.add_argument("--convergence", type=Path, help="scripts/experiments/bench_convergence.py results: also time "
                    "each schedule to the reference's converged held-out error (and skip the per-unit tables)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--autocast", nargs="+", default=["none"], choices=["none", "bfloat16"],
                    help="recon.autocast modes, timed one after the other per unit and segment (ratios to the first)")
    ap.add_argument("--glibc-malloc", action="store_true",
                    help="keep glibc's default malloc settings instead of the ones cli.py sets (mmqdiff.quant.allocator)")
    args = ap.parse_args()
    malloc = "glibc defaults" if args.glibc_malloc or not keep_freed_memory() else "freed memory kept"
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    header = (f"Device: {device} ({name}), {torch.get_num_threads()} torch threads, batch {args.batch}, "
              f"torch {torch.__version__}, eager (float32 unless autocast), malloc: {malloc}; load average at start {load:.1f}.")
    print(header, flush=True)
    lines = ["", "## Calibration: reconstruction cost (bench_calibration.py)", header, "",
             "| model | unit | autocast | batch | ms/iter weight | ms/iter act | time vs first | ms/sample caching | "
             "cache MiB | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines[-2:]), flush=True)
    fp = load_checkpoint(build_model("configs/embedded.yaml"), "checkpoints/embedded_unet.pt").to(device).eval()
    xs, ts, source = embedded_data(fp, k=1)
    if args.convergence:
        lines = ["", "## Calibration: time to the reference's converged held-out error (bench_calibration.py)",
                 header, *time_to_target(fp, xs, ts, args.convergence, args.repeats, device)]
        if args.append:
            with open(args.append, "a") as f:
                f.write("\n".join(lines) + "\n")
        return lines
    lines += unit_rows(f"embedded ({source})", fp, xs, ts, ["down.0.block.0", "up.1.attn.0", "up.0.block.0"],
                       args.batch, args.iters, device, args.autocast)
    cifar = build_model("configs/cifar10.yaml").to(device).eval()
    g = torch.Generator().manual_seed(0)
    n = max(args.cifar_samples, args.cifar_segment[0] if args.cifar_segment else 0)
    cx, ct = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 800, (n,), generator=g).float()
    lines += unit_rows("cifar10 (random)", cifar, cx[:args.cifar_samples], ct[:args.cifar_samples], args.cifar_units,
                       args.batch, args.iters, device, args.autocast)
    lines += ["", "| whole segment | autocast | batch | seconds | time vs first | peak MiB |", "|---|---|---|---|---|---|"]
    print("\n".join(lines[-2:]), flush=True)
    lines += segment_rows("embedded", fp, xs, ts, tuple(args.segment_iters), args.batch, device, args.autocast)
    if args.cifar_segment:
        pairs, w, a = args.cifar_segment
        lines += segment_rows("cifar10 (random)", cifar, cx[:pairs], ct[:pairs], (w, a), args.batch, device,
                              args.autocast)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
