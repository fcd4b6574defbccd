"""Tiled diffusion planners and the tiled evaluation (pure torch): coverage of odd sizes, exactly-once coverage of
the shifted grid, weights forming a partition of unity, bitwise identity for elementwise models, seeded offsets,
and residual crops that land where the tile is."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from preprint.highres import tiling as tl


def coverage(tiles, height, width) -> torch.Tensor:
    count = torch.zeros(height, width, dtype=torch.int64)
    for t in tiles:
        assert t.h >= 1 and t.w >= 1 and t.y >= 0 and t.x >= 0
        assert t.y + t.h <= height and t.x + t.w <= width, f"{t} leaves the {height} x {width} latent"
        count[t.index] += 1
    return count


SIZES = [(13, 22), (8, 8), (9, 31), (40, 17), (64, 96)]


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("tile,stride", [(8, 8), (8, 5), (8, 1), (7, 3)])
def test_overlapping_tiles_cover_every_element_with_full_size_tiles_snapped_to_the_edge(height, width, tile, stride):
    tiles = tl.overlapping_tiles(height, width, tile, tile, stride, stride)
    assert (coverage(tiles, height, width) >= 1).all()
    assert all((t.h, t.w) == (tile, tile) for t in tiles)  # never a resized or partial tile
    rows = sorted({t.y for t in tiles})
    assert rows[0] == 0 and rows[-1] == height - tile  # the last row of tiles ends at the edge
    assert all(b - a <= stride for a, b in itertools.pairwise(rows))  # never a gap beyond the stride
    assert len(rows) == max(1, math.ceil((height - tile) / stride) + 1)


def test_overlapping_axis_known_answer():
    assert tl.overlapping_axis(22, 8, 6) == [(0, 8), (6, 8), (12, 8), (14, 8)]
    assert tl.overlapping_axis(13, 8, 6) == [(0, 8), (5, 8)]
    assert tl.overlapping_axis(8, 8, 3) == [(0, 8)]


@pytest.mark.parametrize("height,width", SIZES)
def test_shifted_tiles_cover_every_element_exactly_once_for_every_offset(height, width):
    tile = min(8, height, width)
    for oy, ox in itertools.product(range(tile), range(tile)):
        for min_size in (1, 3):
            tiles = tl.shifted_tiles(height, width, tile, tile, oy, ox, min_size)
            assert (coverage(tiles, height, width) == 1).all(), (oy, ox, min_size)


def test_shifted_axis_cuts_at_the_offset_and_merges_slivers():
    assert tl.shifted_axis(22, 8, 0) == [(0, 8), (8, 8), (16, 6)]
    assert tl.shifted_axis(22, 8, 3) == [(0, 3), (3, 8), (11, 8), (19, 3)]
    # a 1-wide first segment and a 2-wide last one are slivers below min_size 3: merged into their neighbours
    assert tl.shifted_axis(18, 8, 1, min_size=3) == [(0, 9), (9, 9)]
    assert tl.shifted_axis(8, 8, 5) == [(0, 8)]  # the tile spans the axis: no cut, whatever the offset


@pytest.mark.parametrize("call,match", [
    (lambda: tl.overlapping_tiles(8, 8, 9, 8, 4, 4), "larger than the latent"),
    (lambda: tl.shifted_tiles(8, 6, 4, 7, 0, 0), "larger than the latent"),
    (lambda: tl.overlapping_axis(16, 8, 9), "stride"),
    (lambda: tl.overlapping_axis(16, 8, 0), "stride"),
    (lambda: tl.shifted_axis(16, 8, 8), "offset"),
    (lambda: tl.tile_weight(4, 4, "triangle"), "weighting"),
])
def test_impossible_tilings_are_refused(call, match):
    with pytest.raises(tl.TilingError, match=match):
        call()


@pytest.mark.parametrize("weighting", tl.WEIGHTINGS)
def test_blend_weights_sum_to_one_on_every_element(weighting):
    """The blend of tiles that each predict its own weight share (1 everywhere) is 1 everywhere, and a tile's
    effective weight is its own over the sum of all that cover the element."""
    height, width = 13, 22
    tiles = tl.overlapping_tiles(height, width, 8, 8, 3, 5)
    blender = tl.Blender(torch.zeros(1, 1, height, width, dtype=torch.float64), weighting)
    for t in tiles:
        blender.add(t, torch.ones(1, 1, t.h, t.w, dtype=torch.float64))
    torch.testing.assert_close(blender.result(), torch.ones(1, 1, height, width, dtype=torch.float64))
    # against the explicit weighted mean sum(w_t p_t) / sum(w_t) with distinct tile predictions
    g = torch.Generator().manual_seed(0)
    preds = [torch.randn(1, 1, t.h, t.w, generator=g, dtype=torch.float64) for t in tiles]
    num = torch.zeros(height, width, dtype=torch.float64)
    den = torch.zeros(height, width, dtype=torch.float64)
    blender = tl.Blender(torch.zeros(1, 1, height, width, dtype=torch.float64), weighting)
    for t, p in zip(tiles, preds, strict=True):
        w = tl.tile_weight(t.h, t.w, weighting, dtype=torch.float64)
        num[t.index] += w * p[0, 0]
        den[t.index] += w
        blender.add(t, p)
    torch.testing.assert_close(blender.result()[0, 0], num / den)


def test_gaussian_weights_peak_at_the_tile_centre():
    w = tl.tile_weight(9, 16, "gaussian")
    assert (w > 0).all()
    assert w[4, 7] == w.max() and w[0, 0] == w.min()
    torch.testing.assert_close(w, w.flip(0).flip(1))


def elementwise(x):
    return torch.sin(3 * x) * x + 0.25


@pytest.mark.parametrize("mode", ["shifted", "overlapping"])
@pytest.mark.parametrize("weighting", tl.WEIGHTINGS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_tiling_an_elementwise_model_changes_nothing_bitwise(mode, weighting, batch_size):
    height, width = 13, 22
    x = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(1))
    if mode == "shifted":
        tiles = tl.shifted_tiles(height, width, 8, 8, 3, 5, 2)
    else:
        tiles = tl.overlapping_tiles(height, width, 8, 8, 3, 5)
    calls = []

    def evaluate(group):
        calls.append(len(group))
        return elementwise(torch.cat([tl.crop(x, t) for t in group]))

    out = tl.tiled_evaluate(x, tiles, evaluate, weighting, batch_size)
    assert torch.equal(out, elementwise(x))
    assert sum(calls) == len(tiles) and max(calls) <= batch_size
    assert len(calls) == len(tl.groups(tiles, batch_size))


def test_a_position_dependent_model_shows_where_the_tiles_are():
    """Not vacuous: a model that depends on where in its input an element sits differs once tiled."""
    x = torch.zeros(1, 1, 13, 22)
    tiles = tl.shifted_tiles(13, 22, 8, 8, 3, 5, 1)

    def evaluate(group):
        return torch.cat([torch.arange(t.w, dtype=torch.float32).expand(1, 1, t.h, t.w) for t in group])

    out = tl.tiled_evaluate(x, tiles, evaluate)
    assert out[0, 0, 0, 5] == 0 and out[0, 0, 0, 4] == 4  # a tile starts at column 5


def test_groups_keep_same_size_tiles_together_in_order():
    tiles = tl.shifted_tiles(22, 22, 8, 8, 3, 3, 1)
    gs = tl.groups(tiles, 2)
    assert all(len({(t.h, t.w) for t in g}) == 1 and len(g) <= 2 for g in gs)
    assert sorted(t for g in gs for t in g) == sorted(tiles)


def test_offsets_are_seeded_deterministic_and_change_between_steps():
    sigmas = [14.6, 7.0, 3.1, 1.2, 0.4, 0.1]

    def draws(seed):
        return [tl.draw_offset(tl.step_generator(seed, s), 96, 96, 8) for s in sigmas]

    first = draws(3)
    saved = torch.random.get_rng_state()
    torch.manual_seed(123)  # the global RNG plays no part: neither read ...
    before = torch.random.get_rng_state()
    assert draws(3) == first
    assert torch.equal(torch.random.get_rng_state(), before)  # ... nor advanced
    torch.random.set_rng_state(saved)
    assert len(set(first)) > 1  # offsets differ between steps
    assert draws(4) != first  # and between seeds
    assert all(0 <= o < 96 and o % 8 == 0 for pair in first + draws(4) for o in pair)


def test_offsets_reach_the_whole_range():
    seen = {tl.draw_offset(tl.step_generator(0, 1.0 + i / 100), 24, 16, 4) for i in range(300)}
    assert {oy for oy, _ in seen} == {0, 4, 8, 12, 16, 20}
    assert {ox for _, ox in seen} == {0, 4, 8, 12}


def test_feature_crops_land_at_the_tiles_position_on_every_level():
    """A residual map holding its own coordinates: a tile's crop at level f starts at (y / f, x / f) and has the
    size a stride-2 network makes of the tile, ceil(h / f) x ceil(w / f), even at the snapped edge tile."""
    height, width = 21, 30
    for f in (1, 2, 4, 8):
        h, w = math.ceil(height / f), math.ceil(width / f)
        rows = torch.arange(h).view(h, 1).expand(h, w)
        cols = torch.arange(w).view(1, w).expand(h, w)
        feature = torch.stack([rows, cols])[None].float()
        for tile in tl.overlapping_tiles(height, width, 16, 16, 8, 8):
            part = tl.feature_crop(feature, tile, height, width)
            assert part.shape[-2:] == (math.ceil(tile.h / f), math.ceil(tile.w / f))
            if tile.y % f == 0 and tile.x % f == 0:
                assert part[0, 0, 0, 0] == tile.y // f and part[0, 1, 0, 0] == tile.x // f
    with pytest.raises(tl.TilingError, match="power of 2"):
        tl.feature_crop(torch.zeros(1, 1, 5, 5), tl.Tile(0, 0, 4, 4), 21, 30)


def test_token_crops_take_the_tiles_patches_row_by_row():
    height, width, patch = 12, 18, 2
    rows, cols = 6, 9
    tokens = torch.arange(rows * cols).float().view(1, rows * cols, 1)
    part = tl.token_crop(tokens, tl.Tile(4, 6, 6, 8), height, width, patch)
    want = torch.arange(rows * cols).view(rows, cols)[2:5, 3:7].reshape(1, -1, 1).float()
    assert torch.equal(part, want)
    with pytest.raises(tl.TilingError, match="patch grid"):
        tl.token_crop(tokens[:, :-1], tl.Tile(0, 0, 4, 4), height, width, patch)
