"""``quantize_model``: one call from an FP ddim ``Model`` to a fake-quant ``QuantizedUNet``; and the quant state I/O.

Units (what the reconstruction engine calibrates one at a time) are the ResnetBlocks and AttnBlocks, plus every
quantized layer outside a block (temb.dense.*, conv_in, down/upsample convs, conv_out), named by their FP module path.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, fields, replace
from typing import Any

import torch
from torch import nn

from ..diffusion.unet import AttnBlock, Model, ResnetBlock
from .blocks import QuantAttnBlock, QuantResnetBlock
from .modules import QuantConfig, QuantLayer, quant_layers, set_quant_state
from .quantizers import UniformAffineQuantizer

FIRST_LAST = ("conv_in", "conv_out")
StateValue = torch.Tensor | str | int | float | bool


def registration_units(model: nn.Module) -> list[str]:
    """Unit paths in module-registration order (the reference's reconstruction order)."""
    names: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(block + ".") for block in names):
            continue
        if isinstance(m, (ResnetBlock, AttnBlock, nn.Conv2d, nn.Linear)):
            names.append(name)
    return names


def forward_units(model: nn.Module, names: list[str]) -> list[str]:
    """The same units in the order a forward pass first calls them (one batch-1 FP forward with pre-hooks)."""
    seen: list[str] = []

    def record(name: str):
        return lambda module, args: None if name in seen else seen.append(name)

    hooks = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    try:
        p = next(model.parameters())
        x = torch.zeros(1, model.in_channels, model.resolution, model.resolution, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            model(x, torch.zeros(1, device=p.device))
    finally:
        for hook in hooks:
            hook.remove()
    if sorted(seen) != sorted(names):
        raise RuntimeError(f"forward pass did not call every unit once: {sorted(set(names) - set(seen))}")
    return seen


def decoder_split_points(model: Model) -> dict[str, int]:
    """Split point of every decoder block's ``cat(h, skip)`` input: in_channels minus the skip it pops, replaying the
    encoder's skip stack from the architecture (no forward needed)."""
    skips = [model.conv_in.out_channels]
    for down in model.down:
        skips += [block.out_channels for block in down.block]
        if hasattr(down, "downsample"):
            skips.append(skips[-1])
    splits = {}
    for level in reversed(range(len(model.up))):
        for i, block in enumerate(model.up[level].block):
            splits[f"up.{level}.block.{i}"] = block.in_channels - skips.pop()
    return splits


def _quantize_unit(module: nn.Module, name: str, cfg: QuantConfig, split: int) -> nn.Module:
    if isinstance(module, ResnetBlock):
        return QuantResnetBlock(module, cfg, split)
    if isinstance(module, AttnBlock):
        return QuantAttnBlock(module, cfg)
    if cfg.keep_first_last_8bit and name in FIRST_LAST:
        cfg = replace(cfg, weight_bits=8, act_bits=8)
    return QuantLayer(module, cfg)


class QuantizedUNet(nn.Module):
    """Fake-quant copy of a ddim ``Model``: ``forward(x, t)`` as the FP model.

    After build: weight quantization on (nearest rounding, 'max'/'mse' ranges set from the FP weights); activation
    quantization **off, with no ranges yet** -- the model computes with quantized weights and FP activations. Give the
    activation quantizers ranges from data with :func:`~mmqdiff.quant.init_activation_ranges` (which also turns them
    on), or calibrate everything with :func:`~mmqdiff.quant.calibrate`. (``set_quant_state(True, True)`` alone makes
    each activation quantizer take its range from the first batch it sees, whatever that batch is.)
    """

    def __init__(self, model: Model, config: QuantConfig):
        super().__init__()
        fp = copy.deepcopy(model)
        names = registration_units(fp)
        self.unit_names = names if config.unit_order == "registration" else forward_units(fp, names)
        splits = decoder_split_points(fp) if config.split_shortcut else {}
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = fp.get_submodule(parent) if parent else fp
            setattr(owner, child, _quantize_unit(getattr(owner, child), name, config, splits.get(name, 0)))
        self.model, self.config = fp, config
        self.set_quant_state(True, False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t)

    def units(self) -> list[tuple[str, nn.Module]]:
        """(FP module path, quantized unit) in the configured order."""
        return [(name, self.model.get_submodule(name)) for name in self.unit_names]

    def set_quant_state(self, weight_quant: bool, act_quant: bool) -> None:
        set_quant_state(self, weight_quant, act_quant)

    def freeze(self) -> None:
        """Precompute every fake-quant weight once under the current rounding; for inference or for caching passes,
        not while alphas or weights are being optimised."""
        for layer in quant_layers(self):
            layer.freeze()

    def unfreeze(self) -> None:
        for layer in quant_layers(self):
            layer.unfreeze()


def quantize_model(model: Model, config: QuantConfig | None = None) -> QuantizedUNet:
    """Quantize a deep copy of ``model`` (the caller's model is untouched). Weights come out quantized (nearest
    rounding); activation quantization is off and uninitialised until ``init_activation_ranges`` or ``calibrate``
    (see :class:`QuantizedUNet`)."""
    return QuantizedUNet(model, config or QuantConfig())


def _quant_keys(qmodel: QuantizedUNet) -> set[str]:
    """state_dict keys that are quantizer tensors (not FP weights, biases or norms)."""
    owners = {name for name, m in qmodel.model.named_modules() if isinstance(m, UniformAffineQuantizer)}
    return {k for k in qmodel.model.state_dict() if k.rpartition(".")[0] in owners}


def quant_state_dict(qmodel: QuantizedUNet) -> dict[str, StateValue]:
    """Everything a fresh ``quantize_model(fp_model, cfg)`` needs to reproduce ``qmodel`` bit for bit: ``config.*``,
    quantizer tensors (alpha, delta, zero_point) and flags (inited, mode, regularized, split, quant switches), with
    FP module paths as prefixes. Plain tensors/str/int/float/bool only, so ``torch.load(weights_only=True)`` reads it.
    FP weights are not included: they come from the FP model."""
    state: dict[str, StateValue] = {f"config.{k}": v for k, v in asdict(qmodel.config).items()}
    quant_keys = _quant_keys(qmodel)
    for key, value in qmodel.model.state_dict().items():
        if key.endswith("._extra_state"):
            prefix = key[: -len("_extra_state")]
            state.update({prefix + k: v for k, v in value.items()})
        elif key in quant_keys:
            state[key] = value.detach().clone()
    return state


def check_state(expected: dict[str, StateValue], state: dict[str, Any], what: str) -> None:
    """Raise ValueError naming the first key that is missing, unexpected, of the wrong type/shape, or (config and
    split points) of a different value."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise ValueError(f"{what}: key {key!r} is {'missing' if missing else 'unexpected'} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, want in expected.items():
        got = state[key]
        if isinstance(want, torch.Tensor):
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise ValueError(f"{what}: key {key!r} should be a tensor of shape {tuple(want.shape)}, got {shape}")
        elif type(got) is not type(want):
            raise ValueError(f"{what}: key {key!r} should be {type(want).__name__}, got {type(got).__name__}")
        elif (key.startswith("config.") or key.endswith(".split")) and got != want:
            raise ValueError(f"{what}: key {key!r} is {got!r} but this model has {want!r}")


def with_config_defaults(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` plus, at their defaults, the ``config.*`` fields of QuantConfig it predates (a file written before
    the field existed), so older quant states and exports still load."""
    defaults = {f"config.{f.name}": f.default for f in fields(QuantConfig)}
    return {**{k: v for k, v in defaults.items() if k not in state}, **state}


def load_quant_state(qmodel: QuantizedUNet, state: dict[str, Any]) -> None:
    """Load a :func:`quant_state_dict` into a model built with the same FP architecture and config; validates every
    key first (ValueError naming it) and drops frozen weight caches (call ``freeze()`` again for inference)."""
    state = with_config_defaults(state)
    check_state(quant_state_dict(qmodel), state, "quant state")
    sd: dict[str, Any] = {}
    extra: dict[str, dict[str, Any]] = {}  # scalar entries regrouped into their module's extra state
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            sd[key] = value
        elif not key.startswith("config."):
            prefix, _, field = key.rpartition(".")
            extra.setdefault(prefix, {})[field] = value
    sd.update({f"{prefix}._extra_state": v for prefix, v in extra.items()})
    qmodel.unfreeze()
    result = qmodel.model.load_state_dict(sd, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"quant state: key {result.unexpected_keys[0]!r} is not part of this model")


def config_from_state(state: dict[str, Any]) -> QuantConfig:
    """The QuantConfig stored in a quant state or packed export (so a loader can rebuild the model first)."""
    return QuantConfig(**{f.name: state[f"config.{f.name}"] for f in fields(QuantConfig) if f"config.{f.name}" in state})
