"""Regional prompting through real ComfyUI sampling on tiny UNet and Flux layouts: off-switch exactness,
prompts landing in their masks, one pass per step (counted against core mask conditioning), any size, bad
input."""

from __future__ import annotations

import comfy.patcher_extension
import pytest
import torch

from .harness import count_calls, make_conds, node_class, run_node, run_sampling, tiny_model

SIZES = {"sd15": (16, 16), "sdxl": (16, 16), "flux": (16, 16)}


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in ("sd15", "sdxl", "flux")}


def region(cond, mask, strength=1.0, regions=None):
    return run_node("PreprintRegion", conditioning=cond, mask=mask, strength=strength, regions=regions)[0]


def regional(m, regions, base_ratio=0.0, start=0.0, end=1.0):
    return run_node("PreprintRegionalPrompting", model=m, regions=regions, base_ratio=base_ratio,
                    start_percent=start, end_percent=end)[0]


def half(h, w, left=True):
    m = torch.zeros(1, h * 8, w * 8)
    if left:
        m[:, :, : w * 4] = 1.0
    else:
        m[:, :, w * 4:] = 1.0
    return m


def sample(m, family, positive, negative, h, w, **kw):
    return run_sampling(m, family, steps=4, height=h, width=w, positive=positive, negative=negative, **kw)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_one_full_region_with_the_base_prompt_is_bitwise_plain_sampling(models, family):
    m, (h, w) = models[family], SIZES[family]
    pos, neg = make_conds(family)
    plain = sample(m, family, pos, neg, h, w)
    full = region(pos, torch.ones(1, 40, 24))  # another resolution and aspect: resampled
    assert torch.equal(sample(regional(m, full, base_ratio=0.3), family, pos, neg, h, w), plain)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_base_ratio_one_and_a_closed_window_leave_the_model_alone(models, family):
    m, (h, w) = models[family], SIZES[family]
    pos, neg = make_conds(family)
    other, _ = make_conds(family, seed=7)
    plain = sample(m, family, pos, neg, h, w)
    r = region(other, half(h, w))
    assert not torch.equal(sample(regional(m, r), family, pos, neg, h, w), plain)
    assert torch.equal(sample(regional(m, r, start=1.0, end=1.0), family, pos, neg, h, w), plain)
    if family == "sd15":  # on Flux base_ratio 1 still keeps region text off the base text; the mask changes sums
        assert torch.equal(sample(regional(m, r, base_ratio=1.0), family, pos, neg, h, w), plain)


def test_flux_full_region_with_the_base_prompt_matches_plain_sampling(models):
    m, (h, w) = models["flux"], (13, 10)  # odd token grid: 7 x 5 after the 2x2 patches
    pos, neg = make_conds("flux")
    plain = sample(m, "flux", pos, neg, h, w)
    out = sample(regional(m, region(pos, torch.ones(1, 64, 64)), base_ratio=0.0), "flux", pos, neg, h, w)
    # base_ratio 0: covered image tokens see the region's copy of the text instead of the base text, and that
    # copy evolves exactly as the base text does (same tokens, same view of the image): the same attention up
    # to rounding (masked keys weigh exactly 0). A real region prompt moves the result by ~10%.
    assert torch.allclose(out, plain, rtol=0, atol=1e-4 * float(plain.abs().max()))


