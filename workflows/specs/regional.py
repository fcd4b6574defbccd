"""Example workflows for the regional family: regional prompting with three regions on SD1.5, two on Flux, and on
the trained proving-ground toy."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _regions(clip: list, width: int, height: int, prompts: list[str], first_id: int = 20,
             clips: dict[int, list] | None = None) -> tuple[dict, list]:
    """One vertical strip per prompt, left to right: SolidMask + MaskComposite for the strip, CLIPTextEncode for the
    prompt (with ``clips[k]`` instead of ``clip`` for prompt k where given), a chained Region node. Returns the nodes
    and the link to the last Region."""
    nodes, link, n = {}, None, len(prompts)
    nodes[str(first_id)] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": width, "height": height},
                            "_meta": {"title": "Empty frame"}}
    for k, text in enumerate(prompts):
        base = first_id + 1 + 4 * k
        x0, x1 = k * width // n, (k + 1) * width // n
        nodes[str(base)] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": x1 - x0, "height": height}}
        nodes[str(base + 1)] = {"class_type": "MaskComposite",
                                "inputs": {"destination": [str(first_id), 0], "source": [str(base), 0], "x": x0,
                                           "y": 0, "operation": "add"},
                                "_meta": {"title": f"Strip {k + 1} of {n}"}}
        nodes[str(base + 2)] = {"class_type": "CLIPTextEncode",
                                "inputs": {"text": text, "clip": (clips or {}).get(k, clip)},
                                "_meta": {"title": f"Region {k + 1} prompt"}}
        inputs = {"conditioning": [str(base + 2), 0], "mask": [str(base + 1), 0], "strength": 1.0}
        if link is not None:
            inputs["regions"] = link
        nodes[str(base + 3)] = {"class_type": "PreprintRegion", "inputs": inputs}
        link = [str(base + 3), 0]
    return nodes, link


def _regional(model: list, regions: list, base_ratio: float = 0.2, end: float = 1.0) -> dict:
    return {"class_type": "PreprintRegionalPrompting",
            "inputs": {"model": model, "regions": regions, "base_ratio": base_ratio, "start_percent": 0.0,
                       "end_percent": end}}


def _sd15() -> dict:
    prompt = {**common.sd15_base(width=768, height=512), **common.ksampler(model=["11", 0], sampler_name="dpmpp_2m",
                                                                              steps=25, cfg=7.0)}
    prompt["2"]["inputs"]["text"] = "three animals in a meadow, sunny day, detailed"
    regions, link = _regions(["1", 1], 768, 512, ["a red fox", "a brown horse", "a white goat"])
    prompt.update(regions)
    prompt["11"] = _regional(["1", 0], link)
    return prompt


def _toy() -> dict:
    prompt = {**common.sd15_base(width=128, height=128), **common.ksampler(model=["11", 0], sampler_name="dpmpp_2m",
                                                                              steps=20, cfg=5.0)}
    prompt["1"] = {"class_type": "PreprintProvingGroundModel", "inputs": {"architecture": "sd15"},
                   "_meta": {"title": "Proving-ground toy (trained at 128x128)"}}
    prompt["2"]["inputs"]["text"] = "on a white background"
    prompt["3"]["inputs"]["text"] = ""
    regions, link = _regions(["1", 1], 128, 128, ["a red circle on the left", "a blue square on the right"])
    prompt.update(regions)
    prompt["11"] = _regional(["1", 0], link, base_ratio=0.1)
    return prompt


def _flux() -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev-fp8.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "two cats on a sofa, photo", "clip": ["1", 1]},
              "_meta": {"title": "Base prompt"}},
        "14": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 3.5}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1216, "height": 832, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["11", 0], "seed": 42, "steps": 24, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["14", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "preprint"}},
    }
    regions, link = _regions(["1", 1], 1216, 832, ["a ginger cat", "a black cat wearing a red scarf"])
    prompt.update(regions)
    prompt["11"] = _regional(["1", 0], link, base_ratio=0.3, end=0.4)
    return prompt


def _soft_inpaint(toy: bool) -> dict:
    """txt2img, then a second pass over the same latent with a feathered change map: left edge kept, right half
    redrawn, a soft ramp between."""
    size = 128 if toy else 512
    prompt = {**common.sd15_base(width=size, height=size), **common.ksampler(model=["1", 0], steps=20, cfg=7.0)}
    if toy:
        prompt["1"] = {"class_type": "PreprintProvingGroundModel", "inputs": {"architecture": "sd15"},
                       "_meta": {"title": "Proving-ground toy (trained at 128x128)"}}
        prompt["2"]["inputs"]["text"] = "a red circle on the left on a white background"
        prompt["3"]["inputs"]["text"] = ""
        prompt["7"]["inputs"].update(sampler_name="dpmpp_2m", cfg=5.0)
    prompt["8"]["inputs"]["samples"] = ["33", 0]
    prompt["30"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": size, "height": size}}
    prompt["31"] = {"class_type": "FeatherMask", "inputs": {"mask": ["30", 0], "left": size * 3 // 4, "top": 0,
                                                          "right": 0, "bottom": 0},
                    "_meta": {"title": "Change map: 0 at the left edge, 1 from three quarters"}}
    prompt["32"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["7", 0], "mask": ["31", 0]}}
    prompt["34"] = {"class_type": "CLIPTextEncode", "inputs": {
        "text": "a blue square on the right on a white background" if toy else
        "a lighthouse on a rocky coast at dusk, a sailing ship on the right, detailed", "clip": ["1", 1]},
                    "_meta": {"title": "Edit prompt"}}
    prompt["35"] = {"class_type": "PreprintDifferentialDiffusion", "inputs": {"model": ["1", 0]}}
    prompt["33"] = {"class_type": "KSampler", "inputs": {"model": ["35", 0], "seed": 7, "steps": 20,
                                                         "cfg": 5.0 if toy else 7.0,
                                                         "sampler_name": "dpmpp_2m" if toy else "euler",
                                                         "scheduler": "karras", "positive": ["34", 0],
                                                         "negative": ["3", 0], "latent_image": ["32", 0],
                                                         "denoise": 1.0},
                    "_meta": {"title": "Soft inpainting pass"}}
    return prompt


def _soft_inpaint_model() -> dict:
    """The soft-inpainting graph with an SD1.5 inpainting checkpoint: the first pass is drawn by the same checkpoint
    (with no mask core hands it a blank one), decoded, and InpaintModelConditioning gives the second pass the picture,
    the change map and the masked-image latent, which the Differential Diffusion node updates every step."""
    prompt = _soft_inpaint(False)
    prompt["1"]["inputs"]["ckpt_name"] = "sd-v1-5-inpainting.ckpt"
    prompt["36"] = {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]},
                    "_meta": {"title": "First pass as pixels"}}
    prompt["37"] = {"class_type": "InpaintModelConditioning",
                    "inputs": {"positive": ["34", 0], "negative": ["3", 0], "vae": ["1", 2], "pixels": ["36", 0],
                               "mask": ["31", 0], "noise_mask": True}}
    del prompt["32"]  # the change map travels as InpaintModelConditioning's noise mask instead
    prompt["33"]["inputs"].update(positive=["37", 0], negative=["37", 1], latent_image=["37", 2])
    return prompt


LORA_FILE = "your_sd15_lora.safetensors"  # a placeholder: pick one of your own SD1.5 LoRAs on the node


def _lora() -> dict:
    """Two regions, the right one's prompt encoded through Set CLIP Hooks with a LoRA hook: the LoRA acts on the
    right half only, inside the one regional pass."""
    prompt = {**common.sd15_base(width=768, height=512), **common.ksampler(model=["11", 0], sampler_name="dpmpp_2m",
                                                                              steps=25, cfg=7.0)}
    prompt["2"]["inputs"]["text"] = "two friends on a park bench, autumn afternoon, detailed"
    prompt["40"] = {"class_type": "CreateHookLora",
                    "inputs": {"lora_name": LORA_FILE, "strength_model": 1.0, "strength_clip": 1.0},
                    "_meta": {"title": "The right region's LoRA (pick your own)"}}
    prompt["41"] = {"class_type": "SetClipHooks",
                    "inputs": {"clip": ["1", 1], "apply_to_conds": True, "schedule_clip": False, "hooks": ["40", 0]},
                    "_meta": {"title": "CLIP with the LoRA hook (for the right region's prompt)"}}
    regions, link = _regions(["1", 1], 768, 512, ["a woman in a red coat", "a man in a grey suit, in the LoRA's style"],
                             clips={1: ["41", 0]})
    prompt.update(regions)
    prompt["11"] = _regional(["1", 0], link)
    return prompt


WORKFLOWS = {
    "Soft inpainting with a feathered change map, SD1.5": _soft_inpaint(False),
    "Soft inpainting with an inpainting model, SD1.5": _soft_inpaint_model(),
    "Soft inpainting on the proving-ground toy": _soft_inpaint(True),
    "Regional prompting, three regions in one pass, SD1.5": _sd15(),
    "Regional prompting, two regions, Flux": _flux(),
    "Regional prompting on the proving-ground toy": _toy(),
    "Regional LoRA, a LoRA in one of two regions, SD1.5": _lora(),
}

SOFT_INPAINT = "Paper: Levin and Fried, Differential Diffusion: Giving Each Pixel Its Strength, arXiv:2306.00950."
REGIONAL = ("Paper: Chen et al., Training-free Regional Prompting for Diffusion Transformers, arXiv:2411.02395 (on "
            "UNets the regions are blended per cross-attention layer).")

NOTES: dict[str, str] = {
    "Soft inpainting with a feathered change map, SD1.5": (
        "A first pass draws the picture; a second pass redraws it for the edit prompt with a change map that is 0 "
        "at the left edge and reaches 1 three quarters across, each pixel's value its denoise strength. Try left "
        "on the FeatherMask node first: it is the length of the ramp from kept to redrawn, and a smaller value "
        "hands more of the picture to the edit. " + SOFT_INPAINT),
    "Soft inpainting with an inpainting model, SD1.5": (
        "The soft-inpainting graph with an SD1.5 inpainting checkpoint: InpaintModelConditioning hands the second "
        "pass the picture and the feathered change map, and the Differential Diffusion node updates the model's "
        "mask and masked-image inputs every step to the part being redrawn, so the hole grows with the map. Try "
        "left on the FeatherMask node first: it is the length of the ramp from kept to redrawn. " + SOFT_INPAINT),
    "Soft inpainting on the proving-ground toy": (
        "The soft-inpainting graph on the pack's trained toy: a red circle is drawn first, then a second pass "
        "redraws toward a blue square on the right through a change map that is 0 at the left edge and reaches 1 "
        "three quarters across. Try left on the FeatherMask node first: it is the length of the ramp from kept to "
        "redrawn. " + SOFT_INPAINT),
    "Regional prompting, three regions in one pass, SD1.5": (
        "Three prompts in three vertical strips (a red fox, a brown horse, a white goat) at one model evaluation "
        "per step; the positive prompt is the base prompt, which fills what no region covers and is mixed back in. "
        "Try base_ratio first: 0 gives each region its own prompt alone, higher blends in more of the base prompt, "
        "and 1 switches the regions off. " + REGIONAL),
    "Regional prompting, two regions, Flux": (
        "Two cats in the two halves of a Flux image: the region prompts' tokens join the text, and a joint "
        "attention mask ties each to its part of the picture. Try end_percent first: the layout forms early, so "
        "regions act in the first 40% here and the base prompt alone guides the rest; base_ratio 0.3 keeps some "
        "of the base prompt inside the regions. " + REGIONAL),
    "Regional LoRA, a LoRA in one of two regions, SD1.5": (
        "Two regions in one pass per step; the right region's prompt is encoded through Set CLIP Hooks with a Create "
        "Hook LoRA, and that LoRA's weight change acts only on the right region's tokens (its mask on every layer's "
        "grid), not on the left region, the base prompt's area or the negative prompt. Try lora_name on Create Hook "
        "LoRA first: the file named here is a placeholder for one of your own SD1.5 LoRAs, and strength_model there "
        "sets how strongly it acts in its region. " + REGIONAL),
    "Regional prompting on the proving-ground toy": (
        "Two regions on the pack's trained toy at 128x128, a red circle on the left and a blue square on the "
        "right, with the base prompt naming only the background; the toy follows captions only loosely. Try "
        "strength on a Region node first: it scales that region's mask, and lower values leave more to the base "
        "prompt. " + REGIONAL),
}
