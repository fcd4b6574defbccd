"""Token layouts of DiT attention (guidance/pag_tokens.py) at their edges: spans without a grid, without text or
without image tokens, grids that overrun their span, masks per row, per head and over both token axes in orders
other than text-first, video grids taller than wide, and tiny sequences, each against the map written out."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from preprint.guidance.attention_perturbation import Perturbation
from preprint.guidance.pag_tokens import TokenLayout, _reorder, _restore, perturb_layout

from .test_pag_tokens import explicit_identity, plain, rand, seg_q

H, D = 2, 8


def qkv(length, batch=3, seed=0):
    return tuple(rand(batch, H, length, D, seed=seed + i) for i in range(3))


def key_mask(batch, length, padded, seed=0):
    """Additive ``(B, 1, 1, L)`` key mask: -inf on ``padded[b]`` keys of row ``b``, small finite values elsewhere."""
    m = 0.3 * rand(batch, 1, 1, length, seed=seed)
    for b, keys in enumerate(padded):
        m[b, ..., list(keys)] = float("-inf")
    return m


# ------------------------------------------------------------------------------------------------ spans


def test_a_layout_is_a_frozen_hashable_value():
    """Layouts compare and hash by value and cannot be changed after they are made."""
    a, b = TokenLayout((2, 14), (3, 4)), TokenLayout((2, 14), (3, 4))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.grid = (4, 3)


def test_reference_tokens_follow_the_grid_unless_told_otherwise():
    """By default (Flux, Qwen-Image) the latent's grid opens the image span and reference tokens follow it."""
    layout = TokenLayout((2, 20), (2, 3))
    assert layout.pieces(22) == [(0, 2), (20, 22), (2, 8), (8, 20)]
    assert TokenLayout((2, 20), (2, 3), refs_first=True).pieces(22) == [(0, 2), (20, 22), (14, 20), (2, 14)]


def test_without_a_grid_the_image_span_stays_one_piece_in_order():
    """No grid: no grid tokens, and the image span is kept whole whether references would come first or not."""
    for refs_first in (False, True):
        layout = TokenLayout((3, 9), refs_first=refs_first)
        assert layout.grid_tokens() == 0
        assert layout.pieces(12) == [(0, 3), (9, 12), (3, 9)]


def test_a_grid_larger_than_its_span_is_cut_to_the_span():
    """A grid of more tokens than the image span holds takes the whole span and no more."""
    assert TokenLayout((2, 8), (3, 4)).pieces(10) == [(0, 2), (8, 10), (2, 8)]
    assert TokenLayout((2, 8), (3, 4), refs_first=True).pieces(10) == [(0, 2), (8, 10), (2, 8)]


def test_span_bounds_are_checked_and_an_empty_span_is_allowed():
    """A span starting before the sequence is an error; an empty one (no image tokens) is a valid layout."""
    with pytest.raises(ValueError, match=r"image tokens \[-1, 5\) do not lie in a sequence of 10 tokens"):
        TokenLayout((-1, 5)).pieces(10)
    assert TokenLayout((4, 4)).pieces(6) == [(0, 4), (4, 6)]


def test_a_single_piece_is_neither_copied_nor_moved():
    """Self-attention over image tokens alone (Wan without references) is one piece: the tensors are handed on
    as they are, no copy made."""
    t = rand(1, H, 12, D)
    pieces = TokenLayout((0, 12), (3, 4)).pieces(12)
    assert pieces == [(0, 12)]
    assert _reorder(t, pieces, 2) is t
    assert _restore(t, pieces, 2) is t


# ------------------------------------------------------------------------------------------------ no mask


def test_identity_on_a_video_grid_does_not_blur_the_queries():
    """Identity PAG on a frame-major video layout is the identity map; SEG's per-frame blur is not applied."""
    q, k, v = qkv(16)
    base = plain(q, k, v)
    layout = TokenLayout((4, 16), (2, 3), frames=2)  # text 4, grid 2 x (2 x 3)
    out = perturb_layout(base, q, k, v, [1, 2], Perturbation(), layout)
    torch.testing.assert_close(out[1:], explicit_identity(q, k, v, range(4, 16))[1:])


def test_seg_blurs_each_frame_of_a_grid_taller_than_wide():
    """SEG on a video grid of 3 x 2 tokens per frame blurs each frame on that grid."""
    q, k, v = qkv(16, seed=2)
    base = plain(q, k, v)
    layout = TokenLayout((4, 16), (3, 2), frames=2)
    out = perturb_layout(base, q, k, v, [1, 2], Perturbation("smoothed_energy", blur_sigma=1.0), layout)
    torch.testing.assert_close(out[1:], plain(seg_q(q, 4, (3, 2), 2, 1.0), k, v)[1:])


def test_seg_refuses_a_grid_that_does_not_fit_its_span():
    """SEG on a single-frame grid of more tokens than the image span: the error says how many tokens it needs."""
    q, k, v = qkv(10)
    with pytest.raises(ValueError, match="expected at least 12 image tokens for a 3x4 grid"):
        perturb_layout(q, q, k, v, [1], Perturbation("smoothed_energy", blur_sigma=1.0), TokenLayout((4, 10), (3, 4)))


