"""Perturbed self-attention for guidance (pure torch).

The perturbations that turn a denoiser into the "weak model" of attention-perturbation guidance:

* identity attention, PAG (Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention
  Guidance", arXiv:2403.17377): the self-attention map ``A`` is replaced by the identity, so every token
  outputs its own value (eq. 9 of the paper);
* SoftPAG and head selection (Lee et al., "Fine-Grained Perturbation Guidance via Attention Head
  Selection", arXiv:2506.10978): ``A' = (1 - u) A + u I`` applied only to chosen heads (their eq. 6-7);
* smoothed energy, SEG (Hong, "Smoothed Energy Guidance", arXiv:2408.00760): the queries are blurred with
  a 2-D Gaussian over the token grid, which smooths the attention energy landscape (their eq. 10); an
  infinite sigma replaces every query by the mean query (uniform attention).

Because ``A'`` is linear in ``A``, ``A' v = (1 - u) (A v) + u (P v)`` where ``P`` is the perturbed map, so
SoftPAG never materialises an attention matrix: it interpolates the ordinary attention output with the
perturbed output per head.

Joint (MMDiT / Flux) attention: the sequence is ``[text tokens | image tokens]``. The "image" joint mode
perturbs only the image-to-image block of the map: an image query attends to every text key and to its
own image key only (the image-to-image sub-map becomes the identity, renormalised together with the
image-to-text part); text queries keep their attention. This is the map of diffusers' SD3 PAG processor
(``PAGJointAttnProcessor2_0`` masks the image-by-image block to -inf except its diagonal). The "all" mode
is the plain identity on the whole joint sequence (every token, text included, outputs its own value): a
stronger perturbation of our own, with no reference implementation.

All tensors here are ``(batch, heads, tokens, head_dim)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

PerturbationKind = Literal["identity", "smoothed_energy"]
JointMode = Literal["image", "all"]

# SEG's convention: a blur sigma at or above this value means "infinite" (every query becomes the mean).
INFINITE_BLUR_SIGMA = 9999.0


@dataclass(frozen=True)
class Perturbation:
    """What to do to one selected attention layer.

    ``strength`` is SoftPAG's ``u`` (1 = full perturbation); ``heads`` restricts it to those head indices
    (``None`` = every head).
    """

    kind: PerturbationKind = "identity"
    strength: float = 1.0
    heads: tuple[int, ...] | None = None
    joint: JointMode = "image"
    blur_sigma: float = INFINITE_BLUR_SIGMA

    def head_weights(self, n_heads: int, device, dtype) -> torch.Tensor:
        """Per-head interpolation weight, shaped to broadcast over ``(B, H, L, D)``."""
        w = torch.zeros(n_heads, device=device, dtype=dtype)
        if self.heads is None:
            w.fill_(self.strength)
        else:
            bad = [h for h in self.heads if not 0 <= h < n_heads]
            if bad:
                raise ValueError(f"attention head(s) {bad} do not exist: this layer has heads 0-{n_heads - 1}")
            w[list(self.heads)] = self.strength
        return w.view(1, n_heads, 1, 1)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, L, H*D) -> (B, H, L, D)``."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, D) -> (B, L, H*D)``."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain scaled dot-product attention, computed in at least float32 for stable softmax."""
    dtype = q.dtype
    ct = torch.promote_types(dtype, torch.float32)
    return F.scaled_dot_product_attention(q.to(ct), k.to(ct), v.to(ct)).to(dtype)


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The explicit softmax map ``A`` (float32), ``(B, H, Lq, Lk)``; for references and SAG."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax(torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * scale, dim=-1)


def identity_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_txt: int = 0,
                    joint: JointMode = "image") -> torch.Tensor:
    """``P v`` for the identity perturbation ``P``.

    Self-attention (``n_txt == 0``) or ``joint == "all"``: ``P = I``, the output is ``v``. Joint attention
    with ``joint == "image"``: text rows are untouched, image row ``i`` attends to the text keys and to
    image key ``i`` only. Computed without the image-by-image map: one text-key softmax plus the diagonal.
    """
    if n_txt <= 0 or joint == "all":
        return v
    scale = q.shape[-1] ** -0.5
    ct = torch.promote_types(q.dtype, torch.float32)
    q_t, q_i = q[:, :, :n_txt], q[:, :, n_txt:]
    k_t, k_i = k[:, :, :n_txt], k[:, :, n_txt:]
    v_t, v_i = v[:, :, :n_txt], v[:, :, n_txt:]
    out_t = attention(q_t, k, v)
    logits_txt = torch.einsum("bhid,bhjd->bhij", q_i.to(ct), k_t.to(ct)) * scale
    logit_self = (q_i.to(ct) * k_i.to(ct)).sum(-1, keepdim=True) * scale
    w = torch.softmax(torch.cat([logits_txt, logit_self], dim=-1), dim=-1)
    out_i = torch.einsum("bhij,bhjd->bhid", w[..., :n_txt], v_t.to(ct)) + w[..., n_txt:] * v_i.to(ct)
    return torch.cat([out_t, out_i.to(v.dtype)], dim=2)


