"""Sample-quality metrics (FID, IS, KID via torchmetrics) and fidelity to the FP model (PSNR, per-step MSE).

Two feature sources share one interface, ``FeatureExtractor`` (uint8 images -> (features, logits)):
- ``ClassifierExtractor``: the embedded default's ``SmallClassifier`` (no Inception weights can be downloaded here);
- ``InceptionExtractor``: torch-fidelity's Inception-v3 from a local weights file (CIFAR-10). It is torch-fidelity's own
  module, not torchmetrics' built-in one: torchmetrics 1.9 resizes to 299x299 with antialiased ``F.interpolate`` by
  default, torch-fidelity (what Q-Diffusion reports) with TF1-style bilinear resizing; on random 32x32 images the two
  inputs differ by 36/255 per pixel on average, so only torch-fidelity's path is comparable with published FIDs.
Metrics are always fed uint8 images (``normalize=False``), the format both extractors and the PNGs on disk share.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import track
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from .features import SmallClassifier, load_feature_extractor
from .io import read_png_images

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [-1, 1] -> uint8 with ``torchvision.utils.save_image``'s rounding, so scores of in-memory
    samples equal scores of the PNGs written from them."""
    return ((images.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)


class FeatureExtractor(nn.Module):
    """uint8 images [N, 3, H, W] -> (features [N, num_features], logits [N, C]), always in eval mode.

    FID, KID and IS each call their ``feature`` module on the same batch; the last result is remembered (keyed by the
    tensor's identity and version) so each batch goes through the network once instead of three times.
    """

    num_features: int

    def __init__(self) -> None:
        super().__init__()
        self._memo: tuple | None = None

    def extract(self, images: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise TypeError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        # inference tensors (e.g. made under Lightning's predict loop) have no version counter; they also cannot be
        # changed in place outside inference mode, so identity alone keys them
        version = None if images.is_inference() else images._version
        memo = self._memo
        if memo is not None and memo[0]() is images and memo[1] == version:
            return memo[2]
        with torch.no_grad():
            out = self.extract(images)
        self._memo = (weakref.ref(images), version, out)
        return out

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    def fingerprint(self) -> str:
        """sha256 of the weights: keys cached reference statistics to the exact network that produced them."""
        h = hashlib.sha256(type(self).__name__.encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def __getstate__(self) -> dict:  # weakrefs cannot be copied; the memo is only a cache
        return {**self.__dict__, "_memo": None}


class ClassifierExtractor(FeatureExtractor):
    """The embedded default: ``SmallClassifier`` penultimate features and logits."""

    def __init__(self, model: SmallClassifier):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.num_features = model.config["feature_dim"]

    def extract(self, images: Tensor) -> tuple[Tensor, Tensor]:
        f = self.model.features(images.float() / 127.5 - 1)
        return f, self.model.head(f)


class InceptionExtractor(FeatureExtractor):
    """torch-fidelity's Inception-v3 (pool3 2048-d features, 1008 unbiased logits as torch-fidelity's ISC uses).

    ``weights_path`` is the file itself or a folder holding it; nothing is ever downloaded.
    """

    def __init__(self, weights_path: str | Path | None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = Path(weights_path) if weights_path else None
        if path is not None and path.is_dir():
            path = path / INCEPTION_WEIGHTS_NAME
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"Inception weights not found: expected the file {INCEPTION_WEIGHTS_NAME} "
                f"(given: {weights_path}). Nothing is downloaded; place torch-fidelity's weights file there.")
        # torch-fidelity loads with weights_only=False; a stream the restricted unpickler accepts only builds
        # allow-listed objects, so checking it first keeps untrusted pickles from running code.
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a plain Inception state_dict ({type(e).__name__}: {e})") from e
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(path))
        self.num_features = 2048

    def extract(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features, logits = self.net(images)
        return features, logits


def embedded_extractor(path: str | Path = "checkpoints/embedded_features.pt") -> ClassifierExtractor:
    """The shipped ``SmallClassifier`` as a metric feature extractor."""
    return ClassifierExtractor(load_feature_extractor(path))


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


# ---------------------------------------------------------------------------------------------------- reference images

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
        from .data.synthetic import make_synthetic_images

        return to_uint8(make_synthetic_images(n, image_size, seed)[0])
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference images not found: {folder} (expected 'synthetic', a "
                                f"cifar-10-batches-py folder or a folder of PNG images)")
    if (folder / "data_batch_1").is_file():
        return _cifar10_train(folder, n)
    return _png_folder(folder, n)


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


# ------------------------------------------------------------------------------------------------ fidelity to FP

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


class StepErrorMeter(Metric):
    """Mean squared error between quantized and FP noise predictions, per sampling step index.

    Sums and element counts are metric states reduced by sum, so DDP ranks combine exactly. Steps never updated
    give NaN.
    """

    full_state_update = False

    def __init__(self, num_steps: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("sq_sum", torch.zeros(num_steps, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_steps, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, step_index: int, eps_q: Tensor, eps_fp: Tensor) -> None:
        self.sq_sum[step_index] += (eps_q.double() - eps_fp.double()).square().sum()
        self.count[step_index] += eps_q.numel()

    def compute(self) -> list[float]:
        return (self.sq_sum / self.count).tolist()


# ------------------------------------------------------------------------------------------ float64 reference FID

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
