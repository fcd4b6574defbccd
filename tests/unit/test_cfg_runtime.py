"""Run engine of the annealed / scheduled CFG family (``guidance/cfg_runtime.py``), driven directly with plain
torch and small fakes (a fake ``Host``, guider, model sampling; plain dicts for the model options):

* the per-run state :func:`make_run` builds (sample sigmas, steps, seed, base CFG, each technique's state) and
  the guider checks of the techniques that need a CFG pair;
* the CALC_COND_BATCH wrapper dropping the unconditional cond exactly when a technique says so (outside the
  guidance interval, scale exactly 1, Adaptive Guidance converged) and returning the conditional prediction in
  its place;
* the pre-CFG hook (Adaptive Guidance measures, then masks converged images) and the post-CFG hook (the
  scheduled scale at given sigmas);
* the CADS APPLY_MODEL wrapper annealing each chunk of the conditioning on its own;
* a second technique of a kind replacing the first, and nothing leaking from one run to the next.

The noise level of the fake model is ``t = sigma / 10`` (``percent_to_sigma(p) = 10 (1 - p)``), so scheduled
scales can be worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from preprint.guidance import cads, cfg_runtime
from preprint.guidance.adaptive_guidance import AdaptiveGuidanceState
from preprint.guidance.cfg_runtime import (
    CADS,
    RUN_KEY,
    TECH_KEY,
    AdaptiveGuidance,
    Call,
    Host,
    Run,
    ScheduledCFG,
    Technique,
    cads_apply_model,
    calc_cond_batch,
    make_run,
    post_cfg,
    pre_cfg,
    run_of,
)
from preprint.guidance.cfg_schedule import ScaleSchedule, ScheduledGuidance
from preprint.utils.sigma_window import ScheduleError, SigmaWindow

# ---------------------------------------------------------------------------------------------------- fakes


class FakeSampling:
    """Model sampling whose noise level is ``t = sigma / 10``; counts the calls of ``percent_to_sigma``."""

    def __init__(self, kind: str = "eps"):
        self.kind = kind
        self.calls = 0

    def percent_to_sigma(self, percent: float) -> float:
        self.calls += 1
        return 10.0 * (1.0 - percent)


class FakePatcher:
    def __init__(self, sampling):
        self.sampling = sampling

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.sampling


class FakeGuider:
    def __init__(self, techniques=None, cfg=7.0, kind="eps", combines=True, negative=True, conds=True):
        self.model_patcher = FakePatcher(FakeSampling(kind))
        self.model_options = {"transformer_options": {TECH_KEY: dict(techniques or {})}}
        if cfg is not None:
            self.cfg = cfg
        if conds:
            self.conds = {"positive": ["p"], "negative": ["n"] if negative else None}
        self.combines = combines


class OtherGuider(FakeGuider):
    """A second guider class, to check the guider name is read off the class."""


HOST = Host(parameterisation=lambda ms: ms.kind, combines_with_cfg=lambda guider: guider.combines)


def scheduled(kind="constant", start=-1.0, end=-1.0, custom=(), sigma_start=-1.0, sigma_end=-1.0, skip_at_one=True,
              node="Scheduled"):
    guidance = ScheduledGuidance(ScaleSchedule(kind, start, end, 2.0, tuple(custom)), SigmaWindow(sigma_start,
                                                                                                   sigma_end))
    return ScheduledCFG(node, guidance, skip_at_one=skip_at_one)


def new_run(techniques, sigmas=(10.0, 6.0, 3.0, 0.0), seed=123, **guider_kw) -> Run:
    run = make_run(HOST, FakeGuider(techniques, **guider_kw), torch.tensor(sigmas, dtype=torch.float64), seed)
    assert run is not None
    return run


def options_of(run) -> dict:
    return {"transformer_options": {RUN_KEY: run}}


class Executor:
    """CALC_COND_BATCH executor: records each call, returns [D_c, D_u] (zeros for a dropped cond)."""

    def __init__(self, cond_pred, uncond_pred):
        self.cond_pred, self.uncond_pred = cond_pred, uncond_pred
        self.calls = []

    def __call__(self, model, conds, x_in, timestep, model_options):
        self.calls.append((model, conds, x_in, timestep, model_options))
        return [self.cond_pred if conds[0] is not None else None,
                self.uncond_pred if len(conds) > 1 and conds[1] is not None else torch.zeros_like(self.cond_pred)]


def batch_call(run, conds=("c", "u"), x=None, sigma=5.0):
    x = torch.zeros(2, 3, 4) if x is None else x
    dc = torch.arange(x.numel(), dtype=torch.float32).reshape(x.shape) + 1.0
    du = -dc
    ex = Executor(dc, du)
    conds = list(conds)
    out = calc_cond_batch(ex, "model", conds, x, torch.full((x.shape[0],), sigma), options_of(run))
    return ex, conds, out, dc, du


# -------------------------------------------------------------------------------------------- make_run, Run


def test_option_keys_are_the_documented_ones():
    """Techniques live under transformer_options["preprint_cfg"], the run under "preprint_cfg_run"."""
    assert (TECH_KEY, RUN_KEY) == ("preprint_cfg", "preprint_cfg_run")


def test_make_run_is_none_without_techniques():
    """A model that carries no technique of the family gets no run state."""
    assert make_run(HOST, FakeGuider({}), torch.tensor([1.0, 0.0]), 1) is None
    g = FakeGuider()
    g.model_options = {}
    assert make_run(HOST, g, torch.tensor([1.0, 0.0]), 1) is None


def test_make_run_builds_the_run_state():
    """Sample sigmas as floats, steps = len - 1, the guider's CFG and kind, the seed, and each technique's state."""
    techs = {"scheduled_cfg": scheduled(), "adaptive": AdaptiveGuidance("AG", 0.95, "noise"), "cads": CADS("C")}
    run = make_run(HOST, FakeGuider(techs, cfg=4, kind="flow"), torch.tensor([[1.0, 0.5], [0.25, 0.0]]), 42)
    assert run.sample_sigmas == [1.0, 0.5, 0.25, 0.0]
    assert all(type(s) is float for s in run.sample_sigmas)
    assert run.steps == 3
    assert run.kind == "flow"
    assert run.base_cfg == 4.0 and type(run.base_cfg) is float
    assert run.seed == 42
    assert run.current is None
    assert run.guider_name == "FakeGuider"
    assert run.techniques == techs
    assert run.states["scheduled_cfg"] == {"skipped": 0, "evaluations": 0}
    ag = run.states["adaptive"]
    assert isinstance(ag, AdaptiveGuidanceState)
    assert (ag.threshold, ag.criterion, ag.converged, ag.uncond_evaluations) == (0.95, "noise", None, 0)
    assert run.states["cads"] == {"keys": {}}
    assert new_run({"adaptive": AdaptiveGuidance("AG")}).states["adaptive"].threshold == 0.999  # the default
    assert [name for name, _, _ in run.each()] == ["scheduled_cfg", "adaptive", "cads"]
    assert [state for _, _, state in run.each()] == [run.states[n] for n in ("scheduled_cfg", "adaptive", "cads")]


def test_run_guider_name_and_base_cfg_fallbacks():
    """The guider's class name is recorded; a CFG that is not a number, or none at all, counts as 1."""
    run = make_run(HOST, OtherGuider({"cads": CADS("C")}, cfg=None), torch.tensor([]), 0)
    assert run.guider_name == "OtherGuider"
    assert run.base_cfg == 1.0
    assert run.steps == 0 and run.sample_sigmas == []
    run = make_run(HOST, FakeGuider({"cads": CADS("C")}, cfg=torch.tensor(5.0)), torch.tensor([2.0]), 0)
    assert run.base_cfg == 1.0
    assert run.steps == 0
    run = make_run(HOST, FakeGuider({"cads": CADS("C")}, cfg=2.5), torch.tensor([2.0, 1.0]), 0)
    assert run.base_cfg == 2.5 and run.steps == 1


