"""Reference ("real") images for FID: the synthetic set, CIFAR-10's python batches or a folder of PNGs, as uint8."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..io import read_png_images


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [-1, 1] -> uint8 with ``torchvision.utils.save_image``'s rounding, so scores of in-memory
    samples equal scores of the PNGs written from them."""
    return ((images.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles; allow only what a dict of numpy arrays needs, so a tampered file
    cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar10_train(folder: Path, n: int) -> Tensor:
    """The first ``n`` CIFAR-10 training images in the official order (data_batch_1..5)."""
    chunks, have = [], 0
    for i in range(1, 6):
        if have >= n:
            break
        path = folder / f"data_batch_{i}"
        if not path.is_file():
            break
        try:
            with open(path, "rb") as f:
                data = _ArrayUnpickler(f, encoding="bytes").load()[b"data"]
        except Exception as e:
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
        chunks.append(torch.from_numpy(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)))
        have += chunks[-1].shape[0]
    images = torch.cat(chunks)[:n]
    if images.shape[0] < n:
        raise ValueError(f"{folder}: only {images.shape[0]} training images, {n} requested")
    return images


def _png_folder(folder: Path, n: int) -> Tensor:
    files = sorted(folder.glob("*.png"))
    if len(files) < n:
        raise ValueError(f"{folder}: only {len(files)} PNG images, {n} requested")
    return read_png_images(files[:n])


def load_real_images(source: str | Path, n: int, image_size: int = 16, seed: int = 0) -> Tensor:
    """uint8 reference images [n, 3, H, W] from ``source``:
    ``"synthetic"`` (the embedded data set at ``image_size``, stream ``seed``: seed 0 is the training set),
    a CIFAR-10 python folder (``cifar-10-batches-py``; training split, official order), or a folder of PNGs
    (sorted by name)."""
    if str(source) == "synthetic":
        from ..data.synthetic import make_synthetic_images

        return to_uint8(make_synthetic_images(n, image_size, seed)[0])
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference images not found: {folder} (expected 'synthetic', a "
                                f"cifar-10-batches-py folder or a folder of PNG images)")
    if (folder / "data_batch_1").is_file():
        return _cifar10_train(folder, n)
    return _png_folder(folder, n)
