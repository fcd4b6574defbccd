"""Models for trying graphs without downloaded weights.

* Tiny Test Model: untrained, in a real family's block layout (smoke tests, CI); its images are noise.
* Proving Ground Model: the pack's toys trained on generated scenes of coloured shapes (see
  :mod:`preprint.proving`); their images follow captions in the scenes' words, so an effect can be seen.

Neither is a research technique.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..runner.tiny_models import latent_channels, tiny_clip, tiny_model, tiny_vae
from ._inputs import PreprintNode


class PreprintTinyTestModel(PreprintNode):
    NAME = "Tiny Test Model (untrained, Preprint)"
    ALIASES = ("test model",)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintTinyTestModel",
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
    def validate_inputs(cls, architecture=None) -> bool | str:
        return cls.check_widgets(architecture=architecture)

    @classmethod
    def execute(cls, architecture: str, weights_seed: int) -> io.NodeOutput:
        return io.NodeOutput(tiny_model(architecture, seed=weights_seed),
                             tiny_clip(weights_seed + 1, family=architecture),
                             tiny_vae(weights_seed + 2, latent_channels=latent_channels(architecture)))



class PreprintProvingGroundModel(PreprintNode):
    NAME = "Proving Ground Model (trained toy, Preprint)"
    ALIASES = ("toy model", "proving ground")

    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..proving.models import ARCHITECTURES, REBUILD_COMMAND

        return cls.schema(
            node_id="PreprintProvingGroundModel",
            category="Preprint/testing",
            description=(
                "Loads one of the pack's toy models, trained by the pack on generated pictures of flat-coloured "
                "circles, squares and triangles (red, green, blue, yellow, purple, cyan, orange) on white, black, "
                "grey or two-tone backgrounds at 128x128, captioned in words such as 'a red circle above a blue "
                "square on a white background' or 'a green triangle in the top left and a yellow circle at the "
                "bottom on a black background'; prompt it the same way. How closely it follows a caption is "
                "measured in benchmarks/results/proving_ground.md. It lets a graph run on pictures without a "
                "downloaded checkpoint; it is a toy, not an image model. "
                f"Rebuild the weights with `{REBUILD_COMMAND}`."
            ),
            inputs=[
                io.Combo.Input("architecture", options=list(ARCHITECTURES), default="sd15",
                               tooltip="sd15: SD1.5-layout UNet (noise prediction) with an SD-layout VAE (4 latent "
                                       "channels) and a tiny CLIP-L. flux: Flux-layout DiT (flow matching, no "
                                       "guidance embedding, so use CFG as with Flux-schnell: about 3-5) with a "
                                       "16-channel VAE and tiny CLIP-L + T5. Both were trained at 128x128."),
            ],
            outputs=[
                io.Model.Output(tooltip="The trained toy diffusion model."),
                io.Clip.Output(tooltip="The toy's frozen text encoder; use CLIPTextEncode with a caption."),
                io.Vae.Output(tooltip="The toy's trained VAE."),
            ],
        )

    @classmethod
    def validate_inputs(cls, architecture=None) -> bool | str:
        return cls.check_widgets(architecture=architecture)

    @classmethod
    def execute(cls, architecture: str) -> io.NodeOutput:
        from ..proving.models import load_toy

        return io.NodeOutput(*load_toy(architecture))


NODES = [PreprintTinyTestModel, PreprintProvingGroundModel]
