"""Calibration data from the FP model's own DDIM trajectories, as a Lightning predict run.

``python cli.py predict --config configs/embedded/gen_calib.yaml``: the DataModule serves trajectory indices, the
module records each batch's trajectories (noise of trajectory j depends only on (seed, j), so batch size and device
count do not change the data), and ``CalibrationWriter`` assembles them by index and writes one file in
Q-Diffusion's format plus ``meta``. Use ``return_predictions: false``: the file is the result, and the trainer need
not keep the batches alive afterwards.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from ..data.calibration import record_trajectories, save_calibration, state_problem
from ..diffusion import (betas_from_config, build_model, file_sha256, load_checkpoint, load_config, state_dict_sha256,
                         timesteps)
from ..diffusion.sampler import check_eta
from ..io import RunLock, atomic_save
from .run_lock import hold_run_lock
from .strategy import decided_by_zero, gather_to_zero


class TrajectoryIndices(Dataset):
    """Item j is the trajectory index j; the sampler decides which rank gets which."""

    def __init__(self, num_trajectories: int):
        self.num_trajectories = num_trajectories

    def __len__(self) -> int:
        return self.num_trajectories

    def __getitem__(self, j: int) -> int:
        if not 0 <= j < self.num_trajectories:
            raise IndexError(j)
        return j


class TrajectoryDataModule(LightningDataModule):
    def __init__(self, num_trajectories: int = 256, batch_size: int = 256):
        super().__init__()
        if num_trajectories < 1 or batch_size < 1:
            raise ValueError(f"num_trajectories and batch_size must be >= 1, got {num_trajectories}, {batch_size}")
        self.num_trajectories, self.batch_size = num_trajectories, batch_size

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(TrajectoryIndices(self.num_trajectories), batch_size=self.batch_size, shuffle=False)


class CalibrationGenerator(LightningModule):
    """Records FP DDIM trajectories (same schedule flags as sampling) for batches of trajectory indices."""

    def __init__(self, config: str, checkpoint: str, num_steps: int = 100, skip_type: str = "quad", eta: float = 0.0,
                 seed: int = 0):
        super().__init__()
        check_eta(eta)
        cfg = load_config(config)
        self.net = load_checkpoint(build_model(cfg), checkpoint)
        betas = betas_from_config(cfg)
        self.register_buffer("betas", betas, persistent=False)
        self.seq = timesteps(num_steps, skip_type, len(betas))
        self.eta, self.seed = eta, seed
        self.image_shape = (self.net.in_channels, self.net.resolution, self.net.resolution)
        self.meta = {"model_sha256": state_dict_sha256(self.net), "checkpoint_sha256": file_sha256(checkpoint),
                     "checkpoint": str(checkpoint), "config": str(config), "num_steps": num_steps,
                     "skip_type": skip_type, "eta": eta, "seed": seed, "image_shape": list(self.image_shape)}

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        xs, ts = record_trajectories(self.net, batch.tolist(), self.seed, self.seq, self.betas, self.eta,
                                     self.image_shape)
        return {"indices": batch.cpu(), "xs": xs, "ts": ts}


class CalibrationWriter(BasePredictionWriter):
    """Collects every rank's trajectories, places them by index and writes the file once, atomically, on rank 0.

    With several ranks each writes a shard next to ``path`` that rank 0 merges (a shared filesystem is assumed).
    Before any sampling the target folder is probed for writing, ``<path>.lock`` is taken for the run, and an
    existing ``path`` is refused unless ``overwrite``. Every batch's trajectories must be finite and within
    ``STATE_BOUND`` (``mmqdiff.data.calibration.state_problem``).
    """

    def __init__(self, path: str, overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.path, self.overwrite = Path(path), overwrite
        self._parts: list[dict[str, torch.Tensor]] = []
        self.lock = RunLock(self.path.with_name(f"{self.path.name}.lock"), f"calibration-data target {self.path}")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        hold_run_lock(trainer.strategy, self.lock)
        decided_by_zero(trainer.strategy, self._refuse_existing)

    def _refuse_existing(self) -> None:
        if self.path.exists() and not self.overwrite:
            raise FileExistsError(f"{self.path} exists; set overwrite to replace it")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.lock.release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.lock.release()

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._parts = []

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: dict[str, torch.Tensor],
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        self._parts.append(prediction)

    def _non_finite(self, parts: list[dict[str, torch.Tensor]]) -> str | None:
        """Where the first trajectory that turned NaN/inf or implausibly large does so (it would calibrate on
        garbage), or None."""
        for part in parts:
            bad = state_problem(part["xs"])  # xs: [steps (+ final), trajectories, ...]
            if bad is not None:
                step, col, what = bad
                where = "the final sample" if step == part["xs"].shape[0] - 1 else f"step index {step}"
                return (f"{self.path}: not written: trajectory {int(part['indices'][col])} {what} (first at "
                        f"{where}); the FP model diverges with these settings")
        return None

    def _refuse_non_finite(self, trainer: Trainer, parts: list[dict[str, torch.Tensor]]) -> None:
        """Every rank checks its own trajectories; all ranks stop together if any found one."""
        found = gather_to_zero(self._non_finite(parts))

        def decide() -> None:
            problems = [p for p in found or [] if p]
            if problems:
                raise ValueError(problems[0])

        decided_by_zero(trainer.strategy, decide)

    def _shard(self, rank: int) -> Path:
        return self.path.with_name(f".{self.path.name}.rank{rank}.pt")

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        parts, self._parts = self._parts, []
        self._refuse_non_finite(trainer, parts)
        shards = [self._shard(r) for r in range(trainer.world_size)] if trainer.world_size > 1 else []
        if shards:
            atomic_save(parts, shards[trainer.global_rank])
            trainer.strategy.barrier()
        if trainer.is_global_zero:
            try:
                if shards:
                    parts = [p for s in shards for p in torch.load(s, weights_only=True, mmap=True)]
                loaders = trainer.predict_dataloaders
                n = len((loaders[0] if isinstance(loaders, (list, tuple)) else loaders).dataset)
                xs, ts = self._assemble(parts, n)
                save_calibration(self.path, xs, ts, {**pl_module.meta, "num_trajectories": n},
                                 overwrite=self.overwrite)
            finally:
                for s in shards:
                    s.unlink(missing_ok=True)
        trainer.strategy.barrier()

    def _assemble(self, parts: list[dict[str, torch.Tensor]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked xs [T+1, n, ...], ts [T, n] by trajectory index; every index must arrive exactly once."""
        if not parts:
            raise RuntimeError(f"{self.path}: no trajectories were produced")
        xs = torch.empty((parts[0]["xs"].shape[0], n, *parts[0]["xs"].shape[2:]), dtype=parts[0]["xs"].dtype)
        ts = torch.empty((parts[0]["ts"].shape[0], n), dtype=parts[0]["ts"].dtype)
        seen = torch.zeros(n, dtype=torch.long)
        for p in parts:
            idx = p["indices"]
            seen.index_add_(0, idx, torch.ones_like(idx))
            xs[:, idx] = p["xs"]
            ts[:, idx] = p["ts"]
        if not (seen == 1).all():
            raise RuntimeError(f"{self.path}: trajectory indices not produced exactly once: missing "
                               f"{(seen == 0).nonzero().flatten().tolist()[:5]}, repeated "
                               f"{(seen > 1).nonzero().flatten().tolist()[:5]}")
        return xs, ts
