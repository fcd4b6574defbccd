"""Example workflows for the Optimal Steps Search (OSS, arXiv:2503.21774), as API prompts on SD1.5."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

STEPS = 10


def _search() -> dict:
    return {"class_type": "PreprintOptimalStepsSearch",
            "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                       "steps": STEPS, "teacher_steps": 60, "cfg": 7.0, "samples": 4, "seed": 0,
                       "teacher_grid": "simple", "recompute": False, "aggregate": "median"},
            "_meta": {"title": "Optimal Steps Search (10 steps; 60-step teacher for speed, the paper uses 100-200)"}}


# The search's SIGMAS drive SamplerCustomAdvanced in place of the BasicScheduler (node 6).
_custom = {**common.sd15_base(), **common.custom_sampling(["11", 0], steps=STEPS, cfg=7.0)}
_custom["6"] = _search()
_custom["11"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"},
                 "_meta": {"title": "Sampler (any: the schedule was searched with Euler steps)"}}

# The stock KSampler by scheduler name: it takes its MODEL from the search node, so it runs after the search has
# saved the schedule, and preprint_oss reads that schedule for this model and step count.
_ksampler = {**common.sd15_base(), **common.ksampler(model=["6", 1], sampler_name="euler", scheduler="preprint_oss",
                                                     steps=STEPS, cfg=7.0)}
_ksampler["6"] = _search()
_ksampler["7"]["_meta"] = {"title": "Stock KSampler with scheduler preprint_oss (model from the search)"}

WORKFLOWS = {
    "Optimal Steps Search, SD1.5": _custom,
    "Optimal Steps schedule in the stock KSampler, SD1.5": _ksampler,
}

PAPER = "Paper: Pei et al., Optimal Stepsize for Diffusion Sampling, arXiv:2503.21774."

NOTES: dict[str, str] = {
    "Optimal Steps Search, SD1.5": (
        "The search solves 4 seeded noises with a 60-step Euler teacher and picks, by dynamic programming, the "
        "10 of its sigmas whose Euler jumps stay closest to it; the schedule is saved and reused for this model, "
        "CFG and size. Try steps first: the first run at a new count searches (teacher_steps x steps model calls), "
        "later runs read the saved file. " + PAPER),
    "Optimal Steps schedule in the stock KSampler, SD1.5": (
        "The stock KSampler's scheduler preprint_oss reads the schedule the Optimal Steps Search saved for this "
        "model and step count; its model comes through the search node so that the search runs first. Try steps "
        "first: set the same count on both nodes, since a schedule is never stretched to another length. " + PAPER),
}
