"""Sampler nodes: DPM-Solver++, DEIS, momentum solvers and EVODiff.

Papers:
- Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", arXiv:2211.01095.
- Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator", arXiv:2204.13902.
- Wizadwongsa et al., "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts", arXiv:2307.11118.
- Li, Chen & Zeng, "EVODiff: Entropy-aware Variance Optimized Diffusion Inference", arXiv:2509.26096.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import comfy.samplers
import torch
from comfy_api.latest import io

from ..samplers import deis, dpm_solver_pp, evodiff
from ..samplers import momentum as momentum_solvers
from ._host import model_sampling_of, parameterisation_of, register_ksampler_name, with_model_parameterisation
from ._inputs import PreprintNode

CATEGORY = "Preprint/samplers"
DPMPP_NAME = "DPM-Solver++ (Preprint)"
DEIS_NAME = "DEIS (Preprint)"
MOMENTUM_NAME = "Momentum Solver (GHVB / Heavy Ball, Preprint)"
EVODIFF_NAME = "EVODiff (Preprint)"

DPMPP_VARIANTS = {
    "2M": functools.partial(dpm_solver_pp.sample_dpmpp_multistep, order=2),
    "3M": functools.partial(dpm_solver_pp.sample_dpmpp_multistep, order=3),
    "2S": functools.partial(dpm_solver_pp.sample_dpmpp_singlestep, order=2),
    "3S": functools.partial(dpm_solver_pp.sample_dpmpp_singlestep, order=3),
}


def with_model_time(fn: Callable) -> Callable:
    """Like ``with_model_parameterisation``, and also hand DEIS the model's own sigma -> timestep map."""

    @functools.wraps(fn)
    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        ms = model_sampling_of(model)
        device = next((b.device for b in ms.buffers()), sigmas.device)

        def time_fn(s: torch.Tensor) -> torch.Tensor:
            return ms.timestep(s.to(device=device, dtype=torch.float32)).to(s.device, torch.float64)

        return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                  parameterisation=parameterisation_of(ms), time_fn=time_fn, **options)

    return sampler


# Names added to the stock KSampler dropdown, with the defaults a user gets from there.
KSAMPLER_ENTRIES = {
    "preprint_dpmpp_2m": functools.partial(dpm_solver_pp.sample_dpmpp_multistep, order=2, lower_order_final=False),
    "preprint_dpmpp_3m": functools.partial(dpm_solver_pp.sample_dpmpp_multistep, order=3, lower_order_final=True),
    "preprint_dpmpp_2s": functools.partial(dpm_solver_pp.sample_dpmpp_singlestep, order=2),
    "preprint_dpmpp_3s": functools.partial(dpm_solver_pp.sample_dpmpp_singlestep, order=3),
    "preprint_ghvb": functools.partial(momentum_solvers.sample_plms_momentum, order=2.8, momentum="ghvb"),
    "preprint_evodiff": evodiff.sample_evodiff,
}
KSAMPLER_TIME_ENTRIES = {
    "preprint_deis": functools.partial(deis.sample_deis, order=3, poly_space="lambda"),
}

_FLOW_LAMBDA_TIP = ("Flow models (Flux, SD3) only. log_snr: step in the true log-SNR log((1-sigma)/sigma), the "
                    "paper's variable; sigma: step in -log(sigma) like ComfyUI's own samplers. Both solve the same "
                    "ODE. auto: log_snr for 2M / 3M, sigma for 2S / 3S. On the usual Flux / SD3 schedules the "
                    "choice changes the result by a few percent at most; on log-SNR-uniform steps log_snr suits "
                    "2M / 3M and sigma suits 3S (see the README's benchmark). Ignored on EPS models.")


def threshold_ceiling(threshold_max: float) -> float:
    """The sampler's ceiling on the threshold s: the widget's 0 means none."""
    return threshold_max if threshold_max > 0.0 else math.inf


