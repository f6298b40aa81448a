"""The comparison report: FP vs K=1 (Q-Diffusion) vs K>1 segment models, as a rich table, report.md and report.json.

report.json is ``{"runs": [{"name", "segments", "weight_bits", "act_bits", "fid", "is", "kid", "psnr_vs_fp",
"model_bytes", "calib_seconds", "peak_mem_bytes", ...}, ...]}``. Conventions for the FP row: ``segments``,
``weight_bits`` and ``act_bits`` are null (not quantized: no segment models, float32 weights and activations) and
``psnr_vs_fp`` is null (PSNR of FP against itself is infinite). More generally every non-finite number is written
as null, since JSON has no inf/NaN. Extra per-run keys (``is_std``, ``kid_std``,
``per_step_mse``, ``segment_steps``, ``sample_grid``, ...) pass through unchanged.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from ..io import atomic_write_text
from .plots import metric_bars_plot, per_step_error_plot, run_colors

REQUIRED_KEYS = ("name", "segments", "weight_bits", "act_bits", "fid", "is", "kid", "psnr_vs_fp", "model_bytes",
                 "calib_seconds", "peak_mem_bytes")
COLUMNS = ("name", "K", "W/A bits", "calib iters", "FID", "IS", "KID", "PSNR vs FP (dB)", "held-out x-MSE",
           "model MiB", "calib s", "sample s/img", "peak mem MiB")


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats -> None, paths -> str, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def normalize_runs(runs: Sequence[dict]) -> list[dict]:
    """Check every run has the required keys (error names the run and the keys) and make it JSON-safe,
    required keys first."""
    out = []
    for i, run in enumerate(runs):
        missing = [k for k in REQUIRED_KEYS if k not in run]
        if missing:
            raise ValueError(f"run {i} ({run.get('name', '?')}) lacks {missing}")
        out.append(_clean({**{k: run[k] for k in REQUIRED_KEYS}, **run}))
    return out


def _num(v: Any, fmt: str, spread: Any = None) -> str:
    if v is None:
        return "-"
    return format(v, fmt) + (f" ± {format(spread, fmt)}" if spread is not None else "")


def _mib(v: Any) -> str:
    return "-" if v is None else f"{v / 2 ** 20:.2f}"


def _iters(r: dict) -> str:
    """Reconstruction iterations per unit (weight/act) summed over the run's segments, "(K seg)" when K > 1: the
    calibration compute that equal-compute comparisons hold fixed."""
    total = r.get("calib_iters_total") or r.get("calib_iters")
    if total is None:
        return "-"
    return f"{total[0]}/{total[1]}" + (f" ({r['segments']} seg)" if (r["segments"] or 1) > 1 else "")


def table_rows(runs: Sequence[dict], spread: bool = True) -> list[list[str]]:
    """Formatted cells in ``COLUMNS`` order, shared by the console table and report.md; ``spread`` adds each
    score's spread between disjoint image chunks (``fid_std``, ``is_chunk_std``, ``kid_chunk_std``, ``psnr_std``)
    where a run has it."""
    rows = []
    for r in runs:
        sd = (lambda key: r.get(key)) if spread else (lambda key: None)
        bits = "FP" if r["weight_bits"] is None else f"W{r['weight_bits']}A{r['act_bits']}"
        rows.append([str(r["name"]), "-" if r["segments"] is None else str(r["segments"]), bits, _iters(r),
                     _num(r["fid"], ".2f", sd("fid_std")), _num(r["is"], ".2f", sd("is_chunk_std")),
                     _num(r["kid"], ".4f", sd("kid_chunk_std")), _num(r["psnr_vs_fp"], ".2f", sd("psnr_std")),
                     _num(r.get("heldout_x_mse"), ".2e"), _mib(r["model_bytes"]), _num(r["calib_seconds"], ".1f"),
                     _num(r.get("sampling_seconds_per_image"), ".3f"), _mib(r["peak_mem_bytes"])])
    return rows


def markdown_table(runs: Sequence[dict]) -> str:
    """The comparison table of ``runs`` (report.json's ``runs``) in markdown, one line per run with the spreads, as
    report.md and the README show it; ends with a newline."""
    rows = table_rows(normalize_runs(runs))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _markdown(runs: list[dict], out_dir: Path, plot: Path | None, bars: Path) -> str:
    lines = ["# mmqdiff report", "", markdown_table(runs).rstrip("\n")]
    lines += ["", "FID, IS, KID and PSNR are over all images; ± is the standard deviation of the same score over "
              "disjoint image chunks (chunk j of every run holds the same noise indices). A difference inside it is "
              "not a difference. PSNR vs FP: mean per-image PSNR against FP samples from identical noise. Held-out "
              "x-MSE: noise-prediction error against FP on calibration-file trajectories calibration never used, each "
              "step weighted by its effect on the sample (mmqdiff.evaluation.sample_space_error). K: number of "
              "timestep-segment models; calib iters: reconstruction iterations per unit (weight/act), summed over "
              "the segments."]
    chunked = [r for r in runs if r.get("fid_chunks")]
    if chunked:
        lines += ["", "## Scores per chunk", "", "| name | FID per chunk | PSNR per chunk |", "|---|---|---|"]
        lines += [f"| {r['name']} | {', '.join(f'{v:.2f}' for v in r['fid_chunks'])} | "
                  f"{', '.join(f'{v:.2f}' for v in r.get('psnr_chunks') or [])} |" for r in chunked]
    lines += ["", "## FID and PSNR vs FP", "", f"![FID and PSNR per run]({bars.name})"]
    if plot is not None:
        lines += ["", "## Per-step noise-prediction error", "", f"![per-step MSE]({plot.name})"]
    grids = [(r["name"], r["sample_grid"]) for r in runs if r.get("sample_grid")]
    if grids:
        lines += ["", "## Samples"]
        for name, grid in grids:
            p = Path(grid)
            rel = os.path.relpath(p.resolve(), out_dir.resolve())
            lines += ["", f"### {name}", "", f"![{name}]({rel})"]
    return "\n".join(lines) + "\n"


def write_report(runs: Sequence[dict], out_dir: str | Path, console: Console | None = None) -> Path:
    """Print the table and write report.json, report.md, metrics.png (FID / PSNR bars, ± ``fid_std`` /
    ``psnr_std``) and (if any run has ``per_step_mse``) per_step_mse.png (segment boundaries from
    ``segment_steps``) into ``out_dir``, each atomically. Returns the path of report.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = normalize_runs(runs)

    table = Table(title="mmqdiff: FP vs single- and multi-model quantization", box=box.SIMPLE_HEAD)
    for c in COLUMNS:
        table.add_column(c, justify="left" if c == "name" else "right")
    for row in table_rows(runs, spread=False):
        table.add_row(*row)
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes get 80 columns by default, too narrow for ten columns
            console.width = 120
    console.print(table)

    curves = {r["name"]: r["per_step_mse"] for r in runs if r.get("per_step_mse")}
    segments = {r["name"]: r["segment_steps"] for r in runs if r.get("segment_steps")}
    colors = run_colors([r["name"] for r in runs])
    plot = per_step_error_plot(curves, out_dir / "per_step_mse.png", segments, colors) if curves else None
    bars = metric_bars_plot(runs, out_dir / "metrics.png", colors)
    atomic_write_text(out_dir / "report.md", _markdown(runs, out_dir, plot, bars))
    path = out_dir / "report.json"
    atomic_write_text(path, json.dumps({"runs": runs}, indent=2, allow_nan=False) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mmqdiff.evaluation.report <report.json>``: print the report's comparison table in markdown."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("report", type=Path, help="a report.json ({\"runs\": [...]})")
    args = parser.parse_args(argv)
    print(markdown_table(json.loads(args.report.read_text())["runs"]), end="")


if __name__ == "__main__":
    main()
