"""report.json schema and contents, report.md, the matplotlib figures (per-step error, FID / PSNR bars) and sample
grids."""
from __future__ import annotations

import json
import math

import pytest
import torch
from matplotlib.container import BarContainer
from PIL import Image
from rich.console import Console

from mmqdiff.evaluation.plots import metric_bars_figure, per_step_error_figure, save_sample_grid
from mmqdiff.evaluation.report import REQUIRED_KEYS, write_report


def _runs(grid_dir):
    common = dict(model_bytes=4_000_000, calib_seconds=0.0, peak_mem_bytes=300_000_000)
    runs = [dict(name="FP", segments=None, weight_bits=None, act_bits=None, fid=10.0, **{"is": 3.0}, kid=0.01,
                 psnr_vs_fp=math.inf, **common)]
    for k, mse, steps in ((1, [0.4, 0.1, 0.02, 0.01], [[0, 4]]), (2, [0.2, 0.05, 0.01, None], [[0, 2], [2, 4]])):
        grid = save_sample_grid(torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8), grid_dir / f"k{k}.png")
        runs.append(dict(name=f"W4A8 K={k}", segments=k, weight_bits=4, act_bits=8, fid=12.0 - k, **{"is": 2.9},
                         kid=0.02, psnr_vs_fp=25.0 + k, model_bytes=600_000 * k, calib_seconds=60.0 * k,
                         peak_mem_bytes=500_000_000, is_std=0.1, kid_std=0.003, per_step_mse=mse,
                         segment_steps=steps, sample_grid=grid, fid_std=0.5 * k, psnr_std=0.25))
    return runs


def test_report_files(tmp_path):
    out = tmp_path / "report"
    path = write_report(_runs(tmp_path / "grids"), out, console=Console(file=open(tmp_path / "tty", "w"), width=160))
    assert path == out / "report.json"
    runs = json.loads(path.read_text())["runs"]
    assert [r["name"] for r in runs] == ["FP", "W4A8 K=1", "W4A8 K=2"]
    for r in runs:
        assert list(r)[:len(REQUIRED_KEYS)] == list(REQUIRED_KEYS)
    assert runs[0]["psnr_vs_fp"] is None and runs[0]["segments"] is None  # inf -> null, FP has no segments
    assert runs[2]["segments"] == 2 and runs[2]["per_step_mse"] == [0.2, 0.05, 0.01, None]
    md = (out / "report.md").read_text()
    assert "W4A8 K=2" in md and "per_step_mse.png" in md and "metrics.png" in md and "../grids/k2.png" in md
    for name, size in (("per_step_mse.png", (800, 480)), ("metrics.png", (960, 420))):
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size == size
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 16)) > 50  # drawn, not blank
    assert "W4A8 K=1" in (tmp_path / "tty").read_text()
    assert not list(out.glob(".*tmp*"))


def test_missing_key_names_run_and_key(tmp_path):
    run = _runs(tmp_path)[0]
    del run["kid"]
    with pytest.raises(ValueError, match=r"FP.*'kid'"):
        write_report([run], tmp_path)


def test_per_step_figure_log_scale_legend_and_segment_boundaries(tmp_path):
    runs = _runs(tmp_path)[1:]
    fig = per_step_error_figure({r["name"]: r["per_step_mse"] for r in runs},
                                {r["name"]: r["segment_steps"] for r in runs})
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["W4A8 K=1", "W4A8 K=2",
                                                                   "W4A8 K=2: segment boundaries"]
    curves, boundaries = ax.lines[:1] + ax.lines[1:2], ax.lines[2:]
    assert [list(line.get_ydata()) for line in curves][0] == [0.4, 0.1, 0.02, 0.01]
    assert math.isnan(ax.lines[1].get_ydata()[3])  # a missing value is a gap
    assert [line.get_xdata()[0] for line in boundaries] == [1.5]  # between step 1 (segment 0) and step 2
    assert boundaries[0].get_color() == ax.lines[1].get_color() and boundaries[0].get_linestyle() == ":"


def bars_of(ax):
    return next(c for c in ax.containers if isinstance(c, BarContainer))


def test_bars_carry_error_bars_where_runs_have_spreads(tmp_path):
    runs = _runs(tmp_path)
    fid, psnr = metric_bars_figure(runs).axes
    assert [p.get_height() for p in fid.patches] == [10.0, 11.0, 10.0]
    assert math.isnan(psnr.patches[0].get_height()) and [p.get_height() for p in psnr.patches[1:]] == [26.0, 27.0]
    low, high = bars_of(fid).errorbar.lines[1]  # the caps of the error bars
    assert list(low.get_ydata())[1:] == [10.5, 9.0] and list(high.get_ydata())[1:] == [11.5, 11.0]  # K=1, K=2
    assert math.isnan(low.get_ydata()[0]) and math.isnan(high.get_ydata()[0])  # FP has no spread: no error bar
    assert [t.get_text() for t in fid.get_xticklabels()] == ["FP", "W4A8 K=1", "W4A8 K=2"]
    no_spread = metric_bars_figure([{**r, "fid_std": None, "psnr_std": None} for r in runs]).axes[0]
    assert bars_of(no_spread).errorbar is None


def test_sample_grid_shape(tmp_path):
    path = save_sample_grid(torch.zeros(4, 3, 16, 16) - 1, tmp_path / "g.png", nrow=2)
    with Image.open(path) as im:
        assert im.size == (2 * 18 + 2, 2 * 18 + 2)  # make_grid: 2 px padding around every tile
