"""DPM-Solver-v3 against independent references written from the paper (Zheng et al., arXiv:2310.13268).

The step reference evaluates Eq. 7 and Eq. 8 by fine trapezoidal quadrature in float64 on its own interpolation
of the statistics (``np.interp``), with the derivatives of ``g`` from Newton divided differences (pseudo-order) or
the interpolating polynomial; the solver's exact segment integrals differ from it only by the documented
linear-exponent approximation per segment (grid spacing 0.02: ~2e-5 here). The sampler reference replays the
predictor / pseudo-corrector schedule of the docstring with that step. The statistics are checked on data whose
Jacobian is known (a Gaussian, isotropic or with a rank-one correlation) and the regression of Eq. 11 against a
direct least-squares fit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from preprint.samplers import dpm_solver_v3 as v3
from preprint.utils.gaussian_mixture import GaussianMixture, MixtureDenoiser, make_mixture

SHAPE = (2, 3)  # small latent: the reference loops over its elements
FINE = 4001  # quadrature points per integral


# ------------------------------------------------------------------------------------------ reference helpers

def smooth_stats(seed: int = 0, lo: float = -4.0, hi: float = 4.0, spacing: float = 0.02,
                 shape: tuple[int, ...] = SHAPE) -> v3.Statistics:
    """Per-element smooth l, s, b (sines of random phase) sampled on a fine uniform lambda grid, in float64."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.linspace(lo, hi, round((hi - lo) / spacing) + 1, dtype=torch.float64)
    r = lam.reshape(-1, *([1] * len(shape)))

    def phase() -> torch.Tensor:
        return 2 * math.pi * torch.rand(shape, generator=g, dtype=torch.float64)

    l = 0.6 + 0.3 * torch.sin(0.7 * r + phase())
    s = 0.4 * torch.cos(0.5 * r + phase())
    b = 0.3 * torch.sin(r + phase())
    return v3.Statistics(lam, l, s, b)


