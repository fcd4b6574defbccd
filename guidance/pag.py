"""Guidance arithmetic of the perturbed-attention family (pure torch).

PAG (Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance", arXiv:2403.17377)
combined with CFG, in denoised (x0) space as ComfyUI's post-CFG hooks see it (paper eq. 10 / 11 written
for x0 instead of eps; the two are equivalent because x0 = (x - sigma eps) / alpha is affine in eps):

    D = D_u + w (D_c - D_u) + s_t (D_c - D_p)

with ``D_p`` the positive prediction under perturbed attention. ``s_t`` is the scale at this step:

* adaptive scale (diffusers' ``pag_adaptive_scale``): ``s_t = max(0, s - a (1000 - t))`` with ``t`` the
  model timestep (0..999; sigma x 1000 for flow models), so guidance fades as sampling approaches t = 0;
* a sigma interval: ``s_t = 0`` outside ``[sigma_end, sigma_start]``.

Rescale matches the standard deviation of the guided noise prediction to the positive one's (Lin et al.,
"Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv:2305.08891, eq. 15-16), blended by
``phi``. It works on ``x - D``, which is proportional to eps (EPS models) or to the velocity (flow models),
so the std ratio is the same as in the paper's space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..utils.sigma_window import SigmaWindow


@dataclass(frozen=True)
class GuidanceSchedule:
    """When and how strongly to guide."""

    scale: float = 3.0
    adaptive_scale: float = 0.0
    window: SigmaWindow = SigmaWindow()

    def __post_init__(self) -> None:
        if self.adaptive_scale < 0:
            raise ValueError(f"adaptive_scale must be >= 0, got {self.adaptive_scale}")

    def scale_at(self, sigma: float, timestep: float) -> float:
        """``s_t`` at this step (0 means: skip the perturbed pass entirely)."""
        if sigma not in self.window:
            return 0.0
        return adaptive_pag_scale(self.scale, self.adaptive_scale, timestep)


def adaptive_pag_scale(scale: float, adaptive: float, timestep: float) -> float:
    """``max(0, s - a (1000 - t))``; a = 0 gives the constant scale. Negative scales are kept as given
    (no clamping) when ``a = 0``, so a user can deliberately guide towards the perturbed prediction."""
    if adaptive == 0.0:
        return scale
    return max(0.0, scale - adaptive * (1000.0 - float(timestep)))


def perturbation_guidance(denoised: torch.Tensor, cond: torch.Tensor, perturbed: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Add ``s (D_c - D_p)`` to an already guided prediction (PAG eq. 10 in x0 space).

    ``scale == 0`` returns ``denoised`` itself, so switching guidance off is exact.
    """
    if scale == 0.0:
        return denoised
    return denoised + scale * (cond - perturbed)


def rescale_to_reference(x: torch.Tensor, guided: torch.Tensor, reference: torch.Tensor, phi: float) -> torch.Tensor:
    """Match the per-sample std of ``x - guided`` to that of ``x - reference`` and blend by ``phi``
    (Lin et al. eq. 15-16); ``phi == 0`` returns ``guided`` unchanged."""
    if phi == 0.0:
        return guided
    dims = tuple(range(1, guided.ndim))
    n_g = x - guided
    n_r = x - reference
    std_g = n_g.std(dim=dims, keepdim=True)
    std_r = n_r.std(dim=dims, keepdim=True)
    ratio = torch.where(std_g > 0, std_r / std_g.clamp_min(torch.finfo(std_g.dtype).tiny), torch.ones_like(std_g))
    n = phi * (n_g * ratio) + (1.0 - phi) * n_g
    return x - n


def guided_prediction(x: torch.Tensor, denoised: torch.Tensor, cond: torch.Tensor, perturbed: torch.Tensor,
                      scale: float, rescale: float = 0.0) -> torch.Tensor:
    """The full post-CFG step: add the perturbation term, then optionally rescale against ``cond``."""
    if scale == 0.0:
        return denoised
    out = perturbation_guidance(denoised, cond, perturbed, scale)
    return rescale_to_reference(x, out, cond, rescale)
