"""DPM-Solver-v3 nodes: empirical model statistics computed on the user's model, and the solver that reads them.

Paper: Zheng, Lu, Chen, Zhu, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model Statistics",
arXiv:2310.13268. Maths in ``samplers/dpm_solver_v3.py``.

The statistics are valid for one model (fingerprint: weights, LoRA patches, sampling type), one CFG scale and one
latent shape. The Statistics node computes them with ComfyUI's own CFG guider as the denoiser and saves them with
``utils.calibration_store`` in ``models/preprint_calibration``; a later run with the same key reads the file and
calls no model. The KSampler name ``preprint_dpm_solver_v3`` finds the newest file saved for the model, CFG and
latent shape it samples with.
"""

from __future__ import annotations

import functools
import logging

import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..samplers import dpm_solver_v3 as v3
from ..utils import calibration_store as store
from ..utils.noise_schedule import half_log_snr
from ._host import (
    calibration_folder,
    model_fingerprint,
    model_sampling_of,
    parameterisation_of,
    register_ksampler_name,
    run_cfg,
    with_guided_denoiser,
    with_model_parameterisation,
)
from ._inputs import PreprintNode, advanced

log = logging.getLogger("preprint")

CATEGORY = "Preprint/samplers"
STATS_NAME = "DPM-Solver-v3 Statistics"
SAMPLER_NAME = "DPM-Solver-v3"
KSAMPLER_NAME = "preprint_dpm_solver_v3"
KIND = "dpm_solver_v3"  # calibration kind: files are dpm_solver_v3-<digest>.safetensors
FLOW_SIGMA_MAX = 0.995  # flow grids start here: lambda is -inf at sigma = 1, whose step needs no statistics
DERIVATIVES = ("auto", "forward", "finite_difference")
# networks that detach their timestep (read in ComfyUI's sources: comfy/ldm/chroma/model.py, and its pixel-space
# sibling), so forward-mode AD sees no derivative through it
FORWARD_BLIND = ("Chroma", "ChromaRadiance")
PAPER = "Zheng et al., 'DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model Statistics', arXiv:2310.13268"

Statistics = io.Custom("PREPRINT_DPM_V3_STATISTICS")

# solver settings shared by the SAMPLER node's defaults and the KSampler name (measured best on the mixtures:
# the DPM-Solver++ weights, predictor without and corrector with the pseudo-order, as the official SD setting)
SOLVER_DEFAULTS = {"order": 2, "corrector": True, "lower_order_final": True, "second_order": "dpmsolver",
                   "predictor_pseudo": False, "corrector_pseudo": True}


def lambda_range(model_sampling, kind: str) -> tuple[float, float]:
    """The model's log-SNR span: sigma_max .. sigma_min (flow models from sigma 0.995, see FLOW_SIGMA_MAX)."""
    hi, lo = float(model_sampling.sigma_max), float(model_sampling.sigma_min)
    if kind == "flow":
        hi = min(hi, FLOW_SIGMA_MAX)
        lo = max(lo, 1e-3)
    lam = half_log_snr(torch.tensor([hi, lo], dtype=torch.float64), kind)
    return float(lam[0]), float(lam[1])


def conditioning_digest(positive, negative) -> str:
    tensors = [(f"{name}{i}", c[0]) for name, conds in (("pos", positive), ("neg", negative))
               for i, c in enumerate(conds)]
    pooled = [(f"pooled{i}", c[1]["pooled_output"]) for i, c in enumerate([*positive, *negative])
              if isinstance(c[1].get("pooled_output"), torch.Tensor)]
    return store.fingerprint(tensors + pooled)


def stats_key(fingerprint: str, cfg: float, shape, settings: dict) -> dict:
    return {"model": fingerprint, "cfg": float(cfg), "shape": [int(s) for s in shape], **settings}


@functools.lru_cache(maxsize=4)
def _read(path: str, mtime: float) -> v3.Statistics:
    tensors, _, _ = store.read(path)
    return v3.Statistics.from_tensors(tensors)


