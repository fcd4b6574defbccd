"""The proving ground's trained toy models: layouts, weight files, and loading into ComfyUI's own classes.

Two toys are trained by ``python -m preprint train-proving-ground`` on the scenes of :mod:`.scenes`:

* ``sd15``: an SD1.5-layout UNet (EPS, 4 levels, attention on the first three) with an SD-layout VAE
  (4 latent channels, 8x down) and the pack's tiny CLIP-L text encoder;
* ``flux``: a Flux-layout DiT (flow; double then single stream blocks; no guidance embedding, so CFG
  applies as on Flux-schnell) with a Flux/SD3-layout VAE (16 latent channels) and tiny CLIP-L + T5.

The text encoders are never trained: they are rebuilt from a fixed seed by
:func:`preprint.runner.tiny_models.tiny_clip`, and each weight file stores a fingerprint of their output
so a ComfyUI whose text-encoder classes changed is caught with a clear error instead of drawing nonsense.
Weights are stored as float16 safetensors and loaded with safetensors only.

This module imports ``comfy`` inside functions only; it runs inside ComfyUI (the loader node) or after
:func:`preprint.runner.comfy_host.import_comfy`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_ENV = "PREPRINT_PROVING_WEIGHTS"  # a folder of weight files to use instead (e.g. from --out DIR)
REBUILD_COMMAND = "python -m preprint train-proving-ground"
TEXT_SEED = 11
FINGERPRINT_CAPTION = "a red circle above a blue square on a white background"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ToySpec:
    arch: str
    model_file: str
    vae_file: str
    latent_channels: int
    text_family: str  # family of runner.tiny_models.tiny_clip


TOYS: dict[str, ToySpec] = {
    "sd15": ToySpec("sd15", "unet_sd15.safetensors", "vae_sd.safetensors", 4, "sd15"),
    "flux": ToySpec("flux", "dit_flux.safetensors", "vae_flux.safetensors", 16, "flux"),
}
ARCHITECTURES = tuple(TOYS)

# The SD toy's noise schedule.
# LOW_SIGMA_SAMPLING is SD1.5's scaled-linear betas ending at 0.0066 instead of 0.012 (sigma_max 5.06, sigma_min
# 0.029 as SD1.5): a latent of 16x16 tokens decides its colours and layout at sigma ~1-5, and SD1.5's top levels
# are so noisy for it that a small EPS network spends capacity there for nothing (a 300-step fine-tune on it raised
# one-object colour adherence from 0.45 to 0.62). Each weight file records the schedule it was trained on and the
# loader builds the model with that one (a file without the record was trained on SD1.5's own), as ComfyUI reads
# a checkpoint's ``sampling_settings``: every sampler and scheduler sees the toy's real sigmas.
LOW_SIGMA_SAMPLING = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.0066}
SD15_SAMPLING: dict = LOW_SIGMA_SAMPLING  # what the training command uses
SAMPLING_KEYS = frozenset({"beta_schedule", "linear_start", "linear_end", "timesteps", "zsnr"})


class ProvingWeightsError(RuntimeError):
    """A proving-ground weight file is missing, unreadable or does not match this ComfyUI."""


def unet_config() -> dict:
    """SD1.5 UNet block layout (4 levels of 2 res blocks, attention on the first three, one transformer per
    attention block) at width 32 and a 64-wide text context; heads of 32 channels."""
    return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "in_channels": 4, "use_temporal_attention": False, "use_temporal_resblock": False,
            "adm_in_channels": None, "model_channels": 32, "num_res_blocks": [2, 2, 2, 2],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 3, 3],
            "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 64,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}


def dit_config() -> dict:
    """Flux layout (double stream blocks, then single stream blocks over the joined sequence; 2x2 patches of
    16 latent channels) at hidden size 96, without the guidance embedding."""
    from ..runner.tiny_models import _flux_param_names

    config = {"image_model": "flux", "guidance_embed": False, "in_channels": 16, "patch_size": 2,
              "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64, "hidden_size": 96, "mlp_ratio": 4.0,
              "num_heads": 4, "depth": 2, "depth_single_blocks": 4, "axes_dim": [8, 8, 8], "theta": 10000,
              "qkv_bias": True}
    if "txt_ids_dims" in _flux_param_names():
        config["txt_ids_dims"] = []  # newer ComfyUI: [] is the Flux.1 text-position layout
    return config


def vae_ddconfig(latent_channels: int) -> dict:
    return {"double_z": True, "z_channels": latent_channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
            "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def model_config(arch: str, sampling_settings: dict | None = None):
    """ComfyUI's supported-model config object for a toy (its latent format, sampling and conditioning); the SD
    toy's noise schedule is ``sampling_settings`` (default: the one the training command uses)."""
    import comfy.supported_models

    if arch == "sd15":
        cfg = comfy.supported_models.SD15(unet_config())
        # SD1.5 forces 8 heads; the toy uses 32-channel heads (1, 2, 4, 4 heads by level).
        cfg.unet_config["num_heads"] = -1
        cfg.unet_config["num_head_channels"] = 32
        cfg.sampling_settings = dict(SD15_SAMPLING if sampling_settings is None else sampling_settings)
        return cfg
    if arch == "flux":
        return comfy.supported_models.Flux(dit_config())
    raise ValueError(f"unknown proving-ground architecture {arch!r}; expected one of {ARCHITECTURES}")


