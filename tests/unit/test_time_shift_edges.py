"""Edges of ``samplers/time_shift.py``: the configuration's inclusive bounds, the VP norm, the discrete VP time
axis between and beyond its training steps, and the tie-break among equally good candidates."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from preprint.samplers.time_shift import (
    TimeShiftConfig,
    _closest_best,
    flow_axis,
    shifted_sigma,
    tabulated_inverse,
    time_shift_denoise,
    vp_discrete_axis,
    vp_norm,
)


def test_defaults_are_the_papers_and_bounds_are_inclusive():
    """The paper's window and cutoff (30 and 300 of 1000 steps), its data variance 0, 1000 candidates per unit."""
    assert TimeShiftConfig() == TimeShiftConfig(window=0.03, cutoff=0.3, data_variance=0.0, resolution=1000)
    for w in (0.0, 1.0):
        assert TimeShiftConfig(window=w).window == w
    for c in (0.0, 1.0):
        assert TimeShiftConfig(cutoff=c).cutoff == c
    with pytest.raises(dataclasses.FrozenInstanceError):
        TimeShiftConfig().window = 2.0  # checked once, shared by every call


@pytest.mark.parametrize("field,value", [("window", -1e-9), ("window", 1.0 + 1e-9), ("cutoff", -1e-9),
                                         ("cutoff", 1.0 + 1e-9), ("data_variance", -1e-9),
                                         ("data_variance", math.inf), ("data_variance", math.nan)])
def test_out_of_range_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        TimeShiftConfig(**{field: value})


def test_vp_norm_known_values():
    s = torch.tensor([0.0, 0.75, 1.0], dtype=torch.float64)
    torch.testing.assert_close(vp_norm(s, "eps"), torch.tensor([1.0, 1.25, math.sqrt(2.0)], dtype=torch.float64))
    # flow: sqrt((1 - s)^2 + s^2)
    torch.testing.assert_close(vp_norm(s, "flow"), torch.tensor([1.0, math.sqrt(0.625), 1.0], dtype=torch.float64))


def test_flow_axis_is_the_identity_and_axes_are_immutable():
    s = torch.tensor([0.1, 0.5, 0.9])
    axis = flow_axis()
    assert axis.t_of_sigma(s) is s and axis.sigma_of_t(s) is s
    with pytest.raises(dataclasses.FrozenInstanceError):
        axis.t_of_sigma = None  # one axis serves every call of a run


