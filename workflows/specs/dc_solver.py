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
_graph["11"] = {"class_type": "PreprintDCSolver", "inputs": {"ratios": ["6", 0]},
                "_meta": {"title": "DC-Solver (UniPC-bh2 + compensation ratios)"}}

WORKFLOWS = {
    "DC-Solver with searched ratios, SD1.5": _graph,
}

NOTES: dict[str, str] = {
    "DC-Solver with searched ratios, SD1.5": (
        "UniPC-bh2 at 6 steps whose newest model output is replaced by a Lagrange interpolation through the last "
        "three, at a point set per step by ratios fitted on this model, CFG and size against a 100-step reference; "
        "the ratios are saved and reused. Try steps first: the first run at a new count searches (reference_steps + "
        "21 x steps model calls), later runs read the saved ratios; disconnecting the ratios gives plain UniPC-bh2 "
        "at order 2. Paper: Zhao et al., DC-Solver, arXiv:2409.03755."),
}
