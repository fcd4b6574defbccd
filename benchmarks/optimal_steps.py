"""Optimal Stepsize (OSS) schedules against hand-made and core table schedules of the same step count.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/optimal_steps.py [mixtures] [toy]     (both by default;
      about 1 minute for the mixtures, 5-8 for the toy on one CPU thread)

mixtures: the exact-score Gaussian mixtures of tests/unit/conftest.py (latent-shaped (4, 8, 8), batch 4; EPS with
Karras 14.6 -> 0.03 and flow with shift-3 sigmas, CFG 1 and 7.5). OSS searched on 8 held-out noises against a
100-step Euler teacher on the practical grid; every schedule then solves the problem's own batch with Euler and
DPM-Solver++ 2M, scored by RMS error to the exact probability-flow solution at sigma 0. Rivals: Karras, exponential
(log-uniform) and core's AlignYourSteps SD1 table (EPS, same sigma range), uniform in t, shift-3 and core's
OptimalSteps FLUX table (flow); tables are log-linearly resampled to other step counts and end in 0, as core does.

toy: the trained proving-ground SD1.5 toy at 128 px, CFG 5, through ComfyUI (CFGGuider). OSS searched by the node's
own search on 3 prompts (one noise each) against a 50-step Euler teacher on the 'simple' grid; scored on 3 other
prompts and seeds by the RMS latent distance of each schedule's sample to the teacher's final sample from the same
noise. Rivals: karras, simple (uniform timesteps), AlignYourSteps SD1.

Writes benchmarks/results/optimal_steps.{json,md} and optimal_steps.png (mixture error against steps).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from preprint.samplers import optimal_steps as oss  # noqa: E402
from preprint.samplers.dpm_solver_pp import sample_dpmpp_multistep  # noqa: E402
from preprint.utils.gaussian_mixture import reference_solution  # noqa: E402
from tests.unit.conftest import Problem, flow_sigmas, karras_sigmas  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# core's tables (comfy_extras/nodes_align_your_steps.py, nodes_optimalsteps.py), copied as data
AYS_SD1 = [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
           0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582]
OSS_FLUX = [0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001]
STEPS = (5, 10)
CURVE_STEPS = (4, 5, 6, 8, 10, 15)


def table(levels: list[float], steps: int) -> torch.Tensor:
    """As core: the table itself at len - 1 steps, else log-linear interpolation; the last sigma set to 0."""
    s = np.array(levels, dtype=np.float64)
    if steps + 1 != len(s):
        xs, ys = np.linspace(0, 1, len(s)), np.log(s[::-1])
        s = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, ys))[::-1].copy()
    out = torch.tensor(s, dtype=torch.float64)
    out[-1] = 0.0
    return out


def rivals(kind: str, steps: int) -> dict[str, torch.Tensor]:
    if kind == "eps":
        exp = torch.exp(torch.linspace(np.log(14.6), np.log(0.03), steps, dtype=torch.float64))
        return {"karras": karras_sigmas(steps), "exponential": torch.cat([exp, exp.new_zeros(1)]),
                "ays_sd1 (core)": table(AYS_SD1, steps)}
    return {"uniform_t": flow_sigmas(steps, shift=1.0), "shift3": flow_sigmas(steps, shift=3.0),
            "optimal_steps_flux (core)": table(OSS_FLUX, steps)}


def euler(model, x, sigmas):
    return oss.student_solution(model, x, sigmas)


def dpmpp_2m(model, x, sigmas):
    return sample_dpmpp_multistep(model, x, sigmas, disable=True, order=2, lower_order_final=True)


def mixtures() -> dict:
    out = {}
    for kind, cfg in (("eps", 1.0), ("eps", 7.5), ("flow", 1.0), ("flow", 7.5)):
        p = Problem(kind, cfg)
        grid = p.sigmas(100)
        warm = p.model.prior_noise(8, p.sigma_max, torch.Generator().manual_seed(123))
        ref = reference_solution(p.model, p.x_start, p.sigma_max, 0.0)
        rows = {}
        for steps in sorted(set(STEPS) | set(CURVE_STEPS)):
            if steps not in STEPS and cfg != 7.5:
                continue
            t0 = time.perf_counter()
            found = oss.search(p.model, warm, grid, steps)
            seconds = time.perf_counter() - t0
            schedules = {"oss": found.sigmas, **rivals(kind, steps)}
            rows[steps] = {name: {solver: float(((fn(p.model, p.x_start.clone(), s) - ref) ** 2).mean().sqrt())
                                  for solver, fn in (("euler", euler), ("dpmpp_2m", dpmpp_2m))}
                           for name, s in schedules.items()}
            rows[steps]["oss"]["sigmas"] = [round(float(s), 4) for s in found.sigmas]
            rows[steps]["oss"]["evaluations"] = found.evaluations
            rows[steps]["oss"]["search_seconds"] = round(seconds, 2)
        out[f"{kind}-cfg{cfg:g}"] = rows
        print(kind, cfg, json.dumps({k: {n: v["euler"] for n, v in r.items()} for k, r in rows.items()}), flush=True)
    return out


def toy() -> dict:
    from preprint.runner import comfy_host as ch

    ch.boot(ch.find_comfyui())
    import comfy.sample
    import comfy.samplers

    from preprint.nodes.optimal_steps import run_search, teacher_sigmas
    from preprint.proving.models import encode, load_toy

    model, clip, _ = load_toy("sd15")
    ms = model.get_model_object("model_sampling")
    search_prompts = ["a red circle on a white background", "a blue square in the top left on a black background",
                      "a green triangle on the left of a yellow circle on a grey background"]
    test_prompts = ["a yellow square on a black background", "a purple circle in the bottom right on a white "
                    "background", "a red triangle above a blue square on a grey background"]
    cfg, teacher_steps = 5.0, 50

    def cond(texts):
        return [[torch.cat([encode(clip, t)[0][0] for t in texts]), {}]]

    neg = encode(clip, "")
    latent = torch.zeros(3, 4, 16, 16)
    grid = teacher_sigmas(ms, "simple", teacher_steps)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(cond(test_prompts), neg)
    guider.set_cfg(cfg)
    noise = comfy.sample.prepare_noise(latent, 1000)

    def solve(sampler: str, sigmas: torch.Tensor) -> torch.Tensor:
        return guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas.float(), seed=1000,
                             disable_pbar=True)

    teacher = solve("euler", grid)
    out = {"settings": {"cfg": cfg, "teacher_steps": teacher_steps, "size": 128, "grid": "simple"}}
    for steps in STEPS:
        t0 = time.perf_counter()
        found = run_search(model, cond(search_prompts), neg, latent, steps, teacher_steps, cfg, 3, 0, grid, "median")
        seconds = time.perf_counter() - t0
        schedules = {"oss": found.sigmas.cpu(),
                     "karras": comfy.samplers.calculate_sigmas(ms, "karras", steps),
                     "simple": comfy.samplers.calculate_sigmas(ms, "simple", steps),
                     "ays_sd1 (core)": table(AYS_SD1, steps)}
        row = {name: {solver: float(((solve(solver, s) - teacher) ** 2).mean().sqrt())
                      for solver in ("euler", "dpmpp_2m")} for name, s in schedules.items()}
        row["oss"]["sigmas"] = [round(float(s), 4) for s in found.sigmas]
        row["oss"]["evaluations"] = found.evaluations
        row["oss"]["search_seconds"] = round(seconds, 1)
        out[steps] = row
        print("toy", steps, json.dumps(row), flush=True)
    return out


def figure(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no figure (the markdown has the same numbers as a table)")
        return False

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("eps-cfg7.5", "flow-cfg7.5"), strict=True):
        rows = results["mixtures"][key]
        steps = sorted(int(k) for k in rows)
        for name in rows[steps[0]]:
            ax.plot(steps, [rows[s][name]["euler"] for s in steps], marker="o", label=name,
                    linewidth=2.5 if name == "oss" else 1.2)
        ax.set_yscale("log")
        ax.set_xlabel("steps (Euler)")
        ax.set_ylabel("RMS error to the exact solution")
        ax.set_title(f"Gaussian mixture, {key.replace('-cfg', ', CFG ')}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def markdown(results: dict) -> str:
    lines = ["# Optimal Stepsize (OSS) schedules", "",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/optimal_steps.py` (see its docstring).", ""]
    if "mixtures" in results:
        lines += ["## Exact-score Gaussian mixtures: RMS error to the exact solution at sigma 0 (Euler / DPM++ 2M)",
                  "", "OSS searched on 8 held-out noises, 100-step Euler teacher on the practical grid.", ""]
        for key, rows in results["mixtures"].items():
            for steps in STEPS:
                row = rows[steps] if steps in rows else rows[str(steps)]
                lines += [f"**{key}, {steps} steps** (OSS: {row['oss']['evaluations']} evaluations, "
                          f"sigmas {row['oss']['sigmas']})", "", "| schedule | Euler | DPM++ 2M |", "|---|---|---|"]
                lines += [f"| {name} | {v['euler']:.4f} | {v['dpmpp_2m']:.4f} |" for name, v in row.items()]
                lines.append("")
        for key in ("eps-cfg7.5", "flow-cfg7.5"):
            rows = results["mixtures"][key]
            steps = sorted(int(k) for k in rows)
            names = list(rows[str(steps[0])])
            lines += [f"**{key}: Euler error against steps**", "", "| steps | " + " | ".join(names) + " |",
                      "|---" * (len(names) + 1) + "|"]
            lines += [f"| {n} | " + " | ".join(f"{rows[str(n)][m]['euler']:.4f}" for m in names) + " |"
                      for n in steps]
            lines.append("")
        if (RESULTS / "optimal_steps.png").exists():
            lines += ["![error against steps](optimal_steps.png)", ""]
    if "toy" in results:
        t = results["toy"]
        lines += ["## Proving-ground SD1.5 toy: RMS latent distance to the teacher's final sample", "",
                  f"128 px, CFG {t['settings']['cfg']}, teacher {t['settings']['teacher_steps']} Euler steps on "
                  "the 'simple' grid; OSS searched on 3 prompts, scored on 3 other prompts and seeds.", ""]
        for steps in STEPS:
            row = t[steps] if steps in t else t[str(steps)]
            lines += [f"**{steps} steps** (OSS: {row['oss']['evaluations']} evaluations of the batch, "
                      f"{row['oss']['search_seconds']} s; sigmas {row['oss']['sigmas']})", "",
                      "| schedule | Euler | DPM++ 2M |", "|---|---|---|"]
            lines += [f"| {name} | {v['euler']:.4f} | {v['dpmpp_2m']:.4f} |" for name, v in row.items()]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    sections = [a for a in sys.argv[1:] if a in ("mixtures", "toy")] or ["mixtures", "toy"]
    path = RESULTS / "optimal_steps.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if "mixtures" in sections:
        results["mixtures"] = mixtures()
        figure(json.loads(json.dumps(results)), RESULTS / "optimal_steps.png")
    if "toy" in sections:
        results["toy"] = toy()
    path.write_text(json.dumps(results, indent=1))
    (RESULTS / "optimal_steps.md").write_text(markdown(json.loads(json.dumps(results))))


if __name__ == "__main__":
    main()
