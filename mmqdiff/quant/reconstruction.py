"""Block-wise reconstruction (Q-Diffusion / BRECQ: q-diffusion@715783d
``qdiff/block_recon.py``, ``qdiff/layer_recon.py``, ``qdiff/utils.py``): caching a unit's inputs and
targets, the AdaRound weight phase, the activation step-size phase, and one calibration work item of a segment.

Pure torch. Every random draw (minibatches, the activation-init subset, dropout in reference train mode) comes from
a generator seeded by the caller, so a unit's result does not depend on global RNG state or on which process runs it.

Deviations from the reference, each with the switch that restores it (see :class:`ReconSettings`):
  - ``eval_mode=True``: networks stay in eval mode while reconstructing (the reference leaves them in train mode, so
    Dropout(0.1) is active against targets cached in eval mode); ``False`` restores train mode.
  - ``cache_device="auto"``: the unit cache stays on the compute device when it fits (the reference keeps it on the
    host and copies every minibatch over); ``"cpu"`` restores that.
  - ``cache_dtype``: "float32" by default (as the reference); "float16"/"bfloat16" halves cache memory (lossy).
  - ``cache_batch_size``: caching forwards run 256 samples at a time (the reference hard-codes 8): the same
    per-sample computation in fewer calls (last-bit differences are possible where a backend picks kernels by batch
    size); 8 restores the reference.
  - The cache is filled in place (no list-then-cat copy), so it needs 1x, not 2x, its size.
  - Only the optimised tensors require grad during a phase (the reference also builds weight gradients it never uses);
    this changes speed, not results.
The unit order (reference: module registration) is ``QuantConfig.unit_order``.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .blocks import QuantAttnBlock
from .model import QuantizedUNet
from .modules import (act_quantizers, adaround_quantizers, init_adaround, reset_act_quantizers, set_quant_state,
                      set_rounding, soften_adaround)
from .quantizers import LinearTempDecay

PHASES = ("weight", "act")
AUTO_CACHE_FRACTION = 0.5  # "auto" keeps a cache on the GPU when it needs at most this share of free memory
CHECK_EVERY = 25  # iterations between loss read-backs (finiteness check, progress); reading every step syncs a GPU
Progress = Callable[[int, int, float], None]  # (iteration, iterations, loss)


class NonFiniteLossError(RuntimeError):
    """A reconstruction loss became NaN or inf; the message names the unit."""


def lp_loss(pred: torch.Tensor, tgt: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``|pred - tgt|^p`` summed over channels (dim 1), averaged over batch and space (the reference ``lp_loss``)."""
    return (pred - tgt).abs().pow(p).sum(1).mean()


@dataclass
class UnitCache:
    """A unit's positional inputs (``(x, temb)`` for ResnetBlocks, ``(x,)`` otherwise) and target outputs."""

    inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor

    def __len__(self) -> int:
        return self.target.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.inputs, self.target))

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Rows ``idx`` as float32 on ``device``."""
        idx = idx.to(self.target.device)
        take = lambda t: t[idx].to(device=device, dtype=torch.float32, non_blocking=True)  # noqa: E731
        return tuple(take(t) for t in self.inputs), take(self.target)


class _StopForward(Exception):
    """Raised by a caching hook: nothing after the unit needs to run (the reference's StopForwardException)."""


def _store_device(policy: str | torch.device, compute: torch.device, nbytes: int) -> torch.device:
    if str(policy) != "auto":
        return torch.device(policy)
    if compute.type == "cuda" and nbytes > AUTO_CACHE_FRACTION * torch.cuda.mem_get_info(compute)[0]:
        return torch.device("cpu")
    return compute


class _Recorder:
    """Forward hook body that writes a unit's positional inputs and/or output into preallocated ``[N, ...]`` buffers
    (filled in place: no per-batch list and final ``cat``, which would need twice the memory) and stops the forward.
    The first batch fixes the store device, sized by everything the unit reads and writes (inputs and output)."""

    def __init__(self, n: int, inputs: bool, output: bool, dtype: torch.dtype, device: Callable[[int], torch.device]):
        self.n, self.inputs, self.output, self.dtype, self.device = n, inputs, output, dtype, device
        self.buffers: list[torch.Tensor] = []
        self.pos = 0

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor | None = None) -> None:
        parts = [a.detach() for a in args] + ([] if output is None else [output.detach()])
        keep = (parts[:len(args)] if self.inputs else []) + (parts[len(args):] if self.output else [])
        if not self.buffers:
            per_sample = sum(p[0].numel() for p in parts) * torch.empty((), dtype=self.dtype).element_size()
            device = self.device(per_sample * self.n)
            self.buffers = [torch.empty((self.n, *p.shape[1:]), dtype=self.dtype, device=device) for p in keep]
        for buf, part in zip(self.buffers, keep):
            buf[self.pos:self.pos + part.shape[0]].copy_(part)
        raise _StopForward


