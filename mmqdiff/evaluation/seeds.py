"""Comparisons across calibration seeds: chunk spreads measure sampling noise of one calibration, but at short
budgets the calibration seed moves PSNR vs FP by several dB (README: results), so methods are compared by their
paired differences over seeds. Works on report.json rows whose names end in ``", seed <n>"`` (the arm is the name
without it; a row without the suffix is the arm's ``default_seed``)."""
from __future__ import annotations

import math
import re
import statistics
from typing import Any, Sequence

SEED_SUFFIX = re.compile(r"^(?P<arm>.*), seed (?P<seed>\d+)$")
# metric key -> whether lower is better
METRICS = {"fid": True, "kid": True, "psnr_vs_fp": False, "heldout_x_mse": True}
# two-sided 95% Student t quantiles t_{0.975, df}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


def runs_by_arm(runs: Sequence[dict[str, Any]], default_seed: int) -> dict[str, dict[int, dict[str, Any]]]:
    """``{arm: {seed: run}}`` in the order the arms first appear; runs without a calibration (FP) are left out."""
    arms: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        if not run.get("segments"):
            continue
        match = SEED_SUFFIX.match(run["name"])
        arm, seed = (match["arm"], int(match["seed"])) if match else (run["name"], default_seed)
        if seed in arms.setdefault(arm, {}):
            raise ValueError(f"two runs of arm {arm!r} with seed {seed}: {arms[arm][seed]['name']!r} and "
                             f"{run['name']!r}")
        arms[arm][seed] = run
    return arms


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; nan for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def paired_difference(arm: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]],
                      metric: str) -> dict[str, Any]:
    """``arm - reference`` on ``metric`` over the seeds both have: mean, sd, 95% t interval of the mean, and on how
    many seeds ``arm`` is better (by the metric's direction, :data:`METRICS`)."""
    seeds = sorted(set(arm) & set(reference))
    if len(seeds) < 2:
        raise ValueError(f"a paired difference needs at least two common seeds, got {seeds}")
    diffs = [float(arm[s][metric]) - float(reference[s][metric]) for s in seeds]
    mean, sd = mean_sd(diffs)
    half = T975.get(len(seeds) - 1, 1.96) * sd / math.sqrt(len(seeds))
    lower_better = METRICS[metric]
    wins = sum(d < 0 if lower_better else d > 0 for d in diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "sd": sd, "ci95": (mean - half, mean + half),
            "wins": wins, "resolved": not (mean - half <= 0.0 <= mean + half)}
