"""Differential Diffusion in sigma space: a soft change map whose value per pixel is its denoise strength
(pure torch).

Levin and Fried, "Differential Diffusion: Giving Each Pixel Its Strength", arXiv:2306.00950. Each pixel with
change value ``m`` in ``[0, 1]`` is held at the re-noised original until the run reaches the point where an
img2img pass of denoise ``m`` would start, then denoised freely: ``m = 1`` changes from the first step,
``m = 0`` never, ``m = 0.5`` over the second half of the run.

"Where an img2img pass of denoise m starts" is a noise level, so it is read off the run's own sigma list:
the pixel joins once the run's step position ``u`` (``caching.clock.StepClock``: a call's sigma placed between
the schedule's sigmas, so Heun-type and SDE samplers agree with Euler) satisfies ``m >= 1 - u / N``. ComfyUI's
img2img takes the last ``N`` steps of an ``N / m``-step schedule; for the schedules that are functions of
``i / N`` (Karras, exponential, simple, normal, beta, Flux's shifted ones) that is the same starting sigma.
ComfyUI core's DifferentialDiffusion compares ``m`` with the model *timestep* normalised over the run
instead, which agrees only where sigma is linear in the timestep: on Karras or shifted flow schedules its
``m = 0.5`` pixels start late or early.
"""

from __future__ import annotations

import torch

from ..caching.clock import StepClock

TOLERANCE = 1e-6  # step positions are computed from float32 sigmas


def threshold(sigma, sample_sigmas) -> float:
    """The change value a pixel needs to be denoised at a call with ``sigma``: ``1 - u / N``."""
    clock = StepClock(sample_sigmas)
    return 1.0 - clock.position(sigma) / clock.steps


def active_mask(change: torch.Tensor, sigma, sample_sigmas) -> torch.Tensor:
    """1 where a pixel of the change map is being denoised at this call, 0 where it is held (same shape and
    dtype as ``change``)."""
    return (change >= threshold(sigma, sample_sigmas) - TOLERANCE).to(change.dtype)
