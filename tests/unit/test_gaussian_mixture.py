"""The proving ground itself: the exact denoiser and the reference solver must be right."""

from __future__ import annotations

import torch

from preprint.utils.gaussian_mixture import GaussianMixture, make_mixture, reference_solution


def test_single_gaussian_posterior_mean_is_wiener_filter():
    mu = torch.full((1, 2, 3), 0.7, dtype=torch.float64)
    gm = GaussianMixture(mu, torch.tensor([0.5], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    sigma = 2.0
    expected = mu + 0.25 / (0.25 + sigma**2) * (x - mu)
    torch.testing.assert_close(gm.denoise(x, sigma, "eps"), expected.expand_as(x))
    # flow: x = (1 - s) x0 + s eps
    s = 0.4
    a = 1 - s
    expected_flow = mu + a * 0.25 / (a * a * 0.25 + s * s) * (x - a * mu)
    torch.testing.assert_close(gm.denoise(x, s, "flow"), expected_flow.expand_as(x))


def test_denoiser_is_tweedie_on_samples():
    """E[x0 | x] averaged over x equals the data mean (law of total expectation), within Monte Carlo error."""
    gm = make_mixture((3,), components=3, seed=3)
    g = torch.Generator().manual_seed(0)
    x0 = gm.sample(40000, g)
    sigma = 0.8
    x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    d = gm.denoise(x, sigma, "eps")
    # Monte Carlo noise of this seed: 0.0021 (0.0020-0.0035 over seeds 0-5). A denoiser at the wrong noise level
    # (sigma x1.1: 0.0076; x0.5: 0.021; x1.5: 0.022) or with doubled component widths (0.0071) lands above 0.005;
    # the old bound of 0.03 let all of them through
    assert torch.allclose(d.mean(0), x0.mean(0), atol=0.005)
    # the posterior mean has smaller error than the noisy sample and than the prior mean
    assert ((d - x0) ** 2).mean() < ((x - x0) ** 2).mean()


def test_reference_solver_converges():
    gm = make_mixture((4, 4, 4), components=4, seed=1)
    x = 10.0 * torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def model(xx, s):
        return gm.denoise(xx, s, "eps")

    coarse = reference_solution(model, x, 10.0, 0.0, steps=500)
    fine = reference_solution(model, x, 10.0, 0.0, steps=2000)
    assert float((coarse - fine).abs().max()) < 1e-6
    # the ODE maps noise onto the data: the result lies near a component mean
    dist = ((fine[:, None] - gm.means[None]) ** 2).flatten(2).sum(-1).sqrt().min(1).values
    assert (dist < 4 * gm.stds.max() * 8).all()
