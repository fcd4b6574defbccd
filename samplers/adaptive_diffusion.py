"""AdaptiveDiffusion: skip model calls while the trajectory is locally smooth.

Paper: Ye et al., "Training-Free Adaptive Diffusion with Bounded Difference Approximation
Strategy", arXiv:2410.09873 (NeurIPS 2024). The noise prediction changes little between steps where the
latent moves steadily. With ``d_k = mean |x_k - x_{k-1}|`` the first difference of the states, the paper's
third-order estimator (Sec. 3.3) tests whether the second difference of ``d`` is small relative to ``d``:

    | (d_k + d_{k-2}) / 2 - d_{k-1} |  <=  threshold * d_{k-1}

and, if so, reuses the previous noise prediction instead of calling the model; after ``max_skips``
consecutive reuses the model is called again, and the first ``warmup`` calls always run (4 in the official
code). Reusing "the noise prediction" for any parameterisation means reusing the raw output
``r = (x - D) / sigma`` (the noise for EPS models, the velocity for flow models): ``D = x - sigma r``.

The test runs on the states the sampler hands to the model, so it suits one-call-per-step samplers (Euler,
DPM-Solver++ 2M/3M, DEIS, iPNDM); with multi-stage samplers it sees the stage states as well. The decision is
made for the whole batch (one model call serves it), as in the official code. ``threshold = 0`` disables
skipping (the plain sampler, bit for bit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .wrapping import DenoiseFn, DenoiserProxy, bcast, per_sample_sigma, wrap_sampler_function

log = logging.getLogger("preprint")


@dataclass(frozen=True)
class AdaptiveConfig:
    threshold: float = 0.01
    max_skips: int = 4
    warmup: int = 4

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"AdaptiveDiffusion: threshold must be >= 0 (0 disables skipping), got {self.threshold}")
        if self.max_skips < 0:
            raise ValueError(f"AdaptiveDiffusion: max_skips must be >= 0, got {self.max_skips}")
        if self.warmup < 3:
            raise ValueError("AdaptiveDiffusion: warmup must be >= 3 (the criterion needs three differences)")


@dataclass
class SkipStats:
    """What one sampling run did: ``calls`` requested by the sampler, ``skipped`` of them answered from cache."""

    calls: int = 0
    skipped: int = 0
    skipped_calls: list[int] = field(default_factory=list)

    @property
    def model_calls(self) -> int:
        return self.calls - self.skipped


class AdaptiveSkipper:
    """Per-run state of the skip rule; call it as ``skipper(model, x, sigma, **kw)``."""

    def __init__(self, config: AdaptiveConfig) -> None:
        self.config = config
        self.stats = SkipStats()
        self._prev_x: torch.Tensor | None = None
        self._diffs: list[float] = []
        self._raw: torch.Tensor | None = None
        self._run_of_skips = 0

    def should_skip(self) -> bool:
        c = self.config
        if c.threshold <= 0 or c.max_skips == 0 or self._raw is None:
            return False
        if self.stats.calls < c.warmup or len(self._diffs) < 3:
            return False
        if self._run_of_skips >= c.max_skips:
            return False
        d_k, d_k1, d_k2 = self._diffs[-1], self._diffs[-2], self._diffs[-3]
        return abs((d_k + d_k2) / 2 - d_k1) <= c.threshold * d_k1

    def __call__(self, model: DenoiseFn, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._prev_x is not None and self._prev_x.shape == x.shape:
            self._diffs.append(float((x - self._prev_x).abs().mean()))
        self._prev_x = x
        s = per_sample_sigma(sigma, x)
        skip = self.should_skip() and bool((s > 0).all())
        index = self.stats.calls
        self.stats.calls += 1
        if skip:
            self.stats.skipped += 1
            self.stats.skipped_calls.append(index)
            self._run_of_skips += 1
            return x - bcast(s.to(x.dtype), x) * self._raw
        self._run_of_skips = 0
        denoised = model(x, sigma, **kwargs)
        if bool((s > 0).all()):
            self._raw = (x - denoised) / bcast(s.to(x.dtype), x)
        return denoised


class AdaptiveDiffusionSampler:
    """A sampler function wrapping ``sampler_fn`` with the skip rule; ``last_stats`` holds the latest run's
    :class:`SkipStats` (the node logs it; tests read it)."""

    def __init__(self, sampler_fn: Callable, config: AdaptiveConfig) -> None:
        self.config = config
        self.last_stats: SkipStats | None = None
        self._fn = wrap_sampler_function(sampler_fn, self._make, self._finish)
        self.__name__ = getattr(sampler_fn, "__name__", "sampler")

    def _make(self, model, x, sigmas) -> DenoiserProxy:
        return DenoiserProxy(model, AdaptiveSkipper(self.config))

    def _finish(self, proxy: DenoiserProxy) -> None:
        stats = proxy.__dict__["_fn"].stats
        self.last_stats = stats
        log.info("AdaptiveDiffusion: %d of %d model calls computed, %d saved (calls skipped: %s)",
                 stats.model_calls, stats.calls, stats.skipped, stats.skipped_calls)

    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        return self._fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)
