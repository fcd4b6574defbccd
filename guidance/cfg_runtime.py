"""Run engine of the annealed / scheduled CFG family (plain torch; ComfyUI's functions are passed in as a
``Host``). The papers and the maths are in ``cfg_schedule``, ``adaptive_guidance`` and ``cads``; the nodes in
``nodes/cfg.py``.

How the MODEL patches stack. Each node records its technique in
``model_options["transformer_options"]["preprint_cfg"]`` (one entry per technique, so a second node of the
same kind replaces the first) and installs one shared set of hooks, each under the key ``preprint_cfg``:

* an OUTER_SAMPLE wrapper that builds the per-run state (:func:`make_run`: sample sigmas, the run's seed, each
  technique's state) and puts it in the run's own copy of the model options;
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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import cads
from .adaptive_guidance import DEFAULT_THRESHOLD as ADAPTIVE_DEFAULT_THRESHOLD
from .adaptive_guidance import AdaptiveGuidanceState
from .cfg_schedule import ScheduledGuidance, noise_level, retarget, step_index

log = logging.getLogger("preprint")

TECH_KEY = "preprint_cfg"  # transformer_options entry: the techniques a model carries, by name
RUN_KEY = "preprint_cfg_run"  # transformer_options entry: the running sampling call's Run


@dataclass(frozen=True)
class Host:
    parameterisation: Callable[[object], str]  # model_sampling -> "eps" or "flow"
    combines_with_cfg: Callable[[object], bool]  # guider -> True when it combines cond and uncond by plain CFG


# --------------------------------------------------------------------------------------------------------------
# Techniques: configuration (copied with the model) + per-run behaviour (state lives in the run object)


@dataclass(frozen=True)
class Technique:
    node: str  # display name, for messages
    needs_cfg_pair = False

    def start(self, run: Run) -> object:
        return None

    def skip_uncond(self, state, run: Run, sigma: float, batch: int) -> bool:
        return False

    def pre_cfg(self, state, run: Run, args: dict, out: list) -> list:
        return out

    def post_cfg(self, state, run: Run, args: dict, denoised: torch.Tensor) -> torch.Tensor:
        return denoised

    def finish(self, state, run: Run) -> None:
        pass


@dataclass(frozen=True)
class ScheduledCFG(Technique):
    guidance: ScheduledGuidance = field(default_factory=ScheduledGuidance)
    skip_at_one: bool = True  # drop the uncond pass where the scale is exactly 1 (nothing else asked for it)
    needs_cfg_pair = True

    def start(self, run: Run) -> dict:
        self.guidance.schedule.check_steps(run.steps)
        return {"skipped": 0, "evaluations": 0}

    def scale(self, run: Run, sigma: float, base: float) -> float:
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
class AdaptiveGuidance(Technique):
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
class CADS(Technique):
    config: cads.CADSConfig = field(default_factory=cads.CADSConfig)
    pooled: bool = True
    pooled_dims: int | None = None  # SDXL: only the first 1280 features of ``y`` are the pooled text embedding
    positive_only: bool = False  # leave the unconditional branch's conditioning untouched

    def start(self, run):
        return {"keys": {}}


@dataclass
class Call:
    sigma: float
    dropped_by: tuple[str, ...] = ()

    @property
    def dropped(self) -> bool:
        return bool(self.dropped_by)


class Run:
    """Everything one sampling run needs; built by the OUTER_SAMPLE wrapper, dropped when it returns."""

    def __init__(self, host: Host, guider, techniques: dict[str, Technique], sigmas: torch.Tensor, seed: int):
        self.guider_name = type(guider).__name__
        self.techniques = techniques
        self.sample_sigmas = [float(s) for s in sigmas.reshape(-1)]
        self.steps = max(len(self.sample_sigmas) - 1, 0)
        self.model_sampling = guider.model_patcher.get_model_object("model_sampling")
        self.kind = host.parameterisation(self.model_sampling)
        cfg = getattr(guider, "cfg", 1.0)
        self.base_cfg = float(cfg) if isinstance(cfg, (int, float)) else 1.0
        self.seed = seed
        self.current: Call | None = None
        self._t: dict[float, float] = {}
        self._check_guider(host, guider)
        self.states = {name: tech.start(self) for name, tech in techniques.items()}

    def _check_guider(self, host: Host, guider) -> None:
        pair = [t for t in self.techniques.values() if t.needs_cfg_pair]
        if not pair:
            return
        names = ", ".join(t.node for t in pair)
        if not host.combines_with_cfg(guider):
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


def run_of(options: dict | None) -> Run | None:
    if not options:
        return None
    to = options.get("transformer_options", options)
    return to.get(RUN_KEY)


# --------------------------------------------------------------------------------------------------------------
# Shared hooks (installed under one key by every node of the family)


def make_run(host: Host, guider, sigmas: torch.Tensor, seed: int) -> Run | None:
    """The run state for one sampling call (None when the model carries no technique of this family)."""
    techniques = dict(guider.model_options.get("transformer_options", {}).get(TECH_KEY, {}))
    return Run(host, guider, techniques, sigmas, seed) if techniques else None


def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    run = run_of(model_options)
    if run is None:
        return executor(model, conds, x_in, timestep, model_options)
    sigma = float(timestep.reshape(-1)[0])
    if len(conds) < 2 or conds[1] is None:
        run.current = Call(sigma)
        return executor(model, conds, x_in, timestep, model_options)
    dropped_by = tuple(name for name, tech, state in run.each()
                       if tech.needs_cfg_pair and tech.skip_uncond(state, run, sigma, x_in.shape[0]))
    run.current = Call(sigma, dropped_by)
    if not dropped_by:
        return executor(model, conds, x_in, timestep, model_options)
    conds = list(conds)
    conds[1] = None
    out = list(executor(model, conds, x_in, timestep, model_options))
    out[1] = out[0].clone()  # guidance off: every later hook sees D_u = D_c
    return out


def pre_cfg(args: dict) -> list:
    out = args["conds_out"]
    run = run_of(args.get("model_options"))
    if run is None:
        return out
    for _, tech, state in run.each():
        out = tech.pre_cfg(state, run, args, out)
    return out


def post_cfg(args: dict) -> torch.Tensor:
    denoised = args["denoised"]
    run = run_of(args.get("model_options"))
    if run is None or args.get("uncond") is None:
        return denoised
    for _, tech, state in run.each():
        denoised = tech.post_cfg(state, run, args, denoised)
    return denoised


def anneal_chunks(t: torch.Tensor, chunks: list[int], uuids: list, run: Run, tech: CADS, state: dict, tn: float,
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


def cads_apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
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
            c_crossattn = anneal_chunks(c_crossattn, chunks, uuids, run, tech, state, tn, sigma, 0, None)
        y = kwargs.get("y")
        if tech.pooled and isinstance(y, torch.Tensor) and y.ndim == 2:
            dims = tech.pooled_dims if tech.pooled_dims and tech.pooled_dims < y.shape[-1] else None
            kwargs["y"] = anneal_chunks(y, chunks, uuids, run, tech, state, tn, sigma, 1, dims)
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


