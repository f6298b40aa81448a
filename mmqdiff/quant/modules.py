"""Quantized conv/linear layers (Q-Diffusion ``QuantModule``), the config they are built from, and the functions that
switch, round and list the quantizers inside any module (a whole model or one reconstruction unit)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import INIT_METHODS, ROUNDING_MODES, AdaRoundQuantizer, UniformAffineQuantizer

UNIT_ORDERS = ("forward", "registration")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. Defaults are the Q-Diffusion CIFAR README settings (W4A8, ``--a_sym``, ``--split``,
    'max' init, nothing kept FP) except ``unit_order``: "forward" calibrates units in the order they run;
    "registration" restores the reference order (module registration, 38 units on CIFAR-10).

    ``weight_symmetric`` (off: the reference's asymmetric weights) quantizes weights per channel with zero point 0,
    an integer-friendly option: 8-bit weight codes then fit int8 as they are and the integer runtime
    (``to_integer``) needs no offset correction; its quality cost is measured in docs/benchmarks.md."""

    weight_bits: int = 4
    act_bits: int = 8
    act_symmetric: bool = True
    sm_abit: int = 8
    split_shortcut: bool = True
    weight_init: str = "max"
    act_init: str = "max"
    keep_first_last_8bit: bool = False
    unit_order: str = "forward"
    quant_act: bool = True
    regularize_split_half: bool = False
    weight_symmetric: bool = False

    def __post_init__(self) -> None:
        for name in ("weight_init", "act_init"):
            if getattr(self, name) not in INIT_METHODS:
                raise ValueError(f"QuantConfig.{name} must be one of {INIT_METHODS}, got {getattr(self, name)!r}")
        if self.unit_order not in UNIT_ORDERS:
            raise ValueError(f"QuantConfig.unit_order must be one of {UNIT_ORDERS}, got {self.unit_order!r}")
        for name in ("weight_bits", "act_bits", "sm_abit"):
            if not 2 <= getattr(self, name) <= 16:
                raise ValueError(f"QuantConfig.{name} must be in [2, 16], got {getattr(self, name)}")


def act_quantizer(n_bits: int, cfg: QuantConfig) -> UniformAffineQuantizer:
    """Per-tensor input quantizer with a learnable step size, initialised lazily on its first quantized forward."""
    return UniformAffineQuantizer(n_bits, cfg.act_symmetric, channel_wise=False, init=cfg.act_init, learn_delta=True)


class Quantized(nn.Module):
    """Base of modules that own quantization switches. ``quant_act=False`` (``QuantConfig.quant_act``) pins activation
    quantization off whatever :func:`set_quant_state` asks."""

    def __init__(self, quant_act: bool):
        super().__init__()
        self.quant_act = quant_act
        self.use_weight_quant = self.use_act_quant = False

    def set_quant_state(self, weight_quant: bool, act_quant: bool) -> None:
        self.use_weight_quant, self.use_act_quant = weight_quant, act_quant and self.quant_act

    def get_extra_state(self) -> dict[str, Any]:
        return {"use_weight_quant": self.use_weight_quant, "use_act_quant": self.use_act_quant}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.set_quant_state(bool(state["use_weight_quant"]), bool(state["use_act_quant"]))


