"""Adaptive Guidance edge behaviour: the velocity criterion with per-image sigmas, the cosine, the state."""

from __future__ import annotations

import pytest
import torch

from preprint.guidance.adaptive_guidance import (
    AdaptiveGuidanceDenoiser,
    AdaptiveGuidanceState,
    cosine_per_row,
    prediction_direction,
)


def test_velocity_default_sigma_is_one():
    # EPS at unit sigma: eps = x - D, v = eps - D = x - 2 D
    x = torch.tensor([[3.0, 1.0]])
    d = torch.tensor([[1.0, -1.0]])
    v = prediction_direction(x, d, criterion="velocity")
    assert torch.allclose(v, torch.tensor([[1.0, 3.0]], dtype=torch.float64))


def test_velocity_uses_each_images_own_sigma():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g)
    d = torch.randn(2, 3, 4, 5, generator=g)
    sig = torch.tensor([0.5, 4.0])
    v = prediction_direction(x, d, sig, "eps", "velocity")
    for b in range(2):
        exp = (x[b].double() - d[b].double()) / float(sig[b]) - d[b].double()
        assert torch.allclose(v[b], exp)


def test_velocity_scalar_sigma_applies_to_whole_batch():
    x = torch.ones(2, 3)
    d = torch.zeros(2, 3)
    v = prediction_direction(x, d, 2.0, "eps", "velocity")
    assert torch.allclose(v, torch.full((2, 3), 0.5, dtype=torch.float64))


def test_cosine_of_small_parallel_vectors_is_one():
    a = torch.tensor([[1e-4, 2e-4, -1e-4]])
    assert cosine_per_row(a, 3 * a).item() == pytest.approx(1.0, abs=1e-12)


def test_threshold_below_minus_one_rejected():
    with pytest.raises(ValueError):
        AdaptiveGuidanceState(threshold=-1.5)


def test_all_converged_checks_batch_size():
    st = AdaptiveGuidanceState(threshold=0.5)
    st.converged = torch.tensor([True, True])
    assert st.all_converged() is True
    assert st.all_converged(2) is True
    assert st.all_converged(3) is False


def test_denoiser_skips_uncond_after_convergence_for_any_channel_count():
    def cond(x, s):
        return 0.5 * x

    def uncond(x, s):
        return 0.25 * x  # same direction as cond per image for the noise criterion

    den = AdaptiveGuidanceDenoiser(cond, uncond, scale=3.0, threshold=0.99, criterion="noise")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    den(x, 1.0)
    out = den(x, 0.5)
    assert den.uncond_calls == 1 and den.state.uncond_skipped == 1
    assert torch.equal(out, 0.5 * x)
