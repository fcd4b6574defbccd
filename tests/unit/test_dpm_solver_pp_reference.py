"""DPM-Solver++ against an independent reference written from the paper (Lu et al., arXiv:2211.01095).

Every reference here recomputes the update from scratch in Python floats (the lambda steps, the weights) with a
deterministic, nonlinear float64 denoiser, so any change in an update's arithmetic shows at far above the 1e-10
tolerance: 2M is Algorithm 2 (``D = (1 + 1/2r) m0 - (1/2r) m1``); 3M the official third-order multistep rule in
Newton divided differences; 2S is Algorithm 1 with r1 = 1/2 and 3S the official third-order singlestep rule
(r1 = 1/3, r2 = 2/3). The last section measures the local order of a 3M step against the exact exponential
integral of the quadratic interpolant (Gauss-Legendre quadrature).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from preprint.samplers import dpm_solver_pp as pp
from preprint.samplers.dpm_solver_pp import (
    effective_order,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_dpmpp_multistep,
    sample_dpmpp_singlestep,
)

TOL = {"rtol": 0, "atol": 1e-10}
SHAPE = (3, 2, 4, 4)


class Denoiser:
    """A smooth, nonlinear, per-row data prediction; records whether autograd was on at each call."""

    def __init__(self, scale: float = 1.7) -> None:
        self.scale = scale
        self.grad_modes: list[bool] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.grad_modes.append(torch.is_grad_enabled())
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return self.scale * torch.tanh(0.9 * x / (1.0 + s)) + 0.3 * torch.cos(3.0 * s) * x / (1.0 + s * s)


def _x(sigma0: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sigma0 * torch.randn(SHAPE, generator=g, dtype=torch.float64)


# ---- the reference -------------------------------------------------------------------------------------------

def _alpha(s: float, kind: str) -> float:
    return 1.0 - s if kind == "flow" else 1.0


def _lam(s: float, kind: str) -> float:
    """Half log-SNR log(alpha / sigma): +inf at sigma 0, -inf at a flow model's sigma 1."""
    if s == 0.0:
        return math.inf
    a = _alpha(s, kind)
    return -math.inf if a == 0.0 else math.log(a / s)


def _sigma_at(lam: float, kind: str) -> float:
    return 1.0 / (1.0 + math.exp(lam)) if kind == "flow" else math.exp(-lam)


def _call(model, x: torch.Tensor, s: float) -> torch.Tensor:
    return model(x, torch.full((x.shape[0],), s, dtype=x.dtype))


def _ddim(x, m0, s, t, kind):
    """Eq. 9 with k = 1: x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) m0; x_t = m0 at sigma_t = 0."""
    if t == 0.0:
        return m0
    h = _lam(t, kind) - _lam(s, kind)
    return (t / s) * x - _alpha(t, kind) * (math.exp(-h) - 1.0) * m0


_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(16)


def _exp_integral_of_interpolant(us: list[float], ms: list[torch.Tensor], h: float) -> torch.Tensor:
    """int_0^h e^{u - h} P(u) du, P the Lagrange polynomial through (us[k], ms[k]) (u = lambda - lambda_s)."""
    out = torch.zeros_like(ms[0])
    for node, weight in zip(_NODES, _WEIGHTS, strict=True):
        u = 0.5 * h * (float(node) + 1.0)
        basis = [math.prod((u - uj) / (ui - uj) for j, uj in enumerate(us) if j != i) for i, ui in enumerate(us)]
        out = out + 0.5 * h * float(weight) * math.exp(u - h) * sum(b * m for b, m in zip(basis, ms, strict=True))
    return out


