"""Calibrating K segment models in one run: ``python cli.py fit --config
configs/embedded/calibrate_k1.yaml --config configs/embedded/calibrate_k4.yaml``.

A thin Lightning driver around :class:`mmqdiff.quant.SegmentCalibrator` (what ``mmqdiff.quant.calibrate`` loops
over): the :class:`~mmqdiff.lightning.calib_data.CalibrationDataModule` (``data:``) holds each segment's pairs and
serves them once per training step; one training step runs one work item (unit u's weight phase for u = 0..N-1,
then unit u's activation phase) for all segments this process owns. After every item the whole run (every rank's
segment quant states, the item counter, timings) is saved atomically to ``<default_root_dir>/checkpoints/last.ckpt``
by :class:`UnitCheckpoint`, so ``--ckpt_path last`` continues at the next item, and each segment's losses go to the
trainer's loggers. Every random stream of an item is seeded from (seed, segment, unit, phase), so a resumed or
parallel run gives the same bits as one uninterrupted sequential run (given equal thread counts on CPU). At the end
each segment's quant state and packed export go to ``segment_XX/`` and the run is described in ``manifest.json``
(see :mod:`mmqdiff.segments.run_folder`).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..diffusion import build_model, file_sha256, load_checkpoint, load_config, state_dict_sha256, timesteps
from ..segments.run_folder import (CKPT_KEY, LAST_CKPT, MANIFEST_NAME, add_item_stats, build_manifest,
                                   calibration_record, cpu_state, fp_model_record, new_segment_stats, peak_mem_bytes,
                                   run_record, segment_record, warm_settings, warm_start_state, write_manifest,
                                   write_segment, write_shared_files)
from ..quant import QuantConfig, QuantizedUNet, ResumePoint, SegmentCalibrator, WarmStart, quant_state_dict
from ..quant.calibration import calibration_items, check_scope
from ..quant.reconstruction import ReconSettings
from .calib_data import CalibrationDataModule, Pairs
from .checkpoint_io import AtomicCheckpointIO
from .run_lock import RunFolderLock
from .strategy import SegmentParallelStrategy, gather_to_zero
from ..io import check_writable


def run_checkpoint(run_dir: str | Path) -> Path:
    """Where a calibration run keeps its resumable state: ``<run folder>/checkpoints/last.ckpt``."""
    return Path(run_dir) / LAST_CKPT


class UnitCheckpoint(ModelCheckpoint):
    """``<trainer.default_root_dir>/checkpoints/last.ckpt`` after every completed work item of
    :class:`SegmentCalibration`, wherever the loggers write.

    Listed under ``trainer.callbacks`` in the calibration configs (the module refuses to run without it): Lightning
    resolves ``--ckpt_path last`` through the trainer's checkpoint callbacks before the module's own callbacks exist,
    and a plain ModelCheckpoint would look in the first logger's version folder, which is new in every run of the command.
    Ignores ``global_step``: manual optimisation without Lightning optimizers never advances it.
    """

    def __init__(self) -> None:
        super().__init__(save_last=True, save_top_k=0, enable_version_counter=False)
        self._saved_item: int | None = None

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        """ModelCheckpoint's hook for ``ckpt_path="last"`` (lightning 2.6): the run folder's ``last.ckpt``."""
        path = run_checkpoint(trainer.default_root_dir)
        return {os.path.normpath(path)} if path.is_file() else set()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.dirpath = os.path.realpath(run_checkpoint(trainer.default_root_dir).parent)
        super().setup(trainer, pl_module, stage)
        self.path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if pl_module.next_item != self._saved_item:
            trainer.save_checkpoint(self.path, weights_only=False)
            self.last_model_path, self._saved_item = str(self.path), pl_module.next_item

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Epoch ends carry no extra state here."""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """No validation in calibration."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The last item was saved already (ModelCheckpoint would save again and delete the 'previous' last)."""


