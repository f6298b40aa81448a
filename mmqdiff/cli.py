"""mmqdiff command line: ``python cli.py fit|predict --config configs/...yaml``.

Each config names its LightningModule / LightningDataModule by ``class_path``; LightningCLI writes the
resolved config next to the run's outputs.
"""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback


class SaveConfigAtStart(SaveConfigCallback):
    """Writes ``config.yaml`` when the run starts, after every setup hook: once the run holds its folder's lock and
    passed its checks, so a refused run never replaces the config of the run that owns the folder."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Deferred to the start hooks below."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, "fit")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, "predict")


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

import mmqdiff.lightning  # noqa: F401  (keeps Lightning's promotional tips out of the output)
from mmqdiff.quant.allocator import keep_freed_memory


def main(args: list[str] | None = None) -> LightningCLI:
    """Errors raised while the CLI builds the model or data (a missing checkpoint, a bad setting) surface as
    themselves, so the project's message is the last line printed, once. Every process (each rank re-runs this)
    keeps freed memory for reuse (``mmqdiff.quant.allocator``)."""
    keep_freed_memory()
    try:
        return LightningCLI(subclass_mode_model=True, subclass_mode_data=True, args=args,
                            save_config_callback=SaveConfigAtStart, save_config_kwargs={"overwrite": True},
                            auto_configure_optimizers=False)
    except Exception as e:
        cause = project_error(e)
        if cause is e:
            raise
        cause.__suppress_context__ = True  # hides the wrapper (and its Namespace dump); the cause's own cause stays
        raise cause


if __name__ == "__main__":
    main()
