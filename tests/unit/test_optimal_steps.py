"""Optimal Stepsize (samplers/optimal_steps.py): the paper's dynamic programme against brute force and a naive
reading of its recurrence, and the searched schedules against hand-made ones on the exact-score mixtures."""

from __future__ import annotations

import itertools

import pytest
import torch

from preprint.samplers import optimal_steps as oss
from preprint.utils.gaussian_mixture import reference_solution

from .conftest import flow_sigmas, get_problem, karras_sigmas
from .test_optimal_steps_reference import naive_dp  # the paper's recurrence in plain loops

_REF: dict[tuple, torch.Tensor] = {}


def grid_for(kind: str, n: int) -> torch.Tensor:
    return karras_sigmas(n) if kind == "eps" else flow_sigmas(n)


def uniform_for(kind: str, n: int) -> torch.Tensor:
    """Uniform steps: in sigma from 14.6 to 0.03 then 0 (EPS), in t from 1 to 0 without shift (flow)."""
    if kind == "flow":
        return flow_sigmas(n, shift=1.0)
    s = torch.linspace(14.6, 0.03, n, dtype=torch.float64)
    return torch.cat([s, s.new_zeros(1)])


def exact_error(p, sigmas) -> float:
    """RMS error of Euler on ``sigmas`` against the exact ODE solution to sigma 0, on the problem's own batch."""
    key = (p.kind, p.cfg)
    if key not in _REF:
        _REF[key] = reference_solution(p.model, p.x_start, p.sigma_max, 0.0, steps=400)
    x = oss.student_solution(p.model, p.x_start.clone(), sigmas)
    return float(((x - _REF[key]) ** 2).mean().sqrt())


