"""Perturbed-attention guidance family: PAG, SoftPAG with head selection, smoothed-energy guidance.

Papers: Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance" (arXiv:2403.17377);
Lee et al., "Fine-Grained Perturbation Guidance via Attention Head Selection" (arXiv:2506.10978);
Hong, "Smoothed Energy Guidance" (arXiv:2408.00760). Self-Attention Guidance lives in ``nodes/sag.py``.

How the perturbed pass rides in the CFG model call (no extra forward): a PREDICT_NOISE wrapper marks the
guider's call; the CALC_COND_BATCH wrapper of that call appends a copy of the positive cond list (fresh uuid,
uuid5 of the original) and installs, for that call only, attention patches that perturb just the rows whose
chunk came from the copy (``transformer_options["preprint_perturbed"]`` lists those chunk positions); the
copy's prediction is handed to a post-CFG function that adds ``s_t (D_c - D_p)``. ComfyUI may split the
batch into several model calls; each call carries its own ``cond_or_uncond``, so the patch stays right.

Each node (PAG, SoftPAG, SEG) has its own wrapper key, run state, per-call marker and uuid stream, so they
stack on one model: every one appends its own copy to the same call and adds its own guidance term.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension as pe
from comfy_api.latest import io

from ..guidance.attention_perturbation import INFINITE_BLUR_SIGMA, Perturbation, merge_heads, perturb_rows, split_heads
from ..guidance.cfg_schedule import GuidanceInterval
from ..guidance.pag import GuidanceSchedule, guided_prediction
from ..guidance.pag_layers import (
    AttentionLayout,
    BlockInfo,
    LayerSpecError,
    check_syntax,
    default_spec,
    parse_and_resolve,
)
from ..guidance.pag_runtime import PagRunState, Pending, chunks_of, perturbed_uuid, rows_of
from ._host import validation_message

log = logging.getLogger("preprint")

CATEGORY = "Preprint/pag"
PERTURBED = "preprint_perturbed"
# diffusers' SD3 PAG example (pag_scale 0.7 at guidance_scale 5, layer blocks.13): the only published SD3 value
SD3_REFERENCE_SCALE = 0.7


@dataclass(frozen=True)
class Technique:
    """The names one node's hooks live under: wrapper / post-CFG key, run state, per-call marker, and the
    tag of its perturbed copy's uuid. Distinct per node so that PAG, SoftPAG and SEG stack on one model,
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


class UnsupportedModelError(TypeError):
    pass


# ---------------------------------------------------------------------------------------------- model layout

def _diffusion_model(model):
    return model.get_model_object("diffusion_model")


