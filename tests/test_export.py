"""Packed export: code packing, exact dequantization, and rebuilding a frozen model from the export alone."""
import io
import math

import pytest
import torch

from mmqdiff.diffusion import build_model
from mmqdiff.quant import (QuantConfig, QuantLayer, adaround_quantizers, config_from_state, dequantize_packed,
                           export_packed, load_packed, packed_nbytes, quantize_model, set_rounding)
from mmqdiff.quant.export import pack_codes, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 10])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    per_byte = {2: 4, 4: 2}.get(bits, 1)
    if bits <= 8:
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 / per_byte)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes.to(torch.int32))


@pytest.mark.parametrize("bits", [9, 12, 16])
def test_codes_above_8_bits_take_two_bytes_and_survive_weights_only_save(bits):
    codes = torch.randint(0, 2 ** bits, (1001,), generator=torch.Generator().manual_seed(bits))
    codes[:2] = torch.tensor([0, 2 ** bits - 1])  # both ends of the unsigned range
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint16 and packed.numel() == 1001 and packed_nbytes({"c": packed}) == 2002
    buf = io.BytesIO()
    torch.save({"c": packed}, buf)
    buf.seek(0)
    assert torch.equal(unpack_codes(torch.load(buf, weights_only=True)["c"], bits, 1001), codes.to(torch.int32))


def test_two_4bit_codes_per_byte_low_nibble_first():
    assert pack_codes(torch.tensor([1, 2, 15]), 4).tolist() == [0x21, 0x0F]


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    fp = build_model("configs/embedded.yaml").eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 1000, (8,), generator=g)
    q = quantize_model(fp, QuantConfig(keep_first_last_8bit=True)).eval()
    q.set_quant_state(True, True)
    for a in adaround_quantizers(q):
        a.alpha.data = torch.randn(a.alpha.shape, generator=g)
    set_rounding(q, "hard")
    with torch.no_grad():
        q(x, t)
    q.freeze()
    return q, (x, t)


def test_dequantized_weights_equal_fake_quant_weights_exactly(calibrated):
    q, _ = calibrated
    export = export_packed(q)
    weights = dequantize_packed(export)
    layers = {n: m for n, m in q.model.named_modules() if isinstance(m, QuantLayer)}
    assert set(weights) == {f"{n}.weight" for n in layers}
    for name, layer in layers.items():
        assert torch.equal(weights[f"{name}.weight"], layer.quant_weight()), name
    assert export["conv_in.weight_quantizer.bits"] == 8 and export["conv_in.weight_quantizer.codes"].dtype == torch.uint8
    code_bytes = sum(math.ceil(m.weight.numel() * min(m.weight_quantizer.n_bits, 8) / 8) for m in layers.values())
    assert code_bytes - len(layers) <= sum(v.numel() for k, v in export.items() if k.endswith(".codes")) <= code_bytes + 64
    fp_bytes = sum(p.numel() * 4 for n, p in q.model.named_parameters() if not n.endswith("alpha"))
    assert packed_nbytes(export) < fp_bytes / 4  # W4 codes + fp32 biases/norms/scales


def test_load_packed_rebuilds_bit_identical_frozen_model_from_export_alone(calibrated):
    q, (x, t) = calibrated
    buf = io.BytesIO()
    torch.save(export_packed(q), buf)
    buf.seek(0)
    export = torch.load(buf, weights_only=True)
    torch.manual_seed(123)  # different FP weights: everything must come from the export
    fresh = load_packed(quantize_model(build_model("configs/embedded.yaml"), config_from_state(export)).eval(), export)
    assert all(m.frozen for m in fresh.modules() if isinstance(m, QuantLayer))
    with torch.no_grad():
        assert torch.equal(fresh(x, t), q(x, t))


def test_load_packed_validates(calibrated):
    q, _ = calibrated
    export = export_packed(q)
    fresh = quantize_model(build_model("configs/embedded.yaml"), config_from_state(export))
    key = "mid.attn_1.q.weight_quantizer.codes"
    with pytest.raises(ValueError, match=key):
        load_packed(fresh, {k: v for k, v in export.items() if k != key})
    with pytest.raises(ValueError, match="format"):
        load_packed(fresh, {**export, "format": "other"})
    with pytest.raises(ValueError, match="config.keep_first_last_8bit"):
        load_packed(quantize_model(build_model("configs/embedded.yaml")), export)


def test_16_bit_export_counts_two_bytes_per_weight():
    q = quantize_model(build_model("configs/embedded.yaml"), QuantConfig(weight_bits=16, act_bits=16))
    export = export_packed(q)
    layers = [m for m in q.model.modules() if isinstance(m, QuantLayer)]
    codes = {k: v for k, v in export.items() if k.endswith(".codes")}
    assert {v.dtype for v in codes.values()} == {torch.uint16}
    assert sum(v.numel() * v.element_size() for v in codes.values()) == 2 * sum(m.weight.numel() for m in layers)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0])
    fresh = load_packed(quantize_model(build_model("configs/embedded.yaml"), config_from_state(export)).eval(), export)
    with torch.no_grad():
        assert torch.equal(fresh(x, t), q.eval()(x, t))


def test_export_refuses_soft_rounding():
    q = quantize_model(build_model("configs/embedded.yaml"))
    set_rounding(q.model.conv_in, "soft")
    with pytest.raises(ValueError, match="conv_in.weight_quantizer"):
        export_packed(q)
