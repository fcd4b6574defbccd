"""Exact identities of the proving ground (``utils/gaussian_mixture.py``): the noisy marginal is a normalised
density whose score gives ``denoise`` (Tweedie), and the reference solution at sigma 0 is a clean sample."""

from __future__ import annotations

import math

import pytest
import torch

from preprint.utils.gaussian_mixture import GaussianMixture, MixtureDenoiser, make_mixture, reference_solution


def _log_marginal(gm: GaussianMixture, x: torch.Tensor, sigma: float, kind: str) -> torch.Tensor:
    """log p_sigma(x) of ``x = alpha x0 + sigma eps``: sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)."""
    a = 1.0 if kind == "eps" else 1.0 - sigma
    var = a**2 * gm.stds**2 + sigma**2  # [K]
    sq = ((x.flatten(1)[:, None] - a * gm.means.flatten(1)[None]) ** 2).sum(-1)  # [B, K]
    logn = -0.5 * sq / var - 0.5 * gm.dim * torch.log(2 * math.pi * var)
    return torch.logsumexp(torch.log(gm.weights) + logn, dim=1)


@pytest.mark.parametrize("kind,sigma", [("eps", 0.7), ("flow", 0.4)])
def test_marginal_density_normalises_and_its_score_gives_the_denoiser(kind, sigma):
    """With ``d = dim`` the marginal integrates to 1 over the plane, and ``denoise`` is Tweedie's posterior mean
    ``(x + sigma^2 grad log p(x)) / alpha``."""
    gm = make_mixture((2,), components=3, seed=5, std_range=(0.2, 0.5))
    assert gm.dim == 2 and make_mixture((4, 8, 8), components=2, seed=0).dim == 256
    a = 1.0 if kind == "eps" else 1.0 - sigma
    assert float(gm.means.abs().max()) < 3.0
    widest = math.sqrt(a**2 * float(gm.stds.max()) ** 2 + sigma**2)
    r = 3.0 * a + 6.0 * widest  # the scaled means lie within 3 a of 0; 6 of the widest marginal's stds beyond
    g = torch.linspace(-r, r, 201, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    mass = _log_marginal(gm, grid, sigma, kind).exp().sum() * (g[1] - g[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-9)  # measured 1 - 5e-14; a wrong d or 2 pi is a factor
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
    (score,) = torch.autograd.grad(_log_marginal(gm, x, sigma, kind).sum(), x)
    tweedie = (x.detach() + sigma**2 * score) / a
    torch.testing.assert_close(gm.denoise(x.detach(), sigma, kind), tweedie, rtol=0, atol=1e-12)


def test_reference_solution_to_sigma_zero_ends_on_a_clean_sample():
    """For point-mass components the ODE solution at sigma 0 is one of the means; the solver reaches it by a final
    denoise at sigma_floor (its ODE state there is still ~1e-4 away), with sigma_end 0 given or by default."""
    means = torch.tensor([[1.0, 0.0, -1.0], [-1.0, 2.0, 0.5]], dtype=torch.float64)
    gm = GaussianMixture(means, torch.zeros(2, dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64))
    model = MixtureDenoiser(gm)
    x = 5.0 * torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for out in (reference_solution(model, x, 5.0, steps=100), reference_solution(model, x, 5.0, 0.0, steps=100)):
        nearest = means[((out[:, None] - means[None]) ** 2).sum(-1).argmin(1)]
        torch.testing.assert_close(out, nearest, rtol=0, atol=1e-10)
    at_floor = reference_solution(model, x, 5.0, 1e-4, steps=100)  # the state before that denoise
    assert float((at_floor - nearest).abs().max()) > 1e-5
