"""report.json schema and contents, report.md, the per-step error plot and sample grids."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from rich.console import Console

from mmqdiff.plots import line_plot, save_sample_grid
from mmqdiff.report import REQUIRED_KEYS, write_report


def _runs(grid_dir):
    common = dict(model_bytes=4_000_000, calib_seconds=0.0, peak_mem_bytes=300_000_000)
    runs = [dict(name="FP", segments=None, weight_bits=None, act_bits=None, fid=10.0, **{"is": 3.0}, kid=0.01,
                 psnr_vs_fp=math.inf, **common)]
    for k, mse in ((1, [0.4, 0.1, 0.02]), (4, [0.2, 0.05, 0.01])):
        grid = save_sample_grid(torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8), grid_dir / f"k{k}.png")
        runs.append(dict(name=f"W4A8 K={k}", segments=k, weight_bits=4, act_bits=8, fid=12.0 - k, **{"is": 2.9},
                         kid=0.02, psnr_vs_fp=25.0 + k, model_bytes=600_000 * k, calib_seconds=60.0 * k,
                         peak_mem_bytes=500_000_000, is_std=0.1, kid_std=0.003, per_step_mse=mse,
                         sample_grid=grid))
    return runs


def test_report_files(tmp_path):
    out = tmp_path / "report"
    path = write_report(_runs(tmp_path / "grids"), out, console=Console(file=open(tmp_path / "tty", "w"), width=160))
    assert path == out / "report.json"
    runs = json.loads(path.read_text())["runs"]
    assert [r["name"] for r in runs] == ["FP", "W4A8 K=1", "W4A8 K=4"]
    for r in runs:
        assert list(r)[:len(REQUIRED_KEYS)] == list(REQUIRED_KEYS)
    assert runs[0]["psnr_vs_fp"] is None and runs[0]["segments"] is None  # inf -> null, FP has no segments
    assert runs[2]["segments"] == 4 and runs[2]["per_step_mse"] == [0.2, 0.05, 0.01]
    md = (out / "report.md").read_text()
    assert "W4A8 K=4" in md and "per_step_mse.png" in md and "../grids/k4.png" in md
    with Image.open(out / "per_step_mse.png") as im:
        im.verify()
    with Image.open(out / "per_step_mse.png") as im:
        assert im.format == "PNG" and im.size == (800, 480)
    assert "W4A8 K=1" in (tmp_path / "tty").read_text()
    assert not list(out.glob(".*tmp*"))


def test_missing_key_names_run_and_key(tmp_path):
    run = _runs(tmp_path)[0]
    del run["kid"]
    with pytest.raises(ValueError, match=r"FP.*'kid'"):
        write_report([run], tmp_path)


def test_line_plot_handles_gaps_and_linear_axis(tmp_path):
    path = line_plot({"a": [1.0, math.nan, 3.0, 2.0], "b": [0.0, -1.0]}, tmp_path / "p.png", size=(300, 200))
    with Image.open(path) as im:
        assert im.size == (300, 200)
        assert len(im.convert("RGB").getcolors(maxcolors=4096)) > 3  # something besides background was drawn


def test_sample_grid_shape(tmp_path):
    path = save_sample_grid(torch.zeros(4, 3, 16, 16) - 1, tmp_path / "g.png", nrow=2)
    with Image.open(path) as im:
        assert im.size == (2 * 18 + 2, 2 * 18 + 2)  # make_grid: 2 px padding around every tile
