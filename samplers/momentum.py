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

from ..utils.noise_schedule import Parameterisation, alpha, check_parameterisation
from .common import Evaluation, History, bind_model, check_sigmas, run_steps
from .dpm_solver_pp import (
    FlowLambda,
    MultistepStep,
    MultistepTerms,
    _data_model,
    _multistep_update,
    integration_kind,
    multistep_terms,
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


class HeavyBall:
    """Polyak's heavy ball, ``v_n = (1 - beta) v_{n-1} + beta d_n`` from ``v_0 = d_0`` (paper Eq. 11)."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.velocity: torch.Tensor | None = None

    def __call__(self, direction: torch.Tensor) -> torch.Tensor:
        v = self.velocity
        self.velocity = direction if v is None else (1.0 - self.beta) * v + self.beta * direction
        return self.velocity


def _multistep_direction(denoised: list[torch.Tensor], terms: MultistepTerms, order: int) -> torch.Tensor:
    """Effective data prediction D of a DPM-Solver++ multistep step: x_next = r x - alpha_next phi_1 D."""
    m0 = denoised[-1]
    if order == 1:
        return m0
    if order == 2:
        return m0 + 0.5 * terms.d1
    return m0 - (terms.phi_2 / terms.phi_1) * terms.d1 + (terms.phi_3 / terms.phi_1) * terms.d2


class HeavyBallStep(MultistepStep):
    """DPM-Solver++ multistep whose effective data prediction runs through a heavy ball (Sec. 4.1)."""

    def __init__(self, kind: Parameterisation, order: int, total_steps: int, lower_order_final: bool,
                 beta: float) -> None:
        super().__init__(kind, order, total_steps, lower_order_final)
        self.ball = HeavyBall(beta)

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        k = self.observe(ev)
        denoised, lambdas = self.denoised.items, self.lambdas.items
        if self.ball.beta == 1.0 or ev.sigma_next == 0 or (k == 1 and self.ball.velocity is None):
            # no momentum: exactly the plain solver's arithmetic; the last jump to 0 is the denoised state, and
            # the first-order warm-up step stays plain (the velocity starts at the first multistep direction,
            # as in the official scheduler)
            return _multistep_update(ev.x, denoised, lambdas, ev.sigma, ev.sigma_next, self.kind, k)
        terms = multistep_terms(denoised, lambdas, ev.sigma_next, self.kind, k)
        vel = self.ball(_multistep_direction(denoised, terms, k))
        return (ev.sigma_next / ev.sigma) * ev.x - alpha(ev.sigma_next, self.kind) * terms.phi_1 * vel


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
    data = _data_model(model, extra_args, 0.0, math.inf)
    step = HeavyBallStep(kind, order, len(sigmas) - 1, lower_order_final, beta)
    return run_steps(data, x, sigmas, step, callback, disable)


class PLMSMomentumStep:
    """PLMS (Adams-Bashforth on the noise prediction) in ``y = x / alpha``, ``g = sigma / alpha``, with GHVB or HB."""

    def __init__(self, kind: Parameterisation, order: int, beta: float, momentum: MomentumKind) -> None:
        self.kind, self.order, self.momentum = kind, order, momentum
        self.ball = HeavyBall(beta)
        self.history = History(order)

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        a, a_next = alpha(ev.sigma, self.kind), alpha(ev.sigma_next, self.kind)
        eps = (ev.x - a * ev.denoised) / ev.sigma
        if self.momentum == "ghvb":
            # velocity of the raw evaluations, then beta-dependent AB weights (Eq. 15)
            update = ghvb_mix(self.order, self.history.push(self.ball(eps)), self.ball.beta)
        else:
            # HB: average the AB-k direction itself (Eq. 11)
            update = self.ball(ghvb_mix(self.order, self.history.push(eps), 1.0))
        if ev.sigma_next == 0:
            return ev.denoised
        if a == 0:
            # flow model at sigma = 1 (g infinite): the first step is DDIM, exact in the limit
            return a_next * ev.denoised + ev.sigma_next * update
        # y_next = y + (g_next - g) * update  with y = x / alpha, g = sigma / alpha
        return (a_next / a) * ev.x + (ev.sigma_next - a_next * ev.sigma / a) * update


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
    step = PLMSMomentumStep(kind, k, beta, momentum)
    return run_steps(bind_model(model, extra_args), x, sigmas, step, callback, disable)
