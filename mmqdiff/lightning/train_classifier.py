"""Trains the embedded default's feature extractor (``SmallClassifier``) on the synthetic images.

``python cli.py fit --config configs/embedded/train_classifier.yaml``; at the end of training the classifier is exported
with ``save_feature_extractor`` to ``export_path``, the file ``mmqdiff.evaluation.features`` loads for FID/KID/IS.
"""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from ..data.synthetic import NUM_CLASSES
from ..evaluation.features import SmallClassifier, save_feature_extractor


class ClassifierTraining(L.LightningModule):
    """Cross-entropy with Adam; logs train/val loss and accuracy."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32, feature_dim: int = 128, lr: float = 2e-3,
                 export_path: str | None = "checkpoints/embedded_features.pt"):
        super().__init__()
        self.save_hyperparameters()
        self.model = SmallClassifier(num_classes, width=width, feature_dim=feature_dim)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        self.log_dict({f"{stage}/loss": loss, f"{stage}/acc": acc}, prog_bar=True, sync_dist=stage == "val")
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr)

    def on_train_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            save_feature_extractor(self.model, self.hparams.export_path)
