"""GITS: a time schedule searched by dynamic programming on the user's own model.

Paper: Chen et al., "On the Trajectory Regularity of ODE-based Diffusion Sampling", arXiv:2405.11326
(ICML 2024). Sampling trajectories of one model are strongly alike, so a schedule fitted on a few warm-up
trajectories serves every later sample. The search (Sec. 4, Algorithm 1):

1. warm-up: a few noise samples are solved by a teacher (iPNDM) on a fine grid of ``N`` steps, keeping every
   state ``X_i`` and its derivative ``d_i = (X_i - D(X_i, sigma_i)) / sigma_i``;
2. cost of a one-step jump from grid point ``i`` to ``j > i``: the Euler step from the teacher state,
   ``C[i, j] = mean_b || X_i + (sigma_j - sigma_i) d_i - X_j ||_2 / n(sigma_j)``. The official code measures
   the error on the state the sampler carries, which for its Stable Diffusion runs is the variance-preserving
   latent; ComfyUI carries ``x = alpha x0 + sigma eps`` instead, so the error is divided by
   ``n(sigma) = sqrt(alpha^2 + sigma^2)`` to measure it on the same VP state (without it, errors at high noise,
   which later steps contract, dominate the search and it loses to Karras on EPS models);
3. dynamic programming picks the ``K``-step path from ``sigma_0`` to the last grid point with the least total
   cost, where each later jump is weighted by ``coeff`` (``V_k(i) = min_j C[i, j] + coeff V_{k-1}(j)``, the
   official code's recursion; ``coeff`` 1.1 to 1.2 favours accuracy near the end of the run).

The cost matrix depends on the model, its conditioning and CFG scale, and the latent shape, not on ``K``:
:class:`GITSTable` keeps it, so the schedule for any number of steps up to ``N`` is a cheap search.
Cost of a search: ``warmup x N`` model evaluations (twice that with CFG), the same as generating ``warmup``
images at ``N`` steps; memory: ``N + 1`` copies of the warm-up batch on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..utils.noise_schedule import Parameterisation, check_parameterisation
from .common import check_sigmas
from .time_shift import vp_norm

log = logging.getLogger("preprint")

# Adams-Bashforth weights of iPNDM (Zhang and Chen, DEIS, arXiv:2204.13902), newest derivative first; the order
# grows from 1 with the history, which is what the official GITS teacher uses.
_IPNDM = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@torch.no_grad()
def ipndm_trajectory(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                     callback=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve with iPNDM on ``sigmas`` and keep the path: states ``[N+1, B, ...]`` and derivatives ``[N, B, ...]``
    (float32, on the CPU)."""
    extra_args = {} if extra_args is None else extra_args
    sigmas = check_sigmas(sigmas, "GITS teacher")
    s_in = x.new_ones([x.shape[0]])
    states = [x.detach().float().cpu()]
    derivs: list[torch.Tensor] = []
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        d = (x - denoised) / sigma
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        history = ([d] + history)[:4]
        weights = _IPNDM[len(history) - 1]
        step = sum(w * h for w, h in zip(weights, history, strict=True))
        x = x + (sigma_next - sigma) * step
        derivs.append(d.detach().float().cpu())
        states.append(x.detach().float().cpu())
    return torch.stack(states), torch.stack(derivs)


