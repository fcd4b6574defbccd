"""Regional editing by the cross-attention of chosen prompt words (UNets: SD1.x, SD2.x, SDXL).

- Mask From Words: InstDiffEdit (Zou et al., "Towards Efficient Diffusion-Based Image Editing with Instant
  Attention Masks", arXiv:2401.07709). A short pass of the model over the noised image records the words'
  cross-attention and turns it into a mask; the edit itself is core's SetLatentNoiseMask + KSampler, whose
  inpainting denoiser (``KSamplerX0Inpaint``) replaces the unmasked area by the re-noised original before and after
  every model call: the paper's ``latents = orig_t + mask (latents - orig_t)`` blend.
- Directed Diffusion (Ma et al., "Directed Diffusion: Direct Control of Object Placement through Attention
  Guidance", arXiv:2302.13153): an ``attn2`` replacement on every cross-attention layer strengthens the chosen
  words' attention inside a box and damps it outside, in the first steps, on the positive rows only. It chains the
  ``attn2`` replacement already there (Regional Prompting, another Directed Diffusion), adding its change on top.

The maths is ``regional/word_attention.py``.
"""

from __future__ import annotations

import comfy.samplers
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy_api.latest import io

from ..regional.segments import (
    PAPER_TOP_FRACTION,
    FeatureRecorder,
    fuse_features,
    region_mask,
    region_of_interest,
    segment,
)
from ..regional.word_attention import (
    AttentionRecorder,
    Box,
    DirectedAttention,
    Placement,
    WordError,
    find_positions,
    mask_from_map,
    normalise,
    parse_words,
    refine_by_similarity,
    trailing_positions,
    word_map,
)
from ..utils.sigma_window import SigmaWindow
from ._host import attention
from ._inputs import PreprintNode, advanced, model_input, model_output
from .regional import _unet_cross_attention_layers

CATEGORY = "Preprint/regional"
MASK_NODE = "Mask From Words (InstDiffEdit) (Preprint)"
DD_NODE = "Directed Diffusion (Preprint)"
INSTDIFFEDIT = ("Zou et al., Towards Efficient Diffusion-Based Image Editing with Instant Attention Masks, "
                "arXiv:2401.07709")
DIRECTED = ("Ma et al., Directed Diffusion: Direct Control of Object Placement through Attention Guidance, "
            "arXiv:2302.13153")
LAYERS = ("1/4 resolution", "all resolutions")
REGIONS = ("attention map (InstDiffEdit)", "feature segments (LIME)")
LIME = ("Simsar et al., LIME: Localized Image Editing via Attention Regularization in Diffusion Models, "
        "arXiv:2312.09256")
LATENT_SCALE = 8  # pixels per latent cell on SD1.x / SD2.x / SDXL


def _unet_layers(node: str, model) -> dict:
    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, UNetModel):
        raise WordError(f"{node}: this model's diffusion network is a {type(dm).__name__}; word attention is read "
                        "from a UNet's cross-attention layers, so it works on SD1.x, SD2.x and SDXL only for now. "
                        "For Flux or SD3 draw the mask by hand or use Regional Prompting (Preprint).")
    layers = _unet_cross_attention_layers(dm)
    if not layers:
        raise WordError(f"{node}: this UNet has no cross-attention layers, so it reads no prompt words.")
    return layers


def _token_ids(clip, text: str) -> dict[str, list[int | None]]:
    """Per tokenizer (``l``, ``g``...): the prompt's tokens over its whole context, chunk after chunk, as
    CLIPTextEncode lays them out; None where a position holds no word."""
    out = {}
    for key, chunks in clip.tokenize(text, return_word_ids=True).items():
        out[key] = [t if (wid > 0 and isinstance(t, int)) else None for chunk in chunks for t, _, wid in chunk]
    return out


def word_positions(node: str, clip, prompt: str, words: list[str]) -> tuple[list[list[int]], list[int | None]]:
    """(positions of each word, the prompt's token ids): the same in every tokenization the CLIP makes (SDXL's l and
    g tokenizers lay words out alike)."""
    if clip is None:
        raise WordError(f"{node}: no CLIP connected; connect the checkpoint's CLIP so the prompt is tokenized as "
                        "CLIPTextEncode does.")
    if not prompt or not prompt.strip():
        raise WordError(f"{node}: the prompt is empty; give the prompt text the words come from.")
    prompt_ids = _token_ids(clip, prompt)
    found: dict[str, list[list[int]]] = {}
    try:
        for key, ids in prompt_ids.items():
            per_word = []
            for w in words:
                word_ids = [t for t in _token_ids(clip, w)[key] if t is not None]
                per_word.append(find_positions(ids, word_ids, w))
            found[key] = per_word
    except WordError as e:
        raise WordError(f"{node}: {e}") from None
    first = next(iter(found))
    if any(v != found[first] for v in found.values()):
        raise WordError(f"{node}: this CLIP's tokenizers place the words differently ({', '.join(found)}); "
                        "simplify the prompt around them.")
    return found[first], prompt_ids[first]