def check_thresholds(dynamic_thresholding: bool, threshold_max: float, threshold_floor: float) -> None:
    if dynamic_thresholding and not (threshold_floor > 0.0 and math.isfinite(threshold_floor)):
        raise ValueError(f"threshold_floor must be > 0, got {threshold_floor}; the default 1 is the official rule.")
    if dynamic_thresholding and threshold_ceiling(threshold_max) < threshold_floor:
        raise ValueError(f"threshold_max ({threshold_max}) is below threshold_floor ({threshold_floor}); raise "
                         "threshold_max, set it to 0 (no ceiling) or lower the floor.")


class PreprintSamplerDPMSolverPP(PreprintNode):
    NAME = DPMPP_NAME
    ALIASES = ("DPM-Solver++", "dpmpp", "2M", "3M", "sampler")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintSamplerDPMSolverPP",
            category=CATEGORY,
            description=(
                "DPM-Solver++ in data prediction (Lu et al., 'DPM-Solver++: Fast Solver for Guided Sampling of "
                "Diffusion Probabilistic Models', arXiv:2211.01095). Deterministic ODE solver for 10-25 steps, "
                "good with CFG: multistep 2M / 3M (one model call per step) and singlestep 2S / 3S (two / three "
                "calls per step), optional dynamic thresholding for pixel-space models. Any sigma list, flow "
                "models included; on EPS models 2M matches ComfyUI's dpmpp_2m."
            ),
            inputs=[
                io.Combo.Input("solver", options=list(DPMPP_VARIANTS), default="2M",
                               tooltip="2M: second-order multistep (the paper's recommendation for guided "
                                       "sampling). 3M: third-order multistep, better from about 15 steps. 2S / 3S: "
                                       "singlestep, 2 / 3 model calls per step (halve or third the step count "
                                       "for the same cost); on flow models (Flux, SD3) prefer 2M / 3M, whose "
                                       "extra steps shorten the schedule's final jump to sigma 0."),
                io.Boolean.Input("lower_order_final", default=True,
                                 tooltip="Multistep only: use lower orders on the last steps when sampling with "
                                         "fewer than 10 steps (the official default; it stabilises very short "
                                         "runs)."),
                io.Combo.Input("flow_lambda", options=list(dpm_solver_pp.FLOW_LAMBDAS), default="auto",
                               optional=True, tooltip=_FLOW_LAMBDA_TIP),
                io.Boolean.Input("dynamic_thresholding", default=False, optional=True,
                                 tooltip="Imagen-style dynamic thresholding of every data prediction. Only for "
                                         "pixel-space models (data in [-1, 1]); leave off for latent models such "
                                         "as SD1.5, SDXL, Flux."),
                io.Float.Input("threshold_percentile", default=0.995, min=0.5, max=1.0, step=0.001, optional=True,
                               tooltip="Dynamic thresholding: the percentile of |x0| per sample used as the clip "
                                       "level s (Imagen and the official DPM-Solver++ use 0.995)."),
                io.Float.Input("threshold_max", default=0.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="Dynamic thresholding: optional ceiling on s (diffusers' sample_max_value); "
                                       "0 = no ceiling, the official rule. With threshold_floor 1, a ceiling of 1 "
                                       "gives a static clip to [-1, 1]."),
                io.Float.Input("threshold_floor", default=1.0, min=0.01, max=100.0, step=0.05, optional=True,
                               tooltip="Dynamic thresholding: s is at least this (the official DPM-Solver++ "
                                       "thresholding_max_val, s = max(percentile, floor); default 1 as there and "
                                       "in Imagen)."),
            ],
            outputs=[io.Sampler.Output(tooltip="A SAMPLER for SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, solver=None, flow_lambda="auto", dynamic_thresholding: bool = False,
                        threshold_max: float = 0.0, threshold_floor: float = 1.0) -> bool | str:
        # defaults are execute's, for a prompt that leaves these optional inputs out; None is a linked input
        return cls.check_widgets(solver=solver, flow_lambda=flow_lambda, dynamic_thresholding=dynamic_thresholding,
                                 threshold_max=threshold_max, threshold_floor=threshold_floor)

    @classmethod
    def check_values(cls, **values) -> None:
        names = ("dynamic_thresholding", "threshold_max", "threshold_floor")
        if all(n in values for n in names):
            check_thresholds(*(values[n] for n in names))

    @classmethod
    def execute(cls, solver: str, lower_order_final: bool, flow_lambda: str = "auto",
                dynamic_thresholding: bool = False, threshold_percentile: float = 0.995,
                threshold_max: float = 0.0, threshold_floor: float = 1.0) -> io.NodeOutput:
        checked = cls.validate_inputs(solver, flow_lambda, dynamic_thresholding, threshold_max, threshold_floor)
        if checked is not True:
            raise ValueError(checked)
        fn = with_model_parameterisation(DPMPP_VARIANTS[solver])
        options = {"lower_order_final": lower_order_final, "flow_lambda": flow_lambda,
                   "threshold_percentile": threshold_percentile if dynamic_thresholding else 0.0,
                   "threshold_max": threshold_ceiling(threshold_max), "threshold_floor": threshold_floor}
        return io.NodeOutput(comfy.samplers.KSAMPLER(fn, extra_options=options))


class PreprintSamplerDEIS(PreprintNode):
    NAME = DEIS_NAME
    ALIASES = ("DEIS", "sampler")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintSamplerDEIS",
            category=CATEGORY,
            description=(
                "DEIS tAB multistep solver (Zhang & Chen, 'Fast Sampling of Diffusion Models with Exponential "
                "Integrator', arXiv:2204.13902), with its coefficients integrated on this model's own noise "
                "schedule and the actual sigma list (ComfyUI's deis assumes a fixed VP schedule with sigma "
                "0.002..80). One model call per step; EPS, V-prediction and flow models."
            ),
            inputs=[
                io.Int.Input("order", default=3, min=1, max=3,
                             tooltip="Adams-Bashforth order: how many past model outputs each step uses "
                                     "(1 = DDIM). 3 is the paper's default."),
                io.Combo.Input("poly_space", options=list(deis.POLY_SPACES), default="lambda",
                               tooltip="Variable the noise prediction is extrapolated in: t = the model's own "
                                       "timestep (the paper's tAB), lambda = log-SNR, rho = the VE noise level "
                                       "(the paper's rhoAB). lambda was the most accurate in our benchmark."),
                io.Boolean.Input("lower_order_final", default=True,
                                 tooltip="Lower the order on the last steps of runs shorter than 10 steps."),
            ],
            outputs=[io.Sampler.Output(tooltip="A SAMPLER for SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, poly_space=None) -> bool | str:
        return cls.check_widgets(poly_space=poly_space)

    @classmethod
    def execute(cls, order: int, poly_space: str, lower_order_final: bool) -> io.NodeOutput:
        fn = with_model_time(deis.sample_deis)
        return io.NodeOutput(comfy.samplers.KSAMPLER(fn, extra_options={
            "order": order, "poly_space": poly_space, "lower_order_final": lower_order_final}))


MOMENTUM_SOLVERS = ("plms", "dpmpp_2m", "dpmpp_3m")
MOMENTUM_KINDS = ("ghvb", "hb")


def check_momentum(solver: str, momentum: str) -> None:
    if solver not in MOMENTUM_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {MOMENTUM_SOLVERS}.")
    if momentum not in MOMENTUM_KINDS:
        raise ValueError(f"unknown momentum {momentum!r}; choose one of {MOMENTUM_KINDS}.")
    if momentum == "ghvb" and solver != "plms":
        raise ValueError(f"GHVB is defined for PLMS (Adams-Bashforth weights); choose momentum 'hb' for {solver}, "
                         "or solver 'plms' for GHVB.")


class PreprintSamplerMomentum(PreprintNode):
    NAME = MOMENTUM_NAME
    ALIASES = ("GHVB", "heavy ball", "momentum", "PLMS", "sampler")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintSamplerMomentum",
            category=CATEGORY,
            description=(
                "Multistep solvers with heavy-ball momentum (Wizadwongsa et al., 'Diffusion Sampling with "
                "Momentum for Mitigating Divergence Artifacts', arXiv:2307.11118): damps the oscillation that "
                "causes divergence artifacts at few steps and high CFG. GHVB applies to PLMS; HB to PLMS and "
                "DPM-Solver++ 2M / 3M. beta = 1 is the plain solver. The paper's fractional order 3.7 is "
                "order 4 with beta 0.7."
            ),
            inputs=[
                io.Combo.Input("solver", options=list(MOMENTUM_SOLVERS), default="plms",
                               tooltip="plms: Adams-Bashforth on the noise prediction (the paper's main setting). "
                                       "dpmpp_2m / dpmpp_3m: DPM-Solver++ multistep (HB only)."),
                io.Combo.Input("momentum", options=list(MOMENTUM_KINDS), default="ghvb",
                               tooltip="ghvb: Generalised Heavy Ball, keeps the solver's order (PLMS only). hb: "
                                       "Polyak heavy ball on the solver's update direction."),
                io.Int.Input("order", default=3, min=1, max=4,
                             tooltip="PLMS order (1-4). DPM-Solver++ takes its order from the solver name."),
                io.Float.Input("beta", default=0.8, min=0.05, max=1.0, step=0.05,
                               tooltip="Momentum coefficient: 1 = no momentum (the plain solver); smaller = "
                                       "stronger damping. Paper notation: order 4 with beta 0.7 = 3.7."),
            ],
            outputs=[io.Sampler.Output(tooltip="A SAMPLER for SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, solver: str | None = None, momentum: str | None = None) -> bool | str:
        return cls.check_widgets(solver=solver, momentum=momentum)

    @classmethod
    def check_values(cls, solver=None, momentum=None, **_) -> None:
        if solver is not None and momentum is not None:
            check_momentum(solver, momentum)

    @classmethod
    def execute(cls, solver: str, momentum: str, order: int, beta: float) -> io.NodeOutput:
        checked = cls.validate_inputs(solver=solver, momentum=momentum)
        if checked is not True:
            raise ValueError(checked)
        if solver == "plms":
            fn = momentum_solvers.sample_plms_momentum
            # the paper's fractional order: order k with beta b is k - 1 + b (beta 1 = plain order k)
            options = {"order": float(order) if beta >= 1.0 else order - 1 + beta, "momentum": momentum}
        else:
            fn = momentum_solvers.sample_dpmpp_hb
            options = {"order": 2 if solver == "dpmpp_2m" else 3, "beta": beta}
        return io.NodeOutput(comfy.samplers.KSAMPLER(with_model_parameterisation(fn), extra_options=options))


class PreprintSamplerEVODiff(PreprintNode):
    NAME = EVODIFF_NAME
    ALIASES = ("EVODiff", "sampler")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintSamplerEVODiff",
            category=CATEGORY,
            description=(
                "EVODiff (Li, Chen & Zeng, 'EVODiff: Entropy-aware Variance Optimized Diffusion Inference', "
                "arXiv:2509.26096): a reference-free second-order multistep solver that picks its difference "
                "weights per step and channel to minimise the conditional variance of the update, with a "
                "corrector that costs no extra model call. One model call per step."
            ),
            inputs=[
                io.Boolean.Input("lower_order_final", default=True,
                                 tooltip="Take a first-order step as the last step when the list does not end "
                                         "at sigma 0 (a list ending at 0 always ends with the denoised state)."),
            ],
            outputs=[io.Sampler.Output(tooltip="A SAMPLER for SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, lower_order_final: bool) -> io.NodeOutput:
        fn = with_model_parameterisation(evodiff.sample_evodiff)
        return io.NodeOutput(comfy.samplers.KSAMPLER(fn, extra_options={"lower_order_final": lower_order_final}))


NODES = [PreprintSamplerDPMSolverPP, PreprintSamplerDEIS, PreprintSamplerMomentum, PreprintSamplerEVODiff]


def on_load() -> None:
    for name, fn in KSAMPLER_ENTRIES.items():
        register_ksampler_name(name, with_model_parameterisation(fn))
    for name, fn in KSAMPLER_TIME_ENTRIES.items():
        register_ksampler_name(name, with_model_time(fn))
