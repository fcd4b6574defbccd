"""Regional prompting on SD3 (MMDiT) through real ComfyUI sampling on the tiny SD3.5-style layout: the joint
attention of every joint block gets the same mask Flux gets (one builder), the image-only self-attention none;
off-switches; non-square sizes; refusals."""

from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import pytest
import torch

from preprint.regional.attention import joint_mask, masks_on_grid
from preprint.runner.tiny_models import _sd3_config, randomise_

from .harness import make_conds, run_node, run_sampling, tiny_model


@pytest.fixture(scope="module")
def sd3():
    return tiny_model("sd3")


def region(cond, mask, strength=1.0, regions=None):
    return run_node("PreprintRegion", conditioning=cond, mask=mask, strength=strength, regions=regions)[0]


def regional(m, regions, base_ratio=0.0, start=0.0, end=1.0):
    return run_node("PreprintRegionalPrompting", model=m, regions=regions, base_ratio=base_ratio,
                    start_percent=start, end_percent=end)[0]


def sample(m, positive, negative, h, w, **kw):
    return run_sampling(m, "sd3", steps=4, height=h, width=w, positive=positive, negative=negative, **kw)


def with_spy(m):
    """An attention override installed before the regional node (which chains it), recording each attention call's
    query length, mask and batch layout. A function, not an object: cloned model options copy objects deeply."""
    calls = []

    def spy(func, *args, **kwargs):
        calls.append((int(args[0].shape[1]), kwargs.get("mask"),
                      list(kwargs["transformer_options"].get("cond_or_uncond") or [])))
        return func(*args, **kwargs)

    m = m.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = spy
    return m, calls


@pytest.mark.parametrize("h, w", [(13, 10), (6, 11)])
def test_one_full_region_with_the_base_prompt_matches_plain_sampling(sd3, h, w):
    pos, neg = make_conds("sd3")
    plain = sample(sd3, pos, neg, h, w)
    out = sample(regional(sd3, region(pos, torch.ones(1, 40, 64)), base_ratio=0.0), pos, neg, h, w)
    # as on Flux: covered image tokens see the region's copy of the base text instead of the base text, and the copy
    # evolves as the base text does; masked keys weigh exactly 0, so only the order of sums differs
    assert torch.allclose(out, plain, rtol=0, atol=1e-4 * float(plain.abs().max()))
    other, _ = make_conds("sd3", seed=9)
    moved = sample(regional(sd3, region(other, torch.ones(1, 40, 64)), base_ratio=0.0), pos, neg, h, w)
    assert (moved - plain).abs().max() > 100 * 1e-4 * float(plain.abs().max())


def test_a_closed_window_is_bitwise_plain_sampling(sd3):
    h, w = 13, 10
    pos, neg = make_conds("sd3")
    other, _ = make_conds("sd3", seed=9)
    half = torch.zeros(1, 8 * h, 8 * w)
    half[..., : 4 * w] = 1.0
    plain = sample(sd3, pos, neg, h, w)
    assert torch.equal(sample(regional(sd3, region(other, half), start=1.0, end=1.0), pos, neg, h, w), plain)
    assert not torch.equal(sample(regional(sd3, region(other, half)), pos, neg, h, w), plain)


def test_every_joint_attention_gets_the_regions_mask_and_the_image_self_attention_none(sd3):
    h, w = 6, 10  # token grid 3 x 5
    pos, neg = make_conds("sd3")
    other, _ = make_conds("sd3", seed=9)
    mask = torch.zeros(1, 48, 80)
    mask[:, :16, 48:] = 1.0  # top row of tokens, last two columns
    spied, calls = with_spy(sd3)
    sample(regional(spied, region(other, mask), base_ratio=0.25), pos, neg, h, w)
    n0, n1, n_img = pos[0][0].shape[1], other[0][0].shape[1], 15
    total = n0 + n1 + n_img
    per_forward = len(sd3.model.diffusion_model.joint_blocks) + 1  # block 1 adds an image-only self-attention
    assert len(calls) == 4 * per_forward
    joint = [c for c in calls if c[0] == total]
    assert len(joint) == 4 * len(sd3.model.diffusion_model.joint_blocks)
    assert all(c[1] is None for c in calls if c[0] == n_img)
    _, att, cou = joint[0]
    rows = att.shape[0] // len(cou)
    want = joint_mask([n0, n1], masks_on_grid([mask], 1, 3, 5), 0.25)[0]  # the Flux path's mask, one builder
    assert torch.equal(att[cou.index(0) * rows], want)
    img_to_region = torch.isfinite(att[cou.index(0) * rows, n0 + n1:, n0:n0 + n1]).all(dim=1).view(3, 5)
    expected = torch.zeros(3, 5, dtype=torch.bool)
    expected[0, 3:] = True
    assert torch.equal(img_to_region, expected)
    assert not torch.isfinite(att[cou.index(1) * rows, n0 + n1:, n0:n0 + n1]).any()  # the negative row: padding
    assert torch.isfinite(att[cou.index(1) * rows, n0 + n1:, :n0]).all()


def test_batches_and_per_image_masks(sd3):
    h, w = 7, 9
    pos, neg = make_conds("sd3")
    other, _ = make_conds("sd3", seed=9)
    masks = torch.zeros(2, 30, 50)
    masks[0, :, :25] = 1.0
    masks[1, :, 25:] = 1.0
    out = sample(regional(sd3, region(other, masks)), pos, neg, h, w, batch=2)
    assert out.shape == (2, 16, h, w) and torch.isfinite(out).all()


def test_refusals_are_named(sd3):
    with pytest.raises(ValueError, match="region 1's prompt has 64 features but this SD3 takes 4096"):
        regional(sd3, region(make_conds("sd15")[0], torch.ones(1, 8, 8)))
    config = comfy.supported_models.SD3({**_sd3_config(), "context_processor_layers": 1})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    randomise_(model.diffusion_model, 0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    with pytest.raises(ValueError, match="Regional Prompting \\(Preprint\\): this MMDiT runs a context processor"):
        regional(patcher, region(make_conds("sd3")[0], torch.ones(1, 8, 8)))
