"""Integer runtime for a calibrated ``QuantizedUNet``: ``to_integer(qmodel)`` returns a module with the same
``forward(x, t)`` in which every quantized conv/linear computes int8 x int8 -> int32 and rescales to fp32.

Why it matches the fake-quant model: the input codes are the activation quantizer's own levels (same division by
the same step, same round-half-even, same clamp), the weight codes are the weight quantizer's levels minus its zero
point, and the integer dot products are exact, so the only differences are float32 roundings (the fake-quant conv
accumulates in fp32; the integer path rounds once when it rescales). Outputs stay fp32 (the fake-quant model does not
quantize them); GroupNorm, SiLU, softmax and residual adds run in fp32. The attention products q.k and p.v multiply
the integer levels of the q/k/v/softmax quantizers (:class:`IntegerAttnBlock`) where those fit int8 (symmetric
activations, the default); otherwise the block keeps ``QuantAttnBlock``'s fake-quant matmuls.

Weights: ``q - zp`` of a b-bit asymmetric quantizer spans ``[-(2^b-1), 2^b-1]``. A channel whose values fit int8
(all of them at W4) is used as is. Otherwise (W8) the channel is stored as ``w - o`` with a per-channel integer
offset ``o`` that brings it into int8, and ``o * S`` is added back, ``S`` being the sum of ``x_code - x_zp`` over the
receptive field (an integer, computed exactly), so the result stays exact with no extra weight bytes. That costs
a channel sum of the codes and a multiply-add over the output per layer (W8A8 runs noticeably slower than W4A8);
symmetric weights (``QuantConfig(weight_symmetric=True)``, zero point 0) fit int8 as they are and need none.

Glue: the resnet blocks run the FP block's ops (SiLU as one in-place ``F.silu``) writing into temporaries, and
GroupNorm is computed in the channels-last layout (see :class:`ChannelsLastGroupNorm`); every fp32 value outside the
quantized layers is computed as in the fake-quant model up to float32 rounding.

Backends (maintained kernels only, chosen by measurement, see docs/benchmarks.md):
- ``onednn`` (CPU): convolutions through PyTorch's x86 ``onednn::qconv_pointwise`` with uint8 input and fp32
  output (what PT2E's X86InductorQuantizer lowers to), weights prepacked when built (``IntegerSegments`` re-packs
  a segment's at a switch, see segment_runtime.py); the small linear layers through ``torch._int_mm`` (see
  :func:`kernel_class`).
- ``int_mm`` (CUDA, also runs on CPU): ``torch._int_mm`` on int8 codes; 3x3 convs through im2col. Exact on an H200
  (tests/test_cuda.py), but slower than fp32 cuDNN there at these model sizes, where the GPU waits on kernel
  launches: the sampler's ``runtime: auto`` uses fake-quant on a GPU. On CPU it is exact but slow for convs
  (im2col), which is why CPU uses onednn.
"""
from __future__ import annotations

import copy
import functools
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion.unet import swish
from .blocks import QuantAttnBlock, QuantResnetBlock
from .model import QuantizedUNet
from .modules import QuantLayer
from .quantizers import UniformAffineQuantizer

BACKENDS = ("onednn", "int_mm")
ONE, NO_ZERO_POINT = torch.ones(1), torch.zeros((), dtype=torch.int64)  # unit scale / zero point of onednn GEMVs


class IntegerUnsupported(ValueError):
    """The model, or the host's torch build, cannot run the integer runtime; the message says why."""


def onednn_available() -> bool:
    return hasattr(torch.ops.onednn, "qconv_pointwise") and "onednn" in torch.backends.quantized.supported_engines


def default_backend(device: torch.device) -> str:
    """``onednn`` on CPU, ``int_mm`` on CUDA; IntegerUnsupported elsewhere or when the ops are missing."""
    if device.type == "cpu":
        if not onednn_available():
            raise IntegerUnsupported("this PyTorch build has no onednn quantized ops (x86 CPU backend)")
        return "onednn"
    if device.type == "cuda":
        return "int_mm"
    raise IntegerUnsupported(f"no integer backend for device type {device.type!r}")


