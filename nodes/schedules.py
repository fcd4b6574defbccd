"""Schedule nodes, and their names in the stock KSampler scheduler list.

Logistic schedule (Lin et al., "Schedule Your Edit: A Simple yet Effective Diffusion Noise Schedule for Image
Editing", arXiv:2410.18756) and GITS (Chen et al., "On the Trajectory Regularity of ODE-based Diffusion
Sampling", arXiv:2405.11326), searched on the user's own model.

Registering ``preprint_logistic`` and ``preprint_gits`` in ``comfy.samplers.SCHEDULER_HANDLERS`` /
``SCHEDULER_NAMES`` is the pack's one documented global change. A stock scheduler only receives the model's
``model_sampling`` and the step count, so ``preprint_gits`` reads the search that the GITS node attached to
the MODEL it outputs (a copy of ``model_sampling`` carrying the cost matrix).
"""

from __future__ import annotations

import copy
import logging

import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io

from ..samplers.gits import METRICS, TEACHERS, CostAccumulator, GITSTable, teacher_trajectory
from ..samplers.schedules import logistic_sigmas
from ._host import parameterisation_of
from ._inputs import PreprintNode

log = logging.getLogger("preprint")

CATEGORY = "Preprint/samplers"
LOGISTIC_NAME = "Logistic Schedule (Preprint)"
GITS_NAME = "GITS Schedule Search (Preprint)"
GITS_ATTR = "preprint_gits"
TEACHER_STEPS = (4, 200)  # range of the teacher_steps widget


def register_scheduler_name(name: str, handler, use_ms: bool = True) -> None:
    """Add a scheduler to the stock KSampler / BasicScheduler dropdowns (the pack's one global change).

    ``SCHEDULER_NAMES`` is the list object every stock node shows, so appending makes the name appear everywhere;
    ``handler(model_sampling, steps)`` (``use_ms``) or ``handler(n, sigma_min, sigma_max)`` returns the sigmas.
    """
    comfy.samplers.SCHEDULER_HANDLERS[name] = comfy.samplers.SchedulerHandler(handler, use_ms=use_ms)
    if name not in comfy.samplers.SCHEDULER_NAMES:
        comfy.samplers.SCHEDULER_NAMES.append(name)


def logistic_for(model_sampling, steps: int, k: float = 15.0, t0: float = 0.5) -> torch.Tensor:
    return logistic_sigmas(steps, parameterisation_of(model_sampling), float(model_sampling.sigma_min),
                           float(model_sampling.sigma_max), k=k, t0=t0)


def gits_for(model_sampling, steps: int) -> torch.Tensor:
    table: GITSTable | None = getattr(model_sampling, GITS_ATTR, None)
    if table is None:
        raise ValueError(
            f"Scheduler 'preprint_gits': this model carries no GITS search. Pass the model through the "
            f"'{GITS_NAME}' node and connect its MODEL output to the KSampler, or pick another scheduler."
        )
    return table.schedule(steps)


def tail_for_denoise(full_steps_fn, steps: int, denoise: float) -> torch.Tensor:
    """As BasicScheduler: denoise < 1 keeps the last ``steps`` of a ``steps / denoise``-step schedule."""
    if denoise <= 0.0:
        return torch.FloatTensor([])
    total = steps if denoise >= 0.9999 else int(steps / denoise)
    return full_steps_fn(total)[-(steps + 1):]


