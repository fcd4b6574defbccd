"""DPM-Solver++ in data prediction: multistep 2M / 3M, singlestep 2S / 3S, dynamic thresholding.

Paper: Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
arXiv:2211.01095. The update rules are Algorithm 2 (2M), the third-order multistep rule of the official
implementation (also k-diffusion's and diffusers'), Algorithm 1 (2S, r1 = 1/2) and the third-order singlestep rule
(3S, r1 = 1/3, r2 = 2/3),
written for ``x = alpha(sigma) x0 + sigma eps`` so that flow (CONST) models, where ``alpha = 1 - sigma``,
can be integrated in their true half log-SNR ``lambda = log(alpha / sigma)``.
For EPS models (``alpha = 1``) the 2M update is the same arithmetic as ComfyUI's ``dpmpp_2m``.

``flow_lambda`` chooses the variable a flow model is integrated in: ``"log_snr"`` (the paper's
lambda = log((1 - sigma) / sigma)) or ``"sigma"`` (lambda = -log sigma with alpha = 1, the formula ComfyUI's
core samplers apply to every model; it integrates the same ODE ``dx/dsigma = (x - D) / sigma`` and differs
only in which variable the data prediction is treated as polynomial in). A schedule that starts at sigma = 1
has lambda = -inf there, so with log_snr the first interval cannot inform a derivative estimate (multistep
warm-up runs orders 1, 1, 2, 3: the longest finite trailing window) and singlestep cannot place intermediate
points in it. ``"auto"`` (the default) is log_snr for multistep and sigma for singlestep. Measured by
benchmarks/samplers_accuracy.py against the exact sigma-0 solution: on the shifted-linear flow schedules users
run the choice changes the error by at most a few percent (the final jump from the last non-zero sigma
dominates); on log-SNR-uniform steps log_snr is several times more accurate for 2M / 3M, and sigma more accurate
for 3S in most cells.

The official 3M rule weights its second divided difference ``D2`` (about ``h^2 x0'' / 2``) by ``-phi_3``, where the
exact integral of the quadratic through the last three predictions needs ``-2 phi_3``: one step's local error is
O(h^3), so 3M is second order overall despite its name (measured on a Gaussian from an exact history:
tests/unit/test_dpm_solver_pp_reference.py). It is kept as it is so that results match the other implementations.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from ..utils.noise_schedule import (
    Parameterisation,
    alpha,
    check_parameterisation,
    half_log_snr,
    sigma_from_half_log_snr,
)
from .common import Evaluation, History, bind_model, check_sigmas, run_steps

FlowLambda = Literal["auto", "log_snr", "sigma"]
FLOW_LAMBDAS: tuple[str, ...] = ("auto", "log_snr", "sigma")


def integration_kind(kind: Parameterisation, flow_lambda: str, singlestep: bool = False) -> Parameterisation:
    """The alpha / lambda convention a solver steps in; ``"sigma"`` treats a flow model with the VE formula."""
    if flow_lambda not in FLOW_LAMBDAS:
        raise ValueError(f"flow_lambda must be one of {FLOW_LAMBDAS}, got {flow_lambda!r}")
    if flow_lambda == "auto":
        flow_lambda = "sigma" if singlestep else "log_snr"
    return "eps" if (kind == "flow" and flow_lambda == "sigma") else kind


def dynamic_threshold(x0: torch.Tensor, percentile: float, max_value: float = math.inf,
                      floor: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding of a data prediction (Saharia et al., arXiv:2205.11487, Sec. 2.3).

    Per sample, ``s = clamp(quantile_p(|x0|), floor, max_value)``; ``x0`` is clipped to ``[-s, s]`` and divided
    by ``s``, so pixels are pulled back into [-1, 1] without the saturation of a hard clip. ``floor`` is the
    official DPM-Solver++ ``thresholding_max_val`` (``s = max(quantile, max_val)``, default 1, which is
    Imagen's rule); ``max_value`` is an optional ceiling on ``s`` (diffusers' ``sample_max_value``), off at
    infinity. Meant for pixel-space models whose data lives in [-1, 1]; latent-space models should leave it off.
    """
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic thresholding percentile must be in (0, 1], got {percentile}")
    if not (floor > 0.0 and math.isfinite(floor)):
        raise ValueError(f"dynamic thresholding floor (thresholding_max_val) must be > 0, got {floor}")
    if max_value < floor:
        raise ValueError(f"dynamic thresholding max value ({max_value}) must be >= the floor ({floor})")
    flat = x0.abs().flatten(1).float()
    s = torch.quantile(flat, percentile, dim=1).to(x0.dtype).clamp(min=floor, max=max_value)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def _data_model(model, extra_args: dict | None, threshold_percentile: float, threshold_max: float,
                threshold_floor: float = 1.0):
    """``model`` with optional dynamic thresholding of every data prediction (the paper's Sec. 4 setting)."""
    denoise = bind_model(model, extra_args)
    if threshold_percentile <= 0.0:
        return denoise
    return lambda x, sigma: dynamic_threshold(denoise(x, sigma), threshold_percentile, threshold_max, threshold_floor)


