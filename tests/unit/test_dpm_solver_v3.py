"""DPM-Solver-v3 on exact-score Gaussian mixtures: reduction to DPM-Solver++, the statistics, accuracy, order."""

from __future__ import annotations

import math

import pytest
import torch

from preprint.samplers import dpm_solver_v3 as v3
from preprint.samplers.dpm_solver_pp import sample_dpmpp_multistep
from preprint.utils.gaussian_mixture import GaussianMixture, MixtureDenoiser

from .conftest import EVENT_SHAPE, get_problem, observed_order

EPS_RANGE = (-math.log(14.6), -math.log(0.03))  # the Karras schedule of the unit problems
FLOW_RANGE = (math.log(0.02 / 0.98), math.log(0.995 / 0.005))
_STATS: dict = {}


def stats_for(kind: str, cfg: float, **kw) -> v3.Statistics:
    key = (kind, cfg, tuple(sorted(kw.items())))
    if key not in _STATS:
        problem = get_problem(kind, cfg)
        lo, hi = EPS_RANGE if kind == "eps" else FLOW_RANGE
        options = {"grid_points": 40, "samples": 64, "chunk": 64, "seed": 0, "dtype": torch.float64, **kw}
        _STATS[key] = v3.compute_statistics(lambda x, s: problem.model(x, s), EVENT_SHAPE, kind, lo, hi, **options)
    return _STATS[key]


def _v3(problem, steps, **kw):
    sig = problem.sigmas(steps)
    x = v3.sample_dpm_solver_v3(problem.model, problem.x_start.clone(), sig, disable=True,
                                parameterisation=problem.kind, **kw)
    return problem.error(x, sig), x


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [5, 12])
def test_degenerate_statistics_are_dpm_solver_pp_exactly(kind, order, steps):
    """l = 1, s = b = 0 with the corrector off is the pack's DPM-Solver++ multistep of the same order (float64)."""
    problem = get_problem(kind, 7.5 if kind == "eps" else 1.0)
    sig = problem.sigmas(steps)
    stats = v3.Statistics.degenerate(EVENT_SHAPE, -8.0, 8.0, points=33)  # grid points inside steps: many segments
    got = v3.sample_dpm_solver_v3(problem.model, problem.x_start.clone(), sig, disable=True, statistics=stats,
                                  order=order, corrector=False, parameterisation=kind, second_order="dpmsolver")
    want = sample_dpmpp_multistep(problem.model, problem.x_start.clone(), sig, disable=True, order=order,
                                  parameterisation=kind, lower_order_final=True)
    assert float((got - want).abs().max()) < 1e-12


def test_taylor_rule_is_the_exact_integral_of_the_linear_interpolant():
    """Order 2, Taylor rule, degenerate statistics: x_t = (s_t/s_s) x - a_t phi_1 m0 + a_t h phi_2 slope."""
    problem = get_problem("eps", 1.0)
    sig = torch.tensor([14.6, 3.0, 0.7], dtype=torch.float64)
    got = v3.sample_dpm_solver_v3(problem.model, problem.x_start.clone(), sig, disable=True, order=2,
                                  corrector=False, lower_order_final=False, second_order="taylor")
    x0 = problem.x_start.clone()
    m0 = problem.model(x0, sig[0])
    x1 = (sig[1] / sig[0]) * x0 - torch.expm1(-torch.log(sig[0] / sig[1])) * m0
    m1 = problem.model(x1, sig[1])
    lam = -torch.log(sig)
    h = lam[2] - lam[1]
    phi1 = torch.expm1(-h)
    want = (sig[2] / sig[1]) * x1 - phi1 * m1 + (phi1 / h + 1) * h * (m1 - m0) / (lam[1] - lam[0])
    assert float((got - want).abs().max()) < 1e-12


