"""The measurements behind the integer runtime's backend choices (``mmqdiff/quant/integer.py``), per op at the shapes
of the embedded and CIFAR-10 models: fp32 vs onednn int8 vs ``torch._int_mm`` for convs, linears and the attention
matmuls, the W8 offset correction's channel sum, and GroupNorm variants in the channels-last layout the int8 convs
produce. Best of ``--repeats`` calls, interleaved; quantization of the input included where the runtime pays it.

On CUDA (``--device cuda``) the 3x3 conv candidates the CUDA backend chooses between: cuDNN fp32 (TF32 off and on),
``_int_mm`` on im2col patches, a ``torch.compile``d fake-quant conv (quantize-dequantize fused, then the fp32 conv),
and whether PyTorch reaches a cuDNN int8 conv at all; onednn rows are CPU only.

    .venv/bin/python benchmarks/bench_int_kernels.py [--threads 1] [--repeats 20] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import functools
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
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1e3 * sec for name, sec in best.items()}


def row(label: str, times: dict[str, float]) -> None:
    print(f"| {label} | " + " | ".join(f"{name} {ms:.2f}" for name, ms in times.items()) + " |", flush=True)


def sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def codes(device: torch.device) -> ActivationCodes:
    q = UniformAffineQuantizer(8, symmetric=True)
    q.init_from(torch.randn(1000))
    return ActivationCodes(q.to(device))


def with_tf32(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with cuDNN's TF32 convolutions on (PyTorch's default; the other CUDA rows run with it off)."""
    def run() -> object:
        torch.backends.cudnn.allow_tf32 = True
        try:
            return fn()
        finally:
            torch.backends.cudnn.allow_tf32 = False
    return run


