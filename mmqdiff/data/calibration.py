"""Calibration data: Q-Diffusion's file format, its reader with the reference selection rule, and the recorder of
FP DDIM trajectories that writes the same format.

File format (Q-Diffusion's ``cifar_sd1236_sample2048_allst.pt``): a mapping with
``xs`` -- per sampling step the model input x_t, a tensor [T(+1), N, C, H, W] or a list of [N, C, H, W] tensors
(an extra last entry is the final sample), and ``ts`` -- per step the timesteps, [T, N] or a list of [N] tensors,
float or integer. Index i is the step index (0 = first, noisiest step). Files made here add ``meta`` (a dict of
plain values: model hash, schedule, seed, ...). Files are read weights-only and memory-mapped, so selecting a few
steps of a multi-GB file reads only those. ``xs`` must be floating point, and every selected state finite and
within ``STATE_BOUND`` (no DDIM trajectory leaves it; a diverged model or data scaled by mistake do).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..diffusion.sampler import STATE_BOUND, IndexedNoise, ddim_sample, trajectory_generator
from ..diffusion.checkpoint import state_dict_sha256
from ..io import atomic_path, brief_error

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
    """An opened (memory-mapped) calibration file whose layout has been checked; reads only what is selected.

    ``schedule``: the sampling schedule the data must come from, as ``timesteps(num_steps, skip_type)`` returns it
    (ascending t, so step index i has t = ``schedule[-1 - i]``). Every ``ts`` entry must equal its step's t; a file
    stored in the opposite (ascending-t) order is re-indexed, with a warning, so that ``xs[i]``/``ts[i]`` stay
    paired and step index 0 is the noisiest step. Without ``schedule`` the file's order is taken as is.
    """

    def __init__(self, path: str | Path, image_shape: Sequence[int] | None = None,
                 schedule: Sequence[int] | None = None):
        self.path = Path(path)
        obj = _load(self.path)
        missing = [k for k in ("xs", "ts") if k not in obj]
        if missing:
            raise ValueError(f"{self.path}: missing key(s) {missing}; found {sorted(map(str, obj))}")
        self.xs, x_shape = _entries(obj, "xs", self.path, 4)
        self.ts, t_shape = _entries(obj, "ts", self.path, 1)
        x_dtype = (self.xs if isinstance(self.xs, torch.Tensor) else self.xs[0]).dtype
        if not x_dtype.is_floating_point:
            raise ValueError(f"{self.path}: 'xs' holds {x_dtype} values; the model inputs x_t must be floating point "
                             "(float32, float16 or bfloat16)")
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
        self.file_index = list(range(self.num_steps))  # file entry of step index i
        if schedule is not None:
            self.check_schedule(schedule)

    def check_schedule(self, schedule: Sequence[int]) -> None:
        """Check every ``ts`` entry against the t of its step in ``schedule`` (see the class); accept the reversed
        order explicitly."""
        schedule = [int(t) for t in schedule]
        if len(schedule) != self.num_steps:
            raise ValueError(f"{self.path}: holds {self.num_steps} sampling steps but num_steps={len(schedule)}")
        ts = torch.stack([torch.as_tensor(t) for t in self.ts]) if isinstance(self.ts, (list, tuple)) else self.ts
        ts = ts.double()
        want = torch.tensor(schedule[::-1], dtype=torch.float64)  # step order: noisiest first
        if bool((ts == want[:, None]).all()):
            return
        if self.num_steps > 1 and bool((ts == want.flip(0)[:, None]).all()):
            self.file_index.reverse()
            log.warning("%s: ts run in ascending order (t=%d first); re-indexed so that step index 0 is the "
                        "noisiest step (t=%d), each xs entry kept with its ts entry", self.path, schedule[0],
                        schedule[-1])
            return
        step, traj = (ts != want[:, None]).nonzero()[0].tolist()
        raise ValueError(f"{self.path}: 'ts' does not follow the sampling schedule: first difference at step index "
                         f"{step} (trajectory {traj}): the file has t={ts[step, traj].item():g}, the schedule "
                         f"expects t={schedule[::-1][step]} (step index 0 is the first, noisiest step; check "
                         "num_steps and skip_type)")

    def at_step(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(xs [N, C, H, W], ts [N]) of step index ``i`` (0 = noisiest), as stored (memory-mapped, not copied)."""
        return self.xs[self.file_index[i]], self.ts[self.file_index[i]]

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
        xs = torch.cat([self.at_step(i)[0][:cali_n].float() for i in chosen])
        ts = torch.cat([self.at_step(i)[1][:cali_n].float() for i in chosen])
        for name, v in (("xs", xs), ("ts", ts)):
            finite = torch.isfinite(v.reshape(len(chosen), -1)).all(dim=1)
            if not finite.all():
                raise ValueError(f"{self.path}: non-finite values in '{name}' at step(s) "
                                 f"{[chosen[j] for j in (~finite).nonzero().flatten().tolist()][:5]}")
        bad = state_problem(xs.view(len(chosen), cali_n, *xs.shape[1:]))
        if bad is not None:
            step, traj, what = bad
            raise ValueError(f"{self.path}: 'xs' at step index {chosen[step]}, trajectory {traj} {what}; the file "
                             "does not hold DDIM states of a working model (diverged, or scaled by mistake)")
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
        wrong = [k for k, v in expected.items() if v is not None and k in self.meta and self.meta[k] != v]
        if wrong:
            hint = ""
            if "model_sha256" in wrong and "checkpoint_sha256" not in self.meta:
                hint = (". This file's meta predates model identity by weights (its model_sha256 may be the hash of "
                        "the checkpoint file's bytes): regenerate it from your checkpoint")
            details = "; ".join(f"{k}: file has {self.meta[k]!r}, expected {expected[k]!r}" for k in wrong)
            raise ValueError(f"{self.path}: calibration data were made for another setup ({details}){hint}")


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    return path


