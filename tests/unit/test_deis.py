"""DEIS tAB on the exact-score mixture: weights on the model's schedule, convergence, bad input."""

from __future__ import annotations

import pytest
import torch

from preprint.samplers.common import SigmaError
from preprint.samplers.deis import sample_deis, sd_discrete_timestep, tab_coefficients

from .conftest import get_problem, observed_order


def _run(problem, steps, **kw):
    sig = problem.sigmas(steps)
    x = sample_deis(problem.model, problem.x_start.clone(), sig, disable=True, parameterisation=problem.kind, **kw)
    return problem.error(x, sig)


@pytest.mark.parametrize("space", ["t", "lambda"])
@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("order,min_order", [(1, 0.95), (2, 1.8), (3, 2.2)])
def test_tab_convergence_order(kind, order, min_order, space):
    problem = get_problem(kind, schedule="uniform")
    steps = [10, 20, 40]
    errors = [_run(problem, n, order=order, poly_space=space) for n in steps]
    orders = observed_order(errors, steps)
    assert orders[-1] > min_order, (errors, orders)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_higher_order_is_more_accurate(kind):
    problem = get_problem(kind)
    e1, e2, e3 = (_run(problem, 20, order=o, poly_space="t") for o in (1, 2, 3))
    assert e3 < e2 < e1, (e1, e2, e3)


def test_weights_integrate_polynomials_exactly():
    """sum_j C_j p(tau_j) = int p(tau(g)) dg for any polynomial p of degree < order (here in rho = g)."""
    sig = [torch.tensor(s, dtype=torch.float64) for s in (5.0, 3.0, 2.0)]
    nxt = torch.tensor(1.2, dtype=torch.float64)
    c = tab_coefficients(sig, nxt, "eps", "rho", sd_discrete_timestep)
    for p, exact in [(lambda g: torch.ones_like(g), 1.2 - 2.0), (lambda g: g, (1.2**2 - 2.0**2) / 2),
                     (lambda g: g**2, (1.2**3 - 2.0**3) / 3)]:
        approx = sum(cj * float(p(s)) for cj, s in zip(c, sig, strict=True))
        assert abs(approx - exact) < 1e-10


def test_first_order_is_ddim_exactly_for_any_time_map():
    problem = get_problem("eps", 7.5)
    sig = problem.sigmas(6)
    a = sample_deis(problem.model, problem.x_start.clone(), sig, disable=True, order=1, poly_space="t")
    b = sample_deis(problem.model, problem.x_start.clone(), sig, disable=True, order=1, poly_space="t",
                    time_fn=lambda s: s**0.5)
    assert torch.equal(a, b)


def test_model_time_changes_the_weights():
    """The weights follow the time map the host supplies (what makes them right for each model)."""
    problem = get_problem("eps")
    sig = problem.sigmas(8)
    a = sample_deis(problem.model, problem.x_start.clone(), sig, disable=True, order=3, poly_space="t")
    b = sample_deis(problem.model, problem.x_start.clone(), sig, disable=True, order=3, poly_space="t",
                    time_fn=lambda s: s.log())
    assert not torch.equal(a, b)
    # t = log sigma is lambda up to sign: the same Lagrange basis
    c = sample_deis(problem.model, problem.x_start.clone(), sig, disable=True, order=3, poly_space="lambda")
    torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-9)


def test_callback_batch_determinism_flow_from_sigma_one():
    problem = get_problem("flow", 3.5)
    sig = problem.sigmas(7)
    seen = []
    x1 = sample_deis(problem.model, problem.x_start.clone(), sig, disable=True, parameterisation="flow",
                     callback=lambda d: seen.append(d["i"]))
    assert seen == list(range(7))
    assert torch.isfinite(x1).all()
    x2 = sample_deis(problem.model, problem.x_start.clone(), sig, disable=True, parameterisation="flow")
    assert torch.equal(x1, x2)
    one = sample_deis(problem.model, problem.x_start[:1].clone(), sig, disable=True, parameterisation="flow")
    torch.testing.assert_close(one, x1[:1])


def test_bad_input():
    problem = get_problem("eps")
    x = problem.x_start.clone()
    for bad in ([14.6, 20.0, 0.0], [14.6, -1.0], [float("nan"), 0.0]):
        with pytest.raises(SigmaError, match="sigmas"):
            sample_deis(problem.model, x, torch.tensor(bad, dtype=torch.float64), disable=True)
    assert torch.equal(sample_deis(problem.model, x, torch.tensor([14.6], dtype=torch.float64), disable=True), x)
    out = sample_deis(problem.model, x, torch.tensor([14.6, 0.0], dtype=torch.float64), disable=True)
    torch.testing.assert_close(out, problem.model(x, torch.tensor(14.6, dtype=torch.float64)))
    with pytest.raises(ValueError, match="order"):
        sample_deis(problem.model, x, problem.sigmas(4), disable=True, order=4)
    with pytest.raises(ValueError, match="poly_space"):
        sample_deis(problem.model, x, problem.sigmas(4), disable=True, poly_space="x")


@pytest.mark.parametrize("space", ["t", "lambda", "rho"])
@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_quadrature_stays_on_the_sigmas_device(kind, space):
    """ComfyUI hands samplers sigmas on the model's device; the order-2/3 weights must be built there. The meta
    device stands in for a GPU: any CPU tensor mixed into the quadrature raises a device mismatch."""
    values = (5.0, 3.0, 2.0, 1.2) if kind == "eps" else (0.9, 0.7, 0.6, 0.4)
    time_fn = sd_discrete_timestep if kind == "eps" else (lambda s: s)
    for device in ("meta", "cpu"):
        hist = [torch.tensor(v, dtype=torch.float64, device=device) for v in values[:3]]
        nxt = torch.tensor(values[3], dtype=torch.float64, device=device)
        c = tab_coefficients(hist, nxt, kind, space, time_fn)
        assert c.device.type == device and c.shape == (3,)
    assert torch.isfinite(c).all()
