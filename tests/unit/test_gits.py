"""GITS: dynamic-programming schedule search, checked against brute force and on the exact mixture."""

from __future__ import annotations

import itertools

import pytest
import torch

from preprint.samplers.gits import GITSTable, cost_matrix, dp_search, ipndm_trajectory, search_table
from preprint.utils.gaussian_mixture import reference_solution

from .conftest import get_problem, log_snr_uniform_sigmas
from .test_omegance import euler

_REF: dict[str, torch.Tensor] = {}


def exact_error(p, x) -> float:
    """RMS error against the exact ODE solution all the way to sigma = 0 (schedules differ in their last sigma)."""
    if p.kind not in _REF:
        _REF[p.kind] = reference_solution(p.model, p.x_start, p.sigma_max, 0.0, steps=400)
    return float(((x.double() - _REF[p.kind]) ** 2).mean().sqrt())


def brute_force(cost, steps, coeff):
    n = cost.shape[0] - 1
    best, arg = float("inf"), None
    for inner in itertools.combinations(range(1, n), steps - 1):
        path = [0, *inner, n]
        total = 0.0
        for a, b in reversed(list(zip(path, path[1:], strict=False))):
            total = float(cost[a, b]) + coeff * total
        if total < best:
            best, arg = total, path
    return arg


@pytest.mark.parametrize("coeff", [1.0, 1.15, 0.8])
@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_dp_matches_brute_force(coeff, steps):
    g = torch.Generator().manual_seed(steps)
    n = 9
    cost = torch.rand(n + 1, n + 1, generator=g, dtype=torch.float64) * torch.arange(n + 1)[None] ** 0.5
    cost = torch.where(torch.triu(torch.ones(n + 1, n + 1, dtype=torch.bool), 1), cost, torch.inf)
    assert dp_search(cost, steps, coeff) == brute_force(cost, steps, coeff)


def test_cost_matrix_is_zero_along_the_teacher_for_exact_euler_steps():
    """When the teacher is Euler on a linear ODE segment, one-step jumps along it cost nothing."""
    sig = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    d = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    states = torch.stack([x + (s - 4.0) * d for s in sig])
    derivs = torch.stack([d] * 3)
    cost = cost_matrix(states, derivs, sig)
    upper = cost[torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)]
    assert torch.allclose(upper, torch.zeros_like(upper), atol=1e-10)
    assert torch.isinf(cost[2, 1]) and torch.isinf(cost[1, 1])


@pytest.fixture(scope="module")
def tables():
    out = {}
    for kind in ("eps", "flow"):
        p = get_problem(kind)
        warm = p.model.prior_noise(8, p.sigma_max, torch.Generator().manual_seed(123))  # held-out noise
        out[kind] = search_table(p.model, warm, p.sigmas(60), kind, coeff=1.0)
    return out


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_schedule_shape(kind, tables):
    table = tables[kind]
    assert table.max_steps == 60
    for n in (1, 4, 13, 60):
        s = table.schedule(n)
        assert len(s) == n + 1 and float(s[-1]) == 0.0 and (s[1:] < s[:-1]).all()
        assert float(s[0]) == pytest.approx(float(table.sigmas[0]))
    with pytest.raises(ValueError, match="teacher steps"):
        table.schedule(61)


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("nfe", [5, 6, 8, 10])
def test_searched_schedule_beats_handmade_at_equal_nfe(kind, nfe, tables):
    """The search scores Euler jumps against the iPNDM teacher. With Euler the searched schedule beats Karras (EPS)
    or shifted-linear (flow) and, on EPS, log-SNR-uniform steps at every NFE; with iPNDM it beats the practical
    schedules at every NFE and log-SNR-uniform from NFE 6 (at NFE 5 log-SNR-uniform iPNDM is 6% better).
    (The flow log-SNR-uniform list starts at sigma 0.98, not at the prior's 1, so it is not a fair rival there.)"""
    p = get_problem(kind)
    gits = tables[kind].schedule(nfe).double()
    for solver in ("euler", "ipndm"):
        rivals = {"practical": p.sigmas(nfe)}
        if kind == "eps" and (solver == "euler" or nfe >= 6):
            rivals["log_snr_uniform"] = log_snr_uniform_sigmas(nfe, kind)

        def solve(sig, solver=solver):
            if solver == "euler":
                return euler(p.model, p.x_start.clone(), sig)
            return ipndm_trajectory(p.model, p.x_start.clone(), sig)[0][-1]

        e_gits = exact_error(p, solve(gits))
        for name, sig in rivals.items():
            assert e_gits < exact_error(p, solve(sig)), (solver, name, e_gits)


def test_table_schedule_is_reused_for_any_step_count(tables):
    t = tables["eps"]
    again = GITSTable(t.sigmas, t.cost, t.coeff)
    assert torch.equal(again.schedule(7), t.schedule(7))
    with pytest.raises(ValueError, match="coeff"):
        t.schedule(7, coeff=0.0)