def attention_layout(model, node: str) -> tuple[AttentionLayout, int]:
    """Self-attention layers of the patcher's diffusion model, and its patch size (1 for UNets)."""
    import comfy.ldm.chroma.model
    import comfy.ldm.flux.model
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

    dm = _diffusion_model(model)
    name = type(dm).__name__
    if all(hasattr(dm, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        blocks: dict[str, dict[int, BlockInfo]] = {}
        groups = (("input", list(dm.input_blocks)), ("middle", [dm.middle_block]), ("output", list(dm.output_blocks)))
        for group, mods in groups:
            for i, mod in enumerate(mods):
                for sub in mod.modules():
                    if isinstance(sub, comfy_attention.SpatialTransformer):
                        tbs = [b for b in sub.transformer_blocks if not b.disable_self_attn]
                        if tbs:
                            blocks.setdefault(group, {})[i] = BlockInfo(len(sub.transformer_blocks), tbs[0].attn1.heads)
                        break
        layout = AttentionLayout("unet", blocks, {g: len(m) for g, m in groups})
        patch = 1
    elif isinstance(dm, (comfy.ldm.flux.model.Flux, comfy.ldm.chroma.model.Chroma)):
        layout = AttentionLayout("flux", {
            "double": {i: BlockInfo(1, b.num_heads) for i, b in enumerate(dm.double_blocks)},
            "single": {i: BlockInfo(1, b.num_heads) for i, b in enumerate(dm.single_blocks)},
        }, {"double": len(dm.double_blocks), "single": len(dm.single_blocks)})
        patch = int(dm.patch_size)
    elif isinstance(dm, mmdit.MMDiT):
        layout = AttentionLayout("mmdit", {"joint": {i: BlockInfo(1, b.x_block.attn.num_heads)
                                                     for i, b in enumerate(dm.joint_blocks)}},
                                 {"joint": len(dm.joint_blocks)})
        patch = int(dm.patch_size)
    else:
        raise UnsupportedModelError(
            f"{node}: the model's diffusion network ({name}) is not one this node can patch. It supports UNets "
            "(SD1.x, SD2.x, SDXL), Flux / Chroma and SD3 / MMDiT models; use a checkpoint of one of those.")
    if layout.layer_count == 0:
        raise UnsupportedModelError(
            f"{node}: this {name} has no self-attention layers, so there is no attention to perturb. "
            "Perturbed-attention guidance needs a model with self-attention (SD1.x, SDXL, Flux, SD3).")
    return layout, patch


def resolve_layers(model, spec: str, node: str):
    layout, patch = attention_layout(model, node)
    text = spec.strip() or default_spec(layout)
    try:
        layers = parse_and_resolve(text, layout)
    except LayerSpecError as e:
        raise ValueError(f"{node}: layers {spec!r}: {e}") from None
    return layout, patch, layers


# ---------------------------------------------------------------------------------------------- per-pass hooks

@dataclass(frozen=True)
class PassInfo:
    cond_index: int
    family: str
    patch: int


def _rows(topts: dict, info: PassInfo, batch: int) -> list[int]:
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
                topts["preprint_pag_grid"] = (math.ceil(x.shape[-2] / info.patch), math.ceil(x.shape[-1] / info.patch))
                topts["preprint_pag_txt_len"] = int(c_crossattn.shape[1]) if c_crossattn is not None else 0
        return executor(x, t, c_concat, c_crossattn, control, topts, **kwargs)
    return wrapper


def base_attention(prev, q, k, v, extra_options):
    """The layer's ordinary output: the previous replace patch if there was one (so patches chain), else
    ComfyUI's attention with the call's transformer options (so attention overrides still apply)."""
    if prev is not None:
        return prev(q, k, v, extra_options)
    return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                               attn_precision=extra_options.get("attn_precision"),
                                               transformer_options=extra_options)


def index_of(conds: list, ref) -> int | None:
    return next((i for i, c in enumerate(conds) if c is ref and c is not None), None) if ref is not None else None


def _unet_patch(prev, pert: Perturbation, marker: str):
    def patch(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        base = base_attention(prev, q, k, v, extra_options)
        info = extra_options.get(marker)
        rows = _rows(extra_options, info, q.shape[0]) if info is not None else []
        if not rows:
            return base
        grid = tuple(extra_options["activations_shape"][-2:])
        out = perturb_rows(split_heads(base, heads), split_heads(q, heads), split_heads(k, heads),
                           split_heads(v, heads), rows, pert, grid=grid)
        return merge_heads(out)
    return patch


def _dit_patch(prev, pert: Perturbation, single: bool, marker: str):
    def block(args, extra):
        def call(a):
            return prev(a, extra) if prev is not None else extra["original_block"](a)
        topts = args.get("transformer_options") or {}
        info = topts.get(marker)
        img = args["img"]
        rows = _rows(topts, info, img.shape[0]) if info is not None else []
        if not rows:
            return call(args)
        txt = args.get("txt")
        n_txt_block = int(txt.shape[1]) if txt is not None and not single else 0
        n_img_block = int(img.shape[1])
        grid = topts.get("preprint_pag_grid")
        prev_override = topts.get("optimized_attention_override")

        def override(func, *a, **kw):
            base = prev_override(func, *a, **kw) if prev_override is not None else func(*a, **kw)
            q, k, v = a[0], a[1], a[2]
            heads = a[3] if len(a) > 3 else kw["heads"]
            if kw.get("skip_reshape", False):
                qh, kh, vh = q, k, v
            else:  # (B, L, H*D); SD3 hands v over as (B, L, H, D)
                qh, kh, vh = (split_heads(t.reshape(t.shape[0], t.shape[1], -1), heads) for t in (q, k, v))
            length = qh.shape[2]
            if single:
                n_txt = int(topts.get("preprint_pag_txt_len", 0))
            elif length == n_txt_block + n_img_block:
                n_txt = n_txt_block
            elif length == n_img_block:  # SD3.5's extra image-only self-attention
                n_txt = 0
            else:
                return base
            skip_out = kw.get("skip_output_reshape", False)
            base_h = base if skip_out else split_heads(base, qh.shape[1])
            out = perturb_rows(base_h, qh, kh, vh, rows, pert, n_txt=n_txt, grid=grid)
            return out if skip_out else merge_heads(out)

        new_topts = dict(topts)
        new_topts["optimized_attention_override"] = override
        return call({**args, "transformer_options": new_topts})
    return block


def pass_model_options(model_options: dict, tech: Technique, info: PassInfo, layers: dict,
                       base: Perturbation) -> dict:
    """A copy of ``model_options`` for one model call, with this technique's attention patches chained in
    front of any existing replace patch for the same layer (another technique's included), and the
    APPLY_MODEL wrapper that marks its perturbed chunks."""
    mo = dict(model_options)
    topts = dict(mo.get("transformer_options", {}))
    replace_ = {k: dict(v) for k, v in topts.get("patches_replace", {}).items()}
    for (group, blk, t), heads in layers.items():
        pert = replace(base, heads=heads)
        if info.family == "unet":
            table = replace_.setdefault("attn1", {})
            prev = table.get((group, blk, t), table.get((group, blk)))
            table[(group, blk, t)] = _unet_patch(prev, pert, tech.marker)
        else:
            table = replace_.setdefault("dit", {})
            key = ("single_block" if group == "single" else "double_block", blk)
            table[key] = _dit_patch(table.get(key), pert, group == "single", tech.marker)
    topts["patches_replace"] = replace_
    wrappers = {k: dict(v) for k, v in topts.get("wrappers", {}).items()}
    wrappers.setdefault(pe.WrappersMP.APPLY_MODEL, {})[tech.key] = [mark_perturbed(tech.marker)]
    topts["wrappers"] = wrappers
    topts[tech.marker] = info
    mo["transformer_options"] = topts
    return mo


# ---------------------------------------------------------------------------------------------- run hooks

def outer_sample(state_key: str, make_state):
    """An OUTER_SAMPLE wrapper that gives each sampling run a fresh state object under ``state_key``."""
    def outer(executor, *args, **kwargs):
        topts = executor.class_obj.model_options.setdefault("transformer_options", {})
        topts[state_key] = make_state()
        try:
            return executor(*args, **kwargs)
        finally:
            topts.pop(state_key, None)
    return outer


def call_arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


@dataclass(frozen=True)
class PagConfig:
    technique: Technique
    schedule: GuidanceSchedule
    layers: dict
    perturbation: Perturbation
    family: str
    patch: int
    rescale: float


def make_hooks(cfg: PagConfig):
    tech = cfg.technique

    def state_of(model_options: dict) -> PagRunState | None:
        return (model_options or {}).get("transformer_options", {}).get(tech.state)

    def predict_noise(executor, *args, **kwargs):
        x = call_arg(args, kwargs, 0, "x")
        state = state_of(call_arg(args, kwargs, 2, "model_options", {}))
        if state is None:
            return executor(*args, **kwargs)
        state.armed_x, state.positive, state.pending = x, executor.class_obj.conds.get("positive"), None
        try:
            out = executor(*args, **kwargs)
            p = state.pending
            if p is not None and p.x is x:
                # a guider that never ran the post-CFG list: apply the term to its result instead
                out = guided_prediction(x, out, p.cond, p.perturbed, p.scale, cfg.rescale)
            return out
        finally:
            state.armed_x = state.positive = state.pending = None

    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        state = state_of(model_options)
        if state is None or state.armed_x is not x_in:
            return executor(model, conds, x_in, timestep, model_options)
        state.armed_x = None
        sigma = float(timestep.flatten()[0])
        scale = cfg.schedule.scale_at(sigma, float(model.model_sampling.timestep(timestep).flatten()[0]))
        pos = index_of(conds, state.positive)
        if pos is None and conds and conds[0] is not None:
            pos = 0
        if scale == 0.0 or pos is None:
            return executor(model, conds, x_in, timestep, model_options)
        # another technique's wrapper may run inside this one and append its own copy after ours
        perturbed = [{**c, "uuid": perturbed_uuid(c.get("uuid"), tech.stream)} for c in conds[pos]]
        info = PassInfo(len(conds), cfg.family, cfg.patch)
        mo = pass_model_options(model_options, tech, info, cfg.layers, cfg.perturbation)
        out = executor(model, [*conds, perturbed], x_in, timestep, mo)
        state.pending = Pending(x_in, out[pos], out[info.cond_index], scale)
        state.perturbed_steps += 1
        return out[:info.cond_index]

    def post_cfg(args):
        state = state_of(args.get("model_options"))
        p = state.pending if state is not None else None
        if p is None or p.x is not args["input"]:
            return args["denoised"]
        state.pending = None
        return guided_prediction(args["input"], args["denoised"], p.cond, p.perturbed, p.scale, cfg.rescale)

    post_cfg.preprint_key = tech.key  # type: ignore[attr-defined]
    return outer_sample(tech.state, PagRunState), predict_noise, calc_cond_batch, post_cfg


def install(model, key: str, outer, predict_noise, calc_cond_batch, post_cfg) -> None:
    """Install keyed wrappers and one post-CFG function, replacing those of an earlier node of the same
    technique on this model (so two such nodes do not double the guidance) and keeping everything else."""
    for kind, fn in ((pe.WrappersMP.OUTER_SAMPLE, outer), (pe.WrappersMP.PREDICT_NOISE, predict_noise),
                     (pe.WrappersMP.CALC_COND_BATCH, calc_cond_batch)):
        model.remove_wrappers_with_key(kind, key)
        model.add_wrapper_with_key(kind, key, fn)
    fns = [f for f in model.model_options.get("sampler_post_cfg_function", [])
           if getattr(f, "preprint_key", None) != key]
    model.model_options["sampler_post_cfg_function"] = [*fns, post_cfg]


def _hint_sd3_scale(family: str, node: str, scale: float) -> None:
    """The widget's default suits UNets; on SD3 the only published value is about a quarter of it. A widget
    cannot default per model (and every value of the scale means something: 0 is off, negatives guide toward
    the perturbed prediction, so none can stand for "per model"), so say it where users look."""
    if family == "mmdit" and scale > SD3_REFERENCE_SCALE:
        log.info("%s: scale %g on an SD3 / MMDiT model; diffusers' SD3 PAG uses %g (with cfg 5). Lower the scale "
                 "if the image looks over-sharpened or over-saturated.", node, scale, SD3_REFERENCE_SCALE)


def apply_pag(model, node: str, tech: Technique, layers_spec: str, schedule: GuidanceSchedule, pert: Perturbation,
              rescale: float):
    m = model.clone()
    layout, patch, layers = resolve_layers(m, layers_spec, node)
    cfg = PagConfig(tech, schedule, layers, pert, layout.family, patch, rescale)
    if pert.kind == "identity":
        _hint_sd3_scale(layout.family, node, schedule.scale)
    install(m, tech.key, *make_hooks(cfg))
    log.debug("%s on %d layer(s): %s", node, len(layers), sorted(layers))
    return m


# ---------------------------------------------------------------------------------------------- nodes

def make_schedule(scale: float, adaptive_scale: float, sigma_start: float, sigma_end: float,
                  node: str) -> GuidanceSchedule:
    try:
        return GuidanceSchedule(scale, adaptive_scale, sigma_start, sigma_end)
    except ValueError as e:
        raise ValueError(f"{node}: {e}") from None


LAYERS_TOOLTIP = (
    "Which self-attention layers to perturb. Empty = the default for this model: UNet 'middle:0'; SD3 'joint:13' "
    "(the official SD3 PAG layer); Flux the block in the middle of the double+single stack. UNet groups: input, "
    "middle, output ('input:4-8, middle:0, output:0-2'; 'output:1.0-1' picks transformer depths); Flux: double, "
    "single ('double:0-18, single:10-37'); SD3: joint ('joint:13'). A wrong name lists the layers the model has.")


PAG_SCALE_NOTE = (" Published values: SD1.5 3 with cfg 4, or 5 alone at cfg 1; SD3 0.7 with cfg 5 (diffusers' SD3 "
                  "PAG), about a quarter of this default, so lower it on SD3.")


def _common_inputs(default_scale: float, scale_note: str = "") -> list:
    return [
        io.Model.Input("model", tooltip="The diffusion model to patch (UNet: SD1.x/SDXL; DiT: Flux, SD3)."),
        io.Float.Input("scale", default=default_scale, min=-100.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Guidance scale s in D_cfg + s (D_cond - D_perturbed). 0 switches it off exactly "
                               "(no extra batch rows are run)." + scale_note),
        io.String.Input("layers", default="", tooltip=LAYERS_TOOLTIP),
        io.Float.Input("adaptive_scale", default=0.0, min=0.0, max=1.0, step=0.0001, round=0.0001,
                       tooltip="Fade the scale as sampling ends: s_t = max(0, s - a (1000 - t)) with t the model "
                               "timestep (999 at the noisiest step). 0 keeps s constant; 0.005 fades s=5 to 0 by "
                               "t=0."),
        io.Float.Input("sigma_start", default=-1.0, min=-1.0, max=10000.0, step=0.01, round=0.001,
                       tooltip="Guide only while sigma <= this value (-1: from the first step)."),
        io.Float.Input("sigma_end", default=-1.0, min=-1.0, max=10000.0, step=0.01, round=0.001,
                       tooltip="Guide only while sigma >= this value (-1: to the last step)."),
        io.Float.Input("rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Match the guided prediction's standard deviation to the positive prediction's and "
                               "blend by this amount (0 = off), against over-saturation at high scales."),
    ]


def _validate_widgets(node: str, layers, sigma_start, sigma_end) -> bool | str:
    """What the widget values alone can show wrong; the layer list is checked against the actual model when the
    node runs."""
    def check() -> None:
        if isinstance(layers, str):
            check_syntax(layers)
        if sigma_start is not None and sigma_end is not None:
            GuidanceInterval(sigma_start, sigma_end)
    return validation_message(node, check)


def _joint_input(tooltip: str):
    return io.Combo.Input("joint_attention", options=["image-to-image", "all tokens"], default="image-to-image",
                          tooltip=tooltip)


_MODEL_OUT = io.Model.Output(tooltip="The model with the guidance attached; connect it to a sampler or guider. "
                                     "Works at any CFG, including cfg 1 (guidance alone).")


class PreprintPerturbedAttentionGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintPerturbedAttentionGuidance",
            display_name="Perturbed-Attention Guidance (Preprint)",
            category=CATEGORY,
            description=(
                "PAG (Ahn et al., 'Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance', "
                "arXiv:2403.17377): replaces self-attention maps of the chosen layers by the identity and guides "
                "away from that weaker prediction. Runs in the same model call as cond and uncond (one forward per "
                "step with CFG), on SD1.x/SDXL UNets, Flux and SD3; with interval, adaptive scale and rescale."),
            inputs=[*_common_inputs(3.0, PAG_SCALE_NOTE),
                    _joint_input("DiT models only. image-to-image: only the image-to-image part of the joint "
                                 "attention becomes the identity: an image token reads every text token and, of "
                                 "the image tokens, only itself; text tokens attend as usual (the same map as "
                                 "diffusers' SD3 PAG). all tokens: the identity over the whole joint sequence, "
                                 "every token, text included, outputs its own value (a stronger perturbation with "
                                 "no reference implementation).")],
            outputs=[_MODEL_OUT],
        )

    @classmethod
    def validate_inputs(cls, layers=None, sigma_start=None, sigma_end=None, **_) -> bool | str:
        return _validate_widgets(cls.define_schema().display_name, layers, sigma_start, sigma_end)

    @classmethod
    def execute(cls, model, scale, layers, adaptive_scale, sigma_start, sigma_end, rescale,
                joint_attention="image-to-image") -> io.NodeOutput:
        node = "Perturbed-Attention Guidance (Preprint)"
        pert = Perturbation("identity", 1.0, None, "image" if joint_attention == "image-to-image" else "all")
        sched = make_schedule(scale, adaptive_scale, sigma_start, sigma_end, node)
        return io.NodeOutput(apply_pag(model, node, PAG, layers, sched, pert, rescale))


class PreprintSoftPAG(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintSoftPAG",
            display_name="SoftPAG / Head Selection (Preprint)",
            category=CATEGORY,
            description=(
                "SoftPAG and attention-head selection (Lee et al., 'Fine-Grained Perturbation Guidance via "
                "Attention Head Selection', arXiv:2506.10978): each selected head's attention map becomes "
                "(1-u) A + u I, and the layer list may name heads ('joint:12[2,5]'). Batched into the CFG call."),
            inputs=[*_common_inputs(3.0, PAG_SCALE_NOTE),
                    io.Float.Input("softness", default=0.5, min=0.0, max=1.0, step=0.01,
                                   tooltip="u in (1-u) A + u I: 1 is full PAG, smaller values perturb more gently "
                                           "(fewer over-smoothed or over-saturated results)."),
                    _joint_input("DiT models only: which part of the joint attention is interpolated toward the "
                                 "identity (see the PAG node).")],
            outputs=[_MODEL_OUT],
        )

    @classmethod
    def validate_inputs(cls, layers=None, sigma_start=None, sigma_end=None, **_) -> bool | str:
        return _validate_widgets(cls.define_schema().display_name, layers, sigma_start, sigma_end)

    @classmethod
    def execute(cls, model, scale, layers, adaptive_scale, sigma_start, sigma_end, rescale, softness=0.5,
                joint_attention="image-to-image") -> io.NodeOutput:
        node = "SoftPAG / Head Selection (Preprint)"
        pert = Perturbation("identity", softness, None, "image" if joint_attention == "image-to-image" else "all")
        sched = make_schedule(scale, adaptive_scale, sigma_start, sigma_end, node)
        return io.NodeOutput(apply_pag(model, node, SOFT_PAG, layers, sched, pert, rescale))


class PreprintSmoothedEnergyGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintSmoothedEnergyGuidance",
            display_name="Smoothed Energy Guidance (Preprint)",
            category=CATEGORY,
            description=(
                "SEG (Hong, 'Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy Curvature of "
                "Attention', arXiv:2408.00760): blurs the self-attention queries of the chosen layers with a "
                "Gaussian over the image grid and guides away from that prediction. Batched into the CFG call; "
                "UNet, Flux and SD3; head lists allowed."),
            inputs=[*_common_inputs(3.0),
                    io.Float.Input("blur_sigma", default=100.0, min=0.0, max=INFINITE_BLUR_SIGMA, step=0.1,
                                   tooltip="Gaussian sigma in tokens. Larger blurs more (weaker model, stronger "
                                           "effect); 9999 means infinite: every query becomes the mean query.")],
            outputs=[_MODEL_OUT],
        )

    @classmethod
    def validate_inputs(cls, layers=None, sigma_start=None, sigma_end=None, **_) -> bool | str:
        return _validate_widgets(cls.define_schema().display_name, layers, sigma_start, sigma_end)

    @classmethod
    def execute(cls, model, scale, layers, adaptive_scale, sigma_start, sigma_end, rescale,
                blur_sigma=100.0) -> io.NodeOutput:
        node = "Smoothed Energy Guidance (Preprint)"
        pert = Perturbation("smoothed_energy", 1.0, None, "image", blur_sigma)
        sched = make_schedule(scale, adaptive_scale, sigma_start, sigma_end, node)
        return io.NodeOutput(apply_pag(model, node, SEG, layers, sched, pert, rescale))


NODES = [PreprintPerturbedAttentionGuidance, PreprintSoftPAG, PreprintSmoothedEnergyGuidance]
