"""Sample-quality metrics: FID, IS and KID via torchmetrics over a ``FeatureExtractor``, with the reference side
cached and a spread over disjoint chunks. Metrics are always fed uint8 images (``normalize=False``), the format both
extractors and the PNGs on disk share.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import track
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from .features import FeatureExtractor
from .real_images import load_real_images, to_uint8


class _Output(nn.Module):
    """What torchmetrics calls as ``feature=``: one output of a shared extractor (0: features, 1: logits).
    ``num_features`` spares FID its dummy forward."""

    def __init__(self, extractor: FeatureExtractor, index: int):
        super().__init__()
        self.extractor, self.index = extractor, index
        self.num_features = extractor.num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.extractor(images)[self.index]


@dataclass
class ImageMetrics:
    """FID, KID and IS over one extractor; reference ("real") state survives ``reset`` so it is computed once."""

    fid: FrechetInceptionDistance
    kid: KernelInceptionDistance
    inception_score: InceptionScore
    kid_subset_size: int

    def to(self, device: str | torch.device) -> ImageMetrics:
        """Moves the metric states and the shared extractor."""
        for m in (self.fid, self.kid, self.inception_score):
            m.to(device)
        return self

    def update(self, images: Tensor, real: bool) -> None:
        self.fid.update(images, real=real)
        self.kid.update(images, real=real)
        if not real:
            self.inception_score.update(images)

    def real_state(self) -> dict[str, Tensor]:
        """The accumulated reference side: FID's sums and KID's feature list (KID resamples subsets from it)."""
        return {"fid_sum": self.fid.real_features_sum.cpu(), "fid_cov_sum": self.fid.real_features_cov_sum.cpu(),
                "fid_n": self.fid.real_features_num_samples.cpu(),
                "kid_features": torch.cat(self.kid.real_features).cpu()}

    def load_real_state(self, state: dict[str, Tensor]) -> None:
        device = self.fid.real_features_sum.device
        self.fid.real_features_sum = state["fid_sum"].to(device)
        self.fid.real_features_cov_sum = state["fid_cov_sum"].to(device)
        self.fid.real_features_num_samples = state["fid_n"].to(device)
        self.kid.real_features = [state["kid_features"].to(device)]

    def compute(self, seed: int = 0) -> dict[str, float]:
        """FID, IS and KID; KID's subset size is clamped to the smaller sample count (with a warning), and the
        subset / split shuffles use ``seed`` so repeated scoring gives identical numbers."""
        n_real = int(self.fid.real_features_num_samples)
        n_fake = int(self.fid.fake_features_num_samples)
        subset = min(self.kid_subset_size, n_real, n_fake)
        if subset < self.kid_subset_size:
            warnings.warn(f"KID subset_size clamped from {self.kid_subset_size} to {subset} "
                          f"({n_fake} generated, {n_real} reference images)", stacklevel=2)
        self.kid.subset_size = subset
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            is_mean, is_std = self.inception_score.compute()
            kid_mean, kid_std = self.kid.compute()
        return {"fid": float(self.fid.compute()), "is_mean": float(is_mean), "is_std": float(is_std),
                "kid_mean": float(kid_mean), "kid_std": float(kid_std), "kid_subset_size": subset,
                "n_fake": n_fake, "n_real": n_real}


def build_metrics(extractor: FeatureExtractor, kid_subset_size: int = 1000, kid_subsets: int = 100,
                  is_splits: int = 10) -> ImageMetrics:
    """torchmetrics FID / KID / IS wired to ``extractor`` (features for FID and KID, logits for IS). The images are
    all scored in one process (rank 0 of a multi-process sampling run, the others waiting): no cross-process sync."""
    features = _Output(extractor, 0)
    local = dict(sync_on_compute=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        return ImageMetrics(
            fid=FrechetInceptionDistance(feature=features, reset_real_features=False, **local),
            kid=KernelInceptionDistance(feature=features, subsets=kid_subsets, subset_size=kid_subset_size,
                                        reset_real_features=False, **local),
            inception_score=InceptionScore(feature=_Output(extractor, 1), splits=is_splits, **local),
            kid_subset_size=kid_subset_size)


def _source_key(source: str | Path, n: int, image_size: int, seed: int) -> dict:
    if str(source) == "synthetic":
        return {"source": "synthetic", "n": n, "image_size": image_size, "seed": seed}
    folder = Path(source).resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return {"source": str(folder), "n": n, "files": hashlib.sha256(repr(files).encode()).hexdigest()}


def _batches(images: Tensor, batch_size: int, description: str, progress: bool):
    for i in track(range(0, images.shape[0], batch_size), description=description, disable=not progress):
        yield images[i:i + batch_size]


def _fill_reference(metrics: ImageMetrics, extractor: FeatureExtractor, source: str | Path, n: int, image_size: int,
                    seed: int, batch_size: int, device: torch.device, cache_dir: Path | None,
                    progress: bool) -> None:
    """Load the reference side from the cache, or compute it and cache it (atomically)."""
    key = {"extractor": extractor.fingerprint(), **_source_key(source, n, image_size, seed)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = cache_dir / f"real_{digest}.pt" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=True)
            if blob["key"] == key:
                metrics.load_real_state(blob["state"])
                return
            warnings.warn(f"{cache}: key mismatch, recomputing reference statistics", stacklevel=3)
        except Exception as e:
            warnings.warn(f"{cache}: unreadable ({type(e).__name__}: {e}), recomputing", stacklevel=3)
    real = load_real_images(source, n, image_size, seed)
    for batch in _batches(real, batch_size, "reference features", progress):
        metrics.update(batch.to(device), real=True)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
        torch.save({"key": key, "state": metrics.real_state()}, tmp)
        os.replace(tmp, cache)


def score_images(fake: Tensor, real_source: str | Path, extractor: FeatureExtractor, *, n_real: int = 10000,
                 seed: int = 0, batch_size: int = 256, kid_subset_size: int = 1000, kid_subsets: int = 100,
                 is_splits: int = 10, cache_dir: str | Path | None = "outputs/metric_cache",
                 device: str | torch.device = "cpu", progress: bool = True, chunks: int = 1) -> dict[str, Any]:
    """FID, IS and KID of generated uint8 images [N, 3, H, W] against ``n_real`` reference images.

    Returns ``fid, is_mean, is_std, kid_mean, kid_std`` plus ``kid_subset_size, n_fake, n_real``; with
    ``chunks > 1`` also the per-chunk scores and their spread (:func:`chunk_spread`). The reference
    side is cached in ``cache_dir`` keyed by extractor weights, source and count (``None`` disables the cache).
    Synthetic references are rendered at the generated images' resolution.
    """
    if fake.dtype != torch.uint8:
        raise TypeError(f"score_images expects uint8 images (see to_uint8), got {fake.dtype}")
    device = torch.device(device)
    metrics = build_metrics(extractor, kid_subset_size, kid_subsets, is_splits).to(device)
    _fill_reference(metrics, extractor, real_source, n_real, fake.shape[-1], seed, batch_size, device,
                    Path(cache_dir) if cache_dir is not None else None, progress)
    for batch in _batches(fake, batch_size, "generated features", progress):
        metrics.update(batch.to(device), real=False)
    scores = metrics.compute(seed)
    if chunks > 1:
        scores.update(chunk_spread(metrics, fake, chunks, batch_size, device, seed))
    return scores


def chunk_spread(metrics: ImageMetrics, fake: Tensor, chunks: int, batch_size: int, device: torch.device,
                 seed: int) -> dict[str, float | list[float]]:
    """FID, KID and IS of ``chunks`` disjoint, equal, index-ordered parts of ``fake`` (``fid_chunks``, ...) and their
    standard deviations (``fid_std``, ``kid_chunk_std``, ``is_chunk_std``): the spread of a score between
    independent image sets, which a difference between runs must exceed to mean anything. Chunk j of two runs
    sampled from the same noise holds the same noise indices, so chunks also pair runs. A chunk score is a
    ``len/chunks``-image score: biased upwards against the all-image score (FID), but paired chunk comparisons
    and the spread are what a sceptic asks for. Leaves ``metrics`` holding the last chunk."""
    size = fake.shape[0] // chunks
    if size < 2:
        raise ValueError(f"{fake.shape[0]} images cannot be split into {chunks} chunks of at least 2")
    per: dict[str, list[float]] = {"fid": [], "kid": [], "is": []}
    for c in range(chunks):
        for m in (metrics.fid, metrics.kid, metrics.inception_score):
            m.reset()  # the reference side survives (reset_real_features=False)
        for start in range(c * size, (c + 1) * size, batch_size):
            metrics.update(fake[start:min(start + batch_size, (c + 1) * size)].to(device), real=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="KID subset_size clamped")
            out = metrics.compute(seed)
        per["fid"].append(out["fid"])
        per["kid"].append(out["kid_mean"])
        per["is"].append(out["is_mean"])
    std = {k: float(torch.tensor(v, dtype=torch.float64).std()) for k, v in per.items()}
    return {"chunks": chunks, "chunk_size": size, "fid_chunks": per["fid"], "kid_chunks": per["kid"],
            "is_chunks": per["is"], "fid_std": std["fid"], "kid_chunk_std": std["kid"], "is_chunk_std": std["is"]}
