"""Omegance: one parameter that trades detail for smoothness, globally, over time or per region.

Paper: Hong et al., "Omegance: A Single Parameter for Various Granularities in
Diffusion-Based Synthesis", arXiv:2411.17769. Each denoising step scales the noise the model predicts by a
factor near 1: ``x0_hat = x - sigma * w * eps`` for EPS models (Sec. 3, the scaled Euler / DDIM step), and for
flow models the step's displacement is scaled about its mean, ``dx' = (dx - mean dx) w + mean dx``. ``w > 1``
removes more noise per step (richer, grainier detail), ``w < 1`` less (smoother, simpler images).

The user sets ``omega`` on an unbounded scale; the official code maps it to ``w`` with a logistic,
``w = lo + (hi - lo) sigmoid(0.1 omega)``, ``lo, hi = 0.95, 1.05`` for EPS and ``0.9, 1.1`` for flow models, so
``omega = 0`` is exactly neutral. Here the scaling is applied to the data prediction the sampler receives,
which makes it work with any sampler: the residual ``r = x - D`` (``sigma`` times the noise, or times the
velocity) becomes ``w r`` (EPS) or ``(r - mean r) w + mean r`` (flow), with the mean per sample.

Schedules (the paper's "temporal" control): ``omega`` moves from ``omega`` to ``omega_end`` over the run,
linearly or along a half cosine, by the step's position in the sigma list. A spatial mask (the paper's
"spatial" control) sets ``mask_omega`` inside the mask; the mask is resized to the latent explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..utils.noise_schedule import Parameterisation, check_parameterisation
from .wrapping import DenoiseFn, DenoiserProxy, per_sample_sigma, wrap_sampler_function

SCHEDULES = ("constant", "linear", "cosine")
SCALE_RANGE: dict[str, tuple[float, float]] = {"eps": (0.95, 1.05), "flow": (0.9, 1.1)}


def omega_to_scale(omega: float, kind: Parameterisation) -> float:
    """The official logistic rescale of omega to the factor ``w`` (``w(0) = 1``)."""
    lo, hi = SCALE_RANGE[check_parameterisation(kind)]
    z = 0.1 * omega
    # numerically stable sigmoid: exp of a large positive number overflows
    sig = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return lo + (hi - lo) * sig


def schedule_weight(progress: float, schedule: str) -> float:
    """How far along ``omega -> omega_end`` a step at ``progress`` in ``[0, 1]`` is."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 0.0
    if schedule == "linear":
        return p
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * p))
    raise ValueError(f"Omegance: unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def run_progress(sigma: float, sigmas: torch.Tensor) -> float:
    """Position of ``sigma`` in the run's sigma list as a fraction of the steps, 0 at the first step and 1 at
    the last; sigmas between listed ones (intermediate stages of Heun-type samplers) interpolate in log-sigma."""
    s = [float(v) for v in sigmas if float(v) > 0]
    if len(s) <= 1 or sigma <= 0:
        return 1.0 if sigma <= 0 or len(s) == 1 else 0.0
    ls = math.log(sigma)
    logs = [math.log(v) for v in s]
    if ls >= logs[0]:
        return 0.0
    if ls <= logs[-1]:
        return 1.0
    for i in range(len(logs) - 1):
        if logs[i] >= ls >= logs[i + 1]:
            frac = (logs[i] - ls) / (logs[i] - logs[i + 1]) if logs[i] != logs[i + 1] else 0.0
            return (i + frac) / (len(logs) - 1)
    return 1.0


def resize_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A ComfyUI MASK (``[H, W]`` or ``[B, H, W]``, values in [0, 1]) resized bilinearly to the latent's last two
    dimensions and shaped to broadcast against ``x`` (``[B|1, 1, ..., H, W]``)."""
    m = mask.to(device=x.device, dtype=torch.float32)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"Omegance: a mask must be [H, W] or [B, H, W], got shape {tuple(mask.shape)}")
    m = F.interpolate(m[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    m = m.clamp(0.0, 1.0)
    if m.shape[0] not in (1, x.shape[0]):
        # a batch of masks that does not match the latent batch: repeat it cyclically, as ComfyUI does for masks
        reps = math.ceil(x.shape[0] / m.shape[0])
        m = m.repeat(reps, 1, 1)[: x.shape[0]]
    return m.reshape(m.shape[0], *([1] * (x.ndim - 3)), *m.shape[-2:]).to(x.dtype)


@dataclass(frozen=True)
class OmeganceConfig:
    omega: float = 0.0
    schedule: str = "constant"
    omega_end: float = 0.0
    mask: torch.Tensor | None = None
    mask_omega: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Omegance: unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        for name in ("omega", "omega_end", "mask_omega"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"Omegance: {name} must be a finite number")

    def omega_at(self, progress: float) -> float:
        return self.omega + schedule_weight(progress, self.schedule) * (self.omega_end - self.omega)


def apply_scale(x: torch.Tensor, denoised: torch.Tensor, scale: torch.Tensor | float,
                kind: Parameterisation) -> torch.Tensor:
    """Scale the step's residual ``x - D`` by ``scale`` (a number or a map broadcasting against ``x``)."""
    r = x - denoised
    if kind == "flow":
        m = r.mean(dim=tuple(range(1, r.ndim)), keepdim=True)
        return x - ((r - m) * scale + m)
    return x - r * scale


def omegance_denoise(model: DenoiseFn, x: torch.Tensor, sigma: torch.Tensor, sigmas: torch.Tensor,
                     kind: Parameterisation, config: OmeganceConfig, **kwargs) -> torch.Tensor:
    denoised = model(x, sigma, **kwargs)
    s = float(per_sample_sigma(sigma, x).max())
    if s <= 0:
        return denoised
    w = omega_to_scale(config.omega_at(run_progress(s, sigmas)), kind)
    if config.mask is None:
        if w == 1.0:
            return denoised  # omega = 0: bit-identical to the plain sampler
        return apply_scale(x, denoised, w, kind)
    w_in = omega_to_scale(config.mask_omega, kind)
    if w == 1.0 and w_in == 1.0:
        return denoised
    m = resize_mask(config.mask, x)
    return apply_scale(x, denoised, w * (1 - m) + w_in * m, kind)


def omegance_sampler(sampler_fn: Callable, kind_of: Callable[[DenoiseFn], Parameterisation],
                     config: OmeganceConfig) -> Callable:
    """Wrap any k-diffusion sampler function with Omegance; ``kind_of(model)`` says EPS or flow."""

    def make(model, x, sigmas):
        kind = check_parameterisation(kind_of(model))

        def call(inner, xx, sigma, **kw):
            return omegance_denoise(inner, xx, sigma, sigmas, kind, config, **kw)

        return DenoiserProxy(model, call)

    return wrap_sampler_function(sampler_fn, make)