def noise(p, grid, batch, seed):
    return p.model.prior_noise(batch, float(grid[0]), torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def searched():
    """Schedules searched on 4 held-out noises (not the batch they are scored on), 60-step teacher."""
    out = {}
    for kind, cfg in (("eps", 7.5), ("flow", 1.0)):
        p = get_problem(kind, cfg)
        grid = grid_for(kind, 60)
        for k in (5, 10):
            out[kind, k] = oss.search(p.model, noise(p, grid, 4, 123), grid, k)
    return out


@pytest.mark.parametrize("kind,cfg", [("eps", 7.5), ("flow", 1.0)])
@pytest.mark.parametrize("steps", [5, 10])
def test_searched_schedule_beats_karras_and_uniform_against_the_exact_solution(kind, cfg, steps, searched):
    """On noise it was not searched on, Euler on the searched schedule is closer to the exact ODE solution than on
    Karras (EPS) / shift-3 linear (flow) or uniform steps of the same count (measured: 0.066 vs 0.107 (Karras) at
    EPS CFG 7.5, K 5; 0.064 vs 0.167 (shift-3) on flow, K 5; a 100-step teacher in benchmarks/optimal_steps.py)."""
    p = get_problem(kind, cfg)
    result = searched[kind, steps]
    assert len(result.sigmas) == steps + 1 and float(result.sigmas[-1]) == 0.0
    assert float(result.sigmas[0]) == float(grid_for(kind, 60)[0])
    e_oss = exact_error(p, result.sigmas)
    for name, rival in (("practical", p.sigmas(steps)), ("uniform", uniform_for(kind, steps))):
        assert e_oss < 0.85 * exact_error(p, rival), (name, e_oss)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_as_many_steps_as_the_teacher_is_the_teacher(kind):
    p = get_problem(kind, 1.0)
    grid = grid_for(kind, 9)
    x = noise(p, grid, 2, 5)
    result = oss.search(p.model, x, grid, 9)
    assert torch.equal(result.indices, torch.arange(10)) and torch.equal(result.sigmas, grid)
    assert float(result.sample_costs.max()) == 0.0  # the student walked the teacher's own steps


def brute_force(model, x, grid, steps):
    """The K-subset (first and last grid points fixed) whose Euler solution ends closest to the teacher's."""
    n = len(grid) - 1
    teacher, _ = oss.teacher_trajectory(model, x, grid)
    best = (float("inf"), None)
    for inner in itertools.combinations(range(1, n), steps - 1):
        path = [0, *inner, n]
        end = oss.student_solution(model, x, grid[path])
        best = min(best, (float(((end - teacher[-1]) ** 2).mean()), path))
    return best


@pytest.mark.parametrize("kind,cfg", [("eps", 1.0), ("eps", 7.5), ("flow", 7.5)])
@pytest.mark.parametrize("steps", [1, 2])
def test_up_to_two_steps_the_dp_is_the_brute_force_optimum(kind, cfg, steps):
    """With one or two student steps every DP state has a single path, so the paper's recurrence is exact."""
    p = get_problem(kind, cfg)
    grid = grid_for(kind, 10)
    for seed in range(3):
        x = noise(p, grid, 1, 100 + seed)
        result = oss.search(p.model, x, grid, steps)
        cost, path = brute_force(p.model, x, grid, steps)
        assert result.indices.tolist() == path
        assert float(result.sample_costs[0]) == pytest.approx(cost, rel=1e-9)


@pytest.mark.parametrize("kind,cfg", [("eps", 7.5), ("flow", 7.5)])
def test_longer_searches_come_close_to_the_brute_force_optimum(kind, cfg):
    """From three steps the principle of optimality is the paper's assumption: the closest state to the teacher at
    a grid point need not continue best. Measured on this 10-step grid: the DP finds the brute-force optimum in
    5 / 6 (EPS, CFG 7.5, K 3), 3 / 6 (K 4) and 6 / 6 (flow) of the noises, and is never more than 7% worse."""
    p = get_problem(kind, cfg)
    grid = grid_for(kind, 10)
    found = 0
    for seed, steps in itertools.product(range(3), (3, 4)):
        x = noise(p, grid, 1, 100 + seed)
        result = oss.search(p.model, x, grid, steps)
        cost, path = brute_force(p.model, x, grid, steps)
        assert cost <= float(result.sample_costs[0]) < 1.1 * cost
        found += result.indices.tolist() == path
    assert found >= 3


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_the_batched_search_is_the_recurrence_and_keeps_the_students_own_state(kind):
    """The vectorised DP (ranges of reachable points, chunks of jumps, a batch of samples) gives each sample the
    path of the naive recurrence, and its cost is the replayed student's distance to the teacher: the state kept at
    (k, j) is the student's own, not the teacher's."""
    p = get_problem(kind, 7.5)
    grid = grid_for(kind, 12)
    x = noise(p, grid, 3, 9)
    result = oss.search(p.model, x, grid, 4)
    teacher, _ = oss.teacher_trajectory(p.model, x, grid)
    for b in range(3):
        path, cost = naive_dp(p.model, x[b : b + 1], grid, 4)
        assert result.sample_indices[b].tolist() == path
        assert float(result.sample_costs[b]) == pytest.approx(cost, rel=1e-9)
        replay = oss.student_solution(p.model, x[b : b + 1], grid[path])
        assert float(result.sample_costs[b]) == pytest.approx(float(((replay - teacher[-1, b]) ** 2).mean()),
                                                              rel=1e-9)


def test_small_chunks_of_jumps_give_the_same_search(monkeypatch):
    p = get_problem("eps", 7.5)
    grid = grid_for("eps", 15)
    x = noise(p, grid, 2, 3)
    whole = oss.search(p.model, x, grid, 5)
    monkeypatch.setattr(oss, "_CHUNK_ELEMENTS", 1)  # one jump at a time
    chunked = oss.search(p.model, x, grid, 5)
    assert torch.equal(whole.sample_indices, chunked.sample_indices)
    assert torch.equal(whole.sample_costs, chunked.sample_costs)


@pytest.mark.parametrize("n,steps", [(12, 1), (12, 4), (20, 6), (8, 8)])
def test_model_evaluations_are_n_plus_one_per_reachable_state(n, steps):
    """N teacher evaluations plus (K - 1)(N - K + 1) for the DP's states, each on the whole batch; the progress
    callback counts them up to that total."""
    p = get_problem("flow", 1.0)  # CFG 1: one denoiser call per evaluation
    grid = grid_for("flow", n)
    x = noise(p, grid, 3, 1)
    seen = []
    before = p.model.calls
    result = oss.search(p.model, x, grid, steps, progress=lambda done, total: seen.append((done, total)))
    expected = n + (steps - 1) * (n - steps + 1)
    assert p.model.calls - before == expected == result.evaluations == oss.evaluations(n, steps)
    assert seen == [(i, expected) for i in range(1, expected + 1)]


def test_median_over_samples_is_each_samples_own_search():
    """``median``: every sample is searched alone (the batch does not mix them) and the schedule is the median
    grid index per step."""
    p = get_problem("eps", 7.5)
    grid = grid_for("eps", 16)
    x = noise(p, grid, 3, 24)
    together = oss.search(p.model, x, grid, 4, "median")
    for b in range(3):
        alone = oss.search(p.model, x[b : b + 1], grid, 4, "median")
        assert torch.equal(alone.indices, together.sample_indices[b])
    assert torch.equal(together.indices, together.sample_indices.median(dim=0).values)  # odd count: the middle
    assert not torch.equal(together.indices, together.sample_indices[0])  # on this noise the samples disagree


def test_median_path_of_an_even_count_rounds_the_middle_pair_down():
    paths = torch.tensor([[0, 2, 5, 9], [0, 3, 6, 9], [0, 1, 4, 9], [0, 4, 8, 9]])
    assert oss.median_path(paths).tolist() == [0, 2, 5, 9]  # (2+3)//2, (5+6)//2
    assert oss.median_path(paths[:1]).tolist() == [0, 2, 5, 9]
    odd = torch.tensor([[0, 2, 6, 9], [0, 4, 5, 9], [0, 3, 7, 9]])
    assert oss.median_path(odd).tolist() == [0, 3, 6, 9]  # per position: the path of no single sample


def test_mean_searches_one_path_for_the_least_mean_cost():
    p = get_problem("flow", 7.5)
    grid = grid_for("flow", 12)
    x = noise(p, grid, 3, 4)
    result = oss.search(p.model, x, grid, 3, "mean")
    assert (result.sample_indices == result.indices).all()
    # two steps: one path per state, so the mean-cost DP is the brute force over the middle point exactly
    two = oss.search(p.model, x, grid, 2, "mean")
    teacher, _ = oss.teacher_trajectory(p.model, x, grid)
    costs = {m: float(((oss.student_solution(p.model, x, grid[[0, m, 12]]) - teacher[-1]) ** 2).mean())
             for m in range(1, 12)}
    assert two.indices.tolist() == [0, min(costs, key=costs.get), 12]


def test_a_jump_to_sigma_zero_is_the_denoised_prediction():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    d = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    jumps = oss.euler_jump(x, d, 3.0, torch.tensor([1.5, 0.0], dtype=torch.float64))
    assert torch.equal(jumps[1], d)
    torch.testing.assert_close(jumps[0], x + (1.5 - 3.0) * (x - d) / 3.0)


def test_bad_input_is_refused():
    p = get_problem("eps", 1.0)
    grid = grid_for("eps", 6)
    x = noise(p, grid, 1, 0)
    with pytest.raises(ValueError, match="between 1 and"):
        oss.search(p.model, x, grid, 7)
    with pytest.raises(ValueError, match="between 1 and"):
        oss.search(p.model, x, grid, 0)
    with pytest.raises(ValueError, match="aggregate"):
        oss.search(p.model, x, grid, 3, "mode")
    with pytest.raises(ValueError, match="strictly decreasing"):
        oss.search(p.model, x, torch.tensor([14.6, 3.0, 3.0, 0.0], dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="below 0"):
        oss.search(p.model, x, torch.tensor([14.6, 3.0, -1.0], dtype=torch.float64), 2)


def test_exactly_k_steps_even_where_every_path_ties():
    """Data at one point: every Euler jump lands on the teacher, all paths cost 0. The search still returns K steps
    from the first to the last grid point (a DP that let fewer steps stand in for K would not)."""
    x0 = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = grid_for("eps", 12)
    x = x0.clone()  # no noise at all, so that every cost is exactly 0 (rounding breaks no tie)
    for steps in (1, 3, 6, 12):
        result = oss.search(lambda xx, s: x0, x, grid, steps)
        for path in (*result.sample_indices, result.indices):
            assert len(path) == steps + 1 and int(path[0]) == 0 and int(path[-1]) == 12
            assert bool((path[1:] > path[:-1]).all())
        assert float(result.sample_costs.max()) == 0.0
