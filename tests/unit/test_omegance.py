"""Omegance wrapper on the exact-score mixture."""

from __future__ import annotations

import math

import pytest
import torch

from preprint.samplers.dpm_solver_pp import sample_dpmpp_2m
from preprint.samplers.omegance import (
    OmeganceConfig,
    apply_scale,
    omega_to_scale,
    omegance_denoise,
    omegance_sampler,
    resize_mask,
    run_progress,
)

from .conftest import get_problem


def euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]), **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "denoised": denoised})
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - denoised) / sigmas[i]
    return x


def wrapped(fn, kind, **cfg):
    return omegance_sampler(fn, lambda _m: kind, OmeganceConfig(**cfg))


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("base", [euler, sample_dpmpp_2m])
def test_omega_zero_is_bit_identical(kind, base):
    p = get_problem(kind, 7.5 if kind == "eps" else 3.5)
    sig = p.sigmas(8)
    plain = base(p.model, p.x_start.clone(), sig, disable=True)
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1.0
    for cfg in ({"omega": 0.0}, {"omega": 0.0, "mask": mask, "mask_omega": 0.0},
                {"omega": 0.0, "schedule": "cosine", "omega_end": 0.0}):
        out = wrapped(base, kind, **cfg)(p.model, p.x_start.clone(), sig, disable=True)
        assert torch.equal(out, plain), cfg


def test_scale_map_matches_official_logistic():
    assert omega_to_scale(0.0, "eps") == 1.0 and omega_to_scale(0.0, "flow") == 1.0
    assert omega_to_scale(1e4, "eps") == pytest.approx(1.05) and omega_to_scale(-1e4, "flow") == pytest.approx(0.9)
    assert omega_to_scale(10.0, "eps") == pytest.approx(0.95 + 0.1 / (1 + math.exp(-1.0)))


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_positive_omega_removes_more_noise(kind):
    """Larger omega takes out more predicted noise per step: final samples sit closer to the mixture's modes."""
    p = get_problem(kind)
    sig = p.sigmas(20)
    mu = p.model.mixture.means.flatten(1)
    dist = []
    for omega in (-20.0, -10.0, 0.0, 10.0, 20.0):
        x = wrapped(euler, kind, omega=omega)(p.model, p.x_start.clone(), sig)
        d = ((x.flatten(1)[:, None] - mu[None]) ** 2).sum(-1).min(1).values.sqrt().mean()
        dist.append(float(d))
    assert all(a > b for a, b in zip(dist, dist[1:], strict=False)), dist


def test_flow_scaling_keeps_the_residual_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) + 0.3
    d = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    out = apply_scale(x, d, 1.1, "flow")
    r, r2 = x - d, x - out
    assert torch.allclose(r2.mean(dim=(1, 2, 3)), r.mean(dim=(1, 2, 3)))
    assert torch.allclose(r2 - r2.mean(dim=(1, 2, 3), keepdim=True), 1.1 * (r - r.mean(dim=(1, 2, 3), keepdim=True)))
    assert torch.allclose(x - apply_scale(x, d, 1.1, "eps"), 1.1 * r)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_mask_is_resized_and_confines_the_change(kind):
    """Inside the mask the step is exactly the unmasked step at mask_omega, outside exactly the unmasked step at
    omega (the scale map holds exactly w_in or w there, so bit for bit, flow's per-sample mean included); with
    mask_omega 0 the inside is the plain prediction (to float64 rounding, 4e-15 measured). Inside, omega 15 against
    -15 moves the prediction by 0.064 (EPS) and 0.13 (flow) of the largest residual x - D (measured)."""
    p = get_problem(kind)
    x = p.x_start.clone()
    sig = p.sigmas(10)
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1.0  # left half of an 8x8 latent after an 8x resize
    m = resize_mask(mask, x)
    assert m.shape == (1, 1, 8, 8) and set(m.unique().tolist()) == {0.0, 1.0}
    inside, outside = m.expand_as(x) > 0.5, m.expand_as(x) < 0.5

    def step(omega, **kw):
        return omegance_denoise(p.model, x, sig[2], sig, kind, OmeganceConfig(omega=omega, **kw))

    plain, at_15, at_minus_15 = step(0.0), step(15.0), step(-15.0)
    both = step(15.0, mask=mask, mask_omega=-15.0)
    assert torch.equal(both[outside], at_15[outside])
    assert torch.equal(both[inside], at_minus_15[inside])
    assert (at_15[inside] - at_minus_15[inside]).abs().max() > 0.02 * (x - plain)[inside].abs().max()
    unscaled_inside = step(15.0, mask=mask, mask_omega=0.0)
    torch.testing.assert_close(unscaled_inside[inside], plain[inside], rtol=0, atol=1e-12)
    assert torch.equal(unscaled_inside[outside], at_15[outside])


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_a_batch_of_masks_gives_each_sample_its_own(kind):
    """One mask per sample ([B, H, W]): each sample of the batch run equals that sample run alone with its own
    mask (float64; measured bitwise equal, 1e-12 allowed for summation order); the first sample's mask on the
    second sample moves it by 0.20 (EPS) and 0.23 (flow), samples of magnitude 3.5."""
    p = get_problem(kind, 3.5 if kind == "flow" else 7.5)
    sig = p.sigmas(6)
    x = p.x_start[:3].clone()
    masks = torch.zeros(3, 16, 16)
    masks[0, :, :8] = 1.0
    masks[1, 8:, :] = 1.0
    masks[2, 4:12, 4:12] = 1.0

    def run(xs, mk):
        return wrapped(euler, kind, omega=15.0, mask=mk, mask_omega=-15.0)(p.model, xs.clone(), sig)

    together = run(x, masks)
    for i in range(3):
        torch.testing.assert_close(together[i:i + 1], run(x[i:i + 1], masks[i:i + 1]), rtol=0, atol=1e-12)
    assert (run(x[1:2], masks[:1]) - together[1:2]).abs().max() > 1e-3


def test_schedule_progress_and_values():
    sig = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert run_progress(10.0, sig) == 0.0 and run_progress(1.0, sig) == 1.0
    assert run_progress(5.0, sig) == pytest.approx(1 / 3)
    assert 1 / 3 < run_progress(3.0, sig) < 2 / 3  # a Heun stage between listed sigmas
    lin = OmeganceConfig(omega=4.0, schedule="linear", omega_end=-4.0)
    cos = OmeganceConfig(omega=4.0, schedule="cosine", omega_end=-4.0)
    assert lin.omega_at(0.0) == 4.0 and lin.omega_at(1.0) == -4.0 and lin.omega_at(0.25) == pytest.approx(2.0)
    assert cos.omega_at(0.5) == pytest.approx(0.0) and cos.omega_at(0.1) > lin.omega_at(0.1)
    with pytest.raises(ValueError, match="schedule"):
        OmeganceConfig(schedule="sawtooth")


def test_callback_batch_and_determinism():
    p = get_problem("flow", 3.5)
    sig = p.sigmas(6)
    seen = []
    f = wrapped(euler, "flow", omega=8.0, schedule="linear", omega_end=-8.0)
    a = f(p.model, p.x_start.clone(), sig, callback=lambda d: seen.append(d["i"]))
    b = f(p.model, p.x_start.clone(), sig)
    assert seen == list(range(6)) and torch.equal(a, b)
    single = f(p.model, p.x_start[2:3].clone(), sig)
    assert torch.allclose(single, a[2:3], atol=1e-10)
