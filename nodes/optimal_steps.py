"""Optimal Steps Search: the Optimal Stepsize (OSS) schedule searched on the user's own model, saved, and served to
the stock KSampler by the scheduler name ``preprint_oss``.

Pei, Hu and Gu, "Optimal Stepsize for Diffusion Sampling", arXiv:2503.21774. Maths in ``samplers/optimal_steps.py``.

The search runs inside ComfyUI's own sampling call (a CFGGuider with a sampler function that never steps), so the
denoiser it sees is exactly what a KSampler would use: the model loaded, conds prepared, patches and CFG applied.
A finished search is saved with ``utils.calibration_store`` under the model's fingerprint, CFG, latent shape and
search settings, and read back instead of searching again.

A stock scheduler receives only ``model_sampling`` and the step count, not the model, so ``preprint_oss`` finds the
ModelPatcher whose ``model_sampling`` it was given in its callers' frames (the KSampler holds it as ``self.model``,
BasicScheduler as ``model``) and looks up the newest schedule saved for that model's fingerprint and step count.
"""

from __future__ import annotations

import inspect
import logging

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..samplers import optimal_steps as oss
from ..utils import calibration_store as store
from ._host import calibration_folder, model_fingerprint, with_guided_denoiser
from ._inputs import PreprintNode, advanced, calibration_inputs
from .schedules import register_scheduler_name

log = logging.getLogger("preprint")

CATEGORY = "Preprint/samplers"
NAME = "Optimal Steps Search (Preprint)"
KIND = "oss"  # calibration kind: files are oss-<digest>.safetensors
SCHEDULER = "preprint_oss"
TEACHER_STEPS = (2, 1000)
PAPER = "Pei et al., 'Optimal Stepsize for Diffusion Sampling', arXiv:2503.21774"


def teacher_grid_options() -> list[str]:
    return [n for n in comfy.samplers.SCHEDULER_NAMES if not n.startswith("preprint_")]


def search_key(model, cfg: float, shape, steps: int, teacher_steps: int, teacher_grid: str, samples: int,
               seed: int, aggregate: str) -> dict:
    """What a saved schedule is valid for: the model (weights, LoRA patches, sampling type and sigma range, so a
    Flux shift is part of it), the CFG and latent shape it was searched at, and the search's own settings."""
    return {"model": model_fingerprint(model), "cfg": float(cfg), "shape": [int(s) for s in shape],
            "steps": int(steps), "teacher_steps": int(teacher_steps), "teacher_grid": teacher_grid,
            "samples": int(samples), "seed": int(seed), "aggregate": aggregate}


def teacher_sigmas(model_sampling, grid_name: str, teacher_steps: int) -> torch.Tensor:
    grid = comfy.samplers.calculate_sigmas(model_sampling, grid_name, teacher_steps).to(torch.float32).cpu()
    if len(grid) != teacher_steps + 1 or float(grid[-1]) != 0.0:
        raise ValueError(f"the '{grid_name}' scheduler gives {len(grid) - 1} steps ending at sigma "
                         f"{float(grid[-1]):.4g} for teacher_steps {teacher_steps}; the teacher needs exactly "
                         "teacher_steps steps ending at 0: pick another teacher_grid.")
    try:
        oss.check_grid(grid)
    except ValueError as e:
        raise ValueError(f"teacher_grid '{grid_name}' at {teacher_steps} steps: {e}; pick another teacher_grid or "
                         "fewer teacher_steps.") from None
    return grid


