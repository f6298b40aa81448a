"""Which runtime a quantized model samples with on which device: the int8 kernels (``to_integer``) or fake
quantization in float32 (the calibrated ``QuantizedUNet`` as it is)."""
from __future__ import annotations

import torch

RUNTIMES = ("auto", "int", "fake")
# what "auto" picks per device type, by benchmarks/bench_sampling.py (docs/benchmarks.md): on the 2-core CPU the
# int8 runtime took 0.4-0.7x FP's time; on an H200, where these models are launch-bound, 2.6-3.4x (fake-quant 1.7-1.9x)
AUTO_RUNTIME = {"cpu": "int"}


def resolve_runtime(requested: str, device: torch.device | str) -> str:
    """"int" or "fake" for ``requested`` ("auto", "int" or "fake") on ``device``: "auto" is "int" on CPU and "fake"
    elsewhere (on a GPU the int8 runtime measured slower than fake quantization)."""
    if requested not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {requested!r}")
    if requested != "auto":
        return requested
    return AUTO_RUNTIME.get(torch.device(device).type, "fake")
