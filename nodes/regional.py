"""Regional editing nodes: regional prompting by attention, in one model pass.

- UNets (SD1.x, SD2.x, SDXL): an ``attn2`` replacement on every cross-attention layer (middle block
  included) blends one attention output per prompt by the region masks resampled to the layer's grid
  (``regional/attention.py``). Region prompts are projected with the layer's own key / value weights, so
  LoRAs on them apply; the negative prompt's rows are left alone.
- Flux: a DIFFUSION_MODEL wrapper appends the region prompts' tokens to the positive rows' text and hands
  the model the joint attention mask ComfyUI's Flux already reads (``attention_mask``), so regions and
  their text stay together (Chen et al., arXiv:2411.02395).
- SD3 (MMDiT): the same text and mask; an APPLY_MODEL wrapper appends the text to the cross-attention input
  and passes the mask to the joint blocks' attention through ``optimized_attention_override`` (SD3's forward
  takes no mask and runs no DIFFUSION_MODEL wrappers).

All run inside the window ``[start_percent, end_percent]`` of the run and do nothing outside it.
"""

from __future__ import annotations

import comfy.ldm.flux.model
import comfy.ldm.modules.attention as comfy_attention
import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
import comfy.patcher_extension
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy_api.latest import io

from ..regional.attention import Region, RegionError, as_mask_batch
from ..regional.runtime import FluxRegional, RegionSet, SD3Regional, UNetRegionalAttention
from ..utils.sigma_window import SigmaWindow
from ._host import attention, install_hooks
from ._inputs import PreprintNode, model_input, model_output, percent_window_inputs

CATEGORY = "Preprint/regional"
WMP = comfy.patcher_extension.WrappersMP
KEY = "preprint_regional"
REGION_NODE = "Region (Preprint)"
NODE = "Regional Prompting (Preprint)"
PAPER = "Chen et al., Training-free Regional Prompting for Diffusion Transformers, arXiv:2411.02395"

Regions = io.Custom("PREPRINT_REGIONS")


def _unet_cross_attention_layers(dm) -> dict:
    """``(block, id, index) -> attn2`` for every transformer block of a ComfyUI UNet, keyed as ComfyUI keys
    its ``attn2`` replacements."""
    layers = {}
    groups = (("input", list(dm.input_blocks)), ("middle", [dm.middle_block]), ("output", list(dm.output_blocks)))
    for group, mods in groups:
        for i, mod in enumerate(mods):
            for sub in mod.modules():
                if isinstance(sub, comfy_attention.SpatialTransformer):
                    for j, tb in enumerate(sub.transformer_blocks):
                        layers[(group, i, j)] = tb.attn2
    return layers


def _check_widths(regions, width: int, family: str) -> None:
    for i, r in enumerate(regions):
        if r.context.shape[-1] != width:
            raise RegionError(f"{NODE}: region {i + 1}'s prompt has {r.context.shape[-1]} features but this "
                              f"{family} takes {width}; encode it with this model's CLIP.")


def region_from(conditioning, mask, strength: float) -> Region:
    if not conditioning:
        raise RegionError(f"{REGION_NODE}: the conditioning is empty; connect a CLIPTextEncode of the region's prompt.")
    if len(conditioning) > 1:
        raise RegionError(f"{REGION_NODE}: the conditioning holds {len(conditioning)} prompts; a region takes one. "
                          "Join prompts with ConditioningConcat, or give each its own Region node.")
    hooks = conditioning[0][1].get("hooks")
    if hooks is not None and len(getattr(hooks, "hooks", ())) > 0:
        raise RegionError(
            f"{REGION_NODE}: the region's prompt carries hooks (a LoRA set with SetClipHooks / Cond Set "
            "Props). Regional Prompting runs every prompt in one model pass with one set of weights, so a LoRA "
            "cannot be limited to this region here and would be dropped. For a LoRA in one area, give that area "
            "core's Cond Set Props (mask + hooks) and combine it with the positive prompt (it gets its own pass); "
            "for a LoRA everywhere, load it on the model (LoraLoader) and encode the region without hooks.")
    m = as_mask_batch(mask) * float(strength)
    if float(m.max()) <= 0.0:
        raise RegionError(f"{REGION_NODE}: the mask is empty (all zero) or the strength is 0, so the region would "
                          "cover nothing. Paint the area the prompt belongs to, or remove this region.")
    return Region(context=conditioning[0][0].detach().cpu(), mask=m.cpu())


