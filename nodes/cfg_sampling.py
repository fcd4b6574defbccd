"""Guidance nodes that own the sampling loop or the initial noise.

* Annealing guidance scale: Yehezkel et al., "Navigating with Annealing Guidance Scale in Diffusion Space",
  arXiv:2506.24108: a SAMPLER (the learned scheduler needs both predictions and re-noises with the
  unconditional one) and a GUIDER for any sampler (euler_cfg_pp re-noises as the paper does).
* Noise-Level Guidance: Mannering et al., "Noise-Level Diffusion Guidance: Well Begun is Half Done",
  arXiv:2509.13936 (a NOISE: the initial noise is refined before sampling starts).

They share the CFG family's category and switch its MODEL patches off where they evaluate the model.
"""

from __future__ import annotations

import logging
import os

import comfy.model_base
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import folder_paths
import torch
from comfy_api.latest import io

from ..guidance import annealing
from ..guidance.cfg_schedule import noise_level
from ..guidance.noise_level_guidance import NLGConfig, direction_from_denoised, refine_noise
from ._host import model_sampling_of, parameterisation_of
from ._inputs import PreprintNode
from .cfg import CATEGORY, SCHEDULER_FOLDER, TECH_KEY, _without_techniques

log = logging.getLogger("preprint")

# --------------------------------------------------------------------------------------------------------------
# Annealing guidance sampler


def register_scheduler_folder() -> None:
    """Add ``models/guidance_schedulers`` to ComfyUI's model folders (extra_model_paths.yaml may add more)."""
    default = os.path.join(folder_paths.models_dir, SCHEDULER_FOLDER)
    if SCHEDULER_FOLDER in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[SCHEDULER_FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[SCHEDULER_FOLDER] = (paths, {".safetensors"})
    else:
        folder_paths.folder_names_and_paths[SCHEDULER_FOLDER] = ([default], {".safetensors"})


def scheduler_files() -> list[str]:
    if SCHEDULER_FOLDER not in folder_paths.folder_names_and_paths:
        register_scheduler_folder()
    return folder_paths.get_filename_list(SCHEDULER_FOLDER)


def resolve_scheduler(name: str) -> str:
    path = folder_paths.get_full_path(SCHEDULER_FOLDER, name) if name else None
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(SCHEDULER_FOLDER))
        raise annealing.SchedulerFileError(
            f"Annealing Guidance: scheduler file {name!r} not found in {folders}. Convert the authors' checkpoint "
            "with `python <this pack>/guidance/annealing_convert.py checkpoint.pt "
            f"{os.path.join(folder_paths.models_dir, SCHEDULER_FOLDER, 'annealing_sdxl.safetensors')}` and refresh."
        )
    return path


def _refuse_scheduled_cfg(model_options: dict, who: str) -> None:
    if "scheduled_cfg" in model_options.get("transformer_options", {}).get(TECH_KEY, {}):
        raise ValueError(
            f"{who}: the model also carries Scheduled CFG; both set the CFG scale. Remove the Scheduled CFG node "
            "(keep its guidance interval in mind: the learned scheduler covers the whole run)."
        )


RENOISE_OPTIONS = {"unconditional (paper)": "uncond", "guided (plain DDIM)": "guided"}


