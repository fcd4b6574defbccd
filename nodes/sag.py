"""Self-Attention Guidance node (perturbed-attention family).

Paper: Hong et al., "Improving Sample Quality of Diffusion Models Using Self-Attention Guidance"
(arXiv:2210.00939). The maths lives in ``guidance/sag.py``.

Per step: the CFG model call records, for the guiding cond (the negative, or the positive at cfg 1), the
self-attention map of one layer and turns it into a mask; a post-CFG function blurs the guiding prediction
inside the mask, re-noises it and runs one more model call on it (the *degraded pass*), then adds
``s (x0_blurred - D(x_blurred))``.

The degraded pass is a stream of its own: its conds carry a fresh uuid (uuid5 of the guiding cond's, tagged
"sag") and its chunks are listed in ``transformer_options["preprint_perturbed"]``, as PAG's perturbed copy
is. Caches keyed by stream then neither hand it the negative prompt's cached features (which would make the
SAG term vanish) nor let it overwrite them. On a step where a cache reuses the block of the mask layer, that
layer's attention does not run; the mask of the last step that computed it is used, as the reused features are
that step's too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.patcher_extension as pe
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..guidance import sag as sag_math
from ..guidance.attention_perturbation import attention_weights, split_heads
from ..guidance.pag import GuidanceSchedule
from ..guidance.pag_runtime import SagPending, SagRunState, chunks_of, perturbed_uuid
from .pag import (
    CATEGORY,
    PassInfo,
    attention_layout,
    base_attention,
    call_arg,
    index_of,
    install,
    make_schedule,
    mark_perturbed,
    outer_sample,
    resolve_layers,
)

log = logging.getLogger("preprint")

SAG_KEY = "preprint_sag"
SAG_STATE = "preprint_sag_state"
SAG_PASS = "preprint_sag_pass"  # the CFG call whose attention builds the mask
SAG_DEGRADED = "preprint_sag_degraded"  # the degraded pass
SAG_STREAM = "sag"
NODE = "Self-Attention Guidance (Preprint)"


@dataclass(frozen=True)
class SagPassInfo:
    target: int
    state: SagRunState
    threshold: float


def _sag_patch(prev):
    def patch(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        base = base_attention(prev, q, k, v, extra_options)
        info: SagPassInfo | None = extra_options.get(SAG_PASS)
        cou = extra_options.get("cond_or_uncond") or []
        chunks = chunks_of(cou, info.target) if info is not None else []
        if not chunks:
            return base
        uuids = extra_options.get("uuids") or [None] * len(cou)
        per = q.shape[0] // len(cou)
        grid = tuple(extra_options["activations_shape"][-2:])
        qh, kh = split_heads(q, heads), split_heads(k, heads)
        for j in chunks:
            rows = slice(j * per, (j + 1) * per)
            # the map of this chunk only: each call records its own chunks, so split batches all contribute
            info.state.masks[uuids[j]] = sag_math.attention_mask(attention_weights(qh[rows], kh[rows]), grid,
                                                                 info.threshold)
        return base
    return patch


def degraded_conds(conds: list) -> list:
    """The guiding cond list with the degraded pass's own uuids (same conditioning, separate stream)."""
    return [{**c, "uuid": perturbed_uuid(c.get("uuid"), SAG_STREAM)} for c in conds]


def degraded_pass_options(model_options: dict) -> dict:
    """``model_options`` for the degraded pass: its chunks (cond list 0 of that call) are marked perturbed."""
    mo = dict(model_options)
    topts = dict(mo.get("transformer_options", {}))
    wrappers = {k: dict(v) for k, v in topts.get("wrappers", {}).items()}
    wrappers.setdefault(pe.WrappersMP.APPLY_MODEL, {})[SAG_KEY] = [mark_perturbed(SAG_DEGRADED)]
    topts["wrappers"] = wrappers
    topts[SAG_DEGRADED] = PassInfo(0, "unet", 1)
    mo["transformer_options"] = topts
    return mo


