"""The segment-filtered calibration data of a fit run, as a LightningDataModule: ``data:`` in the calibration configs.

The DataModule owns the calibration file: it opens it, checks it against the schedule (and, through
:meth:`CalibrationDataModule.check_model`, the FP model), cuts the sampling steps into K segments with
``timestep_segments`` (the function sampling uses to pick each step's model) and selects each segment's pairs with
the reference rule applied within the segment. Its train loader yields, once per training step, the full pair sets
of the segments this process calibrates: ``{segment: (xs [M, C, H, W], ts [M])}``; the calibration module runs one
work item per step on them.
"""
from __future__ import annotations

from functools import cached_property
from typing import Any, Iterator, Sequence

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, IterableDataset

from ..data.calibration import CalibrationFile, calibration_sha256
from ..data.segments import timestep_segments
from ..diffusion import timesteps
from .strategy import segments_of_rank

Pairs = dict[int, tuple[torch.Tensor, torch.Tensor]]


class SegmentPairsStream(IterableDataset):
    """The same ``{segment: (xs, ts)}`` element, once per training step, until the module stops the loop (the number
    of work items is the module's business; a resumed run starts a fresh stream, which is harmless)."""

    def __init__(self, pairs: Pairs):
        self.pairs = pairs

    def __iter__(self) -> Iterator[Pairs]:
        while True:
            yield self.pairs


