"""Regional prompting by cross-attention, in one model pass (pure torch).

A base prompt plus N regions, each a (mask, prompt) pair. On a UNet every cross-attention layer computes,
for the conditional rows only, one attention output per prompt (the base's and each region's, each over
its own text tokens) and blends them per query position with the masks resampled to that layer's token
grid:

    regional(p) = sum_r m_r(p) A_r(p) / max(1, c(p)) + max(0, 1 - c(p)) A_base(p),   c(p) = sum_r m_r(p)
    out(p)      = A_base(p) + (1 - b) (regional(p) - A_base(p))

so soft masks blend smoothly, overlaps are averaged, pixels no region covers keep the base prompt, and
``b`` (the base ratio) mixes the base prompt back in everywhere. This is the mask-weighted "attention
couple" form of regional prompting (cf. Bar-Tal et al., MultiDiffusion, arXiv:2302.08113, which blends
whole denoiser outputs per region; here the blend happens inside each cross-attention layer, so the model
runs once per step instead of once per region). With one region covering the frame whose prompt equals
the base prompt, ``regional == A_base`` exactly, so the output is bitwise the unpatched layer's.

On a joint-attention DiT (Flux) the region prompts' tokens are appended to the text sequence and an
additive attention mask keeps each region's text and image tokens together (Chen et al., "Training-free
Regional Prompting for Diffusion Transformers", arXiv:2411.02395): a region's text attends itself and
the image tokens inside its mask; image tokens attend every image token, the base text, and the text of
the regions that cover them; the base text attends itself and the whole image. :func:`joint_mask` builds
it; the base ratio becomes a logit bias ``ln(b)`` on the base text for covered image tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class RegionError(ValueError):
    """Regions that cannot be used; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Region:
    """One region: a prompt's conditioning tensor ``[1, T, D]`` (pooled vector, if any, is unused) and a mask
    ``[B or 1, H, W]`` in ``[0, 1]`` (any resolution; it spans the whole frame)."""

    context: torch.Tensor
    mask: torch.Tensor


