"""HiDiffusion for UNets: RAU-Net and MSW-MSA (pure torch).

Zhang et al., "HiDiffusion: Unlocking Higher-Resolution Creativity and Efficiency in Pretrained Diffusion
Models", arXiv 2311.17528 (ECCV 2024).

Above its training size a UNet repeats objects: its deep features see too small a share of the image.
**RAU-Net** (resolution-aware U-Net) shrinks the features early in the run, while the layout forms, so the
deep blocks see the image at about their training size:

* the first down-sampler runs its 3x3 convolution with stride 4, padding 2, dilation 2 (same weights)
  instead of stride 2, and the matching up-sampler interpolates back to the skip's size (nearest, x4);
* in the next level, the features are average-pooled 2x2 after the first res + attention pair and resized
  back (bicubic) before the up path's pair at full size; the two skips in between stay reduced, so every
  concatenation meets features of its own size.

**MSW-MSA** (modified shifted-window self-attention) runs the self-attention of the highest-resolution
transformer blocks inside a 2x2 grid of windows, shifted by 0, 1/4, 1/2 or 3/4 of a window each step (a
cyclic roll, as in the paper), which is both faster and keeps attention local.

Block choices and switch points follow the official implementation (Apache-2.0): SD1.x / SD2.x stride-4
conv in down block 0 (ComfyUI ``input_blocks[3]``) during the first ``T1`` of the run and pooling in down
block 1 (after ``input_blocks[4]``, undone at ``output_blocks[8]``) during the first ``T2``; SDXL pooling in
down block 1 (after ``input_blocks[4]``, undone at ``output_blocks[5]``) during ``T1`` and the stride-4 conv
in its down-sampler (``input_blocks[6]``) during ``T2``. Presets: 2x the training size ``T1 = 0.4, T2 = 0``;
4x ``T1 = 0.7, T2 = 0.3``. The official code counts forward calls as steps; here a call's step is read from
its sigma (:class:`preprint.caching.clock.StepClock`), so any sampler and step count work, and window shifts
come from a generator seeded by the run's seed and the step, never the global RNG. Windows are split as
``ceil(n / 2)`` and ``n - ceil(n / 2)`` rows / columns, so odd sizes need no resizing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..caching.clock import StepClock

BlockKey = tuple[str, int, int]  # ("input" | "output", block number, transformer index)


@dataclass(frozen=True)
class RAULayout:
    name: str
    strided_block: int  # input block holding the Downsample whose conv runs with stride 4
    pooled_block: int  # input block after which features are pooled 2x2
    unpool_block: int  # output block at whose entry the features are resized back to the skip's size
    strided_phase: str  # "t1" or "t2": which switch point ends the strided conv
    pooled_phase: str
    window_blocks: tuple[BlockKey, ...]  # MSW-MSA self-attention layers


LAYOUTS: dict[str, RAULayout] = {
    "sd15": RAULayout("SD1.x / SD2.x", 3, 4, 8, "t1", "t2",
                      (("input", 1, 0), ("input", 2, 0), ("output", 9, 0), ("output", 10, 0), ("output", 11, 0))),
    "sdxl": RAULayout("SDXL", 6, 4, 5, "t2", "t1",
                      tuple((b, n, i) for b, ns in (("input", (4, 5)), ("output", (3, 4, 5))) for n in ns
                            for i in (0, 1))),
}
PRESETS = {"2x": (0.4, 0.0), "4x": (0.7, 0.3)}


def strided_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The down-sampler's 3x3 convolution at stride 4, padding 2, dilation 2: ``ceil(n / 4)`` per side."""
    return F.conv2d(x, weight, bias, stride=4, padding=2, dilation=2)


