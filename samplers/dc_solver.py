"""DC-Solver: UniPC (B2(h)) with dynamic compensation, and the search for its compensation ratios (pure torch).

Paper: Zhao et al., "DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic Compensation",
arXiv:2409.03755. The base solver is UniPC (Zhao et al., arXiv:2302.04867): a multistep predictor (UniP) and a
corrector (UniC) in data prediction, with the B(h) = e^h - 1 variant ("bh2"). The corrector reuses the model call at
the predicted state, so a run of N steps costs N model calls.

Dynamic compensation (Sec. 3.2): the predictor-corrector pair is misaligned because the newest model output is
evaluated at the *predicted* state, not the corrected one. DC-Solver replaces the newest data prediction by the
Lagrange interpolation through the last three (lambda, data prediction) pairs, evaluated at
``lambda' = rho_i (lambda_i - lambda_{i-1}) + lambda_{i-1}``; ``rho_i = 1`` returns the newest output unchanged,
so all-ones ratios are plain UniPC. Here the interpolation variable is the solver's own half log-SNR lambda.
The ratios are found per step (from index 2, where three outputs exist) by differentiating the sampler's end point
with respect to rho and minimising the mean squared error to a many-step reference from the same noise (Sec. 3.3:
AdamW, lr 0.1, 20 iterations, about 10 samples). The paper's cascade polynomial regression (CPR), which predicts
rho from (step, NFE, CFG) without a search, is in ``samplers/dc_cpr.py``; ``compensated`` says which steps' ratios
act, the only ones a fit may use.

Sigmas: ``parameterisation="eps"`` integrates in lambda = -log sigma with alpha = 1, the same arithmetic as
ComfyUI's ``uni_pc`` (which converts every model to that VE form); ``"flow"`` uses a flow model's true
lambda = log((1 - sigma) / sigma). A final sigma of 0 is replaced by ``final_sigma`` (0.001, as ComfyUI's uni_pc
does: the multistep weights diverge at lambda = +inf; half the last sigma when that is smaller) and the state
there is returned, divided by alpha.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..utils.noise_schedule import Parameterisation, alpha, check_parameterisation, half_log_snr
from .common import bind_model, check_sigmas, progress, step_callback

log = logging.getLogger(__name__)

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FINAL_SIGMA = 0.001
FIRST_COMPENSATED = 2  # the interpolation needs three outputs: indices i, i-1, i-2


def compensation_weights(lams: list[torch.Tensor], rho: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Lagrange weights (newest, previous, oldest) at ``lambda' = rho (lam_i - lam_{i-1}) + lam_{i-1}``.

    Written in the differences d1 = lam_i - lam_{i-1}, d2 = lam_{i-1} - lam_{i-2}, so that rho = 1 gives the weights
    (1, 0, 0) exactly in floating point and the compensated output equals the newest one bit for bit.
    """
    lam_c, lam_b, lam_a = lams[-3], lams[-2], lams[-1]
    d1, d2 = lam_a - lam_b, lam_b - lam_c
    t_a = (rho - 1.0) * d1  # lambda' - lam_i
    t_b = rho * d1  # lambda' - lam_{i-1}
    t_c = rho * d1 + d2  # lambda' - lam_{i-2}
    w_a = (t_b * t_c) / (d1 * (d1 + d2))
    w_b = (t_a * t_c) / (-d1 * d2)
    w_c = (t_a * t_b) / ((d1 + d2) * d2)
    return w_a, w_b, w_c


class UniCoefficients(NamedTuple):
    h_phi_1: torch.Tensor  # e^{-h} - 1
    b_h: torch.Tensor  # B(h) = e^{-h} - 1 for bh2
    rks: list[torch.Tensor]  # (lam_{s-k} - lam_s) / h, k = 1 .. order-1
    rhos_p: torch.Tensor | None  # predictor weights of the divided differences
    rhos_c: torch.Tensor  # corrector weights (last one multiplies the new output's difference)


