"""A sampling output folder: which settings made its images (``sampling.json``), and which images are still to make.

Images are resumed by index, so a folder must only ever hold images of one setting: the record is written when
sampling starts and a later run with other settings is refused (naming the keys) instead of mixing or relabelling
images. Existing PNGs count as done only if they decode to the expected size.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..io import atomic_write_text, png_problem

log = logging.getLogger(__name__)

RECORD_NAME = "sampling.json"
FORMAT = "mmqdiff.sampling/1"
DERIVED = ("samples.npz", "metrics.json", "grid.png", "per_step_mse.json")  # made from the images


class SettingsChangedError(ValueError):
    """The folder's images were made with other settings."""


def png_path(image_dir: Path, index: int) -> Path:
    return image_dir / f"{index:06d}.png"


def clear_samples(output_dir: Path) -> int:
    """Delete the folder's images, per-step errors, what was made from them and the record; the number of images."""
    images = sorted((output_dir / "images").glob("*.png"))
    for path in [*images, *(output_dir / "step_mse").glob("*.pt"), *(output_dir / n for n in DERIVED),
                 output_dir / RECORD_NAME]:
        path.unlink(missing_ok=True)
    return len(images)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def claim_folder(output_dir: str | Path, record: dict[str, Any], overwrite: bool = False) -> None:
    """Make ``output_dir`` hold images of ``record`` only: a folder without images (or cleared by ``overwrite``)
    gets the record, a folder whose images were made with the same ``identity`` is resumed, anything else refused."""
    output_dir = Path(output_dir)
    path = output_dir / RECORD_NAME
    if overwrite:
        removed = clear_samples(output_dir)
        if removed:
            log.warning("%s: overwrite: deleted %d images made before", output_dir, removed)
    if not any((output_dir / "images").glob("*.png")):
        clear_samples(output_dir)  # leftovers of no image (a record, per-step errors) say nothing about this run
        atomic_write_text(path, json.dumps({"format": FORMAT, **record}, indent=1) + "\n")
        return
    if not path.is_file():
        raise SettingsChangedError(f"{output_dir} holds images but no {RECORD_NAME} saying how they were made; sample "
                                   "into a new folder or delete them first (--data.init_args.overwrite true)")
    try:
        previous = json.loads(path.read_text())["identity"]
    except (ValueError, KeyError, TypeError) as e:
        raise SettingsChangedError(f"{path}: unreadable sampling record ({type(e).__name__}: {e}); sample into a "
                                   "new folder or delete its images first (--data.init_args.overwrite true)") from e
    now = record["identity"]
    changed = [k for k in sorted(set(previous) | set(now)) if previous.get(k) != now.get(k)]
    if changed:
        details = "; ".join(f"{k}: folder {_short(previous.get(k))}, now {_short(now.get(k))}" for k in changed)
        raise SettingsChangedError(
            f"{output_dir} holds images sampled with other settings: {changed} differ ({details}). Sample into "
            "a new folder (--data.init_args.output_dir) or delete its images first (--data.init_args.overwrite "
            "true)")


def check_fp_reference(fp_dir: str | Path, record: dict[str, Any]) -> None:
    """PSNR against FP pairs images by index, so the FP folder must hold the FP model's images from the same noise
    and schedule as ``record``: refuse a recorded difference (a folder without a record, made before records
    existed, is used with a warning)."""
    path = Path(fp_dir) / RECORD_NAME
    if not path.is_file():
        log.warning("%s: no %s; cannot check that its images come from the same noise and schedule", fp_dir,
                    RECORD_NAME)
        return
    theirs, mine = json.loads(path.read_text())["identity"], {**record["identity"], "calibration_run": None}
    changed = [k for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)]
    if changed:
        details = "; ".join(f"{k}: FP folder {_short(theirs.get(k))}, here {_short(mine.get(k))}" for k in changed)
        raise SettingsChangedError(f"{fp_dir} cannot be the FP reference for PSNR: {changed} differ ({details}); "
                                   "sample FP with this run's checkpoint, seed and schedule")


def images_to_make(image_dir: str | Path, num_images: int, size: tuple[int, int]) -> list[int]:
    """Indices below ``num_images`` without a good PNG (decodable, RGB, ``size`` = (width, height)); damaged files
    (e.g. truncated by a crash outside the atomic write) are reported and deleted, so they are made again."""
    image_dir = Path(image_dir)
    todo = []
    for j in range(num_images):
        path = png_path(image_dir, j)
        if path.exists():
            problem = png_problem(path, size)
            if problem is None:
                continue
            log.warning("%s: %s; sampling it again", path, problem)
            path.unlink()
        todo.append(j)
    return todo
