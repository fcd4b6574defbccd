"""DC-Solver's cascade polynomial regression (CPR): compensation ratios for an unseen step count and CFG (pure torch).

Paper: Zhao et al., "DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic Compensation",
arXiv:2409.03755, Sec. 3.4. Searched ratios (``samplers/dc_solver.py``) belong to one (NFE, CFG) setting; CPR
predicts them for any other setting of the same model with no search, as a cascade of polynomials:

    rho(i) = sum_k c_k x^k,              x = i / NFE  (i: the step index)
    c_k    = sum_j d_kj g^j,             g = CFG / 12   (quadratic)
    d_kj   = sum_l e_kjl n^l,            n = NFE / 50   (quadratic)

so the whole predictor is the tensor ``e[k, j, l]``. It is fitted by least squares in the same cascade: first a
polynomial in x through each searched setting's ratios (only the steps whose ratio acts: from index 2 on, see
``dc_solver.compensated``), then for each step count a quadratic in g through its settings' c_k, then a quadratic
in n through the step counts' d_kj. Each quadratic needs three distinct values, so a fit needs searches at three
or more step counts, each at three or more CFG scales: nine settings at least (a 3 x 3 grid). The paper ships
coefficients for SD2.1 only and no fitting code; the degree in x is a setting here (2 by default, the most a
5-step EPS search determines: its steps 2, 3 and 4).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

NFE_SCALE = 50.0  # n = NFE / 50
CFG_SCALE = 12.0  # g = CFG / 12
QUADRATIC = 3  # coefficients of each quadratic in the cascade (CFG and NFE stages)
MAX_CONDITION = 1e8  # a Vandermonde matrix worse than this cannot separate its points in float64 ratios
NEEDED = ("CPR needs searched ratios at 3 or more step counts, each searched at 3 or more CFG scales (9 settings "
          "at least, e.g. steps 5, 7, 10 x CFG 3, 5, 8)")


class SearchedSetting(NamedTuple):
    steps: int  # NFE of the searched run
    cfg: float
    ratios: torch.Tensor  # [steps], the searched ratios
    used: torch.Tensor  # [steps] bool: the steps whose ratio acts (dc_solver.compensated)


class CPRFit(NamedTuple):
    coefficients: torch.Tensor  # [degree + 1, 3, 3] float64: e[k, j, l] of x^k g^j n^l
    steps_range: tuple[int, int]  # step counts the fit saw (predictions outside extrapolate)
    cfg_range: tuple[float, float]


def _lstsq(points: torch.Tensor, values: torch.Tensor, degree: int, what: str, hint: str) -> torch.Tensor:
    """Least-squares polynomial of ``degree`` through (points, values[..., point]); values [m, P] -> [m, degree+1].

    A clear error when the points cannot determine the polynomial: too few distinct ones, or so close together
    that the fit is noise (the Vandermonde matrix's condition number says which)."""
    distinct = torch.unique(points).numel()
    if distinct < degree + 1:
        raise ValueError(f"{what}: {distinct} distinct value(s) cannot determine a degree-{degree} polynomial "
                         f"(it needs {degree + 1}). {hint}.")
    vander = points.unsqueeze(-1) ** torch.arange(degree + 1, dtype=points.dtype)
    cond = float(torch.linalg.cond(vander))
    if not cond < MAX_CONDITION:
        raise ValueError(f"{what}: the values {sorted(set(points.tolist()))} are too close together to determine a "
                         f"degree-{degree} polynomial (condition number {cond:.3g}); spread them further apart. "
                         f"{hint}.")
    # [P, D] a = [P, m]: one solve for every coefficient series at once
    return torch.linalg.lstsq(vander, values.T).solution.T


def fit_cpr(settings: Iterable[SearchedSetting], step_degree: int = 2) -> CPRFit:
    """The cascade least-squares fit of ``e[k, j, l]`` (module docstring) from searched settings of one model.

    Settings with the same (steps, cfg) all enter the least squares; a step count searched at fewer than three
    distinct CFG scales is an error naming it (the CFG stage could not be fitted for it)."""
    if not 0 <= step_degree <= 6:
        raise ValueError(f"DC-Solver CPR: step_degree must be 0 to 6, got {step_degree}.")
    settings = list(settings)
    if not settings:
        raise ValueError(f"DC-Solver CPR: no searched ratios were given. {NEEDED}.")
    by_steps: dict[int, list[tuple[float, torch.Tensor]]] = defaultdict(list)
    for s in settings:
        ratios = torch.as_tensor(s.ratios, dtype=torch.float64).reshape(-1)
        used = torch.as_tensor(s.used, dtype=torch.bool).reshape(-1)
        if ratios.numel() != s.steps or used.numel() != s.steps:
            raise ValueError(f"DC-Solver CPR: the {s.steps}-step setting at CFG {s.cfg:g} holds {ratios.numel()} "
                             f"ratios and {used.numel()} flags; both must equal its step count.")
        if not torch.isfinite(ratios[used]).all():
            raise ValueError(f"DC-Solver CPR: the {s.steps}-step ratios at CFG {s.cfg:g} are not finite "
                             f"({ratios.tolist()}); search that setting again.")
        x = torch.arange(s.steps, dtype=torch.float64)[used] / s.steps
        what = f"DC-Solver CPR: the {s.steps}-step search at CFG {s.cfg:g} ({int(used.sum())} compensated steps)"
        hint = "Lower step_degree, or search more steps (a ratio acts from step index 2 on)"
        c = _lstsq(x, ratios[used].unsqueeze(0), step_degree, what, hint)[0]  # stage 1: c_k of this setting
        by_steps[int(s.steps)].append((float(s.cfg), c))
    if len(by_steps) < QUADRATIC:
        raise ValueError(f"DC-Solver CPR: only {len(by_steps)} step count(s) were searched "
                         f"({_listing(by_steps)}). {NEEDED}.")
    d_rows, nfe = [], []
    for steps, found in sorted(by_steps.items()):
        g = torch.tensor([cfg for cfg, _ in found], dtype=torch.float64) / CFG_SCALE
        cs = torch.stack([c for _, c in found])  # [settings, degree + 1]
        what = f"DC-Solver CPR: the CFG scales of the {steps}-step searches ({_listing({steps: found})})"
        d_rows.append(_lstsq(g, cs.T, QUADRATIC - 1, what, NEEDED))  # stage 2: d_kj at this NFE, [degree + 1, 3]
        nfe.append(steps)
    n = torch.tensor(nfe, dtype=torch.float64) / NFE_SCALE
    d = torch.stack(d_rows)  # [step counts, degree + 1, 3]
    flat = d.reshape(len(nfe), -1).T  # one series in n per (k, j)
    what = f"DC-Solver CPR: the searched step counts {sorted(nfe)}"
    e = _lstsq(n, flat, QUADRATIC - 1, what, NEEDED).reshape(step_degree + 1, QUADRATIC, QUADRATIC)  # stage 3
    cfgs = [cfg for found in by_steps.values() for cfg, _ in found]
    return CPRFit(e, (min(nfe), max(nfe)), (min(cfgs), max(cfgs)))


def _listing(by_steps) -> str:
    return "; ".join(f"{steps} steps at CFG {', '.join(f'{cfg:g}' for cfg, _ in found)}"
                     for steps, found in sorted(by_steps.items()))


def predict_ratios(coefficients: torch.Tensor, steps: int, cfg: float) -> torch.Tensor:
    """CPR ratios [steps] (float64) for an NFE and CFG: the cascade evaluated at x = i / steps, i = 0 .. steps - 1.
    Ratios of steps that cannot be compensated (the first two) are predicted too; the sampler ignores them."""
    e = torch.as_tensor(coefficients, dtype=torch.float64)
    if e.ndim != 3 or e.shape[1:] != (QUADRATIC, QUADRATIC):
        raise ValueError(f"DC-Solver CPR: coefficients must have shape [degree + 1, 3, 3], got {tuple(e.shape)}.")
    if steps < 1:
        raise ValueError(f"DC-Solver CPR: steps must be at least 1, got {steps}.")
    powers = torch.arange(QUADRATIC, dtype=torch.float64)
    n_pow = (steps / NFE_SCALE) ** powers
    g_pow = (float(cfg) / CFG_SCALE) ** powers
    c = torch.einsum("kjl,j,l->k", e, g_pow, n_pow)  # c_k at this (NFE, CFG)
    x = torch.arange(steps, dtype=torch.float64) / steps
    return (x.unsqueeze(-1) ** torch.arange(e.shape[0], dtype=torch.float64)) @ c


def outside_range(fit_steps: Sequence[float], fit_cfg: Sequence[float], steps: int, cfg: float) -> str | None:
    """A warning when (steps, cfg) lies outside the settings a fit saw (CPR then extrapolates), else None."""
    parts = []
    if not fit_steps[0] <= steps <= fit_steps[1]:
        parts.append(f"{steps} steps (fitted on {fit_steps[0]:g} to {fit_steps[1]:g})")
    if not fit_cfg[0] <= cfg <= fit_cfg[1]:
        parts.append(f"CFG {cfg:g} (fitted on {fit_cfg[0]:g} to {fit_cfg[1]:g})")
    if not parts:
        return None
    return "CPR extrapolates to " + " and ".join(parts) + "; search that setting for exact ratios"
