"""PNG figures without matplotlib (not a dependency): a PIL line plot and torchvision sample grids."""
from __future__ import annotations

import math
from .io import atomic_path
from pathlib import Path
from typing import Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

# Okabe-Ito palette: distinguishable for colour-blind readers; cycles after eight series
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")


def _save_png(image: Image.Image, path: str | Path) -> Path:
    """Write to a temporary file beside ``path`` and rename, so a reader never sees half a PNG."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def _nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v != 0 else "0"


def line_plot(series: Mapping[str, Sequence[float]], path: str | Path, *, title: str = "", xlabel: str = "",
              ylabel: str = "", log_y: bool = False, size: tuple[int, int] = (800, 480)) -> Path:
    """One line per named series against its index (0, 1, ...), with axes, ticks and a legend.

    Non-finite values (and non-positive ones on a log axis) leave a gap instead of failing.
    """
    def ok(v: float) -> bool:
        return math.isfinite(v) and (v > 0 or not log_y)

    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    ys = [fy(v) for s in series.values() for v in s if ok(v)]
    n = max((len(s) for s in series.values()), default=1)
    y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if log_y:
        y_ticks = list(range(math.floor(y_lo), math.ceil(y_hi) + 1)) if ys else [0, 1]
    else:
        y_ticks = _nice_ticks(y_lo, y_hi)
    y_lo, y_hi = min(y_lo, y_ticks[0]), max(y_hi, y_ticks[-1])
    x_ticks = [t for t in _nice_ticks(0, max(n - 1, 1)) if t <= max(n - 1, 1)]
    x_hi = max(n - 1, 1)

    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, w - 190, 36, h - 50

    def px(i: float, y: float) -> tuple[float, float]:
        return (left + (right - left) * i / x_hi, bottom - (bottom - top) * (y - y_lo) / (y_hi - y_lo or 1))

    for t in y_ticks:
        _, yy = px(0, t)
        draw.line([(left, yy), (right, yy)], fill="#e6e6e6")
        label = f"1e{t}" if log_y else _fmt(t)
        draw.text((left - 6, yy), label, fill="black", font=font, anchor="rm")
    for t in x_ticks:
        xx, _ = px(t, y_lo)
        draw.line([(xx, bottom), (xx, bottom + 4)], fill="black")
        draw.text((xx, bottom + 6), _fmt(t), fill="black", font=font, anchor="ma")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, 8), title, fill="black", font=font, anchor="ma")
    draw.text(((left + right) / 2, h - 18), xlabel, fill="black", font=font, anchor="ma")
    draw.text((8, top - 24), ylabel + (" (log scale)" if log_y else ""), fill="black", font=font)

    for k, (name, values) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        run: list[tuple[float, float]] = []
        for i, v in enumerate(list(values) + [math.nan]):  # trailing NaN flushes the last segment
            if ok(v):
                run.append(px(i, fy(v)))
                continue
            if len(run) > 1:
                draw.line(run, fill=color, width=2)
            elif run:
                draw.ellipse([run[0][0] - 2, run[0][1] - 2, run[0][0] + 2, run[0][1] + 2], fill=color)
            run = []
        ly = top + 10 + 18 * k
        draw.line([(right + 14, ly), (right + 38, ly)], fill=color, width=3)
        draw.text((right + 44, ly), str(name), fill="black", font=font, anchor="lm")
    return _save_png(img, path)


def save_sample_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """A PNG grid of uint8 [N, 3, H, W] (or float [-1, 1]) samples; ``nrow`` defaults to a square-ish grid."""
    x = images.float() / 255 if images.dtype == torch.uint8 else (images.float().clamp(-1, 1) + 1) / 2
    nrow = nrow or max(1, math.ceil(math.sqrt(x.shape[0])))
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
    array = grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return _save_png(Image.fromarray(array), path)
