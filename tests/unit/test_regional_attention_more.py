"""tile_grids on masks without a leading region axis (``[P, H * W]``, as LIME's single region gives them)."""

from __future__ import annotations

import torch

from preprint.highres.tiling import Tile
from preprint.regional.attention import tile_grids


def _block_mean(frame, t, gh, gw):
    """Crop ``frame`` [P, H, W] to tile ``t`` and average exact ``gh x gw`` blocks (tile sides are multiples)."""
    crop = frame[:, t.y:t.y + t.h, t.x:t.x + t.w]
    p = crop.shape[0]
    return crop.reshape(p, gh, t.h // gh, gw, t.w // gw).mean(dim=(2, 4)).reshape(p, gh * gw)


def test_tile_grids_of_two_dimensional_masks_stack_tile_by_tile():
    g = torch.Generator().manual_seed(0)
    height, width = 4, 6
    full = torch.rand(2, height * width, generator=g)  # two images, no region axis
    tiles = [Tile(0, 0, 4, 3), Tile(2, 3, 2, 3)]
    got = tile_grids(full, height, width, tiles, 2, 3)
    frame = full.view(2, height, width)
    want = torch.cat([_block_mean(frame, t, 2, 3) for t in tiles], dim=0)
    assert got.shape == (4, 6)
    assert torch.allclose(got, want, atol=1e-6)
    # the same masks with a region axis give the same rows under it
    assert torch.allclose(tile_grids(full[None], height, width, tiles, 2, 3)[0], want, atol=1e-6)
