"""Frequency-band guidance for the high-resolution pass of a two-stage upscale: DiffuseHigh's wavelet structure
guidance and FAM's Fourier frequency modulation (multi-resolution family).

- DiffuseHigh: Kim et al., "DiffuseHigh: Training-free Progressive High-Resolution Image Synthesis through
  Structure Guidance", arXiv:2406.18459.
- FAM: Yang et al., "FAM Diffusion: Frequency and Attention Modulation for High-Resolution Image Generation with
  Stable Diffusion", arXiv:2411.18552 (frequency modulation only; attention modulation is not built).

Host glue only; the maths is ``highres/frequency.py``. Both nodes keep per-run state (the guide in the sampler's
latent space, the run's sigmas and noise) made by an OUTER_SAMPLE wrapper and put into that run's cloned
``transformer_options``. DiffuseHigh acts on the guided x0 prediction as a post-CFG function (a list hook, so it
stacks with other post-CFG functions and runs after CFG, where the official code replaces the low band). FAM acts
on the denoiser's input through a keyed APPLY_MODEL wrapper: the paper modulates the noisy latent z_t that is
denoised (Eq. 3-4), not the prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.patcher_extension
import torch
from comfy_api.latest import io

from ..highres.frequency import (
    WAVELETS,
    dwt2,
    fam_cutoffs,
    frequency_modulate,
    match_guide,
    replace_low_band,
    sigma_at_fraction,
)
from ._host import RunState, install_hooks
from ._inputs import PreprintNode, advanced

log = logging.getLogger("preprint.highres")

CATEGORY = "Preprint/multi-resolution"
WMP = comfy.patcher_extension.WrappersMP
DIFFUSEHIGH_KEY = "preprint_diffusehigh"
FAM_KEY = "preprint_fam_frequency"
DIFFUSEHIGH_NODE = "DiffuseHigh Guidance (Preprint)"
FAM_NODE = "FAM Frequency Modulation (Preprint)"


class _PerRun:
    """OUTER_SAMPLE wrapper that hands the run's noise to ``make(guider, sigmas, seed, noise)`` as well, through
    the shared :class:`RunState` (the noise fixes FAM's forward-diffused latent and every run's latent shape)."""

    def __init__(self, key: str, make: Callable):
        self.key, self.make = key, make

    def __call__(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        state = RunState(self.key, lambda guider, s, seed: self.make(guider, s, seed, noise))
        return state(executor, noise, latent_image, sampler, sigmas, *args, **kwargs)


def _samples(latent: dict, node: str, name: str) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"{node}: {name} must be an image LATENT [batch, channels, height, width], got {shape}; "
                         "video and audio latents are not served.")
    if not torch.isfinite(samples).all():
        raise ValueError(f"{node}: {name} holds NaN or infinite values; re-encode the image it came from.")
    return samples


def _in_sampler_space(base_model, samples: torch.Tensor) -> torch.Tensor:
    # The sampler works on process_latent_in(latent) (SD1.5's 0.18215 scale, Flux's shift and scale); an all-zero
    # latent is left as it is, as ComfyUI does for the latent it samples.
    if torch.count_nonzero(samples) == 0:
        return samples.float()
    return base_model.process_latent_in(samples.float())


def _matched(node: str, name: str, samples: torch.Tensor, base_model, noise: torch.Tensor) -> torch.Tensor:
    try:
        guide, resized = match_guide(_in_sampler_space(base_model, samples), noise.float())
    except ValueError as e:
        raise ValueError(f"{node}: {e}") from None
    if resized:
        log.warning("%s: %s is %dx%d latent pixels and the sampled latent %dx%d; resized bicubic to match "
                    "(connect the latent of the upscaled image to skip this)", node, name, samples.shape[-1],
                    samples.shape[-2], noise.shape[-1], noise.shape[-2])
    return guide


class _DiffuseHighRun:
    """One sampling run: the sigma below which guidance stops and the guide's low band, computed once."""

    def __init__(self, sigmas: torch.Tensor, fraction: float, wavelet: str, guide: torch.Tensor):
        self.threshold = sigma_at_fraction(sigmas.float().cpu(), fraction)
        self.wavelet = wavelet
        self.guide = guide
        self.guide_ll: torch.Tensor | None = None

    def apply(self, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not float(sigma.max()) > self.threshold:
            return denoised
        if denoised.shape[0] != self.guide.shape[0]:
            raise ValueError(f"{DIFFUSEHIGH_NODE}: the prediction holds {denoised.shape[0]} images but the run "
                             f"{self.guide.shape[0]}; a guider that splits the batch is not served.")
        if self.guide_ll is None or self.guide_ll.device != denoised.device:
            self.guide_ll = dwt2(self.guide.to(denoised.device), self.wavelet).ll
        return replace_low_band(denoised, self.guide_ll, self.wavelet)


def _diffusehigh_post_cfg(args: dict) -> torch.Tensor:
    run = args["model_options"].get("transformer_options", {}).get(DIFFUSEHIGH_KEY)
    if run is None:
        raise RuntimeError(f"{DIFFUSEHIGH_NODE}: sampling started without the node's per-run set-up; sample "
                           "through KSampler, KSamplerAdvanced or SamplerCustom(Advanced).")
    return run.apply(args["denoised"], args["sigma"])


class PreprintDiffuseHigh(PreprintNode):
    NAME = DIFFUSEHIGH_NODE
    ALIASES = ("DiffuseHigh", "structure guidance", "wavelet", "DWT", "high resolution", "upscale")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintDiffuseHigh",
            category=CATEGORY,
            description=(
                "DiffuseHigh structure guidance (Kim et al., arXiv:2406.18459) for the high-resolution pass of a "
                "two-stage upscale, on any image model (SD1.x, SDXL, Flux, SD3): during the first part of the run "
                "the low band (LL) of a one-level wavelet transform of the guided x0 prediction is replaced by the "
                "guide's, so the result keeps the upscaled image's structure while the model adds detail. Connect "
                "as guide the upscaled, sharpened and re-encoded first-stage image and sample it re-noised "
                "(official: the last 15 of 50 steps, guidance on the first 5 of those). The transform runs on the "
                "latent (no VAE round trip per step; the official code decodes, transforms the pixels and "
                "re-encodes). The window is read from each call's noise level, so any sampler works."),
            inputs=[
                io.Model.Input("model", tooltip="Any image model (UNet or DiT). It is cloned, never changed."),
                io.Latent.Input("guide", tooltip="The structure guide: the first-stage image upscaled (bicubic), "
                                                 "sharpened and encoded with this model's VAE. Another size is "
                                                 "resized bicubic to the sampled latent, with a warning."),
                io.Float.Input("guidance_fraction", default=0.333, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of this run's steps, from its start, during which the low band "
                                       "is replaced (official: the first 5 of 15 steps = 0.333). Keyed by noise "
                                       "level: steps whose sigma lies above the level the schedule reaches after "
                                       "this fraction. 0 turns guidance off."),
                advanced(io.Combo.Input("wavelet", options=list(WAVELETS), default="db4",
                                        tooltip="Wavelet of the one-level transform: db4 (official) or haar.")),
            ],
            outputs=[io.Model.Output(tooltip="The model with DiffuseHigh structure guidance.")],
        )

    @classmethod
    def validate_inputs(cls, guidance_fraction=None, wavelet=None) -> bool | str:
        return cls.check_widgets(guidance_fraction=guidance_fraction, wavelet=wavelet)

    @classmethod
    def execute(cls, model, guide: dict, guidance_fraction: float, wavelet: str = "db4") -> io.NodeOutput:
        if not 0.0 <= guidance_fraction <= 1.0:
            raise cls.error(f"guidance_fraction = {guidance_fraction} must lie in [0, 1].")
        if wavelet not in WAVELETS:
            raise cls.error(f"unknown wavelet {wavelet!r}; use one of {', '.join(WAVELETS)}.")
        samples = _samples(guide, cls.NAME, "guide")
        m = model.clone()
        if guidance_fraction == 0.0:
            return io.NodeOutput(m)

        def make(guider, sigmas, seed, noise):
            base = guider.model_patcher.model
            return _DiffuseHighRun(sigmas, guidance_fraction, wavelet, _matched(cls.NAME, "guide", samples, base,
                                                                                 noise))

        install_hooks(m, DIFFUSEHIGH_KEY, {WMP.OUTER_SAMPLE: _PerRun(DIFFUSEHIGH_KEY, make)},
                      post_cfg=_diffusehigh_post_cfg)
        return io.NodeOutput(m)


