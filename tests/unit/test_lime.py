"""LIME's attention regularisation: probabilities with the unrelated tokens at -inf inside the region (exact zeros,
rows summing to 1, untouched rows bitwise), the gathered-columns attention against them, the soft-mask blend, the
attn2 replacement driven with a plain attention function (positive rows, window, strength, stacking), fp16, masks on
token grids and bad input."""

from __future__ import annotations

import pytest
import torch

from preprint.regional.lime import (
    LimeAttention,
    LimeError,
    RegionMask,
    blend,
    kept_columns,
    regularised_attention,
    regularised_probs,
)
from preprint.regional.word_attention import attention_probs
from preprint.utils.sigma_window import SigmaWindow

from .test_word_attention import plain_attention  # noqa: E402  (ComfyUI-style attention, written out)


def _inputs(seed=0, batch=2, heads=2, d=4, h=4, w=6, t=9, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (scale * torch.randn(batch, n, heads * d, generator=g) for n in (h * w, t, t))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _opts(sigma=5.0, cou=(0, 1), h=4, w=6, heads=2):
    return {"n_heads": heads, "activations_shape": [2, 8, h, w], "cond_or_uncond": list(cou),
            "sigmas": torch.tensor([sigma])}


def _left_half(h=4, w=6, batch=1, value=1.0):
    m = torch.zeros(batch, h * 8, w * 8)
    m[:, :, : w * 4] = value
    return m


KEEP = [2, 3]  # the edit word's tokens
OTHERS = [0, 1, 4, 5, 6, 7, 8]


# -- probabilities -------------------------------------------------------------------------------------------------
def test_inside_the_region_only_the_kept_tokens_are_attended_and_rows_sum_to_one():
    q, k, _ = _inputs()
    inside = torch.zeros(2, 24)
    inside[0, :10] = 1.0
    inside[1, 5:7] = 0.3  # any non-zero mask value marks the position as inside
    probs = regularised_probs(q, k, 2, KEEP, inside)
    plain = attention_probs(q, k, 2)
    rows_in = inside > 0
    got_in = probs.permute(0, 2, 1, 3)[rows_in]  # [n_inside, heads, T]
    assert torch.equal(got_in[..., OTHERS], torch.zeros_like(got_in[..., OTHERS]))  # exactly zero, not small
    assert torch.allclose(got_in.sum(-1), torch.ones(got_in.shape[:-1]), atol=1e-6)
    # the kept tokens share the row as a softmax over them alone
    want = torch.softmax(torch.log(plain.permute(0, 2, 1, 3)[rows_in][..., KEEP]), dim=-1)
    assert torch.allclose(got_in[..., KEEP], want, atol=1e-6)
    # outside the region every probability is the plain one, bit for bit
    assert torch.equal(probs.permute(0, 2, 1, 3)[~rows_in], plain.permute(0, 2, 1, 3)[~rows_in])


def test_the_gathered_attention_is_the_minus_infinity_attention():
    q, k, v = _inputs(seed=1)
    reg = regularised_attention(plain_attention, q, k, v, 2, KEEP)
    probs = regularised_probs(q, k, 2, KEEP, torch.ones(24))
    vh = v.view(2, 9, 2, 4).transpose(1, 2)
    want = (probs @ vh).transpose(1, 2).reshape(2, 24, 8)
    assert torch.allclose(reg, want, atol=1e-6)
    assert not torch.allclose(reg, plain_attention(q, k, v, 2), atol=1e-3)


def test_fp16_gives_no_nan_and_matches_float32():
    q, k, v = _inputs(seed=2, dtype=torch.float16, scale=4.0)  # scores up to hundreds: far past exp's fp16 range
    reg = regularised_attention(plain_attention, q, k, v, 2, KEEP)
    assert reg.dtype == torch.float16 and torch.isfinite(reg).all()
    ref = regularised_attention(plain_attention, q.float(), k.float(), v.float(), 2, KEEP)
    assert torch.allclose(reg.float(), ref, atol=3e-2, rtol=1e-2)
    probs = regularised_probs(q, k, 2, KEEP, torch.ones(24))
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2, 2, 24), atol=1e-5)
    layer = LimeAttention(plain_attention, KEEP, RegionMask(_left_half()), 0.7, SigmaWindow())
    assert torch.isfinite(layer(q, k, v, _opts())).all()


