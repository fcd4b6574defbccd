"""Refresh schedules of the UNet caches: the uniform DeepCache schedule and its argument check, the non-uniform
(quad-centre) placement at the ends of its centre range and at power 1, the schedule dispatch with the paper's
defaults, the real part of a complex power, and Faster Diffusion's key steps rescaled to any step count (every key
a step of the run, the dense head at 8% of the run)."""

from __future__ import annotations

import math

import pytest

from preprint.caching.schedules import (
    FASTER_DIFFUSION_KEYS_50,
    _real_power,
    faster_diffusion_keys,
    nonuniform_refresh,
    refresh_steps,
    uniform_refresh,
)


# -- uniform ---------------------------------------------------------------------------------------------------
def test_uniform_refresh_refuses_interval_zero_with_its_own_message():
    """Interval 0 is refused by the schedule's own check (not by ``range``), with a message naming the interval."""
    with pytest.raises(ValueError, match="cache interval must be at least 1, got 0"):
        uniform_refresh(10, 0)


# -- real part of a complex power ------------------------------------------------------------------------------
def test_real_power_of_zero_is_zero():
    """0 ** p = 0 for every power p > 0 (the lower end of the grid when the centre is step 0)."""
    assert _real_power(0j, 1.4) == 0.0
    assert _real_power(complex(0.0, 0.0), 2.0) == 0.0


def test_real_power_on_the_unit_circle_is_the_cosine_of_the_scaled_angle():
    """|z| = 1: Re(z ** p) = cos(p arg z), e.g. Re((-1) ** 1.4) = cos(1.4 pi), Re(1 ** p) = 1."""
    assert _real_power(complex(-1.0, 0.0), 1.4) == pytest.approx(math.cos(1.4 * math.pi), abs=1e-12)
    assert _real_power(complex(1.0, 0.0), 1.4) == pytest.approx(1.0, abs=1e-12)
    assert _real_power(1j, 2.0) == pytest.approx(-1.0, abs=1e-12)  # i^2 = -1


# -- non-uniform -----------------------------------------------------------------------------------------------
def test_nonuniform_refresh_with_interval_one_refreshes_every_step():
    """Interval 1 is a valid budget (one refresh per step): every step is a refresh."""
    assert nonuniform_refresh(10, 1) == set(range(10))
    assert nonuniform_refresh(3, 1, center=0.5, power=2.0) == {0, 1, 2}


def test_nonuniform_refresh_checks_the_interval_before_anything_else():
    """A zero interval is reported as such, even when the centre is out of range too."""
    with pytest.raises(ValueError, match="cache interval must be at least 1, got 0"):
        nonuniform_refresh(10, 0, center=1.5)
    with pytest.raises(ValueError, match="cache interval must be at least 1, got -1"):
        nonuniform_refresh(10, -1)


@pytest.mark.parametrize("center", [-0.5, -1e-9, 1.0 + 1e-9, 1.5])
def test_nonuniform_refresh_refuses_a_centre_outside_the_run(center):
    """The centre is a fraction of the run: anything outside [0, 1] is refused."""
    with pytest.raises(ValueError, match="center must be a fraction of the run"):
        nonuniform_refresh(20, 3, center=center)


def test_nonuniform_refresh_centred_on_the_first_step():
    """Centre 0 (both ends of [0, 1] are allowed): 10 steps, budget 4, power 1.4. The grid runs from 0 to
    10^(1/1.4) = 5.179 in four pieces; raised to 1.4 the points are 0, 1.44, 3.79, 6.68, 10: the ends dropped and
    step 0 added, the refreshes are 0, 1, 3, 6."""
    assert nonuniform_refresh(10, 3, center=0.0, power=1.4) == {0, 1, 3, 6}


def test_nonuniform_refresh_centred_on_the_last_step():
    """Centre 1: 20 steps, budget 4, centre step 20. The grid points are t * (-20)^(1/1.4) for t = 1, 3/4, 1/2,
    1/4, 0, whose real powers are -20 t^1.4 = -20, -13.37, -7.58, -2.87, 0: truncated, ends dropped and shifted by
    20, the refreshes are 0, 7, 13, 18, packed towards the end of the run."""
    assert nonuniform_refresh(20, 5, center=1.0, power=1.4) == {0, 7, 13, 18}