def ref_multistep(model, x, sigmas, order, kind, lower_order_final, transform=None):
    """DPM-Solver++ multistep; returns the end state and the order of every step."""
    sig = [float(v) for v in sigmas]
    n = len(sig) - 1
    hist: list[tuple[float, torch.Tensor]] = []  # (lambda, data prediction) with finite lambda only
    used = []
    for i in range(n):
        s, t = sig[i], sig[i + 1]
        m = _call(model, x, s)
        if transform is not None:
            m = transform(m)
        lam_s = _lam(s, kind)
        hist = (hist + [(lam_s, m)])[-order:] if math.isfinite(lam_s) else []
        k = max(1, min(order, len(hist), (n - i) if (lower_order_final and n < 10) else order))
        used.append(k)
        if t == 0.0 or k == 1:
            x = _ddim(x, m, s, t, kind)
            continue
        h = _lam(t, kind) - lam_s
        a_t = _alpha(t, kind)
        if k == 2:  # Algorithm 2
            r = (lam_s - hist[-2][0]) / h
            d = (1.0 + 0.5 / r) * m - (0.5 / r) * hist[-2][1]
            x = (t / s) * x - a_t * (math.exp(-h) - 1.0) * d
        else:  # the official third-order multistep rule, in Newton divided differences of the step-scaled lambda
            (lam_2, m2), (lam_1, m1) = hist[-3], hist[-2]
            r0, r1 = (lam_s - lam_1) / h, (lam_1 - lam_2) / h
            d1_0, d1_1 = (m - m1) / r0, (m1 - m2) / r1
            d2 = (d1_0 - d1_1) / (r0 + r1)
            d1 = d1_0 + r0 * d2
            phi_1 = math.exp(-h) - 1.0
            phi_2 = (phi_1 + h) / h
            phi_3 = (phi_1 + h - 0.5 * h * h) / (h * h)
            x = (t / s) * x - a_t * phi_1 * m + a_t * phi_2 * d1 - a_t * phi_3 * d2
    return x, used


def ref_singlestep(model, x, sigmas, order, kind, transform=None):
    """DPM-Solver-2S (Algorithm 1, r1 = 1/2) / 3S (r1 = 1/3, r2 = 2/3); DDIM where a lambda is not finite."""
    sig = [float(v) for v in sigmas]

    def data(xx, s):
        out = _call(model, xx, s)
        return out if transform is None else transform(out)

    for i in range(len(sig) - 1):
        s, t = sig[i], sig[i + 1]
        m0 = data(x, s)
        lam_s, lam_t = _lam(s, kind), _lam(t, kind)
        if order == 1 or not (math.isfinite(lam_s) and math.isfinite(lam_t)):
            x = _ddim(x, m0, s, t, kind)
            continue
        h = lam_t - lam_s
        a_t = _alpha(t, kind)
        if order == 2:
            r1 = 0.5
            s1 = _sigma_at(lam_s + r1 * h, kind)
            u = (s1 / s) * x - _alpha(s1, kind) * (math.exp(-r1 * h) - 1.0) * m0
            d = (1.0 - 0.5 / r1) * m0 + (0.5 / r1) * data(u, s1)  # Algorithm 1's D_i (= m1 at r1 = 1/2)
            x = (t / s) * x - a_t * (math.exp(-h) - 1.0) * d
            continue
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        s1, s2 = _sigma_at(lam_s + r1 * h, kind), _sigma_at(lam_s + r2 * h, kind)
        u1 = (s1 / s) * x - _alpha(s1, kind) * (math.exp(-r1 * h) - 1.0) * m0
        m1 = data(u1, s1)
        phi_22 = (math.exp(-r2 * h) - 1.0) / (r2 * h) + 1.0
        u2 = (s2 / s) * x - _alpha(s2, kind) * (math.exp(-r2 * h) - 1.0) * m0 \
            + (r2 / r1) * _alpha(s2, kind) * phi_22 * (m1 - m0)
        m2 = data(u2, s2)
        phi_2 = (math.exp(-h) - 1.0 + h) / h
        x = (t / s) * x - a_t * (math.exp(-h) - 1.0) * m0 + (1.0 / r2) * a_t * phi_2 * (m2 - m0)
    return x


def _threshold(x0: torch.Tensor, p: float, floor: float = 1.0, ceiling: float = math.inf) -> torch.Tensor:
    """Imagen / official DPM-Solver++ thresholding: s = max(p-quantile of |x0| per sample, floor), at most the
    ceiling (diffusers' sample_max_value); clip, divide."""
    q = torch.quantile(x0.abs().flatten(1).float(), p, dim=1).to(x0.dtype)  # taken in float32, as the module does
    s = torch.where(q > floor, q, torch.full_like(q, floor))
    s = torch.where(s < ceiling, s, torch.full_like(s, ceiling)).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


