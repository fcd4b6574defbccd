"""Run engine of the perturbed-attention family (``guidance/pag_runtime.py``), driven with plain torch and small
fakes in place of ComfyUI (a fake ``Host``, guider, model sampling, model call; plain dicts for the options):

* the PREDICT_NOISE wrapper arming one guider call, the CALC_COND_BATCH wrapper appending the perturbed copy of
  the positive cond list to that call (and only that call), and the post-CFG hook adding ``s (D_c - D_p)``;
  the term is still added when the guider never runs post-CFG functions;
* which cond list is the positive one (found by identity, with a fallback to the first list);
* scale 0 and calls without the run state passing through untouched;
* the small helpers: batch rows of chunks, call arguments, option copies, run-state defaults, the technique
  names and the immutability of the objects shared between runs.

The fake model predicts ``D = x / 2 + value`` for a cond list, and ``0.8 D`` for the perturbed copy, so every
expected result is written out by hand below.
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest
import torch

from preprint.guidance.attention_perturbation import Perturbation
from preprint.guidance.pag_runtime import (
    PAG,
    SAG,
    SEG,
    SOFT_PAG,
    DegradedPass,
    Host,
    PagRunState,
    PassInfo,
    Pending,
    PerturbedCopy,
    SagPassInfo,
    SagPending,
    SagRunState,
    Technique,
    call_arg,
    chunks_of,
    index_of,
    make_hooks,
    pass_rows,
    perturbed_uuid,
    rows_of,
    with_options,
)

# ---------------------------------------------------------------------------------------------------- fakes


class Sampling:
    def __init__(self, flow: bool = False):
        self.flow = flow

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * 100.0


class Model:
    def __init__(self, flow: bool = False):
        self.model_sampling = Sampling(flow)


def no_attention(*a, **kw):
    raise AssertionError("the engine tests never run attention")


HOST = Host(attention=no_attention, calc_cond_batch=no_attention, is_flow=lambda ms: ms.flow,
            apply_model="apply_model")


class Schedule:
    """Returns a fixed scale and records what it was asked."""

    def __init__(self, scale: float):
        self.scale, self.asked = scale, []

    def scale_at(self, sigma: float, timestep: float) -> float:
        self.asked.append((sigma, timestep))
        return self.scale


def cond_list(value: float, name: str) -> list[dict]:
    return [{"value": value, "uuid": f"{name}-uuid", "area": name}]


class ModelCall:
    """ComfyUI's calc_cond_batch stand-in: one prediction per cond list (None for a None list)."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, conds, x, timestep, model_options):
        self.calls.append({"conds": conds, "x": x, "timestep": timestep, "options": model_options})
        info = (model_options or {}).get("transformer_options", {}).get(PAG.marker)
        out = []
        for i, c in enumerate(conds):
            d = None if c is None else x / 2 + c[0]["value"]
            out.append(d * 0.8 if info is not None and i == info.cond_index else d)
        return out


class Guider:
    def __init__(self, positive, negative):
        self.conds = {"positive": positive, "negative": negative}


class GuiderCall:
    """The PREDICT_NOISE executor: CFGGuider.predict_noise as ComfyUI runs it (one batched model call for the
    cond lists in ``order``, CFG, then the post-CFG functions)."""

    def __init__(self, guider, calc_hook, post_hook, model_call, cfg=5.0, order=("positive", "negative"),
                 run_post_cfg=True, lists=None):
        self.class_obj = guider
        self.calc_hook, self.post_hook, self.model_call = calc_hook, post_hook, model_call
        self.cfg, self.order, self.run_post_cfg, self.lists = cfg, order, run_post_cfg, lists
        self.model = Model()

    def __call__(self, x, timestep, model_options=None, seed=None):
        conds = self.lists if self.lists is not None else [self.class_obj.conds[n] for n in self.order]
        out = self.calc_hook(self.model_call, self.model, conds, x, timestep, model_options)
        assert len(out) == len(conds)
        c, u = out[self.order.index("positive")], out[self.order.index("negative")]
        d = u + self.cfg * (c - u)
        if self.run_post_cfg:
            d = self.post_hook({"denoised": d, "input": x, "model_options": model_options, "sigma": timestep,
                                "model": self.model})
        return d


def pag(rescale: float = 0.0, technique: Technique = PAG) -> PerturbedCopy:
    return PerturbedCopy(HOST, technique, {}, Perturbation(), "unet", 1, rescale)


