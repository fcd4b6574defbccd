"""Regional LoRA over whole model calls (pure torch): the APPLY_MODEL wrapper driven with plain Linear / Conv layers,
a plain delta function and options dicts as ComfyUI hands them. Checked: each region's delta on its own tokens of a
UNet (convolution, image tokens, its own prompt's key projection, area share on an embedding) and of a Flux call
(image grid with patching, text spans after the base prompt and any lead tokens, joint tokens, modulation); the
negative rows, negative-only calls and calls outside the sigma window left alone; hooks removed after the call;
keyframe strengths stepped by the run's calls; and the keyframe clock's guarantee rules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from preprint.regional.attention import RegionError, masks_on_grid
from preprint.regional.lora import (
    IMAGE,
    CallLayout,
    HookSchedule,
    Keyframe,
    KeyframeClock,
    LoraRegion,
    RegionalLoraApply,
    RegionalLoraRun,
    RegionLoraSpec,
    unet_grids,
)
from preprint.regional.runtime import RegionSet
from preprint.utils.sigma_window import SigmaWindow

RUN = "test_regional_lora_run"
ATOL = 1e-5  # every delta below moves outputs by order 1

# UNet layer paths (as the diffusion model names them) and Flux ones
CONV = "input_blocks.1.0.in_layers.2"
TOK = "input_blocks.1.1.transformer_blocks.0.ff.net.2"
KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
EMB = "time_embed.0"
IMG = "double_blocks.0.img_mlp.0"
TXT = "double_blocks.0.txt_mlp.0"
SINGLE = "single_blocks.0.linear1"
MOD = "double_blocks.0.img_mod.lin"


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _layer(layer: nn.Module, g) -> nn.Module:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(_randn(g, *p.shape))
    return layer


def _spec(index: int, strength: float, deltas: dict, keyframes=()) -> RegionLoraSpec:
    """Region ``index``'s LoRA: a weight change per path, scaled by the hook's strength (one hook)."""
    def delta(path, param, tensor, strengths):
        assert param == "weight" and tensor.shape == deltas[path].shape
        return deltas[path] * strengths[0]
    return RegionLoraSpec(index, (HookSchedule(strength, keyframes),), {p: ("weight",) for p in deltas}, delta)


def _options(sigma: float, cou, run=None, sample=None) -> dict:
    to = {"sigmas": torch.tensor([sigma]), "cond_or_uncond": list(cou)}
    if run is not None:
        to[RUN] = run
    if sample is not None:
        to["sample_sigmas"] = torch.tensor(sample)
    return to


def _hooks(modules: dict) -> int:
    return sum(len(m._forward_hooks) for m in modules.values())


# ------------------------------------------------------------------------------------------------------- UNet calls


class _UNet:
    """Four hooked layers of a UNet call on a 4 x 6 latent, 2 images per prompt chunk (by default positive and
    negative: batch 4), and two regions: region 0 covers image 1's left half (image 2: nothing), region 1 the top
    half of both images."""

    def __init__(self, seed=0, cou=(0, 1), masks=None):
        g = torch.Generator().manual_seed(seed)
        self.g = g
        self.cou = cou
        self.modules = {CONV: _layer(nn.Conv2d(3, 5, 3, padding=1), g), TOK: _layer(nn.Linear(5, 5), g),
                        KEY: _layer(nn.Linear(8, 5, bias=False), g), EMB: _layer(nn.Linear(6, 5), g)}
        if masks is None:
            left = torch.zeros(2, 8, 12)
            left[0, :, :6] = 1.0
            top = torch.zeros(1, 8, 12)
            top[:, :4] = 1.0
            masks = (left, top)
        self.contexts = [_randn(g, 1, 7, 8), _randn(g, 1, 7, 8)]
        self.regions = RegionSet(tuple(LoraRegion(c, m, hooks=object()) for c, m in zip(self.contexts, masks,
                                                                                         strict=True)))
        b = 2 * len(cou)
        self.x, self.base = _randn(g, b, 3, 4, 6), _randn(g, b, 7, 8)  # latent; the base prompt (same shape)
        self.tokens, self.emb = _randn(g, b, 24, 5), _randn(g, b, 6)
        self.hooks_seen: list[int] = []

    def executor(self, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        """The model: each layer on its input, the key projection on the base prompt and on each region's prompt as
        regional attention hands it (the cached prompt expanded over the batch)."""
        self.hooks_seen.append(_hooks(self.modules))
        m, b = self.modules, x.shape[0]
        ctx = self.regions.contexts(x.device, x.dtype)
        return {"conv": m[CONV](x), "tok": m[TOK](self.tokens), "k_base": m[KEY](c_crossattn),
                "k0": m[KEY](ctx[0].expand(b, -1, -1)), "k1": m[KEY](ctx[1].expand(b, -1, -1)), "emb": m[EMB](self.emb)}

    def plain(self):
        return self.executor(self.x, None, None, self.base, None, None)

    def call(self, apply, to):
        return apply(self.executor, self.x, to["sigmas"], None, self.base, None, to)


def _top(batch: int) -> torch.Tensor:
    """Region 1's weight on the 24 image tokens: top half of the positive rows (the first half of the batch)."""
    w = torch.zeros(batch, 24, 1)
    w[: batch // 2, :12] = 1.0
    return w


def _unet_deltas(g) -> tuple[dict, dict]:
    d0 = {CONV: _randn(g, 5, 3, 3, 3), KEY: _randn(g, 5, 8), EMB: _randn(g, 5, 6)}  # region 0: no token layer
    d1 = {TOK: _randn(g, 5, 5), KEY: _randn(g, 5, 8), CONV: _randn(g, 5, 3, 3, 3)}  # region 1: no embedding
    return d0, d1


def test_unet_call_adds_each_regions_delta_on_its_own_tokens_only():
    """Conv / token layers get each region's delta on its mask (positive rows only), the key projection the whole
    delta on that region's own prompt and none on the base prompt or the other region's, an embedding the delta
    times the region's area share; overlapping regions add."""
    u = _UNet()
    d0, d1 = _unet_deltas(u.g)
    specs = (_spec(0, 0.5, d0), _spec(1, 1.0, d1))
    apply = RegionalLoraApply("unet", RUN, specs, u.modules, u.regions, SigmaWindow())
    with torch.no_grad():
        plain = u.plain()
        got = u.call(apply, _options(5.0, u.cou, RegionalLoraRun(specs)))
        w0 = torch.zeros(4, 4, 6)
        w0[0, :, :3] = 1.0  # positive row of image 1
        w1 = torch.zeros(4, 4, 6)
        w1[:2, :2] = 1.0  # positive rows, top half
        want = {
            "conv": plain["conv"] + w0.unsqueeze(1) * F.conv2d(u.x, 0.5 * d0[CONV], padding=1)
            + w1.unsqueeze(1) * F.conv2d(u.x, d1[CONV], padding=1),
            "tok": plain["tok"] + w1.view(4, 24, 1) * F.linear(u.tokens, d1[TOK]),
            "k_base": plain["k_base"],
            "k0": plain["k0"] + F.linear(u.contexts[0].expand(4, -1, -1), 0.5 * d0[KEY]),
            "k1": plain["k1"] + F.linear(u.contexts[1].expand(4, -1, -1), d1[KEY]),
            "emb": plain["emb"] + torch.tensor([[0.5], [0.0], [0.0], [0.0]]) * F.linear(u.emb, 0.5 * d0[EMB]),
        }
    for k in want:
        assert torch.allclose(got[k], want[k], atol=ATOL), k
    assert torch.equal(got["k_base"], plain["k_base"])
    assert u.hooks_seen[-1] > 0 and _hooks(u.modules) == 0  # hooked during the call, removed after it


def test_region_with_an_empty_mask_is_passed_over_and_the_next_still_acts():
    """A region whose weight on a layer is 0 everywhere adds nothing there; the region after it still adds its
    delta."""
    u = _UNet(masks=(torch.zeros(1, 8, 12), torch.ones(1, 8, 12)))
    d0, d1 = _unet_deltas(u.g)
    specs = (_spec(0, 1.0, d0), _spec(1, 1.0, d1))
    apply = RegionalLoraApply("unet", RUN, specs, u.modules, u.regions, SigmaWindow())
    with torch.no_grad():
        plain = u.plain()
        got = u.call(apply, _options(5.0, u.cou))
        pos = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(4, 1, 1, 1)
        want = plain["conv"] + pos * F.conv2d(u.x, d1[CONV], padding=1)
    assert torch.allclose(got["conv"], want, atol=ATOL)
    assert torch.equal(got["emb"], plain["emb"])  # region 0's area share is 0


def test_negative_only_call_runs_without_hooks():
    """A call of the negative prompt alone attaches no hook: every output, even the key projection of a region's
    prompt, is the plain layer's, bitwise."""
    u = _UNet(cou=(1,))
    d0, d1 = _unet_deltas(u.g)
    specs = (_spec(0, 1.0, d0), _spec(1, 1.0, d1))
    apply = RegionalLoraApply("unet", RUN, specs, u.modules, u.regions, SigmaWindow())
    with torch.no_grad():
        plain = u.plain()
        got = u.call(apply, _options(5.0, u.cou))
    assert u.hooks_seen[-1] == 0
    for k in plain:
        assert torch.equal(got[k], plain[k]), k


def test_positive_only_call_gets_the_delta():
    """A call of the positive prompt alone (cond_or_uncond [0]) gets the regions' deltas on its rows."""
    u = _UNet(cou=(0,))
    d0, d1 = _unet_deltas(u.g)
    specs = (_spec(0, 1.0, d0), _spec(1, 1.0, d1))
    apply = RegionalLoraApply("unet", RUN, specs, u.modules, u.regions, SigmaWindow())
    with torch.no_grad():
        plain = u.plain()
        got = u.call(apply, _options(5.0, u.cou))
        w1 = torch.zeros(2, 24, 1)
        w1[:, :12] = 1.0  # both images: top half
        want = plain["tok"] + w1 * F.linear(u.tokens, d1[TOK])
    assert torch.allclose(got["tok"], want, atol=ATOL)


def test_calls_outside_the_sigma_window_are_untouched():
    """Above the window's start sigma the call runs with no hook and plain outputs; inside it the deltas act."""
    u = _UNet()
    d0, d1 = _unet_deltas(u.g)
    specs = (_spec(0, 1.0, d0), _spec(1, 1.0, d1))
    apply = RegionalLoraApply("unet", RUN, specs, u.modules, u.regions, SigmaWindow(10.0, 2.0))
    with torch.no_grad():
        plain = u.plain()
        before = u.call(apply, _options(12.0, u.cou))
        assert u.hooks_seen[-1] == 0 and all(torch.equal(before[k], plain[k]) for k in plain)
        inside = u.call(apply, _options(5.0, u.cou))
        want = plain["tok"] + _top(4) * F.linear(u.tokens, d1[TOK])
    assert torch.allclose(inside["tok"], want, atol=ATOL)


def test_hooks_come_off_after_the_call_even_when_it_fails():
    """After a call, and after one that raises, no layer carries a hook and a plain forward is the layer's own."""
    u = _UNet()
    d0, d1 = _unet_deltas(u.g)
    specs = (_spec(0, 1.0, d0), _spec(1, 1.0, d1))
    apply = RegionalLoraApply("unet", RUN, specs, u.modules, u.regions, SigmaWindow())
    with torch.no_grad():
        plain = u.plain()
        u.call(apply, _options(5.0, u.cou))
        assert _hooks(u.modules) == 0
        assert torch.equal(u.plain()["conv"], plain["conv"])

        def failing(*args, **kwargs):
            raise RuntimeError("model failed")

        with pytest.raises(RuntimeError, match="model failed"):
            apply(failing, u.x, None, None, u.base, None, _options(5.0, u.cou))
    assert _hooks(u.modules) == 0


def test_keyframes_step_with_the_runs_calls():
    """The run in transformer_options carries the keyframe clock from call to call: after the first keyframe's
    guaranteed step, the second (strength 0) takes over and the call is plain. A call with no run starts from the
    first keyframe."""
    u = _UNet()
    d0, d1 = _unet_deltas(u.g)
    kfs = (Keyframe(1.0, 14.0), Keyframe(0.0, 6.0))
    specs = (_spec(0, 1.0, d0, kfs), _spec(1, 1.0, d1, kfs))
    apply = RegionalLoraApply("unet", RUN, specs, u.modules, u.regions, SigmaWindow())
    run = RegionalLoraRun(specs)
    with torch.no_grad():
        plain = u.plain()
        want = plain["tok"] + _top(4) * F.linear(u.tokens, d1[TOK])
        first = u.call(apply, _options(14.0, u.cou, run, [14.0, 5.0, 0.0]))
        later = u.call(apply, _options(5.0, u.cou, run, [14.0, 5.0, 0.0]))
        assert torch.allclose(first["tok"], want, atol=ATOL)
        assert u.hooks_seen[-1] == 0 and torch.equal(later["tok"], plain["tok"])
        alone = u.call(apply, _options(5.0, u.cou, None, [14.0, 5.0, 0.0]))
    assert torch.allclose(alone["tok"], want, atol=ATOL)


def test_keyframe_guarantee_counts_from_the_runs_top_sigma():
    """A keyframe starting inside the run (at or below sample_sigmas' top) keeps its guarantee even when the
    regional window opens after its start; with no sample_sigmas the call's own sigma is the top, so a keyframe
    that started above it guarantees nothing and the next, already reached, holds."""
    u = _UNet()
    d0, d1 = _unet_deltas(u.g)
    held = (Keyframe(1.0, 13.0, guarantee_steps=3), Keyframe(0.5, 12.5))
    specs = (_spec(0, 1.0, d0), _spec(1, 1.0, d1, held))
    apply = RegionalLoraApply("unet", RUN, specs, u.modules, u.regions, SigmaWindow(12.0, -1.0))
    with torch.no_grad():
        plain = u.plain()
        delta = _top(4) * F.linear(u.tokens, d1[TOK])
        got = u.call(apply, _options(12.0, u.cou, RegionalLoraRun(specs), [14.0, 12.0, 8.0, 0.0]))
        assert torch.allclose(got["tok"], plain["tok"] + delta, atol=ATOL)  # first keyframe held: strength 1
        passed = (Keyframe(1.0, 14.0, guarantee_steps=3), Keyframe(0.5, 6.0))
        specs = (_spec(0, 1.0, d0), _spec(1, 1.0, d1, passed))
        apply = RegionalLoraApply("unet", RUN, specs, u.modules, u.regions, SigmaWindow())
        got = u.call(apply, _options(5.0, u.cou, RegionalLoraRun(specs)))
    assert torch.allclose(got["tok"], plain["tok"] + 0.5 * delta, atol=ATOL)


def test_unet_token_layers_are_placed_down_to_seven_stride_2_steps():
    """A UNet's token layers are placed on every level of the latent the grid table covers, down to 7 stride-2 steps
    (1 x 1 for a 128 x 128 latent, reachable with stacked Deep Shrinks); there a region's weight is its area share."""
    assert unet_grids(128, 128)[1] == (1, 1)
    left = torch.zeros(1, 16, 16)
    left[..., :8] = 1.0
    lay = CallLayout("unet", lambda per, h, w, dev: masks_on_grid([left], per, h, w), 2, 1, torch.tensor([1.0, 0.0]),
                     (128, 128), None, {}, 0, None)
    w = lay.weights(0, IMAGE, torch.zeros(2, 1, 3))
    assert torch.allclose(w.flatten(), torch.tensor([0.5, 0.0]), atol=1e-6)


# ------------------------------------------------------------------------------------------------------- Flux calls


class _Flux:
    """Four hooked layers of a Flux call, batch 2 = (negative, positive) rows, base prompt of 6 tokens after
    ``lead`` tokens; region 0 (3 prompt tokens) covers the image grid's left two columns, region 1 (2 tokens) its
    bottom row. Masks are given on the 3 x 4 token grid itself."""

    def __init__(self, latent=(3, 4), lead=0, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.g, self.lead = g, lead
        self.modules = {IMG: _layer(nn.Linear(5, 5), g), TXT: _layer(nn.Linear(5, 5), g),
                        SINGLE: _layer(nn.Linear(5, 5), g), MOD: _layer(nn.Linear(6, 5), g)}
        self.m0, self.m1 = torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)
        self.m0[..., :2] = 1.0
        self.m1[:, 2] = 1.0
        contexts = (_randn(g, 1, 3, 8), _randn(g, 1, 2, 8))
        self.regions = RegionSet((LoraRegion(contexts[0], self.m0, hooks=object()),
                                  LoraRegion(contexts[1], self.m1, hooks=object())))
        self.x = _randn(g, 2, 4, *latent)
        self.base = _randn(g, 2, 6, 8)
        self.n_txt = lead + 6 + 3 + 2
        self.img, self.txt = _randn(g, 2, 12, 5), _randn(g, 2, self.n_txt, 5)
        self.joint, self.vec = torch.cat([self.txt, self.img], dim=1), _randn(g, 2, 1, 6)
        self.d0 = {IMG: _randn(g, 5, 5), TXT: _randn(g, 5, 5), SINGLE: _randn(g, 5, 5), MOD: _randn(g, 5, 6)}
        self.d1 = {TXT: _randn(g, 5, 5), SINGLE: _randn(g, 5, 5)}
        self.specs = (_spec(0, 1.0, self.d0), _spec(1, 0.5, self.d1))

    def executor(self, x, t, c_concat, c_crossattn, control, transformer_options, img=None, **kwargs):
        m = self.modules
        img = self.img if img is None else img
        return {"img": m[IMG](img), "txt": m[TXT](self.txt), "joint": m[SINGLE](self.joint), "mod": m[MOD](self.vec)}

    def call(self, apply, **kwargs):
        return apply(self.executor, self.x, torch.tensor([5.0]), None, self.base, None,
                     _options(5.0, (1, 0), RegionalLoraRun(self.specs)), **kwargs)

    def want(self):
        """Expected outputs: the positive row (1) gets region 0 on its mask and its text span, region 1 on its span
        (half strength); the joint layer both rules side by side; modulation region 0's area share (1/2)."""
        s = 6 + self.lead
        t0, t1 = torch.zeros(2, self.n_txt, 1), torch.zeros(2, self.n_txt, 1)
        t0[1, s:s + 3], t1[1, s + 3:s + 5] = 1.0, 1.0
        i0, i1 = torch.zeros(2, 12, 1), torch.zeros(2, 12, 1)
        i0[1], i1[1] = self.m0.view(12, 1), self.m1.view(12, 1)
        plain = self.executor(None, None, None, None, None, None)
        lin = F.linear
        return {
            "img": plain["img"] + i0 * lin(self.img, self.d0[IMG]),
            "txt": plain["txt"] + t0 * lin(self.txt, self.d0[TXT]) + t1 * lin(self.txt, 0.5 * self.d1[TXT]),
            "joint": plain["joint"] + torch.cat([t0, i0], dim=1) * lin(self.joint, self.d0[SINGLE])
            + torch.cat([t1, i1], dim=1) * lin(self.joint, 0.5 * self.d1[SINGLE]),
            "mod": plain["mod"] + torch.tensor([0.0, 0.5]).view(2, 1, 1) * lin(self.vec, self.d0[MOD]),
        }


def _check(got: dict, want: dict):
    for k in want:
        assert torch.allclose(got[k], want[k], atol=ATOL), k


def test_flux_call_places_regions_on_the_latent_grid_and_after_the_base_prompt_by_default():
    """With the defaults (patch 1, no lead tokens) the token grid is the latent's own and the region prompts follow
    the base prompt's tokens in order; the negative row is untouched."""
    f = _Flux()
    apply = RegionalLoraApply("flux", RUN, f.specs, f.modules, f.regions, SigmaWindow())
    with torch.no_grad():
        _check(f.call(apply), f.want())


def test_flux_call_with_patching_rounds_the_grid_up_and_skips_lead_tokens():
    """A 5 x 7 latent in 2 x 2 patches is a 3 x 4 token grid (rounded up); region text starts after the lead tokens
    and the base prompt."""
    f = _Flux(latent=(5, 7), lead=2)
    apply = RegionalLoraApply("flux", RUN, f.specs, f.modules, f.regions, SigmaWindow(), patch=2, text_lead=2)
    with torch.no_grad():
        _check(f.call(apply), f.want())


def test_flux_reference_tokens_get_no_region_and_too_few_image_tokens_are_refused():
    """Image tokens past the grid (Kontext reference images) get no delta; a layer with fewer image tokens than
    the grid is an error, and the hooks still come off."""
    f = _Flux()
    apply = RegionalLoraApply("flux", RUN, f.specs, f.modules, f.regions, SigmaWindow())
    ref = torch.cat([f.img, _randn(f.g, 2, 3, 5)], dim=1)
    with torch.no_grad():
        plain = f.modules[IMG](ref)
        got = f.call(apply, img=ref)["img"]
        i0 = torch.zeros(2, 15, 1)
        i0[1, :12] = f.m0.view(12, 1)
        assert torch.allclose(got, plain + i0 * F.linear(ref, f.d0[IMG]), atol=ATOL)
        with pytest.raises(RegionError, match="fewer than the 3 x 4 grid"):
            f.call(apply, img=f.img[:, :10])
    assert _hooks(f.modules) == 0


# --------------------------------------------------------------------------------------- keyframes and value types


def test_entering_a_keyframe_holds_it_for_its_guarantee_steps():
    """A keyframe reached later in the run is held for exactly its guarantee steps (distinct sigmas) before the
    next, already reached, takes over."""
    clock = KeyframeClock((Keyframe(1.0, 14.0), Keyframe(0.5, 10.0, guarantee_steps=2), Keyframe(0.2, 9.0)))
    assert [clock.strength(s, 14.0) for s in (14.0, 9.5, 8.0, 7.0)] == [1.0, 0.5, 0.5, 0.2]


def test_a_reached_keyframe_with_a_guarantee_is_not_skipped():
    """When two keyframes have been reached since the last call, the first with a guarantee (1 by default) is
    current for that call; the next one follows at the next sigma."""
    clock = KeyframeClock((Keyframe(1.0, 14.0), Keyframe(0.5, 10.0), Keyframe(0.2, 9.0)))
    assert [clock.strength(s, 14.0) for s in (14.0, 8.0, 7.0)] == [1.0, 0.5, 0.2]


def test_keyframes_started_before_the_run_are_passed_over():
    """Keyframes starting above the run's top sigma guarantee nothing, so the last one already started is current
    at the first call."""
    clock = KeyframeClock((Keyframe(1.0, 20.0), Keyframe(0.5, 18.0), Keyframe(0.2, 16.0), Keyframe(0.1, 4.0)))
    assert [clock.strength(s, 15.0) for s in (15.0, 8.0, 3.0)] == [0.2, 0.2, 0.1]


def test_keyframes_and_schedules_are_immutable_values():
    """Keyframe and HookSchedule are frozen: equal ones hash alike and fields cannot be reassigned (a schedule is
    shared by every run of the model)."""
    kf = Keyframe(0.5, 3.0, 2)
    hs = HookSchedule(1.0, (kf,))
    assert hash(kf) == hash(Keyframe(0.5, 3.0, 2)) and hash(hs) == hash(HookSchedule(1.0, (Keyframe(0.5, 3.0, 2),)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        kf.strength = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        hs.strength = 2.0


def test_lora_region_carries_its_hooks_as_a_region():
    """LoraRegion takes the hooks alongside the prompt and mask, and serves a RegionSet like any region."""
    hooks = object()
    r = LoraRegion(torch.ones(1, 2, 3), torch.ones(1, 4, 4), hooks=hooks)
    assert r.hooks is hooks and LoraRegion(torch.ones(1, 2, 3), torch.ones(1, 4, 4)).hooks is None
    assert torch.equal(RegionSet((r,)).masks(1, 2, 2, torch.device("cpu")), torch.ones(1, 1, 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.hooks = None


def test_two_regions_given_one_prompt_tensor_keep_their_own_loras():
    """One encoded prompt feeding two regions (one with a LoRA on the key projection, one without) is one tensor
    in both: each region's prompt still gets only its own LoRA (on the CPU no device copy separates them)."""
    u = _UNet()
    u.contexts = [u.contexts[0], u.contexts[0]]
    u.regions = RegionSet(tuple(LoraRegion(c, r.mask, hooks=object()) for c, r in zip(u.contexts, u.regions.regions,
                                                                                        strict=True)))
    g = torch.Generator().manual_seed(3)
    delta = _randn(g, 5, 8)
    specs = (_spec(0, 1.0, {KEY: delta}), _spec(1, 1.0, {}))
    apply = RegionalLoraApply("unet", RUN, specs, u.modules, u.regions, SigmaWindow())
    with torch.no_grad():
        plain = u.plain()
        got = u.call(apply, _options(5.0, u.cou, RegionalLoraRun(specs)))
    assert torch.equal(got["k1"], plain["k1"])  # the region without a LoRA
    assert torch.allclose(got["k0"], plain["k0"] + F.linear(u.contexts[0].expand(4, -1, -1), delta), atol=ATOL)


def test_a_layer_weight_comes_in_each_outputs_own_dtype():
    """Two layers of one call with outputs of one shape and different dtypes each get the region's weight in their
    own dtype (a float32 weight would promote a half-precision layer's output)."""
    left = torch.zeros(1, 8, 8)
    left[..., :4] = 1.0
    lay = CallLayout("unet", lambda per, h, w, dev: masks_on_grid([left], per, h, w), 2, 1, torch.tensor([1.0, 0.0]),
                     (8, 8), None, {}, 0, None)
    first = lay.weights(0, IMAGE, torch.zeros(2, 64, 3))
    half = lay.weights(0, IMAGE, torch.zeros(2, 64, 3, dtype=torch.bfloat16))
    assert first.dtype == torch.float32 and half.dtype == torch.bfloat16 and torch.equal(half.float(), first)