# ---- sigma lists ---------------------------------------------------------------------------------------------

EPS_TO_ZERO = [14.6, 6.1, 2.9, 1.3, 0.62, 0.27, 0.09, 0.0]
EPS_ABOVE_ZERO = [9.0, 4.4, 2.0, 0.85, 0.33, 0.12]
FLOW_TO_ZERO = [0.97, 0.9, 0.78, 0.6, 0.41, 0.22, 0.08, 0.0]
FLOW_ABOVE_ZERO = [0.95, 0.83, 0.66, 0.45, 0.27, 0.1]
FLOW_FROM_ONE = [1.0, 0.93, 0.8, 0.62, 0.43, 0.25, 0.1, 0.0]
CASES = [("eps", EPS_TO_ZERO), ("eps", EPS_ABOVE_ZERO), ("flow", FLOW_TO_ZERO), ("flow", FLOW_ABOVE_ZERO)]
IDS = ["eps-to-0", "eps-above-0", "flow-to-0", "flow-above-0"]


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---- multistep -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,sig", CASES, ids=IDS)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("lower_order_final", [False, True])
def test_multistep_matches_the_paper_update(kind, sig, order, lower_order_final):
    """2M is Algorithm 2, 3M the official third-order rule, order 1 DDIM; warm-up from
    order 1, lower-order final steps on short lists, and the step to sigma 0 returns the data prediction."""
    model = Denoiser()
    x = _x(sig[0])
    got = sample_dpmpp_multistep(model, x.clone(), _t(sig), disable=True, order=order, parameterisation=kind,
                                 lower_order_final=lower_order_final)
    want, _ = ref_multistep(model, x.clone(), sig, order, kind, lower_order_final)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("n", [6, 9, 10, 12])
def test_3m_lowers_the_final_orders_only_below_ten_steps(n):
    """Official rule: with fewer than 10 steps the last steps of 3M drop to order steps - i; at 10 and more the
    order stays 3 to the end (a list ending above 0, so the last step's order shows in the result)."""
    sig = [float(v) for v in torch.exp(torch.linspace(math.log(12.0), math.log(0.05), n + 1, dtype=torch.float64))]
    model = Denoiser()
    x = _x(sig[0], seed=1)
    want, used = ref_multistep(model, x.clone(), sig, 3, "eps", True)
    assert used == ([1, 2, 3] + [3] * (n - 5) + [2, 1] if n < 10 else [1, 2] + [3] * (n - 2)), used
    got = sample_dpmpp_multistep(model, x.clone(), _t(sig), disable=True, order=3, lower_order_final=True)
    torch.testing.assert_close(got, want, **TOL)
    # the 3M entry point lowers the final orders by default; the 2M one does not
    torch.testing.assert_close(sample_dpmpp_3m(model, x.clone(), _t(sig), disable=True), want, **TOL)
    want_2m, _ = ref_multistep(model, x.clone(), sig, 2, "eps", False)
    torch.testing.assert_close(sample_dpmpp_2m(model, x.clone(), _t(sig), disable=True), want_2m, **TOL)


def test_effective_order_table():
    """Hand-computed orders: the history caps the warm-up, and only runs of fewer than 10 steps lower the end."""
    assert [effective_order(i, 5, 3, min(i + 1, 3), True) for i in range(5)] == [1, 2, 3, 2, 1]
    assert [effective_order(i, 9, 3, min(i + 1, 3), True) for i in range(9)] == [1, 2, 3, 3, 3, 3, 3, 2, 1]
    assert [effective_order(i, 10, 3, min(i + 1, 3), True) for i in range(10)] == [1, 2] + [3] * 8
    assert [effective_order(i, 5, 3, min(i + 1, 3), False) for i in range(5)] == [1, 2, 3, 3, 3]
    assert [effective_order(i, 4, 2, min(i + 1, 2), True) for i in range(4)] == [1, 2, 2, 1]
    assert effective_order(0, 1, 3, 0, True) == 1  # never below first order


