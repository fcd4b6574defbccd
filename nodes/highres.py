"""Multi-resolution nodes: HiDiffusion (RAU-Net + MSW-MSA) for UNets.

- HiDiffusion: Zhang et al., "HiDiffusion: Unlocking Higher-Resolution Creativity and Efficiency in
  Pretrained Diffusion Models", arXiv:2311.17528.

Host glue only: the operators and the run's switches live in ``highres/hidiffusion.py``. The run is created
in an OUTER_SAMPLE wrapper and put into that run's cloned ``transformer_options``; the patches (the
Downsample handler of ``forward_timestep_embed_patch``, ``input_block_patch``, ``output_block_patch`` and
``attn1`` replacements) read it from there and do nothing outside a run. While RAU-Net changes feature
sizes, a DIFFUSION_MODEL wrapper takes ControlNet residuals out of ComfyUI's hands and adds them itself,
resized to the features they meet.
"""

from __future__ import annotations

import logging

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel
from comfy_api.latest import io

from ..guidance import cads
from ..highres.hidiffusion import LAYOUTS, PRESETS, HiDiffusionRun, pool, resize_to, strided_conv, windowed_attention
from ._host import validation_message

log = logging.getLogger("preprint.highres")

CATEGORY = "Preprint/multi-resolution"
WMP = comfy.patcher_extension.WrappersMP
KEY = "preprint_hidiffusion"
CONTROL_KEY = "preprint_hidiffusion_control"
NODE = "HiDiffusion (Preprint)"


def _layout_of(model):
    dm = model.model.diffusion_model
    if not isinstance(dm, UNetModel):
        raise ValueError(f"{NODE}: this model is a {type(model.model).__name__} ({type(dm).__name__}), not a UNet. "
                         "RAU-Net and MSW-MSA restructure a UNet's down / up path (SD1.x, SD2.x, SDXL); for Flux, "
                         "SD3 and other transformers no HiDiffusion exists.")
    levels = len(dm.input_blocks)
    name = {12: "sd15", 9: "sdxl"}.get(levels)
    layout = LAYOUTS.get(name) if name else None
    if layout is None or not isinstance(_first_layer(dm.input_blocks[layout.strided_block]), Downsample):
        raise ValueError(f"{NODE}: this UNet has {levels} input blocks; HiDiffusion knows the SD1.x / SD2.x layout "
                         "(12 input blocks, 4 levels) and the SDXL layout (9 input blocks, 3 levels).")
    return name, layout


def _first_layer(block):
    return next(iter(block.children()), None)


def _run(options: dict) -> HiDiffusionRun | None:
    return options.get(KEY) if options else None


def _sigma(options: dict):
    return options.get("sigmas")


