"""Regional LoRA maths (pure torch): the keyframe clock against hand-stepped schedules, the token rules of each
layer family, the per-token weights of a call (image grid, text spans, joint, area share, negative rows) and the
masked delta on plain Linear / Conv layers with a plain delta function."""

from __future__ import annotations

import torch

from preprint.regional.attention import masks_on_grid
from preprint.regional.lora import (
    CONTEXT,
    IMAGE,
    JOINT,
    TEXT,
    VECTOR,
    CallLayout,
    HookSchedule,
    Keyframe,
    KeyframeClock,
    MaskedDelta,
    RegionalLoraRun,
    RegionLoraSpec,
    layer_delta,
    layer_stream,
    unet_grids,
)


def test_keyframe_clock_switches_when_its_start_sigma_is_reached():
    clock = KeyframeClock((Keyframe(1.0, 14.0), Keyframe(0.5, 5.0), Keyframe(0.0, 1.0)))
    sigmas = [14.0, 8.0, 5.0, 3.0, 1.0, 0.5]
    assert [clock.strength(s, 14.0) for s in sigmas] == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]


def test_keyframe_clock_holds_guarantee_steps_and_counts_a_sigma_once():
    clock = KeyframeClock((Keyframe(1.0, 14.0, guarantee_steps=3), Keyframe(0.2, 10.0)))
    # a keyframe is held for its guarantee steps (distinct sigmas) even after the next one's start is reached;
    # a second call at the same sigma (cond and uncond apart, Heun's second evaluation at one sigma) is no step
    got = [clock.strength(s, 14.0) for s in (14.0, 14.0, 9.0, 8.0, 7.0)]
    assert got == [1.0, 1.0, 1.0, 1.0, 0.2]


def test_keyframe_starting_before_the_run_guarantees_nothing():
    # the first keyframe starts above this run's top sigma (a denoise < 1 run): its guarantee does not hold, so the
    # second, already reached, takes over at the first call
    clock = KeyframeClock((Keyframe(1.0, 14.0, guarantee_steps=5), Keyframe(0.3, 6.0)))
    assert clock.strength(5.0, 5.0) == 0.3


def test_no_keyframes_is_strength_one():
    assert KeyframeClock(()).strength(3.0, 10.0) == 1.0


def test_layer_streams():
    assert layer_stream("unet", "input_blocks.1.1.transformer_blocks.0.attn2.to_k", 3) == CONTEXT
    assert layer_stream("unet", "input_blocks.1.1.transformer_blocks.0.attn2.to_q", 3) == IMAGE
    assert layer_stream("unet", "input_blocks.1.0.in_layers.2", 4) == IMAGE
    assert layer_stream("unet", "input_blocks.1.0.emb_layers.1", 2) == VECTOR
    assert layer_stream("flux", "double_blocks.0.txt_attn.qkv", 3) == TEXT
    assert layer_stream("flux", "txt_in", 3) == TEXT
    assert layer_stream("flux", "double_blocks.0.img_mlp.0", 3) == IMAGE
    assert layer_stream("flux", "double_blocks.0.img_mod.lin", 3) == VECTOR
    assert layer_stream("flux", "single_blocks.3.modulation.lin", 3) == VECTOR
    assert layer_stream("flux", "final_layer.adaLN_modulation.1", 3) == VECTOR
    assert layer_stream("flux", "single_blocks.3.linear1", 3) == JOINT
    assert layer_stream("flux", "final_layer.linear", 3) == IMAGE


def test_unet_grids_round_up_at_every_level():
    g = unet_grids(13, 22)
    assert g[13 * 22] == (13, 22) and g[7 * 11] == (7, 11) and g[4 * 6] == (4, 6) and g[2 * 3] == (2, 3)