def _chain(model, layers: dict, make) -> object:
    """A clone of ``model`` with ``make(key, attn2, previous)`` as the ``attn2`` replacement of every layer, each
    chaining the replacement an earlier node put there."""
    m = model.clone()
    replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for key, attn2 in layers.items():
        m.set_model_attn2_replace(make(key, attn2, replaces.get(key, replaces.get(key[:2]))), *key)
    return m


def pass_sigmas(model_sampling, noise_level: float, steps: int) -> torch.Tensor:
    """The short pass: ``steps`` Euler steps from the noise level of an img2img at denoise ``noise_level`` down to
    that of ``noise_level / 2`` (the early steps of such an edit, where the paper reads its masks), evenly in
    timestep."""
    sigma_max = float(model_sampling.sigma_max)
    percents = [1.0 - noise_level + 0.5 * noise_level * i / steps for i in range(steps + 1)]
    return torch.tensor([min(float(model_sampling.percent_to_sigma(p)), sigma_max) for p in percents])


class PreprintMaskFromWords(PreprintNode):
    NAME = MASK_NODE
    ALIASES = ("instdiffedit", "mask from words", "attention mask", "text mask", "auto mask", "diffedit")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintMaskFromWords",
            category=CATEGORY,
            description=(
                f"A mask of where chosen prompt words are in an image, from the model's own cross-attention "
                f"({INSTDIFFEDIT}). The encoded image is noised, a short pass of the model with the prompt records the "
                "words' attention on the 1/4-resolution layers (16x16 for 512 px on SD1.5), the map is refined by "
                "token similarity, blurred and thresholded. Feed it to Set Latent Noise Mask and a KSampler with the "
                "edit prompt: core's inpainting keeps the rest of the image. With region 'feature segments (LIME)' the "
                f"mask is instead LIME's automatic region ({LIME}): the UNet's decoder features of the same pass are "
                "clustered into segments and the segments holding the words' most attended pixels are joined. UNets "
                "only (SD1.x, SD2.x, SDXL)."),
            inputs=[
                model_input("The UNet (SD1.x, SD2.x, SDXL) that will make the edit."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP: the prompt is tokenized and encoded as "
                                              "CLIPTextEncode does."),
                io.Latent.Input("latent", tooltip="The image to edit, encoded (VAE Encode). One mask per image of "
                                                  "the batch."),
                io.String.Input("prompt", multiline=True, default="a photo of a cat on a sofa",
                                tooltip="A prompt describing the image as it is, naming the words below."),
                io.String.Input("words", default="cat",
                                tooltip="The prompt words to mask, separated by commas (case does not matter; a "
                                        "phrase of several words is allowed). Several words give the union."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise added to the image for the pass (the mask is the same for "
                                     "the same seed)."),
                io.Float.Input("noise_level", default=0.5, min=0.05, max=1.0, step=0.01,
                               tooltip="How far the image is noised, as an img2img denoise (paper: strength 0.5)."),
                advanced(io.Int.Input("steps", default=4, min=1, max=50,
                                      tooltip="Model calls of the short pass (Euler steps from noise_level to half "
                                              "of it); their maps are averaged.")),
                advanced(io.Combo.Input("layers", options=list(LAYERS), default=LAYERS[0],
                                        tooltip="Which cross-attention layers are read: the 1/4-resolution ones "
                                                "(the paper's 16x16 maps) or all, resampled to that grid.")),
                advanced(io.Boolean.Input("refine", default=True,
                                          tooltip="Refine the words' map by the prompt tokens whose maps resemble it "
                                                  "and the start token's inverted map (the paper's instant "
                                                  "attention mask); off = the words' map alone.")),
                io.Float.Input("threshold", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Pixels whose normalised map value is at least this are in the mask "
                                       "(paper: 0.2). Lower = larger mask."),
                io.Float.Input("blur", default=4.0, min=0.0, max=64.0, step=0.5,
                               tooltip="Gaussian blur of the map before the threshold, in pixels (0 = none): "
                                       "smoother, rounder masks."),
                # optional: prompts saved before these widgets existed still run, with the defaults
                advanced(io.Combo.Input("region", options=list(REGIONS), default=REGIONS[0], optional=True,
                                        tooltip="How the mask is made: the words' attention map thresholded "
                                                "(InstDiffEdit), or LIME's automatic region: the segments of the "
                                                "UNet's own features that hold the words' most attended pixels "
                                                "(follows object edges; threshold is then not used).")),
                advanced(io.Int.Input("segments", default=8, min=2, max=32, optional=True,
                                      tooltip="LIME: number of feature segments (k-means clusters; paper: 8). More "
                                              "= smaller pieces, tighter masks.")),
                advanced(io.Float.Input("top_fraction", default=round(PAPER_TOP_FRACTION, 4), min=0.001, max=0.5,
                                        step=0.001, optional=True,
                                        tooltip="LIME: the share of latent pixels the words attend most; every "
                                                "segment holding one joins the mask (paper: 100 pixels of a 64x64 "
                                                "latent = 0.0244).")),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="The binary mask at the image's pixel size (latent x 8)."),
                io.Image.Output(display_name="preview",
                                tooltip="The blurred map in grey, the mask tinted red: to tune threshold and blur."),
            ],
        )

    @classmethod
    def validate_inputs(cls, noise_level=None, steps=None, layers=None, threshold=None, blur=None, region=None,
                        segments=None, top_fraction=None) -> bool | str:
        return cls.check_widgets(noise_level=noise_level, steps=steps, layers=layers, threshold=threshold, blur=blur,
                                 region=region, segments=segments, top_fraction=top_fraction)

    @classmethod
    def execute(cls, model, clip, latent, prompt: str, words: str, seed: int, noise_level: float, steps: int,
                layers: str, refine: bool, threshold: float, blur: float, region: str = REGIONS[0],
                segments: int = 8, top_fraction: float = PAPER_TOP_FRACTION) -> io.NodeOutput:
        layer_map = _unet_layers(cls.NAME, model)
        try:
            chosen = parse_words(words)
        except WordError as e:
            raise cls.error(str(e)) from None
        groups, prompt_ids = word_positions(cls.NAME, clip, prompt, chosen)
        samples = latent["samples"]
        if samples.ndim != 4:
            raise cls.error(f"the latent has shape {list(samples.shape)}; an image latent [batch, channels, height, "
                            "width] is expected.")
        if torch.count_nonzero(samples) == 0:
            raise cls.error("the latent is empty (all zero); connect a VAE Encode of the image to edit.")
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        recorder = AttentionRecorder(attention, factor=4 if layers == LAYERS[0] else None)
        m = _chain(model, layer_map, lambda key, attn2, prev: recorder.layer(prev))
        features = FeatureRecorder()
        if region == REGIONS[1]:
            m.set_model_output_block_patch(features)
        noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)
        sigmas = pass_sigmas(model.get_model_object("model_sampling"), noise_level, steps)
        guider = comfy.samplers.CFGGuider(m)
        guider.set_conds(cond, cond)
        guider.set_cfg(1.0)  # the prompt alone: at cfg 1 ComfyUI skips the negative
        guider.sample(noise, samples, comfy.samplers.sampler_object("euler"), sigmas, seed=int(seed),
                      disable_pbar=True)
        maps = recorder.maps()
        target = word_map(maps, groups)
        if refine:
            prompt_tokens = [i for i, t in enumerate(prompt_ids) if t is not None and i < maps.shape[1]]
            soft = refine_by_similarity(maps, target, prompt_tokens, [p for g in groups for p in g])
        else:
            soft = normalise(target)
        height, width = samples.shape[-2] * LATENT_SCALE, samples.shape[-1] * LATENT_SCALE
        if region == REGIONS[1]:
            return cls._segments_mask(features, soft, samples.shape[-2:], (height, width), segments, top_fraction,
                                      blur, seed)
        mask, smooth = mask_from_map(soft, height, width, blur, threshold)
        grey = 0.6 * smooth
        preview = torch.stack([grey + 0.4 * mask, grey, grey], dim=-1).clamp(0, 1)
        return io.NodeOutput(mask, preview)

    @classmethod
    def _segments_mask(cls, features: FeatureRecorder, soft, grid, size, segments: int, top_fraction: float,
                       blur: float, seed: int) -> io.NodeOutput:
        """LIME's region: segments of the decoder features (on the latent grid) holding the most attended pixels,
        at pixel size (blur only rounds its edges)."""
        lat_h, lat_w = (int(n) for n in grid)
        fused = fuse_features(features.features(), lat_h, lat_w, seed=int(seed))
        labels = segment(fused, segments, seed=int(seed))
        attention_map = torch.nn.functional.interpolate(soft.unsqueeze(1).float(), size=(lat_h, lat_w),
                                                        mode="bilinear", align_corners=False).squeeze(1)
        roi = region_of_interest(labels, attention_map, top_fraction)
        mask = region_mask(roi, size[0], size[1], blur)
        shade = torch.nn.functional.interpolate(labels.unsqueeze(1).float() / max(1, segments - 1), size=size,
                                                mode="nearest").squeeze(1)
        grey = 0.6 * shade
        preview = torch.stack([grey + 0.4 * mask, grey, grey], dim=-1).clamp(0, 1)
        return io.NodeOutput(mask, preview)


