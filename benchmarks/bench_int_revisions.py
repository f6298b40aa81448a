"""Paired timing of the integer runtime at two revisions of ``mmqdiff/quant/integer.py``, in one process.

Why: a change worth 1-3% of a forward is below ``bench_sampling.py``'s run-to-run noise on a shared host (one round's
ratio can sit 0.2 off its best-of). Here the runtime of the checkout and the runtime of ``--base`` (the file as git
stores it at that revision, loaded as a second module) convert the same quantized model, and each round times FP,
base and checkout on the same input back to back, in a rotating order. Host load then hits the three alike within a
round, and the per-round ratio checkout / base, its median and its spread over the rounds, says whether a change
helps. Both versions' outputs are compared first (they may differ only where a rounding-level change flips a code).

    .venv/bin/python benchmarks/bench_int_revisions.py --base HEAD~1 [--configs W4A8 W8A8] [--threads 1 2]
        [--batch 128] [--rounds 40]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from bench_sampling import CONFIGS, quantized_copies
from mmqdiff.quant.allocator import keep_freed_memory
from mmqdiff.diffusion import build_model, load_checkpoint
from mmqdiff.quant import to_integer

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = "mmqdiff/quant/integer.py"


def runtime_at(revision: str) -> ModuleType:
    """``mmqdiff.quant.integer`` as it was at ``revision``, as a separate module in the same package (its relative
    imports resolve against the checkout's other modules)."""
    source = subprocess.run(["git", "show", f"{revision}:{RUNTIME}"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    spec = importlib.util.spec_from_loader("mmqdiff.quant._integer_base", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "mmqdiff.quant"
    sys.modules[spec.name] = module
    exec(compile(source, f"{revision}:{RUNTIME}", "exec"), module.__dict__)
    return module


def spread(values: list[float]) -> str:
    """Median with the 10th-90th percentile range."""
    deciles = statistics.quantiles(values, n=10)
    return f"{statistics.median(values):.3f} ({deciles[0]:.3f}-{deciles[-1]:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD~1", help="git revision whose integer.py is the baseline")
    parser.add_argument("--configs", nargs="+", default=["W4A8", "W8A8"], choices=list(CONFIGS))
    parser.add_argument("--threads", nargs="+", type=int, default=[2])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    keep_freed_memory()
    base_runtime = runtime_at(args.base)
    fp = load_checkpoint(build_model(ROOT / "configs/embedded.yaml"), ROOT / "checkpoints/embedded_unet.pt").eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 16, 16, generator=generator)
    t = torch.full((args.batch,), 500.0)
    print(f"embedded 16x16, batch {args.batch}, one forward per run, {args.rounds} rounds; base: {RUNTIME} at "
          f"{args.base}; checkout: the working tree")
    print("| config | threads | FP ms | base / FP | checkout / FP | checkout / base | rounds checkout faster |")
    print("|---|---|---|---|---|---|---|")
    for name in args.configs:
        qmodel = quantized_copies(fp, 1, CONFIGS[name], x[:64])[0]
        runs = {"fp": fp, "base": base_runtime.to_integer(qmodel), "checkout": to_integer(qmodel)}
        with torch.inference_mode():
            outputs = {n: m(x, t) for n, m in runs.items() if n != "fp"}
            differ = (outputs["base"] - outputs["checkout"]).abs().max().item()
            for threads in args.threads:
                torch.set_num_threads(threads)
                seconds: dict[str, list[float]] = {n: [] for n in runs}
                order = list(runs)
                for r in range(args.rounds + 1):
                    for n in order[r % 3:] + order[:r % 3]:
                        start = time.perf_counter()
                        runs[n](x, t)
                        if r:  # the first round warms up
                            seconds[n].append(time.perf_counter() - start)
                ratio = {n: [a / b for a, b in zip(seconds[n], seconds["fp"])] for n in ("base", "checkout")}
                paired = [a / b for a, b in zip(seconds["checkout"], seconds["base"])]
                faster = sum(p < 1 for p in paired)
                print(f"| {name} | {threads} | {1e3 * statistics.median(seconds['fp']):.1f} | {spread(ratio['base'])} "
                      f"| {spread(ratio['checkout'])} | {spread(paired)} | {faster}/{len(paired)} |", flush=True)
        print(f"- {name}: largest difference between the outputs of base and checkout {differ:.3g}")


if __name__ == "__main__":
    main()
