"""Edges of ``samplers/schedules.py``: Stable Diffusion's training schedule against its published sigma range,
the logistic schedule's input bounds (inclusive ends, what is refused) and its cut to the model's range."""

from __future__ import annotations

import math

import pytest
import torch

from preprint.samplers.schedules import logistic_half_log_snr, logistic_sigmas, sd_alphas_cumprod

SD = (0.0292, 14.6146)


def test_sd_training_schedule_gives_sd_sigma_range():
    """SD1.x / SDXL "scaled linear" betas: the first and last sigma sqrt((1 - abar) / abar) are ComfyUI's
    sigma_min 0.0292 and sigma_max 14.6146 for these models, over 1000 training steps."""
    acp = sd_alphas_cumprod()
    assert acp.dtype == torch.float64 and acp.shape == (1000,)
    sig = ((1 - acp) / acp).sqrt()
    assert float(sig[0]) == pytest.approx(0.0292, abs=5e-5)
    assert float(sig[-1]) == pytest.approx(14.6146, abs=5e-4)
    assert float(acp[0]) == pytest.approx(1 - 0.00085, rel=1e-12)  # abar_0 = 1 - beta_start
    assert (acp[1:] < acp[:-1]).all()


def test_sd_training_schedule_betas_are_squares_of_a_linear_ramp():
    """beta_k = (sqrt(b0) + k (sqrt(b1) - sqrt(b0)) / (n - 1))^2, so abar_k / abar_{k-1} = 1 - beta_k."""
    acp = sd_alphas_cumprod(5, 0.01, 0.09)
    betas = torch.tensor([0.1, 0.15, 0.2, 0.25, 0.3], dtype=torch.float64) ** 2
    torch.testing.assert_close(acp, torch.cumprod(1 - betas, 0), rtol=1e-14, atol=0)


def test_logistic_half_log_snr_is_linear_in_time():
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    torch.testing.assert_close(logistic_half_log_snr(t, 8.0, 0.25), torch.tensor([1.0, 0.0, -3.0],
                                                                                 dtype=torch.float64))


@pytest.mark.parametrize("t0", [0.0, 1.0])
def test_midpoint_bounds_are_inclusive(t0):
    s = logistic_sigmas(8, "eps", *SD, t0=t0)
    assert len(s) == 9 and (s[1:] < s[:-1]).all()


def test_one_step():
    s = logistic_sigmas(1, "eps", *SD)
    assert s.tolist() == pytest.approx([SD[1], 0.0], rel=1e-5)


@pytest.mark.parametrize("k", [float("inf"), float("nan"), -1.0])
def test_steepness_must_be_a_finite_positive_number(k):
    with pytest.raises(ValueError, match="steepness"):
        logistic_sigmas(10, "eps", *SD, k=k)


@pytest.mark.parametrize("t0", [-1e-9, 1.0 + 1e-9])
def test_midpoint_outside_the_unit_interval_is_refused(t0):
    with pytest.raises(ValueError, match="midpoint"):
        logistic_sigmas(10, "eps", *SD, t0=t0)


@pytest.mark.parametrize("lo,hi", [(0.0, 14.6), (-1.0, 14.6), (3.0, 3.0), (5.0, 3.0)])
def test_sigma_range_must_be_positive_and_ordered(lo, hi):
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        logistic_sigmas(10, "eps", lo, hi)


def test_a_steep_curve_is_cut_at_both_ends_of_the_range():
    """k = 30 crosses sigma_max at t = 0.5 + 2 log(14.6146) / 30 < 1 and sigma_min above t = 0: the list starts
    at sigma_max, ends (before 0) at sigma_min, and is uniform in log sigma between."""
    s = logistic_sigmas(6, "eps", *SD, k=30.0).double()
    t_hi = 0.5 + 2 * math.log(SD[1]) / 30
    t_lo = 0.5 + 2 * math.log(SD[0]) / 30
    t = torch.linspace(t_hi, t_lo, 6, dtype=torch.float64)
    torch.testing.assert_close(s[:-1], torch.exp(15 * (t - 0.5)), rtol=1e-5, atol=0)
    assert float(s[0]) == pytest.approx(SD[1], rel=1e-5) and float(s[-2]) == pytest.approx(SD[0], rel=1e-5)


def test_flow_curve_below_the_top_starts_at_its_own_value():
    """For a flow model the range's top (sigma 1) is never reached, so the run starts at t = 1; the bottom is cut
    where the sigmoid falls to sigma_min."""
    s = logistic_sigmas(5, "flow", 0.05, 1.0, k=20.0, t0=0.5).double()
    t_lo = 0.5 - 2 * math.log((1 - 0.05) / 0.05) / 20
    t = torch.linspace(1.0, t_lo, 5, dtype=torch.float64)
    torch.testing.assert_close(s[:-1], torch.sigmoid(10 * (t - 0.5)), rtol=1e-5, atol=0)
    assert float(s[-2]) == pytest.approx(0.05, rel=1e-5) and float(s[0]) < 1.0


def test_default_flow_run_starts_where_the_docstring_says():
    """With the defaults (k 15, t0 0.5) a flow model's run starts at sigmoid(k (1 - t0) / 2) = sigmoid(3.75),
    0.977, and the sigmas between follow that sigmoid at uniform t."""
    s = logistic_sigmas(10, "flow", 0.0029, 1.0).double()
    assert float(s[0]) == pytest.approx(1 / (1 + math.exp(-3.75)), rel=1e-6)
    t_lo = 0.5 - 2 * math.log((1 - 0.0029) / 0.0029) / 15
    t = torch.linspace(1.0, max(t_lo, 0.0), 10, dtype=torch.float64)
    torch.testing.assert_close(s[:-1], torch.sigmoid(7.5 * (t - 0.5)), rtol=1e-5, atol=0)


def test_a_curve_touching_the_range_at_one_point_is_refused():
    """t0 = 1 puts the curve's end (t = 1) at sigma exp(0) = 1: with sigma_min = 1 the curve meets the range in a
    single point, t_lo = t_hi = 1, which would give a run of equal sigmas; it is refused like a curve that
    misses the range."""
    with pytest.raises(ValueError, match="never enters"):
        logistic_sigmas(5, "eps", 1.0, 14.6, t0=1.0)
    assert len(logistic_sigmas(5, "eps", 0.99, 14.6, t0=1.0)) == 6  # a sliver of range is enough
