"""LIME localized editing (Simsar et al., "LIME: Localized Image Editing via Attention Regularization in Diffusion
Models", arXiv:2312.09256) on UNets (SD1.x, SD2.x, SDXL).

An ``attn2`` replacement on every cross-attention layer: in the first part of the run, on the positive prompt's rows,
the image positions inside the user's mask attend only the edit words (the other tokens' scores at -inf), so only
they steer the region. It chains the ``attn2`` replacement already there (Regional Prompting, Directed Diffusion),
building on its output. The maths is ``regional/lime.py``; word positions come from ``nodes/word_attention.py``.
"""

from __future__ import annotations

import logging

from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy_api.latest import io

from ..regional.lime import LimeAttention, LimeError, RegionMask, kept_columns
from ..regional.word_attention import WordError, parse_words
from ..utils.sigma_window import SigmaWindow
from ._host import attention
from ._inputs import PreprintNode, advanced, model_input, model_output
from .regional import _unet_cross_attention_layers
from .word_attention import _chain, word_positions

log = logging.getLogger("preprint")

CATEGORY = "Preprint/regional"
NODE = "LIME Localized Editing (Preprint)"
PAPER = ("Simsar et al., LIME: Localized Image Editing via Attention Regularization in Diffusion Models, "
         "arXiv:2312.09256")


class PreprintLIME(PreprintNode):
    NAME = NODE
    ALIASES = ("lime", "localized editing", "local edit", "attention regularization", "masked edit", "edit words")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintLIME",
            category=CATEGORY,
            description=(
                f"Keeps an edit inside a mask by attention regularisation ({PAPER}). In the first part of the run, "
                "on every cross-attention layer and on the positive prompt only, the image inside the mask attends "
                "only the edit words: every other token's attention score is set to minus infinity there, so those "
                "words alone steer the region, while outside the mask the attention is unchanged. Give it the same "
                "prompt text as the positive CLIPTextEncode; any mask works (Mask From Words, a painted one). The "
                "paper edits with InstructPix2Pix and finds the region by clustering features; here the region is "
                "your mask, on text-to-image and img2img UNets (SD1.x, SD2.x, SDXL). Stacks with Regional Prompting "
                "and Directed Diffusion."),
            inputs=[
                model_input("The UNet (SD1.x, SD2.x, SDXL) that makes the edit."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, to tokenize the prompt as CLIPTextEncode does."),
                io.String.Input("prompt", multiline=True, default="a photo of a cat wearing a red hat",
                                tooltip="The positive (edit) prompt, exactly as given to the positive "
                                        "CLIPTextEncode."),
                io.String.Input("words", default="red hat",
                                tooltip="The edit words, separated by commas (case does not matter; a phrase of "
                                        "several words is allowed). Inside the mask only these steer the image."),
                io.Mask.Input("mask", tooltip="The region to edit, over the whole frame at any resolution (resampled "
                                              "to every layer's grid). Soft values blend; one mask for all images or "
                                              "one per image of the batch."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Scales the mask: 1 = the paper's hard regularisation inside the mask (only the "
                                       "edit words), lower values blend the plain attention back in; 0 = off."),
                io.Float.Input("end_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Acts from the start of the noise schedule to this fraction of it (as core's "
                                       "start / end percent: 0 = pure noise). An img2img at denoise d starts at 1 - d, "
                                       "so at denoise 0.6 a value of 0.7 covers the first half of its steps. "
                                       "0 = off."),
                advanced(io.Boolean.Input("keep_start_token", default=False,
                                          tooltip="Also keep the prompt's start token inside the mask (a softer edit). "
                                                  "Off as in the paper, which penalises it with the padding and the "
                                                  "other unrelated tokens.")),
            ],
            outputs=[model_output("The model with the edit held inside the mask.")],
        )

    @classmethod
    def validate_inputs(cls, strength=None, end_percent=None) -> bool | str:
        return cls.check_widgets(strength=strength, end_percent=end_percent)

    @classmethod
    def execute(cls, model, clip, prompt: str, words: str, mask, strength: float, end_percent: float,
                keep_start_token: bool = False) -> io.NodeOutput:
        dm = model.get_model_object("diffusion_model")
        if not isinstance(dm, UNetModel):
            raise cls.error(f"this model's diffusion network is a {type(dm).__name__}; LIME regularises a UNet's "
                            "cross-attention layers, so it serves SD1.x, SD2.x and SDXL only for now. On Flux or SD3 "
                            "use Regional Prompting (Preprint), or core's Set Latent Noise Mask with the mask.")
        layers = _unet_cross_attention_layers(dm)
        if not layers:
            raise cls.error("this UNet has no cross-attention layers, so it takes no prompt words to regularise.")
        if mask is None:
            raise cls.error("no mask connected; connect the region to edit (e.g. Mask From Words, or a painted mask).")
        try:
            chosen = parse_words(words)
            groups, prompt_ids = word_positions(cls.NAME, clip, prompt, chosen)
            keep = kept_columns(groups, len(prompt_ids), keep_start_token)
            region = RegionMask(mask, node=cls.NAME)
        except (WordError, LimeError) as e:
            raise cls.error(str(e).removeprefix(f"{cls.NAME}: ")) from None
        if region.empty:
            log.warning("%s: the mask is empty (all zero), so no region is edited and the model is unchanged.", NODE)
        ms = model.get_model_object("model_sampling")
        window = SigmaWindow.from_percents(ms.percent_to_sigma, 0.0, end_percent)
        return io.NodeOutput(_chain(model, layers, lambda key, attn2, prev: LimeAttention(
            attention, keep, region, strength, window, prev, node=cls.NAME)))


NODES = [PreprintLIME]
