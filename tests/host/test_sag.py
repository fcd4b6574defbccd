"""Host tier: Self-Attention Guidance (Preprint) on tiny UNets in real ComfyUI."""

from __future__ import annotations

import sys

import pytest
import torch

from .harness import run_node, run_sampling, tiny_model
from .test_pag import count_calls, pag

STEPS = 2


def sag(model, scale=0.8, blur_sigma=2.0, threshold=1.0, layer="", sigma_start=-1.0, sigma_end=-1.0):
    return run_node("PreprintSelfAttentionGuidance", model=model, scale=scale, blur_sigma=blur_sigma,
                    threshold=threshold, layer=layer, sigma_start=sigma_start, sigma_end=sigma_end)[0]


def sample(model, family="sd15", cfg=5.0, **kw):
    kw.setdefault("height", 16)
    kw.setdefault("width", 16)
    return run_sampling(model, family, steps=STEPS, cfg=cfg, **kw)


@pytest.fixture(scope="module")
def sd15():
    return tiny_model("sd15", seed=0)


@pytest.fixture(scope="module")
def unets(sd15):
    return {"sd15": sd15, "sdxl": tiny_model("sdxl", seed=0)}


@pytest.fixture
def masks(sag_masks):
    return sag_masks


def test_scale_zero_is_the_unpatched_model(sd15):
    with count_calls(sag(sd15, scale=0.0)) as c:
        out = sample(c.model)
    assert torch.equal(out, sample(sd15))
    assert c.rows == [2] * STEPS


def test_sag_guides_with_one_extra_call(sd15):
    with count_calls(sag(sd15)) as c:
        out = sample(c.model)
    assert c.rows == [2, 1] * STEPS  # cond + uncond together, then the blurred uncond
    assert (out - sample(sd15)).abs().max() > 1e-3


def test_split_batches_give_the_same_result(sd15, monkeypatch):
    patched = sag(sd15, threshold=0.9)
    together = sample(patched)
    real = patched.model.memory_required

    def memory_required(*a, **k):  # memory "short" only where calc_cond_batch sizes its batches
        return float("inf") if sys._getframe(1).f_code.co_name == "_calc_cond_batch" else real(*a, **k)
    monkeypatch.setattr(patched.model, "memory_required", memory_required)
    with count_calls(patched) as c:
        split = sample(c.model)
    assert c.rows == [1, 1, 1] * STEPS
    torch.testing.assert_close(split, together, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("h", "w", "batch"), [(13, 11, 1), (17, 16, 2)])
def test_any_size_and_batch(sd15, h, w, batch):
    out = sample(sag(sd15, threshold=0.9), height=h, width=w, batch=batch)
    base = sample(sd15, height=h, width=w, batch=batch)
    assert out.shape == (batch, 4, h, w) and torch.isfinite(out).all()
    assert (out - base).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_cfg_one_uses_the_positive_prediction(sd15):
    with count_calls(sag(sd15)) as c:
        out = sample(c.model, cfg=1.0)
    assert c.rows == [1, 1] * STEPS and c.chunks[:2] == [[0], [0]]
    assert (out - sample(sd15, cfg=1.0)).abs().max() > 1e-4


def test_stacks_with_pag(sd15):
    both = sag(pag(sd15))
    with count_calls(both) as c:
        out = sample(c.model)
    assert c.rows == [3, 1] * STEPS  # PAG rides in the CFG call; SAG adds its own pass
    for single in (sag(sd15), pag(sd15)):
        assert (out - sample(single)).abs().max() > 1e-4


def test_sdxl_runs():
    m = tiny_model("sdxl", seed=0)
    out = sample(sag(m), "sdxl")
    assert (out - sample(m, "sdxl")).abs().max() > 1e-4


def test_clear_errors(sd15):
    with pytest.raises(ValueError, match="needs a UNet"):
        sag(tiny_model("flux", seed=0))
    with pytest.raises(ValueError, match="exactly one"):
        sag(tiny_model("sdxl", seed=0), layer="middle:0")
    with pytest.raises(ValueError, match="middle:0"):
        sag(sd15, layer="input:3.0")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_empty_mask_is_the_unguided_result(unets, family, masks):
    """Threshold 10 (the widget's maximum) is more attention than any key of the 2x2 (SD1.5) or 4x4 (SDXL)
    middle-block grid can receive, so the mask is empty: nothing is blurred, the degraded pass sees x itself and
    the SAG term is D_u - D_u'. Not bitwise: the degraded pass runs the uncond alone, the CFG call runs it batched
    with the cond. Measured: that floor is 1.5e-5 (SD1.5, latent magnitude 329) and 3e-5 (SDXL, 461), 1e-7 of the
    magnitude; the smallest real effect, a one-token mask (SDXL at threshold 1.5), moves the result by 1.04, and
    blur sigma 0.5 over the full mask by 0.64. The tolerance is 1e-6 of the magnitude."""
    m = unets[family]
    base = sample(m, family)
    with count_calls(sag(m, threshold=10.0)) as c:
        out = sample(c.model, family)
    assert c.rows == [2, 1] * STEPS  # the degraded pass did run, on an unblurred input
    assert len(masks) == STEPS and all(not mk.any() for mk in masks)
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6 * float(base.abs().max()))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_full_mask_differs_from_the_attention_mask(unets, family, masks):
    """Threshold 0 marks every token (all attention is positive), threshold 1 the tokens that receive more than
    an average key. The recorded masks confirm both, and the results differ: the region the attention map picks
    decides what is blurred. Both runs are deterministic with the same calls, so the noise floor is 0; the
    measured differences are 1.3 (SD1.5, latent magnitude 329) and 2.0 (SDXL, 461)."""
    m = unets[family]
    full = sample(sag(m, threshold=0.0), family)
    assert len(masks) == STEPS and all(mk.all() for mk in masks)
    masks.clear()
    derived = sample(sag(m, threshold=1.0), family)
    assert len(masks) == STEPS
    assert all(mk.any() and not mk.all() for mk in masks)  # a partial region at every step
    assert (full - derived).abs().max() > 1e-2
