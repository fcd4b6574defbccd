"""Perturbed-attention guidance family: PAG, SoftPAG with head selection, smoothed-energy guidance.

Papers: Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance" (arXiv:2403.17377);
Lee et al., "Fine-Grained Perturbation Guidance via Attention Head Selection" (arXiv:2506.10978);
Hong, "Smoothed Energy Guidance" (arXiv:2408.00760). Self-Attention Guidance lives in ``nodes/sag.py``.

The run engine (the perturbed copy riding in the CFG model call, the attention patches, the guidance term) is
``guidance/pag_runtime.py``; this module finds the model's attention layers and holds the node schemas. Each node
(PAG, SoftPAG, SEG) has its own hook key, run state, per-call marker and uuid stream, so they stack on one model:
every one appends its own copy to the same call and adds its own guidance term.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension as pe
from comfy_api.latest import io

from ..guidance.attention_perturbation import INFINITE_BLUR_SIGMA, Perturbation
from ..guidance.pag import GuidanceSchedule
from ..guidance.pag_layers import (
    AttentionLayout,
    BlockInfo,
    LayerSpecError,
    check_syntax,
    default_spec,
    parse_and_resolve,
)
from ..guidance.pag_runtime import (
    PAG,
    SEG,
    SOFT_PAG,
    GuidedPass,
    PagRunState,
    PerturbedCopy,
    Technique,
    make_hooks,
)
from ..utils.sigma_window import SigmaWindow
from ._host import HOST, RunState, install_hooks
from ._inputs import PreprintNode, model_input, model_output, rescale_input, sigma_window_inputs

log = logging.getLogger("preprint")

CATEGORY = "Preprint/pag"
WMP = pe.WrappersMP
# diffusers' SD3 PAG example (pag_scale 0.7 at guidance_scale 5, layer blocks.13): the only published SD3 value
SD3_REFERENCE_SCALE = 0.7


class UnsupportedModelError(TypeError):
    pass


# ---------------------------------------------------------------------------------------------- model layout

def _diffusion_model(model):
    return model.get_model_object("diffusion_model")


SERVED_MODELS = "UNets (SD1.x, SD2.x, SDXL), Flux / Chroma, SD3 / MMDiT, Qwen-Image, Wan and HunyuanVideo"


@dataclass(frozen=True)
class DitTokens:
    """How a DiT's attention lays out its tokens (see ``guidance/pag_tokens.py``): the patch size (``(t, h, w)`` for
    video), whether its joint attention puts the image before the text, and whether reference-image tokens come
    before the latent's own."""

    patch: int | tuple[int, ...] = 1
    image_first: bool = False
    refs_first: bool = False


def _lumina_refusal(node: str, name: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{node}: this model is a Lumina2 / Z-Image ({name}). Its transformer layers offer no per-block patch point "
        "in this ComfyUI (no 'dit' block replacement), so single attention layers cannot be chosen and perturbed. "
        f"This node serves {SERVED_MODELS}; on Lumina2 / Z-Image use plain CFG.")


def attention_layout(model, node: str) -> tuple[AttentionLayout, int]:
    """Self-attention layers of the patcher's diffusion model, and its patch size (1 for UNets)."""
    layout, tokens = attention_layout_tokens(model, node)
    return layout, tokens.patch


