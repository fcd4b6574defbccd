"""LIME: no-op switches that skip all work, token checks at the edges, bitwise blend at weight 0, region masks
(empty sides, clamping), per-image masks on a positive-only call, and Tiled Diffusion calls."""

from __future__ import annotations

import pytest
import torch

from preprint.highres.tiling import Tile
from preprint.regional.lime import LimeAttention, LimeError, RegionMask, blend, kept_columns, regularised_attention
from preprint.utils.sigma_window import SigmaWindow

from .test_word_attention import plain_attention


def _inputs(seed=0, batch=2, heads=2, d=4, n=24, t=9):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, m, heads * d, generator=g) for m in (n, t, t))


def _opts(cou=(0, 1), h=4, w=6, **extra):
    return {"n_heads": 2, "activations_shape": [2, 8, h, w], "cond_or_uncond": list(cou),
            "sigmas": torch.tensor([5.0]), **extra}


def _left_half(h=32, w=48, batch=1):
    m = torch.zeros(batch, h, w)
    m[:, :, : w // 2] = 1.0
    return m


class _Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, q, k, v, heads, **kw):
        self.calls += 1
        return plain_attention(q, k, v, heads)


def test_zero_strength_or_an_empty_region_is_the_layer_with_no_further_work_or_checks():
    """Either switch returns the layer's own output at once: one attention call, and the edit words are not even
    checked against the call's prompt (a word past its tokens is no error then)."""
    q, k, v = _inputs()
    plain = plain_attention(q, k, v, 2)
    for mask, strength in ((_left_half(), 0.0), (torch.zeros(1, 32, 48), 1.0)):
        att = _Counting()
        out = LimeAttention(att, [2, 40], RegionMask(mask), strength, SigmaWindow())(q, k, v, _opts())
        assert torch.equal(out, plain) and att.calls == 1


def test_the_edit_words_must_lie_inside_the_prompts_tokens_at_the_edges():
    q, k, v = _inputs(t=12)  # 12 tokens, width 8
    layer = LimeAttention(plain_attention, [2, 12], RegionMask(_left_half()), 1.0, SigmaWindow(), node="X")
    with pytest.raises(LimeError, match="X: the edit words sit at token 13 but the positive prompt has 12 tokens"):
        layer(q, k, v, _opts())
    # the last token is a valid edit word (even past the width of the features)
    out = LimeAttention(plain_attention, [2, 11], RegionMask(_left_half()), 1.0, SigmaWindow())(q, k, v, _opts())
    reg = regularised_attention(plain_attention, q[:1], k[:1], v[:1], 2, [2, 11])
    inside = torch.zeros(4, 6, dtype=torch.bool)
    inside[:, :3] = True
    assert torch.equal(out[0, inside.flatten()], reg[0, inside.flatten()])


def test_weight_zero_leaves_the_base_bitwise_whatever_the_other_outputs_hold():
    base = torch.tensor([[[-0.0, 1.0], [2.0, -0.0]]])
    reg = torch.tensor([[[float("nan"), 3.0], [1.0, 5.0]]])
    plain = torch.tensor([[[1.0, 2.0], [float("inf"), 4.0]]])
    weight = torch.zeros(1, 2)
    for p in (None, plain):
        out = blend(base, p, reg, weight)
        assert torch.equal(out.view(torch.int32), base.view(torch.int32))  # the sign of -0.0 too, and no NaN


def test_region_masks_with_an_empty_side_are_refused():
    for shape in ((0, 4, 4), (1, 0, 4), (1, 4, 0), (0, 4)):
        with pytest.raises(LimeError, match=r"\[height, width\] or \[batch, height, width\]"):
            RegionMask(torch.zeros(shape))


def test_region_mask_values_are_clamped_to_zero_and_one_before_averaging():
    m = torch.tensor([[[-1.0, 1.0], [2.0, 0.5]]])
    cpu = torch.device("cpu")
    assert torch.equal(RegionMask(m).on_grid(1, 2, 2, cpu), torch.tensor([[0.0, 1.0, 1.0, 0.5]]))
    assert torch.allclose(RegionMask(m).on_grid(1, 1, 1, cpu), torch.tensor([[(0 + 1 + 1 + 0.5) / 4]]))


def test_a_positive_only_call_gives_each_image_its_own_mask():
    q, k, v = _inputs(batch=2)
    masks = torch.zeros(2, 32, 48)
    masks[0, :, :24] = 1.0
    masks[1, :, 24:] = 1.0
    out = LimeAttention(plain_attention, [2, 3], RegionMask(masks), 1.0, SigmaWindow())(q, k, v, _opts(cou=(0,)))
    plain, reg = plain_attention(q, k, v, 2), regularised_attention(plain_attention, q, k, v, 2, [2, 3])
    left = torch.zeros(4, 6, dtype=torch.bool)
    left[:, :3] = True
    left = left.flatten()
    assert torch.equal(out[0, left], reg[0, left]) and torch.equal(out[0, ~left], plain[0, ~left])
    assert torch.equal(out[1, ~left], reg[1, ~left]) and torch.equal(out[1, left], plain[1, left])


def test_keep_start_keeps_the_start_token_whatever_length_is_reported():
    assert kept_columns([[3]], 0, keep_start=True) == [0, 3]
    assert kept_columns([], 0, keep_start=True) == [0]


def test_tiled_calls_give_each_tile_its_part_of_the_region():
    """Two side-by-side tiles of an 8 x 12 latent, each with a prompt and a negative row, a 4 x 3 layer grid, and a
    region on the frame's left half: the left tile's prompt row is regularised everywhere, the right tile's is the
    plain attention (its part of the region is empty), and the negative rows are plain."""
    q, k, v = _inputs(batch=4, n=12)
    tiles = ([Tile(0, 0, 8, 6), Tile(0, 6, 8, 6)], 8, 12)
    opts = _opts(cou=(0, 1, 0, 1), h=4, w=3, preprint_tiles=tiles)
    out = LimeAttention(plain_attention, [2, 3], RegionMask(_left_half(8, 12)), 1.0, SigmaWindow())(q, k, v, opts)
    plain, reg = plain_attention(q, k, v, 2), regularised_attention(plain_attention, q, k, v, 2, [2, 3])
    assert torch.equal(out[0], reg[0])
    assert torch.equal(out[1:], plain[1:])


def test_a_tile_outside_the_region_is_the_layer_with_no_further_work():
    q, k, v = _inputs(batch=2, n=12)
    att = _Counting()
    opts = _opts(cou=(0, 1), h=4, w=3, preprint_tiles=([Tile(0, 6, 8, 6)], 8, 12))
    out = LimeAttention(att, [2, 3], RegionMask(_left_half(8, 12)), 1.0, SigmaWindow())(q, k, v, opts)
    assert torch.equal(out, plain_attention(q, k, v, 2)) and att.calls == 1
