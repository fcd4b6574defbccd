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

Regional LoRA (UNets, Flux): a region prompt carrying LoRA weight hooks keeps them; the hooks' patches are resolved
against the model as core resolves them (``model_lora_keys_unet`` + ``load_lora``), and an APPLY_MODEL wrapper adds
each LoRA's weight change, by core's ``calculate_weight``, to its region's tokens only (``regional/lora.py``), with
per-run keyframe clocks set up by an OUTER_SAMPLE wrapper. Hooks on the base or negative prompt stay core's.
"""

from __future__ import annotations

import comfy.hooks
import comfy.ldm.chroma.model
import comfy.ldm.flux.model
import comfy.ldm.modules.attention as comfy_attention
import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
import comfy.ldm.qwen_image.model
import comfy.lora
import comfy.patcher_extension
import comfy.utils
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy_api.latest import io

from ..regional.attention import Region, RegionError, as_mask_batch
from ..regional.lora import HookSchedule, Keyframe, LoraRegion, RegionalLoraApply, RegionalLoraRun, RegionLoraSpec
from ..regional.runtime import FluxRegional, JointRegional, RegionSet, UNetRegionalAttention
from ..utils.sigma_window import SigmaWindow
from ._host import RunState, attention, install_hooks, mark_frame_masks
from ._inputs import PreprintNode, model_input, model_output, percent_window_inputs

CATEGORY = "Preprint/regional"
WMP = comfy.patcher_extension.WrappersMP
KEY = "preprint_regional"
LORA_KEY = "preprint_regional_lora"
LAYERS = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)  # what a region's LoRA can act on
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
    hooks = region_hooks(conditioning[0][1].get("hooks"))
    m = as_mask_batch(mask) * float(strength)
    if float(m.max()) <= 0.0:
        raise RegionError(f"{REGION_NODE}: the mask is empty (all zero) or the strength is 0, so the region would "
                          "cover nothing. Paint the area the prompt belongs to, or remove this region.")
    if hooks is not None:
        return LoraRegion(context=conditioning[0][0].detach().cpu(), mask=m.cpu(), hooks=hooks)
    return Region(context=conditioning[0][0].detach().cpu(), mask=m.cpu())


def _model_strength(hook) -> float:
    return float(getattr(hook, "_strength_model", 1.0))


def region_hooks(group):
    """A region prompt's hook group if it carries a LoRA for the model, None if it carries nothing for the model;
    hooks a region cannot serve are refused by name."""
    if group is None or len(getattr(group, "hooks", ())) == 0:
        return None
    other = sorted({type(h).__name__ for h in group.hooks if not isinstance(h, comfy.hooks.WeightHook)})
    if other:
        raise RegionError(f"{REGION_NODE}: the region's prompt carries {', '.join(other)} hooks; a region takes LoRA "
                          "hooks (Create Hook LoRA) only. Attach other hooks to the base prompt, where core applies "
                          "them.")
    if any(not getattr(h, "need_weight_init", True) or getattr(h, "weights", None) is None for h in group.hooks):
        raise RegionError(f"{REGION_NODE}: the region's prompt carries a model-as-LoRA hook (Create Hook Model as "
                          "LoRA), which patches every weight of the model, norms and embeddings included; a region's "
                          "LoRA can act on Linear and Conv layers only. Use a LoRA file (Create Hook LoRA), or give "
                          "that area core's Cond Set Props (mask + hooks) combined with the positive prompt.")
    if all(_model_strength(h) == 0.0 for h in group.hooks):
        return None  # a CLIP-only hook: the region's text encoding already carries it
    return group


def _keyframes(hook, percent_to_sigma) -> tuple[Keyframe, ...]:
    kfs = getattr(getattr(hook, "hook_keyframe", None), "keyframes", None) or []
    return tuple(Keyframe(float(k.strength), float(percent_to_sigma(k.start_percent)), int(k.guarantee_steps))
                 for k in kfs)


def _delta_fn(by_key: dict):
    """A parameter's change at given hook strengths, by ComfyUI's own patch maths (``comfy.lora.calculate_weight``,
    as ComfyUI patches hooked weights), in float32; the model's parameter is never written."""
    def delta(path: str, param: str, tensor: torch.Tensor, strengths: tuple) -> torch.Tensor:
        key = f"diffusion_model.{path}.{param}"
        patches = [(strengths[j], v, 1.0, offset, fn) for j, v, offset, fn in by_key[key] if strengths[j] != 0.0]
        base = tensor.detach().to(torch.float32, copy=True)
        return comfy.lora.calculate_weight(patches, base.clone(), key) - base
    return delta


