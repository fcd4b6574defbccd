"""Per-run bookkeeping shared by the perturbed-attention and SAG hooks (pure Python / torch).

ComfyUI runs one model call per group of equal-size batch chunks and tells every patch which cond list
each chunk came from (``cond_or_uncond``). These helpers turn that into batch rows and hold the state a
sampling run needs between the batched model call and the guidance step.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from . import sag as sag_math
from .attention_perturbation import Perturbation, attention_weights, merge_heads, perturb_rows, split_heads
from .pag import guided_prediction
from .pag_tokens import TokenLayout, perturb_layout

# transformer_options entry listing the chunks of a call that belong to a perturbed / degraded pass
PERTURBED = "preprint_perturbed"

# uuid5 namespace for the perturbed copy of a cond: deterministic, so caches keyed by uuid see the same
# stream every step and every run, and never the original cond's uuid.
PERTURBED_NAMESPACE = uuid.UUID("5d0f3c4e-6a8b-4f2e-9c1d-7b3a2e1f0a91")


def perturbed_uuid(original, stream: str = "") -> uuid.UUID:
    """The uuid of a perturbed copy of the cond whose uuid is ``original``.

    ``stream`` names the technique (empty for PAG): copies of one cond made by different techniques (PAG's
    and SEG's perturbed rows, SAG's degraded pass) must be different streams for a cache keyed by uuid.
    """
    return uuid.uuid5(PERTURBED_NAMESPACE, f"{stream}:{original}" if stream else str(original))


def chunks_of(cond_or_uncond: list[int], cond_index: int) -> list[int]:
    """Chunk positions in this model call that came from cond list ``cond_index``."""
    return [j for j, c in enumerate(cond_or_uncond) if c == cond_index]


def rows_of(chunks: list[int] | set[int], batch: int, n_chunks: int) -> list[int]:
    """Batch rows of the given chunks (ComfyUI concatenates equal-size chunks along the batch)."""
    if n_chunks == 0 or not chunks:
        return []
    if batch % n_chunks:
        raise ValueError(f"batch of {batch} rows cannot hold {n_chunks} equal chunks")
    per = batch // n_chunks
    return [j * per + r for j in sorted(chunks) for r in range(per)]


@dataclass
class Pending:
    """The positive and perturbed predictions of one step, waiting for the guidance hook."""

    x: torch.Tensor
    cond: torch.Tensor
    perturbed: torch.Tensor
    scale: float


@dataclass
class PagRunState:
    """Lives in the run's ``transformer_options`` from OUTER_SAMPLE start to end; never shared between runs."""

    armed_x: torch.Tensor | None = None  # the x of the guider call whose cond batch gets the extra copy
    guider_conds: dict = field(default_factory=dict)  # identity of the guider's cond lists, by name
    pending: Pending | None = None
    perturbed_steps: int = 0


@dataclass
class SagPending:
    x: torch.Tensor
    pred: torch.Tensor  # the guiding prediction (uncond, or cond at cfg 1)
    conds: list
    masks: list[torch.Tensor]
    scale: float


@dataclass
class SagRunState:
    armed_x: torch.Tensor | None = None
    guider_conds: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)  # uuid -> (b, 1, h, w) mask from this step's model call(s)
    # uuid -> the latest mask computed in this run: a block cache that reuses the mask layer's block on a step
    # reuses its attention too, so the mask of the step that computed it is the one that still applies
    last_masks: dict = field(default_factory=dict)
    pending: SagPending | None = None


# ---------------------------------------------------------------------------------------------- the run engine
# How the extra pass rides in the CFG model call: a PREDICT_NOISE wrapper arms the guider's call; the
# CALC_COND_BATCH wrapper of that call runs the technique's pass (PAG appends a perturbed copy of the positive
# cond list to the same call; SAG records an attention mask); a post-CFG function turns the pending result into
# the guidance term. ComfyUI's own functions are passed in as a ``Host``, so this module imports nothing from it.


@dataclass(frozen=True)
class Host:
    attention: Callable  # optimized_attention(q, k, v, heads, attn_precision=..., transformer_options=...)
    calc_cond_batch: Callable  # (model, conds, x, sigma, model_options) -> list of predictions
    is_flow: Callable[[object], bool]  # model_sampling -> True for rectified-flow (CONST) models
    apply_model: str  # the APPLY_MODEL wrapper kind