def test_make_run_copies_the_technique_table():
    """The run keeps its own copy of the techniques: changing the model's table later does not reach it."""
    g = FakeGuider({"cads": CADS("C")})
    run = make_run(HOST, g, torch.tensor([1.0, 0.0]), 0)
    g.model_options["transformer_options"][TECH_KEY]["adaptive"] = AdaptiveGuidance("AG")
    assert list(run.techniques) == ["cads"]


def test_custom_schedule_must_match_the_step_count():
    """A custom list with the wrong number of values fails when the run starts."""
    tech = scheduled("custom", custom=(7.0, 5.0))
    with pytest.raises(ScheduleError, match="3 steps"):
        new_run({"scheduled_cfg": tech})
    assert new_run({"scheduled_cfg": tech}, sigmas=(10.0, 5.0, 0.0)).steps == 2


@pytest.mark.parametrize("name", ["scheduled_cfg", "adaptive"])
def test_pair_techniques_refuse_a_guider_that_combines_itself(name):
    """Scheduled CFG and Adaptive Guidance need plain CFG: another guider is refused, naming the node."""
    tech = scheduled(node="Sched node") if name == "scheduled_cfg" else AdaptiveGuidance("AG node")
    with pytest.raises(ValueError, match="combines its conditionings itself") as e:
        new_run({name: tech}, combines=False)
    assert tech.node in str(e.value)
    assert "OtherGuider" in str(pytest.raises(ValueError, make_run, HOST, OtherGuider({name: tech}, combines=False),
                                              torch.tensor([1.0, 0.0]), 0).value)


def test_pair_techniques_need_a_negative_conditioning():
    """Without a negative conditioning (or without conds at all) there is no CFG to schedule: refused."""
    with pytest.raises(ValueError, match="no negative conditioning"):
        new_run({"adaptive": AdaptiveGuidance("AG")}, negative=False)
    with pytest.raises(ValueError, match="no negative conditioning"):
        new_run({"scheduled_cfg": scheduled()}, conds=False)


def test_cads_alone_works_with_every_guider():
    """CADS does not need a CFG pair: any guider, with or without a negative, is accepted."""
    run = new_run({"cads": CADS("C")}, combines=False, negative=False)
    assert run.states["cads"] == {"keys": {}}
    assert new_run({"adaptive": AdaptiveGuidance("AG")}).states["adaptive"].converged is None


