"""GITS: edges of the cost matrix, the dynamic programme and the warm-up, each against a hand derivation.

* ``dev`` is a distance from the chord through a trajectory's two ends (Chen et al., Sec. 4): it is a length, so
  it does not depend on the chord's length, short chords included, and a trajectory that returns to its start
  has a chord of one point, whose distance is the plain distance to it;
* the search's path is strictly increasing, ``0 = i_0 < ... < i_K = N``, whatever the matrix holds on and below
  its diagonal, and it fails loudly when no finite ``K``-jump path exists;
* the warm-up runs the whole batch at once unless ``batch_size`` says otherwise, prints no progress bars, and
  the DPM-Solver++(2M) teacher is the solver with its lower-order final step (first order at the end of a grid
  of fewer than 10 steps, i.e. an Euler step along the stored derivative).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from preprint.samplers.gits import (
    CostAccumulator,
    GITSTable,
    cost_matrix,
    dp_search,
    dpmpp_2m_trajectory,
    ipndm_trajectory,
    search_table,
)

INF = math.inf


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


class Denoiser:
    """A smooth, nonlinear per-element data prediction; records the batch size of every call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return 1.7 * torch.tanh(0.9 * x / (1.0 + s)) + 0.3 * torch.cos(3.0 * s) * x / (1.0 + s * s)


