"""Heavy-ball and GHVB momentum on the exact-score mixture."""

from __future__ import annotations

import pytest
import torch

from preprint.samplers.common import SigmaError
from preprint.samplers.dpm_solver_pp import sample_dpmpp_multistep
from preprint.samplers.momentum import ghvb_mix, sample_dpmpp_hb, sample_plms_momentum, split_fractional_order

from .conftest import get_problem, observed_order


def test_fractional_order_convention():
    assert split_fractional_order(3.7) == (4, pytest.approx(0.7))
    assert split_fractional_order(2.0) == (2, 1.0)
    assert split_fractional_order(1.5) == (2, pytest.approx(0.5))
    with pytest.raises(ValueError):
        split_fractional_order(0.0)


def test_ghvb_weights_reduce_to_adams_bashforth_and_are_consistent():
    e = [torch.tensor([float(v)]) for v in (1.0, 2.0, 3.0, 4.0)]  # newest last
    assert torch.allclose(ghvb_mix(2, e, 1.0), (3 * e[-1] - e[-2]) / 2)
    assert torch.allclose(ghvb_mix(3, e, 1.0), (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12)
    # consistency: for a constant history the combination returns that constant, for every beta
    const = [torch.tensor([2.5])] * 4
    for k in (1, 2, 3, 4):
        for b in (0.3, 0.7, 1.0):
            torch.testing.assert_close(ghvb_mix(k, const, b), torch.tensor([2.5]))


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("order", [2, 3])
def test_hb_beta_one_is_the_plain_solver_bit_for_bit(kind, order):
    problem = get_problem(kind, 7.5 if kind == "eps" else 3.5)
    sig = problem.sigmas(9)
    plain = sample_dpmpp_multistep(problem.model, problem.x_start.clone(), sig, disable=True, order=order,
                                   parameterisation=kind)
    hb = sample_dpmpp_hb(problem.model, problem.x_start.clone(), sig, disable=True, order=order, beta=1.0,
                         parameterisation=kind)
    assert torch.equal(plain, hb)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_hb_velocity_form_tends_to_the_plain_solver(kind):
    """The velocity arithmetic (used when beta < 1) is the plain rule in the limit beta -> 1."""
    problem = get_problem(kind)
    sig = problem.sigmas(9)
    plain = sample_dpmpp_multistep(problem.model, problem.x_start.clone(), sig, disable=True, order=3,
                                   parameterisation=kind)
    near = sample_dpmpp_hb(problem.model, problem.x_start.clone(), sig, disable=True, order=3, beta=1 - 1e-9,
                           parameterisation=kind)
    far = sample_dpmpp_hb(problem.model, problem.x_start.clone(), sig, disable=True, order=3, beta=0.5,
                          parameterisation=kind)
    torch.testing.assert_close(near, plain, rtol=1e-6, atol=1e-6)
    assert (far - plain).abs().max() > 1e-3


def _plms_reference(problem, sig, k):
    """Independent plain PLMS (AB-k on eps in x, EPS model) for the beta = 1 check."""
    x = problem.x_start.clone()
    hist = []
    weights = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    for i in range(len(sig) - 1):
        d = problem.model(x, sig[i])
        if sig[i + 1] == 0:
            return d
        hist = ([(x - d) / sig[i]] + hist)[:k]
        w = weights[len(hist)]
        x = x + (sig[i + 1] - sig[i]) * sum(wi * e for wi, e in zip(w, hist, strict=True))
    return x


@pytest.mark.parametrize("momentum", ["ghvb", "hb"])
@pytest.mark.parametrize("k", [2, 4])
def test_plms_integer_order_is_plain_plms(momentum, k):
    problem = get_problem("eps", 7.5)
    sig = problem.sigmas(8)
    ref = _plms_reference(problem, sig, k)
    out = sample_plms_momentum(problem.model, problem.x_start.clone(), sig, disable=True, order=float(k),
                               momentum=momentum)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_ghvb_keeps_its_order_below_beta_one():
    """GHVB with beta < 1 still converges at order > 1 (HB on PLMS drops to first order)."""
    problem = get_problem("eps", schedule="uniform")
    steps = [10, 20, 40]
    ghvb = [problem.error(sample_plms_momentum(problem.model, problem.x_start.clone(), problem.sigmas(n),
                                               disable=True, order=1.5), problem.sigmas(n)) for n in steps]
    hb = [problem.error(sample_plms_momentum(problem.model, problem.x_start.clone(), problem.sigmas(n),
                                             disable=True, order=1.5, momentum="hb"), problem.sigmas(n))
          for n in steps]
    assert observed_order(ghvb, steps)[-1] > 1.7, ghvb
    assert observed_order(hb, steps)[-1] < 1.3, hb


def test_ghvb_damps_the_divergence_of_high_order_plms_at_high_cfg():
    """The paper's claim on the mixture: at few steps and CFG 7.5, GHVB 2.8 beats plain PLMS 3 and 4."""
    problem = get_problem("eps", 7.5)
    sig = problem.sigmas(6)
    err = {o: problem.error(sample_plms_momentum(problem.model, problem.x_start.clone(), sig, disable=True,
                                                 order=o), sig) for o in (2.8, 3.0, 4.0)}
    assert err[2.8] < err[3.0] and err[2.8] < err[4.0], err


def test_callback_batch_determinism_and_bad_input():
    problem = get_problem("flow", 3.5)
    sig = problem.sigmas(6)
    for fn, kw in [(sample_plms_momentum, {"order": 3.7}), (sample_dpmpp_hb, {"order": 2, "beta": 0.7})]:
        seen = []
        x1 = fn(problem.model, problem.x_start.clone(), sig, disable=True, parameterisation="flow",
                callback=lambda d, seen=seen: seen.append(d["i"]), **kw)
        assert seen == list(range(6)) and torch.isfinite(x1).all()
        x2 = fn(problem.model, problem.x_start.clone(), sig, disable=True, parameterisation="flow", **kw)
        assert torch.equal(x1, x2)
        one = fn(problem.model, problem.x_start[3:].clone(), sig, disable=True, parameterisation="flow", **kw)
        torch.testing.assert_close(one, x1[3:])
        with pytest.raises(SigmaError, match="sigmas"):
            fn(problem.model, problem.x_start, torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), **kw)
    with pytest.raises(ValueError, match="beta"):
        sample_dpmpp_hb(problem.model, problem.x_start, sig, beta=0.0)
    with pytest.raises(ValueError, match="at most 4"):
        sample_plms_momentum(problem.model, problem.x_start, sig, order=4.5)
