"""A tiny, untrained SD1.5-layout model for trying graphs without weights (smoke tests, CI, demos).

Not a research technique: it exists so a workflow built from Preprint nodes can run end to end on any
machine. Its images are noise.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..runner.tiny_models import latent_channels, tiny_clip, tiny_model, tiny_vae


class PreprintTinyTestModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintTinyTestModel",
            display_name="Tiny Test Model (untrained, Preprint)",
            category="Preprint/testing",
            description=(
                "Builds an UNTRAINED model with a real model family's block layout (SD1.5, SDXL, Flux or SD3), "
                "its text encoders' layouts and a VAE, all at tiny widths with seeded random weights. Use it to "
                "check that a graph runs (for example in CI or without downloaded checkpoints); the images it "
                "makes are noise."
            ),
            inputs=[
                io.Combo.Input("architecture", options=["sd15", "sdxl", "flux", "sd3"], default="sd15",
                               tooltip="Block layout to imitate. sd15: SD1.x UNet, CLIP-L, 4-channel VAE. sdxl: SDXL "
                                       "UNet (shortened transformer stacks), CLIP-L + CLIP-G. flux: Flux-dev double "
                                       "and single stream blocks, CLIP-L + T5, 16-channel VAE. sd3: SD3.5-style MMDiT "
                                       "joint blocks, CLIP-L + CLIP-G, 16-channel VAE."),
                io.Int.Input("weights_seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the random weights (the same seed always builds the same model)."),
            ],
            outputs=[
                io.Model.Output(tooltip="Untrained diffusion model with the chosen block layout."),
                io.Clip.Output(tooltip="Untrained text encoder; works with CLIPTextEncode."),
                io.Vae.Output(tooltip="Untrained VAE; works with VAEDecode / VAEEncode."),
            ],
        )

    @classmethod
    def execute(cls, architecture: str, weights_seed: int) -> io.NodeOutput:
        return io.NodeOutput(tiny_model(architecture, seed=weights_seed),
                             tiny_clip(weights_seed + 1, family=architecture),
                             tiny_vae(weights_seed + 2, latent_channels=latent_channels(architecture)))


NODES = [PreprintTinyTestModel]
