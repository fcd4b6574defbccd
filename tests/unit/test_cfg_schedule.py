"""Scheduled CFG and guidance intervals on the exact conditional Gaussian mixture."""

from __future__ import annotations

import math

import pytest
import torch

from preprint.guidance.cfg_schedule import (
    ScaleSchedule,
    ScheduledCFGDenoiser,
    ScheduledGuidance,
    ScheduleError,
    noise_level,
    parse_scale_list,
    retarget,
    schedule_shape,
    step_index,
)
from preprint.samplers.dpm_solver_pp import sample_dpmpp_multistep
from preprint.utils.sigma_window import SigmaWindow

from .conftest import get_problem


def t_of(kind: str):
    if kind == "flow":
        return lambda s: s
    lo, hi = math.log(0.03), math.log(14.6)
    return lambda s: min(max((math.log(s) - lo) / (hi - lo), 0.0), 1.0)


def run(problem, denoiser, steps: int) -> torch.Tensor:
    sigmas = problem.sigmas(steps)
    return sample_dpmpp_multistep(denoiser, problem.x_start.clone(), sigmas, disable=True,
                                  parameterisation=problem.kind)


@pytest.mark.parametrize("kind,scale", [("eps", 7.5), ("flow", 3.5)])
def test_constant_schedule_equals_plain_cfg_exactly(kind, scale):
    plain = get_problem(kind, cfg=scale)
    base = get_problem(kind, cfg=1.0)  # same mixture, unguided: gives separate cond / uncond denoisers
    steps = 12
    sigmas = plain.sigmas(steps)
    ref = run(plain, plain.model, steps)
    for schedule in (ScaleSchedule("constant"), ScaleSchedule("constant", cfg_start=scale),
                     ScaleSchedule("linear", cfg_start=scale, cfg_end=scale),
                     ScaleSchedule("custom", custom=(scale,) * steps)):
        den = ScheduledCFGDenoiser(base.model.cond, base.model.uncond, ScheduledGuidance(schedule), scale, sigmas,
                                   t_of(kind))
        out = run(plain, den, steps)
        assert torch.equal(out, ref), schedule
        assert den.uncond_calls == den.cond_calls == steps


def test_interval_skips_uncond_and_matches_cond_only_outside():
    plain = get_problem("eps", cfg=7.5)
    base = get_problem("eps", cfg=1.0)
    steps = 10
    sigmas = plain.sigmas(steps)
    interval = SigmaWindow(sigma_start=5.0, sigma_end=0.3)
    inside = [interval.contains(float(s)) for s in sigmas[:-1]]
    den = ScheduledCFGDenoiser(base.model.cond, base.model.uncond, ScheduledGuidance(interval=interval), 7.5, sigmas,
                               t_of("eps"))
    run(plain, den, steps)
    assert den.cond_calls == steps
    assert den.uncond_calls == sum(inside) and 0 < sum(inside) < steps

    # A scale of 1 everywhere is the conditional model alone, with no uncond evaluation.
    den1 = ScheduledCFGDenoiser(base.model.cond, base.model.uncond,
                                ScheduledGuidance(ScaleSchedule("constant", cfg_start=1.0)), 7.5, sigmas, t_of("eps"))
    out = run(plain, den1, steps)
    cond_only = run(plain, base.model.cond, steps)
    assert den1.uncond_calls == 0 and torch.equal(out, cond_only)


def test_interval_error_is_between_cond_only_and_cfg():
    """Guidance on a middle interval lands between unguided and fully guided solutions (continuity check)."""
    plain = get_problem("eps", cfg=5.0)
    base = get_problem("eps", cfg=1.0)
    steps = 16
    sigmas = plain.sigmas(steps)
    ref = plain.reference(sigmas)
    den = ScheduledCFGDenoiser(base.model.cond, base.model.uncond,
                               ScheduledGuidance(interval=SigmaWindow(3.0, 0.2)), 5.0, sigmas, t_of("eps"))
    err_interval = float((run(plain, den, steps) - ref).pow(2).mean().sqrt())
    err_cond = float((run(plain, base.model.cond, steps) - ref).pow(2).mean().sqrt())
    err_cfg = float((run(plain, plain.model, steps) - ref).pow(2).mean().sqrt())
    assert err_cfg < err_interval < err_cond