def uni_coefficients(lams: list[torch.Tensor], lam_t: torch.Tensor, order: int) -> UniCoefficients:
    """UniP / UniC weights for a step from ``lams[-1]`` to ``lam_t`` using the newest ``order`` outputs.

    The order conditions of UniPC (arXiv:2302.04867, Eq. 8 and Alg. 2/3): R rho = b with R_{ik} = r_k^{i-1} and
    b_i = i! h phi_{i+1}(h) / B(h); order 2 uses the closed form rho_p = 1/2, order 1 corrector rho_c = 1/2.
    """
    h = lam_t - lams[-1]
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)
    rks = [(lams[-1 - k] - lams[-1]) / h for k in range(1, order)]
    r = torch.stack([*rks, torch.ones_like(h)])
    rows, b = [], []
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    for i in range(1, order + 1):
        rows.append(r ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    big_r, bvec = torch.stack(rows), torch.stack(b)
    if order == 1:
        return UniCoefficients(h_phi_1, b_h, rks, None, torch.full_like(h, 0.5).reshape(1))
    rhos_p = torch.full_like(h, 0.5).reshape(1) if order == 2 else torch.linalg.solve(big_r[:-1, :-1], bvec[:-1])
    return UniCoefficients(h_phi_1, b_h, rks, rhos_p, torch.linalg.solve(big_r, bvec))


def _weighted(weights: torch.Tensor, terms: list[torch.Tensor]) -> torch.Tensor | float:
    out: torch.Tensor | float = 0.0
    for w, d in zip(weights, terms, strict=True):
        out = out + w * d
    return out


def dc_unipc(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, ratios: torch.Tensor | None = None,
             order: int = 2, parameterisation: Parameterisation = "eps", lower_order_final: bool = True,
             final_sigma: float = FINAL_SIGMA, callback: Callable | None = None,
             disable: bool | None = True) -> torch.Tensor:
    """UniPC-bh2 (predictor + corrector, data prediction) with DC-Solver compensation; differentiable in ``ratios``.

    ``ratios``: one rho per step (``len(sigmas) - 1``); entries before index 2 are unused (no three outputs yet),
    as are steps whose three lambdas are not all finite (a flow model's sigma = 1). ``None`` = plain UniPC.
    The step schedule follows ComfyUI's uni_pc: warm-up orders 1, 2, ..., and with ``lower_order_final`` the
    order drops to ``steps + 1 - i`` on the last steps; the step into the final sigma has no corrector.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DC-Solver: order must be 1, 2 or 3, got {order}")
    kind = check_parameterisation(parameterisation)
    sigmas = check_sigmas(sigmas, "DC-Solver")
    steps = len(sigmas) - 1
    if steps == 0:
        return x
    if ratios is not None and ratios.numel() != steps:
        raise ValueError(f"DC-Solver: the ratios hold {ratios.numel()} steps but the sigma list has {steps}; "
                         "search the ratios again for this step count, or disconnect them for plain UniPC.")
    # the weights are scalars: work them out in float64 on the CPU whatever the state's device and dtype
    sig = sigmas.detach().to("cpu", torch.float64).clone()
    if float(sig[-1]) == 0.0:
        # a schedule that already ends below final_sigma (Flux's karras list reaches 3e-4) steps on to half of it
        sig[-1] = min(final_sigma, 0.5 * float(sig[-2]))
    order = min(order, max(steps - 1, 1))
    lams = half_log_snr(sig, kind)
    acts = compensated_lambdas(lams[:-1])
    s_in = x.new_ones([x.shape[0]])
    raw: list[torch.Tensor] = []  # model outputs as evaluated: the interpolation nodes
    hist: list[torch.Tensor] = []  # what the solver combines: the newest entry compensated
    m = denoise(x, sigmas[0] * s_in)
    for i in progress(steps, disable):
        raw = (raw + [m])[-3:]
        hist = (hist + [m])[-order:]
        if ratios is not None and bool(acts[i]):
            w = compensation_weights(list(lams[i - 2:i + 1]), ratios[i].to(lams))
            hist[-1] = w[0].to(x) * raw[-1] + w[1].to(x) * raw[-2] + w[2].to(x) * raw[-3]
        step_callback(callback, x, i, sigmas[i], m)
        k = min(order, i + 1)
        if lower_order_final:
            k = min(k, steps - i)
        k = min(k, _finite_tail(lams[:i + 1]))
        k = max(k, 1)
        co = uni_coefficients(list(lams[i + 1 - k:i + 1]), lams[i + 1], k)
        sigma_t, a_t = sig[i + 1], alpha(sig[i + 1], kind)
        m0 = hist[-1]
        d1s = [(hist[-1 - j] - m0) / co.rks[j - 1].to(x) for j in range(1, k)]
        base = (sigma_t / sig[i]).to(x) * x - (a_t * co.h_phi_1).to(x) * m0
        scale = (a_t * co.b_h).to(x)
        x_pred = base if co.rhos_p is None else base - scale * _weighted(co.rhos_p.to(x), d1s)
        if i + 1 == steps:
            x = x_pred  # no corrector into the final sigma: its output would never be used
            break
        m = denoise(x_pred, sigmas[i + 1] * s_in)
        x = base - scale * (_weighted(co.rhos_c[:-1].to(x), d1s) + co.rhos_c[-1].to(x) * (m - m0))
    return x / alpha(sig[-1], kind).to(x)


def compensated_lambdas(lams: torch.Tensor) -> torch.Tensor:
    """[steps] bool: the steps whose ratio acts, given the lambdas of the steps' start points: from index 2 on (the
    interpolation needs three outputs) where all three lambdas are finite (not a flow model's sigma = 1)."""
    finite = torch.isfinite(lams)
    acts = torch.zeros(len(lams), dtype=torch.bool)
    for i in range(FIRST_COMPENSATED, len(lams)):
        acts[i] = bool(finite[i - FIRST_COMPENSATED:i + 1].all())
    return acts


def compensated(sigmas: torch.Tensor, parameterisation: Parameterisation = "eps") -> torch.Tensor:
    """[len(sigmas) - 1] bool: which steps of this sigma list a compensation ratio changes (the others are inert,
    so a search leaves them at 1 and a fit of the ratios must skip them)."""
    sig = check_sigmas(sigmas, "DC-Solver").detach().to("cpu", torch.float64)
    return compensated_lambdas(half_log_snr(sig[:-1], check_parameterisation(parameterisation)))


def _finite_tail(lams: torch.Tensor) -> int:
    """Newest entries with finite lambda: a flow list starting at sigma = 1 has lambda = -inf there."""
    n = 0
    for lam in reversed(list(lams)):
        if not bool(torch.isfinite(lam)):
            break
        n += 1
    return n


@torch.no_grad()
def sample_dc_solver(model, x, sigmas, extra_args=None, callback=None, disable=None, ratios=None, order: int = 2,
                     parameterisation: Parameterisation = "eps", lower_order_final: bool = True,
                     final_sigma: float = FINAL_SIGMA):
    """DC-Solver: UniPC-bh2 with dynamic compensation (Zhao et al., arXiv:2409.03755)."""
    return dc_unipc(bind_model(model, extra_args), x, sigmas, ratios, order, parameterisation, lower_order_final,
                    final_sigma, callback, disable)


class SearchResult(NamedTuple):
    ratios: torch.Tensor  # [steps], float64; the best iterate (lowest loss), never worse than all ones
    losses: list[float]  # MSE to the reference before each update (index 0 = plain UniPC)


def _held_fixed(denoise: Denoise) -> Denoise:
    """``denoise`` outside autograd: its output is a constant of the state, and no graph through the network is
    built (a network whose weights are inference tensors or require grad could not, or should not, record one)."""

    def call(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return denoise(x.detach(), sigma)

    return call


def search_ratios(denoise: Denoise, noise: torch.Tensor, sigmas: torch.Tensor, reference: torch.Tensor,
                  iterations: int = 20, lr: float = 0.1, order: int = 2, parameterisation: Parameterisation = "eps",
                  model_gradient: bool = True, progress_fn: Callable[[int, int], None] | None = None) -> SearchResult:
    """Fit the compensation ratios by gradient descent through the sampler (Sec. 3.3 of arXiv:2409.03755).

    ``noise`` is the starting state (already at ``sigmas[0]``), ``reference`` the end points of a many-step run
    from the same noise. ``model_gradient=False`` treats each model output as a constant of the state (the
    gradient then flows only through the solver's weights and the compensation): no backward pass through the
    network, which a model with inference-mode weights cannot give. Weight decay is 0: AdamW's decay would pull
    rho toward 0, not toward the plain solver's 1.
    """
    steps = len(sigmas) - 1
    rho = torch.ones(steps, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([rho], lr=lr, weight_decay=0.0)
    ref = reference.detach()
    call = denoise if model_gradient else _held_fixed(denoise)
    best, best_loss, losses = rho.detach().clone(), math.inf, []
    for it in range(iterations + 1):
        opt.zero_grad()
        with torch.enable_grad():
            out = dc_unipc(call, noise, sigmas, rho, order, parameterisation)
            loss = ((out.double() - ref.double()) ** 2).mean()
        value = float(loss.detach())
        if not math.isfinite(value):
            log.warning("DC-Solver search: loss became %s at iteration %d; keeping the best ratios so far", value, it)
            break
        losses.append(value)
        if value < best_loss:
            best, best_loss = rho.detach().clone(), value
        if progress_fn is not None:
            progress_fn(it + 1, iterations + 1)
        if it == iterations:
            break  # the last pass only scores the final update
        if not loss.requires_grad:
            # too few steps for any compensation (index 2 on, with three finite lambdas): nothing to fit
            log.warning("DC-Solver search: no step of this %d-step list can be compensated; ratios stay 1", steps)
            break
        loss.backward()
        opt.step()
    return SearchResult(best, losses)
