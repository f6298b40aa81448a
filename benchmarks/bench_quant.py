"""Fake-quant forward overhead vs FP (same process, interleaved repeats, min time), frozen vs unfrozen, plus export
size. Random weights: timing does not depend on them.

    .venv/bin/python benchmarks/bench_quant.py [--threads 2] [--repeats 5] [--append docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from mmqdiff.diffusion import build_model
from mmqdiff.quant import QuantConfig, export_packed, packed_nbytes, quantize_model, set_rounding

CASES = (("embedded", "configs/embedded.yaml", 64), ("cifar10", "configs/cifar10.yaml", 8))


def variants(fp: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """FP, W4A8 and W4A16 (weights only), unfrozen (weights fake-quantized every call) and frozen (cached)."""
    unfrozen = quantize_model(fp, QuantConfig()).eval()
    unfrozen.set_quant_state(True, True)
    with torch.no_grad():
        unfrozen(x, t)  # activation init
    set_rounding(unfrozen, "hard")
    frozen = copy.deepcopy(unfrozen)
    frozen.freeze()

    def run(model: torch.nn.Module, act: bool) -> Callable[[], torch.Tensor]:
        def forward() -> torch.Tensor:
            model.set_quant_state(True, act)
            return model(x, t)
        return forward
    calls = {"FP": lambda: fp(x, t)}
    for name, act in (("W4A8", True), ("W4A16", False)):
        calls[f"{name} unfrozen"], calls[f"{name} frozen"] = run(unfrozen, act), run(frozen, act)
    return calls


def time_calls(calls: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, float]:
    """Min wall time per forward; variants interleaved so load from other processes hits all of them alike."""
    best = {name: float("inf") for name in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()  # warm-up (oneDNN primitive creation)
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def export_sizes(q: torch.nn.Module, fp: torch.nn.Module) -> tuple[int, int, int]:
    """(exact tensor bytes of the packed export, its torch.save size, FP state_dict torch.save size)."""
    def saved(obj) -> int:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.tell()
    export = export_packed(q)
    return packed_nbytes(export), saved(export), saved(fp.state_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--append", type=Path, help="append a markdown section with the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = ["## Quantization core: fake-quant overhead (bench_quant.py)",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}, float32 eager, inference_mode, min of {args.repeats} interleaved repeats; "
             "random weights. Ratio = time / FP time in the same run. Load average at start (other processes): "
             f"{os.getloadavg()[0]:.1f}.", "",
             "| model | batch | variant | ms/forward | ratio vs FP |", "|---|---|---|---|---|"]
    sizes = []
    for label, config, batch in CASES:
        fp = build_model(config).eval()
        res = fp.resolution
        x, t = torch.randn(batch, 3, res, res), torch.randint(0, 1000, (batch,))
        calls = variants(fp, x, t)
        times = time_calls(calls, args.repeats)
        for name, sec in times.items():
            lines.append(f"| {label} {res}x{res} | {batch} | {name} | {sec * 1e3:.1f} | {sec / times['FP']:.2f} |")
        nbytes, saved, fp_saved = export_sizes(quantize_model(fp, QuantConfig()), fp)
        sizes.append(f"- {label}: packed W4A8 export {nbytes:,} tensor bytes ({saved:,} B torch.save) vs FP "
                     f"state_dict {fp_saved:,} B torch.save ({fp_saved / saved:.1f}x smaller)")
    text = "\n".join(lines + [""] + sizes) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
