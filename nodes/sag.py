"""Self-Attention Guidance node (perturbed-attention family).

Paper: Hong et al., "Improving Sample Quality of Diffusion Models Using Self-Attention Guidance"
(arXiv:2210.00939). The maths lives in ``guidance/sag.py``, the run engine in ``guidance/pag_runtime.py``
(``DegradedPass``).

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

from comfy_api.latest import io

from ..guidance.pag_layers import FAMILY_NAMES
from ..guidance.pag_runtime import DegradedPass, SagRunState
from ._host import HOST
from ._inputs import PreprintNode, model_input, model_output, sigma_window_inputs
from .pag import CATEGORY, attention_layout, install_guided_pass, make_schedule, resolve_layers


class PreprintSelfAttentionGuidance(PreprintNode):
    NAME = "Self-Attention Guidance (Preprint)"
    ALIASES = ("SAG", "self-attention guidance")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintSelfAttentionGuidance",
            category=CATEGORY,
            description=(
                "SAG (Hong et al., 'Improving Sample Quality of Diffusion Models Using Self-Attention Guidance', "
                "arXiv:2210.00939): blurs the predicted image where the model's self-attention concentrates, "
                "re-noises it and guides away from the model's answer there. Works with batched or split cond "
                "batches, any latent size and batch > 1; at cfg 1 it guides with the positive prediction. UNet "
                "models (SD1.x, SDXL); one extra model call per step, cached as a stream of its own by the "
                "Preprint caches. Defaults are the paper's (scale 0.75, blur sigma 1)."),
            inputs=[
                model_input("A UNet model (SD1.x, SD2.x, SDXL)."),
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
                *sigma_window_inputs(),
            ],
            outputs=[model_output("The model with SAG attached; connect it to a sampler or guider.")],
        )

    @classmethod
    def validate_inputs(cls, sigma_start=None, sigma_end=None) -> bool | str:
        return cls.check_widgets(sigma_start=sigma_start, sigma_end=sigma_end)

    @classmethod
    def execute(cls, model, scale, blur_sigma, threshold, layer, sigma_start, sigma_end) -> io.NodeOutput:
        m = model.clone()
        layout, _ = attention_layout(m, cls.NAME)
        if layout.family != "unet":
            raise cls.error(
                "SAG needs a UNet (SD1.x, SD2.x, SDXL): its mask comes from the self-attention of the UNet's middle "
                f"block over the latent grid, which {FAMILY_NAMES[layout.family]} models do not have. "
                "On this model use Perturbed-Attention Guidance or Smoothed Energy Guidance (Preprint).")
        _, _, layers = resolve_layers(m, layer.strip() or "middle:0.0", cls.NAME)
        if len(layers) != 1:
            raise cls.error(f"'layer' must name exactly one self-attention layer (e.g. 'middle:0.0'); "
                            f"{layer!r} names {len(layers)}: {', '.join(f'{g}:{b}.{t}' for g, b, t in layers)}.")
        sched = make_schedule(cls, scale, 0.0, sigma_start, sigma_end)
        install_guided_pass(m, sched, DegradedPass(HOST, next(iter(layers)), blur_sigma, threshold), SagRunState)
        return io.NodeOutput(m)


NODES = [PreprintSelfAttentionGuidance]
