"""Annealed and scheduled CFG nodes.

* Scheduled CFG and guidance intervals: Wang et al., "Analysis of Classifier-Free Guidance Weight
  Schedulers", arXiv:2404.13040; Kynkaenniemi et al., "Applying Guidance in a Limited Interval Improves
  Sample and Distribution Quality in Diffusion Models", arXiv:2404.07724.
* Adaptive Guidance: Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion
  Models", arXiv:2312.12487.
* CADS: Sadat et al., "CADS: Unleashing the Diversity of Diffusion Models through Condition-Annealed
  Sampling", arXiv:2310.17347.
* Annealing guidance scale: Yehezkel et al., "Navigating with Annealing Guidance Scale in Diffusion Space",
  arXiv:2506.24108.
* Noise-Level Guidance: Mannering et al., "Noise-Level Diffusion Guidance: Well Begun is Half Done",
  arXiv:2509.13936.

How the MODEL patches stack. Each node records its technique in
``model_options["transformer_options"]["preprint_cfg"]`` (one entry per technique, so a second node of the
same kind replaces the first) and installs one shared set of hooks, each under the key ``preprint_cfg``:

* an OUTER_SAMPLE wrapper that builds the per-run state (sample sigmas, the run's seed, each technique's
  state) and puts it in the run's own copy of the model options;
* a CALC_COND_BATCH wrapper that drops the unconditional cond from the batch when a technique says it is not
  needed at this evaluation (outside a guidance interval, scale exactly 1, Adaptive Guidance converged) and
  hands back the conditional prediction in its place, so every later hook sees ``D_u = D_c``: guidance off,
  and the pass really is not computed;
* a pre-CFG function (Adaptive Guidance measures and masks) and a post-CFG function (scheduled scale).

CADS adds an APPLY_MODEL wrapper ``preprint_cads`` that anneals the conditioning tensors of each chunk.
Nothing lives on a class, a module or the shared diffusion model; a new run starts clean.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import comfy.model_base
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io

from ..guidance import cads
from ..guidance.adaptive_guidance import CRITERIA as ADAPTIVE_CRITERIA
from ..guidance.adaptive_guidance import DEFAULT_THRESHOLD as ADAPTIVE_DEFAULT_THRESHOLD
from ..guidance.adaptive_guidance import AdaptiveGuidanceState
from ..guidance.cfg_schedule import (
    SCHEDULES,
    ScaleSchedule,
    ScheduledGuidance,
    noise_level,
    parse_scale_list,
    retarget,
    step_index,
)
from ..utils.sigma_window import SigmaWindow
from ._host import parameterisation_of, validation_message

log = logging.getLogger("preprint")

CATEGORY = "Preprint/cfg"
TECH_KEY = "preprint_cfg"
RUN_KEY = "preprint_cfg_run"
HOOK_KEY = "preprint_cfg"
CADS_KEY = "preprint_cads"
SCHEDULER_FOLDER = "guidance_schedulers"

WrappersMP = comfy.patcher_extension.WrappersMP
SCHEDULED_CFG_NAME = "Scheduled CFG / Guidance Interval (Preprint)"
CADS_NAME = "CADS Condition Annealing (Preprint)"
# The first is the default, kept from the node's first release so saved workflows sample as before.
CADS_TARGETS = ("positive and negative", "positive only")


# --------------------------------------------------------------------------------------------------------------
# Techniques: configuration (copied with the model) + per-run behaviour (state lives in the run object)


@dataclass(frozen=True)
class _Technique:
    node: str  # display name, for messages
    needs_cfg_pair = False

    def start(self, run: _Run) -> object:
        return None

    def skip_uncond(self, state, run: _Run, sigma: float, batch: int) -> bool:
        return False

    def pre_cfg(self, state, run: _Run, args: dict, out: list) -> list:
        return out

    def post_cfg(self, state, run: _Run, args: dict, denoised: torch.Tensor) -> torch.Tensor:
        return denoised

    def finish(self, state, run: _Run) -> None:
        pass


@dataclass(frozen=True)
class _ScheduledCFG(_Technique):
    guidance: ScheduledGuidance = field(default_factory=ScheduledGuidance)
    skip_at_one: bool = True  # drop the uncond pass where the scale is exactly 1 (nothing else asked for it)
    needs_cfg_pair = True

    def start(self, run: _Run) -> dict:
        self.guidance.schedule.check_steps(run.steps)
        return {"skipped": 0, "evaluations": 0}

    def scale(self, run: _Run, sigma: float, base: float) -> float:
        return self.guidance.scale(sigma, run.t(sigma), run.step(sigma), base)

    def skip_uncond(self, state, run, sigma, batch):
        state["evaluations"] += 1
        skip = not self.guidance.active(sigma) or (self.skip_at_one and self.scale(run, sigma, run.base_cfg) == 1.0)
        state["skipped"] += int(skip)
        return skip

    def post_cfg(self, state, run, args, denoised):
        if run.current is not None and run.current.dropped:
            return denoised  # D_u = D_c already: the result is the conditional prediction
        sigma = float(args["sigma"].reshape(-1)[0])
        used = float(args["cond_scale"])
        return retarget(denoised, args["cond_denoised"], args["uncond_denoised"], used, self.scale(run, sigma, used))

    def finish(self, state, run):
        log.info("%s: unconditional pass skipped on %d of %d evaluations", self.node, state["skipped"],
                 state["evaluations"])


@dataclass(frozen=True)
class _AdaptiveGuidance(_Technique):
    threshold: float = ADAPTIVE_DEFAULT_THRESHOLD
    criterion: str = "velocity"
    needs_cfg_pair = True

    def start(self, run):
        return AdaptiveGuidanceState(self.threshold, self.criterion)

    def skip_uncond(self, state, run, sigma, batch):
        return state.all_converged(batch)

    def pre_cfg(self, state, run, args, out):
        call = run.current
        if call is None or args["conds"][1] is None or len(out) < 2:
            return out
        if "adaptive" in call.dropped_by:
            state.uncond_skipped += 1
            return out
        if call.dropped:
            return out  # another technique skipped the pass: nothing to measure this time
        before = None if state.converged is None else state.converged.clone()
        state.observe(args["input"], out[0], out[1], args["sigma"], run.kind)
        out = list(out)
        out[1] = state.mask_converged(out[0], out[1], before)
        return out

    def finish(self, state, run):
        total = state.uncond_evaluations + state.uncond_skipped
        log.info("%s: %d of %d unconditional passes saved (threshold %.4g)", self.node, state.uncond_skipped,
                 total, self.threshold)


@dataclass(frozen=True)
class _CADS(_Technique):
    config: cads.CADSConfig = field(default_factory=cads.CADSConfig)
    pooled: bool = True
    pooled_dims: int | None = None  # SDXL: only the first 1280 features of ``y`` are the pooled text embedding
    positive_only: bool = False  # leave the unconditional branch's conditioning untouched

    def start(self, run):
        return {"keys": {}}


@dataclass
class _Call:
    sigma: float
    dropped_by: tuple[str, ...] = ()

    @property
    def dropped(self) -> bool:
        return bool(self.dropped_by)


class _Run:
    """Everything one sampling run needs; built by the OUTER_SAMPLE wrapper, dropped when it returns."""

    def __init__(self, guider, techniques: dict[str, _Technique], sigmas: torch.Tensor, seed, noise):
        self.guider_name = type(guider).__name__
        self.techniques = techniques
        self.sample_sigmas = [float(s) for s in sigmas.reshape(-1)]
        self.steps = max(len(self.sample_sigmas) - 1, 0)
        self.model_sampling = guider.model_patcher.get_model_object("model_sampling")
        self.kind = parameterisation_of(self.model_sampling)
        cfg = getattr(guider, "cfg", 1.0)
        self.base_cfg = float(cfg) if isinstance(cfg, (int, float)) else 1.0
        self.seed = int(seed) if seed is not None else cads.content_key(noise)
        self.current: _Call | None = None
        self._t: dict[float, float] = {}
        self._check_guider(guider)
        self.states = {name: tech.start(self) for name, tech in techniques.items()}

    def _check_guider(self, guider) -> None:
        pair = [t for t in self.techniques.values() if t.needs_cfg_pair]
        if not pair:
            return
        names = ", ".join(t.node for t in pair)
        if type(guider).predict_noise is not comfy.samplers.CFGGuider.predict_noise:
            raise ValueError(
                f"{names}: the guider {type(guider).__name__} combines its conditionings itself, so a per-step CFG "
                "scale or a skipped negative pass cannot be applied to it. Use KSampler, SamplerCustom or "
                "CFGGuider with this model, or remove the node (CADS works with every guider)."
            )
        if getattr(guider, "conds", {}).get("negative") is None:
            raise ValueError(
                f"{names}: this run has no negative conditioning ({type(guider).__name__}), so there is no "
                "classifier-free guidance to schedule. Use KSampler or CFGGuider with a negative prompt."
            )

    def t(self, sigma: float) -> float:
        if sigma not in self._t:
            self._t[sigma] = noise_level(sigma, self.model_sampling.percent_to_sigma)
        return self._t[sigma]

    def step(self, sigma: float) -> int:
        return step_index(sigma, self.sample_sigmas)

    def each(self):
        for name, tech in self.techniques.items():
            yield name, tech, self.states[name]

    def finish(self) -> None:
        for _, tech, state in self.each():
            tech.finish(state, self)


def _run_of(options: dict | None) -> _Run | None:
    if not options:
        return None
    to = options.get("transformer_options", options)
    return to.get(RUN_KEY)


# --------------------------------------------------------------------------------------------------------------
# Shared hooks


def _outer_sample(executor, *args, **kwargs):
    guider = executor.class_obj
    to = guider.model_options.setdefault("transformer_options", {})
    techniques = dict(to.get(TECH_KEY, {}))
    if not techniques:
        return executor(*args, **kwargs)
    noise = args[0] if args else kwargs["noise"]
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    seed = args[7] if len(args) > 7 else kwargs.get("seed")
    run = _Run(guider, techniques, sigmas, seed, noise)
    to[RUN_KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        to.pop(RUN_KEY, None)
        run.finish()


def _calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    run = _run_of(model_options)
    if run is None:
        return executor(model, conds, x_in, timestep, model_options)
    sigma = float(timestep.reshape(-1)[0])
    if len(conds) < 2 or conds[1] is None:
        run.current = _Call(sigma)
        return executor(model, conds, x_in, timestep, model_options)
    dropped_by = tuple(name for name, tech, state in run.each()
                       if tech.needs_cfg_pair and tech.skip_uncond(state, run, sigma, x_in.shape[0]))
    run.current = _Call(sigma, dropped_by)
    if not dropped_by:
        return executor(model, conds, x_in, timestep, model_options)
    conds = list(conds)
    conds[1] = None
    out = list(executor(model, conds, x_in, timestep, model_options))
    out[1] = out[0].clone()  # guidance off: every later hook sees D_u = D_c
    return out


def _pre_cfg(args: dict) -> list:
    out = args["conds_out"]
    run = _run_of(args.get("model_options"))
    if run is None:
        return out
    for _, tech, state in run.each():
        out = tech.pre_cfg(state, run, args, out)
    return out


def _post_cfg(args: dict) -> torch.Tensor:
    denoised = args["denoised"]
    run = _run_of(args.get("model_options"))
    if run is None or args.get("uncond") is None:
        return denoised
    for _, tech, state in run.each():
        denoised = tech.post_cfg(state, run, args, denoised)
    return denoised


def _anneal_chunks(t: torch.Tensor, chunks: list[int], uuids: list, run: _Run, tech: _CADS, state: dict, tn: float,
                   sigma: float, stream: int, dims: int | None) -> torch.Tensor:
    n = len(chunks) or 1
    if t.shape[0] % n:
        n = 1
    size = t.shape[0] // n
    parts = []
    for i in range(n):
        part = t[i * size:(i + 1) * size]
        if tech.positive_only and i < len(chunks) and chunks[i] == 1:
            parts.append(part)  # the negative / null conditioning of the unconditional branch
            continue
        cache_key = (uuids[i] if i < len(uuids) else i, stream, tuple(part.shape))
        key = state["keys"].get(cache_key)
        if key is None:
            key = state["keys"][cache_key] = cads.content_key(part if dims is None else part[..., :dims])
        parts.append(cads.anneal_condition(part, tn, tech.config, run.seed, sigma, stream, key=key, dims=dims))
    return torch.cat(parts) if n > 1 else parts[0]


def _cads_apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                      **kwargs):
    transformer_options = {} if transformer_options is None else transformer_options
    run = transformer_options.get(RUN_KEY)
    tech = run.techniques.get("cads") if run is not None else None
    if tech is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    sigma = float(t.reshape(-1)[0])
    tn = run.t(sigma)
    if cads.gamma(tn, tech.config.tau1, tech.config.tau2) < 1.0:
        state = run.states["cads"]
        chunks = list(transformer_options.get("cond_or_uncond", []))
        uuids = list(transformer_options.get("uuids", []))
        if c_crossattn is not None:
            c_crossattn = _anneal_chunks(c_crossattn, chunks, uuids, run, tech, state, tn, sigma, 0, None)
        y = kwargs.get("y")
        if tech.pooled and isinstance(y, torch.Tensor) and y.ndim == 2:
            dims = tech.pooled_dims if tech.pooled_dims and tech.pooled_dims < y.shape[-1] else None
            kwargs["y"] = _anneal_chunks(y, chunks, uuids, run, tech, state, tn, sigma, 1, dims)
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def _with_technique(model, name: str, technique: _Technique, disable_cfg1: bool = False):
    """Clone ``model`` and add (or replace) one technique; the shared hooks are installed once."""
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    techniques = dict(to.get(TECH_KEY, {}))
    techniques[name] = technique
    to[TECH_KEY] = techniques
    for kind, fn in ((WrappersMP.OUTER_SAMPLE, _outer_sample), (WrappersMP.CALC_COND_BATCH, _calc_cond_batch)):
        m.remove_wrappers_with_key(kind, HOOK_KEY)
        m.add_wrapper_with_key(kind, HOOK_KEY, fn)
    for slot, fn in (("sampler_pre_cfg_function", _pre_cfg), ("sampler_post_cfg_function", _post_cfg)):
        m.model_options[slot] = [f for f in m.model_options.get(slot, []) if f is not fn] + [fn]
    if disable_cfg1:
        m.model_options["disable_cfg1_optimization"] = True
    return m


def _without_techniques(model):
    """A clone with this family's MODEL techniques switched off (for Noise-Level Guidance's own evaluations)."""
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    to[TECH_KEY] = {}
    return m


# --------------------------------------------------------------------------------------------------------------
# Nodes


class PreprintScheduledCFG(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintScheduledCFG",
            display_name=SCHEDULED_CFG_NAME,
            category=CATEGORY,
            description=(
                "Makes the CFG scale follow the noise level (constant, linear, cosine, power or one value per step) "
                "and limits guidance to a sigma interval, as in 'Analysis of Classifier-Free Guidance Weight "
                "Schedulers' (arXiv:2404.13040) and 'Applying Guidance in a Limited Interval Improves Sample and "
                "Distribution Quality in Diffusion Models' (arXiv:2404.07724). Outside the interval, and wherever "
                "the scale is exactly 1, the negative-prompt pass is not computed at all. Works with KSampler, "
                "SamplerCustom and CFGGuider; stacks with CADS, Adaptive Guidance, PAG and caching."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (it is cloned, never changed)."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="constant",
                               tooltip="Shape of the scale from cfg_start (pure noise) to cfg_end (clean): constant "
                                       "(cfg_start throughout), linear, cosine, power (t^exponent), or custom (one "
                                       "value per step from custom_scales)."),
                io.Float.Input("cfg_start", default=-1.0, min=-1.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Scale at the highest noise level. -1: the sampler's own CFG value."),
                io.Float.Input("cfg_end", default=-1.0, min=-1.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Scale at the lowest noise level. -1: the sampler's own CFG value."),
                io.Float.Input("exponent", default=2.0, min=0.01, max=20.0, step=0.05,
                               tooltip="Exponent of the power schedule (ignored by the others)."),
                io.String.Input("custom_scales", default="", multiline=True,
                                tooltip="For schedule=custom: one scale per sampler step, separated by commas "
                                        "(exactly as many values as steps)."),
                io.Float.Input("sigma_start", default=-1.0, min=-1.0, max=10000.0, step=0.01,
                               tooltip="Guidance only where sigma <= sigma_start (noisy end). -1: no limit."),
                io.Float.Input("sigma_end", default=-1.0, min=-1.0, max=10000.0, step=0.01,
                               tooltip="Guidance only where sigma >= sigma_end (clean end). -1: no limit."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the CFG schedule and guidance interval applied.")],
        )

    @classmethod
    def validate_inputs(cls, schedule=None, custom_scales=None, sigma_start=None, sigma_end=None,
                        **_) -> bool | str:
        """Checked by ComfyUI before anything is queued, so the editor marks the node."""
        def check() -> None:
            if sigma_start is not None and sigma_end is not None:
                SigmaWindow(sigma_start, sigma_end)
            if schedule == "custom" and custom_scales is not None:
                if not parse_scale_list(custom_scales):
                    raise ValueError("schedule 'custom' needs custom_scales: one CFG scale per sampler step, "
                                     "separated by commas.")
        return validation_message(SCHEDULED_CFG_NAME, check)

    @classmethod
    def execute(cls, model, schedule: str, cfg_start: float, cfg_end: float, exponent: float, custom_scales: str,
                sigma_start: float, sigma_end: float) -> io.NodeOutput:
        custom = parse_scale_list(custom_scales) if schedule == "custom" else ()
        guidance = ScheduledGuidance(ScaleSchedule(schedule, cfg_start, cfg_end, exponent, custom),
                                     SigmaWindow(sigma_start, sigma_end))
        keep_uncond = bool(model.model_options.get("disable_cfg1_optimization", False))
        tech = _ScheduledCFG("Scheduled CFG", guidance, skip_at_one=not keep_uncond)
        return io.NodeOutput(_with_technique(model, "scheduled_cfg", tech, disable_cfg1=True))


class PreprintAdaptiveGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintAdaptiveGuidance",
            display_name="Adaptive Guidance (Preprint)",
            category=CATEGORY,
            description=(
                "Adaptive Guidance (Castillo et al., 'Adaptive Guidance: Training-free Acceleration of Conditional "
                "Diffusion Models', arXiv:2312.12487): once the positive and negative predictions point the same "
                "way (cosine similarity above the threshold) the rest of the run uses the positive prediction only "
                "and skips the negative pass, about 25% fewer model evaluations at equal quality (paper). The "
                "cosine is taken on the flow velocity by default, which works alike on SD (EPS) and Flux / SD3 "
                "(flow) models. Each image of a batch converges on its own. The log reports the passes saved."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (it is cloned, never changed)."),
                io.Float.Input("threshold", default=ADAPTIVE_DEFAULT_THRESHOLD, min=-1.0, max=1.0, step=0.0001,
                               round=0.00001,
                               tooltip="Cosine similarity of the positive and negative predictions at which guidance "
                                       "stops for the rest of the run. Higher: later and safer (0.999 measured "
                                       "within 2% of plain CFG on EPS and flow models; 0.99 saves a little more); "
                                       "1.0: never stop."),
                io.Combo.Input("criterion", options=list(ADAPTIVE_CRITERIA), default="velocity", optional=True,
                               tooltip="What the cosine compares. velocity: the flow velocity eps - x0 (the network "
                                       "output on Flux / SD3; works alike on SD models). noise: the paper's noise "
                                       "predictions, which on SD models agree from the first step, so guidance stops "
                                       "almost at once unless the threshold is 0.9999 or more. denoised: the "
                                       "predicted clean images."),
            ],
            outputs=[io.Model.Output(tooltip="The model with Adaptive Guidance.")],
        )

    @classmethod
    def execute(cls, model, threshold: float, criterion: str = "velocity") -> io.NodeOutput:
        AdaptiveGuidanceState(threshold, criterion)  # validates
        tech = _AdaptiveGuidance("Adaptive Guidance", threshold, criterion)
        return io.NodeOutput(_with_technique(model, "adaptive", tech))


def _pooled_dims(model) -> int | None:
    """Width of the pooled text embedding at the front of SDXL's ADM vector (1280 on real checkpoints), read off
    the model: the ADM input width less the size / crop embeddings (6 x 256 on SDXL, 5 x 256 on the refiner)."""
    inner = getattr(model, "model", None)
    if isinstance(inner, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner)):
        sizes = 5 * 256 if isinstance(inner, comfy.model_base.SDXLRefiner) else 6 * 256
        adm = int(inner.diffusion_model.label_emb[0][0].in_features)
        return adm - sizes
    return None


class PreprintCADS(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PreprintCADS",
            display_name=CADS_NAME,
            category=CATEGORY,
            description=(
                "CADS (Sadat et al., 'CADS: Unleashing the Diversity of Diffusion Models through Condition-Annealed "
                "Sampling', arXiv:2310.17347): adds scheduled Gaussian noise to the text conditioning (and the "
                "pooled vector) early in sampling, for more varied images at high CFG. The noise is drawn from the "
                "run's seed, so a seed reproduces its image. Works with every guider, including DualCFGGuider."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (it is cloned, never changed)."),
                io.Float.Input("tau1", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Below this noise level (0 = clean, 1 = pure noise) the conditioning is clean."),
                io.Float.Input("tau2", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="Above this noise level the conditioning is fully replaced by scaled noise."),
                io.Float.Input("noise_scale", default=0.25, min=0.0, max=5.0, step=0.01,
                               tooltip="s: strength of the noise added to the conditioning."),
                io.Float.Input("psi", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Mix of the rescaled conditioning (mean and spread restored) with the "
                                       "unrescaled one; 1 = fully rescaled (the paper's default)."),
                io.Boolean.Input("noise_pooled", default=True,
                                 tooltip="Also anneal the pooled text vector (SDXL, SD3, Flux). On SDXL only its text "
                                         "part, never the size embeddings."),
                io.Combo.Input("anneal", options=list(CADS_TARGETS), default=CADS_TARGETS[0], optional=True,
                               tooltip="Which conditionings get the noise. 'positive only' is the paper's eq. 3: "
                                       "the condition y of the conditional prediction; the negative prompt keeps "
                                       "its own. 'positive and negative' also anneals the negative prompt, as the "
                                       "popular WebUI port does."),
            ],
            outputs=[io.Model.Output(tooltip="The model with condition annealing.")],
        )

    @classmethod
    def validate_inputs(cls, tau1=None, tau2=None, noise_scale=None, psi=None, **_) -> bool | str:
        values = (tau1, tau2, noise_scale, psi)
        if any(v is None for v in values):
            return True  # a linked input: checked when the node runs
        return validation_message(CADS_NAME, lambda: cads.CADSConfig(*values))

    @classmethod
    def execute(cls, model, tau1: float, tau2: float, noise_scale: float, psi: float,
                noise_pooled: bool, anneal: str = CADS_TARGETS[0]) -> io.NodeOutput:
        if anneal not in CADS_TARGETS:
            raise ValueError(f"CADS Condition Annealing: unknown anneal choice {anneal!r}; use one of "
                             f"{', '.join(CADS_TARGETS)}.")
        tech = _CADS("CADS", cads.CADSConfig(tau1, tau2, noise_scale, psi), noise_pooled, _pooled_dims(model),
                     positive_only=anneal == "positive only")
        m = _with_technique(model, "cads", tech)
        m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, CADS_KEY)
        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, CADS_KEY, _cads_apply_model)
        return io.NodeOutput(m)


NODES = [PreprintScheduledCFG, PreprintAdaptiveGuidance, PreprintCADS]
