"""DPM-Solver-v3 statistics (samplers/dpm_solver_v3.py), edges: saved tensors round-trip, and a file missing one
of them is refused by name."""

import pytest
import torch

from preprint.samplers.dpm_solver_v3 import Statistics


def _stats():
    g = torch.Generator().manual_seed(0)
    lam = torch.linspace(-4.0, 5.0, 6, dtype=torch.float64)
    return Statistics(lam, 1.0 + 0.1 * torch.randn(6, 2, 3, generator=g), 0.1 * torch.randn(6, 2, 3, generator=g),
                      0.1 * torch.randn(6, 2, 3, generator=g))


def test_statistics_round_trip_through_their_tensors():
    stats = _stats()
    back = Statistics.from_tensors({k: v.clone() for k, v in stats.tensors().items()})
    assert isinstance(back, Statistics) and back.shape == (2, 3)
    for name in ("lambdas", "l", "s", "b"):
        assert torch.equal(getattr(back, name), getattr(stats, name)), name
    assert back.lambdas.dtype == torch.float64 and back.l.dtype == torch.float32


@pytest.mark.parametrize("dropped", ["lambdas", "l", "s", "b"])
def test_a_file_missing_a_tensor_is_refused_by_name(dropped):
    tensors = {k: v for k, v in _stats().tensors().items() if k != dropped}
    with pytest.raises(ValueError, match=rf"lacks \['{dropped}'\]; compute them again"):
        Statistics.from_tensors(tensors)