def attention_layout_tokens(model, node: str) -> tuple[AttentionLayout, DitTokens]:
    """Self-attention layers of the patcher's diffusion model and how its DiT attention lays out tokens."""
    import comfy.ldm.chroma.model
    import comfy.ldm.flux.model
    import comfy.ldm.hunyuan_video.model
    import comfy.ldm.lumina.model
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.ldm.qwen_image.model
    import comfy.ldm.wan.model

    dm = _diffusion_model(model)
    name = type(dm).__name__
    tokens = DitTokens()
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
    elif isinstance(dm, (comfy.ldm.flux.model.Flux, comfy.ldm.chroma.model.Chroma,
                         comfy.ldm.hunyuan_video.model.HunyuanVideo)):
        video = isinstance(dm, comfy.ldm.hunyuan_video.model.HunyuanVideo)
        layout = AttentionLayout("hunyuan_video" if video else "flux", {
            "double": {i: BlockInfo(1, b.num_heads) for i, b in enumerate(dm.double_blocks)},
            "single": {i: BlockInfo(1, b.num_heads) for i, b in enumerate(dm.single_blocks)},
        }, {"double": len(dm.double_blocks), "single": len(dm.single_blocks)})
        # the double blocks say themselves which order their joint attention uses; on ComfyUI 0.3.64 HunyuanVideo's
        # single blocks follow the same [image | text] order (newer ComfyUI states the image span per call instead)
        first = dm.double_blocks[0] if len(dm.double_blocks) else None
        patch = tuple(int(p) for p in dm.patch_size) if video else int(dm.patch_size)
        tokens = DitTokens(patch, bool(getattr(first, "flipped_img_txt", False)), refs_first=video)
    elif isinstance(dm, mmdit.MMDiT):
        layout = AttentionLayout("mmdit", {"joint": {i: BlockInfo(1, b.x_block.attn.num_heads)
                                                     for i, b in enumerate(dm.joint_blocks)}},
                                 {"joint": len(dm.joint_blocks)})
        tokens = DitTokens(int(dm.patch_size))
    elif isinstance(dm, comfy.ldm.qwen_image.model.QwenImageTransformer2DModel):
        layout = AttentionLayout("qwen_image", {"double": {i: BlockInfo(1, b.attn.heads)
                                                           for i, b in enumerate(dm.transformer_blocks)}},
                                 {"double": len(dm.transformer_blocks)})
        tokens = DitTokens(int(dm.patch_size))
    elif isinstance(dm, comfy.ldm.wan.model.WanModel):
        layout = AttentionLayout("wan", {"double": {i: BlockInfo(1, b.num_heads) for i, b in enumerate(dm.blocks)}},
                                 {"double": len(dm.blocks)})
        tokens = DitTokens(tuple(int(p) for p in dm.patch_size), refs_first=True)
    elif isinstance(dm, comfy.ldm.lumina.model.NextDiT):
        raise _lumina_refusal(node, name)
    else:
        raise UnsupportedModelError(
            f"{node}: the model's diffusion network ({name}) is not one this node can patch. It supports "
            f"{SERVED_MODELS}; use a checkpoint of one of those.")
    if layout.layer_count == 0:
        raise UnsupportedModelError(
            f"{node}: this {name} has no self-attention layers, so there is no attention to perturb. "
            "Perturbed-attention guidance needs a model with self-attention (SD1.x, SDXL, Flux, SD3).")
    return layout, tokens


def resolve_layers(model, spec: str, node: str):
    layout, tokens = attention_layout_tokens(model, node)
    text = spec.strip() or default_spec(layout)
    try:
        layers = parse_and_resolve(text, layout)
    except LayerSpecError as e:
        raise ValueError(f"{node}: layers {spec!r}: {e}") from None
    return layout, tokens, layers


def _hint_sd3_scale(family: str, node: str, scale: float) -> None:
    """The widget's default suits UNets; on SD3 the only published value is about a quarter of it. A widget
    cannot default per model (and every value of the scale means something: 0 is off, negatives guide toward
    the perturbed prediction, so none can stand for "per model"), so say it where users look."""
    if family == "mmdit" and scale > SD3_REFERENCE_SCALE:
        log.info("%s: scale %g on an SD3 / MMDiT model; diffusers' SD3 PAG uses %g (with cfg 5). Lower the scale "
                 "if the image looks over-sharpened or over-saturated.", node, scale, SD3_REFERENCE_SCALE)


def install_guided_pass(model, schedule: GuidanceSchedule, guided: GuidedPass, make_state) -> None:
    """The shared hooks of a perturbed-attention technique, with a fresh ``make_state()`` per sampling run."""
    tech = guided.technique
    predict_noise, calc_cond_batch, post_cfg = make_hooks(schedule, guided)
    install_hooks(model, tech.key, {WMP.OUTER_SAMPLE: RunState(tech.state, lambda *_: make_state()),
                                    WMP.PREDICT_NOISE: predict_noise, WMP.CALC_COND_BATCH: calc_cond_batch},
                  post_cfg=post_cfg)


def apply_pag(model, node: str, tech: Technique, layers_spec: str, schedule: GuidanceSchedule, pert: Perturbation,
              rescale: float):
    m = model.clone()
    layout, tokens, layers = resolve_layers(m, layers_spec, node)
    if pert.kind == "identity":
        _hint_sd3_scale(layout.family, node, schedule.scale)
    install_guided_pass(m, schedule, PerturbedCopy(HOST, tech, layers, pert, layout.family, tokens.patch, rescale,
                                                   image_first=tokens.image_first, refs_first=tokens.refs_first),
                        PagRunState)
    log.debug("%s on %d layer(s): %s", node, len(layers), sorted(layers))
    return m


