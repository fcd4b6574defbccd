"""Edge behaviour of scheduled CFG: endpoints, defaults, custom lists, noise-level bisection and step lookup."""

from __future__ import annotations

import pytest
import torch

from preprint.guidance.cfg_schedule import (
    ScaleSchedule,
    ScheduledCFGDenoiser,
    ScheduledGuidance,
    ScheduleError,
    noise_level,
    schedule_shape,
    step_index,
)


def linear_map(p: float) -> float:
    """A percent_to_sigma that falls linearly from 1 (percent 0) to 0 (percent 1)."""
    return 1.0 - p


# --- endpoints: a negative value means the sampler's CFG, zero and small positive values are real scales ---

def test_zero_start_is_a_real_scale_not_the_sampler_cfg():
    sched = ScaleSchedule("linear", cfg_start=0.0, cfg_end=4.0)
    assert sched.scale_at(1.0, 0, base=7.0) == 0.0
    assert sched.endpoints(7.0) == (0.0, 4.0)


def test_scales_below_one_are_kept():
    sched = ScaleSchedule("linear", cfg_start=0.5, cfg_end=0.25)
    assert sched.endpoints(7.0) == (0.5, 0.25)


def test_zero_end_is_a_real_scale():
    assert ScaleSchedule("linear", cfg_start=4.0, cfg_end=0.0).scale_at(0.0, 0, base=7.0) == 0.0


def test_minus_one_end_means_sampler_cfg():
    assert ScaleSchedule("linear", cfg_start=3.0, cfg_end=-1.0).scale_at(0.0, 0, base=7.0) == 7.0


def test_default_end_is_sampler_cfg():
    # only cfg_start given: the clean end follows the sampler's CFG; linear midpoint = (3 + 7) / 2
    sched = ScaleSchedule("linear", cfg_start=3.0)
    assert sched.scale_at(0.0, 0, base=7.0) == 7.0
    assert sched.scale_at(0.5, 0, base=7.0) == pytest.approx(5.0)


def test_default_start_is_sampler_cfg():
    assert ScaleSchedule("linear", cfg_end=2.0).scale_at(1.0, 0, base=6.0) == 6.0


# --- power schedule ---

def test_default_power_is_quadratic():
    # t^2 at t = 0.5 -> weight 0.25 of cfg_start: 0 + 8 * 0.25 = 2
    assert ScaleSchedule("power", cfg_start=8.0, cfg_end=0.0).scale_at(0.5, 0, 0.0) == pytest.approx(2.0)
    assert schedule_shape("power", 0.5) == pytest.approx(0.25)


def test_power_below_one_is_accepted():
    sched = ScaleSchedule("power", cfg_start=4.0, cfg_end=0.0, exponent=0.5)
    assert sched.scale_at(0.25, 0, 0.0) == pytest.approx(2.0)  # sqrt(0.25) = 0.5


def test_power_zero_exponent_rejected():
    with pytest.raises(ScheduleError):
        ScaleSchedule("power", exponent=0.0)


# --- t is clamped to [0, 1] ---

def test_t_outside_unit_interval_is_clamped():
    sched = ScaleSchedule("linear", cfg_start=9.0, cfg_end=3.0)
    assert sched.scale_at(-0.5, 0, 0.0) == 3.0
    assert sched.scale_at(1.5, 0, 0.0) == 9.0


# --- constant shape ---

def test_constant_shape_is_one_everywhere():
    for t in (0.0, 0.3, 1.0):
        assert schedule_shape("constant", t) == 1.0


def test_unknown_shape_rejected():
    with pytest.raises(ScheduleError):
        schedule_shape("custom", 0.5)


# --- custom list: one scale per step, clamped at both ends ---

@pytest.mark.parametrize("step,expected", [(-1, 8.0), (0, 8.0), (1, 7.0), (2, 6.0), (3, 6.0), (5, 6.0)])
def test_custom_list_index_clamped(step, expected):
    sched = ScaleSchedule("custom", custom=(8.0, 7.0, 6.0))
    assert sched.scale_at(0.5, step, base=1.0) == expected


# --- noise level by bisection ---

def test_noise_level_at_max_sigma_is_exactly_one():
    assert noise_level(linear_map(1e-9), linear_map) == 1.0


def test_noise_level_above_max_sigma_is_exactly_one():
    assert noise_level(1.5, linear_map) == 1.0


def test_noise_level_at_min_sigma_is_exactly_zero():
    assert noise_level(linear_map(1.0 - 1e-9), linear_map) == 0.0


def test_noise_level_resolution_of_48_bisection_steps():
    # 48 halvings of [0, 1] leave an interval of 2^-48; its midpoint is within 2^-49 of the root.
    for sigma in (0.5, 0.3, 0.123456789):
        assert abs(noise_level(sigma, linear_map) - sigma) <= 2.0**-49


def test_noise_level_matches_comfy_style_clamped_map():
    # ComfyUI's percent_to_sigma: huge below percent 0, 0 at and above 1
    def pts(p):
        if p <= 0.0:
            return 1e9
        if p >= 1.0:
            return 0.0
        return 2.0 * (1.0 - p)
    assert abs(noise_level(0.5, pts) - 0.25) <= 2.0**-49


# --- step lookup ---

def test_step_index_intermediate_sigma_belongs_to_step_started():
    sigmas = [10.0, 5.0, 1.0, 0.0]
    assert step_index(3.0, sigmas) == 1     # between 5 and 1 -> step 1
    assert step_index(7.0, sigmas) == 0
    assert step_index(5.0, sigmas) == 1


def test_step_index_above_schedule_is_first_step():
    assert step_index(20.0, [14.6, 5.0, 1.0, 0.0]) == 0


def test_step_index_never_past_last_step():
    # Heun's second stage of the last step evaluates at the final (non-zero) sigma; it is still the last step
    assert step_index(1.0, [10.0, 5.0, 1.0]) == 1
    assert step_index(0.5, [10.0, 5.0, 1.0]) == 1


def test_step_index_one_step_run():
    assert step_index(2.0, [4.0, 2.0]) == 0
    assert step_index(3.0, [4.0, 2.0]) == 0


# --- denoiser reads sigma from a one-element tensor ---

def test_denoiser_accepts_one_element_sigma_tensor():
    calls = {"u": 0}

    def cond(x, s):
        return torch.full_like(x, 2.0)

    def uncond(x, s):
        calls["u"] += 1
        return torch.zeros_like(x)

    g = ScheduledGuidance(ScaleSchedule("custom", custom=(3.0, 5.0)))
    den = ScheduledCFGDenoiser(cond, uncond, g, base=7.0, sample_sigmas=[10.0, 5.0, 0.0], t_of=lambda s: s / 10)
    x = torch.zeros(1, 2)
    out = den(x, torch.tensor([5.0]))
    assert torch.equal(out, torch.full_like(x, 10.0))  # 0 + 5 * (2 - 0)
    assert calls["u"] == 1


def test_step_index_tolerance_edge_belongs_to_that_step():
    # A sigma exactly rel_tol (1e-5) above a schedule sigma is float noise of that step, so it is that step.
    tol = 1e-5
    s1 = 7.0 * (1.0 - tol)
    assert step_index(7.0, [10.0, s1, 1.0, 0.0], rel_tol=tol) == 1