@dataclass(frozen=True)
class Technique:
    """The names one node's hooks live under: wrapper / post-CFG key, run state, per-call marker, and the
    tag of its extra pass's uuid. Distinct per node so that PAG, SoftPAG, SEG and SAG stack on one model,
    while a second node of the same kind replaces the first."""

    key: str
    stream: str  # perturbed_uuid's tag; PAG keeps the empty tag, so its copies keep the uuids they always had

    @property
    def state(self) -> str:
        return f"{self.key}_state"

    @property
    def marker(self) -> str:
        return f"{self.key}_pass"


PAG = Technique("preprint_pag", "")
SOFT_PAG = Technique("preprint_softpag", "softpag")
SEG = Technique("preprint_seg", "seg")
SAG = Technique("preprint_sag", "sag")


@dataclass(frozen=True)
class PassInfo:
    """What the perturbed pass's patches need to know of the model: the chunk index of the perturbed copy, the layer
    family, the patch size (an int, or ``(t, h, w)`` for video DiTs), whether its joint attention puts the image
    before the text (HunyuanVideo's flipped blocks) and reference-image tokens before the latent's own."""

    cond_index: int
    family: str
    patch: int | tuple[int, ...]
    image_first: bool = False
    refs_first: bool = False


def pass_rows(topts: dict, info: PassInfo, batch: int) -> list[int]:
    cou = topts.get("cond_or_uncond") or []
    return rows_of(chunks_of(cou, info.cond_index), batch, len(cou))


def mark_perturbed(marker: str):
    """An APPLY_MODEL wrapper that adds the chunks of the call's ``PassInfo`` (under ``marker``) to
    ``preprint_perturbed``, so caches keep them as streams of their own; on DiT models it also records the
    token grid and text length the block patches need."""
    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        topts = dict(transformer_options or {})
        info: PassInfo | None = topts.get(marker)
        if info is not None:
            mine = set(chunks_of(topts.get("cond_or_uncond") or [], info.cond_index))
            topts[PERTURBED] = set(topts.get(PERTURBED, ())) | mine
            if info.family != "unet":
                ph, pw = (info.patch, info.patch) if isinstance(info.patch, int) else info.patch[-2:]
                topts["preprint_pag_grid"] = (math.ceil(x.shape[-2] / ph), math.ceil(x.shape[-1] / pw))
                if not isinstance(info.patch, int) and x.ndim == 5:
                    topts["preprint_pag_frames"] = math.ceil(x.shape[-3] / info.patch[0])
                n_txt = int(c_crossattn.shape[1]) if c_crossattn is not None else 0
                byt5 = kwargs.get("txt_byt5")  # HunyuanVideo appends these glyph tokens to the text
                topts["preprint_pag_txt_len"] = n_txt + (int(byt5.shape[1]) if byt5 is not None else 0)
        return executor(x, t, c_concat, c_crossattn, control, topts, **kwargs)
    return wrapper


def base_attention(host: Host, prev, q, k, v, extra_options):
    """The layer's ordinary output: the previous replace patch if there was one (so patches chain), else
    ComfyUI's attention with the call's transformer options (so attention overrides still apply)."""
    if prev is not None:
        return prev(q, k, v, extra_options)
    return host.attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                          transformer_options=extra_options)


def index_of(conds: list, ref) -> int | None:
    return next((i for i, c in enumerate(conds) if c is ref and c is not None), None) if ref is not None else None


def call_arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def with_options(model_options: dict, replace_: dict | None = None, wrapper: tuple | None = None,
                 **entries) -> dict:
    """A copy of ``model_options`` for one model call: attention replace patches set (``{"attn1": {key:
    patch}}``, merged over the existing tables), one keyed APPLY_MODEL wrapper added (``(kind, key, fn)``) and
    ``transformer_options`` entries set. Nothing shared with the original is changed."""
    mo = dict(model_options)
    topts = dict(mo.get("transformer_options", {}))
    if replace_:
        tables = {k: dict(v) for k, v in topts.get("patches_replace", {}).items()}
        for kind, patches in replace_.items():
            tables.setdefault(kind, {}).update(patches)
        topts["patches_replace"] = tables
    if wrapper is not None:
        kind, key, fn = wrapper
        wrappers = {k: dict(v) for k, v in topts.get("wrappers", {}).items()}
        wrappers.setdefault(kind, {})[key] = [fn]
        topts["wrappers"] = wrappers
    topts.update(entries)
    mo["transformer_options"] = topts
    return mo


