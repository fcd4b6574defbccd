"""EVODiff on the exact-score mixture: convergence, the variance-optimised weights, bad input."""

from __future__ import annotations

import pytest
import torch

from preprint.samplers.common import SigmaError
from preprint.samplers.evodiff import _dot, _proj, sample_evodiff

from .conftest import get_problem, observed_order


def test_projection_is_per_sample_and_channel_and_clipped():
    b = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    a = 0.7 * b
    a[1, 2] = 5.0 * b[1, 2]
    coef = _proj(a, b)
    assert coef.shape == (2, 3, 1, 1)
    torch.testing.assert_close(coef[0].flatten(), torch.full((3,), 0.7, dtype=torch.float64))
    assert float(coef[1, 2]) == 2.0  # clipped to the official bound
    assert float(_proj(a, torch.zeros_like(b))[0, 0]) == 0.0  # no direction: no coefficient, no NaN
    torch.testing.assert_close(_dot(a, b)[0, 0, 0, 0], (a[0, 0] * b[0, 0]).sum())


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_converges_on_log_snr_uniform_steps(kind):
    """Measured: the variance-optimised weights make EVODiff first order on exact scores (documented)."""
    problem = get_problem(kind, schedule="uniform")
    steps = [10, 20, 40]
    errors = []
    for n in steps:
        sig = problem.sigmas(n)
        errors.append(problem.error(sample_evodiff(problem.model, problem.x_start.clone(), sig, disable=True,
                                                   parameterisation=kind), sig))
    overall = observed_order([errors[0], errors[-1]], [steps[0], steps[-1]])[0]
    assert errors[2] < errors[1] < errors[0], errors
    assert overall > 0.8, (errors, overall)


def test_one_call_per_step_callback_batch_determinism():
    problem = get_problem("eps", 7.5)
    sig = problem.sigmas(8)
    seen = []
    problem.model.calls = 0
    x1 = sample_evodiff(problem.model, problem.x_start.clone(), sig, disable=True,
                        callback=lambda d: seen.append(d["i"]))
    assert seen == list(range(8))
    assert problem.model.calls == 2 * 8  # one guided call (two branches) per step
    x2 = sample_evodiff(problem.model, problem.x_start.clone(), sig, disable=True)
    assert torch.equal(x1, x2)
    one = sample_evodiff(problem.model, problem.x_start[1:2].clone(), sig, disable=True)
    torch.testing.assert_close(one, x1[1:2])


def test_flow_from_sigma_one_and_bad_input():
    problem = get_problem("flow", 3.5)
    sig = problem.sigmas(6)
    out = sample_evodiff(problem.model, problem.x_start.clone(), sig, disable=True, parameterisation="flow")
    assert torch.isfinite(out).all() and problem.error(out, sig) < 0.1
    x = problem.x_start.clone()
    for bad in ([1.0, 2.0, 0.0], [0.5, -0.1], [float("nan"), 0.0]):
        with pytest.raises(SigmaError, match="sigmas"):
            sample_evodiff(problem.model, x, torch.tensor(bad, dtype=torch.float64), disable=True)
    assert torch.equal(sample_evodiff(problem.model, x, torch.tensor([0.9], dtype=torch.float64), disable=True), x)
    two = sample_evodiff(problem.model, x, torch.tensor([0.9, 0.0], dtype=torch.float64), disable=True,
                         parameterisation="flow")
    torch.testing.assert_close(two, problem.model(x, torch.tensor(0.9, dtype=torch.float64)))
