"""How calibration checkpoints are written and read: atomically, keeping the previous good one, and naming the file
and the way to recover when one cannot be read."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..io import atomic_save, brief_error, keep_previous

PREVIOUS_NAME = "previous.ckpt"  # not "last*": Lightning's --ckpt_path last would consider it
LAST_NAME = "last.ckpt"


def unreadable_checkpoint(path: str | Path, error: BaseException) -> ValueError:
    """The error for a checkpoint that does not load (truncated, overwritten, or a payload that weights-only loading
    refuses): the file, the reason, and the other checkpoint kept beside it to resume from, if any."""
    path = Path(path)
    others = [p for p in (path.with_name(PREVIOUS_NAME), path.with_name(LAST_NAME))
              if p.is_file() and os.path.abspath(p) != os.path.abspath(path)]
    way = (f"the {'previous' if others[0].name == PREVIOUS_NAME else 'last'} checkpoint is kept: resume from it with "
           f"--ckpt_path {others[0]}" if others else
           "no earlier checkpoint is kept, so the run must start over (--model.init_args.overwrite true)")
    return ValueError(f"{path}: cannot be read as a calibration checkpoint ({brief_error(error)}); {way}")


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
        except Exception as e:
            raise unreadable_checkpoint(path, e) from e
        self._readable.add(os.path.abspath(path))
        return checkpoint