def _trajectory(n: int = 5, batch: int = 3, scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sig = torch.cat([torch.linspace(4.0, 0.5, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    states = scale * torch.randn(n + 1, batch, 2, 4, generator=g, dtype=torch.float64)
    derivs = scale * torch.randn(n, batch, 2, 4, generator=g, dtype=torch.float64)
    return sig, states, derivs


def _dev_by_hand(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """Distance of the point p from the line through a and b (from the point, when a = b)."""
    r = (b - p).flatten()
    ab = (b - a).flatten()
    if float(ab.norm()) == 0.0:
        return float(r.norm())
    u = ab / ab.norm()
    return float((r - (r @ u) * u).norm())


def _dev_cost_by_hand(states, derivs, sig, i, j) -> float:
    jump = states[i] + (sig[j] - sig[i]) * derivs[i]
    batch = states.shape[1]
    return sum(_dev_by_hand(jump[b], states[0, b], states[-1, b]) - _dev_by_hand(states[j, b], states[0, b],
                                                                                   states[-1, b])
               for b in range(batch)) / batch


# ---- cost matrix -----------------------------------------------------------------------------------------------

def test_dev_cost_on_a_short_chord_is_the_distance_from_it():
    """A trajectory whose ends are closer than 1 (here ~1e-3 apart): the cost is still the distance from the chord,
    so it scales with the trajectory (a length), exactly like the unit-scale one."""
    sig, states, derivs = _trajectory(seed=3)
    small = 1e-3
    assert float((states[-1] - states[0]).flatten(1).norm(dim=1).max()) * small < 0.1
    cost = cost_matrix(small * states, small * derivs, sig, "eps", "dev")
    for i, j in [(0, 1), (0, 5), (1, 3), (4, 5)]:
        want = _dev_cost_by_hand(small * states, small * derivs, sig, i, j)
        assert float(cost[i, j]) == pytest.approx(want, rel=1e-9, abs=1e-15)
    full = cost_matrix(states, derivs, sig, "eps", "dev")
    upper = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    assert torch.allclose(cost[upper], small * full[upper], rtol=1e-9, atol=0)


def test_dev_cost_of_a_trajectory_that_returns_to_its_start():
    """A sample whose last state equals its first: the chord is a point and the deviation is the distance from
    it; the cost stays finite (no 0 / 0)."""
    sig, states, derivs = _trajectory(seed=4)
    states[-1, 1] = states[0, 1]
    cost = cost_matrix(states, derivs, sig, "eps", "dev")
    upper = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    assert torch.isfinite(cost[upper]).all()
    for i, j in [(0, 2), (1, 4), (3, 5)]:
        assert float(cost[i, j]) == pytest.approx(_dev_cost_by_hand(states, derivs, sig, i, j), rel=1e-9)


def test_cost_matrix_rejects_a_trajectory_of_the_wrong_length():
    """States need one entry per sigma and derivatives one per step; either one alone being off is an error."""
    sig, states, derivs = _trajectory()
    extra = torch.cat([derivs, derivs[-1:]])
    for bad_states, bad_derivs in [(states, extra), (states, derivs[:-1]), (states[:-1], derivs),
                                   (torch.cat([states, states[-1:]]), derivs)]:
        with pytest.raises(ValueError, match="one entry per sigma"):
            cost_matrix(bad_states, bad_derivs, sig, "eps", "l2")


def test_table_rejects_a_non_finite_last_jump():
    """Only the jump N-1 -> N uses the last derivative: a NaN there leaves every other cost finite, and the table
    must still refuse it (the whole upper triangle is a cost a search may use)."""
    sig, states, derivs = _trajectory()
    derivs[-1, 0, 0, 0] = float("nan")
    cost = cost_matrix(states, derivs, sig, "eps", "l2")
    upper = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    bad = upper & ~torch.isfinite(cost)
    assert bad.nonzero().tolist() == [[4, 5]]
    acc = CostAccumulator(sig, "eps", "l2")
    acc.add(states, derivs)
    with pytest.raises(RuntimeError, match="NaN or infinity"):
        acc.table(1.15, "ipndm")


# ---- dynamic programme -----------------------------------------------------------------------------------------

def _brute_force(cost: torch.Tensor, steps: int, coeff: float) -> list[int]:
    """The best strictly increasing path 0 -> ... -> N, by enumeration."""
    n = cost.shape[0] - 1
    best, arg = INF, None
    for inner in itertools.combinations(range(1, n), steps - 1):
        path = [0, *inner, n]
        total = 0.0
        for a, b in reversed(list(zip(path[:-1], path[1:], strict=True))):
            total = float(cost[a, b]) + coeff * total
        if total < best:
            best, arg = total, path
    return arg


def test_search_path_is_strictly_increasing_whatever_the_diagonal_holds():
    """A cost of 0 for a zero-length jump (the diagonal) and for backward jumps must not let the path stand
    still or repeat its end. Hand check: 0 -> j -> 4 costs C[0, j] + 1.15 C[j, 4] = 2.15 / 2.05 / 2.35 for
    j = 1 / 2 / 3, so [0, 2, 4]; staying at 0 or reaching 4 early would cost 0.115 / 0.1."""
    cost = _t([[0.0, 1.0, 0.9, 1.2, 0.1],
               [0.0, 0.0, 1.0, 1.0, 1.0],
               [0.0, 0.0, 0.0, 1.0, 1.0],
               [0.0, 0.0, 0.0, 0.0, 1.0],
               [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert dp_search(cost, 2, 1.15) == [0, 2, 4]
    assert dp_search(cost, 1, 1.15) == [0, 4]
    g = torch.Generator().manual_seed(2)
    full = torch.rand(8, 8, generator=g, dtype=torch.float64)
    full.fill_diagonal_(0.0)
    for steps in (2, 3, 5):
        path = dp_search(full, steps, 1.15)
        assert all(a < b for a, b in zip(path[:-1], path[1:], strict=True)), path
        assert path == _brute_force(full, steps, 1.15)


def test_search_raises_when_no_finite_path_exists():
    """steps = 1 with an infinite direct jump, steps = 2 where every two-jump path is infinite (the direct jump
    being finite does not help) or NaN: no schedule exists, and the search says so."""
    direct_inf = _t([[INF, 1.0, INF], [INF, INF, 1.0], [INF, INF, INF]])
    assert dp_search(direct_inf, 2) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="no finite path"):
        dp_search(direct_inf, 1)
    no_two = _t([[INF, 1.0, 1.0, 0.5], [INF, INF, 1.0, INF], [INF, INF, INF, INF], [INF, INF, INF, INF]])
    assert dp_search(no_two, 1) == [0, 3]
    with pytest.raises(RuntimeError, match="no finite path"):
        dp_search(no_two, 2)
    nan_two = _t([[INF, 1.0, 0.5], [INF, INF, math.nan], [INF, INF, INF]])
    with pytest.raises(RuntimeError, match="no finite path"):
        dp_search(nan_two, 2)


def test_table_default_coeff_is_the_official_1_15():
    """Three two-jump paths whose weighted costs C[0, j] + coeff C[j, 4] are the lines 2 coeff, 1 + coeff and 2.5:
    the cheapest is j = 1 below coeff 1, j = 2 between 1 and 1.5, j = 3 above 1.5. A table made without a coeff
    searches as with the official 1.15 (j = 2)."""
    sig = _t([8.0, 4.0, 2.0, 1.0, 0.0])
    cost = torch.full((5, 5), INF, dtype=torch.float64)
    for (i, j), c in {(0, 1): 0.0, (0, 2): 1.0, (0, 3): 2.5, (1, 4): 2.0, (2, 4): 1.0, (3, 4): 0.0,
                      (0, 4): 10.0, (1, 2): 10.0, (1, 3): 10.0, (2, 3): 10.0}.items():
        cost[i, j] = c
    assert dp_search(cost, 2, 0.5) == [0, 1, 4] and dp_search(cost, 2, 2.0) == [0, 3, 4]
    default = GITSTable(sig, cost)
    assert torch.equal(default.schedule(2), sig[[0, 2, 4]].float())
    assert torch.equal(default.schedule(2), GITSTable(sig, cost, 1.15).schedule(2))


# ---- warm-up ---------------------------------------------------------------------------------------------------

def test_warm_up_runs_the_whole_batch_at_once_by_default():
    """Without batch_size one teacher pass solves the whole warm-up batch: one model call per grid step, each on
    all 4 samples (and batch_size 3 makes passes of 3 and 1)."""
    fine = _t([6.0, 2.0, 0.7, 0.0])
    x = 6.0 * torch.randn((4, 2, 3), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model = Denoiser()
    search_table(model, x, fine)
    assert model.batches == [4, 4, 4]
    model.batches.clear()
    search_table(model, x, fine, batch_size=3)
    assert model.batches == [3, 3, 3, 1, 1, 1]


@pytest.mark.parametrize("teacher", ["ipndm", "dpmpp_2m"])
def test_teacher_runs_print_no_progress_bar(teacher, capsys):
    """The search's teacher passes are internal: nothing is written to the console (one bar per pass otherwise)."""
    fine = _t([6.0, 2.0, 0.7, 0.2, 0.0])
    x = 6.0 * torch.randn((2, 2, 3), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    capsys.readouterr()
    search_table(Denoiser(), x, fine, teacher=teacher, batch_size=1)
    (ipndm_trajectory if teacher == "ipndm" else dpmpp_2m_trajectory)(Denoiser(), x, fine)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_dpmpp_teacher_ends_a_short_grid_with_a_first_order_step(kind):
    """Fewer than 10 steps, ending above 0: the last step is first order (DDIM), which on the sigma axis is the
    Euler step along the stored derivative d = (x - D(x)) / sigma: for alpha = 1 and for alpha = 1 - sigma alike
    x_t = (s_t / s) x + (1 - s_t / s) D = x + (s_t - s) d. The step before it is second order (not Euler)."""
    fine = _t([6.0, 2.5, 1.1, 0.5, 0.2] if kind == "eps" else [0.95, 0.8, 0.6, 0.4, 0.2])
    x = fine[0] * torch.randn((2, 3, 4), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    states, derivs = dpmpp_2m_trajectory(Denoiser(), x, fine, kind)
    s = fine.float()
    euler_last = states[-2] + (s[-1] - s[-2]) * derivs[-1]
    assert torch.allclose(states[-1], euler_last, rtol=1e-5, atol=1e-5), float((states[-1] - euler_last).abs().max())
    euler_before = states[-3] + (s[-2] - s[-3]) * derivs[-2]
    assert float((states[-2] - euler_before).abs().max()) > 1e-3