def test_statistics_of_a_single_gaussian_are_its_known_jacobian():
    """For data N(mu, c^2 I) the denoiser's Jacobian is c^2 / (c^2 + sigma^2) I, so Eq. 10 gives
    l = sigma^2 / (c^2 + sigma^2) exactly; f = -l mu is the same for every sample, so s = 0 and b = f' = -l' mu
    with l' = -2 l (1 - l) (up to the grid difference that l' is taken by: h = 0.1, interior points)."""
    mu = torch.randn((1, *EVENT_SHAPE), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c = 0.4
    model = MixtureDenoiser(GaussianMixture(mu, torch.tensor([c], dtype=torch.float64), torch.ones(1).double()))
    stats = v3.compute_statistics(lambda x, s: model(x, s), EVENT_SHAPE, "eps", -2.0, 2.0, grid_points=40,
                                  samples=8, chunk=3, dtype=torch.float64)
    sigma2 = torch.exp(-2 * stats.lambdas).reshape(-1, 1, 1, 1)
    l_true = sigma2 / (c * c + sigma2)
    torch.testing.assert_close(stats.l.double(), l_true.expand_as(stats.l), atol=1e-6, rtol=0)
    assert float(stats.s.abs().max()) < 1e-6
    b_true = (2 * l_true * (1 - l_true) * mu)[1:-1]
    torch.testing.assert_close(stats.b.double()[1:-1], b_true, atol=5e-3, rtol=0)


@pytest.mark.parametrize("kind,cfg", [("eps", 7.5), ("flow", 1.0)])
def test_statistics_are_finite_and_stable_across_seeds(kind, cfg):
    a = stats_for(kind, cfg)
    b = stats_for(kind, cfg, seed=1)
    for t in (a.l, a.s, a.b):
        assert torch.isfinite(t).all()
    # the clean end has J_D ~ I (l ~ 0), the noisy end J_D ~ 0 (l ~ 1)
    assert float(a.l[0].mean()) > 0.85 and float(a.l[-1].mean()) < 0.3
    # 64 samples per point: another seed moves the mean statistics little
    assert float((a.l - b.l).abs().mean()) < 0.03
    assert float((a.s - b.s).abs().mean()) < 0.25 * float(a.s.abs().mean()) + 0.05


def test_chunking_gives_the_same_statistics():
    problem = get_problem("eps", 7.5)
    kw = {"grid_points": 6, "samples": 10, "seed": 2, "dtype": torch.float64}
    whole = v3.compute_statistics(lambda x, s: problem.model(x, s), EVENT_SHAPE, "eps", *EPS_RANGE, chunk=10, **kw)
    parts = v3.compute_statistics(lambda x, s: problem.model(x, s), EVENT_SHAPE, "eps", *EPS_RANGE, chunk=3, **kw)
    for name in ("l", "s", "b"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name), atol=1e-5, rtol=1e-5)


def test_finite_differences_agree_with_forward_mode():
    problem = get_problem("eps", 7.5)
    kw = {"grid_points": 6, "samples": 16, "chunk": 16, "seed": 2, "dtype": torch.float64}
    fwd = v3.compute_statistics(lambda x, s: problem.model(x, s), EVENT_SHAPE, "eps", *EPS_RANGE, **kw)
    fd = v3.compute_statistics(lambda x, s: problem.model(x, s), EVENT_SHAPE, "eps", *EPS_RANGE,
                               jvp="finite_difference", **kw)
    torch.testing.assert_close(fd.l, fwd.l, atol=2e-3, rtol=0)
    # s divides by the variance of f over 16 samples: compare it on average (one element of 1792 differs by 0.09)
    assert float((fd.s - fwd.s).abs().mean()) < 0.02 * float(fwd.s.abs().mean())


def test_discrete_timesteps_are_not_differentiable_for_forward_mode():
    log_sigmas = torch.linspace(-3.5, 2.7, 1000)

    def discrete(sigma):  # SD1.5's model_sampling.timestep: the nearest training timestep
        return (sigma.log() - log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape).to(sigma)

    sigma = torch.tensor([0.5, 3.0])
    assert not v3.timestep_is_differentiable(discrete, sigma)
    assert not v3.timestep_is_differentiable(lambda s: s.detach() * 1000, sigma)
    assert v3.timestep_is_differentiable(lambda s: s * 1000, sigma)  # flow models: t = sigma * multiplier