def lora_specs(model, dm, regions) -> tuple[tuple[RegionLoraSpec, ...], dict]:
    """Every hooked region's LoRA resolved against this model's layers (as ComfyUI resolves a hook's LoRA:
    ``model_lora_keys_unet`` + ``load_lora``), and the modules they touch by path."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    percent_to_sigma = model.get_model_object("model_sampling").percent_to_sigma
    specs, modules = [], {}
    for i, r in enumerate(regions):
        hooks = getattr(r, "hooks", None)
        if hooks is None:
            continue
        weight_hooks = [h for h in hooks.hooks if _model_strength(h) != 0.0]
        by_key: dict = {}
        for j, h in enumerate(weight_hooks):
            for k, v in comfy.lora.load_lora(h.weights, key_map, log_missing=False).items():
                key, offset, fn = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
                by_key.setdefault(key, []).append((j, v, offset, fn))
        if not by_key:
            raise RegionError(f"{NODE}: region {i + 1}'s LoRA matches no layer of this model; is it a LoRA for "
                              "another model family? (For a LoRA meant for the text encoder only, set the hook's "
                              "strength_model to 0.)")
        params: dict[str, list[str]] = {}
        bad = []
        for key in by_key:
            path, _, param = key.removeprefix("diffusion_model.").rpartition(".")
            module = comfy.utils.get_attr(dm, path) if key.startswith("diffusion_model.") and path else None
            if param not in ("weight", "bias") or not isinstance(module, LAYERS):
                bad.append(key)
                continue
            params.setdefault(path, []).append(param)
            modules[path] = module
        if bad:
            raise RegionError(f"{NODE}: region {i + 1}'s LoRA changes {len(bad)} weights outside Linear and Conv "
                              f"layers ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); a region's LoRA acts "
                              "on Linear and Conv layers only. Give that area core's Cond Set Props (mask + hooks) "
                              "instead, or use a LoRA of Linear / Conv layers.")
        specs.append(RegionLoraSpec(i, tuple(HookSchedule(_model_strength(h), _keyframes(h, percent_to_sigma))
                                             for h in weight_hooks),
                                    {p: tuple(v) for p, v in params.items()}, _delta_fn(by_key)))
    return tuple(specs), modules


def install_region_loras(m, dm, regions, shared: RegionSet, window: SigmaWindow, family: str, patch: int = 1) -> None:
    """The OUTER_SAMPLE run state and APPLY_MODEL wrapper of the regions' LoRAs (removing an earlier node's when
    no region carries one)."""
    specs, modules = lora_specs(m, dm, regions)
    if not specs:
        for kind in (WMP.OUTER_SAMPLE, WMP.APPLY_MODEL):
            m.remove_wrappers_with_key(kind, LORA_KEY)
        return
    install_hooks(m, LORA_KEY, {
        WMP.OUTER_SAMPLE: RunState(LORA_KEY, lambda guider, sigmas, seed: RegionalLoraRun(specs)),
        WMP.APPLY_MODEL: RegionalLoraApply(family, LORA_KEY, specs, modules, shared, window, patch)})


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
                "form of MultiDiffusion (Bar-Tal et al., arXiv:2302.08113) for UNets. A LoRA hooked onto the prompt "
                "changes the weights for this region's tokens only (UNets and Flux)."),
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The region's prompt (a CLIPTextEncode output). A LoRA "
                                      "hook on it (Create Hook LoRA through Set CLIP Hooks or Cond Set Props) acts on "
                                      "this region only, in the same pass."),
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
        shared = RegionSet(tuple(regions))
        hooked = [i + 1 for i, r in enumerate(regions) if getattr(r, "hooks", None) is not None]
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
            for key, attn2 in layers.items():
                prev = replaces.get(key, replaces.get(key[:2]))
                m.set_model_attn2_replace(UNetRegionalAttention(attention, attn2, shared, base_ratio, window, prev),
                                          *key)
            install_region_loras(m, dm, regions, shared, window, "unet")
        elif (family := _flux_family(dm)) is not None:
            _check_widths(regions, int(dm.txt_in.in_features), family)
            if family != "Flux":
                _refuse_region_loras(hooked, family, " (its modulation comes from one shared network, not per block)")
            install_hooks(m, KEY, {WMP.DIFFUSION_MODEL: FluxRegional(cls.NAME, shared, base_ratio, window, family)})
            install_region_loras(m, dm, regions, shared, window, "flux", int(getattr(dm, "patch_size", 2)))
        elif type(dm) is mmdit.OpenAISignatureMMDITWrapper:
            _check_widths(regions, int(dm.context_embedder.in_features), "SD3")
            if dm.context_processor is not None:  # it would mix the region text into the base prompt's tokens
                raise RegionError(f"{NODE}: this MMDiT runs a context processor over the whole text before the "
                                  "joint blocks, which would mix the region prompts into the base prompt; regional "
                                  "prompting serves SD3 / SD3.5 without one. Use core's ConditioningSetMask here.")
            _refuse_region_loras(hooked, "SD3", " yet")
            install_hooks(m, KEY, {WMP.APPLY_MODEL: JointRegional(cls.NAME, shared, base_ratio, window,
                                                                  int(dm.patch_size), int(dm.register_length))})
        elif isinstance(dm, comfy.ldm.qwen_image.model.QwenImageTransformer2DModel):
            _check_widths(regions, int(dm.txt_in.in_features), "Qwen-Image")
            _refuse_region_loras(hooked, "Qwen-Image", " yet")
            install_hooks(m, KEY, {WMP.APPLY_MODEL: JointRegional(cls.NAME, shared, base_ratio, window,
                                                                  int(dm.patch_size), 0, restart_text_positions=True)})
        else:
            raise RegionError(f"{NODE}: this model's diffusion network is a {type(dm).__name__}; regional prompting "
                              "supports UNets (SD1.x, SD2.x, SDXL), Flux, Chroma, SD3 and Qwen-Image. For other DiTs "
                              "it is not built yet; use core's ConditioningSetMask there.")
        # UNet and Flux / Chroma regional masks follow Tiled Diffusion's tiles; SD3 / Qwen-Image's APPLY_MODEL
        # wrapper may run outside the tiling and regional LoRA places its weights on the whole call's latent
        if hooked or not (isinstance(dm, UNetModel) or _flux_family(dm) is not None):
            mark_frame_masks(m, cls.NAME + (" with regional LoRA" if hooked else ""))
        return io.NodeOutput(m)


def _refuse_region_loras(hooked: list[int], family: str, why: str) -> None:
    if hooked:
        raise RegionError(f"{NODE}: region {hooked[0]}'s prompt carries a LoRA hook; regional LoRA serves UNets and "
                          f"Flux, not {family}{why}. Give that area core's Cond Set Props (mask + hooks) combined with "
                          "the positive prompt (its own pass), or encode the region without hooks.")


def _flux_family(dm) -> str | None:
    """'Flux' or 'Chroma' (Chroma Radiance included) for the joint-attention DiTs whose forward takes the text as
    ``context`` before the image tokens and an ``attention_mask`` keyword, else None."""
    if isinstance(dm, comfy.ldm.flux.model.Flux):
        return "Flux"
    if isinstance(dm, comfy.ldm.chroma.model.Chroma):
        return "Chroma"
    return None


NODES = [PreprintRegion, PreprintRegionalPrompting]
