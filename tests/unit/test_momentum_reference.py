"""Heavy-ball and GHVB momentum (Wizadwongsa et al., arXiv:2307.11118) against references written here.

The GHVB weights are not copied from the paper's table: they are derived in the test from the property the
module states ("coefficients depend on beta so that order k is kept"): fed the heavy-ball velocities of any
polynomial noise history of degree below k (unit steps), the combination must return the exact integral of that
polynomial over the next step. The samplers are then re-implemented from the module docstring (HB on the
DPM-Solver++ effective data prediction, Sec. 4.1; PLMS in ``y = x / alpha``, ``g = sigma / alpha``, Sec. 4.2) and
compared in float64 on the exact-score mixture.
"""

from __future__ import annotations

import math

import pytest
import torch

from preprint.samplers.dpm_solver_pp import sample_dpmpp_multistep
from preprint.samplers.momentum import (
    HeavyBall,
    check_beta,
    ghvb_mix,
    sample_dpmpp_hb,
    sample_plms_momentum,
    split_fractional_order,
)

from .conftest import get_problem

F64 = torch.float64


def ghvb_weights(k: int, b: float) -> list[float]:
    """Weights c_0..c_{k-1} (newest first) of the order-k GHVB rule, from its order conditions.

    For p(t) = t^d (d < k), the heavy-ball velocity v_n = (1 - b) v_{n-1} + b p(n) has a polynomial steady state
    q_d of the same degree; the rule must give sum_j c_j q_d(-j) = int_0^1 t^d dt = 1 / (d + 1).
    """
    t = torch.arange(k, dtype=F64)
    rows = []
    for d in range(k):
        # q_d = sum_m a_m t^m with q_d(t) - (1 - b) q_d(t - 1) = b t^d, solved on k points
        basis = torch.stack([t**m - (1 - b) * (t - 1) ** m for m in range(k)], 1)
        a = torch.linalg.solve(basis, b * t**d)
        rows.append([float(sum(a[m] * (-float(j)) ** m for m in range(k))) for j in range(k)])
    c = torch.linalg.solve(torch.tensor(rows, dtype=F64), torch.tensor([1.0 / (d + 1) for d in range(k)], dtype=F64))
    return c.tolist()


def mix(hist: list[torch.Tensor], b: float) -> torch.Tensor:
    c = ghvb_weights(len(hist), b)
    return sum(cj * h for cj, h in zip(c, hist[::-1], strict=True))


# ------------------------------------------------------------------------------------------ small pieces


def test_fractional_order_convention_hand_values():
    """order k - 1 + b = order k with beta b; an integer order is beta 1; orders in (0, 1] are order 1 (the node
    sends beta alone for PLMS order 1); zero, negative and non-finite orders are refused."""
    cases = {3.7: (4, 0.7), 2.5: (3, 0.5), 1.25: (2, 0.25), 0.8: (1, 0.8), 0.05: (1, 0.05), 1.0: (1, 1.0),
             2.0: (2, 1.0), 4.0: (4, 1.0), 3.0000000001: (3, 1.0)}
    for order, (k, b) in cases.items():
        got_k, got_b = split_fractional_order(order)
        assert got_k == k and type(got_k) is int and got_b == pytest.approx(b, abs=1e-12, rel=0), order
    for bad in (0.0, -0.5, -2.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="order"):
            split_fractional_order(bad)


def test_check_beta_interval():
    assert check_beta(1.0) == 1.0 and check_beta(0.05) == 0.05 and type(check_beta(1)) is float
    for bad in (0.0, -0.3, 1.0000001, math.nan):
        with pytest.raises(ValueError, match="beta"):
            check_beta(bad)


def test_heavy_ball_hand_values():
    """v_0 = d_0, then v_n = (1 - beta) v_{n-1} + beta d_n: with beta 1/4 and d = 4, 8, 0: v = 4, 5, 3.75."""
    ball = HeavyBall(0.25)
    assert [float(ball(torch.tensor(d))) for d in (4.0, 8.0, 0.0)] == [4.0, 5.0, 3.75]
    assert float(ball.velocity) == 3.75


