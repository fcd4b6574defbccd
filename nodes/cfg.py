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

The run engine (per-run state, the skipped unconditional pass, the shared hooks, CADS's conditioning noise)
is ``guidance/cfg_runtime.py``; this module holds the node schemas.
"""

from __future__ import annotations

import logging

import comfy.model_base
import comfy.patcher_extension
from comfy_api.latest import io

from ..guidance import cads
from ..guidance.adaptive_guidance import CRITERIA as ADAPTIVE_CRITERIA
from ..guidance.adaptive_guidance import DEFAULT_THRESHOLD as ADAPTIVE_DEFAULT_THRESHOLD
from ..guidance.adaptive_guidance import AdaptiveGuidanceState
from ..guidance.cfg_runtime import (
    CADS,
    RUN_KEY,
    TECH_KEY,
    AdaptiveGuidance,
    Run,
    ScheduledCFG,
    Technique,
    cads_apply_model,
    calc_cond_batch,
    make_run,
    post_cfg,
    pre_cfg,
)
from ..guidance.cfg_schedule import SCHEDULES, ScaleSchedule, ScheduledGuidance, parse_scale_list
from ..utils.sigma_window import SigmaWindow
from ._host import CFG_HOST, RunState, install_hooks
from ._inputs import PreprintNode, model_input, sigma_window_inputs

log = logging.getLogger("preprint")

CATEGORY = "Preprint/cfg"
HOOK_KEY = "preprint_cfg"
CADS_KEY = "preprint_cads"
SCHEDULER_FOLDER = "guidance_schedulers"

WrappersMP = comfy.patcher_extension.WrappersMP
# The first is the default, kept from the node's first release so saved workflows sample as before.
CADS_TARGETS = ("positive and negative", "positive only")


def _with_technique(model, name: str, technique: Technique, disable_cfg1: bool = False):
    """Clone ``model`` and add (or replace) one technique; the shared hooks are installed once."""
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    to[TECH_KEY] = {**to.get(TECH_KEY, {}), name: technique}
    install_hooks(m, HOOK_KEY, {
        WrappersMP.OUTER_SAMPLE: RunState(RUN_KEY, lambda guider, sigmas, seed: make_run(CFG_HOST, guider, sigmas,
                                                                                          seed), Run.finish),
        WrappersMP.CALC_COND_BATCH: calc_cond_batch}, pre_cfg=pre_cfg, post_cfg=post_cfg)
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


class PreprintScheduledCFG(PreprintNode):
    NAME = "Scheduled CFG / Guidance Interval (Preprint)"
    ALIASES = ("CFG schedule", "guidance interval", "limited interval guidance", "dynamic CFG")
    WINDOW = "guidance interval"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintScheduledCFG",
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
                model_input("The model to patch."),
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
                *sigma_window_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with the CFG schedule and guidance interval applied.")],
        )

    @classmethod
    def validate_inputs(cls, schedule=None, custom_scales=None, sigma_start=None, sigma_end=None) -> bool | str:
        """Checked by ComfyUI before anything is queued, so the editor marks the node."""
        return cls.check_widgets(schedule=schedule, custom_scales=custom_scales, sigma_start=sigma_start,
                                 sigma_end=sigma_end)

    @classmethod
    def check_values(cls, schedule=None, custom_scales=None, **_) -> None:
        if schedule == "custom" and custom_scales is not None and not parse_scale_list(custom_scales):
            raise ValueError("schedule 'custom' needs custom_scales: one CFG scale per sampler step, separated by "
                             "commas.")

    @classmethod
    def execute(cls, model, schedule: str, cfg_start: float, cfg_end: float, exponent: float, custom_scales: str,
                sigma_start: float, sigma_end: float) -> io.NodeOutput:
        try:
            custom = parse_scale_list(custom_scales) if schedule == "custom" else ()
            guidance = ScheduledGuidance(ScaleSchedule(schedule, cfg_start, cfg_end, exponent, custom),
                                         SigmaWindow(sigma_start, sigma_end))
        except ValueError as e:
            raise cls.error(str(e)) from None
        keep_uncond = bool(model.model_options.get("disable_cfg1_optimization", False))
        tech = ScheduledCFG(cls.NAME, guidance, skip_at_one=not keep_uncond)
        return io.NodeOutput(_with_technique(model, "scheduled_cfg", tech, disable_cfg1=True))


class PreprintAdaptiveGuidance(PreprintNode):
    NAME = "Adaptive Guidance (Preprint)"
    ALIASES = ("adaptive guidance", "AG", "skip uncond", "faster CFG")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintAdaptiveGuidance",
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
                model_input("The model to patch."),
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
    def validate_inputs(cls, criterion="velocity") -> bool | str:
        return cls.check_widgets(criterion=criterion)

    @classmethod
    def execute(cls, model, threshold: float, criterion: str = "velocity") -> io.NodeOutput:
        AdaptiveGuidanceState(threshold, criterion)  # validates
        tech = AdaptiveGuidance(cls.NAME, threshold, criterion)
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


class PreprintCADS(PreprintNode):
    NAME = "CADS Condition Annealing (Preprint)"
    ALIASES = ("CADS", "condition annealing", "diversity")

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            node_id="PreprintCADS",
            category=CATEGORY,
            description=(
                "CADS (Sadat et al., 'CADS: Unleashing the Diversity of Diffusion Models through Condition-Annealed "
                "Sampling', arXiv:2310.17347): adds scheduled Gaussian noise to the text conditioning (and the "
                "pooled vector) early in sampling, for more varied images at high CFG. The noise is drawn from the "
                "run's seed, so a seed reproduces its image. Works with every guider, including DualCFGGuider."
            ),
            inputs=[
                model_input("The model to patch."),
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
    def validate_inputs(cls, tau1=None, tau2=None, noise_scale=None, psi=None,
                        anneal=CADS_TARGETS[0]) -> bool | str:
        return cls.check_widgets(tau1=tau1, tau2=tau2, noise_scale=noise_scale, psi=psi, anneal=anneal)

    @classmethod
    def check_values(cls, anneal=None, **values) -> None:
        if len(values) == 4:  # a linked input is checked when the node runs
            cads.CADSConfig(**values)

    @classmethod
    def execute(cls, model, tau1: float, tau2: float, noise_scale: float, psi: float,
                noise_pooled: bool, anneal: str = CADS_TARGETS[0]) -> io.NodeOutput:
        if anneal not in CADS_TARGETS:
            raise cls.error(f"unknown anneal choice {anneal!r}; use one of {', '.join(CADS_TARGETS)}.")
        tech = CADS(cls.NAME, cads.CADSConfig(tau1, tau2, noise_scale, psi), noise_pooled, _pooled_dims(model),
                     positive_only=anneal == "positive only")
        m = _with_technique(model, "cads", tech)
        install_hooks(m, CADS_KEY, {WrappersMP.APPLY_MODEL: cads_apply_model})
        return io.NodeOutput(m)


NODES = [PreprintScheduledCFG, PreprintAdaptiveGuidance, PreprintCADS]