@torch.no_grad()
def _capture(model: nn.Module, module: nn.Module, xs: torch.Tensor, ts: torch.Tensor, batch_size: int,
             recorder: _Recorder) -> list[torch.Tensor]:
    """Run ``model`` over (xs, ts) in batches of ``batch_size`` in eval mode (as the reference caches), each forward
    stopped at ``module`` by ``recorder``; returns its buffers."""
    device = next(model.parameters()).device
    hook = (module.register_forward_hook(recorder) if recorder.output
            else module.register_forward_pre_hook(recorder))  # inputs only: the unit itself need not run
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(xs), batch_size):
            recorder.pos = start
            try:
                model(xs[start:start + batch_size].to(device), ts[start:start + batch_size].to(device))
            except _StopForward:
                continue
            raise RuntimeError(f"the forward pass never reached {type(module).__name__}")
    finally:
        hook.remove()
        model.train(was_training)
    return recorder.buffers


def cache_unit_io(q_model: QuantizedUNet, fp_model: nn.Module, unit_name: str, xs: torch.Tensor, ts: torch.Tensor,
                  *, asym: bool, act_quant: bool = False, batch_size: int = 256,
                  store_device: str | torch.device = "auto", store_dtype: torch.dtype = torch.float32) -> UnitCache:
    """Inputs and FP targets of unit ``unit_name`` (FP module path) over the calibration pairs (xs, ts).

    Targets always come from ``fp_model``. With ``asym`` the inputs come from ``q_model`` with weight quantization on
    and activation quantization per ``act_quant`` (left so afterwards), so units before this one act with their
    current rounding (calibrated: hard, not yet: nearest), as in the reference's weight phase; without ``asym`` they
    come from ``fp_model`` (activation phase). ``store_device="auto"``: the compute device if the cache needs at most
    ``AUTO_CACHE_FRACTION`` of its free memory, else host memory.
    """
    compute = next(fp_model.parameters()).device
    chosen: list[torch.device] = []

    def device(nbytes: int) -> torch.device:
        if not chosen:
            chosen.append(_store_device(store_device, compute, nbytes))
        return chosen[0]

    fp = _capture(fp_model, fp_model.get_submodule(unit_name), xs, ts, batch_size,
                  _Recorder(len(xs), not asym, True, store_dtype, device))
    if not asym:
        return UnitCache(tuple(fp[:-1]), fp[-1])
    q_model.set_quant_state(True, act_quant)
    q_model.freeze()  # quantize each weight once for all caching batches, not once per batch
    try:
        inputs = _capture(q_model, q_model.model.get_submodule(unit_name), xs, ts, batch_size,
                          _Recorder(len(xs), True, False, store_dtype, device))
    finally:
        q_model.unfreeze()
    return UnitCache(tuple(inputs), fp[0])


