"""Tiny, architecture-faithful models built from ComfyUI's own configs, with random weights.

They keep each family's block structure (block indices, attention placement, conditioning inputs) and
shrink only the widths, so patches that address blocks by index behave as on the real model while a
sampling step costs milliseconds on a CPU. The images they make are noise: they prove wiring, not quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import torch

FAMILIES = ("sd15", "sd15_v", "sdxl", "flux", "sd3")

_UNET_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                "legacy": False, "in_channels": 4, "use_temporal_attention": False, "use_temporal_resblock": False}


def _sd15_config() -> dict:
    # SD1.5 block layout (4 levels, 2 res blocks each, attention on the first three levels) at width 32.
    return {**_UNET_COMMON, "adm_in_channels": None, "model_channels": 32, "num_res_blocks": [2, 2, 2, 2],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
            "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 64,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}


def _sdxl_config() -> dict:
    # SDXL block layout (3 levels, no attention on the first, 2 and 10 transformers below) at width 32.
    # adm input = pooled text embedding (CLIP-G width, 32 here instead of 1280) + 6 size embeddings of 256.
    return {**_UNET_COMMON, "num_classes": "sequential", "adm_in_channels": 32 + 1536, "model_channels": 32,
            "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
            "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 64,
            "num_head_channels": 16, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}


def _flux_config() -> dict:
    # Flux-dev layout (19 double stream then 38 single stream blocks, guidance embedding) at hidden size 64.
    config = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "patch_size": 2, "out_channels": 16,
              "vec_in_dim": 32, "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 4,
              "depth": 19, "depth_single_blocks": 38, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True}
    if "txt_ids_dims" in _flux_param_names():
        config["txt_ids_dims"] = []  # newer ComfyUI requires it: [] is Flux.1 ([3] would be Flux.2)
    return config


def _flux_param_names() -> set[str]:
    import dataclasses

    import comfy.ldm.flux.model

    return {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}


def _sd3_config() -> dict:
    # SD3.5-style MMDiT (joint blocks, block 1 with the extra image-only self-attention) at hidden size 128.
    # ComfyUI's SD3 text encoders always pad to 4096 features, so the context embedder keeps that input width.
    return {"in_channels": 16, "pos_embed_scaling_factor": None, "pos_embed_offset": None, "pos_embed_max_size": 32,
            "patch_size": 2, "out_channels": 16, "depth": 2, "num_patches": 1024, "adm_in_channels": 64,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 128}},
            "qk_norm": "rms", "x_block_self_attn_layers": [1]}


@dataclass(frozen=True)
class TinySpec:
    family: str
    context_dim: int
    context_tokens: int
    pooled_dim: int | None
    latent_channels: int


SPECS = {
    "sd15": TinySpec("sd15", 64, 8, None, 4),
    "sd15_v": TinySpec("sd15_v", 64, 8, None, 4),
    "sdxl": TinySpec("sdxl", 64, 8, 32, 4),
    "flux": TinySpec("flux", 64, 8, 32, 16),
    "sd3": TinySpec("sd3", 4096, 8, 64, 16),
}


def _model_config(family: str):
    if family in ("sd15", "sd15_v"):
        cfg = comfy.supported_models.SD15(_sd15_config())
        if family == "sd15_v":
            # SD2-style v-prediction on the same network: ComfyUI switches the objective by model type.
            cfg.model_type = lambda state_dict, prefix="": comfy.model_base.ModelType.V_PREDICTION
        return cfg
    if family == "sdxl":
        return comfy.supported_models.SDXL(_sdxl_config())
    if family == "flux":
        return comfy.supported_models.Flux(_flux_config())
    if family == "sd3":
        return comfy.supported_models.SD3(_sd3_config())
    raise ValueError(f"unknown tiny model family {family!r}; expected one of {FAMILIES}")


def randomise_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights: fan-in scaled matrices, unit-ish norms, small biases.

    ComfyUI builds models with uninitialised weights (they are always loaded from files), so every
    parameter is written here.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:  # norm weights / scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        # Keep predictions at the scale of a trained model's (unit order), so sampled latents stay bounded.
        for name, p in module.named_parameters():
            if name.startswith(("out.", "final_layer.")):
                p.mul_(0.1)
        for b in module.buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()


def tiny_model(family: str = "sd15", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ModelPatcher around a tiny random-weight model of the given family (see :data:`FAMILIES`)."""
    import comfy.model_base  # noqa: F401  (model_type override above refers to it)

    config = _model_config(family)
    config.set_inference_dtype(dtype, None)
    device = torch.device("cpu")
    model = config.get_model({}, device=device)
    randomise_(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=offload)