@pytest.mark.parametrize("order,expected", [(2, [1, 1, 2, 2, 2, 2, 1]), (3, [1, 1, 2, 3, 3, 2, 1])])
def test_flow_from_sigma_one_in_log_snr(order, expected):
    """From a flow model's sigma 1 (lambda = -inf) the first step is DDIM, x1 = sigma1 x + (1 - sigma1) D, and
    the -inf entry never enters a difference: orders 1, 1, 2, 3 as the finite history grows."""
    model = Denoiser()
    x = _x(1.0, seed=2)
    want, used = ref_multistep(model, x.clone(), FLOW_FROM_ONE, order, "flow", True)
    assert used == expected
    got = sample_dpmpp_multistep(model, x.clone(), _t(FLOW_FROM_ONE), disable=True, order=order,
                                 parameterisation="flow", flow_lambda="log_snr")
    torch.testing.assert_close(got, want, **TOL)
    first = sample_dpmpp_multistep(model, x.clone(), _t(FLOW_FROM_ONE[:2]), disable=True, order=order,
                                   parameterisation="flow")
    s1 = FLOW_FROM_ONE[1]
    torch.testing.assert_close(first, s1 * x + (1.0 - s1) * _call(model, x, 1.0), **TOL)


def test_flow_lambda_sigma_steps_a_flow_model_in_minus_log_sigma():
    """flow_lambda="sigma": alpha = 1 and lambda = -log sigma for a flow model (ComfyUI's formula)."""
    model = Denoiser()
    x = _x(1.0, seed=3)
    want, _ = ref_multistep(model, x.clone(), FLOW_FROM_ONE, 3, "eps", True)
    got = sample_dpmpp_multistep(model, x.clone(), _t(FLOW_FROM_ONE), disable=True, order=3,
                                 parameterisation="flow", flow_lambda="sigma")
    torch.testing.assert_close(got, want, **TOL)


# ---- singlestep ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,sig", CASES, ids=IDS)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_matches_the_paper_update(kind, sig, order):
    """Order 1 is DDIM, 2S Algorithm 1 (r1 = 1/2), 3S the official rule (r1 = 1/3, r2 = 2/3), integrated in the
    model's own lambda (flow_lambda="log_snr"); the step to sigma 0 is the data prediction."""
    model = Denoiser()
    x = _x(sig[0], seed=4)
    got = sample_dpmpp_singlestep(model, x.clone(), _t(sig), disable=True, order=order, parameterisation=kind,
                                  flow_lambda="log_snr")
    torch.testing.assert_close(got, ref_singlestep(model, x.clone(), sig, order, kind), **TOL)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_flow_from_sigma_one(order):
    """log_snr: the sigma-1 step is DDIM (no intermediate point at lambda = -inf); auto steps in -log sigma."""
    model = Denoiser()
    x = _x(1.0, seed=5)
    got = sample_dpmpp_singlestep(model, x.clone(), _t(FLOW_FROM_ONE), disable=True, order=order,
                                  parameterisation="flow", flow_lambda="log_snr")
    torch.testing.assert_close(got, ref_singlestep(model, x.clone(), FLOW_FROM_ONE, order, "flow"), **TOL)
    auto = sample_dpmpp_singlestep(model, x.clone(), _t(FLOW_FROM_ONE), disable=True, order=order,
                                   parameterisation="flow")
    torch.testing.assert_close(auto, ref_singlestep(model, x.clone(), FLOW_FROM_ONE, order, "eps"), **TOL)


# ---- thresholding, batch rows, autograd ------------------------------------------------------------------------