def test_discrete_axis_hits_its_steps_and_interpolates_log_sigma():
    """Four training steps with sigma 1, 2, 4, 8 (abar = 1 / (1 + sigma^2)): t = k / 3 gives sigma_k, halfway
    between steps the geometric mean, and t outside [0, 1] is clamped to the end steps."""
    sig = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    axis = vp_discrete_axis(1 / (1 + sig**2))
    t = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0, 0.5, 1 / 6, 5 / 6, -0.5, 1.5], dtype=torch.float64)
    want = torch.tensor([1.0, 2.0, 4.0, 8.0, math.sqrt(8.0), math.sqrt(2.0), math.sqrt(32.0), 1.0, 8.0],
                        dtype=torch.float64)
    torch.testing.assert_close(axis.sigma_of_t(t), want, rtol=1e-12, atol=0)
    back = axis.t_of_sigma(torch.tensor([[1.0, 2.0], [math.sqrt(32.0), 8.0]], dtype=torch.float64))
    torch.testing.assert_close(back, torch.tensor([[0.0, 1 / 3], [5 / 6, 1.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # beyond the trained range the time is clamped to its ends; float32 in, float32 out
    out = axis.t_of_sigma(torch.tensor([0.5, 1e-20, 100.0]))
    assert out.dtype == torch.float32 and out.tolist() == [0.0, 0.0, 1.0]


def test_ties_go_to_the_candidate_nearest_the_current_timestep():
    offsets = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    expected = torch.tensor([[0.5, 0.3, 0.3, 0.3, 0.1]], dtype=torch.float64)
    # variance 0.3: three exact ties, the centre wins
    assert _closest_best(torch.tensor([0.3], dtype=torch.float64), expected, offsets).tolist() == [2]
    # variance 0.2: candidates 1..3 miss by 0.1, candidate 4 by 0.1 too (ties within 1e-12), the nearest is 2
    assert _closest_best(torch.tensor([0.2], dtype=torch.float64), expected, offsets).tolist() == [2]
    # a strictly better match wins over nearness; a miss larger by more than 1e-12 is not a tie
    expected = torch.tensor([[0.3 - 2e-12, 0.2, 0.3, 0.2, 0.1]], dtype=torch.float64)
    assert _closest_best(torch.tensor([0.3 - 2e-12], dtype=torch.float64), expected, offsets).tolist() == [0]


def test_sigma_zero_and_the_cutoff_are_never_shifted():
    """sigma 0 (a final denoise) keeps 0, and a timestep exactly at the cutoff is not shifted (shift only above)."""
    sig = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    axis = vp_discrete_axis(1 / (1 + sig**2))
    x = 5.0 * torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    at_cut = torch.tensor([2.0, 0.0], dtype=torch.float64)  # t = 1/3 and a sigma of 0
    out = shifted_sigma(x, at_cut, axis, "eps", TimeShiftConfig(window=0.3, cutoff=1 / 3))
    assert torch.equal(out, at_cut)
    moved = shifted_sigma(x, at_cut, axis, "eps", TimeShiftConfig(window=0.3, cutoff=0.3))
    assert float(moved[0]) != 2.0 and float(moved[1]) == 0.0


def _flow_state(sigma, ideal, seed=0):
    """A flow-model state whose VP variance is exactly the marginal's (data variance 0) at sigma ``ideal``."""
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = (x - x.mean()) / x.std()
    target = ideal**2 / ((1 - ideal) ** 2 + ideal**2)  # sigma'^2 / n(sigma')^2
    return x * math.sqrt(target) * float(vp_norm(torch.tensor(sigma, dtype=torch.float64), "flow"))


@pytest.mark.parametrize("window,resolution,ideal,want", [
    (0.4, 10, 0.64, 0.6),   # m = 2: candidates 0.3, 0.4, .., 0.7; 0.64 is nearest 0.6
    (0.2, 10, 0.56, 0.6),   # m = round(1) = 1: candidates 0.4, 0.5, 0.6
    (0.4, 20, 0.64, 0.65),  # m = 4: candidates every 0.05
])
def test_candidates_are_window_times_resolution_plus_one_evenly_spaced(window, resolution, ideal, want):
    """``window * resolution / 2`` steps on each side of t (at least one), evenly spaced over half the window; on
    the flow axis (t = sigma) the chosen sigma is the candidate whose marginal variance is nearest the state's."""
    x = _flow_state(0.5, ideal)
    cfg = TimeShiftConfig(window=window, cutoff=0.0, resolution=resolution)
    out = shifted_sigma(x, torch.tensor([0.5], dtype=torch.float64), flow_axis(), "flow", cfg)
    assert float(out) == pytest.approx(want, abs=1e-12)


def test_a_state_far_noisier_than_any_candidate_goes_to_the_top_of_the_window():
    """However large the state's variance (here 1e8 times the marginal's), the best match is the top candidate,
    t + window / 2, and candidates are clamped to t <= 1."""
    x = _flow_state(0.5, 0.5) * 1e4
    cfg = TimeShiftConfig(window=0.2, cutoff=0.0, resolution=10)
    for sigma, top in ((0.5, 0.6), (0.95, 1.0)):
        out = shifted_sigma(x, torch.tensor([sigma], dtype=torch.float64), flow_axis(), "flow", cfg)
        assert float(out) == pytest.approx(top, abs=1e-12)


def test_tabulated_inverse_is_clamped_to_its_ends_and_finite_on_plateaus():
    """Beyond the table's last time the inverse is sigma_max (no extrapolation); a map that is flat at its start
    (a discrete map feeding step 0 for the lowest sigmas) inverts its first time to sigma_min, a number."""
    inverse = tabulated_inverse(lambda s: s / 2, 0.01, 2.0, points=65)
    out = inverse(torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64))
    assert float(out[0]) == pytest.approx(1.0, rel=2e-3)  # log-linear between log-spaced nodes
    torch.testing.assert_close(out[1:], torch.tensor([2.0, 2.0], dtype=torch.float64), rtol=1e-12, atol=0)
    flat = tabulated_inverse(lambda s: (s - 0.1).clamp(min=0.0), 0.01, 1.0, points=65)
    low = flat(torch.tensor([0.0], dtype=torch.float64))
    assert torch.isfinite(low).all() and float(low) == pytest.approx(0.01, rel=1e-12)


def test_a_window_reaching_t_zero_on_a_flow_axis_never_picks_sigma_zero():
    """A window wider than twice the cutoff reaches t = 0, which a flow axis maps to sigma 0; a latent of almost no
    variance matches that candidate best, but the network cannot be asked there (its noise estimate divides by
    sigma): the nearest candidate above 0 is chosen and the denoised result stays finite."""
    config = TimeShiftConfig(window=1.0, cutoff=0.3)
    x = torch.full((2, 4, 8, 8), 0.25, dtype=torch.float64) + 1e-6 * torch.randn(2, 4, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.35, 0.35], dtype=torch.float64)
    chosen = shifted_sigma(x, sigma, flow_axis(), "flow", config)
    m = round(config.window * config.resolution / 2)
    candidates = (0.35 + torch.arange(-m, m + 1, dtype=torch.float64) * (0.5 / m)).clamp(0.0, 1.0)
    lowest = candidates[candidates > 0].min()  # the best match above 0: the variance grows with sigma
    assert float(lowest) < 0.002 and torch.equal(chosen, lowest.expand_as(chosen))
    out = time_shift_denoise(lambda xx, s: xx * 0.5, x, sigma, flow_axis(), "flow", config)
    assert bool(torch.isfinite(out).all())
