"""Self-Attention Guidance maths: mask, blur, re-noising, guidance term."""

from __future__ import annotations

import math

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


def _gaussian_taps(kernel_size, sigma):
    """Normalised samples of exp(-d^2 / (2 sigma^2)) at the integer offsets d of a centred odd kernel."""
    r = kernel_size // 2
    w = [math.exp(-(d * d) / (2.0 * sigma * sigma)) for d in range(-r, r + 1)]
    return [v / sum(w) for v in w]


def _reference_blur(img, taps, edges):
    """Separable blur by explicit gathering: out[o] = sum_j taps[j] * img[o + j - r], the source index mirrored
    about the border pixel ("reflect") or clamped to it ("replicate"), per spatial axis."""
    r = len(taps) // 2
    out = img.double()
    for axis, edge in zip((2, 3), edges, strict=True):
        n = out.shape[axis]
        acc = torch.zeros_like(out)
        for j, w in enumerate(taps):
            src = []
            for o in range(n):
                s = o + j - r
                if edge == "reflect":
                    s = -s if s < 0 else (2 * (n - 1) - s if s > n - 1 else s)
                else:
                    s = min(max(s, 0), n - 1)
                src.append(s)
            acc += w * out.index_select(axis, torch.tensor(src))
        out = acc
    return out.to(img.dtype)


def test_attention_mask_default_threshold_is_an_average_key():
    """Without a threshold a key is in the mask when it receives more than 1 (an average key's share of the n
    rows): 1.5 is in, exactly 1 and 0.5 are out."""
    n = 6
    attn = torch.full((1, 2, n, n), 1.0 / n)
    attn[..., 0] += 0.5 / n
    attn[..., 1] -= 0.5 / n
    assert attention_mask(attn, (3, 2)).flatten().tolist() == [1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("kernel_size,sigma", [(None, None), (9, 1.0), (5, 0.7), (7, 2.0), (9, 0.5)])
def test_blur_of_an_impulse_is_the_separable_gaussian(kernel_size, sigma):
    """A unit impulse far from the borders comes out as the outer product of the normalised 1-D Gaussian taps
    exp(-d^2 / 2 sigma^2) at offsets d = -(k-1)/2 .. (k-1)/2, rows along H and columns along W; the defaults
    are 9 taps at sigma 1."""
    img = torch.zeros(1, 2, 13, 15, dtype=torch.float64)
    img[:, :, 6, 7] = 1.0
    if kernel_size is None:
        out = gaussian_blur_2d(img)
        kernel_size, sigma = 9, 1.0
    else:
        out = gaussian_blur_2d(img, kernel_size, sigma)
    g = torch.tensor(_gaussian_taps(kernel_size, sigma), dtype=torch.float64)
    r = kernel_size // 2
    want = torch.zeros_like(img)
    want[:, :, 6 - r:6 + r + 1, 7 - r:7 + r + 1] = torch.outer(g, g)
    assert out.shape == img.shape
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape,edges", [
    ((13, 3), ("reflect", "replicate")),
    ((3, 13), ("replicate", "reflect")),
    ((4, 11), ("replicate", "reflect")),  # pad 4 == size 4: too short to reflect
    ((11, 4), ("reflect", "replicate")),
    ((5, 6), ("reflect", "reflect")),  # pad 4 < size 5: reflect
    ((2, 2), ("replicate", "replicate")),
])
def test_blur_pads_each_axis_by_its_own_length(shape, edges):
    """Each axis is padded by reflection when it is longer than the half kernel, by replicating the border pixel
    otherwise, decided per axis from that axis's own length."""
    img = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = _reference_blur(img, _gaussian_taps(9, 1.0), edges)
    torch.testing.assert_close(gaussian_blur_2d(img, 9, 1.0), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch,channels,width,mask_batch", [(4, 3, 4, 2), (4, 2, 5, 2), (6, 1, 3, 3), (3, 4, 7, 1)])
def test_degrade_tiles_a_smaller_mask_batch_over_the_latents(batch, channels, width, mask_batch):
    """A mask batch that divides the latent batch is repeated whole: latent i is blurred where mask
    i mod (mask batch) is set and kept elsewhere."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(batch, channels, 6, width, generator=g)
    mask = (torch.rand(mask_batch, 1, 6, width, generator=g) > 0.5).float()
    mask[:, 0, 0, 0] = (torch.arange(mask_batch) % 2).float()  # neighbouring masks differ
    blurred = gaussian_blur_2d(x0, 9, 1.0)
    out = degrade(x0, mask, 1.0)
    assert out.shape == x0.shape
    for i in range(batch):
        m = mask[i % mask_batch].bool().expand(channels, -1, -1)
        assert torch.equal(out[i], torch.where(m, blurred[i], x0[i]))


@pytest.mark.parametrize("batch,channels,width,mask_batch", [(1, 4, 6, 3), (2, 4, 2, 3), (2, 3, 6, 3), (2, 4, 3, 3),
                                                             (3, 4, 6, 2)])
def test_degrade_refuses_a_mask_batch_that_does_not_divide_the_latents(batch, channels, width, mask_batch):
    """A mask batch that does not divide the latent batch (larger, or not a divisor) is an error."""
    x0 = torch.zeros(batch, channels, 5, width)
    with pytest.raises(ValueError, match="does not divide"):
        degrade(x0, torch.ones(mask_batch, 1, 5, width), 1.0)
