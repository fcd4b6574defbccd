"""Frequency-band guidance for multi-resolution upscaling (pure torch): a single-level 2-D wavelet transform for
DiffuseHigh's structure guidance, and FAM's Fourier-domain frequency modulation.

- DiffuseHigh: Kim et al., "DiffuseHigh: Training-free Progressive High-Resolution Image Synthesis through
  Structure Guidance", arXiv:2406.18459. During the first steps of the high-resolution pass the low band (LL) of
  the x0 prediction's level-1 DWT is replaced by the guide's (db4, 'symmetric' boundary in the official code).
- FAM: Yang et al., "FAM Diffusion: Frequency and Attention Modulation for High-Resolution Image Generation with
  Stable Diffusion", arXiv:2411.18552. Eq. 4: f_t = IDFT(K(t) * DFT(z_t) + (1 - K(t)) * DFT(z~_t)), with the
  high-pass K of Eqs. 8-11 (appendix B.1): rho = t/T, cut-offs tau_h = h c (1 - rho), tau_w = w c (1 - rho),
  K = rho inside the centred box |ky| < tau_h / 2, |kx| < tau_w / 2 and 1 outside.

Wavelet transform, as PyWavelets' ``dwt2(x, wavelet, mode='symmetric')`` / ``idwt2``: the signal is extended by
half-sample symmetry (x[-1] = x[0], x[N] = x[N-1], repeated as often as the filter needs, so any size works),
filtered and decimated; a length-N axis gives floor((N + F - 1) / 2) coefficients for a filter of F taps. The
transform is redundant at the borders (more coefficients than samples for F > 2), and reconstruction is exact.
Odd sizes: the inverse of floor((N + F - 1) / 2) coefficients has N + 1 samples when N is odd; the last one is
dropped (the bands carry the size they came from), which is what PyWavelets' multilevel ``waverec`` does too.
Because of the border redundancy, a band set that did not come from one image (the guide's LL with another
image's detail bands) is not exactly a transform of anything: re-analysing the result returns the guide's LL
exactly away from the borders (from F / 2 coefficients in) and everywhere for Haar.

Fourier modulation works on two tensors of one size; the upsampled native latent is resized in the spatial domain
before it gets here. An amplitude issue would arise only if a small latent's spectrum were zero-padded to the
large size: with norm="ortho" the padded spectrum inverts to values scaled by sqrt(h w / (H W)) (1/s for an
upscale by s), so a constant image would lose brightness. Same-size transforms with a matching forward / inverse
pair leave every value where it was, whatever the norm; :func:`frequency_modulate` keeps a constant a constant.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Daubechies scaling filters (reconstruction low-pass, sum sqrt(2)), as PyWavelets lists them.
_SCALING = {
    "haar": (0.7071067811865476, 0.7071067811865476),
    "db4": (0.2303778133088965, 0.7148465705529157, 0.6308807679298589, -0.027983769416859854,
            -0.18703481171909309, 0.030841381835560764, 0.0328830116668852, -0.010597401785069032),
}
WAVELETS = tuple(_SCALING)


class Filters(NamedTuple):
    dec_lo: tuple[float, ...]
    dec_hi: tuple[float, ...]
    rec_lo: tuple[float, ...]
    rec_hi: tuple[float, ...]


def filters(wavelet: str) -> Filters:
    """The four filters of an orthogonal wavelet from its scaling filter h: rec_lo = h, rec_hi[k] =
    (-1)^k h[F-1-k] (the quadrature mirror), and the decomposition filters are their reverses."""
    if wavelet not in _SCALING:
        raise ValueError(f"unknown wavelet {wavelet!r}; use one of {', '.join(WAVELETS)}")
    h = _SCALING[wavelet]
    n = len(h)
    rec_hi = tuple((-1) ** k * h[n - 1 - k] for k in range(n))
    return Filters(dec_lo=h[::-1], dec_hi=rec_hi[::-1], rec_lo=h, rec_hi=rec_hi)


class Bands(NamedTuple):
    """A level-1 2-D DWT: ``ll`` (low along both axes), ``lh`` (high along the width), ``hl`` (high along the
    height), ``hh``; ``size`` is the (H, W) they came from, which the inverse needs for odd sizes."""
    ll: torch.Tensor
    lh: torch.Tensor
    hl: torch.Tensor
    hh: torch.Tensor
    size: tuple[int, int]


def _symmetric_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices of a length-n axis extended by ``pad`` samples each side with half-sample symmetry, folding as
    many times as needed (a pad longer than the signal reflects again, as PyWavelets does)."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _analyse(x: torch.Tensor, f: Filters) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high coefficients along the last axis: c[k] = sum_j dec[j] x[2k + 1 - j] on the extended signal."""
    n, taps = x.shape[-1], len(f.dec_lo)
    xp = x.index_select(-1, _symmetric_index(n, taps - 1, x.device))[..., 1:]
    lead = xp.shape[:-1]
    # conv1d correlates, so the filters go in reversed; both bands in one call
    weight = torch.tensor([f.dec_lo[::-1], f.dec_hi[::-1]], dtype=x.dtype, device=x.device).unsqueeze(1)
    out = F.conv1d(xp.reshape(-1, 1, xp.shape[-1]), weight, stride=2)
    count = (n + taps - 1) // 2
    out = out[..., :count].reshape(*lead, 2, count)
    return out[..., 0, :], out[..., 1, :]


