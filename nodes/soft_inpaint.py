"""Soft inpainting node: Differential Diffusion with the change map read in sigma space (regional family).

Levin and Fried, "Differential Diffusion: Giving Each Pixel Its Strength", arXiv:2306.00950. The maths is
``regional/soft_inpaint.py``; this module installs it as the model's ``denoise_mask_function`` (the slot
ComfyUI's inpainting path calls with every step's sigma and the run's sigma list), chaining a function an
earlier node put there.

Inpainting models (SD1.5 / SDXL inpaint, Flux Fill) also read a mask and a masked image from their concat input,
which ComfyUI builds once per run. A SAMPLER_SAMPLE wrapper records the run's change map and latent image, and an
APPLY_MODEL wrapper rewrites the concat input of every call from the mask that call is denoising, so the model's
idea of the hole grows with the change map.
"""

from __future__ import annotations

import logging

import comfy.model_base
import comfy.patcher_extension
import torch
from comfy_api.latest import io

from ..regional.soft_inpaint import active_mask, concat_layout, follow_change
from ._host import install_hooks
from ._inputs import PreprintNode

NODE = "Differential Diffusion, sigma space (Preprint)"
KEY = "preprint_soft_inpaint"
WMP = comfy.patcher_extension.WrappersMP
FLUX_FILL_MASK = 64  # Flux Fill folds its pixel-space mask into 8 x 8 = 64 channels (comfy.model_base.Flux)

log = logging.getLogger("preprint")


class _ChangeMap:
    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, sigma, denoise_mask, extra_options):
        if self.previous is not None:
            denoise_mask = self.previous(sigma, denoise_mask, extra_options)
        return active_mask(denoise_mask, sigma, extra_options["sigmas"])


class _Run:
    """One sampling run's change map (as the sampler holds it), latent image and sigmas."""

    def __init__(self, guider, sigmas, change, original, mask_function):
        self.guider, self.sigmas, self.change, self.original = guider, sigmas, change, original
        self.mask_function = mask_function
        self.warned = False

    def active(self, sigma) -> torch.Tensor:
        """``[B, 1, ...]``: what the sampler denoises at ``sigma``, from the same function it calls (ours, or one
        installed after ours), so the model's mask input and the sampler's mask cannot disagree."""
        mask = self.change
        if self.mask_function is not None:
            mask = self.mask_function(sigma, mask, extra_options={"model": self.guider, "sigmas": self.sigmas})
        return mask[:, :1]


def record_run(executor, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, *args, **kwargs):
    """SAMPLER_SAMPLE wrapper: put the run's change map and latent image (as the sampler gets them: the mask resized
    to the latent, the image in the model's latent space) where the APPLY_MODEL wrapper finds them."""
    if denoise_mask is not None and latent_image is not None:
        options = extra_args["model_options"]  # this run's own copy (CFGGuider.inner_sample)
        run = _Run(guider, sigmas, denoise_mask, latent_image, options.get("denoise_mask_function"))
        options["transformer_options"] = {**options.get("transformer_options", {}), KEY: run}
    return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, *args, **kwargs)


def _layout(model, concat: torch.Tensor, latent_channels: int):
    """The concat input's pieces for the models whose layout ComfyUI 0.3.64 defines, else None."""
    flux = comfy.model_base.Flux
    if isinstance(model, flux) and type(model).concat_cond is flux.concat_cond:
        if concat.shape[1] == latent_channels + FLUX_FILL_MASK:
            return (("masked_image", latent_channels), ("mask_pixels", FLUX_FILL_MASK))
        if concat.shape[1] == latent_channels:  # depth / canny image conditioning: no mask to follow
            return (("image", latent_channels),)
        return None
    keys = tuple(getattr(model, "concat_keys", ()) or ())
    if keys and type(model).concat_cond is comfy.model_base.BaseModel.concat_cond:
        try:
            return concat_layout(keys, int(concat.shape[1]), latent_channels)
        except ValueError:
            return None
    return None


def _blank(model, original: torch.Tensor) -> torch.Tensor:
    """The model's "no image" latent, as core uses where it has no image to give: SD inpaint's grey-pixel constants,
    else the latent of zeros."""
    fn = getattr(model, "blank_inpaint_image_like", None)
    if fn is not None:
        return fn(original)
    return model.process_latent_in(torch.zeros_like(original))


def follow_change_map(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                      **kwargs):
    """APPLY_MODEL wrapper: the concat input of an inpainting model follows the mask this call denoises."""
    run = (transformer_options or {}).get(KEY)
    if c_concat is None or run is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    model = executor.class_obj
    original = run.original
    layout = _layout(model, c_concat, int(original.shape[1]))
    if layout is None:
        if not run.warned:
            run.warned = True
            log.warning("%s: this model's concat input (%s, %d channels) has no layout known to the node; it is "
                        "passed as ComfyUI built it, so the model's mask input stays fixed for the run.", NODE,
                        type(model).__name__, c_concat.shape[1])
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    if tuple(c_concat.shape[2:]) != tuple(original.shape[2:]):
        raise ValueError(
            f"{NODE}: a model call covers {list(c_concat.shape[2:])} of the {list(original.shape[2:])} latent (area "
            "conditioning or tiling), and the inpainting model's per-step mask input is laid out for the whole "
            "latent. Sample the inpainting model without area conditioning / tiling, or without this node.")
    rows = torch.arange(x.shape[0], device=original.device) % original.shape[0]  # cond chunks share the batch
    active = run.active(t)[rows]
    new = follow_change(c_concat, layout, active, original[rows], _blank(model, original[rows]))
    return executor(x, t, new, c_crossattn, control, transformer_options, **kwargs)


class PreprintDifferentialDiffusion(PreprintNode):
    NAME = NODE
    ALIASES = ("differential diffusion", "soft inpainting", "inpaint")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintDifferentialDiffusion",
            category="Preprint/regional",
            description=(
                "Soft inpainting (Levin and Fried, Differential Diffusion, arXiv:2306.00950): the latent's noise mask "
                "(Set Latent Noise Mask, InpaintModelConditioning) becomes a change map whose value per pixel is its "
                "denoise strength. A pixel of value m is held at the re-noised original until the run reaches the "
                "noise level where an img2img pass of denoise m starts, read off the run's own sigmas, so m means "
                "the same on Karras, exponential and shifted Flux / SD3 schedules (core's Differential Diffusion "
                "compares m with the model timestep, which drifts there). 1 changes from the first step, 0 never; "
                "works with any sampler. Inpainting models (SD1.5 / SDXL inpaint, Flux Fill) get their mask and "
                "masked-image inputs updated every step to the part being regenerated."),
            inputs=[io.Model.Input("model", tooltip="Any model; sample with a latent that carries a noise mask. "
                                                    "With an inpainting model use InpaintModelConditioning.")],
            outputs=[io.Model.Output(tooltip="The model with per-pixel denoise strength.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        m = model.clone()
        previous = m.model_options.get("denoise_mask_function")
        while isinstance(previous, _ChangeMap):  # a second node replaces ours, never nests it
            previous = previous.previous
        m.set_model_denoise_mask_function(_ChangeMap(previous))
        install_hooks(m, KEY, {WMP.SAMPLER_SAMPLE: record_run, WMP.APPLY_MODEL: follow_change_map})
        return io.NodeOutput(m)


NODES = [PreprintDifferentialDiffusion]