class _FamRun:
    """One sampling run: the upsampled native latent in sampler space and the noise that diffuses it."""

    def __init__(self, up: torch.Tensor, noise: torch.Tensor, seed: int, c: float):
        if torch.count_nonzero(noise) == 0:  # 'add noise' off: diffuse with noise of our own, from the run's seed
            g = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
            noise = torch.randn(noise.shape, generator=g, dtype=torch.float32)
        self.up, self.noise, self.c = up, noise.float(), c
        self.warned = False

    def modulate(self, model_sampling, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = self.up.shape[0]
        if x.shape[1:] != self.up.shape[1:] or x.shape[0] % b:
            if not self.warned:  # area conditioning crops the input: a crop has no spectrum of the whole
                log.warning("%s: a model call on a %s input, not the sampled latent %s (area conditioning?); "
                            "that call is left unmodulated", FAM_NODE, tuple(x.shape), tuple(self.up.shape))
                self.warned = True
            return x
        sigma = sigma.reshape(-1).float()
        t_max = model_sampling.timestep(model_sampling.sigma_max.reshape(1).float()).float()
        rho = (model_sampling.timestep(sigma).float() / t_max).clamp(0.0, 1.0).cpu()
        tau_h, _ = fam_cutoffs(x.shape[-2], x.shape[-1], float(rho.min()), self.c)
        if tau_h <= 0.0:  # t = T: K passes everything, and skipping the transform keeps x bitwise
            return x
        reps = x.shape[0] // b
        up = self.up.to(x.device).repeat(reps, 1, 1, 1)
        noise = self.noise.to(x.device).repeat(reps, 1, 1, 1)
        diffused = model_sampling.noise_scaling(sigma.to(x.device), noise, up, max_denoise=False)
        return frequency_modulate(x, diffused.to(x.dtype), rho, self.c)


def _fam_apply_model(executor, x, t, *args, **kwargs):
    # apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs): ComfyUI passes them in order
    options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
    run = options.get(FAM_KEY) if isinstance(options, dict) else None
    if run is not None:
        x = run.modulate(executor.class_obj.model_sampling, x, t)
    return executor(x, t, *args, **kwargs)


class PreprintFAMFrequency(PreprintNode):
    NAME = FAM_NODE
    ALIASES = ("FAM", "frequency modulation", "FFT", "high resolution", "upscale", "skip residual")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintFAMFrequency",
            category=CATEGORY,
            description=(
                "FAM frequency modulation (Yang et al., FAM Diffusion, arXiv:2411.18552, Eq. 4 and appendix B.1) "
                "for the high-resolution pass of a diffuse-denoise upscale, on any image model (SD1.x, SDXL, Flux, "
                "SD3): before every model call the noisy latent's low frequencies are blended with those of the "
                "upsampled native-resolution latent diffused to the same noise level (with the run's own noise), "
                "through a time-varying high-pass K: rho = t/T inside a centred box of h*c*(1 - rho) by "
                "w*c*(1 - rho) frequencies, 1 outside, so the native image's structure steers more and more of "
                "the spectrum as the run ends, and the high frequencies stay the model's. t/T comes from the "
                "model's own timestep map, so EPS, V and flow models and any sampler work. FAM's attention "
                "modulation is not part of this node."),
            inputs=[
                io.Model.Input("model", tooltip="Any image model (UNet or DiT). It is cloned, never changed."),
                io.Latent.Input("native_latent",
                                tooltip="The native-resolution result, upsampled to the target size (Upscale "
                                        "Latent By, or an upscaled image encoded with this model's VAE); usually "
                                        "also the latent the high-resolution pass starts from. Another size is "
                                        "resized bicubic to the sampled latent, with a warning."),
                io.Float.Input("c", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Cut-off scale (paper: 0.5): at the end of the run the box spans c times "
                                       "the latent's height and width, i.e. frequencies below c/2 of the "
                                       "sampling rate; 0.5 covers the whole band of a 2x-upsampled image. 0 turns "
                                       "modulation off."),
            ],
            outputs=[io.Model.Output(tooltip="The model with FAM frequency modulation.")],
        )

    @classmethod
    def validate_inputs(cls, c=None) -> bool | str:
        return cls.check_widgets(c=c)

    @classmethod
    def execute(cls, model, native_latent: dict, c: float) -> io.NodeOutput:
        if not 0.0 <= c <= 1.0:
            raise cls.error(f"c = {c} must lie in [0, 1].")
        samples = _samples(native_latent, cls.NAME, "native_latent")
        m = model.clone()
        if c == 0.0:
            return io.NodeOutput(m)

        def make(guider, sigmas, seed, noise):
            up = _matched(cls.NAME, "native_latent", samples, guider.model_patcher.model, noise)
            return _FamRun(up, noise, seed, c)

        install_hooks(m, FAM_KEY, {WMP.OUTER_SAMPLE: _PerRun(FAM_KEY, make), WMP.APPLY_MODEL: _fam_apply_model})
        return io.NodeOutput(m)


NODES = [PreprintDiffuseHigh, PreprintFAMFrequency]
