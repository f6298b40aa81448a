"""Generalized DDIM sampling where each step index may use a different network."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .schedule import alpha_bar

ModelForStep = Callable[[int], nn.Module]
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]

# Largest |x| a DDIM state (x_t or the final image) of a sane model reaches. x_t = sqrt(a) x_0 + sqrt(1 - a) e with
# |x_0| <= 1 and e standard normal, so |x_t| <= 1 + |e|; even 10^10 draws stay below 7.5 standard deviations, and a
# trained model's DDIM trajectory keeps that law. 100 leaves a wide margin for imperfect (quantized) models while a
# diverging model or data scaled by mistake (x 1e4) exceed it by orders of magnitude.
STATE_BOUND = 100.0


def check_eta(eta: float) -> float:
    """``eta`` if it is in [0, 1]: 1 is DDPM's posterior variance; above it the DDIM update takes the square root of
    a negative number (NaN images), and a negative eta is no DDIM setting."""
    if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")
    return float(eta)


def trajectory_generator(seed: int, index: int) -> torch.Generator:
    """CPU generator for trajectory ``index``: its noise depends only on (seed, index), never on batching or device."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class IndexedNoise:
    """Draws a batch of noise where row b comes from trajectory ``indices[b]``'s own generator.

    This is what makes FP and quantized runs start from identical noise, and makes the noise independent of how
    indices are batched or spread over devices. The images are too where the model's arithmetic per row does not
    depend on the batch (FP and int8 runs on CPU); fake-quant rounding turns the float kernels' batch-size-dependent
    last bits into visibly different images, which is why fake-quant sampling runs full batches of one size.
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [trajectory_generator(seed, int(j)) for j in indices]
        self.shape, self.device = tuple(shape), device

    def __call__(self) -> torch.Tensor:
        return torch.cat([torch.randn((1, *self.shape), generator=g) for g in self.generators]).to(self.device)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, t: int, t_next: int, betas: torch.Tensor, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One generalized DDIM update from t to t_next (t_next = -1 means the clean image); no x0 clipping."""
    ts = torch.tensor([t, t_next], device=betas.device)
    a_t, a_next = alpha_bar(betas, ts).to(x.dtype).to(x.device)
    x0 = (x - eps * (1 - a_t).sqrt()) / a_t.sqrt()
    c1 = eta * ((1 - a_t / a_next) * (1 - a_next) / (1 - a_t)).sqrt()
    c2 = (1 - a_next - c1 ** 2).sqrt()
    out = a_next.sqrt() * x0 + c2 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs a noise tensor")
        out = out + c1 * noise
    return out


def eps_sensitivity(seq: Sequence[int], betas: torch.Tensor) -> list[float]:
    """Per step index, ``d x_next / d eps`` of the deterministic DDIM update (eta 0), in float64:
    ``sqrt(1 - a_next) - sqrt(a_next / a_t) * sqrt(1 - a_t)``. A noise-prediction error e at step i moves the next
    sample by this times e, so squared errors weighted by its square are the sample-space damage of each step's
    error: large at the first (noisy) steps, near zero at the last ones."""
    out = []
    for t, t_next in step_pairs(seq):
        a_t, a_next = alpha_bar(betas.double(), torch.tensor([t, t_next]))
        out.append(float((1 - a_next).sqrt() - (a_next / a_t).sqrt() * (1 - a_t).sqrt()))
    return out


def step_pairs(seq: Sequence[int]) -> list[tuple[int, int]]:
    """(t, t_next) for each step index in sampling order: index 0 is the largest t."""
    seq = list(seq)
    return list(zip(reversed(seq), reversed([-1] + seq[:-1])))


@torch.no_grad()
def ddim_sample(model_for_step: ModelForStep, x_T: torch.Tensor, seq: Sequence[int], betas: torch.Tensor,
                eta: float = 0.0, generator: torch.Generator | None = None,
                callback: StepCallback | None = None,
                noise_fn: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Run the DDIM trajectory from x_T; ``model_for_step(i)`` gives the network for step index i.

    ``callback(i, t, x_t, eps)`` sees every model input, which is how calibration data is recorded.
    With eta > 0 the step noise comes from ``noise_fn()`` if given (e.g. ``IndexedNoise``), else ``generator``.
    """
    check_eta(eta)
    x = x_T
    betas = betas.to(x.device)
    for i, (t, t_next) in enumerate(step_pairs(seq)):
        t_batch = torch.full((x.shape[0],), float(t), device=x.device)
        eps = model_for_step(i)(x, t_batch)
        if callback is not None:
            callback(i, t, x, eps)
        noise = None
        if eta > 0:
            noise = noise_fn() if noise_fn is not None else torch.randn(
                x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = ddim_step(x, eps, t, t_next, betas, eta, noise)
    return x
