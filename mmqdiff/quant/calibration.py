"""Calibration as one call: ``calibrate(fp_model, quant_config, xs, ts, settings)`` returns a Q-Diffusion-calibrated
(BRECQ + AdaRound) ``QuantizedUNet``, and ``init_activation_ranges`` sets activation ranges from data alone.

Pure torch, no Lightning: ``mmqdiff.lightning.calibrate.SegmentCalibration`` drives the same
:class:`SegmentCalibrator` for each timestep segment, so ``calibrate(..., seed=s0, segment=k)`` gives the bits of
segment k of a Lightning run with seed s0 (same thread count on CPU). Work runs item by item (unit u's weight phase
for every u, then unit u's activation phase: :func:`~mmqdiff.quant.reconstruction.work_items`); every item is seeded
from (seed, segment, unit, phase) alone, so a calibration resumed from a :class:`ResumePoint` ends with the same bits
as one uninterrupted run.

``scope="activations"`` (:data:`SEGMENT_SCOPES`) calibrates only what drifts along the trajectory: starting from a
finished calibration's quant state, it keeps the weight rounding as it is (no weight phase) and re-runs the
activation init and the activation phase on this calibration's pairs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .model import QuantizedUNet, StateValue, load_quant_state, quant_state_dict, quantize_model
from .modules import QuantConfig
from .reconstruction import (Progress, ReconSettings, WarmStart, calibrate_item, init_act_quantizers, item_seed,
                             work_items)

# what a segment calibrates: "full" (AdaRound weight rounding and activation step sizes) or "activations" (only the
# activation step sizes, on a base calibration's weight rounding)
SEGMENT_SCOPES = ("full", "activations")


def check_scope(scope: str) -> str:
    if scope not in SEGMENT_SCOPES:
        raise ValueError(f"segment_scope must be one of {SEGMENT_SCOPES}, got {scope!r}")
    return scope


def calibration_items(num_units: int, quant_act: bool, scope: str = "full") -> list[tuple[int, str]]:
    """(unit index, phase) in calibration order for ``scope``: every unit's weight phase, then every unit's
    activation phase (:func:`~mmqdiff.quant.reconstruction.work_items`); "activations" keeps the activation phases
    only."""
    check_scope(scope)
    return [item for item in work_items(num_units, quant_act) if scope == "full" or item[1] == "act"]


@dataclass(frozen=True)
class ResumePoint:
    """Where a stopped calibration continues: the index of the next work item and the quant state after the items
    before it (plain tensors and scalars: ``torch.save(asdict(point))`` and ``ResumePoint(**torch.load(path,
    weights_only=True))`` round-trip it)."""

    next_item: int
    quant_state: dict[str, StateValue]


@dataclass(frozen=True)
class ItemDone:
    """What the per-item callback of :func:`calibrate` receives after each finished work item."""

    item: int  # index in work order; items 0..item are done
    num_items: int
    unit: int
    unit_name: str  # FP module path, e.g. "down.0.block.0"
    phase: str  # "weight" (AdaRound) or "act" (activation step sizes)
    stats: dict[str, float]  # rec_first, rec_last (reconstruction loss), round_loss (weight phase), seconds, ...
    qmodel: QuantizedUNet  # the model under calibration

    def resume_point(self) -> ResumePoint:
        """A checkpoint of the calibration after this item (the quant state is copied to the CPU)."""
        state = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                 for k, v in quant_state_dict(self.qmodel).items()}
        return ResumePoint(self.item + 1, state)


def _check_pairs(xs: torch.Tensor, ts: torch.Tensor) -> None:
    if xs.dim() != 4 or ts.dim() != 1 or len(xs) != len(ts) or len(xs) == 0:
        raise ValueError(f"calibration pairs must be xs [N, C, H, W] and ts [N] with N >= 1, got xs "
                         f"{tuple(xs.shape)} and ts {tuple(ts.shape)}")


class SegmentCalibrator:
    """One segment model's calibration, one work item at a time: what :func:`calibrate` loops over and the Lightning
    driver runs one item per training step.

    Args:
        fp_model: the FP ddim ``Model`` (left unchanged; its device is the compute device).
        quant_config: what to quantize (``quantize_model`` builds the model from a copy of ``fp_model``).
        settings: reconstruction hyperparameters and switches, passed whole to the engine.
        seed, segment: roots of every item's random streams (:func:`~mmqdiff.quant.reconstruction.item_seed`).
        init_state: warm start: a finished calibration's quant state (same FP architecture and config, e.g. a K=1
            run's model) loaded before the first item and fine-tuned as ``warm`` says, instead of the plain init.
        warm: how a warm start is fine-tuned (:class:`~mmqdiff.quant.reconstruction.WarmStart`); only with
            ``init_state``.
        scope: "full" (every work item) or "activations": ``init_state``'s weight rounding is kept exactly (no
            weight phase) and the activation ranges are initialised again on this calibration's pairs before its
            activation phase (``warm`` does not apply and must stay at its default).
        resume: continue a stopped calibration (its quant state must come from the same model and config).
    """

    def __init__(self, fp_model: nn.Module, quant_config: QuantConfig, settings: ReconSettings, *, seed: int,
                 segment: int = 0, init_state: dict[str, StateValue] | None = None, warm: WarmStart = WarmStart(),
                 scope: str = "full", resume: ResumePoint | None = None):
        self.fp_model, self.settings, self.seed, self.segment = fp_model, settings, seed, segment
        if check_scope(scope) == "activations":
            if init_state is None:
                raise ValueError("segment_scope 'activations' keeps the weight rounding of a finished calibration: "
                                 "give the calibration to start from (init_from / init_state)")
            if not quant_config.quant_act:
                raise ValueError("segment_scope 'activations' calibrates activation quantizers, but quantization "
                                 "config quant_act is false (nothing to calibrate)")
            if warm != WarmStart():
                raise ValueError(f"warm {warm} fine-tunes a weight phase and kept activation ranges; segment_scope "
                                 "'activations' runs no weight phase and initialises the activation ranges again: "
                                 "leave warm at its default")
        self.qmodel = quantize_model(fp_model, quant_config).eval()
        self.items = calibration_items(len(self.qmodel.unit_names), quant_config.quant_act, scope)
        self.next_item = 0
        self.warm = None if init_state is None or scope == "activations" else warm
        if init_state is not None:
            load_quant_state(self.qmodel, init_state)
        if resume is not None:
            self.resume(resume)

    def resume(self, point: ResumePoint) -> None:
        """Continue from ``point`` (its quant state must come from the same FP architecture and config)."""
        if not 0 <= point.next_item <= len(self.items):
            raise ValueError(f"resume point: next_item {point.next_item} outside [0, {len(self.items)}] (this model "
                             f"has {len(self.items)} work items)")
        load_quant_state(self.qmodel, point.quant_state)
        self.next_item = point.next_item

    @property
    def done(self) -> bool:
        return self.next_item >= len(self.items)

    def run_item(self, xs: torch.Tensor, ts: torch.Tensor, progress: Progress | None = None) -> ItemDone:
        """Run the next work item on the calibration pairs (xs [N, C, H, W], ts [N]; any device)."""
        if self.done:
            raise RuntimeError(f"all {len(self.items)} work items are done")
        _check_pairs(xs, ts)
        unit, phase = self.items[self.next_item]
        start = time.perf_counter()
        stats = calibrate_item(self.qmodel, self.fp_model, xs, ts, unit, phase, self.settings,
                               item_seed(self.seed, self.segment, unit, phase), progress, self.warm)
        stats["item_seconds"] = time.perf_counter() - start
        done = ItemDone(self.next_item, len(self.items), unit, self.qmodel.unit_names[unit], phase, stats,
                        self.qmodel)
        self.next_item += 1
        return done


def calibrate(fp_model: nn.Module, quant_config: QuantConfig | None, xs: torch.Tensor, ts: torch.Tensor,
              settings: ReconSettings | None = None, *, seed: int = 1234, segment: int = 0,
              callback: Callable[[ItemDone], None] | None = None, progress: Progress | None = None,
              init_state: dict[str, StateValue] | None = None, warm: WarmStart = WarmStart(),
              scope: str = "full", resume: ResumePoint | None = None) -> QuantizedUNet:
    """Quantize ``fp_model`` and calibrate it on the pairs (xs [N, C, H, W] model inputs x_t, ts [N] timesteps):
    Q-Diffusion's block-wise reconstruction, every unit's AdaRound weight phase, then every unit's activation
    step-size phase (see :mod:`mmqdiff.quant.reconstruction`). ``fp_model`` is not modified; its device is used.

    Returns the calibrated ``QuantizedUNet`` with the FP model's ``forward(x, t)``, in eval mode: weights at their
    learned (hard) rounding, activations quantized with learned step sizes (unless ``quant_config.quant_act`` is
    False). Call ``freeze()`` on it before sampling to quantize each weight once.

    ``quant_config``/``settings``: None means the defaults (W4A8; the reference CIFAR-10 run's 20000/5000
    iterations). ``seed``/``segment`` seed every item. ``callback(item)`` runs after every work item with an
    :class:`ItemDone` (progress, losses, ``item.resume_point()`` for a checkpoint); an exception it raises stops the
    calibration. ``progress(iteration, iterations, loss)`` is called inside items. ``init_state`` / ``warm``: start
    from a finished calibration's quant state and fine-tune it (:class:`SegmentCalibrator`); ``scope="activations"``
    keeps its weight rounding and calibrates the activation step sizes only. ``resume`` continues from a
    :class:`ResumePoint` with the bits of an uninterrupted run.
    """
    _check_pairs(xs, ts)
    calibrator = SegmentCalibrator(fp_model, quant_config or QuantConfig(), settings or ReconSettings(), seed=seed,
                                   segment=segment, init_state=init_state, warm=warm, scope=scope, resume=resume)
    while not calibrator.done:
        item = calibrator.run_item(xs, ts, progress)
        if callback is not None:
            callback(item)
    return calibrator.qmodel


def init_activation_ranges(qmodel: QuantizedUNet, xs: torch.Tensor, ts: torch.Tensor, *, samples: int = 64,
                           seed: int = 0) -> QuantizedUNet:
    """Set every activation quantizer's range from data, without reconstruction: the reference activation init, one
    fully quantized forward over ``samples`` pairs drawn at random (seeded) from (xs, ts), each quantizer taking the
    per-tensor range of everything it sees ('max' or 'mse' per ``QuantConfig.act_init``). Weights are quantized with
    their current rounding meanwhile (nearest right after ``quantize_model``). Leaves weight and activation
    quantization on; returns ``qmodel``."""
    _check_pairs(xs, ts)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    init_act_quantizers(qmodel, xs, ts, samples=samples, generator=torch.Generator().manual_seed(seed))
    return qmodel