# -- soft-mask blend -------------------------------------------------------------------------------------------------
def test_the_blend_is_plain_at_zero_regularised_at_one_and_linear_between():
    g = torch.Generator().manual_seed(3)
    base, reg, plain = (torch.randn(2, 5, 3, generator=g) for _ in range(3))
    weight = torch.tensor([[0.0, 1.0, 0.25, 0.5, 0.0], [1.0, 0.0, 0.75, 0.0, 1e-3]])
    out = blend(base, None, reg, weight)
    zero, one = weight == 0, weight == 1
    assert torch.equal(out[zero], base[zero]) and torch.equal(out[one], reg[one])
    assert torch.allclose(out, base + weight.unsqueeze(-1) * (reg - base), atol=1e-6)
    # chained under another patch: that patch's output plus the change regularisation makes to the plain attention
    chained = blend(base, plain, reg, weight)
    assert torch.equal(chained[zero], base[zero])
    assert torch.allclose(chained, base + weight.unsqueeze(-1) * (reg - plain), atol=1e-6)


# -- the attn2 replacement -------------------------------------------------------------------------------------------
def test_an_all_zero_mask_or_zero_strength_is_the_plain_attention_bitwise():
    q, k, v = _inputs()
    plain = plain_attention(q, k, v, 2)
    assert torch.equal(LimeAttention(plain_attention, KEEP, RegionMask(torch.zeros(1, 20, 30)), 1.0,
                                     SigmaWindow())(q, k, v, _opts()), plain)
    assert torch.equal(LimeAttention(plain_attention, KEEP, RegionMask(_left_half()), 0.0,
                                     SigmaWindow())(q, k, v, _opts()), plain)


def test_only_positive_rows_inside_the_region_change_and_equal_the_regularised_attention():
    q, k, v = _inputs()
    plain = plain_attention(q, k, v, 2)
    layer = LimeAttention(plain_attention, KEEP, RegionMask(_left_half()), 1.0, SigmaWindow())
    out = layer(q, k, v, _opts(cou=(0, 1)))  # row 0 positive, row 1 negative
    assert torch.equal(out[1], plain[1])
    inside = torch.zeros(4, 6, dtype=torch.bool)
    inside[:, :3] = True
    inside = inside.flatten()
    assert torch.equal(out[0, ~inside], plain[0, ~inside])  # outside: bitwise
    reg = regularised_attention(plain_attention, q[:1], k[:1], v[:1], 2, KEEP)
    assert torch.equal(out[0, inside], reg[0, inside])
    assert not torch.allclose(out[0, inside], plain[0, inside], atol=1e-3)
    swapped = layer(q, k, v, _opts(cou=(1, 0)))  # now row 1 is the positive one
    assert torch.equal(swapped[0], plain[0]) and not torch.equal(swapped[1], plain[1])
    assert torch.equal(layer(q, k, v, _opts(cou=(1, 1))), plain)  # negative rows only: nothing to do


def test_it_acts_only_inside_its_window():
    q, k, v = _inputs()
    plain = plain_attention(q, k, v, 2)
    layer = LimeAttention(plain_attention, KEEP, RegionMask(_left_half()), 1.0, SigmaWindow(10.0, 4.0))
    assert torch.equal(layer(q, k, v, _opts(sigma=3.9)), plain)
    assert torch.equal(layer(q, k, v, _opts(sigma=10.5)), plain)
    assert not torch.equal(layer(q, k, v, _opts(sigma=4.0)), plain)
    assert not torch.equal(layer(q, k, v, _opts(sigma=10.0)), plain)


