"""Calibration data: Q-Diffusion's file format, its reader with the reference selection rule, and the recorder of
FP DDIM trajectories that writes the same format.

File format (Q-Diffusion's ``cifar_sd1236_sample2048_allst.pt``): a mapping with
``xs`` -- per sampling step the model input x_t, a tensor [T(+1), N, C, H, W] or a list of [N, C, H, W] tensors
(an extra last entry is the final sample), and ``ts`` -- per step the timesteps, [T, N] or a list of [N] tensors,
float or integer. Index i is the step index (0 = first, noisiest step). Files made here add ``meta`` (a dict of
plain values: model hash, schedule, seed, ...). Files are read weights-only and memory-mapped, so selecting a few
steps of a multi-GB file reads only those.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..diffusion.sampler import IndexedNoise, ddim_sample, trajectory_generator

log = logging.getLogger(__name__)

Steps = torch.Tensor | Sequence[torch.Tensor]


def select_steps(steps: Sequence[int], cali_st: int) -> list[int]:
    """The reference rule ``range(0, n, n // cali_st)`` applied to positions in ``steps``.

    With ``steps = range(T)`` this is exactly Q-Diffusion's selection (note 101 // 20 = 5 gives 21 steps). When
    fewer than ``cali_st`` steps are given all are taken, with a warning, instead of the reference's error.
    """
    steps = [int(s) for s in steps]
    if cali_st < 1:
        raise ValueError(f"cali_st must be >= 1, got {cali_st}")
    if not steps:
        raise ValueError("no steps to select from")
    if len(steps) < cali_st:
        log.warning("only %d steps (%d..%d) for cali_st=%d: taking all of them", len(steps), steps[0], steps[-1],
                    cali_st)
        return steps
    return [steps[p] for p in range(0, len(steps), len(steps) // cali_st)]


def _describe(v: Any) -> str:
    return f"tensor {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__


def _entries(obj: Mapping, key: str, path: Path, entry_dim: int) -> tuple[Steps, tuple[int, ...]]:
    """``obj[key]`` as a step-indexable object and the shape of one step's entry; explains a wrong layout."""
    v = obj[key]
    if isinstance(v, torch.Tensor) and v.dim() == entry_dim + 1:
        return v, tuple(v.shape[1:])
    if isinstance(v, (list, tuple)) and v and all(isinstance(e, torch.Tensor) for e in v):
        shapes = {tuple(e.shape) for e in v}
        if len(shapes) == 1 and len(next(iter(shapes))) == entry_dim:
            return v, next(iter(shapes))
        raise ValueError(f"{path}: '{key}' entries must all have one {entry_dim}-d shape, got {sorted(shapes)}")
    raise ValueError(f"{path}: '{key}' must be a {entry_dim + 1}-d tensor or a non-empty list of {entry_dim}-d "
                     f"tensors indexed by sampling step, got {_describe(v)}")


class CalibrationFile:
    """An opened (memory-mapped) calibration file whose layout has been checked; reads only what is selected."""

    def __init__(self, path: str | Path, image_shape: Sequence[int] | None = None):
        self.path = Path(path)
        obj = _load(self.path)
        missing = [k for k in ("xs", "ts") if k not in obj]
        if missing:
            raise ValueError(f"{self.path}: missing key(s) {missing}; found {sorted(map(str, obj))}")
        self.xs, x_shape = _entries(obj, "xs", self.path, 4)
        self.ts, t_shape = _entries(obj, "ts", self.path, 1)
        self.num_steps = len(self.ts)
        if len(self.xs) not in (self.num_steps, self.num_steps + 1):
            raise ValueError(f"{self.path}: 'xs' has {len(self.xs)} steps but 'ts' has {self.num_steps} "
                             "(xs may hold one extra entry, the final sample)")
        if x_shape[0] != t_shape[0]:
            raise ValueError(f"{self.path}: 'xs' holds {x_shape[0]} trajectories per step but 'ts' {t_shape[0]}")
        self.num_trajectories, self.image_shape = x_shape[0], x_shape[1:]
        if image_shape is not None:
            self.check_image_shape(image_shape)
        meta = obj.get("meta")
        if meta is not None and not isinstance(meta, Mapping):
            raise ValueError(f"{self.path}: 'meta' must be a mapping, got {type(meta).__name__}")
        self.meta: dict[str, Any] | None = None if meta is None else dict(meta)

    def select(self, cali_st: int, cali_n: int,
               steps: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(xs [M, C, H, W], ts [M]) float32: the first ``cali_n`` trajectories at each of ``select_steps(steps,
        cali_st)``, ordered step by step as in the reference."""
        steps = range(self.num_steps) if steps is None else [int(s) for s in steps]
        bad = [s for s in steps if not 0 <= s < self.num_steps]
        if bad:
            raise ValueError(f"{self.path}: step indices {bad[:5]} outside [0, {self.num_steps - 1}]")
        if not 1 <= cali_n <= self.num_trajectories:
            raise ValueError(f"{self.path}: cali_n={cali_n} but the file holds {self.num_trajectories} trajectories")
        chosen = select_steps(steps, cali_st)
        xs = torch.cat([self.xs[i][:cali_n].float() for i in chosen])
        ts = torch.cat([self.ts[i][:cali_n].float() for i in chosen])
        for name, v in (("xs", xs), ("ts", ts)):
            finite = torch.isfinite(v.reshape(len(chosen), -1)).all(dim=1)
            if not finite.all():
                raise ValueError(f"{self.path}: non-finite values in '{name}' at step(s) "
                                 f"{[chosen[j] for j in (~finite).nonzero().flatten().tolist()][:5]}")
        return xs, ts

    def check_image_shape(self, image_shape: Sequence[int]) -> None:
        """Raise if the file's images are not ``image_shape`` (C, H, W)."""
        if tuple(image_shape) != self.image_shape:
            raise ValueError(f"{self.path}: images are {self.image_shape} (C, H, W) but the model expects "
                             f"{tuple(image_shape)}")

    def check_meta(self, **expected: Any) -> None:
        """Raise if the file's meta disagrees with any given (non-None) expectation; files without meta pass."""
        if self.meta is None:
            return
        wrong = [f"{k}: file has {self.meta[k]!r}, expected {v!r}" for k, v in expected.items()
                 if v is not None and k in self.meta and self.meta[k] != v]
        if wrong:
            raise ValueError(f"{self.path}: calibration data were made for another setup ({'; '.join(wrong)})")


def _load(path: Path) -> Mapping:
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) torch files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a weights-only torch file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: not a tensor mapping {{'xs': ..., 'ts': ...}}, got {type(obj).__name__}")
    return obj


def load_calibration(path: str | Path, cali_st: int, cali_n: int, steps: Sequence[int] | None = None,
                     image_shape: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q-Diffusion's calibration set from ``path``; ``steps`` limits selection to those step indices (a segment)."""
    return CalibrationFile(path, image_shape).select(cali_st, cali_n, steps)


def read_calibration_meta(path: str | Path) -> dict[str, Any] | None:
    """The ``meta`` entry of a calibration file, or None when it has none (e.g. Q-Diffusion's released file)."""
    meta = _load(Path(path)).get("meta")
    return None if meta is None else dict(meta)


def save_calibration(path: str | Path, xs: Steps, ts: Steps, meta: Mapping[str, Any] | None = None,
                     overwrite: bool = False) -> Path:
    """Write ``{"xs", "ts", "meta"}`` atomically (temporary file, then rename), after checking the layout."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    obj = {"xs": xs, "ts": ts, **({} if meta is None else {"meta": dict(meta)})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        CalibrationFile(tmp)  # the written file must read back
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@torch.no_grad()
def record_trajectories(model: nn.Module, indices: Sequence[int], seed: int, seq: Sequence[int], betas: torch.Tensor,
                        eta: float, image_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """FP DDIM trajectories for the given trajectory indices: xs [T+1, B, C, H, W] (model inputs, then the final
    sample) and ts [T, B] float32, on CPU.

    Same update as ``ddim_sample``, but each trajectory draws x_T and (eta > 0) its step noise from its own
    ``trajectory_generator``, so trajectory j equals ``ddim_sample`` run on it alone with that generator.
    """
    noise = IndexedNoise(seed, indices, image_shape, next(model.parameters()).device)
    xs, ts = [], []

    def record(i: int, t: int, x: torch.Tensor, eps: torch.Tensor) -> None:
        xs.append(x.cpu())
        ts.append(torch.full((x.shape[0],), float(t)))

    xs.append(ddim_sample(lambda i: model, noise(), seq, betas, eta, callback=record, noise_fn=noise).cpu())
    return torch.stack(xs), torch.stack(ts)
