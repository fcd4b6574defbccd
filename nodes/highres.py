"""Multi-resolution nodes: HiDiffusion (RAU-Net + MSW-MSA) for UNets, attention entropy scaling for any model,
RoPE scaling for Flux-layout DiTs, block noise for re-noising upscaled latents.

- HiDiffusion: Zhang et al., "HiDiffusion: Unlocking Higher-Resolution Creativity and Efficiency in
  Pretrained Diffusion Models", arXiv:2311.17528.
- Attention entropy scaling: Jin et al., "Training-free Diffusion Model Adaptation to Variable-Sized
  Text-to-Image Synthesis", arXiv:2306.08645.
- RoPE scaling: NTK-aware base scaling (as in I-Max, arXiv:2410.07536) or position interpolation (Chen et
  al., arXiv:2306.15595), per axis.
- Block noise: Teng et al., "Relay Diffusion: Unifying diffusion process across resolutions for image
  synthesis", arXiv:2309.03350.

Host glue only: the operators and the run's switches live in ``highres/hidiffusion.py``, the patches that apply
them to a running UNet in ``highres/hidiffusion_runtime.py``. The run is created in an OUTER_SAMPLE wrapper and
put into that run's cloned ``transformer_options``, where the patches read it.
"""

from __future__ import annotations

import logging

import comfy.model_base
import comfy.ops
import comfy.patcher_extension
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel
from comfy_api.latest import io

from ..highres import hidiffusion_runtime as rt
from ..highres.block_noise import BlockNoiseError, BlockNoiseSource
from ..highres.entropy import LATENT_KEY, EntropyOverride, RecordLatentSize
from ..highres.hidiffusion import LAYOUTS, PRESETS, HiDiffusionRun
from ..highres.rope import MODES as ROPE_MODES
from ..highres.rope import ScaledRoPE, scaled_rope
from ._host import RunState, attention, cast_weights, install_hooks, uncast_weights
from ._inputs import PreprintNode

log = logging.getLogger("preprint.highres")

CATEGORY = "Preprint/multi-resolution"
WMP = comfy.patcher_extension.WrappersMP
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


HOST = rt.Host(attention=attention, cast=cast_weights, uncast=uncast_weights)
_downsample = rt.Downsample(HOST)  # one handler for every model, so a second node finds it already installed


def _check_t(t1, t2) -> None:
    for name, t in (("t1", t1), ("t2", t2)):
        if t is not None and not 0.0 <= t <= 1.0:
            raise ValueError(f"{name} = {t} is a fraction of the run and must lie in [0, 1]")


