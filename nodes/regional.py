"""Regional editing nodes: regional prompting by attention, in one model pass.

- UNets (SD1.x, SD2.x, SDXL): an ``attn2`` replacement on every cross-attention layer (middle block
  included) blends one attention output per prompt by the region masks resampled to the layer's grid
  (``regional/attention.py``). Region prompts are projected with the layer's own key / value weights, so
  LoRAs on them apply; the negative prompt's rows are left alone.
- Flux: a DIFFUSION_MODEL wrapper appends the region prompts' tokens to the positive rows' text and hands
  the model the joint attention mask ComfyUI's Flux already reads (``attention_mask``), so regions and
  their text stay together (Chen et al., arXiv:2411.02395).

Both run inside the window ``[start_percent, end_percent]`` of the run and do nothing outside it.
"""

from __future__ import annotations

import inspect

import comfy.ldm.flux.model
import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy_api.latest import io

from ..guidance.pag_runtime import rows_of
from ..regional.attention import Region, RegionError, as_mask_batch, joint_mask, masks_on_grid, regional_attention
from ..utils.sigma_window import SigmaWindow
from ._inputs import PreprintNode, model_input, model_output, percent_window_inputs

CATEGORY = "Preprint/regional"
WMP = comfy.patcher_extension.WrappersMP
KEY = "preprint_regional"
NEGATIVE = 1  # ComfyUI's index of the negative prompt in cond_or_uncond
REGION_NODE = "Region (Preprint)"
NODE = "Regional Prompting (Preprint)"
PAPER = "Chen et al., Training-free Regional Prompting for Diffusion Transformers, arXiv:2411.02395"

Regions = io.Custom("PREPRINT_REGIONS")


def _positive_rows(to: dict, batch: int) -> list[int]:
    cou = to.get("cond_or_uncond") or []
    return rows_of([j for j, c in enumerate(cou) if c != NEGATIVE], batch, len(cou))


def _active(to: dict, window: SigmaWindow) -> bool:
    sigmas = to.get("sigmas")
    return sigmas is not None and float(sigmas.max()) in window


class _RegionSet:
    """One node's regions, their masks on each token grid and their prompts on each device and dtype, made once
    and shared by every layer and step (neither changes while sampling)."""

    def __init__(self, regions: tuple[Region, ...]):
        self.regions = regions
        self._grids: dict = {}
        self._contexts: dict = {}

    def masks(self, batch: int, height: int, width: int, device) -> torch.Tensor:
        """``[N, batch, height * width]`` (see ``masks_on_grid``)."""
        key = (batch, height, width, device)
        if key not in self._grids:
            self._grids[key] = masks_on_grid([r.mask.to(device) for r in self.regions], batch, height, width)
        return self._grids[key]

    def contexts(self, device, dtype) -> list[torch.Tensor]:
        key = (device, dtype)
        if key not in self._contexts:
            self._contexts[key] = [r.context.to(device=device, dtype=dtype) for r in self.regions]
        return self._contexts[key]


class _UNetRegionalAttention:
    """``attn2`` replacement for one cross-attention layer: per-prompt attention on the positive rows,
    blended by the masks on this layer's grid."""

    def __init__(self, attn2, regions: _RegionSet, base_ratio: float, window, previous=None):
        self.attn2, self.regions, self.base_ratio = attn2, regions, base_ratio
        self.window, self.previous = window, previous

    def _attend(self, q, k, v, extra_options):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                   attn_precision=extra_options.get("attn_precision"),
                                                   transformer_options=extra_options)

    def __call__(self, q, k, v, extra_options):
        base = self._attend(q, k, v, extra_options)
        if not _active(extra_options, self.window):
            return base
        rows = _positive_rows(extra_options, q.shape[0])
        if not rows:
            return base
        h, w = (int(n) for n in extra_options["activations_shape"][-2:])
        idx = torch.tensor(rows, device=q.device)
        batch = q.shape[0]
        sel = torch.zeros(batch, 1, 1, dtype=torch.bool, device=q.device)
        sel[idx] = True
        outs = []
        for context in self.regions.contexts(q.device, q.dtype):
            # projected and attended at the batch's own shapes, so a region prompt equal to the base prompt
            # reproduces the base output bit for bit
            ctx = context.expand(batch, -1, -1)
            kr, vr = self.attn2.to_k(ctx), self.attn2.to_v(ctx)
            if kr.shape == k.shape:
                kr, vr = torch.where(sel, kr, k), torch.where(sel, vr, v)
                qr = q
            else:
                kr, vr, qr = kr[idx], vr[idx], q[idx]
            a = comfy_attention.optimized_attention(qr, kr, vr, extra_options["n_heads"],
                                                    attn_precision=extra_options.get("attn_precision"),
                                                    transformer_options=extra_options)
            outs.append(a[idx] if qr is q else a)
        per = q.shape[0] // len(extra_options["cond_or_uncond"])
        masks = self.regions.masks(per, h, w, q.device)[:, [r % per for r in rows]]
        out = base.clone()
        out[idx] = regional_attention(base[idx], outs, masks, self.base_ratio)
        return out


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


