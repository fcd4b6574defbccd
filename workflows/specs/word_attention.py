"""Example workflows for editing by the cross-attention of prompt words: a mask from words feeding core's inpainting
(InstDiffEdit), and Directed Diffusion placing two animals in boxes."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


EDIT_PROMPT = ("a drawing of a girl with blonde hair in shining silver knight armour on a green hill under a blue "
               "sky")


def mask_from_words_edit() -> dict:
    """Load an image, encode it, mask the pink dress by its word, and redraw only the mask with the edit prompt
    (SetLatentNoiseMask + KSampler: outside the mask the original is kept at every step)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": common.SD15_CHECKPOINT}},
        "20": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Image to edit"}},
        "21": {"class_type": "ImageScale", "inputs": {"image": ["20", 0], "upscale_method": "lanczos", "width": 512,
                                                      "height": 512, "crop": "center"}},
        "22": {"class_type": "VAEEncode", "inputs": {"pixels": ["21", 0], "vae": ["1", 2]}},
        "23": {"class_type": "PreprintMaskFromWords",
               "inputs": {"model": ["1", 0], "clip": ["1", 1], "latent": ["22", 0],
                          "prompt": "a drawing of a girl with blonde hair in a pink dress on a green hill under a "
                                    "blue sky",
                          "words": "pink dress", "seed": 0, "noise_level": 0.5, "steps": 4,
                          "layers": "1/4 resolution", "refine": True, "threshold": 0.2, "blur": 4.0,
                          "region": "attention map (InstDiffEdit)", "segments": 8, "top_fraction": 0.0244}},
        "24": {"class_type": "PreviewImage", "inputs": {"images": ["23", 1]}, "_meta": {"title": "Mask preview"}},
        "25": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["22", 0], "mask": ["23", 0]}},
        "2": {"class_type": "CLIPTextEncode",
              "inputs": {"text": EDIT_PROMPT, "clip": ["1", 1]},
              "_meta": {"title": "Edit prompt"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": common.NEGATIVE, "clip": ["1", 1]},
              "_meta": {"title": "Negative prompt"}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 42, "steps": 25, "cfg": 7.5,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["25", 0], "denoise": 0.6},
              "_meta": {"title": "Edit inside the mask"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "preprint"}},
    }


def _directed(model: list, words: str, x: float, trailing: int) -> dict:
    return {"class_type": "PreprintDirectedDiffusion",
            "inputs": {"model": model, "clip": ["1", 1], "prompt": ["30", 0], "words": words, "x": x, "y": 0.3,
                       "width": 0.4, "height": 0.6, "strength": 1.0, "trailing_tokens": trailing,
                       "end_percent": 0.1}}


def _directed_diffusion() -> dict:
    """A cat in a box on the left and a dog in a box on the right; the trailing tokens go with the first node."""
    prompt = {**common.sd15_base(width=768, height=512), **common.ksampler(model=["12", 0], sampler_name="euler",
                                                                              scheduler="normal", steps=50, cfg=7.5)}
    prompt["30"] = {"class_type": "PrimitiveStringMultiline",
                    "inputs": {"value": "a photo of a cat and a dog sitting in a park, detailed"},
                    "_meta": {"title": "Prompt (shared by the encoder and both Directed Diffusion nodes)"}}
    prompt["2"]["inputs"]["text"] = ["30", 0]
    prompt["11"] = _directed(["1", 0], "cat", 0.05, 20)
    prompt["12"] = _directed(["11", 0], "dog", 0.55, 0)
    return prompt


WORKFLOWS = {
    "Mask from words + inpaint, SD1.5": mask_from_words_edit(),
    "Directed Diffusion, SD1.5": _directed_diffusion(),
}

NOTES: dict[str, str] = {
    "Mask from words + inpaint, SD1.5": (
        "A short pass reads where the chosen words attend in the image and turns that into a mask, which then "
        "limits an inpainting edit to that region. Try threshold first: lower grows the mask, higher keeps only "
        "the strongest attention. Paper: Zou et al., Towards Efficient Diffusion-Based Image Editing with Instant "
        "Attention Masks, arXiv:2401.07709."),
    "Directed Diffusion, SD1.5": (
        "The chosen words' cross-attention is strengthened inside a box and damped outside during the first "
        "tenth of the run, which moves those objects into the box. Try strength first: 0 is plain sampling, "
        "higher pushes the object harder into its box. Paper: Ma et al., Directed Diffusion, arXiv:2302.13153."),
}
