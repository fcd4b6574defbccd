"""Soft inpainting node: Differential Diffusion with the change map read in sigma space (regional family).

Levin and Fried, "Differential Diffusion: Giving Each Pixel Its Strength", arXiv:2306.00950. The maths is
``regional/soft_inpaint.py``; this module installs it as the model's ``denoise_mask_function`` (the slot
ComfyUI's inpainting path calls with every step's sigma and the run's sigma list), chaining a function an
earlier node put there.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..regional.soft_inpaint import active_mask
from ._inputs import PreprintNode

NODE = "Differential Diffusion, sigma space (Preprint)"


class _ChangeMap:
    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, sigma, denoise_mask, extra_options):
        if self.previous is not None:
            denoise_mask = self.previous(sigma, denoise_mask, extra_options)
        return active_mask(denoise_mask, sigma, extra_options["sigmas"])


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
                "works with any sampler."),
            inputs=[io.Model.Input("model", tooltip="Any model; sample with a latent that carries a noise mask.")],
            outputs=[io.Model.Output(tooltip="The model with per-pixel denoise strength.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        m = model.clone()
        previous = m.model_options.get("denoise_mask_function")
        while isinstance(previous, _ChangeMap):  # a second node replaces ours, never nests it
            previous = previous.previous
        m.set_model_denoise_mask_function(_ChangeMap(previous))
        return io.NodeOutput(m)


NODES = [PreprintDifferentialDiffusion]