@contextlib.contextmanager
def _training(module: nn.Module, params: Sequence[torch.Tensor], train_mode: bool) -> Iterator[None]:
    """Only ``params`` require grad and the module is in train/eval mode as asked; both restored afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    module.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    module.train(train_mode)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


LossFn = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]  # -> (total, reconstruction)


def _optimise(unit: nn.Module, cache: UnitCache, loss_fn: LossFn,
              opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler | None, *, iters: int,
              batch_size: int, generator: torch.Generator, name: str, phase: str,
              progress: Progress | None, autocast: str = "none") -> dict[str, float]:
    """The shared minibatch loop; iteration ``t`` counts from 1 as the reference's loss counter does. Returns the
    minibatch reconstruction error (without the rounding term) at the first and last iteration, and the seconds.
    ``autocast`` "bfloat16" runs the unit's forward (and so its backward) under ``torch.autocast``; the loss is
    taken in float32."""
    device = next(unit.parameters()).device
    rec_first = rec = float("nan")
    start = time.perf_counter()
    for t in range(1, iters + 1):
        idx = torch.randperm(len(cache), generator=generator)[:batch_size]
        inputs, target = cache.batch(idx, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bfloat16"):
            out = unit(*inputs)
        loss, rec_loss = loss_fn(out.float(), target, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if t == 1 or t % CHECK_EVERY == 0 or t == iters:
            value, rec = loss.item(), rec_loss.item()
            if not math.isfinite(value):
                raise NonFiniteLossError(f"unit {name}: {phase}-phase loss is {value} at iteration {t}/{iters}")
            if t == 1:
                rec_first = rec
            if progress is not None:
                progress(t, iters, rec)
    return {"rec_first": rec_first, "rec_last": rec, "iters": iters, "seconds": time.perf_counter() - start}


def reconstruct_weights(unit: nn.Module, cache: UnitCache, *, iters: int, batch_size: int = 32, lr: float = 1e-3,
                        reg_weight: float = 0.01, b_range: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2,
                        generator: torch.Generator, train_mode: bool = False, name: str = "unit",
                        progress: Progress | None = None, warm: WarmStart | None = None,
                        autocast: str = "none") -> dict[str, float]:
    """AdaRound phase (3.6): Adam on the alphas of every weight quantizer in ``unit``; loss = ``lp_loss(p=2)`` +
    ``reg_weight * sum(round_loss(b))`` over regularized quantizers, zero during the warm-up, ``b`` from
    :class:`LinearTempDecay`. Ends with hard rounding. Activation quantization is off in this phase. Stats add
    ``round_loss``: the regulariser ``sum(round_loss(b))`` at the final ``b``, before hardening.

    The alphas start from the weights (soft rounding reproduces them, the reference), or with ``warm`` from the
    unit's current (loaded) rounding: see :class:`WarmStart`."""
    set_quant_state(unit, True, False)
    if warm is None:
        init_adaround(unit)
    elif warm.soft_margin is not None:
        soften_adaround(unit, warm.soft_margin)
    set_rounding(unit, "soft")
    quantizers = adaround_quantizers(unit)
    regularized = [q for q in quantizers if q.regularized]
    decay = LinearTempDecay(iters, warm_up=warmup, start_b=b_range[0], end_b=b_range[1])

    def loss_fn(out: torch.Tensor, target: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        rec = lp_loss(out, target, 2.0)
        if not decay.regularizing(t):
            return rec, rec
        b = decay(t)
        return rec + reg_weight * sum(q.round_loss(b) for q in regularized), rec

    params = [q.alpha for q in quantizers]
    with _training(unit, params, train_mode):
        stats = _optimise(unit, cache, loss_fn, torch.optim.Adam(params, lr=lr), None, iters=iters,
                          batch_size=batch_size, generator=generator, name=name, phase="weight", progress=progress,
                          autocast=autocast)
    with torch.no_grad():  # how far the soft rounding still is from hard (0: every weight decided), unweighted
        stats["round_loss"] = float(sum(q.round_loss(decay(iters)) for q in regularized))
    set_rounding(unit, "hard")
    return stats


def learnable_act_quantizers(unit: nn.Module) -> list[nn.Module]:
    """Activation quantizers whose step size the activation phase learns: all of them, except a 16-bit attention
    softmax quantizer (the reference learns ``act_quantizer_w`` only when ``sm_abit != 16``)."""
    skip = {id(m.act_quantizer_w) for m in unit.modules() if isinstance(m, QuantAttnBlock)
            and m.act_quantizer_w.n_bits == 16}
    return [q for q in act_quantizers(unit) if id(q) not in skip]


def reconstruct_activations(unit: nn.Module, cache: UnitCache, *, iters: int, batch_size: int = 32, lr: float = 4e-4,
                            p: float = 2.4, generator: torch.Generator, train_mode: bool = False, name: str = "unit",
                            progress: Progress | None = None, autocast: str = "none") -> dict[str, float]:
    """Activation phase (3.7): Adam with cosine decay to 0 on the step sizes (zero points stay), ``lp_loss(p)``,
    weights at their hard rounding, activations quantized. Quantizers must be initialised already."""
    set_quant_state(unit, True, True)
    quantizers = learnable_act_quantizers(unit)
    if not all(q.inited for q in quantizers):
        raise RuntimeError(f"unit {name}: activation quantizers are not initialised; run the init forward first")
    params = [q.delta for q in quantizers]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0)
    with _training(unit, params, train_mode):
        return _optimise(unit, cache, lambda out, target, t: (lp_loss(out, target, p),) * 2, opt, sched, iters=iters,
                         batch_size=batch_size, generator=generator, name=name, phase="act", progress=progress,
                         autocast=autocast)


