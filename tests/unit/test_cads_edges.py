"""CADS edge behaviour: config validation bounds, exact no-op at gamma = 1, eq. 5 statistics, seeding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from preprint.guidance.cads import (
    CADSConfig,
    anneal,
    anneal_condition,
    cads_noise,
    content_key,
    noise_seed,
)

# --- configuration ---

def test_paper_defaults():
    c = CADSConfig()
    assert (c.tau1, c.tau2, c.noise_scale, c.psi) == (0.6, 0.9, 0.25, 1.0)


def test_config_is_immutable():
    c = CADSConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.tau1 = 2.0  # validation cannot be bypassed after construction


@pytest.mark.parametrize("tau1,tau2", [(0.0, 0.0), (0.0, 0.5), (1.0, 1.0), (0.5, 0.5), (0.3, 1.0)])
def test_bounds_inclusive_and_equal_taus_accepted(tau1, tau2):
    c = CADSConfig(tau1=tau1, tau2=tau2)
    assert (c.tau1, c.tau2) == (tau1, tau2)


@pytest.mark.parametrize("tau1,tau2", [(-0.5, 0.5), (-0.1, 0.0), (1.5, 1.0), (0.0, -0.5), (0.0, 1.5)])
def test_taus_outside_unit_interval_rejected(tau1, tau2):
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        CADSConfig(tau1=tau1, tau2=tau2)


def test_zero_noise_scale_accepted():
    assert CADSConfig(noise_scale=0.0).noise_scale == 0.0


def test_negative_psi_rejected():
    with pytest.raises(ValueError, match="psi"):
        CADSConfig(psi=-0.5)


# --- anneal ---

def test_anneal_returns_input_itself_at_gamma_one():
    y = torch.randn(2, 5)
    assert anneal(y, 1.0, torch.randn(2, 5), 0.25, 1.0) is y
    assert anneal(y, 1.0, torch.randn(2, 5), 0.25, 0.0) is y


def test_psi_zero_is_eq3_exactly_even_for_single_feature():
    # psi = 0: no rescaling at all, y_hat = sqrt(g) y + s sqrt(1 - g) n (statistics of one value are undefined)
    y = torch.tensor([[2.0], [-1.0]])
    n = torch.tensor([[1.0], [4.0]])
    out = anneal(y, 0.25, n, 0.5, 0.0)
    expected = torch.tensor([[0.5 * 2.0 + 0.5 * (0.75 ** 0.5) * 1.0], [0.5 * -1.0 + 0.5 * (0.75 ** 0.5) * 4.0]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_rescale_statistics_are_per_image_over_all_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 3, 4, generator=g) * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1)
    n = torch.randn(2, 3, 4, generator=g)
    out = anneal(y, 0.5, n, 1.0, 1.0)
    y_hat = 0.5 ** 0.5 * y + 0.5 ** 0.5 * n
    for b in range(2):
        yh, yy = y_hat[b].flatten(), y[b].flatten()
        exp = (yh - yh.mean()) / yh.std() * yy.std() + yy.mean()
        assert torch.allclose(out[b].flatten(), exp, atol=1e-5)


def test_rescale_restores_small_std():
    g = torch.Generator().manual_seed(1)
    y = 0.01 * torch.randn(1, 64, generator=g) + 0.3
    out = anneal(y, 0.2, torch.randn(1, 64, generator=g), 0.25, 1.0)
    assert out.std().item() == pytest.approx(y.std().item(), rel=1e-4)
    assert out.mean().item() == pytest.approx(y.mean().item(), abs=1e-5)


def test_constant_condition_without_noise_stays_put():
    # s = 0 and a constant y: y_hat has zero spread; eq. 5 must give y back, not 0 / 0
    y = torch.full((1, 8), 0.7)
    out = anneal(y, 0.3, torch.randn(1, 8), 0.0, 1.0)
    assert torch.allclose(out, torch.full((1, 8), 0.7 * 0.3 ** 0.5 / 0.3 ** 0.5), atol=1e-6)
    assert torch.isfinite(out).all()


# --- fingerprints and seeds ---

def _tensors(n):
    return [torch.arange(6, dtype=torch.float32).reshape(1, 6) + i * 0.5 for i in range(n)]


def test_content_key_uses_all_64_bits():
    keys = [content_key(t) for t in _tensors(32)]
    assert all(0 <= k < 2**64 for k in keys)
    assert max(keys) >= 2**60  # 32 uniform 64-bit keys all below 2^60: probability 2^-128


def test_content_key_depends_on_values_not_dtype():
    t = torch.linspace(-1, 1, 10).reshape(1, 10)
    assert content_key(t) == content_key(t.clone()) == content_key(t.double())
    assert content_key(t) != content_key(t + 1e-3)


def test_noise_seed_distinguishes_neighbouring_seeds_and_keys():
    base = noise_seed(2, 12345, 1.0)
    assert noise_seed(3, 12345, 1.0) != base
    assert noise_seed(2, 12344, 1.0) != noise_seed(2, 12345, 1.0)
    assert noise_seed(2, 999, 1.0) != base
    assert noise_seed(2, 2**63 + 5, 1.0) != noise_seed(2, 5, 1.0)


def test_noise_seed_range_covers_63_bits():
    seeds = [noise_seed(s, 7, 0.5) for s in range(64)]
    assert all(0 <= v < 2**63 for v in seeds)
    assert max(seeds) >= 2**59
    assert any(v % 2 for v in seeds)  # odd seeds occur


def test_noise_seed_stable_across_releases():
    """One seed reproduces one image across releases: the derived generator seeds are a contract, pinned here
    (a change to the seed derivation must be a deliberate, announced one)."""
    assert noise_seed(0, 0, 1.0) == 4722980096059825448
    assert noise_seed(42, 2**64 - 1, 14.6, 1) == 5922684487409950971


# --- anneal_condition ---

def test_clean_phase_returns_input_itself_even_with_dims():
    cfg = CADSConfig()
    y = torch.randn(2, 6)
    assert anneal_condition(y, 0.3, cfg, 1, 0.5, dims=4) is y
    assert anneal_condition(y, 0.6, cfg, 1, 0.5) is y


def test_dims_on_last_axis_of_3d_condition():
    cfg = CADSConfig(tau1=0.0, tau2=0.5, noise_scale=0.25, psi=0.0)
    y = torch.randn(1, 3, 6, generator=torch.Generator().manual_seed(3))
    out = anneal_condition(y, 1.0, cfg, run_seed=5, sigma=10.0, dims=4)
    assert out.shape == y.shape
    assert torch.equal(out[..., 4:], y[..., 4:])
    n = cads_noise((1, 3, 4), noise_seed(5, content_key(y[..., :4]), 10.0, 0))
    assert torch.allclose(out[..., :4], 0.25 * n, atol=1e-6)  # gamma = 0: pure scaled noise