def pool(h: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling, rounding odd sizes up (``ceil(n / 2)`` per side)."""
    return F.avg_pool2d(h, kernel_size=2, ceil_mode=True)


def resize_to(h: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bicubic resize of ``[B, C, H, W]`` to ``size`` (no-op when already there)."""
    size = tuple(int(s) for s in size)
    if tuple(h.shape[-2:]) == size:
        return h
    return F.interpolate(h, size=size, mode="bicubic", align_corners=False)


def window_splits(n: int) -> tuple[int, int]:
    """Rows (or columns) of the two windows along one side: ``ceil(n / 2)`` and the rest."""
    first = (n + 1) // 2
    return first, n - first


def window_shift(seed: int, step: int, height: int, width: int) -> tuple[int, int]:
    """The step's cyclic shift: ``k / 4`` of a window along both sides, ``k`` in {0, 1, 2, 3} drawn from a
    generator seeded by the run's seed and the step (the same for every call of the step)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7919 + 0x4D5357) & 0x7FFFFFFFFFFFFFFF)
    k = int(torch.randint(4, (), generator=g))
    return k * (window_splits(height)[0] // 4), k * (window_splits(width)[0] // 4)


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int,
                       shift: tuple[int, int], attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                                   torch.Tensor]) -> torch.Tensor:
    """Self-attention of ``[B, H*W, C]`` tokens inside a 2x2 grid of windows after rolling the grid by
    ``-shift``; the output is rolled back. ``attention(q, k, v)`` maps ``[b, n, C]`` to ``[b, n, C]``.
    Windows of equal size are batched into one call."""
    b, n, c = q.shape
    if n != height * width:
        raise ValueError(f"windowed attention: {n} tokens are not a {height}x{width} grid")
    sy, sx = shift

    def grid(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(b, height, width, t.shape[-1])
        return torch.roll(t, shifts=(-sy, -sx), dims=(1, 2)) if (sy or sx) else t

    qg, kg, vg = grid(q), grid(k), grid(v)
    h0, _ = window_splits(height)
    w0, _ = window_splits(width)
    rows, cols = (slice(0, h0), slice(h0, height)), (slice(0, w0), slice(w0, width))
    windows = [(r, cl) for r in rows for cl in cols if r.stop > r.start and cl.stop > cl.start]
    out = torch.empty(b, height, width, v.shape[-1], dtype=v.dtype, device=v.device)
    groups: dict[tuple[int, int], list[tuple[slice, slice]]] = {}
    for r, cl in windows:
        groups.setdefault((r.stop - r.start, cl.stop - cl.start), []).append((r, cl))
    for (hh, ww), members in groups.items():
        def take(t, members=members, hh=hh, ww=ww):
            return torch.cat([t[:, r, cl].reshape(b, hh * ww, t.shape[-1]) for r, cl in members])

        res = attention(take(qg), take(kg), take(vg))
        for i, (r, cl) in enumerate(members):
            out[:, r, cl] = res[i * b:(i + 1) * b].reshape(b, hh, ww, -1)
    if sy or sx:
        out = torch.roll(out, shifts=(sy, sx), dims=(1, 2))
    return out.reshape(b, n, -1)


class HiDiffusionRun:
    """One sampling run's switches: which RAU-Net parts are on at a call's sigma, and its window shift."""

    def __init__(self, sample_sigmas, layout: RAULayout, t1: float, t2: float, raunet: bool, windows: bool,
                 seed: int):
        for name, t in (("t1", t1), ("t2", t2)):
            if not 0.0 <= t <= 1.0 or math.isnan(t):
                raise ValueError(f"HiDiffusion: {name} = {t} is not a fraction of the run in [0, 1]")
        self.clock = StepClock(sample_sigmas)
        self.layout = layout
        self.raunet, self.windows, self.seed = raunet, windows, int(seed)
        ends = {"t1": int(self.clock.steps * t1), "t2": int(self.clock.steps * t2)}
        self.strided_until = ends[layout.strided_phase] if raunet else 0
        self.pooled_until = ends[layout.pooled_phase] if raunet else 0
        self._shifts: dict[tuple[int, int, int], tuple[int, int]] = {}  # (step, h, w) -> shift, drawn once

    def step(self, sigma) -> int:
        return self.clock.step(sigma)

    def strided(self, sigma) -> bool:
        return self.step(sigma) < self.strided_until

    def pooled(self, sigma) -> bool:
        return self.step(sigma) < self.pooled_until

    def reshaping(self, sigma) -> bool:
        """Whether RAU-Net changes any feature size at this call (ControlNet residuals then need resizing)."""
        return self.strided(sigma) or self.pooled(sigma)

    def shift(self, sigma, height: int, width: int) -> tuple[int, int]:
        key = (self.step(sigma), height, width)
        if key not in self._shifts:  # every window layer and cond / uncond call of a step shares one draw
            self._shifts[key] = window_shift(self.seed, *key)
        return self._shifts[key]