def _gaussian_kernel1d(sigma: float, size: int, device, dtype) -> torch.Tensor:
    half = size // 2
    x = torch.arange(-half, half + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def seg_kernel_size(sigma: float) -> int:
    """SEG's kernel size for ``sigma``: the odd size just above 6 sigma, ``ceil(6 sigma)`` when that is odd,
    else one more (the rule of the official SEG-SDXL code)."""
    c = math.ceil(6 * sigma)
    return c + 1 - c % 2


def kernel_size_on_axis(sigma: float, length: int) -> int:
    """The kernel size used along an axis of ``length`` tokens: SEG's size, cut to the largest odd size that
    is at most ``length + 1`` (the official code's cut on its square grid, applied here per axis so non-square
    grids work too). Its half-width is then below ``length``, so reflect padding always exists."""
    return min(seg_kernel_size(sigma), length + 1 - length % 2)


def blur_tokens(x: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """Gaussian blur of ``(B, H, N, D)`` token features laid out row-major on ``grid = (h, w)``, ``N = h*w``.

    As the official SEG code blurs the query map: a separable Gaussian whose size follows
    :func:`kernel_size_on_axis`, normalised after truncation, reflect-padded; any grid size works, including
    odd and non-square ones. ``sigma >= INFINITE_BLUR_SIGMA`` gives the token mean (the official code switches
    to the mean strictly above 9999; here 9999 itself, the widget's maximum, already means infinite).
    """
    b, nh, n, d = x.shape
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"cannot lay {n} tokens on a {gh}x{gw} grid")
    if sigma >= INFINITE_BLUR_SIGMA:
        return x.mean(dim=2, keepdim=True).expand_as(x)
    if sigma <= 0:
        return x
    ct = torch.promote_types(x.dtype, torch.float32)
    img = x.to(ct).permute(0, 1, 3, 2).reshape(b * nh * d, 1, gh, gw)
    for axis, length in ((2, gh), (3, gw)):
        ks = kernel_size_on_axis(sigma, length)
        if ks < 3:
            continue
        kern = _gaussian_kernel1d(sigma, ks, x.device, ct)
        pad = ks // 2
        if axis == 2:
            img = F.conv2d(F.pad(img, (0, 0, pad, pad), mode="reflect"), kern.view(1, 1, ks, 1))
        else:
            img = F.conv2d(F.pad(img, (pad, pad, 0, 0), mode="reflect"), kern.view(1, 1, 1, ks))
    return img.reshape(b, nh, d, n).permute(0, 1, 3, 2).to(x.dtype)


def smoothed_energy_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int],
                           sigma: float, n_txt: int = 0) -> torch.Tensor:
    """Attention with the image queries blurred on their grid (SEG eq. 10); text queries unchanged.

    Image tokens beyond ``grid`` (e.g. reference-image tokens appended after the latent's) are left as
    they are.
    """
    n_grid = grid[0] * grid[1]
    q_img = q[:, :, n_txt:n_txt + n_grid]
    if q_img.shape[2] != n_grid:
        raise ValueError(f"expected at least {n_grid} image tokens for a {grid[0]}x{grid[1]} grid, "
                         f"got {q_img.shape[2]}")
    q_blur = torch.cat([q[:, :, :n_txt], blur_tokens(q_img, grid, sigma), q[:, :, n_txt + n_grid:]], dim=2)
    return attention(q_blur, k, v)


def perturbed_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Perturbation, *,
                     n_txt: int = 0, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """``P v`` (or SEG's blurred-query attention) for every head; no interpolation yet."""
    if p.kind == "identity":
        return identity_output(q, k, v, n_txt=n_txt, joint=p.joint)
    if p.kind == "smoothed_energy":
        if grid is None:
            raise ValueError("smoothed-energy perturbation needs the token grid (height, width)")
        return smoothed_energy_output(q, k, v, grid, p.blur_sigma, n_txt=n_txt)
    raise ValueError(f"unknown perturbation kind {p.kind!r}: expected 'identity' or 'smoothed_energy'")


def perturb_rows(base: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 rows: torch.Tensor | list[int], p: Perturbation, *, n_txt: int = 0,
                 grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Replace batch ``rows`` of the attention output ``base`` (all ``(B, H, L, D)``) by their perturbed
    version, interpolated per head with SoftPAG's weight: ``out = base + w_h (P v - base)``.

    Rows outside ``rows`` and heads with weight 0 are returned bit-for-bit unchanged.
    """
    if len(rows) == 0:
        return base
    idx = torch.as_tensor(rows, device=base.device, dtype=torch.long)
    pert = perturbed_output(q[idx], k[idx], v[idx], p, n_txt=n_txt, grid=grid)
    w = p.head_weights(base.shape[1], base.device, torch.float32)
    sel = base[idx]
    if p.heads is None and p.strength == 1.0:
        mixed = pert.to(base.dtype)
    else:
        keep = (w == 0).expand_as(sel)
        mixed = (sel.float() + w * (pert.float() - sel.float())).to(base.dtype)
        mixed = torch.where(keep, sel, mixed)
    out = base.clone()
    out[idx] = mixed
    return out
