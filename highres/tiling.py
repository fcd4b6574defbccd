"""Tiled diffusion for any image size: tile planners and the per-step tiled evaluation (plain torch).

Two ways to cover a latent with tiles the model can serve at its training size:

- Shifted non-overlapping tiles (Fast Seamless Tiled Diffusion of Zheng et al., "Any-Size-Diffusion", arXiv:2308.16582;
  SpotDiffusion of Frolov et al., arXiv:2407.15507): each step the tile grid moves by a random offset, so a seam of
  one step lies inside a tile at the next and the steps stitch it; every latent element is evaluated exactly once
  per step. The latent is not rolled: the shifted grid is cut at the image border, so the first and last tile of a
  row or column are partial, and a partial tile thinner than ``min_size`` is merged into its neighbour (the model
  does poorly on slivers a few latent pixels wide).
- Overlapping tiles (MultiDiffusion, Bar-Tal et al., arXiv:2302.08113): tiles at a fixed stride, the last one in a
  row or column snapped to the image edge, and each element's prediction the weighted mean over the tiles that
  cover it (Eq. 5 of MultiDiffusion with uniform weights; Gaussian weights centred on the tile as in Mixture of
  Diffusers, Jiménez, arXiv:2302.02412).

The blend is a running weighted mean written as ``lerp``: where one tile covers an element its prediction is kept
exactly, and where tiles agree the mean is exactly their common value, so tiling an elementwise function changes
nothing, bit for bit.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

MODES = ("shifted (FSTD)", "overlapping (MultiDiffusion)")
WEIGHTINGS = ("gaussian", "uniform")
# Mixture of Diffusers' tile weight: a Gaussian over the tile in coordinates normalised by the tile's side, with
# variance 0.01 (standard deviation a tenth of the side).
GAUSSIAN_STD = 0.1


class TilingError(ValueError):
    """A tiling that cannot be made; the message says what and how to fix it."""


class Tile(NamedTuple):
    """A rectangle of the latent: top row, left column, height, width (latent elements)."""

    y: int
    x: int
    h: int
    w: int

    @property
    def index(self) -> tuple[slice, slice]:
        """For ``tensor[..., *tile.index]``."""
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)


def _check_axis(length: int, tile: int, name: str) -> None:
    if length < 1:
        raise TilingError(f"the latent's {name} is {length}; it must be at least 1.")
    if tile < 1:
        raise TilingError(f"the tile {name} is {tile}; it must be at least 1.")
    if tile > length:
        raise TilingError(f"the tile {name} ({tile}) is larger than the latent's ({length}); use a tile no larger "
                          "than the image.")


def overlapping_axis(length: int, tile: int, stride: int, name: str = "height") -> list[tuple[int, int]]:
    """``(start, size)`` of tiles of ``size == tile`` every ``stride`` elements, the last snapped to the end so the
    axis is covered whatever its length."""
    _check_axis(length, tile, name)
    if not 1 <= stride <= tile:
        raise TilingError(f"the stride along the {name} is {stride}; it must lie in [1, tile {name} = {tile}] so "
                          "neighbouring tiles touch or overlap.")
    starts = [0]
    while starts[-1] + tile < length:
        starts.append(min(starts[-1] + stride, length - tile))
    return [(s, tile) for s in starts]


def shifted_axis(length: int, tile: int, offset: int, min_size: int = 1, name: str = "height") -> list[tuple[int, int]]:
    """``(start, size)`` of the non-overlapping segments cut by grid lines at ``offset + k * tile``, clipped to the
    axis, with a segment shorter than ``min_size`` merged into its neighbour; one segment where the tile spans the
    axis. They partition ``[0, length)``."""
    _check_axis(length, tile, name)
    if not 0 <= offset < tile:
        raise TilingError(f"the grid offset along the {name} is {offset}; it must lie in [0, {tile}).")
    if tile == length:  # the tile spans the axis: nothing to shift, and a cut would only make two partial tiles
        return [(0, length)]
    cuts = sorted({0, length, *range(offset % tile or tile, length, tile)})
    segments = [[a, b - a] for a, b in zip(cuts, cuts[1:], strict=False)]
    if len(segments) > 1 and segments[0][1] < min_size:  # a sliver at the start joins the next segment
        segments[1] = [0, segments[0][1] + segments[1][1]]
        segments.pop(0)
    if len(segments) > 1 and segments[-1][1] < min_size:
        segments[-2][1] += segments[-1][1]
        segments.pop()
    return [(a, n) for a, n in segments]


def overlapping_tiles(height: int, width: int, tile_h: int, tile_w: int, stride_h: int,
                      stride_w: int) -> list[Tile]:
    """MultiDiffusion's views: every tile is ``tile_h x tile_w``, row by row."""
    rows = overlapping_axis(height, tile_h, stride_h, "height")
    cols = overlapping_axis(width, tile_w, stride_w, "width")
    return [Tile(y, x, h, w) for y, h in rows for x, w in cols]


