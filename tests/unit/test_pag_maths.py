"""PAG arithmetic: schedule defaults and validation, the adaptive scale, the perturbation term and rescale."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from preprint.guidance.pag import (
    GuidanceSchedule,
    adaptive_pag_scale,
    guided_prediction,
    rescale_to_reference,
)


def test_default_scale_is_three():
    # PAG paper / node default s = 3, constant inside the (unlimited) default window
    assert GuidanceSchedule().scale_at(5.0, 500.0) == 3.0


def test_schedule_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GuidanceSchedule().adaptive_scale = -1.0


def test_negative_adaptive_scale_rejected():
    with pytest.raises(ValueError):
        GuidanceSchedule(adaptive_scale=-0.5)


def test_adaptive_scale_one():
    # max(0, 3 - 1 * (1000 - 999)) = 2
    assert adaptive_pag_scale(3.0, 1.0, 999.0) == 2.0
    assert adaptive_pag_scale(3.0, 1.0, 500.0) == 0.0


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g)
    guided = torch.randn(2, 3, 4, generator=g)
    ref = x - 0.1 * torch.randn(2, 3, 4, generator=g)  # reference noise with std well below 1
    return x, guided, ref


def _expected(x, guided, ref, phi):
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        ng, nr = (x[b] - guided[b]), (x[b] - ref[b])
        ratio = nr.flatten().std() / ng.flatten().std()
        out[b] = x[b] - (phi * ng * ratio + (1 - phi) * ng)
    return out


@pytest.mark.parametrize("phi", [1.0, 0.7, 0.3])
def test_rescale_matches_lin_eq_15_16(phi):
    x, guided, ref = _batch()
    assert torch.allclose(rescale_to_reference(x, guided, ref, phi), _expected(x, guided, ref, phi), atol=1e-5)


def test_full_rescale_matches_reference_std_per_sample():
    x, guided, ref = _batch()
    out = rescale_to_reference(x, guided, ref, 1.0)
    for b in range(2):
        assert (x[b] - out[b]).std().item() == pytest.approx((x[b] - ref[b]).std().item(), rel=1e-5)


def test_small_guided_noise_is_still_rescaled():
    # std of x - guided below 1 must be matched too
    x = torch.zeros(1, 8)
    guided = -0.1 * torch.tensor([[1.0, -1.0, 2.0, -2.0, 1.0, -1.0, 2.0, -2.0]])
    ref = -0.2 * torch.tensor([[1.0, -1.0, 2.0, -2.0, 1.0, -1.0, 2.0, -2.0]])
    assert torch.allclose(rescale_to_reference(x, guided, ref, 1.0), ref, atol=1e-6)


def test_zero_spread_guided_noise_is_left_alone():
    # x - guided constant per sample: std 0, nothing to match -> ratio 1, output = guided
    x = torch.zeros(1, 4)
    guided = torch.full((1, 4), 0.5)
    ref = torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    assert torch.equal(rescale_to_reference(x, guided, ref, 1.0), guided)


def test_guided_prediction_default_has_no_rescale():
    x, d, c, p = (torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.5, 0.5]]),
                  torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.0, 0.0, 1.0]]))
    out = guided_prediction(x, d, c, p, 2.0)
    assert torch.allclose(out, torch.tensor([[2.5, 0.5, 2.5]]))  # d + 2 (c - p)


@pytest.mark.parametrize("scale", [1.0, -1.0])
def test_guided_prediction_unit_and_negative_scales_apply(scale):
    d = torch.zeros(1, 2)
    c = torch.tensor([[1.0, 3.0]])
    p = torch.tensor([[0.0, 1.0]])
    out = guided_prediction(torch.zeros(1, 2), d, c, p, scale)
    assert torch.allclose(out, scale * torch.tensor([[1.0, 2.0]]))


@pytest.mark.parametrize("timestep", [999.0, 500.0, 0.0])
def test_constant_scale_keeps_a_negative_scale(timestep):
    # a = 0: the scale as given at every step, also below 0 (guiding towards the perturbed prediction);
    # only the adaptive decay is floored at 0
    assert adaptive_pag_scale(-2.0, 0.0, timestep) == -2.0
    assert GuidanceSchedule(scale=-1.5).scale_at(5.0, timestep) == -1.5