class PreprintLogisticScheduler(PreprintNode):
    NAME = LOGISTIC_NAME
    ALIASES = ("logistic schedule", "scheduler", "sigmas")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintLogisticScheduler",
            category=CATEGORY,
            description=(
                "Logistic noise schedule (Lin et al., 'Schedule Your Edit: A Simple yet Effective Diffusion Noise "
                "Schedule for Image Editing', arXiv:2410.18756): the signal fraction follows a logistic curve in "
                "time, abar(t) = 1 / (1 + exp(k (t - t0))), with no singularity at t = 0. Uniform in log-SNR; on "
                "flow models (Flux, SD3) it gives sigmoid-spaced sigmas. Also in the KSampler scheduler list as "
                "'preprint_logistic' (k 15, t0 0.5)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model whose noise range the schedule is fitted into."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Number of sampling steps."),
                io.Float.Input("k", default=15.0, min=0.1, max=100.0, step=0.5,
                               tooltip="Steepness of the logistic curve over the normalised time t in [0, 1]. "
                                       "Larger spans a wider range of noise levels. 15 is this pack's default (not a "
                                       "value from the paper); with t0 0.5 it equals the 'exponential' scheduler on "
                                       "SD1.5 / SDXL."),
                io.Float.Input("t0", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Midpoint of the curve (where half the signal remains), as a fraction of the "
                                       "training schedule (0.5: this pack's default)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1, the last part of a longer schedule (img2img), as BasicScheduler."),
            ],
            outputs=[io.Sigmas.Output(tooltip="The sigma list, ending in 0, for SamplerCustom(Advanced).")],
        )

    @classmethod
    def execute(cls, model, steps: int, k: float, t0: float, denoise: float) -> io.NodeOutput:
        ms = model.get_model_object("model_sampling")
        return io.NodeOutput(tail_for_denoise(lambda n: logistic_for(ms, n, k, t0), steps, denoise))


GRID_AUTO = "auto"


def grid_options() -> list[str]:
    return [GRID_AUTO] + [n for n in comfy.samplers.SCHEDULER_NAMES if not n.startswith("preprint_")]


_METRIC_TIP = ("How a one-step jump is scored against the teacher. dev (official default and Stable Diffusion "
               "recipe): how far the jump leaves the straight line through the trajectory's ends, minus how far "
               "the teacher does. l2 / l1 (official options): distance to the teacher state as the sampler carries "
               "it. vp_l2 (Preprint): l2 on the variance-preserving state; it beat the others and Karras sigmas on "
               "SD-type models in our exact-score benchmark, where dev lost to Karras.")


def check_gits_steps(steps: int, teacher_steps: int) -> None:
    lo, hi = TEACHER_STEPS
    if not lo <= teacher_steps <= hi:
        raise ValueError(f"teacher_steps must be between {lo} and {hi}, got {teacher_steps}.")
    if not 1 <= steps <= teacher_steps:
        raise ValueError(f"steps ({steps}) must be between 1 and teacher_steps ({teacher_steps}): the schedule is "
                         "chosen from the teacher's grid; raise teacher_steps.")


