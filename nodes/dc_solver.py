"""DC-Solver nodes: the sampler (UniPC-bh2 with dynamic compensation), the search for its ratios and their cascade
polynomial regression (CPR).

Zhao et al., "DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic Compensation",
arXiv:2409.03755. Maths in ``samplers/dc_solver.py``.

The search runs inside ComfyUI's own sampling call (a CFGGuider with a sampler function that returns its input), so
it sees exactly the denoiser a sampler would: model loaded, conds prepared, patches and CFG applied. ComfyUI runs
nodes in inference mode and loads weights as inference tensors, which cannot take part in a backward pass: the
search therefore differentiates through the solver with each model output held fixed (``model_gradient=False``),
outside inference mode. Found ratios are saved with ``utils.calibration_store`` and read back instead of searching
again. The CPR Fit node searches a grid of (steps, CFG) settings (or reads them) and fits the paper's cascade
polynomial regression (``samplers/dc_cpr.py``) through them, saved per model, latent shape and scheduler; the sampler
then finds ratios for a run's own step count and CFG at sampling time: searched for exactly that setting if saved,
else predicted by the fit.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..samplers import dc_cpr
from ..samplers import dc_solver as dc
from ..utils import calibration_store as store
from ._host import (
    calibration_folder,
    model_fingerprint,
    model_sampling_of,
    parameterisation_of,
    run_cfg,
    with_guided_denoiser,
)
from ._inputs import PreprintNode, advanced, calibration_inputs

log = logging.getLogger("preprint")

CATEGORY = "Preprint/samplers"
SAMPLER_NAME = "DC-Solver"
SEARCH_NAME = "DC-Solver Ratio Search"
CPR_NAME = "DC-Solver CPR Fit"
KIND = "dc_solver"  # calibration kind: files are dc_solver-<digest>.safetensors
CPR_KIND = "dc_solver_cpr"  # one fit per model, latent shape and scheduler
MODES = ("auto", "searched", "cpr", "plain")
PAPER = ("Zhao et al., 'DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic Compensation', "
         "arXiv:2409.03755")
ITERATIONS, LR = 20, 0.1  # the paper's search settings (Sec. 4)

Ratios = io.Custom("PREPRINT_DC_RATIOS")
CPR = io.Custom("PREPRINT_DC_CPR")


def scheduler_options() -> list[str]:
    return [n for n in comfy.samplers.SCHEDULER_NAMES if not n.startswith("preprint_")]


def search_key(model, cfg: float, shape, steps: int, reference_steps: int, scheduler: str, samples: int,
               seed: int, fingerprint: str | None = None, iterations: int = ITERATIONS) -> dict:
    """What saved ratios are valid for: the model (weights, LoRAs, sampling type and shift), CFG, latent shape,
    the step count and schedule they were fitted on, and the search's own settings."""
    return {"model": fingerprint or model_fingerprint(model), "cfg": float(cfg), "shape": [int(s) for s in shape],
            "steps": int(steps), "reference_steps": int(reference_steps), "scheduler": scheduler,
            "samples": int(samples), "seed": int(seed), "iterations": int(iterations), "lr": LR}


def cpr_key(fingerprint: str, shape, scheduler: str) -> dict:
    """A CPR fit is valid for one model, latent shape and scheduler (any step count and CFG): a new fit replaces it."""
    return {"model": fingerprint, "shape": [int(s) for s in shape], "scheduler": scheduler}


