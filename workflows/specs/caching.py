"""Example workflows for the caching family: DeepCache, Block Cache (calibrate / profile), encoder
propagation, DiT block cache on Flux, DeepCache + PAG."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
FLUX_CHECKPOINT = "flux1-dev-fp8.safetensors"
WINDOW = {"start_percent": 0.0, "end_percent": 1.0}


def _with_cache(base: dict, node: dict, title: str, **ks) -> dict:
    prompt = {**base, **common.ksampler(model=["11", 0], **ks)}
    prompt["11"] = {**node, "_meta": {"title": title}}
    return prompt


def _base(checkpoint: str | None = None, size: int = 512) -> dict:
    b = common.sd15_base(width=size, height=size)
    if checkpoint:
        b["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}
    return b


_deepcache = _with_cache(
    _base(),
    {"class_type": "PreprintDeepCache", "inputs": {"model": ["1", 0], "cache_interval": 3, "branch_depth": 0,
                                                   "schedule": "uniform", **WINDOW}},
    "DeepCache: deep features every 3rd step", steps=25, cfg=7.0)

_calibrate = _with_cache(
    _base(SDXL_CHECKPOINT, 1024),
    {"class_type": "PreprintBlockCache", "inputs": {"model": ["1", 0], "mode": "calibrate", "threshold": 0.3,
                                                    "profile_name": "sdxl_base", **WINDOW}},
    "Block Cache: calibrate once (saves output/preprint_cache_profiles/sdxl_base.json)", steps=25, cfg=6.0)

_profile = _with_cache(
    _base(SDXL_CHECKPOINT, 1024),
    {"class_type": "PreprintBlockCache", "inputs": {"model": ["1", 0], "mode": "profile", "threshold": 0.3,
                                                    "profile_name": "sdxl_base", **WINDOW}},
    "Block Cache from the saved SDXL profile", steps=30, cfg=6.0)

_encprop = _with_cache(
    _base(),
    {"class_type": "PreprintEncoderPropagation", "inputs": {"model": ["1", 0], "key_steps": "non-uniform",
                                                            "key_interval": 2, **WINDOW}},
    "Encoder propagation: decoder-only on non-key steps", steps=25, cfg=7.0)

_flux = _with_cache(
    _base(FLUX_CHECKPOINT, 1024),
    {"class_type": "PreprintDiTBlockCache", "inputs": {"model": ["1", 0], "threshold": 0.12,
                                                       "extrapolation_order": 2, "max_consecutive_skips": 3,
                                                       **WINDOW}},
    "DiT Block Cache (first-block criterion, AB-2 residuals)", steps=28, cfg=1.0, scheduler="simple")
_flux["3"]["inputs"]["text"] = ""  # Flux dev runs at cfg 1: the negative prompt is unused

_pag = _with_cache(
    _base(),
    {"class_type": "PreprintDeepCache", "inputs": {"model": ["12", 0], "cache_interval": 3, "branch_depth": 0,
                                                   "schedule": "uniform", **WINDOW}},
    "DeepCache on the PAG model (perturbed branch keeps its own cache)", steps=25, cfg=4.0)
_pag["12"] = {"class_type": "PreprintPerturbedAttentionGuidance",
              "inputs": {"model": ["1", 0], "scale": 3.0, "layers": "", "adaptive_scale": 0.0, "sigma_start": -1.0,
                         "sigma_end": -1.0, "rescale": 0.0, "joint_attention": "image-to-image"},
              "_meta": {"title": "Perturbed-Attention Guidance (scale 3)"}}

WORKFLOWS: dict[str, dict] = {
    "DeepCache, SD1.5": _deepcache,
    "Block Cache calibration, SDXL": _calibrate,
    "Block Cache with a saved profile, SDXL": _profile,
    "Encoder propagation (Faster Diffusion), SD1.5": _encprop,
    "DiT Block Cache, Flux": _flux,
    "PAG + DeepCache, SD1.5": _pag,
}

DEEPCACHE = "Paper: Ma et al., DeepCache: Accelerating Diffusion Models for Free, arXiv:2312.00858."
BLOCK_CACHE = ("Paper: Wimbauer et al., Cache Me if You Can: Accelerating Diffusion Models through Block Caching, "
               "arXiv:2312.03209.")

NOTES: dict[str, str] = {
    "DeepCache, SD1.5": (
        "DeepCache runs the whole UNet every third step and, on the steps between, only its shallow branch, which "
        "reads the deep features cached at the last full step. Try cache_interval first: 1 switches caching off, 3 "
        "is close to lossless, 5 is a fast draft (set schedule to non-uniform there). " + DEEPCACHE),
    "Block Cache calibration, SDXL": (
        "This run computes every UNet block, measures how fast each one changes, and saves the profile "
        "output/preprint_cache_profiles/sdxl_base.json that the example Block Cache with a saved profile reads. "
        "Try profile_name first: name the profile after your checkpoint, queue this graph once at your usual "
        "settings, then set mode to profile. " + BLOCK_CACHE),
    "Block Cache with a saved profile, SDXL": (
        "Block Cache reuses each UNet block's output while the change its saved profile predicts stays below a "
        "threshold; run the Block Cache calibration example once first to make sdxl_base.json (a profile serves any "
        "step count, 30 here). Try threshold first: 0 switches reuse off, higher values skip more blocks, faster "
        "and with more drift from the uncached image. " + BLOCK_CACHE),
    "Encoder propagation (Faster Diffusion), SD1.5": (
        "On key steps the whole UNet runs; on the others the encoder is skipped and its cached features feed the "
        "decoder, a gentler speed-up than DeepCache. Try key_steps first: non-uniform is the paper's key set "
        "rescaled to your step count, uniform puts a key step every key_interval steps (larger is faster). "
        "Paper: Li et al., Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion Models, "
        "arXiv:2312.09608."),
    "DiT Block Cache, Flux": (
        "The first transformer block always runs; while its output changes little from the last full step, the "
        "other blocks are skipped and their residuals extrapolated from the last ones computed. Try threshold "
        "first: 0 is off, 0.08 to 0.15 suits Flux, higher skips more blocks and drifts further from the uncached "
        "image. Papers: the first-block criterion of TeaCache, arXiv:2411.19108, and the Adams-Bashforth "
        "extrapolation of AB-Cache, arXiv:2504.10540."),
    "PAG + DeepCache, SD1.5": (
        "Perturbed-Attention Guidance and DeepCache on one model: the perturbed copy of the prompt keeps a "
        "deep-feature cache of its own, apart from the positive and negative prompts'. Try scale on the PAG node "
        "first: 0 switches PAG off exactly, 3 with CFG 4 is the paper's setting; cache_interval on DeepCache trades "
        "speed for detail. Papers: Ahn et al., Self-Rectifying Diffusion Sampling with Perturbed-Attention "
        "Guidance, arXiv:2403.17377, and Ma et al., DeepCache, arXiv:2312.00858."),
}