class PreprintHiDiffusion(PreprintNode):
    NAME = NODE
    ALIASES = ("HiDiffusion", "RAU-Net", "MSW-MSA", "high resolution", "upscale")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintHiDiffusion",
            category=CATEGORY,
            description=(
                "HiDiffusion (Zhang et al., arXiv:2311.17528) for SD1.x, SD2.x and SDXL above their training size: "
                "RAU-Net shrinks the UNet's features early in the run (the first down-sampler at stride 4 with "
                "dilation 2, then 2x2 pooling one level down, both undone on the way up) so objects stop "
                "repeating; MSW-MSA runs the top self-attention layers in a 2x2 grid of windows shifted each step, "
                "which is faster. Switch points are fractions of the run read from each call's noise level, so any "
                "sampler and step count work; any width and height (no resizing); ControlNet residuals are resized "
                "to the features they meet. Preset 'auto' picks the official settings from the latent's size (SD1.x "
                "below 2048 px on a side: 2x, t1 0.4, t2 0; SDXL below 4096 px: 2x with the stride-4 "
                "down-sampler for the first 8/50 of the run, then pooling to t1 0.4; larger: 4x, t1 0.7, t2 0.3); "
                "'custom' uses t1 and t2."),
            inputs=[
                io.Model.Input("model", tooltip="A UNet model: SD1.x, SD2.x or SDXL."),
                io.Boolean.Input("raunet", default=True,
                                 tooltip="Resolution-aware U-Net: the structural fix against repeated objects."),
                io.Boolean.Input("msw_msa", default=True,
                                 tooltip="Shifted-window self-attention on the top attention layers: faster, local."),
                io.Float.Input("t1", default=PRESETS["2x"][0], min=0.0, max=1.0, step=0.05,
                               tooltip="With preset 'custom': fraction of the run (by steps, from the start) during "
                                       "which the first RAU-Net part is on (SD1.x: the stride-4 down-sampler; SDXL: "
                                       "the pooled block). 0.4 for 2x the training size, 0.7 for 4x."),
                io.Float.Input("t2", default=PRESETS["2x"][1], min=0.0, max=1.0, step=0.05,
                               tooltip="With preset 'custom': fraction of the run during which the second RAU-Net "
                                       "part is on (SD1.x: the pooled block; SDXL: the stride-4 down-sampler). 0 for "
                                       "2x, 0.3 for 4x."),
                io.Combo.Input("preset", options=["auto", "custom"], default="auto",
                               tooltip="auto: the official settings for the size being generated, chosen at the "
                                       "first step (t1 and t2 are then ignored). custom: t1 and t2 as set."),
            ],
            outputs=[io.Model.Output(tooltip="The model with HiDiffusion.")],
        )

    @classmethod
    def validate_inputs(cls, t1=None, t2=None, preset=None) -> bool | str:
        return cls.check_widgets(t1=t1, t2=t2, preset=preset)

    @classmethod
    def check_values(cls, t1=None, t2=None, **_) -> None:
        _check_t(t1, t2)

    @classmethod
    def execute(cls, model, raunet: bool, msw_msa: bool, t1: float, t2: float, preset: str = "auto") -> io.NodeOutput:
        _check_t(t1, t2)
        _, layout = _layout_of(model)
        m = model.clone()
        if not raunet and not msw_msa:
            return io.NodeOutput(m)
        make_run = RunState(rt.KEY, lambda guider, sigmas, seed: HiDiffusionRun(sigmas, layout, t1, t2, raunet,
                                                                                msw_msa, seed, preset))
        install_hooks(m, rt.KEY, {WMP.OUTER_SAMPLE: make_run, **({WMP.DIFFUSION_MODEL: rt.diffusion_model}
                                                                  if raunet else {})})
        if raunet:
            patches = m.model_options.get("transformer_options", {}).get("patches", {})
            others = [h for cls_, h in patches.get("forward_timestep_embed_patch", [])
                      if issubclass(Downsample, cls_) and h is not _downsample]
            if others:  # ComfyUI runs only the first handler that matches a layer
                raise ValueError(f"{NODE}: another node already replaces the UNet's down-samplers ({others[0]!r}); "
                                 "RAU-Net's stride-4 down-sampler could not run. Remove that node or HiDiffusion.")
            if not any(h is _downsample for _, h in patches.get("forward_timestep_embed_patch", [])):
                m.set_model_forward_timestep_embed_patch((Downsample, _downsample))
            if rt.input_block not in patches.get("input_block_patch", []):  # applied twice: patch once
                m.set_model_input_block_patch(rt.input_block)
            if rt.output_block not in patches.get("output_block_patch", []):
                m.set_model_output_block_patch(rt.output_block)
        if msw_msa:
            replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
            for block in layout.window_blocks:
                if block in replaces and not isinstance(replaces[block], rt.WindowAttention):
                    log.warning("%s: %s already has an attention replacement (%s); MSW-MSA leaves that layer to it",
                                NODE, block, type(replaces[block]).__name__)
                    continue
                m.set_model_attn1_replace(rt.WindowAttention(HOST, block), block[0], block[1], block[2])
        return io.NodeOutput(m)


ENTROPY_NODE = "Attention Entropy Scaling (Preprint)"
# Training sizes (pixels) by model class, for the 'auto' setting.
TRAINING_SIZES = {"SD15": 512, "SD20": 512, "SDXL": 1024, "SDXLRefiner": 1024, "SD3": 1024, "Flux": 1024,
                  "FluxSchnell": 1024}


