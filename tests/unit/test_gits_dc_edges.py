"""GITS search edges and DC-Solver (UniPC-bh2) against an independent reference, with CPR's edge cases.

The UniPC reference recomputes each step from arXiv:2302.04867 (Alg. 2/3, B(h) = e^{-h} - 1) in Python floats:
predictor UniP with rho_p = 1/2 at order 2, corrector UniC with rho_c = 1/2 at order 1 and, at order 2, the 2 x 2
order conditions solved by hand; warm-up and lower-order final steps as ComfyUI's uni_pc.
"""

from __future__ import annotations

import math

import pytest
import torch

from preprint.samplers.dc_cpr import SearchedSetting, fit_cpr, predict_ratios
from preprint.samplers.dc_solver import FINAL_SIGMA, dc_unipc, search_ratios
from preprint.samplers.gits import CostAccumulator, cost_matrix, dp_search, ipndm_trajectory, search_table

TOL = {"rtol": 0, "atol": 1e-10}
SHAPE = (3, 2, 4, 4)


class Denoiser:
    """A smooth, nonlinear, per-row data prediction; records whether autograd was on at each call."""

    def __init__(self) -> None:
        self.grad_modes: list[bool] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.grad_modes.append(torch.is_grad_enabled())
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return 1.7 * torch.tanh(0.9 * x / (1.0 + s)) + 0.3 * torch.cos(3.0 * s) * x / (1.0 + s * s)


