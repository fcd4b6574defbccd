"""Where the image tokens sit in one DiT attention call, and perturbed attention for any such layout (pure torch).

The perturbations in :mod:`attention_perturbation` read a joint sequence as ``[text | grid | other image]``: text
first, then the latent's own token grid, then any extra image tokens (reference images). DiT families differ:

* Flux, Chroma, SD3, Qwen-Image: ``[text | image]``, reference tokens after the latent's;
* HunyuanVideo: its double blocks attend over ``[image | text]`` (``flipped_img_txt``) and, on ComfyUI 0.3.64, its
  single blocks too; reference-latent tokens come *before* the latent's own;
* Wan: self-attention over the image tokens alone, reference tokens first;
* video DiTs: the grid is ``frames x h x w`` tokens, frame-major.

:class:`TokenLayout` names the image span and the grid inside it; :func:`perturb_layout` reorders the tokens into
the canonical order, perturbs, and puts them back, so every family shares the one implementation of the maths.
Smoothed energy (SEG) on video blurs each frame's queries on its own grid (the paper's 2-D Gaussian, per frame).
Attention masks (a key mask on padded text tokens, or a full query-key mask) are honoured by the perturbed rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .attention_perturbation import Perturbation, blur_tokens, perturb_rows


@dataclass(frozen=True)
class TokenLayout:
    """``image``: the ``[start, end)`` span of image tokens in the sequence (everything else is text); ``grid``:
    the latent's token grid ``(h, w)`` per frame; ``frames``: latent frames; ``refs_first``: reference-image tokens
    precede the latent's grid tokens inside the image span (else they follow it)."""

    image: tuple[int, int]
    grid: tuple[int, int] | None = None
    frames: int = 1
    refs_first: bool = False

    def grid_tokens(self) -> int:
        return 0 if self.grid is None else self.frames * self.grid[0] * self.grid[1]

    def pieces(self, length: int) -> list[tuple[int, int]]:
        """Spans of the sequence in canonical order: text before the image, text after it, the latent's grid
        tokens, then the other image tokens. Empty spans are dropped."""
        a, b = self.image
        if not 0 <= a <= b <= length:
            raise ValueError(f"image tokens [{a}, {b}) do not lie in a sequence of {length} tokens")
        n_grid = min(self.grid_tokens(), b - a)
        grid = (b - n_grid, b) if self.refs_first else (a, a + n_grid)
        refs = (a, b - n_grid) if self.refs_first else (a + n_grid, b)
        return [p for p in ((0, a), (b, length), grid, refs) if p[1] > p[0]]

    def text_tokens(self, length: int) -> int:
        return length - (self.image[1] - self.image[0])


def _reorder(t: torch.Tensor, pieces: list[tuple[int, int]], dim: int) -> torch.Tensor:
    return torch.cat([t.narrow(dim, a, b - a) for a, b in pieces], dim=dim) if len(pieces) > 1 else t


def _restore(t: torch.Tensor, pieces: list[tuple[int, int]], dim: int) -> torch.Tensor:
    """Inverse of :func:`_reorder`."""
    if len(pieces) <= 1:
        return t
    parts, at = {}, 0
    for a, b in pieces:
        parts[a] = t.narrow(dim, at, b - a)
        at += b - a
    return torch.cat([parts[a] for a in sorted(parts)], dim=dim)