def test_reference_weights_reproduce_adams_bashforth_at_beta_one():
    """Sanity of the derivation: at beta 1 the order conditions give the classical AB weights."""
    ab = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    for k, w in ab.items():
        assert ghvb_weights(k, 1.0) == pytest.approx(w, abs=1e-12)


@pytest.mark.parametrize("b", [0.05, 0.3, 0.7, 1.0])
def test_ghvb_mix_weights_keep_the_order(b):
    """ghvb_mix equals the order-condition weights for orders 1 to 4 on random histories (float64; 1e-10
    relative, the solve for weights of size 1 / beta being the larger rounding); with a longer history it uses the
    newest k entries, with a shorter one the order the history allows."""
    g = torch.Generator().manual_seed(0)
    hist = [torch.randn(3, 5, generator=g, dtype=F64) for _ in range(6)]  # newest last
    for k in (1, 2, 3, 4):
        torch.testing.assert_close(ghvb_mix(k, hist[:k], b), mix(hist[:k], b), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ghvb_mix(k, hist, b), mix(hist[-k:], b), rtol=1e-10, atol=1e-12)
        for short in range(1, k):
            torch.testing.assert_close(ghvb_mix(k, hist[:short], b), mix(hist[:short], b), rtol=1e-10, atol=1e-12)
    # order 1 is the newest velocity itself, however long the history
    assert torch.equal(ghvb_mix(1, hist, b), hist[-1])
    with pytest.raises(ValueError, match="orders 1 to 4"):
        ghvb_mix(5, hist, b)


# ------------------------------------------------------------------------------------------ references


def _alpha(s: float, kind: str) -> float:
    return 1.0 - s if kind == "flow" else 1.0


def _lam(s: float, kind: str) -> float:
    a = _alpha(s, kind)
    return -math.inf if a == 0 else math.log(a / s)