def fake_quant_conv(x: torch.Tensor, w: torch.Tensor, delta: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The fake-quant layer's forward for a symmetric 8-bit input: quantize-dequantize, then the fp32 conv."""
    return F.conv2d((x / delta).round().clamp(lo, hi) * delta, w, None, padding=1)


def cudnn_int8_conv_probe(device: torch.device) -> str:
    """Whether eager PyTorch runs an int8 conv on this device (cuDNN int8 is not exposed as an op with int8 weights)."""
    try:
        F.conv2d(torch.ones(1, 8, 4, 4, dtype=torch.int8, device=device),
                 torch.ones(8, 8, 3, 3, dtype=torch.int8, device=device))
        return "runs"
    except (RuntimeError, NotImplementedError) as e:
        return f"not available: {str(e).splitlines()[0][:120]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the CUDA backend's candidates")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = codes(device)
    load = os.getloadavg()[0]
    where = (f"{torch.cuda.get_device_name(device)}, TF32 off unless a row says so" if cuda
             else f"{platform.machine()} CPU, {args.threads} threads")
    print(f"{where}, torch {torch.__version__}, best of {args.repeats}, ms; load average at start {load:.1f}\n")
    if cuda:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        print(f"eager int8 conv2d on {device}: {cudnn_int8_conv_probe(device)}\n")
    randn = functools.partial(torch.randn, device=device)
    print("| op (shape) | times in ms |\n|---|---|")
    with torch.inference_mode():
        for cin, cout, size, batch in [(32, 32, 16, 128), (64, 64, 8, 128), (128, 128, 32, 8), (256, 256, 16, 8),
                                       (128, 128, 32, 64)]:
            x = randn(batch, cin, size, size).contiguous(memory_format=torch.channels_last)
            w = randn(cout, cin, 3, 3) * 0.05
            w8 = torch.randint(-15, 16, (cout, cin, 3, 3), dtype=torch.int8, device=device)
            args_ = (c, w8, torch.rand(cout, device=device) * 0.01, torch.zeros(cout, dtype=torch.int32, device=device),
                     randn(cout), CONV)
            intmm = IntMMKernel(*args_)
            fns = {"fp32 conv": lambda: F.conv2d(x, w, None, padding=1)}
            if cuda:
                fns.update({"fp32 conv TF32": with_tf32(fns["fp32 conv"]), "_int_mm im2col": lambda: intmm(x)})
                compiled = torch.compile(fake_quant_conv, dynamic=False)
                try:
                    compiled(x, w, c.delta, c.lo, c.hi)
                    fns["compiled fake-quant conv"] = lambda: compiled(x, w, c.delta, c.lo, c.hi)
                except Exception as e:  # noqa: BLE001 (reported: a row without this candidate, and why)
                    print(f"torch.compile of the fake-quant conv failed: {type(e).__name__}: {e}"[:300])
            else:
                onednn = OneDNNKernel(*args_)
                fns["onednn int8"] = lambda: onednn(x)
                if batch * size * size <= 32768:
                    fns["_int_mm im2col"] = lambda: intmm(x)
            row(f"conv3x3 {cin}->{cout}, {size}x{size}, batch {batch}", best_ms(fns, args.repeats))
        for cin, cout, batch in [(128, 32, 128), (512, 512, 8)]:
            x, w = randn(batch, cin), randn(cout, cin) * 0.05
            w8 = torch.randint(-15, 16, (cout, cin), dtype=torch.int8, device=device)
            args_ = (c, w8, torch.rand(cout, device=device) * 0.01, torch.zeros(cout, dtype=torch.int32, device=device),
                     randn(cout), None)
            intmm = IntMMKernel(*args_)
            fns = {"fp32": lambda: F.linear(x, w), "_int_mm": lambda: intmm(x)}
            label = f"linear {cin}->{cout}, batch {batch} (weight bytes _int_mm {intmm.code_nbytes}"
            if not cuda:
                onednn = OneDNNKernel(*args_)
                fns["onednn int8"] = lambda: onednn(x)
                label += f", onednn {onednn.code_nbytes}"
            row(label + ")", best_ms(fns, args.repeats))
        for batch, ch, hw in [(128, 64, 64), (8, 256, 256)]:
            q, k = randn(batch, hw, ch), randn(batch, ch, hw)
            qi = torch.randint(-127, 128, (batch, hw, ch), device=device).float()
            ki = torch.randint(-127, 128, (batch, ch, hw), device=device).float()
            row(f"attention q.k, batch {batch}, {hw} positions, {ch} channels (integer levels given)",
                best_ms({"fp32 bmm": lambda: torch.bmm(q, k),
                         "exact fp32 bmm of levels": lambda: integer_bmm(qi, ki, 127),
                         "_int_mm per sample": lambda: integer_bmm(qi, ki, 2 ** 12)}, args.repeats))
        for ch, size in [] if cuda else [(32, 16), (64, 8), (96, 16), (128, 8)]:  # the W8 offset correction's sum
            u = torch.randint(0, 256, (128, ch, size, size), dtype=torch.uint8).contiguous(
                memory_format=torch.channels_last)
            ones = ones_row(ch)
            row(f"channel sum of uint8 codes, {ch} ch, {size}x{size}, batch 128",
                best_ms({"fp32 rows": lambda: u.movedim(1, -1).reshape(-1, u.shape[1]).float().sum(1).sub_(128 * ch),
                         "onednn GEMV (ours)": lambda: centred_channel_sum(u, 128, ones)}, args.repeats))
        for batch, ch, size in [(128, 32, 16), (128, 128, 16), (8, 128, 32), (8, 256, 16)]:
            gn = torch.nn.GroupNorm(32, ch, eps=1e-6).to(device)
            ours = ChannelsLastGroupNorm(32, ch, eps=1e-6).to(device)
            x = randn(batch, ch, size, size)
            xc = x.contiguous(memory_format=torch.channels_last)
            row(f"GroupNorm {ch} ch, {size}x{size}, batch {batch}",
                best_ms({"NCHW input (FP model)": lambda: gn(x), "channels-last, PyTorch kernel": lambda: gn(xc),
                         "channels-last, copy to NCHW first": lambda: gn(xc.contiguous()),
                         "channels-last, two-pass (ours)": lambda: ours(xc)}, args.repeats))


if __name__ == "__main__":
    main()