class MultistepTerms(NamedTuple):
    """The pieces of a DPM-Solver++ multistep step that its update and its effective data prediction share."""

    h: torch.Tensor  # lambda_next - lambda
    phi_1: torch.Tensor  # e^{-h} - 1
    d1: torch.Tensor | None = None  # order 2: (m0 - m1) / r0; order 3: the extrapolated first difference
    d2: torch.Tensor | None = None  # order 3: the second difference
    phi_2: torch.Tensor | None = None
    phi_3: torch.Tensor | None = None


def multistep_terms(denoised: list[torch.Tensor], lambdas: list[torch.Tensor], sigma_next: torch.Tensor,
                    kind: Parameterisation, order: int) -> MultistepTerms:
    """Step size, exponential-integrator weights and divided differences of an order-``order`` step.

    ``denoised`` and ``lambdas`` are newest-last histories; ``lambdas[-1]`` belongs to the current sigma.
    """
    h = half_log_snr(sigma_next, kind) - lambdas[-1]
    phi_1 = torch.expm1(-h)
    if order == 1:
        return MultistepTerms(h, phi_1)
    m0 = denoised[-1]
    r0 = (lambdas[-1] - lambdas[-2]) / h
    d1_0 = (m0 - denoised[-2]) / r0
    if order == 2:
        return MultistepTerms(h, phi_1, d1_0)
    r1 = (lambdas[-2] - lambdas[-3]) / h
    d1_1 = (denoised[-2] - denoised[-3]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    return MultistepTerms(h, phi_1, d1, d2, phi_2, phi_3)


def _multistep_update(
    x: torch.Tensor,
    denoised: list[torch.Tensor],
    lambdas: list[torch.Tensor],
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    kind: Parameterisation,
    order: int,
) -> torch.Tensor:
    """One DPM-Solver++ multistep update of the given order from the newest ``order`` data predictions."""
    m0 = denoised[-1]
    if sigma_next == 0:
        # lambda_next = +inf: every exponential-integrator weight collapses onto x0 (the limit of Eq. 9).
        return m0
    alpha_next = alpha(sigma_next, kind)
    t = multistep_terms(denoised, lambdas, sigma_next, kind, order)
    x_next = (sigma_next / sigma) * x - alpha_next * t.phi_1 * m0
    if order == 1:
        return x_next
    if order == 2:
        return x_next - 0.5 * alpha_next * t.phi_1 * t.d1
    return x_next + alpha_next * t.phi_2 * t.d1 - alpha_next * t.phi_3 * t.d2


def finite_tail(lambdas: list[torch.Tensor]) -> int:
    """How many of the newest entries of a lambda history are finite (the usable multistep window).

    A flow schedule starting at sigma = 1 has lambda = -inf there; only that entry is unusable, so the order
    must drop to the longest finite trailing window, not to 1 while it stays in the history.
    """
    n = 0
    for lam in reversed(lambdas):
        if not bool(torch.isfinite(lam).all()):
            break
        n += 1
    return n


def effective_order(step: int, total_steps: int, order: int, history: int, lower_order_final: bool) -> int:
    """Order actually used at ``step``: warm-up from the usable history, lower order on the last steps of short runs.

    ``history`` is the number of newest evaluations the rule may combine (see :func:`finite_tail`). Lower-order
    final steps follow the official code: with fewer than 10 steps the last ``order - 1`` steps drop to order
    ``total_steps - step``, which keeps few-step sampling stable.
    """
    k = min(order, history)
    if lower_order_final and total_steps < 10:
        k = min(k, total_steps - step)
    return max(k, 1)


class MultistepStep:
    """DPM-Solver++ multistep as a step of :func:`run_steps`: keeps the newest ``order`` data predictions and
    their lambdas, and picks the order each step can use."""

    def __init__(self, kind: Parameterisation, order: int, total_steps: int, lower_order_final: bool) -> None:
        self.kind, self.order, self.total_steps, self.lower_order_final = kind, order, total_steps, lower_order_final
        self.denoised = History(order)
        self.lambdas = History(order)

    def observe(self, ev: Evaluation) -> int:
        """Record an evaluation; returns the order the step from it can use."""
        self.denoised.push(ev.denoised)
        lambdas = self.lambdas.push(half_log_snr(ev.sigma, self.kind))
        return effective_order(ev.i, self.total_steps, self.order, finite_tail(lambdas), self.lower_order_final)

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        k = self.observe(ev)
        return _multistep_update(ev.x, self.denoised.items, self.lambdas.items, ev.sigma, ev.sigma_next, self.kind,
                                 k)


@torch.no_grad()
def sample_dpmpp_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, order: int = 2,
                           parameterisation: Parameterisation = "eps", lower_order_final: bool = True,
                           flow_lambda: FlowLambda = "auto", threshold_percentile: float = 0.0,
                           threshold_max: float = math.inf, threshold_floor: float = 1.0):
    """DPM-Solver++ multistep (2M / 3M) in data prediction (Lu et al., arXiv:2211.01095)."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ multistep order must be 1, 2 or 3, got {order}")
    kind = integration_kind(check_parameterisation(parameterisation), flow_lambda)
    sigmas = check_sigmas(sigmas, "DPM-Solver++ multistep")
    data = _data_model(model, extra_args, threshold_percentile, threshold_max, threshold_floor)
    step = MultistepStep(kind, order, len(sigmas) - 1, lower_order_final)
    return run_steps(data, x, sigmas, step, callback, disable)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None,
                    parameterisation: Parameterisation = "eps", lower_order_final: bool = False, **options):
    """DPM-Solver++(2M) (Lu et al., arXiv:2211.01095, Algorithm 2)."""
    return sample_dpmpp_multistep(model, x, sigmas, extra_args, callback, disable, order=2,
                                  parameterisation=parameterisation, lower_order_final=lower_order_final, **options)


@torch.no_grad()
def sample_dpmpp_3m(model, x, sigmas, extra_args=None, callback=None, disable=None,
                    parameterisation: Parameterisation = "eps", lower_order_final: bool = True, **options):
    """DPM-Solver++(3M) (Lu et al., arXiv:2211.01095, third-order multistep)."""
    return sample_dpmpp_multistep(model, x, sigmas, extra_args, callback, disable, order=3,
                                  parameterisation=parameterisation, lower_order_final=lower_order_final, **options)


def _first_order(x: torch.Tensor, m0: torch.Tensor, sigma: torch.Tensor, lam: torch.Tensor, sigma_next: torch.Tensor,
                 lam_next: torch.Tensor, kind: Parameterisation) -> torch.Tensor:
    """DDIM in data prediction (Eq. 9 with k = 1); valid from alpha = 0 (flow at sigma = 1) as well."""
    if sigma_next == 0:
        return m0
    return (sigma_next / sigma) * x - alpha(sigma_next, kind) * torch.expm1(lam - lam_next) * m0


def singlestep_update(data, x: torch.Tensor, m0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                      kind: Parameterisation, order: int, s_in: torch.Tensor) -> torch.Tensor:
    """One DPM-Solver++ singlestep update (order 2: Algorithm 1 with r1 = 1/2; order 3: r1 = 1/3, r2 = 2/3).

    ``m0`` is the data prediction at ``(x, sigma)``; the intermediate points sit at fractions of the step in
    lambda and cost ``order - 1`` further model calls. Steps whose lambda is not finite (``sigma_next = 0``,
    or a flow model at ``sigma = 1``) are first order: no intermediate point can be placed there.
    """
    lam, lam_next = half_log_snr(sigma, kind), half_log_snr(sigma_next, kind)
    if order == 1 or not (torch.isfinite(lam) and torch.isfinite(lam_next)):
        return _first_order(x, m0, sigma, lam, sigma_next, lam_next, kind)
    h = lam_next - lam
    a_t = alpha(sigma_next, kind)
    phi_1 = torch.expm1(-h)
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    lam_1 = lam + r1 * h
    s_1 = sigma_from_half_log_snr(lam_1, kind)
    u1 = (s_1 / sigma) * x - alpha(s_1, kind) * torch.expm1(-r1 * h) * m0
    m1 = data(u1, s_1 * s_in)
    if order == 2:
        # Algorithm 1: x0 is linear in lambda through (lambda, m0) and (lambda + h / 2, m1)
        return (sigma_next / sigma) * x - a_t * phi_1 * m0 - (0.5 / r1) * a_t * phi_1 * (m1 - m0)
    r2 = 2.0 / 3.0
    s_2 = sigma_from_half_log_snr(lam + r2 * h, kind)
    phi_22 = torch.expm1(-r2 * h) / (r2 * h) + 1.0
    # second intermediate: first-order Taylor term of x0 estimated from (m1 - m0) / (r1 h)
    u2 = (s_2 / sigma) * x - alpha(s_2, kind) * torch.expm1(-r2 * h) * m0 \
        + (r2 / r1) * alpha(s_2, kind) * phi_22 * (m1 - m0)
    m2 = data(u2, s_2 * s_in)
    phi_2 = phi_1 / h + 1.0
    # sigma_t int e^lambda (lambda - lambda_s) dlambda = alpha_t h phi_2; slope from (m2 - m0) / (r2 h)
    return (sigma_next / sigma) * x - a_t * phi_1 * m0 + (1.0 / r2) * a_t * phi_2 * (m2 - m0)


@torch.no_grad()
def sample_dpmpp_singlestep(model, x, sigmas, extra_args=None, callback=None, disable=None, order: int = 2,
                            parameterisation: Parameterisation = "eps", flow_lambda: FlowLambda = "auto",
                            threshold_percentile: float = 0.0, threshold_max: float = math.inf,
                            threshold_floor: float = 1.0, **_ignored):
    """DPM-Solver++ singlestep (2S / 3S) in data prediction (Lu et al., arXiv:2211.01095, Algorithm 1).

    Every interval of the sigma list is one step of ``order`` model calls (the last step to sigma = 0 is a
    single call), so 2S costs about twice the model calls of 2M for the same list.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ singlestep order must be 1, 2 or 3, got {order}")
    kind = integration_kind(check_parameterisation(parameterisation), flow_lambda, singlestep=True)
    sigmas = check_sigmas(sigmas, "DPM-Solver++ singlestep")
    data = _data_model(model, extra_args, threshold_percentile, threshold_max, threshold_floor)
    s_in = x.new_ones([x.shape[0]])

    def step(ev: Evaluation) -> torch.Tensor:
        return singlestep_update(data, ev.x, ev.denoised, ev.sigma, ev.sigma_next, kind, order, s_in)

    return run_steps(data, x, sigmas, step, callback, disable)