def build_model(arch: str, dtype: torch.dtype = torch.float32, sampling_settings: dict | None = None):
    """The toy's ComfyUI BaseModel (EPS UNet or flow DiT) with uninitialised weights, on the CPU."""
    cfg = model_config(arch, sampling_settings)
    cfg.set_inference_dtype(dtype, None)
    return cfg.get_model({}, device=torch.device("cpu"))


def build_vae_module(latent_channels: int):
    """ComfyUI's AutoencoderKL (the torch module) in the toy VAE layout, uninitialised."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(ddconfig=vae_ddconfig(latent_channels), embed_dim=latent_channels)


def comfy_vae(state_dict: dict, latent_channels: int):
    """A ``comfy.sd.VAE`` (what VAEDecode / VAEEncode take) from an AutoencoderKL state dict."""
    import comfy.sd

    config = {"params": {"ddconfig": vae_ddconfig(latent_channels), "embed_dim": latent_channels}}
    vae = comfy.sd.VAE(sd=state_dict, config=config, dtype=torch.float32)
    vae.latent_channels = latent_channels
    return vae


def text_encoder(arch: str):
    """The frozen tiny text encoder(s) a toy was trained with (real tokenizers, seeded random weights)."""
    from ..runner.tiny_models import tiny_clip

    return tiny_clip(TEXT_SEED, family=TOYS[arch].text_family)


def encode(clip, text: str) -> list:
    """CONDITIONING for ``text`` exactly as ComfyUI's CLIPTextEncode computes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def fingerprint(clip) -> list[float]:
    """A few numbers that change whenever the rebuilt text encoder's output changes."""
    cond = encode(clip, FINGERPRINT_CAPTION)[0]
    parts = [cond[0].flatten()]
    if cond[1].get("pooled_output") is not None:
        parts.append(cond[1]["pooled_output"].flatten())
    flat = torch.cat(parts).double()
    return [float(flat.mean()), float(flat.abs().mean()), float(flat[:: max(1, flat.numel() // 7)].sum())]


def weights_dir() -> Path:
    return Path(os.environ.get(WEIGHTS_ENV) or WEIGHTS_DIR)


def weight_path(name: str, folder: Path | None = None) -> Path:
    return Path(folder or weights_dir()) / name


def save_weights(path: Path, state_dict: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in state_dict.items()}
    meta = {"preprint": json.dumps({**metadata, "format": FORMAT_VERSION}, sort_keys=True)}
    save_file(tensors, str(path), metadata=meta)


def _rebuild_hint(arch: str | None) -> str:
    only = f" --only {arch}" if arch else ""
    return f"rebuild it with `{REBUILD_COMMAND}{only}` (or restore it with `git checkout -- {WEIGHTS_DIR.name}`)"


def load_weights(path: Path, arch: str | None = None) -> tuple[dict, dict]:
    """(float32 state dict, metadata) of a proving-ground weight file, or a :class:`ProvingWeightsError`
    naming the file and how to rebuild it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise ProvingWeightsError(f"proving-ground weight file {path} is missing; {_rebuild_hint(arch)}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("preprint")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ProvingWeightsError(f"proving-ground weight file {path} is unreadable ({e}); "
                                  f"{_rebuild_hint(arch)}") from e
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_VERSION:
        raise ProvingWeightsError(f"proving-ground weight file {path} has no Preprint metadata of format "
                                  f"{FORMAT_VERSION}; {_rebuild_hint(arch)}")
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, metadata


def _load_into(module: torch.nn.Module, state_dict: dict, path: Path, arch: str) -> None:
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ProvingWeightsError(
            f"proving-ground weight file {path} does not fit this ComfyUI's {arch} classes (missing "
            f"{len(missing)} tensors, e.g. {missing[:2]}; unexpected {len(unexpected)}, e.g. {unexpected[:2]}); "
            f"{_rebuild_hint(arch)}")


def check_fingerprint(clip, metadata: dict, path: Path, arch: str, tolerance: float = 1e-3) -> None:
    want = metadata.get("text_fingerprint")
    have = fingerprint(clip)
    if want is None or len(want) != len(have) or any(
            abs(a - b) > tolerance * max(1.0, abs(b)) for a, b in zip(have, want, strict=True)):
        raise ProvingWeightsError(
            f"{path} was trained on text-encoder outputs that this ComfyUI no longer reproduces (fingerprint "
            f"{[round(v, 5) for v in have]} != {want}): the CLIP / T5 classes changed; {_rebuild_hint(arch)}")


def trained_schedule(metadata: dict, path: Path, arch: str) -> dict:
    """The noise schedule (ComfyUI ``sampling_settings``) a weight file was trained on: its record, or SD1.5's own
    for a file written before the record existed."""
    settings = metadata.get("sampling_settings", {})
    if not isinstance(settings, dict) or not set(settings) <= SAMPLING_KEYS:
        raise ProvingWeightsError(f"{path} records a noise schedule this pack cannot build ({settings!r}; known keys "
                                  f"{sorted(SAMPLING_KEYS)}); {_rebuild_hint(arch)}")
    return settings


def load_toy(arch: str, folder: Path | None = None):
    """(MODEL as a ModelPatcher, CLIP, VAE) of a trained proving-ground toy."""
    import comfy.model_management
    import comfy.model_patcher

    if arch not in TOYS:
        raise ValueError(f"unknown proving-ground architecture {arch!r}; expected one of {ARCHITECTURES}")
    spec = TOYS[arch]
    model_path, vae_path = weight_path(spec.model_file, folder), weight_path(spec.vae_file, folder)
    sd, meta = load_weights(model_path, arch)
    vae_sd, _ = load_weights(vae_path, arch)
    model = build_model(arch, sampling_settings=trained_schedule(meta, model_path, arch))
    _load_into(model.diffusion_model, sd, model_path, arch)
    clip = text_encoder(arch)
    check_fingerprint(clip, meta, model_path, arch)
    try:  # comfy.sd.VAE only logs missing keys: check the file against the layout first
        _load_into(build_vae_module(spec.latent_channels), vae_sd, vae_path, arch)
    except RuntimeError as e:  # size mismatch
        if isinstance(e, ProvingWeightsError):
            raise
        raise ProvingWeightsError(f"{vae_path} does not fit the toy VAE layout ({e}); {_rebuild_hint(arch)}") from e
    vae = comfy_vae(vae_sd, spec.latent_channels)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, clip, vae


def generate(model, clip, vae, texts: list[str], *, seeds=(0,), steps: int = 20, cfg: float = 5.0,
             sampler: str = "dpmpp_2m", scheduler: str = "karras", width: int = 128, height: int = 128,
             negative: str = "") -> torch.Tensor:
    """Sample every text with every seed through ComfyUI's own sampler (as KSampler does) and decode:
    images ``[len(texts) * len(seeds), 3, H, W]`` in ``[0, 1]``, text-major."""
    with torch.no_grad():  # as ComfyUI's executor runs nodes: no autograd graph through the model
        return _generate(model, clip, vae, texts, seeds, steps, cfg, sampler, scheduler, width, height, negative)


def _generate(model, clip, vae, texts, seeds, steps, cfg, sampler, scheduler, width, height, negative):
    import comfy.sample

    from .scenes import from_comfy_image

    neg = encode(clip, negative)
    out = []
    for text in texts:
        pos = encode(clip, text)
        for seed in seeds:
            latent = torch.zeros(1, vae.latent_channels, height // 8, width // 8)
            noise = comfy.sample.prepare_noise(latent, seed)
            samples = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent,
                                          seed=seed, disable_pbar=True)
            out.append(from_comfy_image(vae.decode(samples)))
    return torch.cat(out).clamp(0, 1)
