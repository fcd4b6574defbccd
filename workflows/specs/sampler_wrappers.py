"""Example workflows for the sampler wrappers (Time-Shift, Omegance, AdaptiveDiffusion) and the schedules
(logistic, GITS search), as API prompts on SD1.5."""

import copy
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _select(name: str = "dpmpp_2m") -> dict:
    return {"class_type": "KSamplerSelect", "inputs": {"sampler_name": name}, "_meta": {"title": "Base sampler"}}


def _wrapped(wrapper: dict, title: str, base: str = "dpmpp_2m", steps: int = 20, cfg: float = 7.0) -> dict:
    """SD1.5 graph: KSamplerSelect (11) -> wrapper (12) -> SamplerCustomAdvanced (7)."""
    prompt = {**common.sd15_base(), **common.custom_sampling(["12", 0], steps=steps, cfg=cfg)}
    prompt["11"] = _select(base)
    prompt["12"] = {**wrapper, "_meta": {"title": title}}
    prompt["12"]["inputs"] = {"sampler": ["11", 0], **wrapper["inputs"]}
    return prompt


_time_shift = _wrapped({"class_type": "PreprintTimeShiftSampler",
                        "inputs": {"window": 30.0, "cutoff": 300.0, "data_variance": 0.0}},
                       "Time-Shift (window 30, cutoff 300) around dpmpp_2m", steps=10)

_omegance = _wrapped({"class_type": "PreprintOmeganceSampler",
                      "inputs": {"omega": 6.0, "schedule": "cosine", "omega_end": -4.0, "mask_omega": 0.0}},
                     "Omegance: detail early, smooth late (omega 6 -> -4)", base="euler", steps=25)

# Omegance with a spatial mask: a solid mask from SolidMask + a rectangle, omega 8 inside (detailed subject),
# -6 outside (smooth background).
_omegance_mask = _wrapped({"class_type": "PreprintOmeganceSampler",
                           "inputs": {"omega": -6.0, "schedule": "constant", "omega_end": -6.0, "mask_omega": 8.0,
                                      "mask": ["14", 0]}},
                          "Omegance with a mask: detailed centre, smooth surroundings", base="euler", steps=25)
_omegance_mask["13"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 512, "height": 512},
                        "_meta": {"title": "Empty mask"}}
_omegance_mask["15"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 256, "height": 256},
                        "_meta": {"title": "Centre square"}}
_omegance_mask["14"] = {"class_type": "MaskComposite",
                        "inputs": {"destination": ["13", 0], "source": ["15", 0], "x": 128, "y": 128,
                                   "operation": "add"},
                        "_meta": {"title": "Mask: centre square"}}

_adaptive = _wrapped({"class_type": "PreprintAdaptiveDiffusionSampler",
                      "inputs": {"threshold": 0.01, "max_skips": 4}},
                     "AdaptiveDiffusion step skipping (threshold 0.01) around dpmpp_2m", steps=30)

_stack = _wrapped({"class_type": "PreprintAdaptiveDiffusionSampler",
                   "inputs": {"threshold": 0.01, "max_skips": 4}},
                  "AdaptiveDiffusion over Omegance over DPM-Solver++ (wrappers stack)", steps=30)
_stack["16"] = {"class_type": "PreprintOmeganceSampler",
                "inputs": {"sampler": ["11", 0], "omega": 4.0, "schedule": "constant", "omega_end": 4.0,
                           "mask_omega": 0.0},
                "_meta": {"title": "Omegance (omega 4)"}}
_stack["11"] = {"class_type": "PreprintSamplerDPMSolverPP", "inputs": {"solver": "2M", "lower_order_final": True},
                "_meta": {"title": "DPM-Solver++ 2M (Preprint)"}}
_stack["12"]["inputs"]["sampler"] = ["16", 0]

# Logistic schedule as a SIGMAS node feeding SamplerCustomAdvanced (replaces BasicScheduler 6).
_logistic = {**common.sd15_base(), **common.custom_sampling(["11", 0], steps=20, cfg=7.0)}
_logistic["11"] = _select("dpmpp_2m")
_logistic["6"] = {"class_type": "PreprintLogisticScheduler",
                  "inputs": {"model": ["1", 0], "steps": 20, "k": 10.0, "t0": 0.45, "denoise": 1.0},
                  "_meta": {"title": "Logistic schedule (k 10, t0 0.45)"}}

# Logistic schedule by name in the stock KSampler dropdown.
_logistic_ksampler = {**common.sd15_base(), **common.ksampler(sampler_name="dpmpp_2m", scheduler="preprint_logistic",
                                                              steps=20)}
_logistic_ksampler["7"]["_meta"] = {"title": "Stock KSampler with scheduler preprint_logistic"}

# GITS: search on this model, prompt and CFG; the SIGMAS drive SamplerCustomAdvanced.
_gits = {**common.sd15_base(), **common.custom_sampling(["11", 0], steps=8, cfg=7.0)}
_gits["11"] = _select("ipndm")
_gits["6"] = {"class_type": "PreprintGITSScheduler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                         "steps": 8, "cfg": 7.0, "seed": 0, "warmup_samples": 4, "teacher_steps": 48,
                         "coeff": 1.2, "grid": "auto"},
              "_meta": {"title": "GITS search (8 steps; DPM-Solver++ teacher, 48 steps, 4 warm-up samples "
                                 "for speed, official: 60 and 256)"}}

