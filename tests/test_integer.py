"""Integer runtime (``to_integer``): exact codes, every layer within a float32 accumulation bound of the fake-quant
layer, whole-network divergence only at rounding ties, images after 100 quad steps, the packed-export path, and the
sampler switch."""
from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml

from mmqdiff.data import record_trajectories, timestep_segments
from mmqdiff.diffusion import (build_model, ddim_sample, file_sha256, linear_betas, load_checkpoint,
                               state_dict_sha256, timesteps)
from mmqdiff.lightning.predict import MultiModelSampler, SampleIndices, SampleWriter, load_samples
from mmqdiff.segments import SegmentedModel
from mmqdiff.segments.run_folder import segment_dir, write_manifest
from mmqdiff.evaluation.fidelity import psnr
from mmqdiff.quant import (AdaRoundQuantizer, IntegerSegments, IntegerUNet, IntegerUnsupported, QuantConfig,
                           QuantLayer, UniformAffineQuantizer, config_from_state, export_packed, load_packed,
                           quant_layers, quantize_model, resident_nbytes, set_rounding, share_constants, to_integer)
from mmqdiff.quant import integer
from mmqdiff.quant.integer import (ActivationCodes, ChannelsLastGroupNorm, IntegerAttnBlock, IntegerLayer, box_sum,
                                   centred_channel_sum, integer_bmm, ones_row, onednn_available, weight_codes)

from .conftest import ROOT, TINY

U = 2.0 ** -24  # float32 unit roundoff
needs_onednn = pytest.mark.skipif(not onednn_available(), reason="needs PyTorch's x86 onednn quantized ops")


def quantized(fp: torch.nn.Module, weight_bits: int, x: torch.Tensor, t: torch.Tensor) -> torch.nn.Module:
    """quantize_model + activation ranges from one forward on (x, t) (nearest rounding), frozen: no calibration
    needed for exactness."""
    q = quantize_model(fp, QuantConfig(weight_bits=weight_bits)).eval()
    q.set_quant_state(True, True)
    with torch.no_grad():
        q(x, t)
    q.freeze()
    return q


@pytest.fixture(scope="module")
def embedded():
    return load_checkpoint(build_model(ROOT / "configs/embedded.yaml"), ROOT / "checkpoints/embedded_unet.pt").eval()


@pytest.fixture(scope="module")
def trajectories(embedded):
    """Inputs of the FP model along 2 DDIM trajectories (100 quad steps): realistic activation ranges."""
    with torch.no_grad():
        return record_trajectories(embedded, range(2), 0, timesteps(100, "quad"), linear_betas(), 0.0, (3, 16, 16))


