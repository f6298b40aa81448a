"""mmqdiff command line: ``python cli.py fit|predict --config configs/...yaml``.

Each config names its LightningModule / LightningDataModule by ``class_path``; LightningCLI writes the
resolved config next to the run's outputs.
"""
from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

import mmqdiff.lightning  # noqa: F401  (keeps Lightning's promotional tips out of the output)


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(subclass_mode_model=True, subclass_mode_data=True, args=args,
                        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


if __name__ == "__main__":
    main()
