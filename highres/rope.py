"""Rotary position embedding (RoPE) scaling per axis for DiTs above their training size (pure torch).

A Flux-layout DiT encodes each image token's (index, row, column) with RoPE at base ``theta``. Beyond the
training grid, rows and columns reach positions the model never saw, and the low frequencies that carry
the layout wrap differently. Two remedies from the language-model literature, applied per axis with that
axis's own scale ``s = extent now / extent at training`` (so a wide image scales only its columns):

* **NTK-aware** (bloc97, 2023; used by I-Max for Flux, arXiv:2410.07536): the base grows to
  ``theta * s ** (d / (d - 2))`` for an axis of ``d`` dimensions, which keeps the highest frequency
  (local detail) and stretches the lowest over the new extent;
* **position interpolation** (Chen et al., arXiv:2306.15595): positions are divided by ``s``, so the new
  grid spans the trained range exactly (smoother, can blur detail).

An axis at or below its training extent (``s <= 1``) and the text tokens (position 0) are left untouched,
so at the training size the embedding is bitwise the original.
"""

from __future__ import annotations

import torch

MODES = ("NTK-aware", "position interpolation")


def rope_rotations(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Flux's RoPE rotation matrices for positions ``[B, N]`` on one axis of ``dim`` dimensions:
    ``[B, N, dim / 2, 2, 2]`` (as ``comfy.ldm.flux.math.rope``)."""
    if dim % 2:
        raise ValueError(f"a RoPE axis needs an even number of dimensions, got {dim}")
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / (theta ** scale)
    angles = torch.einsum("...n,d->...nd", pos.to(dtype=torch.float32), omega)
    out = torch.stack([torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).to(torch.float32)


def axis_extent(positions: torch.Tensor) -> float:
    """Number of distinct grid positions an axis spans (max - min + 1; 1 for a constant axis)."""
    if positions.numel() == 0:
        return 1.0
    return float(positions.max() - positions.min()) + 1.0


def axis_scale(extent_now: float, extent_train: float) -> float:
    """How much larger the axis is than at training; 1 when it is not larger."""
    return max(1.0, extent_now / max(extent_train, 1.0))


def ntk_theta(theta: float, scale: float, dim: int) -> float:
    return theta if scale <= 1.0 else theta * scale ** (dim / (dim - 2))


def scaled_rope(ids: torch.Tensor, axes_dim: list[int], theta: float, train_extent: list[float | None],
                mode: str, measure: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE for ids ``[B, N, axes]`` with each axis scaled to its training extent (None: leave the axis);
    returns ``[B, 1, sum(axes_dim) / 2, 2, 2]`` like Flux's ``EmbedND``. ``measure`` ([B, N] bool): the tokens
    whose positions give an axis's extent now (the generated image's; default every token); every token's
    embedding is scaled alike."""
    if mode not in MODES:
        raise ValueError(f"unknown RoPE scaling mode {mode!r}; expected one of {MODES}")
    if measure is not None and not bool(measure.any()):
        measure = None
    parts = []
    for i, dim in enumerate(axes_dim):
        pos = ids[..., i]
        now = axis_extent(pos if measure is None else pos[measure])
        s = 1.0 if train_extent[i] is None else axis_scale(now, train_extent[i])
        if s > 1.0 and mode == "position interpolation":
            parts.append(rope_rotations(pos / s, dim, theta))
        else:
            parts.append(rope_rotations(pos, dim, ntk_theta(theta, s, dim) if mode == "NTK-aware" else theta))
    return torch.cat(parts, dim=-3).unsqueeze(1)


def generated_tokens(ids: torch.Tensor, video: bool) -> torch.Tensor:
    """The tokens of the image being generated (and the text, at position 0), by the first id axis: index 0 on an
    image model (Flux Kontext's reference images sit at index 1, 2, ... beside or after it), frames 0, 1, ... on a
    video model (HunyuanVideo's reference latent sits at -1, shifted a whole width along the columns)."""
    return ids[..., 0] >= 0 if video else ids[..., 0] == 0


class ScaledRoPE(torch.nn.Module):
    """Stands in for a Flux-layout model's ``pe_embedder`` (an object patch): each image axis scaled to its
    training extent, the extent now measured on the generated image's tokens (reference images would widen it)."""

    def __init__(self, original, train_extent: list[float | None], mode: str, video: bool = False):
        super().__init__()
        self.axes_dim, self.theta = list(original.axes_dim), float(original.theta)
        self.train_extent, self.mode, self.video = train_extent, mode, video

    def forward(self, ids):
        return scaled_rope(ids, self.axes_dim, self.theta, self.train_extent, self.mode,
                           generated_tokens(ids, self.video))
