"""Differential Diffusion in sigma space through ComfyUI's inpainting path: the all-ones map is plain img2img,
a pixel of value m joins at the step where img2img of denoise m starts (on Karras too, unlike core's), held
pixels keep the original."""

from __future__ import annotations

import comfy.sample
import pytest
import torch

from .harness import make_conds, make_noise, run_node, tiny_model


@pytest.fixture(scope="module")
def sd15():
    return tiny_model("sd15")


def dd(m):
    return run_node("PreprintDifferentialDiffusion", model=m)[0]


def img2img(m, mask=None, steps=8, scheduler="karras", denoise=1.0, sampler="euler"):
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(1, 4, 12, 20, generator=g)
    pos, neg = make_conds("sd15")
    return comfy.sample.sample(m, make_noise(latent, 0), steps, 5.0, sampler, scheduler, pos, neg, latent,
                               denoise=denoise, noise_mask=mask, seed=0, disable_pbar=True), latent


def test_an_all_ones_change_map_is_bitwise_plain_img2img(sd15):
    plain, _ = img2img(sd15, denoise=0.7)
    ours, _ = img2img(dd(sd15), mask=torch.ones(1, 1, 96, 160), denoise=0.7)
    assert torch.equal(ours, plain)


def _join_steps(m, change: torch.Tensor, scheduler: str, steps: int = 10) -> list[int | None]:
    """For each pixel value in ``change`` (one per column block), the first step at which the model call sees
    it active, from what the denoise mask function returns."""
    seen = []
    fn = m.model_options["denoise_mask_function"]

    def spy(sigma, mask, extra_options):
        out = fn(sigma, mask, extra_options)
        seen.append(out[0, 0, 0].clone())
        return out

    m = m.clone()
    m.model_options["denoise_mask_function"] = spy
    row = torch.zeros(20)
    row[: 4 * len(change)] = change.repeat_interleave(4)
    mask = row.view(1, 1, 1, 20).expand(1, 1, 12, 20).clone()
    img2img(m, mask=torch.nn.functional.interpolate(mask, size=(96, 160)), steps=steps, scheduler=scheduler)
    cols = [4 * k + 1 for k in range(len(change))]  # inside each block, away from resampled edges
    return [next((i for i, row in enumerate(seen) if row[c] > 0.5), None) for c in cols]


@pytest.mark.parametrize("scheduler", ["karras", "normal", "exponential"])
def test_a_pixel_of_value_m_joins_where_img2img_of_denoise_m_starts(sd15, scheduler):
    change = torch.tensor([0.0, 0.3, 0.5, 0.8, 1.0])
    assert _join_steps(dd(sd15), change, scheduler) == [None, 7, 5, 2, 0]


@pytest.mark.parametrize("scheduler", ["karras", "exponential"])
def test_core_differential_diffusion_drifts_where_ours_does_not(sd15, scheduler):
    """The reason for this node: core thresholds in timestep space, so on Karras / exponential schedules its
    low-strength pixels join early (measured: m = 0.1 at step 7 / 6 of 10 instead of 9), ours where img2img of
    denoise m starts."""
    change = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.6])
    want = [9, 8, 7, 6, 4]
    assert _join_steps(dd(sd15), change, scheduler) == want
    core = run_node("DifferentialDiffusion", model=sd15)[0]
    assert _join_steps(core, change, scheduler)[0] <= 7


def test_held_pixels_keep_the_original_and_changed_pixels_change(sd15):
    mask = torch.zeros(1, 1, 96, 160)
    mask[..., :, 80:] = 1.0
    out, original = img2img(dd(sd15), mask=mask)
    # left half held (1e-5: the last Euler step's rounding)
    assert torch.allclose(out[..., :10], original[..., :10], rtol=0, atol=1e-5)
    assert (out[..., 10:] - original[..., 10:]).abs().mean() > 0.1


def test_a_second_node_replaces_the_first(sd15):
    twice = dd(dd(sd15))
    fn = twice.model_options["denoise_mask_function"]
    assert fn.previous is None
