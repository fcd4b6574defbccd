"""Block noise for re-noising upscaled latents.

Teng et al., "Relay Diffusion: Unifying diffusion process across resolutions for image synthesis",
arXiv:2309.03350, section 3.2. The same noise level removes less of an image at a higher resolution: white
noise is independent per element, so averaged over the k x k block that one low-resolution element became, its
power drops by k^2, and the coarse structure of an upscaled image survives a re-noising that would have erased
it at the native size. Block noise restores the balance: each element is the sum of the k x k white-noise values
of the block ending at it, divided by k. Every element keeps unit variance, and two elements (dy, dx) apart
share (k - |dy|)(k - |dx|) of their k^2 terms, so their correlation is (k - |dy|)(k - |dx|) / k^2. The means
of the k x k blocks (the coarse picture) keep (k (2k^2 + 1) / 3)^2 / k^6 of the power (9/16 at k = 2, towards
4/9 for large k) where white noise leaves them 1/k^2 (1/4 at k = 2).

The blocks wrap around the edges (a circular sum), so every element is made alike at any width and height.
``block_fraction`` below 1 mixes independent white noise in (variance shares f and 1 - f, still unit variance):
an option of this pack for milder re-noising, not part of the paper's definition.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class BlockNoiseError(ValueError):
    """A block size or mixing fraction no block noise exists for."""


def check(block_size: int, block_fraction: float) -> None:
    if int(block_size) != block_size or block_size < 1:
        raise BlockNoiseError(f"block_size = {block_size}: a block is a whole number of latent elements, at least 1.")
    if not 0.0 <= block_fraction <= 1.0:  # NaN fails too
        raise BlockNoiseError(f"block_fraction = {block_fraction} is a share of the variance and must lie in [0, 1].")


def block_sum(white: torch.Tensor, block_size: int) -> torch.Tensor:
    """Relay Diffusion's block noise from white noise ``[..., H, W]``: at every element the sum of the
    ``block_size`` x ``block_size`` values whose block ends there (wrapping round the edges), divided by
    ``block_size``. ``block_size`` 1 returns ``white`` itself."""
    k = int(block_size)
    if k == 1:
        return white
    h, w = white.shape[-2:]
    if k > h or k > w:
        raise BlockNoiseError(f"block_size = {k} is larger than the latent ({h} x {w} elements): a block would wrap "
                              "onto itself and the noise would lose its unit variance. Use a block size of at most "
                              f"{min(h, w)}.")
    padded = _wrap_before(white.reshape(-1, 1, h, w), k - 1)
    # the mean of k^2 values times k is their sum over k; summed in float32 whatever the noise's dtype
    summed = F.avg_pool2d(padded.float(), kernel_size=k, stride=1) * k
    return summed.to(white.dtype).reshape(white.shape)


def _wrap_before(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` with the ``n`` rows and columns that precede it on a torus prepended."""
    h, w = x.shape[-2:]
    rows = torch.arange(-n, h) % h
    cols = torch.arange(-n, w) % w
    return x[..., rows, :][..., cols]


def block_noise(shape: tuple[int, ...], generator: torch.Generator, block_size: int, block_fraction: float = 1.0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit-variance noise of ``shape`` (``[..., H, W]``) drawn from ``generator``: block noise of
    ``block_size``, mixed with independent white noise when ``block_fraction`` < 1. The first draw is the white
    noise the blocks are made of, so ``block_size`` 1 and fraction 1 give exactly ``torch.randn`` of the
    generator."""
    check(block_size, block_fraction)
    white = torch.randn(shape, generator=generator, dtype=dtype)
    noise = block_sum(white, block_size)
    if block_fraction < 1.0:
        fresh = torch.randn(shape, generator=generator, dtype=dtype)
        noise = math.sqrt(block_fraction) * noise + math.sqrt(1.0 - block_fraction) * fresh
    return noise


class BlockNoiseSource:
    """ComfyUI's NOISE interface (``seed``, ``generate_noise(latent_dict)``), as core's random noise: one
    generator seeded with ``seed`` per call, CPU noise in the latent's dtype, and with a ``batch_index`` each
    index drawn in turn so a batch row keeps its noise whatever else is in the batch."""

    def __init__(self, seed: int, block_size: int, block_fraction: float):
        check(block_size, block_fraction)
        self.seed, self.block_size, self.block_fraction = int(seed), int(block_size), float(block_fraction)

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        g = torch.Generator().manual_seed(self.seed)
        draw = lambda shape: block_noise(shape, g, self.block_size, self.block_fraction,  # noqa: E731
                                         dtype=samples.dtype)
        indices = input_latent.get("batch_index")
        if indices is None:
            return draw(tuple(samples.shape))
        one = (1, *samples.shape[1:])
        drawn = [draw(one) for _ in range(max(indices) + 1)]
        return torch.cat([drawn[i] for i in indices])
