"""How calibration checkpoints are written and read: atomically, keeping the previous good one, and naming the file
and the way to recover when one cannot be read."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..io import atomic_save, brief_error, keep_previous

PREVIOUS_NAME = "previous.ckpt"  # not "last*": Lightning's --ckpt_path last would consider it


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes beside the target and renames (Lightning's own writer stages in the system temp dir and moves, which is
    a copy, not atomic, when that is another filesystem).

    Before replacing a checkpoint that this process wrote or read back, keeps it as ``previous.ckpt`` beside it, so a
    checkpoint damaged after the run (disk, copy, hand edit) costs one unit, not the run; a checkpoint never read
    here is replaced without being kept, so a damaged one never overwrites the good previous one.
    """

    def __init__(self) -> None:
        super().__init__()
        self._readable: set[str] = set()

    @staticmethod
    def previous(path: Any) -> Path:
        return Path(path).with_name(PREVIOUS_NAME)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if os.path.abspath(path) in self._readable and Path(path).is_file():
            keep_previous(path, self.previous(path))
        atomic_save(checkpoint, path)
        self._readable.add(os.path.abspath(path))

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            checkpoint = super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as e:  # truncated, overwritten, or a payload that weights-only loading refuses
            prev = self.previous(path)
            way = (f"the previous checkpoint is kept: resume from it with --ckpt_path {prev}"
                   if prev.is_file() and os.path.abspath(prev) != os.path.abspath(path) else
                   "no earlier checkpoint is kept, so the run must start over (--model.init_args.overwrite true)")
            raise ValueError(f"{path}: cannot be read as a calibration checkpoint ({brief_error(e)}); {way}") from e
        self._readable.add(os.path.abspath(path))
        return checkpoint