def setup(scale=3.0, technique=PAG, rescale=0.0, **call_kw):
    schedule = Schedule(scale)
    predict, calc, post = make_hooks(schedule, pag(rescale, technique))
    guider = Guider(cond_list(1.5, "pos"), cond_list(-0.5, "neg"))
    state = PagRunState()
    options = {"transformer_options": {technique.state: state}}
    model_call = ModelCall()
    call = GuiderCall(guider, calc, post, model_call, **call_kw)
    return predict, calc, post, call, state, options, model_call, schedule


def x_and_t(sigma=2.5):
    x = torch.linspace(-1.0, 1.0, 24).reshape(1, 2, 3, 4)
    return x, torch.tensor([sigma])


def expected(x, scale, cfg=5.0, pos=1.5, neg=-0.5):
    dc, du = x / 2 + pos, x / 2 + neg
    return du + cfg * (dc - du) + scale * (dc - 0.8 * dc)


# -------------------------------------------------------------------------------------------- the guider call


@pytest.mark.parametrize("scale", [3.0, 1.0, -1.0])
@pytest.mark.parametrize("post_cfg", [True, False])
def test_guider_call_adds_the_perturbation_term(scale, post_cfg):
    """s (D_c - D_p) on top of CFG, from one model call that carries the perturbed copy as a third cond list;
    a guider that never runs post-CFG functions still gets the term (predict_noise adds what is owed)."""
    predict, _, _, call, state, options, model_call, schedule = setup(scale, run_post_cfg=post_cfg)
    x, t = x_and_t()
    out = predict(call, x, t, options)
    torch.testing.assert_close(out, expected(x, scale))
    assert schedule.asked == [(2.5, 250.0)]  # sigma and the model's timestep, read off the call's timestep
    (c,) = model_call.calls
    pos, neg, copy = c["conds"]
    assert pos is call.class_obj.conds["positive"] and neg is call.class_obj.conds["negative"]
    assert copy == [{"value": 1.5, "uuid": perturbed_uuid("pos-uuid"), "area": "pos"}]
    assert c["options"]["transformer_options"][PAG.marker] == PassInfo(2, "unet", 1)
    assert state.perturbed_steps == 1
    # the run state is back to idle after the guider call
    assert (state.armed_x, state.pending, state.guider_conds) == (None, None, {})


def test_keyword_call_and_step_count():
    """predict_noise reads x and the model options by name too; every guided step is counted once."""
    predict, _, _, call, state, options, _, _ = setup()
    x, t = x_and_t()
    out = predict(call, x=x, timestep=t, model_options=options)
    torch.testing.assert_close(out, expected(x, 3.0))
    predict(call, x, t, model_options=options, seed=7)
    assert state.perturbed_steps == 2


def test_positive_list_found_by_identity():
    """When the call lists the negative first, the positive list (the guider's own object) is still the one
    copied and used as D_c."""
    predict, _, _, call, _, options, model_call, _ = setup(order=("negative", "positive"))
    x, t = x_and_t()
    torch.testing.assert_close(predict(call, x, t, options), expected(x, 3.0))
    assert model_call.calls[0]["conds"][2][0]["uuid"] == perturbed_uuid("pos-uuid")


def test_first_list_is_the_fallback_target():
    """A positive list that is not the guider's own object: the first list of the call is the one copied."""
    predict, _, _, call, _, options, model_call, _ = setup(
        lists=[cond_list(1.5, "other"), cond_list(-0.5, "neg")])
    x, t = x_and_t()
    torch.testing.assert_close(predict(call, x, t, options), expected(x, 3.0))
    assert model_call.calls[0]["conds"][2][0]["uuid"] == perturbed_uuid("other-uuid")


def test_no_target_when_the_first_list_is_missing():
    """No positive list among the call's lists and a None first list: nothing to copy, the call passes through."""
    _, calc, _, _, state, options, model_call, _ = setup()
    x, t = x_and_t()
    state.armed_x, state.guider_conds = x, {"positive": cond_list(1.0, "pos")}
    conds = [None, cond_list(-0.5, "neg"), cond_list(2.0, "third")]
    out = calc(model_call, Model(), conds, x, t, options)
    assert model_call.calls[0]["conds"] is conds and model_call.calls[0]["options"] is options
    assert out[0] is None and state.pending is None and state.perturbed_steps == 0


