"""The hard cells of the sampler benchmark (benchmarks/samplers_accuracy.md), with the calibrated solvers.

At CFG 7.5 on the exact-score mixture, every uncalibrated high-order solver diverges on EPS at 4-5 model calls
where Euler holds, and flow at 10 calls is won by a low-order method. Here, on the same problems, noises and error
measure as samplers_accuracy.py (distance to the exact zero-noise endpoint): DPM-Solver++ 2M (a check against that
table), DC-Solver plain (UniPC bh2 order 2, ratio 1), DC-Solver with ratios searched at the cell on 10 other
noises, DC-Solver with CPR-predicted ratios (fitted from searches at 3 step counts x CFG 5 / 10 / 12, none at the
cell), and DPM-Solver-v3 with statistics computed on the model (40 log-SNR points, 64 samples; order 2, pseudo-
corrector, lower-order final).

Run (about a minute and a half on one thread): OMP_NUM_THREADS=1 .venv/bin/python benchmarks/samplers_hard_cells.py
Writes benchmarks/results/samplers_hard_cells.{json,md}.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.samplers_accuracy import ZeroReference  # noqa: E402
from preprint.samplers import dpm_solver_v3 as v3  # noqa: E402
from preprint.samplers.dc_cpr import SearchedSetting, fit_cpr, predict_ratios  # noqa: E402
from preprint.samplers.dc_solver import compensated, dc_unipc, search_ratios  # noqa: E402
from preprint.samplers.dpm_solver_pp import sample_dpmpp_multistep  # noqa: E402
from preprint.utils.gaussian_mixture import MixtureDenoiser  # noqa: E402
from tests.unit.conftest import EVENT_SHAPE, Problem  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CFG = 7.5
CELLS = {"eps": (4, 5), "flow": (10,)}
LAMBDA_RANGE = {"eps": (-math.log(14.6), -math.log(0.03)), "flow": (math.log(0.02 / 0.98), math.log(0.995 / 0.005))}
CPR_GRID = {"eps": ((4, 6, 8), 1), "flow": ((8, 12, 15), 2)}  # (step counts searched, degree in step / NFE)
CPR_CFGS = (5.0, 10.0, 12.0)


def run() -> dict:
    rows = []
    for kind, nfes in CELLS.items():
        problem = Problem(kind, CFG)
        ref = ZeroReference(problem)
        train = problem.model.prior_noise(10, problem.sigma_max, torch.Generator().manual_seed(1234))

        def search(cfg: float, steps: int, kind=kind, problem=problem, train=train):
            m = MixtureDenoiser(problem.model.mixture, kind=kind, cond_weights=problem.model.cond_weights, cfg=cfg)
            fine = dc_unipc(m, train, problem.sigmas(200), parameterisation=kind)
            return search_ratios(m, train, problem.sigmas(steps), fine, parameterisation=kind).ratios

        steps_grid, degree = CPR_GRID[kind]
        fit = fit_cpr([SearchedSetting(n, c, search(c, n), compensated(problem.sigmas(n), kind))
                       for n in steps_grid for c in CPR_CFGS], degree)
        lo, hi = LAMBDA_RANGE[kind]
        stats = v3.compute_statistics(lambda x, s, problem=problem: problem.model(x, s), EVENT_SHAPE, kind, lo, hi,
                                      grid_points=40, samples=64, chunk=64, seed=0, dtype=torch.float64)
        for nfe in nfes:
            sig, x0 = problem.sigmas(nfe), problem.x_start
            cpr_name = f"DC-Solver, CPR (searched at {steps_grid} steps x CFG 5/10/12, degree {degree})"
            results = {
                "DPM-Solver++ 2M (check against samplers_accuracy)": sample_dpmpp_multistep(
                    problem.model, x0.clone(), sig, disable=True, order=2, parameterisation=kind),
                "DC-Solver plain (UniPC bh2, ratio 1)": dc_unipc(problem.model, x0, sig, parameterisation=kind),
                "DC-Solver, ratios searched at this cell": dc_unipc(problem.model, x0, sig, search(CFG, nfe),
                                                                    parameterisation=kind),
                cpr_name: dc_unipc(problem.model, x0, sig, predict_ratios(fit.coefficients, nfe, CFG),
                                   parameterisation=kind),
                "DPM-Solver-v3 (40 points, 64 samples)": v3.sample_dpm_solver_v3(
                    problem.model, x0.clone(), sig, disable=True, parameterisation=kind, statistics=stats, order=2,
                    corrector=True, lower_order_final=True, second_order="dpmsolver", predictor_pseudo=False,
                    corrector_pseudo=True),
            }
            for name, x in results.items():
                rows.append({"model": kind, "cfg": CFG, "nfe": nfe, "solver": name, "error": float(ref.error(x))})
                print(rows[-1], flush=True)
    return {"rows": rows}


def markdown(res: dict) -> str:
    table = json.loads((RESULTS / "samplers_accuracy.json").read_text()) if (RESULTS / "samplers_accuracy.json"
                                                                             ).exists() else None
    lines = ["# Hard cells of the sampler benchmark, with the calibrated solvers", "",
             "Run: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/samplers_hard_cells.py` "
             f"({res['minutes']} min). Error: distance to the exact zero-noise endpoint on the exact-score mixture, as "
             "in samplers_accuracy.md (same problems, noises and schedules); see the module docstring.", "",
             "| model | CFG | model calls | solver | error |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['cfg']} | {r['nfe']} | {r['solver']} | {r['error']:.3g} |")
    if table is None:
        return "\n".join(lines) + "\n"
    lines += ["", "Winner per cell, this table against samplers_accuracy.json's best:", ""]
    for kind, nfes in CELLS.items():
        for nfe in nfes:
            here = min((r for r in res["rows"] if r["model"] == kind and r["nfe"] == nfe), key=lambda r: r["error"])
            lines.append(f"- {kind}, CFG {CFG}, {nfe} calls: {here['solver']} {here['error']:.3g}"
                         f"{best_of_table(table, kind, nfe)}")
    return "\n".join(lines) + "\n"


def best_of_table(table: dict, kind: str, nfe: int) -> str:
    """samplers_accuracy's best sampler at this cell (its configs are keyed "<model> cfg <scale>")."""
    cell = table.get("configs", {}).get(f"{kind} cfg {CFG}", {})
    errors = {name: by_nfe[str(nfe)]["error"] for name, by_nfe in cell.items()
              if str(nfe) in by_nfe and isinstance(by_nfe[str(nfe)].get("error"), (int, float))}
    if not errors:
        return ""
    name = min(errors, key=errors.get)
    return f" (samplers_accuracy's best: {name} {errors[name]:.3g})"


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = run()
    res["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "samplers_hard_cells.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "samplers_hard_cells.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
