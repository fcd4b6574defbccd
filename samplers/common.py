"""Shared sampler plumbing: sigma validation, progress, callbacks and the step loop (pure torch)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

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


class Evaluation(NamedTuple):
    """One model evaluation of a sampling run, as the step that follows it sees it."""

    i: int  # index of the step in the sigma list
    x: torch.Tensor  # the current state (already corrected by this evaluation, where the solver corrects)
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    denoised: torch.Tensor


Step = Callable[[Evaluation], torch.Tensor]
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bind_model(model: Callable[..., torch.Tensor], extra_args: dict | None) -> Denoise:
    """``model(x, sigma, **extra_args)`` as the two-argument data prediction :func:`run_steps` calls."""
    extra_args = {} if extra_args is None else extra_args

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model(x, sigma, **extra_args)

    return denoise


class History:
    """The newest ``size`` values of a per-step quantity, oldest first (the window of a multistep rule)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[torch.Tensor] = []

    def push(self, value: torch.Tensor) -> list[torch.Tensor]:
        self.items = (self.items + [value])[-self.size:]
        return self.items


def run_steps(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, step: Step, callback: Callable | None = None,
              disable: bool | None = None, correct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
              ) -> torch.Tensor:
    """The loop the solvers here share: at every listed sigma, evaluate the model, report, and step.

    ``denoise(x, sigma_batch)`` is the data prediction and ``step(evaluation)`` returns the next state; a step keeps
    what it needs of earlier evaluations itself (see :class:`History`) and may call the model again (singlestep
    solvers). ``correct(x, denoised)`` lets a predictor-corrector revise the state with the new evaluation before
    it is reported, so its corrector costs no extra model call.
    """
    s_in = x.new_ones([x.shape[0]])
    for i in progress(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma * s_in)
        if correct is not None:
            x = correct(x, denoised)
        step_callback(callback, x, i, sigma, denoised)
        x = step(Evaluation(i, x, sigma, sigma_next, denoised))
    return x
