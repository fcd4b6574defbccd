"""Adaptive Guidance: stop evaluating the unconditional branch once guidance has converged.

Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models",
arXiv:2312.12487 (sec. 4, "Adaptive Guidance"): the cosine similarity between the conditional and the
unconditional noise predictions,

    gamma_t = <eps_c, eps_u> / (|eps_c| |eps_u|),

rises towards 1 as denoising proceeds; once it passes a threshold ``gamma_bar`` the CFG update is nearly a
plain conditional step, so the remaining steps use ``eps_c`` alone and skip the unconditional evaluation.
That saves about a quarter of the network evaluations of a CFG run at equal quality (paper, tab. 1).

Conventions here:

* What the cosine compares (``criterion``). The paper compares the noise predictions of an EPS model. On
  ComfyUI's sigma axis an EPS state is ``x = x0 + sigma eps``; near the start ``x`` is almost pure noise, so
  both noise predictions ``(x - D) / sigma`` are almost ``x / sigma`` and their cosine sits above 0.998 for any
  prompt pair: at a threshold of 0.99 guidance would stop after the first step. The default criterion is
  therefore the *velocity* ``v = eps - x0`` of the same noise level written as a rectified flow
  (``t = sigma / (1 + sigma)`` for EPS models): it is exactly the network output of a flow model (Flux, SD3),
  where the paper's criterion is meaningful as it stands, and on EPS models it weighs the data prediction as
  much as the noise, so the cosine starts well below 1 and rises as the picture settles. ``"noise"`` keeps
  the paper's literal EPS criterion (``x - D``, scale-free, which on flow models is the velocity again) and
  ``"denoised"`` compares the data predictions ``D`` themselves. ``benchmarks/cfg_schedules.py`` measures the
  three on EPS and flow mixtures; the default threshold comes from there.
* The step at which convergence is detected still uses full CFG (both predictions exist already); every
  later evaluation is conditional only.
* Each image of a batch converges on its own: its later steps are conditional only as soon as it has
  converged, so every image is the same as when sampled alone. The unconditional pass is dropped for the
  whole batch once every image has converged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..utils.noise_schedule import Parameterisation, alpha, check_parameterisation

Criterion = Literal["velocity", "noise", "denoised"]
CRITERIA: tuple[str, ...] = ("velocity", "noise", "denoised")
# The cheapest threshold whose error stayed within 5% of plain CFG on every EPS and flow problem of
# benchmarks/cfg_schedules.py (velocity criterion: worst 1.017x at 0.62x the calls).
DEFAULT_THRESHOLD = 0.999


def check_criterion(criterion: str) -> Criterion:
    if criterion not in CRITERIA:
        raise ValueError(f"adaptive guidance: unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}.")
    return criterion  # type: ignore[return-value]


def prediction_direction(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor | float = 1.0,
                         kind: Parameterisation = "eps", criterion: Criterion = "noise") -> torch.Tensor:
    """The vector whose cosine Adaptive Guidance compares between the two branches (up to a positive factor
    per image, which a cosine ignores).

    ``"noise"``: ``x - D``, proportional to the predicted noise (EPS) or velocity (flow). ``"velocity"``:
    ``eps - x0`` with ``eps = (x - alpha D) / sigma``, the rectified-flow velocity at this noise level (equal to
    ``(x - D) / sigma`` on flow models). ``"denoised"``: ``D``.
    """
    if criterion == "denoised":
        return denoised
    if criterion == "noise":
        return x - denoised
    sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
    sig = sig.reshape(-1, *([1] * (x.ndim - 1))) if sig.numel() == x.shape[0] else sig[0]
    x64, d64 = x.double(), denoised.double()
    eps = (x64 - alpha(sig, kind) * d64) / sig
    return eps - d64


def cosine_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each batch row of ``a`` and ``b``, in float64 (shape ``[B]``)."""
    a64 = a.reshape(a.shape[0], -1).double()
    b64 = b.reshape(b.shape[0], -1).double()
    return torch.nn.functional.cosine_similarity(a64, b64, dim=1, eps=1e-12)


@dataclass
class AdaptiveGuidanceState:
    """Per-run state: which images have converged, and how many unconditional evaluations were made/saved."""

    threshold: float
    criterion: Criterion = "velocity"
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
        check_criterion(self.criterion)

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
        gamma = cosine_per_row(prediction_direction(x, cond, sigma, kind, self.criterion),
                               prediction_direction(x, uncond, sigma, kind, self.criterion))
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
                 kind: Parameterisation = "eps", criterion: Criterion = "velocity"):
        self.cond, self.uncond, self.scale, self.kind = cond, uncond, scale, kind
        self.state = AdaptiveGuidanceState(threshold, criterion)
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