@torch.no_grad()
def init_act_quantizers(q_model: QuantizedUNet, xs: torch.Tensor, ts: torch.Tensor, *, samples: int,
                        generator: torch.Generator, train_mode: bool = False) -> None:
    """The reference activation init (q-diffusion@715783d
    ``scripts/sample_diffusion_ddim.py``, the ``--quant_act`` branch of ``main``): one fully quantized forward on ``samples`` random calibration pairs,
    so every activation quantizer takes its per-tensor range over all of them (mixing timesteps)."""
    device = next(q_model.parameters()).device
    idx = torch.randperm(len(xs), generator=generator)[:samples]
    reset_act_quantizers(q_model)
    q_model.set_quant_state(True, True)
    was_training = q_model.training
    q_model.train(train_mode)
    try:
        q_model(xs[idx].to(device), ts[idx].to(device))
    finally:
        q_model.train(was_training)


@dataclass(frozen=True)
class WarmStart:
    """How a calibration that starts from another calibration's quant state (e.g. each segment of a K>1 run from a
    finished K=1 run) fine-tunes it, instead of starting from the plain init (nearest rounding, activation ranges
    from one forward).

    ``soft_margin``: the weight phase re-sets each alpha from the loaded hard rounding at h = 0.5 +- soft_margin, so
    it starts at the loaded decisions but can still change them (AdaRound ends with most alphas on the flat ends of
    the rectified sigmoid, where the gradient is zero: 92% of the embedded K=1 run's weights); None keeps the loaded
    alphas as they are (only the unsaturated ones can move). ``act_init``: the first activation item re-runs the
    activation init forward on this calibration's pairs (new ranges); False keeps the loaded step sizes and
    fine-tunes them.
    """

    soft_margin: float | None = 0.4
    act_init: bool = False

    def __post_init__(self) -> None:
        if self.soft_margin is not None and not 0 < self.soft_margin < 0.5:
            raise ValueError(f"WarmStart.soft_margin must be in (0, 0.5) or None, got {self.soft_margin!r}")


