"""DPM-Solver-v3 (samplers/dpm_solver_v3.py): the statistics' computation and the sampler's bookkeeping, checked
against closed forms.

Data ``N(mu, c^2 I)`` has the posterior mean ``D = mu + a c^2 / (a^2 c^2 + sigma^2) (x - a mu)`` (``a = alpha``),
so Eq. 10 gives ``l = sigma^2 / (a^2 c^2 + sigma^2) = 1 / (1 + c^2 e^{2 lambda})`` exactly, ``f = (1 - l) x / a - D
= -l mu`` is the same on every sample (``s = 0``), and ``f' = -l' mu``; with ``l'`` replaced by a grid difference
``dl`` the fitted ``f'`` becomes ``-l' mu + (l' - dl) u`` (``u = x / a``), so on flow trajectories (``u`` close to
``mu`` from the start) ``b`` is ``-dl mu`` up to the samples' spread. The regression of Eq. 11 is checked against
a direct per-element least-squares fit, and the sampler's history against weak references.
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

from preprint.samplers.dpm_solver_v3 import (
    Statistics,
    _Moments,
    compute_statistics,
    sample_dpm_solver_v3,
    timestep_is_differentiable,
)

SHAPE = (2, 3)
C = 0.4


def _mu(scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def gaussian(mu: torch.Tensor, kind: str, c: float = C, in_place: bool = False):
    """The exact denoiser of N(mu, c^2 I) data; ``in_place`` computes it in place on its input, as model wrappers
    that rescale their input do."""

    def denoise(x, sigma):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        a = 1 - s if kind == "flow" else torch.ones_like(s)
        gain = a * c * c / (a * a * c * c + s * s)
        if in_place:
            return x.sub_(a * mu).mul_(gain).add_(mu)
        return mu + gain * (x - a * mu)

    return denoise


def l_exact(lam: torch.Tensor, c: float = C) -> torch.Tensor:
    return 1 / (1 + c * c * torch.exp(2 * lam))


def lstsq_fit(u, d, dd_, l, dl):
    """Per element, the least-squares line f' = s f + b over the samples (dim 0) by torch.linalg.lstsq."""
    f = ((1 - l) * u - d).reshape(u.shape[0], -1)
    fp = (-dl * u + (1 - l) * (d - u) - dd_).reshape(u.shape[0], -1)
    s, b = [], []
    for e in range(f.shape[1]):
        design = torch.stack([f[:, e], torch.ones_like(f[:, e])], 1)
        sol = torch.linalg.lstsq(design, fp[:, e:e + 1], driver="gelsd").solution
        s.append(sol[0, 0])
        b.append(sol[1, 0])
    return torch.stack(s).reshape(u.shape[1:]), torch.stack(b).reshape(u.shape[1:])


def moments(u, d, dd_, v=None, sjv=None) -> _Moments:
    m = _Moments(tuple(u.shape[1:]))
    v = torch.ones_like(u) if v is None else v
    m.add(v, v if sjv is None else sjv, u, d, dd_)
    return m


# ------------------------------------------------------------------------------------------ Eq. 10 and Eq. 11

def test_l_is_the_least_squares_slope_for_any_probe_distribution():
    """Eq. 10 as least squares of sigma J_eps v on v: when sigma J_eps v = l v exactly, l is recovered whatever
    the probes are (Gaussian here, not only Rademacher +-1)."""
    g = torch.Generator().manual_seed(1)
    l_true = torch.rand(SHAPE, generator=g, dtype=torch.float64)
    v = 1.5 * torch.randn((12, *SHAPE), generator=g, dtype=torch.float64)
    m = moments(torch.zeros_like(v), torch.zeros_like(v), torch.zeros_like(v), v=v, sjv=l_true * v)
    torch.testing.assert_close(m.solve_l(), l_true, rtol=1e-12, atol=0)


def _regression_data(scale: float, q: float, zero_d: bool):
    g = torch.Generator().manual_seed(5)
    n = 24
    u = scale * (0.3 + torch.randn((n, *SHAPE), generator=g, dtype=torch.float64))
    d = torch.zeros_like(u) if zero_d else 0.5 * u + scale * torch.randn((n, *SHAPE), generator=g,
                                                                            dtype=torch.float64)
    l = torch.full(SHAPE, 1.0 - q, dtype=torch.float64)
    dl = torch.linspace(-0.5, 0.5, math.prod(SHAPE), dtype=torch.float64).reshape(SHAPE)
    slope = torch.linspace(-4.0, 4.0, math.prod(SHAPE), dtype=torch.float64).reshape(SHAPE)
    f = (1 - l) * u - d
    fp = slope * f + 0.7 * scale * q + 0.1 * scale * q * torch.randn((n, *SHAPE), generator=g, dtype=torch.float64)
    dd_ = -dl * u + (1 - l) * (d - u) - fp  # so that the f' of Eq. 11 is fp
    return u, d, dd_, l, dl