def test_noise_level_and_step_of_a_sigma():
    """``t`` comes from the model's percent_to_sigma (cached per sigma); the step is the last sigma at or above."""
    run = new_run({"cads": CADS("C")})
    assert run.t(5.0) == pytest.approx(0.5, abs=1e-12)
    assert run.t(2.5) == pytest.approx(0.25, abs=1e-12)
    calls = run.model_sampling.calls
    assert run.t(5.0) == pytest.approx(0.5, abs=1e-12)
    assert run.model_sampling.calls == calls
    assert [run.step(s) for s in (10.0, 7.0, 6.0, 4.0, 3.0, 1.0)] == [0, 0, 1, 1, 2, 2]


def test_run_of_reads_either_options_level():
    """The run sits in transformer_options; model options or transformer options themselves both find it."""
    run = new_run({"cads": CADS("C")})
    assert run_of(None) is None and run_of({}) is None
    assert run_of({"transformer_options": {}}) is None
    assert run_of(options_of(run)) is run
    assert run_of({RUN_KEY: run}) is run


def test_base_technique_does_nothing():
    """The base technique keeps predictions and never asks to skip the unconditional pass."""
    t = Technique("base")
    run = new_run({"cads": CADS("C")})
    out = [torch.ones(1), torch.zeros(1)]
    d = torch.ones(2)
    assert t.needs_cfg_pair is False
    assert t.start(run) is None
    assert t.skip_uncond(None, run, 1.0, 1) is False
    assert t.pre_cfg(None, run, {}, out) is out
    assert t.post_cfg(None, run, {}, d) is d
    assert t.finish(None, run) is None


def test_call_is_dropped_when_someone_dropped_it():
    assert Call(1.0).dropped is False
    assert Call(1.0, ("adaptive",)).dropped is True


# ------------------------------------------------------------------------------------------ CALC_COND_BATCH


def test_calc_cond_batch_without_a_run_is_the_plain_executor():
    """No run in the options: the executor is called with exactly the same arguments."""
    ex = Executor(torch.ones(1), torch.zeros(1))
    conds, x, ts, mo = ["c", "u"], torch.zeros(1), torch.ones(1), {}
    out = calc_cond_batch(ex, "m", conds, x, ts, mo)
    assert ex.calls == [("m", conds, x, ts, mo)]
    assert out[1] is ex.uncond_pred


def test_interval_outside_drops_the_uncond_and_returns_cond():
    """Outside the guidance interval the uncond cond is not evaluated and D_u = D_c is handed back."""
    run = new_run({"scheduled_cfg": scheduled(start=7.0, sigma_start=8.0, sigma_end=2.0)})
    ex, conds, out, dc, du = batch_call(run, sigma=9.0)
    assert len(ex.calls) == 1
    sent = ex.calls[0][1]
    assert sent[0] == "c" and sent[1] is None
    assert conds == ["c", "u"]  # the caller's list is left alone
    assert torch.equal(out[0], dc) and torch.equal(out[1], dc)
    assert out[1] is not out[0]
    assert run.current.sigma == 9.0 and run.current.dropped_by == ("scheduled_cfg",)
    assert run.states["scheduled_cfg"] == {"skipped": 1, "evaluations": 1}


def test_interval_inside_keeps_the_uncond():
    """Inside the interval with a scale other than 1 both conds go to the model and the output is untouched."""
    run = new_run({"scheduled_cfg": scheduled(start=7.0, sigma_start=8.0, sigma_end=2.0)})
    ex, conds, out, dc, du = batch_call(run, sigma=5.0)
    assert ex.calls[0][1] == ["c", "u"]
    assert out[1] is du and out[0] is dc
    assert run.current.sigma == 5.0 and run.current.dropped is False
    assert run.states["scheduled_cfg"] == {"skipped": 0, "evaluations": 1}
    batch_call(run, sigma=1.0)
    assert run.states["scheduled_cfg"] == {"skipped": 1, "evaluations": 2}


def test_sigma_is_read_from_the_first_timestep():
    """The evaluation's sigma is the first entry of the timestep tensor."""
    run = new_run({"scheduled_cfg": scheduled(start=7.0, sigma_start=8.0)})
    ex = Executor(torch.ones(2, 1), torch.zeros(2, 1))
    calc_cond_batch(ex, "m", ["c", "u"], torch.zeros(2, 1), torch.tensor([9.0, 5.0]), options_of(run))
    assert run.current.sigma == 9.0 and run.current.dropped


def test_scale_exactly_one_drops_the_uncond():
    """A scale of exactly 1 needs no uncond pass, unless skip_at_one is off (the model kept cfg1 off)."""
    run = new_run({"scheduled_cfg": scheduled(start=1.0)})
    ex, _, out, dc, _ = batch_call(run)
    assert ex.calls[0][1][1] is None and torch.equal(out[1], dc)
    run = new_run({"scheduled_cfg": scheduled(start=1.0, skip_at_one=False)})
    ex, _, out, _, du = batch_call(run)
    assert ex.calls[0][1][1] == "u" and out[1] is du
    run = new_run({"scheduled_cfg": scheduled(start=1.5)})
    assert batch_call(run)[0].calls[0][1][1] == "u"
    default = ScheduledCFG("S", ScheduledGuidance(ScaleSchedule("constant", 1.0)))  # skips at 1 by default
    assert batch_call(new_run({"scheduled_cfg": default}))[0].calls[0][1][1] is None


