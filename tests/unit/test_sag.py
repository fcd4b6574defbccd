"""Self-Attention Guidance maths: mask, blur, re-noising, guidance term."""

from __future__ import annotations

import pytest
import torch

from preprint.guidance.sag import attention_mask, degrade, gaussian_blur_2d, renoise, sag_guidance


def test_mask_marks_keys_that_receive_more_than_average_attention():
    b, h, n = 2, 3, 6
    attn = torch.full((b, h, n, n), 1.0 / n)
    attn[..., 0] += 0.5 / n  # key 0 receives extra attention in every row and head ...
    attn[..., 1] -= 0.5 / n  # ... taken from key 1
    mask = attention_mask(attn, (2, 3), threshold=1.0)
    assert mask.shape == (b, 1, 2, 3)
    assert mask.flatten(1).tolist() == [[1, 0, 0, 0, 0, 0]] * b
    # the threshold decides the region (keys receive 1.5, 0.5 and 1): above the most a key can receive (n rows
    # of 1) nothing, at 0 everything, in between the keys above it
    assert not attention_mask(attn, (2, 3), threshold=float(n)).any()
    assert attention_mask(attn, (2, 3), threshold=0.0).all()
    assert attention_mask(attn, (2, 3), threshold=0.6).flatten(1).tolist() == [[1, 0, 1, 1, 1, 1]] * b
    with pytest.raises(ValueError, match="grid"):
        attention_mask(attn, (4, 2))


def test_blur_keeps_constants_and_small_images():
    const = torch.full((1, 4, 2, 3), 2.5)
    torch.testing.assert_close(gaussian_blur_2d(const, 9, 1.0), const)  # reflect impossible: replicate
    x = torch.randn(2, 4, 13, 21, generator=torch.Generator().manual_seed(0))
    y = gaussian_blur_2d(x, 9, 1.0)
    assert y.shape == x.shape and y.var() < x.var()
    assert torch.equal(gaussian_blur_2d(x, 9, 0.0), x)


def test_degrade_only_inside_mask_at_any_size():
    x0 = torch.randn(2, 4, 13, 21, generator=torch.Generator().manual_seed(1))
    assert torch.equal(degrade(x0, torch.zeros(2, 1, 3, 5), 1.0), x0)
    torch.testing.assert_close(degrade(x0, torch.ones(2, 1, 3, 5), 1.0), gaussian_blur_2d(x0, 9, 1.0))
    half = torch.zeros(2, 1, 2, 2)
    half[:, :, :, 0] = 1  # left half of a grid that does not divide the latent
    out = degrade(x0, half, 1.0)
    assert torch.equal(out[..., 11:], x0[..., 11:])
    assert not torch.equal(out[..., :10], x0[..., :10])
    # one mask per latent in a batch: each sample keeps its own
    per = torch.stack([torch.zeros(1, 3, 5), torch.ones(1, 3, 5)])
    out = degrade(x0, per, 1.0)
    assert torch.equal(out[0], x0[0]) and not torch.equal(out[1], x0[1])


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_renoise_keeps_the_predicted_noise(alpha):
    g = torch.Generator().manual_seed(2)
    x0, eps, x0b = (torch.randn(1, 4, 5, 5, generator=g) for _ in range(3))
    sigma = 0.7
    x = alpha * x0 + sigma * eps
    torch.testing.assert_close(renoise(x, x0, x0b, alpha), alpha * x0b + sigma * eps)


def test_guidance_term_and_scale_zero():
    d, a, b = torch.randn(3, 1, 4, 4).unbind(0)
    assert sag_guidance(d, a, b, 0.0) is d
    torch.testing.assert_close(sag_guidance(d, a, b, 0.5), d + 0.5 * (a - b))
