"""DEIS tAB (samplers/deis.py) against a reference written here from the paper's equations (arXiv:2204.13902).

In y = x / alpha, g = sigma / alpha the ODE is dy/dg = eps, and tAB (Eq. 15) steps
y_next = y_i + sum_j C_j eps_{i-j} with C_j = int_{g_i}^{g_next} l_j(tau(g)) dg, l_j the Lagrange basis through
the last k nodes in the polynomial variable tau (the model's time t, lambda = -log g, or rho = g). The weights
here come from composite 5-point Gauss-Legendre in g itself on 200 geometric panels (the module integrates in
log g with one 24-node rule), so the two quadratures share nothing but the integral they approximate.
"""

from __future__ import annotations

import math

import pytest
import torch

from preprint.samplers.deis import sample_deis, sd_discrete_timestep, tab_coefficients

from .conftest import flow_sigmas, get_problem, karras_sigmas

F64 = torch.float64
_R = math.sqrt(10 / 7)
_GL5_X = torch.tensor([0.0, -math.sqrt(5 - 2 * _R) / 3, math.sqrt(5 - 2 * _R) / 3,
                       -math.sqrt(5 + 2 * _R) / 3, math.sqrt(5 + 2 * _R) / 3], dtype=F64)
_GL5_W = torch.tensor([128 / 225, (322 + 13 * math.sqrt(70)) / 900, (322 + 13 * math.sqrt(70)) / 900,
                       (322 - 13 * math.sqrt(70)) / 900, (322 - 13 * math.sqrt(70)) / 900], dtype=F64)


def _alpha(s: float, kind: str) -> float:
    return 1.0 - s if kind == "flow" else 1.0


def _sigma_of_g(g: torch.Tensor, kind: str) -> torch.Tensor:
    return g / (1 + g) if kind == "flow" else g


def _tau(s, kind: str, space: str, time_fn) -> torch.Tensor:
    s = torch.as_tensor(s, dtype=F64)
    if space == "t":
        return time_fn(s).to(F64)
    g = s / (1 - s) if kind == "flow" else s
    return -torch.log(g) if space == "lambda" else g


def ref_weights(hist: list[float], nxt: float, kind: str, space: str, time_fn, panels: int = 200) -> list[float]:
    """C_j = int_{g_i}^{g_next} l_j(tau(g)) dg by composite Gauss-Legendre in g (geometric panels)."""
    g0, g1 = hist[-1] / _alpha(hist[-1], kind), nxt / _alpha(nxt, kind)
    edges = torch.linspace(math.log(g0), math.log(g1), panels + 1, dtype=F64).exp()
    edges[0], edges[-1] = g0, g1
    lo, hi = edges[:-1, None], edges[1:, None]
    g = 0.5 * (hi - lo) * _GL5_X + 0.5 * (hi + lo)
    w = 0.5 * (hi - lo) * _GL5_W
    tq = _tau(_sigma_of_g(g, kind), kind, space, time_fn)
    taus = [_tau(s, kind, space, time_fn) for s in hist]
    out = []
    for j, tj in enumerate(taus):
        basis = torch.ones_like(tq)
        for k, tk in enumerate(taus):
            if k != j:
                basis = basis * (tq - tk) / (tj - tk)
        out.append(float((w * basis).sum()))
    return out


def ref_usable(taus: list[float], order: int) -> int:
    """Largest trailing window (at most ``order``) of finite, strictly monotone nodes."""
    best = 1
    for k in range(2, min(order, len(taus)) + 1):
        win = taus[-k:]
        d = [b - a for a, b in zip(win[:-1], win[1:], strict=True)]
        if all(math.isfinite(v) for v in win) and (all(x > 0 for x in d) or all(x < 0 for x in d)):
            best = k
        else:
            break
    return best


def ref_deis(model, x, sigmas, kind, order, space, time_fn, lower_order_final=True):
    """tAB written from Eq. 15: per step the order is min(order, steps so far, usable nodes), capped by the steps
    left when there are fewer than 10; a jump to sigma 0 is the data prediction; order 1 is DDIM."""
    s = [float(v) for v in sigmas]
    n = len(s) - 1
    eps_hist: list[torch.Tensor] = []
    for i in range(n):
        a, a_next = _alpha(s[i], kind), _alpha(s[i + 1], kind)
        d = model(x, torch.full((x.shape[0],), s[i], dtype=F64))
        eps_hist.append((x - a * d) / s[i])
        taus = [float(_tau(v, kind, space, time_fn)) for v in s[max(0, i + 1 - order): i + 1]]
        k = min(order, i + 1, ref_usable(taus, order))
        if lower_order_final and n < 10:
            k = min(k, n - i)
        if s[i + 1] == 0:
            x = d
        elif k == 1:
            x = a_next * d + s[i + 1] * eps_hist[-1]
        else:
            c = ref_weights(s[i + 1 - k: i + 1], s[i + 1], kind, space, time_fn)
            y = x / a + sum(cj * ej for cj, ej in zip(c, eps_hist[-k:], strict=True))
            x = a_next * y
    return x