def test_thresholded_multistep_and_singlestep_use_the_default_floor_one():
    """With thresholding on and no floor given, s = max(quantile, 1) (Imagen's rule): the predictions here have
    0.9-quantiles between 1 and 2, so a different floor would change every step."""
    model = Denoiser(scale=2.2)
    sig = EPS_TO_ZERO
    x = _x(sig[0], seed=6)
    q = torch.quantile(_call(model, x, sig[0]).abs().flatten(1), 0.9, dim=1)
    assert bool(((q > 1.05) & (q < 1.95)).all()), q
    p = 0.9
    got = sample_dpmpp_multistep(model, x.clone(), _t(sig), disable=True, order=3, threshold_percentile=p)
    want, _ = ref_multistep(model, x.clone(), sig, 3, "eps", True, transform=lambda m: _threshold(m, p))
    torch.testing.assert_close(got, want, **TOL)
    plain, _ = ref_multistep(model, x.clone(), sig, 3, "eps", True)
    assert float((want - plain).abs().max()) > 0.1  # the thresholding acts
    got_s = sample_dpmpp_singlestep(model, x.clone(), _t(sig), disable=True, order=2, threshold_percentile=p)
    want_s = ref_singlestep(model, x.clone(), sig, 2, "eps", transform=lambda m: _threshold(m, p))
    torch.testing.assert_close(got_s, want_s, **TOL)
    # an explicit floor and ceiling reach the thresholding too
    got_f = sample_dpmpp_multistep(model, x.clone(), _t(sig), disable=True, order=2, threshold_percentile=p,
                                   threshold_floor=1.5)
    want_f, _ = ref_multistep(model, x.clone(), sig, 2, "eps", True, transform=lambda m: _threshold(m, p, 1.5))
    torch.testing.assert_close(got_f, want_f, **TOL)
    got_c = sample_dpmpp_multistep(model, x.clone(), _t(sig), disable=True, order=2, threshold_percentile=p,
                                   threshold_max=1.2)
    want_c, _ = ref_multistep(model, x.clone(), sig, 2, "eps", True,
                              transform=lambda m: _threshold(m, p, 1.0, 1.2))
    torch.testing.assert_close(got_c, want_c, **TOL)
    assert float((want_c - ref_multistep(model, x.clone(), sig, 2, "eps", True,
                                         transform=lambda m: _threshold(m, p))[0]).abs().max()) > 1e-3


def test_data_model_thresholds_with_floor_one_by_default():
    """The shared data-prediction wrapper: off at percentile <= 0, Imagen's floor 1 when none is given."""
    model = Denoiser(scale=2.2)
    x = _x(3.0, seed=7)
    sigma = torch.full((SHAPE[0],), 3.0, dtype=torch.float64)
    raw = model(x, sigma)
    assert torch.equal(pp._data_model(model, None, 0.0, math.inf)(x, sigma), raw)
    torch.testing.assert_close(pp._data_model(model, None, 0.9, math.inf)(x, sigma), _threshold(raw, 0.9), **TOL)
    # a floor above every sample's quantile: each prediction is divided by the floor
    assert float(torch.quantile(raw.abs().flatten(1), 0.9, dim=1).max()) < 3.0
    torch.testing.assert_close(pp._data_model(model, None, 0.9, math.inf, 3.0)(x, sigma), raw / 3.0, **TOL)


