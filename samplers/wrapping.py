"""Wrapping a sampler function: its model calls go through a proxy, so one wrapper serves every sampler.

A wrapper (Time-Shift, Omegance, AdaptiveDiffusion) changes what the denoiser returns, or which sigma the network
sees, without touching the sampler or the model: the sampler function is handed a :class:`DenoiserProxy` in
place of its model. The proxy keeps every attribute ComfyUI's samplers read from the model they are given
(``inner_model``, ``sigmas``...), holds the wrapper's state for one run, and wrappers stack, since a wrapped
sampler function is again a plain k-diffusion-signature function (pure torch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DenoiseFn = Callable[..., torch.Tensor]


class DenoiserProxy:
    """A k-diffusion denoiser ``model(x, sigma, **kw)`` whose call is replaced by ``fn(inner, x, sigma, **kw)``.

    Every other attribute is read from the wrapped denoiser, because ComfyUI's sampler functions reach through
    the model they are given (``model.inner_model.model_patcher``, ``model.inner_model.inner_model.model_sampling``).
    """

    def __init__(self, inner: DenoiseFn, fn: Callable[..., torch.Tensor]) -> None:
        self.__dict__["_inner"] = inner
        self.__dict__["_fn"] = fn

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        return self._fn(self._inner, x, sigma, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_inner"], name)


def wrap_sampler_function(sampler_fn: Callable, make_denoiser: Callable[..., DenoiserProxy],
                          on_finish: Callable[[DenoiserProxy], None] | None = None) -> Callable:
    """Wrap a sampler ``fn(model, x, sigmas, extra_args, callback, disable, **opts)`` so it samples through
    ``make_denoiser(model, x, sigmas)``; state lives in that proxy, so every run starts clean."""

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        proxy = make_denoiser(model, x, sigmas)
        try:
            return sampler_fn(proxy, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)
        finally:
            if on_finish is not None:
                on_finish(proxy)

    sampler.__name__ = getattr(sampler_fn, "__name__", "sampler")
    sampler.__doc__ = getattr(sampler_fn, "__doc__", None)
    return sampler


def per_sample_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, device=x.device)
    s = s.reshape(-1)
    return s.expand(x.shape[0]) if s.numel() == 1 else s


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector ``[B]`` to broadcast against ``x``."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))