def saved_statistics(fingerprint: str, cfg: float, shape) -> tuple[v3.Statistics, str] | None:
    """The newest statistics saved for this model, CFG and latent shape (any grid and sample count)."""
    want = [int(s) for s in shape]
    for path, key, _ in store.listing(calibration_folder(), KIND):
        if key.get("model") == fingerprint and key.get("cfg") == float(cfg) and key.get("shape") == want:
            return _read(str(path), path.stat().st_mtime), str(path)
    return None


class PreprintDPMSolverV3Statistics(PreprintNode):
    NAME = STATS_NAME
    ALIASES = ("DPM-Solver-v3", "EMS", "empirical model statistics", "calibrate", "dpm v3")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintDPMSolverV3Statistics",
            category=CATEGORY,
            description=(
                f"Computes the empirical model statistics (l, s, b per latent element on a log-SNR grid) that "
                f"DPM-Solver-v3 needs ({PAPER}), on this model, CFG scale, prompts and latent size, with Jacobian-"
                "vector products (central differences; forward-mode AD on request) along the model's own ODE "
                "trajectories. Saved in "
                "models/preprint_calibration and read again (no model call) whenever the same model, CFG, shape, "
                "prompts and settings come back. Cost: (grid_points + 1) x samples x 2 JVPs, each two guided "
                "(cond + uncond) passes with differences; the defaults are 3,904 JVPs (about 10 GPU-minutes for "
                "SD1.5 at 512 px, estimated)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to calibrate (cloned, never changed). The statistics "
                                                "are valid for exactly this model, LoRAs and shift included."),
                io.Conditioning.Input("positive", tooltip="Prompt the trajectories are sampled with: use prompts "
                                                          "like the ones you will render."),
                io.Conditioning.Input("negative", tooltip="Negative prompt for CFG."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale: the statistics belong to one scale; sample with the same one."),
                io.Latent.Input("latent", tooltip="Only its size is used: statistics are per latent element, so "
                                                  "they belong to one width and height."),
                io.Int.Input("grid_points", default=60, min=4, max=2000,
                             tooltip="Intervals of the log-SNR grid (the official sets use 120-1200). Each grid "
                                     "point costs 2 JVPs per sample."),
                io.Int.Input("samples", default=32, min=4, max=8192,
                             tooltip="Trajectories the expectations are taken over (official: 1024-4096). More is "
                                     "smoother statistics at proportional cost."),
                advanced(io.Int.Input("chunk", default=8, min=1, max=1024,
                                      tooltip="Samples per JVP call: lower it if the GPU runs out of memory (the "
                                              "statistics do not change).")),
                advanced(io.Int.Input("trajectory_substeps", default=1, min=1, max=16,
                                      tooltip="DPM-Solver++(2M) steps per grid interval carrying the samples along "
                                              "their ODE trajectories; the first reuses the statistics' own model "
                                              "call, each further one costs a plain call per sample.")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the trajectories' starting noise and of the probe vectors."),
                advanced(io.Combo.Input("derivatives", options=list(DERIVATIVES), default="auto",
                                        tooltip="auto / finite_difference: central differences (2 plain calls "
                                                "per JVP; every attention kernel, every dtype, discrete "
                                                "timesteps). forward: forward-mode JVPs (attention on PyTorch's "
                                                "math kernel), only for continuous-time models (flow: Flux, SD3); "
                                                "refused where the timestep is discrete or detached.")),
                io.Boolean.Input("recompute", default=False,
                                 tooltip="Compute again even when statistics for these settings are saved."),
            ],
            outputs=[Statistics.Output(display_name="statistics",
                                       tooltip="The statistics, for the DPM-Solver-v3 sampler node."),
                     io.String.Output(display_name="path", tooltip="The safetensors file they are saved in.")],
        )

    @classmethod
    def validate_inputs(cls, derivatives: str | None = None) -> bool | str:
        return cls.check_widgets(derivatives=derivatives)

    @classmethod
    def execute(cls, model, positive, negative, cfg: float, latent: dict, grid_points: int, samples: int,
                chunk: int, trajectory_substeps: int, seed: int, derivatives: str, recompute: bool
                ) -> io.NodeOutput:
        if derivatives not in DERIVATIVES:
            raise cls.error(f"derivatives = {derivatives!r} is not one of {DERIVATIVES}.")
        samples_in = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        shape = tuple(int(s) for s in samples_in.shape[1:])
        kind = parameterisation_of(model.get_model_object("model_sampling"))
        lam = lambda_range(model.get_model_object("model_sampling"), kind)
        settings = {"grid_points": grid_points, "samples": samples, "substeps": trajectory_substeps, "seed": seed,
                    "derivatives": derivatives, "prompts": conditioning_digest(positive, negative),
                    "lambda_range": list(lam)}
        key = stats_key(model_fingerprint(model), cfg, shape, settings)
        folder = calibration_folder()
        found = None if recompute else store.load(folder, KIND, key)
        if found is not None:
            log.info("%s: reusing %s", cls.NAME, store.path_for(folder, KIND, key))
            return io.NodeOutput(v3.Statistics.from_tensors(found[0]), str(store.path_for(folder, KIND, key)))
        stats, used = cls.compute(model, positive, negative, cfg, samples_in, kind, lam, grid_points, samples,
                                  chunk, trajectory_substeps, seed, derivatives)
        meta = {"derivatives_used": used, "paper": "arXiv:2310.13268", "parameterisation": kind}
        path = store.save(folder, KIND, key, stats.tensors(), meta)
        return io.NodeOutput(stats, str(path))

    @classmethod
    def check_forward_mode(cls, model) -> None:
        """Refuse forward-mode derivatives where they would silently miss the derivative through the noise level."""
        ms = model.get_model_object("model_sampling")
        sigma = torch.tensor([float(ms.sigma_max) * 0.5, float(ms.sigma_min) * 2.0])
        if not v3.timestep_is_differentiable(ms.timestep, sigma):
            raise cls.error("forward derivatives: this model maps the noise level to discrete timesteps (SD1.x / "
                            "SDXL: the nearest of its training timesteps), which forward-mode AD cannot "
                            "differentiate; its statistics would be silently wrong. Set derivatives to auto (finite "
                            "differences).")
        dm = model.get_model_object("diffusion_model")
        if type(dm).__name__ in FORWARD_BLIND:
            raise cls.error(f"forward derivatives: this {type(dm).__name__} detaches its timestep inside the "
                            "network, which forward-mode AD cannot follow; its statistics would be silently wrong. "
                            "Set derivatives to auto (finite differences).")

    @classmethod
    def compute(cls, model, positive, negative, cfg, latent, kind, lam, grid_points, samples, chunk, substeps,
                seed, derivatives) -> tuple[v3.Statistics, str]:
        result: dict = {}
        bar = comfy.utils.ProgressBar(grid_points + 1)

        mode = "forward" if derivatives == "forward" else "finite_difference"
        if mode == "forward":
            cls.check_forward_mode(model)

        def calibrate(denoise, x, sigmas):
            try:
                result["stats"] = v3.compute_statistics(
                    denoise, tuple(x.shape[1:]), kind, *lam, grid_points=grid_points, samples=samples, chunk=chunk,
                    substeps=substeps, seed=seed, jvp=mode, device=x.device, dtype=x.dtype,
                    callback=lambda done, total: bar.update_absolute(done, total))
            except (NotImplementedError, RuntimeError) as error:
                hint = " Set derivatives to auto (finite differences)." if mode == "forward" else ""
                raise cls.error(f"computing the statistics failed with {mode} derivatives: {error}.{hint}") from error
            result["mode"] = mode
            return result

        zeros = torch.zeros((1, *latent.shape[1:]), dtype=latent.dtype)
        ms = model.get_model_object("model_sampling")
        sigmas = torch.tensor([float(ms.sigma_max), float(ms.sigma_min)])
        with_guided_denoiser(model, positive, negative, cfg, zeros, zeros, sigmas, seed, calibrate)
        return result["stats"], result["mode"]


