"""One segment's calibration pairs (x_t, t) as a LightningDataModule.

The segments come from ``timestep_segments``, the same function sampling uses to pick each step's model, and the
pairs from the reference selection rule applied within each segment.
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

from ..data.calibration import CalibrationFile
from ..data.segments import timestep_segments


class CalibrationDataModule(LightningDataModule):
    """Serves the pairs of ``segment`` (one index or several) out of K segments of ``num_steps`` sampling steps.

    ``num_steps`` must equal the file's step count; ``model_sha256``/``skip_type`` (and ``num_steps``), when given,
    must match the file's meta if it has one. Shuffling is seeded, so batches are reproducible.
    """

    def __init__(self, path: str, num_steps: int, k: int = 1, segment: int | list[int] = 0, cali_st: int = 20,
                 cali_n: int = 256, batch_size: int = 32, seed: int = 0, boundaries: list[int] | None = None,
                 image_shape: list[int] | None = None, model_sha256: str | None = None,
                 skip_type: str | None = None):
        super().__init__()
        self.path, self.num_steps = path, num_steps
        self.segments = timestep_segments(num_steps, k, boundaries)
        self.segment_ids = [segment] if isinstance(segment, int) else list(segment)
        for s in self.segment_ids:
            if not 0 <= s < k:
                raise ValueError(f"segment index {s} outside [0, {k - 1}] for k={k}")
        self.cali_st, self.cali_n, self.batch_size, self.seed = cali_st, cali_n, batch_size, seed
        self.image_shape = image_shape
        self.expected_meta = {"model_sha256": model_sha256, "num_steps": num_steps, "skip_type": skip_type}
        self._file: CalibrationFile | None = None
        self.dataset: TensorDataset | None = None
        self.summary: list[dict[str, Any]] = []  # per served segment, filled by setup

    def _open(self) -> CalibrationFile:
        if self._file is None:
            f = CalibrationFile(self.path, self.image_shape)
            if f.num_steps != self.num_steps:
                raise ValueError(f"{f.path}: holds {f.num_steps} sampling steps but num_steps={self.num_steps}")
            f.check_meta(**self.expected_meta)
            self._file = f
        return self._file

    def pairs(self, segment: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All selected (xs [M, C, H, W], ts [M]) of one segment at once, for caching block inputs."""
        return self._open().select(self.cali_st, self.cali_n, self.segments[segment])

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            data = {s: self.pairs(s) for s in self.segment_ids}
            self.summary = [self._summary_row(s, ts) for s, (_, ts) in data.items()]
            self.dataset = TensorDataset(torch.cat([x for x, _ in data.values()]),
                                         torch.cat([t for _, t in data.values()]))
            self.print_summary()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def _summary_row(self, segment: int, ts: torch.Tensor) -> dict[str, Any]:
        steps = self.segments[segment]
        return {"segment": segment, "steps": (steps[0], steps[-1]), "selected_steps": len(ts) // self.cali_n,
                "t_range": (int(ts.max()), int(ts.min())), "pairs": len(ts)}

    @rank_zero_only
    def print_summary(self) -> None:
        table = Table(title=f"calibration data {self.path} (K={len(self.segments)}, cali_st={self.cali_st}, "
                            f"cali_n={self.cali_n})")
        for col in ("segment", "steps", "selected", "t (high..low)", "pairs"):
            table.add_column(col)
        for r in self.summary:
            table.add_row(str(r["segment"]), f"{r['steps'][0]}..{r['steps'][1]}", str(r["selected_steps"]),
                          f"{r['t_range'][0]}..{r['t_range'][1]}", str(r["pairs"]))
        Console().print(table)