def shifted_tiles(height: int, width: int, tile_h: int, tile_w: int, offset_y: int, offset_x: int,
                  min_size: int = 1) -> list[Tile]:
    """The shifted grid's tiles, row by row: each latent element lies in exactly one."""
    rows = shifted_axis(height, tile_h, offset_y, min_size, "height")
    cols = shifted_axis(width, tile_w, offset_x, min_size, "width")
    return [Tile(y, x, h, w) for y, h in rows for x, w in cols]


def step_generator(seed: int, sigma: float) -> torch.Generator:
    """A generator for one step's grid offset, from the run's seed and the step's noise level: every model call at
    that noise level (cond and uncond, split or batched) sees the same grid, independent of call order; another
    step gets another draw. Never the global RNG."""
    bits = struct.unpack("<q", struct.pack("<d", float(sigma)))[0]
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + bits * 0xBF58476D1CE4E5B9) % (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(mixed)


def draw_offset(generator: torch.Generator, tile_h: int, tile_w: int, align: int = 1) -> tuple[int, int]:
    """The grid offset ``(y, x)``: multiples of ``align`` (so tiles start where the model's coarsest features
    start, for cropping ControlNet residuals) in ``[0, tile)``, uniform."""
    align = max(1, int(align))
    ny, nx = max(1, math.ceil(tile_h / align)), max(1, math.ceil(tile_w / align))
    oy = int(torch.randint(ny, (1,), generator=generator)) * align
    ox = int(torch.randint(nx, (1,), generator=generator)) * align
    return oy, ox


def tile_weight(h: int, w: int, weighting: str, dtype=torch.float32, device=None) -> torch.Tensor:
    """A tile's blending weight, ``(h, w)``, all positive."""
    if weighting == "uniform":
        return torch.ones(h, w, dtype=dtype, device=device)
    if weighting != "gaussian":
        raise TilingError(f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}.")

    def axis(n: int) -> torch.Tensor:
        pos = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) / n
        return torch.exp(-0.5 * (pos / GAUSSIAN_STD) ** 2)

    return torch.outer(axis(h), axis(w)).to(dtype=dtype, device=device)


class Blender:
    """The per-element weighted mean of tile predictions, accumulated as a running mean with ``lerp``: one tile's
    prediction is kept exactly, equal predictions average to exactly themselves."""

    def __init__(self, like: torch.Tensor, weighting: str = "uniform"):
        self.out = torch.zeros_like(like)
        self.total = torch.zeros(like.shape[-2:], dtype=torch.float32, device=like.device)
        self.weighting = weighting
        self._weights: dict[tuple[int, int], torch.Tensor] = {}

    def add(self, tile: Tile, pred: torch.Tensor) -> None:
        key = (tile.h, tile.w)
        if key not in self._weights:
            self._weights[key] = tile_weight(tile.h, tile.w, self.weighting, device=self.total.device)
        w = self._weights[key]
        total = self.total[tile.index]
        total += w
        frac = (w / total).to(pred.dtype)  # exactly 1 where this is the first tile here
        region = self.out[..., tile.index[0], tile.index[1]]
        region.copy_(torch.lerp(region, pred.to(region.dtype), frac))

    def result(self) -> torch.Tensor:
        if not bool((self.total > 0).all()):
            raise TilingError("some latent elements were covered by no tile; the tiling is broken.")
        return self.out