def hb_reference(model, x, sigmas, order, beta, kind, lower_order_final=True, extra_args=None):
    """DPM-Solver++ 2M / 3M (Lu et al., arXiv:2211.01095) with the heavy ball on its effective data prediction
    D: x_{n+1} = (sigma_{n+1}/sigma_n) x_n - alpha_{n+1} phi_1 v_n, v_n = (1 - beta) v_{n-1} + beta D_n. The
    first-order warm-up step stays plain and the velocity starts at the first multistep direction (official
    scheduler); the jump to sigma 0 returns the prediction. Orders: warm-up over the finite-lambda history and,
    under 10 steps, lower order on the last steps."""
    extra_args = extra_args or {}
    n = len(sigmas) - 1
    ds, lams, v = [], [], None
    for i in range(n):
        s, s1 = float(sigmas[i]), float(sigmas[i + 1])
        d = model(x, sigmas[i] * x.new_ones(x.shape[0]), **extra_args)
        ds.append(d)
        lams.append(_lam(s, kind))
        if s1 == 0:
            x = d
            continue
        finite = 0
        for lam in reversed(lams):
            if not math.isfinite(lam):
                break
            finite += 1
        k = min(order, finite)
        if lower_order_final and n < 10:
            k = min(k, n - i)
        k = max(k, 1)
        h = _lam(s1, kind) - lams[-1]
        phi1 = math.expm1(-h)
        if k == 1:
            direction = d
        elif k == 2:
            r0 = (lams[-1] - lams[-2]) / h
            direction = d + 0.5 * (d - ds[-2]) / r0
        else:
            r0, r1 = (lams[-1] - lams[-2]) / h, (lams[-2] - lams[-3]) / h
            d1_0, d1_1 = (d - ds[-2]) / r0, (ds[-2] - ds[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi2 = phi1 / h + 1.0
            phi3 = phi2 / h - 0.5
            direction = d - (phi2 / phi1) * d1 + (phi3 / phi1) * d2
        if beta < 1.0 and not (k == 1 and v is None):
            v = direction if v is None else (1.0 - beta) * v + beta * direction
            direction = v
        x = (s1 / s) * x - _alpha(s1, kind) * phi1 * direction
    return x


def plms_reference(model, x, sigmas, k, beta, momentum, kind):
    """PLMS on dy/dg = eps with y = x / alpha, g = sigma / alpha. GHVB: velocities of eps first, then the
    beta-dependent AB-k weights; HB: the AB-k combination of eps, then the heavy ball. Flow at sigma = 1
    (alpha 0): the DDIM limit x' = alpha' D + sigma' update. The jump to sigma 0 returns the prediction."""
    hist, v = [], None
    for i in range(len(sigmas) - 1):
        s, s1 = float(sigmas[i]), float(sigmas[i + 1])
        a, a1 = _alpha(s, kind), _alpha(s1, kind)
        d = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        eps = (x - a * d) / s
        if momentum == "ghvb":
            v = eps if v is None else (1.0 - beta) * v + beta * eps
            hist = (hist + [v])[-k:]
            update = mix(hist, beta)
        else:
            hist = (hist + [eps])[-k:]
            ab = mix(hist, 1.0)
            v = ab if v is None else (1.0 - beta) * v + beta * ab
            update = v
        if s1 == 0:
            x = d
        elif a == 0:
            x = a1 * d + s1 * update
        else:
            x = a1 * (x / a + (s1 / a1 - s / a) * update)
    return x


def _scaled(model, scale):
    def f(x, sigma, **_):
        return model(x, sigma) * scale
    return f


# ------------------------------------------------------------------------------------------ heavy ball


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [6, 12])
def test_hb_matches_the_reference(kind, order, steps):
    """sample_dpmpp_hb against the reference (float64, 1e-12) for beta 0.6, lower-order final steps on and
    off, on the exact mixture with CFG (flow starting at sigma 1, whose lambda is -inf)."""
    p = get_problem(kind, 3.5 if kind == "flow" else 5.0)
    sig = p.sigmas(steps)
    x0 = p.x_start[:2].clone()
    for lof in (True, False):
        got = sample_dpmpp_hb(p.model, x0.clone(), sig, disable=True, order=order, beta=0.6, parameterisation=kind,
                              lower_order_final=lof)
        want = hb_reference(p.model, x0.clone(), sig, order, 0.6, kind, lof)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if order > 1:
        plain = hb_reference(p.model, x0.clone(), sig, order, 1.0, kind, False)  # as `got`: the last run, lof off
        assert (got - plain).abs().max() > 1e-3  # the momentum is not a no-op here


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("order", [2, 3])
def test_hb_on_a_list_that_stops_above_zero(kind, order):
    """A split sigma list (no final 0, fewer than 10 steps): the lower-order last step is first order, yet the
    velocity already runs, so it still goes through the heavy ball (direction = the newest prediction)."""
    p = get_problem(kind, 3.5 if kind == "flow" else 5.0)
    sig = p.sigmas(12)[2:8]
    x0 = p.x_start[:2].clone()
    got = sample_dpmpp_hb(p.model, x0.clone(), sig, disable=True, order=order, beta=0.5, parameterisation=kind)
    want = hb_reference(p.model, x0.clone(), sig, order, 0.5, kind, True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_hb_beta_one_is_the_plain_solver_bit_for_bit(kind):
    """beta 1 takes the plain solver's own arithmetic (module docstring: same code path, bit for bit)."""
    p = get_problem(kind, 3.5 if kind == "flow" else 5.0)
    for sig in (p.sigmas(7), p.sigmas(12)[2:8]):
        for order in (2, 3):
            hb = sample_dpmpp_hb(p.model, p.x_start[:2].clone(), sig, disable=True, order=order, beta=1.0,
                                 parameterisation=kind)
            plain = sample_dpmpp_multistep(p.model, p.x_start[:2].clone(), sig, disable=True, order=order,
                                           parameterisation=kind)
            assert torch.equal(hb, plain)


def test_hb_flow_in_sigma_and_extra_args():
    """flow_lambda "sigma" integrates a flow model with the VE formula (alpha 1, lambda = -log sigma); extra_args
    reach the model."""
    p = get_problem("flow", 3.5)
    sig = p.sigmas(8)[1:]  # start below sigma 1
    x0 = p.x_start[:2].clone()

    def model(x, sigma, scale=1.0):
        return p.model(x, sigma) * scale

    got = sample_dpmpp_hb(model, x0.clone(), sig, disable=True, order=3, beta=0.7, parameterisation="flow",
                          flow_lambda="sigma", extra_args={"scale": 0.9})
    want = hb_reference(model, x0.clone(), sig, 3, 0.7, "eps", extra_args={"scale": 0.9})
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_hb_defaults():
    """Defaults: order 2, beta 0.8, EPS, lower-order final steps."""
    p = get_problem("eps", 5.0)
    sig = p.sigmas(7)
    x0 = p.x_start[:2].clone()
    got = sample_dpmpp_hb(p.model, x0.clone(), sig, disable=True)
    torch.testing.assert_close(got, hb_reference(p.model, x0.clone(), sig, 2, 0.8, "eps", True), rtol=1e-12,
                               atol=1e-12)


def test_hb_refuses_bad_options():
    p = get_problem("eps")
    sig = p.sigmas(4)
    for kw, match in (({"order": 4}, "order"), ({"order": 0}, "order"), ({"beta": 0.0}, "beta"),
                      ({"beta": 1.5}, "beta"), ({"parameterisation": "v"}, "parameterisation"),
                      ({"flow_lambda": "t"}, "flow_lambda")):
        with pytest.raises(ValueError, match=match):
            sample_dpmpp_hb(p.model, p.x_start[:1].clone(), sig, disable=True, **kw)


# ------------------------------------------------------------------------------------------ PLMS + momentum


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("momentum", ["ghvb", "hb"])
@pytest.mark.parametrize("order", [0.6, 1.0, 1.5, 2.8, 3.0, 3.7, 4.0])
def test_plms_momentum_matches_the_reference(kind, momentum, order):
    """sample_plms_momentum against the reference (float64, 1e-12): the flow run starts at sigma 1 (the DDIM
    limit) and then uses the alpha-scaled update, so alpha enters every step."""
    p = get_problem(kind, 3.5 if kind == "flow" else 5.0)
    sig = p.sigmas(7)
    x0 = p.x_start[:2].clone()
    k, beta = math.ceil(order), order - math.ceil(order) + 1.0
    got = sample_plms_momentum(p.model, x0.clone(), sig, disable=True, order=order, momentum=momentum,
                               parameterisation=kind)
    want = plms_reference(p.model, x0.clone(), sig, k, beta, momentum, kind)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_plms_defaults_extra_args_and_bad_options():
    """Defaults: GHVB order 3.7 (order 4, beta 0.7) on EPS; extra_args reach the model."""
    p = get_problem("eps", 5.0)
    sig = p.sigmas(7)
    x0 = p.x_start[:2].clone()

    def model(x, sigma, scale=1.0):
        return p.model(x, sigma) * scale

    got = sample_plms_momentum(model, x0.clone(), sig, disable=True, extra_args={"scale": 0.9})
    want = plms_reference(_scaled(p.model, 0.9), x0.clone(), sig, 4, 0.7, "ghvb", "eps")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for kw, match in (({"momentum": "nesterov"}, "momentum"), ({"order": 4.2}, "at most 4"),
                      ({"order": 0.0}, "order"), ({"parameterisation": "v"}, "parameterisation")):
        with pytest.raises(ValueError, match=match):
            sample_plms_momentum(p.model, x0.clone(), sig, disable=True, **kw)


# ------------------------------------------------------------------------------------------ no autograd


def test_samplers_build_no_autograd_graph():
    """Both samplers run under no_grad: a model whose output carries a gradient still gives a plain tensor."""
    p = get_problem("eps")
    sig = p.sigmas(4)
    w = torch.tensor(0.9, dtype=F64, requires_grad=True)

    def model(x, sigma):
        return p.model(x, sigma) * w

    for fn in (sample_dpmpp_hb, sample_plms_momentum):
        out = fn(model, p.x_start[:1].clone(), sig, disable=True)
        assert not out.requires_grad and out.grad_fn is None
