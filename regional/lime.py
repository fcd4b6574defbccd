"""LIME's attention regularisation on a UNet's cross-attention (pure torch; the host's attention is passed in).

Simsar et al., "LIME: Localized Image Editing via Attention Regularization in Diffusion Models", arXiv:2312.09256.
Inside the region of interest (RoI) the cross-attention scores of every text token unrelated to the edit are pushed
to minus infinity before the softmax, so the image positions there attend only the edit words; outside the RoI the
attention is untouched. The paper regularises InstructPix2Pix and finds the RoI itself (feature clustering, refined
by the edit words' attention); here the RoI is a mask given by the user (any MASK, e.g. Mask From Words), on any
UNet (SD1.x, SD2.x, SDXL) prompt.

Choices, each documented where it is made:

- Which tokens are kept: the edit words only. The paper counts the start-of-text token, the padding and the stop
  words among the unrelated tokens it penalises; the start token can be kept as an option (:func:`kept_columns`),
  which softens the edit (that token soaks up most of a row's attention in CLIP-conditioned UNets).
- How "minus infinity" is computed: not as a number at all. Softmax with the other columns at -inf is exactly
  softmax over the kept columns alone, so the regularised attention is the host's own attention with the keys and
  values of the kept tokens only (:func:`regularised_attention`). No -inf or large negative constant ever enters a
  fused kernel, so fp16 / bf16 cannot overflow or give NaN, and the attention to the other tokens is exactly 0.
  :func:`regularised_probs` writes the same thing out with a float32 ``-inf`` fill, to read and to test against.
- Soft masks: a mask value ``m`` in [0, 1] (times the strength) blends the layer outputs per image position,
  ``out(p) = base(p) + m(p) (reg(p) - plain(p))``, where ``plain`` is the unpatched attention and ``base`` what the
  layer gives without this edit (the same as ``plain`` unless another node's patch is chained under it). ``m = 1``
  is the paper's hard regularisation, ``m = 0`` leaves the position bitwise alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..caching.store import TILES
from ..utils.sigma_window import SigmaWindow
from .attention import frame_masks, masks_on_grid
from .runtime import active, positive_rows

CHUNK = 77  # CLIP's context: a long prompt is encoded chunk after chunk, each opening with its own start token


class LimeError(ValueError):
    """A region or token set that cannot be used; the message says what is wrong and how to fix it."""


def kept_columns(word_positions: Sequence[Sequence[int]], prompt_length: int, keep_start: bool = False) -> list[int]:
    """The text-token columns the RoI still attends: every edit word's positions, plus each chunk's start token when
    ``keep_start`` (positions 0, 77, ... below ``prompt_length``)."""
    cols = {p for g in word_positions for p in g}
    if keep_start:
        cols |= set(range(0, max(prompt_length, 1), CHUNK))
    if not cols:
        raise LimeError("no edit tokens: name at least one word of the prompt.")
    return sorted(cols)


def regularised_probs(q: torch.Tensor, k: torch.Tensor, heads: int, keep: Sequence[int],
                      inside: torch.Tensor) -> torch.Tensor:
    """Attention probabilities ``[B, heads, L, T]`` (float32) with the scores of the columns not in ``keep`` set to
    ``-inf`` on the image positions where ``inside`` ``[B, L]`` (or ``[L]``) is non-zero. The kept columns are never
    filled, so every row keeps a finite score and sums to 1."""
    b, n_q, width = q.shape
    d = width // heads
    qh = q.float().view(b, n_q, heads, d).transpose(1, 2)
    kh = k.float().view(b, k.shape[1], heads, d).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    dropped = torch.ones(k.shape[1], dtype=torch.bool, device=q.device)
    dropped[list(keep)] = False
    where = (inside.expand(b, n_q) > 0)[:, None, :, None] & dropped  # [B, 1, L, T]
    return torch.softmax(scores.masked_fill(where, float("-inf")), dim=-1)


def regularised_attention(attention: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                          keep: Sequence[int], **options) -> torch.Tensor:
    """The attention every position would give with the unrelated tokens at ``-inf``: the host's ``attention``
    over the kept tokens' keys and values only (the exact limit, in the input's own dtype)."""
    cols = torch.tensor(list(keep), device=k.device)
    return attention(q, k.index_select(1, cols), v.index_select(1, cols), heads, **options)


def blend(base: torch.Tensor, plain: torch.Tensor | None, reg: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``base + weight (reg - plain)`` per image position (``weight`` ``[B, L]``, outputs ``[B, L, C]``).

    With ``plain`` None the base is the plain attention itself and this is ``lerp(base, reg, weight)``: ``reg``
    exactly where the weight is 1. Where the weight is 0 the result is ``base`` bitwise."""
    w = weight.unsqueeze(-1)
    if plain is None:
        mixed = torch.lerp(base, reg, w.to(base.dtype))
    else:
        mixed = (base.float() + w.float() * (reg.float() - plain.float())).to(base.dtype)
    return torch.where(w > 0, mixed, base)