def _synthesise(lo: torch.Tensor, hi: torch.Tensor, n: int, f: Filters) -> torch.Tensor:
    """Inverse of :func:`_analyse` for a length-n axis: full convolution of the up-sampled coefficients with the
    reconstruction filters, keeping samples F-2 .. F-2+n-1 (PyWavelets' 'valid' part, cut to n when n is odd)."""
    taps, count = len(f.rec_lo), lo.shape[-1]
    lead = lo.shape[:-1]
    weight = torch.tensor([f.rec_lo, f.rec_hi], dtype=lo.dtype, device=lo.device).unsqueeze(1)
    both = torch.stack([lo, hi], dim=-2).reshape(-1, 2, count)
    full = F.conv_transpose1d(both, weight, stride=2)  # sum over the two bands: y[m] = sum_k c[k] g[m - 2k]
    return full[..., taps - 2: taps - 2 + n].reshape(*lead, n)


def _working(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def dwt2(x: torch.Tensor, wavelet: str = "db4") -> Bands:
    """Level-1 2-D DWT of ``[..., H, W]`` (any H, W >= 1), 'symmetric' boundary; float32 unless given float64."""
    f = filters(wavelet)
    x = _working(x)
    lo_w, hi_w = _analyse(x, f)  # along W
    ll, hl = (b.transpose(-1, -2) for b in _analyse(lo_w.transpose(-1, -2), f))  # along H
    lh, hh = (b.transpose(-1, -2) for b in _analyse(hi_w.transpose(-1, -2), f))
    return Bands(ll, lh, hl, hh, (x.shape[-2], x.shape[-1]))


def idwt2(bands: Bands, wavelet: str = "db4") -> torch.Tensor:
    """Inverse of :func:`dwt2`: ``idwt2(dwt2(x)) == x`` to float rounding, any size."""
    f = filters(wavelet)
    h, w = bands.size
    lo_w = _synthesise(bands.ll.transpose(-1, -2), bands.hl.transpose(-1, -2), h, f).transpose(-1, -2)
    hi_w = _synthesise(bands.lh.transpose(-1, -2), bands.hh.transpose(-1, -2), h, f).transpose(-1, -2)
    return _synthesise(lo_w, hi_w, w, f)


def replace_low_band(x0: torch.Tensor, guide_ll: torch.Tensor, wavelet: str = "db4") -> torch.Tensor:
    """DiffuseHigh's structure guidance: the image whose level-1 DWT has the guide's low band ``guide_ll`` (from
    ``dwt2(guide).ll`` of a guide the size of ``x0``) and ``x0``'s three detail bands; ``x0``'s dtype."""
    bands = dwt2(x0, wavelet)
    if guide_ll.shape[-2:] != bands.ll.shape[-2:]:
        raise ValueError(f"the guide's low band is {tuple(guide_ll.shape[-2:])}, the prediction's "
                         f"{tuple(bands.ll.shape[-2:])}: the guide must have the prediction's size")
    out = idwt2(bands._replace(ll=guide_ll.to(bands.ll)), wavelet)
    return out.to(x0.dtype)


def fam_cutoffs(height: int, width: int, rho: float, c: float = 0.5) -> tuple[float, float]:
    """FAM's cut-off frequencies (Eqs. 9-10): tau_h = h c (1 - rho), tau_w = w c (1 - rho), rho = t / T."""
    return height * c * (1.0 - rho), width * c * (1.0 - rho)


def fam_filter(height: int, width: int, rho: torch.Tensor | float, c: float = 0.5) -> torch.Tensor:
    """FAM's high-pass K(t) (Eq. 11) on the ``rfft2`` grid of an ``height x width`` image: rho inside the centred
    box |ky| < tau_h / 2, |kx| < tau_w / 2 (integer frequencies), 1 elsewhere. ``rho`` may hold one value per
    batch row; the result is ``[rows, 1, height, width // 2 + 1]``. At rho = 1 (t = T) the box is empty and K
    passes everything; the strict inequality keeps even the DC term out until then."""
    rho = torch.as_tensor(rho, dtype=torch.float64).reshape(-1, 1, 1, 1)
    ky = (torch.fft.fftfreq(height, dtype=torch.float64) * height).abs().view(1, 1, -1, 1)
    kx = (torch.fft.rfftfreq(width, dtype=torch.float64) * width).abs().view(1, 1, 1, -1)
    tau_h, tau_w = height * c * (1.0 - rho), width * c * (1.0 - rho)
    inside = (ky < tau_h / 2) & (kx < tau_w / 2)
    return torch.where(inside, rho, torch.ones_like(rho))


def frequency_modulate(z: torch.Tensor, z_up: torch.Tensor, rho: torch.Tensor | float, c: float = 0.5) -> torch.Tensor:
    """FAM's Eq. 4: IDFT(K(t) DFT(z) + (1 - K(t)) DFT(z_up)) for ``[B, C, H, W]`` tensors of one size, any H, W;
    ``rho`` = t / T, one value or one per batch row. Computed in float64 (the spectra of large latents) and
    returned in ``z``'s dtype; K is symmetric in +-k, so the result is real."""
    if z.shape != z_up.shape:
        raise ValueError(f"frequency modulation needs two tensors of one shape, got {tuple(z.shape)} and "
                         f"{tuple(z_up.shape)}; resize the upsampled latent in the spatial domain first")
    h, w = z.shape[-2:]
    k = fam_filter(h, w, rho, c).to(z.device)
    spectrum = k * torch.fft.rfft2(z.double()) + (1 - k) * torch.fft.rfft2(z_up.double())
    return torch.fft.irfft2(spectrum, s=(h, w)).to(z.dtype)


def sigma_at_fraction(sigmas: torch.Tensor, fraction: float) -> float:
    """The noise level a run reaches after ``fraction`` of its steps (linear between the schedule's entries).
    A window 'the first f of the run' is then sigma > sigma_at_fraction(sigmas, f): with 15 steps and f = 1/3,
    steps 0-4 exactly, whatever the sampler evaluates in between."""
    steps = len(sigmas) - 1
    if steps < 1:
        raise ValueError("a run needs at least one step (two sigmas)")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} must lie in [0, 1]")
    pos = fraction * steps
    i = min(int(math.floor(pos)), steps - 1)
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    return a + (pos - i) * (b - a)


