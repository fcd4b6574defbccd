"""Example workflows for Tiled Diffusion: a large image generated tile by tile on SD1.5 with the shifted grid, and a
two-stage upscale whose second pass runs on overlapping Gaussian-weighted tiles."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _tiled(model: list, mode: str, title: str, tile: int = 768, overlap: int = 128) -> dict:
    return {"class_type": "PreprintTiledDiffusion",
            "inputs": {"model": model, "tile_width": tile, "tile_height": tile, "mode": mode, "overlap": overlap,
                       "weighting": "gaussian", "tile_batch_size": 1, "sigma_start": -1.0, "sigma_end": -1.0},
            "_meta": {"title": title}}


def _large() -> dict:
    """1024 x 1536 from noise, 768 px tiles on a grid shifted every step (2 to 6 tiles a step, 5 on average)."""
    prompt = {**common.sd15_base(width=1024, height=1536),
              **common.ksampler(model=["11", 0], sampler_name="dpmpp_2m", steps=30, cfg=7.0)}
    prompt["11"] = _tiled(["1", 0], "shifted (FSTD)", "Tiled Diffusion: 768 px tiles, grid shifted each step")
    return prompt


def _upscale() -> dict:
    """Generate at 512 x 768, upscale the latent 2x, then denoise half the way on overlapping tiles."""
    prompt = common.sd15_base(width=512, height=768)
    prompt["11"] = {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 42, "steps": 25, "cfg": 7.0,
                                                       "sampler_name": "dpmpp_2m", "scheduler": "karras",
                                                       "positive": ["2", 0], "negative": ["3", 0],
                                                       "latent_image": ["4", 0], "denoise": 1.0},
                    "_meta": {"title": "Stage 1 at 512x768"}}
    prompt["12"] = {"class_type": "LatentUpscaleBy",
                    "inputs": {"samples": ["11", 0], "upscale_method": "bislerp", "scale_by": 2.0}}
    prompt["13"] = _tiled(["1", 0], "overlapping (MultiDiffusion)",
                          "Tiled Diffusion: 768 px tiles, 128 px Gaussian-blended overlap")
    prompt["7"] = {"class_type": "KSampler", "inputs": {"model": ["13", 0], "seed": 42, "steps": 20, "cfg": 7.0,
                                                      "sampler_name": "dpmpp_2m", "scheduler": "karras",
                                                      "positive": ["2", 0], "negative": ["3", 0],
                                                      "latent_image": ["12", 0], "denoise": 0.5},
                   "_meta": {"title": "Stage 2 at 1024x1536, denoise 0.5"}}
    return prompt


WORKFLOWS = {
    "Tiled Diffusion at 2x (1024x1536), SD1.5": _large(),
    "Two-stage tiled upscale to 1024x1536, SD1.5": _upscale(),
}

NOTES: dict[str, str] = {
    "Tiled Diffusion at 2x (1024x1536), SD1.5": (
        "Every model call runs on tiles of the model's training size whose grid shifts by a seeded offset each "
        "step, so the seams never stay in one place and memory stays flat at any size. Try mode first: shifted "
        "(FSTD) costs one call per tile, overlapping (MultiDiffusion) blends overlapping tiles and costs more. "
        "Papers: Zheng et al., Any-Size-Diffusion, arXiv:2308.16582, and Bar-Tal et al., MultiDiffusion, "
        "arXiv:2302.08113."),
    "Two-stage tiled upscale to 1024x1536, SD1.5": (
        "A first image at 512x768 is upscaled 2x and re-noised half way, and the second pass runs in tiles, the "
        "usual recipe for a large image without repeated objects. Try overlap first: more overlap blends tiles "
        "more smoothly in overlapping mode at a higher cost. Papers: Bar-Tal et al., MultiDiffusion, "
        "arXiv:2302.08113, and Zheng et al., Any-Size-Diffusion, arXiv:2308.16582."),
}