@pytest.mark.parametrize("family", ["sd15"])
def test_each_half_follows_its_own_prompt(models, family):
    """Prompt A on the left half and B on the right, against the same regions swapped: each half is nearer the
    all-A / all-B run when its own prompt is placed there. (Ignoring the masks makes the two runs equal; on
    random weights the spatial mixing of the layers keeps the margin modest, hence a comparison and not a
    bound; on the tiny SDXL and Flux layouts it is within their mixing noise, so those are checked by what
    reaches their layers, below, and the effect is measured on the trained toy in benchmarks/.)"""
    m, (h, w) = models[family], SIZES[family]
    a, neg = make_conds(family, seed=3)
    b, _ = make_conds(family, seed=4)
    base, _ = make_conds(family, seed=5)
    all_a = sample(m, family, a, neg, h, w, cfg=1.0)
    all_b = sample(m, family, b, neg, h, w, cfg=1.0)
    left_mask, right_mask = half(h, w, left=True), half(h, w, left=False)
    out = sample(regional(m, region(b, right_mask, regions=region(a, left_mask))), family, base, neg, h, w, cfg=1.0)
    swapped = sample(regional(m, region(a, right_mask, regions=region(b, left_mask))), family, base, neg, h, w,
                     cfg=1.0)
    left, right = slice(0, w // 2 - 1), slice(w // 2 + 1, w)  # one column of slack at the seam

    def d(x, y, cols):
        return float((x[..., cols] - y[..., cols]).norm())

    assert d(out, all_a, left) < 0.9 * d(swapped, all_a, left)
    assert d(out, all_b, right) < 0.9 * d(swapped, all_b, right)
    assert d(swapped, all_b, left) < 0.9 * d(out, all_b, left)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_cross_attention_layer_is_regional_middle_block_included(models, family):
    import comfy.ldm.modules.attention as attention

    dm = models[family].model.diffusion_model
    want = set()
    for group, mods in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
        for i, mod in enumerate(mods):
            for sub in mod.modules():
                if isinstance(sub, attention.SpatialTransformer):
                    want |= {(group, i, j) for j in range(len(sub.transformer_blocks))}
    pos, _ = make_conds(family)
    patched = regional(models[family], region(pos, torch.ones(1, 8, 8)))
    got = set(patched.model_options["transformer_options"]["patches_replace"]["attn2"])
    assert got == want and any(k[0] == "middle" for k in want)


def test_flux_gets_the_joint_mask_of_its_regions(models):
    """What reaches the Flux model: region text appended to the positive row only, and an attention mask
    whose image -> region-text block is the region mask on the 2x2-patch token grid, row-major."""
    m, (h, w) = models["flux"], (6, 10)  # token grid 3 x 5
    pos, neg = make_conds("flux")
    other, _ = make_conds("flux", seed=9)
    mask = torch.zeros(1, 48, 80)
    mask[:, :16, 48:] = 1.0  # top row of tokens, last two columns
    seen = []

    def spy(executor, x, timestep, context, y, guidance, ref_latents, control, to, **kw):
        seen.append((context.shape, list(to.get("cond_or_uncond") or []), kw.get("attention_mask")))
        return executor(x, timestep, context, y, guidance, ref_latents, control, to, **kw)

    patched = regional(m, region(other, mask))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "zz_spy", spy)
    sample(patched, "flux", pos, neg, h, w)
    shape, cou, att = seen[0]
    n0, n1 = pos[0][0].shape[1], other[0][0].shape[1]
    assert shape[1] == n0 + n1 and att is not None and att.shape[-1] == n0 + n1 + 15
    row = cou.index(0) * (shape[0] // len(cou))
    img_to_region = torch.isfinite(att[row, n0 + n1:, n0:n0 + n1]).all(dim=1).view(3, 5)
    want = torch.zeros(3, 5, dtype=torch.bool)
    want[0, 3:] = True
    assert torch.equal(img_to_region, want)
    if len(cou) > 1:  # the negative row: nobody attends the padding
        neg_row = cou.index(1) * (shape[0] // len(cou))
        assert not torch.isfinite(att[neg_row, n0 + n1:, n0:n0 + n1]).any()
        assert torch.isfinite(att[neg_row, n0 + n1:, :n0]).all()


def test_flux_regional_takes_its_arguments_by_name(models):
    """The Flux wrapper binds what it is handed against the wrapped forward's signature: an earlier wrapper that
    passes everything by keyword (as a newer Flux might) gives the same result and the same mask as the
    positional call of 0.3.64 and the newer sources."""
    m, (h, w) = models["flux"], (6, 10)
    pos, neg = make_conds("flux")
    other, _ = make_conds("flux", seed=9)
    mask = torch.zeros(1, 48, 80)
    mask[:, :, 40:] = 1.0
    seen = []

    def by_name(executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options=None, **kw):
        seen.append("by_name")
        return executor(x=x, timestep=timestep, context=context, y=y, guidance=guidance, ref_latents=ref_latents,
                        control=control, transformer_options=transformer_options, **kw)

    def spy(executor, *args, **kw):
        seen.append((kw["context"] if "context" in kw else args[2], kw.get("attention_mask")))
        return executor(*args, **kw)

    wmp = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    positional = regional(m, region(other, mask))
    keyed = m.clone()
    keyed.add_wrapper_with_key(wmp, "aa_by_name", by_name)  # runs before the regional wrapper
    keyed = regional(keyed, region(other, mask))
    keyed.add_wrapper_with_key(wmp, "zz_spy", spy)
    out = sample(keyed, "flux", pos, neg, h, w)
    assert torch.equal(out, sample(positional, "flux", pos, neg, h, w))
    assert seen[0] == "by_name"
    context, att = seen[1]
    assert context.shape[1] == pos[0][0].shape[1] + other[0][0].shape[1]
    assert att is not None and att.shape[-1] == context.shape[1] + 15


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_three_regions_cost_the_model_calls_of_plain_cfg_while_core_mask_conditioning_costs_more(models, family):
    m, (h, w) = models[family], SIZES[family]
    pos, neg = make_conds(family)
    thirds = []
    for k in range(3):
        mk = torch.zeros(1, h * 8, w * 8)
        mk[:, :, k * w * 8 // 3:(k + 1) * w * 8 // 3] = 1.0
        thirds.append(mk)
    prompts = [make_conds(family, seed=10 + k)[0] for k in range(3)]
    regions = None
    for p, mk in zip(prompts, thirds, strict=True):
        regions = region(p, mk, regions=regions)
    with count_calls(m) as plain:
        sample(plain.model, family, pos, neg, h, w)
    with count_calls(regional(m, regions)) as ours:
        sample(ours.model, family, pos, neg, h, w)
    set_mask = node_class("ConditioningSetMask")()
    masked = []
    for p, mk in zip(prompts, thirds, strict=True):
        out = set_mask.append(p, mk, "default", 1.0)
        masked += (out.result if hasattr(out, "result") else out)[0]
    with count_calls(m) as core:
        sample(core.model, family, pos + masked, neg, h, w)
    assert ours.calls == plain.calls and sum(ours.rows) == sum(plain.rows)
    assert sum(core.rows) >= 2 * sum(plain.rows)  # every masked prompt is another batch row each step


def test_non_square_odd_sizes_and_per_image_masks(models):
    m = models["sd15"]
    h, w = 13, 22  # 104 x 176 px
    pos, neg = make_conds("sd15", batch=1)
    other, _ = make_conds("sd15", seed=9)
    masks = torch.zeros(2, 30, 50)
    masks[0, :, :25] = 1.0
    masks[1, :, 25:] = 1.0
    out = sample(regional(m, region(other, masks)), "sd15", pos, neg, h, w, batch=2)
    assert out.shape == (2, 4, h, w) and torch.isfinite(out).all()
    with pytest.raises(Exception, match="batch of 2 but the latent batch is 3"):
        sample(regional(m, region(other, masks)), "sd15", pos, neg, h, w, batch=3)


def test_bad_input_is_named(models):
    pos, _ = make_conds("sd15")
    with pytest.raises(ValueError, match="Region \\(Preprint\\): the mask is empty"):
        region(pos, torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="holds 2 prompts"):
        region(pos + pos, torch.ones(1, 8, 8))
    flux_cond, _ = make_conds("flux")
    with pytest.raises(ValueError, match="encode it with this model's CLIP"):
        regional(models["sd15"], region(flux_cond if flux_cond[0][0].shape[-1] != 64 else make_conds("sd3")[0],
                                        torch.ones(1, 8, 8)))
    with pytest.raises(ValueError, match="no regions"):
        regional(models["sd15"], ())
    msg = node_class("PreprintRegionalPrompting").validate_inputs(start_percent=0.6, end_percent=0.2)
    assert isinstance(msg, str) and msg.startswith("Regional Prompting (Preprint): start_percent")


def test_a_region_prompt_with_lora_hooks_keeps_them_for_the_regional_pass():
    """A LoRA hooked onto one region's prompt is kept on the region (regional LoRA applies it inside the one pass:
    tests/host/test_regional_lora.py), never dropped; an empty hook group is no LoRA."""
    import comfy.hooks

    pos, _ = make_conds("sd15")
    empty = [[pos[0][0], {**pos[0][1], "hooks": comfy.hooks.HookGroup()}]]
    assert getattr(region(empty, torch.ones(1, 8, 8))[0], "hooks", None) is None
    group = comfy.hooks.create_hook_lora({}, strength_model=0.8, strength_clip=1.0)
    hooked = [[pos[0][0], {**pos[0][1], "hooks": group}]]
    assert region(hooked, torch.ones(1, 8, 8))[0].hooks is group


def test_flux2_region_text_is_numbered_from_the_prompt_start(models):
    """Flux.2 layouts number text along ``txt_ids_dims`` (0..L-1); each region's prompt must be numbered from 0, as
    that prompt alone would be. ComfyUI 0.3.64's Flux has no ``txt_ids_dims``, so the newer numbering is emulated on
    the tiny Flux: the config names axis 0 and a pre-hook on the position embedder numbers all text 0..L-1 there, as
    the newer ``_forward`` does. Then a full-frame region of the base prompt matches plain sampling, the region's
    ids restart at 0 (image ids and the base prompt's untouched), and the hook is gone after the call."""
    import types

    m, (h, w) = models["flux"], (13, 10)
    dm = m.model.diffusion_model
    pos, neg = make_conds("flux")
    other, _ = make_conds("flux", seed=7)
    seen = []

    def number_text(_module, args):  # what the newer _forward writes into txt_ids, before the embedder sees them
        ids = args[0].clone()
        text = ids.shape[1] - (-(-h // 2)) * (-(-w // 2))
        ids[:, :text, 0] = torch.arange(text, dtype=ids.dtype)
        return (ids, *args[1:])

    params = dm.params
    emulate = dm.pe_embedder.register_forward_pre_hook(number_text)
    record = dm.pe_embedder.register_forward_hook(lambda _m, args, _out: seen.append(args[0].clone()))
    try:
        dm.params = types.SimpleNamespace(**vars(params), txt_ids_dims=[0])
        plain = sample(m, "flux", pos, neg, h, w)
        full = sample(regional(m, region(pos, torch.ones(1, 64, 64))), "flux", pos, neg, h, w)
        moved = sample(regional(m, region(other, torch.ones(1, 64, 64))), "flux", pos, neg, h, w)
        gap = float((moved - plain).abs().max())
        assert gap > 0 and float((full - plain).abs().max()) < 1e-3 * gap, (float((full - plain).abs().max()), gap)
        seen.clear()
        sample(regional(m, region(other, half(h, w))), "flux", pos, neg, h, w)
        assert list(dm.pe_embedder._forward_pre_hooks) == [emulate.id]  # the renumbering lived for its call only
    finally:
        dm.params = params
        emulate.remove()
        record.remove()
    n0, n1 = pos[0][0].shape[1], other[0][0].shape[1]
    ids = seen[0]
    assert ids.shape[1] == n0 + n1 + 35  # base text, region text, 7 x 5 image tokens
    assert torch.equal(ids[0, :n0, 0], torch.arange(n0, dtype=ids.dtype))  # base prompt as the model numbered it
    assert torch.equal(ids[0, n0:n0 + n1, 0], torch.arange(n1, dtype=ids.dtype))  # the region's restarts at 0
    assert not ids[0, n0:n0 + n1, 1:].any()  # other axes untouched
    assert not ids[0, n0 + n1:, 0].any()  # image tokens untouched


def _dit_sample(m, pos, neg, shape=(16, 8, 12)):
    import comfy.sample

    latent = torch.zeros(1, *shape)  # 4 x 6 tokens after the 2x2 patches
    return comfy.sample.sample(m, comfy.sample.prepare_noise(latent, 0), 3, 3.0, "euler", "simple", pos, neg, latent,
                               seed=0, disable_pbar=True)


def test_chroma_is_served_like_flux():
    """Chroma (its own class, not a Flux subclass) gets the region text and joint mask through the same wrapper: a
    full-frame region of the base prompt is plain sampling up to rounding, a region prompt on a corner reaches
    exactly that corner's image tokens, and a region carrying LoRA hooks is refused by name."""
    import comfy.hooks

    from .test_dit_families import conds, tiny

    m = tiny("chroma")
    pos, neg = conds("chroma")
    other = [[neg[0][0] * -1.0, dict(neg[0][1])]]
    plain = _dit_sample(m, pos, neg)
    full = _dit_sample(regional(m, region(pos, torch.ones(1, 64, 96))), pos, neg)
    moved = _dit_sample(regional(m, region(other, torch.ones(1, 64, 96))), pos, neg)
    gap = float((moved - plain).abs().max())
    assert float((full - plain).abs().max()) < 1e-3 * gap, (float((full - plain).abs().max()), gap)

    mask = torch.zeros(1, 64, 96)
    mask[:, :16, 64:] = 1.0  # top row of tokens, last two columns
    seen = []

    def spy(executor, *args, **kw):
        seen.append((args[2].shape, kw.get("attention_mask"), args[5].get("cond_or_uncond")))
        return executor(*args, **kw)

    patched = regional(m, region(other, mask))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "zz_spy", spy)
    _dit_sample(patched, pos, neg)
    shape, att, cou = seen[0]
    n0, n1 = pos[0][0].shape[1], other[0][0].shape[1]
    assert shape[1] == n0 + n1 and att.shape[-1] == n0 + n1 + 24
    row = list(cou).index(0) * (shape[0] // len(cou))
    want = torch.zeros(4, 6, dtype=torch.bool)
    want[0, 4:] = True
    assert torch.equal(torch.isfinite(att[row, n0 + n1:, n0:n0 + n1]).all(dim=1).view(4, 6), want)

    hooked = [[other[0][0], {**other[0][1], "hooks": comfy.hooks.create_hook_lora({}, strength_model=1.0,
                                                                                      strength_clip=0.0)}]]
    with pytest.raises(ValueError, match=r"^Regional Prompting \(Preprint\): region 1's prompt carries a LoRA hook; "
                                         r"regional LoRA serves UNets and Flux, not Chroma"):
        regional(m, region(hooked, mask))


def test_qwen_image_gets_region_text_and_the_mask_on_every_joint_attention():
    """Qwen-Image: region text appended to the positive rows, the joint mask handed to each block's attention (its
    blocks pass their mask positionally, and None); a full-frame region of the base prompt is plain sampling up to
    rounding; a region carrying LoRA hooks is refused by name."""
    import comfy.hooks

    from .test_dit_families import conds, tiny

    m = tiny("qwen_image")
    pos, neg = conds("qwen_image")
    other = [[neg[0][0] * -1.0, dict(neg[0][1])]]
    shape = (16, 1, 8, 12)
    plain = _dit_sample(m, pos, neg, shape)
    full = _dit_sample(regional(m, region(pos, torch.ones(1, 64, 96))), pos, neg, shape)
    moved = _dit_sample(regional(m, region(other, torch.ones(1, 64, 96))), pos, neg, shape)
    gap = float((moved - plain).abs().max())
    assert gap > 0 and float((full - plain).abs().max()) < 1e-3 * gap, (float((full - plain).abs().max()), gap)

    mask = torch.zeros(1, 64, 96)
    mask[:, :16, 64:] = 1.0  # top row of tokens, last two columns
    seen = []

    def record(func, *args, **kwargs):
        seen.append((args[0].shape, args[4] if len(args) > 4 else kwargs.get("mask"),
                     list(kwargs["transformer_options"]["cond_or_uncond"])))
        return func(*args, **kwargs)

    patched = regional(m, region(other, mask))
    patched.model_options["transformer_options"]["optimized_attention_override"] = record
    _dit_sample(patched, pos, neg, shape)
    n0, n1 = pos[0][0].shape[1], other[0][0].shape[1]
    blocks = len(m.model.diffusion_model.transformer_blocks)
    assert len(seen) == 3 * blocks and all(q[1] == n0 + n1 + 24 and att is not None for q, att, _ in seen)
    _, att, cou = seen[0]
    want = torch.zeros(4, 6, dtype=torch.bool)
    want[0, 4:] = True
    assert torch.equal(torch.isfinite(att[cou.index(0), n0 + n1:, n0:n0 + n1]).all(dim=1).view(4, 6), want)
    assert not torch.isfinite(att[cou.index(1), n0 + n1:, n0:n0 + n1]).any()  # negative row: padding nobody sees

    assert not m.model.diffusion_model.pe_embedder._forward_pre_hooks  # the renumbering hook lives for a call only
    closed = regional(m, region(other, mask), start=1.0, end=1.0)
    assert torch.equal(_dit_sample(closed, pos, neg, shape), plain)
    # a negative prompt of another length runs in its own call, left as it was; the positive call still regional
    short_neg = [[neg[0][0][:, :4], dict(neg[0][1])]]
    seen.clear()
    _dit_sample(patched, pos, short_neg, shape)
    assert {att is None for _, att, cou in seen if cou == [1]} == {True}
    assert {att is not None for _, att, cou in seen if cou == [0]} == {True}

    hooked = [[other[0][0], {**other[0][1], "hooks": comfy.hooks.create_hook_lora({}, strength_model=1.0,
                                                                                      strength_clip=0.0)}]]
    with pytest.raises(ValueError, match=r"regional LoRA serves UNets and Flux, not Qwen-Image yet"):
        regional(m, region(hooked, mask))