def tiny_conds(family: str = "sd15", seed: int = 1, batch: int = 1) -> tuple[list, list]:
    """Positive and negative CONDITIONING lists shaped like the family's text encoders' outputs."""
    spec = SPECS[family]
    g = torch.Generator().manual_seed(seed)

    def one() -> list:
        extra: dict = {}
        if spec.pooled_dim is not None:
            extra["pooled_output"] = torch.randn(batch, spec.pooled_dim, generator=g)
        if family == "flux":
            extra["guidance"] = 3.5
        return [[torch.randn(batch, spec.context_tokens, spec.context_dim, generator=g), extra]]

    return one(), one()


def latent_channels(family: str) -> int:
    return SPECS[family].latent_channels


_CLIP_LAYOUT = {"intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 3}
# Text-encoder widths chosen so their outputs fit the tiny diffusion models' context / pooled inputs.
_TEXT_ENCODERS = {
    "sd15": {"clip_l_model_config": {**_CLIP_LAYOUT, "hidden_size": 64, "projection_dim": 64}},
    "sdxl": {"clip_l_model_config": {**_CLIP_LAYOUT, "hidden_size": 32, "projection_dim": 32},
             "clip_g_model_config": {**_CLIP_LAYOUT, "hidden_size": 32, "projection_dim": 32}},
    "flux": {"clip_l_model_config": {**_CLIP_LAYOUT, "hidden_size": 32, "projection_dim": 32},
             "t5xxl_model_config": {"d_model": 64, "d_ff": 128, "num_heads": 2, "num_layers": 2, "d_kv": 32}},
    # SD3 without T5 (a supported SD3 set-up): CLIP-L + CLIP-G, pooled 32 + 32 = the tiny MMDiT's adm width.
    "sd3": {"clip_l_model_config": {**_CLIP_LAYOUT, "hidden_size": 32, "projection_dim": 32},
            "clip_g_model_config": {**_CLIP_LAYOUT, "hidden_size": 32, "projection_dim": 32}},
}
TEXT_ENCODER_FAMILIES = tuple(_TEXT_ENCODERS)


def _clip_target(family: str):
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base
    import comfy.text_encoders.flux

    if family == "sd15":
        return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    if family == "sdxl":
        return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    if family == "flux":
        return comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                      comfy.text_encoders.flux.flux_clip(dtype_t5=torch.float32))
    if family == "sd3":
        import comfy.text_encoders.sd3_clip as sd3

        encoder = sd3.sd3_clip(clip_l=True, clip_g=True, t5=False)
        return comfy.supported_models_base.ClipTarget(sd3.SD3Tokenizer, encoder)
    raise ValueError(f"no tiny text encoder for {family!r}; expected one of {TEXT_ENCODER_FAMILIES}")


def tiny_clip(seed: int = 2, family: str = "sd15"):
    """The family's text encoder(s) with the real tokenizers and layouts, tiny widths and random weights."""
    import comfy.sd

    options = {**{k: dict(v) for k, v in _TEXT_ENCODERS[family].items()}, "dtype": torch.float32}
    clip = comfy.sd.CLIP(_clip_target(family), model_options=options)
    randomise_(clip.cond_stage_model, seed)
    return clip


def tiny_vae(seed: int = 3, latent_channels: int = 4):
    """An AutoencoderKL with SD's 8x down-sampling layout at width 32 and random weights."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": latent_channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"ddconfig": ddconfig, "embed_dim": latent_channels}}
    template = AutoencoderKL(ddconfig=ddconfig, embed_dim=latent_channels)
    randomise_(template, seed)
    vae = comfy.sd.VAE(sd=template.state_dict(), config=config, dtype=torch.float32)
    vae.latent_channels = latent_channels
    return vae
