"""DC-Solver nodes: the sampler (UniPC-bh2 with dynamic compensation) and the search for its ratios.

Zhao et al., "DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic Compensation",
arXiv:2409.03755. Maths in ``samplers/dc_solver.py``.

The search runs inside ComfyUI's own sampling call (a CFGGuider with a sampler function that returns its input), so
it sees exactly the denoiser a sampler would: model loaded, conds prepared, patches and CFG applied. ComfyUI runs
nodes in inference mode and loads weights as inference tensors, which cannot take part in a backward pass: the
search therefore differentiates through the solver with each model output held fixed (``model_gradient=False``),
outside inference mode. Found ratios are saved with ``utils.calibration_store`` and read back instead of searching
again.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..samplers import dc_solver as dc
from ..utils import calibration_store as store
from ._host import (
    calibration_folder,
    model_fingerprint,
    parameterisation_of,
    with_guided_denoiser,
    with_model_parameterisation,
)
from ._inputs import PreprintNode

log = logging.getLogger("preprint")

CATEGORY = "Preprint/samplers"
SAMPLER_NAME = "DC-Solver"
SEARCH_NAME = "DC-Solver Ratio Search"
KIND = "dc_solver"  # calibration kind: files are dc_solver-<digest>.safetensors
PAPER = ("Zhao et al., 'DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic Compensation', "
         "arXiv:2409.03755")
ITERATIONS, LR = 20, 0.1  # the paper's search settings (Sec. 4)

Ratios = io.Custom("PREPRINT_DC_RATIOS")


def scheduler_options() -> list[str]:
    return [n for n in comfy.samplers.SCHEDULER_NAMES if not n.startswith("preprint_")]


def search_key(model, cfg: float, shape, steps: int, reference_steps: int, scheduler: str, samples: int,
               seed: int) -> dict:
    """What saved ratios are valid for: the model (weights, LoRAs, sampling type and shift), CFG, latent shape,
    the step count and schedule they were fitted on, and the search's own settings."""
    return {"model": model_fingerprint(model), "cfg": float(cfg), "shape": [int(s) for s in shape],
            "steps": int(steps), "reference_steps": int(reference_steps), "scheduler": scheduler,
            "samples": int(samples), "seed": int(seed), "iterations": ITERATIONS, "lr": LR}


