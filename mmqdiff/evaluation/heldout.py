"""Held-out fidelity of segment models: per-step noise-prediction error against the FP model on calibration-format
pairs (x_t, t) that calibration never saw.

Calibration takes the *first* ``cali_n`` trajectories of the file at its selected steps; the trajectories after
them are unused at every step, so their pairs measure how well a calibrated model generalises. Unlike the sampler's
per-step error (which runs on the quantized model's own drifting trajectory), every model here sees the same FP
inputs, so the number isolates per-step fidelity from error accumulation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..data.calibration import CalibrationFile
from ..data.segments import equal_share_boundaries
from ..diffusion import betas_from_config, build_model, eps_sensitivity, load_checkpoint, state_dict_sha256
from ..segments import SegmentedModel
from ..segments.run_folder import read_manifest
from .fidelity import squared_error

# the FP model's predictions on the last held-out pairs scored (one entry "key" says which), reused by the next run
_fp_predictions: dict[Any, Any] = {}


@torch.no_grad()
def heldout_step_error(model_for_step: Callable[[int], nn.Module], fp_model: nn.Module, calib: CalibrationFile,
                       trajectories: Sequence[int], steps: Sequence[int] | None = None,
                       batch_size: int = 256) -> list[float]:
    """Mean squared difference between ``model_for_step(i)``'s and the FP model's noise prediction at step ``i``,
    over the given held-out ``trajectories`` of ``calib``, for each step (default: all). Float64 accumulation."""
    steps = range(calib.num_steps) if steps is None else steps
    idx = torch.as_tensor(list(trajectories), dtype=torch.long)
    if len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= calib.num_trajectories:
        raise ValueError(f"{calib.path}: held-out trajectories must be non-empty indices in "
                         f"[0, {calib.num_trajectories - 1}]")
    device = next(fp_model.parameters()).device
    key = (str(calib.path), calib.path.stat().st_mtime_ns, tuple(idx.tolist()), batch_size, str(device),
           state_dict_sha256(fp_model))
    if _fp_predictions.get("key") != key:  # the FP side is the same for every run scored on these pairs
        _fp_predictions.clear()
        _fp_predictions["key"] = key
    out = []
    for i in steps:
        xs, ts = (v[idx].float() for v in calib.at_step(i))
        sq, n = 0.0, 0
        for start in range(0, len(idx), batch_size):
            x, t = xs[start:start + batch_size].to(device), ts[start:start + batch_size].to(device)
            if (i, start) not in _fp_predictions:
                _fp_predictions[(i, start)] = fp_model(x, t)
            err = squared_error(model_for_step(i)(x, t), _fp_predictions[(i, start)])
            sq, n = sq + float(err.sum()), n + err.numel()
        out.append(sq / n)
    return out


def sample_space_error(per_step: Sequence[float], sensitivity: Sequence[float]) -> float:
    """``sum_i sensitivity_i^2 * mse_i``: the squared deviation the per-step noise-prediction errors add to the
    sample through the DDIM updates (``diffusion.eps_sensitivity``), to first order and ignoring how later steps
    carry it. The mean over steps is dominated by the last, nearly clean steps, whose errors barely move the image;
    this weighting ranks calibrations by what the sample sees."""
    if len(per_step) != len(sensitivity):
        raise ValueError(f"{len(per_step)} per-step errors for {len(sensitivity)} steps")
    return float(sum(s * s * e for s, e in zip(sensitivity, per_step)))


def quarter_means(per_step: Sequence[float]) -> list[float]:
    """Means over the four contiguous quarters of the steps (noisy to clean): where along the trajectory
    the error sits, in four numbers."""
    n = len(per_step)
    edges = [n * q // 4 for q in range(5)]
    return [sum(per_step[a:b]) / max(b - a, 1) for a, b in zip(edges, edges[1:])]


def load_run(run_dir: str | Path, calibration: str | Path) -> tuple[CalibrationFile, nn.Module,
                                                                     Callable[[int], nn.Module], list[float]]:
    """(the calibration file, checked against the run's schedule; the FP model; step index -> that step's segment
    model, the run's :class:`~mmqdiff.segments.SegmentedModel` as the sampler loads it; per-step
    ``eps_sensitivity``) of a finished calibration run."""
    manifest = read_manifest(run_dir)
    calib = CalibrationFile(calibration)
    if calib.num_steps != manifest["num_steps"]:
        raise ValueError(f"{calibration}: holds {calib.num_steps} steps, {run_dir} was calibrated for "
                         f"{manifest['num_steps']}")
    fp_record = manifest["fp_model"]
    if not (fp_record.get("config_dict") and fp_record.get("checkpoint")):
        raise ValueError(f"{run_dir}: the manifest records no FP model config and checkpoint (a folder saved by "
                         "SegmentedModel.save without model_config / checkpoint); the FP model cannot be reloaded")
    betas = betas_from_config(fp_record["config_dict"])
    fp = load_checkpoint(build_model(fp_record["config_dict"]), fp_record["checkpoint"]).eval()
    model = SegmentedModel.load(run_dir, fp)
    calib.check_schedule(model.seq)
    return calib, fp, model.model_for_step, eps_sensitivity(model.seq, betas)


def _run_step_error(run_dir: str | Path, calibration: str | Path, trajectories: Sequence[int],
                    threads: int | None) -> tuple[list[float], list[float]]:
    """(per-step error against FP on ``trajectories``, per-step ``eps_sensitivity``) of a finished run."""
    calib, fp, model_for_step, sensitivity = load_run(run_dir, calibration)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        per_step = heldout_step_error(model_for_step, fp, calib, trajectories)
    finally:
        torch.set_num_threads(previous)
    return per_step, sensitivity


def heldout_error_of_run(run_dir: str | Path, calibration: str | Path, trajectories: Sequence[int],
                         threads: int | None = None) -> dict[str, Any]:
    """Held-out per-step error of a finished calibration run's K segment models on ``trajectories`` of
    ``calibration``, which must all lie beyond the run's ``cali_n`` (the trajectories calibration selected from)."""
    cali_n = read_manifest(run_dir)["calibration"]["cali_n"]
    if min(trajectories) < cali_n:
        raise ValueError(f"held-out trajectories {min(trajectories)}.. overlap the first cali_n={cali_n} "
                         f"trajectories that {run_dir} calibrated on")
    per_step, sensitivity = _run_step_error(run_dir, calibration, trajectories, threads)
    return {"heldout_mse": sum(per_step) / len(per_step), "heldout_quarters": quarter_means(per_step),
            "heldout_x_mse": sample_space_error(per_step, sensitivity),
            "heldout_per_step": per_step, "heldout_trajectories": [min(trajectories), max(trajectories) + 1]}


def damage_boundaries(run_dir: str | Path, calibration: str | Path, k: int, threads: int | None = None) -> list[int]:
    """Cut points for K segments chosen from data: each segment gets an equal share of a finished run's (usually
    K=1's) sample-space damage per step, ``sensitivity^2 * error`` (see :func:`sample_space_error`), measured at
    every step on the run's own calibration trajectories (the first ``cali_n``), never on the held-out ones that
    score the result. Where errors move the sample most (the noisy steps) the segments get short."""
    cali_n = read_manifest(run_dir)["calibration"]["cali_n"]
    per_step, sensitivity = _run_step_error(run_dir, calibration, range(cali_n), threads)
    return equal_share_boundaries([s * s * e for s, e in zip(sensitivity, per_step)], k)