@dataclass(frozen=True)
class ReconSettings:
    """Reconstruction hyperparameters (defaults: the reference CIFAR-10 run) and the improvement switches."""

    cali_iters: int = 20000
    cali_iters_a: int = 5000
    batch_size: int = 32
    lr_w: float = 1e-3
    lr_a: float = 4e-4
    p: float = 2.4
    reg_weight: float = 0.01
    b_start: float = 20.0
    b_end: float = 2.0
    warmup: float = 0.2
    act_init_samples: int = 64
    eval_mode: bool = True
    cache_device: str = "auto"
    cache_dtype: str = "float32"
    cache_batch_size: int = 256
    autocast: str = "none"  # "bfloat16": reconstruction forward/backward under torch.autocast (a speed switch)

    def scaled(self, factor: float) -> ReconSettings:
        """These settings with both iteration counts times ``factor`` (rounded, at least 1 unless 0): a segment's share of a
        per-segment budget, at the same schedule shape (warm-up fraction, temperature range, learning rates)."""
        if not factor > 0:
            raise ValueError(f"iteration scale must be > 0, got {factor}")
        return replace(self, cali_iters=max(min(1, self.cali_iters), round(self.cali_iters * factor)),
                       cali_iters_a=max(min(1, self.cali_iters_a), round(self.cali_iters_a * factor)))

    def __post_init__(self) -> None:
        if self.autocast not in ("none", "bfloat16"):
            raise ValueError(f"autocast must be 'none' or 'bfloat16', got {self.autocast!r}")
        if self.cache_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"cache_dtype must be float32, float16 or bfloat16, got {self.cache_dtype!r}")
        for name in ("cali_iters", "cali_iters_a"):  # 0: the phase keeps its start (init or warm start) unoptimised
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "act_init_samples", "cache_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_w", "lr_a"):
            if not (isinstance(getattr(self, name), (int, float)) and 0 < getattr(self, name) < math.inf):
                raise ValueError(f"ReconSettings.{name} (a learning rate) must be a finite number > 0, "
                                 f"got {getattr(self, name)!r}")
        if self.cache_device != "auto":
            try:
                torch.device(self.cache_device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"ReconSettings.cache_device must be 'auto' or a torch device such as 'cpu', 'cuda' "
                                 f"or 'cuda:1', got {self.cache_device!r}") from e


def work_items(num_units: int, quant_act: bool) -> list[tuple[int, str]]:
    """(unit index, phase) in calibration order: every unit's weight phase, then (with activation quantization) every
    unit's activation phase, as the reference runs them (q-diffusion@715783d ``scripts/sample_diffusion_ddim.py``, ``main``)."""
    return [(u, "weight") for u in range(num_units)] + ([(u, "act") for u in range(num_units)] if quant_act else [])


def item_seed(seed: int, segment: int, unit: int, phase: str) -> int:
    """Seed of one work item's RNG streams: a function of (seed, segment, unit, phase) only."""
    return int(np.random.SeedSequence([seed, segment, unit, PHASES.index(phase)]).generate_state(1, np.uint64)[0] >> 1)


def calibrate_item(q_model: QuantizedUNet, fp_model: nn.Module, xs: torch.Tensor, ts: torch.Tensor, unit: int,
                   phase: str, settings: ReconSettings, seed: int, progress: Progress | None = None,
                   warm: WarmStart | None = None) -> dict[str, float]:
    """One work item of one segment: cache the unit's data, then run its weight or activation phase (the activation
    init forward is part of the first activation item, unless ``warm`` keeps the loaded ranges). ``warm``: the model
    holds a loaded solution to fine-tune (:class:`WarmStart`). Deterministic given ``seed`` (see
    :func:`item_seed`)."""
    name, module = q_model.units()[unit]
    generator = torch.Generator().manual_seed(seed)
    s = settings
    device = next(fp_model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout draws in reference train mode
        if phase == "act" and unit == 0 and (warm is None or warm.act_init):
            init_act_quantizers(q_model, xs, ts, samples=s.act_init_samples, generator=generator,
                                train_mode=not s.eval_mode)
        cache = cache_unit_io(q_model, fp_model, name, xs, ts, asym=phase == "weight", act_quant=phase == "act",
                              batch_size=s.cache_batch_size, store_device=s.cache_device,
                              store_dtype=getattr(torch, s.cache_dtype))
        if phase == "weight":
            stats = reconstruct_weights(module, cache, iters=s.cali_iters, batch_size=s.batch_size, lr=s.lr_w,
                                        reg_weight=s.reg_weight, b_range=(s.b_start, s.b_end), warmup=s.warmup,
                                        generator=generator, train_mode=not s.eval_mode, name=name, progress=progress,
                                        warm=warm, autocast=s.autocast)
        else:
            stats = reconstruct_activations(module, cache, iters=s.cali_iters_a, batch_size=s.batch_size, lr=s.lr_a,
                                            p=s.p, generator=generator, train_mode=not s.eval_mode, name=name,
                                            progress=progress, autocast=s.autocast)
    q_model.set_quant_state(True, phase == "act")
    return {**stats, "cache_bytes": cache.nbytes}
