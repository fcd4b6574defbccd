"""Heavy-Ball (HB) and Generalised Heavy-Ball (GHVB) momentum for multistep diffusion solvers.

Paper: Wizadwongsa et al., "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts",
arXiv:2307.11118 (official code: sWizad/momentum-diffusion).

High-order multistep solvers take large, oscillating steps when few steps are used with strong guidance;
the paper damps them with Polyak's heavy ball. Two forms:

* HB (Sec. 4.1): the solver's own update direction ``d_n`` (the order-k combination of past evaluations) is
  averaged, ``v_n = (1 - beta) v_{n-1} + beta d_n``, and the step uses ``v_n``. Here it is applied to
  DPM-Solver++ 2M / 3M in data prediction, as the paper does with DPM-Solver++: ``d_n`` is the effective
  data prediction of the multistep rule, ``x_{n+1} = (sigma_{n+1}/sigma_n) x_n - alpha_{n+1} phi_1 v_n``.
* GHVB (Sec. 4.2): the momentum is taken first, ``v_n = (1 - beta) v_{n-1} + beta eps_n``, and an
  Adams-Bashforth-like rule whose coefficients depend on beta (so that order k is kept) combines the
  velocities: PLMS in the VE coordinates ``y = x / alpha``, ``g = sigma / alpha`` (``dy/dg = eps``).

A fractional order picks both: 3.7 means order 4 with beta 0.7; an integer order means beta = 1, which is
the plain solver (same code path, bit for bit).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..utils.noise_schedule import Parameterisation, alpha, check_parameterisation, half_log_snr
from .common import check_sigmas, progress, step_callback
from .dpm_solver_pp import (
    FlowLambda,
    _data_model,
    _multistep_update,
    effective_order,
    finite_tail,
    integration_kind,
)

MomentumKind = Literal["hb", "ghvb"]


def split_fractional_order(order: float) -> tuple[int, float]:
    """The paper's convention: order 3.7 = AB order 4 with beta 0.7; 2.0 = order 2, beta 1 (no momentum)."""
    if not math.isfinite(order) or order <= 0:
        raise ValueError(f"momentum order must be a positive number such as 2.5 or 3.7, got {order}")
    whole = math.floor(order)
    frac = order - whole
    if frac < 1e-9:
        return int(whole), 1.0
    return int(whole) + 1, float(frac)


def check_beta(beta: float) -> float:
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"momentum beta must be in (0, 1] (1 = no momentum), got {beta}")
    return float(beta)


def ghvb_mix(order: int, hist: list[torch.Tensor], b: float) -> torch.Tensor:
    """Adams-Bashforth combination with the GHVB coefficients (paper Eq. 15, Table 1), newest last.

    With ``b = 1`` these are the classical AB weights (order 2: 3/2, -1/2; order 3: 23/12, -16/12, 5/12).
    """
    k = min(order, len(hist))
    e = hist[::-1]  # newest first
    if k == 1:
        return e[0]
    if k == 2:
        return ((2 + b) * e[0] - (2 - b) * e[1]) / (2 * b)
    if k == 3:
        return ((18 + 5 * b) * e[0] - (24 - 8 * b) * e[1] + (6 - b) * e[2]) / (12 * b)
    if k == 4:
        return ((46 + 9 * b) * e[0] - (78 - 19 * b) * e[1] + (42 - 5 * b) * e[2] - (10 - b) * e[3]) / (24 * b)
    raise ValueError(f"GHVB supports orders 1 to 4, got {k}")


