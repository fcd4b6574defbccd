"""DPM-Solver++ multistep solvers in data prediction.

Paper: Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
arXiv:2211.01095. The update rules are Algorithm 2 (2M) and the third-order multistep rule of the official
implementation, written for ``x = alpha(sigma) x0 + sigma eps`` so that flow (CONST) models, where
``alpha = 1 - sigma``, are integrated in their true half log-SNR ``lambda = log(alpha / sigma)``.
For EPS models (``alpha = 1``) the 2M update is the same arithmetic as ComfyUI's ``dpmpp_2m``.
"""

from __future__ import annotations

import torch

from ..utils.noise_schedule import Parameterisation, alpha, check_parameterisation, half_log_snr
from .common import check_sigmas, progress, step_callback


def _multistep_update(
    x: torch.Tensor,
    denoised: list[torch.Tensor],
    lambdas: list[torch.Tensor],
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    kind: Parameterisation,
    order: int,
) -> torch.Tensor:
    """One DPM-Solver++ multistep update of the given order from the newest ``order`` data predictions.

    ``denoised`` and ``lambdas`` are newest-last histories; ``lambdas[-1]`` belongs to ``sigma``.
    """
    m0 = denoised[-1]
    if sigma_next == 0:
        # lambda_next = +inf: every exponential-integrator weight collapses onto x0 (the limit of Eq. 9).
        return m0
    alpha_next = alpha(sigma_next, kind)
    h = half_log_snr(sigma_next, kind) - lambdas[-1]
    phi_1 = torch.expm1(-h)  # e^{-h} - 1
    x_next = (sigma_next / sigma) * x - alpha_next * phi_1 * m0
    if order == 1:
        return x_next
    h_0 = lambdas[-1] - lambdas[-2]
    r0 = h_0 / h
    d1_0 = (m0 - denoised[-2]) / r0
    if order == 2:
        return x_next - 0.5 * alpha_next * phi_1 * d1_0
    h_1 = lambdas[-2] - lambdas[-3]
    r1 = h_1 / h
    d1_1 = (denoised[-2] - denoised[-3]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    return x_next + alpha_next * phi_2 * d1 - alpha_next * phi_3 * d2


def effective_order(step: int, total_steps: int, order: int, history: int, lower_order_final: bool,
                    lambdas_finite: bool) -> int:
    """Order actually used at ``step``: warm-up from history, and lower order on the last steps of short runs.

    Lower-order final steps follow the official code: with fewer than 10 steps the last ``order - 1`` steps
    drop to order ``total_steps - step``, which keeps few-step sampling stable.
    """
    k = min(order, history)
    if lower_order_final and total_steps < 10:
        k = min(k, total_steps - step)
    if not lambdas_finite:
        k = 1
    return max(k, 1)


@torch.no_grad()
def sample_dpmpp_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, order: int = 2,
                           parameterisation: Parameterisation = "eps", lower_order_final: bool = True):
    """DPM-Solver++ multistep (2M / 3M) in data prediction (Lu et al., arXiv:2211.01095)."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ multistep order must be 1, 2 or 3, got {order}")
    kind = check_parameterisation(parameterisation)
    sigmas = check_sigmas(sigmas, "DPM-Solver++ multistep")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    total = len(sigmas) - 1
    hist_x0: list[torch.Tensor] = []
    hist_lam: list[torch.Tensor] = []
    for i in progress(total, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        step_callback(callback, x, i, sigma, denoised)
        hist_x0 = (hist_x0 + [denoised])[-order:]
        hist_lam = (hist_lam + [half_log_snr(sigma, kind)])[-order:]
        k = effective_order(i, total, order, len(hist_x0), lower_order_final,
                            bool(torch.isfinite(torch.stack(hist_lam)).all()))
        x = _multistep_update(x, hist_x0, hist_lam, sigma, sigma_next, kind, k)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None,
                    parameterisation: Parameterisation = "eps", lower_order_final: bool = False):
    """DPM-Solver++(2M) (Lu et al., arXiv:2211.01095, Algorithm 2)."""
    return sample_dpmpp_multistep(model, x, sigmas, extra_args, callback, disable, order=2,
                                  parameterisation=parameterisation, lower_order_final=lower_order_final)


@torch.no_grad()
def sample_dpmpp_3m(model, x, sigmas, extra_args=None, callback=None, disable=None,
                    parameterisation: Parameterisation = "eps", lower_order_final: bool = True):
    """DPM-Solver++(3M) (Lu et al., arXiv:2211.01095, third-order multistep)."""
    return sample_dpmpp_multistep(model, x, sigmas, extra_args, callback, disable, order=3,
                                  parameterisation=parameterisation, lower_order_final=lower_order_final)
