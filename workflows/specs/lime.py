"""Example workflow for LIME localized editing: a mask from words marks the region, LIME holds the edit words to it
and core's SetLatentNoiseMask + KSampler redraw it img2img."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

_words_spec = importlib.util.spec_from_file_location("preprint_workflow_word_attention",
                                                     Path(__file__).with_name("word_attention.py"))
words = importlib.util.module_from_spec(_words_spec)
_words_spec.loader.exec_module(words)


def _lime_with_mask_from_words() -> dict:
    """The mask-from-words edit of word_attention.py, with LIME letting only the edit words steer the masked area in
    the first half of the edit (denoise 0.6 starts at 0.4 of the schedule; end_percent 0.7 ends halfway); the edit
    prompt is one text node shared by the encoder and LIME."""
    prompt = words.mask_from_words_edit()
    prompt["30"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": words.EDIT_PROMPT},
                    "_meta": {"title": "Edit prompt (shared by the encoder and LIME)"}}
    prompt["2"]["inputs"]["text"] = ["30", 0]
    prompt["23"]["inputs"]["region"] = "feature segments (LIME)"  # LIME's own automatic region
    prompt["11"] = {"class_type": "PreprintLIME",
                    "inputs": {"model": ["1", 0], "clip": ["1", 1], "prompt": ["30", 0],
                               "words": "silver knight armour", "mask": ["23", 0], "strength": 1.0,
                               "end_percent": 0.7, "keep_start_token": False}}
    prompt["7"]["inputs"]["model"] = ["11", 0]
    return prompt


TITLE = "LIME localized edit with a mask from words, SD1.5"

WORKFLOWS = {TITLE: _lime_with_mask_from_words()}

NOTES: dict[str, str] = {
    TITLE: (
        "Mask From Words finds the pink dress in the loaded image as LIME does (the segments of the UNet's own "
        "features that hold the words' most attended pixels), and the KSampler redraws only that mask with the "
        "edit prompt, while LIME makes the masked area attend only the words \"silver knight armour\" in the first "
        "half of the edit, so the rest of the prompt cannot pull it back to what was there. Try end_percent on the "
        "LIME node first: it is how far into the noise schedule the regularisation lasts (the edit starts at 0.4 "
        "at denoise 0.6), and lower values hand the region back to the whole prompt sooner; strength softens it. "
        "Paper: Simsar et al., LIME: Localized Image Editing via Attention Regularization in Diffusion Models, "
        "arXiv:2312.09256 (written for InstructPix2Pix; here on a text-to-image UNet)."),
}
