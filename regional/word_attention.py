"""Cross-attention of chosen prompt words on a UNet (pure torch): where the words are in the prompt, what each
image position gives them, and two uses of it.

- Word positions: a prompt's tokens (as its CLIP tokenizer lays them out, chunk after chunk of 77) and each chosen
  word's own tokens; every occurrence of the word's token sequence is one match.
- Attention probabilities of a cross-attention layer, ``softmax(q k^T / sqrt(d))`` per head, averaged over heads:
  ``[B, L, T]`` for the image positions ``L`` of the layer's grid and the text tokens ``T``.
- Masks from words (Zou et al., "Towards Efficient Diffusion-Based Image Editing with Instant Attention Masks",
  arXiv:2401.07709, InstDiffEdit): the words' maps on the 1/4-resolution layers (16 x 16 for a 512 px SD1.5
  image), refined by token similarity, blurred and thresholded (paper: 0.2).
- Directed Diffusion (Ma et al., "Directed Diffusion: Direct Control of Object Placement through Attention
  Guidance", arXiv:2302.13153): during the first steps the chosen tokens' attention is strengthened inside a box by
  a Gaussian bump and damped outside it, on the positive prompt's rows only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..caching.store import TILES
from ..utils.sigma_window import SigmaWindow
from .attention import frame_masks, masks_on_grid
from .runtime import active, positive_rows


class WordError(ValueError):
    """Words, prompts or boxes that cannot be used; the message says what is wrong and how to fix it."""


# -- words and their token positions ----------------------------------------------------------------------------
def parse_words(text: str) -> list[str]:
    """Comma-separated words or phrases, stripped and lower-cased, in order, without repeats."""
    words = []
    for w in (text or "").split(","):
        w = " ".join(w.split()).lower()
        if w and w not in words:
            words.append(w)
    if not words:
        raise WordError("no words given; write the prompt words to use, separated by commas (e.g. \"cat, red hat\").")
    return words


def find_positions(prompt_ids: Sequence[int | None], word_ids: Sequence[int], word: str) -> list[int]:
    """Positions of every occurrence of ``word_ids`` (the word's own tokens) in ``prompt_ids`` (the prompt's tokens
    over its whole context, None where a position holds no word: start, end, padding, embeddings)."""
    n = len(word_ids)
    if n == 0:
        raise WordError(f"\"{word}\" makes no text tokens; choose a word of the prompt.")
    out: list[int] = []
    for i in range(len(prompt_ids) - n + 1):
        if all(prompt_ids[i + j] is not None and prompt_ids[i + j] == word_ids[j] for j in range(n)):
            out.extend(range(i, i + n))
    if not out:
        raise WordError(f"\"{word}\" is not in the prompt (its tokens never appear there); use a word exactly as "
                        "the prompt spells it (case does not matter), or fix the prompt.")
    return out


def trailing_positions(prompt_ids: Sequence[int | None], count: int) -> list[int]:
    """The ``count`` positions after the prompt's last word: its end token and the padding that follows, within
    that 77-token chunk (Directed Diffusion edits these "trailing" maps too)."""
    if count <= 0:
        return []
    last = max((i for i, t in enumerate(prompt_ids) if t is not None), default=0)
    chunk_end = (last // 77 + 1) * 77
    return list(range(last + 1, min(last + 1 + count, chunk_end, len(prompt_ids))))


# -- attention probabilities -------------------------------------------------------------------------------------
def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d))`` per head: q ``[B, L, heads*d]``, k ``[B, T, heads*d]`` -> ``[B, heads, L, T]``,
    computed in float32."""
    b, n_q, width = q.shape
    d = width // heads
    qh = q.float().view(b, n_q, heads, d).transpose(1, 2)
    kh = k.float().view(b, k.shape[1], heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)


def mean_attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention probabilities averaged over heads: ``[B, L, T]``."""
    return attention_probs(q, k, heads).mean(dim=1)


# -- masks from words (InstDiffEdit) -----------------------------------------------------------------------------
def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation of each map over its last two dims to ``[0, 1]``; a constant map becomes 0."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (maps - lo) / span.clamp_min(1e-12), torch.zeros_like(maps))


def word_map(maps: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """The chosen words' map from per-token maps ``[B, T, h, w]`` (each normalised): a word of several tokens is
    the mean of its tokens' maps; several words are their union (per-position maximum)."""
    per_word = [normalise(maps[:, list(g)]).mean(dim=1) for g in groups]
    return torch.stack(per_word).amax(dim=0)


