"""Uniform affine and AdaRound quantizers, and the temperature schedule, against hand-computed values."""
import math

import pytest
import torch

from mmqdiff.quant.quantizers import (MSE_P, MSE_SHRINK, MSE_STEPS, AdaRoundQuantizer, LinearTempDecay,
                                      UniformAffineQuantizer, level_range)


def uaq(x, **kw):
    q = UniformAffineQuantizer(**kw)
    return q, q(torch.tensor(x))


def test_asymmetric_max_hand_case_and_clamp():
    # 2 bits: delta = (2 - -1)/3 = 1, zp = round(1/1) = 1, levels [0, 3] -> representable [-1, 2]
    q, out = uaq([-1.0, 0.4, 0.6, 2.0], n_bits=2)
    assert q.delta.item() == 1.0 and q.zero_point.item() == 1.0
    assert out.tolist() == [-1.0, 0.0, 1.0, 2.0]
    assert q(torch.tensor([5.0, -3.0])).tolist() == [2.0, -1.0]  # clamped to the grid ends


def test_asymmetric_max_zero_point_quirk_clips_top_of_positive_tensors():
    # all positive: delta from the unclipped range (4-1)/3 = 1 but zp = round(-min(1, 0)/1) = 0 -> grid [0, 3]
    q, out = uaq([1.0, 2.0, 4.0], n_bits=2)
    assert q.delta.item() == 1.0 and q.zero_point.item() == 0.0
    assert out.tolist() == [1.0, 2.0, 3.0]


def test_symmetric_max_hand_case_and_reference_clamp_range():
    # 3 bits symmetric: n_levels = 3, clamp [-4, 3], delta = max(|-2|, 1.5)/3
    assert level_range(3, True) == (-4, 3) and level_range(8, True) == (-128, 127)
    q, out = uaq([-2.0, 0.7, 1.5], n_bits=3, symmetric=True)
    d = 2.0 / 3
    assert q.zero_point.item() == 0.0 and q.delta.item() == pytest.approx(d)
    torch.testing.assert_close(out, torch.tensor([-3 * d, d, 2 * d]))
    torch.testing.assert_close(q(torch.tensor([-2.9, 10.0])), torch.tensor([-4 * d, 3 * d]))


def test_per_channel_max_hand_case():
    w = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 1.0, 3.0]])
    q = UniformAffineQuantizer(n_bits=2, channel_wise=True)
    q.init_from(w)
    assert q.delta.shape == (2, 1)
    assert q.delta.flatten().tolist() == [1.0, 1.0] and q.zero_point.flatten().tolist() == [1.0, 0.0]


