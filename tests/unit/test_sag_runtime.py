"""Self-attention guidance in the perturbed-attention engine (``guidance/pag_runtime.py``: ``sag_mask_patch``
and ``DegradedPass``), driven with plain torch and fakes in place of ComfyUI:

* the mask patch records, per chunk of the guiding cond, the mask of keys receiving more than the threshold of
  attention (written out here from the definition), under the chunk's uuid, and returns the layer's output;
* the CFG call records the masks of the guiding cond list (the negative; the positive when there is none),
  chaining an earlier patch of the layer, and keeps the latest mask of each uuid for steps that reuse it;
* the guidance step: blur inside the union of the masks, re-noise (alpha 1 for EPS, 1 - sigma per sample for
  flow), one more model call on fresh uuids with its chunks marked perturbed, ``D + s (x0' - D(x'))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from preprint.guidance import sag as sag_math
from preprint.guidance.pag_runtime import (
    PERTURBED,
    SAG,
    SAG_DEGRADED,
    DegradedPass,
    Host,
    PassInfo,
    SagPassInfo,
    SagPending,
    SagRunState,
    make_hooks,
    perturbed_uuid,
    sag_mask_patch,
)

HEADS, GRID = 2, (4, 5)
N = GRID[0] * GRID[1]
LAYER = ("middle", 0, 0)


def rand(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def plain_attention(q, k, v, heads, attn_precision=None, transformer_options=None):
    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    out = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // heads), -1) @ split(v)
    return out.transpose(1, 2).reshape(q.shape)


def mask_of(q, k, threshold=1.0):
    """Keys that receive more than ``threshold`` attention in total, averaged over heads, on the grid."""
    qh = q.reshape(q.shape[0], N, HEADS, -1).transpose(1, 2)
    kh = k.reshape(k.shape[0], N, HEADS, -1).transpose(1, 2)
    a = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), -1)
    return (a.mean(1).sum(1) > threshold).float().view(q.shape[0], 1, *GRID)


def layer_inputs(batch):
    # sharp attention (large logits), so the masks hold both kept and dropped keys
    return rand(batch, N, 16, seed=1, scale=3.0), rand(batch, N, 16, seed=2, scale=3.0), rand(batch, N, 16, seed=3)


def extra_options(cou, uuids=None, **more):
    out = {"n_heads": HEADS, "cond_or_uncond": cou, "activations_shape": [2 * len(cou), 320, *GRID], **more}
    return out if uuids is None else {**out, "uuids": uuids}


HOST = Host(plain_attention, None, lambda ms: ms.flow, "apply_model")


# -------------------------------------------------------------------------------------------- the mask patch


def test_mask_patch_records_the_guiding_chunks():
    q, k, v = layer_inputs(4)
    state = SagRunState()
    info = SagPassInfo(0, state, 1.0)
    out = sag_mask_patch(HOST, None)(q, k, v, extra_options([1, 0], ["neg", "pos"], **{SAG.marker: info}))
    assert torch.equal(out, plain_attention(q, k, v, HEADS))
    want = mask_of(q[2:], k[2:])
    assert 0 < want.sum() < want.numel()
    assert list(state.masks) == ["pos"] and torch.equal(state.masks["pos"], want)
    # two chunks of the guiding cond: each its own mask; without uuids the mask is kept under None
    state = SagRunState()
    sag_mask_patch(HOST, None)(q, k, v, extra_options([0, 0], ["a", "b"], **{SAG.marker: SagPassInfo(0, state, 1.0)}))
    assert torch.equal(state.masks["a"], mask_of(q[:2], k[:2])) and torch.equal(state.masks["b"], mask_of(q[2:], k[2:]))
    state = SagRunState()
    sag_mask_patch(HOST, None)(q, k, v, extra_options([1, 0], **{SAG.marker: SagPassInfo(0, state, 1.0)}))
    assert list(state.masks) == [None] and torch.equal(state.masks[None], want)


def test_mask_patch_threshold_and_calls_without_the_pass():
    q, k, v = layer_inputs(4)
    state = SagRunState()
    sag_mask_patch(HOST, None)(q, k, v, extra_options([1, 0], ["n", "p"], **{SAG.marker: SagPassInfo(0, state, 1.5)}))
    assert torch.equal(state.masks["p"], mask_of(q[2:], k[2:], 1.5))
    prev = lambda q_, k_, v_, e: 2.0 * plain_attention(q_, k_, v_, HEADS)  # noqa: E731
    for options in (extra_options([1, 0], ["n", "p"]), extra_options([1, 1], ["n", "p"], **{SAG.marker: SagPassInfo(
            0, state, 1.0)}), {**extra_options([0], ["p"], **{SAG.marker: SagPassInfo(0, state, 1.0)}),
                               "cond_or_uncond": None}):
        state.masks = {}
        out = sag_mask_patch(HOST, prev)(q, k, v, options)
        assert torch.equal(out, 2.0 * plain_attention(q, k, v, HEADS)) and state.masks == {}


# -------------------------------------------------------------------------------------------- the CFG call


class CfgCall:
    """calc_cond_batch stand-in: runs the layer's attn1 patch for the call's chunks, one chunk per cond entry."""

    def __init__(self, run_layer=True):
        self.run_layer, self.seen = run_layer, []

    def __call__(self, model, conds, x, timestep, model_options):
        topts = model_options["transformer_options"]
        cou = [i for i, c in enumerate(conds) if c is not None for _ in c]
        uuids = [e["uuid"] for c in conds if c is not None for e in c]
        q, k, v = layer_inputs(2 * len(cou))
        if self.run_layer:
            patch = topts["patches_replace"]["attn1"][LAYER]
            self.seen.append(patch(q, k, v, {**topts, **extra_options(cou, uuids)}))
        return [None if c is None else x + i for i, c in enumerate(conds)]


def sag_conds():
    return [[{"uuid": "p1", "v": 1}], [{"uuid": "n1", "v": 2}, {"uuid": "n2", "v": 3}]]


def test_cfg_call_records_the_negative_masks_and_chains():
    prev = lambda q_, k_, v_, e: 2.0 * plain_attention(q_, k_, v_, HEADS)  # noqa: E731
    options = {"transformer_options": {"patches_replace": {"attn1": {LAYER[:2]: prev}}}}
    state, conds, x = SagRunState(), sag_conds(), torch.zeros(2, 4, 8, 10)
    call = CfgCall()
    dp = DegradedPass(HOST, LAYER, 1.0, 1.0)
    out = dp.run(state, call, "model", conds, x, torch.tensor([1.0]), options, 1, 0.75)
    q, k, v = layer_inputs(6)
    assert torch.equal(call.seen[0], 2.0 * plain_attention(q, k, v, HEADS))
    masks = [mask_of(q[2:4], k[2:4]), mask_of(q[4:6], k[4:6])]
    p = state.pending
    assert (p.x is x, p.pred is out[1], p.conds is conds[1], p.scale) == (True, True, True, 0.75)
    assert all(torch.equal(a, b) for a, b in zip(p.masks, masks, strict=True))
    assert state.masks == {} and set(state.last_masks) == {"n1", "n2"}
    assert "attn1" in options["transformer_options"]["patches_replace"] and len(
        options["transformer_options"]["patches_replace"]["attn1"]) == 1  # the caller's options untouched
    # a step whose model call reuses the layer (a block cache) keeps the masks of the step that computed them
    state.pending = None
    dp.run(state, CfgCall(run_layer=False), "model", conds, x, torch.tensor([1.0]), options, 1, 0.75)
    assert all(torch.equal(a, b) for a, b in zip(state.pending.masks, masks, strict=True))
    # never a mask for this cond: no guidance term
    fresh = SagRunState()
    dp.run(fresh, CfgCall(run_layer=False), "model", conds, x, torch.tensor([1.0]), options, 1, 0.75)
    assert fresh.pending is None


class Sampling:
    def __init__(self, flow):
        self.flow = flow

    def timestep(self, sigma):
        return sigma * 100.0


class Model:
    def __init__(self, flow=False):
        self.model_sampling = Sampling(flow)


class Schedule:
    def scale_at(self, sigma, timestep):
        return 0.5


def test_guiding_cond_is_the_negative_then_the_positive():
    dp = DegradedPass(HOST, LAYER, 1.0, 1.0)
    _, calc, _ = make_hooks(Schedule(), dp)
    x = torch.zeros(2, 4, 8, 10)
    for conds, target in ((sag_conds(), 1), ([sag_conds()[0], None], 0)):
        state = SagRunState(armed_x=x, guider_conds={"negative": conds[1], "positive": conds[0]})
        calc(CfgCall(), Model(), conds, x, torch.tensor([1.0]), {"transformer_options": {SAG.state: state}})
        assert state.pending.conds is conds[target]


# -------------------------------------------------------------------------------------------- the guidance step


class DegradedCall:
    def __init__(self):
        self.calls = []

    def __call__(self, model, conds, x, sigma, model_options):
        self.calls.append((model, conds, x, sigma, model_options))
        return [0.5 * x + 0.1]


def guide_case(flow):
    call = DegradedCall()
    dp = DegradedPass(Host(None, call, lambda ms: ms.flow, "apply_model"), LAYER, 1.5, 1.0)
    x, pred, denoised = rand(2, 4, 8, 10, seed=4), rand(2, 4, 8, 10, seed=5), rand(2, 4, 8, 10, seed=6)
    a = torch.zeros(2, 1, *GRID)
    a[0, :, :2] = 1.0  # top of the first sample, left of the second
    a[1, :, :, :1] = 1.0
    b = torch.zeros(2, 1, *GRID)
    b[1, :, :, 3:] = 1.0  # right of the second
    conds = [{"uuid": "n1", "v": 2}, {"uuid": "n2", "v": 3}]
    pending = SagPending(x, pred, conds, [a, b], 0.8)
    options = {"transformer_options": {"k": 1}}
    args = {"input": x, "denoised": denoised, "sigma": torch.tensor([0.25, 0.5]), "model": Model(flow),
            "model_options": options}
    return dp, call, pending, args


def expected_guidance(pending, args, flow):
    x, pred = args["input"], pending.pred
    mask = torch.maximum(*(F.interpolate(m, size=(8, 10), mode="nearest") for m in pending.masks))
    degraded = sag_math.gaussian_blur_2d(pred, 9, 1.5) * mask + pred * (1 - mask)
    alpha = (1.0 - args["sigma"]).view(2, 1, 1, 1) if flow else 1.0
    x_deg = x + alpha * (degraded - pred)
    return x_deg, args["denoised"] + 0.8 * (degraded - (0.5 * x_deg + 0.1))


def test_guidance_step_eps_and_flow():
    for flow in (False, True):
        dp, call, pending, args = guide_case(flow)
        out = dp.guide(pending, args)
        x_deg, want = expected_guidance(pending, args, flow)
        ((model, conds, x_seen, sigma, mo),) = call.calls
        torch.testing.assert_close(x_seen, x_deg)
        torch.testing.assert_close(out, want)
        assert model is args["model"] and sigma is args["sigma"]
        assert conds == [[{"uuid": perturbed_uuid("n1", "sag"), "v": 2}, {"uuid": perturbed_uuid("n2", "sag"), "v": 3}]]


def test_guidance_call_is_marked_as_a_stream_of_its_own():
    dp, call, pending, args = guide_case(False)
    dp.guide(pending, args)
    mo = call.calls[0][4]
    topts = mo["transformer_options"]
    assert topts[SAG_DEGRADED] == PassInfo(0, "unet", 1) and topts["k"] == 1
    assert args["model_options"] == {"transformer_options": {"k": 1}}
    (wrapper,) = topts["wrappers"]["apply_model"][SAG.key]
    seen = []
    wrapper(lambda *a: seen.append(a[5]), torch.zeros(4, 4, 8, 10), "t", transformer_options={
        "cond_or_uncond": [0, 0], **topts})
    assert seen[0][PERTURBED] == {0, 1}
