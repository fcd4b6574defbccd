"""DPM-Solver-v3 with statistics computed on the model against DPM-Solver++ on the exact-score Gaussian mixture.

Run:  .venv/bin/python benchmarks/dpm_solver_v3.py                (about 2 minutes on one CPU thread)
      .venv/bin/python benchmarks/dpm_solver_v3.py --samples 32 --grid 30     (a quick look)

Problems: the conditional mixture of tests/unit/conftest.py in a latent-shaped space (4, 8, 8), batch 4; EPS/VE
(Karras sigmas 14.6 -> 0.03 -> 0) at CFG 1 and 7.5, flow (shift-3 linear schedule 1 -> 0) at CFG 1 and 3.5. The
statistics are computed by ``samplers.dpm_solver_v3.compute_statistics`` with forward-mode JVPs on trajectories of
their own noise (held out from the evaluation batch). Error: RMS per element against the exact probability-flow
solution over the same sigma span (2000 RK4 steps), as in tests/unit. Every solver makes one model call per step,
so NFE = steps. A second table per problem compares statistics budgets (grid intervals x samples, --budgets,
the node's default 120 x 64 first) for the node-default solver: how much calibration the sampler needs.

Writes benchmarks/results/dpm_solver_v3.json and .md (and .png when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from preprint.samplers import dpm_solver_v3 as v3  # noqa: E402
from preprint.samplers.dpm_solver_pp import sample_dpmpp_multistep  # noqa: E402
from tests.unit.conftest import Problem  # noqa: E402

log = logging.getLogger("dpm_solver_v3")
NFES = [5, 6, 8, 10]
CONFIGS = [("eps", 1.0), ("eps", 7.5), ("flow", 1.0), ("flow", 3.5)]
RANGES = {"eps": (-math.log(14.6), -math.log(0.03)), "flow": (math.log(0.02 / 0.98), math.log(0.995 / 0.005))}
RESULTS = ROOT / "benchmarks" / "results"


def solvers(stats: v3.Statistics) -> dict:
    def v3_run(statistics, **kw):
        def run(p, sig):
            return v3.sample_dpm_solver_v3(p.model, p.x_start.clone(), sig, disable=True, parameterisation=p.kind,
                                           statistics=statistics, second_order="dpmsolver", **kw)
        return run

    def pp(order):
        def run(p, sig):
            return sample_dpmpp_multistep(p.model, p.x_start.clone(), sig, disable=True, order=order,
                                          parameterisation=p.kind)
        return run

    return {
        "DPM-Solver++ 2M": pp(2),
        "DPM-Solver++ 3M": pp(3),
        "v3, no statistics, corrector (UniC-like)": v3_run(None, order=2, corrector=True),
        "v3 calibrated, order 2": v3_run(stats, order=2, corrector=False),
        "v3 calibrated, order 2 + corrector (node default)": v3_run(stats, order=2, corrector=True),
        "v3 calibrated, order 3 + corrector": v3_run(stats, order=3, corrector=True),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--grid", type=int, default=60, help="grid intervals of the statistics")
    ap.add_argument("--samples", type=int, default=128, help="trajectories the statistics average over")
    ap.add_argument("--budgets", default="120x64,60x32,40x32,20x16",
                    help="statistics budgets (grid x samples) compared for the node-default solver; '' for none")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    budgets = [tuple(int(v) for v in b.split("x")) for b in args.budgets.split(",") if b]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    start = time.time()
    results: dict = {"nfe": NFES, "grid_points": args.grid, "samples": args.samples, "configs": {}}
    for kind, cfg in CONFIGS:
        problem = Problem(kind, cfg)
        t0 = time.time()
        stats = v3.compute_statistics(lambda x, s, p=problem: p.model(x, s), tuple(problem.x_start.shape[1:]), kind,
                                      *RANGES[kind], grid_points=args.grid, samples=args.samples, chunk=args.samples,
                                      seed=123, dtype=torch.float64)
        key = f"{kind} cfg {cfg:g}"
        table = {name: {str(n): problem.error(run(problem, problem.sigmas(n)), problem.sigmas(n)) for n in NFES}
                 for name, run in solvers(stats).items()}
        results["configs"][key] = {"statistics_seconds": round(time.time() - t0, 1), "errors": table}
        rows = {}
        for grid, samples in budgets:  # how much the statistics' grid and sample count matter
            b = v3.compute_statistics(lambda x, s, p=problem: p.model(x, s), tuple(problem.x_start.shape[1:]), kind,
                                      *RANGES[kind], grid_points=grid, samples=samples, chunk=samples, seed=321,
                                      dtype=torch.float64)
            run = solvers(b)["v3 calibrated, order 2 + corrector (node default)"]
            rows[f"{grid} x {samples}"] = {str(n): problem.error(run(problem, problem.sigmas(n)), problem.sigmas(n))
                                           for n in NFES}
        results["configs"][key]["budgets"] = rows
        log.info("%s done (%.0f s)", key, time.time() - t0)
    results["seconds"] = round(time.time() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dpm_solver_v3.json").write_text(json.dumps(results, indent=2))
    (args.out / "dpm_solver_v3.md").write_text(markdown(results))
    plot(results, args.out / "dpm_solver_v3.png")


def markdown(results: dict) -> str:
    lines = ["# DPM-Solver-v3 against DPM-Solver++ on the Gaussian mixture", "",
             "Command: `.venv/bin/python benchmarks/dpm_solver_v3.py` (one CPU thread, "
             f"{results['seconds']:.0f} s). Statistics: {results['grid_points']} grid intervals, "
             f"{results['samples']} held-out trajectories, forward-mode JVPs. RMS error per element to the exact "
             "ODE solution; NFE = steps (every solver: one model call per step). Lower is better; **bold** is the "
             "best of each column.", ""]
    for key, entry in results["configs"].items():
        table = entry["errors"]
        best = {n: min(row[str(n)] for row in table.values()) for n in results["nfe"]}
        lines += [f"## {key}", "", "| solver | " + " | ".join(f"NFE {n}" for n in results["nfe"]) + " |",
                  "|---|" + "---|" * len(results["nfe"])]
        for name, row in table.items():
            cells = [f"**{row[str(n)]:.4f}**" if row[str(n)] == best[n] else f"{row[str(n)]:.4f}"
                     for n in results["nfe"]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        if entry.get("budgets"):
            lines += [f"Statistics budget (grid intervals x samples; other probe seed), v3 order 2 + corrector, {key}:",
                      "", "| budget | " + " | ".join(f"NFE {n}" for n in results["nfe"]) + " |",
                      "|---|" + "---|" * len(results["nfe"])]
            lines += [f"| {b} | " + " | ".join(f"{row[str(n)]:.4f}" for n in results["nfe"]) + " |"
                      for b, row in entry["budgets"].items()]
            lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plot (the markdown table is the figure)")
        return False
    configs = results["configs"]
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4.5), squeeze=False)
    for ax, (key, entry) in zip(axes[0], configs.items(), strict=True):
        for name, row in entry["errors"].items():
            ax.semilogy(results["nfe"], [row[str(n)] for n in results["nfe"]], marker="o", ms=3, label=name,
                        linestyle="-" if name.startswith("v3 calibrated") else "--")
        ax.set_title(key)
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMS error to the exact solution")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


if __name__ == "__main__":
    main()