def _layout(family="unet", masks=None, batch=4, cou=(0, 1), latent=(4, 6), grid=None, spans=None, text_len=0):
    masks = masks if masks is not None else [torch.ones(1, 8, 12)]
    positive = torch.tensor([1.0 if cou[b // (batch // len(cou))] != 1 else 0.0 for b in range(batch)])
    return CallLayout(family, lambda per, h, w, dev: masks_on_grid(masks, per, h, w), batch, batch // len(cou),
                      positive, latent, grid, spans or {}, text_len, None)


def test_call_weights_image_conv_vector_and_negative_rows():
    left = torch.zeros(2, 8, 12)
    left[0, :, :6] = 1.0  # image 1: left half; image 2: nothing
    lay = _layout(masks=[left], batch=4, cou=(0, 1))  # rows: pos img1, pos img2, neg img1, neg img2
    w = lay.weights(0, IMAGE, torch.zeros(4, 24, 3))
    assert w.shape == (4, 24, 1)
    grid = w[..., 0].view(4, 4, 6)
    assert torch.equal(grid[0, :, :3], torch.ones(4, 3)) and float(grid[0, :, 3:].abs().max()) == 0.0
    assert float(grid[1:].abs().max()) == 0.0  # image 2 uncovered, negative rows never
    c = lay.weights(0, IMAGE, torch.zeros(4, 5, 2, 3))  # a convolution at the next level (2 x 3)
    assert c.shape == (4, 1, 2, 3) and torch.allclose(c[0, 0], torch.tensor([[1.0, 0.5, 0.0]] * 2))
    v = lay.weights(0, VECTOR, torch.zeros(4, 7))
    assert torch.allclose(v[:, 0], torch.tensor([0.5, 0.0, 0.0, 0.0]))


def test_call_weights_text_and_joint_tokens():
    lay = _layout("flux", masks=[torch.ones(1, 4, 4), torch.ones(1, 4, 4)], batch=2, cou=(1, 0), latent=(4, 4),
                  grid=(2, 2), spans={0: (5, 8), 1: (8, 10)}, text_len=10)
    t = lay.weights(1, TEXT, torch.zeros(2, 10, 3))[..., 0]
    assert torch.equal(t[1], torch.tensor([0.0] * 8 + [1.0] * 2)) and float(t[0].abs().max()) == 0.0
    j = lay.weights(0, JOINT, torch.zeros(2, 10 + 4 + 2, 3))[..., 0]  # two reference-image tokens at the end
    assert torch.equal(j[1], torch.tensor([0.0] * 5 + [1.0] * 3 + [0.0] * 2 + [1.0] * 4 + [0.0] * 2))


def _spec(layers: dict, dw: dict, db: dict | None = None, keyframes=()) -> RegionLoraSpec:
    def delta(path, param, tensor, strengths):
        return (dw if param == "weight" else db)[path] * strengths[0]
    params = {p: ("weight",) + (("bias",) if db and p in db else ()) for p in layers}
    return RegionLoraSpec(0, (HookSchedule(1.0, keyframes),), params, delta)


def test_masked_delta_adds_the_delta_where_the_mask_is_and_nothing_elsewhere():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(3, 5)
    dw, db = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    spec = _spec({"l": lin}, {"l": dw}, {"l": db})
    left = torch.zeros(1, 8, 12)
    left[..., :6] = 1.0
    lay = _layout(masks=[left], batch=2, cou=(0, 1))
    hook = MaskedDelta("l", RegionalLoraRun((spec,)), lay, [(spec, (0.5,))])
    x = torch.randn(2, 24, 3, generator=g)
    with torch.no_grad():
        plain = lin(x)
        out = hook(lin, (x,), plain)
    grid = (out - plain).view(2, 4, 6, 5)
    assert float(grid[:, :, 3:].abs().max()) == 0.0 and float(grid[1].abs().max()) == 0.0
    want = torch.nn.functional.linear(x, 0.5 * dw, 0.5 * db).view(2, 4, 6, 5)[0, :, :3]
    assert torch.allclose(grid[0, :, :3], want, atol=1e-6)


def test_masked_delta_with_an_empty_mask_is_the_layer_bitwise():
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    spec = _spec({"c": conv}, {"c": torch.ones(3, 2, 3, 3)})
    lay = _layout(masks=[torch.zeros(1, 8, 12)], batch=1, cou=(0,))
    x = torch.randn(1, 2, 4, 6)
    with torch.no_grad():
        plain = conv(x)
        assert MaskedDelta("c", RegionalLoraRun((spec,)), lay, [(spec, (1.0,))])(conv, (x,), plain) is plain


def test_full_mask_equals_the_patched_layer():
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, stride=2)
    dw = 0.1 * torch.randn(3, 2, 3, 3, generator=g)
    spec = _spec({"c": conv}, {"c": dw})
    lay = _layout(masks=[torch.ones(1, 8, 12)], batch=1, cou=(0,), latent=(4, 6))
    x = torch.randn(1, 2, 4, 6, generator=g)
    with torch.no_grad():
        out = MaskedDelta("c", RegionalLoraRun((spec,)), lay, [(spec, (1.0,))])(conv, (x,), conv(x))
        want = torch.nn.functional.conv2d(x, conv.weight + dw, conv.bias, stride=2, padding=1)
    assert torch.allclose(out, want, atol=1e-6)


def test_bias_only_delta_broadcasts():
    lin, conv = torch.nn.Linear(2, 3), torch.nn.Conv2d(2, 3, 1)
    db = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(layer_delta(lin, torch.zeros(1, 4, 2), None, db) + torch.zeros(1, 4, 3), db.expand(1, 4, 3))
    assert layer_delta(conv, torch.zeros(1, 2, 2, 2), None, db).shape == (1, 3, 1, 1)


def test_run_caches_each_delta_once_per_strength_and_steps_keyframes():
    calls = []

    def delta(path, param, tensor, strengths):
        calls.append(strengths)
        return torch.ones(2, 2) * strengths[0]

    spec = RegionLoraSpec(0, (HookSchedule(0.5, (Keyframe(1.0, 10.0), Keyframe(0.0, 2.0))),), {"l": ("weight",)},
                          delta)
    run = RegionalLoraRun((spec,))
    like = torch.zeros(1)
    assert run.strengths(10.0, 10.0) == [(0.5,)] and run.strengths(2.0, 10.0) == [(0.0,)]
    for _ in range(3):
        run.delta(spec, "l", "weight", torch.zeros(2, 2), (0.5,), like)
    assert calls == [(0.5,)]
    assert RegionalLoraRun((spec,)).strengths(10.0, 10.0) == [(0.5,)]  # a new run starts from the first keyframe
