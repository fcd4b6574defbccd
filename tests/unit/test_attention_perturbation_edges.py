"""Edges of the perturbed-attention maths (``guidance/attention_perturbation.py``) that the main PAG tests leave
open: SEG's blur on grids whose axes take different kernel sizes (one axis too short to blur at all), the
threshold of the "infinite" blur, the defaults of the text length, head selection bounds, the dispatch of
``perturbed_output`` and its errors.

The reference blur below is written from SEG's definition with an explicit reflected index, not with
``F.pad`` / ``F.conv2d``: per axis of length ``L``, a Gaussian of ``min(odd size just above 6 sigma, largest
odd size <= L + 1)`` taps, normalised after truncation.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from preprint.guidance.attention_perturbation import (
    INFINITE_BLUR_SIGMA,
    Perturbation,
    blur_tokens,
    identity_output,
    perturb_rows,
    perturbed_output,
    smoothed_energy_output,
)


def taps(sigma: float, length: int) -> torch.Tensor:
    size = math.ceil(6 * sigma)
    size += 1 - size % 2
    size = min(size, length + 1 - length % 2)
    half = size // 2
    k = torch.tensor([math.exp(-0.5 * (j / sigma) ** 2) for j in range(-half, half + 1)], dtype=torch.float64)
    return k / k.sum()


def reflect(i: int, length: int) -> int:
    if i < 0:
        return -i
    if i >= length:
        return 2 * (length - 1) - i
    return i


def blur_axis(img: torch.Tensor, sigma: float, axis: int) -> torch.Tensor:
    """Blur a ``(..., h, w)`` map along ``axis`` (-2 or -1) with reflected borders."""
    length = img.shape[axis]
    k = taps(sigma, length)
    half = len(k) // 2
    if len(k) < 3:
        return img
    moved = img.movedim(axis, 0)
    out = torch.stack([sum(k[j] * moved[reflect(i + j - half, length)] for j in range(len(k)))
                       for i in range(length)])
    return out.movedim(0, axis)


def reference_blur(x: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    b, h, n, d = x.shape
    img = x.permute(0, 1, 3, 2).reshape(b, h, d, *grid)
    img = blur_axis(blur_axis(img, sigma, -2), sigma, -1)
    return img.reshape(b, h, d, n).permute(0, 1, 3, 2)


def sdpa(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ blur


@pytest.mark.parametrize("grid", [(1, 7), (3, 8), (5, 2), (4, 5), (6, 1)])
@pytest.mark.parametrize("sigma", [0.6, 1.0, 9998.0])
def test_blur_on_any_grid_matches_the_definition(grid, sigma):
    """Each axis takes its own kernel size; an axis too short for three taps is not blurred, the other still is."""
    x = rand(2, 3, grid[0] * grid[1], 4)
    want = reference_blur(x, grid, sigma)
    torch.testing.assert_close(blur_tokens(x, grid, sigma), want, rtol=1e-12, atol=1e-12)
    if max(grid) > 2:
        assert not torch.allclose(want, x)


def test_infinite_blur_starts_at_9999():
    """9999 (the widget's maximum) already means every query is the mean one; just below it is a finite blur."""
    x = rand(2, 3, 12, 4)
    assert INFINITE_BLUR_SIGMA == 9999.0
    assert torch.equal(blur_tokens(x, (3, 4), 9999.0), x.mean(dim=2, keepdim=True).expand_as(x))
    finite = blur_tokens(x, (3, 4), 9998.5)
    torch.testing.assert_close(finite, reference_blur(x, (3, 4), 9998.5), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(finite, x.mean(dim=2, keepdim=True).expand_as(x), atol=1e-3)


# ------------------------------------------------------------------------------------------------ text length defaults


def test_self_attention_defaults_have_no_text_tokens():
    q, k, v = (rand(2, 2, 12, 4, seed=s) for s in (1, 2, 3))
    assert torch.equal(identity_output(q, k, v), v)
    assert torch.equal(perturbed_output(q, k, v, Perturbation()), v)
    seg = Perturbation("smoothed_energy", blur_sigma=1.0)
    want = sdpa(reference_blur(q, (3, 4), 1.0), k, v)
    torch.testing.assert_close(smoothed_energy_output(q, k, v, (3, 4), 1.0), want)
    torch.testing.assert_close(perturbed_output(q, k, v, seg, grid=(3, 4)), want)
    base = sdpa(q, k, v)
    out = perturb_rows(base, q, k, v, [1], seg, grid=(3, 4))
    torch.testing.assert_close(out[1], want[1])
    assert torch.equal(out[0], base[0])


def test_one_text_token_is_joint_attention():
    """With a single text token, image rows attend to it and to themselves only (not plain identity)."""
    q, k, v = (rand(1, 2, 7, 4, seed=s) for s in (4, 5, 6))
    logits = q @ k.transpose(-1, -2) / 2.0
    mask = torch.zeros(7, 7, dtype=torch.bool)
    mask[0] = True
    mask[1:, 0] = True
    mask[1:, 1:] = torch.eye(6, dtype=torch.bool)
    want = torch.softmax(logits.masked_fill(~mask, -math.inf), -1) @ v
    torch.testing.assert_close(identity_output(q, k, v, n_txt=1), want)
    assert not torch.allclose(want, v)


# ------------------------------------------------------------------------------------------------ heads, dispatch


def test_head_bounds():
    w = Perturbation(strength=0.4, heads=(0, 2)).head_weights(3, "cpu", torch.float64)
    assert w.shape == (1, 3, 1, 1) and w.flatten().tolist() == [0.4, 0.0, 0.4]
    for heads in ((-1,), (3,), (0, 3)):
        with pytest.raises(ValueError, match="do not exist: this layer has heads 0-2"):
            Perturbation(heads=heads).head_weights(3, "cpu", torch.float64)


def test_perturbed_output_dispatch_and_errors():
    q, k, v = (rand(1, 2, 6, 4, seed=s) for s in (7, 8, 9))
    seg = Perturbation("smoothed_energy", blur_sigma=0.8)
    torch.testing.assert_close(perturbed_output(q, k, v, seg, n_txt=2, grid=(2, 2)),
                               sdpa(torch.cat([q[:, :, :2], reference_blur(q[:, :, 2:], (2, 2), 0.8)], 2), k, v))
    with pytest.raises(ValueError, match="needs the token grid"):
        perturbed_output(q, k, v, seg)
    with pytest.raises(ValueError, match="unknown perturbation kind 'blur'"):
        perturbed_output(q, k, v, Perturbation("blur"))


def test_no_rows_returns_the_output_itself():
    """Nothing to perturb: the attention output is handed back as is (no copy of a large tensor per call)."""
    q, k, v = (rand(2, 2, 6, 4, seed=s) for s in (1, 2, 3))
    base = sdpa(q, k, v)
    assert perturb_rows(base, q, k, v, [], Perturbation()) is base


def test_perturbation_is_immutable():
    """One Perturbation is shared by every layer patch and run of a patched model."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        Perturbation().strength = 0.5