def annealing_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                               scheduler: annealing.GuidanceScheduler, guidance_lambda: float, renoise: str):
    """k-diffusion-signature sampler: DDIM with the learned guidance scale (see guidance/annealing.py)."""
    extra_args = dict(extra_args or {})
    model_options = dict(extra_args.get("model_options", {}))
    _refuse_scheduled_cfg(model_options, "Annealing Guidance sampler")
    ms = model_sampling_of(model)
    kind = parameterisation_of(ms)
    captured: dict = {}

    def capture(args):
        captured.update(cond=args["cond_denoised"], uncond=args["uncond_denoised"], scale=float(args["cond_scale"]),
                        has_uncond=args.get("uncond") is not None)
        return args["denoised"]

    extra_args["model_options"] = comfy.model_patcher.set_model_options_post_cfg_function(
        model_options, capture, disable_cfg1_optimization=True)

    def predict(xx, sigma):
        captured.clear()
        d = model(xx, sigma, **extra_args)
        if not captured:
            raise RuntimeError("Annealing Guidance sampler: the guider did not run ComfyUI's CFG step; use "
                               "KSampler-style guiders (SamplerCustom / CFGGuider).")
        if not captured["has_uncond"]:
            raise ValueError("Annealing Guidance sampler: this run has no negative conditioning, so there is no "
                             "guidance scale to learn; use CFGGuider / SamplerCustom with a negative prompt.")
        return annealing.GuidedPrediction(d, captured["cond"], captured["uncond"], captured["scale"])

    def timestep_of(sigma: float) -> float:
        return annealing.timestep_from_noise_level(noise_level(sigma, ms.percent_to_sigma))

    return annealing.sample_annealing_guidance(predict, x, sigmas, scheduler=scheduler,
                                               guidance_lambda=guidance_lambda, timestep_of=timestep_of,
                                               parameterisation=kind, renoise=renoise, callback=callback,
                                               disable=disable)


