"""Time-Shift sampling: feed the network the timestep whose noise level matches the state's variance.

Paper: Li, Qu, Yao, Sun and Moens, "Alleviating Exposure Bias in Diffusion Models through Sampling with
Shifted Time Steps", arXiv:2305.15583 (ICLR 2024). During sampling the state ``x_t`` drifts away from the
forward marginal at ``t`` (exposure bias). Before each network call the method searches a window of
``window`` training timesteps around ``t`` for the ``t'`` whose forward marginal variance is closest to the
variance of ``x_t`` (Algorithm 1: ``t' = argmin |Var(x_t) - (1 - abar_t')|``) and evaluates the network at
``t'``; the solver keeps its own coefficients at ``t``. Shifting stops below the ``cutoff`` timestep.

On ComfyUI's sigma axis (``x = alpha(sigma) x0 + sigma eps``):

* A state at ``sigma`` is the variance-preserving state ``x / n(sigma)`` with ``n = sqrt(alpha^2 + sigma^2)``
  (``sqrt(1 + sigma^2)`` for EPS models, ``sqrt((1-sigma)^2 + sigma^2)`` for flow models); the paper's
  ``1 - abar_t'`` is ``sigma'^2 / n(sigma')^2``. With a data variance ``v`` (the paper's code uses 0), the
  marginal variance at ``sigma'`` is ``(alpha'^2 v + sigma'^2) / n(sigma')^2 = 1 - abar' (1 - v)``.
* What ``v`` can tell: the expected variance moves with ``t'`` only through ``(1 - v)``. The paper's rule
  (``v = 0``) suits pixel data in [-1, 1], whose variance is well below 1. A state on the marginal of data
  with variance ``v_true`` has ``Var(x_vp) = 1 - abar (1 - v_true)``, so ``v = 0`` aims at
  ``abar' = abar (1 - v_true)``: for latents scaled to unit variance (SD, SDXL, Flux after the VAE scale
  factor) that lies far outside any window, and they are sent to the noisiest candidate at every call, a
  constant shift of half the window rather than a measurement. With ``v = 1`` every candidate matches
  equally and nothing shifts (ties keep the current timestep). The match is informative only when ``v`` is
  the true variance of clean samples and that is clearly away from 1.
* Timesteps are read through the host's ``timestep(sigma)``, the value the network is fed; the candidates'
  sigmas come from its inverse (:func:`tabulated_inverse` when the host's own ``sigma(t)`` is not one).
* "Feed ``t'`` to the network only": the network sees the same VP state, so its input is
  ``x n(sigma') / n(sigma)`` at ``sigma'``; its raw output ``r = (x_in - D') / sigma'`` (the noise for EPS models,
  the velocity for flow models) is then read at the solver's own ``sigma`` as ``D = x - sigma r``.
* Timesteps are ComfyUI's, normalised to ``[0, 1]`` (``model_sampling.timestep(sigma) / timestep(sigma_max)``),
  so ``window`` and ``cutoff`` are fractions of the training schedule (the paper's 30 and 300 of 1000 steps are
  0.03 and 0.3).

The proxy that carries the shifted call into any sampler function is in ``wrapping.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..utils.noise_schedule import Parameterisation, alpha, check_parameterisation
from .wrapping import DenoiseFn, DenoiserProxy, bcast, per_sample_sigma, wrap_sampler_function


@dataclass(frozen=True)
class TimeAxis:
    """A model's training-time axis, normalised to ``[0, 1]`` (0 = clean, 1 = the noisiest trained step)."""

    t_of_sigma: Callable[[torch.Tensor], torch.Tensor]
    sigma_of_t: Callable[[torch.Tensor], torch.Tensor]


