"""Time-Shift sampler wrapper: exact mechanics on the sigma axis, and neutrality."""

from __future__ import annotations

import pytest
import torch

from preprint.samplers.dpm_solver_pp import sample_dpmpp_2m
from preprint.samplers.schedules import sd_alphas_cumprod
from preprint.samplers.time_shift import (
    TimeShiftConfig,
    flow_axis,
    shifted_sigma,
    tabulated_inverse,
    time_shift_denoise,
    time_shift_sampler,
    vp_discrete_axis,
    vp_norm,
)
from preprint.samplers.wrapping import DenoiserProxy

from .conftest import get_problem
from .test_omegance import euler

SD_AXIS = vp_discrete_axis(sd_alphas_cumprod())


def axis_for(kind):
    return SD_AXIS if kind == "eps" else flow_axis()


def wrapped(fn, kind, **cfg):
    return time_shift_sampler(fn, lambda _m: (axis_for(kind), kind), TimeShiftConfig(**cfg))


def test_sd_axis_round_trip_and_range():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = SD_AXIS.sigma_of_t(t)
    assert float(s[0]) == pytest.approx(0.0292, abs=2e-4) and float(s[-1]) == pytest.approx(14.61, abs=0.01)
    assert torch.allclose(SD_AXIS.t_of_sigma(s), t, atol=1e-9)


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("base", [euler, sample_dpmpp_2m])
def test_window_zero_or_full_cutoff_is_bit_identical(kind, base):
    p = get_problem(kind, 7.5 if kind == "eps" else 3.5)
    sig = p.sigmas(8)
    plain = base(p.model, p.x_start.clone(), sig, disable=True)
    for cfg in ({"window": 0.0}, {"window": 0.05, "cutoff": 1.0}):
        out = wrapped(base, kind, **cfg)(p.model, p.x_start.clone(), sig, disable=True)
        assert torch.equal(out, plain), cfg


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("v", [0.0, 0.8])
def test_state_on_the_marginal_is_not_shifted(kind, v):
    """A state whose variance is exactly the marginal's at sigma (data variance v) keeps sigma."""
    axis, sigma = axis_for(kind), torch.tensor([3.0 if kind == "eps" else 0.7], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 64, 64, generator=g, dtype=torch.float64)
    x0 = (x0 - x0.mean()) / x0.std() * v**0.5
    eps = torch.randn(1, 4, 64, 64, generator=g, dtype=torch.float64)
    a = 1.0 if kind == "eps" else 1.0 - float(sigma)
    x = a * x0 + float(sigma) * eps
    # rescale so that Var(x) is exactly the marginal variance a^2 v + sigma^2
    x = (x - x.mean()) / x.std() * (a**2 * v + float(sigma) ** 2) ** 0.5
    s = shifted_sigma(x, sigma, axis, kind, TimeShiftConfig(window=0.2, cutoff=0.0, data_variance=v))
    assert float(axis.t_of_sigma(s)) == pytest.approx(float(axis.t_of_sigma(sigma)), abs=1.5e-3)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_too_noisy_state_is_fed_a_later_timestep_within_the_window(kind):
    axis, sigma = axis_for(kind), torch.tensor([2.0 if kind == "eps" else 0.5], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = 1.3 * float(sigma) * torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    cfg = TimeShiftConfig(window=0.04, cutoff=0.1)
    s = shifted_sigma(x, sigma, axis, kind, cfg)
    t, t_new = float(axis.t_of_sigma(sigma)), axis.t_of_sigma(s)
    # Var(x) in VP terms is 1.38 / 1.28 (eps) and 0.864 / 0.802 (flow), beyond every candidate of this window
    # (the top expects 0.83 (eps), 0.54 (flow)): the best match is the top, t + window / 2, exactly (measured
    # difference 0); the next candidate down lies 0.001 lower
    torch.testing.assert_close(t_new, torch.full_like(t_new, t + cfg.window / 2), rtol=0, atol=1e-9)
    wide = shifted_sigma(x, sigma, axis, kind, TimeShiftConfig(window=0.6, cutoff=0.1))
    var_vp = x.flatten(1).var(dim=1) / vp_norm(sigma, kind) ** 2
    if kind == "eps":  # variance above 1: no timestep expects it, so the top of the wide window as well
        best = torch.full_like(var_vp, t + 0.3)
    else:  # t' = sigma' with sigma'^2 / ((1 - sigma')^2 + sigma'^2) = Var: 0.716 / 0.668, inside the window
        best = 1 / (1 + ((1 - var_vp) / var_vp).sqrt())
    # candidates lie 0.001 apart: the nearest is within half of that (measured 0.00025); the top would be 0.08
    # off for flow
    torch.testing.assert_close(axis.t_of_sigma(wide), best, rtol=0, atol=0.0005 + 1e-9)
    # below the cutoff nothing moves
    low = torch.tensor([0.05], dtype=torch.float64)
    assert torch.equal(shifted_sigma(x, low, axis, kind, TimeShiftConfig(window=0.2, cutoff=0.3)), low.expand(2))


def test_network_sees_the_vp_state_at_the_new_sigma_and_solver_keeps_its_sigma():
    """For Gaussian data N(0, v) the exact denoiser is linear, so the wrapped call has a closed form."""
    v = 0.5
    calls = []

    def model(x, sigma, **_):
        calls.append((x.clone(), sigma.clone()))
        return x * (v / (v + sigma.reshape(-1, 1, 1, 1) ** 2))

    x = 4.0 * torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([3.0], dtype=torch.float64)
    cfg = TimeShiftConfig(window=0.1, cutoff=0.0)
    out = time_shift_denoise(model, x, sigma, SD_AXIS, "eps", cfg)
    x_in, s_net = calls[-1]
    assert float(s_net) != 3.0
    assert torch.allclose(x_in, x * vp_norm(s_net, "eps") / vp_norm(sigma, "eps"))
    eps_net = (x_in - x_in * v / (v + s_net**2)) / s_net  # the network's noise prediction at s_net
    assert torch.allclose(out, x - 3.0 * eps_net)


def test_proxy_forwards_attributes_and_wrappers_stack():
    p = get_problem("eps")
    from preprint.samplers.omegance import OmeganceConfig, omegance_sampler

    seen = {}

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        seen["mixture"] = model.mixture  # a sampler reaching through the model, as ComfyUI's do
        return euler(model, x, sigmas)

    inner = time_shift_sampler(sampler, lambda _m: (SD_AXIS, "eps"), TimeShiftConfig(window=0.03))
    both = omegance_sampler(inner, lambda _m: "eps", OmeganceConfig(omega=5.0))
    out = both(p.model, p.x_start.clone(), p.sigmas(6))
    assert seen["mixture"] is p.model.mixture and torch.isfinite(out).all()
    assert isinstance(DenoiserProxy(p.model, lambda m, x, s: m(x, s)).kind, str)


def test_small_window_changes_the_result_only_a_little():
    p = get_problem("eps", 7.5)
    sig = p.sigmas(10)
    plain = sample_dpmpp_2m(p.model, p.x_start.clone(), sig, disable=True)
    shifted = wrapped(sample_dpmpp_2m, "eps", window=0.03, cutoff=0.3)(p.model, p.x_start.clone(), sig, disable=True)
    assert not torch.equal(plain, shifted)
    # the paper's window (30 of 1000 steps) nudges the trajectory; it must not derail it
    assert float((shifted - plain).pow(2).mean().sqrt()) < 0.1 * float(plain.pow(2).mean().sqrt())


def _unit_variance_state(kind, sigma, seed=3):
    """A state on the marginal of unit-variance data (as SD / Flux latents are after the VAE scale factor)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 4, 32, 32, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 32, 32, generator=g, dtype=torch.float64)
    a = 1.0 if kind == "eps" else 1.0 - sigma
    return a * x0 + sigma * eps


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("sigma_value", [0.4, 0.7, 3.0])
def test_data_variance_one_is_a_tie_and_keeps_the_timestep(kind, sigma_value):
    """With v = 1 every candidate expects variance 1: no information, so no shift (not a rounding-noise pick)."""
    if kind == "flow" and sigma_value > 1:
        sigma_value = 0.9
    axis, sigma = axis_for(kind), torch.tensor([sigma_value], dtype=torch.float64)
    for seed in range(4):
        x = _unit_variance_state(kind, sigma_value, seed) * (1.0 + 0.3 * seed)  # any variance at all
        s = shifted_sigma(x, sigma, axis, kind, TimeShiftConfig(window=0.1, cutoff=0.0, data_variance=1.0))
        assert torch.equal(s, sigma.expand(2)), (seed, s)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_paper_rule_sends_unit_variance_latents_to_the_top_of_the_window(kind):
    """v = 0 aims at abar' = abar (1 - v_true): for unit-variance data that is outside any window, so every call
    goes to the noisiest candidate (what the README and the tooltip warn about)."""
    axis = axis_for(kind)
    cfg = TimeShiftConfig(window=0.06, cutoff=0.0, data_variance=0.0)
    for sigma_value in ((0.5, 1.0, 2.0, 5.0) if kind == "eps" else (0.3, 0.5, 0.7)):
        sigma = torch.tensor([sigma_value], dtype=torch.float64)
        s = shifted_sigma(_unit_variance_state(kind, sigma_value), sigma, axis, kind, cfg)
        top = axis.sigma_of_t((axis.t_of_sigma(sigma) + 0.03).clamp(max=1.0))
        torch.testing.assert_close(s, top.expand(2), rtol=1e-9, atol=0)


def test_tabulated_inverse_of_a_shifted_flow_timestep():
    """ComfyUI's SD3 sampling feeds t = sigma but its sigma(t) is shift-3 warped: the inverse of the *fed*
    timestep is the identity, which the table recovers (the warped sigma(0.5) would be 0.75)."""
    shift = 3.0

    def warped_sigma_of_t(t):
        return shift * t / (1 + (shift - 1) * t)

    sigma_min = float(warped_sigma_of_t(torch.tensor(1e-3)))
    inverse = tabulated_inverse(lambda s: s, sigma_min, 1.0)
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    torch.testing.assert_close(inverse(t), t, rtol=1e-6, atol=0)
    assert float(inverse(torch.tensor([0.0], dtype=torch.float64))) == pytest.approx(sigma_min)
    # a discrete map (whole training steps) is inverted onto the steps it feeds
    steps = sd_alphas_cumprod()
    table = torch.sqrt((1 - steps) / steps)

    def t_discrete(s):
        return (s.log()[None] - table.log()[:, None]).abs().argmin(dim=0).double() / 999

    inverse = tabulated_inverse(t_discrete, float(table[0]), float(table[-1]))
    k = torch.tensor([100, 500, 900])
    torch.testing.assert_close(t_discrete(inverse(k.double() / 999)), k.double() / 999)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="window"):
        TimeShiftConfig(window=-0.1)
    with pytest.raises(ValueError, match="cutoff"):
        TimeShiftConfig(cutoff=2.0)