def test_scale_zero_runs_no_perturbed_pass():
    predict, _, _, call, state, options, model_call, _ = setup(0.0)
    x, t = x_and_t()
    torch.testing.assert_close(predict(call, x, t, options), expected(x, 0.0))
    (c,) = model_call.calls
    assert len(c["conds"]) == 2 and c["options"] is options
    assert state.perturbed_steps == 0


def test_only_the_armed_call_gets_the_copy():
    """The first model call of the guider call with its x gets the copy; a second one with the same x, or one
    with another x (another guider's or a sampler's own call), passes through."""
    _, calc, _, _, state, options, model_call, _ = setup()
    x, t = x_and_t()
    guider = Guider(cond_list(1.5, "pos"), cond_list(-0.5, "neg"))
    conds = [guider.conds["positive"], guider.conds["negative"]]
    state.armed_x, state.guider_conds = x, {"positive": guider.conds["positive"]}
    calc(model_call, Model(), conds, x.clone(), t, options)  # not the armed tensor
    assert len(model_call.calls[-1]["conds"]) == 2 and state.armed_x is x
    first = calc(model_call, Model(), conds, x, t, options)
    assert len(model_call.calls[-1]["conds"]) == 3 and len(first) == 2
    calc(model_call, Model(), conds, x, t, options)
    assert len(model_call.calls[-1]["conds"]) == 2
    assert state.perturbed_steps == 1


def test_pending_term_is_used_once_and_only_for_its_x():
    _, _, post, _, state, options, _, _ = setup()
    x, _ = x_and_t()
    c, p = torch.full_like(x, 2.0), torch.full_like(x, 0.5)
    state.pending = Pending(x, c, p, 2.0)
    other = {"denoised": torch.zeros_like(x), "input": x.clone(), "model_options": options}
    assert post(other) is other["denoised"] and state.pending is not None
    args = {"denoised": torch.ones_like(x), "input": x, "model_options": options}
    torch.testing.assert_close(post(args), torch.full_like(x, 1.0 + 2.0 * 1.5))
    assert state.pending is None
    assert post(args) is args["denoised"]


def test_without_run_state_everything_passes_through():
    """A model call outside a sampling run of this technique (no state in the options) is left alone."""
    predict, calc, post, call, _, _, model_call, _ = setup()
    x, t = x_and_t()
    bare = {"transformer_options": {}}
    torch.testing.assert_close(predict(call, x, t, bare), expected(x, 0.0))
    assert len(model_call.calls[0]["conds"]) == 2
    conds = [cond_list(1.0, "a"), cond_list(0.0, "b")]
    calc(model_call, Model(), conds, x, t, None)
    assert model_call.calls[-1]["conds"] is conds
    args = {"denoised": x, "input": x, "model_options": None}
    assert post(args) is x
    assert post({"denoised": x, "input": x}) is x


def test_rescale_is_applied_against_the_positive_prediction():
    """rescale 1: the guided prediction's noise x - D has the per-sample std of the positive prediction's."""
    predict, _, _, call, _, options, _, _ = setup(rescale=1.0)
    x, t = x_and_t()
    out = predict(call, x, t, options)
    dc = x / 2 + 1.5
    torch.testing.assert_close((x - out).std(), (x - dc).std())
    assert not torch.allclose(out, expected(x, 3.0))


@pytest.mark.parametrize("technique", [SOFT_PAG, SEG])
def test_each_technique_has_its_own_state_and_stream(technique):
    predict, _, _, call, state, options, model_call, _ = setup(technique=technique)
    x, t = x_and_t()
    # the PAG marker is absent, so the fake model sees no perturbed list: the term is s (D_c - D_c) = 0
    torch.testing.assert_close(predict(call, x, t, options), expected(x, 0.0))
    (c,) = model_call.calls
    assert c["conds"][2][0]["uuid"] == perturbed_uuid("pos-uuid", technique.stream)
    assert c["options"]["transformer_options"][technique.marker] == PassInfo(2, "unet", 1)
    assert state.perturbed_steps == 1


# ---------------------------------------------------------------------------------------------------- helpers


def test_technique_names():
    assert (PAG.state, PAG.marker, PAG.stream) == ("preprint_pag_state", "preprint_pag_pass", "")
    assert (SAG.state, SAG.marker) == ("preprint_sag_state", "preprint_sag_pass")
    techniques = (PAG, SOFT_PAG, SEG, SAG)
    for attr in ("key", "state", "marker", "stream"):
        assert len({getattr(t, attr) for t in techniques}) == 4, attr


