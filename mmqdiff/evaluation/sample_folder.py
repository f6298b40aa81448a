"""A sampling output folder: which settings made its images (``sampling.json``), and which images are still to make.

Images are resumed by index, so a folder must only ever hold images of one setting: the record is written when
sampling starts and a later run with other settings is refused (naming the keys) instead of mixing or relabelling
images. Existing PNGs count as done only if they decode to the expected size; PNGs whose name is not an index
(``._000001.png`` from macOS, a copied ``grid.png``) are not the folder's images and are left alone with a warning.
Freshly sampled images are checked before they are written (:func:`sample_problem`): a diverged or collapsed model
stops the run instead of filling the folder with black or identical images.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from ..diffusion.sampler import STATE_BOUND
from ..io import atomic_write_text, png_problem

log = logging.getLogger(__name__)

RECORD_NAME = "sampling.json"
FORMAT = "mmqdiff.sampling/1"
DERIVED = ("samples.npz", "metrics.json", "grid.png", "per_step_mse.json")  # made from the images
INDEX_NAME = re.compile(r"[0-9]{6,}\.png")  # png_path's names
# num_images above this is taken for a typo (50,000 is the usual FID count); SampleIndices' max_images raises it
MAX_IMAGES = 1_000_000
# the keys of a sampling record that fix each image's noise and schedule: what an FP reference for PSNR must share
NOISE_KEYS = ("fp_model", "seed", "num_steps", "skip_type", "eta", "image_shape")


class SettingsChangedError(ValueError):
    """The folder's images were made with other settings."""


def png_path(image_dir: Path, index: int) -> Path:
    return image_dir / f"{index:06d}.png"


def indexed_pngs(image_dir: str | Path) -> dict[int, Path]:
    """The folder's images by index, in index order; any other ``*.png`` there is reported and ignored."""
    found = {}
    for path in Path(image_dir).glob("*.png"):
        if INDEX_NAME.fullmatch(path.name):
            found[int(path.stem)] = path
        else:
            log.warning("%s: ignored: not an image of this folder (its images are named by index, e.g. 000001.png)",
                        path)
    return dict(sorted(found.items()))


def clear_samples(output_dir: Path) -> int:
    """Delete the folder's images, per-step errors, what was made from them and the record; the number of images."""
    images = list(indexed_pngs(output_dir / "images").values())
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
    if not indexed_pngs(output_dir / "images"):
        clear_samples(output_dir)  # leftovers of no image (a record, per-step errors) say nothing about this run
        atomic_write_text(path, json.dumps({"format": FORMAT, **record}, indent=1) + "\n")
        return
    if not path.is_file():
        raise SettingsChangedError(f"{output_dir} holds images but no {RECORD_NAME} saying how they were made; sample "
                                   "into a new folder or delete them first (--data.init_args.overwrite true)")
    previous = _with_runtime(_read_identity(path), path)
    now = record["identity"]
    changed = [k for k in sorted(set(previous) | set(now)) if previous.get(k) != now.get(k)]
    if changed:
        details = "; ".join(f"{k}: folder {_short(previous.get(k))}, now {_short(now.get(k))}" for k in changed)
        raise SettingsChangedError(
            f"{output_dir} holds images sampled with other settings: {changed} differ ({details}). Sample into "
            "a new folder (--data.init_args.output_dir) or delete its images first (--data.init_args.overwrite "
            "true)")


def _read_identity(path: Path) -> dict[str, Any]:
    try:
        identity = json.loads(path.read_text())["identity"]
        if not isinstance(identity, dict):
            raise TypeError(f"'identity' is a {type(identity).__name__}, not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise SettingsChangedError(f"{path}: unreadable sampling record ({type(e).__name__}: {e}); sample into a "
                                   "new folder or delete its images first (--data.init_args.overwrite true)") from e
    return identity


def _with_runtime(identity: dict[str, Any], path: Path) -> dict[str, Any]:
    """A record from before the runtime was part of the identity: an FP folder's runtime is "fp" (unambiguous); a
    quantized folder's images may be int8 or fake-quant ones, which must not be mixed, so it is refused."""
    if "runtime" in identity:
        return identity
    if identity.get("calibration_run") is None:
        return {**identity, "runtime": "fp"}
    raise SettingsChangedError(f"{path} was written before sampling records named the runtime, so its images may be "
                               "int8 or fake-quant ones and resuming could mix both; sample into a new folder "
                               "(--data.init_args.output_dir) or delete its images first (--data.init_args.overwrite "
                               "true)")


