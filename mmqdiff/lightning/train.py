"""FP training of the embedded UNet: DDPM epsilon loss with an EMA copy, exported as a plain state_dict."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from ..diffusion import alpha_bar, build_model, linear_betas
from ..io import atomic_save


class DiffusionTraining(L.LightningModule):
    """Trains ``Model`` from a YAML config; ``ema_model`` is what gets exported and sampled."""

    def __init__(self, model_config: str = "configs/embedded.yaml", lr: float = 5e-4, warmup_steps: int = 500,
                 ema_decay: float = 0.999, export_path: str | None = "checkpoints/embedded_unet.pt"):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(model_config)
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False)
        self.register_buffer("alphas_cumprod", alpha_bar(linear_betas(), torch.arange(1000)), persistent=False)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x0 = batch[0]
        t = torch.randint(0, self.alphas_cumprod.numel(), (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(self.model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t.float()), noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        decay = min(self.hparams.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        with torch.no_grad():
            for e, p in zip(self.ema_model.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr)
        warmup = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            export_state_dict(self.ema_model, self.hparams.export_path)


def export_state_dict(model: torch.nn.Module, path: str | Path) -> str:
    """Write a plain fp32 CPU state_dict (the official checkpoint's format) and its ``.sha256`` beside it."""
    path = atomic_save({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest
