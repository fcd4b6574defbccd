"""The proving ground itself: the exact denoiser and the reference solver must be right."""

from __future__ import annotations

import torch

from preprint.utils.gaussian_mixture import GaussianMixture, MixtureDenoiser, make_mixture, reference_solution


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


def test_dim_is_the_number_of_elements_of_one_sample():
    gm = make_mixture((4, 8, 8), components=3, seed=0)
    assert gm.dim == 256 and isinstance(gm.dim, int)
    assert make_mixture((5,), components=2, seed=0).dim == 5


def test_make_mixture_defaults_are_a_latent_shaped_six_component_mixture():
    gm = make_mixture()
    assert gm.means.shape == (6, 4, 8, 8) and gm.event_shape == (4, 8, 8)
    assert gm.stds.shape == (6,) and gm.weights.shape == (6,)
    explicit = make_mixture((4, 8, 8), components=6, seed=0)  # the default seed is 0: reproducible
    for a, b in ((gm.means, explicit.means), (gm.stds, explicit.stds), (gm.weights, explicit.weights)):
        assert torch.equal(a, b)
    assert not torch.equal(gm.means, make_mixture((4, 8, 8), components=6, seed=1).means)


def test_make_mixture_draws_widths_in_std_range_and_uneven_weights():
    """Component widths fill the default std_range (0.05, 0.3); the weights are uneven (a sampler that treats the
    components alike would be caught) but none negligible: within a factor 3 of each other."""
    stds, ratios = [], []
    for seed in range(10):
        gm = make_mixture((3,), seed=seed)
        stds.append(gm.stds)
        ratios.append(float(gm.weights.max() / gm.weights.min()))
        torch.testing.assert_close(gm.weights.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)
    s = torch.cat(stds)
    assert float(s.min()) >= 0.05 and float(s.max()) <= 0.3
    assert float(s.min()) < 0.07 and float(s.max()) > 0.27  # ... and span it
    assert all(1.0 < r <= 3.0 for r in ratios) and max(ratios) > 2.5


def test_a_new_denoiser_has_counted_no_calls_and_counts_each_branch():
    gm = make_mixture((3,), components=3, seed=0)
    x = torch.randn(2, 3, dtype=torch.float64)
    plain = MixtureDenoiser(gm)
    assert plain.calls == 0
    plain(x, 1.0)
    assert plain.calls == 1
    guided = MixtureDenoiser(gm, cond_weights=torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64), cfg=3.0)
    assert guided.calls == 0
    guided(x, 1.0)
    assert guided.calls == 2


def test_cfg_defaults_to_one_the_plain_conditional_prediction():
    gm = make_mixture((3,), components=3, seed=0)
    w = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    x = 2.0 * torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = MixtureDenoiser(gm, cond_weights=w)
    out = model(x, 1.5)
    assert model.calls == 1  # no unconditional branch at cfg 1
    assert torch.equal(out, gm.reweighted(w).denoise(x, 1.5))
    assert float((out - gm.denoise(x, 1.5)).abs().max()) > 1e-2  # the conditioning matters here


def _prior(kind, sigma, seed, n=4000, shape=(16,)):
    gm = make_mixture(shape, components=4, seed=2)
    g = torch.Generator().manual_seed(seed)
    x = MixtureDenoiser(gm, kind=kind).prior_noise(n, sigma, g)
    return gm, x, g


def test_eps_prior_is_sigma_times_noise():
    _, x, _ = _prior("eps", 0.4, seed=5, n=8)
    _, unit, _ = _prior("eps", 1.0, seed=5, n=8)
    assert torch.equal(x, 0.4 * unit)
    _, big, _ = _prior("eps", 14.6, seed=5, n=8)
    torch.testing.assert_close(big, 14.6 * unit, rtol=1e-15, atol=0)


def test_flow_prior_at_sigma_one_is_pure_noise_drawn_like_the_eps_prior():
    """At sigma 1 a flow state is all noise: the same tensor as the EPS prior from the same generator, and the
    generator left where that leaves it (a caller's later draws do not depend on the parameterisation)."""
    _, flow, g_flow = _prior("flow", 1.0, seed=3, n=8)
    _, eps, g_eps = _prior("eps", 1.0, seed=3, n=8)
    assert torch.equal(flow, eps)
    assert torch.equal(torch.randn(5, generator=g_flow), torch.randn(5, generator=g_eps))


def test_flow_prior_below_sigma_one_mixes_data_and_the_same_noise():
    """Below sigma 1 the flow prior is (1 - s) x0 + s eps with x0 drawn from the mixture and eps the noise the EPS
    prior draws from the same generator: (flow - eps prior) / (1 - s) is a mixture sample (each row within its
    component's spread of a component mean), and the batch mean is (1 - s) times the mixture mean."""
    s = 0.4
    gm, flow, _ = _prior("flow", s, seed=11)
    _, eps, _ = _prior("eps", s, seed=11)
    x0 = (flow - eps) / (1.0 - s)
    d = x0.shape[1]
    dist = (x0[:, None] - gm.means[None]).norm(dim=-1) / (gm.stds[None] * d**0.5)  # [n, K]: about 1 for its own
    assert float(dist.min(dim=1).values.max()) < 2.0
    mean = (gm.weights[:, None] * gm.means).sum(0)
    assert float(mean.abs().max()) > 0.5  # the data mean is far from 0, so a prior without data would show
    # Monte Carlo: x0 spread ~1 per element, n = 4000 -> standard error ~0.016 (noise s * eps adds 0.006)
    torch.testing.assert_close(flow.mean(0), (1.0 - s) * mean, rtol=0, atol=0.08)


def test_reference_solution_ends_at_sigma_zero_by_default_with_one_final_denoise():
    """``sigma_end`` defaults to 0; at 0 the ODE is integrated to sigma_floor and the state denoised once there."""
    gm = make_mixture((4,), components=3, seed=4)
    x = 5.0 * torch.randn((3, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def model(xx, s):
        return gm.denoise(xx, s, "eps")

    at_zero = reference_solution(model, x, 5.0, 0.0, steps=60)
    assert torch.equal(reference_solution(model, x, 5.0, steps=60), at_zero)
    at_floor = reference_solution(model, x, 5.0, 1e-4, steps=60)
    assert torch.equal(at_zero, model(at_floor, torch.tensor(1e-4, dtype=torch.float64)))
    # the denoise moves the state by O(sigma_floor^2 / s^2) (3e-7 here): small, but the comparisons above are exact
    assert float((at_zero - at_floor).abs().max()) > 1e-8