def cost_matrix(states: torch.Tensor, derivs: torch.Tensor, sigmas: torch.Tensor,
                kind: Parameterisation = "eps") -> torch.Tensor:
    """``C[i, j]`` (``i < j``): mean over the batch of the L2 error of the Euler jump ``i -> j`` against the
    teacher state ``j``, on the VP state; ``inf`` elsewhere. ``states`` has one more entry than ``derivs``."""
    kind = check_parameterisation(kind)
    n = len(sigmas)
    if states.shape[0] != n or derivs.shape[0] != n - 1:
        raise ValueError("GITS: states must have one entry per sigma and derivatives one per step")
    s = sigmas.to(torch.float64)
    norm = vp_norm(s, kind)
    cost = torch.full((n, n), float("inf"), dtype=torch.float64)
    for i in range(n - 1):
        xi, di = states[i].double(), derivs[i].double()
        dt = (s[i + 1:] - s[i]).reshape(-1, *([1] * xi.ndim))
        jumps = xi[None] + dt * di[None]  # [n-1-i, B, ...]
        err = (jumps - states[i + 1:].double()).flatten(2).norm(dim=2).mean(dim=1)
        cost[i, i + 1:] = err / norm[i + 1:]
    return cost


def dp_search(cost: torch.Tensor, steps: int, coeff: float = 1.15) -> list[int]:
    """Indices ``0 = i_0 < ... < i_K = N`` of the ``K = steps``-jump path minimising
    ``C[i_0, i_1] + coeff (C[i_1, i_2] + coeff (...))``."""
    n = cost.shape[0]
    if not 1 <= steps <= n - 1:
        raise ValueError(f"GITS: steps must be between 1 and the {n - 1} steps of the searched grid, got {steps}; "
                         "run the search with more teacher steps.")
    if coeff <= 0:
        raise ValueError(f"GITS: coeff must be > 0, got {coeff}")
    last = n - 1
    values = [cost[:, last].clone()]  # V_1(i): one jump to the end
    choices: list[torch.Tensor] = [torch.full((n,), last, dtype=torch.long)]
    valid = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    valid[:, last] = False  # intermediate points only; the end is reached by V_1
    for _ in range(2, steps + 1):
        total = cost + coeff * values[-1][None, :]
        total = torch.where(valid, total, torch.full_like(total, float("inf")))
        best, arg = total.min(dim=1)
        values.append(best)
        choices.append(arg)
    path, i = [0], 0
    for k in range(steps, 0, -1):
        i = int(choices[k - 1][i])
        path.append(i)
    if path[-1] != last or not torch.isfinite(values[-1][0]):
        raise RuntimeError("GITS: no finite path found; the cost matrix has NaN or infinite entries.")
    return path


@dataclass
class GITSTable:
    """A finished search: the fine grid and its one-step cost matrix (enough to serve any step count)."""

    sigmas: torch.Tensor  # [N + 1], decreasing, the teacher's grid
    cost: torch.Tensor  # [N + 1, N + 1]
    coeff: float = 1.15

    @property
    def max_steps(self) -> int:
        return len(self.sigmas) - 1

    def schedule(self, steps: int, coeff: float | None = None) -> torch.Tensor:
        path = dp_search(self.cost, steps, self.coeff if coeff is None else coeff)
        return self.sigmas[path].to(torch.float32)


def search_table(model, x_warmup: torch.Tensor, fine_sigmas: torch.Tensor, kind: Parameterisation = "eps",
                 coeff: float = 1.15, extra_args: dict | None = None) -> GITSTable:
    """Run the teacher on the warm-up batch (already at ``fine_sigmas[0]``) and build the cost matrix."""
    fine_sigmas = check_sigmas(fine_sigmas, "GITS")
    if len(fine_sigmas) < 3:
        raise ValueError("GITS: the teacher grid needs at least 2 steps")
    states, derivs = ipndm_trajectory(model, x_warmup, fine_sigmas, extra_args)
    cost = cost_matrix(states, derivs, fine_sigmas.cpu(), kind)
    if not torch.isfinite(cost[torch.triu(torch.ones_like(cost, dtype=torch.bool), 1)]).all():
        raise RuntimeError("GITS: the warm-up trajectories contain NaN or infinity; check the model and latent.")
    log.info("GITS: searched a %d-step grid on %d warm-up samples", len(fine_sigmas) - 1, x_warmup.shape[0])
    return GITSTable(fine_sigmas.detach().cpu().to(torch.float64), cost, coeff)
