"""Regional LoRA through real ComfyUI sampling on tiny SD1.5 and Flux layouts: a region prompt carrying a LoRA hook
(core's hook system) gets the LoRA on its own tokens inside the one regional pass. Against core's own hooked LoRA
(a full-frame region equals it), off-switches (empty mask, strength-0 keyframe: bitwise no LoRA), a half-frame mask
confining the delta to its half of a layer's output, ComfyUI's keyframe schedule, and call counts against core's
hooked conditioning (one more pass per hook group)."""

from __future__ import annotations

import dataclasses
import math

import comfy.hooks
import comfy.lora
import comfy.patcher_extension
import pytest
import torch

from .harness import count_calls, make_conds, node_class, run_node, run_sampling, tiny_model

WMP = comfy.patcher_extension.WrappersMP
H, W = 14, 10  # latent 112 x 80 px: not a multiple of 64, non-square; Flux token grid 7 x 5
STEPS = 3


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in ("sd15", "flux")}


def random_lora(model, seed: int = 0, rank: int = 2, scale: float = 0.1, every: int = 1) -> dict:
    """A LoRA state dict in kohya naming (``lora_unet_<path>``) for every ``every``-th Linear / Conv layer of the
    diffusion model, random up / down factors; plus a bias change (``diff_b``) on one layer."""
    g = torch.Generator().manual_seed(seed)
    dm = model.model.diffusion_model
    sd, layers = {}, [(n, m) for n, m in dm.named_modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][::every]
    for name, m in layers:
        key = "lora_unet_" + name.replace(".", "_")
        w = m.weight
        down_shape = (rank, *w.shape[1:])
        sd[key + ".lora_down.weight"] = torch.randn(down_shape, generator=g) / math.sqrt(math.prod(w.shape[1:]))
        sd[key + ".lora_up.weight"] = scale * torch.randn(w.shape[0], rank, *([1] * (w.ndim - 2)), generator=g)
        sd[key + ".alpha"] = torch.tensor(float(rank))
    name, m = layers[-1]
    sd[f"diffusion_model.{name}.diff_b"] = 0.05 * torch.randn(m.weight.shape[0], generator=g)
    return sd


def lora_hook(lora: dict, strength: float = 1.0, keyframes=()) -> comfy.hooks.HookGroup:
    group = comfy.hooks.create_hook_lora(lora, strength_model=strength, strength_clip=0.0)
    if keyframes:
        kf = comfy.hooks.HookKeyframeGroup()
        for s, start in keyframes:
            kf.add(comfy.hooks.HookKeyframe(strength=s, start_percent=start))
        group.set_keyframes_on_hooks(kf)
    return group


def with_hooks(cond, hooks):
    return comfy.hooks.set_hooks_for_conditioning(cond, hooks)


def region(cond, mask, strength=1.0, regions=None):
    return run_node("PreprintRegion", conditioning=cond, mask=mask, strength=strength, regions=regions)[0]


def regional(m, regions, base_ratio=0.0, start=0.0, end=1.0):
    return run_node("PreprintRegionalPrompting", model=m, regions=regions, base_ratio=base_ratio,
                    start_percent=start, end_percent=end)[0]


def sample(m, family, pos, neg, **kw):
    return run_sampling(m, family, steps=STEPS, height=H, width=W, positive=pos, negative=neg, **kw)


def full():
    return torch.ones(1, 40, 56)  # another resolution and aspect: resampled


def left_half():
    m = torch.zeros(1, H * 8, W * 8)
    m[:, :, : W * 4] = 1.0
    return m


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_full_frame_region_lora_equals_cores_hooked_lora(models, family):
    """Base prompt P, one region over the whole frame with P and a LoRA hook, base_ratio 0: the same as core sampling
    P with the hook attached (core runs the hooked prompt in its own pass with patched weights)."""
    m = models[family]
    pos, neg = make_conds(family)
    hooks = lora_hook(random_lora(m))
    plain = sample(m, family, pos, neg)
    core = sample(m, family, with_hooks(pos, hooks), neg)
    ours = sample(regional(m, region(with_hooks(pos, hooks), full())), family, pos, neg)
    effect = float((core - plain).abs().max())
    err = float((ours - core).abs().max())
    print(f"{family}: LoRA effect {effect:.4g}, ours vs core {err:.4g}")
    # the two differ only by float32 rounding ((W + dW) x against W x + dW x): measured 1.5e-6 of the effect
    assert effect > 0.05
    assert err < 1e-4 * effect


