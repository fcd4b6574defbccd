"""Adaptive Guidance: stop evaluating the unconditional branch once guidance has converged.

Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models",
arXiv:2312.12487 (sec. 4, "Adaptive Guidance"): the cosine similarity between the conditional and the
unconditional noise predictions,

    gamma_t = <eps_c, eps_u> / (|eps_c| |eps_u|),

rises towards 1 as denoising proceeds; once it passes a threshold ``gamma_bar`` the CFG update is nearly a
plain conditional step, so the remaining steps use ``eps_c`` alone and skip the unconditional evaluation.
That saves about a quarter of the network evaluations of a CFG run at equal quality (paper, tab. 1).

Conventions here:

* The cosine compares the network's own predictions: the noise for EPS models and the velocity for flow
  models (Flux, SD3). From denoised predictions both are ``(x - D) / sigma`` on ComfyUI's sigma axis, and the
  cosine is scale-free, so it is computed on ``x - D``. (The noise predictions of a flow model coincide at
  sigma = 1, where ``x`` is pure noise, so comparing them would stop guidance at the first step.)
* The step at which convergence is detected still uses full CFG (both predictions exist already); every
  later evaluation is conditional only.
* Each image of a batch converges on its own: its later steps are conditional only as soon as it has
  converged, so every image is the same as when sampled alone. The unconditional pass is dropped for the
  whole batch once every image has converged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..utils.noise_schedule import Parameterisation, check_parameterisation


def prediction_direction(x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """``x - D``: proportional to the predicted noise (EPS models) or velocity (flow models)."""
    return x - denoised


def cosine_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each batch row of ``a`` and ``b``, in float64 (shape ``[B]``)."""
    a64 = a.reshape(a.shape[0], -1).double()
    b64 = b.reshape(b.shape[0], -1).double()
    return torch.nn.functional.cosine_similarity(a64, b64, dim=1, eps=1e-12)


@dataclass
class AdaptiveGuidanceState:
    """Per-run state: which images have converged, and how many unconditional evaluations were made/saved."""

    threshold: float
    converged: torch.Tensor | None = None  # [B] bool
    uncond_evaluations: int = 0
    uncond_skipped: int = 0
    history: list[list[float]] = field(default_factory=list)  # gamma_t per evaluation that had both branches

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"adaptive guidance: threshold {self.threshold} is not a cosine similarity; use a value in "
                "[-1, 1] (0.99-0.999 in practice; 1 never stops guiding)."
            )

    def all_converged(self, batch: int | None = None) -> bool:
        if self.converged is None:
            return False
        if batch is not None and self.converged.numel() != batch:
            return False
        return bool(self.converged.all())

    def observe(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, sigma: float | torch.Tensor,
                kind: Parameterisation) -> torch.Tensor:
        """Record gamma_t of an evaluation that computed both branches; returns gamma_t per image."""
        check_parameterisation(kind)
        self.uncond_evaluations += 1
        gamma = cosine_per_row(prediction_direction(x, cond), prediction_direction(x, uncond))
        self.history.append([float(g) for g in gamma])
        # A threshold of 1 means "never stop": converged predictions can reach cos = 1 to the last bit.
        passed = gamma >= self.threshold if self.threshold < 1.0 else torch.zeros_like(gamma, dtype=torch.bool)
        if self.converged is None or self.converged.numel() != passed.numel():
            self.converged = passed.cpu()
        else:
            self.converged = self.converged | passed.cpu()
        return gamma

    def mask_converged(self, cond: torch.Tensor, uncond: torch.Tensor, converged_before: torch.Tensor | None
                       ) -> torch.Tensor:
        """Unconditional prediction with the rows of images that had converged replaced by the conditional
        one, so any CFG combination of the pair gives ``D_c`` for them."""
        if converged_before is None or not bool(converged_before.any()):
            return uncond
        if converged_before.numel() != cond.shape[0]:
            return uncond
        m = converged_before.to(cond.device).reshape(-1, *([1] * (cond.ndim - 1)))
        return torch.where(m, cond, uncond)


class AdaptiveGuidanceDenoiser:
    """Pure-torch reference: CFG with Adaptive Guidance over separate cond / uncond denoisers, counting calls."""

    def __init__(self, cond: Callable, uncond: Callable, scale: float, threshold: float,
                 kind: Parameterisation = "eps"):
        self.cond, self.uncond, self.scale, self.kind = cond, uncond, scale, kind
        self.state = AdaptiveGuidanceState(threshold)
        self.cond_calls = 0
        self.uncond_calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **_: object) -> torch.Tensor:
        dc = self.cond(x, sigma)
        self.cond_calls += 1
        if self.state.all_converged(x.shape[0]):
            self.state.uncond_skipped += 1
            return dc
        du = self.uncond(x, sigma)
        self.uncond_calls += 1
        before = None if self.state.converged is None else self.state.converged.clone()
        self.state.observe(x, dc, du, sigma, self.kind)
        du = self.state.mask_converged(dc, du, before)
        return du + (dc - du) * self.scale
