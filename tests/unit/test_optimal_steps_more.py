"""Optimal Stepsize (samplers/optimal_steps.py, arXiv:2503.21774): ties in the DP, the median over an odd number of
samples, a search whose model overflows the distance to the teacher partway, and that no autograd graph is built.
Expected values are derived by hand from the recurrence and the official code's conventions (bebebe666/OptimalSteps:
``if cost < dp[k][j]`` with the sources visited from the start of the run), or checked by replaying the student."""

from __future__ import annotations

import pytest
import torch

from preprint.samplers import optimal_steps as oss

F64 = torch.float64


# ------------------------------------------------------------------------------------------ ties


@pytest.mark.parametrize("steps", [2, 3, 5])
def test_ties_go_to_the_source_earliest_in_the_run(steps):
    """Data at one point and no noise: every jump lands on the teacher, every cost is exactly 0. A source replaces
    the kept one only when strictly better (the official code's ``cost < dp[k][j]``, sources visited from the
    start of the run), so each state (k, j) keeps the earliest source allowed at level k, grid point k - 1, and
    the trace from the last point N reads N <- K - 1 <- K - 2 <- ... <- 0."""
    x0 = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    grid = torch.tensor([12.0, 8.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.0], dtype=F64)
    result = oss.search(lambda xx, s: x0, x0.clone(), grid, steps)
    want = [*range(steps), 8]
    assert result.indices.tolist() == want
    assert result.sample_indices.tolist() == [want, want]
    assert result.sample_costs.tolist() == [0.0, 0.0]
    mean = oss.search(lambda xx, s: x0, x0.clone(), grid, steps, "mean")
    assert mean.indices.tolist() == want


# ------------------------------------------------------------------------------------------ median


def test_median_of_an_odd_number_of_paths_is_the_middle_order_statistic():
    """Five (and seven) sample paths: per step the median is the middle value of the sorted column, computed here
    with plain sorting; the columns are chosen so that no other order statistic equals it."""
    paths = torch.tensor([[0, 1, 4, 9],
                          [0, 5, 6, 9],
                          [0, 2, 8, 9],
                          [0, 3, 5, 9],
                          [0, 4, 7, 9]])
    want = [sorted(col)[2] for col in paths.T.tolist()]
    assert want == [0, 3, 6, 9]
    assert oss.median_path(paths).tolist() == want
    seven = torch.cat([paths, torch.tensor([[0, 6, 7, 9], [0, 1, 2, 9]])])
    assert oss.median_path(seven).tolist() == [sorted(col)[3] for col in seven.T.tolist()] == [0, 3, 6, 9]


# ------------------------------------------------------------------------------------------ overflowing costs


def _overflow_model():
    """A scalar model on the grid 16, 8, 4, 2, 1, 0 (all ratios powers of two, so every number below is exact). The
    teacher from x = 1 goes 1, 1/2, H/2, 0, 0, 0 (H = 2^600): D = 0 at sigma 16, D = H at 8, D = x - H at 4 and
    D = x at 2 and 1. Any jump that skips the excursion to H/2 misses the teacher by about H, whose square
    overflows float64: the DP state (k = 2, j = 3) is reached by no finite cost."""
    h = 2.0**600
    table = {16.0: (0.0, 0.0), 8.0: (0.0, h), 4.0: (1.0, -h), 2.0: (1.0, 0.0), 1.0: (1.0, 0.0)}

    def model(x, sigma):
        a, b = table[float(sigma[0])]
        return a * x + b

    return model, torch.tensor([16.0, 8.0, 4.0, 2.0, 1.0, 0.0], dtype=F64), torch.ones(1, 1, dtype=F64)


def test_a_point_reached_only_through_overflowing_costs_gives_no_made_up_path():
    """Three steps on the overflow model: either the search refuses (its non-finite message), or what it returns
    is a real student: a strictly increasing path from the first grid point to the last whose replayed Euler
    solution ends at the reported distance from the teacher. A path traced through the unreached state (2, 3)
    would be neither."""
    model, grid, x = _overflow_model()
    teacher, _ = oss.teacher_trajectory(model, x, grid)
    assert teacher.flatten().tolist() == [1.0, 0.5, 2.0**599, 0.0, 0.0, 0.0]
    try:
        result = oss.search(model, x, grid, 3)
    except RuntimeError as err:
        assert str(err).startswith("Optimal steps search: no path of ")
        assert "has a finite cost" in str(err)
        return
    path = result.indices.tolist()
    assert len(path) == 4 and path[0] == 0 and path[-1] == 5
    assert all(a < b for a, b in zip(path, path[1:], strict=False))
    replay = oss.student_solution(model, x, grid[path])
    assert float(((replay - teacher[-1]) ** 2).mean()) == float(result.sample_costs[0])


# ------------------------------------------------------------------------------------------ no autograd graph


def _param_model():
    """A denoiser with a trainable parameter, as an nn.Module's would be: its outputs require grad."""
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)

    def model(x, sigma):
        return w * x

    return model, w


def test_teacher_builds_no_autograd_graph():
    model, w = _param_model()
    grid = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0], dtype=F64)
    x = torch.ones(2, 3, dtype=F64)
    assert model(x, grid[:1]).requires_grad  # the model alone would record a graph
    states, first = oss.teacher_trajectory(model, x, grid)
    assert not states.requires_grad and states.grad_fn is None
    assert not first.requires_grad and first.grad_fn is None
    # the values are Euler's: D = x / 2, so each step multiplies by 1/2 + (sigma_{j+1} / sigma_j) / 2 = 3/4
    assert torch.equal(states[3], x * 0.75**3)  # dyadic numbers: exact


def test_student_solution_builds_no_autograd_graph():
    model, w = _param_model()
    sig = torch.tensor([8.0, 2.0, 0.0], dtype=F64)
    x = torch.ones(2, 3, dtype=F64)
    out = oss.student_solution(model, x, sig)
    assert not out.requires_grad and out.grad_fn is None
    # 8 -> 2: x / 2 + (1/4)(x / 2) = 5x / 8; 2 -> 0: D = 5x / 16
    assert torch.equal(out, x * 5.0 / 16.0)  # dyadic numbers: exact


def test_search_builds_no_autograd_graph():
    model, w = _param_model()
    grid = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0], dtype=F64)
    x = torch.ones(2, 3, dtype=F64)
    result = oss.search(model, x, grid, 2)
    assert not result.sample_costs.requires_grad and result.sample_costs.grad_fn is None
    assert not result.sigmas.requires_grad