def _atan_time(s: torch.Tensor) -> torch.Tensor:
    """A smooth monotone model time unlike SD's (and not affine in lambda or g)."""
    return 1000 * torch.atan(s.to(F64))


def _flow_time(s: torch.Tensor) -> torch.Tensor:
    return 1000 * s.to(F64) ** 2


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------- the weights


@pytest.mark.parametrize("space", ["t", "lambda", "rho"])
@pytest.mark.parametrize("kind,hist,nxt", [
    ("eps", (5.0,), 3.0), ("eps", (5.0, 3.0), 2.0), ("eps", (5.0, 3.0, 2.0), 1.2), ("eps", (14.6, 9.0, 6.0), 4.0),
    ("eps", (1.5, 0.9, 0.5), 0.2), ("eps", (0.5, 0.2, 0.1), 0.05),
    ("flow", (0.9, 0.7), 0.6), ("flow", (0.9, 0.7, 0.6), 0.4), ("flow", (0.6, 0.4, 0.3), 0.05),
])
def test_weights_are_the_integrated_lagrange_basis(kind, hist, nxt, space):
    """tab_coefficients of orders 1 to 3 equal the integrals of the Lagrange basis in the chosen variable against
    dg, from the current g to the next, on a smooth model time (EPS: 1000 atan sigma; flow: 1000 sigma^2)."""
    time_fn = _atan_time if kind == "eps" else _flow_time
    c = tab_coefficients([torch.tensor(v, dtype=F64) for v in hist], torch.tensor(nxt, dtype=F64), kind, space,
                         time_fn)
    ref = torch.tensor(ref_weights(list(hist), nxt, kind, space, time_fn), dtype=F64)
    assert c.dtype == F64 and c.shape == (len(hist),)
    _close(c, ref, 1e-12)


def test_lambda_is_the_log_snr_and_rho_is_g():
    """poly_space "lambda" is the log-SNR and "rho" is g: a t map equal to either gives the same weights, and the
    three spaces differ from one another."""
    hist = [torch.tensor(v, dtype=F64) for v in (0.9, 0.7, 0.6)]
    nxt = torch.tensor(0.4, dtype=F64)
    lam = tab_coefficients(hist, nxt, "flow", "lambda", _flow_time)
    rho = tab_coefficients(hist, nxt, "flow", "rho", _flow_time)
    _close(tab_coefficients(hist, nxt, "flow", "t", lambda s: torch.log((1 - s) / s)), lam, 1e-13)
    _close(tab_coefficients(hist, nxt, "flow", "t", lambda s: s / (1 - s)), rho, 1e-13)
    assert (lam - rho).abs().max() > 1e-2


# ------------------------------------------------------------------------------------- the SD discrete time


