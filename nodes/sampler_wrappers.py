"""Sampler wrappers: nodes that take any SAMPLER and return a SAMPLER.

Time-Shift (Li et al., "Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time Steps",
arXiv:2305.15583), Omegance (Hong et al., "Omegance: A Single Parameter for Various Granularities in
Diffusion-Based Synthesis", arXiv:2411.17769) and AdaptiveDiffusion (Ye et al., "Training-Free Adaptive
Diffusion with Bounded Difference Approximation Strategy", arXiv:2410.09873).

Each wrapper replaces the denoiser the sampler function receives by a proxy (see ``samplers/wrapping.py``),
so it works with every k-diffusion-signature sampler, core or Preprint, and wrappers stack: a wrapped
SAMPLER can be wrapped again. Nothing is patched on the model, and all state lives in the proxy of one run.
"""

from __future__ import annotations

import math

import comfy.samplers
import torch
from comfy_api.latest import io

from ..samplers.adaptive_diffusion import AdaptiveConfig, AdaptiveDiffusionSampler
from ..samplers.omegance import SCHEDULES, OmeganceConfig, omegance_sampler
from ..samplers.time_shift import TimeAxis, TimeShiftConfig, tabulated_inverse, time_shift_sampler
from ._host import model_sampling_of, parameterisation_of
from ._inputs import PreprintNode

CATEGORY = "Preprint/samplers"
TIME_SHIFT_NAME = "Time-Shift Sampler (Preprint)"
OMEGANCE_NAME = "Omegance Sampler (Preprint)"
ADAPTIVE_NAME = "AdaptiveDiffusion Step Skipping (Preprint)"

SAMPLER_TIP = "The sampler to wrap: any SAMPLER (KSamplerSelect, a Preprint sampler, or another wrapper)."
OUT_TIP = "The wrapped SAMPLER, for SamplerCustom / SamplerCustomAdvanced."


def inner_ksampler(sampler, node: str) -> comfy.samplers.KSAMPLER:
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        raise TypeError(
            f"{node}: the connected SAMPLER ({type(sampler).__name__}) is not a k-diffusion sampler, so its model "
            "calls cannot be wrapped. Connect KSamplerSelect, a Preprint sampler node or another sampler wrapper."
        )
    return sampler


def rewrap(sampler: comfy.samplers.KSAMPLER, fn) -> comfy.samplers.KSAMPLER:
    return comfy.samplers.KSAMPLER(fn, extra_options=dict(sampler.extra_options),
                                   inpaint_options=dict(sampler.inpaint_options))


def sigma_inverts_timestep(model_sampling) -> bool:
    """Whether ``model_sampling.sigma`` undoes ``model_sampling.timestep`` on the model's own sigma table.

    True for the discrete and EDM samplings; false for the shifted flow samplings (SD3, Flux), whose
    ``timestep(sigma)`` is ``sigma`` (times a multiplier) while ``sigma(t)`` applies the shift.
    """
    table = getattr(model_sampling, "sigmas", None)
    if table is None:  # a sampling without a sigma table: probe its range log-uniformly
        lo, hi = math.log(float(model_sampling.sigma_min)), math.log(float(model_sampling.sigma_max))
        table = torch.linspace(lo, hi, 257).exp()
    table = table.detach().float().reshape(-1)
    back = model_sampling.sigma(model_sampling.timestep(table)).float().to(table.device)
    return bool(((back - table).abs() <= 1e-4 * table.abs() + 1e-7).all())