def run_search(model, positive, negative, latent: torch.Tensor, cfg: float, sigmas: torch.Tensor,
               reference_sigmas: torch.Tensor, samples: int, seed: int,
               iterations: int = ITERATIONS) -> dc.SearchResult:
    """Reference run and ratio fit on ``samples`` seeded noises, through ComfyUI's CFGGuider."""
    zeros = torch.zeros((samples, *latent.shape[1:]), dtype=latent.dtype)
    # core's prepare_noise values for this seed, from a private generator (never the global one)
    noise = torch.randn(zeros.shape, dtype=zeros.dtype, generator=torch.Generator().manual_seed(seed))
    steps = len(sigmas) - 1
    bar = comfy.utils.ProgressBar(len(reference_sigmas) - 1 + (iterations + 1) * steps)

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
            return dc.search_ratios(lambda xx, s: denoise(xx, s).clone(), x0, sigmas_in.clone(), ref, iterations, LR,
                                    parameterisation=kind, model_gradient=False, progress_fn=progress)

    return with_guided_denoiser(model, positive, negative, cfg, noise, zeros, sigmas, seed, search)


def _schedule_matches(model_sampling, scheduler: str, sigmas: torch.Tensor) -> bool:
    """Whether ``sigmas`` is ``scheduler``'s list for its own step count on this model: saved ratios belong to the
    schedule they were fitted on (a denoise below 1, or another scheduler, gives another list)."""
    try:
        expected = comfy.samplers.calculate_sigmas(model_sampling, scheduler, len(sigmas) - 1)
    except Exception:  # a scheduler this ComfyUI no longer has
        return False
    got = sigmas.detach().to("cpu", torch.float32)
    return expected.shape == got.shape and torch.allclose(expected.to(torch.float32), got, rtol=1e-4, atol=1e-6)


def saved_search(fingerprint: str, cfg: float, shape, sigmas: torch.Tensor,
                 model_sampling) -> tuple[torch.Tensor, str] | None:
    """The newest ratios searched for this model, CFG, latent shape, step count and schedule (any search settings)."""
    want, steps = [int(s) for s in shape], len(sigmas) - 1
    for path, key, _ in store.listing(calibration_folder(), KIND):
        if (key.get("model") == fingerprint and key.get("cfg") == float(cfg) and key.get("shape") == want
                and key.get("steps") == steps and _schedule_matches(model_sampling, key.get("scheduler"), sigmas)):
            tensors, _, _ = store.read(path)
            return tensors["ratios"].to(torch.float64), str(path)
    return None


def saved_cpr(fingerprint: str, shape, sigmas: torch.Tensor, model_sampling) -> tuple[dict, str] | None:
    """The CPR fit saved for this model and latent shape whose scheduler gives this run's sigmas."""
    want = [int(s) for s in shape]
    for path, key, _ in store.listing(calibration_folder(), CPR_KIND):
        if (key.get("model") == fingerprint and key.get("shape") == want
                and _schedule_matches(model_sampling, key.get("scheduler"), sigmas)):
            tensors, _, _ = store.read(path)
            return cpr_output(tensors, key), str(path)
    return None


def cpr_output(tensors: dict, key: dict) -> dict:
    """A CPR fit as the CPR Fit node outputs it (and as it is saved: coefficients and the fitted ranges)."""
    return {"coefficients": tensors["coefficients"].to(torch.float64),
            "steps_range": tuple(int(v) for v in tensors["steps_range"].tolist()),
            "cfg_range": tuple(float(v) for v in tensors["cfg_range"].tolist()),
            "scheduler": key["scheduler"], "shape": list(key["shape"])}


def predicted(fit: dict, steps: int, cfg: float) -> torch.Tensor:
    warning = dc_cpr.outside_range(fit["steps_range"], fit["cfg_range"], steps, cfg)
    if warning:
        log.warning("%s: %s.", SAMPLER_NAME, warning)
    return dc_cpr.predict_ratios(fit["coefficients"], steps, cfg)