class CalibrationDataModule(LightningDataModule):
    """Calibration pairs of K segments of ``num_steps`` sampling steps from the file at ``path``.

    Args:
        path: calibration file (Q-Diffusion's ``{"xs", "ts"}`` layout, optionally with ``meta``).
        num_steps, skip_type, num_diffusion_timesteps: the sampling schedule; ``num_steps`` must equal the file's
            step count, both must match the file's meta when it has one, and the file's ``ts`` must follow
            ``timesteps(num_steps, skip_type, num_diffusion_timesteps)`` (``CalibrationFile.check_schedule``).
        k, boundaries: the segments (``timestep_segments``).
        segment: which segments to serve (an index or a list); None: those of this process under a trainer
            (``segments_of_rank``, balanced by :attr:`segment_costs`), all of them otherwise.
        cali_st, cali_n: the reference selection rule, applied within each segment's calibration window.
        overlap: steps by which each segment's calibration window reaches into its neighbours (clipped to the
            schedule): a segment model also sees pairs from just across its cuts, where sampling hands over to or
            from it; sampling still switches models at the cuts. 0: the window is the segment (the default).
        image_shape, model_sha256: optional checks against the model (a calibration run passes them through
            :meth:`check_model` instead).
    """

    def __init__(self, path: str, num_steps: int, k: int = 1, segment: int | list[int] | None = None,
                 cali_st: int = 20, cali_n: int = 256, boundaries: list[int] | None = None, skip_type: str = "quad",
                 image_shape: list[int] | None = None, model_sha256: str | None = None,
                 num_diffusion_timesteps: int = 1000, overlap: int = 0):
        super().__init__()
        if not (isinstance(overlap, int) and overlap >= 0):
            raise ValueError(f"overlap must be an integer number of steps >= 0, got {overlap!r}")
        self.path, self.num_steps, self.k, self.skip_type = path, num_steps, k, skip_type
        self.segments = timestep_segments(num_steps, k, boundaries)
        self.segment = segment
        for s in self._requested():
            if not 0 <= s < k:
                raise ValueError(f"segment index {s} outside [0, {k - 1}] for k={k}")
        self.cali_st, self.cali_n, self.overlap = cali_st, cali_n, overlap
        self.image_shape, self.model_sha256 = image_shape, model_sha256
        self.num_diffusion_timesteps = num_diffusion_timesteps
        self._file: CalibrationFile | None = None
        # relative calibration cost per segment (the calibration module's segment_scale), so that the ranks of a
        # segment_parallel run get equal work; set before the pairs are selected
        self.segment_costs: list[float] | None = None
        self.selected: Pairs = {}  # served segment -> (xs, ts), filled by select
        self.summary: list[dict[str, Any]] = []  # per served segment, filled by select

    def _requested(self) -> list[int]:
        return [] if self.segment is None else [self.segment] if isinstance(self.segment, int) else list(self.segment)

    @property
    def segment_ids(self) -> list[int]:
        """The segments this DataModule serves (this process's share under a trainer)."""
        if self.segment is not None:
            return self._requested()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return segments_of_rank(self.k, rank, world, self.segment_costs)

    def _open(self) -> CalibrationFile:
        if self._file is None:
            f = CalibrationFile(self.path)
            if f.num_steps != self.num_steps:
                raise ValueError(f"{f.path}: holds {f.num_steps} sampling steps but num_steps={self.num_steps}")
            f.check_meta(num_steps=self.num_steps, skip_type=self.skip_type)
            f.check_schedule(timesteps(self.num_steps, self.skip_type, self.num_diffusion_timesteps))
            self._check_model(f, self.image_shape, self.model_sha256)
            self._file = f
        return self._file

    @staticmethod
    def _check_model(f: CalibrationFile, image_shape: Sequence[int] | None, model_sha256: str | None) -> None:
        if image_shape is not None:
            f.check_image_shape(image_shape)
        f.check_meta(model_sha256=model_sha256)

    def check_model(self, image_shape: Sequence[int] | None = None, model_sha256: str | None = None) -> None:
        """Raise if the file's images are not ``image_shape`` (C, H, W) or its meta names another model."""
        self._check_model(self._open(), image_shape, model_sha256)

    @property
    def meta(self) -> dict[str, Any] | None:
        """The file's ``meta`` entry (None for Q-Diffusion's released file)."""
        return self._open().meta

    @cached_property
    def sha256(self) -> str:
        return calibration_sha256(self.path)

    def window(self, segment: int) -> range:
        """The steps one segment's pairs are selected from: the segment widened by ``overlap`` on each side."""
        steps = self.segments[segment]
        return range(max(0, steps.start - self.overlap), min(self.num_steps, steps.stop + self.overlap))

    def pairs(self, segment: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All selected (xs [M, C, H, W], ts [M]) of one segment."""
        return self._open().select(self.cali_st, self.cali_n, self.window(segment))

    def setup(self, stage: str | None = None) -> None:
        """Opens and checks the file, so that a bad file fails before any work."""
        self._open()

    def select(self) -> Pairs:
        """The pairs of the served segments, selected once. Under a trainer this happens when the loader is built,
        after every setup hook: the calibration module's setup sets :attr:`segment_costs` first."""
        if not self.selected:
            self.selected = {s: self.pairs(s) for s in self.segment_ids}
            self.summary = [self._summary_row(s, ts) for s, (_, ts) in self.selected.items()]
            self.print_summary()
        return self.selected

    def train_dataloader(self) -> DataLoader:
        return DataLoader(SegmentPairsStream(self.select()), batch_size=None)

    def transfer_batch_to_device(self, batch: Pairs, device: torch.device, dataloader_idx: int) -> Pairs:
        """The pairs stay in host memory; the engine moves each caching batch to the device (as the reference)."""
        return batch

    def _summary_row(self, segment: int, ts: torch.Tensor) -> dict[str, Any]:
        steps, window = self.segments[segment], self.window(segment)
        return {"segment": segment, "steps": (steps[0], steps[-1]), "window": (window[0], window[-1]),
                "selected_steps": len(ts) // self.cali_n,
                "t_range": (int(ts.max()), int(ts.min())), "pairs": len(ts)}

    @rank_zero_only
    def print_summary(self) -> None:
        table = Table(title=f"calibration data {self.path} (K={self.k}, cali_st={self.cali_st}, "
                            f"cali_n={self.cali_n}, overlap={self.overlap})")
        for col in ("segment", "steps", "window", "selected", "t (high..low)", "pairs"):
            table.add_column(col)
        for r in self.summary:
            table.add_row(str(r["segment"]), f"{r['steps'][0]}..{r['steps'][1]}",
                          f"{r['window'][0]}..{r['window'][1]}", str(r["selected_steps"]),
                          f"{r['t_range'][0]}..{r['t_range'][1]}", str(r["pairs"]))
        Console().print(table)