def match_guide(guide: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``guide`` brought to ``like``'s batch, size, device and dtype: a batch of 1 serves every sample, a batch of
    ``like``'s size goes sample by sample; another size is resampled (bicubic, antialiased when it shrinks).
    Returns the guide and whether it was resized. Channel or batch mismatches raise ValueError."""
    if guide.ndim != 4 or like.ndim != 4:
        raise ValueError(f"expected [batch, channels, height, width] latents, got {tuple(guide.shape)}")
    if guide.shape[1] != like.shape[1]:
        raise ValueError(f"the guide latent has {guide.shape[1]} channels and the sampled latent {like.shape[1]}: "
                         "it was encoded by another model family's VAE; encode it with this model's VAE")
    b = like.shape[0]
    if guide.shape[0] not in (1, b):
        raise ValueError(f"the guide latent holds {guide.shape[0]} images and the sampled latent {b}: give one "
                         "guide for all, or one per image")
    guide = guide.to(device=like.device, dtype=torch.float32)
    resized = guide.shape[-2:] != like.shape[-2:]
    if resized:
        shrink = guide.shape[-2] > like.shape[-2] or guide.shape[-1] > like.shape[-1]
        guide = F.interpolate(guide, size=tuple(like.shape[-2:]), mode="bicubic", align_corners=False,
                              antialias=shrink)
    return guide.expand(b, -1, -1, -1).to(like.dtype), resized
