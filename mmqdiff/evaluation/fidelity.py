"""Fidelity to the FP model from identical noise: per-image PSNR of final images, per-step noise-prediction error."""
from __future__ import annotations

import torch
from torch import Tensor


def _unit_float(images: Tensor) -> Tensor:
    return images.double() / 255 if images.dtype == torch.uint8 else images.double()


def psnr(images_a: Tensor, images_b: Tensor) -> float:
    """Mean over images of per-image PSNR in dB (peak 1; uint8 is divided by 255, floats are taken as [0, 1]).

    Per-image then mean, as paired FP-vs-quantized comparisons are usually reported; a pair of identical images
    has infinite PSNR, and so then does the mean.
    """
    return float(psnr_per_image(images_a, images_b).mean())


def psnr_per_image(images_a: Tensor, images_b: Tensor) -> Tensor:
    """Per-image PSNR in dB (float64), the terms :func:`psnr` averages."""
    if images_a.shape != images_b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(images_a.shape)} and {tuple(images_b.shape)}")
    mse = (_unit_float(images_a) - _unit_float(images_b)).square().flatten(1).mean(dim=1)
    return -10 * torch.log10(mse)


def paired_psnr(images: Tensor, indices: Tensor, ref_images: Tensor, ref_indices: Tensor, folder: str,
                ref_folder: str) -> Tensor:
    """Per-image PSNR of every image against the reference image of the same index (the FP model's image from the
    same noise), in ``indices`` order. Every image must have its reference: a PSNR over a silent subset would not
    be the folder's."""
    position = {j: row for row, j in enumerate(ref_indices.tolist())}
    missing = [j for j in indices.tolist() if j not in position]
    if missing:
        raise ValueError(f"{ref_folder} holds {len(ref_indices)} images but {folder} holds {len(indices)}: no FP "
                         f"image for {len(missing)} of them (indices {missing[:5]}{' ...' if len(missing) > 5 else ''}); sample the FP folder with "
                         f"at least as many images (num_images={int(indices.max()) + 1})")
    return psnr_per_image(images, ref_images[torch.tensor([position[j] for j in indices.tolist()], dtype=torch.long)])


def squared_error(eps: Tensor, eps_fp: Tensor) -> Tensor:
    """Elementwise squared difference of a noise prediction from the FP model's on the same (x_t, t), in float64:
    the one definition behind the per-step error on sampled trajectories (per image) and on held-out ones."""
    return (eps.double() - eps_fp.double()).square()