class PreprintSamplerDPMSolverV3(PreprintNode):
    NAME = SAMPLER_NAME
    ALIASES = ("DPM-Solver-v3", "dpm v3", "EMS", "sampler", "UniPC")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintSamplerDPMSolverV3",
            category=CATEGORY,
            description=(
                f"DPM-Solver-v3 ({PAPER}): a multistep ODE solver whose coefficients come from empirical model "
                "statistics computed on your model by the DPM-Solver-v3 Statistics node, for few-step sampling "
                "(5-10 steps). One model call per step; the pseudo-corrector reuses it. Sample with the model, CFG "
                "and latent size the statistics were computed for. Without statistics and with the corrector off "
                "it is exactly DPM-Solver++ (2M / 3M)."
            ),
            inputs=[
                io.Int.Input("order", default=2, min=1, max=3,
                             tooltip="Predictor order: how many past model outputs each step uses. 2 for guided "
                                     "sampling (the paper's choice with CFG), 3 unguided."),
                io.Boolean.Input("corrector", default=True,
                                 tooltip="Pseudo-corrector: revise each state with the model output just computed "
                                         "(no extra call). Helps most at 5-8 steps."),
                io.Boolean.Input("lower_order_final", default=True,
                                 tooltip="Use lower orders on the last steps of runs shorter than 10 steps."),
                Statistics.Input("statistics", optional=True,
                                 tooltip="From DPM-Solver-v3 Statistics. Left unconnected: the degenerate "
                                         "statistics l = 1, s = b = 0, under which this node with corrector off "
                                         "is exactly DPM-Solver++ 2M / 3M (order 2 / 3)."),
            ],
            outputs=[io.Sampler.Output(tooltip="A SAMPLER for SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, order: int, corrector: bool, lower_order_final: bool,
                statistics: v3.Statistics | None = None) -> io.NodeOutput:
        if statistics is not None and not isinstance(statistics, v3.Statistics):
            raise cls.error("the statistics input must come from the DPM-Solver-v3 Statistics node.")
        options = {**SOLVER_DEFAULTS, "order": order, "corrector": corrector, "lower_order_final": lower_order_final,
                   "statistics": statistics}
        fn = with_model_parameterisation(_checked_shape(v3.sample_dpm_solver_v3))
        return io.NodeOutput(comfy.samplers.KSAMPLER(fn, extra_options=options))


def _checked_shape(fn):
    """Turn the solver's shape mismatch into a message that names the node and the fix."""

    @functools.wraps(fn)
    def sampler(model, x, sigmas, *args, statistics=None, **kwargs):
        if statistics is not None and tuple(x.shape[1:]) != statistics.shape:
            raise ValueError(f"{SAMPLER_NAME}: the statistics were computed for latents of shape "
                             f"{statistics.shape}, this run's latent is {tuple(x.shape[1:])}. Compute statistics "
                             f"with {STATS_NAME} for this latent size.")
        return fn(model, x, sigmas, *args, statistics=statistics, **kwargs)

    return sampler


def sample_from_saved(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """The KSampler name: the newest statistics saved for this model, CFG and latent shape, or a clear error."""
    guider = getattr(model, "inner_model", None)
    patcher = getattr(guider, "model_patcher", None)
    if patcher is None:
        raise TypeError(f"{KSAMPLER_NAME}: run it through KSampler, SamplerCustom or SamplerCustomAdvanced.")
    cfg = run_cfg(model)  # BasicGuider: one prompt, no guidance, the statistics computed at CFG 1
    if cfg is None:
        raise ValueError(f"{SAMPLER_NAME} ({KSAMPLER_NAME}): statistics are keyed by one CFG scale, and this run's "
                         f"guider ({type(guider).__name__}) has none. Use it with KSampler / CFGGuider / BasicGuider, "
                         "or the DPM-Solver-v3 sampler node with its statistics linked.")
    found = saved_statistics(model_fingerprint(patcher), cfg, x.shape[1:])
    if found is None:
        raise ValueError(
            f"{SAMPLER_NAME} ({KSAMPLER_NAME}): no statistics are saved for this model at CFG {cfg:g} and latent "
            f"shape {tuple(x.shape[1:])} in {calibration_folder()}. Run the '{STATS_NAME}' node once with this "
            "model, CFG and latent size, or use the DPM-Solver-v3 sampler node with its statistics linked.")
    kind = parameterisation_of(model_sampling_of(model))
    return v3.sample_dpm_solver_v3(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                   statistics=found[0], parameterisation=kind, **SOLVER_DEFAULTS)


NODES = [PreprintDPMSolverV3Statistics, PreprintSamplerDPMSolverV3]


def on_load() -> None:
    register_ksampler_name(KSAMPLER_NAME, sample_from_saved)