def run_search(model, positive, negative, latent: torch.Tensor, cfg: float, sigmas: torch.Tensor,
               reference_sigmas: torch.Tensor, samples: int, seed: int) -> dc.SearchResult:
    """Reference run and ratio fit on ``samples`` seeded noises, through ComfyUI's CFGGuider."""
    zeros = torch.zeros((samples, *latent.shape[1:]), dtype=latent.dtype)
    # core's prepare_noise values for this seed, from a private generator (never the global one)
    noise = torch.randn(zeros.shape, dtype=zeros.dtype, generator=torch.Generator().manual_seed(seed))
    steps = len(sigmas) - 1
    bar = comfy.utils.ProgressBar(len(reference_sigmas) - 1 + (ITERATIONS + 1) * steps)

    def progress(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(len(reference_sigmas) - 1 + done * steps)

    def search(denoise, x, sigmas_in):
        kind = parameterisation_of(model.get_model_object("model_sampling"))
        with torch.inference_mode(False), torch.enable_grad():
            x0 = x.clone()  # x was made in inference mode; autograd needs an ordinary tensor
            fine = reference_sigmas.to(sigmas_in)
            with torch.no_grad():
                ref = dc.dc_unipc(lambda xx, s: denoise(xx, s).clone(), x0, fine, parameterisation=kind)
            bar.update_absolute(len(fine) - 1)
            return dc.search_ratios(lambda xx, s: denoise(xx, s).clone(), x0, sigmas_in.clone(), ref, ITERATIONS, LR,
                                    parameterisation=kind, model_gradient=False, progress_fn=progress)

    return with_guided_denoiser(model, positive, negative, cfg, noise, zeros, sigmas, seed, search)


class PreprintDCSolver(PreprintNode):
    NAME = SAMPLER_NAME
    ALIASES = ("DC-Solver", "dynamic compensation", "UniPC", "uni_pc_bh2", "predictor corrector")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintDCSolver",
            category=CATEGORY,
            description=(
                f"DC-Solver ({PAPER}): UniPC (B2(h) = 'bh2', order 2, predictor + corrector, data prediction) "
                "whose newest model output is replaced by a Lagrange interpolation through the last three outputs "
                "at a point set per step by a compensation ratio. The ratios come from the 'DC-Solver Ratio "
                "Search' node, fitted on your model, CFG, size and step count. One model call per step."
            ),
            inputs=[
                Ratios.Input("ratios", optional=True,
                             tooltip="Compensation ratios from the 'DC-Solver Ratio Search' node, for the same step "
                                     "count as the sigmas. Not connected: plain UniPC-bh2 at order 2 (ratio 1 at "
                                     "every step)."),
            ],
            outputs=[io.Sampler.Output(tooltip="A SAMPLER for SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, ratios: dict | None = None) -> io.NodeOutput:
        rho = None
        if ratios is not None:
            if not isinstance(ratios, dict) or "ratios" not in ratios:
                raise cls.error("'ratios' must come from the 'DC-Solver Ratio Search' node.")
            rho = ratios["ratios"].to(torch.float64)
        fn = with_model_parameterisation(dc.sample_dc_solver)
        return io.NodeOutput(comfy.samplers.KSAMPLER(fn, extra_options={"ratios": rho, "order": 2}))


class PreprintDCSolverSearch(PreprintNode):
    NAME = SEARCH_NAME
    ALIASES = ("DC-Solver", "dynamic compensation", "compensation ratios", "calibrate", "UniPC")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintDCSolverSearch",
            category=CATEGORY,
            description=(
                f"Fits DC-Solver's compensation ratios ({PAPER}) on YOUR model, CFG, latent size and step count: "
                f"a reference_steps-step UniPC run from seeded noises is the target, and AdamW (lr {LR}, "
                f"{ITERATIONS} iterations) moves one ratio per step to bring the steps-step DC-Solver end point "
                "closer to it. Gradients flow through the solver with each model output held fixed (ComfyUI's "
                "weights cannot be differentiated in inference mode). Costs reference_steps + "
                f"{ITERATIONS + 1} x steps model evaluations of the sample batch (x2 with CFG), once: the ratios "
                "are saved in models/preprint_calibration and reused for the same model and settings."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to fit the ratios for (LoRAs and patches included). It "
                                                "is not changed."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning of the search samples."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning of the search samples."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale of the search: use the scale you will sample with (ratios are "
                                       "saved per CFG)."),
                io.Latent.Input("latent_image", tooltip="A latent of the size you will sample (its shape only)."),
                io.Int.Input("steps", default=6, min=3, max=100,
                             tooltip="Steps you will sample with; the ratios are for this count only (the paper "
                                     "targets 5 to 10)."),
                io.Int.Input("reference_steps", default=200, min=4, max=1000,
                             tooltip="Steps of the plain UniPC reference run (the paper uses 200)."),
                io.Combo.Input("scheduler", options=scheduler_options(), default="karras",
                               tooltip="Scheduler for both the searched steps and the reference; sample with the "
                                       "same one."),
                io.Int.Input("samples", default=10, min=1, max=256,
                             tooltip="Seeded noises fitted together as one batch (the paper uses 10)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the search noises (fixed, so saved ratios are found again)."),
                io.Boolean.Input("recompute", default=False,
                                 tooltip="Search again even when ratios are saved for this model and these settings "
                                         "(the new ones replace them)."),
            ],
            outputs=[
                Ratios.Output(tooltip="The fitted compensation ratios: connect to the 'DC-Solver' sampler node."),
                io.Sigmas.Output(tooltip="The steps-step sigmas the ratios were fitted on (the chosen scheduler), "
                                         "for SamplerCustom."),
            ],
        )

    @classmethod
    def validate_inputs(cls, cfg: float | None = None, steps: int | None = None, reference_steps: int | None = None,
                        scheduler: str | None = None, samples: int | None = None) -> bool | str:
        return cls.check_widgets(cfg=cfg, steps=steps, reference_steps=reference_steps, scheduler=scheduler,
                                 samples=samples)

    @classmethod
    def check_values(cls, steps=None, reference_steps=None, **_) -> None:
        if steps is not None and reference_steps is not None and reference_steps <= steps:
            raise ValueError(f"reference_steps ({reference_steps}) must exceed steps ({steps}): the reference is "
                             "the fine run the few-step sampler is fitted to.")

    @classmethod
    def execute(cls, model, positive, negative, cfg: float, latent_image, steps: int, reference_steps: int,
                scheduler: str, samples: int, seed: int, recompute: bool) -> io.NodeOutput:
        checked = cls.validate_inputs(cfg=cfg, steps=steps, reference_steps=reference_steps, scheduler=scheduler,
                                      samples=samples)
        if checked is not True:
            raise ValueError(checked)
        ms = model.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps).to(torch.float32).cpu()
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        key = search_key(model, cfg, latent.shape[1:], steps, reference_steps, scheduler, samples, seed)
        folder = calibration_folder()
        saved = None if recompute else store.load(folder, KIND, key)
        if saved is not None:
            rho = saved[0]["ratios"].to(torch.float64)
            log.info("DC-Solver: %d-step ratios read from %s: %s", steps, store.path_for(folder, KIND, key),
                     [round(float(r), 4) for r in rho])
            return io.NodeOutput({"ratios": rho, "steps": steps, "scheduler": scheduler}, sigmas)
        fine = comfy.samplers.calculate_sigmas(ms, scheduler, reference_steps).to(torch.float32).cpu()
        log.info("DC-Solver: fitting %d-step ratios to a %d-step reference (%s), %d samples, cfg %g", steps,
                 reference_steps, scheduler, samples, cfg)
        try:
            result = run_search(model, positive, negative, latent, cfg, sigmas, fine, samples, seed)
        except ValueError as e:
            raise cls.error(str(e)) from None
        rho = result.ratios.to(torch.float64)
        path = store.save(folder, KIND, key, {"ratios": rho, "losses": torch.tensor(result.losses)},
                          {"sampling": type(ms).__name__})
        log.info("DC-Solver: ratios %s (MSE to the reference %.4g with ratio 1, %.4g fitted), saved to %s",
                 [round(float(r), 4) for r in rho], result.losses[0], min(result.losses), path)
        return io.NodeOutput({"ratios": rho, "steps": steps, "scheduler": scheduler}, sigmas)


NODES = [PreprintDCSolver, PreprintDCSolverSearch]
