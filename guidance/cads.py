"""CADS: condition-annealed sampling.

Sadat et al., "CADS: Unleashing the Diversity of Diffusion Models through Condition-Annealed Sampling",
arXiv:2310.17347, sec. 3. At inference the conditioning vector ``y`` (text embedding, pooled vector) is
corrupted with Gaussian noise whose strength falls as sampling proceeds:

    y_hat = sqrt(gamma(t)) y + s sqrt(1 - gamma(t)) n,      n ~ N(0, I)          (eq. 3)

    gamma(t) = 1                          t <= tau1
               (tau2 - t) / (tau2 - tau1)  tau1 < t < tau2                         (eq. 4)
               0                          t >= tau2

with ``t`` the normalised noise level running from 1 (pure noise) to 0. Adding noise shifts the mean and
spread of ``y``, so it is standardised back to the statistics of ``y`` and mixed with the unrescaled version
by ``psi`` (eq. 5):

    y_rescaled = (y_hat - mean(y_hat)) / std(y_hat) * std(y) + mean(y)
    y_final    = psi y_rescaled + (1 - psi) y_hat

Defaults from the paper's text-to-image settings: tau1 = 0.6, tau2 = 0.9, s = 0.25, psi = 1. The noise ``n``
is drawn fresh at each evaluation from a generator seeded by the run's seed, the conditioning it is applied
to and the noise level, so one seed always reproduces one image and never touches the global RNG.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CADSConfig:
    tau1: float = 0.6
    tau2: float = 0.9
    noise_scale: float = 0.25
    psi: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.tau1 <= 1.0 and 0.0 <= self.tau2 <= 1.0):
            raise ValueError(f"CADS: tau1 and tau2 must lie in [0, 1], got tau1={self.tau1}, tau2={self.tau2}.")
        if self.tau1 > self.tau2:
            raise ValueError(
                f"CADS: tau1 ({self.tau1}) is above tau2 ({self.tau2}). Conditioning is clean below tau1 and pure "
                "noise above tau2, so tau1 must not exceed tau2; swap them."
            )
        if self.noise_scale < 0:
            raise ValueError(f"CADS: noise scale s must be >= 0, got {self.noise_scale}.")
        if not 0.0 <= self.psi <= 1.0:
            raise ValueError(f"CADS: psi must lie in [0, 1], got {self.psi}.")


def gamma(t: float, tau1: float, tau2: float) -> float:
    """Eq. 4: 1 below tau1 (clean conditioning), 0 above tau2, linear in between."""
    if t <= tau1:
        return 1.0
    if t >= tau2:
        return 0.0
    return (tau2 - t) / (tau2 - tau1)


def anneal(y: torch.Tensor, g: float, noise: torch.Tensor, noise_scale: float, psi: float) -> torch.Tensor:
    """Eq. 3 and 5 for a batch ``y`` (first dimension = images); statistics are per image.

    Returns ``y`` itself when ``g == 1`` (no corruption), so late steps cost nothing and stay exact.
    """
    if g >= 1.0:
        return y
    y32 = y.float()
    n = noise.to(device=y.device, dtype=torch.float32)
    y_hat = (g**0.5) * y32 + noise_scale * ((1.0 - g) ** 0.5) * n
    if psi > 0:
        dims = tuple(range(1, y.ndim))
        mean_in, std_in = y32.mean(dim=dims, keepdim=True), y32.std(dim=dims, keepdim=True)
        mean_hat, std_hat = y_hat.mean(dim=dims, keepdim=True), y_hat.std(dim=dims, keepdim=True)
        rescaled = (y_hat - mean_hat) / std_hat.clamp_min(1e-12) * std_in + mean_in
        y_hat = psi * rescaled + (1.0 - psi) * y_hat
    return y_hat.to(y.dtype)


def content_key(y: torch.Tensor) -> int:
    """A stable 64-bit fingerprint of a conditioning tensor's values.

    Copies of one conditioning (a perturbed-attention pass of the positive prompt, for example) get the same
    key and therefore the same CADS noise, so guidance terms that compare them see only their own effect.
    """
    data = y.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def noise_seed(run_seed: int, key: int, sigma: float, stream: int = 0) -> int:
    """Seed of the generator for one conditioning at one noise level (``stream`` separates tensors)."""
    payload = struct.pack("<qQdq", int(run_seed) & 0x7FFFFFFFFFFFFFFF, key & 0xFFFFFFFFFFFFFFFF, float(sigma),
                          stream)
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") & 0x7FFFFFFFFFFFFFFF


def cads_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise from a private CPU generator (device independent, global RNG untouched)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32)


def anneal_condition(y: torch.Tensor, t: float, cfg: CADSConfig, run_seed: int, sigma: float, stream: int = 0,
                     key: int | None = None, dims: int | None = None) -> torch.Tensor:
    """CADS on one conditioning tensor at noise level ``t``.

    ``dims``: anneal only the first ``dims`` features of the last axis (SDXL's ADM vector carries the pooled
    text embedding first and size embeddings after it; only the text part is a condition to anneal).
    """
    g = gamma(t, cfg.tau1, cfg.tau2)
    if g >= 1.0:
        return y
    part = y if dims is None else y[..., :dims]
    k = content_key(part) if key is None else key
    n = cads_noise(tuple(part.shape), noise_seed(run_seed, k, sigma, stream))
    out = anneal(part, g, n, cfg.noise_scale, cfg.psi)
    if dims is None:
        return out
    return torch.cat([out, y[..., dims:]], dim=-1)