class ActivationCodes(nn.Module):
    """The integer levels of a calibrated activation quantizer, shifted to ``u = level - qmin`` in [0, 2^b-1] so they
    fit uint8, with ``zero_point = zp - qmin`` (symmetric 8-bit: zp 0 -> 128): ``(u - zero_point) * scale`` is the
    fake quantizer's output exactly."""

    def __init__(self, q: UniformAffineQuantizer):
        super().__init__()
        if not q.inited:
            raise IntegerUnsupported("an activation quantizer was never initialised (run a calibration forward)")
        if q.n_bits > 8 or q.channel_wise:
            raise IntegerUnsupported(f"activations must be per-tensor with at most 8 bits, got {q.n_bits} bits")
        self.register_buffer("delta", q.delta.detach().clone().reshape(()))  # the same 0-d divisor as the quantizer
        zp = int(q.zero_point.item())
        self.scale, self.zero_point = float(self.delta), zp - q.qmin
        self.lo, self.hi = q.qmin - zp, q.qmax - zp  # clamp range of round(x / delta)
        self.full_range = q.n_bits == 8

    def uint8(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Codes as uint8 in one vectorised pass after the division: ``quantize_per_tensor`` with scale 1 rounds half
        to even before adding the zero point, i.e. exactly ``clamp(round(x/delta) + zp)``. ``inplace`` divides ``x``
        itself (for temporaries: saves allocating a second fp32 tensor) when ``x`` is dense; a strided view (a split
        shortcut's half of the ``cat``) is divided into a new dense tensor instead, since ``quantize_per_tensor``
        would copy it to a dense one first (one fp32 pass fewer)."""
        dense = x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous()
        y = x.div_(self.delta) if inplace and dense else x / self.delta
        if not self.full_range:
            y.clamp_(self.lo, self.hi)  # integer bounds: clamping before rounding equals clamping after
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # quint8 tensors are deprecated; the op is still the fastest
            q = torch.quantize_per_tensor(y, 1.0, self.zero_point, torch.quint8)
        # a plain uint8 tensor on the same storage (``q.view(torch.uint8)`` stays a quantized tensor, which the
        # onednn ops mishandle; ``int_repr()`` would copy)
        return torch.empty(0, dtype=torch.uint8, device=q.device).set_(q.untyped_storage(), q.storage_offset(),
                                                                        q.size(), q.stride())

    @property
    def centred_fits_int8(self) -> bool:
        """Whether ``level - zp`` fits int8 (symmetric quantizers of at most 8 bits: zp 0)."""
        return -128 <= self.lo and self.hi <= 127

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        """``level - zp`` as integer-valued fp32 (see :attr:`centred_fits_int8`): ``clamp(round(x / delta))``, whose
        product with ``scale`` is the fake quantizer's output."""
        return (x / self.delta).round_().clamp_(self.lo, self.hi)

    @property
    def bound(self) -> int:
        """The largest magnitude of ``level - zp``."""
        return max(-self.lo, self.hi)

    def int8(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Codes minus 128 as int8 (``_int_mm`` takes signed operands); the zero point becomes ``zero_point - 128``."""
        y = (x.div_(self.delta) if inplace else x / self.delta).round_().clamp_(self.lo, self.hi)
        return y.add_(self.zero_point - 128).to(torch.int8)


def weight_codes(q: UniformAffineQuantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 weight ``q - zp - offset``, per-channel fp32 scale, per-channel int32 offset) for a per-output-channel
    quantizer under its current rounding. The offset is 0 where a channel fits int8, otherwise the smallest shift
    that makes it fit (range <= 255 always holds for b <= 8)."""
    if q.n_bits > 8:
        raise IntegerUnsupported(f"weights must have at most 8 bits, got {q.n_bits}")
    if getattr(q, "mode", "nearest") == "soft":
        raise IntegerUnsupported("weights are in soft rounding; finish reconstruction (hard rounding) first")
    with torch.no_grad():
        levels = (q.levels(w) - q.zero_point).to(torch.int32)
    w8, offset = int8_with_offset(levels)
    return w8, q.delta.detach().reshape(-1).float().clone(), offset


def int8_with_offset(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer weight levels [O, ...] (each channel's range at most 255) as (int8 ``levels - offset``, int32
    per-channel ``offset``), the offset 0 where a channel fits int8, otherwise the smallest shift that makes it fit."""
    flat = levels.reshape(levels.shape[0], -1)
    offset = torch.maximum(flat.amax(1) - 127, torch.clamp(flat.amin(1) + 128, max=0)).to(torch.int32)
    return (levels - offset.reshape((-1,) + (1,) * (levels.dim() - 1))).to(torch.int8), offset


@functools.lru_cache(maxsize=None)
def ones_row(channels: int) -> torch.Tensor:
    """A prepacked int8 row of ones for :func:`centred_channel_sum`, one per width for the whole process (it is
    constant, and onednn's padded layout makes each copy several kB)."""
    return torch.ops.onednn.qlinear_prepack(torch.ones(1, channels, dtype=torch.int8), None)


def centred_channel_sum(u: torch.Tensor, zero_point: int, ones: torch.Tensor) -> torch.Tensor:
    """``sum_c (u - zero_point)`` of uint8 codes [B, C, ...] as fp32 [B, 1, ...], exact (integers below 2^24): one
    onednn int8 GEMV of the channels-last rows against ``ones`` (:func:`ones_row`), input and weight scales 1. Per
    call it measured up to 1.6x faster than summing the rows in fp32 (benchmarks/bench_int_kernels.py), and it takes
    the zero point off."""
    rows = u.movedim(1, -1).reshape(-1, u.shape[1])
    sums = torch.ops.onednn.qlinear_pointwise(rows, 1.0, zero_point, ones, ONE, NO_ZERO_POINT, None, 1.0, 0,
                                              torch.float32, "none", [], "")
    return sums.view((u.shape[0],) + tuple(u.shape[2:])).unsqueeze(1)


def box_sum(s: torch.Tensor, kernel_size: tuple[int, ...], stride: list[int], padding: list[int]) -> torch.Tensor:
    """Sums of [B, 1, H, W] over each conv window (zero padding), as shifted adds along each axis in turn, the
    third and later shifts added in place: a 1-channel ``conv2d`` with a ones kernel gives the same integers (exact
    below 2^24) several times slower. At these sizes each op's fixed cost is most of the time, so fewer ops (no
    padding op for an unpadded conv, no new tensor per add) made it about 30% faster (72 -> 51 us, batch 128, 16x16)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    if ph or pw:
        s = F.pad(s, (pw, pw, ph, ph))
    ho, wo = (s.shape[2] - kh) // sh + 1, (s.shape[3] - kw) // sw + 1

    def window_sum(t: torch.Tensor, axis: int, taps: int, step: int, size: int) -> torch.Tensor:
        shifted = [t[(slice(None),) * axis + (slice(i, i + step * (size - 1) + 1, step),)] for i in range(taps)]
        if taps == 1:
            return shifted[0]
        total = shifted[0] + shifted[1]
        for part in shifted[2:]:
            total += part
        return total

    return window_sum(window_sum(s, 2, kh, sh, ho), 3, kw, sw, wo)


class OneDNNKernel(nn.Module):
    """One quantized conv/linear through PyTorch's x86 onednn ops: uint8 codes in, fp32 out (bias and per-channel
    rescale inside the kernel); weights prepacked once. Conv outputs are channels-last (onednn's choice).

    Channels with a weight offset get ``offset * x_delta * w_delta * S`` added, where ``S`` is the window sum of
    ``u - zero_point``: a channel sum of the uint8 codes (:func:`centred_channel_sum`, exact) summed over each
    window (:func:`box_sum`; a 1x1 window is the sum itself)."""

    def __init__(self, codes: ActivationCodes, w8: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 bias: torch.Tensor | None, conv_args: dict | None):
        super().__init__()
        self.codes, self.conv_args = codes, conv_args
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("w_zero_point", torch.zeros((), dtype=torch.int64))  # weights are symmetric int8
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.register_buffer("offset_scale", None)
        self.in_channels, self.kernel_size = w8.shape[1], tuple(w8.shape[2:])
        self.ones = None  # the offset correction's channel sum (shared by every kernel of this width)
        self.load_weight(w8, offset)

    def load_weight(self, w8: torch.Tensor, offset: torch.Tensor) -> None:
        """Prepack int8 weights (with their per-channel offsets) into onednn's blocked layout."""
        self.offset_used = bool(offset.any())
        self.offset_scale = ((self.scale * offset.float() * self.codes.scale).reshape(
            (1, -1) + (1,) * (w8.dim() - 2)) if self.offset_used else None)
        if self.offset_used and self.ones is None:
            self.ones = ones_row(self.in_channels)
        if self.conv_args is None:
            self.packed = torch.ops.onednn.qlinear_prepack(w8, None)
        else:
            a = self.conv_args
            self.packed = torch.ops.onednn.qconv_prepack(w8, self.scale, self.codes.scale, self.codes.zero_point,
                                                         a["stride"], a["padding"], a["dilation"], a["groups"], None)

    def unload_weight(self) -> None:
        """Release the packed weights (the kernel cannot run until :meth:`load_weight`)."""
        self.packed = self.offset_scale = None

    @property
    def code_nbytes(self) -> int:
        """Bytes of the packed weights: onednn's blocked layout, with its padding and compensation; 0 when unloaded."""
        return 0 if self.packed is None else int(torch.ops.mkldnn._nbytes(self.packed))

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        u, c = self.codes.uint8(x, inplace), self.codes
        if self.conv_args is None:
            y = torch.ops.onednn.qlinear_pointwise(u, c.scale, c.zero_point, self.packed, self.scale,
                                                   self.w_zero_point, self.bias, 1.0, 0, torch.float32, "none", [],
                                                   "")
        else:
            a = self.conv_args
            y = torch.ops.onednn.qconv_pointwise(u, c.scale, c.zero_point, self.packed, self.scale, self.w_zero_point,
                                                 self.bias, a["stride"], a["padding"], a["dilation"], a["groups"],
                                                 1.0, 0, torch.float32, "none", [], "")
        if not self.offset_used:
            return y
        window_sum = centred_channel_sum(u, c.zero_point, self.ones)
        if self.conv_args is not None and self.kernel_size != (1, 1):
            window_sum = box_sum(window_sum, self.kernel_size, self.conv_args["stride"], self.conv_args["padding"])
        return y.addcmul_(window_sum, self.offset_scale)


class IntMMKernel(nn.Module):
    """One quantized conv/linear as ``torch._int_mm`` (int8 x int8 -> int32) on im2col patches of the int8 codes
    (codes minus 128, padded with the code of a real 0), then exact int32 corrections and one fp32 rescale. Shapes
    are padded to what cuBLAS wants (K and N multiples of 8, M > 16), and the weight operand is column-major
    (cuBLASLt's int8 GEMM supports only that "TN" layout)."""

    def __init__(self, codes: ActivationCodes, w8: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 bias: torch.Tensor | None, conv_args: dict | None):
        super().__init__()
        self.codes, self.conv_args = codes, conv_args
        o, c = w8.shape[:2]
        self.out_channels, self.kernel_size = o, tuple(w8.shape[2:]) or (1, 1)
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.channel_pad = next(p for p in range(8) if (c + p) * taps % 8 == 0)
        self.pad_code = codes.zero_point - 128  # int8 code of a real 0: padding contributes nothing
        self.register_buffer("scale", (scale * codes.scale).float())
        self.register_buffer("bias", torch.zeros(o, device=w8.device) if bias is None
                             else bias.detach().float().clone())
        for name in ("weight", "const", "offset"):  # set by load_weight
            self.register_buffer(name, None)
        self.load_weight(w8, offset)

    def load_weight(self, w8: torch.Tensor, offset: torch.Tensor) -> None:
        """Lay out int8 weights (with their per-channel offsets) as the [K, N] operand and its int32 corrections."""
        o, c = w8.shape[:2]
        rows = F.pad(w8.reshape(o, c, -1), (0, 0, 0, self.channel_pad)).reshape(o, -1)
        self.offset_used = bool(offset.any())
        if self.offset_used:
            rows = torch.cat([rows, torch.ones_like(rows[:1])])
        rows = F.pad(rows, (0, 0, 0, -rows.shape[0] % 8))
        self.weight = rows.t()  # [K, N] column-major: a view of the contiguous [N, K] rows
        # sum_k (s_k - pad) * w_k = acc - pad * colsum(w); with offsets also + o * (sum_k s_k - K * pad)
        k = rows.shape[1]
        const = -self.pad_code * rows[:o].to(torch.int32).sum(1)
        if self.offset_used:
            const = const - offset * k * self.pad_code
        self.const, self.offset = const.to(torch.int32), offset.to(torch.int32)

    def unload_weight(self) -> None:
        """Release the weight operand (the kernel cannot run until :meth:`load_weight`)."""
        self.weight = self.const = self.offset = None

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        s = self.codes.int8(x, inplace)
        if self.conv_args is None:
            cols = F.pad(s, (0, self.channel_pad), value=self.pad_code)
        else:
            (sh, sw), (ph, pw) = self.conv_args["stride"], self.conv_args["padding"]
            kh, kw = self.kernel_size
            s = F.pad(s, (pw, pw, ph, ph, 0, self.channel_pad), value=self.pad_code)
            patches = s.unfold(2, kh, sh).unfold(3, kw, sw)  # B, C, Ho, Wo, kh, kw
            b, _, ho, wo = patches.shape[:4]
            cols = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, -1)
        m = cols.shape[0]
        if m <= 16:
            cols = F.pad(cols, (0, 0, 0, 17 - m))
        acc = int_mm_rows(cols.contiguous(), self.weight)[:m]
        o = self.out_channels
        total = acc[:, :o] + self.const
        if self.offset_used:
            total += acc[:, o:o + 1] * self.offset
        y = torch.addcmul(self.bias, total.float(), self.scale)
        return y if self.conv_args is None else y.reshape(b, ho, wo, o).permute(0, 3, 1, 2)

    @property
    def code_nbytes(self) -> int:
        return 0 if self.weight is None else self.weight.numel()


INT_MM_MAX_ROWS = 32768


def int_mm_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm(a, b)`` in blocks of at most :data:`INT_MM_MAX_ROWS` rows of ``a``: on an H200 (torch 2.11,
    CUDA 13) cuBLASLt refused 65535+ rows with N=40 (CUBLAS_STATUS_NOT_SUPPORTED) while 32768 ran, and N=40 is the
    W8 shape of a 32-channel layer (its offset column, padded to 8). 32768 rows per product still fill a GPU. The
    blocks are equal (so none is short of the 17 rows ``_int_mm`` needs) and write into one output."""
    blocks = -(-a.shape[0] // INT_MM_MAX_ROWS)
    if blocks == 1:
        return torch._int_mm(a, b)
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    for rows, dst in zip(a.tensor_split(blocks), out.tensor_split(blocks)):
        torch._int_mm(rows, b, out=dst)
    return out


def kernel_class(backend: str, conv: bool) -> type[OneDNNKernel] | type[IntMMKernel]:
    """onednn for convolutions on CPU; ``_int_mm`` for everything else. The linear layers (timestep embedding) are
    tiny: there ``_int_mm`` measured faster than onednn and keeps the weights unpadded (onednn's blocked layout
    doubled the bytes of the 128->32 projections)."""
    return OneDNNKernel if backend == "onednn" and conv else IntMMKernel


class IntegerLayer(nn.Module):
    """Integer counterpart of a :class:`QuantLayer`: one kernel per input part (two for a split shortcut, each with
    its own activation and weight quantizer, summed in fp32); the bias is added once. Holds no fp32 weights.

    ``consumes_input``: the layer may overwrite its input (set where the caller passes a temporary nothing else
    reads); ``forward(x, inplace=...)`` overrides it per call."""

    def __init__(self, layer: QuantLayer, backend: str, consumes_input: bool = False):
        super().__init__()
        if not (layer.use_weight_quant and layer.use_act_quant):
            raise IntegerUnsupported(f"{layer.extra_repr()}: weight and activation quantization must both be on "
                                     f"(got weight {layer.use_weight_quant}, activation {layer.use_act_quant})")
        args = layer.conv_args
        if args is not None and (args["groups"] != 1 or tuple(args["dilation"]) != (1, 1)):
            raise IntegerUnsupported(f"{layer.extra_repr()}: grouped or dilated convolutions are not supported")
        conv_args = None if args is None else {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
        self.split, self.consumes_input = layer.split, consumes_input
        kernels = []
        for i, (wq, aq, w) in enumerate(zip(layer.weight_quantizers(), layer.act_quantizers(),
                                            layer.halves(layer.weight.detach()))):
            w8, scale, offset = weight_codes(wq, w)
            bias = layer.bias.detach() if i == 0 and layer.bias is not None else None
            kernels.append(kernel_class(backend, conv_args is not None)(ActivationCodes(aq), w8, scale, offset, bias,
                                                                        conv_args))
        self.kernels = nn.ModuleList(kernels)

    def forward(self, x: torch.Tensor, inplace: bool | None = None) -> torch.Tensor:
        inplace = self.consumes_input if inplace is None else inplace
        parts = [x[:, :self.split], x[:, self.split:]] if self.split else [x]
        out = self.kernels[0](parts[0], inplace)
        return out if len(parts) == 1 else out.add_(self.kernels[1](parts[1], inplace))


EXACT_FP32_INT = 2 ** 24  # every integer of magnitude up to this is a float32


def integer_bmm(a: torch.Tensor, b: torch.Tensor, bound: int) -> torch.Tensor:
    """Exact ``bmm`` of integer-valued fp32 [B, M, K] x [B, K, N] whose entries have magnitude at most ``bound``:
    as fp32 ``bmm`` where every partial sum is an integer below 2^24 (``K * bound^2 < 2^24``: exact in any summation
    order), one BLAS call instead of B; else one ``torch._int_mm`` per sample on int8 (it is 2-D only), padded to the
    shapes cuBLAS accepts (M > 16, K and N multiples of 8)."""
    m, k, n = a.shape[1], a.shape[2], b.shape[2]
    if k * bound * bound < EXACT_FP32_INT:
        return torch.bmm(a, b)
    a, b = a.to(torch.int8), b.to(torch.int8)
    if m <= 16 or k % 8 or n % 8:
        a, b = F.pad(a, (0, -k % 8, 0, max(0, 17 - m))), F.pad(b, (0, -n % 8, 0, -k % 8))
    a, b = a.contiguous(), b.transpose(1, 2).contiguous().transpose(1, 2)  # row-major x column-major (IntMMKernel)
    out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=torch.int32, device=a.device)
    for i in range(a.shape[0]):
        torch._int_mm(a[i], b[i], out=out[i])
    return out[:, :m, :n].float()


class IntegerAttnBlock(nn.Module):
    """``QuantAttnBlock`` with integer q/k/v/proj_out layers and integer attention matmuls: q.k and w.v multiply
    the integer levels of the calibrated q/k/v/softmax quantizers exactly (:func:`integer_bmm`) and rescale once,
    where the fake-quant block multiplies their dequantized fp32 values. Needs quantizers whose centred levels fit
    int8 (symmetric, as Q-Diffusion's ``--a_sym``); :func:`to_integer` keeps the fake-quant matmuls otherwise."""

    def __init__(self, block: QuantAttnBlock, backend: str):
        super().__init__()
        self.norm = _group_norm(block.norm)
        self.q, self.k, self.v = (IntegerLayer(getattr(block, n), backend) for n in ("q", "k", "v"))
        self.proj_out = IntegerLayer(block.proj_out, backend, consumes_input=True)
        self.codes_q, self.codes_k, self.codes_v, self.codes_w = (
            ActivationCodes(getattr(block, f"act_quantizer_{n}")) for n in "qkvw")

    @staticmethod
    def supports(block: QuantAttnBlock) -> bool:
        return all(-128 <= q.qmin - q.zero_point.item() and q.qmax - q.zero_point.item() <= 127
                   for q in (block.act_quantizer_q, block.act_quantizer_k, block.act_quantizer_v,
                             block.act_quantizer_w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        return self.proj_out(self.mix(torch.softmax(self.logits(q, k), dim=2), v)).add_(x)

    @staticmethod
    def rows(t: torch.Tensor) -> torch.Tensor:
        """[b, c, hh, ww] channels-last -> [b, hh*ww, c] (a view)."""
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1])

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``q^T k / sqrt(c)`` [b, hw, hw] from the int8 levels of q and k."""
        cq, ck = self.rows(self.codes_q.centred(q)), self.rows(self.codes_k.centred(k))
        scores = integer_bmm(cq, ck.transpose(1, 2), max(self.codes_q.bound, self.codes_k.bound))
        return scores.mul_(self.codes_q.scale * self.codes_k.scale).mul_(int(q.shape[1]) ** -0.5)

    def mix(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``v w^T`` [b, c, hh, ww] (channels-last) from the int8 levels of the probabilities and of v."""
        b, c, hh, ww = v.shape
        h = integer_bmm(self.codes_w.centred(w), self.rows(self.codes_v.centred(v)),
                        max(self.codes_w.bound, self.codes_v.bound))
        return h.mul_(self.codes_w.scale * self.codes_v.scale).view(b, hh, ww, c).permute(0, 3, 1, 2)


def silu_(x: torch.Tensor) -> torch.Tensor:
    """``swish`` in place, one pass (``F.silu``; equal to ``x * sigmoid(x)`` up to float32 rounding)."""
    return F.silu(x, inplace=True)


class IntegerResnetBlock(nn.Module):
    """``QuantResnetBlock`` with integer layers and in-place fp32 glue (``ResnetBlock.forward``'s ops, written into
    temporaries instead of new tensors). Inference only: dropout is the identity. The split shortcut overwrites its
    input, the ``cat(h, skip)`` that ``Model.forward`` builds for it."""

    def __init__(self, block: nn.Module, backend: str):
        super().__init__()
        self.norm1, self.norm2 = _group_norm(block.norm1), _group_norm(block.norm2)
        self.conv1 = IntegerLayer(block.conv1, backend, consumes_input=True)
        self.temb_proj = IntegerLayer(block.temb_proj, backend, consumes_input=True)
        self.conv2 = IntegerLayer(block.conv2, backend, consumes_input=True)
        self.shortcut_name = next((n for n in ("conv_shortcut", "nin_shortcut") if hasattr(block, n)), None)
        if self.shortcut_name:  # same module path as in the quantized model
            shortcut = getattr(block, self.shortcut_name)
            self.add_module(self.shortcut_name, IntegerLayer(shortcut, backend, consumes_input=shortcut.split > 0))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(silu_(self.norm1(x)))
        h.add_(self.temb_proj(swish(temb))[:, :, None, None])
        h = self.conv2(silu_(self.norm2(h, inplace=True)))
        return h.add_(getattr(self, self.shortcut_name)(x) if self.shortcut_name else x)


class ChannelsLastGroupNorm(nn.GroupNorm):
    """GroupNorm in the channels-last layout the integer convs produce (converting layouts costs several plain
    passes): two-pass statistics from per-channel means, which are fast reductions in this layout. PyTorch's
    own channels-last GroupNorm kernel is many times slower at one or two channels per group and large batches (the
    embedded model), see benchmarks/bench_int_kernels.py. Float32 like the FP model's GroupNorm; values differ from
    it by rounding only: the output is ``x * scale + (bias - mean * scale)`` as in PyTorch's own kernel.

    One temporary: the squared deviations are computed in place, and their buffer then takes the output. A second
    temporary for the deviations made the whole integer forward measurably slower on a 2-core CPU, where large
    activations fall out of cache (benchmarks/bench_int_revisions.py, docs/benchmarks.md)."""

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``inplace``: ``x`` is a temporary and may be overwritten (the output is written into it)."""
        x = x.contiguous(memory_format=torch.channels_last)
        b, c = x.shape[:2]
        g = self.num_groups

        def group_mean(t: torch.Tensor) -> torch.Tensor:  # per (sample, group), broadcast back to channels
            m = t.mean((2, 3))
            if c != g:  # equal-size channels: the group mean is the mean of its channel means
                m = m.view(b, g, -1).mean(2, keepdim=True).expand(b, g, c // g)
            return m.reshape(b, c, 1, 1)

        mean = group_mean(x)
        squares = (x - mean).square_()
        scale = group_mean(squares).add_(self.eps).rsqrt_().mul_(self.weight.view(1, c, 1, 1))
        shift = torch.addcmul(self.bias.view(1, c, 1, 1), mean, scale, value=-1)
        return torch.addcmul(shift, x, scale, out=x if inplace else squares)


def _group_norm(gn: nn.GroupNorm) -> ChannelsLastGroupNorm:
    out = ChannelsLastGroupNorm(gn.num_groups, gn.num_channels, gn.eps, gn.affine)
    out.load_state_dict(gn.state_dict())
    return out.to(gn.weight.device)


# layers whose input is a temporary of the FP forward (Downsample's pad, Upsample's interpolate, swish outputs, the
# attention output), so the integer layer may divide it in place
CONSUMING_LAYERS = ("downsample.conv", "upsample.conv", "conv_out", "temb.dense.1", "proj_out")


class IntegerUNet(nn.Module):
    """``forward(x, t)`` of the quantized model with integer conv/linear layers (see the module docstring).

    Built for one device (its kernels are not moved by ``.to()``); inference only. Activations inside are
    channels-last (what the kernels produce); the output is a contiguous NCHW tensor."""

    def __init__(self, model: nn.Module, backend: str):
        super().__init__()
        self.model, self.backend = model, backend

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last), t).contiguous()

    def kernels(self) -> list[OneDNNKernel | IntMMKernel]:
        return [m for m in self.modules() if isinstance(m, (OneDNNKernel, IntMMKernel))]

    def resident_nbytes(self) -> int:
        """All resident bytes of this model (:func:`resident_nbytes`)."""
        return resident_nbytes([self])


def resident_nbytes(models: Sequence[nn.Module]) -> int:
    """Resident bytes of integer models (or ``IntegerSegments``) held together: onednn's packed weights (blocked
    layout, with its padding and compensation) and rows of ones, plus every tensor they keep (int8 ``_int_mm``
    weights, shared segment codes, per-channel scales, biases, GroupNorm affines, activation steps), a tensor that
    several models share (:func:`share_constants`) counted once."""
    seen: set[int] = set()
    total = 0
    ones = {id(k.ones): k.ones for model in models for k in model.modules()
            if isinstance(k, OneDNNKernel) and k.ones is not None}
    total += sum(int(torch.ops.mkldnn._nbytes(t)) for t in ones.values())
    for model in models:
        total += sum(k.code_nbytes for k in model.modules() if isinstance(k, OneDNNKernel))
        for t in [*model.parameters(), *model.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def share_constants(models: Sequence[IntegerUNet]) -> None:
    """Point the models' equal floating-point tensors at one copy. Calibration learns only the rounding of the
    weight codes and the activation steps, so the K segment models of a run hold equal biases, weight scales and
    GroupNorm affines: K copies of them would be resident for nothing. Integer codes are never shared (each
    segment's own), and nothing writes to the shared tensors (the runtime is inference only)."""
    kept: dict[tuple, list[torch.Tensor]] = {}
    for model in models:
        for module in model.modules():
            for kind, store in (("parameter", module._parameters), ("buffer", module._buffers)):
                for name, t in store.items():
                    if t is None or not t.is_floating_point():
                        continue
                    candidates = kept.setdefault((kind, t.dtype, t.device, t.shape, t.stride()), [])
                    same = next((u for u in candidates if u is t or torch.equal(u, t)), None)
                    if same is None:
                        candidates.append(t)
                    else:
                        store[name] = same


def to_integer(qmodel: QuantizedUNet, backend: str | None = None) -> IntegerUNet:
    """The integer runtime of a calibrated (or packed-export-loaded) ``QuantizedUNet``, on the device of its
    parameters. ``backend``: "onednn" (x86 CPU) or "int_mm" (CUDA; also runs on CPU); default by device.

    Raises :class:`IntegerUnsupported` (a ValueError) when a layer cannot run in integer: activation or weight
    quantization off, an uninitialised activation quantizer, more than 8 bits, soft rounding, grouped convs."""
    if not isinstance(qmodel, QuantizedUNet):
        raise TypeError(f"to_integer takes a QuantizedUNet, got {type(qmodel).__name__}")
    device = next(qmodel.parameters()).device
    backend = backend or default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "onednn" and device.type != "cpu":
        raise IntegerUnsupported(f"the onednn backend runs on CPU, the model is on {device}")
    for m in qmodel.modules():  # attention q/k/v/softmax stay fake-quant: they must be on and initialised
        if isinstance(m, QuantAttnBlock):
            if not m.use_act_quant:
                raise IntegerUnsupported("attention activation quantization (q/k/v/softmax) is off")
            if not all(q.inited for q in (m.act_quantizer_q, m.act_quantizer_k, m.act_quantizer_v, m.act_quantizer_w)):
                raise IntegerUnsupported("an attention activation quantizer was never initialised (run a "
                                         "calibration forward)")
    # deep-copy the network with every resnet block, QuantLayer and GroupNorm replaced by its integer-runtime
    # counterpart (fp32 weights are never copied)
    memo: dict[int, nn.Module] = {}
    blocks = tuple(name + "." for name, m in qmodel.model.named_modules()
                   if isinstance(m, QuantResnetBlock) or isinstance(m, QuantAttnBlock) and IntegerAttnBlock.supports(m))
    for name, m in qmodel.model.named_modules():
        if isinstance(m, QuantResnetBlock):
            memo[id(m)] = IntegerResnetBlock(m, backend)
        elif isinstance(m, QuantAttnBlock) and IntegerAttnBlock.supports(m):
            memo[id(m)] = IntegerAttnBlock(m, backend)
        elif name.startswith(blocks):
            continue
        elif isinstance(m, QuantLayer):
            memo[id(m)] = IntegerLayer(m, backend, consumes_input=name.endswith(CONSUMING_LAYERS))
        elif isinstance(m, nn.GroupNorm):
            memo[id(m)] = _group_norm(m)
    model = copy.deepcopy(qmodel.model, memo)
    return IntegerUNet(model, backend).eval().requires_grad_(False)

