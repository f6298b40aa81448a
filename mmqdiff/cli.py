"""The ``mmqdiff`` command (``python -m mmqdiff.cli`` and a checkout's ``python cli.py`` are the same):

    mmqdiff fit|predict --config configs/...yaml [--section.key value ...]   LightningCLI
    mmqdiff pipeline [--config configs/embedded/main.yaml]                     the main job, mmqdiff.pipeline

Each LightningCLI config names its LightningModule / LightningDataModule by ``class_path``; LightningCLI writes the
resolved config next to the run's outputs. A ``--config`` path that does not exist from the working directory, such
as ``configs/embedded/sample.yaml`` outside the repository, is the config of that name shipped with the package
(``mmqdiff.io.shipped_path``); paths inside a config stay relative to the working directory. Lightning's info lines
and third-party deprecation warnings go to the run's ``mmqdiff.log`` (``mmqdiff.lightning.run_log``).
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from .io import shipped_path
from .lightning.checkpoint_io import unreadable_checkpoint
from .lightning import OpenRunLog, RunLog, run_log
from .quant.allocator import keep_freed_memory


class SaveConfigAtStart(SaveConfigCallback):
    """Writes ``config.yaml`` when the run starts, after every setup hook: once the run holds its folder's lock and
    passed its checks, so a refused run never replaces the config of the run that owns the folder."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Deferred to the start hooks below."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, "fit")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, "predict")


# what every config's model/data sections mean to the parser: shared with the pipeline's parse-only copy
PARSER_OPTIONS: dict[str, Any] = dict(subclass_mode_model=True, subclass_mode_data=True, auto_configure_optimizers=False)


class MMQDiffCLI(LightningCLI):
    """LightningCLI whose trainer opens ``run_log`` in the run folder when the run starts."""

    def __init__(self, run_log: RunLog, **kwargs: Any):
        self.run_log = run_log
        super().__init__(**kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(OpenRunLog(self.run_log))
        return trainer

    def _parse_ckpt_path(self) -> None:
        """LightningCLI loads an explicit ``--ckpt_path`` file for its hyperparameters before any trainer exists: a
        damaged one gets the message the run's own checkpoint reader gives, not torch's raw text."""
        try:
            super()._parse_ckpt_path()
        except Exception as e:
            if _raised_by_jsonargparse(e):
                raise
            raise unreadable_checkpoint(self.config[self.config.subcommand].get("ckpt_path"), e) from e


def _raised_by_jsonargparse(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "jsonargparse" in Path(tb.tb_frame.f_code.co_filename).parts


def project_error(error: BaseException) -> BaseException:
    """The exception jsonargparse wrapped while building a class (its "Does not validate against any of the Union
    subtypes" message dumps the whole Namespace): follow ``__cause__`` past every error raised by jsonargparse."""
    while _raised_by_jsonargparse(error) and error.__cause__ is not None:
        error = error.__cause__
    return error


def shipped_configs(args: list[str]) -> list[str]:
    """``args`` with each ``--config`` path (``--config X`` or ``--config=X``) resolved by ``shipped_path``."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = f"--config={shipped_path(arg[len('--config='):])}"
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = str(shipped_path(out[i + 1]))
    return out


def main(args: list[str] | None = None) -> LightningCLI:
    """LightningCLI's fit / predict / validate / test. Errors raised while the CLI builds the model or data (a missing
    checkpoint, a bad setting) surface as themselves, so the project's message is the last line printed, once. Every
    process (each rank re-runs this) keeps freed memory for reuse (``mmqdiff.quant.allocator``)."""
    keep_freed_memory()
    if args is None:  # resolved in place: LightningCLI reads sys.argv itself, and DDP ranks re-run it
        sys.argv[1:] = shipped_configs(sys.argv[1:])
    else:
        args = shipped_configs(args)
    with run_log() as log:
        try:
            return MMQDiffCLI(log, **PARSER_OPTIONS, args=args, save_config_callback=SaveConfigAtStart,
                              save_config_kwargs={"overwrite": True})
        except Exception as e:
            cause = project_error(e)
            if cause is e:
                raise
            cause.__suppress_context__ = True  # hides the wrapper (and its Namespace dump); the cause's own cause stays
            raise cause


def run() -> None:
    """The ``mmqdiff`` command: ``pipeline ARGS`` is ``python -m mmqdiff.pipeline ARGS`` (its own argument parsing
    and exit status), anything else goes to ``main``."""
    if sys.argv[1:2] == ["pipeline"]:
        sys.argv[:] = ["mmqdiff pipeline", *shipped_configs(sys.argv[2:])]
        runpy.run_module("mmqdiff.pipeline", run_name="__main__")
    else:
        main()


if __name__ == "__main__":
    run()
