"""The integer runtime of K segment models held together: ``IntegerSegments(qmodels)``, indexed like the list of
models it replaces (``mmqdiff.segments.SegmentedModel.to_integer`` switches through it by segment).

Why K int8 models can be resident in less than one FP model: the segments of a run quantize the same FP weights
with the same per-channel scales and zero points (calibration learns only each weight's rounding and the activation
steps), so each weight's K levels are ``floor(w / s) + h_k`` with AdaRound's ``h_k`` in {0, 1}. One shared int8
base level per weight plus one rounding bit per weight and segment reproduces every segment's levels exactly:
``1 + K/8`` bytes per weight instead of ``K``. Only the segment in use is unpacked into the kernels' packed int8
layout (``pack="active"``), at each segment switch; ``pack="all"`` keeps every segment packed (no re-packing,
``K`` bytes per weight plus the kernels' padding). Where every segment has the same weight codes and activation zero
point (segment_scope "activations": the segments keep one weight rounding and differ only in their activation
steps), no code set is kept: a kernel's packed weights are made from the weight codes alone (onednn's prepack takes an
activation scale, but the one passed at run time is applied; the tests compare every segment with its own
``to_integer``), so at a switch they pass unchanged from the segment in use to the next: the K segments hold one
packed weight set, as one model does. Equal levels with different zero points keep one code set without rounding
bits. Where the levels of a layer's segments differ by more than one (models not calibrated from one FP model,
different bit widths) that layer keeps each segment's int8 codes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .integer import (IntegerLayer, IntegerUNet, IntMMKernel, OneDNNKernel, int8_with_offset, resident_nbytes,
                      share_constants, to_integer, weight_codes)
from .model import QuantizedUNet

PACK_MODES = ("active", "all")
# what a kernel's load_weight makes from the weight codes (and the activation zero point), which kernels with equal
# codes can hand on at a segment switch; everything else a kernel holds depends on its own activation scale
WEIGHT_OPERANDS = {OneDNNKernel: ("packed",), IntMMKernel: ("weight", "const", "offset")}
SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """0/1 values (any shape) as uint8, eight per byte, least significant bit first (zero-padded at the end)."""
    flat = bits.reshape(-1).to(torch.int32)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
    return (flat << SHIFTS.to(flat.device, torch.int32)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits as uint8 0/1."""
    return ((packed.unsqueeze(1) >> SHIFTS.to(packed.device)) & 1).reshape(-1)[:numel]


