"""Directed Diffusion's pieces against their documented contracts: the Box's validity and clipping, the bump's
closed form on a non-square grid, directed_probs on a 3-D input and above strength 1, DirectedAttention's
off-switch and column check, a mask Placement (2-D masks, batches, out-of-range values, holes in the bounding box),
and the recorder's mean over several layers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from preprint.regional.word_attention import (
    AttentionRecorder,
    Box,
    DirectedAttention,
    Placement,
    WordError,
    box_on_grid,
    directed_probs,
    mean_attention_probs,
)
from preprint.utils.sigma_window import SigmaWindow

from .test_word_attention import plain_attention  # noqa: E402  (ComfyUI-style attention, written out)


# -- Box -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    (-0.5, 0.0, 0.5, 0.5),   # left of the frame
    (0.0, -0.5, 0.5, 0.5),   # above it
    (0.0, 1.0, 0.5, 0.5),    # top edge on the frame's bottom: y must be < 1
    (0.0, 1.5, 0.5, 0.5),    # below it
    (0.0, 0.0, 0.0, 0.5),    # empty width
    (0.0, 0.0, 0.5, 0.0),    # empty height
    (0.0, 0.0, -0.5, 0.5),   # negative width
    (0.0, 0.0, 0.5, -0.5),   # negative height
])
def test_a_box_outside_the_frame_or_empty_is_refused(args):
    with pytest.raises(WordError, match="empty or outside"):
        Box(*args)


def test_a_box_is_immutable_and_hashable_so_its_checks_cannot_be_bypassed():
    b = Box(0.25, 0.5, 0.5, 0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.y = 2.0  # type: ignore[misc]
    assert hash(b) == hash(Box(0.25, 0.5, 0.5, 0.25)) and {b: 1}[Box(0.25, 0.5, 0.5, 0.25)] == 1


def test_a_box_running_past_the_frame_is_clipped_at_its_edge():
    b = Box(0.5, 0.75, 0.75, 0.5)
    assert b.x1 == 1.0 and b.y1 == 1.0
    # the bump is centred in the clipped box (x in [0.5, 1], y in [0.75, 1]), sd a quarter of the clipped side
    _, bump = box_on_grid(b, 4, 4)
    g = bump.view(4, 4)
    want = math.exp(-0.5 * ((0.875 - 0.875) / 0.0625) ** 2 - 0.5 * ((0.625 - 0.75) / 0.125) ** 2)
    assert abs(float(g[3, 2]) - want) < 1e-6
    assert abs(float(g[3, 3]) - math.exp(-0.5 * ((0.875 - 0.75) / 0.125) ** 2)) < 1e-6


def test_the_bump_is_the_papers_gaussian_on_a_non_square_grid():
    """bump(p) = c(p) exp(-(y-cy)^2 / (2 sy^2) - (x-cx)^2 / (2 sx^2)) at cell centres, sd a quarter of each side."""
    box = Box(0.5, 0.25, 0.375, 0.5)  # rows [0.25, 0.75], columns [0.5, 0.875]: whole cells of an 8 x 16 grid
    inside, bump = box_on_grid(box, 8, 16)
    cy, cx, sy, sx = 0.5, 0.6875, 0.125, 0.09375
    want = torch.zeros(8, 16, dtype=torch.float64)
    want_in = torch.zeros(8, 16)
    for i in range(8):
        for j in range(16):
            y, x = (i + 0.5) / 8, (j + 0.5) / 16
            if 2 <= i < 6 and 8 <= j < 14:
                want_in[i, j] = 1.0
                want[i, j] = math.exp(-0.5 * ((y - cy) / sy) ** 2 - 0.5 * ((x - cx) / sx) ** 2)
    assert torch.equal(inside.view(8, 16), want_in)
    assert torch.allclose(bump.view(8, 16).double(), want, atol=1e-6)


def test_a_box_too_thin_to_measure_gives_a_zero_bump_not_nan():
    """A valid box whose extent rounds away (x + width == x) covers nothing: coverage and bump are 0, finite."""
    b = Box(0.5, 0.5, 1e-20, 1e-20)
    inside, bump = box_on_grid(b, 3, 5)  # cell centres at y = 0.5 (row 1) and x = 0.5 (column 2)
    assert torch.equal(inside, torch.zeros(15))
    assert bool(torch.isfinite(bump).all()) and torch.equal(bump, torch.zeros(15))


# -- directed_probs --------------------------------------------------------------------------------------------------
def test_directed_probs_on_a_3d_input_uses_each_words_peak_over_positions():
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(2, 6, 5, generator=g), dim=-1)  # [B, L, T]
    inside = torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0, 0.0])
    bump = torch.tensor([0.5, 1.0, 0.25, 0.0, 0.0, 0.0])
    cols, s = [1, 4], 0.5
    out = directed_probs(probs, cols, inside, bump, s)
    for b in range(2):
        for j in cols:
            peak = max(float(probs[b, p, j]) for p in range(6))
            for p in range(6):
                c = float(inside[p])
                want = float(probs[b, p, j]) * (c + (1 - c) * max(0.0, 1 - s)) + s * float(bump[p]) * peak
                assert abs(float(out[b, p, j]) - want) < 1e-6
    others = [0, 2, 3]
    assert torch.equal(out[..., others], probs[..., others])


def test_above_strength_one_the_words_are_gone_outside_the_box_not_negative():
    g = torch.Generator().manual_seed(6)
    probs = torch.softmax(torch.randn(1, 2, 16, 5, generator=g), dim=-1)
    inside, bump = box_on_grid(Box(0.0, 0.0, 0.5, 0.5), 4, 4)
    out = directed_probs(probs, [0, 3], inside, bump, 1.5)
    outside = inside == 0
    assert torch.equal(out[..., outside, :][..., [0, 3]], torch.zeros(1, 2, int(outside.sum()), 2))


# -- DirectedAttention -----------------------------------------------------------------------------------------------
def _layer_inputs(seed=4, batch=2, heads=2, d=4, h=4, w=4, t=6):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, n, heads * d, generator=g) for n in (h * w, t, t))


def _opts(sigma=7.0):
    return {"n_heads": 2, "activations_shape": [2, 8, 4, 4], "cond_or_uncond": [0, 1], "sigmas": torch.tensor([sigma])}


def test_strength_zero_is_off_and_checks_nothing():
    q, k, v = _layer_inputs()
    layer = DirectedAttention(plain_attention, [7], Placement(Box(0.0, 0.0, 0.5, 0.5)), 0.0, SigmaWindow())
    assert torch.equal(layer(q, k, v, _opts()), plain_attention(q, k, v, 2))


def test_a_word_column_just_past_the_prompt_is_a_word_error():
    """k has 6 tokens (and 8 channels): column 6 is the first one past the prompt."""
    q, k, v = _layer_inputs()
    layer = DirectedAttention(plain_attention, [1, 6], Placement(Box(0.0, 0.0, 0.5, 0.5)), 1.0, SigmaWindow())
    with pytest.raises(WordError, match="token 7 but the positive prompt has 6"):
        layer(q, k, v, _opts())


# -- mask placement --------------------------------------------------------------------------------------------------
def _area(mask: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Area average of a [H, W] mask over a gh x gw grid (H, W multiples of gh, gw), flattened."""
    h, w = mask.shape
    return mask.view(gh, h // gh, gw, w // gw).mean(dim=(1, 3)).flatten()


def test_a_2d_mask_places_like_the_same_mask_with_a_batch_dim():
    m = torch.zeros(8, 12)
    m[2:6, 3:12] = 1.0  # rows [0.25, 0.75), columns [0.25, 1)
    inside, bump = Placement(mask=m)(4, 6, torch.device("cpu"))
    assert torch.allclose(inside, _area(m, 4, 6))
    _, box_bump = box_on_grid(Box(0.25, 0.25, 0.75, 0.5), 4, 6)
    assert torch.allclose(bump, box_bump * (_area(m, 4, 6) > 0))


def test_a_mask_batch_places_by_its_first_mask():
    m = torch.zeros(2, 8, 8)
    m[0, :4, 4:] = 1.0
    m[1, 4:, :2] = 1.0
    inside, bump = Placement(mask=m)(4, 4, torch.device("cpu"))
    assert torch.allclose(inside, _area(m[0], 4, 4))
    _, box_bump = box_on_grid(Box(0.5, 0.0, 0.5, 0.5), 4, 4)
    assert torch.allclose(bump, box_bump)


def test_mask_values_outside_0_1_are_clamped():
    m = torch.full((1, 8, 8), -1.0)
    m[0, :4, :6] = 2.0
    inside, bump = Placement(mask=m)(4, 4, torch.device("cpu"))
    ref = (m[0] > 0).float()
    assert torch.allclose(inside, _area(ref, 4, 4))
    _, box_bump = box_on_grid(Box(0.0, 0.0, 0.75, 0.5), 4, 4)
    assert torch.allclose(bump, box_bump)


def test_the_bump_is_zero_where_the_mask_has_nothing_inside_its_bounding_box():
    m = torch.zeros(1, 8, 8)
    m[0, :2, :2] = 1.0
    m[0, 6:, 6:] = 1.0  # two corners: the bounding box is the whole frame
    inside, bump = Placement(mask=m)(4, 4, torch.device("cpu"))
    _, box_bump = box_on_grid(Box(0.0, 0.0, 1.0, 1.0), 4, 4)
    holes = inside == 0
    assert int(holes.sum()) == 14 and float(box_bump[holes].min()) > 0  # the box's bump is there...
    assert torch.equal(bump[holes], torch.zeros(14))  # ...but not where the mask is empty
    assert torch.allclose(bump[~holes], box_bump[~holes])


# -- recorder --------------------------------------------------------------------------------------------------------
def test_the_recorder_returns_the_mean_over_the_layers_it_recorded():
    g = torch.Generator().manual_seed(8)
    rec = AttentionRecorder(plain_attention, factor=4)
    opts = {"n_heads": 2, "activations_shape": [1, 8, 2, 3], "original_shape": [1, 4, 8, 12], "cond_or_uncond": [0]}
    seen = []
    for _ in range(3):
        q, k = torch.randn(1, 6, 8, generator=g), torch.randn(1, 5, 8, generator=g)
        rec.record(q, k, opts)
        seen.append(mean_attention_probs(q, k, 2).transpose(1, 2).reshape(1, 5, 2, 3))
    assert torch.allclose(rec.maps(), (seen[0] + seen[1] + seen[2]) / 3, atol=1e-6)