def time_axis_of(model_sampling) -> TimeAxis:
    """ComfyUI's training-time axis, normalised so ``t(sigma_max) = 1``.

    ``t`` is what the network is fed (``model_sampling.timestep``); its inverse is ``model_sampling.sigma`` only
    where that is one, else a table of ``timestep`` is inverted, so a candidate's sigma is fed as its ``t``.
    """
    top = float(model_sampling.timestep(torch.tensor([float(model_sampling.sigma_max)])).float().reshape(-1)[0])
    if not top > 0:
        raise ValueError(f"{TIME_SHIFT_NAME}: the model's timestep at sigma_max is not positive; unsupported "
                         "model type.")

    def t_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
        # ModelSamplingDiscrete.timestep only takes 1-D input
        t = model_sampling.timestep(sigma.float().reshape(-1)).reshape(sigma.shape)
        return t.to(device=sigma.device, dtype=torch.float64) / top

    if not sigma_inverts_timestep(model_sampling):
        inverse = tabulated_inverse(t_of_sigma, float(model_sampling.sigma_min), float(model_sampling.sigma_max))
        return TimeAxis(t_of_sigma, inverse)

    def sigma_of_t(t: torch.Tensor) -> torch.Tensor:
        return model_sampling.sigma((t * top).float()).to(device=t.device, dtype=torch.float64)

    return TimeAxis(t_of_sigma, sigma_of_t)


def axis_and_kind(model_k):
    ms = model_sampling_of(model_k)
    return time_axis_of(ms), parameterisation_of(ms)


def kind_of(model_k):
    return parameterisation_of(model_sampling_of(model_k))


class PreprintTimeShiftSampler(PreprintNode):
    NAME = TIME_SHIFT_NAME
    ALIASES = ("time shift", "exposure bias")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintTimeShiftSampler",
            category=CATEGORY,
            description=(
                "Time-Shift sampling (Li et al., 'Alleviating Exposure Bias in Diffusion Models through Sampling "
                "with Shifted Time Steps', arXiv:2305.15583). Before each model call, picks the timestep near the "
                "current one whose noise level best matches the variance of the current latent and feeds that to "
                "the network only; the sampler keeps its own step sizes. Reduces exposure bias in few-step "
                "sampling. Wraps any sampler; window 0 gives the plain sampler."
            ),
            inputs=[
                io.Sampler.Input("sampler", tooltip=SAMPLER_TIP),
                io.Float.Input("window", default=30.0, min=0.0, max=200.0, step=1.0,
                               tooltip="Width of the search window in training timesteps (of 1000), centred on the "
                                       "current step. The paper uses 30 to 60 for DPM-Solver and DDIM; 0 disables."),
                io.Float.Input("cutoff", default=300.0, min=0.0, max=1000.0, step=10.0,
                               tooltip="No shift at or below this training timestep (of 1000): the last, "
                                       "low-noise steps run unchanged. The paper uses 200 to 400."),
                io.Float.Input("data_variance", default=0.0, min=0.0, max=4.0, step=0.05,
                               tooltip="Per-sample variance of clean samples assumed in the variance match. 0 is "
                                       "the paper's rule, made for pixel data in [-1, 1]; on latents whose "
                                       "variance is near 1 (SD, SDXL, Flux) it moves every call to the noisiest "
                                       "timestep of the window. At 1 nothing shifts (every timestep then expects "
                                       "the same variance). Use the measured variance of your clean latents when "
                                       "it is well away from 1."),
            ],
            outputs=[io.Sampler.Output(tooltip=OUT_TIP)],
        )

    @classmethod
    def execute(cls, sampler, window: float, cutoff: float, data_variance: float) -> io.NodeOutput:
        inner = inner_ksampler(sampler, TIME_SHIFT_NAME)
        config = TimeShiftConfig(window=window / 1000.0, cutoff=cutoff / 1000.0, data_variance=data_variance)
        return io.NodeOutput(rewrap(inner, time_shift_sampler(inner.sampler_function, axis_and_kind, config)))


