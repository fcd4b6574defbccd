"""Noise-schedule arithmetic shared by samplers and guidance (pure torch).

Samplers in this pack work on ComfyUI's sigma axis, where a state is ``x = alpha(sigma) * x0 + sigma * eps``:

* ``"eps"`` (EPS and V-prediction models, k-diffusion's VE scaling): ``alpha = 1``.
* ``"flow"`` (rectified-flow / CONST models such as Flux and SD3): ``alpha = 1 - sigma``.

The half log-SNR is ``lambda = log(alpha / sigma)``; DPM-Solver-style exponential integrators step in it.
"""

from __future__ import annotations

from typing import Literal

import torch

Parameterisation = Literal["eps", "flow"]
PARAMETERISATIONS: tuple[str, ...] = ("eps", "flow")


def check_parameterisation(kind: str) -> Parameterisation:
    if kind not in PARAMETERISATIONS:
        raise ValueError(f"unknown parameterisation {kind!r}: expected one of {PARAMETERISATIONS}")
    return kind  # type: ignore[return-value]


def alpha(sigma: torch.Tensor, kind: Parameterisation) -> torch.Tensor:
    """Signal coefficient alpha(sigma) of ``x = alpha * x0 + sigma * eps``."""
    if kind == "flow":
        return 1.0 - sigma
    return torch.ones_like(sigma)


def half_log_snr(sigma: torch.Tensor, kind: Parameterisation) -> torch.Tensor:
    """lambda = log(alpha / sigma); +inf at sigma = 0, -inf at sigma = 1 for flow models."""
    return torch.log(alpha(sigma, kind)) - torch.log(sigma)


def sigma_from_half_log_snr(lam: torch.Tensor, kind: Parameterisation) -> torch.Tensor:
    """Inverse of :func:`half_log_snr`."""
    if kind == "flow":
        # alpha / sigma = (1 - s) / s = e^lam  =>  s = 1 / (1 + e^lam)
        return torch.sigmoid(-lam)
    return torch.exp(-lam)
