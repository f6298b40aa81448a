"""The run lock of a Lightning run: taken by global rank 0 for the whole run, shared by the other ranks."""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import Strategy

from ..io import RunLock, check_writable
from .strategy import decided_by_zero

LOCK_NAME = "mmqdiff.lock"


def hold_run_lock(strategy: Strategy, lock: RunLock) -> None:
    """Probe the lock's folder for writing and take ``lock`` on rank 0 (the other ranks leave theirs untaken, so
    releasing it there does nothing); every rank raises if rank 0 could not."""

    def take() -> None:
        check_writable(lock.path.parent)
        lock.acquire()

    decided_by_zero(strategy, take)


class RunFolderLock(Callback):
    """Holds ``<folder>/mmqdiff.lock`` from ``setup`` until the run ends, normally or by an exception."""

    def __init__(self, folder: Path, what: str):
        self.lock = RunLock(Path(folder) / LOCK_NAME, f"{what} {folder}")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        hold_run_lock(trainer.strategy, self.lock)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.lock.release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.lock.release()
