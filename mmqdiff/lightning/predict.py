"""K-model DDIM sampling as a Lightning predict: ``python cli.py predict --config configs/embedded/sample.yaml``.

Step i runs the model of the segment that holds i (the same step-to-segment map calibration used). Images are
PNG files named by index, so an interrupted run continues where it stopped (the folder's ``sampling.json`` makes sure
it continues with the same settings, see :mod:`mmqdiff.evaluation.sample_folder`); noise for image j depends only on
(seed, j), so FP and quantized runs start from identical noise on any number of devices.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from ..diffusion import (IndexedNoise, betas_from_config, build_model, ddim_sample, file_sha256, load_checkpoint,
                         load_config, state_dict_sha256, timesteps)
from ..segments import SegmentedModel
from ..segments.run_folder import read_manifest, run_identity
from ..io import RunLock, atomic_path, atomic_save, atomic_write_text, read_png_images, write_png
from ..evaluation.sample_folder import check_fp_reference, claim_folder, images_to_make, png_path
from .run_lock import LOCK_NAME, hold_run_lock
from .strategy import decided_by_zero
from ..evaluation.plots import save_sample_grid
from ..evaluation.features import InceptionExtractor, embedded_extractor
from ..evaluation.fidelity import psnr_per_image
from ..evaluation.metrics import score_images
from ..evaluation.real_images import to_uint8
from ..quant.runtime import RUNTIMES, resolve_runtime
from ..quant.segment_runtime import PACK_MODES


class MultiModelSampler(L.LightningModule):
    """Samples with the FP model (``calibration_run=None``) or with the K segment models of a calibration run."""

    def __init__(self, config: str, checkpoint: str, calibration_run: str | None = None, num_steps: int = 100,
                 skip_type: str = "quad", eta: float = 0.0, seed: int = 1234, fp_error_images: int = 64,
                 real_source: str | None = "synthetic", feature_extractor: str | None = None,
                 inception_weights: str | None = None, num_real: int = 5000, kid_subset_size: int = 1000,
                 fp_samples: str | None = None, metric_cache: str = "outputs/metric_cache", score_chunks: int = 1,
                 runtime: str = "auto", pack: str = "active"):
        """``real_source`` ("synthetic", a ``cifar-10-batches-py`` folder or a PNG folder; None skips scoring) is
        scored with ``feature_extractor`` (the embedded classifier) or ``inception_weights`` (a local torch-fidelity
        Inception file); ``fp_samples`` is an FP sampling run's folder for PSNR on identical noise.
        ``fp_error_images``: images with index below it also run the FP model on every x_t of their (quantized)
        trajectory for the per-step noise-prediction error; it costs one FP forward per step for those images.
        ``score_chunks`` > 1 also scores that many disjoint index-ordered chunks (FID/KID/IS/PSNR per chunk and
        their spread; see ``metrics.chunk_spread``).
        ``runtime``: "int" runs the segment models' convs/linears as int8 kernels (``mmqdiff.quant.to_integer``,
        packed when prediction starts), falling back to "fake" with one warning where the backend cannot;
        "fake" simulates quantization in fp32; "auto" is "int" on CPU and "fake" on a GPU, where the int8 runtime
        measured slower than both (``mmqdiff.quant.runtime.resolve_runtime``; one log line says so). FP runs
        ignore it.
        ``pack`` (integer runtime): "active" keeps one shared set of weight codes plus each segment's rounding bits
        and packs the segment in use at each switch (resident bytes below FP's); "all" keeps every segment packed
        (no re-packing; K int8 weight sets resident). See ``mmqdiff.quant.IntegerSegments``."""
        super().__init__()
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if pack not in PACK_MODES:
            raise ValueError(f"pack must be one of {PACK_MODES}, got {pack!r}")
        if real_source is not None and (feature_extractor is None) == (inception_weights is None):
            raise ValueError("scoring needs exactly one of feature_extractor (embedded default) or inception_weights")
        self.save_hyperparameters()
        cfg = load_config(config)
        self.fp_model = load_checkpoint(build_model(cfg), checkpoint).eval().requires_grad_(False)
        self.register_buffer("betas", betas_from_config(cfg), persistent=False)
        self.seq = timesteps(num_steps, skip_type, len(self.betas))
        self.image_shape = (self.fp_model.in_channels, self.fp_model.resolution, self.fp_model.resolution)
        self.fp_sha256, self.calibration_identity = state_dict_sha256(self.fp_model), None
        if calibration_run is None:
            self.segmented = SegmentedModel([range(num_steps)], [self.fp_model], self.seq)
        else:
            manifest = read_manifest(calibration_run)
            self.calibration_identity = run_identity(manifest)
            for key, want in (("num_steps", num_steps), ("skip_type", skip_type)):
                if manifest.get(key) != want:
                    raise ValueError(f"{calibration_run}: calibrated for {key}={manifest.get(key)!r}, "
                                     f"but sampling asks for {want!r}")
            self.segmented = SegmentedModel.load(calibration_run, self.fp_model)
        self.quantized = calibration_run is not None
        self.runtime = runtime if self.quantized else "fp"
        self.sampling_seconds, self.images_sampled = 0.0, 0  # this run's predict steps, FP-error tracking excluded

    def on_predict_start(self) -> None:
        """Put the segment models on their runtime once, on the device Lightning moved them to (the integer
        runtime replaces the fake-quant copies, whose fp32 weights are released)."""
        if not self.quantized:
            return
        if self.runtime == "auto" and resolve_runtime("auto", self.device) == "fake":
            rank_zero_info(f"runtime 'auto' on {self.device.type}: 'fake' (on a GPU the int8 runtime measured "
                           f"slower than fake-quant, docs/benchmarks.md; runtime: int runs it anyway)")
        self.segmented = self.segmented.for_device(self.device, self.runtime, self.hparams.pack)
        self.runtime = self.segmented.runtime

    def sampling_record(self) -> dict[str, Any]:
        """What makes the images (``identity``: a resumed run must match it) and where it came from (``info``). The
        models count by their weights (state-dict and packed-export content hashes), not by file bytes or paths."""
        h = self.hparams
        return {"identity": {"fp_model": self.fp_sha256, "calibration_run": self.calibration_identity,
                             "seed": h.seed, "num_steps": h.num_steps, "skip_type": h.skip_type, "eta": h.eta,
                             "image_shape": list(self.image_shape)},
                "info": {"checkpoint": str(h.checkpoint), "checkpoint_sha256": file_sha256(h.checkpoint),
                         "calibration_run": None if h.calibration_run is None else str(h.calibration_run)}}

    def predict_step(self, indices: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        start, tracking = self._clock(), 0.0
        noise = IndexedNoise(self.hparams.seed, indices.tolist(), self.image_shape, self.device)
        tracked = (indices < self.hparams.fp_error_images).nonzero().flatten().to(self.device)
        step_mse = torch.zeros(len(tracked), len(self.seq))

        def fp_error(i: int, t: int, x: torch.Tensor, eps: torch.Tensor) -> None:
            # noise-prediction error of the model in use against FP on the very same x_t
            nonlocal tracking
            begin = self._clock()
            x, eps = x[tracked], eps[tracked]
            ref = self.fp_model(x, torch.full((x.shape[0],), float(t), device=x.device))
            step_mse[:, i] = (eps - ref).pow(2).flatten(1).mean(1).cpu()
            tracking += self._clock() - begin

        track = self.quantized and len(tracked) > 0
        x = ddim_sample(self.segmented.model_for_step, noise(), self.seq, self.betas, self.hparams.eta,
                        callback=fp_error if track else None, noise_fn=noise)
        out = {"indices": indices.cpu(), "images": to_uint8(x).cpu()}
        self.sampling_seconds += self._clock() - start - tracking
        self.images_sampled += len(indices)
        if track:
            out["step_mse_indices"], out["step_mse"] = indices[tracked.cpu()].cpu(), step_mse
        return out

    def setup(self, stage: str) -> None:
        if stage == "predict" and self.hparams.fp_samples is not None:  # before any sampling, not when scoring
            check_fp_reference(self.hparams.fp_samples, self.sampling_record())
        # Lightning skips the whole predict loop (and its end hooks) when no image is missing
        if stage == "predict" and not self.trainer.datamodule.todo:
            self.on_predict_end()

    def on_predict_end(self) -> None:
        """Rank 0 gathers all images (``samples.npz``, ``grid.png``, ``per_step_mse.json``) and scores them."""
        data = self.trainer.datamodule
        self.trainer.strategy.barrier()
        # wall seconds per image of the whole run: the slowest process's sampling time over all processes' images
        seconds, images = (float(self.trainer.strategy.reduce(torch.tensor(v, dtype=torch.float64, device=self.device),
                                                              reduce_op=op))
                           for v, op in ((self.sampling_seconds, "max"), (self.images_sampled, "sum")))
        if self.trainer.is_global_zero:
            summary = finalize_samples(data.output_dir, data.num_images)
            summary["runtime"] = self.runtime
            summary["sampling_seconds_per_image"] = seconds / images if images else None
            if self.hparams.real_source is not None:
                summary.update(self.score(data.output_dir))
            atomic_write_text(Path(data.output_dir) / "metrics.json", json.dumps(summary, indent=1))
        self.trainer.strategy.barrier()

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @torch.inference_mode(False)
    def score(self, output_dir: str | Path) -> dict[str, Any]:
        h = self.hparams
        images, indices = load_samples(output_dir)
        extractor = (embedded_extractor(h.feature_extractor) if h.feature_extractor is not None
                     else InceptionExtractor(h.inception_weights))
        scores = score_images(images, h.real_source, extractor, n_real=h.num_real, kid_subset_size=h.kid_subset_size,
                              cache_dir=h.metric_cache, device=self.device, chunks=h.score_chunks)
        if h.fp_samples is not None:
            fp_images, fp_indices = load_samples(h.fp_samples)
            common = sorted(set(indices.tolist()) & set(fp_indices.tolist()))
            if not common:
                raise ValueError(f"{h.fp_samples}: no image index in common with {output_dir}")
            per_image = psnr_per_image(_rows(images, indices, common), _rows(fp_images, fp_indices, common))
            scores["psnr_vs_fp"] = float(per_image.mean())
            if h.score_chunks > 1:
                size = len(common) // h.score_chunks
                chunks = [float(per_image[c * size:(c + 1) * size].mean()) for c in range(h.score_chunks)]
                scores.update(psnr_chunks=chunks, psnr_std=float(torch.tensor(chunks, dtype=torch.float64).std()))
        return scores


class SampleIndices(L.LightningDataModule):
    """Image indices 0..num_images-1 that have no good PNG yet, in an output folder this run owns.

    In ``setup`` rank 0 locks the folder for the run, checks (or writes) its sampling record against the module's
    settings (``overwrite`` deletes images made with other settings first), validates the existing PNGs and sends the
    list of images to make to every rank, before Lightning's post-setup barrier and so before any image is written;
    Lightning's predict sampler then splits it across ranks without padding or duplicates."""

    def __init__(self, num_images: int = 256, batch_size: int = 256, output_dir: str = "outputs/samples",
                 overwrite: bool = False):
        super().__init__()
        if num_images < 1 or batch_size < 1:
            raise ValueError(f"num_images and batch_size must be >= 1, got {num_images}, {batch_size}")
        self.num_images, self.batch_size, self.output_dir = num_images, batch_size, Path(output_dir)
        self.image_dir = self.output_dir / "images"
        self.overwrite = overwrite
        self.lock = RunLock(self.output_dir / LOCK_NAME, f"sampling output folder {self.output_dir}")

    def setup(self, stage: str) -> None:
        strategy, module = self.trainer.strategy, self.trainer.lightning_module
        hold_run_lock(strategy, self.lock)
        c, h, w = module.image_shape

        def prepare() -> list[int]:
            claim_folder(self.output_dir, module.sampling_record(), self.overwrite)
            return images_to_make(self.image_dir, self.num_images, (w, h))

        self.todo = decided_by_zero(strategy, prepare)

    def teardown(self, stage: str) -> None:
        self.lock.release()

    def on_exception(self, exception: BaseException) -> None:
        self.lock.release()

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(torch.tensor(self.todo, dtype=torch.long), batch_size=self.batch_size, shuffle=False)


class SampleWriter(BasePredictionWriter):
    """Writes each batch's PNGs (atomically) and its per-step error as soon as the batch is done."""

    def __init__(self):
        super().__init__(write_interval="batch")

    def write_on_batch_end(self, trainer, pl_module, prediction: dict[str, torch.Tensor], batch_indices, batch,
                           batch_idx: int, dataloader_idx: int = 0) -> None:
        output_dir = Path(trainer.datamodule.output_dir)
        for j, img in zip(prediction["indices"].tolist(), prediction["images"]):
            write_png(png_path(output_dir / "images", j), img)
        if "step_mse" in prediction:  # kept per batch so a resumed run still averages over every tracked image
            first = int(prediction["indices"][0])
            atomic_save({"indices": prediction["step_mse_indices"], "step_mse": prediction["step_mse"]},
                        output_dir / "step_mse" / f"{first:06d}.pt")



def finalize_samples(output_dir: str | Path, num_images: int | None = None) -> dict[str, Any]:
    """Gather the PNGs into ``samples.npz`` (uint8 NHWC, the usual FID-tool layout) and the per-step error."""
    output_dir = Path(output_dir)
    paths = sorted((output_dir / "images").glob("*.png"))
    if num_images is not None:
        paths = [p for p in paths if int(p.stem) < num_images]
    images = read_png_images(paths)
    with atomic_path(output_dir / "samples.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images.permute(0, 2, 3, 1).numpy(), indices=np.array([int(p.stem) for p in paths]))
    summary: dict[str, Any] = {"num_images": len(paths)}
    if not paths:
        raise FileNotFoundError(f"{output_dir / 'images'}: no sampled images to gather")
    parts = sorted((output_dir / "step_mse").glob("*.pt"))
    if parts:
        per_image: dict[int, torch.Tensor] = {}
        for part in parts:
            d = torch.load(part, weights_only=True)
            per_image.update(zip(d["indices"].tolist(), d["step_mse"]))
        keep = [v for j, v in per_image.items() if num_images is None or j < num_images]
        summary["per_step_mse"] = torch.stack(keep).mean(0).tolist()
        atomic_write_text(output_dir / "per_step_mse.json", json.dumps(summary["per_step_mse"]))
    save_sample_grid(images[:64], output_dir / "grid.png", nrow=8)
    return summary


def _rows(images: torch.Tensor, indices: torch.Tensor, wanted: list[int]) -> torch.Tensor:
    """The images whose index is in ``wanted``, in that order (one dict lookup each: 50k-image runs)."""
    position = {j: row for row, j in enumerate(indices.tolist())}
    return images[torch.tensor([position[j] for j in wanted])]


def load_samples(output_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 NCHW, indices) from a finished sampling run."""
    path = Path(output_dir) / "samples.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no samples; run the sampling predict first")
    with np.load(path) as d:
        return torch.from_numpy(d["images"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(d["indices"])