def test_scale_one_uses_the_run_base_cfg_and_the_schedule():
    """The skip decision uses the scheduled scale at this sigma with the sampler's CFG as the base."""
    run = new_run({"scheduled_cfg": scheduled()}, cfg=1.0)  # constant = the sampler's own CFG = 1
    assert batch_call(run)[0].calls[0][1][1] is None
    run = new_run({"scheduled_cfg": scheduled()}, cfg=2.0)
    assert batch_call(run)[0].calls[0][1][1] == "u"
    # linear from 3 (t = 1) to 1 (t = 0): scale 1 only at sigma 0; 3 - 2 * (1 - t) at t = 0.5 is 2
    run = new_run({"scheduled_cfg": scheduled("linear", start=3.0, end=1.0)})
    assert batch_call(run, sigma=5.0)[0].calls[0][1][1] == "u"


def test_no_uncond_cond_means_nothing_to_drop():
    """A batch without an uncond cond (cfg 1 optimisation, a single cond) goes through; nothing is counted."""
    run = new_run({"scheduled_cfg": scheduled(start=7.0, sigma_start=8.0)})
    ex, _, out, dc, _ = batch_call(run, conds=("c", None), sigma=9.0)
    assert ex.calls[0][1] == ["c", None]
    assert run.current.sigma == 9.0 and run.current.dropped is False
    assert run.states["scheduled_cfg"] == {"skipped": 0, "evaluations": 0}
    ex, _, out, _, _ = batch_call(run, conds=("c",), sigma=9.0)
    assert ex.calls[0][1] == ["c"] and run.current.dropped is False
    assert run.states["scheduled_cfg"] == {"skipped": 0, "evaluations": 0}


def test_adaptive_guidance_drops_once_every_image_converged():
    """Adaptive Guidance drops the uncond only when every image of this batch has converged."""
    run = new_run({"adaptive": AdaptiveGuidance("AG")})
    state = run.states["adaptive"]
    assert batch_call(run)[0].calls[0][1][1] == "u"  # nothing measured yet
    state.converged = torch.tensor([True, False])
    assert batch_call(run)[0].calls[0][1][1] == "u"
    state.converged = torch.tensor([True, True])
    ex, _, out, dc, _ = batch_call(run)  # x is [2, 3, 4]: the batch is 2
    assert ex.calls[0][1][1] is None and torch.equal(out[1], dc)
    assert run.current.dropped_by == ("adaptive",)
    ex, *_ = batch_call(run, x=torch.zeros(3, 2, 4))  # a batch of another size has not converged
    assert ex.calls[0][1][1] == "u"


class AlwaysSkips(Technique):
    def skip_uncond(self, state, run, sigma, batch):
        return True


def test_only_techniques_needing_a_cfg_pair_may_drop():
    """A technique that does not need a CFG pair is not asked whether to drop the uncond."""
    run = new_run({"other": AlwaysSkips("x"), "cads": CADS("C")})
    assert batch_call(run)[0].calls[0][1][1] == "u"
    assert run.current.dropped is False


def test_every_technique_that_drops_is_named():
    """Scheduled CFG and Adaptive Guidance both asking to drop: both are recorded, in technique order."""
    run = new_run({"scheduled_cfg": scheduled(start=1.0), "adaptive": AdaptiveGuidance("AG")})
    run.states["adaptive"].converged = torch.tensor([True, True])
    batch_call(run)
    assert run.current.dropped_by == ("scheduled_cfg", "adaptive")


# ------------------------------------------------------------------------------------------------- pre-CFG


def pre_args(run, out, x, sigma=1.0, conds=("c", "u")):
    return {"conds_out": out, "conds": list(conds), "input": x, "sigma": torch.full((x.shape[0],), sigma),
            "model_options": options_of(run)}


