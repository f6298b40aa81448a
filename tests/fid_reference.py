"""A float64 FID without scipy: the reference the torchmetrics FID is tested against."""
from __future__ import annotations

import numpy as np
from torch import Tensor


def gaussian_stats(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (N - 1, as torchmetrics) of features [N, D], in float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) in float64, without scipy.

    tr (S1 S2)^1/2 is the sum of square roots of the eigenvalues of sqrt(S1) S2 sqrt(S1), a symmetric PSD matrix
    similar to S1 S2, so symmetric eigensolvers suffice (tiny negative round-off is clipped to 0).
    """
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    covmean_trace = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * covmean_trace)