# GITS through the stock KSampler: the searched MODEL plus scheduler preprint_gits.
_gits_ksampler = copy.deepcopy(_gits)
for _k in ("5", "7", "10", "11"):
    _gits_ksampler.pop(_k)
_gits_ksampler.update(common.ksampler(model=["6", 1], sampler_name="ipndm", scheduler="preprint_gits", steps=8))
_gits_ksampler["7"]["_meta"] = {"title": "Stock KSampler with scheduler preprint_gits (searched model)"}

WORKFLOWS: dict[str, dict] = {
    "Time-Shift sampler, SD1.5": _time_shift,
    "Omegance scheduled detail, SD1.5": _omegance,
    "Omegance with a mask, SD1.5": _omegance_mask,
    "AdaptiveDiffusion step skipping, SD1.5": _adaptive,
    "Sampler wrappers stacked, SD1.5": _stack,
    "Logistic schedule, SD1.5": _logistic,
    "Logistic schedule in the stock KSampler, SD1.5": _logistic_ksampler,
    "GITS schedule search, SD1.5": _gits,
    "GITS schedule in the stock KSampler, SD1.5": _gits_ksampler,
}

OMEGANCE = ("Paper: Hong et al., Omegance: A Single Parameter for Various Granularities in Diffusion-Based "
            "Synthesis, arXiv:2411.17769.")
LOGISTIC = ("Paper: Lin et al., Schedule Your Edit: A Simple yet Effective Diffusion Noise Schedule for Image Editing, "
            "arXiv:2410.18756.")
GITS = "Paper: Chen et al., On the Trajectory Regularity of ODE-based Diffusion Sampling, arXiv:2405.11326."

NOTES: dict[str, str] = {
    "Time-Shift sampler, SD1.5": (
        "Time-Shift wraps dpmpp_2m and, before each model call, gives the network the timestep within a window "
        "whose noise level best matches the current latent, against the exposure bias of short runs, at no extra "
        "model calls. Try window first: 0 is the plain sampler, the paper uses 30 to 60 with a cutoff of 200 to "
        "400; on SD latents also set data_variance to your latents' variance (the README explains why). Paper: Li "
        "et al., Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time Steps, "
        "arXiv:2305.15583."),
    "Omegance scheduled detail, SD1.5": (
        "Omegance scales each step's predicted noise a little: positive omega gives richer detail, negative omega "
        "smoother, simpler images, and here omega moves on a cosine from 6 while the layout forms to -4 at the "
        "end. Try omega first: 0 with omega_end 0 is the plain sampler, and the useful range is about -10 to 10. "
        + OMEGANCE),
    "Omegance with a mask, SD1.5": (
        "Omegance with a mask: omega 8 inside the centre square gives the subject fine detail, and omega -6 outside "
        "keeps the surroundings smooth. Try mask_omega first: it is the granularity inside the mask (white), omega "
        "the one outside; the x and y of the MaskComposite node move the square. " + OMEGANCE),
    "AdaptiveDiffusion step skipping, SD1.5": (
        "AdaptiveDiffusion reuses the previous noise prediction instead of calling the model while the latent "
        "moves steadily, judged by a third-order difference of its trajectory; the log says how many calls were "
        "saved. Try threshold first: 0 is off, larger skips more, and 0.01 is the paper's value for SD1.5. Paper: "
        "Ye et al., Training-Free Adaptive Diffusion with Bounded Difference Approximation Strategy, "
        "arXiv:2410.09873."),
    "Sampler wrappers stacked, SD1.5": (
        "Sampler wrappers stack: Preprint's DPM-Solver++ 2M is wrapped by Omegance (omega 4, more detail), and that "
        "by AdaptiveDiffusion, which skips model calls while the trajectory is steady. Try omega on the Omegance "
        "node first: 0 makes that layer the plain sampler, as threshold 0 does for AdaptiveDiffusion. Papers: "
        "DPM-Solver++ arXiv:2211.01095, Omegance arXiv:2411.17769, AdaptiveDiffusion arXiv:2410.09873."),
    "Logistic schedule, SD1.5": (
        "A SIGMAS node whose signal fraction follows a logistic curve in time, feeding SamplerCustomAdvanced in "
        "place of the BasicScheduler. Try k first: larger values span more noise levels (k 15 with t0 0.5 is core's "
        "exponential schedule on SD1.5), smaller ones keep the run in a narrower band, and t0 moves the midpoint. "
        + LOGISTIC),
    "Logistic schedule in the stock KSampler, SD1.5": (
        "The logistic schedule by name in the stock KSampler's scheduler list: preprint_logistic, with k 15 and t0 "
        "0.5. Try scheduler first: on SD1.5 these settings give the same sigmas as core's exponential, so for "
        "another curve use the Logistic Scheduler node, whose k and t0 can be set. " + LOGISTIC),
    "GITS schedule search, SD1.5": (
        "GITS searches the best 8-step schedule for this model, prompt, CFG and size: a teacher solver runs warm-up "
        "samples on a fine grid and dynamic programming picks the cheapest path; the search runs once and ComfyUI "
        "caches it. Try warmup_samples first: 4 keeps the search quick, the official 256 (with teacher_steps 60) is "
        "steadier and costs as much as that many images. " + GITS),
    "GITS schedule in the stock KSampler, SD1.5": (
        "The GITS node also outputs a MODEL that carries its search, and a stock KSampler with scheduler "
        "preprint_gits samples on the searched schedule. Try steps on the KSampler first: any count up to the "
        "search's teacher_steps works without a new search. " + GITS),
}