def ref_interp(stats: v3.Statistics, r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """l, s, b at the lambdas r ([M]) -> [M, E], linear between grid points, constant beyond (np.interp)."""
    grid = stats.lambdas.numpy()
    out = []
    for t in (stats.l, stats.s, stats.b):
        flat = t.double().reshape(len(grid), -1).numpy()
        out.append(np.stack([np.interp(r, grid, flat[:, e]) for e in range(flat.shape[1])], axis=1))
    return out[0], out[1], out[2]


def cumtrapz(y: np.ndarray, r: np.ndarray) -> np.ndarray:
    steps = 0.5 * np.diff(r)[:, None] * (y[1:] + y[:-1])
    return np.concatenate([np.zeros_like(y[:1]), np.cumsum(steps, 0)])


def trapz(y: np.ndarray, r: np.ndarray, axis: int = 0) -> np.ndarray:
    return cumtrapz(y, r)[-1]


def path(stats: v3.Statistics, lam_s: float, lam_e: float):
    """Fine path from lam_s to lam_e with l, s, b and L, S, B = int_{lam_s} (l, s, e^{-S} b) along it."""
    r = np.linspace(lam_s, lam_e, FINE)
    l, s, b = ref_interp(stats, r)
    big_l, big_s = cumtrapz(l, r), cumtrapz(s, r)
    big_b = cumtrapz(np.exp(-big_s) * b, r)
    return r, l, s, b, big_l, big_s, big_b


def alpha_of(lam: float, kind: str) -> float:
    return 1.0 if kind == "eps" else 1.0 / (1.0 + math.exp(-lam))  # flow: alpha = 1 - sigmoid(-lam)


def sigma_of(lam: float, kind: str) -> float:
    return math.exp(-lam) if kind == "eps" else 1.0 / (1.0 + math.exp(lam))


def divided_difference(lams: list[float], vals: list[np.ndarray]) -> np.ndarray:
    if len(lams) == 1:
        return vals[0]
    return (divided_difference(lams[1:], vals[1:]) - divided_difference(lams[:-1], vals[:-1])) / (lams[-1] - lams[0])


def taylor_derivatives(lams: list[float], vals: list[np.ndarray], pseudo: bool) -> list[np.ndarray]:
    """g^(n)(lams[0]) for n = 1..k-1: n! times the n-th Newton difference (pseudo) or of the interpolant."""
    k = len(lams)
    if pseudo:
        return [math.factorial(n) * divided_difference(lams[:n + 1], vals[:n + 1]) for n in range(1, k)]
    ys = np.stack(vals)  # [k, ...]
    coef = np.polyfit(np.array(lams) - lams[0], ys.reshape(k, -1), k - 1)[::-1]  # c_0 + c_1 dr + ...
    return [math.factorial(n) * coef[n].reshape(ys.shape[1:]) for n in range(1, k)]


def ref_step(stats, lams, xs, ds, lam_t, kind, pseudo=False, rule="taylor") -> np.ndarray:
    """Eq. 8 from base lams[0] to lam_t, g from Eq. 7 at the points, Taylor terms of g (Eq. 12) integrated exactly
    by quadrature; xs, ds are [..., E] arrays. ``rule="dpmsolver"``: A_1 = (h / 2) A_0 at order 2, A_2 / 2 at
    order 3."""
    lam_s = lams[0]
    gs = []
    for lam_i, x_i, d_i in zip(lams, xs, ds, strict=True):
        _, l, _, _, _, big_s, big_b = path(stats, lam_s, lam_i)
        f_i = (1 - l[-1]) * x_i / alpha_of(lam_i, kind) - d_i  # Eq. 6
        gs.append(np.exp(-big_s[-1]) * f_i - big_b[-1])  # Eq. 7
    derivs = taylor_derivatives(lams, gs, pseudo)
    r, _, _, _, big_l, big_s, big_b = path(stats, lam_s, lam_t)
    e = np.exp(big_l + big_s)
    acc = [trapz(e * ((r - lam_s) ** n / math.factorial(n))[:, None], r, axis=0) for n in range(len(lams))]
    if rule == "dpmsolver" and len(lams) == 2:
        acc[1] = 0.5 * (lam_t - lam_s) * acc[0]
    elif rule == "dpmsolver" and len(lams) == 3:
        acc[2] = 0.5 * acc[2]
    integral = acc[0] * gs[0] + sum(a * dg for a, dg in zip(acc[1:], derivs, strict=True))
    integral = integral + trapz(e * big_b, r, axis=0)
    return alpha_of(lam_t, kind) * np.exp(-big_l[-1]) * (xs[0] / alpha_of(lam_s, kind) - integral)


def module_step(stats, lams, xs, ds, lam_t, kind, pseudo=False, rule="taylor") -> np.ndarray:
    w = v3.step_weights(stats, lams, lam_t, kind, pseudo, rule)
    sh = stats.shape
    out = v3._apply(w, [torch.from_numpy(x).reshape(-1, *sh) for x in xs], [torch.from_numpy(d).reshape(-1, *sh)
                                                                             for d in ds])
    return out.reshape(np.shape(xs[0])).numpy()


def half_log_snr(sigma: float, kind: str) -> float:
    if kind == "eps":
        return -math.log(sigma)
    return math.log(1 - sigma) - math.log(sigma) if sigma < 1 else -math.inf


def ref_sample(model, x, sigmas, stats, order=2, corrector=True, lower_order_final=True, kind="eps",
               predictor_pseudo=False, corrector_pseudo=True, second_order="taylor", step=module_step) -> torch.Tensor:
    """The docstring's schedule: predictor of order min(order, finite history) (lower order on the
    last steps of runs under 10 steps); before each step the previous step is redone from its base with the new
    output among the points, order min(last predictor order + 1 (pseudo), finite history), and D moves with x so
    that N = (1 - l) x - alpha D stays; a step to 0 returns D; a step from lambda = -inf is DDIM. ``step`` is the
    single-step update (the solver's, checked against Eq. 8 above, or ``ref_step``)."""
    sig = [float(v) for v in sigmas]
    total = len(sig) - 1
    flat = x.double().reshape(x.shape[0], -1).numpy()
    hist: list[list] = []  # [lambda, x, D] of the newest evaluations, as [B, E] arrays
    last = 0
    for i in range(total):
        s, sn = sig[i], sig[i + 1]
        d = model(torch.from_numpy(flat).reshape(x.shape), torch.tensor([s], dtype=torch.float64)).double()
        lam = half_log_snr(s, kind)
        hist = (hist + [[lam, flat, d.reshape(x.shape[0], -1).numpy()]])[-4:]
        finite = 0
        for h in reversed(hist):
            if not math.isfinite(h[0]):
                break
            finite += 1
        c = min(last + (1 if corrector_pseudo else 0), finite)
        if corrector and c > 1:
            pts = [hist[-2], hist[-1]] + [hist[-3 - j] for j in range(c - 2)]
            x_new = step(stats, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], lam, kind,
                         corrector_pseudo, second_order)
            l_t = ref_interp(stats, np.array([lam]))[0][0]
            d_new = hist[-1][2] + (1 - l_t) * (x_new - hist[-1][1]) / alpha_of(lam, kind)
            hist[-1] = [lam, x_new, d_new]
        k = min(order, finite)
        if lower_order_final and total < 10:
            k = min(k, total - i)
        k = max(k, 1)
        lam_x, x_cur, d_cur = hist[-1]
        if sn == 0:
            flat = d_cur
        elif not math.isfinite(lam_x):
            flat = sn / s * x_cur + (1 - sn) * d_cur
            k = 1
        else:
            pts = [hist[-1 - j] for j in range(k)]
            flat = step(stats, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts],
                        half_log_snr(sn, kind), kind, predictor_pseudo, second_order)
        last = k
    return torch.from_numpy(np.array(flat)).reshape(x.shape)


