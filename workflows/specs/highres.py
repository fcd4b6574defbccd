"""Example workflows for the multi-resolution family: HiDiffusion on SD1.5 and SDXL and on the trained toy;
RoPE and attention entropy scaling on Flux."""

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
}
