"""Example workflow for LIME localized editing: a mask from words marks the region, LIME holds the edit words to it
and core's SetLatentNoiseMask + KSampler redraw it img2img."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

EDIT_PROMPT = ("a drawing of a girl with blonde hair in shining silver knight armour on a green hill under a blue "
               "sky")


def _lime_with_mask_from_words() -> dict:
    """Load an image, encode it, mask the pink dress by its word, then redraw the mask with the edit prompt while
    LIME lets only the edit words steer the masked area in the first half of the edit (denoise 0.6 starts at 0.4
    of the schedule; end_percent 0.7 ends halfway)."""
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
                          "layers": "1/4 resolution", "refine": True, "threshold": 0.2, "blur": 4.0}},
        "24": {"class_type": "PreviewImage", "inputs": {"images": ["23", 1]}, "_meta": {"title": "Mask preview"}},
        "25": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["22", 0], "mask": ["23", 0]}},
        "30": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": EDIT_PROMPT},
               "_meta": {"title": "Edit prompt (shared by the encoder and LIME)"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": ["30", 0], "clip": ["1", 1]},
              "_meta": {"title": "Edit prompt"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": common.NEGATIVE, "clip": ["1", 1]},
              "_meta": {"title": "Negative prompt"}},
        "11": {"class_type": "PreprintLIME",
               "inputs": {"model": ["1", 0], "clip": ["1", 1], "prompt": ["30", 0], "words": "silver knight armour",
                          "mask": ["23", 0], "strength": 1.0, "end_percent": 0.7, "keep_start_token": False}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["11", 0], "seed": 42, "steps": 25, "cfg": 7.5,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["25", 0], "denoise": 0.6},
              "_meta": {"title": "Edit inside the mask"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "preprint"}},
    }


TITLE = "LIME localized edit with a mask from words, SD1.5"

WORKFLOWS = {TITLE: _lime_with_mask_from_words()}

NOTES: dict[str, str] = {
    TITLE: (
        "Mask From Words finds the pink dress in the loaded image, and the KSampler redraws only that mask with the "
        "edit prompt, while LIME makes the masked area attend only the words \"silver knight armour\" in the first "
        "half of the edit, so the rest of the prompt cannot pull it back to what was there. Try end_percent on the "
        "LIME node first: it is how far into the noise schedule the regularisation lasts (the edit starts at 0.4 "
        "at denoise 0.6), and lower values hand the region back to the whole prompt sooner; strength softens it. "
        "Paper: Simsar et al., LIME: Localized Image Editing via Attention Regularization in Diffusion Models, "
        "arXiv:2312.09256 (written for InstructPix2Pix with an automatic region; here the region is the mask)."),
}
