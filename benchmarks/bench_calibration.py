"""Calibration cost: seconds per reconstruction iteration (weight / activation phase), per cached sample, per whole
segment, and peak memory; for the embedded model (trained weights and its calibration file when present) and for
full-size CIFAR-10 blocks (random weights and inputs: cost does not depend on values).

    .venv/bin/python benchmarks/bench_calibration.py [--threads 2] [--batch 32] [--iters 30]
        [--segment-iters 160 50] [--cifar-units up.0.block.0 down.1.block.0] [--append benchmarks/RESULTS.md]

Runs on CUDA when available (``--device cpu`` to force). Peak memory: CUDA max allocated per measurement (reset
before each); on CPU the process peak RSS, which only grows (so each row reports the peak so far).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import torch

from mmqdiff.data import load_calibration, timestep_segments
from mmqdiff.diffusion import build_model, load_checkpoint
from mmqdiff.quant import QuantConfig, quantize_model
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


def unit_rows(label: str, fp, xs, ts, names: list[str], batch: int, iters: int, device: torch.device) -> list[str]:
    """Per unit: caching (weight phase: FP targets + quantized-network inputs), then seconds per weight-phase and
    activation-phase iteration (after a short warm-up)."""
    q = quantize_model(fp, QuantConfig()).to(device).eval()
    init_act_quantizers(q, xs, ts, samples=min(8, len(xs)), generator=torch.Generator().manual_seed(0))
    q.set_quant_state(True, False)
    rows = []
    for name in names:
        unit = q.model.get_submodule(name)
        g = torch.Generator().manual_seed(0)
        reset_peak(device)
        cache_s, cache = timed(device, lambda: cache_unit_io(q, fp, name, xs, ts, asym=True))
        reconstruct_weights(unit, cache, iters=3, batch_size=batch, generator=g)  # warm-up
        w_s, _ = timed(device, lambda: reconstruct_weights(unit, cache, iters=iters, batch_size=batch, generator=g))
        a_s, _ = timed(device, lambda: reconstruct_activations(unit, cache, iters=iters, batch_size=batch,
                                                               generator=g))
        rows.append(f"| {label} | {name} | {batch} | {1e3 * w_s / iters:.1f} | {1e3 * a_s / iters:.1f} | "
                    f"{1e3 * cache_s / len(xs):.2f} | {cache.nbytes / 2 ** 20:.1f} | {peak_mib(device):.0f} |")
        print(rows[-1], flush=True)
    return rows


def segment_row(label: str, fp, xs, ts, iters: tuple[int, int], batch: int, device: torch.device) -> str:
    """One whole segment (every unit, both phases, caching included) at the given iterations."""
    q = quantize_model(fp, QuantConfig()).to(device).eval()
    settings = ReconSettings(cali_iters=iters[0], cali_iters_a=iters[1], batch_size=batch)
    reset_peak(device)
    items = work_items(len(q.units()), True)
    seconds, _ = timed(device, lambda: [calibrate_item(q, fp, xs, ts, u, p, settings, item_seed(0, 0, u, p))
                                     for u, p in items])
    row = (f"| {label} segment, {len(xs)} pairs, {len(q.units())} units, {iters[0]}/{iters[1]} iters | {batch} | "
           f"{seconds:.1f} | {peak_mib(device):.0f} |")
    print(row, flush=True)
    return row


def embedded_data(fp) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first of 4 segments' pairs from the shipped calibration file (cali_st 4, cali_n 32 as
    configs/embedded/calibrate_k4.yaml), or random inputs of that size when the file is missing."""
    if EMBEDDED_CALIB.is_file():
        xs, ts = load_calibration(EMBEDDED_CALIB, 4, 32, steps=timestep_segments(100, 4)[0])
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    header = (f"Device: {device} ({name}), {torch.get_num_threads()} torch threads, batch {args.batch}, "
              f"torch {torch.__version__}, float32 eager; load average at start {load:.1f}.")
    print(header, flush=True)
    lines = ["", "## Calibration: reconstruction cost (bench_calibration.py)", header, "",
             "| model | unit | batch | ms/iter weight | ms/iter act | ms/sample caching | cache MiB | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines[-2:]), flush=True)
    fp = load_checkpoint(build_model("configs/embedded.yaml"), "checkpoints/embedded_unet.pt").to(device).eval()
    xs, ts, source = embedded_data(fp)
    lines += unit_rows(f"embedded ({source})", fp, xs, ts, ["down.0.block.0", "up.1.attn.0", "up.0.block.0"],
                       args.batch, args.iters, device)
    cifar = build_model("configs/cifar10.yaml").to(device).eval()
    g = torch.Generator().manual_seed(0)
    n = max(args.cifar_samples, args.cifar_segment[0] if args.cifar_segment else 0)
    cx, ct = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 800, (n,), generator=g).float()
    lines += unit_rows("cifar10 (random)", cifar, cx[:args.cifar_samples], ct[:args.cifar_samples], args.cifar_units,
                       args.batch, args.iters, device)
    lines += ["", "| whole segment | batch | seconds | peak MiB |", "|---|---|---|---|"]
    print("\n".join(lines[-2:]), flush=True)
    lines.append(segment_row("embedded", fp, xs, ts, tuple(args.segment_iters), args.batch, device))
    if args.cifar_segment:
        pairs, w, a = args.cifar_segment
        lines.append(segment_row("cifar10 (random)", cifar, cx[:pairs], ct[:pairs], (w, a), args.batch, device))
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
