"""Sampler accuracy on the exact-score Gaussian mixture: error to the exact sigma-0 solution against NFE.

Run:  .venv/bin/python benchmarks/samplers_accuracy.py          (all sections, about 1-2 minutes on 2 CPU cores)
      .venv/bin/python benchmarks/samplers_accuracy.py --sections accuracy --no-core     (a quick look)

Problems: the conditional mixture of tests/unit/conftest.py in a latent-shaped space (4, 8, 8), batch 4,
EPS/VE (Karras sigmas 14.6 -> 0.03 -> 0) and flow (shift-3 linear schedule 1 -> 0), CFG 1 and 7.5. Every
sampler starts from the same noise and gets the sigma list of the largest step count whose model calls fit the
NFE budget (heun and the singlestep solvers use about 2 / 3 calls per step). The error is the RMS per element
against the exact solution of the probability-flow ODE all the way to sigma = 0 (2000 RK4 steps in log sigma,
then the exact denoiser at sigma 1e-4), the image a user gets. A sigma list ending in 0 makes its last jump from
its last non-zero sigma, which moves with the step count (3 / (n + 2) for the shift-3 flow schedule): that jump
is part of what a schedule and step count cost, so it is measured, not excused. Model calls are counted, not
assumed. ComfyUI's built-ins run in the same process when ~/ComfyUI (or COMFYUI_PATH) imports.

Sections: ``accuracy`` (every sampler, practical schedules), ``flow_lambda`` (2M / 3M / 2S / 3S on flow models
with both lambda variables, on log-SNR-uniform steps), ``gits`` (GITS costs and teachers against the practical
schedules, searched on 64 held-out warm-up samples).

Writes benchmarks/results/samplers_accuracy.json, .md and .png (a partial run writes only what it measured).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from preprint.samplers import deis, dpm_solver_pp, evodiff, gits, momentum  # noqa: E402
from preprint.utils.gaussian_mixture import reference_solution  # noqa: E402
from tests.unit.conftest import Problem  # noqa: E402

log = logging.getLogger("samplers_accuracy")
NFES = [4, 5, 6, 8, 10, 15, 20]
CONFIGS = [("eps", 1.0), ("eps", 7.5), ("flow", 1.0), ("flow", 7.5)]
SECTIONS = ("accuracy", "flow_lambda", "gits")
RESULTS = ROOT / "benchmarks" / "results"


class ZeroReference:
    """The exact sigma-0 solution from the problem's starting batch (one per problem, whatever the step count)."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.x = reference_solution(problem.model, problem.x_start, problem.sigma_max, 0.0)

    def error(self, x: torch.Tensor) -> float:
        return float(torch.sqrt(((x.double() - self.x) ** 2).mean()))