class SegmentCodes(nn.Module):
    """One kernel's weight levels in K segments: a shared base (int8 + per-channel offset, as a kernel holds it) and
    one rounding bit per weight and segment (none where every segment has the base's levels); or, where the
    segments' levels differ by more than one, each segment's int8 codes and offsets as they are."""

    def __init__(self, codes: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        levels = torch.stack([w8.to(torch.int32) + offset.reshape((-1,) + (1,) * (w8.dim() - 1))
                              for w8, offset in codes])  # [K, O, ...] exact levels q - zp
        self.shape, self.numel = tuple(levels.shape[1:]), levels[0].numel()
        self.register_buffer("offsets", torch.stack([offset for _, offset in codes]))
        base = levels.amin(0)
        rounding = levels - base
        self.shared = bool(rounding.max() <= 1)
        if self.shared:
            base8, base_offset = int8_with_offset(base)
            self.register_buffer("base", base8)
            self.register_buffer("base_offset", base_offset)
            self.register_buffer("bits", torch.stack([pack_bits(r) for r in rounding]) if rounding.any() else None)
        else:
            self.register_buffer("w8", torch.stack([w8 for w8, _ in codes]))

    def segment(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment ``k``'s (int8 codes, per-channel offset), equal to what ``weight_codes`` gave for it: its levels
        ``base + base_offset + rounding`` less its own offset (which fits them in int8 by construction)."""
        if not self.shared:
            return self.w8[k], self.offsets[k]
        shift = (self.base_offset - self.offsets[k]).to(torch.int16).view((-1,) + (1,) * (len(self.shape) - 1))
        levels = self.base.to(torch.int16) + shift
        if self.bits is not None:
            levels.add_(unpack_bits(self.bits[k], self.numel).view(self.shape))
        return levels.to(torch.int8), self.offsets[k]


class IntegerSegments(nn.Module):
    """``to_integer`` for the K segment models of a run, for the sampler: ``segments[k]`` is segment k's
    :class:`IntegerUNet`, and with ``pack="active"`` indexing a segment other than the one in use first re-packs the
    kernels' weights from the shared codes, or hands on the packed weights that every segment shares (module
    docstring). Outputs are those of ``to_integer(qmodels[k])`` exactly; ``share_constants`` is applied."""

    def __init__(self, qmodels: Sequence[QuantizedUNet], backend: str | None = None, pack: str = "active"):
        super().__init__()
        if pack not in PACK_MODES:
            raise ValueError(f"pack must be one of {PACK_MODES}, got {pack!r}")
        if not qmodels:
            raise ValueError("IntegerSegments needs at least one segment model")
        self.pack = pack
        self.models = nn.ModuleList([to_integer(q, backend) for q in qmodels])
        share_constants(self.models)
        self.active: int | None = None
        self.codes = nn.ModuleList()
        self._kernels: list[list[OneDNNKernel | IntMMKernel]] = []  # per shared code set, the K kernels using it
        self._handed: list[list[OneDNNKernel | IntMMKernel]] = []  # K kernels sharing one weight operand
        if pack == "all" or len(qmodels) == 1:
            return
        for name, layer in self.models[0].model.named_modules():
            if not isinstance(layer, IntegerLayer):
                continue
            sources = [q.model.get_submodule(name) for q in qmodels]
            for i in range(len(layer.kernels)):
                codes = [weight_codes(s.weight_quantizers()[i], s.halves(s.weight.detach())[i]) for s in sources]
                kernels = [m.model.get_submodule(name).kernels[i] for m in self.models]
                if same_weight_operand(codes, kernels):
                    self._handed.append(kernels)
                    for kernel in kernels[1:]:  # segment 0's kernel holds the operand until a switch
                        hand_on(kernel, None)
                    continue
                self.codes.append(SegmentCodes([(w8, offset) for w8, _, offset in codes]))
                self._kernels.append(kernels)
        for kernels in self._kernels:
            for kernel in kernels:
                kernel.unload_weight()

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, k: int) -> IntegerUNet:
        if not 0 <= k < len(self.models):  # checked before any kernel is unloaded
            raise IndexError(f"segment {k} of {len(self.models)}")
        if self.pack == "active" and k != self.active:
            self.activate(k)
        return self.models[k]

    def sampling_nbytes(self) -> int:
        """Resident bytes while a sampler runs these segments (:func:`~mmqdiff.quant.resident_nbytes`): with
        ``pack="active"`` the largest over which segment is packed. Leaves the last segment active."""
        sizes = []
        for k in range(len(self)):
            self[k]
            sizes.append(resident_nbytes([self]))
        return max(sizes)

    def activate(self, k: int) -> None:
        """Re-pack segment ``k``'s weights into its kernels and release the previous segment's; hand the shared
        weight operands on from the previous segment's kernels."""
        for codes, kernels in zip(self.codes, self._kernels):
            if self.active is not None:
                kernels[self.active].unload_weight()
            kernels[k].load_weight(*codes.segment(k))
        holder = 0 if self.active is None else self.active
        if holder != k:
            for kernels in self._handed:
                hand_on(kernels[holder], kernels[k])
        self.active = k


def same_weight_operand(codes: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                        kernels: Sequence[OneDNNKernel | IntMMKernel]) -> bool:
    """Whether K kernels' weight operands are equal: the same weight codes, scales and offsets (``weight_codes``) and
    the same activation zero point (the int_mm corrections use it)."""
    w8, scale, offset = codes[0]
    return all(torch.equal(w8, c[0]) and torch.equal(scale, c[1]) and torch.equal(offset, c[2]) for c in codes[1:]) \
        and len({kernel.codes.zero_point for kernel in kernels}) == 1


def hand_on(source: OneDNNKernel | IntMMKernel, target: OneDNNKernel | IntMMKernel | None) -> None:
    """Move ``source``'s weight operand (:data:`WEIGHT_OPERANDS`) to ``target`` (None: release it); the kernels'
    other state (scales, offset flags) stays their own."""
    for name in WEIGHT_OPERANDS[type(source)]:
        if target is not None:
            setattr(target, name, getattr(source, name))
        setattr(source, name, None)