def _zero_mask(r):
    """The same region with an all-zero mask (the Region node refuses one; the regional node takes it as given)."""
    return tuple(dataclasses.replace(x, mask=torch.zeros_like(x.mask)) if i == len(r) - 1 else x
                 for i, x in enumerate(r))


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_empty_mask_and_strength_zero_keyframe_are_bitwise_no_lora(models, family):
    m = models[family]
    pos, neg = make_conds(family)
    a, _ = make_conds(family, seed=3)
    b, _ = make_conds(family, seed=4)
    lora = random_lora(m)
    first = region(a, left_half())
    plain = sample(regional(m, _zero_mask(region(b, full(), regions=first))), family, pos, neg)
    hooked = _zero_mask(region(with_hooks(b, lora_hook(lora)), full(), regions=first))
    assert torch.equal(sample(regional(m, hooked), family, pos, neg), plain)
    # strength 0 from the first step on: no LoRA, bitwise; the same hook at strength 1 acts
    no_lora = sample(regional(m, region(b, full(), regions=first)), family, pos, neg)
    off = region(with_hooks(b, lora_hook(lora, keyframes=[(0.0, 0.0)])), full(), regions=first)
    assert torch.equal(sample(regional(m, off), family, pos, neg), no_lora)
    on = region(with_hooks(b, lora_hook(lora, keyframes=[(1.0, 0.0)])), full(), regions=first)
    assert not torch.equal(sample(regional(m, on), family, pos, neg), no_lora)
    # outside the regional window the LoRA is off with its region: a closed window is plain sampling, bitwise
    assert torch.equal(sample(regional(m, on, start=1.0, end=1.0), family, pos, neg), sample(m, family, pos, neg))


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_keyframes_follow_cores_schedule(models, family):
    """Keyframes (strength 1, then 0.3 from 40% and 0 from 70% of the run), full-frame region: the same as core's
    hooked LoRA with the same keyframes, which steps them by its own clock."""
    m = models[family]
    pos, neg = make_conds(family)
    lora = random_lora(m)
    kfs = [(1.0, 0.0), (0.3, 0.4), (0.0, 0.7)]
    core = run_sampling(m, family, steps=5, height=H, width=W, positive=with_hooks(pos, lora_hook(lora, 0.8, kfs)),
                        negative=neg)
    ours = run_sampling(regional(m, region(with_hooks(pos, lora_hook(lora, 0.8, kfs)), full())), family, steps=5,
                        height=H, width=W, positive=pos, negative=neg)
    steady = run_sampling(regional(m, region(with_hooks(pos, lora_hook(lora, 0.8)), full())), family, steps=5,
                          height=H, width=W, positive=pos, negative=neg)
    err, schedule = float((ours - core).abs().max()), float((steady - core).abs().max())
    print(f"{family}: keyframed ours vs core {err:.3g}; without keyframes {schedule:.3g}")
    assert err < 1e-4 * schedule