def steps_for(nfe: int, calls_per_step: int) -> int:
    """Largest step count whose calls (k per step, 1 for the final jump to 0) fit in ``nfe``."""
    return max(1, (nfe - 1) // calls_per_step + 1)


def preprint_samplers(kind: str) -> dict[str, tuple[Callable, int]]:
    """name -> (fn(model, x, sigmas), calls per step)."""
    p = kind
    out: dict[str, tuple[Callable, int]] = {
        "preprint_dpmpp_2m": (lambda m, x, s: dpm_solver_pp.sample_dpmpp_multistep(
            m, x, s, disable=True, order=2, parameterisation=p, lower_order_final=False), 1),
        "preprint_dpmpp_3m": (lambda m, x, s: dpm_solver_pp.sample_dpmpp_multistep(
            m, x, s, disable=True, order=3, parameterisation=p), 1),
        "preprint_dpmpp_2s": (lambda m, x, s: dpm_solver_pp.sample_dpmpp_singlestep(
            m, x, s, disable=True, order=2, parameterisation=p), 2),
        "preprint_dpmpp_3s": (lambda m, x, s: dpm_solver_pp.sample_dpmpp_singlestep(
            m, x, s, disable=True, order=3, parameterisation=p), 3),
        "preprint_deis_t": (lambda m, x, s: deis.sample_deis(
            m, x, s, disable=True, order=3, parameterisation=p, poly_space="t"), 1),
        "preprint_deis_lambda": (lambda m, x, s: deis.sample_deis(
            m, x, s, disable=True, order=3, parameterisation=p, poly_space="lambda"), 1),
        "preprint_ghvb_2.8": (lambda m, x, s: momentum.sample_plms_momentum(
            m, x, s, disable=True, order=2.8, parameterisation=p), 1),
        "preprint_ghvb_3.8": (lambda m, x, s: momentum.sample_plms_momentum(
            m, x, s, disable=True, order=3.8, parameterisation=p), 1),
        "preprint_dpmpp_2m_hb_0.8": (lambda m, x, s: momentum.sample_dpmpp_hb(
            m, x, s, disable=True, order=2, beta=0.8, parameterisation=p), 1),
        "preprint_evodiff": (lambda m, x, s: evodiff.sample_evodiff(m, x, s, disable=True, parameterisation=p), 1),
    }
    if kind == "flow":
        for name, order, calls, fn in [("2m", 2, 1, dpm_solver_pp.sample_dpmpp_multistep),
                                       ("3m", 3, 1, dpm_solver_pp.sample_dpmpp_multistep),
                                       ("2s", 2, 2, dpm_solver_pp.sample_dpmpp_singlestep),
                                       ("3s", 3, 3, dpm_solver_pp.sample_dpmpp_singlestep)]:
            for lam in ("log_snr", "sigma"):
                out[f"preprint_dpmpp_{name}[{lam}]"] = (
                    lambda m, x, s, fn=fn, order=order, lam=lam: fn(
                        m, x, s, disable=True, order=order, parameterisation="flow", flow_lambda=lam,
                        lower_order_final=(order == 3)), calls)
    return out


class _Patcher:
    def __init__(self, ms):
        self._ms = ms

    def get_model_object(self, name: str):
        if name != "model_sampling":
            raise KeyError(name)
        return self._ms


class _Inner:
    def __init__(self, ms):
        self.model_patcher = _Patcher(ms)
        self.inner_model = self  # samplers that read model.inner_model.inner_model.model_sampling
        self.model_sampling = ms


class ComfyModel:
    """The mixture denoiser shaped like the object ComfyUI hands a sampler, for core samplers that ask
    ``model.inner_model.model_patcher.get_model_object('model_sampling')``; the sampling object is ComfyUI's own
    class for the parameterisation (EPS discrete / CONST flow)."""

    def __init__(self, model, kind: str):
        import comfy.model_sampling as ms_mod

        if kind == "flow":
            cls = type("FlowSampling", (ms_mod.ModelSamplingDiscreteFlow, ms_mod.CONST), {})
        else:
            cls = type("EpsSampling", (ms_mod.ModelSamplingDiscrete, ms_mod.EPS), {})
        self.model = model
        self.inner_model = _Inner(cls())

    def __call__(self, x, sigma, **kwargs):
        return self.model(x, sigma)


def comfy_samplers() -> dict[str, tuple[Callable, int]]:
    comfy_path = Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI"))
    if comfy_path.is_dir() and str(comfy_path) not in sys.path:
        sys.path.insert(0, str(comfy_path))
    try:
        from comfy.cli_args import args

        args.cpu = True  # must precede the first import of comfy.model_management (no GPU needed here)
        import comfy.extra_samplers.uni_pc as uni_pc
        import comfy.k_diffusion.sampling as ks
    except Exception as exc:  # noqa: BLE001 - any import failure means: no ComfyUI here
        log.warning("ComfyUI not importable (%s): core samplers skipped", exc)
        return {}

    def wrap(fn, **kw):
        return lambda m, x, s: fn(m, x, s.clone(), disable=True, **kw)

    return {
        "euler": (wrap(ks.sample_euler), 1),
        "heun": (wrap(ks.sample_heun), 2),
        "dpmpp_2m": (wrap(ks.sample_dpmpp_2m), 1),
        "dpmpp_3m_sde(eta=0)": (wrap(ks.sample_dpmpp_3m_sde, eta=0.0), 1),
        "deis": (wrap(ks.sample_deis), 1),
        "ipndm": (wrap(ks.sample_ipndm), 1),
        # uni_pc builds float32 coefficient tensors internally: it runs in float32 (far below the errors measured)
        "uni_pc": (lambda m, x, s: uni_pc.sample_unipc(m, x.float(), s.float().clone(), extra_args={},
                                                       disable=True), 1),
        "res_multistep": (wrap(ks.sample_res_multistep), 1),
        "gradient_estimation": (wrap(ks.sample_gradient_estimation), 1),
    }


def run_config(kind: str, cfg: float, core: dict, nfes: list[int], schedule: str = "practical") -> dict:
    problem = Problem(kind, cfg, schedule=schedule)
    ref = ZeroReference(problem)
    table: dict[str, dict[str, dict]] = {}
    samplers = {**preprint_samplers(kind), **core}
    for name, (fn, per_step) in samplers.items():
        row = {}
        for nfe in nfes:
            steps = steps_for(nfe, per_step)
            sig = problem.sigmas(steps)
            model = ComfyModel(problem.model, kind) if name in core else problem.model
            problem.model.calls = 0
            try:
                x = fn(model, problem.x_start.clone(), sig)
                calls = problem.model.calls // (2 if cfg != 1.0 else 1)
                err = ref.error(x)
            except Exception as exc:  # noqa: BLE001 - a failing sampler is a result, not a crash
                log.warning("%s failed at NFE %d: %s", name, nfe, exc)
                err, calls = float("nan"), -1
            row[str(nfe)] = {"error": err, "steps": steps, "nfe": calls, "last_sigma": float(sig[-2])}
        table[name] = row
    return table


GITS_NFES = [5, 6, 8, 10]
GITS_SETTINGS = {  # name -> (metric, teacher, coeff)
    "gits official default (dev, ipndm, 1.15)": ("dev", "ipndm", 1.15),
    "gits official SD recipe (dev, dpmpp_2m, 1.20)": ("dev", "dpmpp_2m", 1.2),
    "gits l2 (official option; dpmpp_2m, 1.20)": ("l2", "dpmpp_2m", 1.2),
    "gits vp_l2 (Preprint; ipndm, 1.15)": ("vp_l2", "ipndm", 1.15),
}
def _euler(problem: Problem, sigmas: torch.Tensor) -> torch.Tensor:
    x = problem.x_start.clone()
    for i in range(len(sigmas) - 1):
        d = (x - problem.model(x, sigmas[i])) / sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    return x


GITS_SOLVERS: dict[str, Callable[[Problem, torch.Tensor], torch.Tensor]] = {
    "euler": _euler,
    "ipndm": lambda p, s: gits.ipndm_trajectory(p.model, p.x_start.clone(), s)[0][-1],
    "dpmpp_2m": lambda p, s: dpm_solver_pp.sample_dpmpp_multistep(p.model, p.x_start.clone(), s, disable=True,
                                                                  order=2, parameterisation=p.kind),
}


def run_gits(kind: str, cfg: float, warmup: int = 64) -> dict:
    """GITS schedules (searched on held-out warm-up noise, 60-step grid) against the practical schedule."""
    problem = Problem(kind, cfg)
    ref = ZeroReference(problem)
    warm = problem.model.prior_noise(warmup, problem.sigma_max, torch.Generator().manual_seed(123))
    schedules: dict[str, Callable[[int], torch.Tensor]] = {"practical schedule": problem.sigmas}
    for name, (metric, teacher, coeff) in GITS_SETTINGS.items():
        table = gits.search_table(problem.model, warm, problem.sigmas(60), kind, coeff, metric=metric,
                                  teacher=teacher, batch_size=16)
        schedules[name] = lambda n, table=table: table.schedule(n).double()
    out: dict[str, dict] = {}
    for solver, solve in GITS_SOLVERS.items():
        for name, make in schedules.items():
            out[f"{solver} / {name}"] = {str(n): {"error": ref.error(solve(problem, make(n))), "steps": n, "nfe": n}
                                         for n in GITS_NFES}
    return out


def markdown(results: dict, nfes: list[int]) -> str:
    lines = []
    for key, table in results.items():
        lines += [f"### {key}", "", "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        best = {n: min((r[str(n)]["error"] for r in table.values() if math.isfinite(r[str(n)]["error"])),
                       default=float("nan")) for n in nfes}
        for name, row in table.items():
            cells = []
            for n in nfes:
                e, used = row[str(n)]["error"], row[str(n)]["nfe"]
                txt = f"{e:.2e}" + (f" ({used})" if used != n else "")
                cells.append(f"**{txt}**" if e == best[n] else txt)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def report(results: dict) -> str:
    nfes = results["nfe"]
    md = ["# Sampler accuracy on the exact-score mixture", "",
          "RMS error per element against the exact solution at sigma = 0 (lower is better), by NFE budget. Bold: "
          "best in the column. A number in parentheses is the NFE actually used when the sampler cannot hit the "
          "budget exactly. Generated by `benchmarks/samplers_accuracy.py` "
          f"({results['seconds']} s, ComfyUI samplers {'included' if results['comfyui'] else 'not available'}).", ""]
    if results.get("configs"):
        md += ["## Every sampler, practical schedules (Karras for EPS, shift-3 linear for flow)", "",
               markdown(results["configs"], nfes)]
    if results.get("flow_lambda_uniform"):
        md += ["## Flow models on log-SNR-uniform steps (flow_lambda comparison)", "",
               markdown(results["flow_lambda_uniform"], nfes)]
    if results.get("gits"):
        md += ["## GITS: costs and teachers (64 warm-up samples, 60-step grid) against the practical schedule", "",
               markdown(results["gits"], GITS_NFES)]
    return "\n".join(md)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plot (pip install matplotlib)")
        return False
    configs = results["configs"]
    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 5), squeeze=False)
    for ax, (key, table) in zip(axes[0], configs.items(), strict=True):
        for name, row in table.items():
            xs = [row[str(n)]["nfe"] for n in results["nfe"]]
            ys = [row[str(n)]["error"] for n in results["nfe"]]
            style = "-" if name.startswith("preprint") else "--"
            ax.loglog(xs, ys, style, marker="o", ms=3, label=name)
        ax.set_title(key)
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMS error to the sigma-0 solution")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--nfe", nargs="+", type=int, default=NFES, help="NFE budgets of the accuracy tables")
    ap.add_argument("--no-core", action="store_true", help="skip ComfyUI's built-in samplers")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the .json / .md / .png results")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    core = {} if args.no_core else comfy_samplers()
    start = time.time()
    results: dict = {"nfe": args.nfe, "comfyui": bool(core), "error_to": "sigma 0", "configs": {},
                     "flow_lambda_uniform": {}, "gits": {}}
    if "accuracy" in args.sections:
        for kind, cfg in CONFIGS:
            key = f"{kind} cfg {cfg}"
            log.info("running %s", key)
            results["configs"][key] = run_config(kind, cfg, core, args.nfe)
    if "flow_lambda" in args.sections:
        # flow_lambda on log-SNR-uniform steps, where the true log-SNR is expected to win
        for cfg in (1.0, 7.5):
            log.info("running flow_lambda, cfg %s", cfg)
            table = run_config("flow", cfg, {}, args.nfe, schedule="uniform")
            results["flow_lambda_uniform"][f"flow cfg {cfg}"] = {k: v for k, v in table.items() if "dpmpp" in k}
    if "gits" in args.sections:
        for kind, cfg in CONFIGS:
            log.info("running gits, %s cfg %s", kind, cfg)
            results["gits"][f"{kind} cfg {cfg}"] = run_gits(kind, cfg)
    results["seconds"] = round(time.time() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "samplers_accuracy.json").write_text(json.dumps(results, indent=1))
    (args.out / "samplers_accuracy.md").write_text(report(results))
    if results["configs"]:
        plot(results, args.out / "samplers_accuracy.png")
    log.info("done in %.0f s", results["seconds"])


if __name__ == "__main__":
    main()
