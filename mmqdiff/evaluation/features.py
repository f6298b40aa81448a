"""Feature extractors for FID/KID/IS: one interface, ``FeatureExtractor`` (uint8 images -> (features, logits)).

- ``ClassifierExtractor``: the embedded default's ``SmallClassifier``, a small classifier trained on the synthetic
  images (Inception weights cannot be fetched at run time): its penultimate activations stand in for Inception's
  pool3 features and its logits for Inception's class logits. Global average pooling makes it resolution-agnostic.
  The shipped file is ``{"config": {...}, "state_dict": {...}}``, loaded with ``weights_only=True``.
- ``InceptionExtractor``: torch-fidelity's Inception-v3 from a local weights file (CIFAR-10). It is torch-fidelity's own
  module, not torchmetrics' built-in one: torchmetrics 1.9 resizes to 299x299 with antialiased ``F.interpolate`` by
  default, torch-fidelity (what Q-Diffusion reports) with TF1-style bilinear resizing; on random 32x32 images the two
  inputs differ by 36/255 per pixel on average, so only torch-fidelity's path is comparable with published FIDs.
"""
from __future__ import annotations

import hashlib
import weakref
from pathlib import Path

import torch
from torch import Tensor, nn

from ..io import atomic_save, shipped_path

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
CONFIG_KEYS = ("num_classes", "in_channels", "width", "feature_dim")


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    # GroupNorm, not BatchNorm: features must not depend on batch composition or train/eval mode
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class SmallClassifier(nn.Module):
    """Six 3x3 conv layers (two stride-2), global average pool -> ``feature_dim`` features -> linear logits."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = dict(num_classes=num_classes, in_channels=in_channels, width=width, feature_dim=feature_dim)
        w = width
        self.body = nn.Sequential(_conv(in_channels, w), _conv(w, w), _conv(w, 2 * w, 2), _conv(2 * w, 2 * w),
                                  _conv(2 * w, feature_dim, 2), _conv(feature_dim, feature_dim))
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, feature_dim] of float images in [-1, 1]."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def save_feature_extractor(model: SmallClassifier, path: str | Path) -> Path:
    """Write ``{"config", "state_dict"}`` (fp32, CPU) to a temporary file, then rename it into place."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_save({"config": dict(model.config), "state_dict": state}, path)


def load_feature_extractor(path: str | Path, map_location: str | torch.device = "cpu") -> SmallClassifier:
    """Build and strictly load a ``SmallClassifier`` in eval mode; every failure names the file and the problem. A
    relative ``checkpoints/<name>`` missing from the working directory is the file shipped with the package
    (``mmqdiff.io.shipped_path``)."""
    path = shipped_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature extractor file not found: {path} (train one with "
                                f"`python cli.py fit --config configs/embedded/train_classifier.yaml`)")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupted or not a torch file
        raise ValueError(f"{path}: cannot be read as a torch file ({type(e).__name__}: {e})") from e
    if not isinstance(blob, dict) or not {"config", "state_dict"} <= set(blob):
        found = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"{path}: not a feature extractor file; expected keys 'config' and 'state_dict', "
                         f"found {found}")
    config = blob["config"]
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"{path}: config lacks {missing}")
    model = SmallClassifier(**{k: int(config[k]) for k in CONFIG_KEYS})
    try:
        model.load_state_dict(blob["state_dict"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: state_dict does not match config {config}: {e}") from e
    return model.eval()


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
    """The shipped ``SmallClassifier`` (or the one at ``path``, resolved as in ``load_feature_extractor``) as a metric
    feature extractor."""
    return ClassifierExtractor(load_feature_extractor(path))
