"""DEIS (samplers/deis.py), more: the quadrature's degree, tied model times, the usable-order window."""

from __future__ import annotations

import math

import torch

from preprint.samplers.deis import _usable_order, sample_deis, sd_discrete_timestep, tab_coefficients

F64 = torch.float64


def _chebyshev(x: torch.Tensor, n: int) -> torch.Tensor:
    """T_n(x) by the three-term recurrence T_{k+1} = 2 x T_k - T_{k-1} (valid for any real x)."""
    t0, t1 = torch.ones_like(x), x
    for _ in range(n - 1):
        t0, t1 = t1, 2 * x * t1 - t0
    return t1


def test_weights_are_a_24_point_gauss_rule_exact_through_degree_47_in_log_g():
    """The weights integrate in u = log g with one 24-point Gauss-Legendre rule (the module's ~1e-12 on smooth time
    maps rests on its degree): it is exact for an integrand polynomial in u of degree <= 47 = 2 * 24 - 1.

    Build such an integrand: a step from g_i = 1 (u0 = 0) to g_next = e^-1 (u1 = -1), x = -(2u + 1) mapping it onto
    [-1, 1] (x = -1 at u0, x = 1 at u1), and the model time tau(g) = (T_46(x) - 1) / g. Then tau(g_i) = 0, and for
    the order-2 history (g_a = e^0.1, g_i) the older node's weight is
        C_0 = int_{u0}^{u1} g * (tau - tau_i) / (tau_a - tau_i) du = (1 / tau_a) int_0^{-1} (T_46(x) - 1) du
            = (1 / tau_a) * (-1/2) * int_{-1}^{1} (T_46(x) - 1) dx = (1 / tau_a) * (1 + 1 / 2115),
    using int_{-1}^{1} T_n dx = 2 / (1 - n^2) for even n (46^2 - 1 = 2115). The basis sums to one, so
    C_0 + C_1 = int g du = g_next - g_i. A 23-point rule misses T_46's integral by O(1) (about 0.78 here)."""
    u_a, u0, u1 = 0.1, 0.0, -1.0

    def time_fn(s: torch.Tensor) -> torch.Tensor:
        u = s.to(F64).log()
        x = (2 * u - (u1 + u0)) / (u1 - u0)
        return torch.exp(-u) * (_chebyshev(x, 46) - 1)

    hist = [torch.tensor(math.exp(u_a), dtype=F64), torch.tensor(math.exp(u0), dtype=F64)]
    nxt = torch.tensor(math.exp(u1), dtype=F64)
    tau_a = float(time_fn(hist[0]))
    assert float(time_fn(hist[1])) == 0.0 and tau_a > 1e6
    c = tab_coefficients(hist, nxt, "eps", "t", time_fn)
    assert abs(float(c[0]) * tau_a - (1 + 1 / 2115)) < 1e-11
    assert abs(float(c.sum()) - (math.exp(u1) - math.exp(u0))) < 1e-13


def _gaussian_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact denoiser of x0 ~ N(mu, s^2) per element under VE noise: D = mu + s^2 (x - mu) / (s^2 + sigma^2)."""
    mu, s2 = 0.4, 0.09
    sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return mu + s2 * (x - mu) / (s2 + sig * sig)


def _clamped_sd_time(s: torch.Tensor) -> torch.Tensor:
    """A host time like ComfyUI's ModelSamplingDiscrete.timestep: SD's discrete time, clamped to [0, 999], so every
    sigma below the table's sigma_min (0.0292) has t = 0."""
    return sd_discrete_timestep(s).clamp(0.0, 999.0)


def test_tied_model_times_lower_the_order_to_ddim():
    """The Lagrange window needs strictly monotone nodes: with a clamped host time, sigmas below SD's sigma_min all
    have t = 0, so no window of two or more nodes is usable and every step is DDIM (Eq. 13 with eps frozen):
    x_next = D + sigma_next * (x - D) / sigma for EPS models. A tie taken as monotone would divide by
    t_j - t_k = 0 (NaN). The same holds for a host time that runs the other way (999 - t: ties while increasing)."""
    sig = torch.tensor([0.025, 0.012, 0.006, 0.003, 0.0015], dtype=F64)
    x0 = 0.025 * torch.randn(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    assert bool((_clamped_sd_time(sig) == 0).all())
    want = x0.clone()
    for i in range(len(sig) - 1):
        d = _gaussian_model(want, sig[i] * torch.ones(2, dtype=F64))
        want = d + sig[i + 1] * (want - d) / sig[i]
    for time_fn in (_clamped_sd_time, lambda s: 999.0 - _clamped_sd_time(s)):
        out = sample_deis(_gaussian_model, x0.clone(), sig, disable=True, order=3, poly_space="t", time_fn=time_fn)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, want, rtol=0, atol=1e-14)


def test_usable_order_never_exceeds_the_history():
    """The usable order is the length of the longest trailing window of finite, strictly monotone nodes, so it is
    at most the number of nodes given: 1 for a single node, 3 for three monotone nodes, and 1 where the last two
    nodes tie (clamped time below sigma_min)."""
    one = [torch.tensor(5.0, dtype=F64)]
    three = [torch.tensor(v, dtype=F64) for v in (5.0, 3.0, 2.0)]
    assert _usable_order(one, "eps", "lambda", sd_discrete_timestep) == 1
    assert _usable_order(three, "eps", "lambda", sd_discrete_timestep) == 3
    assert _usable_order(three, "eps", "t", sd_discrete_timestep) == 3
    tied = [torch.tensor(v, dtype=F64) for v in (0.5, 0.02, 0.01)]
    assert _usable_order(tied, "eps", "t", _clamped_sd_time) == 1
    assert _usable_order(tied, "eps", "t", sd_discrete_timestep) == 3
