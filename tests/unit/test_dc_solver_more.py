"""DC-Solver (samplers/dc_solver.py), more edges: which steps compensate for any lambda list, the final-sigma rule on
longer lists, the model's sigma argument, how many model outputs the sampler keeps alive, no autograd in the
k-sampler entry point, and the ratio search's pass count, tie-break and stop on a non-finite loss."""

from __future__ import annotations

import gc
import logging
import math
import weakref

import pytest
import torch

from preprint.samplers.dc_solver import (
    FIRST_COMPENSATED,
    compensated_lambdas,
    dc_unipc,
    sample_dc_solver,
    search_ratios,
)


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _smooth(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear data prediction, bounded away from 0 (values in [1.3, 1.7])."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
    return 1.5 + 0.2 * torch.tanh(x / (1.0 + s))


def _x(sigma0: float, seed: int = 0, shape=(2, 3, 4), dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (sigma0 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


# ---- compensated_lambdas: the definition, for any lambda list --------------------------------------------------

@pytest.mark.parametrize("values", [
    [0.0, 1.0, math.nan, 2.0, 3.0, 4.0],  # a non-finite lambda in the middle blocks the three steps that use it
    [-1.0, 0.5, 1.5, -math.inf, 2.0, 2.5, 3.0],
    [-math.inf, 0.1, 0.7, 1.2, 1.9],  # a flow list from sigma = 1
    [0.3, 0.9, 1.4, math.inf],  # a non-finite newest lambda
])
def test_compensated_lambdas_needs_the_three_lambdas_it_interpolates_all_finite(values):
    """Docstring definition: step i acts iff i >= 2 and lambda_{i-2}, lambda_{i-1}, lambda_i are all finite."""
    want = [i >= 2 and all(math.isfinite(values[j]) for j in (i - 2, i - 1, i)) for i in range(len(values))]
    assert FIRST_COMPENSATED == 2
    assert compensated_lambdas(_t(values)).tolist() == want


# ---- dc_unipc ---------------------------------------------------------------------------------------------------

def test_final_zero_becomes_half_the_last_sigma_on_a_five_point_list():
    """A final 0 becomes min(final_sigma, sigma_{N-1} / 2): with sigma_{N-1} = 0.0015 that is 0.00075, whatever the
    length of the list (here 5 points, so sigma_{N-1} is not the list's third entry)."""
    x = _x(5.0, seed=1)
    got = dc_unipc(_smooth, x, _t([5.0, 1.0, 0.4, 0.0015, 0.0]))
    want = dc_unipc(_smooth, x, _t([5.0, 1.0, 0.4, 0.0015, 0.00075]))
    assert torch.equal(got, want)
    # and the rule also holds where 0.001 is the smaller one
    assert torch.equal(dc_unipc(_smooth, x, _t([5.0, 1.0, 0.4, 0.05, 0.0])),
                       dc_unipc(_smooth, x, _t([5.0, 1.0, 0.4, 0.05, 0.001])))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_the_model_sees_each_listed_sigma_alike_at_every_call(dtype):
    """Every model call gets sigma_j broadcast over the batch, built the same way at every call: the same value as
    the list's entry and the same dtype as the first call's sigma (also for an integer state and sigma list)."""
    seen = []

    def model(x, sigma):
        seen.append(sigma.clone())
        return x * 0 + 1

    sig = torch.tensor([10, 5, 2, 1, 0], dtype=dtype)
    x = torch.arange(6, dtype=dtype).reshape(3, 2) * 10
    dc_unipc(model, x, sig)
    assert len(seen) == 4  # one call per step: sigmas 10, 5, 2, 1 (none at the final sigma)
    for j, s in enumerate(seen):
        assert s.shape == (3,)
        assert s.dtype == seen[0].dtype, (j, s.dtype, seen[0].dtype)
        assert s.tolist() == [float(sig[j])] * 3


@pytest.mark.parametrize("order", [1, 2, 3])
def test_a_model_output_is_released_once_four_calls_old(order):
    """The interpolation needs the newest three outputs and the multistep rule at most three (order <= 3): when the
    model is called for output n, output n - 4 is referenced by nothing and has been freed (CPython refcounting)."""
    refs: list[weakref.ref] = []
    alive_at_call = []

    def model(x, sigma):
        alive_at_call.append([r() is not None for r in refs])
        out = _smooth(x, sigma)
        refs.append(weakref.ref(out))
        return out

    sig = _t([14.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.0])
    gc.disable()  # refcounting alone must free it
    try:
        dc_unipc(model, _x(14.0, seed=2), sig, _t([1.0, 1.0, 0.9, 1.1, 0.8, 1.2, 0.95, 1.05]), order=order)
    finally:
        gc.enable()
    assert len(alive_at_call) == 8
    for n, alive in enumerate(alive_at_call):
        for j in range(n - 3):
            assert not alive[j], (n, j, alive)


def test_k_sampler_entry_point_builds_no_autograd_graph():
    """sample_dc_solver is inference: the model runs with autograd off and the result carries no graph, even for a
    state that requires grad and a model with trainable weights."""
    weight = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
    modes = []

    def model(x, sigma, **kwargs):
        modes.append(torch.is_grad_enabled())
        return weight * _smooth(x, sigma)

    x = _x(10.0, seed=3).requires_grad_(True)
    out = sample_dc_solver(model, x, _t([10.0, 4.0, 1.5, 0.5, 0.1, 0.0]),
                           ratios=_t([1.0, 1.0, 0.9, 1.1, 1.2]))
    assert modes and not any(modes)
    assert not out.requires_grad and out.grad_fn is None


# ---- search_ratios ---------------------------------------------------------------------------------------------

SEARCH_SIG = [8.0, 3.0, 1.0, 0.3, 0.0]  # 4 steps: index 2 and 3 compensate


@pytest.mark.parametrize("iterations", [-1, 0, 1, 3])
def test_search_runs_iterations_plus_one_sampler_passes(iterations):
    """iterations updates plus one scoring pass: max(iterations + 1, 0) passes of steps model calls each (one call
    per step: the first state, then the corrector's call at every step but the last); progress never passes its
    total."""
    calls = []
    seen = []

    def model(x, sigma):
        calls.append(1)
        return _smooth(x, sigma)

    sig = _t(SEARCH_SIG)
    steps = len(SEARCH_SIG) - 1
    noise = _x(8.0, seed=4)
    ref = torch.zeros_like(noise)
    result = search_ratios(model, noise, sig, ref, iterations=iterations,
                           progress_fn=lambda done, total: seen.append((done, total)))
    passes = max(iterations + 1, 0)
    assert len(calls) == passes * steps
    assert len(result.losses) == passes
    assert seen == [(p, iterations + 1) for p in range(1, passes + 1)]
    assert all(done <= total for done, total in seen)


def test_search_with_no_improvement_keeps_plain_unipc():
    """A float32 state and lr = 1e-12: every update moves rho by about 1e-12 (Adam's first steps are about lr in
    size), far below float32 resolution, so each compensated output and the loss are bit-identical to plain UniPC's.
    No iterate lowers the loss, so the best iterate is the first one: all ones."""
    sig = _t(SEARCH_SIG)
    noise = _x(8.0, seed=5, dtype=torch.float32)
    ref = torch.zeros_like(noise)
    result = search_ratios(_smooth, noise, sig, ref, iterations=4, lr=1e-12)
    assert len(result.losses) == 5 and len(set(result.losses)) == 1  # the tie this test is about
    plain = float(((dc_unipc(_smooth, noise, sig).double()) ** 2).mean())
    assert result.losses[0] == plain
    assert torch.equal(result.ratios, torch.ones(4, dtype=torch.float64))


def test_search_stops_at_the_first_non_finite_loss(caplog):
    """A reference holding NaN makes the first loss NaN: the search warns once, stops after that one pass (steps
    model calls), reports no loss and keeps the all-ones ratios."""
    calls = []

    def model(x, sigma):
        calls.append(1)
        return _smooth(x, sigma)

    sig = _t(SEARCH_SIG)
    noise = _x(8.0, seed=6)
    ref = torch.zeros_like(noise)
    ref[0, 0, 0] = math.nan
    with caplog.at_level(logging.WARNING, logger="preprint.samplers.dc_solver"):
        result = search_ratios(model, noise, sig, ref, iterations=5)
    warnings = [r for r in caplog.records if "loss became" in r.getMessage()]
    assert len(warnings) == 1
    assert len(calls) == len(SEARCH_SIG) - 1
    assert result.losses == []
    assert torch.equal(result.ratios, torch.ones(4, dtype=torch.float64))
