"""Optimal Stepsize (samplers/optimal_steps.py, arXiv:2503.21774) against references written here: the Euler
teacher and student, the DP recurrence read literally (per sample and on the batch-mean cost), a hand-built model
on which a zero-length "step" would beat every real one, and the search's refusals."""

from __future__ import annotations

import pytest
import torch

from preprint.samplers import optimal_steps as oss

from .conftest import flow_sigmas, get_problem, karras_sigmas

F64 = torch.float64


def _euler(x, d, s_from: float, s_to: float):
    return d + (s_to / s_from) * (x - d)


def naive_dp(model, x, grid, steps):
    """cost[k][j] = min_{i < j} ||step(z[k-1][i], sigma_i -> sigma_j) - x_j||^2 (mean over all elements: for a
    batch, the batch-mean cost), z[k][j] the student's own state; every (k, j, i) in plain loops, i < j only.
    Returns the traced path and its cost."""
    s = [float(v) for v in grid]
    n = len(s) - 1
    teacher = [x]
    for i in range(n):
        teacher.append(_euler(teacher[-1], model(teacher[-1], grid[i].expand(x.shape[0])), s[i], s[i + 1]))
    best = {(0, 0): (0.0, x, None)}
    for k in range(1, steps + 1):
        for j in range(k, n + 1):
            for i in range(j):
                if (k - 1, i) not in best:
                    continue
                z0 = best[k - 1, i][1]
                z = _euler(z0, model(z0, grid[i].expand(x.shape[0])), s[i], s[j])
                c = float(((z - teacher[j]) ** 2).mean())
                if (k, j) not in best or c < best[k, j][0]:
                    best[k, j] = (c, z, i)
    path = [n]
    for k in range(steps, 0, -1):
        path.append(best[k, path[-1]][2])
    return path[::-1], best[steps, n][0]


def _noise(p, grid, batch, seed):
    return p.model.prior_noise(batch, float(grid[0]), torch.Generator().manual_seed(seed))