def _load(path: Path) -> Mapping:
    _require_file(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) torch files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a weights-only torch file ({brief_error(e)})") from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: not a tensor mapping {{'xs': ..., 'ts': ...}}, got {type(obj).__name__}")
    return obj


def load_calibration(path: str | Path, cali_st: int, cali_n: int, steps: Sequence[int] | None = None,
                     image_shape: Sequence[int] | None = None,
                     schedule: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q-Diffusion's calibration set from ``path``; ``steps`` limits selection to those step indices (a segment);
    ``schedule`` (``timesteps(num_steps, skip_type)``) checks the file's ``ts`` (see :class:`CalibrationFile`)."""
    return CalibrationFile(path, image_shape, schedule).select(cali_st, cali_n, steps)


def calibration_sha256(path: str | Path) -> str:
    """Identity of a calibration file's data: SHA-256 over every step's ``xs`` and ``ts`` entry (dtype, shape,
    values), so the same data saved under another name, as a list instead of a stacked tensor, or with other
    ``meta`` count as the same; the file bytes would not (torch's archive records the file name)."""
    obj = _load(Path(path))
    entries = {}
    for key in ("xs", "ts"):
        if key not in obj:
            raise ValueError(f"{path}: missing key {key!r}; found {sorted(map(str, obj))}")
        entries.update({f"{key}.{i:06d}": v for i, v in enumerate(obj[key])})
    return state_dict_sha256(entries)


def state_problem(xs: torch.Tensor) -> tuple[int, int, str] | None:
    """(step, trajectory, what) of the first entry of ``xs`` [S, N, C, H, W] that no DDIM trajectory holds:
    non-finite values, or |x| beyond ``STATE_BOUND``; None when all are plausible."""
    flat = xs.flatten(2)
    finite = torch.isfinite(flat).all(dim=2)
    if not bool(finite.all()):
        step, traj = (~finite).nonzero()[0].tolist()
        return step, traj, "holds non-finite values"
    peak = flat.abs().amax(dim=2)
    if bool((peak > STATE_BOUND).any()):
        step, traj = (peak > STATE_BOUND).nonzero()[0].tolist()
        return step, traj, (f"reaches |x| = {float(peak[step, traj]):.3g}, beyond the {STATE_BOUND:g} that DDIM "
                            "states stay within")
    return None


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
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        CalibrationFile(tmp)  # the written file must read back
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