class GuidedPass:
    """What one technique does inside the shared hooks; see :func:`make_hooks`."""

    technique: Technique
    targets: tuple[str, ...]  # guider cond names to run the pass for, in order of preference

    def run(self, state, executor, model, conds, x_in, timestep, model_options, target: int, scale: float):
        raise NotImplementedError

    def guide(self, pending, args: dict) -> torch.Tensor:
        raise NotImplementedError

    def unconsumed(self, pending, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The guider's result when it never ran the post-CFG list (the term is still owed)."""
        return out


def make_hooks(schedule, guided: GuidedPass):
    """PREDICT_NOISE, CALC_COND_BATCH and post-CFG hooks running ``guided`` once per guider call, at the scale
    ``schedule`` gives for the step (0: the pass is not run at all). The run state lives in the run's
    ``transformer_options`` under the technique's state key (put there by an OUTER_SAMPLE wrapper)."""
    key = guided.technique.state

    def state_of(model_options: dict):
        return (model_options or {}).get("transformer_options", {}).get(key)

    def predict_noise(executor, *args, **kwargs):
        state = state_of(call_arg(args, kwargs, 2, "model_options", {}))
        if state is None:
            return executor(*args, **kwargs)
        x = call_arg(args, kwargs, 0, "x")
        conds = executor.class_obj.conds
        state.armed_x, state.pending = x, None
        state.guider_conds = {name: conds.get(name) for name in guided.targets}
        try:
            out = executor(*args, **kwargs)
            p = state.pending
            return guided.unconsumed(p, x, out) if p is not None and p.x is x else out
        finally:
            state.armed_x = state.pending = None
            state.guider_conds = {}

    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        state = state_of(model_options)
        if state is None or state.armed_x is not x_in:
            return executor(model, conds, x_in, timestep, model_options)
        state.armed_x = None
        sigma = float(timestep.flatten()[0])
        scale = schedule.scale_at(sigma, float(model.model_sampling.timestep(timestep).flatten()[0]))
        target = next((i for i in (index_of(conds, state.guider_conds.get(n)) for n in guided.targets)
                       if i is not None), None)
        if target is None and conds and conds[0] is not None:
            target = 0
        if scale == 0.0 or target is None:
            return executor(model, conds, x_in, timestep, model_options)
        return guided.run(state, executor, model, conds, x_in, timestep, model_options, target, scale)

    def post_cfg(args):
        state = state_of(args.get("model_options"))
        p = state.pending if state is not None else None
        if p is None or p.x is not args["input"]:
            return args["denoised"]
        state.pending = None
        return guided.guide(p, args)

    return predict_noise, calc_cond_batch, post_cfg


# ---------------------------------------------------------------------------------------------- PAG, SoftPAG, SEG

def unet_patch(host: Host, prev, pert: Perturbation, marker: str):
    def patch(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        base = base_attention(host, prev, q, k, v, extra_options)
        info = extra_options.get(marker)
        rows = pass_rows(extra_options, info, q.shape[0]) if info is not None else []
        if not rows:
            return base
        grid = tuple(extra_options["activations_shape"][-2:])
        out = perturb_rows(split_heads(base, heads), split_heads(q, heads), split_heads(k, heads),
                           split_heads(v, heads), rows, pert, grid=grid)
        return merge_heads(out)
    return patch


def joint_layout(topts: dict, info: PassInfo | None, single: bool, length: int, n_txt_block: int,
                 n_img_block: int) -> TokenLayout | None:
    """Where the image tokens of one attention call of a DiT block lie, or None for a call that is not the block's
    self-attention over the image (a text-only or other call of another length).

    Newer ComfyUI says it itself in the single-stream blocks (``block_type`` "single" and ``img_slice``); otherwise
    the split comes from the block's own inputs (double blocks: ``img`` and ``txt``) or the text length recorded
    for the call (single blocks, which see the joint sequence only)."""
    image_first = info.image_first if info is not None else False
    if single:
        span = topts.get("img_slice") if topts.get("block_type", "single") == "single" else None
        if span is not None and len(span) == 2:
            image = (int(span[0]), int(span[1]))
        else:
            n_txt = min(int(topts.get("preprint_pag_txt_len", 0)), length)
            image = (0, length - n_txt) if image_first else (n_txt, length)
    elif length == n_txt_block + n_img_block:
        image = (0, n_img_block) if image_first else (n_txt_block, length)
    elif length == n_img_block:  # SD3.5's extra image-only self-attention; Wan's self-attention
        image = (0, length)
    else:
        return None
    return TokenLayout(image, topts.get("preprint_pag_grid"), int(topts.get("preprint_pag_frames", 1)),
                       info.refs_first if info is not None else False)


def dit_patch(prev, pert: Perturbation, single: bool, marker: str):
    def block(args, extra):
        def call(a):
            return prev(a, extra) if prev is not None else extra["original_block"](a)
        topts = args.get("transformer_options") or {}
        info = topts.get(marker)
        img = args["img"]
        rows = pass_rows(topts, info, img.shape[0]) if info is not None else []
        if not rows:
            return call(args)
        txt = args.get("txt")
        n_txt_block = int(txt.shape[1]) if txt is not None and not single else 0
        n_img_block = int(img.shape[1])
        prev_override = topts.get("optimized_attention_override")

        def override(func, *a, **kw):
            base = prev_override(func, *a, **kw) if prev_override is not None else func(*a, **kw)
            q, k, v = a[0], a[1], a[2]
            heads = a[3] if len(a) > 3 else kw["heads"]
            if kw.get("skip_reshape", False):
                qh, kh, vh = q, k, v
            else:  # (B, L, H*D); SD3 hands v over as (B, L, H, D)
                qh, kh, vh = (split_heads(t.reshape(t.shape[0], t.shape[1], -1), heads) for t in (q, k, v))
            if kh.shape[2] != qh.shape[2]:  # cross-attention (Wan's text and image-prompt attention)
                return base
            if kh.shape[1] != qh.shape[1]:  # grouped-query attention: each key head serves several query heads
                kh, vh = (t.repeat_interleave(qh.shape[1] // t.shape[1], dim=1) for t in (kh, vh))
            layout = joint_layout(kw.get("transformer_options") or topts, info, single, qh.shape[2], n_txt_block,
                                  n_img_block)
            if layout is None:
                return base
            skip_out = kw.get("skip_output_reshape", False)
            base_h = base if skip_out else split_heads(base, qh.shape[1])
            mask = kw.get("mask", a[4] if len(a) > 4 else None)
            out = perturb_layout(base_h, qh, kh, vh, rows, pert, layout, mask)
            return out if skip_out else merge_heads(out)

        return call({**args, "transformer_options": {**topts, "optimized_attention_override": override}})
    return block


def perturbed_pass_options(host: Host, model_options: dict, tech: Technique, info: PassInfo, layers: dict,
                           base: Perturbation) -> dict:
    """``model_options`` for one model call, with this technique's attention patches chained in front of any
    existing replace patch for the same layer (another technique's included), and the APPLY_MODEL wrapper that
    marks its perturbed chunks."""
    tables = (model_options.get("transformer_options") or {}).get("patches_replace", {})
    attn1, dit = dict(tables.get("attn1", {})), dict(tables.get("dit", {}))
    for (group, blk, t), heads in layers.items():
        pert = replace(base, heads=heads)
        if info.family == "unet":
            attn1[(group, blk, t)] = unet_patch(host, attn1.get((group, blk, t), attn1.get((group, blk))), pert,
                                                tech.marker)
        else:
            key = ("single_block" if group == "single" else "double_block", blk)
            dit[key] = dit_patch(dit.get(key), pert, group == "single", tech.marker)
    patches = {"attn1": attn1} if info.family == "unet" else {"dit": dit}
    return with_options(model_options, patches, (host.apply_model, tech.key, mark_perturbed(tech.marker)),
                        **{tech.marker: info})


@dataclass(frozen=True)
class PerturbedCopy(GuidedPass):
    """PAG / SoftPAG / SEG: a copy of the positive cond list rides in the same model call with perturbed
    self-attention; the term ``s (D_c - D_p)`` is added after CFG."""

    host: Host
    technique: Technique
    layers: dict
    perturbation: Perturbation
    family: str
    patch: int
    rescale: float
    targets: tuple[str, ...] = ("positive",)
    image_first: bool = False  # see PassInfo
    refs_first: bool = False

    def run(self, state, executor, model, conds, x_in, timestep, model_options, target, scale):
        # another technique's wrapper may run inside this one and append its own copy after ours
        perturbed = [{**c, "uuid": perturbed_uuid(c.get("uuid"), self.technique.stream)} for c in conds[target]]
        info = PassInfo(len(conds), self.family, self.patch, self.image_first, self.refs_first)
        mo = perturbed_pass_options(self.host, model_options, self.technique, info, self.layers, self.perturbation)
        out = executor(model, [*conds, perturbed], x_in, timestep, mo)
        state.pending = Pending(x_in, out[target], out[info.cond_index], scale)
        state.perturbed_steps += 1
        return out[:info.cond_index]

    def guide(self, pending, args):
        return guided_prediction(args["input"], args["denoised"], pending.cond, pending.perturbed, pending.scale,
                                 self.rescale)

    def unconsumed(self, pending, x, out):
        return guided_prediction(x, out, pending.cond, pending.perturbed, pending.scale, self.rescale)


# ---------------------------------------------------------------------------------------------- SAG

SAG_DEGRADED = "preprint_sag_degraded"  # marker of the degraded pass


@dataclass(frozen=True)
class SagPassInfo:
    target: int
    state: SagRunState
    threshold: float


def sag_mask_patch(host: Host, prev):
    """Records, for the guiding cond's chunks of this call, the layer's attention map as a mask (each call
    records its own chunks, so split batches all contribute)."""
    def patch(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        base = base_attention(host, prev, q, k, v, extra_options)
        info: SagPassInfo | None = extra_options.get(SAG.marker)
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
            info.state.masks[uuids[j]] = sag_math.attention_mask(attention_weights(qh[rows], kh[rows]), grid,
                                                                 info.threshold)
        return base
    return patch


@dataclass(frozen=True)
class DegradedPass(GuidedPass):
    """SAG: the CFG call records the guiding cond's attention mask (the negative, or the positive at cfg 1);
    after CFG the guiding prediction is blurred inside the mask, re-noised and run once more as a stream of its
    own (fresh uuids, chunks marked perturbed), and ``s (x0_blurred - D(x_blurred))`` is added."""

    host: Host
    layer: tuple
    blur_sigma: float
    threshold: float
    technique: Technique = SAG
    targets: tuple[str, ...] = ("negative", "positive")

    def run(self, state, executor, model, conds, x_in, timestep, model_options, target, scale):
        state.masks = {}
        attn1 = ((model_options.get("transformer_options") or {}).get("patches_replace") or {}).get("attn1", {})
        patch = sag_mask_patch(self.host, attn1.get(self.layer, attn1.get(self.layer[:2])))
        mo = with_options(model_options, {"attn1": {self.layer: patch}},
                          **{SAG.marker: SagPassInfo(target, state, self.threshold)})
        out = executor(model, conds, x_in, timestep, mo)
        state.last_masks.update(state.masks)
        state.masks = {}
        masks = [state.last_masks[c.get("uuid")] for c in conds[target] if c.get("uuid") in state.last_masks]
        if masks:
            state.pending = SagPending(x_in, out[target], conds[target], masks, scale)
        return out

    def guide(self, pending, args):
        x = args["input"]
        size = pending.pred.shape[-2:]
        # each mask on the prediction's device: with cond chunks on several GPUs they were recorded on others
        mask = torch.stack([F.interpolate(m.to(pending.pred.device, torch.float32), size=size, mode="nearest")
                            for m in pending.masks]).amax(0)
        degraded = sag_math.degrade(pending.pred, mask, self.blur_sigma)
        sigma = args["sigma"].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        model = args["model"]
        alpha = (1.0 - sigma) if self.host.is_flow(model.model_sampling) else 1.0
        x_deg = sag_math.renoise(x, pending.pred, degraded, alpha)
        conds = [{**c, "uuid": perturbed_uuid(c.get("uuid"), SAG.stream)} for c in pending.conds]
        mo = with_options(args["model_options"], None, (self.host.apply_model, SAG.key, mark_perturbed(SAG_DEGRADED)),
                          **{SAG_DEGRADED: PassInfo(0, "unet", 1)})
        (pred,) = self.host.calc_cond_batch(model, [conds], x_deg, args["sigma"], mo)
        return sag_math.sag_guidance(args["denoised"], degraded, pred, pending.scale)
