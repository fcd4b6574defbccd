"""Example workflows for the multi-resolution family: HiDiffusion on SD1.5 and SDXL and on the trained toy;
RoPE and attention entropy scaling on Flux; a two-stage upscale re-noised with block noise."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"


def _hidiffusion(width: int, height: int, t1: float, t2: float, checkpoint: str | None = None,
                 preset: str = "auto", **ks) -> dict:
    prompt = {**common.sd15_base(width=width, height=height), **common.ksampler(model=["11", 0], **ks)}
    if checkpoint:
        prompt["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}
    title = "HiDiffusion (official preset for the size)" if preset == "auto" else f"HiDiffusion (t1 {t1}, t2 {t2})"
    prompt["11"] = {"class_type": "PreprintHiDiffusion",
                    "inputs": {"model": ["1", 0], "raunet": True, "msw_msa": True, "t1": t1, "t2": t2,
                               "preset": preset},
                    "_meta": {"title": title}}
    return prompt


_toy = _hidiffusion(256, 256, 0.4, 0.0, sampler_name="dpmpp_2m", steps=20, cfg=5.0)
_toy["1"] = {"class_type": "PreprintProvingGroundModel", "inputs": {"architecture": "sd15"},
             "_meta": {"title": "Proving-ground toy (trained at 128x128)"}}
_toy["2"]["inputs"]["text"] = "a red circle above a blue square on a white background"
_toy["3"]["inputs"]["text"] = ""

_flux = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev-fp8.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": common.POSITIVE, "clip": ["1", 1]},
          "_meta": {"title": "Prompt"}},
    "14": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 3.5}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 2048, "height": 1536, "batch_size": 1}},
    "15": {"class_type": "PreprintRoPEScaling",
           "inputs": {"model": ["1", 0], "mode": "NTK-aware", "training_width": 0, "training_height": 0},
           "_meta": {"title": "RoPE scaling per axis (trained at 1024)"}},
    "11": {"class_type": "PreprintAttentionEntropyScaling",
           "inputs": {"model": ["15", 0], "training_width": 0, "training_height": 0},
           "_meta": {"title": "Attention entropy scaling (trained at 1024)"}},
    "7": {"class_type": "KSampler", "inputs": {"model": ["11", 0], "seed": 42, "steps": 28, "cfg": 1.0,
                                               "sampler_name": "euler", "scheduler": "simple", "positive": ["14", 0],
                                               "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "preprint"}},
}

def _block_noise_upscale() -> dict:
    """Generate at 512, upscale the latent 2x, re-noise it with 2x2 block noise and denoise half the way."""
    prompt = common.sd15_base(width=512, height=512)
    prompt["11"] = {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 42, "steps": 25, "cfg": 7.0,
                                                       "sampler_name": "dpmpp_2m", "scheduler": "karras",
                                                       "positive": ["2", 0], "negative": ["3", 0],
                                                       "latent_image": ["4", 0], "denoise": 1.0},
                    "_meta": {"title": "Stage 1 at 512x512"}}
    prompt["12"] = {"class_type": "LatentUpscaleBy",
                    "inputs": {"samples": ["11", 0], "upscale_method": "bislerp", "scale_by": 2.0}}
    prompt["13"] = {"class_type": "PreprintBlockNoise",
                    "inputs": {"noise_seed": 42, "block_size": 2, "block_fraction": 1.0},
                    "_meta": {"title": "Block noise (block = upscale factor)"}}
    prompt["14"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}}
    prompt["15"] = {"class_type": "BasicScheduler",
                    "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 20, "denoise": 0.5},
                    "_meta": {"title": "Stage 2: re-noise half way"}}
    prompt["16"] = {"class_type": "CFGGuider",
                    "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 7.0}}
    prompt["7"] = {"class_type": "SamplerCustomAdvanced",
                   "inputs": {"noise": ["13", 0], "guider": ["16", 0], "sampler": ["14", 0], "sigmas": ["15", 0],
                              "latent_image": ["12", 0]},
                   "_meta": {"title": "Stage 2 at 1024x1024"}}
    return prompt


WORKFLOWS = {
    "HiDiffusion at 2x (1024x1024), SD1.5": _hidiffusion(1024, 1024, 0.4, 0.0, sampler_name="dpmpp_2m", steps=30,
                                                         cfg=7.0),
    # 1536 px on one side: 'auto' would pick the 2x preset, as the official code does; the 4x settings by hand
    "HiDiffusion at 4x (2048x1536), SD1.5": _hidiffusion(2048, 1536, 0.7, 0.3, preset="custom",
                                                         sampler_name="dpmpp_2m", steps=30, cfg=7.0),
    "HiDiffusion at 2x (2048x2048), SDXL": _hidiffusion(2048, 2048, 0.4, 0.0, SDXL_CHECKPOINT,
                                                        sampler_name="dpmpp_2m", steps=30, cfg=6.0),
    "HiDiffusion on the proving-ground toy at 2x": _toy,
    "RoPE and attention entropy scaling at 2048x1536, Flux": _flux,
    "Two-stage upscale with block noise, SD1.5": _block_noise_upscale(),
}
