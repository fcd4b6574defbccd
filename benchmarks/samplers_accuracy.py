"""Sampler accuracy on the exact-score Gaussian mixture: error to the reference ODE solution against NFE.

Run:  .venv/bin/python benchmarks/samplers_accuracy.py        (about 5 minutes on 2 CPU cores)

Problems: the conditional mixture of tests/unit/conftest.py in a latent-shaped space (4, 8, 8), batch 4,
EPS/VE (Karras sigmas 14.6 -> 0.03 -> 0) and flow (shift-3 linear schedule 1 -> 0), CFG 1 and 7.5. Every
sampler starts from the same noise and gets the sigma list of the largest step count whose model calls fit the
NFE budget (heun and the singlestep solvers use about 2 / 3 calls per step). The error is the RMS per element
against a 2000-step RK4 solution over the same sigma span (see conftest.Problem.reference). Model calls are
counted, not assumed. ComfyUI's built-ins run in the same process when ~/ComfyUI (or COMFYUI_PATH) imports.

Writes benchmarks/results/samplers_accuracy.json, .md and .png.
"""

from __future__ import annotations

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
from preprint.samplers import deis, dpm_solver_pp, evodiff, momentum  # noqa: E402
from tests.unit.conftest import Problem  # noqa: E402

log = logging.getLogger("samplers_accuracy")
NFES = [4, 5, 6, 8, 10, 15, 20]
CONFIGS = [("eps", 1.0), ("eps", 7.5), ("flow", 1.0), ("flow", 7.5)]
RESULTS = ROOT / "benchmarks" / "results"


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


def run_config(kind: str, cfg: float, core: dict, schedule: str = "practical") -> dict:
    problem = Problem(kind, cfg, schedule=schedule)
    table: dict[str, dict[str, dict]] = {}
    samplers = {**preprint_samplers(kind), **core}
    for name, (fn, per_step) in samplers.items():
        row = {}
        for nfe in NFES:
            steps = steps_for(nfe, per_step)
            sig = problem.sigmas(steps)
            model = ComfyModel(problem.model, kind) if name in core else problem.model
            problem.model.calls = 0
            try:
                x = fn(model, problem.x_start.clone(), sig)
                calls = problem.model.calls // (2 if cfg != 1.0 else 1)  # before the reference adds its own
                err = problem.error(x, sig)
            except Exception as exc:  # noqa: BLE001 - a failing sampler is a result, not a crash
                log.warning("%s failed at NFE %d: %s", name, nfe, exc)
                err, calls = float("nan"), -1
            row[str(nfe)] = {"error": err, "steps": steps, "nfe": calls}
        table[name] = row
    return table


def markdown(results: dict) -> str:
    lines = ["# Sampler accuracy on the exact-score mixture", "",
             "RMS error per element against the reference ODE solution (lower is better), by NFE budget. "
             "Bold: best in the column. Generated by `benchmarks/samplers_accuracy.py`.", ""]
    for key, table in results["configs"].items():
        lines += [f"## {key}", "", "| sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
                  "|---|" + "---|" * len(NFES)]
        best = {n: min((r[str(n)]["error"] for r in table.values() if math.isfinite(r[str(n)]["error"])),
                       default=float("nan")) for n in NFES}
        for name, row in table.items():
            cells = []
            for n in NFES:
                e, used = row[str(n)]["error"], row[str(n)]["nfe"]
                txt = f"{e:.2e}" + (f" ({used})" if used != n else "")
                cells.append(f"**{txt}**" if e == best[n] else txt)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("A number in parentheses is the NFE actually used when the sampler cannot hit the budget exactly.")
    return "\n".join(lines) + "\n"


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
            xs = [row[str(n)]["nfe"] for n in NFES]
            ys = [row[str(n)]["error"] for n in NFES]
            style = "-" if name.startswith("preprint") else "--"
            ax.loglog(xs, ys, style, marker="o", ms=3, label=name)
        ax.set_title(key)
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMS error to reference")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    core = comfy_samplers()
    start = time.time()
    results: dict = {"nfe": NFES, "comfyui": bool(core), "configs": {}, "flow_lambda_uniform": {}}
    for kind, cfg in CONFIGS:
        key = f"{kind} cfg {cfg}"
        log.info("running %s", key)
        results["configs"][key] = run_config(kind, cfg, core)
    # flow_lambda on log-SNR-uniform steps, where the true log-SNR is expected to win
    for cfg in (1.0, 7.5):
        table = run_config("flow", cfg, {}, schedule="uniform")
        results["flow_lambda_uniform"][f"flow cfg {cfg}"] = {k: v for k, v in table.items() if "dpmpp" in k}
    results["seconds"] = round(time.time() - start, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "samplers_accuracy.json").write_text(json.dumps(results, indent=1))
    md = markdown(results)
    md += "\n## Flow models on log-SNR-uniform steps (flow_lambda comparison)\n\n"
    md += markdown({"configs": results["flow_lambda_uniform"]}).split("\n", 4)[-1]
    (RESULTS / "samplers_accuracy.md").write_text(md)
    plot(results, RESULTS / "samplers_accuracy.png")
    log.info("done in %.0f s", results["seconds"])


if __name__ == "__main__":
    main()
