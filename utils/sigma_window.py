"""The one sigma-interval type: the part of a run, by noise level, in which a technique is active.

Every node that takes a window uses it, whether the widgets give sigmas (``sigma_start`` / ``sigma_end``, -1 for
no limit) or fractions of the run (``start_percent`` / ``end_percent``, mapped through the model's own
``percent_to_sigma``). Sampling runs from high to low sigma, so the window is ``sigma_end <= sigma <=
sigma_start``, both ends inclusive; a negative bound means "no limit" on that side.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


class ScheduleError(ValueError):
    """A schedule or window that cannot be used; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class SigmaWindow:
    sigma_start: float = -1.0
    sigma_end: float = -1.0

    def __post_init__(self) -> None:
        for name in ("sigma_start", "sigma_end"):
            if math.isnan(getattr(self, name)):
                raise ScheduleError(f"{name} is NaN; use a sigma value, or -1 for no limit.")
        if self.sigma_start >= 0 and self.sigma_end >= 0 and self.sigma_start < self.sigma_end:
            raise ScheduleError(
                f"sigma_start ({self.sigma_start}) is below sigma_end ({self.sigma_end}), so the window would start "
                "after it ends (sampling runs from high to low sigma). Swap the two values, or set either to -1 for "
                "no limit.")

    @classmethod
    def from_percents(cls, percent_to_sigma: Callable[[float], float], start_percent: float,
                      end_percent: float) -> SigmaWindow:
        """The window between two fractions of the run (0 = first step, 1 = end), through the model's own map."""
        check_percents(start_percent, end_percent)
        return cls(float(percent_to_sigma(start_percent)), float(percent_to_sigma(end_percent)))

    @property
    def unlimited(self) -> bool:
        return self.sigma_start < 0 and self.sigma_end < 0

    def contains(self, sigma: float) -> bool:
        if self.sigma_start >= 0 and sigma > self.sigma_start:
            return False
        return not (self.sigma_end >= 0 and sigma < self.sigma_end)

    __contains__ = contains


def check_percents(start_percent: float | None, end_percent: float | None) -> None:
    """Reject a percent window that is out of range or reversed (``None``: a linked input, checked later)."""
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if value is not None and not 0.0 <= value <= 1.0:  # NaN fails too
            raise ScheduleError(f"{name} is {value}; it must lie in [0, 1] (0 = first step, 1 = end of the run).")
    if start_percent is not None and end_percent is not None and start_percent > end_percent:
        raise ScheduleError(f"start_percent ({start_percent}) is after end_percent ({end_percent}), so the window "
                            "would never be active (a run goes from 0 to 1). Swap the two values.")


def check_sigmas(sigma_start: float | None, sigma_end: float | None) -> None:
    """Reject a reversed or NaN sigma window (``None``: a linked input, checked when the node runs)."""
    if sigma_start is not None and sigma_end is not None:
        SigmaWindow(sigma_start, sigma_end)
