"""Exact-score Gaussian-mixture denoisers: the proving ground for samplers and guidance (pure torch).

Data ``x0`` follows a mixture of isotropic Gaussians ``sum_k pi_k N(mu_k, s_k^2 I)`` in a space of any shape
(latent-shaped spaces such as ``(4, 8, 8)`` included). For a noisy state ``x = alpha x0 + sigma eps`` the
posterior mean ``E[x0 | x]`` is available in closed form, so a sampler's error against the exact
probability-flow ODE solution measures the sampler alone, with no network error mixed in.

A *conditional* mixture re-weights the components (``cond_weights``); classifier-free guidance combines
the exact conditional and unconditional denoisers, ``D_u + w (D_c - D_u)``, which defines an ODE of its
own that the reference solver integrates just the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .noise_schedule import Parameterisation, alpha, check_parameterisation


@dataclass
class GaussianMixture:
    """A mixture of isotropic Gaussians over tensors of shape ``event_shape``."""

    means: torch.Tensor  # [K, *event_shape]
    stds: torch.Tensor  # [K]
    weights: torch.Tensor  # [K], sums to 1

    @property
    def event_shape(self) -> torch.Size:
        return self.means.shape[1:]

    @property
    def dim(self) -> int:
        return int(math.prod(self.event_shape))

    def reweighted(self, weights: torch.Tensor) -> GaussianMixture:
        w = weights.to(self.weights)
        return GaussianMixture(self.means, self.stds, w / w.sum())

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, kind: Parameterisation = "eps") -> torch.Tensor:
        """Posterior mean E[x0 | x] for ``x = alpha(sigma) x0 + sigma eps``; ``x`` is ``[B, *event_shape]``."""
        dtype = x.dtype
        x64 = x.to(torch.float64)
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        sig = sig.reshape(-1) if sig.ndim else sig.reshape(1)
        sig = sig.expand(x.shape[0]) if sig.numel() == 1 else sig
        a = alpha(sig, kind)  # [B]
        mu = self.means.to(x64).flatten(1)  # [K, D]
        s2 = (self.stds.to(x64) ** 2)[None, :]  # [1, K]
        xf = x64.flatten(1)  # [B, D]
        a_ = a[:, None]
        var = a_**2 * s2 + sig[:, None] ** 2  # [B, K] marginal variance per component
        diff = xf[:, None, :] - a_[:, :, None] * mu[None]  # [B, K, D]
        sq = (diff**2).sum(-1)  # [B, K]
        d = xf.shape[1]
        logp = torch.log(self.weights.to(x64))[None] - 0.5 * sq / var - 0.5 * d * torch.log(var)
        resp = torch.softmax(logp, dim=1)  # [B, K]
        gain = (a_ * s2 / var)[:, :, None]  # Wiener gain per component
        post = mu[None] + gain * diff  # [B, K, D]
        out = (resp[:, :, None] * post).sum(1)
        return out.reshape(x.shape).to(dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.multinomial(self.weights.double(), n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.event_shape), generator=generator, dtype=torch.float64)
        std = self.stds.double()[idx].reshape(n, *([1] * len(self.event_shape)))
        return (self.means.double()[idx] + std * noise).to(self.means.dtype)


def make_mixture(
    event_shape: tuple[int, ...] = (4, 8, 8),
    components: int = 6,
    seed: int = 0,
    spread: float = 1.0,
    std_range: tuple[float, float] = (0.05, 0.3),
) -> GaussianMixture:
    """A reproducible random mixture, with means at the scale of SD latents (unit order)."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn((components, *event_shape), generator=g, dtype=torch.float64)
    lo, hi = std_range
    stds = lo + (hi - lo) * torch.rand(components, generator=g, dtype=torch.float64)
    w = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, w / w.sum())


@dataclass
class MixtureDenoiser:
    """A k-diffusion-style model ``model(x, sigma, **extra) -> x0`` backed by exact posterior means.

    With ``cond_weights`` set and ``cfg != 1`` it returns the classifier-free-guided prediction
    ``D_u + cfg (D_c - D_u)``; ``calls`` counts evaluations (each guided call counts the branches it used).
    """

    mixture: GaussianMixture
    kind: Parameterisation = "eps"
    cond_weights: torch.Tensor | None = None
    cfg: float = 1.0
    calls: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        check_parameterisation(self.kind)
        self._cond = self.mixture.reweighted(self.cond_weights) if self.cond_weights is not None else None

    def uncond(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        self.calls += 1
        return self.mixture.denoise(x, sigma, self.kind)

    def cond(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        self.calls += 1
        return (self._cond or self.mixture).denoise(x, sigma, self.kind)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **_: object) -> torch.Tensor:
        if self._cond is None:
            return self.uncond(x, sigma)
        dc = self.cond(x, sigma)
        if self.cfg == 1.0:
            return dc
        du = self.uncond(x, sigma)
        return du + self.cfg * (dc - du)

    def prior_noise(self, shape_batch: int, sigma_max: float, generator: torch.Generator) -> torch.Tensor:
        """Initial state at ``sigma_max``: ``sigma_max * eps`` (EPS/VE) or ``eps`` mixed with ``(1-sigma)`` (flow)."""
        eps = torch.randn((shape_batch, *self.mixture.event_shape), generator=generator, dtype=torch.float64)
        if self.kind == "flow" and sigma_max < 1.0:
            x0 = self.mixture.sample(shape_batch, generator)
            return (1.0 - sigma_max) * x0 + sigma_max * eps
        return sigma_max * eps


def reference_solution(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma_start: float,
    sigma_end: float = 0.0,
    steps: int = 2000,
    sigma_floor: float = 1e-4,
) -> torch.Tensor:
    """High-accuracy solution of the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``.

    Classical RK4 in ``t = log sigma`` (``dx/dt = x - D``) in float64, from ``sigma_start`` to
    ``max(sigma_end, sigma_floor)``; for ``sigma_end = 0`` the last state is denoised once, which is exact
    to O(sigma_floor^2). 2000 steps give errors far below any few-step sampler's.
    """
    x = x.to(torch.float64)
    t0 = math.log(sigma_start)
    t1 = math.log(max(sigma_end, sigma_floor))
    h = (t1 - t0) / steps

    def f(xx: torch.Tensor, t: float) -> torch.Tensor:
        return xx - model(xx, torch.tensor(math.exp(t), dtype=torch.float64))

    t = t0
    for _ in range(steps):
        k1 = f(x, t)
        k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = f(x + h * k3, t + h)
        x = x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        t += h
    if sigma_end == 0.0:
        x = model(x, torch.tensor(max(sigma_end, sigma_floor), dtype=torch.float64))
    return x