def _training_latent(model, width: int, height: int) -> tuple[int, int]:
    if width == 0 or height == 0:
        name = type(model.model.model_config).__name__
        size = TRAINING_SIZES.get(name)
        if name == "SD20" and model.model.model_type == comfy.model_base.ModelType.V_PREDICTION:
            size = 768  # SD2.x 768-v
        if size is None:
            raise ValueError(f"{ENTROPY_NODE}: no known training size for {name}; set training_width and "
                             "training_height to the size the model was trained at (in pixels).")
        width, height = width or size, height or size
    factor = getattr(model.model.latent_format, "spacial_downscale_ratio", 8)
    return max(1, height // factor), max(1, width // factor)


class PreprintAttentionEntropyScaling(PreprintNode):
    NAME = ENTROPY_NODE
    ALIASES = ("entropy scaling", "high resolution", "attention scaling")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintAttentionEntropyScaling",
            category=CATEGORY,
            description=(
                "Attention entropy scaling (Jin et al., arXiv:2306.08645) for sizes other than the training size, "
                "on UNets (SD1.x, SDXL) and DiTs (Flux, SD3): self-attention logits are multiplied by "
                "sqrt(log T / log N), T keys now and N keys at the training size, per layer, so attention spreads "
                "as it did in training. Cross-attention is untouched; joint text-image attention counts the text "
                "tokens too. At the training size it changes nothing."),
            inputs=[
                io.Model.Input("model", tooltip="Any model with softmax self-attention: SD1.x, SDXL, Flux, SD3."),
                io.Int.Input("training_width", default=0, min=0, max=16384, step=8,
                             tooltip="Width the model was trained at, in pixels; 0 = the family's (SD1.x 512, "
                                     "SDXL / Flux / SD3 1024)."),
                io.Int.Input("training_height", default=0, min=0, max=16384, step=8,
                             tooltip="Height the model was trained at, in pixels; 0 = the family's."),
            ],
            outputs=[io.Model.Output(tooltip="The model with entropy-scaled self-attention.")],
        )

    @classmethod
    def execute(cls, model, training_width: int, training_height: int) -> io.NodeOutput:
        train = _training_latent(model, training_width, training_height)
        dm = model.model.diffusion_model
        # video DiTs (Wan, HunyuanVideo) patch (frames, rows, columns); the others rows and columns
        patch = 1 if isinstance(dm, UNetModel) else (getattr(dm, "patch_size", 2) or 2)
        m = model.clone()
        to = m.model_options.setdefault("transformer_options", {})
        previous = to.get("optimized_attention_override")
        while isinstance(previous, EntropyOverride):  # a second node replaces ours, never nests it
            previous = previous.previous
        to["optimized_attention_override"] = EntropyOverride(train, patch, previous, dit=not isinstance(dm, UNetModel))
        install_hooks(m, LATENT_KEY, {WMP.APPLY_MODEL: RecordLatentSize()})
        return io.NodeOutput(m)


ROPE_NODE = "RoPE Scaling (Preprint)"


# DiTs with a Flux-style three-axis embedder whose text tokens do not sit at position 0: Qwen-Image numbers its
# text after the image's largest row / column, so the scaled extent of an axis would count the text as image.
ROPE_TEXT_AFTER_IMAGE = ("QwenImageTransformer2DModel",)


def _rope_embedder(model):
    dm = model.model.diffusion_model
    if any(c.__name__ in ROPE_TEXT_AFTER_IMAGE for c in type(dm).__mro__):
        raise ValueError(f"{ROPE_NODE}: this model is a {type(model.model).__name__} ({type(dm).__name__}), whose "
                         "text tokens are numbered after the image's rows and columns instead of at position 0, so "
                         "per-axis scaling would stretch the text's positions with the image's. The node serves "
                         "Flux, Flux Kontext, Chroma and HunyuanVideo; remove it from this model.")
    # the model's own embedder: while a sampled patcher's object patches are still applied, the attribute holds the
    # last run's replacement and the original waits in the backup
    backup = getattr(model, "object_patches_backup", {})
    pe = backup.get("diffusion_model.pe_embedder", getattr(dm, "pe_embedder", None))
    if pe is None or not hasattr(pe, "axes_dim") or not hasattr(pe, "theta") or len(pe.axes_dim) != 3:
        raise ValueError(f"{ROPE_NODE}: this model is a {type(model.model).__name__} ({type(dm).__name__}) without "
                         "Flux's three-axis rotary position embedding (index, row, column); it serves Flux, Flux "
                         "Kontext and Chroma. UNets (SD1.x, SDXL) have no positions to scale: use HiDiffusion.")
    probe = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(5.0), torch.arange(3.0), indexing="ij"),
                        dim=-1).reshape(1, -1, 3)
    if not torch.equal(pe(probe), scaled_rope(probe, list(pe.axes_dim), float(pe.theta), [None] * 3, ROPE_MODES[0])):
        raise ValueError(f"{ROPE_NODE}: this ComfyUI computes Flux's position embedding differently from the "
                         "layout RoPE scaling reproduces; the node cannot serve it without changing the model.")
    return pe


