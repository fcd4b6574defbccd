"""FAM's attention modulation (pure torch): the high-resolution pass's self-attention maps blended with the
native-resolution pass's, upsampled.

Yang et al., "FAM Diffusion: Frequency and Attention Modulation for High-Resolution Image Generation with Stable
Diffusion", arXiv:2411.18552 (no official code). At chosen self-attention layers of the high-resolution denoise
the attention map becomes ``A = lam * Up(A_native) + (1 - lam) * A_hr`` (the paper: lam = 0.7, SDXL up block 0),
where ``A_native`` is the same layer's map in a pass of the model over the native-size latent at the same step.

Up of a map. ``A_native`` is ``n x n`` (n = h w tokens of the native layer's grid), ``A_hr`` is ``N x N``
(N = H W). The paper does not spell out Up; our definition treats the map as the 4-D image ``(h, w, h, w)`` it is
and resizes both the query axis and the key axis with the same separable interpolation ``U`` (bilinear,
``align_corners=False``, as ``F.interpolate``; an ``N x n`` matrix whose rows sum to 1), with each native key's
weight shared among the high-resolution keys it spreads to::

    Up(A) = U A D^-1 U^T,      D = diag(column sums of U) (a native key's footprint, s_h s_w inside the image)

so every row of Up(A) is non-negative and sums to 1 (a convex mix, on the query axis, of native rows whose mass is
spread, on the key axis, by distributions ``D^-1 U^T``). Plain 4-D interpolation without ``D^-1`` would give rows
summing to about s_h s_w: no attention map at all. At scale 1 on an axis ``U`` is the identity, so Up of a
same-size map is the map itself.

What it means in practice: the blend is linear in the map, so ``A V = lam Up(A_native) V + (1 - lam) A_hr V``,
and ``Up(A_native) V = U (A_native (D^-1 U^T V))`` by associativity: pool the high-resolution values to the native
grid (``D^-1 U^T V``: each native cell the footprint-weighted mean of the values it spreads to), attend them with
the native pass's queries and keys (the native map, inside ComfyUI's own attention kernel, at the native pass's
cost), and interpolate the result back to the high-resolution grid (``U``). No ``N x N`` (nor ``n x n``) map is
ever built: the high-resolution term is the model's own attention, the native term an attention over n tokens,
and the two interpolations are separable (``H x h`` and ``W x w`` matrices). :func:`upsample_map` builds Up(A)
explicitly for small sizes only, for tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

CALL_KEY = "preprint_fam_attention_call"  # transformer_options entry of a model call taking part (capture / blend)


class AttentionModulationError(ValueError):
    """Attention modulation that cannot be done; the message says what and how to fix it."""


def interpolation_matrix(n: int, size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The ``size x n`` matrix of 1-D linear interpolation from n samples to ``size`` (``F.interpolate``'s
    'linear', ``align_corners=False``): row i holds the weights output i takes from each input; rows sum to 1,
    the identity when ``size == n``. Up-sampling only (``size >= n``), so every input has a positive footprint."""
    if n < 1 or size < n:
        raise AttentionModulationError(f"cannot up-sample an axis of {n} to {size}: the native grid must be no "
                                       "larger than the high-resolution grid on each side")
    if size == n:
        return torch.eye(n, dtype=dtype, device=device)
    eye = torch.eye(n, dtype=torch.float64).unsqueeze(0)  # [1, channel = input i, position]
    u = F.interpolate(eye, size=size, mode="linear", align_corners=False)[0].T
    return u.contiguous().to(dtype=dtype, device=device)


