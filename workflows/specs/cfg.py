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

# 4b. The same learned scale as a GUIDER, with euler_cfg_pp (the paper's re-noising with the negative prediction).
_annealing_guider = {**common.sd15_base(width=1024, height=1024),
                     **common.custom_sampling(["12", 0], steps=50, cfg=7.5, scheduler="normal")}
_annealing_guider["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_CHECKPOINT}}
_annealing_guider["12"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_cfg_pp"}}
_annealing_guider["5"] = _titled({"class_type": "PreprintAnnealingGuidanceGuider", "inputs": {
    "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "scheduler_file": "annealing_sdxl.safetensors",
    "guidance_lambda": 0.4}}, "Annealing Guidance guider (lambda 0.4; learned CFG scale)")

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
    "Annealing Guidance guider with euler_cfg_pp, SDXL": _annealing_guider,
    "Noise-Level Guidance, SD1.5": _nlg,
    "CADS + Scheduled CFG + Adaptive Guidance + PAG + DeepCache, SD1.5": _stack,
}

NOTES: dict[str, str] = {
    "Scheduled CFG and guidance interval, SD1.5": (
        "The CFG scale follows a cosine from the KSampler's 7.5 down to 3, and guidance acts only while sigma is "
        "between 0.28 and 5.42: outside that interval the negative prompt is not evaluated at all, which saves "
        "model calls. Try cfg_end first: lower values ease guidance off late in the run, where a high scale burns "
        "detail, and -1 keeps the sampler's CFG. Papers: Wang et al., Analysis of Classifier-Free Guidance Weight "
        "Schedulers, arXiv:2404.13040, and Kynkaanniemi et al., Applying Guidance in a Limited Interval Improves "
        "Sample and Distribution Quality in Diffusion Models, arXiv:2404.07724."),
    "Adaptive Guidance, SD1.5": (
        "Adaptive Guidance compares the positive and negative predictions at every step and, once they agree past "
        "a threshold, runs the rest of the steps without the negative pass; the log reports the passes saved. Try "
        "threshold first: 1.0 never stops guiding, lower values stop sooner and save more model calls. Paper: "
        "Castillo et al., Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models, "
        "arXiv:2312.12487."),
    "CADS diverse batch, SDXL": (
        "CADS adds scheduled noise to the text conditioning early in the run, so a batch of four at CFG 9 varies "
        "more while it still follows the prompt. Try noise_scale first: 0 is plain sampling, higher values give "
        "more variety and, too high, drift from the prompt; tau1 and tau2 set where the noise fades out. Paper: "
        "Sadat et al., CADS: Unleashing the Diversity of Diffusion Models through Condition-Annealed Sampling, "
        "arXiv:2310.17347."),
    "Annealing Guidance sampler, SDXL": (
        "A SAMPLER whose CFG scale at every step is predicted by the authors' learned scheduler; it needs their "
        "SDXL weights converted to models/guidance_schedulers/annealing_sdxl.safetensors (the README shows the "
        "command). Try guidance_lambda first: higher follows the prompt more closely, lower favours image quality, "
        "and 0.4 is the authors' value. Paper: Yehezkel et al., Navigating with Annealing Guidance Scale in "
        "Diffusion Space, arXiv:2506.24108."),
    "Annealing Guidance guider with euler_cfg_pp, SDXL": (
        "The learned CFG scale of the annealing scheduler as a GUIDER for SamplerCustomAdvanced, so it works with "
        "any sampler; euler_cfg_pp re-noises with the negative prediction as the paper's method does. Like the "
        "sampler it needs the authors' SDXL weights converted to models/guidance_schedulers (see the README). Try "
        "guidance_lambda first (higher follows the prompt more closely), then another sampler in KSamplerSelect. "
        "Paper: Yehezkel et al., Navigating with Annealing Guidance Scale in Diffusion Space, arXiv:2506.24108."),
    "Noise-Level Guidance, SD1.5": (
        "Before sampling starts, Noise-Level Guidance nudges the starting noise along the CFG direction measured at "
        "the highest noise level, then SamplerCustomAdvanced samples from the refined noise. Try iterations first: "
        "0 passes the noise through unchanged, each iteration costs one two-branch model call and aligns the noise "
        "a little more with the prompt. Paper: Mannering et al., Noise-Level Diffusion Guidance: Well Begun is "
        "Half Done, arXiv:2509.13936."),
    "CADS + Scheduled CFG + Adaptive Guidance + PAG + DeepCache, SD1.5": (
        "Five Preprint patches stacked on one model for one KSampler: CADS noises the conditioning early, "
        "Scheduled CFG lowers the scale from 6 to 3 inside a sigma interval, Adaptive Guidance drops the negative "
        "pass once it stops mattering, PAG adds structure and DeepCache reuses deep features. Try scale on the PAG "
        "node first: 0 switches PAG off exactly, and bypassing any node (Ctrl+B) shows its share of the result. "
        "Papers: CADS arXiv:2310.17347, CFG schedules arXiv:2404.13040, Adaptive Guidance arXiv:2312.12487, PAG "
        "arXiv:2403.17377 and DeepCache arXiv:2312.00858."),
}