class RegionMask:
    """The user's region, resampled (area average) to each layer's token grid once per grid and device."""

    def __init__(self, mask: torch.Tensor, node: str = "LIME"):
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim != 3 or 0 in mask.shape:
            raise LimeError(f"{node}: the mask must be [height, width] or [batch, height, width]; got "
                            f"{list(mask.shape)}.")
        self.mask, self.node = mask.detach().float().clamp(0, 1).cpu(), node
        self._grids: dict = {}

    @property
    def empty(self) -> bool:
        return not bool((self.mask > 0).any())

    def on_grid(self, batch: int, height: int, width: int, device) -> torch.Tensor:
        """``[batch, height * width]``: one row per image (a mask of batch 1 serves every image)."""
        key = (batch, height, width, device)
        if key not in self._grids:
            if self.mask.shape[0] not in (1, batch):
                raise LimeError(f"{self.node}: the mask has a batch of {self.mask.shape[0]} but the latent batch is "
                                f"{batch}; give one mask for every image or a single mask for all.")
            self._grids[key] = masks_on_grid([self.mask], batch, height, width)[0].to(device)
        return self._grids[key]


class LimeAttention:
    """``attn2`` replacement for one cross-attention layer: inside the window, on the positive prompt's rows, the
    positions inside the region attend only the kept tokens (blended by the mask value times ``strength``). The
    output is built on the previous replacement's (another node's ``attn2`` patch), so the edits stack."""

    def __init__(self, attention: Callable, keep: Sequence[int], region: RegionMask, strength: float,
                 window: SigmaWindow, previous: Callable | None = None, node: str = "LIME"):
        self.attention, self.keep, self.region = attention, list(keep), region
        self.strength, self.window, self.previous, self.node = float(strength), window, previous, node

    def _plain(self, q, k, v, extra_options):
        return self.attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                              transformer_options=extra_options)

    def __call__(self, q, k, v, extra_options):
        base = (self.previous(q, k, v, extra_options) if self.previous is not None
                else self._plain(q, k, v, extra_options))
        if self.strength <= 0 or self.region.empty or not active(extra_options, self.window):
            return base
        rows = positive_rows(extra_options, q.shape[0])
        if not rows:
            return base
        if self.keep[-1] >= k.shape[1]:
            raise LimeError(f"{self.node}: the edit words sit at token {self.keep[-1] + 1} but the positive prompt has "
                            f"{k.shape[1]} tokens; give this node the same prompt text as the positive "
                            "CLIPTextEncode.")
        h, w = (int(n) for n in extra_options["activations_shape"][-2:])
        per = q.shape[0] // max(1, len(extra_options.get("cond_or_uncond") or [1]))
        # under Tiled Diffusion each tile's rows get the tile's part of the region
        grid, which = frame_masks(self.region.on_grid, per, h, w, q.device, rows, q.shape[0], extra_options.get(TILES))
        weight = grid[which] * self.strength  # [R, L]
        if not bool((weight > 0).any()):
            return base
        idx = torch.tensor(rows, device=q.device)
        qr, kr, vr = q[idx], k[idx], v[idx]
        reg = regularised_attention(self.attention, qr, kr, vr, extra_options["n_heads"], self.keep,
                                    attn_precision=extra_options.get("attn_precision"),
                                    transformer_options=extra_options)
        plain = None if self.previous is None else self._plain(qr, kr, vr, extra_options)
        out = base.clone()
        out[idx] = blend(base[idx], plain, reg, weight.to(base.dtype))
        return out