def blur_frames(q: torch.Tensor, grid: tuple[int, int], frames: int, sigma: float) -> torch.Tensor:
    """SEG's query blur on each frame of ``(B, H, frames*h*w, D)`` frame-major tokens separately."""
    b, nh, n, d = q.shape
    per = n // frames
    return blur_tokens(q.reshape(b, nh * frames, per, d), grid, sigma).reshape(b, nh, n, d)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ComfyUI's attention mask as ``(B|1, H|1, Lq|1, Lk)`` logits to add: its 2-D and 3-D forms are promoted the
    way its PyTorch attention does; boolean masks (True = attend) become 0 / -inf."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def masked_perturbed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Perturbation, n_txt: int,
                     grid: tuple[int, int] | None, frames: int, mask: torch.Tensor) -> torch.Tensor:
    """``P v`` (or SEG's blurred-query attention) in canonical order, with ``mask`` (additive, 4-D, same token
    order) added to every logit the perturbed map keeps."""
    ct = torch.promote_types(q.dtype, torch.float32)
    mask = mask.to(ct)
    if p.kind == "smoothed_energy":
        if grid is None:
            raise ValueError("smoothed-energy perturbation needs the token grid (height, width)")
        n_grid = frames * grid[0] * grid[1]
        blurred = blur_frames(q[:, :, n_txt:n_txt + n_grid], grid, frames, p.blur_sigma)
        qb = torch.cat([q[:, :, :n_txt], blurred, q[:, :, n_txt + n_grid:]], dim=2)
        return F.scaled_dot_product_attention(qb.to(ct), k.to(ct), v.to(ct), attn_mask=mask).to(v.dtype)
    if n_txt <= 0 or p.joint == "all":
        return v
    scale = q.shape[-1] ** -0.5
    rows_txt = mask[..., :n_txt, :] if mask.shape[-2] > 1 else mask
    out_t = F.scaled_dot_product_attention(q[:, :, :n_txt].to(ct), k.to(ct), v.to(ct), attn_mask=rows_txt)
    q_i, k_t, k_i = q[:, :, n_txt:].to(ct), k[:, :, :n_txt].to(ct), k[:, :, n_txt:].to(ct)
    img_rows = mask[..., n_txt:, :] if mask.shape[-2] > 1 else mask
    logits_txt = torch.einsum("bhid,bhjd->bhij", q_i, k_t) * scale + img_rows[..., :n_txt]
    if mask.shape[-2] > 1:
        self_mask = torch.diagonal(img_rows[..., n_txt:], dim1=-2, dim2=-1).unsqueeze(-1)
    else:
        self_mask = img_rows[..., 0, n_txt:].unsqueeze(-1)
    logit_self = (q_i * k_i).sum(-1, keepdim=True) * scale + self_mask
    w = torch.softmax(torch.cat([logits_txt, logit_self], dim=-1), dim=-1)
    out_i = torch.einsum("bhij,bhjd->bhid", w[..., :n_txt], v[:, :, :n_txt].to(ct)) + w[..., n_txt:] * v[:, :, n_txt:]
    return torch.cat([out_t, out_i], dim=2).to(v.dtype)


def perturb_layout(base: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: list[int],
                   p: Perturbation, layout: TokenLayout, mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`attention_perturbation.perturb_rows` for a sequence laid out as ``layout`` says (all tensors
    ``(B, H, L, D)``; ``mask`` as ComfyUI passes it to its attention, or None). Rows outside ``rows`` and heads
    with weight 0 come back bit for bit."""
    if not rows:
        return base
    length = q.shape[2]
    pieces = layout.pieces(length)
    n_txt = layout.text_tokens(length)
    frames, grid = layout.frames, layout.grid
    qr, kr, vr, br = (_reorder(t, pieces, 2) for t in (q, k, v, base))
    if mask is not None:
        m = additive_mask(mask, torch.promote_types(q.dtype, torch.float32))
        m = _reorder(m, pieces, -1)
        if m.shape[-2] > 1:
            m = _reorder(m, pieces, -2)
        idx = torch.as_tensor(rows, device=q.device, dtype=torch.long)
        m_rows = m[idx] if m.shape[0] > 1 else m
        pert = torch.zeros_like(vr)
        pert[idx] = masked_perturbed(qr[idx], kr[idx], vr[idx], p, n_txt, grid, frames, m_rows)
        # perturb_rows with the identity over "all" tokens returns ``v`` as the perturbed output: handing it the
        # masked result as ``v`` reuses its per-head SoftPAG mixing unchanged
        out = perturb_rows(br, qr, kr, pert, rows, replace(p, kind="identity", joint="all"))
    elif p.kind == "smoothed_energy" and grid is not None and frames > 1:
        # blur each frame here, then let the shared code attend with the blurred queries (sigma 0 blurs nothing;
        # the grid it is handed only has to hold the frames' tokens)
        n_grid = layout.grid_tokens()
        idx = torch.as_tensor(rows, device=q.device, dtype=torch.long)
        qb = qr.clone()
        qb[idx, :, n_txt:n_txt + n_grid] = blur_frames(qr[idx, :, n_txt:n_txt + n_grid], grid, frames, p.blur_sigma)
        out = perturb_rows(br, qb, kr, vr, rows, replace(p, blur_sigma=0.0), n_txt=n_txt,
                           grid=(frames * grid[0], grid[1]))
    else:
        out = perturb_rows(br, qr, kr, vr, rows, p, n_txt=n_txt, grid=grid)
    return _restore(out, pieces, 2)
