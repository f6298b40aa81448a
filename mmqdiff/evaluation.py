"""Held-out fidelity of segment models: per-step noise-prediction error against the FP model on calibration-format
pairs (x_t, t) that calibration never saw.

Calibration takes the *first* ``cali_n`` trajectories of the file at its selected steps; the trajectories after
them are unused at every step, so their pairs measure how well a calibrated model generalises. Unlike the sampler's
per-step error (which runs on the quantized model's own drifting trajectory), every model here sees the same FP
inputs, so the number isolates per-step fidelity from error accumulation.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .data.calibration import CalibrationFile


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
    out = []
    for i in steps:
        xs, ts = calib.xs[i][idx].float(), calib.ts[i][idx].float()
        sq, n = 0.0, 0
        for start in range(0, len(idx), batch_size):
            x, t = xs[start:start + batch_size].to(device), ts[start:start + batch_size].to(device)
            diff = model_for_step(i)(x, t).double() - fp_model(x, t).double()
            sq, n = sq + float(diff.square().sum()), n + diff.numel()
        out.append(sq / n)
    return out


def quarter_means(per_step: Sequence[float]) -> list[float]:
    """Means over the four contiguous quarters of the steps (noisy to clean), the issue tracker's summary."""
    n = len(per_step)
    edges = [round(n * q / 4) for q in range(5)]
    return [sum(per_step[a:b]) / max(b - a, 1) for a, b in zip(edges, edges[1:])]
