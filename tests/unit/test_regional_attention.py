"""Regional prompting maths: mask resampling, blend weights, the per-layer blend and the joint DiT mask."""

from __future__ import annotations

import math

import pytest
import torch

from preprint.regional.attention import (
    RegionError,
    as_mask_batch,
    blend_weights,
    joint_mask,
    masks_on_grid,
    regional_attention,
)


def test_masks_resample_to_any_grid_by_area_and_broadcast_over_the_batch():
    m = torch.zeros(1, 40, 60)
    m[:, :, :30] = 1.0  # left half
    g = masks_on_grid([m], batch=3, height=5, width=7)  # odd grid: the middle column straddles the edge
    assert g.shape == (1, 3, 35)
    grid = g[0, 0].view(5, 7)
    assert torch.equal(grid[:, :3], torch.ones(5, 3)) and torch.equal(grid[:, 4:], torch.zeros(5, 3))
    assert torch.allclose(grid[:, 3], torch.full((5,), 0.5))  # area average, not nearest
    assert torch.equal(g[0, 0], g[0, 2])


def test_per_image_masks_stay_per_image_and_a_wrong_batch_is_an_error():
    m = torch.stack([torch.zeros(8, 8), torch.ones(8, 8)])
    g = masks_on_grid([m], batch=2, height=4, width=4)
    assert float(g[0, 0].max()) == 0.0 and float(g[0, 1].min()) == 1.0
    with pytest.raises(RegionError, match="batch of 2 but the latent batch is 3"):
        masks_on_grid([m], batch=3, height=4, width=4)


def test_mask_batch_shapes():
    assert as_mask_batch(torch.full((4, 5), 2.0)).shape == (1, 4, 5)
    assert float(as_mask_batch(torch.full((4, 5), 2.0)).max()) == 1.0
    with pytest.raises(RegionError):
        as_mask_batch(torch.ones(1, 1, 4, 5))


def test_blend_weights_share_overlaps_and_give_the_rest_to_the_base():
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.5], [0.0, 1.0, 0.0, 0.0]])
    region, base = blend_weights(masks)
    assert torch.allclose(region.sum(0) + base, torch.ones(4))
    assert torch.allclose(region[:, 1], torch.tensor([0.5, 0.5]))  # overlap: averaged
    assert torch.allclose(base, torch.tensor([0.0, 0.0, 1.0, 0.5]))  # uncovered and half-covered


def test_regional_attention_puts_each_prompt_where_its_mask_is():
    base = torch.zeros(1, 4, 2)
    a, b = torch.ones(1, 4, 2), torch.full((1, 4, 2), 3.0)
    masks = torch.tensor([[[1.0, 0.0, 0.0, 1.0]], [[0.0, 1.0, 0.0, 1.0]]])
    out = regional_attention(base, [a, b], masks, base_ratio=0.0)
    assert torch.equal(out[0, :, 0], torch.tensor([1.0, 3.0, 0.0, 2.0]))
    half = regional_attention(base, [a, b], masks, base_ratio=0.5)
    assert torch.equal(half[0, :, 0], torch.tensor([0.5, 1.5, 0.0, 1.0]))
    assert regional_attention(base, [a, b], masks, base_ratio=1.0) is base


def test_a_full_region_equal_to_the_base_is_bitwise_the_base():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 6, 3, generator=g)
    out = regional_attention(base, [base.clone()], torch.ones(1, 2, 6), base_ratio=0.3)
    assert torch.equal(out, base)


def test_joint_mask_keeps_regions_with_their_text():
    # base text 2 tokens, region text 1 token each, 4 image tokens; region 1 on image 0-1, region 2 on 3
    masks = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 1.0]]])
    bias = joint_mask([2, 1, 1], masks, base_ratio=0.25)[0]
    ok = torch.isfinite(bias)
    img = slice(4, 8)
    assert ok[0:2, 0:2].all() and ok[0:2, img].all() and not ok[0:2, 2:4].any()  # base text: itself, the image
    assert ok[2, 2] and ok[2, 4] and ok[2, 5] and not ok[2, 6] and not ok[2, 7] and not ok[2, 3] and not ok[2, 0]
    assert ok[3, 3] and ok[3, 7] and not ok[3, 4]
    assert ok[img, img].all() and ok[img, 0:2].all()
    assert ok[4, 2] and not ok[4, 3] and not ok[6, 2] and not ok[6, 3] and ok[7, 3]
    # covered image tokens see the base text at a log(ratio) bias, uncovered ones at 0
    assert bias[4, 0] == pytest.approx(math.log(0.25)) and bias[6, 0] == 0.0
    assert torch.isinf(joint_mask([2, 1, 1], masks, base_ratio=0.0)[0, 4, 0])
    with pytest.raises(RegionError):
        joint_mask([2, 1], masks, base_ratio=0.2)