def test_rows_of_chunks():
    assert chunks_of([0, 1, 0, 2], 0) == [0, 2]
    assert rows_of([2, 0], 6, 3) == [0, 1, 4, 5]
    assert rows_of([0], 4, 0) == []  # a call without chunks has no rows
    assert rows_of([], 7, 2) == []  # nothing asked: no divisibility check either
    with pytest.raises(ValueError, match="cannot hold 2 equal chunks"):
        rows_of([1], 7, 2)


def test_pass_rows():
    info = PassInfo(1, "unet", 1)
    assert pass_rows({"cond_or_uncond": [0, 1, 1]}, info, 6) == [2, 3, 4, 5]
    assert pass_rows({}, info, 6) == [] and pass_rows({"cond_or_uncond": None}, info, 6) == []


def test_perturbed_uuid_is_uuid5_of_the_stream_tag():
    ns = uuid.UUID("5d0f3c4e-6a8b-4f2e-9c1d-7b3a2e1f0a91")
    assert perturbed_uuid("abc") == uuid.uuid5(ns, "abc")
    assert perturbed_uuid("abc", "seg") == uuid.uuid5(ns, "seg:abc")


def test_index_of_is_by_identity():
    a, b, same_as_b = ["a"], ["b"], ["b"]
    assert index_of([a, b], b) == 1
    assert index_of([a, same_as_b, b], b) == 2  # an equal list is not the guider's list
    assert index_of([a, b], ["c"]) is None
    assert index_of([None, a], None) is None


def test_call_arg():
    assert call_arg((1, 2, 3), {}, 2, "z") == 3
    assert call_arg((1, 2), {"z": 5}, 2, "z") == 5
    assert call_arg((1, 2), {}, 2, "z", 9) == 9


def test_with_options_copies_and_merges():
    prev = object()
    original = {"transformer_options": {"patches_replace": {"attn1": {("input", 1): prev}, "dit": {"d": 1}},
                                        "wrappers": {"apply_model": {"other": ["w"]}}, "keep": 1},
                "other": 2}
    snapshot = repr(original)
    mo = with_options(original, {"attn1": {("middle", 0, 0): "p"}, "attn2": {("x",): "q"}},
                      ("apply_model", "mine", "fn"), marker=7)
    assert repr(original) == snapshot  # nothing shared is changed
    topts = mo["transformer_options"]
    assert topts["patches_replace"] == {"attn1": {("input", 1): prev, ("middle", 0, 0): "p"}, "dit": {"d": 1},
                                        "attn2": {("x",): "q"}}
    assert topts["wrappers"] == {"apply_model": {"other": ["w"], "mine": ["fn"]}}
    assert (topts["marker"], topts["keep"], mo["other"]) == (7, 1, 2)
    bare = with_options({}, None, None, marker=1)
    assert bare == {"transformer_options": {"marker": 1}}


def test_run_state_defaults_are_fresh():
    a, b = PagRunState(), PagRunState()
    assert (a.armed_x, a.pending, a.guider_conds, a.perturbed_steps) == (None, None, {}, 0)
    a.guider_conds["positive"] = 1
    assert b.guider_conds == {}
    s, r = SagRunState(), SagRunState()
    assert (s.armed_x, s.pending, s.guider_conds, s.masks, s.last_masks) == (None, None, {}, {}, {})
    s.masks["u"], s.last_masks["u"] = 1, 2
    assert (r.masks, r.last_masks) == ({}, {})
    x = torch.zeros(1)
    assert Pending(x, x, x, 2.0).scale == 2.0 and SagPending(x, x, [], [], 1.5).scale == 1.5


@pytest.mark.parametrize("make", [
    lambda: HOST, lambda: PAG, lambda: PassInfo(0, "unet", 1), lambda: pag(),
    lambda: SagPassInfo(0, SagRunState(), 1.0), lambda: DegradedPass(HOST, ("middle", 0, 0), 1.0, 1.0)])
def test_shared_objects_are_immutable(make):
    """Host, techniques and passes are shared by every run of a patched model (and its clones): none of them
    can be changed by one run under another's feet."""
    obj = make()
    name = dataclasses.fields(obj)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, name, None)