def tiny_model(kind: str) -> MixtureDenoiser:
    return MixtureDenoiser(make_mixture(SHAPE, components=3, seed=4, std_range=(0.2, 0.6)), kind=kind)


def start(kind: str, sigma: float, batch: int = 3) -> torch.Tensor:
    x = torch.randn((batch, *SHAPE), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return sigma * x if kind == "eps" else sigma * x + (1 - sigma) * 0.5


def rand(seed: int, n: int = math.prod(SHAPE)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=n)


# -------------------------------------------------------------------------------------------- grid and psi

def test_statistics_reject_grids_that_are_not_strictly_increasing():
    """The lambda grid must be 1-D, finite, of >= 2 points and strictly increasing everywhere (not only above its
    first point); l, s, b must match it and l's shape."""
    one = torch.ones((3, *SHAPE))
    for grid in ([0.0, 2.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 2.0], [0.0, 1.0, math.inf], [0.0, math.nan, 1.0]):
        with pytest.raises(ValueError, match="increasing"):
            v3.Statistics(torch.tensor(grid, dtype=torch.float64), one, one, one)
    with pytest.raises(ValueError, match="increasing"):
        v3.Statistics(torch.zeros(1, dtype=torch.float64), one[:1], one[:1], one[:1])
    with pytest.raises(ValueError, match="increasing"):
        v3.Statistics(torch.zeros((3, 1), dtype=torch.float64), one, one, one)
    lam = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        v3.Statistics(lam, one, one[:2], one)
    with pytest.raises(ValueError, match="shape"):
        v3.Statistics(lam, one, one, torch.ones((3, 2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        v3.Statistics(lam, one, one * math.inf, one)
    ok = v3.Statistics(lam, one, 2 * one, 3 * one)
    assert ok.shape == SHAPE


def test_interpolation_at_between_and_beyond_grid_points():
    """``at`` returns the grid values at grid points, the linear interpolant between them and the end values
    beyond the grid (np.interp), for each element."""
    stats = v3.Statistics(torch.tensor([-1.0, 0.5, 1.0, 3.0], dtype=torch.float64),
                          torch.randn((4, *SHAPE), dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
                          torch.randn((4, *SHAPE), dtype=torch.float64, generator=torch.Generator().manual_seed(2)),
                          torch.randn((4, *SHAPE), dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    lam = np.array([-5.0, -1.0, -0.7, 0.5, 0.6, 0.999, 1.0, 2.2, 3.0, 9.0])
    got = stats.at(torch.from_numpy(lam))
    want = ref_interp(stats, lam)
    for g, w in zip(got, want, strict=True):
        assert g.shape == (len(lam), *SHAPE)
        np.testing.assert_allclose(g.reshape(len(lam), -1).numpy(), w, rtol=0, atol=1e-14)


@pytest.mark.parametrize("z", [-6.0, -2.0, -0.5, -0.4999, -0.01, 0.0, 1e-7, 0.3, 0.5, 0.51, 3.0, 8.0])
def test_psi_is_the_integral_of_exp_times_power(z):
    """psi_m(z) = int_0^1 e^{z tau} tau^m dtau (Gauss-Legendre, exact here) on both sides of the series switch."""
    nodes, weights = np.polynomial.legendre.leggauss(40)
    tau = 0.5 * (nodes + 1)
    got = v3._psi(torch.tensor([z], dtype=torch.float64), 3)
    for m in range(4):
        want = 0.5 * np.sum(weights * np.exp(z * tau) * tau ** m)
        assert abs(float(got[m][0]) - want) <= 1e-13 * abs(want), (m, float(got[m][0]), want)


@pytest.mark.parametrize("lams", [[0.0, -0.4], [0.3, -0.2, -0.9], [0.0, 0.7, -0.5], [1.0, 0.2, -0.3, -1.1]])
def test_derivative_weights(lams):
    """Non-pseudo: exact derivatives at lams[0] of a polynomial of degree k - 1 through the points; pseudo:
    n! times the Newton divided differences taken in the given point order."""
    k = len(lams)
    coef = rand(5, k)
    vals = [sum(c * (x ** j) for j, c in enumerate(coef)) for x in lams]
    exact = [sum(c * math.factorial(j) / math.factorial(j - n) * lams[0] ** (j - n) for j, c in enumerate(coef)
                 if j >= n) for n in range(1, k)]
    w = v3._derivative_weights(lams, pseudo=False)
    for n in range(k - 1):
        assert abs(sum(wi * v for wi, v in zip(w[n], vals, strict=True)) - exact[n]) < 1e-10
    w = v3._derivative_weights(lams, pseudo=True)
    for n in range(1, k):
        want = math.factorial(n) * divided_difference(lams[:n + 1], [np.array(v) for v in vals[:n + 1]])
        assert abs(sum(wi * v for wi, v in zip(w[n - 1], vals, strict=True)) - float(want)) < 1e-10
    assert v3._derivative_weights(lams[:1], pseudo=True) == []


# ---------------------------------------------------------------------------------------------- single steps

@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_first_order_step_with_degenerate_statistics_is_dpm_solver_pp(kind):
    """l = 1, s = b = 0: x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) D_s (DDIM in data prediction)."""
    stats = v3.Statistics.degenerate(SHAPE, -5.0, 5.0, points=11)
    lam_s, lam_t = -1.3, 0.45
    x, d = rand(1), rand(2)
    got = module_step(stats, [lam_s], [x], [d], lam_t, kind)
    want = sigma_of(lam_t, kind) / sigma_of(lam_s, kind) * x - alpha_of(lam_t, kind) * math.expm1(lam_s - lam_t) * d
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_first_order_step_with_zero_statistics_is_euler_in_x_over_alpha(kind):
    """l = s = b = 0: N = sigma eps, no linear part is integrated exactly and Eq. 8 is the Euler step of
    d(x / alpha) / d lambda = D - x / alpha."""
    lam = torch.tensor([-5.0, 5.0], dtype=torch.float64)
    zero = torch.zeros((2, *SHAPE), dtype=torch.float64)
    stats = v3.Statistics(lam, zero, zero, zero)
    lam_s, lam_t = -0.8, 0.3
    x, d = rand(3), rand(4)
    got = module_step(stats, [lam_s], [x], [d], lam_t, kind)
    u = x / alpha_of(lam_s, kind)
    want = alpha_of(lam_t, kind) * (u + (lam_t - lam_s) * (d - u))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("bv,points,tol", [(0.0, 3, 1e-12), (0.4, 1001, 2e-6)])
def test_first_order_step_with_constant_statistics_closed_form(kind, bv, points, tol):
    """Constant l, s, b: L = l tau, S = s tau, B = b (1 - e^{-s tau}) / s, g = f_s, so Eq. 8 is
    x_t = a_t e^{-l h} [x_s / a_s - f_s (e^{(l+s)h} - 1)/(l+s) - b/s ((e^{(l+s)h} - 1)/(l+s) - (e^{lh} - 1)/l)].
    Exact for b = 0 (the exponent is linear); B is a trapezoidal sum over the grid, so b != 0 takes a fine grid."""
    lam = torch.linspace(-5.0, 5.0, points, dtype=torch.float64)
    lv, sv = 0.7, -0.35
    full = torch.ones((points, *SHAPE), dtype=torch.float64)
    stats = v3.Statistics(lam, lv * full, sv * full, bv * full)
    lam_s, lam_t = -1.1, 0.9
    h = lam_t - lam_s
    x, d = rand(5), rand(6)
    got = module_step(stats, [lam_s], [x], [d], lam_t, kind)
    f = (1 - lv) * x / alpha_of(lam_s, kind) - d
    e_ls = math.expm1((lv + sv) * h) / (lv + sv)
    want = alpha_of(lam_t, kind) * math.exp(-lv * h) * (
        x / alpha_of(lam_s, kind) - f * e_ls - bv / sv * (e_ls - math.expm1(lv * h) / lv))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


CASES = [  # (lams, lam_t): predictor (points before the base), corrector (target among the points), grid edges
    ([-1.0], 0.2),
    ([0.4, -0.6], 1.3),
    ([0.5, -0.2, -1.4], 1.1),
    ([-1.0, 0.2], 0.2),
    ([-1.0, 0.2, -1.9], 0.2),
    ([-1.0, 0.2, -1.9, -2.7], 0.2),
    ([3.8, 3.3], 4.2),  # the step runs past the grid: statistics held constant
    ([-4.1, -4.3], -3.6),  # starts and looks back below the grid
]


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("pseudo,rule", [(False, "taylor"), (True, "taylor"), (False, "dpmsolver")])
def test_step_matches_quadrature_of_eq_8(kind, case, pseudo, rule):
    """Any order, with smooth statistics: the weighted update equals Eq. 7 and 8 evaluated by fine quadrature."""
    lams, lam_t = CASES[case]
    stats = smooth_stats(seed=case)
    xs = [rand(10 + i) for i in range(len(lams))]
    ds = [rand(20 + i) for i in range(len(lams))]
    got = module_step(stats, lams, xs, ds, lam_t, kind, pseudo, rule)
    want = ref_step(stats, lams, xs, ds, lam_t, kind, pseudo, rule)
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-5 * (1 + np.abs(want).max()))


def test_step_weights_reject_unknown_rules():
    with pytest.raises(ValueError, match="second_order"):
        v3.step_weights(smooth_stats(), [0.0], 1.0, "eps", second_order="heun")


# ----------------------------------------------------------------------------------------------- the sampler

RUNS = [  # kind, sigmas, options
    ("eps", [10.0, 4.0, 1.5, 0.6, 0.2, 0.0], {}),
    ("eps", [10.0, 4.0, 1.5, 0.6, 0.2, 0.0], {"order": 3, "second_order": "dpmsolver"}),
    ("eps", [10.0, 4.0, 1.5, 0.6, 0.2], {"order": 3, "predictor_pseudo": True, "lower_order_final": False}),
    ("eps", [10.0, 4.0, 1.5, 0.6, 0.2, 0.0], {"order": 3, "corrector_pseudo": False}),
    ("eps", [10.0, 4.0, 1.5, 0.6, 0.2], {"order": 1}),
    ("flow", [0.95, 0.8, 0.5, 0.2, 0.05, 0.0], {"order": 3}),
    ("flow", [1.0, 0.9, 0.6, 0.3, 0.1, 0.0], {"order": 2}),
    ("flow", [1.0, 0.9, 0.6, 0.3, 0.1], {"order": 3, "corrector": False, "lower_order_final": False}),
]


@pytest.mark.parametrize("run", range(len(RUNS)))
def test_sampler_matches_the_reference_schedule(run):
    """Whole runs (batch of 3, smooth statistics): predictor orders, pseudo-corrector, the D update, the final
    step to 0 or a list ending above 0, and a flow start at sigma = 1 all follow the reference."""
    kind, sigmas, options = RUNS[run]
    model = tiny_model(kind)
    stats = smooth_stats(seed=run, spacing=0.1)
    sig = torch.tensor(sigmas, dtype=torch.float64)
    x = start(kind, sigmas[0])
    got = v3.sample_dpm_solver_v3(model, x.clone(), sig, disable=True, statistics=stats, parameterisation=kind,
                                  **options)
    want = ref_sample(model, x.clone(), sig, stats, kind=kind, **options)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_sampler_matches_quadrature_end_to_end():
    """One whole run (order 3, pseudo-corrector) with every step by the quadrature of Eq. 8: the solver's segment
    integrals err by ~1e-4 over the run (linear exponent per 0.02 segment), orders below any change of rule."""
    model = tiny_model("eps")
    stats = smooth_stats(seed=3)
    sig = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.1], dtype=torch.float64)
    x = start("eps", 10.0)[:1]
    got = v3.sample_dpm_solver_v3(model, x.clone(), sig, disable=True, statistics=stats, order=3)
    want = ref_sample(model, x.clone(), sig, stats, order=3, step=ref_step)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)


def test_batch_rows_are_independent_and_callback_sees_each_step():
    """A batch gives each row what sampling it alone gives; the callback sees every step, x and denoised."""
    model = tiny_model("eps")
    stats = smooth_stats(seed=9, spacing=0.1)
    sig = torch.tensor([8.0, 2.0, 0.7, 0.25, 0.0], dtype=torch.float64)
    x = start("eps", 8.0, batch=3)
    seen = []
    batch = v3.sample_dpm_solver_v3(model, x.clone(), sig, disable=True, statistics=stats, order=3,
                                    callback=lambda info: seen.append(info))
    assert [info["i"] for info in seen] == [0, 1, 2, 3]
    for row in range(3):
        alone = v3.sample_dpm_solver_v3(model, x[row:row + 1].clone(), sig, disable=True, statistics=stats, order=3)
        torch.testing.assert_close(batch[row:row + 1], alone, rtol=0, atol=1e-12)


def test_one_step_to_zero_returns_the_denoised_state_and_one_sigma_returns_the_input():
    model = tiny_model("eps")
    x = start("eps", 3.0)
    sig = torch.tensor([3.0, 0.0], dtype=torch.float64)
    got = v3.sample_dpm_solver_v3(model, x.clone(), sig, disable=True, statistics=smooth_stats())
    torch.testing.assert_close(got, model(x, torch.tensor([3.0], dtype=torch.float64)), rtol=0, atol=0)
    same = v3.sample_dpm_solver_v3(model, x.clone(), sig[:1], disable=True, statistics=smooth_stats())
    torch.testing.assert_close(same, x, rtol=0, atol=0)


def test_flow_first_step_from_sigma_one_ignores_the_statistics():
    """From sigma = 1 (lambda = -inf) the step is x = sigma_1 x + (1 - sigma_1) D(x, 1) under any EMS."""
    model = tiny_model("flow")
    x = start("flow", 1.0)
    sig = torch.tensor([1.0, 0.7], dtype=torch.float64)
    want = 0.7 * x + 0.3 * model(x, torch.tensor([1.0], dtype=torch.float64))
    for stats in (smooth_stats(seed=1), None):
        got = v3.sample_dpm_solver_v3(model, x.clone(), sig, disable=True, statistics=stats, parameterisation="flow")
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


def test_overflowing_statistics_raise():
    """Statistics whose e^{S} weights overflow make a non-finite step: the sampler says so instead of returning it."""
    lam = torch.tensor([-5.0, 5.0], dtype=torch.float64)
    one = torch.ones((2, *SHAPE), dtype=torch.float64)
    stats = v3.Statistics(lam, one, 800.0 * one, one)
    sig = torch.tensor([10.0, 0.5, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN or infinity"):
        v3.sample_dpm_solver_v3(tiny_model("eps"), start("eps", 10.0), sig, disable=True, statistics=stats)


# ---------------------------------------------------------------------------------------------- statistics

def _sb_reference(u, d, dd_, l, dl):
    """Least squares of f' = -l' u + (1 - l)(D - u) - D' on f = (1 - l) u - D over the samples (dim 0)."""
    f = (1 - l) * u - d
    fp = -dl * u + (1 - l) * (d - u) - dd_
    cov = ((f - f.mean(0)) * (fp - fp.mean(0))).mean(0)
    var = ((f - f.mean(0)) ** 2).mean(0)
    s = (cov / var).clamp(-v3.S_LIMIT, v3.S_LIMIT)
    return s, fp.mean(0) - s * f.mean(0)


def test_moments_solve_eq_10_and_eq_11_by_least_squares():
    """l = sum v (v - a J v) / sum v v; s, b the regression of f' on f (in chunks of samples), clamped to
    |s| <= S_LIMIT with b refitted; an f equal on every sample gives s = 0, b = mean f'."""
    g = torch.Generator().manual_seed(11)
    n = 40
    shape = (3, 4)
    u = torch.randn((n, *shape), generator=g, dtype=torch.float64) * 1.7 + 0.3
    d = 0.5 * u + torch.randn((n, *shape), generator=g, dtype=torch.float64)
    l = 0.2 + 0.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    dl = torch.randn(shape, generator=g, dtype=torch.float64)
    slope = torch.linspace(-12.0, 12.0, math.prod(shape), dtype=torch.float64).reshape(shape)  # some beyond limit
    f = (1 - l) * u - d
    fp = slope * f + 0.4 + 0.05 * torch.randn((n, *shape), generator=g, dtype=torch.float64)
    dd_ = -dl * u + (1 - l) * (d - u) - fp
    v = torch.randint(0, 2, (n, *shape), generator=g).double() * 2 - 1
    sjv = v - 0.3 * v * torch.randn((n, *shape), generator=g, dtype=torch.float64)
    mom = v3._Moments(shape)
    for c in range(0, n, 16):
        mom.add(v[c:c + 16], sjv[c:c + 16], u[c:c + 16], d[c:c + 16], dd_[c:c + 16])
    assert mom.n == n
    torch.testing.assert_close(mom.solve_l(), (v * sjv).sum(0) / (v * v).sum(0), rtol=1e-12, atol=0)
    s, b = mom.s_b(l, dl)
    s_ref, b_ref = _sb_reference(u, d, dd_, l, dl)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(b, b_ref, rtol=0, atol=1e-9)
    assert float(s.abs().max()) == v3.S_LIMIT and float((s.abs() < v3.S_LIMIT).float().mean()) > 0.5
    # l = 1: f = -D; D equal on every sample makes f constant, so no slope: s = 0, b = mean f'
    flat = v3._Moments(shape)
    d_const = d[:1].expand_as(d)
    flat.add(v, sjv, u, d_const, dd_)
    s, b = flat.s_b(torch.ones(shape, dtype=torch.float64), dl)
    assert float(s.abs().max()) == 0.0
    fp = -dl * u - dd_
    torch.testing.assert_close(b, fp.mean(0), rtol=0, atol=1e-12)


def _gaussian(kind: str, c: float = 0.4):
    mu = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return mu, MixtureDenoiser(GaussianMixture(mu, torch.tensor([c], dtype=torch.float64), torch.ones(1).double()),
                               kind=kind)


def test_flow_statistics_of_a_single_gaussian():
    """Flow data N(mu, c^2 I): l = sigma^2 / (alpha^2 c^2 + sigma^2) = 1 / (1 + c^2 e^{2 lambda}), f = -l mu is the
    same on every sample (s = 0) and b = f' = -l' mu = 2 l (1 - l) mu (interior points, up to the central
    difference l' is taken by: ~2e-3 at h = 0.1)."""
    c = 0.4
    mu, model = _gaussian("flow", c)
    stats = v3.compute_statistics(lambda x, s: model(x, s), SHAPE, "flow", -2.0, 2.0, grid_points=40, samples=6,
                                  chunk=4, dtype=torch.float64)
    l_true = (1 / (1 + c * c * torch.exp(2 * stats.lambdas))).reshape(-1, 1, 1)
    torch.testing.assert_close(stats.l.double(), l_true.expand_as(stats.l), atol=1e-6, rtol=0)
    assert float(stats.s.abs().max()) < 1e-5
    torch.testing.assert_close(stats.b.double()[1:-1], (2 * l_true * (1 - l_true) * mu)[1:-1], atol=4e-3, rtol=0)


class CorrelatedGaussian:
    """Data N(mu, c^2 I + rho 1 1^T): the denoiser is linear with Jacobian J = Sigma (Sigma + sigma^2 I)^-1 (EPS),
    whose off-diagonal entries a Rademacher probe must average out (E[v_i v_j] = 0)."""

    def __init__(self, shape, c=0.3, rho_total=4.0):
        self.shape = shape
        n = math.prod(shape)
        self.mu = torch.randn(n, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        self.cov = c * c * torch.eye(n, dtype=torch.float64) + rho_total / n * torch.ones((n, n), dtype=torch.float64)

    def jacobian(self, sigma: float) -> torch.Tensor:
        n = self.cov.shape[0]
        return self.cov @ torch.linalg.inv(self.cov + sigma * sigma * torch.eye(n, dtype=torch.float64))

    def __call__(self, x, sigma):
        sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1)[0]
        n = self.cov.shape[0]
        gain = self.cov @ torch.linalg.inv(self.cov + sig * sig * torch.eye(n, dtype=x.dtype))
        return (self.mu + (x.reshape(x.shape[0], -1) - self.mu) @ gain.T).reshape(x.shape)


def test_l_is_the_diagonal_of_the_jacobian_under_correlation():
    """Eq. 10 with a correlated Gaussian: l = 1 - diag(J); the Rademacher probes average the off-diagonal
    entries out (measured: mean over elements within 0.002, every element within 0.023; probes with a mean, such
    as v in {-1, 2}, bias the mean by 0.04 to 0.08)."""
    model = CorrelatedGaussian((2, 4, 4))
    stats = v3.compute_statistics(model, (2, 4, 4), "eps", -1.0, 1.0, grid_points=2, samples=128, chunk=64,
                                  dtype=torch.float64)
    for j, lam in enumerate(stats.lambdas.tolist()):
        want = 1 - torch.diagonal(model.jacobian(math.exp(-lam))).reshape(2, 4, 4)
        err = stats.l[j].double() - want
        assert abs(float(err.mean())) < 0.01, (lam, float(err.mean()))
        assert float(err.abs().max()) < 0.06


def test_trajectory_substeps_follow_the_exact_ode():
    """The states the statistics are taken on follow the probability-flow ODE: for N(mu, c^2 I) data
    x(sigma) = mu + (x0 - mu) sqrt((c^2 + sigma^2) / (c^2 + sigma0^2)); with 8 sub-steps per interval (and chunks
    smaller than the batch) the states at the grid points are far closer to it than with 1."""
    c = 0.4
    mu, model = _gaussian("eps", c)
    calls: list[tuple[float, torch.Tensor]] = []

    def denoise(x, s):
        if x.shape[0] == 3:  # the plain call of a finite-difference JVP: a state at a grid point
            calls.append((float(s[0]), x.clone()))
        return model(x, s)

    errors = []
    for substeps in (1, 8):
        calls.clear()
        stats = v3.compute_statistics(denoise, SHAPE, "eps", -2.0, 2.0, grid_points=4, samples=6, chunk=3,
                                      substeps=substeps, jvp="finite_difference", dtype=torch.float64)
        sig = torch.exp(-stats.lambdas)
        # each chunk's two JVPs each evaluate D at the state once: keep every other call
        states = [torch.cat([x for s, x in calls if abs(s - float(sg)) < 1e-12][::2]) for sg in sig]
        assert all(x.shape[0] == 6 for x in states)
        x0 = states[0]
        err = 0.0
        for sg, x in zip(sig.tolist(), states, strict=True):
            exact = mu + (x0 - mu) * math.sqrt((c * c + sg * sg) / (c * c + float(sig[0]) ** 2))
            err = max(err, float((x - exact).abs().max()))
        errors.append(err)
    assert errors[1] < 2e-3 and errors[1] < errors[0] / 20, errors


def test_compute_statistics_rejects_bad_settings_and_defaults_to_seed_zero():
    """grid_points >= 2, samples >= 2, chunk >= 1, substeps >= 1, an increasing range and a known JVP mode are
    required; without a seed the statistics are those of seed 0 (the node's default)."""
    mu, model = _gaussian("eps")
    mix = MixtureDenoiser(make_mixture(SHAPE, components=3, seed=2), kind="eps")

    def run(**kw):
        opts = {"grid_points": 2, "samples": 4, "chunk": 4, "dtype": torch.float64, **kw}
        return v3.compute_statistics(lambda x, s: mix(x, s), SHAPE, "eps", -1.0, 1.0, **opts)

    for bad in ({"grid_points": 1}, {"samples": 1}, {"chunk": 0}, {"substeps": 0}):
        with pytest.raises(ValueError, match="required"):
            run(**bad)
    with pytest.raises(ValueError, match="increase"):
        v3.compute_statistics(lambda x, s: mix(x, s), SHAPE, "eps", 1.0, 1.0)
    with pytest.raises(ValueError, match="jvp mode"):
        run(jvp="backward")
    default, zero, other = run(), run(seed=0), run(seed=5)
    for name in ("l", "s", "b"):
        torch.testing.assert_close(getattr(default, name), getattr(zero, name), rtol=0, atol=0)
    assert not torch.equal(default.l, other.l)
