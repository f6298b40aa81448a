"""Report figures: matplotlib for the per-step error curves and the FID / PSNR bars, torchvision for sample grids.

Figures are built as ``matplotlib.figure.Figure`` objects and rendered by Agg, without pyplot: no display, no
global backend state, safe in worker processes. Every PNG is written atomically.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from matplotlib.figure import Figure
from PIL import Image
from torchvision.utils import make_grid

from ..io import atomic_path

# Okabe-Ito palette: distinguishable for colour-blind readers; cycles after eight series
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
DPI = 100


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to a PNG of exactly its size in pixels (figsize x DPI), atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


def _number(v: Any) -> float:
    return math.nan if v is None or not math.isfinite(v) else float(v)


def run_colors(names: Sequence[str]) -> dict[str, str]:
    """One palette colour per run name, by position, so a run has the same colour in every figure."""
    return {name: COLORS[k % len(COLORS)] for k, name in enumerate(names)}


def per_step_error_figure(curves: Mapping[str, Sequence[float | None]],
                          segment_steps: Mapping[str, Sequence[Sequence[int]]] | None = None, *,
                          colors: Mapping[str, str] | None = None, size: tuple[int, int] = (800, 480)) -> Figure:
    """One line per run of its noise-prediction error at each sampling step (log scale), with each multi-segment
    run's segment boundaries (``segment_steps``: [start, stop) step ranges) as dotted lines of its colour between the
    last step of one segment and the first of the next. Missing and non-positive values leave gaps."""
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    colors = colors or run_colors(list(curves))
    for name, values in curves.items():
        color = colors[name]
        ax.plot(range(len(values)), [_number(v) for v in values], color=color, linewidth=1.5, label=name)
        ranges = (segment_steps or {}).get(name) or []
        for j, (start, _) in enumerate(ranges[1:]):
            ax.axvline(start - 0.5, color=color, linestyle=":", linewidth=1.2,
                       label=f"{name}: segment boundaries" if j == 0 else None)
    ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("sampling step (0 = noisiest)")
    ax.set_ylabel("noise-prediction MSE vs FP")
    ax.set_title("Per-step error against the FP model from identical inputs")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def per_step_error_plot(curves: Mapping[str, Sequence[float | None]], path: str | Path,
                        segment_steps: Mapping[str, Sequence[Sequence[int]]] | None = None,
                        colors: Mapping[str, str] | None = None) -> Path:
    """:func:`per_step_error_figure` as a PNG (800 x 480)."""
    return save_figure(per_step_error_figure(curves, segment_steps, colors=colors), path)


def metric_bars_figure(runs: Sequence[Mapping[str, Any]], *, colors: Mapping[str, str] | None = None,
                       size: tuple[int, int] = (960, 420)) -> Figure:
    """FID and PSNR vs FP per run as bars side by side, with ± ``fid_std`` / ``psnr_std`` error bars where a run
    has them; a run without a value (FP's PSNR against itself) gets no bar."""
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    names = [str(r["name"]) for r in runs]
    colors = [(colors or run_colors(names))[name] for name in names]
    for i, (key, spread, label) in enumerate((("fid", "fid_std", "FID (lower is better)"),
                                              ("psnr_vs_fp", "psnr_std", "PSNR vs FP, dB (higher is better)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        values = [_number(r.get(key)) for r in runs]
        errors = [_number(r.get(spread)) for r in runs]
        ax.bar(range(len(runs)), values, color=colors,
               yerr=None if all(math.isnan(e) for e in errors) else errors, capsize=4)
        ax.set_xlim(-0.6, len(runs) - 0.4)  # keeps the slot of a run without a bar
        for x, (v, e) in enumerate(zip(values, errors)):
            top = 0.0 if math.isnan(v) else v + (0.0 if math.isnan(e) else e)
            ax.annotate("n/a" if math.isnan(v) else f"{v:.2f}", (x, top), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize="small")
        ax.set_xticks(range(len(runs)), names, rotation=15, ha="right", fontsize="small")
        ax.set_title(label)
        ax.grid(True, axis="y", alpha=0.3)
    return fig


def metric_bars_plot(runs: Sequence[Mapping[str, Any]], path: str | Path,
                     colors: Mapping[str, str] | None = None) -> Path:
    """:func:`metric_bars_figure` as a PNG (960 x 420)."""
    return save_figure(metric_bars_figure(runs, colors=colors), path)


def seed_comparison_figure(arms: Mapping[str, Mapping[int, Mapping[str, Any]]],
                           metrics: Sequence[tuple[str, str]], baseline: Mapping[str, Any] | None = None, *,
                           size: tuple[int, int] = (1200, 420)) -> Figure:
    """One panel per ``(key, label)`` metric: each arm's value for every calibration seed, a seed's points joined
    across arms (the comparison is paired by seed), and each arm's mean as a black bar; ``baseline`` (the FP run)
    as a dashed line where it has the metric."""
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    names = list(arms)
    seeds = sorted({s for runs in arms.values() for s in runs})
    seed_colors = {s: COLORS[k % len(COLORS)] for k, s in enumerate(seeds)}
    for i, (key, label) in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for seed in seeds:
            xs = [x for x, name in enumerate(names) if seed in arms[name]]
            ax.plot(xs, [_number(arms[names[x]][seed].get(key)) for x in xs], marker="o", markersize=4,
                    linewidth=0.8, alpha=0.8, color=seed_colors[seed], label=f"seed {seed}")
        for x, name in enumerate(names):
            values = [_number(r.get(key)) for r in arms[name].values()]
            ax.hlines(sum(values) / len(values), x - 0.25, x + 0.25, color="black", linewidth=2.5)
        if baseline is not None and not math.isnan(_number(baseline.get(key))):
            ax.axhline(_number(baseline[key]), color="grey", linestyle="--", linewidth=1,
                       label=str(baseline.get("name", "baseline")))
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize="small")
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_title(label, fontsize="medium")
        ax.grid(True, axis="y", alpha=0.3)
    fig.axes[0].legend(fontsize="x-small")
    return fig


def save_sample_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """A PNG grid of uint8 [N, 3, H, W] (or float [-1, 1]) samples; ``nrow`` defaults to a square-ish grid."""
    x = images.float() / 255 if images.dtype == torch.uint8 else (images.float().clamp(-1, 1) + 1) / 2
    nrow = nrow or max(1, math.ceil(math.sqrt(x.shape[0])))
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
    array = grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)
