"""The K-segment model: one quantized copy of an FP model per contiguous segment of the DDIM sampling steps, as one
``nn.Module`` that switches by timestep.

``SegmentedModel.calibrate`` calibrates every segment in plain Python with :func:`mmqdiff.quant.calibrate` (the
calibrator ``cli.py fit`` drives, so segment s has the bits of segment s of a fit run with the same settings);
``save`` writes the run folder ``cli.py fit`` writes (manifest and segment files, :mod:`.run_folder`), so
``cli.py predict --model.init_args.calibration_run <folder>`` samples it; ``load`` reads such a folder back;
``to_integer`` / ``for_device`` put the models on the int8 runtime where :func:`~mmqdiff.quant.runtime.resolve_runtime`
says it pays.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..data import CalibrationFile, segment_of_step, timestep_segments
from ..data.calibration import calibration_sha256
from ..diffusion import load_config, state_dict_sha256, timesteps
from ..io import check_writable
from ..quant import (IntegerSegments, IntegerUNet, IntegerUnsupported, ItemDone, QuantConfig, QuantizedUNet,
                     ReconSettings, WarmStart, calibrate)
from ..quant.calibration import check_scope
from ..quant.runtime import resolve_runtime
from .run_folder import (LAST_CKPT, MANIFEST_NAME, add_item_stats, build_manifest, calibration_record,
                         fp_model_record, load_segment_models, new_segment_stats, peak_mem_bytes, read_manifest,
                         run_record, segment_record, warm_settings, warm_start_state, write_manifest,
                         write_segment, write_shared_files)


def diffusion_timesteps(config: str | Path | Mapping[str, Any] | None) -> int:
    """The number of diffusion timesteps of a model config (its ``diffusion`` section; 1000 without one)."""
    return 1000 if config is None else load_config(config).get("diffusion", {}).get("num_diffusion_timesteps", 1000)


class SegmentedModel(nn.Module):
    """K models, model k for the sampling steps ``segments[k]`` (step index 0 = the first, noisiest step) of the DDIM
    schedule ``seq`` (ascending t, as :func:`~mmqdiff.diffusion.timesteps` gives it and ``ddim_sample`` takes it).

    ``forward(x, t)`` runs, for each row, the model of the segment whose steps sample at that row's timestep;
    ``model_for_step`` is what ``ddim_sample(model_for_step, x_T, seq, betas)`` takes. ``models`` is a list of
    modules or, on the integer runtime, an :class:`~mmqdiff.quant.IntegerSegments`.
    """

    def __init__(self, segments: Sequence[range], models: Sequence[nn.Module] | IntegerSegments, seq: Sequence[int],
                 *, manifest: dict[str, Any] | None = None):
        super().__init__()
        self.segments = list(segments)
        self.step_segment = segment_of_step(self.segments)
        if len(models) != len(self.segments):
            raise ValueError(f"{len(models)} models for {len(self.segments)} segments")
        if len(seq) != len(self.step_segment):
            raise ValueError(f"a schedule of {len(seq)} timesteps for segments covering {len(self.step_segment)} "
                             "sampling steps")
        self.models = models if isinstance(models, IntegerSegments) else nn.ModuleList(models)
        self.seq = [int(t) for t in seq]
        self.manifest = manifest  # the run folder's, when loaded from one
        # set by calibrate, written by save: the run record, the segment records and, for segment_scope
        # "activations", the base quant state whose weights the segments share
        self._unsaved: tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None] | None = None
        self._segments_of_t: dict[int, set[int]] = {}
        for i, t in enumerate(reversed(self.seq)):  # quad schedules repeat some small t
            self._segments_of_t.setdefault(t, set()).add(self.step_segment[i])

    @property
    def k(self) -> int:
        return len(self.segments)

    @property
    def num_steps(self) -> int:
        return len(self.seq)

    @property
    def runtime(self) -> str:
        """"int" (int8 kernels), "fake" (fake-quant ``QuantizedUNet``s) or "fp" (anything else, e.g. FP models)."""
        if isinstance(self.models, IntegerSegments):
            return "int"
        for kind, cls in (("int", IntegerUNet), ("fake", QuantizedUNet)):
            if all(isinstance(m, cls) for m in self.models):
                return kind
        return "fp"

    def extra_repr(self) -> str:
        return f"k={self.k}, segments={[(r.start, r.stop) for r in self.segments]}, runtime={self.runtime!r}"

    def model_for_step(self, i: int) -> nn.Module:
        """The model of the segment that holds step index ``i``."""
        if not 0 <= i < self.num_steps:
            raise IndexError(f"step index {i} outside [0, {self.num_steps - 1}] ({self.num_steps} sampling steps)")
        return self.models[self.step_segment[i]]

    def segment_of_timestep(self, t: float) -> int:
        """The segment whose steps sample at timestep ``t``; errors name a t that is not in the schedule, or one the
        schedule repeats across a segment cut (then only the step index tells the model: ``model_for_step``)."""
        found = self._segments_of_t.get(t)  # a float t equals its int key
        if found is None:
            raise ValueError(f"timestep {t:g} is not in the sampling schedule ({self.num_steps} steps, t from "
                             f"{self.seq[-1]} down to {self.seq[0]}); each segment model answers only for its steps")
        if len(found) > 1:
            steps = [i for i, s in enumerate(reversed(self.seq)) if s == t]
            raise ValueError(f"timestep {t:g} is sampled at steps {steps}, which lie in segments {sorted(found)}: "
                             "pick the model by step index with model_for_step(i)")
        return next(iter(found))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise prediction for ``x`` [B, C, H, W] at timesteps ``t`` [B]. Rows whose t lie in different segments go
        through their own segment's model as one sub-batch each (fake-quant outputs may then differ in the last
        bits from a full-batch call: float kernels round by batch size)."""
        if t.dim() != 1 or len(t) != len(x):
            raise ValueError(f"t must hold one timestep per row of x ({len(x)} rows), got shape {tuple(t.shape)}")
        row_segment = [self.segment_of_timestep(v) for v in t.tolist()]
        if len(set(row_segment)) == 1:
            return self.models[row_segment[0]](x, t)
        which = torch.tensor(row_segment)
        out = None
        for s in sorted(set(row_segment)):
            rows = (which == s).nonzero().flatten().to(x.device)
            y = self.models[s](x[rows], t[rows])
            if out is None:
                out = y.new_empty((len(x), *y.shape[1:]))
            out[rows] = y
        return out

    # ------------------------------------------------------------------------------------------------- calibrate
    @classmethod
    def calibrate(cls, fp_model: nn.Module, quant_config: QuantConfig, calibration: CalibrationFile | str | Path,
                  settings: ReconSettings, *, cali_st: int, cali_n: int, k: int = 1,
                  boundaries: Sequence[int] | None = None, skip_type: str = "quad",
                  segment_scale: Sequence[float] | None = None, init_from: str | Path | None = None,
                  warm: WarmStart = WarmStart(), segment_scope: str = "full", seed: int = 1234,
                  model_config: str | Path | Mapping[str, Any] | None = None,
                  checkpoint: str | Path | None = None) -> SegmentedModel:
        """Calibrate one model per segment of the calibration file's sampling steps, as ``cli.py fit`` does.

        The file's step count is the schedule's (``timesteps(num_steps, skip_type)``; its ``ts`` must follow it).
        Segments come from ``timestep_segments(num_steps, k, boundaries)``; segment s calibrates on
        ``load_calibration(calibration, cali_st, cali_n, steps=segments[s])`` with ``settings`` (times
        ``segment_scale[s]``, if given) and ``seed``, so its bits equal segment s of a fit run with the same
        settings (same thread count on CPU; ``fp_model`` in eval mode, as fit loads it). ``init_from``: a finished
        K=1 run folder every segment starts from and fine-tunes as ``warm`` says (fit's ``init_from``).
        ``segment_scope="activations"`` (needs ``init_from``): every segment keeps that run's weight rounding exactly
        and calibrates only its activation step sizes (initialised again on its own pairs, ``settings.cali_iters_a``
        iterations per unit); ``save`` stores the shared weights once.
        ``model_config`` / ``checkpoint``: where ``fp_model`` came from, for the manifest (tools that reload the FP
        model by itself, such as the held-out error, read them; ``cli.py predict`` takes its own).
        """
        calib = calibration if isinstance(calibration, CalibrationFile) else CalibrationFile(calibration)
        seq = timesteps(calib.num_steps, skip_type, diffusion_timesteps(model_config))
        fp_sha256 = state_dict_sha256(fp_model)
        calib.check_image_shape((fp_model.in_channels, fp_model.resolution, fp_model.resolution))
        calib.check_meta(num_steps=calib.num_steps, skip_type=skip_type, model_sha256=fp_sha256)
        calib.check_schedule(seq)
        segments = timestep_segments(calib.num_steps, k, boundaries)
        scale = None if segment_scale is None else [float(f) for f in segment_scale]
        if scale is not None and len(scale) != k:
            raise ValueError(f"segment_scale has {len(scale)} factors for k={k} segments")
        if check_scope(segment_scope) == "activations" and init_from is None:
            raise ValueError("segment_scope 'activations' keeps the weight rounding of a finished K=1 run: pass "
                             "init_from")
        warm_record, init_state = (None, None) if init_from is None else \
            warm_start_state(init_from, fp_sha256, asdict(quant_config))
        device = next(fp_model.parameters()).device
        t_of_step = list(reversed(seq))
        start = time.perf_counter()
        models, records = [], []
        for s, steps in enumerate(segments):
            recon = settings if scale is None else settings.scaled(scale[s])
            xs, ts = calib.select(cali_st, cali_n, steps)
            stats = new_segment_stats()

            def count(item: ItemDone, stats: dict[str, Any] = stats) -> None:
                add_item_stats(stats, item.unit_name, item.phase, item.stats, peak_mem_bytes(device))
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            q = calibrate(fp_model, quant_config, xs, ts, recon, seed=seed, segment=s, callback=count,
                          init_state=init_state, warm=warm, scope=segment_scope)
            q.freeze()
            models.append(q)
            records.append(segment_record(s, steps, steps, t_of_step, recon, ts, stats, scope=segment_scope))
        run = run_record(num_steps=calib.num_steps, skip_type=skip_type, quant=quant_config, recon=settings,
                         seed=seed, segment_scale=scale, segment_scope=segment_scope,
                         init_from=None if warm_record is None else {**warm_record, "warm": warm_settings(
                             warm, segment_scope)},
                         units=list(models[0].unit_names),
                         fp_model=fp_model_record(model_config, checkpoint, fp_sha256),
                         calibration=calibration_record(calib.path, calibration_sha256(calib.path), cali_st, cali_n,
                                                        0, calib.meta),
                         wall_seconds=time.perf_counter() - start, device=device)
        model = cls(segments, models, seq)
        model._unsaved = (run, records, init_state if segment_scope == "activations" else None)
        return model

    # ------------------------------------------------------------------------------------------------- files
    def save(self, run_dir: str | Path, overwrite: bool = False) -> Path:
        """Write the run folder ``cli.py fit`` writes (``segment_XX/{quant_state,packed}.pt``, with segment_scope
        "activations" ``shared/`` once and only activation quantizers per segment; ``manifest.json`` with hashes);
        returns the manifest's path. Refuses a folder holding a run unless ``overwrite``."""
        if self._unsaved is None:
            raise ValueError("save() writes the models of SegmentedModel.calibrate; this model "
                             + (f"was loaded from a run folder, which is its saved form ({self.manifest['k']} "
                                "segments)" if self.manifest is not None else f"is on the {self.runtime!r} runtime "
                                "or was built from models directly") + "; save the calibrated model instead")
        run_dir = Path(run_dir)
        previous = [p for p in (run_dir / MANIFEST_NAME, run_dir / LAST_CKPT) if p.exists()]
        if previous and not overwrite:
            raise FileExistsError(f"{run_dir} holds a previous run ({', '.join(map(str, previous))}); choose another "
                                  "folder or pass overwrite=True")
        check_writable(run_dir)
        run, records, base = self._unsaved
        quant_act = self.models[0].config.quant_act
        entries = [write_segment(run_dir, record, q, quant_act, base) for record, q in zip(records, self.models)]
        shared = None if base is None else write_shared_files(run_dir, self.models[0], quant_act)
        return write_manifest(run_dir, build_manifest(run, entries, shared))

    @classmethod
    def load(cls, run_dir: str | Path, fp_model: nn.Module | None = None,
             device: str | torch.device = "cpu") -> SegmentedModel:
        """The fake-quant segment models of a run folder (hash-checked packed exports, frozen, eval mode, on
        ``device``); ``fp_model`` supplies the architecture (default: built from the config the manifest records)."""
        manifest = read_manifest(run_dir)
        config = manifest["fp_model"].get("config_dict")
        if fp_model is None and config is None:
            raise ValueError(f"{Path(run_dir) / MANIFEST_NAME}: records no FP model config; pass fp_model")
        segments, models = load_segment_models(run_dir, fp_model, device)
        seq = timesteps(manifest["num_steps"], manifest["skip_type"], diffusion_timesteps(config))
        return cls(segments, models, seq, manifest=manifest)

    # ------------------------------------------------------------------------------------------------- runtime
    def to_integer(self, backend: str | None = None, pack: str = "active") -> SegmentedModel:
        """The same segments on the int8 runtime (:class:`~mmqdiff.quant.IntegerSegments`: outputs equal
        ``to_integer`` of each model; ``pack`` says how many segments stay packed). The fake-quant models stay."""
        if self.runtime != "fake":
            raise TypeError(f"to_integer converts fake-quant segment models; these are on the {self.runtime!r} "
                            "runtime")
        return SegmentedModel(self.segments, IntegerSegments(self.models, backend, pack), self.seq,
                              manifest=self.manifest)

    def for_device(self, device: str | torch.device, runtime: str = "auto", pack: str = "active") -> SegmentedModel:
        """This model moved to ``device`` on the runtime :func:`~mmqdiff.quant.runtime.resolve_runtime` picks
        ("auto": int8 on CPU, fake-quant on a GPU). Where the int8 runtime cannot run these models (backend,
        configuration), the fake-quant model comes back with a warning that says why. FP models come back moved."""
        device = torch.device(device)
        if self.runtime == "int":
            raise TypeError("for_device starts from the fake-quant model (SegmentedModel.calibrate or load)")
        chosen = resolve_runtime(runtime, device)
        self.to(device)
        if self.runtime == "fp" or chosen == "fake":
            return self
        fp = self.models[0].model
        probe = (torch.zeros(1, fp.in_channels, fp.resolution, fp.resolution, device=device),
                 torch.full((1,), 500.0, device=device))
        try:
            integer = self.to_integer(pack=pack)
            with torch.no_grad():
                for s in range(self.k):  # one tiny forward: a backend that builds but cannot run is caught here
                    integer.models[s](*probe)
        except (IntegerUnsupported, RuntimeError) as e:
            warnings.warn(f"runtime 'fake' instead of 'int': {e}", stacklevel=2)
            return self
        return integer
