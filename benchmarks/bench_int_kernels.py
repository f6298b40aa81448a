"""The measurements behind the integer runtime's backend choices (``mmqdiff/quant/integer.py``), per op at the shapes
of the embedded and CIFAR-10 models: fp32 vs onednn int8 vs ``torch._int_mm`` for convs, linears and the attention
matmuls, the W8 offset correction's channel sum, and GroupNorm variants in the channels-last layout the int8 convs
produce. Best of ``--repeats`` calls, interleaved; quantization of the input included where the runtime pays it.

    .venv/bin/python benchmarks/bench_int_kernels.py [--threads 1] [--repeats 20]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Callable

import torch
import torch.nn.functional as F

from mmqdiff.quant import UniformAffineQuantizer
from mmqdiff.quant.integer import (ActivationCodes, ChannelsLastGroupNorm, IntMMKernel, OneDNNKernel,
                                   centred_channel_sum, integer_bmm, ones_row)

CONV = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)


def best_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1e3 * sec for name, sec in best.items()}


def row(label: str, times: dict[str, float]) -> None:
    print(f"| {label} | " + " | ".join(f"{name} {ms:.2f}" for name, ms in times.items()) + " |", flush=True)


def codes() -> ActivationCodes:
    q = UniformAffineQuantizer(8, symmetric=True)
    q.init_from(torch.randn(1000))
    return ActivationCodes(q)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = codes()
    load = os.getloadavg()[0]
    print(f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}, best of {args.repeats}, ms; "
          f"load average at start {load:.1f}\n")
    print("| op (shape) | times in ms |\n|---|---|")
    with torch.inference_mode():
        for cin, cout, size, batch in [(32, 32, 16, 128), (64, 64, 8, 128), (128, 128, 32, 8), (256, 256, 16, 8)]:
            x = torch.randn(batch, cin, size, size).contiguous(memory_format=torch.channels_last)
            w = torch.randn(cout, cin, 3, 3) * 0.05
            w8 = torch.randint(-15, 16, (cout, cin, 3, 3), dtype=torch.int8)
            args_ = (c, w8, torch.rand(cout) * 0.01, torch.zeros(cout, dtype=torch.int32), torch.randn(cout), CONV)
            onednn, intmm = OneDNNKernel(*args_), IntMMKernel(*args_)
            fns = {"fp32 conv": lambda: F.conv2d(x, w, None, padding=1), "onednn int8": lambda: onednn(x)}
            if batch * size * size <= 32768:
                fns["_int_mm im2col"] = lambda: intmm(x)
            row(f"conv3x3 {cin}->{cout}, {size}x{size}, batch {batch}", best_ms(fns, args.repeats))
        for cin, cout, batch in [(128, 32, 128), (512, 512, 8)]:
            x, w = torch.randn(batch, cin), torch.randn(cout, cin) * 0.05
            w8 = torch.randint(-15, 16, (cout, cin), dtype=torch.int8)
            args_ = (c, w8, torch.rand(cout) * 0.01, torch.zeros(cout, dtype=torch.int32), torch.randn(cout), None)
            onednn, intmm = OneDNNKernel(*args_), IntMMKernel(*args_)
            row(f"linear {cin}->{cout}, batch {batch} (weight bytes onednn {onednn.code_nbytes}, "
                f"_int_mm {intmm.code_nbytes})",
                best_ms({"fp32": lambda: F.linear(x, w), "onednn int8": lambda: onednn(x),
                         "_int_mm": lambda: intmm(x)}, args.repeats))
        for batch, ch, hw in [(128, 64, 64), (8, 256, 256)]:
            q, k = torch.randn(batch, hw, ch), torch.randn(batch, ch, hw)
            qi = torch.randint(-127, 128, (batch, hw, ch)).float()
            ki = torch.randint(-127, 128, (batch, ch, hw)).float()
            row(f"attention q.k, batch {batch}, {hw} positions, {ch} channels (integer levels given)",
                best_ms({"fp32 bmm": lambda: torch.bmm(q, k),
                         "exact fp32 bmm of levels": lambda: integer_bmm(qi, ki, 127),
                         "_int_mm per sample": lambda: integer_bmm(qi, ki, 2 ** 12)}, args.repeats))
        for ch, size in [(32, 16), (64, 8), (96, 16), (128, 8)]:  # the W8 offset correction's channel sum
            u = torch.randint(0, 256, (128, ch, size, size), dtype=torch.uint8).contiguous(
                memory_format=torch.channels_last)
            ones = ones_row(ch)
            row(f"channel sum of uint8 codes, {ch} ch, {size}x{size}, batch 128",
                best_ms({"fp32 rows": lambda: u.movedim(1, -1).reshape(-1, u.shape[1]).float().sum(1).sub_(128 * ch),
                         "onednn GEMV (ours)": lambda: centred_channel_sum(u, 128, ones)}, args.repeats))
        for batch, ch, size in [(128, 32, 16), (128, 128, 16), (8, 128, 32), (8, 256, 16)]:
            gn = torch.nn.GroupNorm(32, ch, eps=1e-6)
            ours = ChannelsLastGroupNorm(32, ch, eps=1e-6)
            x = torch.randn(batch, ch, size, size)
            xc = x.contiguous(memory_format=torch.channels_last)
            row(f"GroupNorm {ch} ch, {size}x{size}, batch {batch}",
                best_ms({"NCHW input (FP model)": lambda: gn(x), "channels-last, PyTorch kernel": lambda: gn(xc),
                         "channels-last, copy to NCHW first": lambda: gn(xc.contiguous()),
                         "channels-last, two-pass (ours)": lambda: ours(xc)}, args.repeats))


if __name__ == "__main__":
    main()
