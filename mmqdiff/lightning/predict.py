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
from ..diffusion.sampler import check_eta
from ..segments import SegmentedModel
from ..segments.run_folder import read_manifest, run_identity
from ..io import RunLock, atomic_path, atomic_save, atomic_write_text, read_png_images, write_png
from ..evaluation.sample_folder import (MAX_IMAGES, check_disk_space, check_fp_reference, check_num_images,
                                        claim_folder, images_problem, images_to_make, indexed_pngs, png_path,
                                        sample_problem)
from .run_lock import LOCK_NAME, hold_run_lock
from .strategy import decided_by_zero
from ..evaluation.plots import save_sample_grid
from ..evaluation.features import InceptionExtractor, embedded_extractor
from ..evaluation.fidelity import paired_psnr, squared_error
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
        check_eta(eta)
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
            if manifest["fp_model"]["sha256"] != self.fp_sha256:  # its FP model gives the per-step error and noise
                raise ValueError(f"{calibration_run}: calibrated from the FP weights of "
                                 f"{manifest['fp_model']['checkpoint']} (state-dict SHA-256 "
                                 f"{manifest['fp_model']['sha256'][:16]}...), but checkpoint {checkpoint} holds "
                                 f"other weights ({self.fp_sha256[:16]}...); sample with the checkpoint the run was "
                                 "calibrated from")
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
        planned = self.planned_runtime()
        self.segmented = self.segmented.for_device(self.device, self.runtime, self.hparams.pack)
        self.runtime = self.segmented.runtime
        if self.runtime != planned:  # the int8 backend cannot run here: the folder's record must say fake-quant
            self.trainer.datamodule.claim()

    def planned_runtime(self) -> str:
        """The runtime the images are made with ("fp", "int" or "fake"), "auto" resolved for the run's device; until
        prediction starts the integer runtime may still fall back to "fake" (the folder is then claimed again)."""
        if self.runtime != "auto":
            return self.runtime
        return resolve_runtime("auto", self.trainer.strategy.root_device)

    def sampling_record(self) -> dict[str, Any]:
        """What makes the images (``identity``: a resumed run must match it) and where it came from (``info``). The
        models count by their weights (state-dict and packed-export content hashes), not by file bytes or paths.
        Fake-quant images also depend on the size of the batch they were sampled in (see ``predict_step``), so
        :class:`SampleIndices` adds its ``batch_size`` to a fake-quant run's identity."""
        h = self.hparams
        return {"identity": {"fp_model": self.fp_sha256, "calibration_run": self.calibration_identity,
                             "seed": h.seed, "num_steps": h.num_steps, "skip_type": h.skip_type, "eta": h.eta,
                             "image_shape": list(self.image_shape), "runtime": self.planned_runtime()},
                "info": {"checkpoint": str(h.checkpoint), "checkpoint_sha256": file_sha256(h.checkpoint),
                         "calibration_run": None if h.calibration_run is None else str(h.calibration_run)}}

    def predict_step(self, indices: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        """Samples one batch. Fake-quant rounding turns the float kernels' batch-size-dependent last bits into
        visibly different images (30-55 dB PSNR between batch 1 and 4; FP and int8 images are bit-identical), so a
        fake-quant batch is padded to ``batch_size`` rows: its images depend on that size only, not on where an
        interrupted run resumed or how the indices were split over devices."""
        start, tracking = self._clock(), 0.0
        rows = indices.tolist()
        if self.runtime == "fake":
            rows += rows[-1:] * (self.trainer.datamodule.batch_size - len(rows))
        noise = IndexedNoise(self.hparams.seed, rows, self.image_shape, self.device)
        tracked = (indices < self.hparams.fp_error_images).nonzero().flatten().to(self.device)
        step_mse = torch.zeros(len(tracked), len(self.seq))

        def fp_error(i: int, t: int, x: torch.Tensor, eps: torch.Tensor) -> None:
            # noise-prediction error of the model in use against FP on the very same x_t
            nonlocal tracking
            begin = self._clock()
            x, eps = x[tracked], eps[tracked]
            ref = self.fp_model(x, torch.full((x.shape[0],), float(t), device=x.device))
            step_mse[:, i] = squared_error(eps, ref).flatten(1).mean(1).cpu()
            tracking += self._clock() - begin

        track = self.quantized and len(tracked) > 0
        x = ddim_sample(self.segmented.model_for_step, noise(), self.seq, self.betas, self.hparams.eta,
                        callback=fp_error if track else None, noise_fn=noise)[:len(indices)]
        out = {"indices": indices.cpu(), "images": to_uint8(x).cpu()}
        problem = sample_problem(x, out["images"], indices.tolist())
        if problem is not None:
            model = (f"the segment models of {self.hparams.calibration_run}" if self.quantized else
                     f"the FP model of {self.hparams.checkpoint}")
            raise RuntimeError(f"{self.trainer.datamodule.output_dir}: sampling stopped, this batch not written: "
                               f"{problem}; {model} diverges or has collapsed with these settings")
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
            summary["runtime"] = self.planned_runtime()
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
            per_image = paired_psnr(images, indices, *load_samples(h.fp_samples), str(output_dir), str(h.fp_samples))
            scores["psnr_vs_fp"] = float(per_image.mean())
            if h.score_chunks > 1:
                size = len(indices) // h.score_chunks
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
                 overwrite: bool = False, max_images: int = MAX_IMAGES):
        """``max_images``: the most ``num_images`` may be (a guard against typos; raise it for larger runs)."""
        super().__init__()
        if num_images < 1 or batch_size < 1:
            raise ValueError(f"num_images and batch_size must be >= 1, got {num_images}, {batch_size}")
        check_num_images(num_images, max_images)
        self.num_images, self.batch_size, self.output_dir = num_images, batch_size, Path(output_dir)
        self.image_dir = self.output_dir / "images"
        self.overwrite = overwrite
        self.lock = RunLock(self.output_dir / LOCK_NAME, f"sampling output folder {self.output_dir}")

    def setup(self, stage: str) -> None:
        strategy, module = self.trainer.strategy, self.trainer.lightning_module
        hold_run_lock(strategy, self.lock)
        c, h, w = module.image_shape

        def prepare() -> list[int]:
            self._claim(self.overwrite)
            todo = images_to_make(self.image_dir, self.num_images, (w, h))
            check_disk_space(self.output_dir, len(todo), self.num_images, module.image_shape)
            return todo

        self.todo = decided_by_zero(strategy, prepare)

    def claim(self) -> None:
        """Check the folder's record against the module's settings again (every rank calls it; rank 0 decides)."""
        decided_by_zero(self.trainer.strategy, lambda: self._claim(False))

    def _claim(self, overwrite: bool) -> None:
        record = self.trainer.lightning_module.sampling_record()
        if record["identity"]["runtime"] == "fake":  # see MultiModelSampler.predict_step
            record["identity"]["batch_size"] = self.batch_size
        claim_folder(self.output_dir, record, overwrite)

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
    found = {j: p for j, p in indexed_pngs(output_dir / "images").items() if num_images is None or j < num_images}
    if not found:
        raise FileNotFoundError(f"{output_dir / 'images'}: no sampled images to gather")
    images = read_png_images(list(found.values()))
    problem = images_problem(images, list(found))
    if problem is not None:
        raise ValueError(f"{output_dir / 'images'}: {problem}: the model that sampled them has collapsed; sample "
                         "into a new folder with a working model")
    with atomic_path(output_dir / "samples.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images.permute(0, 2, 3, 1).numpy(), indices=np.array(list(found)))
    summary: dict[str, Any] = {"num_images": len(found)}
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


def load_samples(output_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 NCHW, indices) from a finished sampling run."""
    path = Path(output_dir) / "samples.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no samples; run the sampling predict first")
    with np.load(path) as d:
        return torch.from_numpy(d["images"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(d["indices"])
