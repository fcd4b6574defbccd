"""DEIS: Diffusion Exponential Integrator Sampler, tAB orders 1 to 3, on the model's own noise schedule.

Paper: Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator", arXiv:2204.13902.

In the coordinates ``y = x / alpha`` and ``g = sigma / alpha`` (the VE noise level) the probability-flow ODE is
``dy/dg = eps(y, g)`` exactly, for EPS models (``alpha = 1``) and flow models (``alpha = 1 - sigma``) alike;
this is the exponential integrator of Eq. (13), with the linear part solved in closed form. tAB (Eq. 15)
extrapolates ``eps`` with the Lagrange polynomial through the last ``order`` evaluations *in the model's time
variable* ``t`` and integrates that polynomial against ``dg``:

    y_next = y_i + sum_j C_ij eps_{i-j},    C_ij = int_{g_i}^{g_next} l_j(t(g)) dg.

ComfyUI's ``deis`` computes C from a fixed VP mapping of sigma 0.002..80. Here ``t(sigma)`` is the model's
own time (``model_sampling.timestep`` for a ComfyUI model; ``t = sigma`` for flow models; the SD1.x / SDXL
discrete schedule when nothing else is known) and C is integrated numerically on the actual sigma list, in
``log g`` by Gauss-Legendre quadrature, so any sigma list gives the right weights. ``poly_space`` can also
pick ``"lambda"`` (log-SNR: the polynomial variable of DPM-Solver) or ``"rho"`` (``g`` itself, the paper's
rho-AB). The default is ``"lambda"``: on the exact-score benchmark (benchmarks/samplers_accuracy.py) it was
more accurate than ``"t"`` on SD-style and flow schedules alike.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch

from ..utils.noise_schedule import Parameterisation, alpha, check_parameterisation, sigma_from_half_log_snr
from .common import Evaluation, History, bind_model, check_sigmas, run_steps
from .schedules import sd_alphas_cumprod

PolySpace = Literal["t", "lambda", "rho"]
POLY_SPACES: tuple[str, ...] = ("t", "lambda", "rho")
TimeFn = Callable[[torch.Tensor], torch.Tensor]

# Gauss-Legendre nodes per step: on a smooth time map the integrand is smooth in log g and 24 nodes reach ~1e-12;
# SD's discrete time is piecewise linear in log sigma (a kink per training step), where "t" weights reach ~2e-5
_GL_NODES = 24


@functools.lru_cache(maxsize=1)
def _sd_log_sigmas() -> torch.Tensor:
    """log sigma of the 1000-step "scaled linear" VP schedule of SD1.x / SDXL."""
    acp = sd_alphas_cumprod()
    return (((1 - acp) / acp) ** 0.5).log()


def sd_discrete_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """Model time t in [0, 999] of a VE sigma on the SD discrete schedule, interpolated in log sigma.

    This mirrors ``ModelSamplingDiscrete.timestep`` without clamping, so t stays strictly monotone beyond the
    table (linear extrapolation in log sigma), which the Lagrange basis needs.
    """
    table = _sd_log_sigmas().to(sigma.device)
    ls = sigma.to(torch.float64).log().reshape(-1)
    idx = torch.searchsorted(table, ls).clamp(1, len(table) - 1)
    lo, hi = table[idx - 1], table[idx]
    t = (idx - 1) + (ls - lo) / (hi - lo)
    return t.reshape(sigma.shape)


def default_time_fn(kind: Parameterisation) -> TimeFn:
    """The model time for a parameterisation when the host gives none: flow t = sigma; EPS: SD's schedule."""
    if kind == "flow":
        return lambda s: s.to(torch.float64)
    return sd_discrete_timestep


def _poly_var(sigma: torch.Tensor, kind: Parameterisation, space: str, time_fn: TimeFn) -> torch.Tensor:
    sigma = sigma.to(torch.float64)
    if space == "t":
        return time_fn(sigma).to(torch.float64)
    g = sigma / alpha(sigma, kind)
    return -g.log() if space == "lambda" else g


