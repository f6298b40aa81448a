"""The embedded default's data: seeded procedural 16x16 RGB images with class labels.

No real data set can be downloaded here, so the project draws its own: eight shape classes with random
colours, sizes, positions and flat or gradient backgrounds. Rendering is supersampled (anti-aliased edges)
so a small diffusion model has fine structure to learn and quantization error has something to destroy.
Image j depends only on (seed, j): any prefix of a larger set is the smaller set.
"""
from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

CLASS_NAMES = ("disk", "square", "triangle", "ring", "plus", "diamond", "striped square", "two disks")
NUM_CLASSES = len(CLASS_NAMES)
_NUM_PARAMS = 17  # uniform draws per image; fixed so the stream is prefix-stable
_SUPERSAMPLE = 4


def _masks(p: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Binary masks [n, 8, S, S] for every class, from per-image parameters p [n, P]."""
    cx = (p[:, 0] * 0.8 - 0.4)[:, None, None]
    cy = (p[:, 1] * 0.8 - 0.4)[:, None, None]
    r = (0.3 + 0.35 * p[:, 2])[:, None, None]
    angle = (p[:, 3] * math.pi / 2)[:, None, None]
    dx, dy = gx - cx, gy - cy
    rx = dx * torch.cos(angle) + dy * torch.sin(angle)  # rotated frame for square-like shapes
    ry = -dx * torch.sin(angle) + dy * torch.cos(angle)
    dist = torch.sqrt(dx ** 2 + dy ** 2)
    square = (rx.abs() < r * 0.85) & (ry.abs() < r * 0.85)
    # upward triangle: inside three half-planes
    tri = (dy < r * 0.6) & (dy > dx.abs() * 1.8 - r * 1.4)
    ring = (dist < r) & (dist > r * 0.55)
    arm = r * 0.3
    plus = ((rx.abs() < arm) & (ry.abs() < r)) | ((ry.abs() < arm) & (rx.abs() < r))
    diamond = (dx.abs() + dy.abs()) < r
    period = (0.18 + 0.12 * p[:, 4])[:, None, None]
    stripes = square & (torch.remainder(rx, period) < period / 2)
    ox = (p[:, 5] * 0.5 + 0.25)[:, None, None] * r
    small = r * 0.5
    two = (((dx - ox) ** 2 + dy ** 2) < small ** 2) | (((dx + ox) ** 2 + (dy - ox) ** 2) < small ** 2)
    return torch.stack([dist < r, square, tri, ring, plus, diamond, stripes, two], dim=1).float()


def _render(p: torch.Tensor, labels: torch.Tensor, image_size: int) -> torch.Tensor:
    s = image_size * _SUPERSAMPLE
    axis = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    mask = _masks(p, gx[None], gy[None]).gather(1, labels[:, None, None, None].expand(-1, 1, s, s))
    fg = p[:, 6:9, None, None]
    bg_a, bg_b = p[:, 9:12, None, None] * 0.7, p[:, 12:15, None, None] * 0.7
    # half the backgrounds are flat, half a linear gradient along a random direction
    direction = p[:, 15, None, None] * 2 * math.pi
    ramp = ((gx[None] * torch.cos(direction) + gy[None] * torch.sin(direction)) / math.sqrt(2) + 1) / 2
    ramp = (ramp * (p[:, 15] >= 0.5).float()[:, None, None])[:, None]
    bg = bg_a * (1 - ramp) + bg_b * ramp
    # keep the shape visible: push the foreground away from the background's mean colour
    fg = torch.where((fg - bg.mean(dim=(2, 3), keepdim=True)).abs().sum(1, keepdim=True) < 0.6, 1 - fg, fg)
    img = bg * (1 - mask) + fg * mask
    return torch.nn.functional.avg_pool2d(img, _SUPERSAMPLE) * 2 - 1


def make_synthetic_images(n: int, image_size: int = 16, seed: int = 0, chunk: int = 2048
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 in [-1, 1] [n, 3, H, W], labels long [n]), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    params = torch.rand(n, _NUM_PARAMS, generator=g)
    labels = (params[:, 16] * NUM_CLASSES).long().clamp_max(NUM_CLASSES - 1)
    images = torch.cat([_render(params[i:i + chunk], labels[i:i + chunk], image_size)
                        for i in range(0, n, chunk)]) if n else torch.zeros(0, 3, image_size, image_size)
    return images, labels


class SyntheticDataModule(L.LightningDataModule):
    """Train/val splits of the synthetic set; val images come from a different seed stream."""

    def __init__(self, num_train: int = 50000, num_val: int = 1000, image_size: int = 16, batch_size: int = 128,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if not hasattr(self, "train_set"):
            self.train_set = TensorDataset(*make_synthetic_images(h.num_train, h.image_size, h.seed))
            self.val_set = TensorDataset(*make_synthetic_images(h.num_val, h.image_size, h.seed + 1_000_003))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers, generator=torch.Generator().manual_seed(self.hparams.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