class DiscardLogsOfRefusedRun(Callback):
    """A run that fails before its first work item (refused: the folder is another run's, a resume with other
    settings, a bad setting) leaves nothing behind: the logger folder Lightning made for it
    (``lightning_logs/version_N``) is removed while it holds at most the run's config."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not trainer.is_global_zero or getattr(pl_module, "items_this_session", 0):
            return
        for logger in trainer.loggers:
            folder = Path(logger.log_dir) if getattr(logger, "log_dir", None) else None
            if folder is None or not folder.is_dir() or \
                    any(p.name not in ("config.yaml", "hparams.yaml") or p.is_dir() for p in folder.iterdir()):
                continue
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
            if not any(folder.parent.iterdir()):  # lightning_logs/ made for this run alone
                folder.parent.rmdir()


class _Reporter:
    """Rich progress: a live bar per segment (segment, unit i/N, phase, loss) on a single process; with several
    processes, one line per finished item and rank (live displays of several processes would interleave)."""

    def __init__(self, rank: int, world_size: int):
        self.console = Console()
        self.prefix = f"rank {rank}: " if world_size > 1 else ""
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4g}"), TimeElapsedColumn(),
                                 console=self.console, disable=world_size > 1)
        self.tasks: dict[int, Any] = {}

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def item(self, segment: int, unit: int, num_units: int, name: str, phase: str):
        """The progress callback for one segment's item."""
        desc = f"{self.prefix}segment {segment}  unit {unit + 1}/{num_units} {name}  {phase}"
        if segment not in self.tasks:
            self.tasks[segment] = self.progress.add_task(desc, total=1, loss=float("nan"))
        task = self.tasks[segment]
        self.progress.reset(task, description=desc, total=1, loss=float("nan"))
        return lambda t, iters, loss: self.progress.update(task, completed=t, total=iters, loss=loss)

    def done(self, segment: int, unit: int, num_units: int, name: str, phase: str, stats: dict[str, float]) -> None:
        self.progress.console.print(
            f"{self.prefix}segment {segment}  unit {unit + 1}/{num_units} {name:<22} {phase:<6} "
            f"loss {stats['rec_first']:.4g} -> {stats['rec_last']:.4g}  ({stats['item_seconds']:.1f} s)",
            soft_wrap=True)


@dataclass
class _Nets:
    """The FP model and this rank's segment calibrators, kept out of the LightningModule's submodules: Lightning's
    state_dict would hold one rank's full-precision copies only; the checkpoint carries every rank's compact quant
    state instead (see ``on_save_checkpoint``)."""

    fp: torch.nn.Module | None = None
    segments: dict[int, SegmentCalibrator] = field(default_factory=dict)


