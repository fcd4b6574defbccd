"""Noise-Level Guidance: refine the initial noise before sampling.

Mannering, Huang & Prugel-Bennett, "Noise-Level Diffusion Guidance: Well Begun is Half Done",
arXiv:2509.13936 (code: github.com/harveymannering/NoiseLevelGuidance). The starting noise ``n`` is moved
towards noise the condition finds more likely, using the guidance direction at the highest noise level as a
training-free estimate of ``grad log p(y | n)``:

    d = eps_c(n) - eps_u(n)              (the CFG direction, up to the factor -1/sigma)
    d = d * min(1, c / ||d||)            (norm clipping)
    n = n - step * d + sqrt(v) xi        (xi ~ N(0, I): a little fresh noise, v = 0.001 in the paper's demo)
    n = n * sqrt(D) / ||n||              (back to the norm a D-dimensional standard normal concentrates at)

repeated K times (K = 20, step 1, c = 0.5 in the authors' Stable Diffusion notebook). Each iteration costs
one model evaluation of both branches; the sampler then starts from the refined noise.

On ComfyUI's sigma axis ``eps_c - eps_u = (D_u - D_c) / sigma`` for EPS models (alpha = 1); for flow models
the same expression is the difference of the velocity predictions, which is what carries the condition
at sigma = 1 (where the noise predictions of both branches coincide).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NLGConfig:
    iterations: int = 20
    step_size: float = 1.0
    clip_norm: float = 0.5  # <= 0: no clipping
    jitter: float = 0.001  # variance of the fresh noise added per iteration
    renormalize: bool = True

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"noise-level guidance: iterations must be >= 0, got {self.iterations}.")
        if not math.isfinite(self.step_size):
            raise ValueError(f"noise-level guidance: step size must be finite, got {self.step_size}.")
        if self.jitter < 0:
            raise ValueError(f"noise-level guidance: jitter variance must be >= 0, got {self.jitter}.")


def direction_from_denoised(cond: torch.Tensor, uncond: torch.Tensor, sigma: float) -> torch.Tensor:
    """``eps_c - eps_u`` (EPS) or ``v_c - v_u`` (flow) from denoised predictions: ``(D_u - D_c) / sigma``."""
    return (uncond - cond) / sigma


def clip_rows(d: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each image's direction down to norm ``max_norm`` if it is longer."""
    if max_norm <= 0:
        return d
    norm = d.reshape(d.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (d.ndim - 1)))
    return torch.where(norm > max_norm, d * (max_norm / norm.clamp_min(1e-30)), d)


def renormalize(n: torch.Tensor) -> torch.Tensor:
    """Per image, rescale to norm sqrt(D) (D = elements per image)."""
    dim = n[0].numel()
    norm = n.reshape(n.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (n.ndim - 1)))
    return n * (math.sqrt(dim) / norm.clamp_min(1e-30))


@torch.no_grad()
def refine_noise(noise: torch.Tensor, direction: Callable[[torch.Tensor], torch.Tensor], cfg: NLGConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Run NLG on unit-variance ``noise``; ``direction(n)`` returns ``eps_c - eps_u`` at the highest noise level.

    ``generator`` (CPU) draws the per-iteration jitter; zero iterations return the noise unchanged.
    """
    n = noise.clone()
    for _ in range(cfg.iterations):
        d = clip_rows(direction(n).to(n), cfg.clip_norm)
        n = n - cfg.step_size * d
        if cfg.jitter > 0:
            xi = torch.randn(n.shape, generator=generator, dtype=torch.float32).to(n)
            n = n + math.sqrt(cfg.jitter) * xi
        if cfg.renormalize:
            n = renormalize(n)
    return n