def groups(tiles: Sequence[Tile], batch_size: int) -> list[list[Tile]]:
    """Tiles in evaluation groups: tiles of one size together, at most ``batch_size`` per group, in order."""
    by_size: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        by_size.setdefault((t.h, t.w), []).append(t)
    out = []
    for same in by_size.values():
        out += [same[i:i + max(1, batch_size)] for i in range(0, len(same), max(1, batch_size))]
    return out


def tiled_evaluate(x: torch.Tensor, tiles: Sequence[Tile], evaluate: Callable[[list[Tile]], torch.Tensor],
                   weighting: str = "uniform", batch_size: int = 1) -> torch.Tensor:
    """One tiled evaluation: ``evaluate(group)`` returns the predictions for a group of same-size tiles stacked along
    the batch, tile by tile (``len(group) * x.shape[0]`` rows), and they are blended into a tensor like ``x``."""
    blender = None
    n = x.shape[0]
    for group in groups(tiles, batch_size):
        preds = evaluate(group)
        if preds.shape[0] != n * len(group):
            raise TilingError(f"a group of {len(group)} tiles gave {preds.shape[0]} rows, not {n * len(group)}.")
        if blender is None:  # the prediction's channels and dtype, the input's height and width
            blender = Blender(preds.new_empty((n, *preds.shape[1:-2], *x.shape[-2:])), weighting)
        for i, tile in enumerate(group):
            blender.add(tile, preds[i * n:(i + 1) * n])
    if blender is None:
        raise TilingError("no tiles to evaluate.")
    return blender.result()


def crop(x: torch.Tensor, tile: Tile) -> torch.Tensor:
    return x[..., tile.index[0], tile.index[1]]


def feature_crop(feature: torch.Tensor, tile: Tile, height: int, width: int) -> torch.Tensor:
    """The part of a feature map of the whole latent (``(..., h, w)`` with ``h = ceil(height / f)``,
    ``w = ceil(width / f)`` for a power of two ``f``, as stride-2 down-sampling makes) that the tile's own features
    at that level cover: ``ceil(tile.h / f) x ceil(tile.w / f)`` cells from ``floor(tile.y / f)``; exact where the
    tile starts on a multiple of ``f``."""
    h, w = feature.shape[-2:]
    f = _factor(height, width, h, w)
    fh, fw = math.ceil(tile.h / f), math.ceil(tile.w / f)
    y0, x0 = min(tile.y // f, h - fh), min(tile.x // f, w - fw)
    return feature[..., y0:y0 + fh, x0:x0 + fw]


def token_crop(tokens: torch.Tensor, tile: Tile, height: int, width: int, patch: int) -> torch.Tensor:
    """The tile's tokens of a ``(batch, rows * cols, channels)`` sequence laid out row by row on the whole latent's
    ``patch x patch`` grid."""
    rows, cols = math.ceil(height / patch), math.ceil(width / patch)
    if tokens.shape[1] != rows * cols:
        raise TilingError(f"a token sequence of {tokens.shape[1]} does not match the latent's {rows} x {cols} "
                          f"patch grid.")
    grid = tokens.reshape(tokens.shape[0], rows, cols, *tokens.shape[2:])
    fh, fw = math.ceil(tile.h / patch), math.ceil(tile.w / patch)
    y0, x0 = min(tile.y // patch, rows - fh), min(tile.x // patch, cols - fw)
    return grid[:, y0:y0 + fh, x0:x0 + fw].reshape(tokens.shape[0], fh * fw, *tokens.shape[2:])


def _factor(height: int, width: int, h: int, w: int) -> int:
    for k in range(8):
        f = 2 ** k
        if math.ceil(height / f) == h and math.ceil(width / f) == w:
            return f
    raise TilingError(f"a {h} x {w} feature map is not the {height} x {width} latent down-sampled by a power of 2.")
