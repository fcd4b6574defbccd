"""GITS: a time schedule searched by dynamic programming on the user's own model.

Paper: Chen et al., "On the Trajectory Regularity of ODE-based Diffusion Sampling", arXiv:2405.11326
(ICML 2024; official code zju-pi/diff-sampler, ``gits-main``). Sampling trajectories of one model are strongly
alike, so a schedule fitted on a few warm-up trajectories serves every later sample. The search (Sec. 4,
Algorithm 1):

1. warm-up: noise samples are solved by a teacher on a fine grid of ``N`` steps, keeping every state ``X_i``
   and its derivative ``d_i = (X_i - D(X_i, sigma_i)) / sigma_i``. Teachers: ``ipndm`` (the official default)
   and ``dpmpp_2m`` (the official Stable Diffusion recipe runs its DPM-Solver++ code at order 2; it does so in
   noise prediction, this pack's 2M is the data-prediction form);
2. cost ``C[i, j]`` of a one-step jump from grid point ``i`` to ``j > i``: the Euler step from the teacher state,
   ``Y_ij = X_i + (sigma_j - sigma_i) d_i``, compared with the teacher by one of

   * ``dev`` (the official default, also in its Stable Diffusion recipe): how far ``Y_ij`` leaves the straight
     line through the trajectory's two ends, minus how far the teacher's ``X_j`` does. With ``A = X_0``,
     ``B = X_N`` and ``dev(p) = || (B - p) - <B - p, u> u ||``, ``u = (B - A) / ||B - A||``:
     ``C[i, j] = mean_b dev(Y_ij) - mean_b dev(X_j)`` (signed, as in the official code);
   * ``l2`` / ``l1``: ``mean_b || Y_ij - X_j ||`` on the state the sampler carries, unnormalised (official
     options; for Stable Diffusion the official state is the VE state ``x0 + sigma eps``, ComfyUI's own);
   * ``vp_l2``: ``l2`` divided by ``n(sigma_j) = sqrt(alpha^2 + sigma^2)``, i.e. measured on the
     variance-preserving state. Not in the official code: this pack's variant, which keeps errors at high
     noise (that later steps contract) from dominating the search;
3. dynamic programming picks the ``K``-step path from ``sigma_0`` to the last grid point with the least total
   cost, where each later jump is weighted by ``coeff`` (``V_k(i) = min_j C[i, j] + coeff V_{k-1}(j)``, the
   official code's recursion; official ``coeff`` 1.15 by default, 1.20 in its Stable Diffusion recipe).

The cost matrix depends on the model, its conditioning and CFG scale, and the latent shape, not on ``K``:
:class:`GITSTable` keeps it, so the schedule for any number of steps up to ``N`` is a cheap search.
Cost of a search: ``warmup x N`` model evaluations (twice that with CFG), the same as generating ``warmup``
images at ``N`` steps (the official recipes use 256 warm-up samples); the warm-up runs in chunks, and only one
chunk's ``N + 1`` states are held (on the CPU) at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from ..utils.noise_schedule import Parameterisation, check_parameterisation
from .common import Evaluation, History, bind_model, check_sigmas, run_steps
from .dpm_solver_pp import sample_dpmpp_multistep
from .time_shift import vp_norm

log = logging.getLogger("preprint")

Metric = Literal["dev", "l2", "l1", "vp_l2"]
METRICS: tuple[str, ...] = ("dev", "l2", "l1", "vp_l2")
Teacher = Literal["ipndm", "dpmpp_2m"]
TEACHERS: tuple[str, ...] = ("ipndm", "dpmpp_2m")

# Adams-Bashforth weights of iPNDM (Zhang and Chen, DEIS, arXiv:2204.13902), newest derivative first; the order
# grows from 1 with the history, which is what the official GITS teacher uses.
_IPNDM = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


class _IPNDMTeacher:
    """iPNDM as a step of :func:`run_steps` that keeps every state and derivative (float32, on the CPU)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.states = [x.detach().float().cpu()]
        self.derivs: list[torch.Tensor] = []
        self.history = History(len(_IPNDM))

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        d = (ev.x - ev.denoised) / ev.sigma
        newest_first = self.history.push(d)[::-1]
        weights = _IPNDM[len(newest_first) - 1]
        step = sum(w * h for w, h in zip(weights, newest_first, strict=True))
        x = ev.x + (ev.sigma_next - ev.sigma) * step
        self.derivs.append(d.detach().float().cpu())
        self.states.append(x.detach().float().cpu())
        return x


