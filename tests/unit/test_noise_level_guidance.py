"""Noise-Level Guidance on the exact conditional Gaussian mixture."""

from __future__ import annotations

import math

import pytest
import torch

from preprint.guidance.noise_level_guidance import (
    NLGConfig,
    clip_rows,
    direction_from_denoised,
    refine_noise,
    renormalize,
)

from .conftest import get_problem


def log_density(mixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """log p_sigma(x) of the noised mixture (EPS / VE: x = x0 + sigma n), per image."""
    mu = mixture.means.flatten(1).double()
    var = mixture.stds.double() ** 2 + sigma**2
    xf = x.flatten(1).double()
    d = xf.shape[1]
    sq = ((xf[:, None, :] - mu[None]) ** 2).sum(-1)
    logp = torch.log(mixture.weights.double())[None] - 0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
    return torch.logsumexp(logp, dim=1)


def test_refinement_raises_condition_likelihood():
    problem = get_problem("eps", cfg=1.0)
    model = problem.model
    sigma = 14.6
    cond_mix = model.mixture.reweighted(model.cond_weights)

    def direction(n):
        x = sigma * n
        return direction_from_denoised(model.cond(x, sigma), model.uncond(x, sigma), sigma)

    g = torch.Generator().manual_seed(0)
    n0 = torch.randn(8, 4, 8, 8, generator=g, dtype=torch.float64)

    def log_ratio(n):  # log p(y | x) up to a constant: log p_c(x) - log p_u(x)
        return log_density(cond_mix, sigma * n, sigma) - log_density(model.mixture, sigma * n, sigma)

    # Plain steps never lower p(y | x); images already deep in a favoured component are saturated (no room),
    # the others gain clearly.
    plain = refine_noise(n0, direction, NLGConfig(10, 1.0, 0.0, 0.0, renormalize=False))
    gain = log_ratio(plain) - log_ratio(n0)
    assert bool((gain >= -1e-9).all()) and float(gain.max()) > 0.5
    # With the paper's renormalisation the gain survives and the norm is sqrt(D).
    cfg = NLGConfig(iterations=10, step_size=1.0, clip_norm=0.0, jitter=0.0, renormalize=True)
    n1 = refine_noise(n0, direction, cfg)
    gain = log_ratio(n1) - log_ratio(n0)
    assert bool((gain > -1e-4).all()) and float(gain.max()) > 0.5
    dim = n0[0].numel()
    torch.testing.assert_close(n1.flatten(1).norm(dim=1), torch.full((8,), math.sqrt(dim), dtype=torch.float64))


def test_direction_is_minus_the_classifier_score():
    """eps_c - eps_u = -sigma grad log p(y|x): a small step against it raises log p(y|x) at first order."""
    problem = get_problem("eps", cfg=1.0)
    model = problem.model
    sigma = 2.0
    x = sigma * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d = direction_from_denoised(model.cond(x, sigma), model.uncond(x, sigma), sigma)
    cond_mix = model.mixture.reweighted(model.cond_weights)
    xr = x.clone().requires_grad_(True)
    lr = (log_density(cond_mix, xr, sigma) - log_density(model.mixture, xr, sigma)).sum()
    (grad,) = torch.autograd.grad(lr, xr)
    torch.testing.assert_close(d, -sigma * grad, rtol=1e-6, atol=1e-8)


def test_zero_iterations_identity_and_determinism():
    n = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(refine_noise(n, lambda z: torch.ones_like(z), NLGConfig(iterations=0)), n)
    cfg = NLGConfig(iterations=3)
    a = refine_noise(n, lambda z: 0.1 * z, cfg, torch.Generator().manual_seed(5))
    b = refine_noise(n, lambda z: 0.1 * z, cfg, torch.Generator().manual_seed(5))
    c = refine_noise(n, lambda z: 0.1 * z, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_clip_and_renormalize():
    d = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = clip_rows(d, 1.0)
    torch.testing.assert_close(out[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(out[1], d[1])
    assert torch.equal(clip_rows(d, 0.0), d)
    torch.testing.assert_close(renormalize(d).norm(dim=1), torch.full((2,), math.sqrt(2)))
    with pytest.raises(ValueError, match="iterations"):
        NLGConfig(iterations=-1)