def embedded_quantized(embedded, trajectories, weight_bits: int, steps: range = range(100)) -> torch.nn.Module:
    """The embedded model quantized with activation ranges from 4 steps of ``steps`` on the FP trajectories (what a
    segment's calibration data would cover)."""
    xs, ts = trajectories
    pick = list(steps)[::max(1, len(steps) // 4)][:4]
    return quantized(embedded, weight_bits, xs[pick].flatten(0, 1), ts[pick].flatten())


@pytest.fixture(scope="module")
def cifar_w8():
    """The CIFAR-10 config (35.7M parameters) with random weights, W8A8 (asymmetric 8-bit weights need offsets)."""
    torch.manual_seed(0)
    fp = build_model(ROOT / "configs/cifar10.yaml").eval()
    g = torch.Generator().manual_seed(0)
    return quantized(fp, 8, torch.randn(2, 3, 32, 32, generator=g), torch.tensor([100.0, 700.0]))


def inputs(model: torch.nn.Module, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (x, t) on the model's device (drawn on the CPU: the same values on every device)."""
    g = torch.Generator().manual_seed(seed)
    r = model.model.resolution if hasattr(model, "model") else model.resolution
    device = next(model.parameters()).device
    return torch.randn(n, 3, r, r, generator=g).to(device), torch.randint(0, 1000, (n,), generator=g).float().to(device)


# -- codes ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), [1, 1], [1, 1]), ((3, 3), [2, 2], [0, 0]),
                                                    ((3, 3), [2, 2], [1, 1]), ((1, 1), [1, 1], [0, 0]),
                                                    ((2, 3), [1, 2], [0, 1])])
@needs_onednn
def test_window_sums_equal_a_ones_convolution(kernel, stride, padding):
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 256, (3, 5, 9, 8), generator=g, dtype=torch.uint8)
    for codes, zero_point in ((u, 0), (u.contiguous(memory_format=torch.channels_last), 128), (u[:, 1:4], 77)):
        s = centred_channel_sum(codes, zero_point, ones_row(codes.shape[1]))
        assert torch.equal(s, (codes.double() - zero_point).sum(1, keepdim=True).float())
        ones = torch.ones((1, 1) + kernel)
        assert torch.equal(box_sum(s, kernel, stride, padding), torch.nn.functional.conv2d(s, ones, None, stride,
                                                                                           padding))
    linear = u[:, :, 0, 0]  # linear inputs [B, C]
    assert torch.equal(centred_channel_sum(linear, 5, ones_row(5)), (linear.double() - 5).sum(1, keepdim=True).float())


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, False), (6, True)])
def test_activation_codes_are_the_fake_quantizer_levels(bits, symmetric):
    q = UniformAffineQuantizer(bits, symmetric)
    g = torch.Generator().manual_seed(bits)
    q.init_from(torch.randn(1000, generator=g) * 2 + 0.3)
    delta = q.delta.detach()
    ties = (torch.arange(-300, 300) + 0.5) * delta  # x/delta lands on (or within an ulp of) .5: round half to even
    x = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.randn(20000, generator=g) * 3])
    codes = ActivationCodes(q)
    expected = q(x)
    u = codes.uint8(x)
    assert u.dtype == torch.uint8 and not u.is_quantized
    assert torch.equal((u.float() - codes.zero_point) * delta, expected)
    assert torch.equal((codes.int8(x).float() + 128 - codes.zero_point) * delta, expected)
    y = x.clone()
    assert torch.equal(codes.uint8(y, inplace=True), u)  # the in-place variant gives the same codes