class PreprintRegion(PreprintNode):
    NAME = REGION_NODE
    ALIASES = ("region", "area prompt", "regional prompt")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintRegion",
            category=CATEGORY,
            description=(
                "One region for Regional Prompting (Preprint): a prompt and the mask where it applies. Chain Region "
                f"nodes to add more. Regional prompting in one pass follows {PAPER} (DiT) and the attention-couple "
                "form of MultiDiffusion (Bar-Tal et al., arXiv:2302.08113) for UNets."),
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The region's prompt (a CLIPTextEncode output)."),
                io.Mask.Input("mask", tooltip="Where the prompt applies, over the whole frame, any resolution (it is "
                                              "resampled to every layer's grid). Soft values blend; one mask for all "
                                              "images or one per image of the batch."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Scales the mask: 1 = the region's prompt alone inside the mask; lower "
                                       "values leave more to the base prompt."),
                Regions.Input("regions", optional=True, tooltip="Regions from an earlier Region node, to chain."),
            ],
            outputs=[Regions.Output(tooltip="The regions so far; connect to Regional Prompting or another Region.")],
        )

    @classmethod
    def execute(cls, conditioning, mask, strength: float, regions=None) -> io.NodeOutput:
        return io.NodeOutput((*(regions or ()), region_from(conditioning, mask, strength)))


class PreprintRegionalPrompting(PreprintNode):
    NAME = NODE
    ALIASES = ("regional prompting", "area prompt", "attention couple", "multi-prompt")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintRegionalPrompting",
            category=CATEGORY,
            description=(
                "Different prompts in different areas, in one model pass per step (core's area / mask conditioning "
                "runs the model once per region). The sampler's positive prompt is the base prompt: it fills the "
                "area no region covers and is mixed back in by base_ratio. UNets (SD1.x, SDXL): every cross-"
                "attention layer blends one attention output per prompt by the masks at its own resolution. Flux and "
                f"SD3: region text joins the positive text under a joint attention mask ({PAPER}). The negative "
                "prompt is untouched. Any width, height and aspect ratio."),
            inputs=[
                model_input("A UNet (SD1.x, SD2.x, SDXL), a Flux or an SD3 / SD3.5 model."),
                Regions.Input("regions", tooltip="The regions: chained Region (Preprint) nodes."),
                io.Float.Input("base_ratio", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the base prompt stays inside the regions: 0 = each region's "
                                       "prompt alone, 1 = the base prompt alone (regions off)."),
                *percent_window_inputs("Fraction of the run at which regions start (0 = first step).",
                                       "Fraction of the run after which regions stop and the base prompt alone guides "
                                       "(1 = to the end; layout is decided in the first ~40%)."),
            ],
            outputs=[model_output("The model with regional prompting.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent=None, end_percent=None) -> bool | str:
        return cls.check_widgets(start_percent=start_percent, end_percent=end_percent)

    @classmethod
    def execute(cls, model, regions, base_ratio: float, start_percent: float, end_percent: float) -> io.NodeOutput:
        if not regions:
            raise RegionError(f"{NODE}: no regions; connect at least one Region (Preprint) node.")
        ms = model.get_model_object("model_sampling")
        window = SigmaWindow.from_percents(ms.percent_to_sigma, start_percent, end_percent)
        dm = model.get_model_object("diffusion_model")
        m = model.clone()
        if isinstance(dm, UNetModel):
            layers = _unet_cross_attention_layers(dm)
            width = next(iter(layers.values())).to_k.in_features if layers else None
            if width is None:
                raise RegionError(f"{NODE}: this UNet has no cross-attention layers, so it takes no prompt to place.")
            for i, r in enumerate(regions):
                if r.context.shape[-1] != width:
                    raise RegionError(f"{NODE}: region {i + 1}'s prompt has {r.context.shape[-1]} features but this "
                                      f"UNet's cross-attention takes {width}; encode it with this model's CLIP.")
            replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
            shared = RegionSet(tuple(regions))
            for key, attn2 in layers.items():
                prev = replaces.get(key, replaces.get(key[:2]))
                m.set_model_attn2_replace(UNetRegionalAttention(attention, attn2, shared, base_ratio, window, prev),
                                          *key)
        elif type(dm) is comfy.ldm.flux.model.Flux:
            _check_widths(regions, int(dm.txt_in.in_features), "Flux")
            install_hooks(m, KEY, {WMP.DIFFUSION_MODEL: FluxRegional(cls.NAME, RegionSet(tuple(regions)), base_ratio,
                                                                      window)})
        elif type(dm) is mmdit.OpenAISignatureMMDITWrapper:
            _check_widths(regions, int(dm.context_embedder.in_features), "SD3")
            if dm.context_processor is not None:  # it would mix the region text into the base prompt's tokens
                raise RegionError(f"{NODE}: this MMDiT runs a context processor over the whole text before the "
                                  "joint blocks, which would mix the region prompts into the base prompt; regional "
                                  "prompting serves SD3 / SD3.5 without one. Use core's ConditioningSetMask here.")
            patch = int(dm.patch_size)
            install_hooks(m, KEY, {WMP.APPLY_MODEL: SD3Regional(RegionSet(tuple(regions)), base_ratio, window, patch,
                                                                int(dm.register_length))})
        else:
            raise RegionError(f"{NODE}: this model's diffusion network is a {type(dm).__name__}; regional prompting "
                              "supports UNets (SD1.x, SD2.x, SDXL), Flux and SD3. For other DiTs it is not built "
                              "yet; use core's ConditioningSetMask there.")
        return io.NodeOutput(m)


NODES = [PreprintRegion, PreprintRegionalPrompting]