class PreprintOmeganceSampler(PreprintNode):
    NAME = OMEGANCE_NAME
    ALIASES = ("Omegance", "detail", "granularity")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintOmeganceSampler",
            category=CATEGORY,
            description=(
                "Omegance (Hong et al., 'Omegance: A Single Parameter for Various Granularities in Diffusion-Based "
                "Synthesis', arXiv:2411.17769). One number sets the granularity of the image: positive omega "
                "removes more noise per step (richer, finer detail), negative omega less (smoother, simpler). "
                "It can change over the run (linear, cosine) and differ inside a mask. Wraps any sampler; "
                "omega 0 gives the plain sampler exactly."
            ),
            inputs=[
                io.Sampler.Input("sampler", tooltip=SAMPLER_TIP),
                io.Float.Input("omega", default=0.0, min=-50.0, max=50.0, step=0.5,
                               tooltip="Granularity at the first step: > 0 more detail, < 0 smoother; 0 is neutral. "
                                       "Mapped to a noise scale of 0.95-1.05 (EPS models) or 0.9-1.1 (flow "
                                       "models) by the paper's logistic; useful values are about -10 to 10."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="constant",
                               tooltip="How omega moves from 'omega' (first step) to 'omega_end' (last step): "
                                       "constant keeps 'omega'; linear or cosine (slow at both ends) over the run."),
                io.Float.Input("omega_end", default=0.0, min=-50.0, max=50.0, step=0.5,
                               tooltip="Omega at the last step for the linear and cosine schedules (e.g. detail early, "
                                       "smooth late: omega 5, omega_end -5)."),
                io.Float.Input("mask_omega", default=0.0, min=-50.0, max=50.0, step=0.5,
                               tooltip="Omega inside the mask (constant over the run); outside it the scheduled "
                                       "omega applies. Ignored without a mask."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional region (white = 1) that gets 'mask_omega'; any size, resized "
                                      "bilinearly to the latent."),
            ],
            outputs=[io.Sampler.Output(tooltip=OUT_TIP)],
        )

    @classmethod
    def validate_inputs(cls, schedule=None) -> bool | str:
        return cls.check_widgets(schedule=schedule)

    @classmethod
    def execute(cls, sampler, omega: float, schedule: str, omega_end: float, mask_omega: float,
                mask=None) -> io.NodeOutput:
        inner = inner_ksampler(sampler, OMEGANCE_NAME)
        config = OmeganceConfig(omega=omega, schedule=schedule, omega_end=omega_end, mask=mask,
                                mask_omega=mask_omega)
        return io.NodeOutput(rewrap(inner, omegance_sampler(inner.sampler_function, kind_of, config)))


class PreprintAdaptiveDiffusionSampler(PreprintNode):
    NAME = ADAPTIVE_NAME
    ALIASES = ("AdaptiveDiffusion", "step skipping", "speed up")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintAdaptiveDiffusionSampler",
            category=CATEGORY,
            description=(
                "AdaptiveDiffusion (Ye et al., 'Training-Free Adaptive Diffusion with Bounded Difference "
                "Approximation Strategy', arXiv:2410.09873). Skips a model call and reuses the previous noise "
                "prediction while the third-order difference of the latent trajectory stays below a threshold: "
                "fewer model calls at nearly the same image. Best with one-call-per-step samplers (euler, "
                "dpmpp_2m, Preprint DPM-Solver++). The number of calls saved is written to the log. Threshold 0 "
                "gives the plain sampler exactly."
            ),
            inputs=[
                io.Sampler.Input("sampler", tooltip=SAMPLER_TIP),
                io.Float.Input("threshold", default=0.01, min=0.0, max=1.0, step=0.001, round=0.0001,
                               tooltip="Skip while |(d_k + d_{k-2})/2 - d_{k-1}| <= threshold * d_{k-1}, d being the "
                                       "mean change of the latent per step. Larger skips more; the paper uses 0.01 "
                                       "(SD1.5 / SDXL). 0 disables skipping."),
                io.Int.Input("max_skips", default=4, min=0, max=50,
                             tooltip="Most consecutive model calls that may be skipped before one is computed "
                                     "again (paper: 4)."),
            ],
            outputs=[io.Sampler.Output(tooltip=OUT_TIP)],
        )

    @classmethod
    def execute(cls, sampler, threshold: float, max_skips: int) -> io.NodeOutput:
        inner = inner_ksampler(sampler, ADAPTIVE_NAME)
        fn = AdaptiveDiffusionSampler(inner.sampler_function, AdaptiveConfig(threshold=threshold,
                                                                             max_skips=max_skips))
        return io.NodeOutput(rewrap(inner, fn))


NODES = [PreprintTimeShiftSampler, PreprintOmeganceSampler, PreprintAdaptiveDiffusionSampler]
