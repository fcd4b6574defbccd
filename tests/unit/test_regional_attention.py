"""Regional prompting maths: mask resampling, blend weights, the per-layer blend and the joint DiT mask; and the
runtime (the UNet attn2 replacement and the Flux wrapper) driven with a plain attention function, plain
projections and options dicts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from preprint.regional.attention import (
    Region,
    RegionError,
    as_mask_batch,
    blend_weights,
    joint_mask,
    masks_on_grid,
    regional_attention,
)
from preprint.regional.runtime import (
    FluxRegional,
    JointMaskOverride,
    JointRegional,
    JointRegionText,
    RegionSet,
    UNetRegionalAttention,
    active,
    positive_rows,
    region_spans,
    restart_region_positions,
)
from preprint.utils.sigma_window import SigmaWindow


def test_masks_resample_to_any_grid_by_area_and_broadcast_over_the_batch():
    m = torch.zeros(1, 40, 60)
    m[:, :, :30] = 1.0  # left half
    g = masks_on_grid([m], batch=3, height=5, width=7)  # odd grid: the middle column straddles the edge
    assert g.shape == (1, 3, 35)
    grid = g[0, 0].view(5, 7)
    assert torch.equal(grid[:, :3], torch.ones(5, 3)) and torch.equal(grid[:, 4:], torch.zeros(5, 3))
    assert torch.allclose(grid[:, 3], torch.full((5,), 0.5))  # area average, not nearest
    assert torch.equal(g[0, 0], g[0, 2])


def test_per_image_masks_stay_per_image_and_a_wrong_batch_is_an_error():
    m = torch.stack([torch.zeros(8, 8), torch.ones(8, 8)])
    g = masks_on_grid([m], batch=2, height=4, width=4)
    assert float(g[0, 0].max()) == 0.0 and float(g[0, 1].min()) == 1.0
    with pytest.raises(RegionError, match="batch of 2 but the latent batch is 3"):
        masks_on_grid([m], batch=3, height=4, width=4)


def test_mask_batch_shapes():
    assert as_mask_batch(torch.full((4, 5), 2.0)).shape == (1, 4, 5)
    assert float(as_mask_batch(torch.full((4, 5), 2.0)).max()) == 1.0
    with pytest.raises(RegionError):
        as_mask_batch(torch.ones(1, 1, 4, 5))


def test_blend_weights_share_overlaps_and_give_the_rest_to_the_base():
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.5], [0.0, 1.0, 0.0, 0.0]])
    region, base = blend_weights(masks)
    assert torch.allclose(region.sum(0) + base, torch.ones(4))
    assert torch.allclose(region[:, 1], torch.tensor([0.5, 0.5]))  # overlap: averaged
    assert torch.allclose(base, torch.tensor([0.0, 0.0, 1.0, 0.5]))  # uncovered and half-covered


def test_regional_attention_puts_each_prompt_where_its_mask_is():
    base = torch.zeros(1, 4, 2)
    a, b = torch.ones(1, 4, 2), torch.full((1, 4, 2), 3.0)
    masks = torch.tensor([[[1.0, 0.0, 0.0, 1.0]], [[0.0, 1.0, 0.0, 1.0]]])
    out = regional_attention(base, [a, b], masks, base_ratio=0.0)
    assert torch.equal(out[0, :, 0], torch.tensor([1.0, 3.0, 0.0, 2.0]))
    half = regional_attention(base, [a, b], masks, base_ratio=0.5)
    assert torch.equal(half[0, :, 0], torch.tensor([0.5, 1.5, 0.0, 1.0]))
    assert regional_attention(base, [a, b], masks, base_ratio=1.0) is base


def test_a_full_region_equal_to_the_base_is_bitwise_the_base():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 6, 3, generator=g)
    out = regional_attention(base, [base.clone()], torch.ones(1, 2, 6), base_ratio=0.3)
    assert torch.equal(out, base)


def test_joint_mask_keeps_regions_with_their_text():
    # base text 2 tokens, region text 1 token each, 4 image tokens; region 1 on image 0-1, region 2 on 3
    masks = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 1.0]]])
    bias = joint_mask([2, 1, 1], masks, base_ratio=0.25)[0]
    ok = torch.isfinite(bias)
    img = slice(4, 8)
    assert ok[0:2, 0:2].all() and ok[0:2, img].all() and not ok[0:2, 2:4].any()  # base text: itself, the image
    assert ok[2, 2] and ok[2, 4] and ok[2, 5] and not ok[2, 6] and not ok[2, 7] and not ok[2, 3] and not ok[2, 0]
    assert ok[3, 3] and ok[3, 7] and not ok[3, 4]
    assert ok[img, img].all() and ok[img, 0:2].all()
    assert ok[4, 2] and not ok[4, 3] and not ok[6, 2] and not ok[6, 3] and ok[7, 3]
    # covered image tokens see the base text at a log(ratio) bias, uncovered ones at 0
    assert bias[4, 0] == pytest.approx(math.log(0.25)) and bias[6, 0] == 0.0
    assert torch.isinf(joint_mask([2, 1, 1], masks, base_ratio=0.0)[0, 4, 0])
    with pytest.raises(RegionError):
        joint_mask([2, 1], masks, base_ratio=0.2)


def test_region_is_an_immutable_record():
    ctx, mask = torch.zeros(1, 3, 4), torch.ones(1, 2, 2)
    r = Region(context=ctx, mask=mask)
    assert r.context is ctx and r.mask is mask
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.mask = torch.zeros(1, 2, 2)


@pytest.mark.parametrize("shape", [(1, 0, 5), (1, 5, 0), (0, 5), (5, 0), (2, 0, 0)])
def test_a_mask_with_an_empty_side_is_an_error(shape):
    with pytest.raises(RegionError, match="region mask must be"):
        as_mask_batch(torch.ones(shape))


@pytest.mark.parametrize("shape", [(1, 1, 5), (1, 5, 1), (1, 1), (3, 1, 1)])
def test_a_one_pixel_side_is_a_valid_mask(shape):
    m = as_mask_batch(torch.full(shape, 0.25))
    assert m.shape == (shape if len(shape) == 3 else (1, *shape)) and torch.equal(m, torch.full(m.shape, 0.25))


def test_mask_values_are_clamped_to_zero_and_one_and_kept_between():
    m = as_mask_batch(torch.tensor([[-1.0, -0.2, 0.0, 0.3, 1.0, 1.7]]))
    assert m.dtype == torch.float32 and m.tolist() == [[[0.0, 0.0, 0.0, pytest.approx(0.3), 1.0, 1.0]]]
    assert as_mask_batch(torch.tensor([[True, False]])).tolist() == [[[1.0, 0.0]]]


def test_masks_and_outputs_must_pair_up():
    base = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError):
        regional_attention(base, [torch.ones(1, 4, 2)], torch.ones(2, 1, 4), base_ratio=0.0)
    with pytest.raises(ValueError):
        regional_attention(base, [torch.ones(1, 4, 2)] * 2, torch.ones(1, 1, 4), base_ratio=0.0)


def test_a_token_half_covered_belongs_to_the_region():
    masks = torch.tensor([[[0.5, 0.49, 0.51, 0.0]]])
    bias = joint_mask([1, 1], masks, base_ratio=0.5)[0]
    ok = torch.isfinite(bias)
    assert ok[1, 2:].tolist() == [True, False, True, False]  # region text sees image tokens 0 and 2
    assert ok[2:, 1].tolist() == [True, False, True, False]
    assert bias[2:, 0].tolist() == [pytest.approx(math.log(0.5)), 0.0, pytest.approx(math.log(0.5)), 0.0]


def test_joint_mask_gives_each_image_of_a_batch_its_own_regions():
    # image 0: region on tokens 0, 1; image 1: region on tokens 2, 3 (text: base 1 token, region 1 token)
    masks = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    bias = joint_mask([1, 1], masks, base_ratio=0.0)
    ok = torch.isfinite(bias)
    assert ok[0, 1, 2:].tolist() == [True, True, False, False] and ok[1, 1, 2:].tolist() == [False, False, True, True]
    assert ok[0, 2:, 1].tolist() == [True, True, False, False] and ok[1, 2:, 1].tolist() == [False, False, True, True]
    assert ok[0, 2:, 0].tolist() == [False, False, True, True] and ok[1, 2:, 0].tolist() == [True, True, False, False]


# ---------------------------------------------------------------------------------------------- runtime

def test_positive_rows_are_the_rows_of_every_chunk_but_the_negative_prompts():
    assert positive_rows({"cond_or_uncond": [0, 1]}, 4) == [0, 1]
    assert positive_rows({"cond_or_uncond": [1, 0]}, 6) == [3, 4, 5]
    assert positive_rows({"cond_or_uncond": [0, 2, 1]}, 3) == [0, 1]  # other conds (e.g. PAG's) count as positive
    assert positive_rows({"cond_or_uncond": [1]}, 2) == [] and positive_rows({}, 2) == []


def test_active_reads_the_calls_highest_sigma_against_the_window():
    window = SigmaWindow(5.0, 2.0)
    assert active({"sigmas": torch.tensor([5.0, 1.0])}, window)
    assert active({"sigmas": torch.tensor([2.0])}, window)
    assert not active({"sigmas": torch.tensor([5.5, 3.0])}, window)
    assert not active({"sigmas": torch.tensor([1.9])}, window)
    assert not active({}, window) and not active({}, SigmaWindow())


def test_region_set_lays_out_masks_per_grid_and_casts_prompts_once():
    masks = [torch.rand(1, 8, 12, generator=torch.Generator().manual_seed(0)),
             torch.rand(2, 8, 12, generator=torch.Generator().manual_seed(1))]
    ctx = [torch.randn(1, 3, 4), torch.randn(1, 5, 4)]
    rs = RegionSet(tuple(Region(c, m) for c, m in zip(ctx, masks, strict=True)))
    got = rs.masks(2, 4, 3, torch.device("cpu"))
    assert torch.equal(got, masks_on_grid(masks, 2, 4, 3)) and got.shape == (2, 2, 12)
    assert rs.masks(2, 4, 3, torch.device("cpu")) is got
    assert rs.masks(2, 2, 3, torch.device("cpu")).shape == (2, 2, 6)
    c64 = rs.contexts(torch.device("cpu"), torch.float64)
    assert [c.dtype for c in c64] == [torch.float64] * 2 and all(torch.equal(a.double(), b) for a, b in zip(ctx, c64,
                                                                                                           strict=True))
    assert rs.contexts(torch.device("cpu"), torch.float64)[0] is c64[0]
    assert rs.contexts(torch.device("cpu"), torch.float32)[0].dtype == torch.float32


class _Attention:
    """ComfyUI's optimized attention, plain: heads split off [b, n, heads * d]; records what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, heads, attn_precision=None, transformer_options=None):
        self.calls.append((tuple(q.shape), tuple(k.shape), heads, attn_precision, transformer_options))
        b, n, c = q.shape
        split = [t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v)]
        w = torch.softmax(split[0] @ split[1].transpose(-1, -2) / (c // heads) ** 0.5, dim=-1)
        return (w @ split[2]).transpose(1, 2).reshape(b, n, c)


class _Attn2(torch.nn.Module):
    def __init__(self, dim_in, dim):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.to_k = torch.nn.Linear(dim_in, dim, bias=False, dtype=torch.float64)
        self.to_v = torch.nn.Linear(dim_in, dim, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.to_k.weight.copy_(torch.randn(dim, dim_in, generator=g, dtype=torch.float64))
            self.to_v.weight.copy_(torch.randn(dim, dim_in, generator=g, dtype=torch.float64))


def _blend_by_hand(base, outs, masks, base_ratio):
    """out = base + (1 - b) (sum_r m_r A_r / max(1, c) + max(0, 1 - c) base - base), per position (the docstring)."""
    cover = sum(masks)
    regional = sum(m[:, None] * a for m, a in zip(masks, outs, strict=True)) / cover.clamp_min(1.0)[:, None]
    regional = regional + (1.0 - cover).clamp_min(0.0)[:, None] * base
    return base + (1.0 - base_ratio) * (regional - base)


def _unet_case(cou=(0, 1), base_ratio=0.25, region_lengths=(5, 3)):
    """Two images per chunk on a 2 x 3 token grid, prompts of 5 tokens, two regions; masks exact on the grid."""
    g = torch.Generator().manual_seed(9)
    per, c, d_in = 2, 8, 6
    batch = per * len(cou)
    attn2 = _Attn2(d_in, c)
    prompts = torch.randn(batch, 5, d_in, generator=g, dtype=torch.float64)
    q = torch.randn(batch, 6, c, generator=g, dtype=torch.float64)
    k, v = attn2.to_k(prompts).detach(), attn2.to_v(prompts).detach()
    left = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    m1 = left[None]  # one mask for every image: the left two columns
    m2 = torch.stack([torch.ones(4, 6) * 0.5, 1.0 - left])  # image 0: half everywhere; image 1: the right column
    contexts = [torch.randn(1, n, d_in, generator=g, dtype=torch.float64) for n in region_lengths]
    regions = RegionSet((Region(contexts[0], m1), Region(contexts[1], m2)))
    grid = [m1[0, ::2, ::2].reshape(-1).expand(per, 6), m2[:, ::2, ::2].reshape(per, 6)]
    return attn2, regions, contexts, q, k, v, grid


@pytest.mark.parametrize("cou", [(0, 1), (1, 0), (0,)])
@pytest.mark.parametrize("region_lengths", [(5, 3), (5, 5)])  # (5, 5): both branches of the projection path
def test_unet_regional_attention_blends_each_prompts_attention_on_the_positive_rows(cou, region_lengths):
    attn2, regions, contexts, q, k, v, grid = _unet_case(cou, region_lengths=region_lengths)
    attention = _Attention()
    patch = UNetRegionalAttention(attention, attn2, regions, 0.25, SigmaWindow(8.0, 2.0))
    opts = {"n_heads": 2, "attn_precision": "fp32", "cond_or_uncond": list(cou), "sigmas": torch.tensor([8.0]),
            "activations_shape": (len(cou) * 2, 8, 2, 3)}
    with torch.no_grad():
        out = patch(q, k, v, opts)
    base = attention(q, k, v, 2)
    assert attention.calls[0][2:] == (2, "fp32", opts)  # heads, precision and the options reach the attention
    for j, c in enumerate(cou):
        rows = slice(2 * j, 2 * j + 2)
        if c == 1:  # the negative prompt's rows: the layer's own output
            assert torch.equal(out[rows], base[rows])
            continue
        for i in range(2):
            row = 2 * j + i
            with torch.no_grad():
                outs = [attention(q[row:row + 1], attn2.to_k(ctx), attn2.to_v(ctx), 2)[0] for ctx in contexts]
            want = _blend_by_hand(base[row], outs, [m[i] for m in grid], 0.25)
            assert torch.allclose(out[row], want, atol=1e-12, rtol=0)


def test_unet_region_prompts_of_the_base_prompts_length_are_attended_at_the_batchs_own_shapes():
    """So that a region prompt equal to the base prompt goes through exactly the computation the base did (and
    gives its output bit for bit whatever the attention kernel): a region prompt as long as the base prompt is
    attended over the whole batch, q as given; a prompt of another length only on the positive rows."""
    attn2, regions, _, q, k, v, _ = _unet_case(region_lengths=(5, 3))
    attention = _Attention()
    patch = UNetRegionalAttention(attention, attn2, regions, 0.0, SigmaWindow())
    opts = {"n_heads": 2, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([3.0]), "activations_shape": (4, 8, 2, 3)}
    with torch.no_grad():
        patch(q, k, v, opts)
    assert [c[:2] for c in attention.calls] == [((4, 6, 8), (4, 5, 8)),  # the layer's own attention
                                                ((4, 6, 8), (4, 5, 8)),  # region 1: 5 tokens, the whole batch
                                                ((2, 6, 8), (2, 3, 8))]  # region 2: 3 tokens, the positive rows


def test_unet_regional_attention_outside_its_window_or_without_positive_rows_is_the_layer():
    attn2, regions, _, q, k, v, _ = _unet_case()
    attention = _Attention()
    patch = UNetRegionalAttention(attention, attn2, regions, 0.0, SigmaWindow(8.0, 2.0))
    base = attention(q, k, v, 2)
    for sigma, cou in ((9.0, [0, 1]), (1.0, [0, 1]), (5.0, [1, 1])):
        opts = {"n_heads": 2, "cond_or_uncond": cou, "sigmas": torch.tensor([sigma]), "activations_shape": (4, 8, 2, 3)}
        attention.calls.clear()
        assert torch.equal(patch(q, k, v, opts), base)
        assert len(attention.calls) == 1  # nothing but the layer's own attention ran


def test_unet_regional_attention_chains_the_previous_replacement_for_the_base():
    attn2, regions, contexts, q, k, v, grid = _unet_case()
    attention = _Attention()
    seen = []

    def previous(q, k, v, extra_options):
        seen.append(extra_options)
        return torch.full_like(q, 2.0)

    patch = UNetRegionalAttention(attention, attn2, regions, 0.0, SigmaWindow(), previous=previous)
    opts = {"n_heads": 2, "cond_or_uncond": [0, 1], "sigmas": torch.tensor([3.0]), "activations_shape": (4, 8, 2, 3)}
    with torch.no_grad():
        out = patch(q, k, v, opts)
        outs = [attention(q[1:2], attn2.to_k(ctx), attn2.to_v(ctx), 2)[0] for ctx in contexts]
    assert seen == [opts]
    assert torch.equal(out[2:], torch.full_like(q[2:], 2.0))
    want = _blend_by_hand(torch.full_like(q[1], 2.0), outs, [m[1] for m in grid], 0.0)
    assert torch.allclose(out[1], want, atol=1e-12, rtol=0)


def test_a_full_region_with_the_base_prompt_is_bitwise_the_layer():
    g = torch.Generator().manual_seed(2)
    attn2 = _Attn2(6, 4)
    prompt = torch.randn(1, 5, 6, generator=g, dtype=torch.float64)
    prompts = torch.cat([prompt, prompt, torch.randn(2, 5, 6, generator=g, dtype=torch.float64)])
    q = torch.randn(4, 6, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        k, v = attn2.to_k(prompts), attn2.to_v(prompts)
        attention = _Attention()
        patch = UNetRegionalAttention(attention, attn2, RegionSet((Region(prompt, torch.ones(1, 7, 5)),)), 0.3,
                                      SigmaWindow())
        opts = {"n_heads": 2, "cond_or_uncond": [0, 1], "sigmas": torch.tensor([3.0]),
                "activations_shape": (4, 4, 2, 3)}
        assert torch.equal(patch(q, k, v, opts), attention(q, k, v, 2))


class _Flux:
    """Stands in for comfy.ldm.flux.model.Flux: the wrapped ``_forward`` records what it is handed."""

    def __init__(self, patch_size=2):
        self.patch_size, self.seen = patch_size, []

    def _forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature)
        self.seen.append({"x": x, "timestep": timestep, "context": context, "y": y, "guidance": guidance,
                          "ref_latents": ref_latents, "control": control, "transformer_options": transformer_options,
                          **kwargs})
        return "out"


class _Executor:
    def __init__(self, model, original=None):
        self.class_obj, self.original = model, original or model._forward

    def __call__(self, *args, **kwargs):
        return self.original(*args, **kwargs)


def _flux_case(cou=(0, 1), patch_size=2, ref=None, sigma=3.0, window=SigmaWindow(), base_ratio=0.5):
    g = torch.Generator().manual_seed(4)
    model = _Flux(patch_size)
    diagonal = torch.stack([torch.eye(6, 5), 1 - torch.eye(6, 5)])  # a mask per image
    regions = RegionSet((Region(torch.randn(1, 2, 8, generator=g), torch.ones(1, 6, 5)),
                         Region(torch.randn(1, 3, 8, generator=g), diagonal)))
    wrapper = FluxRegional("Regional Prompting (Preprint)", regions, base_ratio, window)
    batch = 2 * len(cou)
    x = torch.randn(batch, 4, 6, 5, generator=g)  # 2x2 patches: a 3 x 3 token grid (5 columns round up)
    context = torch.randn(batch, 4, 8, generator=g)
    to = {"cond_or_uncond": list(cou), "sigmas": torch.tensor([sigma])}
    args = (x, torch.ones(batch), context, torch.zeros(batch, 3), None, ref, None, to)
    return model, regions, wrapper, args


@pytest.mark.parametrize("cou", [(0, 1), (1, 0)])
@pytest.mark.parametrize("patch_size,grid", [(2, (3, 3)), (1, (6, 5))])
def test_flux_wrapper_appends_region_text_to_positive_rows_and_hands_a_joint_mask(cou, patch_size, grid):
    model, regions, wrapper, args = _flux_case(cou, patch_size)
    assert wrapper(_Executor(model), *args) == "out"
    got = model.seen[0]
    x, context = args[0], args[2]
    assert got["x"] is x and got["y"] is args[3] and got["transformer_options"] is args[7]
    texts = regions.contexts(context.device, context.dtype)
    region_text = torch.cat([t[0] for t in texts])  # 2 + 3 tokens
    n_img = grid[0] * grid[1]
    per_image = masks_on_grid([r.mask for r in regions.regions], 2, *grid)
    regional = joint_mask([4, 2, 3], per_image, 0.5)
    total = 4 + 5 + n_img
    assert got["context"].shape == (4, 9, 8) and got["attention_mask"].shape == (4, total, total)
    for j, c in enumerate(cou):
        for i in range(2):
            b = 2 * j + i
            assert torch.equal(got["context"][b, :4], context[b])
            if c == 0:
                assert torch.equal(got["context"][b, 4:], region_text)
                assert torch.equal(got["attention_mask"][b], regional[i])
            else:  # the negative prompt's rows: the appended tokens are padding only they themselves see
                assert torch.equal(got["context"][b, 4:], torch.zeros(5, 8))
                want = torch.zeros(total, total)
                want[:, 4:9] = float("-inf")
                want[4:9, 4:9] = torch.where(torch.eye(5, dtype=torch.bool), 0.0, float("-inf"))
                assert torch.equal(got["attention_mask"][b], want)


def test_flux_wrapper_counts_reference_latent_tokens_as_uncovered_image():
    ref = [torch.randn(1, 16, 10, 5), torch.randn(1, 16, 3, 4)]  # Kontext: 5 x 3 and 2 x 2 tokens of 2x2 patches
    model, regions, wrapper, args = _flux_case((0,), ref=ref)
    wrapper(_Executor(model), *args)
    got = model.seen[0]
    per_image = masks_on_grid([r.mask for r in regions.regions], 2, 3, 3)
    per_image = torch.cat([per_image, torch.zeros(2, 2, 15 + 4)], dim=2)
    assert got["ref_latents"] is ref
    assert torch.equal(got["attention_mask"], joint_mask([4, 2, 3], per_image, 0.5))


def test_flux_wrapper_outside_its_window_passes_everything_through():
    model, _, wrapper, args = _flux_case(sigma=9.0, window=SigmaWindow(5.0, -1.0))
    wrapper(_Executor(model), *args)
    got = model.seen[0]
    assert got["context"] is args[2] and "attention_mask" not in got


def test_flux_wrapper_builds_the_text_and_mask_once_per_batch_layout():
    model, _, wrapper, args = _flux_case()
    executor = _Executor(model)
    wrapper(executor, *args)
    wrapper(executor, *args)
    assert model.seen[1]["attention_mask"] is model.seen[0]["attention_mask"]
    swapped = list(args)
    swapped[7] = {**args[7], "cond_or_uncond": [1, 0]}
    wrapper(executor, *swapped)
    assert not torch.equal(model.seen[2]["attention_mask"], model.seen[0]["attention_mask"])


def test_flux_wrapper_rebuilds_the_mask_for_a_prompt_of_another_length():
    model, regions, wrapper, args = _flux_case((0,))
    executor = _Executor(model)
    wrapper(executor, *args)
    longer = list(args)
    longer[2] = torch.randn(2, 7, 8)  # the same batch layout, a base prompt of 7 tokens instead of 4
    wrapper(executor, *longer)
    per_image = masks_on_grid([r.mask for r in regions.regions], 2, 3, 3)
    assert torch.equal(model.seen[1]["attention_mask"], joint_mask([7, 2, 3], per_image, 0.5))
    assert model.seen[1]["context"].shape == (2, 12, 8)


def test_flux_wrapper_refuses_a_second_attention_mask_and_a_forward_it_cannot_reach():
    model, _, wrapper, args = _flux_case()
    with pytest.raises(RegionError, match="already carries a Flux attention mask"):
        wrapper(_Executor(model), *args, attention_mask=torch.zeros(1))

    def old_forward(x, timestep, context, y=None, guidance=None, control=None, transformer_options={}):  # noqa: B006
        return "old"

    with pytest.raises(RegionError, match="without attention_mask"):
        wrapper(_Executor(model, old_forward), *args[:5], None, args[7])

    def no_options(x, timestep, context, **kwargs):
        return "none"

    with pytest.raises(RegionError, match="without transformer_options"):
        FluxRegional("R", RegionSet(()), 0.0, SigmaWindow())(_Executor(model, no_options), *args[:3])


def test_flux_wrapper_sets_a_named_attention_mask_parameter():
    seen = {}

    def forward(x, timestep, context, transformer_options=None, attention_mask=None):
        seen.update(context=context, attention_mask=attention_mask)
        return "named"

    model, _, wrapper, args = _flux_case((0,))
    assert wrapper(_Executor(model, forward), args[0], args[1], args[2], transformer_options=args[7]) == "named"
    assert seen["context"].shape == (2, 9, 8) and seen["attention_mask"].shape == (2, 18, 18)


def test_flux_wrapper_reads_2x2_patches_from_a_model_that_does_not_name_its_patch_size():
    model, regions, wrapper, args = _flux_case((0,))
    executor = _Executor(model)
    executor.class_obj = object()  # Flux.1 before patch_size was an attribute
    wrapper(executor, *args)
    per_image = masks_on_grid([r.mask for r in regions.regions], 2, 3, 3)
    assert torch.equal(model.seen[0]["attention_mask"], joint_mask([4, 2, 3], per_image, 0.5))


def test_flux_wrapper_reads_each_wrapped_functions_own_signature():
    seen = {}

    def named(x, timestep, context, transformer_options=None, attention_mask=None):
        seen.update(attention_mask=attention_mask)
        return "named"

    model, _, wrapper, args = _flux_case((0,))
    assert wrapper(_Executor(model, named), args[0], args[1], args[2], transformer_options=args[7]) == "named"
    assert wrapper(_Executor(model), *args) == "out"  # then ComfyUI's _forward, positionally, with **kwargs
    assert torch.equal(model.seen[0]["attention_mask"], seen["attention_mask"])


def test_joint_mask_override_masks_only_the_joint_calls_and_chains():
    mask = torch.zeros(2, 7, 7)
    seen = []

    def previous(func, *args, **kwargs):
        seen.append(kwargs.get("mask"))
        return func(*args, **kwargs)

    override = JointMaskOverride(mask, 7, previous)

    def func(q, k, v, heads=1, mask=None, **kwargs):
        return mask

    q7, q5 = torch.zeros(2, 7, 4), torch.zeros(2, 5, 4)
    assert override(func, q7, q7, q7, heads=2) is mask  # the joint [text; image] call
    assert override(func, q5, q5, q5, heads=2) is None  # an image-only self-attention
    own = torch.ones(2, 7, 7)
    assert override(func, q7, q7, q7, heads=2, mask=own) is own  # a call's own mask is kept
    assert override(func, q7.half(), q7.half(), q7.half(), heads=2).dtype == torch.float16
    assert seen[0] is mask and seen[1] is None
    # Qwen-Image passes its (None) mask as the fifth positional argument: it is replaced there, an own one kept
    assert override(func, q7, q7, q7, 2, None) is mask
    assert override(func, q7, q7, q7, 2, own) is own
    assert (override.calls, override.hits) == (6, 3)


class _SD3Model:
    manual_cast_dtype = None

    def __init__(self):
        self.seen = []

    def get_dtype(self):
        return torch.float32

    def _apply(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        self.seen.append((c_crossattn, transformer_options))
        return x


def test_sd3_wrapper_appends_the_flux_paths_text_and_hands_its_mask_to_the_override():
    g = torch.Generator().manual_seed(5)
    regions = RegionSet((Region(torch.randn(1, 3, 8, generator=g), torch.ones(1, 6, 5)),))
    wrapper = JointRegional("R", regions, 0.5, SigmaWindow(), patch=2, lead=2)
    model = _SD3Model()
    x, context = torch.zeros(2, 16, 5, 3), torch.randn(2, 4, 8, generator=g)
    to = {"cond_or_uncond": [0, 1], "sigmas": torch.tensor([3.0, 3.0])}
    wrapper(_Executor(model, model._apply), x, torch.tensor([3.0, 3.0]), None, context, None, to)
    got, options = model.seen[0]
    assert torch.equal(got[0, 4:], regions.regions[0].context[0]) and torch.equal(got[1, 4:], torch.zeros(3, 8))
    override = options["optimized_attention_override"]
    # base span = 2 register tokens + 4 prompt tokens; grid 3 x 2 (odd height padded to the patch)
    want = joint_mask([6, 3], masks_on_grid([r.mask for r in regions.regions], 1, 3, 2), 0.5)
    assert override.total == 6 + 3 + 6 and torch.equal(override.mask[0], want[0])
    assert "optimized_attention_override" not in to  # the caller's options untouched
    closed = JointRegional("R", regions, 0.5, SigmaWindow(1.0, 0.5), patch=2, lead=0)
    closed(_Executor(model, model._apply), x, torch.tensor([3.0, 3.0]), None, context, None, to)
    assert model.seen[1][0] is context and model.seen[1][1] is to


def test_joint_wrapper_counts_reference_tokens_and_refuses_a_sequence_it_never_met():
    g = torch.Generator().manual_seed(6)
    regions = RegionSet((Region(torch.randn(1, 3, 8, generator=g), torch.ones(1, 6, 5)),))
    wrapper = JointRegional("Regional Prompting (Preprint)", regions, 0.5, SigmaWindow(), patch=2, lead=0)
    model = _SD3Model()
    x, context = torch.zeros(2, 16, 1, 5, 3), torch.randn(2, 4, 8, generator=g)  # Qwen-Image latents carry a frame
    to = {"cond_or_uncond": [0, 1], "sigmas": torch.tensor([3.0, 3.0])}
    refs = [torch.zeros(1, 16, 1, 4, 6)]  # a reference latent: 2 x 3 more image tokens, no region covers them
    wrapper(_Executor(model, model._apply), x, torch.tensor([3.0, 3.0]), None, context, None, to, ref_latents=refs)
    override = model.seen[0][1]["optimized_attention_override"]
    assert override.total == 4 + 3 + 6 + 6
    want = joint_mask([4, 3], torch.cat([masks_on_grid([r.mask for r in regions.regions], 1, 3, 2),
                                         torch.zeros(1, 1, 6)], dim=2), 0.5)
    assert torch.equal(override.mask[0], want[0])

    def attends_wrong_length(x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        q = torch.zeros(2, 5, 4)
        transformer_options["optimized_attention_override"](lambda *a, **k: q, q, q, q, 1)
        return x

    with pytest.raises(RegionError, match=r"^Regional Prompting \(Preprint\): the model's attention never took "
                                          r"the regional mask: it was built for a sequence of 19 tokens .* the "
                                          r"attention calls saw \[5\]"):
        wrapper(_Executor(model, attends_wrong_length), x, torch.tensor([3.0, 3.0]), None, context, None, to,
                ref_latents=refs)


def test_the_joint_mask_is_built_on_the_device_of_the_masks():
    """Masks on the model's device (a GPU in use) give a mask there; PyTorch's meta device stands in for a GPU here
    (mixing it with CPU tensors fails exactly as CUDA does)."""
    masks = torch.zeros(1, 1, 6)
    masks[0, 0, :3] = 1.0
    want = joint_mask([2, 3], masks, 0.5)
    got = joint_mask([2, 3], masks.to("meta"), 0.5)
    assert got.device.type == "meta" and got.shape == want.shape
    regions = RegionSet((Region(torch.randn(1, 3, 8), torch.ones(1, 4, 6)),))
    text, mask = JointRegionText(regions, 0.5).build((0, 1), 2, (2, 3), 0, 4, torch.zeros(2, 4, 8, device="meta"),
                                                     torch.float32, torch.device("meta"))
    assert text.device.type == "meta" and mask.device.type == "meta" and mask.shape == (2, 13, 13)


def test_negative_only_calls_run_as_they_were():
    """Prompts of different lengths never share a batch in ComfyUI (their cross-attention inputs cannot be
    concatenated), so the negative prompt often runs alone: that call is handed on untouched, no mask, no text."""
    regions = RegionSet((Region(torch.randn(1, 3, 8), torch.ones(1, 6, 5)),))
    wrapper = JointRegional("R", regions, 0.5, SigmaWindow(), patch=2, lead=0)
    model = _SD3Model()
    x, context = torch.zeros(1, 16, 5, 3), torch.randn(1, 4, 8)
    to = {"cond_or_uncond": [1], "sigmas": torch.tensor([3.0])}
    wrapper(_Executor(model, model._apply), x, torch.tensor([3.0]), None, context, None, to)
    assert model.seen[0][0] is context and model.seen[0][1] is to


@pytest.mark.parametrize("axes", [None, [3], [1, 3]])
def test_region_text_positions_restart_from_the_first_text_token(axes):
    """The position pre-hook numbers each region's text span from the first text token's ids again, on every axis
    or only on the named ones; the base prompt, the image ids and ids of another length pass unchanged."""
    regions = RegionSet((Region(torch.ones(1, 2, 8), torch.ones(1, 4, 4)), Region(torch.ones(1, 2, 8) * 2,
                                                                                   torch.ones(1, 4, 4))))
    spans = region_spans(regions, 5)
    assert spans == [(5, 7), (7, 9)]
    embedder, fired = torch.nn.Identity(), []
    ids = torch.zeros(2, 9 + 6, 4)
    ids[:, :9, :] = 10.0 + torch.arange(9.0).view(1, -1, 1)  # text numbered 10.. on every axis
    ids[:, 9:, 1] = torch.arange(6.0)  # image rows
    handle = restart_region_positions(embedder, spans, 15, axes, fired)
    out = embedder(ids)
    cols = list(range(4)) if axes is None else axes
    for a, b in spans:
        want = ids[:, a:b].clone()
        want[:, :, cols] = 10.0 + torch.arange(float(b - a)).view(1, -1, 1)
        assert torch.equal(out[:, a:b], want)
    assert torch.equal(out[:, :5], ids[:, :5]) and torch.equal(out[:, 9:], ids[:, 9:])
    assert fired == [True]
    other = torch.zeros(2, 14, 4)
    assert embedder(other) is other and fired == [True]  # another sequence: untouched
    handle.remove()
    assert torch.equal(embedder(ids), ids)


def test_frame_masks_give_each_tile_its_part_of_the_frame():
    """Under Tiled Diffusion a tile's rows get the frame's masks cropped to the tile: a left-half mask is 1 on a tile
    in the left half, 0 on one in the right half, and splits a tile across the middle. Without tiles, each row gets
    its image's whole-frame mask."""
    from preprint.highres.tiling import Tile
    from preprint.regional.attention import frame_masks

    left = torch.zeros(1, 16, 24)
    left[..., :12] = 1.0  # drawn at twice the latent's 8 x 12
    regions = RegionSet((Region(torch.zeros(1, 2, 4), left),))
    cpu = torch.device("cpu")
    whole, which = frame_masks(regions.masks, 2, 4, 6, cpu, [0, 1, 2, 3], 4, None)  # prompt and negative chunks
    assert torch.equal(whole, regions.masks(2, 4, 6, cpu)) and which == [0, 1, 0, 1]
    tiles = ([Tile(0, 0, 8, 6), Tile(0, 6, 8, 6), Tile(0, 3, 8, 6)], 8, 12)
    # two images per chunk, one chunk, three tiles: 6 rows on a 4 x 3 layer grid
    got, which = frame_masks(regions.masks, 2, 4, 3, cpu, [5, 0, 3], 6, tiles)
    assert which == [5, 0, 3]
    got2, which2 = frame_masks(regions.masks, 2, 4, 3, cpu, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 12, tiles)
    assert torch.equal(got2, got) and which2 == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5]  # two chunks per tile
    assert got.shape == (1, 6, 12)
    assert torch.equal(got[0, :2], torch.ones(2, 12)) and torch.equal(got[0, 2:4], torch.zeros(2, 12))
    assert torch.equal(got[0, 4:].view(2, 4, 3)[0], torch.tensor([[1.0, 0.5, 0.0]] * 4))


def test_unet_regional_attention_under_tiles_gives_each_tile_its_part_of_the_masks():
    """A region covering the left half: in a call of two tiles (left, right; one image, prompt and negative each),
    the left tile's positive row is the region prompt's attention, the right tile's the base prompt's."""
    from preprint.highres.tiling import Tile

    g = torch.Generator().manual_seed(2)
    attn2 = _Attn2(6, 8)
    q = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)  # 2 tiles x (prompt, negative), a 2 x 3 grid
    prompts = torch.randn(4, 5, 6, generator=g, dtype=torch.float64)
    k, v = attn2.to_k(prompts).detach(), attn2.to_v(prompts).detach()
    ctx = torch.randn(1, 5, 6, generator=g, dtype=torch.float64)
    left = torch.zeros(1, 4, 12)
    left[..., :6] = 1.0
    attention = _Attention()
    patch = UNetRegionalAttention(attention, attn2, RegionSet((Region(ctx, left),)), 0.0, SigmaWindow())
    opts = {"n_heads": 2, "cond_or_uncond": [0, 1, 0, 1], "sigmas": torch.tensor([3.0]),
            "activations_shape": (4, 8, 2, 3), "preprint_tiles": ([Tile(0, 0, 4, 6), Tile(0, 6, 4, 6)], 4, 12)}
    with torch.no_grad():
        out = patch(q, k, v, opts)
        base = attention(q, k, v, 2)
        region = attention(q, attn2.to_k(ctx.expand(4, -1, -1)), attn2.to_v(ctx.expand(4, -1, -1)), 2)
    assert torch.allclose(out[0], region[0], atol=1e-12, rtol=0)  # left tile, prompt row: all region
    assert torch.equal(out[2], base[2])  # right tile, prompt row: nothing of the region
    assert torch.equal(out[1], base[1]) and torch.equal(out[3], base[3])  # negative rows


def test_joint_region_text_under_tiles_gives_each_tile_its_part_of_the_masks():
    """Flux under Tiled Diffusion: a call of two side-by-side tiles (one positive row each) and a region over the
    left half: the left tile's image tokens attend the region's text, the right tile's do not."""
    from preprint.highres.tiling import Tile

    left = torch.zeros(1, 8, 12)
    left[..., :6] = 1.0
    joint = JointRegionText(RegionSet((Region(torch.ones(1, 3, 4), left),)), 0.0)
    context = torch.zeros(2, 2, 4)
    tiles = ([Tile(0, 0, 8, 6), Tile(0, 6, 8, 6)], 8, 12)
    _, mask = joint.build((0, 0), 2, (4, 3), 0, 2, context, torch.float32, torch.device("cpu"), tiles)
    region_text, image = slice(2, 5), slice(5, 17)
    assert torch.isfinite(mask[0, image, region_text]).all()
    assert not torch.isfinite(mask[1, image, region_text]).any()
    _, whole = joint.build((0, 0), 2, (4, 3), 0, 2, context, torch.float32, torch.device("cpu"))
    assert torch.isfinite(whole[1, image, region_text]).any()  # without tiles: the frame's mask squeezed on both