def rows(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_pre_cfg_without_a_run_is_identity():
    out = [torch.ones(1), torch.zeros(1)]
    assert pre_cfg({"conds_out": out, "model_options": {}}) is out
    assert pre_cfg({"conds_out": out}) is out


def test_adaptive_guidance_measures_then_masks_converged_images():
    """The step that detects convergence keeps full CFG; later, converged images get D_u = D_c."""
    run = new_run({"adaptive": AdaptiveGuidance("AG", 0.9, "denoised")})
    state = run.states["adaptive"]
    x = torch.zeros(2, 2)
    dc = rows([1.0, 0.0], [1.0, 0.0])
    du = rows([2.0, 0.0], [0.0, 1.0])  # cosines: 1 (image 0) and 0 (image 1)
    batch_call(run, x=x)
    out = pre_cfg(pre_args(run, [dc, du], x))
    assert state.uncond_evaluations == 1
    assert state.history == [[pytest.approx(1.0), pytest.approx(0.0)]]
    assert state.converged.tolist() == [True, False]
    assert torch.equal(out[0], dc) and torch.equal(out[1], du)  # detection step: full CFG still
    out = pre_cfg(pre_args(run, [dc, du], x))
    assert state.uncond_evaluations == 2
    assert torch.equal(out[1], rows([1.0, 0.0], [0.0, 1.0]))  # image 0 masked to D_c, image 1 kept
    assert torch.equal(du, rows([2.0, 0.0], [0.0, 1.0]))  # the caller's tensor is not written to


def test_adaptive_guidance_uses_the_run_kind_and_sigma():
    """The velocity criterion uses the model's parameterisation: the same pair converges on flow, not on EPS."""
    x = rows([2.0, 0.0])
    dc, du = rows([1.0, 1.0]), rows([0.0, 2.0])
    # flow at sigma 1: v = x - D, and x - dc = (1, -1), x - du = (2, -2): cosine 1.
    # eps at sigma 1: v = x - 2 D: (0, -2) and (2, -4): cosine 8 / (2 sqrt 20) = 0.894.
    for kind, expected, converged in (("flow", 1.0, True), ("eps", 8 / (2 * math.sqrt(20)), False)):
        run = new_run({"adaptive": AdaptiveGuidance("AG", 0.99)}, kind=kind)
        batch_call(run, x=torch.zeros(1, 2))
        pre_cfg(pre_args(run, [dc, du], x, sigma=1.0))
        assert run.states["adaptive"].history == [[pytest.approx(expected)]]
        assert run.states["adaptive"].converged.tolist() == [converged]
    # eps at sigma 0.5: v = (x - D) / 0.5 - D = 2x - 3D: (1, -3) and (4, -6): cosine 22 / (sqrt 10 sqrt 52)
    run = new_run({"adaptive": AdaptiveGuidance("AG", 0.99)})
    batch_call(run, x=torch.zeros(1, 2))
    pre_cfg(pre_args(run, [dc, du], x, sigma=0.5))
    assert run.states["adaptive"].history == [[pytest.approx(22 / (math.sqrt(10) * math.sqrt(52)))]]


def test_adaptive_guidance_counts_its_own_skips():
    """When Adaptive Guidance dropped the pass it counts a saved evaluation and measures nothing."""
    run = new_run({"adaptive": AdaptiveGuidance("AG", 0.9, "denoised")})
    state = run.states["adaptive"]
    state.converged = torch.tensor([True])
    x = torch.zeros(1, 2)
    batch_call(run, x=x)
    out = [rows([1.0, 0.0]), rows([1.0, 0.0])]
    assert pre_cfg(pre_args(run, out, x)) is out
    assert (state.uncond_skipped, state.uncond_evaluations) == (1, 0)
    assert pre_cfg(pre_args(run, out, x)) is out
    assert state.uncond_skipped == 2


def test_adaptive_guidance_does_not_measure_a_pass_dropped_by_another_technique():
    """Scheduled CFG dropped the pass (D_u = D_c): nothing is measured, nothing counted."""
    run = new_run({"scheduled_cfg": scheduled(start=1.0), "adaptive": AdaptiveGuidance("AG", 0.9, "denoised")})
    x = torch.zeros(1, 2)
    batch_call(run, x=x)
    out = [rows([1.0, 0.0]), rows([1.0, 0.0])]
    assert pre_cfg(pre_args(run, out, x)) is out
    state = run.states["adaptive"]
    assert (state.uncond_skipped, state.uncond_evaluations, state.converged) == (0, 0, None)


def test_adaptive_guidance_needs_a_call_and_both_predictions():
    """No current evaluation, no uncond cond, or a single prediction: nothing is measured."""
    run = new_run({"adaptive": AdaptiveGuidance("AG", 0.9, "denoised")})
    state = run.states["adaptive"]
    x = torch.zeros(1, 2)
    out = [rows([1.0, 0.0]), rows([1.0, 0.0])]
    assert pre_cfg(pre_args(run, out, x)) is out  # run.current is None
    run.current = Call(1.0)
    assert pre_cfg(pre_args(run, out, x, conds=("c", None))) is out
    assert pre_cfg(pre_args(run, out[:1], x))[0] is out[0]
    assert state.uncond_evaluations == 0
    assert pre_cfg(pre_args(run, out, x)) is not out
    assert state.uncond_evaluations == 1


# ------------------------------------------------------------------------------------------------ post-CFG


def post_args(run, denoised, dc, du, sigma, cond_scale, uncond=("u",)):
    return {"denoised": denoised, "cond_denoised": dc, "uncond_denoised": du, "cond_scale": cond_scale,
            "sigma": sigma if isinstance(sigma, torch.Tensor) else torch.tensor([sigma]), "uncond": uncond,
            "model_options": options_of(run)}


DC, DU = rows([3.0, 1.0]), rows([1.0, 2.0])  # D_c - D_u = (2, -1)


def cfg_of(scale):
    return DU + (DC - DU) * scale


def test_post_cfg_moves_to_the_linear_schedule_scale():
    """Linear 8 -> 2: scale 2 + 6 t; at sigma 5 (t = 0.5) the result is CFG at 5 whatever the sampler used."""
    run = new_run({"scheduled_cfg": scheduled("linear", start=8.0, end=2.0)})
    batch_call(run, sigma=5.0)
    out = post_cfg(post_args(run, cfg_of(7.0), DC, DU, torch.tensor([5.0, 9.0]), 7.0))
    assert torch.allclose(out, cfg_of(5.0), atol=1e-6)
    assert torch.allclose(out, rows([11.0, -3.0]), atol=1e-6)  # (1, 2) + 5 (2, -1)
    run.current = Call(8.0)
    out = post_cfg(post_args(run, cfg_of(3.0), DC, DU, 8.0, 3.0))  # t = 0.8: 2 + 4.8 = 6.8
    assert torch.allclose(out, cfg_of(6.8), atol=1e-5)


def test_post_cfg_keeps_extra_terms_and_the_sampler_scale_as_base():
    """Retargeting adds (w - s)(D_c - D_u), so a term another hook added stays; -1 endpoints mean the used scale."""
    run = new_run({"scheduled_cfg": scheduled("linear", start=-1.0, end=1.0)}, cfg=9.0)
    run.current = Call(5.0)
    extra = rows([0.5, 0.25])
    # base = cond_scale 4 (not the run's 9): scale = 1 + 3 * 0.5 = 2.5
    out = post_cfg(post_args(run, cfg_of(4.0) + extra, DC, DU, 5.0, 4.0))
    assert torch.allclose(out, cfg_of(2.5) + extra, atol=1e-6)


def test_post_cfg_custom_schedule_follows_the_step():
    """One scale per step, picked by the step the evaluation's sigma belongs to."""
    run = new_run({"scheduled_cfg": scheduled("custom", custom=(9.0, 7.0, 5.0))})  # sigmas 10, 6, 3, 0
    run.current = Call(4.0)
    for sigma, expected in ((10.0, 9.0), (7.0, 9.0), (6.0, 7.0), (4.0, 7.0), (3.0, 5.0), (0.5, 5.0)):
        out = post_cfg(post_args(run, cfg_of(6.0), DC, DU, sigma, 6.0))
        assert torch.allclose(out, cfg_of(expected), atol=1e-6), sigma


def test_post_cfg_outside_the_interval_is_the_conditional_prediction():
    """Outside the interval (when the pass still ran) the scale is 1: D_c."""
    run = new_run({"scheduled_cfg": scheduled(start=7.0, sigma_start=8.0)})
    run.current = Call(9.0)
    out = post_cfg(post_args(run, cfg_of(7.0), DC, DU, 9.0, 7.0))
    assert torch.allclose(out, DC, atol=1e-6)


def test_post_cfg_same_scale_is_bitwise_plain_cfg():
    """Where the scheduled scale equals the sampler's, the result is the sampler's own tensor."""
    run = new_run({"scheduled_cfg": scheduled()})
    run.current = Call(5.0)
    d = cfg_of(7.0)
    assert post_cfg(post_args(run, d, DC, DU, 5.0, 7.0)) is d


def test_post_cfg_leaves_a_dropped_pass_and_runs_without_uncond_alone():
    """A dropped pass (D_u = D_c) or a run without an uncond cond: the denoised prediction is returned as is."""
    run = new_run({"scheduled_cfg": scheduled(start=2.0)})
    d = cfg_of(7.0)
    run.current = Call(5.0, ("adaptive",))
    assert post_cfg(post_args(run, d, DC, DU, 5.0, 7.0)) is d
    run.current = Call(5.0)
    assert post_cfg(post_args(run, d, DC, DU, 5.0, 7.0, uncond=None)) is d
    assert post_cfg({"denoised": d, "uncond": ["u"], "model_options": {}}) is d
    assert torch.allclose(post_cfg(post_args(run, d, DC, DU, 5.0, 7.0)), cfg_of(2.0))


def test_post_cfg_before_any_call_still_applies_the_schedule():
    """No evaluation recorded yet (current is None): the schedule still applies."""
    run = new_run({"scheduled_cfg": scheduled(start=2.0)})
    assert run.current is None
    assert torch.allclose(post_cfg(post_args(run, cfg_of(7.0), DC, DU, 5.0, 7.0)), cfg_of(2.0))


# ---------------------------------------------------------------------------------------------------- CADS


CFG0 = cads.CADSConfig(tau1=0.2, tau2=0.8, noise_scale=0.5, psi=0.0)


class ModelExecutor:
    def __init__(self):
        self.calls = []

    def __call__(self, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        self.calls.append((x, t, c_concat, c_crossattn, control, transformer_options, kwargs))
        return "result"


def apply(run, c, sigma, chunks=(0, 1), uuids=("a", "b"), **kwargs):
    ex = ModelExecutor()
    to = {RUN_KEY: run, "cond_or_uncond": list(chunks), "uuids": list(uuids)}
    x, t = torch.zeros(1), torch.tensor([sigma, 0.0])
    assert cads_apply_model(ex, x, t, "concat", c, "control", to, **kwargs) == "result"
    (cx, ct, cc, c_out, ctrl, cto, kw), = ex.calls
    assert cx is x and ct is t and cc == "concat" and ctrl == "control" and cto is to
    return c_out, kw


def pure_noise(part, seed, sigma, stream, scale=0.5):
    """gamma = 0 and psi = 0: the conditioning is replaced by s * n, n drawn from the content's own seed."""
    n = torch.randn(tuple(part.shape), generator=torch.Generator().manual_seed(
        cads.noise_seed(seed, cads.content_key(part), sigma, stream)))
    return scale * n


def cond_batch(n=4):
    return torch.arange(n * 3 * 5, dtype=torch.float32).reshape(n, 3, 5) / 7.0


def test_cads_without_run_or_technique_passes_everything_through():
    ex = ModelExecutor()
    c = cond_batch()
    cads_apply_model(ex, "x", torch.tensor([9.0]), None, c, None, None, y="y")
    assert ex.calls[0][3] is c and ex.calls[0][5] == {} and ex.calls[0][6] == {"y": "y"}
    run = new_run({"adaptive": AdaptiveGuidance("AG")})
    c_out, _ = apply(run, c, 9.0)
    assert c_out is c


def test_cads_leaves_clean_steps_alone():
    """Below tau1 (t = 0.1 < 0.2) the conditioning is the caller's tensor and nothing is cached."""
    run = new_run({"cads": CADS("C", CFG0)})
    c, y = cond_batch(), torch.ones(4, 6)
    c_out, kw = apply(run, c, 1.0, y=y)
    assert c_out is c and kw["y"] is y
    assert run.states["cads"]["keys"] == {}


def test_cads_anneals_each_chunk_from_its_own_content():
    """At gamma = 0 each chunk becomes s * noise seeded by the run seed, its content, sigma and stream 0."""
    run = new_run({"cads": CADS("C", CFG0)}, seed=77)
    c = cond_batch()
    c_out, _ = apply(run, c, 9.0)
    assert torch.equal(c_out[:2], pure_noise(c[:2], 77, 9.0, 0))
    assert torch.equal(c_out[2:], pure_noise(c[2:], 77, 9.0, 0))
    assert run.states["cads"]["keys"] == {("a", 0, (2, 3, 5)): cads.content_key(c[:2]),
                                          ("b", 0, (2, 3, 5)): cads.content_key(c[2:])}
    # chunks of equal content get the same noise
    same = torch.cat([c[:2], c[:2]])
    c_out, _ = apply(new_run({"cads": CADS("C", CFG0)}, seed=77), same, 9.0)
    assert torch.equal(c_out[2:], c_out[:2])


def test_cads_partial_annealing_at_mid_noise():
    """t = 0.5 with tau 0.2 / 0.8: gamma = 1/2, so y_hat = sqrt(1/2) y + s sqrt(1/2) n (eq. 3, psi = 0)."""
    run = new_run({"cads": CADS("C", CFG0)}, seed=5)
    c = cond_batch(2)
    c_out, _ = apply(run, c, 5.0, chunks=(0,), uuids=("a",))
    expected = math.sqrt(0.5) * c + math.sqrt(0.5) * pure_noise(c, 5, 5.0, 0)
    assert torch.allclose(c_out, expected, atol=1e-5)


def test_cads_keeps_the_first_content_key_of_a_chunk():
    """The key of a chunk is cached per (uuid, stream, shape): later content changes keep the first noise."""
    run = new_run({"cads": CADS("C", CFG0)}, seed=3)
    c = cond_batch(2)
    apply(run, c, 9.0, chunks=(0,), uuids=("a",))
    c2 = c + 1.0
    c_out, _ = apply(run, c2, 9.0, chunks=(0,), uuids=("a",))
    assert torch.equal(c_out, pure_noise(c, 3, 9.0, 0))
    c_out, _ = apply(run, c2, 9.0, chunks=(0,), uuids=("z",))
    assert torch.equal(c_out, pure_noise(c2, 3, 9.0, 0))


def test_cads_chunk_index_replaces_missing_uuids():
    run = new_run({"cads": CADS("C", CFG0)})
    apply(run, cond_batch(), 9.0, uuids=("a",))
    assert set(run.states["cads"]["keys"]) == {("a", 0, (2, 3, 5)), (1, 0, (2, 3, 5))}


def test_cads_batch_not_divisible_by_chunks_is_one_chunk():
    """A batch that does not split evenly into the chunks (or no chunk list) is annealed as one tensor."""
    for chunks in ((0, 1), ()):
        run = new_run({"cads": CADS("C", CFG0)}, seed=9)
        c = cond_batch(3)
        c_out, _ = apply(run, c, 9.0, chunks=chunks)
        assert torch.equal(c_out, pure_noise(c, 9, 9.0, 0))
        assert list(run.states["cads"]["keys"]) == [("a", 0, (3, 3, 5))]


def test_cads_positive_only_leaves_the_uncond_chunk_alone():
    """positive only: the uncond chunk (cond_or_uncond 1) keeps its values; the cond chunk is annealed."""
    run = new_run({"cads": CADS("C", CFG0, positive_only=True)}, seed=8)
    c = cond_batch()
    c_out, _ = apply(run, c, 9.0, chunks=(1, 0))
    assert torch.equal(c_out[:2], c[:2])
    assert torch.equal(c_out[2:], pure_noise(c[2:], 8, 9.0, 0))
    c_out, _ = apply(run, c, 9.0, chunks=())  # no chunk list: annealed as one
    assert torch.equal(c_out, pure_noise(c, 8, 9.0, 0))
    run = new_run({"cads": CADS("C", CFG0)}, seed=8)
    c_out, _ = apply(run, c, 9.0, chunks=(1, 0))
    assert torch.equal(c_out[:2], pure_noise(c[:2], 8, 9.0, 0))


def test_cads_anneals_the_pooled_vector_on_its_own_stream():
    """A 2-D ``y`` is annealed per chunk on stream 1; with pooled_dims only its first features."""
    c, y = cond_batch(), torch.arange(4 * 8, dtype=torch.float32).reshape(4, 8) / 5.0
    run = new_run({"cads": CADS("C", CFG0)}, seed=4)
    c_out, kw = apply(run, c, 9.0, y=y)
    assert torch.equal(kw["y"][:2], pure_noise(y[:2], 4, 9.0, 1))
    assert torch.equal(kw["y"][2:], pure_noise(y[2:], 4, 9.0, 1))
    assert torch.equal(c_out[:2], pure_noise(c[:2], 4, 9.0, 0))
    run = new_run({"cads": CADS("C", CFG0, pooled_dims=6)}, seed=4)
    _, kw = apply(run, None, 9.0, y=y)
    assert torch.equal(kw["y"][:2, :6], pure_noise(y[:2, :6], 4, 9.0, 1))
    assert torch.equal(kw["y"][:, 6:], y[:, 6:])
    run = new_run({"cads": CADS("C", CFG0, pooled_dims=9)}, seed=4)  # wider than y: all of it
    _, kw = apply(run, c, 9.0, y=y)
    assert torch.equal(kw["y"][2:], pure_noise(y[2:], 4, 9.0, 1))


def test_cads_leaves_y_alone_when_not_pooled_or_not_a_vector():
    c, y = cond_batch(), torch.ones(4, 8)
    run = new_run({"cads": CADS("C", CFG0, pooled=False)})
    _, kw = apply(run, c, 9.0, y=y)
    assert kw["y"] is y
    run = new_run({"cads": CADS("C", CFG0)})
    y3 = torch.ones(4, 2, 8)
    _, kw = apply(run, c, 9.0, y=y3, other="o")
    assert kw["y"] is y3 and kw["other"] == "o"
    c_out, kw = apply(run, None, 9.0, y="not a tensor")
    assert c_out is None and kw["y"] == "not a tensor"


# ------------------------------------------------------------------------------------- runs and replacement


def test_a_second_technique_of_a_kind_replaces_the_first():
    """Techniques are keyed by kind: the table holds the later node's technique only, and the run uses it."""
    first, second = scheduled(start=7.0, node="first"), scheduled(start=1.0, node="second")
    table = {"scheduled_cfg": first}
    table = {**table, "scheduled_cfg": second}
    run = new_run(table)
    assert list(run.techniques) == ["scheduled_cfg"] and run.techniques["scheduled_cfg"].node == "second"
    assert batch_call(run)[0].calls[0][1][1] is None  # scale 1 from the second node


def test_nothing_leaks_from_one_run_to_the_next():
    """A new run starts with fresh state: convergence, skip counts and CADS keys do not carry over."""
    techs = {"scheduled_cfg": scheduled(start=7.0, sigma_start=8.0), "adaptive": AdaptiveGuidance("AG", 0.9,
                                                                                                   "denoised"),
             "cads": CADS("C", CFG0)}
    g = FakeGuider(techs)
    run1 = make_run(HOST, g, torch.tensor([10.0, 5.0, 0.0]), 1)
    run1.states["adaptive"].converged = torch.tensor([True, True])
    batch_call(run1, sigma=9.0)
    apply(run1, cond_batch(), 9.0)
    run2 = make_run(HOST, g, torch.tensor([10.0, 5.0, 0.0]), 2)
    assert run2.states is not run1.states
    assert run2.states["adaptive"].converged is None
    assert run2.states["scheduled_cfg"] == {"skipped": 0, "evaluations": 0}
    assert run2.states["cads"] == {"keys": {}} and run2.current is None
    assert batch_call(run2, sigma=5.0)[0].calls[0][1][1] == "u"
    assert run_of(g.model_options) is None  # the model's own options never carry a run


def test_finish_reports_each_technique(monkeypatch):
    """At the end of a run each technique logs its counts: skipped of evaluations, saved of total passes."""
    messages = []

    class Log:
        def info(self, fmt, *args):
            messages.append(fmt % args)

    monkeypatch.setattr(cfg_runtime, "log", Log())
    run = new_run({"scheduled_cfg": scheduled(start=7.0, sigma_start=8.0, node="S"),
                   "adaptive": AdaptiveGuidance("A", 0.95)})
    batch_call(run, sigma=9.0)
    batch_call(run, sigma=5.0)
    batch_call(run, sigma=4.0)
    st = run.states["adaptive"]
    st.uncond_evaluations, st.uncond_skipped = 3, 2
    run.finish()
    assert messages == ["S: unconditional pass skipped on 1 of 3 evaluations",
                        "A: 2 of 5 unconditional passes saved (threshold 0.95)"]
