"""Example workflow for DC-Solver (dynamic compensation for UniPC, arXiv:2409.03755), as an API prompt on SD1.5."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

STEPS = 6

# The search's SIGMAS (the schedule the ratios were fitted on) replace the BasicScheduler (node 6); its ratios feed
# the DC-Solver SAMPLER (node 11).
_graph = {**common.sd15_base(), **common.custom_sampling(["11", 0], steps=STEPS, cfg=7.0)}
_graph["6"] = {"class_type": "PreprintDCSolverSearch",
               "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 7.0,
                          "latent_image": ["4", 0], "steps": STEPS, "reference_steps": 100, "scheduler": "karras",
                          "samples": 4, "seed": 0, "recompute": False},
               "_meta": {"title": "DC-Solver Ratio Search (6 steps; 100-step reference and 4 samples for speed, "
                                  "the paper uses 200 and 10)"}}
_graph["7"]["inputs"]["sigmas"] = ["6", 1]
_graph["11"] = {"class_type": "PreprintDCSolver", "inputs": {"mode": "auto", "ratios": ["6", 0]},
                "_meta": {"title": "DC-Solver (UniPC-bh2 + compensation ratios)"}}

# CPR: a 3 x 3 grid of searches fitted once, then any step count and CFG sampled with predicted ratios. The run
# samples 6 steps at CFG 7, neither of them searched.
CPR_STEPS, CPR_CFG = 6, 7.0
_cpr = {**common.sd15_base(), **common.custom_sampling(["11", 0], steps=CPR_STEPS, cfg=CPR_CFG)}
_cpr["12"] = {"class_type": "PreprintDCSolverCPRFit",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                         "scheduler": "karras", "steps_list": "5, 7, 10", "cfg_list": "4, 6, 8", "step_degree": 2,
                         "reference_steps": 20, "samples": 2, "seed": 0, "iterations": 2},
              "_meta": {"title": "DC-Solver CPR Fit (9 searches, once; a 20-step reference, 2 samples and 2 "
                                 "iterations for speed: the paper uses 200, 10 and 20)"}}
_cpr["11"] = {"class_type": "PreprintDCSolver", "inputs": {"mode": "auto", "cpr": ["12", 0]},
              "_meta": {"title": "DC-Solver (ratios predicted for this run's steps and CFG)"}}

WORKFLOWS = {
    "DC-Solver with searched ratios, SD1.5": _graph,
    "DC-Solver with CPR-predicted ratios, SD1.5": _cpr,
}

NOTES: dict[str, str] = {
    "DC-Solver with searched ratios, SD1.5": (
        "UniPC-bh2 at 6 steps whose newest model output is replaced by a Lagrange interpolation through the last "
        "three, at a point set per step by ratios fitted on this model, CFG and size against a 100-step reference; "
        "the ratios are saved and reused. Try steps first: the first run at a new count searches (reference_steps + "
        "21 x steps model calls), later runs read the saved ratios; disconnecting the ratios gives plain UniPC-bh2 "
        "at order 2. Paper: Zhao et al., DC-Solver, arXiv:2409.03755."),
    "DC-Solver with CPR-predicted ratios, SD1.5": (
        "The CPR Fit node searches compensation ratios on a 3 x 3 grid of step counts and CFG scales (once: each "
        "search is saved) and fits the paper's cascade polynomial regression through them; the DC-Solver sampler "
        "then predicts ratios for the run's own 6 steps at CFG 7, which were never searched. Try cfg_list first: "
        "span the CFG scales you sample with, since the fit extrapolates outside them; the searches here are cut "
        "short for speed, so raise reference_steps, samples and iterations for real use. Paper: Zhao et al., "
        "DC-Solver, arXiv:2409.03755 (Sec. 3.4)."),
}