class _FluxRegional:
    """DIFFUSION_MODEL wrapper for Flux: region text appended to the positive rows, joint attention mask.

    ``Flux.forward`` hands its wrappers ``_forward``'s arguments positionally: ``(x, timestep, context, y, guidance,
    ref_latents, control, transformer_options, **kwargs)`` on 0.3.64 and on the newest sources read (0.33), with
    ``attention_mask`` in ``kwargs``. They are bound by name against the wrapped function's signature all the same,
    so a reordered or extended signature still reaches the right tensors."""

    REQUIRED = ("x", "context", "transformer_options")

    def __init__(self, regions: _RegionSet, base_ratio: float, window):
        self.regions, self.base_ratio, self.window = regions, base_ratio, window
        self._signature: tuple[object, inspect.Signature, str | None] | None = None
        self._built: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None  # last batch layout's text, mask

    def _text_and_mask(self, cou: tuple, batch: int, grid: tuple[int, int], n_ref: int, context: torch.Tensor,
                       dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens appended to each row's text ``[batch, extra, D]`` and the joint attention mask
        ``[batch, L, L]`` for one batch layout; the same every step, so built once per layout."""
        key = (cou, batch, grid, n_ref, int(context.shape[1]), context.dtype, dtype, device)
        if self._built is not None and self._built[0] == key:
            return self._built[1]
        contexts = self.regions.contexts(context.device, context.dtype)
        lengths = [int(context.shape[1])] + [int(c.shape[1]) for c in contexts]
        extra_len = sum(lengths[1:])
        rows = set(_positive_rows({"cond_or_uncond": list(cou)}, batch))
        chunk = batch // len(cou or [1])
        per_image = self.regions.masks(chunk, *grid, device)
        if n_ref:  # Kontext reference tokens: image no region covers
            per_image = torch.cat([per_image, per_image.new_zeros(*per_image.shape[:2], n_ref)], dim=2)
        regional = joint_mask(lengths, per_image, self.base_ratio, dtype=dtype).to(device)
        total = regional.shape[-1]
        region_text = torch.cat([c[0] for c in contexts])
        padding = torch.where(torch.eye(extra_len, dtype=torch.bool, device=device), 0.0, float("-inf")).to(dtype)
        pad = slice(lengths[0], lengths[0] + extra_len)
        mask = torch.zeros(batch, total, total, dtype=dtype, device=device)
        pieces = []
        for b in range(batch):
            if b in rows:
                pieces.append(region_text)
                mask[b] = regional[b % chunk]
            else:  # other rows: the appended tokens are padding nobody sees
                pieces.append(torch.zeros_like(region_text))
                mask[b, :, pad] = float("-inf")
                mask[b, pad, pad] = padding
        self._built = (key, (torch.stack(pieces), mask))
        return self._built[1]

    def _bind(self, executor, args, kwargs) -> tuple[inspect.BoundArguments, str | None]:
        fn = getattr(executor.original, "__func__", executor.original)
        if self._signature is None or self._signature[0] is not fn:  # once per wrapped function
            sig = inspect.signature(executor.original)
            varkw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
            missing = [n for n in self.REQUIRED if n not in sig.parameters]
            if varkw is None and "attention_mask" not in sig.parameters:
                missing.append("attention_mask")
            if missing:
                raise RegionError(f"{NODE}: this ComfyUI's Flux forward takes {sig}, without {', '.join(missing)}; "
                                  "regional prompting cannot place its text. Update the Preprint pack.")
            self._signature = (fn, sig, varkw)
        _, sig, varkw = self._signature
        return sig.bind(*args, **kwargs), varkw

    def __call__(self, executor, *args, **kwargs):
        bound, varkw = self._bind(executor, args, kwargs)
        a = bound.arguments
        to = a.get("transformer_options") or {}
        if not _active(to, self.window):
            return executor(*args, **kwargs)
        extra = dict(a.get(varkw) or {}) if varkw else {}
        if a.get("attention_mask", extra.get("attention_mask")) is not None:
            raise RegionError(f"{NODE}: the conditioning already carries a Flux attention mask; regional prompting "
                              "builds its own. Remove the other mask (or this node).")
        x, context, ref_latents = a["x"], a["context"], a.get("ref_latents")
        patch = int(getattr(executor.class_obj, "patch_size", 2))  # 2 on Flux.1; newer Flux.2 layouts use 1
        grid = (-(-x.shape[-2] // patch), -(-x.shape[-1] // patch))
        n_ref = sum(-(-r.shape[-2] // patch) * -(-r.shape[-1] // patch) for r in (ref_latents or []))
        text, mask = self._text_and_mask(tuple(to.get("cond_or_uncond") or ()), x.shape[0], grid, n_ref, context,
                                         x.dtype, x.device)
        # Text positions: zeros on Flux.1 in every release; where a newer config names txt_ids_dims (Flux.2 layouts)
        # _forward numbers the text 0..L-1 along those axes, so the region tokens simply continue the base prompt.
        a["context"] = torch.cat([context, text], dim=1)
        if "attention_mask" in bound.signature.parameters:
            a["attention_mask"] = mask
        else:
            a[varkw] = {**extra, "attention_mask": mask}
        return executor(*bound.args, **bound.kwargs)


def region_from(conditioning, mask, strength: float) -> Region:
    if not conditioning:
        raise RegionError(f"{REGION_NODE}: the conditioning is empty; connect a CLIPTextEncode of the region's prompt.")
    if len(conditioning) > 1:
        raise RegionError(f"{REGION_NODE}: the conditioning holds {len(conditioning)} prompts; a region takes one. "
                          "Join prompts with ConditioningConcat, or give each its own Region node.")
    m = as_mask_batch(mask) * float(strength)
    if float(m.max()) <= 0.0:
        raise RegionError(f"{REGION_NODE}: the mask is empty (all zero) or the strength is 0, so the region would "
                          "cover nothing. Paint the area the prompt belongs to, or remove this region.")
    return Region(context=conditioning[0][0].detach().cpu(), mask=m.cpu())


class PreprintRegion(PreprintNode):
    NAME = REGION_NODE

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintRegion",
            display_name=cls.NAME,
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

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintRegionalPrompting",
            display_name=cls.NAME,
            category=CATEGORY,
            description=(
                "Different prompts in different areas, in one model pass per step (core's area / mask conditioning "
                "runs the model once per region). The sampler's positive prompt is the base prompt: it fills the "
                "area no region covers and is mixed back in by base_ratio. UNets (SD1.x, SDXL): every cross-"
                "attention layer blends one attention output per prompt by the masks at its own resolution. Flux: "
                f"region text joins the positive text under a joint attention mask ({PAPER}). The negative prompt is "
                "untouched. Any width, height and aspect ratio."),
            inputs=[
                model_input("A UNet (SD1.x, SD2.x, SDXL) or a Flux model."),
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
    def validate_inputs(cls, start_percent=None, end_percent=None, **_) -> bool | str:
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
            shared = _RegionSet(tuple(regions))
            for key, attn2 in layers.items():
                prev = replaces.get(key, replaces.get(key[:2]))
                m.set_model_attn2_replace(_UNetRegionalAttention(attn2, shared, base_ratio, window, prev), *key)
        elif type(dm) is comfy.ldm.flux.model.Flux:
            width = int(dm.txt_in.in_features)
            for i, r in enumerate(regions):
                if r.context.shape[-1] != width:
                    raise RegionError(f"{NODE}: region {i + 1}'s prompt has {r.context.shape[-1]} features but this "
                                      f"Flux takes {width}; encode it with this model's CLIP.")
            m.remove_wrappers_with_key(WMP.DIFFUSION_MODEL, KEY)
            wrapper = _FluxRegional(_RegionSet(tuple(regions)), base_ratio, window)
            m.add_wrapper_with_key(WMP.DIFFUSION_MODEL, KEY, wrapper)
        else:
            raise RegionError(f"{NODE}: this model's diffusion network is a {type(dm).__name__}; regional prompting "
                              "supports UNets (SD1.x, SD2.x, SDXL) and Flux. For SD3 and other DiTs it is not built "
                              "yet; use core's ConditioningSetMask there.")
        return io.NodeOutput(m)


NODES = [PreprintRegion, PreprintRegionalPrompting]