def test_teacher_is_euler_on_every_grid_step():
    """states[0] is the start, states[j + 1] = D + (sigma_{j+1} / sigma_j)(x_j - D), the last (sigma 0) is the
    denoised prediction itself, and ``first`` is the prediction at the start."""
    p = get_problem("eps", 7.5)
    grid = karras_sigmas(6)
    x = _noise(p, grid, 2, 1)
    states, first = oss.teacher_trajectory(p.model, x, grid)
    assert states.shape == (7, *x.shape)
    assert torch.equal(states[0], x)
    torch.testing.assert_close(first, p.model(x, grid[0].expand(2)), rtol=0, atol=0)
    ref = x
    for j in range(6):
        d = p.model(ref, grid[j].expand(2))
        ref = _euler(ref, d, float(grid[j]), float(grid[j + 1]))
        torch.testing.assert_close(states[j + 1], ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(states[-1], d, rtol=0, atol=0)


def test_student_solution_is_euler_and_on_the_whole_grid_is_the_teacher():
    p = get_problem("flow", 3.5)
    grid = flow_sigmas(8)
    x = _noise(p, grid, 2, 2)
    states, _ = oss.teacher_trajectory(p.model, x, grid)
    assert torch.equal(oss.student_solution(p.model, x, grid), states[-1])
    sub = grid[[0, 3, 5, 8]]
    ref = x
    for i in range(3):
        ref = _euler(ref, p.model(ref, sub[i].expand(2)), float(sub[i]), float(sub[i + 1]))
    torch.testing.assert_close(oss.student_solution(p.model, x, sub), ref, rtol=1e-13, atol=1e-13)


def test_euler_jump_to_several_sigmas_at_once():
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    d = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    to = torch.tensor([4.0, 1.0, 0.25], dtype=F64)
    out = oss.euler_jump(x, d, 2.0, to)
    assert out.shape == (3, 2, 3)
    for m in range(3):
        torch.testing.assert_close(out[m], x + (float(to[m]) - 2.0) * (x - d) / 2.0, rtol=1e-15, atol=1e-15)


def _linear_model(sigmas: list[float], factors: list[float]):
    """D(x, sigma) = c(sigma) x with c given per grid sigma: every Euler jump is a product of scalars."""
    table = dict(zip(sigmas, factors, strict=False))

    def model(x, sigma):
        return torch.tensor([table[float(v)] for v in sigma], dtype=F64).reshape(-1, 1) * x

    return model


def test_a_step_always_moves_to_a_later_grid_point():
    """Every one of the K steps lands on a later grid point. On this linear model (found by search) a path that
    stood still for one step, [0, 3, 3, 6], would end 5 times closer to the teacher than any real 3-step path; the
    search must still return the literal recurrence's path (i < j), strictly increasing."""
    s = [8.4, 4.6, 3.6, 1.5, 0.34, 0.24, 0.0]
    model = _linear_model(s, [0.42, 0.12, 0.74, 0.38, 0.11, 0.96])
    grid = torch.tensor(s, dtype=F64)
    x = torch.ones(1, 1, dtype=F64)
    teacher, _ = oss.teacher_trajectory(model, x, grid)
    stood = float(((oss.student_solution(model, x, grid[[0, 3, 6]]) - teacher[-1]) ** 2).mean())
    result = oss.search(model, x, grid, 3)
    path, cost = naive_dp(model, x, grid, 3)
    assert result.indices.tolist() == path == [0, 2, 3, 6]
    assert float(result.sample_costs[0]) == pytest.approx(cost, rel=1e-12)
    assert cost > 5 * stood  # the trap is set: standing still would have "won"


def test_a_model_returning_nan_gives_no_schedule():
    """Costs that are NaN never beat the initial +inf, so no path reaches the end: the search says so (the model
    returned NaN or inf) rather than returning a made-up schedule."""
    grid = karras_sigmas(8)
    x = torch.ones(2, 3, dtype=F64)
    with pytest.raises(RuntimeError, match=r"^Optimal steps search: no path of 1 step\(s\) has a finite cost; .* NaN"):
        oss.search(lambda xx, s: xx * torch.nan, x, grid, 3)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_mean_aggregate_is_the_recurrence_on_the_batch_mean_cost(kind):
    """``mean``: one DP on the cost averaged over the samples (each sample carrying its own student state), the
    same path for all; the DP cost it reports for every sample is that path's batch-mean cost."""
    p = get_problem(kind, 7.5)
    grid = karras_sigmas(9) if kind == "eps" else flow_sigmas(9)
    x = _noise(p, grid, 3, 11)
    result = oss.search(p.model, x, grid, 4, "mean")
    path, cost = naive_dp(p.model, x, grid, 4)
    assert result.indices.tolist() == path
    assert (result.sample_indices == result.indices).all()
    teacher, _ = oss.teacher_trajectory(p.model, x, grid)
    replay = oss.student_solution(p.model, x, grid[path])
    per_sample = ((replay - teacher[-1]) ** 2).flatten(1).mean(1)
    assert float(per_sample.mean()) == pytest.approx(cost, rel=1e-10)
    torch.testing.assert_close(result.sample_costs, per_sample.mean().expand(3), rtol=1e-10, atol=0)
    assert float(per_sample.max() - per_sample.min()) > 1e-6  # the samples' own costs do differ


def test_result_fields_are_consistent():
    """sigmas = grid[indices] from the first grid point to the last, one sample path per row, K + 1 long, and the
    evaluation count of the docstring."""
    p = get_problem("eps", 7.5)
    grid = karras_sigmas(10)
    x = _noise(p, grid, 4, 3)
    r = oss.search(p.model, x, grid, 4)
    assert r.indices.shape == (5,) and r.sample_indices.shape == (4, 5) and r.sample_costs.shape == (4,)
    assert torch.equal(r.sigmas, grid[r.indices])
    assert int(r.indices[0]) == 0 and int(r.indices[-1]) == 10
    assert (r.sample_indices[:, 0] == 0).all() and (r.sample_indices[:, -1] == 10).all()
    assert bool((r.sample_indices[:, 1:] > r.sample_indices[:, :-1]).all())
    # an even count: the two middle values' mean, rounded down
    ordered = r.sample_indices.sort(0).values
    assert torch.equal(r.indices, (ordered[1] + ordered[2]) // 2)
    assert r.evaluations == 10 + 3 * 7 == oss.evaluations(10, 4)


def test_evaluation_count_formula():
    assert [oss.evaluations(10, k) for k in (1, 2, 3, 10)] == [10, 19, 26, 19]


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[3.0, 1.0, 0.0]], dtype=F64), "1-D"),
    (torch.tensor([3.0], dtype=F64), "at least 2"),
    (torch.tensor([float("inf"), 1.0, 0.0], dtype=F64), "finite"),
    (torch.tensor([3.0, float("nan"), 0.0], dtype=F64), "finite"),
    (torch.tensor([3.0, 1.0, -0.5], dtype=F64), "below 0"),
    (torch.tensor([3.0, 4.0, 0.0], dtype=F64), "strictly decreasing"),
])
def test_grid_refusals(bad, match):
    with pytest.raises(ValueError, match=match):
        oss.check_grid(bad)
    with pytest.raises(ValueError, match=match):
        oss.teacher_trajectory(lambda xx, s: xx, torch.ones(1, 2, dtype=F64), bad)
    oss.check_grid(torch.tensor([3.0, 0.0], dtype=F64))  # the smallest valid grid