# ---------------------------------------------------------------------------------------------- nodes

def make_schedule(node: type[PreprintNode], scale: float, adaptive_scale: float, sigma_start: float,
                  sigma_end: float) -> GuidanceSchedule:
    try:
        return GuidanceSchedule(scale, adaptive_scale, SigmaWindow(sigma_start, sigma_end))
    except ValueError as e:
        raise node.error(str(e)) from None


LAYERS_TOOLTIP = (
    "Which self-attention layers to perturb. Empty = the default for this model: UNet 'middle:0'; SD3 'joint:13' "
    "(the official SD3 PAG layer); Flux the block in the middle of the double+single stack. UNet groups: input, "
    "middle, output ('input:4-8, middle:0, output:0-2'; 'output:1.0-1' picks transformer depths); Flux: double, "
    "single ('double:0-18, single:10-37'); SD3: joint ('joint:13'); Qwen-Image, Wan: double ('double:30'); "
    "HunyuanVideo: double, single. A wrong name lists the layers the model has.")


PAG_SCALE_NOTE = (" Published values: SD1.5 3 with cfg 4, or 5 alone at cfg 1; SD3 0.7 with cfg 5 (diffusers' SD3 "
                  "PAG), about a quarter of this default, so lower it on SD3.")


def _joint_input(tooltip: str):
    return io.Combo.Input("joint_attention", options=["image-to-image", "all tokens"], default="image-to-image",
                          tooltip=tooltip)


class _PerturbedAttentionNode(PreprintNode):
    """The schema and validation PAG, SoftPAG and SEG share; each adds its own inputs after these."""

    NODE_ID = ""
    DESCRIPTION = ""
    SCALE_NOTE = ""
    TECHNIQUE: Technique = PAG

    @classmethod
    def extra_inputs(cls) -> list:
        return []

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id=cls.NODE_ID, category=CATEGORY, description=cls.DESCRIPTION,
            inputs=[
                model_input("The diffusion model to patch (UNet: SD1.x/SDXL; DiT: Flux, Chroma, SD3, Qwen-Image, Wan, "
                            "HunyuanVideo)."),
                io.Float.Input("scale", default=3.0, min=-100.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale s in D_cfg + s (D_cond - D_perturbed). 0 switches it off "
                                       "exactly (no extra batch rows are run)." + cls.SCALE_NOTE),
                io.String.Input("layers", default="", tooltip=LAYERS_TOOLTIP),
                io.Float.Input("adaptive_scale", default=0.0, min=0.0, max=1.0, step=0.0001, round=0.0001,
                               tooltip="Fade the scale as sampling ends: s_t = max(0, s - a (1000 - t)) with t the "
                                       "model timestep (999 at the noisiest step). 0 keeps s constant; 0.005 fades "
                                       "s=5 to 0 by t=0."),
                *sigma_window_inputs(),
                rescale_input(),
                *cls.extra_inputs(),
            ],
            outputs=[model_output("The model with the guidance attached; connect it to a sampler or guider. Works "
                                  "at any CFG, including cfg 1 (guidance alone).")],
        )

    @classmethod
    def validate_inputs(cls, layers=None, sigma_start=None, sigma_end=None,
                        joint_attention="image-to-image") -> bool | str:
        values = {"layers": layers, "sigma_start": sigma_start, "sigma_end": sigma_end}
        if any(w.id == "joint_attention" for w in cls.extra_inputs()):  # SEG has no such input
            values["joint_attention"] = joint_attention
        return cls.check_widgets(**values)

    @classmethod
    def check_values(cls, layers=None, **_) -> None:
        """The layer list's syntax; its names are checked against the actual model when the node runs."""
        if layers is not None:
            check_syntax(layers)

    @classmethod
    def apply(cls, model, scale, layers, adaptive_scale, sigma_start, sigma_end, rescale,
              pert: Perturbation) -> io.NodeOutput:
        sched = make_schedule(cls, scale, adaptive_scale, sigma_start, sigma_end)
        return io.NodeOutput(apply_pag(model, cls.NAME, cls.TECHNIQUE, layers, sched, pert, rescale))


def _joint(choice: str) -> str:
    return "image" if choice == "image-to-image" else "all"