class SegmentCalibration(LightningModule):
    """Q-Diffusion calibration of one quantized UNet per timestep segment (K=1: the Q-Diffusion baseline).

    The data (calibration file, schedule, K, segment boundaries, cali_st / cali_n) come from the trainer's
    :class:`~mmqdiff.lightning.calib_data.CalibrationDataModule` (``data:`` in the config).

    Args:
        model_config / checkpoint: the FP model (YAML config, local weights file).
        quant: what to quantize (``QuantConfig``; ``unit_order: registration`` restores the reference order).
        recon: reconstruction settings and improvement switches (``ReconSettings``, passed whole to the engine).
        seed: root of every random stream (per segment, unit and phase).
        segment_scale: per segment, a factor on both iteration counts of ``recon`` (e.g. ``[2, 1, 0.5, 0.5]`` gives
            the noisiest segment, whose errors move the sample most, twice the uniform budget at the same total);
            None: every segment gets ``recon``'s iterations.
        init_from: warm start: a finished K=1 calibration run folder (same FP weights and ``quant``) whose model
            every segment starts from and fine-tunes with ``recon``'s (smaller) budget, instead of the plain init;
            its compute counts towards this run's (``init_from.compute`` in the manifest). None: the reference.
        warm: how a warm start fine-tunes (``WarmStart``: alpha restart margin, activation re-init).
        segment_scope: "full" (each segment calibrates weights and activations) or "activations": every segment
            keeps the weight rounding of ``init_from`` exactly (no weight phase) and calibrates only its activation
            step sizes, initialised again on its own pairs; the run folder stores the shared weights once.
        overwrite: replace the outputs of a previous run in the same folder instead of refusing.

    Outputs go to ``trainer.default_root_dir`` (the run folder); ``trainer.callbacks`` must include
    :class:`UnitCheckpoint`. Per-item losses go to the trainer's loggers (step = work item index).
    """

    def __init__(self, model_config: str, checkpoint: str, quant: QuantConfig = QuantConfig(),
                 recon: ReconSettings = ReconSettings(), seed: int = 1234, segment_scale: list[float] | None = None,
                 init_from: str | None = None, warm: WarmStart = WarmStart(), segment_scope: str = "full",
                 overwrite: bool = False):
        super().__init__()
        self.automatic_optimization = False
        self.model_config, self.checkpoint = model_config, checkpoint
        self.quant, self.recon, self.seed, self.overwrite = quant, recon, seed, overwrite
        self.segment_scale = None if segment_scale is None else [float(f) for f in segment_scale]
        self.init_from, self.warm, self.segment_scope = init_from, warm, check_scope(segment_scope)
        if segment_scope == "activations" and init_from is None:
            raise ValueError("model.init_args.segment_scope 'activations' keeps the weight rounding of a finished K=1 "
                             "run: set model.init_args.init_from")
        self.next_item = 0
        self.items_this_session = 0
        self.nets = _Nets()
        self.stats: dict[int, dict[str, Any]] = {}
        self.run_seconds = 0.0

    # ----------------------------------------------------------------------------------------------- setup
    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    @property
    def data(self) -> CalibrationDataModule:
        dm = self.trainer.datamodule
        if not isinstance(dm, CalibrationDataModule):
            raise ValueError("SegmentCalibration takes its pairs from a CalibrationDataModule: set data.class_path "
                             f"to mmqdiff.lightning.calib_data.CalibrationDataModule (got {type(dm).__name__})")
        return dm

    def setup(self, stage: str) -> None:
        self._session_start = time.perf_counter()
        trainer = self.trainer
        if trainer.world_size > 1 and not isinstance(trainer.strategy, SegmentParallelStrategy):
            raise ValueError(f"several processes need trainer.strategy=segment_parallel (each calibrates its own "
                             f"segments), got {type(trainer.strategy).__name__}")
        if not any(isinstance(cb, UnitCheckpoint) for cb in trainer.callbacks):
            raise ValueError("trainer.callbacks must include mmqdiff.lightning.calibrate.UnitCheckpoint (it saves "
                             "every work item and lets --ckpt_path last find the run's checkpoint)")
        if trainer.max_steps not in (-1, None):
            raise ValueError(f"trainer.max_steps={trainer.max_steps} cannot stop a calibration (its work items are no "
                             "optimizer steps, so the limit would never apply); leave it unset, or stop early with "
                             "trainer.max_time and continue with --ckpt_path last")
        data = self.data
        if data.segment is not None:
            raise ValueError(f"data.init_args.segment must be null for SegmentCalibration (it calibrates every "
                             f"segment, spread over the processes), got {data.segment!r}")
        check_writable(self.run_dir)
        device = trainer.strategy.root_device
        cfg = load_config(self.model_config)
        fp = self.nets.fp = load_checkpoint(build_model(cfg), self.checkpoint).to(device).eval().requires_grad_(False)
        self.model_sha256 = state_dict_sha256(fp)
        self.fp_record = fp_model_record(self.model_config, self.checkpoint, self.model_sha256)
        data.check_model([fp.in_channels, fp.resolution, fp.resolution], self.model_sha256)
        model_timesteps = cfg.get("diffusion", {}).get("num_diffusion_timesteps", 1000)
        if model_timesteps != data.num_diffusion_timesteps:
            raise ValueError(f"{self.model_config} diffuses over {model_timesteps} timesteps but "
                             f"data.init_args.num_diffusion_timesteps is {data.num_diffusion_timesteps}")
        seq = timesteps(data.num_steps, data.skip_type, model_timesteps)
        self.t_of_step = list(reversed(seq))
        if self.segment_scale is not None and len(self.segment_scale) != data.k:
            raise ValueError(f"model.init_args.segment_scale has {len(self.segment_scale)} factors for "
                             f"k={data.k} segments")
        data.segment_costs = self.segment_scale  # the ranks get equal work (segments_of_rank)
        self.my_segments = data.segment_ids
        self.warm_record, init_state = (None, None) if self.init_from is None else \
            warm_start_state(self.init_from, self.model_sha256, asdict(self.quant))
        self.shared_state = init_state if self.segment_scope == "activations" else None
        for s in self.my_segments:  # segments are never empty (timestep_segments), nor their selection
            self.nets.segments[s] = SegmentCalibrator(fp, self.quant, self.segment_recon(s), seed=self.seed,
                                                      segment=s, init_state=init_state, warm=self.warm,
                                                      scope=self.segment_scope)
            self.stats[s] = new_segment_stats()
        any_model = (self.nets.segments[self.my_segments[0]].qmodel if self.my_segments
                     else QuantizedUNet(fp, self.quant))
        self.units = list(any_model.unit_names)
        self.items = calibration_items(len(self.units), self.quant.quant_act, self.segment_scope)
        self._resumed = False

    def segment_recon(self, s: int) -> ReconSettings:
        """Segment ``s``'s reconstruction settings: ``recon`` with its share of ``segment_scale``."""
        return self.recon if self.segment_scale is None else self.recon.scaled(self.segment_scale[s])

    def signature(self) -> dict[str, Any]:
        """What must not change between a checkpoint and the run that resumes it."""
        # autocast "none" is left out so that checkpoints from before the switch existed still resume
        recon = {k: v for k, v in asdict(self.recon).items() if k != "cache_device" and (k, v) != ("autocast", "none")}
        data = self.data
        return {"model_sha256": self.model_sha256, "calibration_sha256": data.sha256, "k": data.k,
                "segments": [[r.start, r.stop] for r in data.segments], "num_steps": data.num_steps,
                "skip_type": data.skip_type, "cali_st": data.cali_st, "cali_n": data.cali_n,
                "overlap": data.overlap, "quant": asdict(self.quant), "recon": recon, "seed": self.seed,
                "units": self.units,
                "segment_scale": self.segment_scale, "init_from": self._init_from_entry(with_path=False),
                # only where it is not "full", so checkpoints from before the switch existed still resume
                **({} if self.segment_scope == "full" else {"segment_scope": self.segment_scope})}

    def _init_from_entry(self, with_path: bool) -> dict[str, Any] | None:
        """The warm start's record (base state hash, its compute and iterations, the fine-tune switches), None
        without one. The resume signature leaves out the folder's path: the state's hash is its identity."""
        if self.warm_record is None:
            return None
        return {**{k: v for k, v in self.warm_record.items() if with_path or k != "path"},
                "warm": warm_settings(self.warm, self.segment_scope)}

    def on_fit_start(self) -> None:
        # rank 0 decides for all: another rank could otherwise look after rank 0 deleted, skip the barrier, and hang
        previous = self.trainer.strategy.broadcast([p for p in (self.run_dir / MANIFEST_NAME, self.last_ckpt)
                                                    if p.exists()])
        if previous and not self._resumed:
            if not self.overwrite:
                raise FileExistsError(f"{self.run_dir} holds a previous run ({', '.join(map(str, previous))}); "
                                      "resume it with --ckpt_path last, choose another trainer.default_root_dir, or "
                                      "set model.init_args.overwrite true")
            if self.trainer.is_global_zero:
                for p in previous:
                    p.unlink()
        # unconditional: a rank that looks after rank 0 deleted the old files must still meet it here
        self.trainer.strategy.barrier()
        self.reporter = _Reporter(self.trainer.global_rank, self.trainer.world_size)
        self.reporter.start()

    @property
    def last_ckpt(self) -> Path:
        return run_checkpoint(self.run_dir)

    def configure_callbacks(self) -> list[Callback]:
        return [RunFolderLock(self.run_dir, "calibration run folder"), DiscardLogsOfRefusedRun()]

    def configure_optimizers(self) -> None:
        """Each work item builds its own optimiser (one per unit and phase, as the reference)."""
        return None

    # ----------------------------------------------------------------------------------------------- work
    def training_step(self, batch: Pairs, batch_idx: int) -> None:
        if self.next_item < len(self.items):
            if sorted(batch) != self.my_segments:
                raise RuntimeError(f"the data serve segments {sorted(batch)}, this process calibrates "
                                   f"{self.my_segments}")
            done = {s: self._run_item(s, *batch[s]) for s in self.my_segments}
            self._log_losses(done)
            self.next_item += 1
            self.items_this_session += 1
        if self.next_item >= len(self.items):
            self.trainer.should_stop = True

    def _run_item(self, s: int, xs: torch.Tensor, ts: torch.Tensor) -> dict[str, float]:
        calibrator = self.nets.segments[s]
        if calibrator.next_item != self.next_item:
            raise RuntimeError(f"segment {s} is at work item {calibrator.next_item}, the run at {self.next_item}")
        unit, phase = self.items[self.next_item]
        name, n = self.units[unit], len(self.units)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        stats = calibrator.run_item(xs, ts, self.reporter.item(s, unit, n, name, phase)).stats
        add_item_stats(self.stats[s], name, phase, stats, peak_mem_bytes(self.device))
        self.reporter.done(s, unit, n, name, phase, stats)
        return stats

    def _log_losses(self, done: dict[int, dict[str, float]]) -> None:
        """Every segment's losses of this work item to the trainer's loggers (rank 0 writes; other ranks' segments
        are gathered to it), at step = the item index: ``segment_XX/<phase>_loss_start``, ``..._loss_end`` (the
        reconstruction loss at the first and last iteration) and ``segment_XX/round_loss`` (weight phase)."""
        if not self.loggers:
            return
        gathered = gather_to_zero(done)
        if gathered is None:
            return
        phase = self.items[self.next_item][1]
        metrics: dict[str, float] = {}
        for part in gathered:
            for s, stats in part.items():
                metrics[f"segment_{s:02d}/{phase}_loss_start"] = stats["rec_first"]
                metrics[f"segment_{s:02d}/{phase}_loss_end"] = stats["rec_last"]
                if "round_loss" in stats:
                    metrics[f"segment_{s:02d}/round_loss"] = stats["round_loss"]
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.next_item)
            logger.save()

    # ----------------------------------------------------------------------------------------------- state
    def _elapsed(self) -> float:
        return self.run_seconds + time.perf_counter() - self._session_start

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        local = {s: {"quant_state": cpu_state(quant_state_dict(c.qmodel)), "stats": self.stats[s]}
                 for s, c in self.nets.segments.items()}
        gathered = gather_to_zero(local)
        if gathered is None:
            return  # only rank 0 writes the file
        segments = {s: v for part in gathered for s, v in part.items()}
        unit, phase = self.items[self.next_item] if self.next_item < len(self.items) else (None, None)
        checkpoint[CKPT_KEY] = {"next_item": self.next_item, "next_unit": unit, "next_phase": phase,
                                "signature": self.signature(), "run_seconds": self._elapsed(), "segments": segments}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CKPT_KEY)
        if state is None:
            raise ValueError(f"{self.trainer.ckpt_path}: checkpoint was not written by SegmentCalibration")
        mine, theirs = self.signature(), state["signature"]
        if theirs.get("calibration_sha256") not in (mine["calibration_sha256"], None) and \
                theirs["calibration_sha256"] == file_sha256(self.data.path):  # identified by file bytes back then
            theirs = {**theirs, "calibration_sha256": mine["calibration_sha256"]}
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(f"{self.trainer.ckpt_path}: cannot resume: checkpoint was made with different {diff} "
                             f"(e.g. {diff[0]}: checkpoint {theirs.get(diff[0])!r}, now {mine.get(diff[0])!r})")
        for s in self.my_segments:
            self.nets.segments[s].resume(ResumePoint(state["next_item"], state["segments"][s]["quant_state"]))
            self.stats[s] = state["segments"][s]["stats"]
        self.next_item, self.run_seconds, self._resumed = state["next_item"], state["run_seconds"], True

    # ----------------------------------------------------------------------------------------------- outputs
    def on_train_end(self) -> None:
        self.reporter.stop()
        if self.next_item < len(self.items):  # stopped early: on_fit_end says so
            return
        entries: dict[int | str, Any] = {s: self._write_segment(s) for s in self.my_segments}
        if self.shared_state is not None and 0 in self.my_segments:  # the shared weights, once
            entries["shared"] = write_shared_files(self.run_dir, self.nets.segments[0].qmodel, self.quant.quant_act)
        gathered = gather_to_zero(entries)
        if gathered is not None:
            segments = {s: e for part in gathered for s, e in part.items()}
            path = write_manifest(self.run_dir, self._manifest([segments[s] for s in range(self.data.k)],
                                                               segments.get("shared")))
            Console().print(f"calibrated {self.data.k} segment model(s) in {self._elapsed():.1f} s: {path}")
        self.trainer.strategy.barrier()

    def on_fit_end(self) -> None:
        """A fit the trainer stopped before the last work item (a limit such as ``trainer.max_time``, also one already
        used up when the run resumed, which skips the loop and ``on_train_end``) fails, saying where to continue."""
        self.reporter.stop()
        if self.next_item < len(self.items):
            way = (f"its state is saved in {self.last_ckpt}: continue with --ckpt_path last"
                   if self.last_ckpt.is_file() else "no work item finished, so nothing was saved")
            raise RuntimeError(f"{self.run_dir}: calibration stopped by the trainer after {self.next_item}/"
                               f"{len(self.items)} work items (a limit such as trainer.max_time, which also counts the "
                               f"time of the runs a resumed run continues), so no manifest was written; {way}")

    def _write_segment(self, s: int) -> dict[str, Any]:
        record = segment_record(s, self.data.segments[s], self.data.window(s), self.t_of_step, self.segment_recon(s),
                                self.data.selected[s][1], self.stats[s], self.trainer.global_rank,
                                self.segment_scope)
        return write_segment(self.run_dir, record, self.nets.segments[s].qmodel, self.quant.quant_act,
                             self.shared_state)

    def _manifest(self, segments: list[dict[str, Any]], shared: dict[str, Any] | None) -> dict[str, Any]:
        data = self.data
        calibration = calibration_record(data.path, data.sha256, data.cali_st, data.cali_n, data.overlap, data.meta)
        run = run_record(num_steps=data.num_steps, skip_type=data.skip_type, quant=self.quant, recon=self.recon,
                         seed=self.seed, segment_scale=self.segment_scale,
                         init_from=self._init_from_entry(with_path=True), units=self.units, fp_model=self.fp_record,
                         calibration=calibration, wall_seconds=self._elapsed(), device=self.device,
                         world_size=self.trainer.world_size, segment_scope=self.segment_scope)
        return build_manifest(run, segments, shared)