def _sd_sigmas() -> torch.Tensor:
    """sigma_k of SD1.x / SDXL: betas linear in sqrt from 0.00085 to 0.012 over 1000 steps, VE sigma of abar."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt()


def test_sd_discrete_timestep_is_the_index_on_the_sd_table():
    """t(sigma_k) = k on SD's own table (the known sigma_min 0.0292 and sigma_max 14.6146), linear in log sigma
    between entries, and extrapolated linearly (not clamped) beyond both ends."""
    table = _sd_sigmas()
    assert float(table[0]) == pytest.approx(0.029168, abs=1e-6)
    assert float(table[-1]) == pytest.approx(14.614642, abs=1e-6)
    ks = torch.tensor([0, 1, 2, 10, 250, 500, 998, 999])
    _close(sd_discrete_timestep(table[ks]), ks.to(F64), 1e-9)
    ls = table.log()
    mid = ((ls[:-1] + ls[1:]) / 2).exp()
    _close(sd_discrete_timestep(mid), torch.arange(999, dtype=F64) + 0.5, 1e-9)
    above = (ls[-1] + 0.5 * (ls[-1] - ls[-2])).exp()
    below = (ls[0] - 2.0 * (ls[1] - ls[0])).exp()
    _close(sd_discrete_timestep(torch.stack([above, below, torch.tensor(80.0, dtype=F64)]))[:2],
           torch.tensor([999.5, -2.0], dtype=F64), 1e-9)
    assert float(sd_discrete_timestep(torch.tensor(80.0, dtype=F64))) > 999.5
    assert sd_discrete_timestep(table.reshape(10, 100)).shape == (10, 100)


# ------------------------------------------------------------------------------------ whole runs vs Eq. 15


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("space", ["t", "lambda", "rho"])
@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_sampler_is_eq15_with_lower_orders_at_the_ends(kind, space, order):
    """Whole runs equal the reference tAB to 1e-10: first steps at lower order, the final-step cap for fewer
    than 10 steps (9 steps capped; 10 steps not), a last jump to sigma 0 or to a positive sigma, and the flow
    start at sigma = 1 (alpha = 0)."""
    p = get_problem(kind, 7.5)
    time_fn = _atan_time if kind == "eps" else _flow_time
    x0 = p.x_start[:2].clone()
    for steps in (9, 10):
        if kind == "eps":
            lists = [karras_sigmas(steps), karras_sigmas(steps + 1)[:-1]]  # to 0, and stopping at 0.03
        else:
            lists = [flow_sigmas(steps), flow_sigmas(steps + 1)[:-1]]
        for sig in lists:
            out = sample_deis(p.model, x0.clone(), sig, disable=True, order=order, parameterisation=kind,
                              poly_space=space, time_fn=time_fn)
            ref = ref_deis(p.model, x0.clone(), sig, kind, order, space, time_fn)
            _close(out, ref)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_without_lower_order_final_the_last_steps_keep_the_order(kind):
    """lower_order_final=False keeps order 3 up to the last step on a short list (the cap is what changes)."""
    p = get_problem(kind, 1.0)
    sig = karras_sigmas(6)[:-1] if kind == "eps" else flow_sigmas(7)[:-1]
    x0 = p.x_start[:2].clone()
    out = sample_deis(p.model, x0.clone(), sig, disable=True, order=3, parameterisation=kind, poly_space="lambda",
                      lower_order_final=False)
    _close(out, ref_deis(p.model, x0.clone(), sig, kind, 3, "lambda", None, lower_order_final=False))
    capped = sample_deis(p.model, x0.clone(), sig, disable=True, order=3, parameterisation=kind, poly_space="lambda")
    assert (out - capped).abs().max() > 1e-6


def test_default_model_time_is_sd_for_eps_and_sigma_for_flow():
    """With no time_fn, poly_space "t" uses SD's discrete time for EPS models (the table above) and t = sigma for
    flow models. The SD time is piecewise linear in log sigma, which the module's single Gauss-Legendre rule
    integrates to ~2e-5 only (see the SD-time weights test below), so EPS is checked to 1e-5; flow to 1e-10."""
    p = get_problem("eps", 7.5)
    sig = karras_sigmas(8)
    x0 = p.x_start[:2].clone()
    table = _sd_sigmas().log()

    def sd_time(s: torch.Tensor) -> torch.Tensor:
        ls = s.to(F64).log().reshape(-1)
        i = torch.searchsorted(table, ls).clamp(1, 999)
        return ((i - 1) + (ls - table[i - 1]) / (table[i] - table[i - 1])).reshape(s.shape)

    out = sample_deis(p.model, x0.clone(), sig, disable=True, order=3, poly_space="t")
    _close(out, ref_deis(p.model, x0.clone(), sig, "eps", 3, "t", sd_time), 1e-5)
    q = get_problem("flow", 7.5)
    sig = flow_sigmas(8)
    x0 = q.x_start[:2].clone()
    out = sample_deis(q.model, x0.clone(), sig, disable=True, order=3, parameterisation="flow", poly_space="t")
    _close(out, ref_deis(q.model, x0.clone(), sig, "flow", 3, "t", lambda s: s.to(F64)))


@pytest.mark.parametrize("time_fn", [
    lambda s: s.log() ** 2,  # falls then rises as sigma passes 1: nodes not monotone
    lambda s: -s.log() ** 2,  # rises then falls
    lambda s: torch.where(s < 10.0, s.log(), torch.nan),  # no finite time above sigma 10
    lambda s: torch.where((s > 5.0) & (s < 8.0), torch.nan, s.log()),  # none at the second node, 6
], ids=["valley", "peak", "nan-above-10", "nan-band"])
def test_nodes_not_monotone_or_not_finite_lower_the_order(time_fn):
    """The Lagrange window shrinks to the trailing nodes that are finite and strictly monotone in t (down to
    DDIM, also where the current node itself has no finite time); the run then still equals the reference."""
    p = get_problem("eps", 7.5)
    sig = torch.tensor([14.6, 6.0, 3.0, 1.6, 1.2, 0.93, 0.8, 0.5, 0.3, 0.1, 0.0], dtype=F64)
    x0 = p.x_start[:2].clone()
    out = sample_deis(p.model, x0.clone(), sig, disable=True, order=3, poly_space="t", time_fn=time_fn)
    assert torch.isfinite(out).all()
    _close(out, ref_deis(p.model, x0.clone(), sig, "eps", 3, "t", time_fn))


def test_default_order_is_three():
    p = get_problem("eps", 7.5)
    sig = karras_sigmas(8)
    x0 = p.x_start[:2]
    default = sample_deis(p.model, x0.clone(), sig, disable=True)
    assert torch.equal(default, sample_deis(p.model, x0.clone(), sig, disable=True, order=3))
    assert not torch.equal(default, sample_deis(p.model, x0.clone(), sig, disable=True, order=2))


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_order_one_is_the_ddim_update(kind):
    """Order 1 is DDIM, x_next = alpha_next D + sigma_next eps, to the last bit (no quadrature is involved)."""
    p = get_problem(kind, 7.5)
    sig = karras_sigmas(6)[:-1] if kind == "eps" else flow_sigmas(6)[:-1]
    x = p.x_start[:2].clone()
    out = sample_deis(p.model, x.clone(), sig, disable=True, order=1, parameterisation=kind)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        a, a_next = (1 - s, 1 - s_next) if kind == "flow" else (torch.ones_like(s), torch.ones_like(s_next))
        d = p.model(x, s * x.new_ones(x.shape[0]))
        x = a_next * d + s_next * ((x - a * d) / s)
    assert torch.equal(out, x)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_rows_are_solved_independently(kind):
    p = get_problem(kind, 7.5)
    sig = karras_sigmas(7) if kind == "eps" else flow_sigmas(7)
    both = sample_deis(p.model, p.x_start[:3].clone(), sig, disable=True, parameterisation=kind)
    for b in range(3):
        one = sample_deis(p.model, p.x_start[b: b + 1].clone(), sig, disable=True, parameterisation=kind)
        _close(one, both[b: b + 1], 1e-12)


def test_t_space_weights_on_the_sd_time_are_within_the_stated_bound():
    """Against the integral split at the table's knots (each piece smooth): SD's discrete time is piecewise linear in
    log sigma, so the 24-node rule reaches ~2e-5 of the largest weight there (the module says so), not the ~1e-12 of
    smooth maps."""
    table = _sd_sigmas().log()
    hist, nxt = [0.5, 0.2, 0.1], 0.05
    u0, u1 = math.log(hist[-1]), math.log(nxt)
    knots = sorted([u1, *[float(v) for v in table if u1 < v < u0], u0])
    edges = torch.tensor(knots, dtype=F64)
    lo, hi = edges[:-1, None], edges[1:, None]
    u = 0.5 * (hi - lo) * _GL5_X + 0.5 * (hi + lo)
    w = -(0.5 * (hi - lo) * _GL5_W * u.exp())  # from u0 down to u1, dg = g du
    tq = sd_discrete_timestep(u.exp())
    taus = [sd_discrete_timestep(torch.tensor(v, dtype=F64)) for v in hist]
    ref = []
    for j in range(3):
        basis = torch.ones_like(tq)
        for k in range(3):
            if k != j:
                basis = basis * (tq - taus[k]) / (taus[j] - taus[k])
        ref.append((w * basis).sum())
    c = tab_coefficients([torch.tensor(v, dtype=F64) for v in hist], torch.tensor(nxt, dtype=F64), "eps", "t",
                         sd_discrete_timestep)
    ref = torch.stack(ref)
    gap = float((c - ref).abs().max() / ref.abs().max())
    assert 1e-10 < gap < 5e-5, gap  # the kinks cost accuracy (a smooth map reaches ~1e-12): ~2e-5 of the largest
