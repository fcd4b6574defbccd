"""Example workflows for the DPM-Solver++ sampler node, the tiny test model and the proving-ground toys."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

_dpmpp = {**common.sd15_base(), **common.custom_sampling(["11", 0], steps=20, cfg=7.0)}
_dpmpp["11"] = {"class_type": "PreprintSamplerDPMSolverPP", "inputs": {"solver": "2M", "lower_order_final": True}}

_tiny = {**common.sd15_base(width=256, height=256), **common.ksampler(sampler_name="preprint_dpmpp_2m", steps=8)}
_tiny["1"] = {"class_type": "PreprintTinyTestModel", "inputs": {"architecture": "sd15", "weights_seed": 0},
              "_meta": {"title": "Tiny untrained test model"}}

TOY_PROMPT = "a red circle above a blue square on a white background"


def _toy(architecture: str, latent: str, sampler: str, scheduler: str, cfg: float) -> dict:
    """The trained proving-ground toy: a caption in its words, 128x128 (its training size), four seeds."""
    return {
        "1": {"class_type": "PreprintProvingGroundModel", "inputs": {"architecture": architecture},
              "_meta": {"title": "Proving-ground toy (trained on coloured shapes)"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": TOY_PROMPT, "clip": ["1", 1]},
              "_meta": {"title": "Positive prompt (shapes, colours, positions)"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]},
              "_meta": {"title": "Negative prompt (empty)"}},
        "4": {"class_type": latent, "inputs": {"width": 128, "height": 128, "batch_size": 4}},
        **common.ksampler(sampler_name=sampler, scheduler=scheduler, steps=20, cfg=cfg),
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "preprint_toy"}},
    }


WORKFLOWS = {
    "DPM-Solver++ 2M, SD1.5": _dpmpp,
    "Tiny test model smoke test (untrained)": _tiny,
    "Proving ground toy, DPM-Solver++ 2M, SD1.5 layout": _toy("sd15", "EmptyLatentImage", "preprint_dpmpp_2m",
                                                               "karras", 5.0),
    "Proving ground toy, Flux layout": _toy("flux", "EmptySD3LatentImage", "euler", "simple", 4.0),
}

DPMPP = "Lu et al., DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models, arXiv:2211.01095."

NOTES: dict[str, str] = {
    "DPM-Solver++ 2M, SD1.5": (
        "DPM-Solver++ as a SAMPLER node for SamplerCustomAdvanced, here the multistep 2M solver at 20 steps (on "
        "SD1.5 the same arithmetic as core's dpmpp_2m). Try solver first: 3M is multistep third order, while 2S and "
        "3S spend 2 and 3 model calls per step, so give them a half or a third of the steps. Paper: " + DPMPP),
    "Tiny test model smoke test (untrained)": (
        "A graph that runs with nothing downloaded: the Tiny Test Model builds an untrained model with SD1.5's "
        "block layout, so the image is noise and shows only that the graph runs end to end. Try architecture "
        "first: sdxl and flux build those layouts, to see a graph wire up for them. Its sampler, "
        "preprint_dpmpp_2m, comes from " + DPMPP),
    "Proving ground toy, DPM-Solver++ 2M, SD1.5 layout": (
        "The pack's trained toy with SD1.5's layout draws coloured circles, squares and triangles at 128x128, its "
        "training size, four seeds at once; it follows captions only loosely (the README's proving-ground section "
        "has the numbers). Try text in the positive prompt first: name colours, shapes and positions in the "
        "scenes' words, such as a green triangle in the top left on a black background. Its sampler, "
        "preprint_dpmpp_2m, comes from " + DPMPP),
    "Proving ground toy, Flux layout": (
        "The pack's trained toy with Flux's layout, a small DiT, at its 128x128 training size with Euler and the "
        "simple schedule, four seeds at once. Try cfg first: 1 switches guidance off, higher values follow the "
        "caption harder (the toy was trained with one caption in ten left empty so that CFG works). This is a plain "
        "core graph around the toy, with no paper behind it."),
}