def vp_discrete_axis(alphas_cumprod: torch.Tensor) -> TimeAxis:
    """The axis of a discrete VP model (SD1.x / SDXL): ``sigma_k = sqrt((1 - abar_k) / abar_k)``, ``t = k/(N-1)``;
    between steps log-sigma is interpolated linearly, as ComfyUI's ``ModelSamplingDiscrete`` does."""
    log_sigmas = (0.5 * torch.log((1 - alphas_cumprod.double()) / alphas_cumprod.double()))
    n = len(log_sigmas)

    def sigma_of_t(t: torch.Tensor) -> torch.Tensor:
        k = (t.double() * (n - 1)).clamp(0, n - 1)
        lo = k.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        w = k - lo
        return torch.exp((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).to(t.dtype)

    def t_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
        ls = torch.log(sigma.double().clamp(min=1e-12))
        idx = torch.searchsorted(log_sigmas, ls.reshape(-1).contiguous()).clamp(1, n - 1)
        lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
        frac = ((ls.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
        return ((idx - 1 + frac) / (n - 1)).reshape(sigma.shape).to(sigma.dtype)

    return TimeAxis(t_of_sigma, sigma_of_t)


def flow_axis() -> TimeAxis:
    """Rectified-flow models train on ``t = sigma``."""
    return TimeAxis(lambda s: s, lambda t: t)


def tabulated_inverse(t_of_sigma: Callable[[torch.Tensor], torch.Tensor], sigma_min: float, sigma_max: float,
                      points: int = 4097) -> Callable[[torch.Tensor], torch.Tensor]:
    """``sigma_of_t`` for a non-decreasing ``t_of_sigma``, by interpolating log sigma over a log-spaced table.

    A host's own ``sigma(t)`` is not always the inverse of the ``timestep(sigma)`` its network is fed: ComfyUI's
    shifted flow samplings (SD3, Flux) feed ``t = sigma`` but their ``sigma(t)`` applies the shift again. The
    candidates of the search must be the sigmas whose *fed* timestep is ``t``, so the inverse is built from
    ``t_of_sigma`` itself. Outside ``[sigma_min, sigma_max]`` the result is clamped to the ends.
    """
    log_s = torch.linspace(math.log(sigma_min), math.log(sigma_max), points, dtype=torch.float64)
    t_tab = t_of_sigma(log_s.exp()).to(device="cpu", dtype=torch.float64).reshape(-1)
    t_tab = torch.cummax(t_tab, dim=0).values  # plateaus of a discrete map must not break searchsorted

    def sigma_of_t(t: torch.Tensor) -> torch.Tensor:
        tt = t.to(torch.float64).reshape(-1).contiguous()
        tab, ls = t_tab.to(tt.device), log_s.to(tt.device)
        idx = torch.searchsorted(tab, tt).clamp(1, points - 1)
        lo, hi = tab[idx - 1], tab[idx]
        w = ((tt - lo) / (hi - lo).clamp(min=1e-300)).clamp(0.0, 1.0)
        return torch.exp(ls[idx - 1] + w * (ls[idx] - ls[idx - 1])).reshape(t.shape)

    return sigma_of_t


def vp_norm(sigma: torch.Tensor, kind: Parameterisation) -> torch.Tensor:
    """``n(sigma) = sqrt(alpha^2 + sigma^2)``: dividing a state by it gives the variance-preserving state."""
    return torch.sqrt(alpha(sigma, kind) ** 2 + sigma**2)


@dataclass(frozen=True)
class TimeShiftConfig:
    window: float = 0.03  # width of the search window, fraction of the training schedule
    cutoff: float = 0.3  # no shift at or below this normalised timestep
    data_variance: float = 0.0  # v in the marginal variance; 0 is the paper's rule
    resolution: int = 1000  # candidate timesteps per unit of t (the training steps of a discrete model)

    def __post_init__(self) -> None:
        if not 0.0 <= self.window <= 1.0:
            raise ValueError(f"Time-Shift: window must be in [0, 1] (fraction of the schedule), got {self.window}")
        if not 0.0 <= self.cutoff <= 1.0:
            raise ValueError(f"Time-Shift: cutoff must be in [0, 1] (fraction of the schedule), got {self.cutoff}")
        if self.data_variance < 0 or not math.isfinite(self.data_variance):
            raise ValueError(f"Time-Shift: data_variance must be >= 0, got {self.data_variance}")


def _closest_best(var_vp: torch.Tensor, expected: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Index of the best variance match per sample; among ties, the candidate nearest the current timestep.

    ``expected = 1 - abar' (1 - v)`` in VP terms, so with ``v = 1`` every candidate is an exact tie and the
    variance says nothing about the timestep: the tie-break then keeps ``t`` instead of letting rounding noise
    pick a shift. The tolerance is a few float64 ulps of the unit-order variances, far below any real mismatch.
    """
    miss = (var_vp[:, None] - expected).abs()
    tied = miss <= miss.min(dim=1, keepdim=True).values + 1e-12
    distance = torch.where(tied, offsets.abs()[None].expand_as(miss), torch.full_like(miss, math.inf))
    return torch.argmin(distance, dim=1)


def shifted_sigma(x: torch.Tensor, sigma: torch.Tensor, axis: TimeAxis, kind: Parameterisation,
                  config: TimeShiftConfig) -> torch.Tensor:
    """Per sample, the sigma in the window around ``sigma`` whose marginal variance best matches ``Var(x)``."""
    sigma = per_sample_sigma(sigma, x).to(torch.float64)
    if config.window == 0.0:
        return sigma.to(x.dtype)
    t = axis.t_of_sigma(sigma).to(torch.float64)
    half = config.window / 2
    # symmetric integer steps keep the unshifted timestep itself (offset exactly 0) among the candidates
    m = max(1, round(config.window * config.resolution / 2))
    offsets = torch.arange(-m, m + 1, dtype=torch.float64, device=x.device) * (half / m)
    cand_t = (t[:, None] + offsets[None]).clamp(0.0, 1.0)  # [B, n]
    cand_s = axis.sigma_of_t(cand_t).to(torch.float64)
    var_vp = x.double().flatten(1).var(dim=1) / vp_norm(sigma, kind) ** 2  # [B]
    expected = (alpha(cand_s, kind) ** 2 * config.data_variance + cand_s**2) / vp_norm(cand_s, kind) ** 2
    # never sigma 0 (a flow axis maps t = 0 there): the network's noise estimate would divide by it
    expected = torch.where(cand_s > 0, expected, torch.full_like(expected, math.inf))
    best = _closest_best(var_vp, expected, offsets)
    chosen = cand_s.gather(1, best[:, None]).squeeze(1)
    # the centre candidate is the solver's own sigma (exactly, not through a t -> sigma round trip)
    chosen = torch.where(offsets[best] == 0, sigma, chosen)
    active = (t > config.cutoff) & (sigma > 0)
    return torch.where(active, chosen, sigma).to(x.dtype)


def time_shift_denoise(model: DenoiseFn, x: torch.Tensor, sigma: torch.Tensor, axis: TimeAxis,
                       kind: Parameterisation, config: TimeShiftConfig, **kwargs) -> torch.Tensor:
    """One denoiser call with the network evaluated at the shifted timestep (see the module docstring)."""
    s = per_sample_sigma(sigma, x)
    s_net = shifted_sigma(x, s, axis, kind, config)
    if torch.equal(s_net, s.to(s_net.dtype)):
        return model(x, sigma, **kwargs)
    ratio = bcast(vp_norm(s_net, kind) / vp_norm(s.to(s_net.dtype), kind), x).to(x.dtype)
    x_in = x * ratio
    d_net = model(x_in, s_net, **kwargs)
    raw = (x_in - d_net) / bcast(s_net, x)
    return x - bcast(s.to(x.dtype), x) * raw


def time_shift_sampler(sampler_fn: Callable, axis_of: Callable[[DenoiseFn], tuple[TimeAxis, Parameterisation]],
                       config: TimeShiftConfig) -> Callable:
    """Wrap any k-diffusion sampler function with Time-Shift. ``axis_of(model)`` gives the model's time axis
    and parameterisation (read from ComfyUI's ``model_sampling`` in the node, given directly in tests)."""

    def make(model, x, sigmas):
        axis, kind = axis_of(model)
        check_parameterisation(kind)

        def call(inner, xx, sigma, **kw):
            return time_shift_denoise(inner, xx, sigma, axis, kind, config, **kw)

        return DenoiserProxy(model, call)

    return wrap_sampler_function(sampler_fn, make)