@pytest.mark.parametrize("cfg", [1.0, 7.5])
@pytest.mark.parametrize("steps", [5, 6, 8, 10])
def test_calibrated_v3_beats_dpm_solver_pp_at_few_steps(cfg, steps):
    """Measured (eps, Karras): cfg 1: v3 0.0098 / 0.0073 / 0.0036 / 0.0024 vs 2M 0.037 / 0.016 / 0.0062 / 0.0077 at
    5 / 6 / 8 / 10 steps; cfg 7.5: v3 0.016 / 0.0083 / 0.0051 / 0.0037 vs 2M 1.34 / 0.69 / 0.025 / 0.017."""
    problem = get_problem("eps", cfg)
    stats = stats_for("eps", cfg)
    err_v3, _ = _v3(problem, steps, statistics=stats, order=2, corrector=True, second_order="dpmsolver")
    sig = problem.sigmas(steps)
    pp = sample_dpmpp_multistep(problem.model, problem.x_start.clone(), sig, disable=True, order=2)
    err_pp = problem.error(pp, sig)
    assert err_v3 < 0.8 * err_pp, (err_v3, err_pp)


def test_statistics_matter_with_the_corrector_too():
    """The same solver with degenerate statistics (UniC-like corrector only) is far worse at CFG 7.5."""
    problem = get_problem("eps", 7.5)
    calibrated, _ = _v3(problem, 6, statistics=stats_for("eps", 7.5), second_order="dpmsolver")
    plain, _ = _v3(problem, 6, statistics=None, second_order="dpmsolver")
    assert calibrated < 0.1 * plain, (calibrated, plain)


def test_convergence_order_with_smooth_statistics():
    """Order 2 without corrector on log-SNR-uniform steps, with non-trivial statistics smooth in lambda: order ~2."""
    problem = get_problem("eps", 1.0, schedule="uniform")
    base = v3.Statistics.degenerate(EVENT_SHAPE, *EPS_RANGE, points=9)
    ramp = torch.linspace(0, 1, 9, dtype=torch.float32).reshape(-1, 1, 1, 1)
    stats = v3.Statistics(base.lambdas, 1.0 - 0.6 * ramp.expand_as(base.l), -0.3 * ramp.expand_as(base.l),
                          0.1 * torch.ones_like(base.b))
    steps = [20, 40, 80]
    errors = [_v3(problem, n, statistics=stats, order=2, corrector=False, lower_order_final=False)[0]
              for n in steps]
    orders = observed_order(errors, steps)
    assert min(orders) > 1.7, (errors, orders)


def test_convergence_with_computed_statistics():
    """With the sampled statistics (64 samples: l, s, b jump between grid points, so g has kinks the multistep
    derivative estimates step over) convergence is irregular; measured 0.0043 / 0.0013 / 0.0011 / 0.0004 at
    10 / 20 / 40 / 80 steps, an overall order of about 1.1."""
    problem = get_problem("eps", 1.0, schedule="uniform")
    stats = stats_for("eps", 1.0)
    errors = [_v3(problem, n, statistics=stats, order=2, corrector=False, lower_order_final=False)[0]
              for n in (10, 80)]
    assert errors[1] < errors[0] / 8, errors


def test_flow_model_from_sigma_one_is_finite_and_calibrated_helps_with_corrector():
    problem = get_problem("flow", 1.0)
    stats = stats_for("flow", 1.0)
    err, x = _v3(problem, 8, statistics=stats, second_order="dpmsolver")
    assert torch.isfinite(x).all()
    sig = problem.sigmas(8)
    pp = sample_dpmpp_multistep(problem.model, problem.x_start.clone(), sig, disable=True, order=2,
                                parameterisation="flow")
    assert err < problem.error(pp, sig), (err, problem.error(pp, sig))


def test_bad_input_errors():
    problem = get_problem("eps", 1.0)
    sig = problem.sigmas(4)
    with pytest.raises(ValueError, match="order"):
        v3.sample_dpm_solver_v3(problem.model, problem.x_start.clone(), sig, order=4, disable=True)
    wrong = v3.Statistics.degenerate((4, 16, 16))
    with pytest.raises(ValueError, match="shape"):
        v3.sample_dpm_solver_v3(problem.model, problem.x_start.clone(), sig, statistics=wrong, disable=True)
    bad = v3.Statistics.degenerate(EVENT_SHAPE)
    with pytest.raises(ValueError, match="NaN"):
        v3.Statistics(bad.lambdas, bad.l * float("nan"), bad.s, bad.b)
