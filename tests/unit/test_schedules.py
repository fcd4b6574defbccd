"""Logistic schedule ("Schedule Your Edit") on the sigma axis."""

from __future__ import annotations

import math

import pytest
import torch

from preprint.samplers.schedules import logistic_sigmas

SD = (0.0292, 14.6146)  # SD1.5 sigma_min, sigma_max
FLUX = (0.0029, 1.0)


def abar(t, k, t0):
    return 1.0 / (1.0 + torch.exp(k * (t - t0)))


def test_eps_sigmas_follow_the_logistic_alpha_bar():
    """Narrow k keeps the curve inside SD's range: every sigma is sqrt((1 - abar) / abar) at uniform t."""
    k, t0, steps = 6.0, 0.5, 12
    s = logistic_sigmas(steps, "eps", *SD, k=k, t0=t0).double()
    t = torch.linspace(1, 0, steps, dtype=torch.float64)
    a = abar(t, k, t0)
    assert torch.allclose(s[:-1], torch.sqrt((1 - a) / a), rtol=1e-5)
    assert float(s[-1]) == 0.0 and len(s) == steps + 1


def test_eps_uniform_in_log_snr_and_cut_to_the_model_range():
    s = logistic_sigmas(20, "eps", *SD).double()  # defaults k 15, t0 0.5 reach past both ends
    assert float(s[0]) == pytest.approx(SD[1], rel=1e-5) and float(s[-2]) == pytest.approx(SD[0], rel=1e-5)
    gaps = torch.diff(torch.log(s[:-1]))
    assert torch.allclose(gaps, gaps.mean().expand_as(gaps), rtol=1e-4)  # coincides with 'exponential'


def test_flow_sigmas_are_a_sigmoid_in_time():
    k, t0, steps = 15.0, 0.5, 10
    s = logistic_sigmas(steps, "flow", *FLUX, k=k, t0=t0).double()
    t = torch.linspace(1, 0, steps, dtype=torch.float64)
    assert torch.allclose(s[:-1], torch.sigmoid(k * (t - t0) / 2), rtol=1e-5)
    assert float(s[0]) == pytest.approx(1 / (1 + math.exp(-3.75)), rel=1e-5)
    # same SNR as the logistic abar: ((1 - s) / s)^2 = abar / (1 - abar)
    a = abar(t, k, t0)
    assert torch.allclose(((1 - s[:-1]) / s[:-1]) ** 2, a / (1 - a), rtol=1e-4)


@pytest.mark.parametrize("kind,rng", [("eps", SD), ("flow", FLUX)])
def test_strictly_decreasing_any_steps(kind, rng):
    for steps in (1, 2, 7, 50):
        s = logistic_sigmas(steps, kind, *rng)
        assert len(s) == steps + 1 and (s[1:] < s[:-1]).all() and torch.isfinite(s).all()


def test_bad_input_is_rejected_with_a_reason():
    with pytest.raises(ValueError, match="steepness"):
        logistic_sigmas(10, "eps", *SD, k=0.0)
    with pytest.raises(ValueError, match="midpoint"):
        logistic_sigmas(10, "eps", *SD, t0=1.5)
    with pytest.raises(ValueError, match="never enters"):
        logistic_sigmas(10, "eps", 2.0, 14.6, k=1.0, t0=0.5)  # the curve spans only sigma 0.78..1.28
    with pytest.raises(ValueError, match="steps"):
        logistic_sigmas(0, "eps", *SD)
