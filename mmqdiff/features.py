"""The embedded default's feature extractor: a small classifier trained on the synthetic images.

Inception weights cannot be downloaded here, so FID/KID/IS on the embedded default use this network instead: its
penultimate activations stand in for Inception's pool3 features and its logits for Inception's class logits.
Global average pooling makes it resolution-agnostic (trained at 16x16, also runs at 32x32).
The shipped file is ``{"config": {...}, "state_dict": {...}}``, loaded with ``weights_only=True``.
"""
from __future__ import annotations

from .io import atomic_save
from pathlib import Path

import torch
from torch import nn

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
    """Build and strictly load a ``SmallClassifier`` in eval mode; every failure names the file and the problem."""
    path = Path(path)
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
