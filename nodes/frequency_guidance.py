"""Frequency-band guidance for the high-resolution pass of a two-stage upscale: DiffuseHigh's wavelet structure
guidance and FAM's Fourier frequency modulation (multi-resolution family).

- DiffuseHigh: Kim et al., "DiffuseHigh: Training-free Progressive High-Resolution Image Synthesis through
  Structure Guidance", arXiv:2406.18459.
- FAM: Yang et al., "FAM Diffusion: Frequency and Attention Modulation for High-Resolution Image Generation with
  Stable Diffusion", arXiv:2411.18552: frequency modulation (FM) and attention modulation (AM), two nodes.

Host glue only; the maths is ``highres/frequency.py`` and ``highres/fam_attention.py``. The nodes keep per-run
state (the guide in the sampler's latent space, the run's sigmas and noise) made by an OUTER_SAMPLE wrapper and put
into that run's cloned ``transformer_options``. DiffuseHigh acts on the guided x0 prediction as a post-CFG function
(a list hook, so it stacks with other post-CFG functions and runs after CFG, where the official code replaces the
low band). FAM's FM acts on the denoiser's input through a keyed APPLY_MODEL wrapper: the paper modulates the noisy
latent z_t that is denoised (Eq. 3-4), not the prediction. FAM's AM is a separate node because it needs the native
result at its own size (FM takes it upsampled): its APPLY_MODEL wrapper runs the model once more per call on the
native latent re-noised to the call's sigma, recording queries and keys at the chosen layers (``attn1``
replacements), then runs the high-resolution call, whose layers blend the native maps in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.patcher_extension
import torch
import torch.nn.functional as F
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel, Upsample
from comfy_api.latest import io

from ..guidance.pag_layers import LayerSpecError, check_syntax, parse_and_resolve
from ..highres.fam_attention import CALL_KEY, AttentionModulation, Call
from ..highres.frequency import (
    WAVELETS,
    dwt2,
    fam_cutoffs,
    frequency_modulate,
    match_guide,
    replace_low_band,
    sigma_at_fraction,
)
from ..utils.sigma_window import SigmaWindow
from ._host import RunState, attention, install_hooks
from ._inputs import PreprintNode, advanced, percent_window_inputs
from .pag import attention_layout

log = logging.getLogger("preprint.highres")

CATEGORY = "Preprint/multi-resolution"
WMP = comfy.patcher_extension.WrappersMP
DIFFUSEHIGH_KEY = "preprint_diffusehigh"
FAM_KEY = "preprint_fam_frequency"
AM_KEY = "preprint_fam_attention"
NATIVE_PASS = "preprint_fam_native_pass"  # transformer_options flag of the attention modulation's native-size call
DIFFUSEHIGH_NODE = "DiffuseHigh Guidance (Preprint)"
FAM_NODE = "FAM Frequency Modulation (Preprint)"
AM_NODE = "FAM Attention Modulation (Preprint)"


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
        # a float: model_sampling's buffers stay on the CPU after a partial load while sigma is on the GPU
        t_max = float(model_sampling.timestep(model_sampling.sigma_max.reshape(1).float()).reshape(-1)[0])
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
    if run is not None and not options.get(NATIVE_PASS):  # the native-size pass of attention modulation: not FM's
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
                "modulation is the separate FAM Attention Modulation node (UNets), chained after this one."),
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


class _AttentionRun:
    """One sampling run of attention modulation: the native latent in sampler space, one per image, and the noise
    that re-noises it to each call's sigma (drawn once per run from the run's seed, at the native size)."""

    def __init__(self, native: torch.Tensor, noise: torch.Tensor, seed: int):
        b, c, big_h, big_w = noise.shape
        if native.shape[1] != c:
            raise ValueError(f"{AM_NODE}: native_latent has {native.shape[1]} channels and the sampled latent {c}: it "
                             "was encoded by another model family's VAE; connect this model's first-stage latent.")
        if native.shape[0] not in (1, b):
            raise ValueError(f"{AM_NODE}: native_latent holds {native.shape[0]} images and the sampled latent {b}: "
                             "give one native latent for all, or one per image.")
        h, w = native.shape[-2:]
        if h > big_h or w > big_w or (h, w) == (big_h, big_w):
            raise ValueError(
                f"{AM_NODE}: native_latent is {w * 8}x{h * 8} px and the sampled latent {big_w * 8}x{big_h * 8} px; "
                "attention modulation blends in the maps of the native-resolution pass, so native_latent must be the "
                "native-size result, smaller than the image being sampled (no larger on either side). Connect the "
                "first stage's latent before it is upscaled (the upscaled one goes to FAM Frequency Modulation).")
        if abs(h / w - big_h / big_w) > 0.1 * big_h / big_w:
            log.warning("%s: native_latent (%dx%d) and the sampled latent (%dx%d) differ in aspect ratio; the native "
                        "maps are stretched to fit", AM_NODE, w, h, big_w, big_h)
        g = torch.Generator(device="cpu").manual_seed((int(seed) ^ 0x46414D) & 0xFFFFFFFFFFFFFFFF)
        self.noise = torch.randn((b, c, h, w), generator=g, dtype=torch.float32)
        self.native = native.float().expand(b, -1, -1, -1)
        self.size, self.batch = (big_h, big_w), b
        self.warned = False

    def latent(self, model_sampling, sigma: torch.Tensor, rows: int, like: torch.Tensor) -> torch.Tensor:
        """The native latent diffused to ``sigma`` (one per row), rows laid out as the call's (cond / uncond chunks
        of the whole batch each)."""
        reps = rows // self.batch
        native = self.native.to(like.device).repeat(reps, 1, 1, 1)
        noise = self.noise.to(like.device).repeat(reps, 1, 1, 1)
        return model_sampling.noise_scaling(sigma.reshape(-1).float(), noise, native).to(like.dtype)


class _AttentionApply:
    """APPLY_MODEL wrapper: inside the window, the native pass (capture) and then the high-resolution call (blend)."""

    def __init__(self, weight: float, window: SigmaWindow):
        self.weight, self.window = weight, window

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        to = transformer_options if isinstance(transformer_options, dict) else {}
        run = to.get(AM_KEY)
        if run is None or to.get(NATIVE_PASS) or x.ndim != 4 or float(t.max()) not in self.window:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if tuple(x.shape[-2:]) != run.size:
            if not run.warned:  # area conditioning (or tiles) crop the input: a crop has no native counterpart
                log.warning("%s: a model call on a %s input, not the sampled latent's %s (area conditioning or "
                            "tiles?); that call is left unmodulated", AM_NODE, tuple(x.shape[-2:]), run.size)
                run.warned = True
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if x.shape[0] % run.batch:
            raise ValueError(f"{AM_NODE}: a model call with {x.shape[0]} rows in a run of {run.batch} images; a "
                             "guider that splits the images of a batch across calls is not served.")
        native = run.latent(executor.class_obj.model_sampling, t, x.shape[0], x)
        small = _Shrink(tuple(x.shape[-2:]), tuple(native.shape[-2:]))
        capture = Call("capture")
        # ControlNet residuals are the large image's features: the native pass runs without them
        executor(native, t, small(c_concat), c_crossattn, None, {**to, NATIVE_PASS: True, CALL_KEY: capture},
                 **{k: small(v) for k, v in kwargs.items()})
        blend = Call("blend", self.weight, capture.store)
        return executor(x, t, c_concat, c_crossattn, control, {**to, CALL_KEY: blend}, **kwargs)


class _Shrink:
    """A tensor of the large latent's height and width (inpainting models' ``c_concat``) resized to the native
    latent's (area average); anything else unchanged."""

    def __init__(self, large: tuple[int, int], native: tuple[int, int]):
        self.large, self.native = large, native

    def __call__(self, v):
        if isinstance(v, torch.Tensor) and v.ndim == 4 and tuple(v.shape[-2:]) == self.large:
            return F.interpolate(v.float(), size=self.native, mode="area").to(v.dtype)
        return v


