"""Optimal Stepsize (OSS): a few-step sigma schedule searched against a many-step teacher on the user's own model.

Pei, Hu and Gu, "Optimal Stepsize for Diffusion Sampling", arXiv:2503.21774 (official code bebebe666/OptimalSteps,
MIT, read for the details; this is our own writing of the method).

An Euler teacher of N steps solves the probability-flow ODE from the starting noise on a fine sigma grid and its
state x_j at every grid point is kept. A student of K steps may stop only at grid points. Dynamic programming over
(student steps k, grid point j), the paper's recurrence: the best k-step student state at j is the one-step jump,
from the best (k-1)-step student state at some earlier point i, that lands closest (mean squared error) to the
teacher's x_j,

    cost[k][j] = min_{i < j} || step(z[k-1][i], sigma_i -> sigma_j) - x_j ||^2,   z[k][j] = that jump,

so the DP keeps the student's own state for each (k, j), not the teacher's. The schedule is the path of
cost[K][N] (N: the grid's last point, sigma 0). The principle of optimality behind it (the state closest to the
teacher at j is the best one to continue from) is the paper's assumption, not a theorem: the tests measure how
often it gives the true K-subset optimum.

The student step is one Euler step in ComfyUI's sigma space, x_j = D + (sigma_j / sigma_i) (x_i - D). On EPS
models (x = x0 + sigma eps) and on flow models (x = (1 - sigma) x0 + sigma eps) that one step is also DDIM and
DPM-Solver-1, so the search scores the first-order update every sampler starts from; the schedule is then used
with any sampler. A jump to sigma 0 lands on the denoised prediction D itself.

Several samples: ``median`` (the paper) searches every sample on its own and takes the median grid index per step
(the official code averages the two middle values rounded down for an even count; for an odd count it averages
the middle one with the one below it, where this takes the middle one); ``mean`` (this pack's option) searches once
for the path with the least mean cost over the samples.

Cost: N teacher evaluations plus one per reachable DP state, N + (K - 1)(N - K + 1) denoiser evaluations of the
whole sample batch (the jumps from one state to every later grid point share that state's evaluation). The
teacher's first evaluation, at the shared starting noise, serves the DP's first level too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # D(x [B, ...], sigma [B]) -> x0 [B, ...]
Progress = Callable[[int, int], None]  # (evaluations done, evaluations in all)

AGGREGATES = ("median", "mean")
_CHUNK_ELEMENTS = 1 << 24  # jump candidates built at once: bounds the search's scratch memory to ~64 MB (float32)


def check_grid(sigmas: torch.Tensor) -> None:
    """A teacher grid: a 1-D list of at least two sigmas, strictly decreasing, none negative."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"the teacher grid must be a 1-D list of at least 2 sigmas, got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()) or float(sigmas[-1]) < 0.0:
        raise ValueError("the teacher grid must hold finite sigmas, none below 0")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("the teacher grid must be strictly decreasing (a repeated sigma is a zero-length step)")


def evaluations(teacher_steps: int, steps: int) -> int:
    """Denoiser evaluations (of the whole sample batch) a search costs: N teacher steps plus one evaluation per DP
    state that can still reach the end, (K - 1)(N - K + 1)."""
    return teacher_steps + (steps - 1) * (teacher_steps - steps + 1)


def euler_jump(x: torch.Tensor, denoised: torch.Tensor, sigma_from: float, sigma_to: torch.Tensor) -> torch.Tensor:
    """One Euler step of dx/dsigma = (x - D) / sigma from ``sigma_from`` to each of ``sigma_to`` ([J]): [J, *x.shape].
    Written as D + ratio (x - D) so that a jump to sigma 0 is D exactly."""
    ratio = (sigma_to.to(x) / sigma_from).reshape(-1, *([1] * x.ndim))
    return denoised.unsqueeze(0) + ratio * (x - denoised).unsqueeze(0)


