"""Does CUDA-graph replay change the GPU verdict on the integer runtime? One model call (one denoising step) of FP,
fake-quant and the integer runtime, eager and replayed from a captured CUDA graph, side by side in one process.

On a GPU the integer runtime measured slower than fake-quant, and both slower than FP, at sizes where the GPU waits
on kernel launches (docs/benchmarks.md). A graph replays all of a forward's kernels with one launch, so it shows
what each path costs once launches are free. GPU only:

    python benchmarks/bench_cuda_graphs.py [--embedded-batch 256] [--cifar-batches 64 256] [--repeats 50]
"""
from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path

import torch

from bench_int_kernels import best_ms
from bench_sampling import CONFIGS, quantized_copies
from mmqdiff.diffusion import build_model, load_checkpoint
from mmqdiff.quant import to_integer

ROOT = Path(__file__).resolve().parents[1]
Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def graphed(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> Forward:
    """``model``'s forward captured once on static inputs; each call copies its inputs in and replays."""
    static_x, static_t = x.clone(), t.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (cuBLAS/cuDNN handles, workspaces) off the capture
        for _ in range(3):
            model(static_x, static_t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_x, static_t)

    def forward(x_in: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        static_x.copy_(x_in)
        static_t.copy_(t_in)
        graph.replay()
        return static_out
    return forward


def bench(label: str, fp: torch.nn.Module, batch: int, repeats: int) -> None:
    """Every run eager and graphed, all interleaved in ``best_ms`` rounds; a forward that cannot be captured is
    reported with the reason."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, fp.in_channels, fp.resolution, fp.resolution), generator=g).cuda()
    t = torch.full((batch,), 500.0, device="cuda")
    models = {"FP": fp}
    for name in ("W4A8", "W8A8"):
        fake = quantized_copies(fp, 1, CONFIGS[name], x[:16])[0]
        models[f"{name} fake"], models[f"{name} int"] = fake, to_integer(fake)
    fns: dict[str, Callable[[], object]] = {}
    graph_note: dict[str, str] = {}
    with torch.inference_mode():
        for run, model in models.items():
            fns[f"{run} eager"] = functools.partial(model, x, t)
            try:
                forward = graphed(model, x, t)
            except RuntimeError as err:
                graph_note[run] = f"capture failed: {str(err).splitlines()[0][:80]}"
                continue
            fns[f"{run} graph"] = functools.partial(forward, x, t)
            graph_note[run] = str(torch.equal(forward(x, t), model(x, t)))
        ms = best_ms(fns, repeats)
    fp_eager, fp_graph = ms["FP eager"], ms.get("FP graph")
    for run in models:
        eager, graph = ms[f"{run} eager"], ms.get(f"{run} graph")
        graph_cols = (f"{graph:.3f} | {graph / fp_eager:.2f} | {graph / fp_graph:.2f}" if graph and fp_graph
                      else f"{graph or '-'} | | ")
        print(f"| {label} | {batch} | {run} | {eager:.3f} | {eager / fp_eager:.2f} | {graph_cols} | "
              f"{graph_note[run]} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedded-batch", type=int, default=256)
    ap.add_argument("--cifar-batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "embedded_unet.pt"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda_graphs.py needs a CUDA GPU")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, PyTorch's TF32 defaults (cuDNN "
          f"{torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}), inference mode, "
          f"ms per model call, best of {args.repeats} interleaved; 'same' = graph output equal to eager\n")
    print("| model | batch | run | eager ms | eager vs FP eager | graph ms | graph vs FP eager | graph vs FP graph "
          "| same |\n|---|---|---|---|---|---|---|---|---|")
    fp = load_checkpoint(build_model(ROOT / "configs" / "embedded.yaml"), args.checkpoint).eval().cuda()
    bench("embedded 16x16", fp, args.embedded_batch, args.repeats)
    fp = build_model(ROOT / "configs" / "cifar10.yaml").eval().cuda()
    for batch in args.cifar_batches:
        bench("cifar10 32x32 (random weights)", fp, batch, args.repeats)


if __name__ == "__main__":
    main()
