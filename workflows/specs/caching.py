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
