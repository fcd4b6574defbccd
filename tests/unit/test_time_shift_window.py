"""Time-Shift's candidate window at the ends of the schedule: the host's ``sigma(t)`` is only asked about trained
times, ``t`` in ``[0, 1]``, however far the window reaches past them."""

from __future__ import annotations

import pytest
import torch

from preprint.samplers.time_shift import TimeAxis, TimeShiftConfig, shifted_sigma


class _StrictAxis:
    """The flow axis (``t = sigma``) whose ``sigma(t)`` refuses untrained times and records what it was asked."""

    def __init__(self):
        self.asked: list[torch.Tensor] = []
        self.axis = TimeAxis(lambda s: s, self.sigma_of_t)

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        self.asked.append(t.clone())
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"sigma(t) asked about an untrained time: {t.min().item()} .. {t.max().item()}")
        return t


@pytest.mark.parametrize("sigma,lowest,highest", [(0.05, 0.0, 0.15), (0.95, 0.85, 1.0)])
def test_candidates_past_either_end_of_the_schedule_are_clamped_onto_it(sigma, lowest, highest):
    """A window of +-0.1 around t = 0.05 (or 0.95) reaches past t = 0 (or 1); those candidates are asked about as
    the end itself: exactly 0 (or 1), never -0.05 (or 1.05)."""
    strict = _StrictAxis()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = TimeShiftConfig(window=0.2, cutoff=0.0, resolution=10)  # candidates t - 0.1, t, t + 0.1
    out = shifted_sigma(x, torch.tensor([sigma, sigma], dtype=torch.float64), strict.axis, "flow", cfg)
    assert torch.isfinite(out).all()
    (asked,) = strict.asked
    assert asked.shape == (2, 3)
    assert float(asked.min()) == pytest.approx(lowest, abs=1e-12)
    assert float(asked.max()) == pytest.approx(highest, abs=1e-12)
