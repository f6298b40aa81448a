"""Sampling speed: FP vs fake-quant vs the integer runtime (``to_integer``), K=1 and K=4 (both segment scopes), W4A8
and W8A8 (asymmetric weights as the reference, and the symmetric-weight option); plus the resident bytes of the K=4
integer runtime vs FP and the cost of a segment switch.

For each model and bit width the runs are timed interleaved in one process (best of ``--repeats``) next to their own
FP run, so every ratio compares like with like on a machine that other jobs load; the last column is the spread of
the ratio over the rounds, each round's run against that round's FP run. K segment models are K independently
quantized copies (activation ranges from one random batch each; calibrated values do not change speed; their weight
levels share one base, as a run's segments do); K=1 uses the first of them. For ``segment_scope: full`` each copy
after the first flips a random tenth of its rounding decisions, as segments calibrated apart round differently: "int
K=4" keeps all four segments packed (``IntegerSegments(pack="all")``), "int K=4 pack=active" (the sampler's default)
re-packs the segment in use from the shared codes at each switch. "int K=4 activations" is ``segment_scope:
activations``: one rounding for all copies, so one packed weight set serves every segment. The embedded UNet samples
``--steps`` quad steps; the CIFAR-10 config (random weights) runs ``--cifar-steps`` steps of the same kind (the time
ratio is per forward, K=4 still switches).

    .venv/bin/python benchmarks/bench_sampling.py --threads 1 2 [--embedded-batch 128] [--cifar-batches 8 64]
        [--steps 100] [--cifar-steps 4] [--repeats 2] [--device cpu|cuda] [--only embedded|cifar10] [--clock cpu]
        [--glibc-malloc]

Like cli.py, it keeps freed memory for reuse (``mmqdiff.quant.allocator``): with glibc's defaults every run re-faults its
temporaries' pages and a run's speed depends on what ran before it in the process (a later copy of the same
quantized model measured up to 15% slower than the first), which would bias the interleaved comparison.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from mmqdiff.quant.allocator import keep_freed_memory
from mmqdiff.data import timestep_segments
from mmqdiff.diffusion import build_model, ddim_sample, linear_betas, load_checkpoint, timesteps
from mmqdiff.quant import (IntegerSegments, QuantConfig, adaround_quantizers, quantize_model, resident_nbytes,
                           set_rounding, to_integer)
from mmqdiff.segments import SegmentedModel


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: CPU seconds of this process (all threads)
CONFIGS = {"W4A8": QuantConfig(weight_bits=4), "W8A8": QuantConfig(weight_bits=8),
           "W8A8 sym-w": QuantConfig(weight_bits=8, weight_symmetric=True)}  # sym-w: symmetric weights (zero point 0)


def flip_rounding(model: torch.nn.Module, fraction: float, seed: int) -> None:
    """Reverse a random ``fraction`` of the hard rounding decisions (up <-> down) of every AdaRound quantizer."""
    generator = torch.Generator().manual_seed(seed)
    for q in adaround_quantizers(model):
        flip = torch.rand(q.alpha.shape, generator=generator).to(q.alpha.device) < fraction
        q.alpha.data = torch.where(flip, torch.where(q.alpha >= 0, -1.0, 1.0), q.alpha.data)


def quantized_copies(fp: torch.nn.Module, k: int, config: QuantConfig, calib: torch.Tensor,
                     scope: str) -> list[torch.nn.Module]:
    """K quantized models with activation ranges from different timesteps, as K segments have; with ``scope`` "full"
    their rounding differs too."""
    models = []
    for i in range(k):
        q = quantize_model(fp, config).eval()
        q.set_quant_state(True, True)
        with torch.no_grad():
            q(calib, torch.full((calib.shape[0],), 125.0 + 250.0 * i, device=calib.device))  # activation init
        set_rounding(q, "hard")
        if scope == "full" and i:
            flip_rounding(q, 0.1, seed=i)
        q.freeze()
        models.append(q)
    return models


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(runs: dict[str, list[torch.nn.Module]], x_T: torch.Tensor, steps: int, repeats: int,
              clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds (``clock``) of one DDIM sampling of ``x_T`` per run and round, the runs interleaved ``repeats``
    times (round r of every run ran back to back: paired)."""
    seq, betas = timesteps(steps, "quad"), linear_betas().to(x_T.device)
    switches = {name: SegmentedModel(timestep_segments(steps, len(models)), models, seq).model_for_step
                for name, models in runs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for switch in switches.values():  # warm-up (onednn primitive creation, allocator)
            ddim_sample(switch, x_T, seq[:2], betas)
        for _ in range(repeats):
            for name, switch in switches.items():
                sync(x_T.device)
                start = clock()
                ddim_sample(switch, x_T, seq, betas)
                sync(x_T.device)
                seconds[name].append(clock() - start)
    return seconds


def ratio_range(seconds: list[float], fp: list[float]) -> str:
    """Lowest and highest time-vs-FP over the rounds, each against the FP run of its own round: the spread of the
    ratio that the best-of column summarises."""
    ratios = [s / f for s, f in zip(seconds, fp)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def switch_seconds(segments: IntegerSegments, rounds: int = 3) -> float:
    """Best seconds of one segment switch (re-packing a segment's weights from the shared codes)."""
    best, device = float("inf"), next(segments.buffers()).device
    for _ in range(rounds):
        for k in range(len(segments)):
            sync(device)
            start = time.perf_counter()
            segments.activate(k)
            sync(device)
            best = min(best, time.perf_counter() - start)
    return best


def largest_resident(segments: IntegerSegments) -> int:
    """Resident bytes while sampling: one segment is packed at a time (pack="active"), so the largest of the K
    states."""
    largest = 0
    for k in range(len(segments)):
        segments.activate(k)
        largest = max(largest, resident_nbytes([segments]))
    return largest


def bench_model(label: str, fp: torch.nn.Module, batch: int, steps: int, args: argparse.Namespace,
                device: torch.device) -> None:
    shape = (batch, fp.in_channels, fp.resolution, fp.resolution)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    fp_bytes = sum(p.numel() * p.element_size() for p in fp.parameters())
    notes = []
    for name, config in CONFIGS.items():
        fakes = quantized_copies(fp, 4, config, x_T[:16], "full")
        active, every = IntegerSegments(fakes), IntegerSegments(fakes, pack="all")  # the sampler's two modes
        shared = IntegerSegments(quantized_copies(fp, 4, config, x_T[:16], "activations"))
        runs = {"FP": [fp], f"{name} fake K=1": fakes[:1], f"{name} fake K=4": fakes,
                f"{name} int K=1": every.models[:1], f"{name} int K=4": every, f"{name} int K=4 pack=active": active,
                f"{name} int K=4 activations": shared}
        for threads in [] if args.bytes_only else args.threads:
            torch.set_num_threads(threads)
            seconds = time_runs(runs, x_T, steps, args.repeats, CLOCKS[args.clock])
            best = {run: min(secs) for run, secs in seconds.items()}
            for run, sec in best.items():
                forwards = steps * batch
                print(f"| {label} | {batch} | {threads} | {steps} | {run} | {sec:.2f} | {1e3 * sec / forwards:.2f} | "
                      f"{sec / best['FP']:.2f} | {ratio_range(seconds[run], seconds['FP'])} |", flush=True)
            switch = switch_seconds(active)
            per_step = best[f"{name} int K=4"] / steps
            notes.append(f"{label}, batch {batch}, {threads} threads, {name}: one segment switch (pack=active) "
                         f"{1e3 * switch:.1f} ms; K=4 switches per 100-step sampling = {4 * switch / (100 * per_step):.2%} "
                         f"of its time (this run's {steps} steps cross all 4 segments too)")
        codes = sum(k.code_nbytes for m in every.models for k in m.kernels())
        notes.append(f"{label}, {name} K=4 integer runtime, resident bytes vs FP parameters ({fp_bytes:,} B): "
                     f"full pack=active {largest_resident(active) / fp_bytes:.3f}x ({largest_resident(active):,} B), "
                     f"full pack=all {resident_nbytes([every]) / fp_bytes:.3f}x (packed int8 codes alone "
                     f"{codes / fp_bytes:.3f}x), full as four separate models without share_constants "
                     f"{resident_nbytes([to_integer(q) for q in fakes]) / fp_bytes:.3f}x; activations "
                     f"{largest_resident(shared) / fp_bytes:.3f}x ({largest_resident(shared):,} B); K=1 "
                     f"{resident_nbytes([every.models[0]]) / fp_bytes:.3f}x ({resident_nbytes([every.models[0]]):,} B)")
        del fakes, active, every, shared
    print("\n" + "\n".join(notes) + "\n", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="checkpoints/embedded_unet.pt")
    ap.add_argument("--embedded-batch", type=int, default=128)
    ap.add_argument("--cifar-batches", type=int, nargs="*", default=[8, 64])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--cifar-steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                    help="torch threads; several: every ratio at each (1: the per-process setting of sampling in "
                         "several processes, as the embedded main job does)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", choices=["embedded", "cifar10"])
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="cpu: CPU seconds instead of wall time, steadier on a machine other jobs load")
    ap.add_argument("--bytes-only", action="store_true", help="only the resident bytes, no timing")
    ap.add_argument("--glibc-malloc", action="store_true",
                    help="keep glibc's default malloc settings instead of the ones cli.py sets (mmqdiff.quant.allocator)")
    args = ap.parse_args()
    malloc = "glibc defaults" if args.glibc_malloc or not keep_freed_memory() else "freed memory kept"
    device = torch.device(args.device)
    dev = (f"{torch.cuda.get_device_name(device)} (cuDNN TF32 convolutions {torch.backends.cudnn.allow_tf32}, "
           f"TF32 matmuls {torch.backends.cuda.matmul.allow_tf32}: PyTorch's defaults)" if device.type == "cuda"
           else f"{platform.machine()} CPU")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {dev}, torch {torch.__version__}, float32 eager, inference mode, best of "
          f"{args.repeats} interleaved, {args.clock} clock, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}, malloc: {malloc}; "
          f"load average at start {load:.1f}\n")
    print("| model | batch | threads | steps | run | s per sampling | ms per image-step | time vs FP (best of each) | "
          "time vs FP, per round (lowest-highest) |")
    print("|---|---|---|---|---|---|---|---|---|")
    if args.only in (None, "embedded"):
        fp = load_checkpoint(build_model("configs/embedded.yaml"), args.checkpoint).eval().to(device)
        bench_model("embedded 16x16", fp, args.embedded_batch, args.steps, args, device)
    if args.only in (None, "cifar10"):
        torch.manual_seed(0)
        fp = build_model("configs/cifar10.yaml").eval().to(device)
        for batch in args.cifar_batches:
            bench_model("cifar10 32x32 (random weights)", fp, batch, args.cifar_steps, args, device)


if __name__ == "__main__":
    main()