def refine_by_similarity(maps: torch.Tensor, target: torch.Tensor, prompt_tokens: Sequence[int],
                         chosen: Sequence[int], start_token: int | None = 0) -> torch.Tensor:
    """The instant-attention-mask refinement, as we read the paper: the words' map is averaged with the maps of the
    prompt tokens that look like it, and weighted by the start token's inverted map.

    Each prompt token's normalised map gets the weight of its cosine similarity with ``target`` if that similarity
    is above the prompt's mean (tokens attending the same object: attributes, the parts of a split word), 0 otherwise;
    the chosen tokens always count fully. The start token gathers the attention no prompt word claims, so
    ``1 - map(start)`` is high on the named content and damps the background. ``maps`` ``[B, T, h, w]``, target
    ``[B, h, w]``; returns ``[B, h, w]`` in ``[0, 1]``."""
    tokens = sorted(set(prompt_tokens) | set(chosen))
    norm = normalise(maps[:, tokens])  # [B, n, h, w]
    flat = norm.flatten(2)
    sim = F.cosine_similarity(flat, target.flatten(1).unsqueeze(1), dim=-1)  # [B, n]
    weight = torch.where(sim >= sim.mean(dim=1, keepdim=True), sim.clamp_min(0), torch.zeros_like(sim))
    is_chosen = torch.tensor([t in set(chosen) for t in tokens], device=maps.device)
    weight = torch.where(is_chosen, torch.ones_like(weight), weight)
    refined = (weight[:, :, None, None] * norm).sum(dim=1) / weight.sum(dim=1)[:, None, None]
    if start_token is not None:
        refined = refined * (1.0 - normalise(maps[:, start_token]))
    return normalise(refined)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, H, W]`` maps, reflecting at the borders; ``sigma`` in pixels, 0 = none."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    y = x.unsqueeze(1)
    for dim in (-1, -2):
        pad = min(radius, y.shape[dim] - 1)
        k = kernel[radius - pad:radius + pad + 1]
        k = k / k.sum()  # a map narrower than the kernel: reflection allows only its middle, renormalised
        if pad > 0:
            y = F.pad(y, (pad, pad, 0, 0) if dim == -1 else (0, 0, pad, pad), mode="reflect")
        y = F.conv2d(y, k.view(1, 1, 1, -1) if dim == -1 else k.view(1, 1, -1, 1))
    return y.squeeze(1)