def run_search(model, positive, negative, latent: torch.Tensor, steps: int, teacher_steps: int, cfg: float,
               samples: int, seed: int, grid: torch.Tensor, aggregate: str) -> oss.OSSResult:
    """The search on ``samples`` seeded noises of the latent's shape, through ComfyUI's CFGGuider."""
    # the values of core's prepare_noise for this seed, from a private generator (prepare_noise reseeds the global one)
    zeros = torch.zeros((samples, *latent.shape[1:]), dtype=latent.dtype)
    noise = torch.randn(zeros.shape, dtype=zeros.dtype, generator=torch.Generator().manual_seed(seed))
    bar = comfy.utils.ProgressBar(oss.evaluations(teacher_steps, steps))
    def progress(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return with_guided_denoiser(model, positive, negative, cfg, noise, zeros, grid, seed,
                                lambda denoise, x, sigmas: oss.search(denoise, x, sigmas, steps, aggregate, progress))


class PreprintOptimalStepsSearch(PreprintNode):
    NAME = NAME
    ALIASES = ("optimal steps", "OSS", "optimal stepsize", "schedule search", "scheduler", "sigmas")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintOptimalStepsSearch",
            category=CATEGORY,
            description=(
                f"Optimal Stepsize ({PAPER}): searches the best few-step schedule for YOUR model, CFG, latent size "
                "and Flux / SD3 shift. An Euler teacher of teacher_steps steps solves seeded noises, and dynamic "
                "programming picks the steps-step path on the teacher's grid whose Euler jumps stay closest to the "
                "teacher; the median over the samples is the schedule (the paper's aggregation). Costs about "
                "teacher_steps x steps model evaluations of the sample batch (x2 with CFG), once: the schedule is "
                "saved in models/preprint_calibration and reused for the same model and settings. Outputs the "
                "SIGMAS for SamplerCustom(Advanced), and the model unchanged: connect it to a stock KSampler with "
                f"scheduler '{SCHEDULER}' and the same steps, which then runs after the search and reads the "
                "saved schedule."
            ),
            inputs=[
                *calibration_inputs("search the schedule for"),
                io.Int.Input("steps", default=10, min=1, max=1000,
                             tooltip="Steps of the searched schedule (the paper recommends 10 for Flux, 20 for "
                                     "Wan)."),
                io.Int.Input("teacher_steps", default=100, min=TEACHER_STEPS[0], max=TEACHER_STEPS[1],
                             tooltip="Euler steps of the teacher; the schedule is chosen from its sigmas (the paper "
                                     "uses 100 to 200). The search costs teacher_steps + (steps - 1) x "
                                     "(teacher_steps - steps + 1) model evaluations of the sample batch."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale of the search: use the scale you will sample with (a saved "
                                       "schedule is kept per CFG)."),
                io.Int.Input("samples", default=4, min=1, max=256,
                             tooltip="Seeded noises searched together, as one batch; the schedule is the median "
                                     "of their paths."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the search noises (fixed, so the saved schedule is found again)."),
                io.Combo.Input("teacher_grid", options=teacher_grid_options(), default="simple",
                               tooltip="Scheduler that lays out the teacher's sigmas. simple: the model's own "
                                       "timesteps, shift included, as the official code uses."),
                io.Boolean.Input("recompute", default=False,
                                 tooltip="Search again even when a schedule is saved for this model and these "
                                         "settings (the new one replaces it)."),
                advanced(io.Combo.Input("aggregate", options=list(oss.AGGREGATES), default="median", optional=True,
                                        tooltip="median (the paper): every sample searched on its own, the "
                                                "median step per position. mean (Preprint): one search for the "
                                                "path with the least mean distance over the samples.")),
            ],
            outputs=[
                io.Sigmas.Output(tooltip="The searched schedule: steps + 1 sigmas ending in 0."),
                io.Model.Output(tooltip=f"The input model, unchanged. Connect it to a stock KSampler with scheduler "
                                        f"'{SCHEDULER}' and the same steps: the link makes the KSampler run after "
                                        "the search."),
            ],
        )

    @classmethod
    def validate_inputs(cls, steps: int | None = None, teacher_steps: int | None = None, cfg: float | None = None,
                        samples: int | None = None, teacher_grid: str | None = None,
                        aggregate: str = "median") -> bool | str:
        return cls.check_widgets(steps=steps, teacher_steps=teacher_steps, cfg=cfg, samples=samples,
                                 teacher_grid=teacher_grid, aggregate=aggregate)

    @classmethod
    def check_values(cls, steps=None, teacher_steps=None, **_) -> None:
        if steps is not None and teacher_steps is not None and steps > teacher_steps:
            raise ValueError(f"steps ({steps}) must be at most teacher_steps ({teacher_steps}): the schedule is "
                             "chosen from the teacher's sigmas; raise teacher_steps.")

    @classmethod
    def execute(cls, model, positive, negative, latent_image, steps: int, teacher_steps: int, cfg: float,
                samples: int, seed: int, teacher_grid: str, recompute: bool,
                aggregate: str = "median") -> io.NodeOutput:
        checked = cls.validate_inputs(steps=steps, teacher_steps=teacher_steps, cfg=cfg, samples=samples,
                                      teacher_grid=teacher_grid, aggregate=aggregate)
        if checked is not True:
            raise ValueError(checked)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        key = search_key(model, cfg, latent.shape[1:], steps, teacher_steps, teacher_grid, samples, seed, aggregate)
        folder = calibration_folder()
        saved = None if recompute else store.load(folder, KIND, key)
        if saved is not None:
            sigmas = saved[0]["sigmas"].to(torch.float32)
            log.info("Optimal Steps: %d-step schedule read from %s: %s", steps, store.path_for(folder, KIND, key),
                     [round(float(s), 4) for s in sigmas])
            return io.NodeOutput(sigmas, model)
        ms = model.get_model_object("model_sampling")
        try:
            grid = teacher_sigmas(ms, teacher_grid, teacher_steps)
        except ValueError as e:
            raise cls.error(str(e)) from None
        log.info("Optimal Steps: searching %d steps on a %d-step Euler teacher (%s grid), %d samples, cfg %g, "
                 "%d model evaluations of the batch", steps, teacher_steps, teacher_grid, samples, cfg,
                 oss.evaluations(teacher_steps, steps))
        result = run_search(model, positive, negative, latent, steps, teacher_steps, cfg, samples, seed, grid,
                            aggregate)
        sigmas = result.sigmas.to(device="cpu", dtype=torch.float32)
        path = store.save(folder, KIND, key, {
            "sigmas": sigmas, "indices": result.indices, "sample_indices": result.sample_indices,
            "sample_costs": result.sample_costs, "teacher_sigmas": grid,
        }, {"evaluations": result.evaluations, "sampling": type(ms).__name__})
        log.info("Optimal Steps: %d-step schedule %s (median distance to the teacher %.4g), saved to %s", steps,
                 [round(float(s), 4) for s in sigmas], float(result.sample_costs.median()), path)
        return io.NodeOutput(sigmas, model)


def patcher_of(model_sampling):
    """The ModelPatcher whose ``model_sampling`` is this object, from the callers' frames (innermost first): a stock
    scheduler is handed only ``model_sampling``, while the KSampler (``self.model``), BasicScheduler (``model``)
    and ``comfy.sample.sample`` (``model``) hold the patcher itself."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            for value in list(frame.f_locals.values()):
                for candidate in (value, getattr(value, "model", None)):
                    if isinstance(candidate, comfy.model_patcher.ModelPatcher) and \
                            candidate.get_model_object("model_sampling") is model_sampling:
                        return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def saved_schedule(model, steps: int) -> torch.Tensor:
    """The newest schedule of ``steps`` steps saved for ``model`` (any CFG, shape and search settings), or a clear
    error naming the search node and the step counts saved for this model."""
    fingerprint = model_fingerprint(model)
    saved = store.listing(calibration_folder(), KIND)
    mine = [(path, key) for path, key, _ in saved if key.get("model") == fingerprint]
    for path, key in mine:
        if key.get("steps") == steps:
            log.info("Scheduler '%s': %d-step schedule from %s (cfg %s, latent %s)", SCHEDULER, steps, path,
                     key.get("cfg"), key.get("shape"))
            return store.read(path)[0]["sigmas"].to(torch.float32)
    counts = sorted({int(key["steps"]) for _, key in mine})
    have = (f"saved for this model: {', '.join(map(str, counts))} steps" if counts
            else "none is saved for this model")
    raise ValueError(
        f"Scheduler '{SCHEDULER}': no Optimal Steps schedule of {steps} steps is saved for this model ({have}). Run "
        f"the '{NAME}' node on this model with steps = {steps} first (connect its MODEL output to this sampler so "
        "it runs before), or set the steps to a saved count. A schedule is not resampled to another length: that "
        "would not be the searched one. (A KSampler asks for steps / denoise steps when denoise < 1, and for one "
        "more with dpm_2, dpm_2_ancestral, uni_pc and uni_pc_bh2.)")


def oss_for(model_sampling, steps: int) -> torch.Tensor:
    model = patcher_of(model_sampling)
    if model is None:
        raise ValueError(
            f"Scheduler '{SCHEDULER}': could not find the model this schedule is for (the node asking passed only "
            f"its noise schedule). Use the stock KSampler or BasicScheduler, or the SIGMAS output of the '{NAME}' "
            "node with SamplerCustom.")
    return saved_schedule(model, steps)


NODES = [PreprintOptimalStepsSearch]


def on_load() -> None:
    register_scheduler_name(SCHEDULER, oss_for)
