"""Comparisons across calibration seeds (``mmqdiff.evaluation.seeds``) against hand-computed statistics, and their figure."""
from __future__ import annotations

import math

import pytest

from mmqdiff.evaluation.plots import seed_comparison_figure
from mmqdiff.evaluation.seeds import mean_sd, paired_difference, runs_by_arm


def run(name: str, fid: float, psnr: float, segments: int = 1) -> dict:
    return {"name": name, "segments": segments, "fid": fid, "psnr_vs_fp": psnr}


RUNS = [{"name": "FP", "segments": None, "fid": 3.0},
        run("K=4", 4.0, 24.0, 4), run("K=1", 3.5, 25.0),
        run("K=4, seed 7", 5.0, 26.0, 4), run("K=1, seed 7", 4.0, 23.0),
        run("K=4, seed 9", 6.0, 22.0, 4), run("K=1, seed 9", 5.5, 22.5)]


def test_runs_group_by_arm_with_the_default_seed_for_unsuffixed_names():
    arms = runs_by_arm(RUNS, default_seed=1)
    assert list(arms) == ["K=4", "K=1"]  # FP has no calibration
    assert {s: r["fid"] for s, r in arms["K=1"].items()} == {1: 3.5, 7: 4.0, 9: 5.5}


def test_two_runs_of_one_arm_and_seed_are_refused():
    with pytest.raises(ValueError, match=r"two runs of arm 'K=1' with seed 7: 'K=1, seed 7' and 'K=1, seed 7'"):
        runs_by_arm(RUNS + [run("K=1, seed 7", 1.0, 1.0)], default_seed=1)


def test_mean_and_sample_sd():
    assert mean_sd([1.0, 2.0, 6.0]) == (3.0, math.sqrt(7.0))  # deviations -2, -1, 3: 14 / 2
    mean, sd = mean_sd([5.0])
    assert mean == 5.0 and math.isnan(sd)


def test_paired_difference_by_hand():
    arms = runs_by_arm(RUNS, default_seed=1)
    fid = paired_difference(arms["K=1"], arms["K=4"], "fid")
    assert fid["seeds"] == [1, 7, 9] and fid["diffs"] == [-0.5, -1.0, -0.5]
    assert fid["mean"] == pytest.approx(-2 / 3) and fid["sd"] == pytest.approx(math.sqrt(1 / 12))
    half = 4.303 * math.sqrt(1 / 12) / math.sqrt(3)  # t_{0.975, 2}
    assert fid["ci95"] == pytest.approx((-2 / 3 - half, -2 / 3 + half))
    assert fid["wins"] == 3 and not fid["resolved"]  # better on every seed, yet 3 seeds leave the interval at +0.05
    psnr = paired_difference(arms["K=1"], arms["K=4"], "psnr_vs_fp")
    assert psnr["diffs"] == [1.0, -3.0, 0.5] and psnr["wins"] == 2 and not psnr["resolved"]  # higher is better


def test_an_interval_clear_of_zero_is_resolved():
    a = {s: {"fid": v} for s, v in enumerate([1.0, 1.0, 1.0])}
    b = {s: {"fid": v} for s, v in enumerate([2.0, 2.2, 1.8])}  # diffs -1, -1.2, -0.8: sd 0.2
    d = paired_difference(a, b, "fid")
    half = 4.303 * 0.2 / math.sqrt(3)
    assert d["ci95"] == pytest.approx((-1 - half, -1 + half)) and d["resolved"]


def test_paired_difference_needs_two_common_seeds():
    arms = runs_by_arm(RUNS, default_seed=1)
    with pytest.raises(ValueError, match=r"at least two common seeds, got \[7\]"):
        paired_difference({7: arms["K=1"][7]}, arms["K=4"], "fid")


def test_seed_figure_joins_each_seed_across_arms_and_draws_the_baseline():
    arms = runs_by_arm(RUNS, default_seed=1)
    fid, psnr = seed_comparison_figure(arms, [("fid", "FID"), ("psnr_vs_fp", "PSNR")], RUNS[0]).axes
    seed_lines = [line for line in fid.get_lines() if line.get_label().startswith("seed")]
    assert [tuple(line.get_ydata()) for line in seed_lines] == [(4.0, 3.5), (5.0, 4.0), (6.0, 5.5)]
    assert [line.get_label() for line in fid.get_lines()][-1] == "FP"  # FP has a FID ...
    assert "FP" not in [line.get_label() for line in psnr.get_lines()]  # ... and no PSNR against itself