def _x(sigma0: float, seed: int = 0, shape=SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sigma0 * torch.randn(shape, generator=g, dtype=torch.float64)


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---- GITS ------------------------------------------------------------------------------------------------------

def _four_point_cost() -> torch.Tensor:
    """Paths 0 -> 1 -> 3 (cost 1 + coeff) and 0 -> 2 -> 3 (1.5 + 0.5 coeff): 2.15 vs 2.075 at coeff 1.15."""
    inf = math.inf
    return _t([[inf, 1.0, 1.5, 9.0], [inf, inf, 5.0, 1.0], [inf, inf, inf, 0.5], [inf, inf, inf, inf]])


def _flip_at(t: float) -> torch.Tensor:
    """Paths 0 -> 1 -> 3 (1 + coeff) and 0 -> 2 -> 3 (1 + t / 2 + coeff / 2): equal at coeff = t."""
    inf = math.inf
    return _t([[inf, 1.0, 1.0 + 0.5 * t, 9.0], [inf, inf, 5.0, 1.0], [inf, inf, inf, 0.5], [inf, inf, inf, inf]])


def test_dp_search_default_coeff_is_the_official_1_15():
    """The default coefficient lies between 1.145 and 1.155: above the first crossing, below the second."""
    assert dp_search(_flip_at(1.145), 2) == [0, 2, 3] and dp_search(_flip_at(1.145), 2, 1.14) == [0, 1, 3]
    assert dp_search(_flip_at(1.155), 2) == [0, 1, 3] and dp_search(_flip_at(1.155), 2, 1.16) == [0, 2, 3]
    cost = _four_point_cost()
    assert dp_search(cost, 2, 1.15) == [0, 2, 3]
    assert dp_search(cost, 2) == [0, 2, 3]
    assert dp_search(cost, 2, 0.5) == [0, 1, 3]  # 1.5 vs 1.75: the weight decides
    assert dp_search(cost, 1) == [0, 3]
    assert dp_search(cost, 3) == [0, 1, 2, 3]


@pytest.mark.parametrize("steps", [0, -1, 4])
def test_dp_search_rejects_step_counts_outside_the_grid(steps):
    with pytest.raises(ValueError, match="steps must be between 1 and the 3 steps"):
        dp_search(_four_point_cost(), steps)


@pytest.mark.parametrize("coeff", [0.0, -1.0])
def test_dp_search_rejects_a_non_positive_coeff(coeff):
    with pytest.raises(ValueError, match="coeff must be > 0"):
        dp_search(_four_point_cost(), 2, coeff)


def _trajectory(batch: int, seed: int):
    sig = _t([8.0, 3.0, 1.2, 0.4, 0.1])
    g = torch.Generator().manual_seed(seed)
    states = torch.randn((len(sig), batch, 2, 3), generator=g, dtype=torch.float64)
    derivs = torch.randn((len(sig) - 1, batch, 2, 3), generator=g, dtype=torch.float64)
    return sig, states, derivs


@pytest.mark.parametrize("metric", ["dev", "l2"])
def test_cost_accumulator_is_the_sample_weighted_mean(metric):
    """One chunk gives exactly its cost matrix; chunks of 1 and 3 samples give the 4-sample batch's matrix."""
    sig, states, derivs = _trajectory(4, seed=1)
    upper = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    acc = CostAccumulator(sig, "eps", metric)
    acc.add(states[:, :1], derivs[:, :1])
    one = acc.table(1.15, "ipndm")
    assert acc.samples == 1
    torch.testing.assert_close(one.cost[upper], cost_matrix(states[:, :1], derivs[:, :1], sig, "eps", metric)[upper],
                               rtol=0, atol=1e-12)
    acc.add(states[:, 1:], derivs[:, 1:])
    assert acc.samples == 4
    both = acc.table(1.15, "ipndm")
    torch.testing.assert_close(both.cost[upper], cost_matrix(states, derivs, sig, "eps", metric)[upper],
                               rtol=0, atol=1e-12)
    assert both.coeff == 1.15 and both.metric == metric


def test_search_table_accepts_a_two_step_grid_and_rejects_one_step():
    model = Denoiser()
    fine = _t([6.0, 1.5, 0.2])
    table = search_table(model, _x(6.0, seed=2), fine)
    assert table.max_steps == 2
    torch.testing.assert_close(table.schedule(2), fine.float())
    torch.testing.assert_close(table.schedule(1), fine[[0, 2]].float())
    with pytest.raises(ValueError, match="at least 2 steps"):
        search_table(model, _x(6.0, seed=2), _t([6.0, 0.2]))


def test_teacher_trajectory_builds_no_autograd_graph():
    """The warm-up solves run under no_grad: the model sees autograd off even for an input that requires grad."""
    model = Denoiser()
    x = _x(6.0, seed=3).requires_grad_(True)
    states, derivs = ipndm_trajectory(model, x, _t([6.0, 2.0, 0.5, 0.0]))
    assert model.grad_modes and not any(model.grad_modes)
    assert states.shape[0] == 4 and derivs.shape[0] == 3
    assert not states.requires_grad and not derivs.requires_grad


# ---- DC-Solver: UniPC-bh2 reference ----------------------------------------------------------------------------

def _alpha(s: float, kind: str) -> float:
    return 1.0 - s if kind == "flow" else 1.0


def _lam(s: float, kind: str) -> float:
    a = _alpha(s, kind)
    return -math.inf if a == 0.0 else math.log(a / s)


def ref_unipc(model, x, sigmas, order, kind, lower_order_final=True, final_sigma=FINAL_SIGMA):
    """UniPC-bh2, orders 1 and 2, data prediction; a final sigma 0 becomes min(final_sigma, sigma_{N-1} / 2)."""
    call_sig = [float(v) for v in sigmas]
    sig = list(call_sig)
    steps = len(sig) - 1
    if sig[-1] == 0.0:
        sig[-1] = min(final_sigma, 0.5 * sig[-2])
    order = min(order, max(steps - 1, 1))  # ComfyUI's uni_pc: order min(order, steps - 1)
    lam = [_lam(s, kind) for s in sig]

    def data(xx, s):
        return model(xx, torch.full((xx.shape[0],), s, dtype=xx.dtype))

    m = data(x, call_sig[0])
    hist: list[torch.Tensor] = []
    for i in range(steps):
        hist = (hist + [m])[-order:]
        finite = 0
        while finite <= i and math.isfinite(lam[i - finite]):
            finite += 1
        k = min(order, i + 1, steps - i if lower_order_final else order, finite)
        k = max(k, 1)
        s, t = sig[i], sig[i + 1]
        h = lam[i + 1] - lam[i]
        b_h = math.exp(-h) - 1.0  # B(h) of bh2, also the first exponential-integrator weight
        a_t = _alpha(t, kind)
        m0 = hist[-1]
        base = (t / s) * x - a_t * b_h * m0
        if k == 1:
            x_pred = base
        else:
            r = (lam[i - 1] - lam[i]) / h
            d1 = (hist[-2] - m0) / r
            x_pred = base - a_t * b_h * 0.5 * d1
        if i + 1 == steps:
            x = x_pred
            break
        m = data(x_pred, call_sig[i + 1])
        if k == 1:
            x = base - a_t * b_h * 0.5 * (m - m0)
        else:
            hphi_2 = b_h / (-h) - 1.0
            hphi_3 = hphi_2 / (-h) - 0.5
            g1, g2 = hphi_2 / b_h, 2.0 * hphi_3 / b_h
            rho0 = (g1 - g2) / (1.0 - r)  # [[1, 1], [r, 1]] (rho0, rho1) = (g1, g2)
            rho1 = g1 - rho0
            x = base - a_t * b_h * (rho0 * d1 + rho1 * (m - m0))
    return x / _alpha(sig[-1], kind)


DC_CASES = [
    ("eps", [14.6, 5.0, 1.6, 0.5, 0.12, 0.0]),
    ("eps", [9.0, 3.1, 0.9, 0.2]),  # ends above 0: stops there
    ("eps", [5.0, 0.4, 0.0015, 0.0]),  # last sigma below 2 * final_sigma: the 0 becomes half of it
    ("eps", [10.0, 2.0, 0.3, 0.0]),  # three steps: order 2 stays 2
    ("flow", [0.96, 0.8, 0.55, 0.3, 0.1, 0.0]),
    ("flow", [1.0, 0.85, 0.6, 0.33, 0.12, 0.0]),  # from sigma 1: lambda = -inf never enters a difference
    ("flow", [1.0, 0.7, 0.3, 0.0]),
]


@pytest.mark.parametrize("kind,sig", DC_CASES)
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_plain_dc_solver_is_unipc_bh2(kind, sig, order, lower_order_final):
    """No ratios: UniP + UniC (bh2) with ComfyUI's order schedule, final sigma and return of x / alpha."""
    model = Denoiser()
    x = _x(1.0 if kind == "flow" else sig[0], seed=4)
    got = dc_unipc(model, x.clone(), _t(sig), order=order, parameterisation=kind,
                   lower_order_final=lower_order_final)
    want = ref_unipc(model, x.clone(), sig, order, kind, lower_order_final)
    torch.testing.assert_close(got, want, **TOL)


def test_final_zero_is_replaced_by_final_sigma_or_half_the_last_sigma():
    model = Denoiser()
    x = _x(5.0, seed=5)

    def run(values):
        return dc_unipc(model, x.clone(), _t(values), order=2)

    assert torch.equal(run([5.0, 0.4, 0.0015, 0.0]), run([5.0, 0.4, 0.0015, 0.00075]))
    assert torch.equal(run([5.0, 0.4, 0.05, 0.0]), run([5.0, 0.4, 0.05, FINAL_SIGMA]))


@pytest.mark.parametrize("order", [0, 4])
def test_dc_solver_rejects_orders_outside_one_to_three(order):
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        dc_unipc(Denoiser(), _x(5.0), _t([5.0, 1.0, 0.0]), order=order)


def test_search_reports_progress_once_per_pass():
    """iterations updates plus the scoring pass: progress_fn(1 .. iterations + 1, iterations + 1)."""
    model = Denoiser()
    sig = _t([8.0, 3.0, 1.0, 0.3, 0.08, 0.0])
    noise = _x(8.0, seed=6, shape=(2, 1, 2, 2))
    ref = dc_unipc(model, noise, _t([float(v) for v in torch.linspace(8.0, 0.08, 30)] + [0.0]))
    seen: list[tuple[int, int]] = []
    result = search_ratios(model, noise, sig, ref, iterations=2, progress_fn=lambda a, b: seen.append((a, b)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert len(result.losses) == 3


# ---- CPR -------------------------------------------------------------------------------------------------------

def test_cpr_fits_a_step_constant_cascade_at_degree_zero():
    """step_degree 0: rho constant over the steps of a setting, quadratic in CFG and NFE; the fit recovers it."""
    g = torch.Generator().manual_seed(7)
    e = torch.randn((1, 3, 3), generator=g, dtype=torch.float64)
    settings = []
    for steps in (5, 7, 10):
        used = torch.arange(steps) >= 2
        for cfg in (3.0, 6.0, 9.0):
            settings.append(SearchedSetting(steps, cfg, predict_ratios(e, steps, cfg), used))
    fit = fit_cpr(settings, step_degree=0)
    assert fit.coefficients.shape == (1, 3, 3)
    torch.testing.assert_close(fit.coefficients, e, rtol=0, atol=1e-8)


def test_cpr_predicts_a_single_step():
    """steps = 1: one ratio, at x = 0, i.e. c_0 = sum_jl e_0jl g^j n^l."""
    e = torch.arange(18, dtype=torch.float64).reshape(2, 3, 3) / 10.0
    g, n = 6.0 / 12.0, 1 / 50.0
    want = sum(float(e[0, j, m]) * g ** j * n ** m for j in range(3) for m in range(3))
    got = predict_ratios(e, 1, 6.0)
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(want, rel=1e-14)
