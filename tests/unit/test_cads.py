"""CADS: the annealing schedule gamma(t), the noise it adds, and reproducibility from the run's seed."""

from __future__ import annotations

import pytest
import torch

from preprint.guidance.cads import (
    CADSConfig,
    anneal,
    anneal_condition,
    cads_noise,
    content_key,
    gamma,
    noise_seed,
)


def test_gamma_follows_eq4():
    assert gamma(0.0, 0.6, 0.9) == 1.0 and gamma(0.6, 0.6, 0.9) == 1.0
    assert gamma(0.9, 0.6, 0.9) == 0.0 and gamma(1.0, 0.6, 0.9) == 0.0
    assert gamma(0.75, 0.6, 0.9) == pytest.approx(0.5)
    assert gamma(0.66, 0.6, 0.9) == pytest.approx(0.8)
    ts = torch.linspace(0, 1, 101).tolist()
    gs = [gamma(t, 0.6, 0.9) for t in ts]
    assert all(a >= b for a, b in zip(gs, gs[1:], strict=False))  # non-increasing in t
    assert gamma(0.5, 0.5, 0.5) == 1.0 and gamma(0.51, 0.5, 0.5) == 0.0  # tau1 == tau2: a step


def test_noise_follows_gamma_without_rescale():
    """With psi = 0, y_hat - sqrt(gamma) y = s sqrt(1 - gamma) n exactly (eq. 3), for the noise of the seed."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 77, 64, generator=g) * 2 + 0.5
    cfg = CADSConfig(tau1=0.6, tau2=0.9, noise_scale=0.25, psi=0.0)
    for t in (0.0, 0.6, 0.7, 0.8, 0.95):
        out = anneal_condition(y, t, cfg, run_seed=123, sigma=5.0, key=7)
        gm = gamma(t, 0.6, 0.9)
        if gm == 1.0:
            assert out is y
            continue
        n = cads_noise(tuple(y.shape), noise_seed(123, 7, 5.0))
        torch.testing.assert_close(out, gm**0.5 * y + 0.25 * (1 - gm) ** 0.5 * n, rtol=0, atol=1e-5)
        # the added noise has the predicted spread
        resid = (out - gm**0.5 * y).std()
        assert float(resid) == pytest.approx(0.25 * (1 - gm) ** 0.5, rel=0.02)


def test_rescale_restores_mean_and_std_per_image():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 10, 32, generator=g) * torch.tensor([1.0, 3.0]).reshape(2, 1, 1) + 2.0
    n = torch.randn(y.shape, generator=g)
    out = anneal(y, 0.3, n, 1.0, psi=1.0)
    for b in range(2):
        assert float(out[b].mean()) == pytest.approx(float(y[b].mean()), abs=1e-4)
        assert float(out[b].std()) == pytest.approx(float(y[b].std()), rel=1e-4)
    half = anneal(y, 0.3, n, 1.0, psi=0.5)
    torch.testing.assert_close(half, 0.5 * out + 0.5 * anneal(y, 0.3, n, 1.0, psi=0.0), rtol=0, atol=1e-5)


def test_reproducible_from_seed_and_distinct_otherwise():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(2, 8, 16, generator=g)
    cfg = CADSConfig()
    state = torch.random.get_rng_state()
    a = anneal_condition(y, 0.8, cfg, run_seed=5, sigma=3.0)
    b = anneal_condition(y, 0.8, cfg, run_seed=5, sigma=3.0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is never touched
    assert torch.equal(a, b)
    assert not torch.equal(a, anneal_condition(y, 0.8, cfg, run_seed=6, sigma=3.0))  # another seed
    assert not torch.equal(a, anneal_condition(y, 0.8, cfg, run_seed=5, sigma=2.0))  # fresh noise per step
    assert not torch.equal(a, anneal_condition(y * 1.01, 0.8, cfg, run_seed=5, sigma=3.0))  # other condition
    assert not torch.equal(a[0], a[1])  # images of a batch get their own noise
    # identical conditionings (e.g. a perturbed-attention copy of the prompt) get identical noise
    assert content_key(y) == content_key(y.clone())


def test_pooled_part_only():
    """SDXL's ADM vector: only the pooled text part is annealed, and as if it were alone: the size embeddings
    after it neither change nor enter the rescale statistics (eq. 5) of the text part. Their scale differs from
    the text part's on purpose, so statistics taken over the whole vector would move the text part by O(1)."""
    g = torch.Generator().manual_seed(4)
    y = torch.cat([torch.randn(2, 1280, generator=g), 5.0 + 3.0 * torch.randn(2, 1536, generator=g)], dim=1)
    cfg = CADSConfig(tau1=0.6, tau2=0.9, noise_scale=0.25, psi=1.0)
    for t in (1.0, 0.8):
        out = anneal_condition(y, t, cfg, run_seed=0, sigma=14.0, dims=1280)
        assert torch.equal(out[:, 1280:], y[:, 1280:])
        assert not torch.equal(out[:, :1280], y[:, :1280])
        alone = anneal_condition(y[:, :1280], t, cfg, run_seed=0, sigma=14.0)
        torch.testing.assert_close(out[:, :1280], alone, rtol=0, atol=0)


def test_config_errors():
    with pytest.raises(ValueError, match="swap them"):
        CADSConfig(tau1=0.9, tau2=0.6)
    with pytest.raises(ValueError, match="psi"):
        CADSConfig(psi=1.5)
    with pytest.raises(ValueError, match="noise scale"):
        CADSConfig(noise_scale=-1)
