"""Fake quantizers: uniform affine (Q-Diffusion ``UniformAffineQuantizer``) and AdaRound, plus the AdaRound
temperature schedule.

Both quantizers map ``x`` to integer levels ``q = clamp(round(x/delta) + zp, qmin, qmax)`` and back to
``(q - zp) * delta``; AdaRound only replaces how ``x/delta`` is rounded, so the two share range, clamp and init code.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

GAMMA, ZETA = -0.1, 1.1  # rectified-sigmoid stretch of AdaRound (AR:35)
MIN_DELTA = 1e-8  # the reference floors step sizes here (QL:155)
MSE_STEPS, MSE_SHRINK, MSE_P = 80, 0.01, 2.4  # 'mse' init: 80 ranges shrinking by 1% each, scored with an Lp-2.4 error
INIT_METHODS = ("max", "mse")
ROUNDING_MODES = ("nearest", "soft", "hard")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient, so step sizes learn through the rounding (LSQ without grad scale)."""
    return (x.round() - x).detach() + x


def level_range(n_bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer clamp range as in the reference: asymmetric [0, 2^b-1]; symmetric [-2^(b-1), 2^(b-1)-1]."""
    if symmetric:
        n_levels = 2 ** (n_bits - 1) - 1
        return -n_levels - 1, n_levels
    return 0, 2 ** n_bits - 1


def max_init(x_min: torch.Tensor, x_max: torch.Tensor, n_bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference 'max' rule on per-channel (or 0-d) raw minima/maxima, computed in float64 as the reference does
    with Python floats.

    Symmetric: ``delta = max(|min(x_min,0)|, max(x_max,0)) / (2^(b-1)-1)``, ``zp = 0``. Asymmetric (quirk kept): delta
    from the *unclipped* range ``(x_max - x_min) / (2^b - 1)`` but ``zp = round(-min(x_min, 0)/delta)``, so all-positive
    tensors get zp = 0 and lose the top of their range.
    """
    x_min, x_max = x_min.double(), x_max.double()
    lo, hi = x_min.clamp(max=0), x_max.clamp(min=0)
    qmin, qmax = level_range(n_bits, symmetric)
    delta = torch.maximum(lo.abs(), hi) / qmax if symmetric else (x_max - x_min) / qmax
    if bool((delta < MIN_DELTA).any()):
        warnings.warn(f"quantization range close to zero; step size floored at {MIN_DELTA}", stacklevel=3)
        delta = delta.clamp(min=MIN_DELTA)
    zp = torch.zeros_like(delta) if symmetric else torch.round(-lo / delta)
    return delta.float(), zp.float()


def mse_init(rows: torch.Tensor, n_bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference 'mse' search (QL:162-190), vectorised over rows (channels): 80 ranges ``[min, max]*(1-0.01i)``,
    each scored by ``mean(|x - q(x)|^2.4)`` per row; the first best wins.

    Asymmetric matches the reference exactly (float32, true min/max, clamp [0, 2^b-1]). Symmetric deviates on purpose:
    the reference combines the asymmetric grid with the symmetric level count (clamp [0, 126] with zp != 0), which is
    inconsistent and unused by any released config; here the symmetric grid shrinks ``absmax`` with zp = 0.
    """
    qmin, qmax = level_range(n_bits, symmetric)
    x_min, x_max = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    if symmetric:
        x_max = torch.maximum(x_min.abs(), x_max)
    best = torch.full_like(x_min, float("inf"))
    best_delta, best_zp = torch.ones_like(x_min), torch.zeros_like(x_min)
    for i in range(MSE_STEPS):
        scale = 1.0 - i * MSE_SHRINK
        new_max = x_max * scale
        if symmetric:
            delta, zp = (new_max / qmax).clamp(min=MIN_DELTA), torch.zeros_like(new_max)
        else:
            new_min = x_min * scale
            delta = ((new_max - new_min) / qmax).clamp(min=MIN_DELTA)
            zp = (-new_min / delta).round()
        q = (torch.clamp(torch.round(rows / delta) + zp, qmin, qmax) - zp) * delta
        score = (rows - q).abs().pow(MSE_P).mean(1, keepdim=True)
        better = score < best
        best = torch.where(better, score, best)
        best_delta, best_zp = torch.where(better, delta, best_delta), torch.where(better, zp, best_zp)
    return best_delta.squeeze(1), best_zp.squeeze(1)


class UniformAffineQuantizer(nn.Module):
    """Uniform affine fake quantizer, per tensor or per output channel (dim 0).

    Initialises lazily on its first forward (activations: per tensor over the whole batch seen, as the reference) or
    explicitly via :meth:`init_from` (weights, at build time). With ``learn_delta`` the step size is an
    ``nn.Parameter`` from construction (a placeholder until init) so optimisers and state keys never change shape; the
    zero point is a buffer and never learned.
    """

    def __init__(self, n_bits: int = 8, symmetric: bool = False, channel_wise: bool = False, init: str = "max",
                 learn_delta: bool = False):
        super().__init__()
        if not 1 <= n_bits <= 16 or (symmetric and n_bits < 2):
            raise ValueError(f"unsupported bit width {n_bits} (symmetric={symmetric})")
        if init not in INIT_METHODS:
            raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
        self.n_bits, self.symmetric, self.channel_wise, self.init_method = n_bits, symmetric, channel_wise, init
        self.qmin, self.qmax = level_range(n_bits, symmetric)
        self.inited = False
        if learn_delta:
            self.delta = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("delta", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.inited:
            self.init_from(x)
        q = self.levels(x)
        if q.requires_grad:
            return (q - self.zero_point) * self.delta
        return q.sub_(self.zero_point).mul_(self.delta)  # same ops in place: ~5x faster without autograd on CPU

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """Integer levels (as floats) in [qmin, qmax], before the affine map back."""
        q = self.round(x)  # always a fresh tensor, so the in-place path never touches x
        if q.requires_grad:
            return torch.clamp(q + self.zero_point, self.qmin, self.qmax)
        return q.add_(self.zero_point).clamp_(self.qmin, self.qmax)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """``round(x/delta)``, straight-through under autograd. Both paths give identical values: ``(round(y) - y) + y``
        is exactly ``round(y)`` in floating point (the difference is exact by Sterbenz's lemma, the sum representable)."""
        scaled = x / self.delta
        return round_ste(scaled) if scaled.requires_grad else scaled.round_()

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Set delta and zero point from ``x`` with the configured rule (vectorised over channels)."""
        x = x.detach()
        rows = x.reshape(x.shape[0], -1) if self.channel_wise else x.reshape(1, -1)
        if self.init_method == "max":
            delta, zp = max_init(rows.amin(1), rows.amax(1), self.n_bits, self.symmetric)
        else:
            delta, zp = mse_init(rows.float(), self.n_bits, self.symmetric)
        shape = (-1,) + (1,) * (x.dim() - 1) if self.channel_wise else ()
        delta, zp = delta.reshape(shape).to(x.device), zp.reshape(shape).to(x.device)
        if isinstance(self.delta, nn.Parameter):
            self.delta.data = delta
        else:
            self.delta = delta
        self.zero_point = zp
        self.inited = True

    def get_extra_state(self) -> dict[str, Any]:
        return {"inited": self.inited}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.inited = bool(state["inited"])

    def extra_repr(self) -> str:
        return (f"n_bits={self.n_bits}, symmetric={self.symmetric}, channel_wise={self.channel_wise}, "
                f"init={self.init_method}")


class AdaRoundQuantizer(UniformAffineQuantizer):
    """Per-output-channel weight quantizer with learnable rounding (AdaRound, AR:9-78).

    Range (delta, zp) is fixed at construction from the weight; only ``alpha`` learns. Rounding ``mode``:
    ``nearest`` (plain min/max rounding, the state right after build), ``soft`` (floor + h(alpha), used while
    optimising) or ``hard`` (floor + [alpha >= 0], the result after reconstruction). ``regularized`` says whether the
    rounding regulariser should include this quantizer (the reference skips the split second half).
    """

    def __init__(self, weight: torch.Tensor, n_bits: int = 4, symmetric: bool = False, init: str = "max",
                 regularized: bool = True):
        super().__init__(n_bits, symmetric, channel_wise=True, init=init)
        self.regularized = regularized
        self.mode = "nearest"
        self.init_from(weight)
        self.alpha = nn.Parameter(torch.zeros_like(weight))
        self.init_alpha(weight)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in ROUNDING_MODES:
            raise ValueError(f"rounding mode must be one of {ROUNDING_MODES}, got {mode!r}")
        self._mode = mode

    @torch.no_grad()
    def init_alpha(self, weight: torch.Tensor) -> None:
        """Set alpha so that h(alpha) equals the fractional part of ``weight/delta`` and soft rounding gives back the
        weight (wherever the grid does not clip it)."""
        scaled = weight.detach() / self.delta
        rest = scaled - torch.floor(scaled)
        self.alpha.data = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)

    @torch.no_grad()
    def soften_hard(self, margin: float) -> None:
        """Re-set alpha from the current hard rounding so that h(alpha) = 0.5 + margin where it rounds up and
        0.5 - margin where it rounds down: the same hard decisions, but off the rectified sigmoid's flat ends (where
        AdaRound leaves most alphas, with zero gradient), so a further optimisation can still move them."""
        if not 0 < margin < 0.5:
            raise ValueError(f"soft margin must be in (0, 0.5) (h = 0.5 +- margin strictly inside (0, 1)), got {margin}")
        h = torch.where(self.alpha >= 0, 0.5 + margin, 0.5 - margin)
        self.alpha.data = -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)

    def h(self) -> torch.Tensor:
        """Rectified sigmoid in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            return super().round(x)
        up = self.h() if self.mode == "soft" else (self.alpha >= 0).to(x.dtype)
        return torch.floor(x / self.delta) + up

    def round_loss(self, b: float) -> torch.Tensor:
        """AdaRound regulariser ``sum(1 - |2h(alpha) - 1|^b)``; pushes h towards 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(b)).sum()

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "mode": self.mode, "regularized": self.regularized}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.mode, self.regularized = str(state["mode"]), bool(state["regularized"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}, regularized={self.regularized}"


class LinearTempDecay:
    """Temperature ``b`` of the rounding regulariser (BR:235-252): ``start_b`` until ``warm_up*t_max``, then linear
    down to ``end_b`` at ``t_max``. The regulariser itself is zero during the warm-up (see :meth:`regularizing`)."""

    def __init__(self, t_max: int, warm_up: float = 0.2, start_b: float = 20.0, end_b: float = 2.0):
        self.t_max, self.start_b, self.end_b = t_max, start_b, end_b
        self.start_decay = warm_up * t_max

    def __call__(self, t: int) -> float:
        if t < self.start_decay:
            return self.start_b
        if self.t_max <= self.start_decay:  # no decay phase (0 iterations, or warm-up 1.0): the end temperature
            return self.end_b
        rel_t = (t - self.start_decay) / (self.t_max - self.start_decay)
        return self.end_b + (self.start_b - self.end_b) * max(0.0, 1 - rel_t)

    def regularizing(self, t: int) -> bool:
        """Whether the rounding term counts at iteration ``t`` (the reference's ``count >= loss_start``, count from 1)."""
        return t >= self.start_decay