class PreprintRoPEScaling(PreprintNode):
    NAME = ROPE_NODE
    ALIASES = ("RoPE", "NTK", "position interpolation", "high resolution", "Flux")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintRoPEScaling",
            category=CATEGORY,
            description=(
                "Rotary position scaling for Flux-layout DiTs above their training size, per axis, so a wide image "
                "scales only its columns: NTK-aware (the base theta grows by s^(d/(d-2)), as I-Max, "
                "arXiv:2410.07536, does for Flux) or position interpolation (positions divided by s, Chen et al., "
                "arXiv:2306.15595); s = the axis's extent now over its extent at the training size. Axes at or "
                "below the training extent and text tokens are untouched: at the training size it changes "
                "nothing."),
            inputs=[
                io.Model.Input("model", tooltip="A Flux-layout model (Flux, Flux Kontext, Chroma)."),
                io.Combo.Input("mode", options=list(ROPE_MODES), default=ROPE_MODES[0],
                               tooltip="NTK-aware keeps fine detail; position interpolation is smoother."),
                io.Int.Input("training_width", default=0, min=0, max=16384, step=16,
                             tooltip="Width the model was trained at, in pixels; 0 = 1024 (Flux)."),
                io.Int.Input("training_height", default=0, min=0, max=16384, step=16,
                             tooltip="Height the model was trained at, in pixels; 0 = 1024 (Flux)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with scaled position embedding.")],
        )

    @classmethod
    def validate_inputs(cls, mode=None) -> bool | str:
        return cls.check_widgets(mode=mode)

    @classmethod
    def execute(cls, model, mode: str, training_width: int, training_height: int) -> io.NodeOutput:
        if mode not in ROPE_MODES:
            raise ValueError(f"{ROPE_NODE}: unknown mode {mode!r}; use one of {ROPE_MODES}")
        pe = _rope_embedder(model)  # the model's own embedder: a second node's object patch replaces ours
        factor = getattr(model.model.latent_format, "spacial_downscale_ratio", 8)
        patch = getattr(model.model.diffusion_model, "patch_size", 2) or 2
        video = isinstance(patch, (tuple, list))  # HunyuanVideo: (t, h, w), frames on the first id axis
        patch = int(patch[-1]) if video else int(patch)
        rows = (training_height or 1024) / factor / patch
        cols = (training_width or 1024) / factor / patch
        m = model.clone()
        m.add_object_patch("diffusion_model.pe_embedder", ScaledRoPE(pe, [None, rows, cols], mode, video))
        return io.NodeOutput(m)


BLOCK_NODE = "Block Noise (Preprint)"


class _CheckedBlockNoise(BlockNoiseSource):
    """The node's noise: errors raised while sampling name the node."""

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        try:
            return super().generate_noise(input_latent)
        except BlockNoiseError as e:
            raise ValueError(f"{BLOCK_NODE}: {e}") from None


class PreprintBlockNoise(PreprintNode):
    NAME = BLOCK_NODE
    ALIASES = ("block noise", "Relay Diffusion", "RDM", "re-noise", "upscale noise", "correlated noise")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintBlockNoise",
            category=CATEGORY,
            description=(
                "Block noise from Relay Diffusion (Teng et al., arXiv:2309.03350) for re-noising an upscaled latent "
                "(a second KSampler pass, SamplerCustomAdvanced): each element is the sum of the block_size x "
                "block_size white-noise values of the block ending at it, divided by block_size. Unit variance per "
                "element, but neighbours are correlated, so a block's average is as noisy as one element was at "
                "the size before upscaling and the re-noising reaches the coarse structure it should. Use the "
                "upscale factor as the block size. With block size 1 it is exactly core's Random Noise."),
            inputs=[
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the white noise the blocks are made of (the same seed as Random "
                                     "Noise gives the same white noise)."),
                io.Int.Input("block_size", default=2, min=1, max=16,
                             tooltip="Block side in latent elements: the factor the latent was upscaled by (2 after "
                                     "a 2x upscale). 1 = plain white noise."),
                io.Float.Input("block_fraction", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of the noise's variance that is block noise; the rest is independent "
                                       "white noise (1 = the paper's block noise; lower = milder, a pack option)."),
            ],
            outputs=[io.Noise.Output(tooltip="Noise for SamplerCustomAdvanced (or any node taking NOISE).")],
        )

    @classmethod
    def validate_inputs(cls, block_size=None, block_fraction=None) -> bool | str:
        return cls.check_widgets(block_size=block_size, block_fraction=block_fraction)

    @classmethod
    def execute(cls, noise_seed: int, block_size: int, block_fraction: float) -> io.NodeOutput:
        try:
            return io.NodeOutput(_CheckedBlockNoise(noise_seed, block_size, block_fraction))
        except BlockNoiseError as e:
            raise cls.error(str(e)) from None


NODES = [PreprintHiDiffusion, PreprintAttentionEntropyScaling, PreprintRoPEScaling, PreprintBlockNoise]
