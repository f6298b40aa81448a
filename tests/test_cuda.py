"""The integer runtime's CUDA backend (``torch._int_mm``) on a GPU: the same exactness checks as the CPU tests in
test_integer.py / test_segment_runtime.py, run on CUDA. Skipped without a GPU (CI has none); run them where one is:
``pytest tests/test_cuda.py``.

The fake-quant reference runs with TF32 off: cuDNN convolutions default to TF32 (10-bit mantissa), which would make
the reference, not the integer runtime, the inexact side."""
from __future__ import annotations

import copy

import pytest
import torch

from mmqdiff.diffusion import build_model
from mmqdiff.evaluation.fidelity import psnr
from mmqdiff.quant import IntegerSegments, IntegerUnsupported, to_integer
from mmqdiff.quant.integer import IntMMKernel, int_mm_rows

from .conftest import ROOT
from .test_integer import (check_divergence_only_at_rounding_ties, check_every_layer, check_images_match_fake_quant,
                           embedded, embedded_quantized, inputs, quantized, sample, trajectories, write_run,
                           write_tiny)  # noqa: F401 (fixtures)
from .test_segment_runtime import calibrated_segments

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def full_fp32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def embedded_cuda(embedded):  # noqa: F811
    return copy.deepcopy(embedded).to(CUDA)


@pytest.fixture(scope="module")
def trajectories_cuda(trajectories):  # noqa: F811
    return tuple(t.to(CUDA) for t in trajectories)


@pytest.mark.parametrize("weight_bits", [4, 8])
def test_cuda_runtime_is_int_mm_and_every_layer_within_accumulation_bound(embedded_cuda, trajectories_cuda,
                                                                          weight_bits):
    q = embedded_quantized(embedded_cuda, trajectories_cuda, weight_bits)
    im = to_integer(q)
    assert im.backend == "int_mm" and all(isinstance(k, IntMMKernel) for k in im.kernels())
    assert all(t.device.type == "cuda" for t in [*im.parameters(), *im.buffers()])
    check_every_layer(q, "int_mm", n=2)
    with pytest.raises(IntegerUnsupported, match="onednn backend runs on CPU"):
        to_integer(q, "onednn")


def test_cifar10_config_every_layer_within_accumulation_bound_cuda():
    torch.manual_seed(0)
    fp = build_model(ROOT / "configs/cifar10.yaml").eval().to(CUDA)
    g = torch.Generator().manual_seed(0)
    q = quantized(fp, 8, torch.randn(2, 3, 32, 32, generator=g).to(CUDA), torch.tensor([100.0, 700.0], device=CUDA))
    check_every_layer(q, "int_mm", n=1)
    check_divergence_only_at_rounding_ties(q)


@pytest.mark.parametrize("weight_bits", [4, 8])
def test_noise_prediction_diverges_only_at_rounding_ties_cuda(embedded_cuda, trajectories_cuda, weight_bits):
    check_divergence_only_at_rounding_ties(embedded_quantized(embedded_cuda, trajectories_cuda, weight_bits))


@pytest.mark.parametrize("weight_bits", [4, 8])
@pytest.mark.parametrize("k", [1, 4])
def test_images_after_100_quad_steps_match_fake_quant_cuda(embedded_cuda, trajectories_cuda, weight_bits, k):
    check_images_match_fake_quant(embedded_cuda, trajectories_cuda, weight_bits, k)


@pytest.mark.parametrize("weight_bits", [4, 8])
def test_segments_on_cuda_equal_their_own_runtime(embedded_cuda, trajectories_cuda, weight_bits):
    fakes = calibrated_segments(embedded_cuda, trajectories_cuda, weight_bits, 3)
    alone = [to_integer(q) for q in fakes]
    segments = IntegerSegments(fakes)
    x, t = inputs(fakes[0], 2, seed=7)
    with torch.inference_mode():
        for k in (2, 0, 1, 2):
            assert torch.equal(segments[k](x, t), alone[k](x, t))


def test_sampler_on_gpu_auto_is_fake_and_int_still_runs(tmp_path, tiny_model):
    """runtime "auto" picks fake-quant on a GPU (the int8 runtime measured slower there); "int" still runs it."""
    write_tiny(tmp_path, tiny_model)
    run = write_run(tmp_path, tiny_model, k=2, num_steps=4)
    _, auto, auto_images = sample(tmp_path, run, "auto", "auto", accelerator="gpu")
    sampler, forced, int_images = sample(tmp_path, run, "int", "int", accelerator="gpu")
    assert auto["runtime"] == "fake" and forced["runtime"] == "int"
    assert isinstance(sampler.segmented.models, IntegerSegments)
    assert psnr(auto_images, int_images) >= 40.0


def test_tall_int8_product_runs_in_row_blocks_and_is_exact():
    """65536 rows x 40 columns: cuBLASLt refused this shape in one product on an H200; ``int_mm_rows`` computes it in
    blocks, and every entry equals the float64 product (integers far below 2^53)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (65536, 64), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (40, 64), generator=g, dtype=torch.int8).t()  # column-major, as the kernels pass it
    got = int_mm_rows(a.to(CUDA), b.to(CUDA))
    assert torch.equal(got.cpu().double(), a.double() @ b.double())