def mask_from_map(soft: torch.Tensor, height: int, width: int, blur: float, threshold: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsample a ``[B, h, w]`` map to ``height x width`` (bilinear), blur, re-normalise to ``[0, 1]`` and threshold:
    (binary mask, the blurred map). A pixel is in the mask where the map is at least ``threshold``."""
    up = F.interpolate(soft.unsqueeze(1).float(), size=(height, width), mode="bilinear", align_corners=False)
    smooth = normalise(gaussian_blur(up.squeeze(1), blur))
    return (smooth >= threshold).float(), smooth


class AttentionRecorder:
    """``attn2`` replacement that leaves the layer's output alone and sums the heads-averaged attention
    probabilities of the positive rows on the layers whose grid is the latent's divided by ``factor`` (all layers
    when ``factor`` is None, resampled to the latent/4 grid). One recorder serves every layer of one pass."""

    def __init__(self, attention: Callable, factor: int | None = 4):
        self.attention, self.factor = attention, factor
        self.total: torch.Tensor | None = None
        self.count = 0
        self.grid: tuple[int, int] | None = None

    def layer(self, previous=None) -> Callable:
        def replace(q, k, v, extra_options):
            if previous is not None:
                out = previous(q, k, v, extra_options)
            else:
                out = self.attention(q, k, v, extra_options["n_heads"],
                                     attn_precision=extra_options.get("attn_precision"),
                                     transformer_options=extra_options)
            self.record(q, k, extra_options)
            return out
        return replace

    def record(self, q, k, extra_options) -> None:
        h, w = (int(n) for n in extra_options["activations_shape"][-2:])
        big_h, big_w = (int(n) for n in extra_options["original_shape"][-2:])
        target = (-(-big_h // 4), -(-big_w // 4))
        if self.factor is not None and (h, w) != (-(-big_h // self.factor), -(-big_w // self.factor)):
            return
        rows = positive_rows(extra_options, q.shape[0])
        if not rows:
            return
        idx = torch.tensor(rows, device=q.device)
        probs = mean_attention_probs(q[idx], k[idx], extra_options["n_heads"])  # [R, L, T]
        maps = probs.transpose(1, 2).reshape(len(rows), -1, h, w)
        if (h, w) != target:
            maps = (F.adaptive_avg_pool2d(maps, target) if h >= target[0] and w >= target[1]
                    else F.interpolate(maps, size=target, mode="bilinear", align_corners=False))
        maps = maps.cpu()
        if self.total is None or self.total.shape != maps.shape:
            if self.total is not None:
                raise WordError("the attention maps changed shape within one pass; give every image the same prompt "
                                "length.")
            self.total = torch.zeros_like(maps)
        self.total += maps
        self.count += 1
        self.grid = target

    def maps(self) -> torch.Tensor:
        """Mean recorded maps ``[B, T, h, w]``."""
        if self.total is None or self.count == 0:
            raise WordError("no cross-attention layer of the 1/4-resolution grid ran; this UNet has no such level.")
        return self.total / self.count


# -- Directed Diffusion --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """A box as fractions of the frame: left, top, width, height."""

    x: float
    y: float
    width: float
    height: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.x < 1.0 and 0.0 <= self.y < 1.0 and self.width > 0 and self.height > 0):
            raise WordError(f"the box (x {self.x}, y {self.y}, width {self.width}, height {self.height}) is empty or "
                            "outside the frame; give x, y in [0, 1) and a positive width and height.")

    @property
    def x1(self) -> float:
        return min(1.0, self.x + self.width)

    @property
    def y1(self) -> float:
        return min(1.0, self.y + self.height)


def _coverage(lo: float, hi: float, n: int) -> torch.Tensor:
    """Fraction of each of ``n`` equal cells of [0, 1] that [lo, hi] covers."""
    edges = torch.arange(n + 1, dtype=torch.float64) / n
    return ((torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo))) * n
            ).clamp(0, 1).float()


def box_on_grid(box: Box, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside, bump) ``[height * width]`` on a token grid: the box's exact area coverage of each cell, and the
    Gaussian bump centred in the box (standard deviation a quarter of the box's side on each axis, peak 1) inside
    it, 0 outside."""
    inside = _coverage(box.y, box.y1, height)[:, None] * _coverage(box.x, box.x1, width)[None, :]
    ys = (torch.arange(height) + 0.5) / height
    xs = (torch.arange(width) + 0.5) / width
    cy, cx = (box.y + box.y1) / 2, (box.x + box.x1) / 2
    sy, sx = max(box.y1 - box.y, 1e-6) / 4, max(box.x1 - box.x, 1e-6) / 4
    bump = torch.exp(-0.5 * (((ys - cy) / sy) ** 2)[:, None] - 0.5 * (((xs - cx) / sx) ** 2)[None, :])
    return inside.flatten(), (bump * inside).flatten()


def box_of_mask(mask: torch.Tensor) -> Box:
    """The bounding box of a ``[H, W]`` mask's non-zero pixels, as fractions of the frame."""
    nz = torch.nonzero(mask > 0)
    if nz.numel() == 0:
        raise WordError("the mask is empty (all zero), so there is no place to direct the words to; paint the area.")
    h, w = mask.shape[-2:]
    (y0, x0), (y1, x1) = nz.min(dim=0).values.tolist(), nz.max(dim=0).values.tolist()
    return Box(x0 / w, y0 / h, (x1 + 1 - x0) / w, (y1 + 1 - y0) / h)


