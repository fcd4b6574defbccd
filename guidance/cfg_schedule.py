"""Scheduled classifier-free guidance: the CFG scale as a function of the noise level, and a guidance interval.

Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", arXiv:2207.12598, eq. 6),
written for denoised (x0) predictions as ComfyUI's hooks see them (x0 is affine in eps, so the two forms agree):

    D = D_u + w (D_c - D_u)

Here ``w`` varies along the run:

* a *shape* between ``cfg_start`` (at the highest noise level, t = 1) and ``cfg_end`` (at t = 0), with
  ``t`` the normalised noise level (1 - ComfyUI's "percent"): constant, linear ``t``, cosine
  ``(1 - cos(pi t)) / 2`` or power ``t^p``. Increasing schedules (low guidance at high noise) follow
  Wang et al., "Analysis of Classifier-Free Guidance Weight Schedulers", arXiv:2404.13040 (linear and
  cosine families, sec. 4);
* a *custom* list with one scale per sampler step;
* a *guidance interval* (Kynkaenniemi et al., "Applying Guidance in a Limited Interval Improves Sample and
  Distribution Quality in Diffusion Models", arXiv:2404.07724, eq. 3): outside ``[sigma_end, sigma_start]``
  guidance is off, ``D = D_c``, so the unconditional prediction is not needed and is not computed.

ComfyUI has already combined the predictions with the sampler's scale ``s`` when a post-CFG hook runs, so the
hook moves the result to the scheduled scale by adding ``(w - s)(D_c - D_u)``; with ``w == s`` it adds nothing
and the output is bit-for-bit plain CFG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..utils.sigma_window import ScheduleError, SigmaWindow

SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine", "power", "custom")


def parse_scale_list(text: str) -> tuple[float, ...]:
    """``"7, 7, 6.5 5"`` -> ``(7.0, 7.0, 6.5, 5.0)``: commas, spaces or new lines separate values."""
    parts = [p for p in text.replace(",", " ").replace(";", " ").split() if p]
    values = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise ScheduleError(
                f"custom CFG list: {p!r} is not a number; write one scale per step, separated by commas."
            ) from None
        if not math.isfinite(v):
            raise ScheduleError(f"custom CFG list: {p!r} is not a finite number.")
        values.append(v)
    return tuple(values)


@dataclass(frozen=True)
class ScaleSchedule:
    """The CFG scale along a run. A negative ``cfg_start`` / ``cfg_end`` means "the sampler's own CFG"."""

    kind: str = "constant"
    cfg_start: float = -1.0
    cfg_end: float = -1.0
    exponent: float = 2.0
    custom: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ScheduleError(f"unknown CFG schedule {self.kind!r}; expected one of {SCHEDULES}.")
        if self.kind == "power" and not (self.exponent > 0 and math.isfinite(self.exponent)):
            raise ScheduleError(f"power schedule: exponent must be a positive number, got {self.exponent}.")
        if self.kind == "custom" and not self.custom:
            raise ScheduleError(
                "custom CFG schedule: the list is empty; give one scale per sampler step, e.g. '8, 7, 6, 5'."
            )

    def check_steps(self, steps: int) -> None:
        """A custom list must name exactly one scale per step of the run."""
        if self.kind == "custom" and len(self.custom) != steps:
            raise ScheduleError(
                f"custom CFG schedule: the list has {len(self.custom)} values but this run has {steps} steps. "
                f"Give exactly {steps} comma-separated scales (one per step), or change the step count."
            )

    def endpoints(self, base: float) -> tuple[float, float]:
        start = base if self.cfg_start < 0 else self.cfg_start
        end = base if self.cfg_end < 0 else self.cfg_end
        return start, end

    def scale_at(self, t: float, step: int, base: float) -> float:
        """Scale at normalised noise level ``t`` (1 = pure noise, 0 = clean) and step index ``step``.

        ``base`` is the sampler's CFG, used where an endpoint is negative.
        """
        if self.kind == "custom":
            return float(self.custom[min(max(step, 0), len(self.custom) - 1)])
        start, end = self.endpoints(base)
        if self.kind == "constant":
            return start
        t = min(max(float(t), 0.0), 1.0)
        return end + (start - end) * schedule_shape(self.kind, t, self.exponent)


def schedule_shape(kind: str, t: float, exponent: float = 2.0) -> float:
    """Weight of ``cfg_start`` at noise level ``t``: 1 at t = 1, 0 at t = 0."""
    if kind == "linear":
        return t
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * t))
    if kind == "power":
        return t**exponent
    if kind == "constant":
        return 1.0
    raise ScheduleError(f"schedule {kind!r} has no shape; expected linear, cosine or power.")


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Plain CFG, ``D_u + w (D_c - D_u)`` (Ho & Salimans eq. 6), in the same operation order as ComfyUI."""
    return uncond + (cond - uncond) * scale


