"""What Lightning prints in mmqdiff runs: its info lines, not its promotional tips."""
from __future__ import annotations

import logging

from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

import mmqdiff.lightning  # noqa: F401


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_no_promotional_tips(tmp_path):
    collect = Collect()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(collect)
    try:
        Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False).fit(BoringModel())
    finally:
        logger.removeHandler(collect)
    assert any(m.startswith("GPU available") for m in collect.messages)  # info still gets through
    assert not [m for m in collect.messages if "Tip" in m]
