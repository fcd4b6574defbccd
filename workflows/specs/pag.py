"""Example workflows for the perturbed-attention family: PAG alone (cfg 1), PAG + CFG on SDXL, PAG on Flux,
SoftPAG with head selection on Flux, Smoothed Energy Guidance, and SAG."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("preprint_workflow_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
FLUX_CHECKPOINT = "flux1-dev-fp8.safetensors"
SCHEDULE = {"adaptive_scale": 0.0, "sigma_start": -1.0, "sigma_end": -1.0, "rescale": 0.0}


def pag(model: list, scale: float = 3.0, layers: str = "", joint: str = "image-to-image", **kw) -> dict:
    return {"class_type": "PreprintPerturbedAttentionGuidance",
            "inputs": {"model": model, "scale": scale, "layers": layers, **{**SCHEDULE, **kw},
                       "joint_attention": joint}}


def _graph(node: dict, title: str, checkpoint: str | None = None, size: int = 512, **ks) -> dict:
    prompt = {**common.sd15_base(width=size, height=size), **common.ksampler(model=["11", 0], **ks)}
    if checkpoint:
        prompt["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}
    prompt["11"] = {**node, "_meta": {"title": title}}
    return prompt


# 1. PAG alone: no negative pass at cfg 1; the official SD1.5 setting (scale 5, middle block).
_alone = _graph(pag(["1", 0], 5.0), "PAG alone (scale 5, middle block) at cfg 1", steps=25, cfg=1.0)

# 2. PAG + CFG on SDXL: the paper's CFG 4 / PAG 3, one model call per step, fading with the adaptive scale.
_sdxl = _graph(pag(["1", 0], 3.0, "middle:0", adaptive_scale=0.001), "PAG 3 + CFG 4 (middle block, adaptive 0.001)",
               SDXL_CHECKPOINT, 1024, steps=30, cfg=4.0, sampler_name="dpmpp_2m")

# 3. PAG on Flux dev: cfg 1 (Flux's distilled guidance stays in the conditioning), middle of the block stack,
#    guidance only in the first 80% of the noise range.
_flux = _graph(pag(["1", 0], 2.0, "single:9", sigma_end=0.2), "PAG on Flux (single block 9, sigma >= 0.2)",
               FLUX_CHECKPOINT, 1024, steps=28, cfg=1.0, scheduler="simple")
_flux["3"]["inputs"]["text"] = ""

# 4. SoftPAG with heads on Flux: two heads of single block 9 and all of single block 10, perturbed 60% of the
#    way to identity (on SD3 the same node takes joint blocks, e.g. "joint:12[2,5], joint:13").
_soft = _graph({"class_type": "PreprintSoftPAG", "inputs": {
    "model": ["1", 0], "scale": 3.0, "layers": "single:9[1,3], single:10", **SCHEDULE, "softness": 0.6,
    "joint_attention": "image-to-image"}}, "SoftPAG u=0.6 on single:9 heads 1,3 and single:10",
    FLUX_CHECKPOINT, 1024, steps=28, cfg=1.0, scheduler="simple")
_soft["3"]["inputs"]["text"] = ""

# 5. Smoothed Energy Guidance on SD1.5 (infinite blur on the middle block, as the SEG paper's default).
_seg = _graph({"class_type": "PreprintSmoothedEnergyGuidance", "inputs": {
    "model": ["1", 0], "scale": 3.0, "layers": "middle:0", **SCHEDULE, "blur_sigma": 9999.0}},
    "Smoothed Energy Guidance (infinite blur, middle block)", steps=25, cfg=3.0)

# 6. SAG on SD1.5 at a size that is not a multiple of 64.
_sag = _graph({"class_type": "PreprintSelfAttentionGuidance", "inputs": {
    "model": ["1", 0], "scale": 0.75, "blur_sigma": 1.0, "threshold": 1.0, "layer": "", "sigma_start": -1.0,
    "sigma_end": -1.0}}, "Self-Attention Guidance (scale 0.75, blur 1)", steps=25, cfg=7.0)
_sag["4"]["inputs"].update({"width": 520, "height": 680})

# 7. PAG + SAG together on SD1.5 (PAG rides in the CFG call; SAG adds its blurred pass).
_both = _graph(pag(["12", 0], 3.0), "PAG (scale 3) on top of SAG", steps=25, cfg=5.0)
_both["12"] = {"class_type": "PreprintSelfAttentionGuidance", "inputs": {
    "model": ["1", 0], "scale": 0.5, "blur_sigma": 2.0, "threshold": 1.0, "layer": "", "sigma_start": -1.0,
    "sigma_end": -1.0}, "_meta": {"title": "Self-Attention Guidance (scale 0.5)"}}

WORKFLOWS: dict[str, dict] = {
    "PAG alone (cfg 1), SD1.5": _alone,
    "PAG + CFG, SDXL": _sdxl,
    "PAG on Flux": _flux,
    "SoftPAG with attention heads, Flux": _soft,
    "Smoothed Energy Guidance, SD1.5": _seg,
    "Self-Attention Guidance, SD1.5": _sag,
    "PAG + SAG, SD1.5": _both,
}

PAG_PAPER = ("Paper: Ahn et al., Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance, "
             "arXiv:2403.17377.")

NOTES: dict[str, str] = {
    "PAG alone (cfg 1), SD1.5": (
        "Perturbed-Attention Guidance with no negative prompt: at cfg 1 a copy of the prompt runs with the middle "
        "block's self-attention replaced by the identity, and sampling steers away from that weaker prediction. "
        "Try scale first: 0 is the plain model, 5 is the official SD1.5 setting, higher sharpens structure further "
        "and can over-saturate. " + PAG_PAPER),
    "PAG + CFG, SDXL": (
        "PAG on top of CFG on SDXL with the paper's CFG 4 and PAG 3; the perturbed copy rides in the same model "
        "call as the positive and negative prompts. Try scale first: 0 leaves plain CFG, higher adds structure; "
        "adaptive_scale 0.001 fades PAG out over the last steps, 0 keeps it to the end. " + PAG_PAPER),
    "PAG on Flux": (
        "PAG on Flux dev at cfg 1: the image-to-image part of single block 9's joint attention becomes the "
        "identity, and guidance stops once sigma falls below 0.2 (sigma_end). Try layers first: empty picks the "
        "block in the middle of the stack (single:9 on Flux), and lists such as double:0-18 or single:9[0,7] pick "
        "blocks and heads. " + PAG_PAPER),
    "SoftPAG with attention heads, Flux": (
        "SoftPAG moves each selected attention map only part of the way to the identity, here heads 1 and 3 of "
        "single block 9 and all of single block 10 on Flux. Try softness first: 1 is full PAG, lower values "
        "perturb more gently, which helps where PAG over-smooths or over-saturates. Paper: Lee et al., "
        "Fine-Grained Perturbation Guidance via Attention Head Selection, arXiv:2506.10978."),
    "Smoothed Energy Guidance, SD1.5": (
        "Smoothed Energy Guidance blurs the middle block's self-attention queries over the image grid and steers "
        "away from that smoothed prediction; blur_sigma 9999 is an infinite blur, every query the mean query. Try "
        "blur_sigma first: smaller values blur less for a gentler effect, and scale sets how far to steer. Paper: "
        "Hong, Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy Curvature of Attention, "
        "arXiv:2408.00760."),
    "Self-Attention Guidance, SD1.5": (
        "Self-Attention Guidance blurs the predicted image where the model's self-attention concentrates, "
        "re-noises it and steers away from it: one extra model call per step, UNet models only, here at 520x680, "
        "a size that is not a multiple of 64. Try scale first: 0 is off, 0.75 with blur_sigma 1 is the paper's "
        "setting (ComfyUI's own SAG node uses 0.5 and 2). Paper: Hong et al., Improving Sample Quality of "
        "Diffusion Models Using Self-Attention Guidance, arXiv:2210.00939."),
    "PAG + SAG, SD1.5": (
        "PAG and SAG on one model: PAG's perturbed copy rides in the CFG call and SAG adds its own blurred pass, "
        "each with a guidance term of its own. Try scale on either node first: 0 switches that guidance off "
        "exactly, so each one's share of the picture can be seen. Papers: Ahn et al., PAG, arXiv:2403.17377, and "
        "Hong et al., Self-Attention Guidance, arXiv:2210.00939."),
}