def test_shapes_hit_their_endpoints():
    for kind in ("linear", "cosine", "power"):
        assert schedule_shape(kind, 1.0, 3.0) == pytest.approx(1.0)
        assert schedule_shape(kind, 0.0, 3.0) == pytest.approx(0.0)
    s = ScaleSchedule("cosine", cfg_start=9.0, cfg_end=3.0)
    assert s.scale_at(1.0, 0, 5.0) == pytest.approx(9.0)
    assert s.scale_at(0.0, 0, 5.0) == pytest.approx(3.0)
    assert s.scale_at(0.5, 0, 5.0) == pytest.approx(6.0)
    assert ScaleSchedule("power", 8.0, 2.0, exponent=2.0).scale_at(0.5, 0, 1.0) == pytest.approx(2.0 + 6.0 * 0.25)
    # negative endpoints take the sampler's CFG
    assert ScaleSchedule("linear", -1.0, 1.0).scale_at(1.0, 0, 6.5) == pytest.approx(6.5)


def test_retarget_moves_to_target_scale_and_is_identity_at_same_scale():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    d = u + (c - u) * 5.0
    assert retarget(d, c, u, 5.0, 5.0) is d
    torch.testing.assert_close(retarget(d, c, u, 5.0, 2.0), u + (c - u) * 2.0)
    w = torch.tensor([1.0, 3.0])
    out = retarget(d, c, u, 5.0, w)
    torch.testing.assert_close(out[1], (u + (c - u) * 3.0)[1])
    torch.testing.assert_close(out[0], c[0])


def test_noise_level_inverts_percent_to_sigma():
    def p2s(p):  # a flow-like shifted schedule
        t = 1.0 - p
        return 3.0 * t / (1 + 2.0 * t)

    for t in (0.05, 0.3, 0.77, 0.99):
        assert noise_level(p2s(1.0 - t), p2s) == pytest.approx(t, abs=1e-9)
    assert noise_level(10.0, p2s) == 1.0 and noise_level(0.0, p2s) == 0.0


def test_step_index():
    sig = [10.0, 5.0, 2.0, 1.0, 0.0]
    assert [step_index(s, sig) for s in (10.0, 7.0, 5.0, 4.9999999, 1.0, 0.5)] == [0, 0, 1, 1, 3, 3]


def test_bad_input_gives_clear_errors():
    with pytest.raises(ScheduleError, match="start after it ends"):
        SigmaWindow(sigma_start=1.0, sigma_end=2.0)
    with pytest.raises(ScheduleError, match="has 3 values but this run has 5 steps"):
        ScaleSchedule("custom", custom=(1.0, 2.0, 3.0)).check_steps(5)
    with pytest.raises(ScheduleError, match="list is empty"):
        ScaleSchedule("custom")
    with pytest.raises(ScheduleError, match="not a number"):
        parse_scale_list("7, seven")
    with pytest.raises(ScheduleError, match="unknown CFG schedule"):
        ScaleSchedule("exponential")
    with pytest.raises(ScheduleError, match="exponent"):
        ScaleSchedule("power", exponent=0.0)
    assert parse_scale_list("7, 6.5\n5 4;3") == (7.0, 6.5, 5.0, 4.0, 3.0)
    base = get_problem("eps", cfg=1.0)
    with pytest.raises(ScheduleError, match="one per step"):
        ScheduledCFGDenoiser(base.model.cond, base.model.uncond,
                             ScheduledGuidance(ScaleSchedule("custom", custom=(1.0, 2.0))), 5.0, [3.0, 2.0, 1.0, 0.0],
                             t_of("eps"))