@pytest.mark.parametrize("power", [0.5, 0.0, 0.999])
def test_nonuniform_refresh_refuses_a_power_below_one(power):
    with pytest.raises(ValueError, match="power must be at least 1"):
        nonuniform_refresh(20, 3, power=power)


@pytest.mark.parametrize("steps,interval", [(20, 3), (10, 3), (5, 2), (50, 5)])
def test_nonuniform_refresh_at_power_one_is_the_uniform_grid(steps, interval):
    """Power 1 is the uniform grid (the docstring's '1 is the uniform grid'): the uniform schedule itself, not an
    evenly spaced grid shifted around the centre step."""
    assert nonuniform_refresh(steps, interval, power=1.0) == uniform_refresh(steps, interval)


def test_nonuniform_refresh_at_power_one_for_20_steps_every_3():
    """20 steps every 3 at power 1: steps 0, 3, ..., 18 (the evenly spaced grid around step 6 would give
    0, 3, 6, 8, 11, 14, 17)."""
    assert nonuniform_refresh(20, 3, power=1.0) == {0, 3, 6, 9, 12, 15, 18}


# -- dispatch --------------------------------------------------------------------------------------------------
def test_refresh_steps_defaults_are_the_papers_centre_and_power():
    """refresh_steps without centre / power uses the paper's centre 0.3 and power 1.4: for 20 steps every 3 the
    reference DeepCache placement is 0, 3, 5, 7, 10, 13, 16 (see test_caching_policies)."""
    expected = {0, 3, 5, 7, 10, 13, 16}
    assert refresh_steps("non-uniform", 20, 3) == expected
    assert refresh_steps("non-uniform", 20, 3) == nonuniform_refresh(20, 3, center=0.3, power=1.4)


def test_refresh_steps_dispatches_by_schedule_name():
    assert refresh_steps("uniform", 20, 3) == {0, 3, 6, 9, 12, 15, 18}
    assert refresh_steps("non-uniform", 50, 5) == {0, 5, 9, 13, 17, 21, 26, 31, 37, 43}
    with pytest.raises(ValueError, match="unknown refresh schedule 'bogus'"):
        refresh_steps("bogus", 20, 3)


# -- Faster Diffusion key steps --------------------------------------------------------------------------------
def test_faster_diffusion_key_set_is_the_papers():
    """The 50-step DDIM key set of Li et al. (arXiv:2312.09608, Sec. 3.3), as the module docstring quotes it."""
    assert FASTER_DIFFUSION_KEYS_50 == (0, 1, 2, 3, 5, 10, 15, 25, 35)


@pytest.mark.parametrize("steps,keys", [(1, {0}), (2, {0, 1}), (3, {0, 1, 2})])
def test_faster_diffusion_keys_are_steps_of_short_runs(steps, keys):
    """Rescaled keys are clipped to the last step: 1 step has only step 0; at 2 steps key 35 rescales to
    round(1.4) = 1, the last step, and keys 15 and 25 to round(0.6) = round(1.0) = 1; at 3 steps 25 -> round(1.5)
    = 2 and 35 -> round(2.1) = 2."""
    got = faster_diffusion_keys(steps)
    assert got == keys
    assert max(got) <= steps - 1


def test_faster_diffusion_keys_rescaled_to_26_steps():
    """k -> round(26 k / 50): 0, 1, 1, 2, 3, 5, 8, 13, 18; the head is range(round(2.08)) = {0, 1}."""
    assert faster_diffusion_keys(26) == {0, 1, 2, 3, 5, 8, 13, 18}


def test_faster_diffusion_keys_keep_a_dense_head_of_eight_percent():
    """The first round(4 steps / 50) steps (the paper's 0-3 of 50) are all keys, on top of the rescaled set:
    100 steps -> steps 0-7 plus 10, 20, 30, 50, 70; 1000 steps -> steps 0-79 plus 100, 200, 300, 500, 700."""
    assert faster_diffusion_keys(100) == set(range(8)) | {10, 20, 30, 50, 70}
    assert faster_diffusion_keys(1000) == set(range(80)) | {100, 200, 300, 500, 700}