class PreprintDirectedDiffusion(PreprintNode):
    NAME = DD_NODE
    ALIASES = ("directed diffusion", "object placement", "bounding box", "layout", "attention guidance")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintDirectedDiffusion",
            category=CATEGORY,
            description=(
                f"Puts chosen prompt words where you want them ({DIRECTED}). In the first steps every cross-attention "
                "layer's attention to the words (and to the padding tokens that follow the prompt) gets a Gaussian "
                "bump inside a box and is damped outside it, on the positive prompt only. Give it the same prompt "
                "text as the positive CLIPTextEncode. Chain several nodes for several objects; stacks with Regional "
                "Prompting. UNets only (SD1.x, SD2.x, SDXL)."),
            inputs=[
                model_input("The UNet (SD1.x, SD2.x, SDXL) to direct."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, to tokenize the prompt as CLIPTextEncode does."),
                io.String.Input("prompt", multiline=True, default="a photo of a cat on a sofa",
                                tooltip="The positive prompt, exactly as given to the positive CLIPTextEncode."),
                io.String.Input("words", default="cat",
                                tooltip="The prompt words to place, separated by commas (case does not matter)."),
                io.Float.Input("x", default=0.0, min=0.0, max=0.99, step=0.01,
                               tooltip="Left edge of the box, as a fraction of the image width."),
                io.Float.Input("y", default=0.25, min=0.0, max=0.99, step=0.01,
                               tooltip="Top edge of the box, as a fraction of the image height."),
                io.Float.Input("width", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="Box width, as a fraction of the image width (clipped at the right edge)."),
                io.Float.Input("height", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="Box height, as a fraction of the image height (clipped at the bottom)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="Height of the bump relative to each word's own attention peak, and how much "
                                       "the attention outside the box is damped (gone at 1 and above); paper's noise "
                                       "scale 1.0. 0 = off."),
                advanced(io.Int.Input("trailing_tokens", default=20, min=0, max=76,
                                      tooltip="How many tokens after the prompt (its end token and the padding) are "
                                              "directed too (paper: 20). With several Directed Diffusion nodes, give "
                                              "them to one of them.")),
                io.Float.Input("end_percent", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the run it acts in, from the start (paper: 5 of 50 steps = 0.1); "
                                       "0 = off."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: a mask instead of the box (its coverage on each layer's grid; the "
                                      "bump sits over its bounding box). When connected, x, y, width and height are "
                                      "ignored."),
            ],
            outputs=[model_output("The model with the words directed.")],
        )

    @classmethod
    def validate_inputs(cls, x=None, y=None, width=None, height=None, strength=None, trailing_tokens=None,
                        end_percent=None) -> bool | str:
        return cls.check_widgets(x=x, y=y, width=width, height=height, strength=strength,
                                 trailing_tokens=trailing_tokens, end_percent=end_percent)

    @classmethod
    def execute(cls, model, clip, prompt: str, words: str, x: float, y: float, width: float, height: float,
                strength: float, trailing_tokens: int, end_percent: float, mask=None) -> io.NodeOutput:
        layers = _unet_layers(cls.NAME, model)
        try:
            chosen = parse_words(words)
            groups, prompt_ids = word_positions(cls.NAME, clip, prompt, chosen)
            placement = Placement(mask=mask.detach().cpu()) if mask is not None else Placement(Box(x, y, width, height))
            if mask is not None:
                placement(1, 1, torch.device("cpu"))  # an empty mask is an error now, not at the first step
        except WordError as e:
            raise cls.error(str(e).removeprefix(f"{cls.NAME}: ")) from None
        columns = sorted({p for g in groups for p in g} | set(trailing_positions(prompt_ids, trailing_tokens)))
        ms = model.get_model_object("model_sampling")
        window = SigmaWindow.from_percents(ms.percent_to_sigma, 0.0, end_percent)
        return io.NodeOutput(_chain(model, layers, lambda key, attn2, prev: DirectedAttention(
            attention, columns, placement, strength, window, prev, node=cls.NAME)))


NODES = [PreprintMaskFromWords, PreprintDirectedDiffusion]
