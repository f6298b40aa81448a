"""Compact export of a calibrated QuantizedUNet: integer weight codes packed at their bit width, per-channel scales and
zero points, the FP params that are not quantized (biases, norms) and the activation quantizer state.

A sampler rebuilds the model from the export alone (no FP checkpoint): ``load_packed(quantize_model(build_model(cfg),
config_from_state(export)), export)``. Fake quantization stays simulated (fp32 compute); the export only saves bytes.
"""
from __future__ import annotations

from typing import Any

import torch

from .model import QuantizedUNet, StateValue, check_state, load_quant_state, quant_state_dict, with_config_defaults
from .modules import QuantLayer, act_quantizers

FORMAT = "mmqdiff.packed/1"
WEIGHT_QUANTIZERS = ("weight_quantizer", "weight_quantizer_0")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten unsigned codes in [0, 2^bits) into bytes: 8//bits codes per byte when bits divides 8 (two 4-bit codes
    per byte, low nibble first), one uint8 each for other widths up to 8; above 8 bits one code per element of the
    narrowest type that holds them: uint16 up to 16 bits (it saves and loads weights-only), int32 above."""
    flat = codes.reshape(-1).to(torch.int32)
    if bits > 8:
        return flat.to(torch.uint16 if bits <= 16 else torch.int32)
    per = 8 // bits if 8 % bits == 0 else 1
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % per)).reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (flat << shifts).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`; int32 codes, flat."""
    if bits > 8:
        return packed.to(torch.int32)[:numel]
    per = 8 // bits if 8 % bits == 0 else 1
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return ((packed.to(torch.int32)[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)[:numel]


def _layers(qmodel: QuantizedUNet) -> dict[str, QuantLayer]:
    return {name: m for name, m in qmodel.model.named_modules() if isinstance(m, QuantLayer)}


def _fp_params(qmodel: QuantizedUNet, qstate: dict[str, StateValue]) -> dict[str, torch.Tensor]:
    """FP tensors that stay unquantized: everything in the state_dict except quantized weights and quantizer state."""
    quantized = {f"{name}.weight" for name in _layers(qmodel)}
    return {k: v for k, v in qmodel.model.state_dict().items()
            if k not in quantized and k not in qstate and not k.endswith("._extra_state")}


def export_packed(qmodel: QuantizedUNet) -> dict[str, StateValue]:
    """Export the quantized weights as packed codes (current rounding: hard after reconstruction, nearest before).
    Keys: ``<layer>.<weight_quantizer[_0]>.{codes,shape,bits,qmin,delta,zero_point}``, the FP params that are not
    quantized weights under their model paths, and the quant state minus alphas (activation quantizers, switches)."""
    qstate = quant_state_dict(qmodel)
    out: dict[str, StateValue] = {"format": FORMAT}
    out.update({k: v for k, v in qstate.items() if not k.endswith(".alpha")})
    out.update({k: v.detach().clone() for k, v in _fp_params(qmodel, qstate).items()})
    with torch.no_grad():
        for name, layer in _layers(qmodel).items():
            for qname, q, w in zip(WEIGHT_QUANTIZERS, layer.weight_quantizers(), layer.halves(layer.weight)):
                if q.mode == "soft":
                    raise ValueError(f"{name}.{qname} is in soft rounding; finish reconstruction (hard) first")
                codes = (q.levels(w) - q.qmin).to(torch.int32)
                key = f"{name}.{qname}"
                out[f"{key}.codes"] = pack_codes(codes.cpu(), q.n_bits)
                out[f"{key}.shape"] = torch.tensor(w.shape, dtype=torch.int64)
                out[f"{key}.bits"], out[f"{key}.qmin"] = q.n_bits, q.qmin
    return out


def split_activations(qmodel: QuantizedUNet, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(everything else, the activation quantizers' entries) of a quant state or packed export of ``qmodel``: the
    step sizes, zero points and init flags that segments of segment_scope "activations" calibrate each for
    themselves, apart from the weights, scales, FP params and switches they share. ``{**shared, **own}`` is the
    state again."""
    owners = {id(q) for q in act_quantizers(qmodel)}
    prefixes = tuple(f"{name}." for name, m in qmodel.model.named_modules() if id(m) in owners)
    own = {k: v for k, v in state.items() if k.startswith(prefixes)}
    return {k: v for k, v in state.items() if k not in own}, own


def packed_nbytes(export: dict[str, Any]) -> int:
    """Exact byte count of the export's tensors (numel x element size); ``torch.save`` adds a few KB of container
    overhead on top, which the benchmark reports separately."""
    return sum(v.numel() * v.element_size() for v in export.values() if isinstance(v, torch.Tensor))


def dequantize_packed(export: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``{"<layer>.weight": fake-quant weight}`` from the export alone; equals the model's fake-quant weights exactly
    (same integer levels, same ``(q - zp) * delta`` in float32)."""
    weights: dict[str, list[torch.Tensor]] = {}
    for key in sorted(k for k in export if k.endswith(".codes")):  # weight_quantizer sorts before weight_quantizer_0
        prefix = key[: -len(".codes")]
        layer = prefix.rpartition(".")[0]
        shape = torch.Size(export[f"{prefix}.shape"].tolist())
        codes = unpack_codes(export[key], export[f"{prefix}.bits"], shape.numel()).reshape(shape)
        levels = codes.to(torch.float32) + export[f"{prefix}.qmin"]
        weights.setdefault(layer, []).append((levels - export[f"{prefix}.zero_point"]) * export[f"{prefix}.delta"])
    return {f"{layer}.weight": torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            for layer, parts in weights.items()}


def load_packed(qmodel: QuantizedUNet, export: dict[str, Any]) -> QuantizedUNet:
    """Fill ``qmodel`` (any weights; same architecture and config) from an export and freeze it.

    Weights become the dequantized values; rounding is set to "nearest", which maps on-grid weights to themselves, so
    the frozen model reproduces the exported one bit for bit. Validates keys first (ValueError naming the key).
    """
    if export.get("format") != FORMAT:
        raise ValueError(f"not a packed export: format {export.get('format')!r}, expected {FORMAT!r}")
    export = with_config_defaults(export)
    expected = export_packed(qmodel)
    check_state(expected, export, "packed export")
    state = quant_state_dict(qmodel)  # keeps qmodel's alphas: unused once weights sit on the grid
    params = {k: export[k] for k in _fp_params(qmodel, state)}
    state.update({k: export[k] for k in state if not k.endswith(".alpha")})
    state.update({k: "nearest" for k in state if k.endswith(".mode")})
    load_quant_state(qmodel, state)
    qmodel.model.load_state_dict({**params, **dequantize_packed(export)}, strict=False)
    qmodel.freeze()
    return qmodel
