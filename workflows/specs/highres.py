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

HIDIFFUSION = ("Paper: Zhang et al., HiDiffusion: Unlocking Higher-Resolution Creativity and Efficiency in Pretrained "
               "Diffusion Models, arXiv:2311.17528.")

NOTES: dict[str, str] = {
    "HiDiffusion at 2x (1024x1024), SD1.5": (
        "HiDiffusion lets SD1.5 draw at 1024x1024 without repeating objects: RAU-Net shrinks the features the deep "
        "blocks see while the layout forms, and MSW-MSA makes the top attention layers attend in shifted windows, "
        "which is faster. Try raunet first: switched off, the model repeats objects at this size; msw_msa off "
        "shows the time it saves. " + HIDIFFUSION),
    "HiDiffusion at 4x (2048x1536), SD1.5": (
        "HiDiffusion at four times the SD1.5 area with the official 4x settings set by hand, since preset auto "
        "picks the 2x preset for 2048x1536, as the official code does. Try t1 first: the fraction of the run, from "
        "the start, with RAU-Net's first part on; longer holds the layout at the training size longer, and t2 sets "
        "the second part. " + HIDIFFUSION),
    "HiDiffusion at 2x (2048x2048), SDXL": (
        "HiDiffusion on SDXL at 2048x2048, twice its training side, with the official SDXL schedule that preset "
        "auto picks for the size. Try preset first: custom hands the two RAU-Net parts to t1 and t2; msw_msa off "
        "trades the windowed attention's speed for plain attention. " + HIDIFFUSION),
    "HiDiffusion on the proving-ground toy at 2x": (
        "HiDiffusion on the pack's trained toy at 256x256, twice its 128x128 training size, so it runs on any "
        "machine with nothing downloaded. Try raunet first: switched off, the toy repeats its shapes at this size, "
        "which is what RAU-Net is there to stop. " + HIDIFFUSION),
    "RoPE and attention entropy scaling at 2048x1536, Flux": (
        "Two patches for Flux above its 1024 training size: RoPE scaling stretches the rotary position embedding "
        "of each axis to the new extent, and attention entropy scaling sharpens self-attention that would turn "
        "diffuse over more tokens. Try mode on the RoPE node first: NTK-aware keeps fine detail, position "
        "interpolation is smoother. Papers: I-Max, arXiv:2410.07536, and position interpolation, arXiv:2306.15595, "
        "for RoPE; Jin et al., Training-free Diffusion Model Adaptation to Variable-Sized Text-to-Image Synthesis, "
        "arXiv:2306.08645, for entropy scaling."),
    "Two-stage upscale with block noise, SD1.5": (
        "Generate at 512, upscale the latent 2x, re-noise it half way and denoise again: block noise reaches the "
        "coarse picture, which white noise, averaged over each upscaled block, barely touches. Try block_size "
        "first: set it to the upscale factor, 1 is exactly core's Random Noise, and block_fraction below 1 mixes "
        "in white noise for a milder re-noising. Paper: Teng et al., Relay Diffusion: Unifying diffusion process "
        "across resolutions for image synthesis, arXiv:2309.03350."),
}