class PreprintSamplerAnnealingGuidance(PreprintNode):
    NAME = "Annealing Guidance Sampler (Preprint)"
    ALIASES = ("annealing guidance", "learned CFG")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintSamplerAnnealingGuidance",
            category=CATEGORY,
            description=(
                "Annealing guidance scale (Yehezkel et al., 'Navigating with Annealing Guidance Scale in Diffusion "
                "Space', arXiv:2506.24108): a small learned scheduler picks the CFG scale at every step from the "
                "timestep, the size of the guidance direction and lambda, and the DDIM step re-noises with the "
                "negative prediction. Needs the scheduler weights in models/guidance_schedulers (see the README: "
                "convert the authors' checkpoint with guidance/annealing_convert.py). The released weights "
                "were trained for SDXL. The sampler's CFG value is replaced by the learned one."
            ),
            inputs=[
                io.Combo.Input("scheduler_file", options=scheduler_files(),
                               tooltip="Scheduler weights (.safetensors) in models/guidance_schedulers."),
                io.Float.Input("guidance_lambda", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Trade-off the scheduler was trained on: higher = stronger prompt alignment, "
                                       "lower = better image quality (the authors use 0.4)."),
                io.Combo.Input("renoise", options=list(RENOISE_OPTIONS), default="unconditional (paper)",
                               tooltip="Direction used to re-noise after each step: the negative prediction (the "
                                       "paper's Algorithm 4) or the guided one (plain DDIM)."),
            ],
            outputs=[io.Sampler.Output(tooltip="A SAMPLER for SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, scheduler_file=None, renoise=None) -> bool | str:
        return cls.check_widgets(scheduler_file=scheduler_file, renoise=renoise)

    @classmethod
    def execute(cls, scheduler_file: str, guidance_lambda: float, renoise: str) -> io.NodeOutput:
        scheduler = annealing.load_scheduler(resolve_scheduler(scheduler_file))
        if renoise not in RENOISE_OPTIONS:
            raise ValueError(f"Annealing Guidance sampler: renoise must be one of {list(RENOISE_OPTIONS)}.")
        fn = annealing_sampler_function
        return io.NodeOutput(comfy.samplers.KSAMPLER(fn, extra_options={
            "scheduler": scheduler, "guidance_lambda": guidance_lambda, "renoise": RENOISE_OPTIONS[renoise]}))


class AnnealingGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose scale is the learned one, picked afresh at every model evaluation, so any sampler can use it;
    with ``euler_cfg_pp`` (which re-noises with the negative prediction) it is the paper's Algorithm 4.

    The model runs at a nominal scale of 1 with both branches evaluated; a post-CFG function placed first in the
    list moves the result to the learned scale, so later post-CFG hooks (PAG, CFG rescaling ...) see it."""

    def __init__(self, model_patcher, scheduler: annealing.GuidanceScheduler, guidance_lambda: float):
        super().__init__(model_patcher)
        self.scheduler, self.guidance_lambda = scheduler, guidance_lambda
        self.ms = model_patcher.get_model_object("model_sampling")
        self.kind = parameterisation_of(self.ms)

    def _learned(self, args: dict) -> torch.Tensor:
        p = annealing.GuidedPrediction(args["denoised"], args["cond_denoised"], args["uncond_denoised"],
                                       float(args["cond_scale"]))
        sigma = args["sigma"]
        t = annealing.timestep_from_noise_level(noise_level(float(sigma.max()), self.ms.percent_to_sigma))
        return annealing.learned_guidance(p, args["input"], sigma, scheduler=self.scheduler,
                                          guidance_lambda=self.guidance_lambda, timestep=t,
                                          parameterisation=self.kind)

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        options = dict(model_options)  # (Scheduled CFG on the model refuses this guider itself, before sampling)
        options["sampler_post_cfg_function"] = [self._learned, *model_options.get("sampler_post_cfg_function", [])]
        options["disable_cfg1_optimization"] = True  # the nominal scale is 1, the negative branch is still needed
        if self.conds.get("negative") is None:
            raise ValueError("Annealing Guidance guider: no negative conditioning, so there is no guidance scale to "
                             "learn; connect a negative prompt.")
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                self.conds.get("positive"), 1.0, model_options=options, seed=seed)


class PreprintAnnealingGuidanceGuider(PreprintNode):
    NAME = "Annealing Guidance Guider (Preprint)"
    ALIASES = ("annealing guidance", "learned CFG", "guider")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintAnnealingGuidanceGuider",
            category=CATEGORY,
            description=(
                "Annealing guidance scale (Yehezkel et al., arXiv:2506.24108) as a GUIDER for SamplerCustomAdvanced: "
                "the learned scheduler picks the CFG scale at every model evaluation from the timestep, the size of "
                "the guidance direction and lambda, with any sampler. Choose the sampler euler_cfg_pp for the "
                "paper's step (it re-noises with the negative prediction); other samplers re-noise with the guided "
                "one. Same scheduler files as the Annealing Guidance Sampler (models/guidance_schedulers)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to guide (the released weights were trained for SDXL)."),
                io.Conditioning.Input("positive", tooltip="The prompt."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (the unconditional branch)."),
                io.Combo.Input("scheduler_file", options=scheduler_files(),
                               tooltip="Scheduler weights (.safetensors) in models/guidance_schedulers."),
                io.Float.Input("guidance_lambda", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Trade-off the scheduler was trained on: higher = stronger prompt alignment, "
                                       "lower = better image quality (the authors use 0.4)."),
            ],
            outputs=[io.Guider.Output(tooltip="A GUIDER for SamplerCustomAdvanced; pair it with euler_cfg_pp for "
                                              "the paper's method.")],
        )

    @classmethod
    def validate_inputs(cls, scheduler_file=None, guidance_lambda=None) -> bool | str:
        return cls.check_widgets(scheduler_file=scheduler_file, guidance_lambda=guidance_lambda)

    @classmethod
    def execute(cls, model, positive, negative, scheduler_file: str, guidance_lambda: float) -> io.NodeOutput:
        guider = AnnealingGuider(model, annealing.load_scheduler(resolve_scheduler(scheduler_file)), guidance_lambda)
        guider.set_conds(positive, negative)
        return io.NodeOutput(guider)


# --------------------------------------------------------------------------------------------------------------
# Noise-Level Guidance


class NoiseLevelGuidedNoise:
    """A NOISE object: the wrapped noise, refined by NLG against the model and conditionings when generated."""

    def __init__(self, inner, model, positive, negative, config: NLGConfig):
        self.inner, self.model, self.positive, self.negative, self.config = inner, model, positive, negative, config
        self.seed = getattr(inner, "seed", 0)
        self.model_calls = 0

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        noise = self.inner.generate_noise(input_latent)
        if self.config.iterations == 0:
            return noise
        return self.refine(noise, input_latent["samples"])

    def refine(self, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        model = _without_techniques(self.model)
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        ms = model.get_model_object("model_sampling")
        sigma_max = float(ms.sigma_max)
        config, result = self.config, {}
        generator = torch.Generator().manual_seed((int(self.seed) + 0x4E4C47) & 0x7FFFFFFFFFFFFFFF)
        outer = self

        def sampler_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            extra_args = dict(extra_args or {})
            captured: dict = {}

            def capture(args):
                captured.update(cond=args["cond_denoised"], uncond=args["uncond_denoised"])
                return args["denoised"]

            extra_args["model_options"] = comfy.model_patcher.set_model_options_post_cfg_function(
                dict(extra_args.get("model_options", {})), capture, disable_cfg1_optimization=True)
            n0 = noise.to(x)
            # x is linear in the noise: x(n) = x(n0) + k (n - n0), k = the sampler's noise scaling at sigma_max.
            k = ms.noise_scaling(sigmas[0], torch.ones_like(x), torch.zeros_like(x), max_denoise=True)
            s_in = x.new_ones([x.shape[0]])

            def direction(n):
                model_k(x + k * (n - n0), sigmas[0] * s_in, **extra_args)
                outer.model_calls += 1
                return direction_from_denoised(captured["cond"], captured["uncond"], float(sigmas[0]))

            result["noise"] = refine_noise(n0, direction, config, generator)
            return x

        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(self.positive, self.negative)
        guider.set_cfg(2.0)  # any scale but 1: both branches are evaluated and captured
        guider.sample(noise, latent, comfy.samplers.KSAMPLER(sampler_fn), torch.tensor([sigma_max, 0.0]),
                      seed=self.seed, disable_pbar=True)
        return result["noise"].to(device=noise.device, dtype=noise.dtype)


class PreprintNoiseLevelGuidance(PreprintNode):
    NAME = "Noise-Level Guidance (Preprint)"
    ALIASES = ("NLG", "noise refinement", "golden noise")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintNoiseLevelGuidance",
            category=CATEGORY,
            description=(
                "Noise-Level Guidance (Mannering et al., 'Noise-Level Diffusion Guidance: Well Begun is Half Done', "
                "arXiv:2509.13936): before sampling, nudges the starting noise along the CFG direction measured at "
                "the highest noise level, so the prompt is followed better from the first step. Wraps a NOISE "
                "(e.g. RandomNoise) for SamplerCustomAdvanced; costs one two-branch model evaluation per iteration."
            ),
            inputs=[
                io.Noise.Input("noise", tooltip="The noise to refine (RandomNoise, or another NOISE)."),
                io.Model.Input("model", tooltip="The model used for sampling (its guidance patches are not applied "
                                                "while refining)."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning (the prompt to align the noise to)."),
                io.Conditioning.Input("negative", tooltip="Negative / empty conditioning for the guidance direction."),
                io.Int.Input("iterations", default=20, min=0, max=200,
                             tooltip="Refinement iterations (20 in the paper's demo); 0 passes the noise through."),
                io.Float.Input("step_size", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Step along the guidance direction per iteration."),
                io.Float.Input("clip_norm", default=0.5, min=0.0, max=100.0, step=0.05,
                               tooltip="Longest step per iteration (norm over the whole latent); 0 = no clipping."),
                io.Float.Input("jitter", default=0.001, min=0.0, max=1.0, step=0.0005, round=0.0001,
                               tooltip="Variance of fresh noise added each iteration (seeded from the noise seed)."),
                io.Boolean.Input("renormalize", default=True,
                                 tooltip="Rescale the noise back to the norm of standard Gaussian noise after each "
                                         "iteration (keeps the sampler's assumptions)."),
            ],
            outputs=[io.Noise.Output(tooltip="The refined noise, for SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, noise, model, positive, negative, iterations: int, step_size: float, clip_norm: float,
                jitter: float, renormalize: bool) -> io.NodeOutput:
        config = NLGConfig(iterations, step_size, clip_norm, jitter, renormalize)
        return io.NodeOutput(NoiseLevelGuidedNoise(noise, model, positive, negative, config))


NODES = [PreprintSamplerAnnealingGuidance, PreprintAnnealingGuidanceGuider, PreprintNoiseLevelGuidance]


def on_load() -> None:
    register_scheduler_folder()
