"""HiDiffusion for UNets: RAU-Net and MSW-MSA (pure torch).

Zhang et al., "HiDiffusion: Unlocking Higher-Resolution Creativity and Efficiency in Pretrained Diffusion
Models", arXiv 2311.17528 (ECCV 2024).

Above its training size a UNet repeats objects: its deep features see too small a share of the image.
**RAU-Net** (resolution-aware U-Net) shrinks the features early in the run, while the layout forms, so the
deep blocks see the image at about their training size:

* the first down-sampler runs its 3x3 convolution with stride 4, padding 2, dilation 2 (same weights)
  instead of stride 2, and the matching up-sampler interpolates back to the skip's size (its own nearest
  interpolation to the skip's shape, here x4);
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
4x ``T1 = 0.7, T2 = 0.3``; the 'auto' preset picks one from the latent's size as the official code does, and
on SDXL at 2x also its early schedule: the stride-4 conv for the first 8/50 of the run, then pooling up to
``T1``. The official code counts forward calls as steps; here a call's step is read from
its sigma (:class:`preprint.caching.clock.StepClock`), so any sampler and step count work, and window shifts
come from a generator seeded by the run's seed, the step and the layer, never the global RNG. Windows are split as
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
    auto_limit: int  # 'auto': the 2x preset while a latent side is below this, else the 4x preset
    early_stride: bool  # 'auto' at 2x: the stride-4 conv first, then pooling (the official SDXL 2x schedule)


LAYOUTS: dict[str, RAULayout] = {
    "sd15": RAULayout("SD1.x / SD2.x", 3, 4, 8, "t1", "t2",
                      (("input", 1, 0), ("input", 2, 0), ("output", 9, 0), ("output", 10, 0), ("output", 11, 0)),
                      auto_limit=256, early_stride=False),
    "sdxl": RAULayout("SDXL", 6, 4, 5, "t2", "t1",
                      tuple((b, n, i) for b, ns in (("input", (4, 5)), ("output", (3, 4, 5))) for n in ns
                            for i in (0, 1)),
                      auto_limit=512, early_stride=True),
}
PRESETS = {"2x": (0.4, 0.0), "4x": (0.7, 0.3)}
EARLY_STRIDE_END = 8 / 50  # the official SDXL 2x schedule: stride 4 for the first 8 of 50 steps, then pooling


def auto_preset(layout: RAULayout, height: int, width: int) -> tuple[float, float, bool]:
    """``(t1, t2, early_stride)`` as the official implementation picks them from the latent's size: the 2x
    preset while either side is below ``layout.auto_limit`` latent pixels (SD1.x 256 = 2048 px, SDXL 512 =
    4096 px), with SDXL's early stride-4 phase; the 4x preset above."""
    if min(int(height), int(width)) < layout.auto_limit:
        return (*PRESETS["2x"], layout.early_stride)
    return (*PRESETS["4x"], False)


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


def window_shift(seed: int, step: int, height: int, width: int, layer: int = 0) -> tuple[int, int]:
    """The step's cyclic shift on one layer: ``k / 4`` of a window along both sides, ``k`` in {0, 1, 2, 3} drawn
    from a generator seeded by the run's seed, the step and the layer (as the official code draws one per layer
    and step; the cond and uncond calls of a step share it)."""
    mixed = int(seed) * 1_000_003 + int(step) * 7919 + int(layer) * 104_729 + 0x4D5357
    g = torch.Generator().manual_seed(mixed & 0x7FFFFFFFFFFFFFFF)
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


def layer_index(block: BlockKey) -> int:
    """A stable number for a self-attention layer (its window shifts are drawn apart from the others')."""
    return (0 if block[0] == "input" else 1) * 10_000 + int(block[1]) * 100 + int(block[2])


class HiDiffusionRun:
    """One sampling run's switches: which RAU-Net parts are on at a call's sigma, and its window shifts.

    ``preset="custom"`` uses ``t1`` / ``t2`` as given; ``"auto"`` picks the official preset from the latent's
    size at the run's first model call (:meth:`configure`), SDXL's early stride-4 phase included."""

    def __init__(self, sample_sigmas, layout: RAULayout, t1: float, t2: float, raunet: bool, windows: bool,
                 seed: int, preset: str = "custom"):
        for name, t in (("t1", t1), ("t2", t2)):
            if not 0.0 <= t <= 1.0 or math.isnan(t):
                raise ValueError(f"HiDiffusion: {name} = {t} is not a fraction of the run in [0, 1]")
        if preset not in ("auto", "custom"):
            raise ValueError(f"HiDiffusion: preset {preset!r} is not 'auto' or 'custom'")
        self.clock = StepClock(sample_sigmas)
        self.layout = layout
        self.raunet, self.windows, self.seed, self.preset = raunet, windows, int(seed), preset
        self.configured = False
        if preset == "custom" or not raunet:  # without RAU-Net the switch points change nothing
            self._set(t1, t2, early=False)
        self._shifts: dict[tuple[int, int, int, int], tuple[int, int]] = {}  # (step, layer, h, w) -> shift

    def _set(self, t1: float, t2: float, early: bool) -> None:
        n = self.clock.steps
        ends = {"t1": int(n * t1), "t2": int(n * t2)}
        self.t1, self.t2, self.early_stride = t1, t2, early
        if early:  # stride 4 first, then pooling up to the pooled part's switch point
            self.strided_until = int(n * EARLY_STRIDE_END)
            self.pooled_from, self.pooled_until = self.strided_until, ends[self.layout.pooled_phase]
        else:
            self.strided_until = ends[self.layout.strided_phase]
            self.pooled_from, self.pooled_until = 0, ends[self.layout.pooled_phase]
        if not self.raunet:
            self.strided_until = self.pooled_from = self.pooled_until = 0
        self.configured = True

    def configure(self, height: int, width: int) -> None:
        """Fix the 'auto' preset from the latent's height and width (the first call's; later calls keep it)."""
        if not self.configured:
            self._set(*auto_preset(self.layout, height, width))

    def step(self, sigma) -> int:
        return self.clock.step(sigma)

    def _check(self) -> None:
        if not self.configured:
            raise RuntimeError("HiDiffusion: the 'auto' preset was not fixed before the UNet's blocks ran (its "
                               "model wrapper did not see this call); choose preset 'custom' with t1 and t2")

    def strided(self, sigma) -> bool:
        self._check()
        return self.step(sigma) < self.strided_until

    def pooled(self, sigma) -> bool:
        self._check()
        return self.pooled_from <= self.step(sigma) < self.pooled_until

    def reshaping(self, sigma) -> bool:
        """Whether RAU-Net changes any feature size at this call (ControlNet residuals then need resizing)."""
        return self.strided(sigma) or self.pooled(sigma)

    def shift(self, sigma, height: int, width: int, layer: int = 0) -> tuple[int, int]:
        key = (self.step(sigma), layer, height, width)
        if key not in self._shifts:  # the cond and uncond calls of a step share the layer's draw
            self._shifts[key] = window_shift(self.seed, key[0], height, width, layer)
        return self._shifts[key]