def default_attention_layers(dm) -> str:
    """The output blocks of the first (lowest-resolution) up level with self-attention, from the first such block to
    the one that up-samples: SD1.x / SD2.x ``output:3-5``; SDXL ``output:0-2`` (diffusers' up block 0, the paper's
    choice)."""
    first = None
    for i, block in enumerate(dm.output_blocks):
        mods = list(block.modules())
        if first is None and any(isinstance(m, SpatialTransformer) for m in mods):
            first = i
        if first is not None and (any(isinstance(m, Upsample) for m in mods) or i == len(dm.output_blocks) - 1):
            return f"output:{first}" if i == first else f"output:{first}-{i}"
    raise ValueError(f"{AM_NODE}: this UNet has no self-attention in its up blocks; name the layers to modulate.")


def _check_layers(layers: str) -> None:
    check_syntax(layers)
    if "[" in layers:
        raise LayerSpecError(f"{layers!r} selects heads; attention modulation blends whole layers, so write the "
                             "layers without [heads].")


class PreprintFAMAttention(PreprintNode):
    NAME = AM_NODE
    ALIASES = ("FAM", "attention modulation", "high resolution", "upscale", "texture consistency")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintFAMAttention",
            category=CATEGORY,
            description=(
                "FAM attention modulation (Yang et al., FAM Diffusion, arXiv:2411.18552) for the high-resolution "
                "pass of a diffuse-denoise upscale, on UNets (SD1.x, SD2.x, SDXL): at the chosen self-attention "
                "layers the high-resolution attention map A_hr becomes weight * Up(A_native) + (1 - weight) * A_hr, "
                "with A_native the same layer's map when the model denoises the native-size result, re-noised to "
                "the same step, so local textures follow the native image. Every model call in the window runs the "
                "model once more on the native latent (cost about 1/scale^2 of a call; ControlNet not applied "
                "there); Up resizes the map on both its query and key axes (bilinear, each native key's weight "
                "shared over the keys it covers, rows still summing to 1), computed without building any full map. "
                "Chain it with FAM Frequency Modulation (which takes the upsampled latent) for the whole method."),
            inputs=[
                io.Model.Input("model", tooltip="A UNet model: SD1.x, SD2.x or SDXL. It is cloned, never changed."),
                io.Latent.Input("native_latent",
                                tooltip="The native-resolution result at its own size (the first stage's latent, "
                                        "before upscaling), encoded by this model's VAE; one for all images or one "
                                        "per image. It must be smaller than the sampled latent."),
                io.Float.Input("weight", default=0.7, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of the native map in the blend (the paper's 0.7). 0 turns modulation "
                                       "off; 1 uses the native map alone."),
                io.String.Input("layers", default="",
                                tooltip="Self-attention layers to modulate, in the layer-list syntax of the PAG "
                                        "nodes (e.g. 'output:3-5', 'output:0.0-4'). Empty: the up level with "
                                        "attention at the lowest resolution, output:3-5 on SD1.x, output:0-2 (all "
                                        "30 transformers of up block 0, the paper's choice) on SDXL."),
                *percent_window_inputs("Fraction of the run at which modulation starts (0 = first step).",
                                       "Fraction of the run at which modulation ends (1 = last step). Equal to the "
                                       "start: off."),
            ],
            outputs=[io.Model.Output(tooltip="The model with FAM attention modulation.")],
        )

    @classmethod
    def validate_inputs(cls, weight=None, layers=None, start_percent=None, end_percent=None) -> bool | str:
        return cls.check_widgets(weight=weight, layers=layers, start_percent=start_percent, end_percent=end_percent)

    @classmethod
    def check_values(cls, layers=None, **_) -> None:
        if layers:
            _check_layers(layers)

    @classmethod
    def execute(cls, model, native_latent: dict, weight: float, layers: str = "", start_percent: float = 0.0,
                end_percent: float = 1.0) -> io.NodeOutput:
        if not 0.0 <= weight <= 1.0:
            raise cls.error(f"weight = {weight} must lie in [0, 1].")
        dm = model.get_model_object("diffusion_model")
        if not isinstance(dm, UNetModel):
            raise cls.error(
                f"this model's diffusion network is a {type(dm).__name__}, not a UNet. Attention modulation blends "
                "a UNet's self-attention maps across two resolutions; a DiT's joint text-image attention with "
                "size-dependent positions has no such map to carry over, so Flux, SD3 and kin are not served. Use "
                "FAM Frequency Modulation (Preprint) alone on them.")
        samples = _samples(native_latent, cls.NAME, "native_latent")
        try:
            spec = layers.strip() or default_attention_layers(dm)
            _check_layers(spec)
            selected = parse_and_resolve(spec, attention_layout(model, cls.NAME)[0])
            window = SigmaWindow.from_percents(model.get_model_object("model_sampling").percent_to_sigma,
                                               start_percent, end_percent)
        except ValueError as e:
            raise cls.error(str(e).removeprefix(f"{cls.NAME}: ")) from None
        m = model.clone()
        if weight == 0.0 or start_percent == end_percent:
            return io.NodeOutput(m)

        def make(guider, sigmas, seed, noise):
            return _AttentionRun(_in_sampler_space(guider.model_patcher.model, samples), noise, seed)

        install_hooks(m, AM_KEY, {WMP.OUTER_SAMPLE: _PerRun(AM_KEY, make),
                                  WMP.APPLY_MODEL: _AttentionApply(weight, window)})
        replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
        for key in selected:
            previous = replaces.get(key, replaces.get(key[:2]))
            m.set_model_attn1_replace(AttentionModulation(attention, key, previous, cls.NAME), *key)
        return io.NodeOutput(m)


NODES = [PreprintDiffuseHigh, PreprintFAMFrequency, PreprintFAMAttention]