@pytest.mark.parametrize("channels,groups", [(8, 8), (12, 4), (32, 16)])  # 1, 3 and 2 channels per group
@pytest.mark.parametrize("inplace", [False, True])
def test_channels_last_group_norm_equals_float64_group_norm(channels, groups, inplace):
    """Against GroupNorm in float64, on channels whose means are several times their spread. The output is
    ``x * scale + shift`` as in PyTorch's own kernel, so its float32 error scales with ``|x * scale| + |shift|``
    (cancellation), not with the output; in place, the output is written into the input."""
    g = torch.Generator().manual_seed(channels)
    norm = ChannelsLastGroupNorm(groups, channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0, generator=g)
        norm.bias.normal_(generator=g)
    x = (torch.randn(3, channels, 6, 5, generator=g) + 4 * torch.randn(1, channels, 1, 1, generator=g))
    x = x.contiguous(memory_format=torch.channels_last)
    x64 = x.double().reshape(3, groups, -1)
    mean, var = x64.mean(2, keepdim=True), x64.var(2, correction=0, keepdim=True)
    weight, bias = norm.weight.double().view(1, -1, 1, 1), norm.bias.double().view(1, -1, 1, 1)
    expected = ((x64 - mean) / (var + norm.eps).sqrt()).reshape(x.shape) * weight + bias

    def per_channel(t: torch.Tensor) -> torch.Tensor:  # [3, groups, 1] -> [3, channels, 1, 1]
        return t.expand(3, groups, channels // groups).reshape(3, channels, 1, 1)

    scale = per_channel((var + norm.eps).rsqrt()) * weight
    shift = bias - per_channel(mean) * scale
    bound = 16 * U * ((x.double() * scale).abs() + shift.abs() + expected.abs())
    with torch.no_grad():
        got = norm(x.clone() if inplace else x, inplace=inplace)
        kept = norm(x, inplace=False)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert bool(((got.double() - expected).abs() <= bound).all())
    assert torch.equal(got, kept)
    y = x.clone()
    with torch.no_grad():
        assert norm(y, inplace=True).data_ptr() == y.data_ptr()


def test_codes_of_a_strided_half_take_no_copy_and_equal_the_levels():
    """A split shortcut quantizes each channel half of a channels-last ``cat``: strided views. Asked to work in
    place there, the division writes a new dense tensor, so nothing is copied (``quantize_per_tensor`` copies a
    strided input), and the codes are still the fake quantizer's levels."""
    q = UniformAffineQuantizer(8, symmetric=True)
    g = torch.Generator().manual_seed(3)
    q.init_from(torch.randn(1000, generator=g))
    codes = ActivationCodes(q)
    x = torch.randn(2, 12, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    for half in (x[:, :8], x[:, 8:]):
        expected = q(half)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            u = codes.uint8(half, inplace=True)
        assert not {e.name for e in prof.events()} & {"aten::clone", "aten::copy_", "aten::contiguous"}
        assert u.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal((u.float() - codes.zero_point) * q.delta.detach(), expected)


def test_w8_weight_offsets_are_exact():
    """Asymmetric 8-bit weights: ``q - zp`` reaches +-255; each channel is stored in int8 with an integer offset."""
    w = torch.randn(6, 5, 3, 3)
    w[0] = w[0].abs() + 0.1  # all positive: zp 0, levels up to 255
    w[1] = -w[1].abs() - 0.1  # all negative: levels down to -255
    q = AdaRoundQuantizer(w, n_bits=8)
    w8, scale, offset = weight_codes(q, w)
    levels = (q.levels(w) - q.zero_point).to(torch.int32)
    assert w8.dtype == torch.int8
    assert torch.equal(w8.to(torch.int32) + offset.reshape(-1, 1, 1, 1), levels)
    assert offset[0] > 0 and offset[1] < 0  # channels out of int8 range get shifted, the others (mostly) not
    assert torch.equal(scale, q.delta.reshape(-1))
    w4 = AdaRoundQuantizer(w, n_bits=4)
    assert not weight_codes(w4, w)[2].any()  # W4: q - zp in [-15, 15], no offsets


def test_symmetric_weight_option_needs_no_offsets_and_old_exports_still_load(embedded, trajectories):
    xs, ts = trajectories
    q = quantize_model(embedded, QuantConfig(weight_bits=8, weight_symmetric=True))
    layer = q.model.conv_in
    assert layer.weight_quantizer.symmetric and bool((layer.weight_quantizer.zero_point == 0).all())
    for layer in quant_layers(q):
        for wq, w in zip(layer.weight_quantizers(), layer.halves(layer.weight)):
            assert not weight_codes(wq, w)[2].any()  # W8 codes in [-128, 127]: no offsets
    # an export written before the option existed (no config.weight_symmetric) loads as asymmetric
    old = export_packed(embedded_quantized(embedded, trajectories, 8))
    del old["config.weight_symmetric"]
    rebuilt = load_packed(quantize_model(embedded, config_from_state(old)), old)
    assert not rebuilt.config.weight_symmetric


# -- every layer within the float32 accumulation bound -------------------------------------------------------------

def accumulation_bound(layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
    """(K + 8) u (sum_k |x_k w_k| + |b|) per output, K the dot-product length: the fake-quant layer's fp32
    accumulation error (gamma_K plus the two dequantization roundings) plus the integer path's rescale (int32 -> fp32,
    scale product, multiply, bias add), computed in float64."""
    xq, wq = layer.quant_input(x).double().abs(), layer.quant_weight().double().abs()
    mag = F.linear(xq, wq) if layer.conv_args is None else F.conv2d(xq, wq, None, **layer.conv_args)
    if layer.bias is not None:
        mag = mag + layer.bias.double().abs().reshape((1, -1) + (1,) * (mag.dim() - 2))
    return (layer.weight[0].numel() + 8) * U * mag


def first_calls(model: torch.nn.Module, kind: type, x: torch.Tensor,
                t: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of the first call of every ``kind`` module inside ``model.model`` in one forward, by module
    path, in forward order. The input is cloned before the module runs (integer layers may overwrite theirs)."""
    seen: dict[str, list] = {}

    def before(name: str):
        def hook(module, args) -> None:
            seen.setdefault(name, [args[0].clone(), None])
        return hook

    def after(name: str):
        def hook(module, args, out) -> None:
            if seen[name][1] is None:
                seen[name][1] = out
        return hook

    modules = [(n, m) for n, m in model.model.named_modules() if isinstance(m, kind)]
    hooks = [h for n, m in modules
             for h in (m.register_forward_pre_hook(before(n)), m.register_forward_hook(after(n)))]
    with torch.no_grad():
        model(x, t)
    for h in hooks:
        h.remove()
    return {name: (inp, out) for name, (inp, out) in seen.items()}


def check_every_layer(q: torch.nn.Module, backend: str, n: int) -> None:
    im = to_integer(q, backend)
    int_layers = {name: m for name, m in im.model.named_modules() if isinstance(m, IntegerLayer)}
    seen = first_calls(q, QuantLayer, *inputs(q, n, seed=5))
    assert seen.keys() == int_layers.keys()
    with torch.no_grad():
        for name, (x, fake) in seen.items():
            out = int_layers[name](x, inplace=False)
            err = (out.double() - fake.double()).abs()
            bound = accumulation_bound(q.model.get_submodule(name), x)
            assert bool((err <= bound).all()), f"{name}: error {err.max():.3g} exceeds the bound"


@needs_onednn
@pytest.mark.parametrize("weight_bits", [4, 8])
@pytest.mark.parametrize("backend", ["onednn", "int_mm"])
def test_every_layer_within_accumulation_bound_embedded(embedded, trajectories, weight_bits, backend):
    check_every_layer(embedded_quantized(embedded, trajectories, weight_bits), backend, n=2)


@needs_onednn
def test_every_layer_within_accumulation_bound_cifar10(cifar_w8):
    check_every_layer(cifar_w8, "onednn", n=1)


@pytest.mark.parametrize("bound", [127, 4096])  # fp32 BLAS path (64 * 127^2 < 2^24); per-sample _int_mm path
def test_integer_bmm_is_exact(bound):
    """Both paths of integer_bmm equal the float64 product of the integer levels exactly."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (3, 20, 64), generator=g).float()
    b = torch.randint(-127, 128, (3, 64, 24), generator=g).float()
    got = integer_bmm(a, b, bound)
    assert got.dtype == torch.float32 and torch.equal(got.double(), torch.bmm(a.double(), b.double()))


def test_attention_matmuls_within_accumulation_bound(embedded, trajectories):
    """Given the same q, k, v and probabilities, the integer attention matmuls equal the fake-quant block's fp32
    matmuls of the dequantized values within (K + 4) u sum |a||b| (K: the reduction length)."""
    q_model = embedded_quantized(embedded, trajectories, 4)
    name = "mid.attn_1"
    fake = q_model.model.get_submodule(name)
    block = to_integer(q_model).model.get_submodule(name)
    assert isinstance(block, IntegerAttnBlock)
    captured: list[torch.Tensor] = []
    hook = fake.register_forward_pre_hook(lambda mod, a: captured.append(a[0].clone()))
    with torch.no_grad():
        q_model(*inputs(q_model, 2, seed=7))
        hook.remove()
        h = fake.norm(captured[0])
        q, k, v = fake.q(h), fake.k(h), fake.v(h)
        b, c, hh, ww = q.shape
        fq = fake.act_quantizer_q(q.reshape(b, c, -1).permute(0, 2, 1))
        fk = fake.act_quantizer_k(k.reshape(b, c, -1))
        expected = torch.bmm(fq, fk) * (int(c) ** -0.5)
        bound = (c + 4) * U * torch.bmm(fq.double().abs(), fk.double().abs()) * c ** -0.5
        assert bool(((block.logits(q, k).double() - expected.double()).abs() <= bound).all())
        w = torch.softmax(expected, dim=2)
        fv, fw = fake.act_quantizer_v(v.reshape(b, c, -1)), fake.act_quantizer_w(w)
        expected = torch.bmm(fv, fw.permute(0, 2, 1)).reshape(b, c, hh, ww)
        bound = (hh * ww + 4) * U * torch.bmm(fv.double().abs(), fw.double().abs().permute(0, 2, 1))
        got = block.mix(w, v.contiguous(memory_format=torch.channels_last)).double()
        assert bool(((got - expected.double()).abs() <= bound.reshape(b, c, hh, ww)).all())


@pytest.mark.parametrize("rows", [20, 40, 37, 5])  # one block; two equal; two unequal; below the limit
def test_int_mm_in_row_blocks_equals_one_product(monkeypatch, rows):
    """cuBLASLt refuses some tall int8 products (``int_mm_rows``): the blocked product is the same integers."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (rows, 64), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (40, 64), generator=g, dtype=torch.int8).t()
    whole = a.int() @ b.int()
    monkeypatch.setattr(integer, "INT_MM_MAX_ROWS", 20)
    assert torch.equal(integer.int_mm_rows(a, b), whole)


# -- whole network ---------------------------------------------------------------------------------------------------

def first_divergence(q, im, x, t) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Feed both models; walk the quantized layers in forward order and return the first whose input codes differ:
    (name, fake input, integer-runtime input, scaled fake input at the differing codes), or None."""
    fake = first_calls(q, QuantLayer, x, t)
    ints = {name: inp for name, (inp, _) in first_calls(im, IntegerLayer, x, t).items()}
    for name, (x_fake, _) in fake.items():
        layer = q.model.get_submodule(name)
        for aq, xf, xi in zip(layer.act_quantizers(), layer.halves(x_fake), layer.halves(ints[name])):
            differ = aq.levels(xf) != aq.levels(xi)
            if differ.any():
                return name, xf, xi, (xf / aq.delta)[differ]
    return None


@needs_onednn
@pytest.mark.parametrize("model,weight_bits", [("embedded", 4), ("embedded", 8), ("cifar10", 8)])
def test_noise_prediction_diverges_only_at_rounding_ties(request, embedded, trajectories, model, weight_bits):
    check_divergence_only_at_rounding_ties(embedded_quantized(embedded, trajectories, weight_bits)
                                           if model == "embedded" else request.getfixturevalue("cifar_w8"))


def check_divergence_only_at_rounding_ties(q: torch.nn.Module) -> None:
    """Outputs agree to float32 accumulation error unless an activation code differs; the first code that differs
    (in forward order) sits within float32 error of a rounding tie, where the fake-quant model itself rounds either
    way depending on summation order."""
    im = to_integer(q)
    x, t = inputs(q, 2, seed=11)
    with torch.no_grad():
        fake_eps, int_eps = q(x, t), im(x, t)
    found = first_divergence(q, im, x, t)
    if found is None:
        assert (int_eps - fake_eps).abs().max() <= 1e-4 * (1 + fake_eps.abs().max())
    else:
        name, xf, xi, scaled = found
        upstream = (xf - xi).abs().max() / q.model.get_submodule(name).act_quantizers()[0].delta
        distance_to_tie = ((scaled - scaled.floor()) - 0.5).abs()
        assert bool((distance_to_tie <= upstream + 8 * U * scaled.abs()).all()), name


@needs_onednn
@pytest.mark.parametrize("weight_bits", [4, 8])
@pytest.mark.parametrize("k", [1, 4])
def test_images_after_100_quad_steps_match_fake_quant(embedded, trajectories, weight_bits, k):
    check_images_match_fake_quant(embedded, trajectories, weight_bits, k)


def check_images_match_fake_quant(embedded, trajectories, weight_bits: int, k: int) -> None:  # noqa: F811
    """Same noise, K segment models (activation ranges from each segment's own steps): integer vs fake-quant final
    images at PSNR >= 40 dB, on the device of ``embedded``. (Float32 summation order alone moves the fake-quant
    images by as much: activation codes at rounding ties flip, and 100 steps carry that on.)"""
    segments = timestep_segments(100, k)
    fakes = [embedded_quantized(embedded, trajectories, weight_bits, steps) for steps in segments]
    ints = [to_integer(q) for q in fakes]
    device = next(embedded.parameters()).device
    seq, betas = timesteps(100, "quad"), linear_betas().to(device)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.inference_mode():
        a = ddim_sample(SegmentedModel(segments, fakes, seq).model_for_step, x_T, seq, betas)
        b = ddim_sample(SegmentedModel(segments, ints, seq).model_for_step, x_T, seq, betas)
    to_unit = lambda z: (z.clamp(-1, 1) + 1) / 2  # noqa: E731
    assert psnr(to_unit(a), to_unit(b)) >= 40.0


# -- packed export, resident bytes, refusals -------------------------------------------------------------------------

@needs_onednn
def test_runtime_from_packed_export_alone_equals_runtime_from_calibrated_model(embedded, trajectories):
    q = embedded_quantized(embedded, trajectories, 4)
    for a in q.modules():  # AdaRound hard rounding, as after reconstruction
        if isinstance(a, AdaRoundQuantizer):
            a.alpha.data = torch.randn(a.alpha.shape, generator=torch.Generator().manual_seed(2))
    set_rounding(q, "hard")
    export = export_packed(q)
    rebuilt = load_packed(quantize_model(build_model(ROOT / "configs/embedded.yaml"), config_from_state(export)),
                          export)
    x, t = inputs(q, 2, seed=4)
    with torch.no_grad():
        assert torch.equal(to_integer(rebuilt)(x, t), to_integer(q)(x, t))


@needs_onednn
def test_integer_runtime_keeps_int8_codes_only(embedded, trajectories):
    """No fp32 copy of a quantized weight: resident bytes ~1/4 of FP, and K=4 int8 codes ~ one FP weight set."""
    im = to_integer(embedded_quantized(embedded, trajectories, 4))
    weights = [m.weight for m in embedded.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    fp_weight_bytes = sum(w.numel() * 4 for w in weights)
    fp_bytes = sum(p.numel() * 4 for p in embedded.parameters())
    assert not any(p.dtype == torch.float32 and p.numel() >= 64 * 64 for p in [*im.parameters(), *im.buffers()])
    # with onednn's padding and zero-point compensation; the blocked layout pads to the CPU's vector width
    # (within 2% on AVX-512 hosts without AMX, 4% on one with AMX)
    codes = sum(k.code_nbytes for k in im.kernels())
    assert fp_weight_bytes / 4 <= codes <= 1.06 * fp_weight_bytes / 4
    assert im.resident_nbytes() < 0.3 * fp_bytes


@needs_onednn
def test_segments_share_their_equal_constants_and_keep_their_own_codes(embedded, trajectories):
    """Two segments calibrated on different steps: same biases, weight scales and norms (shared once after
    share_constants), different activation steps (kept apart); outputs unchanged; resident bytes fall by exactly
    the bytes of the tensors no longer held."""
    fakes = [embedded_quantized(embedded, trajectories, 4, steps) for steps in timestep_segments(100, 2)]
    ints = [to_integer(q) for q in fakes]
    x, t = inputs(fakes[0], 2, seed=5)
    with torch.inference_mode():
        before = [m(x, t) for m in ints]
    separate = resident_nbytes(ints)
    before_tensors = {id(t): t for m in ints for t in [*m.parameters(), *m.buffers()]}
    ids = [{id(t) for t in [*m.parameters(), *m.buffers()]} for m in ints]
    share_constants(ints)
    tensors = [{id(t): t for t in [*m.parameters(), *m.buffers()]} for m in ints]
    common = [tensors[0][i] for i in tensors[0].keys() & tensors[1].keys()]
    assert common and all(t.is_floating_point() for t in common)
    assert not ids[0] & ids[1] and not {id(t) for t in common} & ids[1]  # the second model now points at the first's
    bias, norm = (ints[1].model.get_submodule(n) for n in ("conv_in.kernels.0", "mid.block_1.norm1"))
    assert bias.bias is ints[0].model.get_submodule("conv_in.kernels.0").bias
    assert norm.weight is ints[0].model.get_submodule("mid.block_1.norm1").weight
    steps = [m.model.get_submodule("mid.block_1.conv1.kernels.0.codes").delta for m in ints]
    assert steps[0] is not steps[1] and not torch.equal(*steps)  # each segment's own activation step
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    saved = separate - resident_nbytes(ints)
    assert saved == nbytes(before_tensors.values()) - nbytes({id(t): t for m in ints for t in
                                                               [*m.parameters(), *m.buffers()]}.values())
    assert saved >= nbytes(common)  # (equal constants inside one model are shared too)
    with torch.inference_mode():
        assert all(torch.equal(a, m(x, t)) for a, m in zip(before, ints))


def test_refusals_say_why(embedded, trajectories):
    q = embedded_quantized(embedded, trajectories, 4)
    q.set_quant_state(True, False)
    with pytest.raises(IntegerUnsupported, match="activation quantization .*is off"):
        to_integer(q, "int_mm")
    fresh = quantize_model(embedded, QuantConfig())
    fresh.set_quant_state(True, True)  # activation quantizers never saw data
    with pytest.raises(IntegerUnsupported, match="never initialised"):
        to_integer(fresh, "int_mm")
    with pytest.raises(ValueError, match="backend must be one of"):
        to_integer(q, "tensorrt")
    with pytest.raises(TypeError, match="takes a QuantizedUNet"):
        to_integer(embedded)


# -- the sampler switch ----------------------------------------------------------------------------------------------

def write_run(tmp_path, fp: torch.nn.Module, k: int, num_steps: int, quant_act: bool = True):
    """A calibration run folder (manifest + packed exports) of K quickly quantized copies of ``fp``."""
    run = tmp_path / f"run_k{k}_{quant_act}"
    segments, t_of_step = [], timesteps(num_steps, "quad")[::-1]
    for s, steps in enumerate(timestep_segments(num_steps, k)):
        q = quantize_model(fp, QuantConfig(quant_act=quant_act)).eval()
        q.set_quant_state(True, True)
        with torch.no_grad():
            q(*inputs(q, 2, seed=s))
        path = segment_dir(run, s) / "packed.pt"
        path.parent.mkdir(parents=True)
        torch.save(export_packed(q), path)
        segments.append({"index": s, "steps": [steps.start, steps.stop], "t_range": [t_of_step[steps.start], t_of_step[steps.stop - 1]], "pairs": 0,
                         "quant_state": str(path.relative_to(run)), "packed": str(path.relative_to(run)),
                         "sha256": {"packed": file_sha256(path)}, "model_bytes": 0, "wall_seconds": 0.0,
                         "peak_mem_bytes": 0})
    write_manifest(run, {"k": k, "num_steps": num_steps, "skip_type": "quad", "segments": segments,
                         "weight_bits": 4, "act_bits": 8, "quant_config": {}, "reconstruction": {},
                         "fp_model": {"checkpoint": "tiny.pt", "sha256": state_dict_sha256(fp)}, "calibration": {},
                         "wall_seconds": 0.0, "peak_mem_kind": "none"})
    return run


def sample(tmp_path, run, runtime: str, name: str, pack: str = "active", accelerator: str = "cpu"):
    out = tmp_path / name
    sampler = MultiModelSampler(str(tmp_path / "tiny.yaml"), str(tmp_path / "tiny.pt"), calibration_run=run,
                                num_steps=4, real_source=None, runtime=runtime, pack=pack)
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                        callbacks=[SampleWriter()], default_root_dir=out)
    trainer.predict(sampler, datamodule=SampleIndices(3, 3, str(out)), return_predictions=False)
    return sampler, json.loads((out / "metrics.json").read_text()), load_samples(out)[0]


def write_tiny(tmp_path, tiny_model) -> None:
    torch.save(tiny_model.state_dict(), tmp_path / "tiny.pt")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"model": TINY}))


@needs_onednn
def test_sampler_runs_the_integer_runtime_and_records_time(tmp_path, tiny_model):
    write_tiny(tmp_path, tiny_model)
    run = write_run(tmp_path, tiny_model, k=2, num_steps=4)
    int_sampler, int_metrics, int_images = sample(tmp_path, run, "int", "int")
    _, fake_metrics, fake_images = sample(tmp_path, run, "fake", "fake")
    assert int_metrics["runtime"] == "int" and fake_metrics["runtime"] == "fake"
    assert isinstance(int_sampler.segmented.models, IntegerSegments)
    models = list(int_sampler.segmented.models.models)
    assert len(models) == 2 and all(isinstance(m, IntegerUNet) for m in models)
    first, second = ({id(t): t for t in [*m.parameters(), *m.buffers()]} for m in models)
    shared = [first[i] for i in first.keys() & second.keys()]
    assert shared and all(t.is_floating_point() for t in shared)  # equal constants once; integer codes never
    _, all_metrics, all_images = sample(tmp_path, run, "int", "int_all", pack="all")  # every segment packed
    assert all_metrics["runtime"] == "int" and torch.equal(all_images, int_images)
    _, auto_metrics, auto_images = sample(tmp_path, run, "auto", "auto")  # the default: int on CPU
    assert auto_metrics["runtime"] == "int" and torch.equal(auto_images, int_images)
    _, fp_metrics, _ = sample(tmp_path, None, "int", "fp")
    assert fp_metrics["runtime"] == "fp"
    for metrics in (int_metrics, fake_metrics, fp_metrics):
        assert metrics["num_images"] == 3 and metrics["sampling_seconds_per_image"] > 0
    assert psnr(int_images, fake_images) >= 40.0
    # a resumed run with nothing left to sample reports no time rather than a made-up one
    _, again, _ = sample(tmp_path, run, "int", "int")
    assert again["sampling_seconds_per_image"] is None


def test_sampler_falls_back_to_fake_and_says_why(tmp_path, tiny_model):
    write_tiny(tmp_path, tiny_model)
    run = write_run(tmp_path, tiny_model, k=1, num_steps=4, quant_act=False)  # weights only: no integer inputs
    with pytest.warns(UserWarning, match="runtime 'fake' instead of 'int': .*activation quantization"):
        _, metrics, _ = sample(tmp_path, run, "int", "fallback")
    assert metrics["runtime"] == "fake"
    with pytest.raises(ValueError, match="runtime must be one of"):
        MultiModelSampler(str(tmp_path / "tiny.yaml"), str(tmp_path / "tiny.pt"), runtime="int4")
