"""Shared sampler plumbing: sigma validation, progress and callbacks (pure torch)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

try:  # tqdm ships with ComfyUI; the maths must not depend on it.
    from tqdm.auto import trange as _trange
except ImportError:  # pragma: no cover - exercised only without tqdm
    _trange = None


class SigmaError(ValueError):
    """A sigma list a sampler cannot integrate; the message says what is wrong and how to fix it."""


def check_sigmas(sigmas: torch.Tensor, sampler: str) -> torch.Tensor:
    """Validate a sampler's sigma list: 1-D, finite, non-negative, strictly decreasing.

    A list of one sigma means zero steps (the sampler returns its input unchanged, as ComfyUI's do).
    """
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1:
        raise SigmaError(f"{sampler}: sigmas must be a 1-D list, got shape {tuple(sigmas.shape)}.")
    if len(sigmas) == 0:
        raise SigmaError(f"{sampler}: the sigma list is empty; connect a scheduler with at least 1 step.")
    if not torch.isfinite(sigmas).all():
        raise SigmaError(f"{sampler}: sigmas contain NaN or infinity ({sigmas.tolist()}); check the scheduler.")
    if (sigmas < 0).any():
        raise SigmaError(f"{sampler}: sigmas must be >= 0, got {sigmas.tolist()}; check the scheduler.")
    if len(sigmas) > 1 and not (sigmas[1:] < sigmas[:-1]).all():
        raise SigmaError(
            f"{sampler}: sigmas must strictly decrease (noise to clean), got {sigmas.tolist()}; "
            "use FlipSigmas or fix the custom list."
        )
    return sigmas


def progress(total: int, disable: bool | None) -> Iterable[int]:
    if _trange is None:
        return range(total)
    return _trange(total, disable=disable)


def step_callback(callback: Callable | None, x: torch.Tensor, i: int, sigma: torch.Tensor,
                  denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
