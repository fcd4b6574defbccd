"""Self-Attention Guidance maths (pure torch).

Hong et al., "Improving Sample Quality of Diffusion Models Using Self-Attention Guidance",
arXiv:2210.00939. Per step (their Algorithm 1 / eq. 12-14, written in x0 space):

1. From the self-attention map ``A`` of one layer (the UNet middle block) of the guiding prediction,
   build a mask of the image regions the model attends to: mean over heads of the attention each key
   receives (column sums of ``A``), thresholded (``> 1``: more than an average key).
2. Blur the predicted ``x0`` (Gaussian, 9 taps) inside the mask only: ``x0' = M * blur(x0) + (1 - M) * x0``.
3. Re-noise it with the same prediction's noise: ``x' = alpha x0' + sigma eps`` = ``x + alpha (x0' - x0)``.
4. Guide away from the model's prediction at ``x'``: ``D = D_cfg + s (x0' - D(x'))``.

Any latent size works: the mask is laid out on the attention layer's exact token grid (which the host
passes in), then resized to the latent with nearest-neighbour, so sizes that are not multiples of 64, odd
sizes and non-square sizes need no guessing of the grid from a token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask(attn: torch.Tensor, grid: tuple[int, int], threshold: float = 1.0) -> torch.Tensor:
    """``(B, heads, N, N)`` attention probabilities -> ``(B, 1, h, w)`` float mask of keys that receive more
    than ``threshold`` total attention (averaged over heads)."""
    b, _, _, n = attn.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"attention over {n} tokens does not fit the {h}x{w} grid")
    received = attn.float().mean(dim=1).sum(dim=1)  # (B, N): total attention each key receives
    return (received > threshold).to(attn.dtype).view(b, 1, h, w)


def gaussian_blur_2d(img: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """Depthwise Gaussian blur of ``(B, C, H, W)``; reflect padding, or replicate where an axis is too
    short to reflect (tiny latents)."""
    if sigma <= 0:
        return img
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, dtype=torch.float64, device=img.device)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = (k1 / k1.sum()).to(img.dtype)
    c = img.shape[1]
    pad = kernel_size // 2
    out = img
    for axis in (2, 3):
        mode = "reflect" if pad < out.shape[axis] else "replicate"
        if axis == 2:
            out = F.conv2d(F.pad(out, (0, 0, pad, pad), mode=mode), k1.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                           groups=c)
        else:
            out = F.conv2d(F.pad(out, (pad, pad, 0, 0), mode=mode), k1.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                           groups=c)
    return out


def degrade(x0: torch.Tensor, mask: torch.Tensor, blur_sigma: float, kernel_size: int = 9) -> torch.Tensor:
    """Blur ``x0`` inside ``mask`` (any mask resolution: resized to ``x0`` with nearest-neighbour)."""
    m = F.interpolate(mask.to(x0.dtype), size=x0.shape[-2:], mode="nearest")
    if m.shape[0] != x0.shape[0]:
        if x0.shape[0] % m.shape[0]:
            raise ValueError(f"mask batch {m.shape[0]} does not divide latent batch {x0.shape[0]}")
        m = m.repeat(x0.shape[0] // m.shape[0], 1, 1, 1)
    blurred = gaussian_blur_2d(x0, kernel_size, blur_sigma)
    return blurred * m + x0 * (1 - m)


def renoise(x: torch.Tensor, x0: torch.Tensor, degraded: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """``alpha x0' + sigma eps`` where ``eps`` is the noise implied by ``(x, x0)``; equals
    ``x + alpha (x0' - x0)`` (alpha = 1 for EPS models, 1 - sigma for flow models)."""
    return x + alpha * (degraded - x0)


def sag_guidance(denoised: torch.Tensor, degraded: torch.Tensor, degraded_pred: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """``D + s (x0' - D(x'))``; scale 0 returns ``denoised`` itself."""
    if scale == 0.0:
        return denoised
    return denoised + scale * (degraded - degraded_pred)