def test_soft_masks_and_strength_blend_the_outputs():
    q, k, v = _inputs()
    plain = plain_attention(q, k, v, 2)
    full = LimeAttention(plain_attention, KEEP, RegionMask(_left_half()), 1.0, SigmaWindow())(q, k, v, _opts())
    soft = LimeAttention(plain_attention, KEEP, RegionMask(_left_half(value=0.5)), 0.8, SigmaWindow())(
        q, k, v, _opts())
    assert torch.allclose(soft[0], plain[0] + 0.4 * (full[0] - plain[0]), atol=1e-6)


def test_it_builds_on_the_previous_replacement():
    q, k, v = _inputs()
    region = RegionMask(_left_half())

    def previous(q, k, v, extra):
        return plain_attention(q, k, v, extra["n_heads"]) * 2.0 + 1.0  # any other patch

    alone = LimeAttention(plain_attention, KEEP, region, 1.0, SigmaWindow())(q, k, v, _opts())
    stacked = LimeAttention(plain_attention, KEEP, region, 1.0, SigmaWindow(), previous)(q, k, v, _opts())
    prev = previous(q, k, v, {"n_heads": 2})
    plain = plain_attention(q, k, v, 2)
    assert torch.allclose(stacked - prev, alone - plain, atol=1e-5)
    assert torch.equal(stacked[1], prev[1])


def test_batches_take_their_own_masks_and_a_wrong_batch_is_named():
    q, k, v = _inputs(batch=4)  # two images, negative and positive chunks
    masks = torch.zeros(2, 32, 48)
    masks[0, :, :24] = 1.0  # image 0: left half
    masks[1, :, 24:] = 1.0  # image 1: right half
    out = LimeAttention(plain_attention, KEEP, RegionMask(masks), 1.0, SigmaWindow())(q, k, v, _opts(cou=(1, 0)))
    plain = plain_attention(q, k, v, 2)
    left = torch.zeros(4, 6, dtype=torch.bool)
    left[:, :3] = True
    left = left.flatten()
    assert torch.equal(out[:2], plain[:2])  # the negative chunk
    assert torch.equal(out[2, ~left], plain[2, ~left]) and not torch.equal(out[2, left], plain[2, left])
    assert torch.equal(out[3, left], plain[3, left]) and not torch.equal(out[3, ~left], plain[3, ~left])
    wrong = LimeAttention(plain_attention, KEEP, RegionMask(torch.ones(3, 8, 8), node="X"), 1.0, SigmaWindow())
    with pytest.raises(LimeError, match="X: the mask has a batch of 3 but the latent batch is 2"):
        wrong(q, k, v, _opts(cou=(1, 0)))


def test_masks_of_any_size_are_area_averaged_onto_the_grid():
    m = torch.zeros(1, 10, 30)
    m[:, :, :10] = 1.0  # the left third
    grid = RegionMask(m).on_grid(1, 2, 3, torch.device("cpu")).view(2, 3)
    assert torch.equal(grid, torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    coarse = RegionMask(m[0]).on_grid(2, 1, 2, torch.device("cpu"))  # 2-D mask, batch 1 serves both images
    assert coarse.shape == (2, 2) and torch.allclose(coarse, torch.tensor([[2 / 3, 0.0], [2 / 3, 0.0]]))
    assert RegionMask(torch.zeros(4, 4)).empty and not RegionMask(m).empty
    with pytest.raises(LimeError, match=r"\[height, width\] or \[batch, height, width\]"):
        RegionMask(torch.ones(1, 1, 4, 4))


def test_kept_columns_are_the_words_and_optionally_each_chunks_start_token():
    assert kept_columns([[3], [7, 8]], 77) == [3, 7, 8]
    assert kept_columns([[3], [7, 8]], 77, keep_start=True) == [0, 3, 7, 8]
    assert kept_columns([[80]], 154, keep_start=True) == [0, 77, 80]
    with pytest.raises(LimeError, match="no edit tokens"):
        kept_columns([], 77)


def test_words_past_the_prompts_tokens_are_named():
    q, k, v = _inputs()
    layer = LimeAttention(plain_attention, [12], RegionMask(_left_half()), 1.0, SigmaWindow(), node="X")
    with pytest.raises(LimeError, match="X: the edit words sit at token 13 but the positive prompt has 9 tokens"):
        layer(q, k, v, _opts())
