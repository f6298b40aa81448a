"""Held-out per-step error against FP, its sample-space weighting and quarter summary."""
from __future__ import annotations

import pytest
import torch

from mmqdiff.data import CalibrationFile, save_calibration
from mmqdiff.diffusion import Model
from mmqdiff.evaluation.heldout import heldout_step_error, quarter_means, sample_space_error

from .conftest import TINY


class Shifted(torch.nn.Module):
    """FP prediction plus ``shift`` on trajectories whose first pixel is negative: the error depends on the input."""

    def __init__(self, fp: torch.nn.Module, shift: float):
        super().__init__()
        self.fp, self.shift = fp, shift

    def forward(self, x, t):
        return self.fp(x, t) + self.shift * (x[:, :1, :1, :1] < 0).to(x.dtype)


@pytest.fixture
def calib_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    xs, ts = torch.randn(4, 6, 3, 8, 8, generator=g), torch.tensor([[30.0] * 6, [20.0] * 6, [10.0] * 6, [0.0] * 6])
    return CalibrationFile(save_calibration(tmp_path / "c.pt", xs, ts)), xs


def test_heldout_error_is_the_mean_square_over_the_chosen_trajectories(tiny_model, calib_file):
    calib, xs = calib_file
    models = {i: Shifted(tiny_model, 0.5 * (i + 1)) for i in range(4)}
    held = [3, 4, 5]
    err = heldout_step_error(lambda i: models[i], tiny_model, calib, held, batch_size=2)
    for i in range(4):
        hit = (xs[i, held, 0, 0, 0] < 0).double().mean().item()  # share of held-out inputs that get the shift
        assert err[i] == pytest.approx(hit * (0.5 * (i + 1)) ** 2, rel=1e-6, abs=1e-9)
    assert heldout_step_error(lambda i: tiny_model, tiny_model, calib, held, steps=[1, 2]) == [0.0, 0.0]
    for bad in ([], [6], [-1]):
        with pytest.raises(ValueError, match="held-out trajectories"):
            heldout_step_error(lambda i: tiny_model, tiny_model, calib, bad)


def test_sample_space_error_and_quarters_hand_computed():
    assert sample_space_error([1.0, 2.0, 4.0], [0.5, -1.0, 0.0]) == pytest.approx(0.25 + 2.0)
    with pytest.raises(ValueError, match="2 per-step errors for 3 steps"):
        sample_space_error([1.0, 2.0], [1.0, 1.0, 1.0])
    assert quarter_means([1, 1, 2, 2, 3, 3, 4, 4]) == [1, 2, 3, 4]
    assert quarter_means(list(range(10))) == pytest.approx([0.5, 3.0, 5.5, 8.0])  # edges 0, 2, 5, 7, 10


def test_fp_predictions_are_computed_once_for_runs_scored_on_the_same_pairs(tiny_model, calib_file):
    """Every run of a pipeline is scored against the same FP predictions: the second run reuses them, with the same
    result; other FP weights or other pairs compute them again."""
    calib, _ = calib_file
    calls = []
    hook = tiny_model.register_forward_hook(lambda *_: calls.append(1))
    first = heldout_step_error(lambda i: Shifted(tiny_model, 0.5), tiny_model, calib, [3, 4, 5], batch_size=2)
    fp_calls = len(calls)  # the FP forwards, plus the candidate's own calls of the wrapped FP model
    again = heldout_step_error(lambda i: Shifted(tiny_model, 0.5), tiny_model, calib, [3, 4, 5], batch_size=2)
    assert again == first and len(calls) == fp_calls + fp_calls // 2  # only the candidate's forwards this time
    other = Model(**TINY).eval()
    other.load_state_dict({k: v + 1e-3 for k, v in tiny_model.state_dict().items()})
    hook.remove()
    # reusing tiny_model's predictions for ``other`` would score tiny_model against itself: 0 at every step
    assert all(e > 0 for e in heldout_step_error(lambda i: tiny_model, other, calib, [3, 4, 5], batch_size=2))
    assert heldout_step_error(lambda i: tiny_model, tiny_model, calib, [2, 3], batch_size=2) == [0.0] * 4