@torch.no_grad()
def ipndm_trajectory(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                     callback=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve with iPNDM on ``sigmas`` and keep the path: states ``[N+1, B, ...]`` and derivatives ``[N, B, ...]``
    (float32, on the CPU)."""
    sigmas = check_sigmas(sigmas, "GITS teacher")
    teacher = _IPNDMTeacher(x)
    run_steps(bind_model(model, extra_args), x, sigmas, teacher, callback, disable=True)
    return torch.stack(teacher.states), torch.stack(teacher.derivs)


def dpmpp_2m_trajectory(model, x: torch.Tensor, sigmas: torch.Tensor, kind: Parameterisation = "eps",
                        extra_args: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`ipndm_trajectory`, with DPM-Solver++(2M) as the teacher (the official Stable Diffusion recipe's)."""
    sigmas = check_sigmas(sigmas, "GITS teacher")
    states: list[torch.Tensor] = []
    derivs: list[torch.Tensor] = []

    def keep(info: dict) -> None:
        xi, sigma = info["x"], info["sigma"]
        states.append(xi.detach().float().cpu())
        derivs.append(((xi - info["denoised"]) / sigma).detach().float().cpu())

    last = sample_dpmpp_multistep(model, x, sigmas, extra_args, callback=keep, disable=True, order=2,
                                  parameterisation=kind, lower_order_final=True)
    states.append(last.detach().float().cpu())
    return torch.stack(states), torch.stack(derivs)


def teacher_trajectory(model, x: torch.Tensor, sigmas: torch.Tensor, teacher: Teacher = "ipndm",
                       kind: Parameterisation = "eps", extra_args: dict | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    if teacher == "ipndm":
        return ipndm_trajectory(model, x, sigmas, extra_args)
    if teacher == "dpmpp_2m":
        return dpmpp_2m_trajectory(model, x, sigmas, kind, extra_args)
    raise ValueError(f"GITS: teacher must be one of {TEACHERS}, got {teacher!r}")


def _deviation(points: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """``[M, B]`` distances of ``points [M, B, ...]`` from the line through ``start`` and ``end`` (per sample)."""
    axis = (end - start).flatten(1)
    unit = axis / axis.norm(dim=1, keepdim=True).clamp(min=1e-30)
    rel = (end[None] - points).flatten(2)
    along = (rel * unit[None]).sum(dim=2, keepdim=True)
    return (rel - along * unit[None]).norm(dim=2)


def cost_matrix(states: torch.Tensor, derivs: torch.Tensor, sigmas: torch.Tensor,
                kind: Parameterisation = "eps", metric: Metric = "dev") -> torch.Tensor:
    """``C[i, j]`` (``i < j``): mean over the batch of the error of the Euler jump ``i -> j`` against the
    teacher (see the module docstring for the metrics); ``inf`` elsewhere. ``states`` has one more entry than
    ``derivs``."""
    kind = check_parameterisation(kind)
    if metric not in METRICS:
        raise ValueError(f"GITS: metric must be one of {METRICS}, got {metric!r}")
    n = len(sigmas)
    if states.shape[0] != n or derivs.shape[0] != n - 1:
        raise ValueError("GITS: states must have one entry per sigma and derivatives one per step")
    s = sigmas.to(torch.float64)
    norm = vp_norm(s, kind)
    states = states.double()
    dev_teacher = _deviation(states, states[0], states[-1]).mean(dim=1) if metric == "dev" else None
    cost = torch.full((n, n), float("inf"), dtype=torch.float64)
    for i in range(n - 1):
        xi, di = states[i], derivs[i].double()
        dt = (s[i + 1:] - s[i]).reshape(-1, *([1] * xi.ndim))
        jumps = xi[None] + dt * di[None]  # [n-1-i, B, ...]
        if metric == "dev":
            cost[i, i + 1:] = _deviation(jumps, states[0], states[-1]).mean(dim=1) - dev_teacher[i + 1:]
            continue
        p = 1 if metric == "l1" else 2
        err = (jumps - states[i + 1:]).flatten(2).norm(p=p, dim=2).mean(dim=1)
        cost[i, i + 1:] = err / norm[i + 1:] if metric == "vp_l2" else err
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
    metric: str = "dev"
    teacher: str = "ipndm"

    @property
    def max_steps(self) -> int:
        return len(self.sigmas) - 1

    def schedule(self, steps: int, coeff: float | None = None) -> torch.Tensor:
        path = dp_search(self.cost, steps, self.coeff if coeff is None else coeff)
        return self.sigmas[path].to(torch.float32)


@dataclass
class CostAccumulator:
    """Averages the cost matrix over warm-up chunks, so only one chunk's trajectory is held at a time."""

    sigmas: torch.Tensor
    kind: Parameterisation = "eps"
    metric: Metric = "dev"
    total: torch.Tensor | None = None
    samples: int = 0

    def add(self, states: torch.Tensor, derivs: torch.Tensor) -> None:
        cost = cost_matrix(states, derivs, self.sigmas.cpu(), self.kind, self.metric)
        weighted = cost * states.shape[1]
        self.total = weighted if self.total is None else self.total + weighted
        self.samples += states.shape[1]

    def table(self, coeff: float, teacher: str) -> GITSTable:
        if self.total is None:
            raise RuntimeError("GITS: no warm-up samples were solved")
        cost = self.total / self.samples
        upper = torch.triu(torch.ones_like(cost, dtype=torch.bool), 1)
        if not torch.isfinite(cost[upper]).all():
            raise RuntimeError("GITS: the warm-up trajectories contain NaN or infinity; check the model and latent.")
        return GITSTable(self.sigmas.detach().cpu().to(torch.float64), cost, coeff, self.metric, teacher)


def search_table(model, x_warmup: torch.Tensor, fine_sigmas: torch.Tensor, kind: Parameterisation = "eps",
                 coeff: float = 1.15, extra_args: dict | None = None, metric: Metric = "dev",
                 teacher: Teacher = "ipndm", batch_size: int | None = None) -> GITSTable:
    """Run the teacher on the warm-up batch (already at ``fine_sigmas[0]``), ``batch_size`` samples at a time,
    and build the averaged cost matrix."""
    fine_sigmas = check_sigmas(fine_sigmas, "GITS")
    if len(fine_sigmas) < 3:
        raise ValueError("GITS: the teacher grid needs at least 2 steps")
    acc = CostAccumulator(fine_sigmas, kind, metric)
    for chunk in x_warmup.split(batch_size or x_warmup.shape[0]):
        acc.add(*teacher_trajectory(model, chunk, fine_sigmas, teacher, kind, extra_args))
    log.info("GITS: searched a %d-step grid on %d warm-up samples (%s teacher, %s cost)", len(fine_sigmas) - 1,
             x_warmup.shape[0], teacher, metric)
    return acc.table(coeff, teacher)
