"""Where a model call sits in the sampling schedule, decided by its sigma, never by counting calls.

Samplers differ in how often they call the model per step: Euler once, Heun and DPM-Solver-2S twice (at the
next sigma or at an intermediate one), restarts and SDE samplers at sigmas of their own. A cache schedule
("refresh every third step") that counted calls would drift on all of them. Every policy here therefore maps
the call's sigma to a *step position* in the run's sigma list:

    u(s) = i + (sigma_i - s) / (sigma_i - sigma_{i+1})    for sigma_i >= s > sigma_{i+1},

so the first call of step i sits at u = i, an intermediate evaluation of step i at a fraction of the way to
i + 1, and Heun's corrector (evaluated at sigma_{i+1}) at u = i + 1, the same position as the next step's
own first call: both see the same noise level, so they get the same caching decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class StepClock:
    """Step positions of sigmas within one run's (descending) sigma list."""

    def __init__(self, sample_sigmas: Sequence[float] | torch.Tensor):
        sig = [float(s) for s in (sample_sigmas.tolist() if torch.is_tensor(sample_sigmas) else sample_sigmas)]
        if len(sig) < 2:
            raise ValueError(f"a sampling run needs at least two sigmas, got {len(sig)}")
        if any(b > a for a, b in zip(sig, sig[1:], strict=False)):
            raise ValueError("the run's sigmas must not increase; caching needs a descending sigma schedule")
        self.sigmas = sig
        self.steps = len(sig) - 1

    @staticmethod
    def sigma_of(value: float | torch.Tensor) -> float:
        """The scalar sigma of a call (ComfyUI passes a per-sample tensor whose entries are equal)."""
        if torch.is_tensor(value):
            return float(value.reshape(-1)[0].item())
        return float(value)

    def position(self, sigma: float | torch.Tensor) -> float:
        """Fractional step position u in [0, steps] (see the module docstring)."""
        s = self.sigma_of(sigma)
        sig = self.sigmas
        if s >= sig[0]:
            return 0.0
        for i in range(self.steps):
            hi, lo = sig[i], sig[i + 1]
            if s >= lo and s <= hi:
                if hi == lo:
                    return float(i)
                # a relative tolerance so float32 copies of the schedule's own sigmas land exactly on i
                if math.isclose(s, hi, rel_tol=1e-5, abs_tol=1e-9):
                    return float(i)
                if math.isclose(s, lo, rel_tol=1e-5, abs_tol=1e-9):
                    return float(i + 1)
                return i + (hi - s) / (hi - lo)
        return float(self.steps)

    def step(self, sigma: float | torch.Tensor) -> int:
        """The step a call belongs to: the integer part of its position, clipped to the last real step."""
        return min(int(math.floor(self.position(sigma) + 1e-9)), self.steps - 1)

    def progress(self, sigma: float | torch.Tensor) -> float:
        """Position as a fraction of the run, 0 at the first step and 1 at the end."""
        return self.position(sigma) / self.steps

