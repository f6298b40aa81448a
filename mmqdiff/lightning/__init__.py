"""Lightning wiring of the pure-torch cores, and what Lightning prints in the project's processes.

Importing it keeps Lightning's promotional tips ("💡 Tip: ... litlogger / litmodels") out of the output. In a CLI
run (``mmqdiff.cli``), ``run_log`` moves the rest of Lightning's info lines (accelerator, distributed set-up, loop
notices) and third-party deprecation warnings to the run's ``mmqdiff.log``: each stage of the main job printed
about ten of them, and the terminal keeps the project's own progress, every warning of Lightning's and every error.
"""
from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lightning.pytorch import Callback, LightningModule, Trainer

LOG_NAME = "mmqdiff.log"
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_PROJECT = f"{Path(__file__).resolve().parents[1]}{os.sep}"


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoTips())


class _WarningsAndErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


class RunLog(logging.Handler):
    """Records held in memory until ``open(folder)`` appends them, and every later one, to ``folder/mmqdiff.log``.

    The file opens when the run starts (``OpenRunLog``): after the run's checks and lock, so a refused run writes
    nothing into the folder of the run that owns it; what a run that never starts collected is dropped with it.
    Appending lets the ranks (and nodes) of a run, and a resumed run, share one file.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.path: Path | None = None
        self._pending: list[logging.LogRecord] = []
        self._file: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            self._pending.append(record)
        else:
            self._file.handle(record)

    def open(self, folder: str | Path) -> None:
        if self._file is not None:
            return
        self.path = Path(folder) / LOG_NAME
        self._file = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        self._file.setFormatter(self.formatter)
        for record in self._pending:
            self._file.handle(record)
        self._pending.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


class OpenRunLog(Callback):
    """Opens a ``RunLog`` in ``trainer.default_root_dir`` when the run starts, on every rank."""

    def __init__(self, run_log: RunLog):
        self.run_log = run_log  # not ``log``: Lightning sets that attribute of every callback

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.run_log.open(trainer.default_root_dir)

    on_fit_start = on_validation_start = on_test_start = on_predict_start = _start


@contextmanager
def run_log() -> Iterator[RunLog]:
    """While open: Lightning's records below WARNING reach its terminal handlers no more (they go to the yielded
    ``RunLog``, which also gets its warnings), and deprecation warnings raised outside this package go to the
    ``RunLog`` instead of the terminal; the project's own deprecations and every other warning show as before."""
    log = RunLog()
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    terminals = [h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler]
    quiet = _WarningsAndErrors()
    show = warnings.showwarning

    def showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int, *args: Any) -> None:
        if issubclass(category, DEPRECATIONS) and not filename.startswith(_PROJECT):
            text = warnings.formatwarning(message, category, filename, lineno).rstrip()
            log.handle(logging.LogRecord("py.warnings", logging.WARNING, filename, lineno, text, None, None))
        else:
            show(message, category, filename, lineno, *args)

    for logger in loggers:
        logger.addHandler(log)
    for handler in terminals:
        handler.addFilter(quiet)
    warnings.showwarning = showwarning
    try:
        yield log
    finally:
        warnings.showwarning = show
        for handler in terminals:
            handler.removeFilter(quiet)
        for logger in loggers:
            logger.removeHandler(log)
        log.close()