# ------------------------------------------------------------------------------------------------ masks


def test_masked_seg_blurs_only_the_grid_before_reference_tokens():
    """SEG with a key mask on [text | 2 x 4 grid | references]: only the grid's queries are blurred, on that
    non-square grid, and the mask is kept on every logit."""
    q, k, v = qkv(15, seed=4)
    mask = key_mask(3, 15, [(1,), (0, 2), (3,)])
    base = plain(q, k, v, mask)
    layout = TokenLayout((4, 15), (2, 4))
    out = perturb_layout(base, q, k, v, [1, 2], Perturbation("smoothed_energy", blur_sigma=1.0), layout, mask)
    torch.testing.assert_close(out[1:], plain(seg_q(q, 4, (2, 4), 1, 1.0), k, v, mask)[1:])


def test_masked_identity_with_a_single_text_token():
    """One text token is still joint attention: image queries see that token and themselves, text attends as
    usual."""
    q, k, v = qkv(9, seed=6)
    mask = 0.5 * rand(3, 1, 1, 9, seed=7)
    base = plain(q, k, v, mask)
    out = perturb_layout(base, q, k, v, [1, 2], Perturbation(), TokenLayout((1, 9), (2, 4)), mask)
    torch.testing.assert_close(out[1:], explicit_identity(q, k, v, range(1, 9), mask)[1:])


def test_masked_identity_without_text_outputs_each_tokens_value():
    """Self-attention over image tokens only (Wan): identity gives every token its own value, whatever the mask,
    even for a token whose own key is masked out."""
    q, k, v = qkv(8, seed=8)
    mask = key_mask(3, 8, [(), (2,), (0, 5)])
    base = plain(q, k, v, mask)
    out = perturb_layout(base, q, k, v, [1, 2], Perturbation(), TokenLayout((0, 8), (2, 4)), mask)
    assert torch.equal(out[1:], v[1:])
    assert torch.equal(out[0], base[0])


def test_masked_identity_over_all_tokens_outputs_each_tokens_value():
    """The "all" joint mode with a mask: every token, text included, outputs its own value."""
    q, k, v = qkv(12, seed=10)
    mask = key_mask(3, 12, [(0,), (1,), (2,)])
    base = plain(q, k, v, mask)
    out = perturb_layout(base, q, k, v, [1, 2], Perturbation(joint="all"), TokenLayout((4, 12), (2, 4)), mask)
    assert torch.equal(out[1:], v[1:])


@pytest.mark.parametrize("kind", ["full", "per_head"])
def test_masks_follow_the_tokens_of_an_image_first_layout(kind):
    """[image | text] (HunyuanVideo) with a query-by-key mask, or a key mask that differs per head: the mask is
    reordered with the tokens on both axes it has."""
    length = 13
    q, k, v = qkv(length, seed=12)
    if kind == "full":
        mask = 0.8 * rand(1, 1, length, length, seed=13)
        mask[..., 10] = float("-inf")  # a padded text token
    else:
        mask = torch.zeros(1, H, 1, length)
        mask[:, 0, :, 11] = mask[:, 1, :, 9] = float("-inf")
        mask = mask + 0.5 * rand(1, H, 1, length, seed=14)
    base = plain(q, k, v, mask)
    out = perturb_layout(base, q, k, v, [0, 2], Perturbation(), TokenLayout((0, 8), (2, 4)), mask)
    want = explicit_identity(q, k, v, range(8), mask)
    torch.testing.assert_close(out[[0, 2]], want[[0, 2]])
    assert torch.equal(out[1], base[1])


@pytest.mark.parametrize("row", [0, 1])
def test_per_row_masks_of_a_batch_of_two(row):
    """A batch of two with its own key mask per row: the perturbed row uses its own mask."""
    q, k, v = qkv(10, batch=2, seed=16)
    mask = key_mask(2, 10, [(1, 2), (3,)])
    base = plain(q, k, v, mask)
    out = perturb_layout(base, q, k, v, [row], Perturbation(), TokenLayout((4, 10), (2, 3)), mask)
    torch.testing.assert_close(out[row], explicit_identity(q, k, v, range(4, 10), mask)[row])
    assert torch.equal(out[1 - row], base[1 - row])


@pytest.mark.parametrize("image", [(1, 2), (0, 1), (2, 2)])
def test_two_token_sequences_with_a_full_mask(image):
    """The smallest joint sequences, with a full 2 x 2 mask: [text | image], [image | text] and text alone (the
    perturbed rows are then the ordinary attention)."""
    q, k, v = qkv(2, seed=18)
    mask = torch.tensor([[0.7, -1.3], [-0.4, 1.1]]).view(1, 1, 2, 2)
    base = plain(q, k, v, mask)
    out = perturb_layout(base, q, k, v, [1, 2], Perturbation(), TokenLayout(image), mask)
    torch.testing.assert_close(out[1:], explicit_identity(q, k, v, range(*image), mask)[1:])
    if image == (2, 2):
        torch.testing.assert_close(out, base)