class _OuterSample:
    def __init__(self, layout, t1, t2, raunet, windows):
        self.args = (layout, t1, t2, raunet, windows)

    def __call__(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        orig = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
        seed = kwargs.get("seed", args[3] if len(args) > 3 else None)
        layout, t1, t2, raunet, windows = self.args
        run = HiDiffusionRun(sigmas, layout, t1, t2, raunet, windows,
                             int(seed) if seed is not None else cads.content_key(noise))
        guider.model_options.setdefault("transformer_options", {})[KEY] = run
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            guider.model_options = orig


def _diffusion_model(executor, x, timesteps=None, context=None, y=None, control=None, transformer_options=None,
                     **kwargs):
    """While RAU-Net reshapes features, hand ControlNet residuals to our block patches (resized there)."""
    to = transformer_options if transformer_options is not None else {}
    run = _run(to)
    if run is not None and control is not None and "sigmas" in to and run.reshaping(_sigma(to)):
        stash = {k: list(control.get(k) or []) for k in ("input", "middle", "output")}
        control = {k: ([] if k in stash else v) for k, v in control.items()}
        to = {**to, CONTROL_KEY: stash}
    return executor(x, timesteps, context, y, control, to, **kwargs)


def _add_control(h, stash: dict | None, name: str):
    if not stash or not stash.get(name):
        return h
    ctrl = stash[name].pop()
    if ctrl is None:
        return h
    return h + resize_to(ctrl.to(h.dtype), h.shape[-2:])


def _downsample(layer, x, emb, context, transformer_options, output_shape, *args, **kwargs):
    """forward_timestep_embed_patch for Downsample: stride 4 in the layout's block while the run says so."""
    run = _run(transformer_options)
    block = transformer_options.get("block")
    if (run is None or "sigmas" not in transformer_options or block != ("input", run.layout.strided_block)
            or not run.strided(_sigma(transformer_options)) or not getattr(layer, "use_conv", False)):
        return layer(x)
    weight, bias, offload = _cast(layer.op, x)
    try:
        return strided_conv(x, weight, bias)
    finally:
        _uncast(layer.op, weight, bias, offload)


def _cast(op, x):
    out = comfy.ops.cast_bias_weight(op, x, offloadable=True) if _offloadable() else comfy.ops.cast_bias_weight(op, x)
    return out if len(out) == 3 else (*out, None)


def _uncast(op, weight, bias, offload):
    if offload is not None and hasattr(comfy.ops, "uncast_bias_weight"):
        comfy.ops.uncast_bias_weight(op, weight, bias, offload)


def _offloadable() -> bool:
    import inspect

    return "offloadable" in inspect.signature(comfy.ops.cast_bias_weight).parameters


def _input_block(h, transformer_options):
    run = _run(transformer_options)
    if run is None or "sigmas" not in transformer_options:
        return h
    h = _add_control(h, transformer_options.get(CONTROL_KEY), "input")
    if transformer_options.get("block") == ("input", run.layout.pooled_block) and run.pooled(
            _sigma(transformer_options)):
        h = pool(h)
    return h


def _output_block(h, hsp, transformer_options):
    run = _run(transformer_options)
    if run is None or "sigmas" not in transformer_options:
        return h, hsp
    stash = transformer_options.get(CONTROL_KEY)
    block = transformer_options.get("block")
    if stash is not None and block == ("output", 0):
        h = _add_control(h, stash, "middle")
    hsp = _add_control(hsp, stash, "output")
    if block == ("output", run.layout.unpool_block) and run.pooled(_sigma(transformer_options)):
        h = resize_to(h, hsp.shape[-2:])
    return h, hsp


class _WindowAttention:
    """attn1 replacement on the layout's top self-attention layers: MSW-MSA during a run, plain otherwise."""

    def __init__(self, block: tuple[str, int, int]):
        self.block = block

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        run = _run(extra_options)
        shape = extra_options.get("activations_shape")
        if run is None or not run.windows or shape is None or "sigmas" not in extra_options:
            return comfy_attention.optimized_attention(q, k, v, heads,
                                                       attn_precision=extra_options.get("attn_precision"))
        height, width = int(shape[-2]), int(shape[-1])
        shift = run.shift(_sigma(extra_options), height, width)
        return windowed_attention(q, k, v, height, width, shift,
                                  lambda a, b, c: comfy_attention.optimized_attention(
                                      a, b, c, heads, attn_precision=extra_options.get("attn_precision")))


def _check_t(t1, t2) -> None:
    for name, t in (("t1", t1), ("t2", t2)):
        if t is not None and not 0.0 <= t <= 1.0:
            raise ValueError(f"{name} = {t} is a fraction of the run and must lie in [0, 1]")


class PreprintHiDiffusion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintHiDiffusion",
            display_name=NODE,
            category=CATEGORY,
            description=(
                "HiDiffusion (Zhang et al., arXiv:2311.17528) for SD1.x, SD2.x and SDXL above their training size: "
                "RAU-Net shrinks the UNet's features early in the run (the first down-sampler at stride 4 with "
                "dilation 2, then 2x2 pooling one level down, both undone on the way up) so objects stop "
                "repeating; MSW-MSA runs the top self-attention layers in a 2x2 grid of windows shifted each step, "
                "which is faster. Switch points are fractions of the run read from each call's noise level, so any "
                "sampler and step count work; any width and height (no resizing); ControlNet residuals are resized "
                "to the features they meet. Presets: 2x the training size t1 0.4, t2 0; 4x t1 0.7, t2 0.3."),
            inputs=[
                io.Model.Input("model", tooltip="A UNet model: SD1.x, SD2.x or SDXL."),
                io.Boolean.Input("raunet", default=True,
                                 tooltip="Resolution-aware U-Net: the structural fix against repeated objects."),
                io.Boolean.Input("msw_msa", default=True,
                                 tooltip="Shifted-window self-attention on the top attention layers: faster, local."),
                io.Float.Input("t1", default=PRESETS["2x"][0], min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the run (by steps, from the start) during which the first "
                                       "RAU-Net part is on (SD1.x: the stride-4 down-sampler; SDXL: the pooled "
                                       "block). 0.4 for 2x the training size, 0.7 for 4x."),
                io.Float.Input("t2", default=PRESETS["2x"][1], min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the run during which the second RAU-Net part is on (SD1.x: the "
                                       "pooled block; SDXL: the stride-4 down-sampler). 0 for 2x, 0.3 for 4x."),
            ],
            outputs=[io.Model.Output(tooltip="The model with HiDiffusion.")],
        )

    @classmethod
    def validate_inputs(cls, t1=None, t2=None, **kwargs) -> bool | str:
        return validation_message(NODE, lambda: _check_t(t1, t2))

    @classmethod
    def execute(cls, model, raunet: bool, msw_msa: bool, t1: float, t2: float) -> io.NodeOutput:
        _check_t(t1, t2)
        _, layout = _layout_of(model)
        m = model.clone()
        if not raunet and not msw_msa:
            return io.NodeOutput(m)
        m.remove_wrappers_with_key(WMP.OUTER_SAMPLE, KEY)
        m.add_wrapper_with_key(WMP.OUTER_SAMPLE, KEY, _OuterSample(layout, t1, t2, raunet, msw_msa))
        if raunet:
            m.remove_wrappers_with_key(WMP.DIFFUSION_MODEL, KEY)
            m.add_wrapper_with_key(WMP.DIFFUSION_MODEL, KEY, _diffusion_model)
            patches = m.model_options.get("transformer_options", {}).get("patches", {})
            others = [h for cls_, h in patches.get("forward_timestep_embed_patch", [])
                      if issubclass(Downsample, cls_) and h is not _downsample]
            if others:  # ComfyUI runs only the first handler that matches a layer
                raise ValueError(f"{NODE}: another node already replaces the UNet's down-samplers ({others[0]!r}); "
                                 "RAU-Net's stride-4 down-sampler could not run. Remove that node or HiDiffusion.")
            if not any(h is _downsample for _, h in patches.get("forward_timestep_embed_patch", [])):
                m.set_model_forward_timestep_embed_patch((Downsample, _downsample))
            if _input_block not in patches.get("input_block_patch", []):  # applied twice: patch once
                m.set_model_input_block_patch(_input_block)
            if _output_block not in patches.get("output_block_patch", []):
                m.set_model_output_block_patch(_output_block)
        if msw_msa:
            replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
            for block in layout.window_blocks:
                if block in replaces and not isinstance(replaces[block], _WindowAttention):
                    log.warning("%s: %s already has an attention replacement (%s); MSW-MSA leaves that layer to it",
                                NODE, block, type(replaces[block]).__name__)
                    continue
                m.set_model_attn1_replace(_WindowAttention(block), block[0], block[1], block[2])
        return io.NodeOutput(m)


NODES = [PreprintHiDiffusion]