def _spy(targets: dict, seen: dict):
    """A DIFFUSION_MODEL wrapper recording, for each target layer, its input and its final output (its forward hook
    is registered after the regional LoRA's, so it sees the output with the delta added)."""
    def wrapper(executor, *args, **kwargs):
        def record(path):
            def hook(module, inp, out):
                seen.setdefault(path, (inp[0].detach().clone(), out.detach().clone()))
            return hook
        handles = [mod.register_forward_hook(record(p)) for p, mod in targets.items()]
        try:
            return executor(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
    return wrapper


@torch.no_grad()
def _patched(m, lora, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's weight and bias with the LoRA applied by core's patch maths."""
    key_map = comfy.lora.model_lora_keys_unet(m.model, {})
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    mod = m.model.diffusion_model.get_submodule(path)
    out = []
    for param in ("weight", "bias"):
        key = f"diffusion_model.{path}.{param}"
        if getattr(mod, param) is None:
            out.append(None)
            continue
        p = getattr(mod, param).detach().float().clone()
        out.append(comfy.lora.calculate_weight([(1.0, patches[key], 1.0, None, None)], p.clone(), key)
                   if key in patches else p)
    return out[0], out[1]


@torch.no_grad()
def _contribution(mod, x, y, weight=None, bias=None):
    weight = mod.weight if weight is None else weight
    bias = mod.bias if bias is None else bias
    if isinstance(mod, torch.nn.Conv2d):
        return y - mod._conv_forward(x, weight, bias)
    return y - torch.nn.functional.linear(x, weight, bias)


def test_half_mask_changes_only_its_half_of_a_layer_output_sd15(models):
    """Left-half region with a LoRA on the tiny SD1.5: at a cross-attention query projection and a ResBlock
    convolution of the first level (the latent's own grid), what the LoRA adds to the positive row is exactly 0 on
    the right half and the whole ``dW x`` on the left; nothing on the negative row; the region's prompt is
    projected with the LoRA'd key weights and the base prompt's without."""
    m = models["sd15"]
    pos, neg = make_conds("sd15")
    b, _ = make_conds("sd15", seed=4)
    lora = random_lora(m)
    paths = ["input_blocks.1.1.transformer_blocks.0.attn2.to_q", "input_blocks.1.0.in_layers.2",
             "input_blocks.1.1.transformer_blocks.0.attn2.to_k"]
    dm = m.model.diffusion_model
    seen = {}
    patched = regional(m, region(with_hooks(b, lora_hook(lora)), left_half()))
    patched.add_wrapper_with_key(WMP.DIFFUSION_MODEL, "zz_spy", _spy({p: dm.get_submodule(p) for p in paths}, seen))
    sample(patched, "sd15", pos, neg)
    q, conv = dm.get_submodule(paths[0]), dm.get_submodule(paths[1])
    x, y = seen[paths[0]]  # rows: [positive, negative] (cond_or_uncond order of the first call)
    c = _contribution(q, x, y).view(y.shape[0], H, W, -1)
    left, right = c[:, :, : W // 2], c[:, :, W // 2:]
    assert float(right.abs().max()) == 0.0
    pos_row = 0 if float(left[0].abs().max()) > 0 else 1
    assert float(left[1 - pos_row].abs().max()) == 0.0  # the negative row: no LoRA
    w2, b2 = _patched(m, lora, paths[0])
    want = _contribution(q, x, torch.nn.functional.linear(x, w2, b2)).view_as(c)[pos_row, :, : W // 2]
    assert torch.allclose(left[pos_row], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    x, y = seen[paths[1]]
    c = _contribution(conv, x, y)
    assert float(c[..., W // 2:].abs().max()) == 0.0 and float(c[pos_row, :, :, : W // 2].abs().min()) > 0.0
    x, y = seen[paths[2]]  # the first to_k call projects the base prompt: no LoRA there
    assert float(_contribution(dm.get_submodule(paths[2]), x, y).abs().max()) == 0.0


def test_half_mask_on_flux_image_text_and_joint_tokens(models):
    """Left-half region with a LoRA on the tiny Flux (token grid 7 x 5: columns 0-1 inside, column 2 half, 3-4
    outside): the image stream gets the delta only inside (half of it on the seam column), the text stream only on
    the region's own prompt tokens, the joint single blocks both; the negative row nothing."""
    m = models["flux"]
    pos, neg = make_conds("flux")
    b, _ = make_conds("flux", seed=4)
    lora = random_lora(m)
    paths = ["double_blocks.2.img_attn.qkv", "double_blocks.2.txt_attn.qkv", "single_blocks.5.linear1"]
    dm = m.model.diffusion_model
    seen = {}
    patched = regional(m, region(with_hooks(b, lora_hook(lora)), left_half()))
    patched.add_wrapper_with_key(WMP.DIFFUSION_MODEL, "zz_spy", _spy({p: dm.get_submodule(p) for p in paths}, seen))
    sample(patched, "flux", pos, neg)
    n_base, n_region = pos[0][0].shape[1], b[0][0].shape[1]
    img = _contribution(dm.get_submodule(paths[0]), *seen[paths[0]])
    pos_row = 0 if float(img[0].abs().max()) > 0 else 1
    grid = img[pos_row].view(7, 5, -1)
    assert float(grid[:, 3:].abs().max()) == 0.0 and float(grid[:, :2].abs().min()) > 0.0
    w2, b2 = _patched(m, lora, paths[0])
    x = seen[paths[0]][0][pos_row]
    full_delta = _contribution(dm.get_submodule(paths[0]), x, torch.nn.functional.linear(x, w2, b2)).view(7, 5, -1)
    assert torch.allclose(grid[:, 2], 0.5 * full_delta[:, 2], rtol=1e-4, atol=1e-6)
    assert float(img[1 - pos_row].abs().max()) == 0.0
    txt = _contribution(dm.get_submodule(paths[1]), *seen[paths[1]])[pos_row]
    assert txt.shape[0] == n_base + n_region
    assert float(txt[:n_base].abs().max()) == 0.0 and float(txt[n_base:].abs().min()) > 0.0
    joint = _contribution(dm.get_submodule(paths[2]), *seen[paths[2]])[pos_row]
    assert float(joint[:n_base].abs().max()) == 0.0 and float(joint[n_base:n_base + n_region].abs().min()) > 0.0
    image_part = joint[n_base + n_region:].view(7, 5, -1)
    assert float(image_part[:, 3:].abs().max()) == 0.0 and float(image_part[:, :2].abs().min()) > 0.0


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_region_loras_cost_the_calls_of_plain_cfg_while_cores_hooked_conditioning_costs_more(models, family):
    m = models[family]
    pos, neg = make_conds(family)
    a, _ = make_conds(family, seed=3)
    b, _ = make_conds(family, seed=4)
    hooks_a, hooks_b = lora_hook(random_lora(m, seed=1)), lora_hook(random_lora(m, seed=2))
    right = 1.0 - left_half()
    regions = region(with_hooks(b, hooks_b), right, regions=region(with_hooks(a, hooks_a), left_half()))
    with count_calls(m) as plain:
        sample(plain.model, family, pos, neg)
    with count_calls(regional(m, regions)) as ours:
        sample(ours.model, family, pos, neg)
    props = node_class("ConditioningSetPropertiesAndCombine")()
    core_pos = props.set_properties(pos, a, 1.0, "default", mask=left_half(), hooks=hooks_a)[0]
    core_pos = props.set_properties(core_pos, b, 1.0, "default", mask=right, hooks=hooks_b)[0]
    with count_calls(m) as core:
        sample(core.model, family, core_pos, neg)
    print(f"{family}: calls / rows over {STEPS} steps: plain CFG {plain.calls} / {sum(plain.rows)}, regional LoRA "
          f"{ours.calls} / {sum(ours.rows)}, core hooked conditioning {core.calls} / {sum(core.rows)}")
    assert ours.calls == plain.calls and sum(ours.rows) == sum(plain.rows)
    assert core.calls >= plain.calls + 2 * STEPS  # one more pass per hook group and step


def test_base_prompt_hooks_stay_with_core(models):
    """A hook on the base prompt is core's: it patches the weights for the positive prompt's own pass (so the
    regions and their LoRAs run under it too), at core's cost of one pass more per step."""
    m = models["sd15"]
    pos, neg = make_conds("sd15")
    b, _ = make_conds("sd15", seed=4)
    regions = region(with_hooks(b, lora_hook(random_lora(m, seed=2))), left_half())
    base_hooks = lora_hook(random_lora(m, seed=5))
    with count_calls(regional(m, regions)) as without:
        out = sample(without.model, "sd15", pos, neg)
    with count_calls(regional(m, regions)) as hooked:
        out_hooked = sample(hooked.model, "sd15", with_hooks(pos, base_hooks), neg)
    assert torch.isfinite(out_hooked).all() and not torch.equal(out, out_hooked)
    assert hooked.calls == 2 * without.calls


def test_runs_are_deterministic_and_a_new_size_starts_clean(models):
    m = models["sd15"]
    pos, neg = make_conds("sd15")
    patched = regional(m, region(with_hooks(pos, lora_hook(random_lora(m), keyframes=[(1.0, 0.0), (0.2, 0.5)])),
                                 left_half()))
    first = sample(patched, "sd15", pos, neg)
    other = run_sampling(patched, "sd15", steps=3, height=9, width=13, positive=pos, negative=neg, batch=2)
    assert other.shape == (2, 4, 9, 13) and torch.isfinite(other).all()
    assert torch.equal(sample(patched, "sd15", pos, neg), first)


def test_hooks_a_region_cannot_serve_are_refused_by_name(models):
    pos, _ = make_conds("sd15")
    empty = [[pos[0][0], {**pos[0][1], "hooks": comfy.hooks.HookGroup()}]]
    assert len(region(empty, torch.ones(1, 8, 8))) == 1  # an empty hook group is no LoRA
    as_lora = comfy.hooks.create_hook_model_as_lora({"diffusion_model.out.2.weight": torch.zeros(1)}, None, 1.0, 1.0)
    with pytest.raises(ValueError, match="Region \\(Preprint\\): .*model-as-LoRA"):
        region(with_hooks(pos, as_lora), torch.ones(1, 8, 8))
    opts = comfy.hooks.HookGroup()
    opts.add(comfy.hooks.TransformerOptionsHook({}))
    with pytest.raises(ValueError, match="TransformerOptionsHook hooks; a region takes LoRA hooks"):
        region(with_hooks(pos, opts), torch.ones(1, 8, 8))
    flux_lora = lora_hook(random_lora(models["flux"]))
    with pytest.raises(ValueError, match="region 1's LoRA matches no layer of this model"):
        regional(models["sd15"], region(with_hooks(pos, flux_lora), torch.ones(1, 8, 8)))
    norm = lora_hook({"diffusion_model.input_blocks.1.1.norm.diff": torch.zeros(32)})
    with pytest.raises(ValueError, match="outside Linear and Conv layers \\(diffusion_model.input_blocks.1.1.norm"):
        regional(models["sd15"], region(with_hooks(pos, norm), torch.ones(1, 8, 8)))
    sd3_pos, _ = make_conds("sd3")
    sd3 = tiny_model("sd3")
    with pytest.raises(ValueError, match="regional LoRA serves UNets and Flux, not SD3"):
        regional(sd3, region(with_hooks(sd3_pos, lora_hook(random_lora(sd3))), torch.ones(1, 8, 8)))