@functools.lru_cache(maxsize=4)
def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights on [-1, 1] (Golub-Welsch: eigen-decomposition of the Jacobi matrix)."""
    k = torch.arange(1, n, dtype=torch.float64)
    off = k / torch.sqrt(4 * k**2 - 1)
    jac = torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vecs = torch.linalg.eigh(jac)
    return nodes, 2 * vecs[0] ** 2


def tab_coefficients(sigma_hist: list[torch.Tensor], sigma_next: torch.Tensor, kind: Parameterisation,
                     space: str, time_fn: TimeFn) -> torch.Tensor:
    """C_j = int_{g_i}^{g_next} l_j(tau(g)) dg for the Lagrange basis through ``sigma_hist`` (newest last).

    The integral runs in u = log g (dg = g du); the nodes' tau values must be distinct and finite. Returns a
    float64 vector on the sigmas' device: ComfyUI hands samplers sigmas on the model's device, and the
    quadrature must stay there (no host round trip per coefficient).
    """
    taus = torch.stack([_poly_var(s, kind, space, time_fn) for s in sigma_hist])
    s_i = sigma_hist[-1].to(torch.float64)
    s_n = sigma_next.to(torch.float64)
    u0 = (s_i / alpha(s_i, kind)).log()
    u1 = (s_n / alpha(s_n, kind)).log()
    nodes, weights = (v.to(s_i.device) for v in _gauss_legendre(_GL_NODES))
    u = 0.5 * (u1 - u0) * nodes + 0.5 * (u1 + u0)
    sig_q = sigma_from_half_log_snr(-u, kind)
    tau_q = _poly_var(sig_q, kind, space, time_fn).to(s_i.device)
    w = weights * 0.5 * (u1 - u0) * u.exp()  # dg = g du
    taus = taus.to(s_i.device)
    coeffs = []
    for j in range(len(taus)):
        basis = torch.ones_like(tau_q)
        for k in range(len(taus)):
            if k != j:
                basis = basis * (tau_q - taus[k]) / (taus[j] - taus[k])
        coeffs.append((w * basis).sum())
    return torch.stack(coeffs)


def _usable_order(sigma_hist: list[torch.Tensor], kind: Parameterisation, space: str, time_fn: TimeFn) -> int:
    """Largest trailing history whose polynomial nodes are finite and strictly monotone."""
    taus = [float(_poly_var(s, kind, space, time_fn)) for s in sigma_hist]
    k = 1
    while k < len(taus):
        window = taus[-(k + 1):]
        if not all(math.isfinite(v) for v in window):
            break
        diffs = [b - a for a, b in zip(window[:-1], window[1:], strict=True)]
        if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
            break
        k += 1
    return k


class DEISStep:
    """tAB as a step of :func:`run_steps`: keeps the newest ``order`` noise predictions and their sigmas."""

    def __init__(self, kind: Parameterisation, order: int, total_steps: int, poly_space: str, time_fn: TimeFn,
                 lower_order_final: bool) -> None:
        self.kind, self.total_steps, self.poly_space, self.time_fn = kind, total_steps, poly_space, time_fn
        self.lower_order_final = lower_order_final
        self.eps = History(order)
        self.sigmas = History(order)

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        kind, sigma_next = self.kind, ev.sigma_next
        a, a_next = alpha(ev.sigma, kind), alpha(sigma_next, kind)
        eps = (ev.x - a * ev.denoised) / ev.sigma
        hist_eps = self.eps.push(eps)
        hist_sig = self.sigmas.push(ev.sigma)
        k = min(len(hist_eps), _usable_order(hist_sig, kind, self.poly_space, self.time_fn))
        if self.lower_order_final and self.total_steps < 10:
            k = min(k, self.total_steps - ev.i)
        if sigma_next == 0:
            # the last jump is the data prediction itself (the limit g -> 0 of the first-order step)
            return ev.denoised
        if k == 1 or a == 0:
            # DDIM (Eq. 13 with eps frozen), written so a flow model at sigma = 1 (alpha = 0) is exact
            return a_next * ev.denoised + sigma_next * eps
        c = tab_coefficients(hist_sig[-k:], sigma_next, kind, self.poly_space, self.time_fn)
        # y_next = y_i + sum_j C_j eps_j, mapped back with x = alpha y
        y = ev.x / a
        for cj, ej in zip(c, hist_eps[-k:], strict=True):
            y = y + cj * ej
        return a_next * y


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, order: int = 3,
                parameterisation: Parameterisation = "eps", poly_space: PolySpace = "lambda",
                time_fn: TimeFn | None = None, lower_order_final: bool = True, **_ignored):
    """DEIS tAB (Zhang & Chen, arXiv:2204.13902, Eq. 15) with coefficients on the model's own schedule."""
    if order not in (1, 2, 3):
        raise ValueError(f"DEIS order must be 1, 2 or 3, got {order}")
    if poly_space not in POLY_SPACES:
        raise ValueError(f"DEIS poly_space must be one of {POLY_SPACES}, got {poly_space!r}")
    kind = check_parameterisation(parameterisation)
    sigmas = check_sigmas(sigmas, "DEIS")
    time_fn = default_time_fn(kind) if time_fn is None else time_fn
    step = DEISStep(kind, order, len(sigmas) - 1, poly_space, time_fn, lower_order_final)
    return run_steps(bind_model(model, extra_args), x, sigmas, step, callback, disable)