class QuantLayer(Quantized):
    """A Conv2d or Linear with an AdaRound weight quantizer and an input activation quantizer; bias stays FP.

    Keeps the FP layer's ``weight``/``bias`` Parameters under the same names, so parameter paths equal the FP model's.
    With ``split > 0`` (decoder ``nin_shortcut`` on ``cat(h, skip)``) the input channels ``[:split]`` and ``[split:]``
    each get their own activation quantizer and their own per-out-channel weight quantizer (``*_quantizer_0`` for the
    skip half), as in the reference.
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, cfg: QuantConfig, split: int = 0):
        super().__init__(cfg.quant_act)
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros":
                raise ValueError(f"padding_mode {layer.padding_mode!r} is not supported")
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                  groups=layer.groups)
        elif isinstance(layer, nn.Linear):
            self.conv_args = None
        else:
            raise TypeError(f"QuantLayer wraps nn.Conv2d or nn.Linear, got {type(layer).__name__}")
        if not 0 <= split < layer.weight.shape[1]:
            raise ValueError(f"split {split} outside the {layer.weight.shape[1]} input channels")
        self.weight, self.bias = layer.weight, layer.bias
        self.split = split
        regularized = (True, cfg.regularize_split_half)
        for i, w in enumerate(self.halves(layer.weight.detach())):
            suffix = "_0" if i else ""
            self.add_module("weight_quantizer" + suffix, AdaRoundQuantizer(
                w, cfg.weight_bits, symmetric=cfg.weight_symmetric, init=cfg.weight_init,
                regularized=regularized[i]))
            self.add_module("act_quantizer" + suffix, act_quantizer(cfg.act_bits, cfg))
        self.register_buffer("_frozen_weight", None, persistent=False)  # a buffer so .to(device) moves it

    def halves(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``t`` cut along dim 1 at the split point (input channels of a weight, channels of an input)."""
        return [t[:, :self.split], t[:, self.split:]] if self.split else [t]

    def weight_quantizers(self) -> list[AdaRoundQuantizer]:
        return [self.weight_quantizer, self.weight_quantizer_0] if self.split else [self.weight_quantizer]

    def act_quantizers(self) -> list[UniformAffineQuantizer]:
        return [self.act_quantizer, self.act_quantizer_0] if self.split else [self.act_quantizer]

    def quant_weight(self) -> torch.Tensor:
        """Fake-quantized weight under the current rounding mode (from the frozen cache when frozen)."""
        if self._frozen_weight is not None:
            return self._frozen_weight
        parts = [q(w) for q, w in zip(self.weight_quantizers(), self.halves(self.weight))]
        return torch.cat(parts, dim=1) if self.split else parts[0]

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        parts = [q(h) for q, h in zip(self.act_quantizers(), self.halves(x))]
        return torch.cat(parts, dim=1) if self.split else parts[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_act_quant:
            x = self.quant_input(x)
        weight = self.quant_weight() if self.use_weight_quant else self.weight
        if self.conv_args is None:
            return F.linear(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, **self.conv_args)

    @torch.no_grad()
    def freeze(self) -> None:
        """Cache the fake-quant weight under the current rounding (hard after reconstruction) so inference does not
        requantize it every call. Any rounding change or alpha re-init drops the cache."""
        self.unfreeze()
        self._frozen_weight = self.quant_weight().detach()

    def unfreeze(self) -> None:
        self._frozen_weight = None

    @property
    def frozen(self) -> bool:
        return self._frozen_weight is not None

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "split": self.split}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if int(state["split"]) != self.split:
            raise ValueError(f"split point {state['split']} does not match this layer's {self.split}")
        super().set_extra_state(state)

    def extra_repr(self) -> str:
        kind = "linear" if self.conv_args is None else "conv2d"
        return f"{kind} {tuple(self.weight.shape)}, split={self.split}"


def quant_layers(module: nn.Module) -> list[QuantLayer]:
    return [m for m in module.modules() if isinstance(m, QuantLayer)]


def set_quant_state(module: nn.Module, weight_quant: bool, act_quant: bool) -> None:
    """Turn weight / activation fake quantization on or off for every quantized module inside ``module``."""
    for m in module.modules():
        if isinstance(m, Quantized):
            m.set_quant_state(weight_quant, act_quant)


def set_rounding(module: nn.Module, mode: str) -> None:
    """Set the rounding mode ("nearest", "soft", "hard") of every AdaRound quantizer inside ``module``; drops frozen
    weight caches, which would otherwise hide the change."""
    if mode not in ROUNDING_MODES:
        raise ValueError(f"rounding mode must be one of {ROUNDING_MODES}, got {mode!r}")
    for layer in quant_layers(module):
        layer.unfreeze()
        for q in layer.weight_quantizers():
            q.mode = mode


def init_adaround(module: nn.Module) -> None:
    """(Re)initialise every alpha inside ``module`` from the current weights, so soft rounding reproduces them."""
    for layer in quant_layers(module):
        layer.unfreeze()
        for q, w in zip(layer.weight_quantizers(), layer.halves(layer.weight)):
            q.init_alpha(w)


def soften_adaround(module: nn.Module, margin: float) -> None:
    """Re-set every alpha inside ``module`` at h = 0.5 +- ``margin`` from its hard rounding decision
    (:meth:`AdaRoundQuantizer.soften_hard`): the start of a weight phase that fine-tunes a loaded solution."""
    for layer in quant_layers(module):
        layer.unfreeze()
        for q in layer.weight_quantizers():
            q.soften_hard(margin)


def adaround_quantizers(module: nn.Module) -> list[AdaRoundQuantizer]:
    """All weight quantizers inside ``module`` (split second halves included; see ``.regularized``)."""
    return [m for m in module.modules() if isinstance(m, AdaRoundQuantizer)]


def act_quantizers(module: nn.Module) -> list[UniformAffineQuantizer]:
    """All activation quantizers inside ``module`` (layer inputs and attention q/k/v/softmax)."""
    return [m for m in module.modules()
            if isinstance(m, UniformAffineQuantizer) and not isinstance(m, AdaRoundQuantizer)]


def reset_act_quantizers(module: nn.Module) -> None:
    """Make every activation quantizer inside ``module`` re-initialise on its next quantized forward."""
    for q in act_quantizers(module):
        q.inited = False