def test_zero_range_floors_delta_with_warning():
    with pytest.warns(UserWarning, match="close to zero"):
        q, out = uaq([0.0, 0.0], n_bits=8)
    assert q.delta.item() == pytest.approx(1e-8) and out.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("init", ["max", "mse"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_vectorised_channel_init_equals_per_channel_loop(init, symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 4, 3, 3, generator=g) * torch.rand(12, 1, 1, 1, generator=g) + 0.1 * torch.randn(12, 1, 1, 1)
    vec = UniformAffineQuantizer(4, symmetric, channel_wise=True, init=init)
    vec.init_from(w)
    for c in range(w.shape[0]):
        one = UniformAffineQuantizer(4, symmetric, init=init)
        one.init_from(w[c])
        assert vec.delta[c].item() == one.delta.item() and vec.zero_point[c].item() == one.zero_point.item()


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_init_picks_grid_minimum_of_float64_brute_force(symmetric):
    x = torch.randn(2000, generator=torch.Generator().manual_seed(1)) ** 3  # heavy tails: clipping pays off
    q = UniformAffineQuantizer(4, symmetric, init="mse")
    q.init_from(x)
    xd = x.double()
    qmin, qmax = level_range(4, symmetric)
    lo, hi = xd.min().item(), xd.max().item()
    if symmetric:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    best = None
    for i in range(MSE_STEPS):
        s = 1 - i * MSE_SHRINK
        delta = (hi * s) / qmax if symmetric else (hi * s - lo * s) / qmax
        zp = 0.0 if symmetric else round(-lo * s / delta)
        xq = (torch.clamp(torch.round(xd / delta) + zp, qmin, qmax) - zp) * delta
        score = (xd - xq).abs().pow(MSE_P).mean().item()
        if best is None or score < best[0]:
            best = (score, delta, zp)
    assert 0 < best[1] < (hi - lo) / qmax  # the minimum is inside the grid, not the unclipped range
    assert q.delta.item() == pytest.approx(best[1], rel=1e-5) and q.zero_point.item() == best[2]


def test_activation_quantizer_lazy_init_learnable_delta_and_ste():
    q = UniformAffineQuantizer(8, True, learn_delta=True)
    assert isinstance(q.delta, torch.nn.Parameter) and not q.inited
    q(torch.tensor([-1.0, 1.0]))
    assert q.inited and q.delta.item() == pytest.approx(1 / 127)
    x = torch.tensor([-0.9, 0.3, 0.95, 2.0], requires_grad=True)
    q(x).sum().backward()
    assert q.delta.grad is not None and x.grad.tolist() == [1.0, 1.0, 1.0, 0.0]  # STE inside the range, 0 outside
    assert "zero_point" in dict(q.named_buffers()) and len(list(q.parameters())) == 1


@pytest.fixture
def weight():
    return torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(2)) * 0.1


def test_adaround_soft_init_reproduces_fp_weight_where_grid_does_not_clip(weight):
    q = AdaRoundQuantizer(weight, n_bits=4)
    q.mode = "soft"
    soft = q(weight)
    unclipped = ((weight / q.delta + q.zero_point) >= q.qmin) & ((weight / q.delta + q.zero_point) <= q.qmax)
    assert unclipped.float().mean() > 0.9
    assert (soft - weight)[unclipped].abs().max() < 1e-6
    assert ((soft - weight).abs() <= q.delta / 2 + 1e-7).all()  # reference max init clips at most half a step


def test_adaround_hard_gives_integer_codes_in_range_and_matches_nearest_after_init(weight):
    q = AdaRoundQuantizer(weight, n_bits=4)
    nearest = q(weight)
    q.mode = "hard"
    levels = q.levels(weight)
    assert torch.equal(levels, levels.round()) and levels.min() >= 0 and levels.max() <= 15
    torch.testing.assert_close(q(weight), nearest)
    with pytest.raises(ValueError, match="rounding mode"):
        q.mode = "stochastic"


def test_round_loss_hand_values():
    q = AdaRoundQuantizer(torch.tensor([[-1.0, 0.0, 0.5, 1.0]]), n_bits=4)
    h = torch.tensor([[0.5, 1.0, 0.0, 0.75]])
    q.alpha.data = torch.logit(((h + 0.1) / 1.2).clamp(1e-6, 1 - 1e-6))
    torch.testing.assert_close(q.h(), h)
    # 1 - |2h-1|^b: h=.5 -> 1, h in {0,1} -> 0, h=.75 -> 1 - .5^b
    assert q.round_loss(2).item() == pytest.approx(1 + 0.75)
    assert q.round_loss(20).item() == pytest.approx(2 - 0.5 ** 20)


def test_linear_temperature_schedule_hand_values():
    s = LinearTempDecay(20000, warm_up=0.2, start_b=20, end_b=2)
    assert [s(t) for t in (1, 3999, 4000, 12000, 20000)] == [20, 20, 20, 11, 2]
    assert s(8000) == pytest.approx(2 + 18 * 0.75)
    assert not s.regularizing(3999) and s.regularizing(4000)
    assert math.isclose(s(20000 + 1000), 2)


def test_no_decay_phase_ends_at_the_end_temperature():
    """0 iterations (or warm-up 1.0) leave no decay phase; the old code divided by its zero length."""
    assert LinearTempDecay(0)(0) == 2.0 and LinearTempDecay(0).regularizing(0)
    assert LinearTempDecay(10, warm_up=1.0)(10) == 2.0


@pytest.mark.parametrize("margin", [0.1, 0.4, 0.49])
def test_soften_hard_keeps_every_decision_off_the_flat_ends(margin):
    """Saturated alphas (h at 0 or 1: zero gradient) restart at h = 0.5 +- margin (float64 reference), rounding the
    same way when hardened, with a non-zero gradient everywhere."""
    torch.manual_seed(0)
    q = AdaRoundQuantizer(torch.randn(4, 16), n_bits=4)
    q.alpha.data = torch.randn(4, 16) * 8  # mostly saturated, both signs
    q.mode = "hard"
    x = torch.randn(4, 16)
    hard = q(x)
    up = q.alpha >= 0
    q.soften_hard(margin)
    torch.testing.assert_close(q.h().double(), torch.where(up, 0.5 + margin, 0.5 - margin).double(), rtol=0,
                               atol=1e-6)
    assert torch.equal(q(x), hard)
    q.h().sum().backward()
    assert (q.alpha.grad > 0).all()
    with pytest.raises(ValueError, match=r"soft margin must be in \(0, 0.5\).*got 0.5"):
        q.soften_hard(0.5)
