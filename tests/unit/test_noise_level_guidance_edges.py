"""Noise-Level Guidance (arXiv:2509.13936): the paper's defaults, configuration checks, clipping and
renormalisation edge cases, and the seeded jitter step replayed independently."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from preprint.guidance.noise_level_guidance import NLGConfig, clip_rows, refine_noise, renormalize


def test_defaults_are_the_authors_stable_diffusion_settings():
    """K = 20 iterations, step 1, clip c = 0.5, jitter variance 0.001, renormalised to sqrt(D)."""
    cfg = NLGConfig()
    assert (cfg.iterations, cfg.step_size, cfg.clip_norm, cfg.jitter, cfg.renormalize) == (20, 1.0, 0.5, 0.001, True)


def test_config_is_immutable_after_validation():
    cfg = NLGConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.jitter = -1.0  # type: ignore[misc]


@pytest.mark.parametrize("jitter", [-0.5, -1e-9, -2.0])
def test_negative_jitter_variance_is_refused(jitter):
    with pytest.raises(ValueError, match="jitter variance must be >= 0"):
        NLGConfig(jitter=jitter)


def test_zero_jitter_is_allowed_and_draws_no_random_numbers():
    """jitter 0 adds no fresh noise: the refinement is deterministic and leaves the random streams untouched."""
    n = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    cfg = NLGConfig(iterations=3, step_size=0.5, clip_norm=0.0, jitter=0.0, renormalize=False)
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(11)
    out = refine_noise(n, lambda z: 0.1 * z, cfg, g)
    torch.testing.assert_close(out, n * 0.95**3)
    assert torch.equal(torch.randn(5, generator=g), torch.randn(5, generator=torch.Generator().manual_seed(7)))
    out2 = refine_noise(n, lambda z: 0.1 * z, cfg)
    assert torch.equal(out2, out)
    assert torch.equal(torch.randn(5), torch.randn(5, generator=torch.Generator().manual_seed(11)))


def test_one_iteration_replayed_with_the_same_seed():
    """n' = n - step * clip(d) + sqrt(v) xi, xi drawn from the given CPU generator (no renormalisation here)."""
    n = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3))
    d = torch.full_like(n, 0.01)  # norm 0.049 per image: below the clip
    cfg = NLGConfig(iterations=1, step_size=2.0, clip_norm=0.5, jitter=0.04, renormalize=False)
    out = refine_noise(n, lambda z: d, cfg, torch.Generator().manual_seed(5))
    xi = torch.randn(n.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, n - 2.0 * d + 0.2 * xi, rtol=0, atol=1e-6)


def test_clip_scales_a_short_but_too_long_direction_to_exactly_the_limit():
    """Rows shorter than 1 but longer than the limit are scaled to norm ``max_norm`` too."""
    d = torch.tensor([[0.3, 0.4], [0.03, 0.04], [0.0, 0.0]])  # norms 0.5, 0.05, 0
    out = clip_rows(d, 0.25)
    torch.testing.assert_close(out[0], torch.tensor([0.15, 0.2]))
    assert torch.equal(out[1], d[1]) and torch.equal(out[2], d[2])


def test_renormalize_single_image_and_zero_image():
    one = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])  # batch of one, D = 4, norm 5
    torch.testing.assert_close(renormalize(one), one * (2.0 / 5.0))
    batch = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [0.0] * 9])
    out = renormalize(batch)
    torch.testing.assert_close(out[0], torch.ones(9) * (3.0 / 3.0))
    assert torch.equal(out[1], torch.zeros(9))  # nothing to rescale: stays zero, no NaN
    assert math.isclose(float(out[0].norm()), 3.0, rel_tol=1e-6)


def test_refinement_builds_no_autograd_graph():
    n = torch.randn(1, 8, requires_grad=True)
    out = refine_noise(n, lambda z: 0.1 * z, NLGConfig(iterations=2, jitter=0.0))
    assert not out.requires_grad and out.grad_fn is None