@dataclass(frozen=True)
class Resampler:
    """Up-sampling between a native token grid ``(h, w)`` and a high-resolution one ``(H, W)`` (row-major tokens)."""

    native: tuple[int, int]
    grid: tuple[int, int]
    uh: torch.Tensor = field(repr=False)  # H x h
    uw: torch.Tensor = field(repr=False)  # W x w

    @classmethod
    def make(cls, native: tuple[int, int], grid: tuple[int, int], dtype=torch.float32, device=None) -> Resampler:
        return cls(tuple(native), tuple(grid), interpolation_matrix(native[0], grid[0], dtype, device),
                   interpolation_matrix(native[1], grid[1], dtype, device))

    def upsample(self, tokens: torch.Tensor) -> torch.Tensor:
        """``U X``: ``[..., h w, C]`` native tokens interpolated to ``[..., H W, C]``."""
        (h, w), (big_h, big_w) = self.native, self.grid
        x = tokens.reshape(*tokens.shape[:-2], h, w, tokens.shape[-1])
        x = torch.einsum("Hh,...hwc->...Hwc", self.uh.to(x), x)
        x = torch.einsum("Ww,...Hwc->...HWc", self.uw.to(x), x)
        return x.reshape(*tokens.shape[:-2], big_h * big_w, tokens.shape[-1])

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``D^-1 U^T X``: ``[..., H W, C]`` high-resolution tokens to ``[..., h w, C]``, each native cell the mean
        of the tokens it spreads to, weighted by its interpolation weights (the adjoint of :meth:`upsample`,
        normalised)."""
        (h, w), (big_h, big_w) = self.native, self.grid
        x = tokens.reshape(*tokens.shape[:-2], big_h, big_w, tokens.shape[-1])
        uh, uw = self.uh.to(x), self.uw.to(x)
        x = torch.einsum("Hh,...HWc->...hWc", uh, x)
        x = torch.einsum("Ww,...hWc->...hwc", uw, x)
        footprint = torch.outer(uh.sum(0), uw.sum(0)).unsqueeze(-1)
        return (x / footprint).reshape(*tokens.shape[:-2], h * w, tokens.shape[-1])

    def upsample_map(self, attention_map: torch.Tensor) -> torch.Tensor:
        """``Up(A) = U A D^-1 U^T`` built explicitly, ``[..., n, n] -> [..., N, N]``: for small sizes (tests)."""
        u = torch.kron(self.uh, self.uw).to(attention_map)  # N x n, row-major tokens
        spread = u.T / u.sum(0).unsqueeze(-1)  # D^-1 U^T: n x N, rows sum to 1
        return u @ attention_map @ spread


def modulated_output(plain: torch.Tensor, native_attention: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor,
                     resampler: Resampler, weight: float) -> torch.Tensor:
    """The output of the blended map ``(weight Up(A_native) + (1 - weight) A_hr) V`` given the high-resolution
    output ``plain = A_hr V`` and ``native_attention(values) = A_native values`` (``[B, n, C] -> [B, n, C]``):
    ``plain + weight (U A_native D^-1 U^T V - plain)``, in ``plain``'s dtype."""
    native = native_attention(resampler.pool(v))
    up = resampler.upsample(native).to(plain.dtype)
    return torch.lerp(plain, up, float(weight))


@dataclass
class Call:
    """One model call's part: ``capture`` (the native pass: record each layer's queries and keys) or ``blend``
    (the high-resolution pass: use them). ``store`` maps a layer key to ``(q, k, grid, options)``."""

    mode: str
    weight: float = 0.0
    store: dict = field(default_factory=dict)


class AttentionModulation:
    """``attn1`` replacement for one self-attention layer: plain attention (or the replacement an earlier node put
    there) outside a modulated call; in the native pass it records the layer's queries and keys; in the
    high-resolution pass it blends the native map in (:func:`modulated_output`)."""

    def __init__(self, attention: Callable, key: tuple, previous: Callable | None = None, node: str = "FAM"):
        self.attention, self.key, self.node = attention, key, node
        while isinstance(previous, AttentionModulation):  # a second node of this kind replaces the first
            previous = previous.previous
        self.previous = previous

    def plain(self, q, k, v, options: dict) -> torch.Tensor:
        if self.previous is not None:
            return self.previous(q, k, v, options)
        return self.attention(q, k, v, options["n_heads"], attn_precision=options.get("attn_precision"),
                              transformer_options=options)

    def __call__(self, q, k, v, options: dict) -> torch.Tensor:
        out = self.plain(q, k, v, options)
        call = options.get(CALL_KEY)
        if call is None:
            return out
        grid = _grid(options, q.shape[1], self.key, self.node)
        if call.mode == "capture":
            call.store[self.key] = (q, k, grid, {n: o for n, o in options.items() if n != CALL_KEY})
            return out
        if self.key not in call.store:
            raise AttentionModulationError(
                f"{self.node}: the native-resolution pass never reached layer {self.key}, so there is no map to "
                "blend there; another node changes the model's path in one of the two passes. Remove it, or choose "
                "other layers.")
        nq, nk, native_grid, native_options = call.store[self.key]
        if nq.shape[0] != q.shape[0]:
            raise AttentionModulationError(f"{self.node}: the native pass had {nq.shape[0]} rows at {self.key} and "
                                           f"the high-resolution pass {q.shape[0]}.")
        if native_grid[0] > grid[0] or native_grid[1] > grid[1]:
            raise AttentionModulationError(
                f"{self.node}: at layer {self.key} the native grid {native_grid} is larger than the "
                f"high-resolution grid {grid} on a side; connect the native-resolution result (smaller than the "
                "sampled latent) as native_latent.")
        resampler = Resampler.make(native_grid, grid, torch.float32, q.device)
        heads, precision = native_options["n_heads"], native_options.get("attn_precision")

        def native_attention(values):
            return self.attention(nq, nk, values.to(nq.dtype), heads, attn_precision=precision,
                                  transformer_options=native_options)

        return modulated_output(out, native_attention, v, resampler, call.weight)


def _grid(options: dict, tokens: int, key: tuple, node: str) -> tuple[int, int]:
    shape = options.get("activations_shape")
    if shape is None or len(shape) != 4 or int(shape[-2]) * int(shape[-1]) != tokens:
        raise AttentionModulationError(f"{node}: layer {key} did not report its feature grid ({shape}) for "
                                       f"{tokens} tokens; this ComfyUI is too old or the layer is not a 2-D "
                                       "self-attention.")
    return int(shape[-2]), int(shape[-1])