@pytest.mark.parametrize("scale,q,zero_d", [(1.0, 0.6, False), (1e-3, 0.6, False), (1e3, 0.6, False),
                                            (1.0, 1e-5, True)])
def test_s_and_b_are_the_least_squares_fit_at_any_scale(scale, q, zero_d):
    """Eq. 11 is an ordinary regression of f' on f: s does not depend on the scale of the states and b scales with
    them; an f that varies only through a small 1 - l (l = 1 - 1e-5, D = 0: the noisy end) still has its slope."""
    u, d, dd_, l, dl = _regression_data(scale, q, zero_d)
    s, b = moments(u, d, dd_).s_b(l, dl)
    s_ref, b_ref = lstsq_fit(u, d, dd_, l, dl)
    assert float(s_ref.abs().max()) > 1.0  # a real slope to find, inside the bound on s
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(b, b_ref, rtol=0, atol=1e-6 * scale * max(q, 1e-2))


@pytest.mark.parametrize("scale", [1e-147, 1.0, 1e3])
def test_an_f_equal_on_every_sample_has_no_slope_at_any_magnitude(scale):
    """u (= x / alpha) and D the same on every sample: f is constant, nothing to regress on, so s = 0 exactly and
    b = mean f', whatever the magnitude of the terms (down to 1e-147, where their squares are near the bottom of
    float64, and up to 1e3, where the rounding of the sample variance is far above the terms' own scale)."""
    g = torch.Generator().manual_seed(2)
    n = 7
    level = scale * (1.0 + 9.0 * torch.rand((1, 4, 4), generator=g, dtype=torch.float64))
    u = (level * (1 + 1 / 3)).expand(n, 4, 4).clone()
    d = torch.zeros_like(u)
    dd_ = scale * torch.randn((n, 4, 4), generator=g, dtype=torch.float64)
    l = 0.2 + 0.6 * torch.rand((4, 4), generator=g, dtype=torch.float64)
    dl = torch.randn((4, 4), generator=g, dtype=torch.float64)
    s, b = moments(u, d, dd_).s_b(l, dl)
    assert float(s.abs().max()) == 0.0
    fp = -dl * u + (1 - l) * (d - u) - dd_
    torch.testing.assert_close(b, fp.mean(0), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------- compute_statistics

def test_defaults_are_the_documented_settings_and_cost():
    """README: grid_points 60, samples 32, chunk 8, trajectory_substeps 1 by default, "the defaults are 3,904
    JVPs, 976 calls of 8 samples with finite differences (two calls per JVP, one of them batched twice)"."""
    mu = _mu()
    runs = []
    for kw in ({}, {"grid_points": 60, "samples": 32, "chunk": 8, "substeps": 1}):
        calls = []

        def denoise(x, sigma, calls=calls):
            calls.append((x.shape[0], float(sigma[0])))
            return gaussian(mu, "eps")(x, sigma)

        stats = compute_statistics(denoise, SHAPE, "eps", -1.0, 1.0, jvp="finite_difference", dtype=torch.float64,
                                   **kw)
        runs.append((stats, calls))
    (default, calls), (explicit, calls_explicit) = runs
    assert len(calls) == 976 and {b for b, _ in calls} == {8, 16}
    assert calls == calls_explicit
    assert len(default.lambdas) == 61
    for name in ("lambdas", "l", "s", "b"):
        assert torch.equal(getattr(default, name), getattr(explicit, name)), name


def test_callback_reports_each_grid_point_of_the_total():
    """Progress: one report per grid point done, out of grid_points + 1, ending at the total."""
    seen = []
    compute_statistics(gaussian(_mu(), "eps"), SHAPE, "eps", -1.0, 1.0, grid_points=3, samples=4, chunk=4,
                       jvp="finite_difference", dtype=torch.float64,
                       callback=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_smallest_documented_settings_are_accepted_and_exact():
    """samples >= 2 and chunk >= 1 are the documented minimums: 2 samples in chunks of 1 give the Gaussian's l
    (the Rademacher estimate of an isotropic Jacobian is exact)."""
    stats = compute_statistics(gaussian(_mu(), "eps"), SHAPE, "eps", -1.0, 1.0, grid_points=2, samples=2, chunk=1,
                               jvp="finite_difference", dtype=torch.float64)
    want = l_exact(stats.lambdas).reshape(-1, 1, 1).expand_as(stats.l)
    torch.testing.assert_close(stats.l.double(), want, rtol=0, atol=1e-6)  # stored in float32


def test_flow_trajectories_start_with_the_ddim_step_from_pure_noise():
    """Flow: the samples start as pure noise n at sigma = 1, where the data prediction is the data mean mu (the
    state carries no signal), and one DDIM step reaches the grid: x = sigma_0 n + (1 - sigma_0) mu with
    sigma_0 = sigmoid(-lam_min)."""
    mu = _mu()
    exact = gaussian(mu, "flow")
    calls = []

    def denoise(x, sigma):
        calls.append((x.clone(), sigma.clone()))
        return exact(x, sigma)

    lam_min = -0.5
    compute_statistics(denoise, SHAPE, "flow", lam_min, 1.0, grid_points=2, samples=5, chunk=5,
                       jvp="finite_difference", dtype=torch.float64)
    noise = [x for x, s in calls if bool((s == 1).all())]
    assert len(noise) == 1
    sigma0 = 1 / (1 + math.exp(lam_min))
    states = [x for x, s in calls if x.shape[0] == 5 and bool((s - sigma0).abs().max() < 1e-12)]
    assert len(states) == 2  # the plain call of each of the point's two JVPs
    want = sigma0 * noise[0] + (1 - sigma0) * mu
    for x in states:
        torch.testing.assert_close(x, want, rtol=0, atol=1e-12)


def test_b_uses_central_differences_of_l_and_one_sided_ones_at_the_ends():
    """Flow N(mu, c^2 I): b = -dl mu up to the samples' spread, dl the derivative of l estimated on the grid by
    central differences inside and forward / backward ones at the first / last point, here from the closed-form
    l; an error in the scheme moves b by (error in dl) * mu."""
    mu = _mu(3.0)
    h = 0.2
    stats = compute_statistics(gaussian(mu, "flow"), SHAPE, "flow", -0.5, 1.5, grid_points=10, samples=32, chunk=32,
                               jvp="finite_difference", dtype=torch.float64)
    lam = stats.lambdas
    l = l_exact(lam)
    torch.testing.assert_close(stats.l.double(), l.reshape(-1, 1, 1).expand_as(stats.l), rtol=0, atol=1e-6)
    dl = torch.cat([(l[1:2] - l[:1]) / h, (l[2:] - l[:-2]) / (2 * h), (l[-1:] - l[-2:-1]) / h])
    want = -dl.reshape(-1, 1, 1) * mu
    err = (stats.b.double() - want).abs().amax(dim=(1, 2))
    # measured: 0.012 at the first point, 0.006 at the last, <= 0.0013 inside (|mu| up to 6); a forward
    # difference at the second point instead of the central one moves b there by 0.1, no slope at an end by 0.5
    assert float(err.max()) < 0.03, err


def test_forward_jvps_run_on_copies_that_the_model_may_update_in_place():
    """Forward mode (also under inference mode, as ComfyUI runs): the JVPs take clones made outside inference mode,
    so a model that works in place on its input gives the exact Gaussian l."""
    with torch.inference_mode():
        stats = compute_statistics(gaussian(_mu(), "eps", in_place=True), SHAPE, "eps", -1.0, 1.0, grid_points=2,
                                   samples=4, chunk=4, jvp="forward", dtype=torch.float64)
    want = l_exact(stats.lambdas).reshape(-1, 1, 1).expand_as(stats.l)
    torch.testing.assert_close(stats.l.double(), want, rtol=0, atol=1e-6)  # stored in float32


def test_timestep_maps_updated_in_place_or_not_enterable_by_forward_mode():
    """A sigma -> timestep map that scales its input in place is differentiable; one that forward-mode AD cannot
    enter (a lookup through NumPy) is reported as not differentiable instead of raising."""
    sigma = torch.tensor([0.5, 3.0])
    with torch.inference_mode():
        assert timestep_is_differentiable(lambda s: s.mul_(1000), sigma.clone())
    assert timestep_is_differentiable(lambda s: s.mul_(1000), sigma.clone())
    assert not timestep_is_differentiable(lambda s: torch.from_numpy(s.numpy() * 1000), sigma)


# ---------------------------------------------------------------------------------------------------- sampler

def test_sampler_releases_states_older_than_any_step_uses():
    """The most points a step combines is four (order 3 and the corrector's extra point): a state and a model output
    older than the four newest are released before the next model call (the starting state excepted: the caller's
    arguments hold it)."""
    mu = _mu()
    exact = gaussian(mu, "eps")
    xs, ds, leaks = [], [], []

    def model(x, sigma):
        n = len(xs)
        leaks.extend((n, k, kind) for k in range(1, n - 4) for kind, refs in (("x", xs), ("d", ds)) if refs[k]() is not
                     None)
        d = exact(x.clone(), sigma)
        xs.append(weakref.ref(x))
        ds.append(weakref.ref(d))
        return d

    gc.disable()
    try:
        sigmas = torch.tensor([12.0, 8.0, 5.0, 3.0, 2.0, 1.2, 0.7, 0.4, 0.2], dtype=torch.float64)
        for corrector in (False, True):
            xs.clear()
            ds.clear()
            # the start is created in the call: no reference to it outlives the sampler's own
            sample_dpm_solver_v3(model, 12.0 * torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(0),
                                                           dtype=torch.float64),
                                 sigmas, disable=True, order=3, corrector=corrector,
                                 statistics=Statistics.degenerate(SHAPE))
            assert len(xs) == len(sigmas) - 1
    finally:
        gc.enable()
    assert leaks == []