def _multistep_direction(denoised: list[torch.Tensor], lambdas: list[torch.Tensor], sigma_next: torch.Tensor,
                         kind: Parameterisation, order: int) -> torch.Tensor:
    """Effective data prediction D of a DPM-Solver++ multistep step: x_next = r x - alpha_next phi_1 D."""
    m0 = denoised[-1]
    if order == 1:
        return m0
    h = half_log_snr(sigma_next, kind) - lambdas[-1]
    r0 = (lambdas[-1] - lambdas[-2]) / h
    d1_0 = (m0 - denoised[-2]) / r0
    if order == 2:
        return m0 + 0.5 * d1_0
    phi_1 = torch.expm1(-h)
    r1 = (lambdas[-2] - lambdas[-3]) / h
    d1_1 = (denoised[-2] - denoised[-3]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    return m0 - (phi_2 / phi_1) * d1 + (phi_3 / phi_1) * d2


@torch.no_grad()
def sample_dpmpp_hb(model, x, sigmas, extra_args=None, callback=None, disable=None, order: int = 2,
                    beta: float = 0.8, parameterisation: Parameterisation = "eps", lower_order_final: bool = True,
                    flow_lambda: FlowLambda = "auto", **_ignored):
    """DPM-Solver++ 2M / 3M with Polyak heavy-ball momentum (Wizadwongsa et al., arXiv:2307.11118, Sec. 4.1)."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ momentum order must be 1, 2 or 3, got {order}")
    beta = check_beta(beta)
    kind = integration_kind(check_parameterisation(parameterisation), flow_lambda)
    sigmas = check_sigmas(sigmas, "DPM-Solver++ heavy ball")
    data = _data_model(model, {} if extra_args is None else extra_args, 0.0, math.inf)
    s_in = x.new_ones([x.shape[0]])
    total = len(sigmas) - 1
    hist_x0: list[torch.Tensor] = []
    hist_lam: list[torch.Tensor] = []
    vel: torch.Tensor | None = None
    for i in progress(total, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = data(x, sigma * s_in)
        step_callback(callback, x, i, sigma, denoised)
        hist_x0 = (hist_x0 + [denoised])[-order:]
        hist_lam = (hist_lam + [half_log_snr(sigma, kind)])[-order:]
        k = effective_order(i, total, order, finite_tail(hist_lam), lower_order_final)
        if beta == 1.0 or sigma_next == 0 or (k == 1 and vel is None):
            # no momentum: exactly the plain solver's arithmetic; the last jump to 0 is the denoised state, and
            # the first-order warm-up step stays plain (the velocity starts at the first multistep direction,
            # as in the official scheduler)
            x = _multistep_update(x, hist_x0, hist_lam, sigma, sigma_next, kind, k)
            continue
        direction = _multistep_direction(hist_x0, hist_lam, sigma_next, kind, k)
        vel = direction if vel is None else (1.0 - beta) * vel + beta * direction
        h = half_log_snr(sigma_next, kind) - hist_lam[-1]
        x = (sigma_next / sigma) * x - alpha(sigma_next, kind) * torch.expm1(-h) * vel
    return x


@torch.no_grad()
def sample_plms_momentum(model, x, sigmas, extra_args=None, callback=None, disable=None, order: float = 3.7,
                         momentum: MomentumKind = "ghvb", parameterisation: Parameterisation = "eps", **_ignored):
    """PLMS with GHVB or HB momentum and a fractional order (Wizadwongsa et al., arXiv:2307.11118, Sec. 4)."""
    if momentum not in ("hb", "ghvb"):
        raise ValueError(f"momentum must be 'hb' or 'ghvb', got {momentum!r}")
    k, beta = split_fractional_order(order)
    if k > 4:
        raise ValueError(f"momentum order must be at most 4 (4.0 = fourth-order PLMS), got {order}")
    kind = check_parameterisation(parameterisation)
    sigmas = check_sigmas(sigmas, "PLMS momentum")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    hist: list[torch.Tensor] = []
    vel: torch.Tensor | None = None
    for i in progress(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        step_callback(callback, x, i, sigma, denoised)
        a, a_next = alpha(sigma, kind), alpha(sigma_next, kind)
        eps = (x - a * denoised) / sigma
        if momentum == "ghvb":
            # velocity of the raw evaluations, then beta-dependent AB weights (Eq. 15)
            vel = eps if vel is None else (1.0 - beta) * vel + beta * eps
            hist = (hist + [vel])[-k:]
            update = ghvb_mix(k, hist, beta)
        else:
            # HB: average the AB-k direction itself (Eq. 11)
            hist = (hist + [eps])[-k:]
            direction = ghvb_mix(k, hist, 1.0)
            vel = direction if vel is None else (1.0 - beta) * vel + beta * direction
            update = vel
        if sigma_next == 0:
            x = denoised
        elif a == 0:
            # flow model at sigma = 1 (g infinite): the first step is DDIM, exact in the limit
            x = a_next * denoised + sigma_next * update
        else:
            # y_next = y + (g_next - g) * update  with y = x / alpha, g = sigma / alpha
            x = (a_next / a) * x + (sigma_next - a_next * sigma / a) * update
    return x
