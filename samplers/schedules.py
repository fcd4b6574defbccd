"""Noise schedules: the logistic schedule as sigma lists, and Stable Diffusion's training schedule (pure torch).

Logistic schedule: Lin et al., "Schedule Your Edit: A Simple yet Effective Diffusion Noise Schedule for Image
Editing", arXiv:2410.18756 (NeurIPS 2024). The signal fraction follows a logistic curve in the (normalised)
training time ``t`` in ``[0, 1]``:

    abar(t) = 1 / (1 + exp(k (t - t0)))          (the paper's Logistic Schedule; k steepness, t0 midpoint)

so that, unlike the linear and cosine schedules, its derivative has no singularity at ``t = 0``. Steps are
uniform in ``t``. What that means on ComfyUI's sigma axis:

* EPS models (VE scaling): ``sigma = sqrt((1 - abar) / abar) = exp(k (t - t0) / 2)``. The log-SNR
  ``log(abar / (1 - abar)) = -k (t - t0)`` is linear in ``t``, so the schedule is uniform in log-sigma: where
  the curve spans the model's whole trained range it coincides with ComfyUI's ``exponential`` scheduler;
  ``k`` and ``t0`` move its ends (a small ``k`` keeps the run inside a narrower band of noise levels).
* Flow models (``x = (1 - sigma) x0 + sigma eps``): the same SNR gives ``sigma = sqrt(1 - abar) /
  (sqrt(abar) + sqrt(1 - abar)) = sigmoid(k (t - t0) / 2)``: sigmoid-spaced sigmas, dense at both ends, which
  ComfyUI's schedulers do not offer. The curve never reaches 1, so it starts at ``sigmoid(k (1 - t0) / 2)``
  (0.977 with the defaults).

The part of the curve outside the model's trained range ``[sigma_min, sigma_max]`` is cut off (the ``t`` range
shrinks to fit, keeping the spacing uniform in ``t``); the list ends with 0, as ComfyUI's schedulers do.

The defaults ``k = 15``, ``t0 = 0.5`` are this pack's choice, not values traced to the paper. They span more
than SD's trained range, so on SD1.5 / SDXL the cut list is exactly ComfyUI's ``exponential`` scheduler.
"""

from __future__ import annotations

import math

import torch

from ..utils.noise_schedule import Parameterisation, check_parameterisation, half_log_snr, sigma_from_half_log_snr


def logistic_half_log_snr(t: torch.Tensor, k: float, t0: float) -> torch.Tensor:
    """``lambda(t) = 0.5 log(abar / (1 - abar)) = -k (t - t0) / 2`` for the logistic ``abar``."""
    return -0.5 * k * (t - t0)


def logistic_sigmas(steps: int, kind: Parameterisation, sigma_min: float, sigma_max: float,
                    k: float = 15.0, t0: float = 0.5) -> torch.Tensor:
    """``steps + 1`` sigmas of the logistic schedule (last one 0), fitted inside ``[sigma_min, sigma_max]``."""
    kind = check_parameterisation(kind)
    if steps < 1:
        raise ValueError(f"Logistic schedule: steps must be >= 1, got {steps}")
    if not (k > 0 and math.isfinite(k)):
        raise ValueError(f"Logistic schedule: k (steepness) must be > 0, got {k}")
    if not 0.0 <= t0 <= 1.0:
        raise ValueError(f"Logistic schedule: t0 (midpoint) must be in [0, 1], got {t0}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"Logistic schedule: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    lam_lo = float(half_log_snr(torch.tensor(sigma_max, dtype=torch.float64), kind))  # -inf for flow at 1
    lam_hi = float(half_log_snr(torch.tensor(sigma_min, dtype=torch.float64), kind))
    # t where the curve crosses each end of the trained range (t = t0 - 2 lambda / k)
    t_hi = 1.0 if lam_lo == -math.inf else min(1.0, t0 - 2.0 * lam_lo / k)
    t_lo = max(0.0, t0 - 2.0 * lam_hi / k)
    if not t_lo < t_hi:
        raise ValueError(
            f"Logistic schedule: with k={k}, t0={t0} the curve never enters the model's noise range "
            f"[{sigma_min:.4g}, {sigma_max:.4g}]; raise k or move t0 towards 0.5."
        )
    t = torch.linspace(t_hi, t_lo, steps, dtype=torch.float64)
    sig = sigma_from_half_log_snr(logistic_half_log_snr(t, k, t0), kind)
    sig = sig.clamp(sigma_min, sigma_max)
    return torch.cat([sig, sig.new_zeros(1)]).to(torch.float32)


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """``abar_k`` of Stable Diffusion's "scaled linear" DDPM training schedule (SD1.x / SDXL), in float64.

    Samplers that need a model's time but are given no host fall back to it, and tests model SD with it.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)