def choose_ratios(mode: str, ratios: dict | None, fit: dict | None, model_k, x: torch.Tensor,
                  sigmas: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """(ratios or None for plain UniPC, where they came from) for one sampling run; see the node's ``mode``."""
    if mode == "plain":
        return None, "plain UniPC (mode 'plain')"
    if ratios is not None and mode in ("auto", "searched"):
        return ratios["ratios"].to(torch.float64), "the linked searched ratios"
    steps, cfg = len(sigmas) - 1, run_cfg(model_k)
    patcher = getattr(getattr(model_k, "inner_model", None), "model_patcher", None)
    if cfg is None or patcher is None:
        why = ("ratios are chosen by the run's CFG scale, and this run's guider has none; use a CFGGuider or "
               "BasicGuider, or link searched ratios")
        if mode == "auto" and fit is None:  # a linked fit asked for CPR: that needs the scale
            log.warning("%s: %s. Sampling as plain UniPC-bh2.", SAMPLER_NAME, why)
            return None, "plain UniPC (no CFG scale to look ratios up by)"
        raise ValueError(f"{SAMPLER_NAME} (mode '{mode}'): {why}.")
    fingerprint = model_fingerprint(patcher)
    ms = model_sampling_of(model_k)
    if mode in ("auto", "searched"):
        found = saved_search(fingerprint, cfg, x.shape[1:], sigmas, ms)
        if found is not None:
            return found[0], f"ratios searched for {steps} steps at CFG {cfg:g} ({found[1]})"
    if mode in ("auto", "cpr"):
        if fit is not None:
            return predicted(fit, steps, cfg), f"the linked CPR fit at {steps} steps, CFG {cfg:g}"
        found = saved_cpr(fingerprint, x.shape[1:], sigmas, ms)
        if found is not None:
            return predicted(found[0], steps, cfg), f"the CPR fit {found[1]} at {steps} steps, CFG {cfg:g}"
    what = {"searched": "no ratios are", "cpr": "no CPR fit is", "auto": "neither ratios nor a CPR fit are"}[mode]
    message = (f"{what} saved for this model at {steps} steps, CFG {cfg:g}, latent shape {tuple(x.shape[1:])} and "
               f"this schedule in {calibration_folder()}. Run '{SEARCH_NAME}' for this setting or '{CPR_NAME}' once "
               "for the model (with the scheduler you sample with)")
    if mode == "auto":
        log.warning("%s: %s; sampling as plain UniPC-bh2 (ratio 1).", SAMPLER_NAME, message)
        return None, "plain UniPC (nothing saved)"
    raise ValueError(f"{SAMPLER_NAME} (mode '{mode}'): {message}, or set mode to 'auto'.")


def sample_dc(model, x, sigmas, extra_args=None, callback=None, disable=None, mode: str = "auto",
              ratios: dict | None = None, cpr_fit: dict | None = None):
    """The DC-Solver SAMPLER: ratios chosen for this run (``choose_ratios``), then UniPC-bh2 with compensation."""
    rho, source = choose_ratios(mode, ratios, cpr_fit, model, x, sigmas)
    log.info("%s: %s%s", SAMPLER_NAME, source, "" if rho is None else f": {[round(float(r), 4) for r in rho]}")
    kind = parameterisation_of(model_sampling_of(model))
    return dc.sample_dc_solver(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                               ratios=rho, order=2, parameterisation=kind)


class PreprintDCSolver(PreprintNode):
    NAME = SAMPLER_NAME
    ALIASES = ("DC-Solver", "dynamic compensation", "UniPC", "uni_pc_bh2", "predictor corrector", "CPR")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintDCSolver",
            category=CATEGORY,
            description=(
                f"DC-Solver ({PAPER}): UniPC (B2(h) = 'bh2', order 2, predictor + corrector, data prediction) "
                "whose newest model output is replaced by a Lagrange interpolation through the last three outputs "
                "at a point set per step by a compensation ratio. The ratios are found when sampling, for the run's "
                f"own model, step count, CFG, latent size and schedule: searched by '{SEARCH_NAME}' for exactly that "
                f"setting, else predicted by the cascade polynomial regression of '{CPR_NAME}' (the paper's CPR, "
                "Sec. 3.4), else ratio 1 (plain UniPC). One model call per step."
            ),
            inputs=[
                io.Combo.Input("mode", options=list(MODES), default="auto",
                               tooltip="auto: linked ratios, else ratios saved for this exact setting, else the CPR "
                                       "fit (linked or saved), else plain UniPC with a warning in the log. searched: "
                                       "linked or saved searched ratios only (error if none). cpr: the CPR fit only "
                                       "(error if none). plain: ratio 1 at every step (UniPC-bh2, order 2)."),
                Ratios.Input("ratios", optional=True,
                             tooltip=f"Compensation ratios from '{SEARCH_NAME}', for the same step count as the "
                                     "sigmas. Not connected: looked up in the saved searches (mode auto / searched)."),
                CPR.Input("cpr", optional=True,
                          tooltip=f"A CPR fit from '{CPR_NAME}': predicts the ratios for the run's step count and "
                                  "CFG. Not connected: the fit saved for the model, latent size and schedule is "
                                  "used (mode auto / cpr)."),
            ],
            outputs=[io.Sampler.Output(tooltip="A SAMPLER for SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, mode: str | None = None) -> bool | str:
        return cls.check_widgets(mode=mode)

    @classmethod
    def execute(cls, mode: str = "auto", ratios: dict | None = None, cpr: dict | None = None) -> io.NodeOutput:
        if mode not in MODES:
            raise cls.error(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
        if ratios is not None:
            if not isinstance(ratios, dict) or "ratios" not in ratios:
                raise cls.error(f"'ratios' must come from the '{SEARCH_NAME}' node.")
            ratios = {**ratios, "ratios": ratios["ratios"].to(torch.float64)}
        if cpr is not None and (not isinstance(cpr, dict) or "coefficients" not in cpr):
            raise cls.error(f"'cpr' must come from the '{CPR_NAME}' node.")
        if mode == "plain" and (ratios is not None or cpr is not None):
            raise cls.error("mode 'plain' samples with ratio 1 and would ignore the linked ratios / CPR fit; set "
                            "mode to 'auto' or disconnect them.")
        if mode == "cpr" and ratios is not None:
            raise cls.error("mode 'cpr' would ignore the linked searched ratios; set mode to 'auto' or 'searched', "
                            "or disconnect them.")
        if mode == "searched" and cpr is not None:
            raise cls.error("mode 'searched' would ignore the linked CPR fit; set mode to 'auto' or 'cpr', or "
                            "disconnect it.")
        options = {"mode": mode, "ratios": ratios, "cpr_fit": cpr}
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_dc, extra_options=options))


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
                *calibration_inputs("fit the ratios for", latent=False),
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
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        rho, sigmas = searched(cls, model, positive, negative, latent, cfg, steps, reference_steps, scheduler, samples,
                               seed, recompute)
        return io.NodeOutput({"ratios": rho, "steps": steps, "scheduler": scheduler}, sigmas)


def searched(node, model, positive, negative, latent: torch.Tensor, cfg: float, steps: int, reference_steps: int,
             scheduler: str, samples: int, seed: int, recompute: bool = False, fingerprint: str | None = None,
             iterations: int = ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratios, sigmas) of one (steps, CFG) setting: read from the calibration folder, else searched and saved."""
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps).to(torch.float32).cpu()
    key = search_key(model, cfg, latent.shape[1:], steps, reference_steps, scheduler, samples, seed, fingerprint,
                     iterations)
    folder = calibration_folder()
    saved = None if recompute else store.load(folder, KIND, key)
    if saved is not None:
        rho = saved[0]["ratios"].to(torch.float64)
        log.info("DC-Solver: %d-step ratios at cfg %g read from %s: %s", steps, cfg, store.path_for(folder, KIND, key),
                 [round(float(r), 4) for r in rho])
        return rho, sigmas
    fine = comfy.samplers.calculate_sigmas(ms, scheduler, reference_steps).to(torch.float32).cpu()
    log.info("DC-Solver: fitting %d-step ratios to a %d-step reference (%s), %d samples, cfg %g", steps,
             reference_steps, scheduler, samples, cfg)
    try:
        result = run_search(model, positive, negative, latent, cfg, sigmas, fine, samples, seed, iterations)
    except ValueError as e:
        raise node.error(str(e)) from None
    rho = result.ratios.to(torch.float64)
    path = store.save(folder, KIND, key, {"ratios": rho, "losses": torch.tensor(result.losses)},
                      {"sampling": type(ms).__name__})
    log.info("DC-Solver: ratios %s (MSE to the reference %.4g with ratio 1, %.4g fitted), saved to %s",
             [round(float(r), 4) for r in rho], result.losses[0], min(result.losses), path)
    return rho, sigmas


def parse_list(text: str, name: str, cast) -> list:
    """'5, 7, 10' -> [5, 7, 10]: the CPR grid widgets (commas or spaces); a clear error naming the widget."""
    items = [t for t in str(text).replace(",", " ").split() if t]
    try:
        values = [cast(t) for t in items]
    except ValueError:
        raise ValueError(f"{name} must be numbers separated by commas, got {text!r}.") from None
    if len(set(values)) < dc_cpr.QUADRATIC:
        raise ValueError(f"{name} = {text!r} holds {len(set(values))} distinct value(s); {dc_cpr.NEEDED}.")
    return sorted(set(values))


class PreprintDCSolverCPRFit(PreprintNode):
    NAME = CPR_NAME
    ALIASES = ("DC-Solver", "CPR", "cascade polynomial regression", "compensation ratios", "calibrate")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintDCSolverCPRFit",
            category=CATEGORY,
            description=(
                f"Cascade polynomial regression (CPR, {PAPER}, Sec. 3.4): DC-Solver's compensation ratios for ANY "
                "step count and CFG of this model, with no search at sampling time. Searches the grid "
                f"steps_list x cfg_list as '{SEARCH_NAME}' does (settings already saved are read, not searched "
                "again), then fits by least squares, in cascade: a polynomial in step / steps through each "
                "setting's ratios, its coefficients quadratic in CFG / 12 for each step count, theirs quadratic in "
                "steps / 50. Needs 3 or more step counts and 3 or more CFG scales (9 searches). The fit is saved "
                "for the model, latent size and scheduler, and the DC-Solver sampler uses it for any setting not "
                "searched. Cost of each missing search: reference_steps + (iterations + 1) x steps guided calls of the "
                "samples."
            ),
            inputs=[
                *calibration_inputs("fit for"),
                io.Combo.Input("scheduler", options=scheduler_options(), default="karras",
                               tooltip="Scheduler of every search; the fit serves runs with this scheduler."),
                io.String.Input("steps_list", default="5, 7, 10",
                                tooltip="Step counts searched (3 or more, 3 to 100 each); the fit serves step "
                                        "counts between them best (it extrapolates outside, with a warning)."),
                io.String.Input("cfg_list", default="3, 6, 9",
                                tooltip="CFG scales searched at every step count (3 or more): span the scales you "
                                        "sample with."),
                advanced(io.Int.Input("step_degree", default=2, min=0, max=4,
                                      tooltip="Degree of the polynomial in step / steps. A search determines it "
                                              "only with degree + 1 compensated steps (steps index 2 on): 2 needs "
                                              "5 steps on EPS models, 6 on flow models.")),
                advanced(io.Int.Input("reference_steps", default=200, min=4, max=1000,
                                      tooltip="Steps of each search's plain UniPC reference (the paper's 200).")),
                advanced(io.Int.Input("samples", default=10, min=1, max=256,
                                      tooltip="Seeded noises of each search (the paper's 10).")),
                advanced(io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                                      tooltip="Seed of the search noises (fixed, so saved searches are found "
                                              "again).")),
                advanced(io.Int.Input("iterations", default=ITERATIONS, min=1, max=200,
                                      tooltip=f"AdamW iterations of each search (the paper's {ITERATIONS}); fewer "
                                              "is cheaper and less exact.")),
            ],
            outputs=[CPR.Output(tooltip="The fitted CPR: connect to the DC-Solver sampler's 'cpr' input (it is "
                                        "also saved and found there without the link).")],
        )

    @classmethod
    def validate_inputs(cls, scheduler: str | None = None, steps_list: str | None = None,
                        cfg_list: str | None = None, step_degree: int | None = None,
                        reference_steps: int | None = None, samples: int | None = None,
                        iterations: int | None = None) -> bool | str:
        return cls.check_widgets(scheduler=scheduler, steps_list=steps_list, cfg_list=cfg_list,
                                 step_degree=step_degree, reference_steps=reference_steps, samples=samples,
                                 iterations=iterations)

    @classmethod
    def check_values(cls, steps_list=None, cfg_list=None, reference_steps=None, **_) -> None:
        steps = parse_list(steps_list, "steps_list", int) if steps_list is not None else None
        if cfg_list is not None:
            cfgs = parse_list(cfg_list, "cfg_list", float)
            if not all(0.0 <= c <= 100.0 for c in cfgs):
                raise ValueError(f"cfg_list = {cfg_list!r}: every CFG must be between 0 and 100.")
        if steps is not None:
            if not all(3 <= n <= 100 for n in steps):
                raise ValueError(f"steps_list = {steps_list!r}: every step count must be between 3 and 100.")
            if reference_steps is not None and reference_steps <= max(steps):
                raise ValueError(f"reference_steps ({reference_steps}) must exceed the largest step count "
                                 f"({max(steps)}): the reference is the fine run the searches are fitted to.")

    @classmethod
    def execute(cls, model, positive, negative, latent_image, scheduler: str, steps_list: str, cfg_list: str,
                step_degree: int, reference_steps: int, samples: int, seed: int,
                iterations: int = ITERATIONS) -> io.NodeOutput:
        checked = cls.validate_inputs(scheduler=scheduler, steps_list=steps_list, cfg_list=cfg_list,
                                      step_degree=step_degree, reference_steps=reference_steps, samples=samples,
                                      iterations=iterations)
        if checked is not True:
            raise ValueError(checked)
        steps_grid, cfg_grid = parse_list(steps_list, "", int), parse_list(cfg_list, "", float)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        fingerprint = model_fingerprint(model)
        kind = parameterisation_of(model.get_model_object("model_sampling"))
        settings = []
        for steps in steps_grid:
            for cfg in cfg_grid:
                rho, sigmas = searched(cls, model, positive, negative, latent, cfg, steps, reference_steps,
                                       scheduler, samples, seed, fingerprint=fingerprint, iterations=iterations)
                settings.append(dc_cpr.SearchedSetting(steps, cfg, rho, dc.compensated(sigmas, kind)))
        try:
            fit = dc_cpr.fit_cpr(settings, step_degree)
        except ValueError as e:
            raise cls.error(str(e).removeprefix("DC-Solver CPR: ")) from None
        key = cpr_key(fingerprint, latent.shape[1:], scheduler)
        tensors = {"coefficients": fit.coefficients,
                   "steps_range": torch.tensor(fit.steps_range, dtype=torch.float64),
                   "cfg_range": torch.tensor(fit.cfg_range, dtype=torch.float64)}
        path = store.save(calibration_folder(), CPR_KIND, key, tensors,
                          {"steps": steps_grid, "cfg": cfg_grid, "step_degree": step_degree,
                           "reference_steps": reference_steps, "samples": samples, "seed": seed,
                           "iterations": iterations})
        log.info("DC-Solver: CPR fitted on steps %s x CFG %s (degree %d in step / steps), saved to %s", steps_grid,
                 cfg_grid, step_degree, path)
        return io.NodeOutput(cpr_output(tensors, key))


NODES = [PreprintDCSolver, PreprintDCSolverSearch, PreprintDCSolverCPRFit]
