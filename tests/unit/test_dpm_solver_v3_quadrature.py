"""DPM-Solver-v3 (samplers/dpm_solver_v3.py): interpolation of the statistics at the grid ends, the psi integrals'
documented range, and single steps against closed forms of Eq. 7 and 8 (Zheng et al., arXiv:2310.13268) in cases
the smooth-statistics reference does not reach: a constant b of exactly +-1, a step far above the grid's start with
b != 0, statistics whose e^{S} factors are large, the default derivative rule at order 3; and that the sampler
builds no autograd graph.

Closed forms used (constant l, s, b; tau = lambda - lambda_s; h = lambda_t - lambda_s; c = l + s):
``S = s tau``, ``L = l tau``, ``B(tau) = b (1 - e^{-s tau}) / s`` (``b tau`` when s = 0), and
``A_n = int_0^h e^{c tau} tau^n / n! dtau``: ``A_0 = expm1(c h) / c``, ``A_1 = h e^{c h} / c - expm1(c h) / c^2``.
"""

from __future__ import annotations

import math

import pytest
import torch

from preprint.samplers.dpm_solver_v3 import Statistics, _apply, _psi, sample_dpm_solver_v3, step_weights

SHAPE = (2, 3)
F64 = torch.float64


def _rand(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _const_stats(l: float, s: float, b: float, lo: float = -5.0, hi: float = 5.0, points: int = 2) -> Statistics:
    lam = torch.linspace(lo, hi, points, dtype=F64)
    one = torch.ones((points, *SHAPE), dtype=F64)
    return Statistics(lam, l * one, s * one, b * one)


def _alpha(lam: float, kind: str) -> float:
    return 1.0 if kind == "eps" else 1.0 / (1.0 + math.exp(-lam))


def _simpson(fn, a: float, b: float, n: int = 4000) -> torch.Tensor:
    """Composite Simpson rule in float64 (n even): an integral computed independently of the module's psi."""
    r = torch.linspace(a, b, n + 1, dtype=F64)
    w = torch.ones(n + 1, dtype=F64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    vals = fn(r)
    return (b - a) / (3 * n) * (w.reshape(-1, *([1] * (vals.ndim - 1))) * vals).sum(0)


# ------------------------------------------------------------------------------------------ Statistics.at

def test_at_returns_the_first_grid_values_exactly_at_and_below_the_grid():
    """At the first grid point and below it (held constant) the interpolant is the first row itself, whatever the
    values at the far end of the grid (here 1e20: a difference through them would lose the first row)."""
    lam = torch.tensor([-2.0, 0.0, 1.5, 4.0], dtype=F64)
    first = torch.tensor([[0.25, -1.5, 3.0], [0.5, 7.0, -0.125]], dtype=F64)
    rows = torch.stack([first, _rand(1), _rand(2), 1e20 * torch.ones(SHAPE, dtype=F64)])
    stats = Statistics(lam, rows, -rows, 2 * rows)
    l, s, b = stats.at(torch.tensor([-2.0, -3.5, -1.0], dtype=F64))
    for got, sign in ((l, 1.0), (s, -1.0), (b, 2.0)):
        assert torch.equal(got[0], sign * first) and torch.equal(got[1], sign * first)
        torch.testing.assert_close(got[2], sign * 0.5 * (first + rows[1]), rtol=1e-15, atol=0)


def test_at_gives_nan_for_a_nan_lambda_instead_of_failing():
    """Like np.interp, a NaN lambda interpolates to NaN (the other lambdas of the call are unaffected)."""
    lam = torch.tensor([-1.0, 0.5, 2.0], dtype=F64)
    rows = torch.stack([_rand(3), _rand(4), _rand(5)])
    stats = Statistics(lam, rows, rows, rows)
    for got in stats.at(torch.tensor([0.5, math.nan, 2.0], dtype=F64)):
        assert torch.isnan(got[1]).all()
        assert torch.equal(got[0], rows[1])
        torch.testing.assert_close(got[2], rows[2], rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------------------------------- psi

@pytest.mark.parametrize("m_max", [0, 1, 2, 3])
@pytest.mark.parametrize("z", [-2.0, -0.3, 0.0, 0.4, 1.7])
def test_psi_returns_exactly_the_orders_zero_to_m_max(m_max, z):
    """The docstring's psi_m(z) = int_0^1 e^{z tau} tau^m dtau for m = 0..m_max: that many, each the integral."""
    got = _psi(torch.tensor([z], dtype=F64), m_max)
    assert len(got) == m_max + 1
    for m, val in enumerate(got):
        want = _simpson(lambda t, m=m: torch.exp(z * t) * t ** m, 0.0, 1.0)
        assert abs(float(val[0]) - float(want)) <= 1e-12 * abs(float(want))


# --------------------------------------------------------------------------------------------- single steps

@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("bv", [1.0, -1.0])
def test_constant_b_of_one_enters_the_step(kind, bv):
    """l constant, s = 0, b = +-1 (B = b tau is linear, so the segment quadrature is exact): order 1,
    x_t = a_t e^{-l h} [x_s / a_s - f A_0 - b A_1] with f = (1 - l) x_s / a_s - D_s."""
    lv = 0.6
    stats = _const_stats(lv, 0.0, bv)
    lam_s, lam_t = -0.4, 0.5
    h = lam_t - lam_s
    x, d = _rand(6), _rand(7)
    a_s, a_t = _alpha(lam_s, kind), _alpha(lam_t, kind)
    f = (1 - lv) * x / a_s - d
    a0 = math.expm1(lv * h) / lv
    a1 = h * math.exp(lv * h) / lv - math.expm1(lv * h) / lv ** 2
    want = a_t * math.exp(-lv * h) * (x / a_s - f * a0 - bv * a1)
    w = step_weights(stats, [lam_s], lam_t, kind)
    got = _apply(w, [x[None]], [d[None]])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    # the b term is a visible part of the step (not a rounding-level one)
    assert float((want - a_t * math.exp(-lv * h) * (x / a_s - f * a0)).abs().min()) > 0.05


def test_step_far_above_the_grid_start_with_b_matches_the_closed_form():
    """Constant l, s, b on a fine grid reaching far below the step: only the step's own stretch of the grid enters
    B = int_{lambda_s} e^{-S} b (Eq. 7), so x_t = a_t e^{-l h} [x_s - f A_0 - (b / s)(A_0 - expm1(l h) / l)]
    up to the trapezoidal error of B on the 0.005 grid (measured 5e-6; summing e^{-S} b from the grid's start,
    e^{4 * 10} times larger there, would leave ~0.2)."""
    lv, sv, bv = 0.7, 4.0, 0.5
    stats = _const_stats(lv, sv, bv, -8.0, 8.0, points=3201)
    lam_s, lam_t = 2.0, 2.6
    h, c = lam_t - lam_s, lv + sv
    x, d = _rand(8), _rand(9)
    f = (1 - lv) * x - d
    a0 = math.expm1(c * h) / c
    want = math.exp(-lv * h) * (x - f * a0 - bv / sv * (a0 - math.expm1(lv * h) / lv))
    got = _apply(step_weights(stats, [lam_s], lam_t, "eps"), [x[None]], [d[None]])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_step_weights_with_large_s_are_finite_and_exact():
    """S is measured from the step's base (S(lambda_s) = 0, Eq. 7), so statistics with large s give finite weights
    whenever the step's own factors are: l = 1, s = 250, b = 0, order 2 from lambda_s = 0 with the older point
    1.5 below (e^{s 1.5} = e^{375}) to lambda_t = 0.2. With g_i = -e^{-S_i} D_i and g' = (g_1 - g_0) / (-Delta),
    x_t = e^{-h} [x_s - A_0 g_0 - A_1 g']: wx = (e^{-h}, 0), wd = (e^{-h} (A_0 + A_1 / Delta),
    -e^{-h} A_1 e^{s Delta} / Delta), const = 0."""
    sv, delta, lam_t = 250.0, 1.5, 0.2
    stats = _const_stats(1.0, sv, 0.0)
    h, c = lam_t, 1.0 + sv
    a0 = math.expm1(c * h) / c
    a1 = h * math.exp(c * h) / c - math.expm1(c * h) / c ** 2
    w = step_weights(stats, [0.0, -delta], lam_t, "eps")
    want_wd = [math.exp(-h) * (a0 + a1 / delta), -math.exp(-h) * a1 * math.exp(sv * delta) / delta]
    for got, want in zip(w.wd, want_wd, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, torch.full(SHAPE, want, dtype=F64), rtol=1e-10, atol=0)
    torch.testing.assert_close(w.wx[0], torch.full(SHAPE, math.exp(-h), dtype=F64), rtol=1e-12, atol=0)
    assert float(w.wx[1].abs().max()) == 0.0 and float(w.const.abs().max()) == 0.0


def test_default_derivatives_are_those_of_the_interpolating_polynomial():
    """Without ``pseudo``, order 3 with degenerate statistics (l = 1, s = b = 0, EPS) integrates the quadratic P
    through the three points exactly: x_t = e^{-h} x_s + int e^{r - lambda_t} P(r) dr, so the weight of D_i is
    int_{lambda_s}^{lambda_t} e^{r - lambda_t} ell_i(r) dr with ell_i the Lagrange basis (Simpson here); the
    pseudo-order's divided differences give other weights."""
    lams, lam_t = [0.0, -0.4, -1.1], 0.5
    stats = Statistics.degenerate(SHAPE, -5.0, 5.0, points=11)

    def ell(i: int, r: torch.Tensor) -> torch.Tensor:
        out = torch.ones_like(r)
        for j, lj in enumerate(lams):
            if j != i:
                out = out * (r - lj) / (lams[i] - lj)
        return out

    w = step_weights(stats, lams, lam_t, "eps")
    for i in range(3):
        want = float(_simpson(lambda r, i=i: torch.exp(r - lam_t) * ell(i, r), lams[0], lam_t))
        torch.testing.assert_close(w.wd[i], torch.full(SHAPE, want, dtype=F64), rtol=0, atol=1e-12)
        wx = math.exp(-(lam_t - lams[0])) if i == 0 else 0.0
        torch.testing.assert_close(w.wx[i], torch.full(SHAPE, wx, dtype=F64), rtol=0, atol=1e-14)
    pseudo = step_weights(stats, lams, lam_t, "eps", pseudo=True)
    assert max(float((p - q).abs().max()) for p, q in zip(pseudo.wd, w.wd, strict=True)) > 1e-3


# ----------------------------------------------------------------------------------------------- the sampler

def test_sampler_builds_no_autograd_graph():
    """With grad mode on and a model holding a trainable parameter (and an input that requires grad), the
    sampled result carries no graph: sampling needs no backward pass and must not keep every step's tensors."""
    c2 = torch.tensor(0.16, dtype=F64, requires_grad=True)
    mu = _rand(10)

    def model(x, sigma, **kwargs):
        s2 = sigma.reshape(-1, 1, 1) ** 2
        return mu + (x - mu) * c2 / (c2 + s2)

    x = (5.0 * _rand(11, (2, *SHAPE))).requires_grad_(True)
    sig = torch.tensor([5.0, 2.0, 0.8, 0.3, 0.0], dtype=F64)
    with torch.enable_grad():
        out = sample_dpm_solver_v3(model, x, sig, disable=True, order=3)
    assert not out.requires_grad and out.grad_fn is None
    with torch.no_grad():
        want = sample_dpm_solver_v3(model, x.detach(), sig, disable=True, order=3)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
