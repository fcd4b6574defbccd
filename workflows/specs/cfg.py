"""Example workflows for the annealed / scheduled CFG family: Scheduled CFG with a guidance interval, Adaptive
Guidance, CADS, the Annealing Guidance sampler, Noise-Level Guidance, and one graph stacking several."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"


def _titled(node: dict, title: str) -> dict:
    return {**node, "_meta": {"title": title}}


def scheduled_cfg(model: list, schedule: str = "cosine", cfg_start: float = -1.0, cfg_end: float = 3.0,
                  sigma_start: float = -1.0, sigma_end: float = -1.0, custom: str = "") -> dict:
    return {"class_type": "PreprintScheduledCFG", "inputs": {
        "model": model, "schedule": schedule, "cfg_start": cfg_start, "cfg_end": cfg_end, "exponent": 2.0,
        "custom_scales": custom, "sigma_start": sigma_start, "sigma_end": sigma_end}}


def cads(model: list) -> dict:
    return {"class_type": "PreprintCADS", "inputs": {"model": model, "tau1": 0.6, "tau2": 0.9, "noise_scale": 0.25,
                                                     "psi": 1.0, "noise_pooled": True,
                                                     "anneal": "positive and negative"}}


def adaptive(model: list, threshold: float = 0.999) -> dict:
    return {"class_type": "PreprintAdaptiveGuidance", "inputs": {"model": model, "threshold": threshold,
                                                                 "criterion": "velocity"}}


# 1. Scheduled CFG: cosine from the KSampler's 7.5 down to 3, guidance only for sigma in [0.28, 5.42]
#    (the interval Kynkaenniemi et al. report for SD-XL, with CFG 16 there; outside it no negative pass is run).
_scheduled = {**common.sd15_base(), **common.ksampler(model=["11", 0], steps=25, cfg=7.5)}
_scheduled["11"] = _titled(scheduled_cfg(["1", 0], "cosine", -1.0, 3.0, 5.42, 0.28),
                           "Scheduled CFG: cosine 7.5 -> 3, interval sigma 0.28..5.42")

# 2. Adaptive Guidance: stop the negative pass once guidance has converged.
_adaptive = {**common.sd15_base(), **common.ksampler(model=["11", 0], steps=25, cfg=7.5)}
_adaptive["11"] = _titled(adaptive(["1", 0], 0.999), "Adaptive Guidance (threshold 0.999)")

# 3. CADS on SDXL, a batch of 4 so the extra diversity is visible.
_cads = {**common.sd15_base(width=1024, height=1024), **common.ksampler(model=["11", 0], steps=30, cfg=9.0)}
_cads["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_CHECKPOINT}}
_cads["4"]["inputs"]["batch_size"] = 4
_cads["11"] = _titled(cads(["1", 0]), "CADS condition annealing (tau1 0.6, tau2 0.9, s 0.25)")

# 4. Annealing guidance sampler on SDXL (needs models/guidance_schedulers/annealing_sdxl.safetensors).
_annealing = {**common.sd15_base(width=1024, height=1024),
              **common.custom_sampling(["11", 0], steps=50, cfg=7.5, scheduler="normal")}
_annealing["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_CHECKPOINT}}
_annealing["11"] = _titled({"class_type": "PreprintSamplerAnnealingGuidance", "inputs": {
    "scheduler_file": "annealing_sdxl.safetensors", "guidance_lambda": 0.4, "renoise": "unconditional (paper)"}},
    "Annealing Guidance sampler (lambda 0.4; learned CFG scale)")

# 5. Noise-Level Guidance: refine the RandomNoise before SamplerCustomAdvanced.
_nlg = {**common.sd15_base(), **common.custom_sampling(["12", 0], steps=25, cfg=7.0)}
_nlg["12"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}}
_nlg["11"] = _titled({"class_type": "PreprintNoiseLevelGuidance", "inputs": {
    "noise": ["10", 0], "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "iterations": 20,
    "step_size": 1.0, "clip_norm": 0.5, "jitter": 0.001, "renormalize": True}},
    "Noise-Level Guidance (20 iterations)")
_nlg["7"]["inputs"]["noise"] = ["11", 0]

# 6. Stack: CADS -> Scheduled CFG (interval) -> Adaptive Guidance -> PAG -> DeepCache, one KSampler.
_stack = {**common.sd15_base(), **common.ksampler(model=["15", 0], steps=25, cfg=6.0)}
_stack["11"] = _titled(cads(["1", 0]), "CADS")
_stack["12"] = _titled(scheduled_cfg(["11", 0], "linear", -1.0, 3.0, 10.0, 0.3), "Scheduled CFG 6 -> 3, sigma 0.3..10")
_stack["13"] = _titled(adaptive(["12", 0], 0.999), "Adaptive Guidance (0.999)")
_stack["14"] = _titled({"class_type": "PreprintPerturbedAttentionGuidance", "inputs": {
    "model": ["13", 0], "scale": 2.0, "layers": "", "adaptive_scale": 0.0, "sigma_start": -1.0, "sigma_end": -1.0,
    "rescale": 0.0, "joint_attention": "image-to-image"}}, "Perturbed-Attention Guidance (scale 2)")
_stack["15"] = _titled({"class_type": "PreprintDeepCache", "inputs": {
    "model": ["14", 0], "cache_interval": 3, "branch_depth": 0, "schedule": "uniform", "start_percent": 0.0,
    "end_percent": 1.0}}, "DeepCache (every 3rd step)")

WORKFLOWS: dict[str, dict] = {
    "Scheduled CFG and guidance interval, SD1.5": _scheduled,
    "Adaptive Guidance, SD1.5": _adaptive,
    "CADS diverse batch, SDXL": _cads,
    "Annealing Guidance sampler, SDXL": _annealing,
    "Noise-Level Guidance, SD1.5": _nlg,
    "CADS + Scheduled CFG + Adaptive Guidance + PAG + DeepCache, SD1.5": _stack,
}