def make_sag_hooks(schedule: GuidanceSchedule, layer: tuple, blur_sigma: float, threshold: float):
    def state_of(mo) -> SagRunState | None:
        return (mo or {}).get("transformer_options", {}).get(SAG_STATE)

    def predict_noise(executor, *args, **kwargs):
        state = state_of(call_arg(args, kwargs, 2, "model_options", {}))
        if state is None:
            return executor(*args, **kwargs)
        conds = executor.class_obj.conds
        state.armed_x = call_arg(args, kwargs, 0, "x")
        state.positive, state.negative = conds.get("positive"), conds.get("negative")
        state.pending = None
        try:
            return executor(*args, **kwargs)
        finally:
            state.armed_x = state.positive = state.negative = state.pending = None
            state.masks = {}

    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        state = state_of(model_options)
        if state is None or state.armed_x is not x_in:
            return executor(model, conds, x_in, timestep, model_options)
        state.armed_x = None
        sigma = float(timestep.flatten()[0])
        scale = schedule.scale_at(sigma, float(model.model_sampling.timestep(timestep).flatten()[0]))
        target = index_of(conds, state.negative)
        if target is None:  # cfg 1 (no uncond pass): guide with the positive prediction
            target = index_of(conds, state.positive)
        if target is None and conds and conds[0] is not None:
            target = 0
        if scale == 0.0 or target is None:
            return executor(model, conds, x_in, timestep, model_options)
        state.masks = {}
        mo = dict(model_options)
        topts = dict(mo.get("transformer_options", {}))
        replace_ = {k: dict(v) for k, v in topts.get("patches_replace", {}).items()}
        table = replace_.setdefault("attn1", {})
        table[layer] = _sag_patch(table.get(layer, table.get(layer[:2])))
        topts["patches_replace"] = replace_
        topts[SAG_PASS] = SagPassInfo(target, state, threshold)
        mo["transformer_options"] = topts
        out = executor(model, conds, x_in, timestep, mo)
        state.last_masks.update(state.masks)
        masks = [state.last_masks[c.get("uuid")] for c in conds[target] if c.get("uuid") in state.last_masks]
        if masks:
            state.pending = SagPending(x_in, out[target], conds[target], masks, scale)
        return out

    def post_cfg(args):
        import comfy.samplers

        from ._host import parameterisation_of

        state = state_of(args.get("model_options"))
        p = state.pending if state is not None else None
        x = args["input"]
        if p is None or p.x is not x:
            return args["denoised"]
        state.pending = None
        size = p.pred.shape[-2:]
        mask = torch.stack([F.interpolate(m.float(), size=size, mode="nearest") for m in p.masks]).amax(0)
        degraded = sag_math.degrade(p.pred, mask, blur_sigma)
        sigma = args["sigma"].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        model = args["model"]
        alpha = (1.0 - sigma) if parameterisation_of(model.model_sampling) == "flow" else 1.0
        x_deg = sag_math.renoise(x, p.pred, degraded, alpha)
        (pred,) = comfy.samplers.calc_cond_batch(model, [degraded_conds(p.conds)], x_deg, args["sigma"],
                                                 degraded_pass_options(args["model_options"]))
        return sag_math.sag_guidance(args["denoised"], degraded, pred, p.scale)

    post_cfg.preprint_key = SAG_KEY  # type: ignore[attr-defined]
    return outer_sample(SAG_STATE, SagRunState), predict_noise, calc_cond_batch, post_cfg


class PreprintSelfAttentionGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintSelfAttentionGuidance",
            display_name=NODE,
            category=CATEGORY,
            description=(
                "SAG (Hong et al., 'Improving Sample Quality of Diffusion Models Using Self-Attention Guidance', "
                "arXiv:2210.00939): blurs the predicted image where the model's self-attention concentrates, "
                "re-noises it and guides away from the model's answer there. Works with batched or split cond "
                "batches, any latent size and batch > 1; at cfg 1 it guides with the positive prediction. UNet "
                "models (SD1.x, SDXL); one extra model call per step, cached as a stream of its own by the "
                "Preprint caches. Defaults are the paper's (scale 0.75, blur sigma 1)."),
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL)."),
                io.Float.Input("scale", default=0.75, min=-2.0, max=5.0, step=0.01,
                               tooltip="SAG scale s in D + s (x0_blurred - D(x_blurred)). 0 switches it off exactly. "
                                       "0.75 is the paper's value; ComfyUI's own SAG node uses 0.5."),
                io.Float.Input("blur_sigma", default=1.0, min=0.0, max=10.0, step=0.1,
                               tooltip="Sigma of the 9-tap Gaussian blur applied to the predicted image (1 is the "
                                       "official value; ComfyUI's own SAG node uses 2, a stronger blur)."),
                io.Float.Input("threshold", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="A latent region is blurred when its token receives more than this total "
                                       "attention (mean over heads); 1.0 = more than an average token."),
                io.String.Input("layer", default="",
                                tooltip="The one self-attention layer whose map builds the mask. Empty = "
                                        "'middle:0.0', the official choice (first transformer of the middle block)."),
                io.Float.Input("sigma_start", default=-1.0, min=-1.0, max=10000.0, step=0.01, round=0.001,
                               tooltip="Guide only while sigma <= this value (-1: from the first step)."),
                io.Float.Input("sigma_end", default=-1.0, min=-1.0, max=10000.0, step=0.01, round=0.001,
                               tooltip="Guide only while sigma >= this value (-1: to the last step)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with SAG attached; connect it to a sampler or guider.")],
        )

    @classmethod
    def execute(cls, model, scale, blur_sigma, threshold, layer, sigma_start, sigma_end) -> io.NodeOutput:
        m = model.clone()
        layout, _ = attention_layout(m, NODE)
        if layout.family != "unet":
            raise ValueError(
                f"{NODE}: SAG needs a UNet (SD1.x, SD2.x, SDXL): its mask comes from the self-attention of the UNet's "
                f"middle block over the latent grid, which {'Flux' if layout.family == 'flux' else 'SD3'} models do "
                "not have. On this model use Perturbed-Attention Guidance or Smoothed Energy Guidance (Preprint).")
        _, _, layers = resolve_layers(m, layer.strip() or "middle:0.0", NODE)
        if len(layers) != 1:
            raise ValueError(f"{NODE}: 'layer' must name exactly one self-attention layer (e.g. 'middle:0.0'); "
                             f"{layer!r} names {len(layers)}: {', '.join(f'{g}:{b}.{t}' for g, b, t in layers)}.")
        sched = make_schedule(scale, 0.0, sigma_start, sigma_end, NODE)
        install(m, SAG_KEY, *make_sag_hooks(sched, next(iter(layers)), blur_sigma, threshold))
        return io.NodeOutput(m)


NODES = [PreprintSelfAttentionGuidance]