@pytest.mark.parametrize("solver", ["multistep", "singlestep"])
def test_batch_rows_are_solved_independently_with_thresholding(solver):
    """Each sample keeps its own quantile and history: a row solved alone ends where it ends in the batch."""
    model = Denoiser(scale=2.2)
    x = _x(EPS_TO_ZERO[0], seed=8)
    x[1] *= 0.3  # rows with very different predictions and quantiles
    fn = sample_dpmpp_multistep if solver == "multistep" else sample_dpmpp_singlestep
    batch = fn(model, x.clone(), _t(EPS_TO_ZERO), disable=True, order=3, threshold_percentile=0.9)
    for row in range(SHAPE[0]):
        alone = fn(model, x[row:row + 1].clone(), _t(EPS_TO_ZERO), disable=True, order=3, threshold_percentile=0.9)
        torch.testing.assert_close(alone, batch[row:row + 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", [sample_dpmpp_multistep, sample_dpmpp_singlestep, sample_dpmpp_2m, sample_dpmpp_3m])
def test_samplers_build_no_autograd_graph(fn):
    """Sampling runs under no_grad: the model is called with autograd off and the result carries no graph, even
    for an input that requires grad."""
    model = Denoiser()
    x = _x(EPS_TO_ZERO[0]).requires_grad_(True)
    out = fn(model, x, _t(EPS_TO_ZERO), disable=True)
    assert model.grad_modes and not any(model.grad_modes)
    assert not out.requires_grad


# ---- order of the third-order multistep rule ---------------------------------------------------------------------

def _gaussian_local_errors(hs: list[float]) -> tuple[list[float], list[float]]:
    """Local errors of one 3M step (module) and of the exact exponential integral of the quadratic interpolant,
    both from the exact history of a Gaussian-data ODE: x0 ~ N(mu, s^2) per element (alpha = 1), whose solution
    is x(sigma) = mu + (x_T - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2) and D = mu + s^2 (x - mu) /
    (s^2 + sigma^2)."""
    mu, s2 = torch.tensor([0.3, -1.2, 0.8], dtype=torch.float64), 0.25
    x_t, sigma_t = torch.tensor([2.0, 1.5, -3.0], dtype=torch.float64), 3.0

    def state(sig: float) -> torch.Tensor:
        return mu + (x_t - mu) * math.sqrt(s2 + sig * sig) / math.sqrt(s2 + sigma_t * sigma_t)

    def denoise(x: torch.Tensor, sig: float) -> torch.Tensor:
        return mu + s2 * (x - mu) / (s2 + sig * sig)

    module_errors, interpolant_errors = [], []
    for h in hs:
        lams = [-2.0 * h, -h, 0.0, h]
        sig = [math.exp(-v) for v in lams]
        ms = [denoise(state(v), v) for v in sig[:3]]
        step = pp._multistep_update(state(sig[2]), ms, [torch.tensor(v, dtype=torch.float64) for v in lams[:3]],
                                    torch.tensor(sig[2], dtype=torch.float64),
                                    torch.tensor(sig[3], dtype=torch.float64), "eps", 3)
        exact = state(sig[3])
        module_errors.append(float((step - exact).abs().max()))
        interp = (sig[3] / sig[2]) * state(sig[2]) + _exp_integral_of_interpolant(lams[:3], ms, h)
        interpolant_errors.append(float((interp - exact).abs().max()))
    return module_errors, interpolant_errors


def test_3m_step_is_the_official_rule_with_third_order_local_error_only_for_the_exact_integral():
    """The official third-order multistep rule (kept, as k-diffusion and diffusers use it) weights its second divided
    difference D2 (= h^2 x0''/2) by -phi_3 where the exact integral of the quadratic needs -2 phi_3: from an exact
    history one 3M step's local error falls ~8x per halving of h (O(h^3): second order overall), the exact integral's
    ~16x (O(h^4)). The module's docstring says so."""
    module_errors, interpolant_errors = _gaussian_local_errors([0.1, 0.05, 0.025, 0.0125])
    interp_orders = [math.log2(a / b) for a, b in zip(interpolant_errors[:-1], interpolant_errors[1:], strict=True)]
    assert min(interp_orders) > 3.8, interp_orders  # the measurement itself resolves fourth-order local error
    orders = [math.log2(a / b) for a, b in zip(module_errors[:-1], module_errors[1:], strict=True)]
    assert 2.0 < min(orders) and max(orders) < 3.2, (orders, module_errors)


@pytest.mark.parametrize("order,want", [(1, 2.0), (2, 3.0), (3, 4.0)])
def test_singlestep_local_error_has_the_order_of_its_name(order, want):
    """Independent of any reference arithmetic: one singlestep step from the exact state of the Gaussian-data ODE
    (see ``_gaussian_local_errors``) has local error O(h^(order + 1)): DDIM ~4x, 2S ~8x, 3S ~16x smaller per halving
    of the step in log-SNR."""
    mu, s2 = torch.tensor([0.3, -1.2, 0.8], dtype=torch.float64), 0.25
    x_t, sigma_t = torch.tensor([2.0, 1.5, -3.0], dtype=torch.float64), 3.0

    def state(sig: float) -> torch.Tensor:
        return mu + (x_t - mu) * math.sqrt(s2 + sig * sig) / math.sqrt(s2 + sigma_t * sigma_t)

    def model(x, sigma, **_):
        s = sigma.reshape(-1, 1)
        return mu + s2 * (x - mu) / (s2 + s * s)

    errors = []
    for h in (0.1, 0.05, 0.025, 0.0125):
        sig = torch.tensor([1.0, math.exp(-h)], dtype=torch.float64)
        out = pp.sample_dpmpp_singlestep(model, state(1.0)[None].clone(), sig, disable=True, order=order)
        errors.append(float((out[0] - state(float(sig[1]))).abs().max()))
    orders = [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:], strict=True)]
    assert all(want - 0.3 < o < want + 0.3 for o in orders[1:]), (orders, errors)  # the asymptotic ratios
