"""DPM-Solver++ (samplers/dpm_solver_pp.py), more: the trailing finite window, the percentile range, the first-order
step and its jump to sigma 0, and the singlestep default order."""

from __future__ import annotations

import math

import pytest
import torch

from preprint.samplers.dpm_solver_pp import (
    dynamic_threshold,
    finite_tail,
    sample_dpmpp_multistep,
    sample_dpmpp_singlestep,
)

F64 = torch.float64


def _lams(values: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=F64) for v in values]


def test_finite_tail_counts_only_the_newest_finite_run():
    """The usable multistep window is the run of finite lambdas at the newest end of the history: an older
    finite entry behind a non-finite one does not count (it cannot be joined to the newest ones by a difference)."""
    inf, nan = math.inf, math.nan
    assert finite_tail(_lams([1.0, -inf, 2.0, 3.0])) == 2
    assert finite_tail(_lams([0.5, nan, 1.0])) == 1
    assert finite_tail(_lams([-inf, 2.0, 3.0])) == 2
    assert finite_tail(_lams([1.0, 2.0, inf])) == 0
    assert finite_tail(_lams([1.0, 2.0, 3.0])) == 3
    assert finite_tail([]) == 0


@pytest.mark.parametrize("p", [1.0 + 1e-9, 1.5, 2.0])
def test_percentile_above_one_is_refused_with_a_clear_error(p):
    """A percentile is a fraction in (0, 1]: anything above 1 is refused by the thresholding itself (and so by a
    sampler given it) with a ValueError that names the percentile and its range."""
    x0 = torch.linspace(-3, 3, 24, dtype=F64).reshape(2, 3, 4)
    with pytest.raises(ValueError, match=r"percentile must be in \(0, 1\]"):
        dynamic_threshold(x0, p)
    with pytest.raises(ValueError, match="percentile"):
        sample_dpmpp_multistep(lambda x, s: torch.tanh(x), x0.clone(), torch.tensor([3.0, 1.0, 0.0], dtype=F64),
                               disable=True, threshold_percentile=p)


def _gaussian_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact denoiser of x0 ~ N(mu, s^2) per element under VE noise: D = mu + s^2 (x - mu) / (s^2 + sigma^2)."""
    mu, s2 = -0.2, 0.16
    sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return mu + s2 * (x - mu) / (s2 + sig * sig)


def test_first_order_singlestep_through_sigma_one_is_ddim():
    """Order 1 is DDIM in data prediction (Eq. 9, k = 1). For an EPS model (alpha = 1, lambda = -log sigma),
    x_next = (s_next / s) x - (e^{lambda - lambda_next} - 1) D = (s_next / s) x + (1 - s_next / s) D, at every step
    including the one that lands on sigma = 1 (nothing special happens there for alpha = 1)."""
    sig = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25], dtype=F64)
    x = 4.0 * torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(11))
    out = sample_dpmpp_singlestep(_gaussian_model, x.clone(), sig, disable=True, order=1)
    want = x.clone()
    for i in range(len(sig) - 1):
        s, t = float(sig[i]), float(sig[i + 1])
        d = _gaussian_model(want, torch.full((3,), s, dtype=F64))
        want = (t / s) * want + (1.0 - t / s) * d
    torch.testing.assert_close(out, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_jump_to_sigma_zero_is_the_prediction_whatever_the_state(order):
    """lambda_next = +inf at sigma 0: every exponential-integrator weight collapses onto the data prediction, so the
    jump returns D(x, sigma) itself and never combines the state. A state with an overflowed element (inf, as fp16
    latents can reach) and a model whose prediction stays bounded there (tanh saturates): the result is exactly the
    finite prediction, where a formula weighting the state by sigma_next / sigma = 0 would give 0 * inf = NaN."""
    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / (1.0 + sigma.reshape(-1, 1)))

    x = torch.tensor([[0.3, -1.2, math.inf], [2.0, -math.inf, 0.5]], dtype=F64)
    sig = torch.tensor([1.5, 0.0], dtype=F64)
    want = model(x, torch.full((2,), 1.5, dtype=F64))
    assert torch.isfinite(want).all()
    out = sample_dpmpp_singlestep(model, x.clone(), sig, disable=True, order=order)
    assert torch.equal(out, want)
    assert torch.equal(sample_dpmpp_multistep(model, x.clone(), sig, disable=True, order=order), want)


def test_singlestep_default_is_2s_two_calls_per_step():
    """The default singlestep solver is 2S (Algorithm 1, r1 = 1/2): two model calls per interval, one for the last
    jump to sigma 0 (5 intervals: 2 * 4 + 1 = 9 calls; 3S would make 13, DDIM 5), and the result is order 2's."""
    calls = []

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(float(sigma[0]))
        return _gaussian_model(x, sigma)

    sig = torch.tensor([6.0, 3.0, 1.4, 0.6, 0.2, 0.0], dtype=F64)
    x = 6.0 * torch.randn(2, 4, dtype=F64, generator=torch.Generator().manual_seed(5))
    out = sample_dpmpp_singlestep(model, x.clone(), sig, disable=True)
    assert len(calls) == 9
    # the intermediate point of 2S sits at half the step in lambda = -log sigma: sigma_1 = sqrt(sigma * sigma_next)
    assert calls[1] == pytest.approx(math.sqrt(6.0 * 3.0), rel=1e-12)
    calls.clear()
    assert torch.equal(out, sample_dpmpp_singlestep(model, x.clone(), sig, disable=True, order=2))