def _sigma_batch(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(device=x.device, dtype=x.dtype).expand(x.shape[0])


@torch.no_grad()
def teacher_trajectory(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Euler teacher on the whole grid: (states [N + 1, B, ...] with states[0] = x, the first denoised
    prediction [B, ...])."""
    check_grid(sigmas)
    states = [x]
    first = None
    for i in range(len(sigmas) - 1):
        d = denoiser(x, _sigma_batch(sigmas[i], x))
        if first is None:
            first = d
        x = euler_jump(x, d, float(sigmas[i]), sigmas[i + 1 : i + 2])[0]
        states.append(x)
    return torch.stack(states), first


@dataclass
class OSSResult:
    sigmas: torch.Tensor  # [K + 1] the searched schedule (grid sigmas at ``indices``)
    indices: torch.Tensor  # [K + 1] grid indices, 0 (the grid's first sigma) ... N (its last)
    sample_indices: torch.Tensor  # [B, K + 1] every sample's own optimal path (all equal for ``mean``)
    sample_costs: torch.Tensor  # [B] the DP cost at the end (mean squared distance to the teacher): each sample's own
    # with aggregate "median", the batch mean repeated for every sample with "mean"
    evaluations: int  # denoiser evaluations of the sample batch


def median_path(paths: torch.Tensor) -> torch.Tensor:
    """Median grid index per step over samples ([B, K + 1] -> [K + 1]); an even count takes the two middle values'
    mean rounded down. Order statistics of strictly increasing rows are strictly increasing, and so are the rounded
    means of two of them, so the result is a valid path."""
    ordered = paths.sort(dim=0).values
    n = ordered.shape[0]
    if n % 2:
        return ordered[n // 2]
    return torch.div(ordered[n // 2 - 1] + ordered[n // 2], 2, rounding_mode="floor")


@torch.no_grad()
def search(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, steps: int, aggregate: str = "median",
           progress: Progress | None = None) -> OSSResult:
    """Search the ``steps``-step schedule on the teacher grid ``sigmas`` (strictly decreasing, N + 1 values) for
    the samples ``x`` ([B, ...], the starting states at ``sigmas[0]``). See the module docstring."""
    check_grid(sigmas)
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    n = len(sigmas) - 1
    if not 1 <= steps <= n:
        raise ValueError(f"steps ({steps}) must be between 1 and the teacher's steps ({n})")
    total, done = evaluations(n, steps), 0

    def counted(state: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal done
        out = denoiser(state, sigma)
        done += 1
        if progress is not None:
            progress(done, total)
        return out

    grid = sigmas.to(device=x.device, dtype=torch.float64)
    teacher, first = teacher_trajectory(counted, x, grid)

    batch = x.shape[0]
    per_jump = max(1, x[0].numel() * batch)
    chunk = max(1, _CHUNK_ELEMENTS // per_jump)
    # level k may stand at grid points k .. n - steps + k: fewer than k steps cannot get further, and the
    # remaining steps - k steps must still reach n
    current = torch.zeros_like(teacher)
    current[0] = x
    parents = []
    cost = None
    for k in range(1, steps + 1):
        lo, hi = k, n - steps + k
        new_cost = torch.full((n + 1, batch), torch.inf, dtype=torch.float64, device=x.device)
        parent = torch.full((n + 1, batch), -1, dtype=torch.long, device=x.device)
        nxt = torch.zeros_like(teacher)
        sources = [0] if k == 1 else range(k - 1, n - steps + k)
        for i in sources:
            d = first if k == 1 else counted(current[i], _sigma_batch(grid[i], x))
            for start in range(max(i + 1, lo), hi + 1, chunk):
                js = torch.arange(start, min(start + chunk, hi + 1), device=x.device)
                jumps = euler_jump(current[i], d, float(grid[i]), grid[js])
                c = (jumps - teacher[js]).to(torch.float64).pow(2).flatten(2).mean(-1)  # [J, B]
                if aggregate == "mean":
                    c = c.mean(1, keepdim=True).expand_as(c)
                if k > 1:  # a point no finite path reached is no source: its state is only a placeholder
                    c = torch.where(torch.isfinite(cost[i]), c, torch.inf)
                better = c < new_cost[js]
                new_cost[js] = torch.where(better, c, new_cost[js])
                parent[js] = torch.where(better, i, parent[js])
                keep = better.reshape(*better.shape, *([1] * (jumps.ndim - 2)))
                nxt[js] = torch.where(keep, jumps, nxt[js])
        if not bool(torch.isfinite(new_cost[hi]).all()):  # no finite path reaches this step's last point
            raise RuntimeError(_NON_FINITE.format(k=k))
        parents.append(parent)
        current, cost = nxt, new_cost
    paths = torch.empty((batch, steps + 1), dtype=torch.long)
    paths[:, steps] = n
    for k in range(steps, 0, -1):  # trace back from the last grid point
        if bool((paths[:, k] < 0).any()):  # a point reached only through non-finite costs has no parent
            raise RuntimeError(_NON_FINITE.format(k=k))
        paths[:, k - 1] = parents[k - 1].cpu().gather(0, paths[:, k].unsqueeze(0)).squeeze(0)
    indices = median_path(paths)
    return OSSResult(sigmas=sigmas[indices.to(sigmas.device)], indices=indices, sample_indices=paths,
                     sample_costs=cost[n].cpu(), evaluations=done)


_NON_FINITE = ("Optimal steps search: no path of {k} step(s) has a finite cost; the model returned NaN or inf during "
               "the search. Check the model (and its dtype: try float32) before searching again.")


@torch.no_grad()
def student_solution(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The student itself: Euler through ``sigmas`` from ``x`` (what a path of the search scores)."""
    for i in range(len(sigmas) - 1):
        d = denoiser(x, _sigma_batch(sigmas[i], x))
        x = euler_jump(x, d, float(sigmas[i]), sigmas[i + 1 : i + 2])[0]
    return x