class PreprintPerturbedAttentionGuidance(_PerturbedAttentionNode):
    NODE_ID = "PreprintPerturbedAttentionGuidance"
    NAME = "Perturbed-Attention Guidance (Preprint)"
    ALIASES = ("PAG", "perturbed attention")
    SCALE_NOTE = PAG_SCALE_NOTE
    DESCRIPTION = (
        "PAG (Ahn et al., 'Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance', arXiv:2403.17377): "
        "replaces self-attention maps of the chosen layers by the identity and guides away from that weaker "
        "prediction. Runs in the same model call as cond and uncond (one forward per step with CFG), on SD1.x/SDXL "
        "UNets, Flux, Chroma, SD3, Qwen-Image, Wan and HunyuanVideo; with interval, adaptive scale and rescale.")

    @classmethod
    def extra_inputs(cls) -> list:
        return [_joint_input(
            "DiT models only. image-to-image: only the image-to-image part of the joint attention becomes the "
            "identity: an image token reads every text token and, of the image tokens, only itself; text tokens "
            "attend as usual (the same map as diffusers' SD3 PAG). all tokens: the identity over the whole joint "
            "sequence, every token, text included, outputs its own value (a stronger perturbation with no reference "
            "implementation).")]

    @classmethod
    def execute(cls, model, scale, layers, adaptive_scale, sigma_start, sigma_end, rescale,
                joint_attention="image-to-image") -> io.NodeOutput:
        pert = Perturbation("identity", 1.0, None, _joint(joint_attention))
        return cls.apply(model, scale, layers, adaptive_scale, sigma_start, sigma_end, rescale, pert)


class PreprintSoftPAG(_PerturbedAttentionNode):
    NODE_ID = "PreprintSoftPAG"
    NAME = "SoftPAG / Head Selection (Preprint)"
    ALIASES = ("SoftPAG", "PAG", "head selection", "HeadHunter")
    TECHNIQUE = SOFT_PAG
    SCALE_NOTE = PAG_SCALE_NOTE
    DESCRIPTION = (
        "SoftPAG and attention-head selection (Lee et al., 'Fine-Grained Perturbation Guidance via Attention Head "
        "Selection', arXiv:2506.10978): each selected head's attention map becomes (1-u) A + u I, and the layer list "
        "may name heads ('joint:12[2,5]'). Batched into the CFG call.")

    @classmethod
    def extra_inputs(cls) -> list:
        return [io.Float.Input("softness", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="u in (1-u) A + u I: 1 is full PAG, smaller values perturb more gently "
                                       "(fewer over-smoothed or over-saturated results)."),
                _joint_input("DiT models only: which part of the joint attention is interpolated toward the "
                             "identity (see the PAG node).")]

    @classmethod
    def execute(cls, model, scale, layers, adaptive_scale, sigma_start, sigma_end, rescale, softness=0.5,
                joint_attention="image-to-image") -> io.NodeOutput:
        pert = Perturbation("identity", softness, None, _joint(joint_attention))
        return cls.apply(model, scale, layers, adaptive_scale, sigma_start, sigma_end, rescale, pert)


class PreprintSmoothedEnergyGuidance(_PerturbedAttentionNode):
    NODE_ID = "PreprintSmoothedEnergyGuidance"
    NAME = "Smoothed Energy Guidance (Preprint)"
    ALIASES = ("SEG", "smoothed energy", "PAG")
    TECHNIQUE = SEG
    DESCRIPTION = (
        "SEG (Hong, 'Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy Curvature of Attention', "
        "arXiv:2408.00760): blurs the self-attention queries of the chosen layers with a Gaussian over the image "
        "grid (each frame's on video models) and guides away from that prediction. Batched into the CFG call; UNet, "
        "Flux, Chroma, SD3, Qwen-Image, Wan and HunyuanVideo; head lists allowed.")

    @classmethod
    def extra_inputs(cls) -> list:
        return [io.Float.Input("blur_sigma", default=100.0, min=0.0, max=INFINITE_BLUR_SIGMA, step=0.1,
                               tooltip="Gaussian sigma in tokens. Larger blurs more (weaker model, stronger effect); "
                                       "9999 means infinite: every query becomes the mean query.")]

    @classmethod
    def execute(cls, model, scale, layers, adaptive_scale, sigma_start, sigma_end, rescale,
                blur_sigma=100.0) -> io.NodeOutput:
        pert = Perturbation("smoothed_energy", 1.0, None, "image", blur_sigma)
        return cls.apply(model, scale, layers, adaptive_scale, sigma_start, sigma_end, rescale, pert)


NODES = [PreprintPerturbedAttentionGuidance, PreprintSoftPAG, PreprintSmoothedEnergyGuidance]