def retarget(denoised: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, used: float,
             target: float | torch.Tensor) -> torch.Tensor:
    """Move a CFG result made with scale ``used`` to scale ``target``: ``D + (target - used)(D_c - D_u)``.

    Anything else a hook added to ``D`` (PAG terms, for example) is kept. Returns ``denoised`` itself when the
    scales are equal, so plain CFG stays bit-for-bit unchanged.
    """
    if isinstance(target, torch.Tensor):
        delta = (target.to(denoised) - used).reshape(-1, *([1] * (denoised.ndim - 1)))
        return denoised + (cond - uncond) * delta
    if target == used:
        return denoised
    return denoised + (cond - uncond) * (target - used)


def noise_level(sigma: float, percent_to_sigma: Callable[[float], float], iterations: int = 48) -> float:
    """Normalised noise level ``t`` in [0, 1] (1 at the model's highest sigma) of ``sigma``.

    ``t = 1 - percent`` where ``percent_to_sigma(percent) = sigma`` (ComfyUI's own mapping, decreasing in
    percent), found by bisection, so schedules mean the same on EPS (discrete timesteps) and flow models.
    """
    lo, hi = 0.0, 1.0  # percent
    if sigma >= percent_to_sigma(1e-9):
        return 1.0
    if sigma <= percent_to_sigma(1.0 - 1e-9):
        return 0.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if percent_to_sigma(mid) > sigma:
            lo = mid
        else:
            hi = mid
    return 1.0 - 0.5 * (lo + hi)


def step_index(sigma: float, sample_sigmas: Sequence[float], rel_tol: float = 1e-5) -> int:
    """Index of the sampler step ``sigma`` belongs to: the last schedule sigma at or above it.

    Intermediate evaluations of multi-stage samplers (Heun, DPM++ 2S) fall in the step they started from
    unless they land on the next sigma exactly.
    """
    idx = 0
    for i, s in enumerate(sample_sigmas[:-1] if len(sample_sigmas) > 1 else sample_sigmas):
        if s >= sigma * (1.0 - rel_tol) or math.isclose(s, sigma, rel_tol=rel_tol):
            idx = i
        else:
            break
    return idx


@dataclass
class ScheduledGuidance:
    """Scale schedule plus interval: what a run needs at each evaluation."""

    schedule: ScaleSchedule = ScaleSchedule()
    interval: SigmaWindow = SigmaWindow()

    def active(self, sigma: float) -> bool:
        return self.interval.contains(sigma)

    def scale(self, sigma: float, t: float, step: int, base: float) -> float:
        """Scale at this evaluation; 1 outside the interval (conditional prediction only)."""
        if not self.active(sigma):
            return 1.0
        return self.schedule.scale_at(t, step, base)


class ScheduledCFGDenoiser:
    """Pure-torch reference: a k-diffusion denoiser ``D(x, sigma)`` from separate cond / uncond denoisers.

    Skips the unconditional call wherever the scale is exactly 1 (outside the interval included), as the
    ComfyUI patch does, and counts both kinds of calls. ``t_of`` maps sigma to the normalised noise level.
    """

    def __init__(self, cond: Callable, uncond: Callable, guidance: ScheduledGuidance, base: float,
                 sample_sigmas: Sequence[float], t_of: Callable[[float], float]):
        self.cond, self.uncond, self.guidance, self.base = cond, uncond, guidance, base
        self.sample_sigmas = [float(s) for s in sample_sigmas]
        self.t_of = t_of
        self.cond_calls = 0
        self.uncond_calls = 0
        guidance.schedule.check_steps(len(self.sample_sigmas) - 1)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **_: object) -> torch.Tensor:
        s = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        w = self.guidance.scale(s, self.t_of(s), step_index(s, self.sample_sigmas), self.base)
        dc = self.cond(x, sigma)
        self.cond_calls += 1
        if w == 1.0:
            return dc
        du = self.uncond(x, sigma)
        self.uncond_calls += 1
        return cfg(dc, du, w)
