"""Adaptive Guidance on the exact conditional Gaussian mixture: uncond calls match the counted convergence step."""

from __future__ import annotations

import pytest
import torch

from preprint.guidance.adaptive_guidance import (
    DEFAULT_THRESHOLD,
    AdaptiveGuidanceDenoiser,
    AdaptiveGuidanceState,
    cosine_per_row,
    prediction_direction,
)
from preprint.samplers.dpm_solver_pp import sample_dpmpp_multistep

from .conftest import get_problem

STEPS = 14


class CosineProbe:
    """Plain CFG that records the cosine of the two predictions per image at every evaluation, measured
    independently of the code under test: ``"noise"`` compares eps (EPS) or the velocity (flow) as the model
    would output them, ``"velocity"`` compares eps - x0 on both, ``"denoised"`` compares x0."""

    def __init__(self, base, scale, kind, criterion="noise"):
        self.base, self.scale, self.kind, self.criterion, self.cos = base, scale, kind, criterion, []

    def _vector(self, x, d, sig):
        a = 1.0 if self.kind == "eps" else 1.0 - sig
        eps = (x - a * d) / sig
        if self.criterion == "denoised":
            return d
        if self.criterion == "velocity" or self.kind == "flow":
            return eps - d
        return eps

    def __call__(self, x, sigma, **_):
        dc, du = self.base.cond(x, sigma), self.base.uncond(x, sigma)
        sig = sigma.reshape(-1, 1, 1, 1) if isinstance(sigma, torch.Tensor) else sigma
        ec, eu = self._vector(x, dc, sig), self._vector(x, du, sig)
        self.cos.append(torch.nn.functional.cosine_similarity(ec.flatten(1), eu.flatten(1), dim=1))
        return du + (dc - du) * self.scale


def sample(problem, den):
    return sample_dpmpp_multistep(den, problem.x_start.clone(), problem.sigmas(STEPS), disable=True,
                                  parameterisation=problem.kind)


@pytest.mark.parametrize("criterion", ["velocity", "noise", "denoised"])
@pytest.mark.parametrize("kind,scale", [("eps", 7.5), ("flow", 3.5)])
def test_uncond_calls_match_counted_convergence(kind, scale, criterion):
    base = get_problem(kind, cfg=1.0).model
    problem = get_problem(kind, cfg=scale)
    probe = CosineProbe(base, scale, kind, criterion)
    ref = sample(problem, probe)
    cos = torch.stack(probe.cos)  # [steps, batch]
    assert cos.shape == (STEPS, problem.x_start.shape[0])
    # a threshold the run crosses part-way (the median of the not-yet-converged cosines), then count where
    # each image first reaches it
    thr = float(cos[cos < 1 - 1e-12].median())
    first = [int(torch.nonzero(cos[:, b] >= thr)[0]) for b in range(cos.shape[1])]
    expected_uncond = max(first) + 1  # the detecting evaluation still has its uncond pass

    den = AdaptiveGuidanceDenoiser(base.cond, base.uncond, scale, thr, kind, criterion)
    out = sample(problem, den)
    assert den.cond_calls == STEPS
    assert 1 < den.uncond_calls == expected_uncond < STEPS
    assert den.state.uncond_skipped == STEPS - expected_uncond
    assert den.state.uncond_evaluations == expected_uncond
    # identical to CFG up to the first detection (same trajectory, same measured cosines)
    first_detection = min(first)
    seen = torch.tensor(den.state.history[:first_detection + 1], dtype=torch.float64)
    torch.testing.assert_close(seen, cos[:first_detection + 1].double(), rtol=0, atol=1e-12)
    # after convergence the output departs from plain CFG, but only slightly (guidance had converged)
    assert not torch.equal(out, ref)
    assert float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())


@pytest.mark.parametrize("kind,scale", [("eps", 5.0), ("eps", 7.5), ("flow", 3.5)])
def test_default_keeps_guiding_until_the_predictions_agree(kind, scale):
    """At the node's defaults the run keeps its negative pass while the picture is still being decided, and
    lands within 5% of plain CFG's error; the paper's noise cosine on an EPS model agrees from the first
    step (x is almost pure noise), so at the same threshold it stops at once and lands far off."""
    base = get_problem(kind, cfg=1.0).model
    problem = get_problem(kind, cfg=scale)
    sigmas = problem.sigmas(20)
    plain = problem.error(sample_dpmpp_multistep(problem.model, problem.x_start.clone(), sigmas, disable=True,
                                                 parameterisation=kind), sigmas)
    den = AdaptiveGuidanceDenoiser(base.cond, base.uncond, scale, DEFAULT_THRESHOLD, kind)
    err = problem.error(sample_dpmpp_multistep(den, problem.x_start.clone(), sigmas, disable=True,
                                               parameterisation=kind), sigmas)
    assert 3 <= den.uncond_calls < 20
    assert err <= 1.05 * plain
    if kind == "eps":
        noise = AdaptiveGuidanceDenoiser(base.cond, base.uncond, scale, DEFAULT_THRESHOLD, kind, "noise")
        err_noise = problem.error(sample_dpmpp_multistep(noise, problem.x_start.clone(), sigmas, disable=True,
                                                         parameterisation=kind), sigmas)
        assert noise.uncond_calls < den.uncond_calls and err_noise > 2 * plain


def test_threshold_one_is_plain_cfg_and_low_threshold_stops_at_once():
    base = get_problem("eps", cfg=1.0).model
    problem = get_problem("eps", cfg=7.5)
    never = AdaptiveGuidanceDenoiser(base.cond, base.uncond, 7.5, 1.0, "eps")
    out = sample(problem, never)
    assert never.uncond_calls == STEPS
    torch.testing.assert_close(out, sample(problem, problem.model), rtol=0, atol=1e-12)
    at_once = AdaptiveGuidanceDenoiser(base.cond, base.uncond, 7.5, -1.0, "eps")
    sample(problem, at_once)
    assert at_once.uncond_calls == 1


def test_each_image_converges_on_its_own():
    """An image's result does not depend on which other images share its batch."""
    base = get_problem("eps", cfg=1.0).model
    problem = get_problem("eps", cfg=7.5)
    probe = CosineProbe(base, 7.5, "eps")
    sample(problem, probe)
    cos = torch.stack(probe.cos)
    thr = float(cos[cos < 1 - 1e-12].median())
    den = AdaptiveGuidanceDenoiser(base.cond, base.uncond, 7.5, thr, "eps")
    batch = sample(problem, den)
    for b in range(problem.x_start.shape[0]):
        single = AdaptiveGuidanceDenoiser(base.cond, base.uncond, 7.5, thr, "eps")
        x = sample_dpmpp_multistep(single, problem.x_start[b:b + 1].clone(), problem.sigmas(STEPS), disable=True,
                                   parameterisation="eps")
        torch.testing.assert_close(x, batch[b:b + 1], rtol=0, atol=1e-10)


def test_state_validation_and_masking():
    with pytest.raises(ValueError, match="cosine similarity"):
        AdaptiveGuidanceState(1.5)
    with pytest.raises(ValueError, match="unknown criterion"):
        AdaptiveGuidanceState(0.9, "epsilon")
    s = AdaptiveGuidanceState(0.5)
    c = torch.ones(2, 3)
    u = torch.zeros(2, 3)
    out = s.mask_converged(c, u, torch.tensor([True, False]))
    assert torch.equal(out[0], c[0]) and torch.equal(out[1], u[1])
    assert cosine_per_row(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])).item() == pytest.approx(1.0)
    x = torch.ones(1, 2)
    assert torch.equal(prediction_direction(x, torch.zeros(1, 2)), x)
