"""Example workflow for DPM-Solver-v3: statistics computed on the model, then the solver (SamplerCustomAdvanced)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

TITLE = "DPM-Solver-v3 at 8 steps with statistics computed on the model, SD1.5"


def _v3() -> dict:
    prompt = {**common.sd15_base(), **common.custom_sampling(["12", 0], steps=8, cfg=7.0, scheduler="karras")}
    prompt["11"] = {"class_type": "PreprintDPMSolverV3Statistics",
                    "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 7.0,
                               "latent": ["4", 0], "grid_points": 40, "samples": 16, "chunk": 16,
                               "trajectory_substeps": 1, "seed": 0, "derivatives": "finite_difference",
                               "recompute": False},
                    "_meta": {"title": "DPM-Solver-v3 statistics (quick setting; saved and reused)"}}
    prompt["12"] = {"class_type": "PreprintSamplerDPMSolverV3",
                    "inputs": {"order": 2, "corrector": True, "lower_order_final": True, "statistics": ["11", 0]},
                    "_meta": {"title": "DPM-Solver-v3 (same CFG and size as the statistics)"}}
    return prompt


WORKFLOWS = {TITLE: _v3()}

NOTES: dict[str, str] = {
    TITLE: (
        "The statistics node computes DPM-Solver-v3's empirical model statistics on this checkpoint at CFG 7 and "
        "512x512, saves them in models/preprint_calibration and reuses them on later runs without model calls. "
        "Try samples at 32 first (with grid_points 60, the node defaults) for final statistics instead of this "
        "quick setting, and keep the CFGGuider's cfg equal to the statistics' cfg. Paper: Zheng et al., "
        "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model Statistics, arXiv:2310.13268."),
}