def directed_probs(probs: torch.Tensor, columns: Sequence[int], inside: torch.Tensor, bump: torch.Tensor,
                   strength: float) -> torch.Tensor:
    """Directed Diffusion's edit of attention probabilities ``[..., L, T]`` on the chosen token columns:

        A'_j(p) = A_j(p) (c(p) + (1 - c(p)) max(0, 1 - s)) + s g(p) max_p' A_j(p')

    with ``c`` the box coverage and ``g`` the bump (``[..., L]`` or ``[L]``), ``s`` the strength: inside the box
    each token's map gains a bump as tall as its own peak times ``s``, outside it is damped by ``1 - s`` (gone at
    ``s >= 1``). Other columns are untouched; rows are not renormalised (as in the paper, the edited maps weigh the
    values directly)."""
    cols = list(columns)
    out = probs.clone()
    a = probs[..., cols]  # [..., L, J]
    peak = a.amax(dim=-2, keepdim=True)
    keep = inside + (1.0 - inside) * max(0.0, 1.0 - strength)
    out[..., cols] = a * keep.unsqueeze(-1) + strength * bump.unsqueeze(-1) * peak
    return out


class DirectedAttention:
    """``attn2`` replacement for one cross-attention layer: inside the window, on the positive rows, adds
    ``(A' - A) V`` over the chosen token columns to the layer's output (``A'`` from :func:`directed_probs`). The
    output is the previous replacement's (another node's ``attn2`` patch, e.g. regional prompting) or plain
    attention, so this edit stacks on top of it."""

    def __init__(self, attention: Callable, columns: Sequence[int], place: Callable, strength: float,
                 window: SigmaWindow, previous=None, node: str = "Directed Diffusion"):
        self.attention, self.columns, self.place = attention, list(columns), place
        self.strength, self.window, self.previous, self.node = strength, window, previous, node

    def __call__(self, q, k, v, extra_options):
        if self.previous is not None:
            base = self.previous(q, k, v, extra_options)
        else:
            base = self.attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                                  transformer_options=extra_options)
        if self.strength == 0 or not active(extra_options, self.window):
            return base
        rows = positive_rows(extra_options, q.shape[0])
        if not rows:
            return base
        if max(self.columns) >= k.shape[1]:
            raise WordError(f"{self.node}: the words sit at token {max(self.columns) + 1} but the positive prompt has "
                            f"{k.shape[1]} tokens; give this node the same prompt text as the positive "
                            "CLIPTextEncode.")
        heads = extra_options["n_heads"]
        h, w = (int(n) for n in extra_options["activations_shape"][-2:])
        idx = torch.tensor(rows, device=q.device)
        probs = attention_probs(q[idx], k[idx], heads)  # [R, H, L, T]
        # one placement for every image ([2, 1, L]: coverage, bump); under Tiled Diffusion each tile's rows get
        # the tile's part of it
        grids, which = frame_masks(lambda _per, gh, gw, device: torch.stack(self.place(gh, gw, device)).unsqueeze(1),
                                   1, h, w, q.device, rows, q.shape[0], extra_options.get(TILES))
        inside, bump = (part[which].unsqueeze(1) for part in grids)  # [R, 1, L] each
        edited = directed_probs(probs, self.columns, inside, bump, self.strength)
        cols = torch.tensor(self.columns, device=q.device)
        delta_p = (edited[..., cols] - probs[..., cols])  # [R, H, L, J]
        r, n_l, d = len(rows), q.shape[1], q.shape[2] // heads
        vj = v[idx][:, cols].float().view(r, len(self.columns), heads, d).transpose(1, 2)  # [R, H, J, d]
        delta = (delta_p @ vj).transpose(1, 2).reshape(r, n_l, heads * d)
        out = base.clone()
        out[idx] = (base[idx].float() + delta).to(base.dtype)
        return out


class Placement:
    """Where Directed Diffusion pushes the words: a box, or a mask (its coverage, and a bump over its bounding box),
    on each layer's grid; made once per grid and device."""

    def __init__(self, box: Box | None = None, mask: torch.Tensor | None = None):
        if (box is None) == (mask is None):
            raise WordError("give either a box or a mask")
        self.box, self.mask = box, mask
        self._grids: dict = {}

    def __call__(self, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (height, width, device)
        if key not in self._grids:
            if self.mask is None:
                inside, bump = box_on_grid(self.box, height, width)
            else:
                m = self.mask if self.mask.ndim == 3 else self.mask.unsqueeze(0)
                inside = masks_on_grid([m[:1].float().clamp(0, 1)], 1, height, width)[0, 0]
                _, bump = box_on_grid(box_of_mask(m[0]), height, width)
                bump = bump * (inside > 0)
            self._grids[key] = (inside.to(device), bump.to(device))
        return self._grids[key]
