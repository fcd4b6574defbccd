"""Example workflows for frequency-band guidance in a two-stage upscale: DiffuseHigh's wavelet structure guidance
(generate, decode, upscale, sharpen, encode, re-noise the last 15 of 50 steps), FAM's frequency modulation
(generate, upsample the latent, diffuse-denoise at the large size) and the whole of FAM Diffusion (frequency and
attention modulation: the native latent also goes, at its own size, to the attention node)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _stage_one() -> dict:
    """Checkpoint, prompts and the 512x512 first stage as node 11."""
    prompt = common.sd15_base(width=512, height=512)
    prompt["11"] = {"class_type": "KSampler",
                    "inputs": {"model": ["1", 0], "seed": 42, "steps": 30, "cfg": 7.0, "sampler_name": "euler",
                               "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
                               "latent_image": ["4", 0], "denoise": 1.0},
                    "_meta": {"title": "Stage 1 at 512x512"}}
    return prompt


def _diffusehigh() -> dict:
    prompt = _stage_one()
    prompt["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}}
    prompt["13"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["12", 0], "upscale_method": "bicubic",
                                                             "scale_by": 2.0},
                    "_meta": {"title": "Upscale x2 (bicubic)"}}
    # core's alpha is 10x the paper's: 0.1 here is DiffuseHigh's unsharp mask 2x - blur(x), kernel 3
    prompt["14"] = {"class_type": "ImageSharpen", "inputs": {"image": ["13", 0], "sharpen_radius": 1, "sigma": 1.0,
                                                             "alpha": 0.1},
                    "_meta": {"title": "Unsharp mask (kernel 3)"}}
    prompt["15"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["14", 0], "vae": ["1", 2]},
                    "_meta": {"title": "Guide latent"}}
    prompt["16"] = {"class_type": "PreprintDiffuseHigh",
                    "inputs": {"model": ["1", 0], "guide": ["15", 0], "guidance_fraction": 0.333, "wavelet": "db4"},
                    "_meta": {"title": "DiffuseHigh: structure guidance, first 5 of 15 steps"}}
    prompt["7"] = {"class_type": "KSamplerAdvanced",
                   "inputs": {"model": ["16", 0], "add_noise": "enable", "noise_seed": 42, "steps": 50, "cfg": 7.5,
                              "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
                              "negative": ["3", 0], "latent_image": ["15", 0], "start_at_step": 35,
                              "end_at_step": 10000, "return_with_leftover_noise": "disable"},
                   "_meta": {"title": "Stage 2 at 1024x1024: re-noise to the last 15 of 50 steps"}}
    return prompt


def _fam() -> dict:
    prompt = _stage_one()
    prompt["12"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["11", 0], "upscale_method": "bicubic",
                                                                "scale_by": 2.0},
                    "_meta": {"title": "Upsampled native latent"}}
    prompt["16"] = {"class_type": "PreprintFAMFrequency",
                    "inputs": {"model": ["1", 0], "native_latent": ["12", 0], "c": 0.5},
                    "_meta": {"title": "FAM frequency modulation"}}
    prompt["7"] = {"class_type": "KSampler",
                   "inputs": {"model": ["16", 0], "seed": 42, "steps": 30, "cfg": 7.0, "sampler_name": "euler",
                              "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
                              "latent_image": ["12", 0], "denoise": 1.0},
                   "_meta": {"title": "Stage 2 at 1024x1024: diffuse-denoise from the upsampled latent"}}
    return prompt


def _fam_attention() -> dict:
    """FAM frequency modulation as in ``_fam``, then attention modulation fed the first stage's latent as it is."""
    prompt = _fam()
    prompt["17"] = {"class_type": "PreprintFAMAttention",
                    "inputs": {"model": ["16", 0], "native_latent": ["11", 0], "weight": 0.7, "layers": "",
                               "start_percent": 0.0, "end_percent": 1.0},
                    "_meta": {"title": "FAM attention modulation (native maps at 512x512)"}}
    prompt["7"]["inputs"]["model"] = ["17", 0]
    return prompt


WORKFLOWS = {
    "DiffuseHigh two-stage upscale, SD1.5": _diffusehigh(),
    "FAM frequency modulation 2x upscale, SD1.5": _fam(),
    "FAM Diffusion 2x upscale (frequency + attention), SD1.5": _fam_attention(),
}

NOTES: dict[str, str] = {
    "DiffuseHigh two-stage upscale, SD1.5": (
        "A 512 px image is upscaled, sharpened and encoded, then re-noised to the last 15 of 50 steps; for the "
        "first third of those steps the wavelet low band of the predicted image is taken from that guide, so the "
        "layout stays while detail is added. Try guidance_fraction first: 0 is a plain img2img upscale, higher "
        "keeps more of the first image's structure. Paper: Kim et al., DiffuseHigh, arXiv:2406.18459."),
    "FAM frequency modulation 2x upscale, SD1.5": (
        "The second pass at 1024 px runs from noise while its low frequencies are pulled towards the upsampled "
        "512 px result, less and less as the run goes on, so the global layout comes from the native size. Try c "
        "first: 0 switches the modulation off, higher keeps more of the native layout for longer. Paper: Yang et "
        "al., FAM Diffusion, arXiv:2411.18552."),
    "FAM Diffusion 2x upscale (frequency + attention), SD1.5": (
        "The whole FAM method: the 1024 px pass takes its low frequencies from the upsampled 512 px result and, in "
        "the first up-block self-attention layers, blends in the attention maps of a 512 px pass over that result "
        "re-noised to the same step, so local textures follow the native image. Try weight first: 0 leaves "
        "frequency modulation alone, 0.7 is the paper's blend, 1 uses the native maps only. Paper: Yang et al., "
        "FAM Diffusion, arXiv:2411.18552."),
}