def as_mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """A ComfyUI MASK (``[H, W]`` or ``[B, H, W]``) as float ``[B, H, W]`` clamped to ``[0, 1]``."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3 or mask.shape[-1] == 0 or mask.shape[-2] == 0:
        raise RegionError(f"a region mask must be [height, width] or [batch, height, width]; got {list(mask.shape)}.")
    return mask.float().clamp(0, 1)


def masks_on_grid(masks: list[torch.Tensor], batch: int, height: int, width: int) -> torch.Tensor:
    """Region masks resampled to a ``height x width`` token grid by area averaging (any ratio, up or down),
    one row per image: ``[N, batch, height * width]``. A mask of batch 1 applies to every image; a mask of
    the latent batch gives each image its own; any other batch is an error."""
    out = []
    for i, m in enumerate(masks):
        if m.shape[0] not in (1, batch):
            raise RegionError(
                f"region {i + 1}'s mask has a batch of {m.shape[0]} but the latent batch is {batch}; give one mask "
                "for every image or a single mask for all.")
        g = F.adaptive_avg_pool2d(m.unsqueeze(1), (height, width)).flatten(1)  # [b, h*w]
        out.append(g.expand(batch, -1))
    return torch.stack(out)


def tile_grids(full: torch.Tensor, height: int, width: int, tiles: list, grid_h: int, grid_w: int) -> torch.Tensor:
    """Masks on a whole latent's ``height x width`` grid (``[..., P, height * width]``) cropped to each of Tiled
    Diffusion's ``tiles`` (``y, x, h, w`` in latent elements) and resampled by area to the tile's layer grid:
    ``[..., len(tiles) * P, grid_h * grid_w]``, tile by tile (as a tiled call stacks its rows)."""
    frame = full.reshape(*full.shape[:-1], height, width)
    parts = [F.adaptive_avg_pool2d(frame[..., t.y:t.y + t.h, t.x:t.x + t.w], (grid_h, grid_w)).flatten(-2)
             for t in tiles]
    return torch.cat(parts, dim=-2)


def tile_rows(rows: list[int], batch: int, tiles: list, per: int) -> list[int]:
    """For each batch row of a tiled call, its row in ``tile_grids``' output (``per`` images per prompt chunk)."""
    in_tile = batch // len(tiles)
    return [(r // in_tile) * per + r % per for r in rows]


def frame_masks(on_grid: Callable, per: int, height: int, width: int, device, rows: list[int], batch: int,
                tiles: tuple | None) -> tuple[torch.Tensor, list[int]]:
    """Masks for the ``rows`` of one attention call on its ``height x width`` layer grid, from ``on_grid(per,
    grid_h, grid_w, device)`` (``[..., per, grid_h * grid_w]``: one row per image of a prompt chunk): the masks and,
    for each row, its row in them. Plain calls get the whole frame's masks; Tiled Diffusion's calls (``tiles``: the
    call's tiles, the whole latent's height and width) get each tile's part of the frame's masks, computed on the
    latent's grid, cropped to the tile and resampled to the tile's layer grid."""
    if tiles is None:
        return on_grid(per, height, width, device), [r % per for r in rows]
    group, lat_h, lat_w = tiles
    full = on_grid(per, int(lat_h), int(lat_w), device)
    return tile_grids(full, int(lat_h), int(lat_w), group, height, width), tile_rows(rows, batch, group, per)


def blend_weights(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position weights of each region's attention output and of the base prompt's.

    ``masks`` ``[N, ..., L]``; returns (region weights ``[N, ..., L]``, base weight ``[..., L]``) with
    ``sum + base == 1`` everywhere: overlapping regions share by mask value, uncovered area goes to the base."""
    cover = masks.sum(dim=0)
    region = masks / cover.clamp_min(1.0)
    base = (1.0 - cover).clamp_min(0.0)
    return region, base


def regional_attention(base_out: torch.Tensor, region_outs: list[torch.Tensor], masks: torch.Tensor,
                       base_ratio: float) -> torch.Tensor:
    """Blend per-prompt cross-attention outputs ``[B, L, C]`` by masks ``[N, B, L]``.

    Exact off-switches: where the regional blend equals the base output the result is the base output
    bitwise; ``base_ratio == 1`` returns the base output unchanged."""
    if base_ratio >= 1.0 or not region_outs:
        return base_out
    region_w, base_w = blend_weights(masks.to(base_out.dtype))
    mixed = base_w.unsqueeze(-1) * base_out
    for w, out in zip(region_w, region_outs, strict=True):
        mixed = mixed + w.unsqueeze(-1) * out
    delta = mixed - base_out
    if base_ratio > 0:
        delta = delta * (1.0 - base_ratio)
    return base_out + delta


def joint_mask(text_lengths: list[int], masks: torch.Tensor, base_ratio: float, dtype=torch.float32) -> torch.Tensor:
    """Additive attention mask for a joint text + image sequence ``[base text | region 1 text | ... | image]``.

    ``text_lengths`` = [base, region 1, ...] token counts; ``masks`` ``[N, B, L_img]`` in ``[0, 1]`` on the
    image token grid (a token belongs to a region where its mask is at least 0.5). Returns ``[B, L, L]``
    with 0 where attention is allowed and ``-inf`` where it is not (``ln(base_ratio)`` on the base text for
    image tokens covered by a region)."""
    n_regions, batch, n_img = masks.shape
    if len(text_lengths) != n_regions + 1:
        raise RegionError(f"{len(text_lengths)} text spans for {n_regions} regions; expected one more (the base).")
    n_txt = sum(text_lengths)
    total = n_txt + n_img
    neg = float("-inf")
    allowed = torch.zeros(batch, total, total, dtype=torch.bool, device=masks.device)
    spans, start = [], 0
    for n in text_lengths:
        spans.append((start, start + n))
        start += n
    inside = masks >= 0.5  # [N, B, L_img]
    img = slice(n_txt, total)
    b0, b1 = spans[0]
    allowed[:, b0:b1, b0:b1] = True  # base text: itself ...
    allowed[:, b0:b1, img] = True  # ... and the whole image
    allowed[:, img, img] = True  # image: every image token ...
    allowed[:, img, b0:b1] = True  # ... and the base text
    for r, (s0, s1) in enumerate(spans[1:]):
        allowed[:, s0:s1, s0:s1] = True  # region text: itself ...
        allowed[:, s0:s1, img] |= inside[r].unsqueeze(1)  # ... and its own image tokens
        allowed[:, img, s0:s1] |= inside[r].unsqueeze(2)  # image tokens: the text of the regions covering them
    bias = torch.zeros(batch, total, total, dtype=dtype, device=masks.device).masked_fill(~allowed, neg)
    if base_ratio < 1.0:
        covered = inside.any(dim=0)  # [B, L_img]
        shift = math.log(base_ratio) if base_ratio > 0 else neg
        rows = bias[:, img, b0:b1]
        bias[:, img, b0:b1] = torch.where(covered.unsqueeze(-1), torch.full_like(rows, shift), rows)
    return bias