class PreprintGITSScheduler(PreprintNode):
    NAME = GITS_NAME
    ALIASES = ("GITS", "optimal steps", "scheduler", "sigmas")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintGITSScheduler",
            category=CATEGORY,
            description=(
                "GITS (Chen et al., 'On the Trajectory Regularity of ODE-based Diffusion Sampling', "
                "arXiv:2405.11326): searches the best few-step schedule for YOUR model, prompt, CFG and latent size. "
                "A teacher solves warm-up samples on a fine grid, every one-step jump is scored against it, and "
                "dynamic programming picks the path. Defaults are the official Stable Diffusion recipe (DPM-Solver++ "
                "teacher, 60 steps, 'dev' cost, coeff 1.20, 256 warm-up samples). Costs about warmup_samples x "
                "teacher_steps model evaluations (x2 with CFG), once; the result is cached with the graph. Outputs "
                "the SIGMAS and a MODEL that lets the stock KSampler use the search through the 'preprint_gits' "
                "scheduler."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to search the schedule for (LoRAs and patches included)."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning for the warm-up samples."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning for the warm-up samples."),
                io.Latent.Input("latent_image", tooltip="A latent of the size you will sample (its shape only)."),
                io.Int.Input("steps", default=8, min=1, max=1000, tooltip="Steps of the SIGMAS output."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale of the warm-up samples: use the scale you will sample with."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the warm-up noise."),
                io.Int.Input("warmup_samples", default=256, min=1, max=4096,
                             tooltip="Warm-up samples solved by the teacher (official: 256). The search costs "
                                     "warmup_samples x teacher_steps model evaluations: lower it for a quick, "
                                     "less steady search (a few to a few dozen samples)."),
                io.Int.Input("teacher_steps", default=60, min=TEACHER_STEPS[0], max=TEACHER_STEPS[1],
                             tooltip="Steps of the fine grid the schedule is chosen from (official: 60, i.e. 61 "
                                     "timestamps); also the most steps the search can serve."),
                io.Float.Input("coeff", default=1.2, min=0.5, max=2.0, step=0.01,
                               tooltip="Weight on later jumps in the search (official: 1.15 by default, 1.20 in the "
                                       "Stable Diffusion recipe); 1 weighs all steps equally, larger favours "
                                       "accuracy near the end."),
                io.Combo.Input("grid", options=grid_options(), default=GRID_AUTO,
                               tooltip="Scheduler that lays out the teacher's fine grid. auto: karras for EPS models, "
                                       "simple for flow models."),
                io.Combo.Input("metric", options=list(METRICS), default="dev", optional=True, tooltip=_METRIC_TIP),
                io.Combo.Input("teacher", options=list(TEACHERS), default="dpmpp_2m", optional=True,
                               tooltip="Solver of the warm-up trajectories: dpmpp_2m (DPM-Solver++ 2M, the official "
                                       "Stable Diffusion recipe) or ipndm (the official default)."),
                io.Int.Input("warmup_batch", default=8, min=1, max=256, optional=True,
                             tooltip="Warm-up samples solved per batch: bounds memory (one batch's trajectory is "
                                     "kept on the CPU at a time); does not change the result."),
            ],
            outputs=[
                io.Sigmas.Output(tooltip="The searched schedule for 'steps' steps."),
                io.Model.Output(tooltip="The model carrying the search: pick scheduler 'preprint_gits' in a stock "
                                        "KSampler to use it at any step count up to teacher_steps."),
            ],
        )

    @classmethod
    def validate_inputs(cls, steps: int | None = None, teacher_steps: int | None = None, grid=None, metric="dev",
                        teacher="dpmpp_2m") -> bool | str:
        return cls.check_widgets(steps=steps, teacher_steps=teacher_steps, grid=grid, metric=metric, teacher=teacher)

    @classmethod
    def check_values(cls, steps=None, teacher_steps=None, **_) -> None:
        if steps is not None and teacher_steps is not None:
            check_gits_steps(steps, teacher_steps)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, steps: int, cfg: float, seed: int,
                warmup_samples: int, teacher_steps: int, coeff: float, grid: str, metric: str = "dev",
                teacher: str = "dpmpp_2m", warmup_batch: int = 8) -> io.NodeOutput:
        checked = cls.validate_inputs(steps=steps, teacher_steps=teacher_steps, grid=grid, metric=metric,
                                      teacher=teacher)
        if checked is not True:
            raise ValueError(checked)
        ms = model.get_model_object("model_sampling")
        kind = parameterisation_of(ms)
        grid_name = ("simple" if kind == "flow" else "karras") if grid == GRID_AUTO else grid
        fine = comfy.samplers.calculate_sigmas(ms, grid_name, teacher_steps).to(torch.float32)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        warm = torch.zeros((warmup_samples, *latent.shape[1:]), dtype=latent.dtype)
        noise = comfy.sample.prepare_noise(warm, seed)
        acc = CostAccumulator(fine, kind, metric)

        def solve(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            acc.add(*teacher_trajectory(model_k, x, sigmas, teacher, kind, extra_args))
            return x

        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        log.info("GITS: warm-up of %d samples x %d teacher steps (%s teacher, grid %s, %s cost)", warmup_samples,
                 teacher_steps, teacher, grid_name, metric)
        for chunk_noise, chunk in zip(noise.split(warmup_batch), warm.split(warmup_batch), strict=True):
            guider.sample(chunk_noise, chunk, comfy.samplers.KSAMPLER(solve), fine, seed=seed, disable_pbar=True)
        table = acc.table(coeff, teacher)
        patched_ms = copy.deepcopy(ms)
        setattr(patched_ms, GITS_ATTR, table)
        out = model.clone()
        out.add_object_patch("model_sampling", patched_ms)
        sigmas = table.schedule(steps)
        log.info("GITS: %d-step schedule %s", steps, [round(float(s), 4) for s in sigmas])
        return io.NodeOutput(sigmas, out)


NODES = [PreprintLogisticScheduler, PreprintGITSScheduler]

SCHEDULER_ENTRIES = {"preprint_logistic": logistic_for, "preprint_gits": gits_for}


def on_load() -> None:
    for name, handler in SCHEDULER_ENTRIES.items():
        register_scheduler_name(name, handler)