def check_fp_reference(fp_dir: str | Path, record: dict[str, Any]) -> None:
    """PSNR against FP pairs images by index, so the FP folder must hold the FP model's images from the same noise
    and schedule as ``record`` (:data:`NOISE_KEYS`): refuse a recorded difference or a quantized folder (a folder
    without a record, made before records existed, is used with a warning)."""
    path = Path(fp_dir) / RECORD_NAME
    if not path.is_file():
        log.warning("%s: no %s; cannot check that its images come from the same noise and schedule", fp_dir,
                    RECORD_NAME)
        return
    keys = ("calibration_run", *NOISE_KEYS)
    identity = _read_identity(path)
    theirs = {k: identity.get(k) for k in keys}
    mine = {**{k: record["identity"].get(k) for k in keys}, "calibration_run": None}
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


def sample_problem(x: torch.Tensor, images: torch.Tensor, indices: Sequence[int]) -> str | None:
    """Why a batch of final samples cannot come from a working model, or None: ``x`` the float images (model scale,
    [-1, 1]) and ``images`` their uint8 form, for the image ``indices``. Non-finite values, |x| beyond
    :data:`~mmqdiff.diffusion.sampler.STATE_BOUND`, mostly one-colour or identical images
    (:func:`images_problem`): what an overflowing weight or a collapsed quantized model gives (as black or grey
    PNGs, otherwise)."""
    flat = x.detach().flatten(1)
    finite = torch.isfinite(flat).all(dim=1)
    if not bool(finite.all()):
        return f"image {indices[int((~finite).nonzero()[0])]} holds non-finite values (NaN/inf)"
    peak = flat.abs().amax(dim=1)
    if bool((peak > STATE_BOUND).any()):
        j = int((peak > STATE_BOUND).nonzero()[0])
        return (f"image {indices[j]} reaches |x| = {float(peak[j]):.3g}, where images lie in [-1, 1] (bound "
                f"{STATE_BOUND:g})")
    return images_problem(images, indices)


def images_problem(images: torch.Tensor, indices: Sequence[int]) -> str | None:
    """Why uint8 images [N, C, H, W] look collapsed, or None: most of them (more than half, N >= 2) one colour each,
    or all identical. A few one-colour images are a weak model's samples, which FID scores; a majority is a broken
    run (eta 2 gives every image black)."""
    flat = images.flatten(1)
    flat_image = (flat == flat[:, :1]).all(dim=1)
    if len(flat) > 1 and 2 * int(flat_image.sum()) > len(flat):
        j = int(flat_image.nonzero()[0])
        return (f"{int(flat_image.sum())} of {len(flat)} images are a single colour (first: image {indices[j]}, every "
                f"value {int(flat[j, 0])})")
    if len(flat) > 1 and bool((flat == flat[:1]).all()):
        return f"all {len(flat)} images ({indices[0]}..{indices[-1]}) are identical"
    return None


def check_disk_space(output_dir: str | Path, missing: int, num_images: int, image_shape: Sequence[int]) -> None:
    """Refuse a run whose images cannot fit: ``missing`` PNGs still to write plus ``samples.npz`` of all
    ``num_images`` need about their raw uint8 size each (sampled images barely compress)."""
    raw = 1
    for n in image_shape:
        raw *= int(n)
    need = (missing + num_images) * raw
    folder = Path(output_dir)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OSError(f"{output_dir}: num_images={num_images:,} ({missing:,} still to sample) need about "
                      f"{need / 2**30:.1f} GiB for the PNGs and samples.npz, but {free / 2**30:.1f} GiB are free; "
                      "lower data.init_args.num_images or free space")


def check_num_images(num_images: int, max_images: int) -> None:
    """Refuse a ``num_images`` above ``max_images`` before anything is listed or allocated (a typo such as 1e9
    would otherwise stall, growing in memory)."""
    if num_images > max_images:
        raise ValueError(f"num_images={num_images:,} is above max_images={max_images:,} (every image is kept in "
                         "memory when the folder is gathered); if you mean it, raise data.init_args.max_images")
