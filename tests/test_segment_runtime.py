"""IntegerSegments: K segment models resident as one shared code set plus rounding bits, exact to ``to_integer``."""
from __future__ import annotations

import copy

import pytest
import torch

from mmqdiff.data import timestep_segments
from mmqdiff.quant import AdaRoundQuantizer, IntegerSegments, resident_nbytes, set_rounding, to_integer
from mmqdiff.quant.segment_runtime import pack_bits, unpack_bits

from .test_integer import embedded, embedded_quantized, inputs, needs_onednn, trajectories  # noqa: F401 (fixtures)


def test_bits_pack_eight_per_byte_least_significant_first():
    bits = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1])
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b1101, 1]
    for n in (1, 7, 8, 9, 63, 1000):
        b = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(n))
        assert torch.equal(unpack_bits(pack_bits(b), n), b.to(torch.int32))


def calibrated_segments(embedded, trajectories, weight_bits: int, k: int) -> list:  # noqa: F811
    """K segment models as calibration leaves them: activation ranges from each segment's steps, AdaRound hard
    rounding that differs between segments (random ``alpha`` per segment)."""
    models = []
    for s, steps in enumerate(timestep_segments(100, k)):
        q = embedded_quantized(embedded, trajectories, weight_bits, steps)
        for a in q.modules():
            if isinstance(a, AdaRoundQuantizer):
                g = torch.Generator().manual_seed(10 + s)
                a.alpha.data = torch.randn(a.alpha.shape, generator=g).to(a.alpha.device)
        set_rounding(q, "hard")
        models.append(q)
    return models


@needs_onednn
@pytest.mark.parametrize("backend", ["onednn", "int_mm"])
@pytest.mark.parametrize("weight_bits", [4, 8])
def test_each_segment_equals_its_own_runtime_in_any_order(embedded, trajectories, weight_bits, backend):  # noqa: F811
    fakes = calibrated_segments(embedded, trajectories, weight_bits, 3)
    alone = [to_integer(q, backend) for q in fakes]
    segments = IntegerSegments(fakes, backend)
    assert len(segments) == 3 and all(c.shared for c in segments.codes)  # AdaRound: levels differ by 0 or 1
    assert sum(int(c.bits.count_nonzero()) for c in segments.codes) > 0  # the segments' rounding really differs
    x, t = inputs(fakes[0], 2, seed=7)
    with torch.inference_mode():
        for k in (2, 0, 1, 1, 2):
            assert torch.equal(segments[k](x, t), alone[k](x, t))
            assert segments.active == k
        with pytest.raises(IndexError, match="segment 3 of 3"):
            segments[3]
        assert torch.equal(segments[2](x, t), alone[2](x, t))  # a bad index leaves the active segment intact


@needs_onednn
@pytest.mark.parametrize("weight_bits", [4, 8])
def test_four_segments_resident_below_one_fp_model(embedded, trajectories, weight_bits):  # noqa: F811
    """pack="active": one shared int8 code set + 4 rounding bits per weight + one packed segment, under FP's fp32
    parameters; pack="all" holds four packed int8 sets (above FP). Only the active segment's kernels hold weights."""
    fakes = calibrated_segments(embedded, trajectories, weight_bits, 4)
    fp_bytes = sum(p.numel() * p.element_size() for p in embedded.parameters())
    active, every = IntegerSegments(fakes), IntegerSegments(fakes, pack="all")
    active[3]
    packed = [[getattr(k, "packed", getattr(k, "weight", None)) is not None for k in m.kernels()] for m in active.models]
    assert all(packed[3]) and not any(packed[0] + packed[1] + packed[2])
    assert resident_nbytes([active]) < 0.7 * fp_bytes < fp_bytes < resident_nbytes([every])
    x, t = inputs(fakes[0], 2, seed=8)
    with torch.inference_mode():
        assert all(torch.equal(active[k](x, t), every[k](x, t)) for k in (1, 3, 0))


@needs_onednn
def test_layers_whose_levels_differ_by_more_than_one_keep_each_segments_codes(embedded, trajectories):  # noqa: F811
    """Segments quantized from different FP weights (no common base): each keeps its own int8 codes, still exact."""
    other = copy.deepcopy(embedded)
    with torch.no_grad():
        for i, p in enumerate(other.parameters()):
            p.add_(p.std() * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    fakes = [embedded_quantized(m, trajectories, 4, steps) for m, steps in
             zip((embedded, other), timestep_segments(100, 2))]
    segments = IntegerSegments(fakes, "int_mm")
    assert not any(c.shared for c in segments.codes)
    x, t = inputs(fakes[0], 2, seed=9)
    with torch.inference_mode():
        for k in (1, 0):
            assert torch.equal(segments[k](x, t), to_integer(fakes[k], "int_mm")(x, t))


def test_bad_arguments_say_what_was_expected(embedded, trajectories):  # noqa: F811
    with pytest.raises(ValueError, match="pack must be one of .*'sometimes'"):
        IntegerSegments([embedded_quantized(embedded, trajectories, 4)], pack="sometimes")
    with pytest.raises(ValueError, match="at least one segment model"):
        IntegerSegments([])
