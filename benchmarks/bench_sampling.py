"""Sampling throughput: FP vs K=1 vs K=4 fake-quant models (images/s, same batch, same run, interleaved).

K segment models are K independently quantized copies, frozen, exactly what MultiModelSampler holds; their
calibrated values do not affect speed, so no calibration run is needed. Switching is a list lookup per step.

    .venv/bin/python benchmarks/bench_sampling.py [--steps 100] [--batch 256] [--repeats 2] [--device cpu|cuda]

It also times one FP forward of the full CIFAR-10 model (random weights) at ``--cifar-batch`` (0 skips it).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from mmqdiff.data import segment_of_step, timestep_segments
from mmqdiff.diffusion import build_model, ddim_sample, linear_betas, load_checkpoint, segment_switch, timesteps
from mmqdiff.quant import QuantConfig, quantize_model, set_rounding


def quantized_copies(fp: torch.nn.Module, k: int, calib: torch.Tensor) -> list[torch.nn.Module]:
    models = []
    for _ in range(k):
        q = quantize_model(fp, QuantConfig()).eval()
        q.set_quant_state(True, True)
        with torch.no_grad():
            q(calib, torch.full((calib.shape[0],), 500.0, device=calib.device))  # activation init
        set_rounding(q, "hard")
        q.freeze()
        models.append(q)
    return models


def cifar_forward_seconds(batch: int, repeats: int, device: torch.device) -> float:
    model = build_model("configs/cifar10.yaml").eval().to(device)
    x, t = torch.randn(batch, 3, 32, 32, device=device), torch.full((batch,), 500.0, device=device)
    best = float("inf")
    with torch.inference_mode():
        model(x, t)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x, t)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/embedded.yaml")
    ap.add_argument("--checkpoint", default="checkpoints/embedded_unet.pt")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cifar-batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fp = build_model(args.config)
    if args.checkpoint:
        load_checkpoint(fp, args.checkpoint)
    fp = fp.eval().to(device)
    shape = (args.batch, fp.in_channels, fp.resolution, fp.resolution)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    seq, betas = timesteps(args.steps, "quad"), linear_betas().to(device)
    runs = {"FP": lambda i: fp}
    for k in (1, 4):
        runs[f"W4A8 K={k}"] = segment_switch(quantized_copies(fp, k, x_T[:64]),
                                             segment_of_step(timestep_segments(args.steps, k)))
    best = {name: float("inf") for name in runs}
    with torch.inference_mode():
        for name, model_for_step in runs.items():  # warm-up
            ddim_sample(model_for_step, x_T, seq[:3], betas)
        for _ in range(args.repeats):
            for name, model_for_step in runs.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                ddim_sample(model_for_step, x_T, seq, betas)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - start)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"device {dev}, threads {args.threads}, torch {torch.__version__}, config {args.config}, "
          f"batch {args.batch}, {args.steps} quad steps, best of {args.repeats}")
    print("| run | s per batch | images/s | time vs FP | time vs K=1 |")
    print("|---|---|---|---|---|")
    for name, sec in best.items():
        print(f"| {name} | {sec:.2f} | {args.batch / sec:.1f} | {sec / best['FP']:.2f} | "
              f"{sec / best['W4A8 K=1']:.2f} |")
    if args.cifar_batch:
        sec = cifar_forward_seconds(args.cifar_batch, args.repeats + 1, device)
        print(f"CIFAR-10 model (35.7M params, random weights) FP forward, batch {args.cifar_batch}: {sec * 1e3:.0f} ms "
              f"({args.cifar_batch / sec:.1f} images/s per step; 100 steps: {100 * sec / args.cifar_batch:.2f} s/image)")


if __name__ == "__main__":
    main()
