"""DC-Solver (UniPC-bh2 + dynamic compensation) on the exact-score mixture."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from preprint.samplers.dc_solver import compensation_weights, dc_unipc, sample_dc_solver, search_ratios
from preprint.utils.gaussian_mixture import MixtureDenoiser, make_mixture

from .conftest import EVENT_SHAPE, flow_sigmas, karras_sigmas


def _core_uni_pc():
    """ComfyUI's own uni_pc module, loaded by path (it imports only torch and tqdm); None without a checkout."""
    root = Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI"))
    path = root / "comfy" / "extra_samplers" / "uni_pc.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("core_uni_pc_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(kind: str, cfg: float = 3.0) -> MixtureDenoiser:
    mixture = make_mixture(EVENT_SHAPE, components=6, seed=3)
    cond_w = torch.tensor([4.0, 2.0, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)
    return MixtureDenoiser(mixture, kind=kind, cond_weights=cond_w, cfg=cfg)


def _noise(kind: str, n: int, seed: int, sigma_max: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn((n, *EVENT_SHAPE), generator=g, dtype=torch.float64)
    return eps if kind == "flow" else sigma_max * eps


def _sigmas(kind: str, steps: int) -> torch.Tensor:
    return karras_sigmas(steps) if kind == "eps" else flow_sigmas(steps)


def test_compensation_weights_are_exact_at_rho_one_and_interpolate_quadratics():
    lams = [torch.tensor(v, dtype=torch.float64) for v in (-2.3, -1.1, 0.4)]
    w = compensation_weights(lams, torch.tensor(1.0, dtype=torch.float64))
    assert [float(v) for v in w] == [1.0, 0.0, 0.0]
    # a quadratic in lambda is reproduced at any rho (three-point Lagrange is exact up to degree 2)
    f = [1.0 + 2.0 * v - 0.7 * v * v for v in (float(lam) for lam in lams)]
    for rho in (0.6, 0.95, 1.3):
        tau = rho * (float(lams[2]) - float(lams[1])) + float(lams[1])
        w = compensation_weights(lams, torch.tensor(rho, dtype=torch.float64))
        got = float(w[0]) * f[2] + float(w[1]) * f[1] + float(w[2]) * f[0]
        assert got == pytest.approx(1.0 + 2.0 * tau - 0.7 * tau * tau, abs=1e-12)


@pytest.mark.parametrize("steps", [5, 8])
@pytest.mark.parametrize("order", [2, 3])
def test_all_ones_ratios_match_comfyui_uni_pc_bh2(steps, order):
    """rho = 1 everywhere is plain UniPC-bh2, and both equal ComfyUI's core implementation (float64 inputs)."""
    core = _core_uni_pc()
    if core is None:
        pytest.skip("no ComfyUI checkout found (COMFYUI_PATH or ~/ComfyUI): core uni_pc not available")
    model = _model("eps")
    sig = _sigmas("eps", steps)
    x = _noise("eps", 3, 11, float(sig[0]))
    plain = sample_dc_solver(model, x.clone(), sig, disable=True, order=order)
    ones = sample_dc_solver(model, x.clone(), sig, disable=True, order=order,
                            ratios=torch.ones(steps, dtype=torch.float64))
    assert torch.equal(plain, ones)
    # core builds its constant weights with torch.tensor(...): in float64 only under that default dtype
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref = _core_run(core, model, x, sig, order)
    finally:
        torch.set_default_dtype(before)
    torch.testing.assert_close(plain, ref, rtol=1e-9, atol=1e-9)


def _core_run(core, model, x, sig, order):
    if order == 3:  # the sampler ComfyUI registers: order min(3, steps - 1)
        return core.sample_unipc_bh2(model, x.clone(), sig.clone(), extra_args={}, disable=True)
    # order 2: the same wrapper around the core class, which the registered sampler never runs at order 2
    ts = sig.clone()
    ts[-1] = 0.001
    ns = core.SigmaConvert()
    fn = core.model_wrapper(lambda inp, s, **kw: core.predict_eps_sigma(model, inp, s, **kw), ns,
                            model_type="noise", guidance_type="uncond", model_kwargs={})
    solver = core.UniPC(fn, ns, predict_x0=True, thresholding=False, variant="bh2")
    return solver.sample(x / torch.sqrt(1.0 + ts[0] ** 2), timesteps=ts, method="multistep", order=order,
                         lower_order_final=True, disable_pbar=True) / ns.marginal_alpha(ts[-1])


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_uses_one_model_call_per_step_and_converges(kind):
    model = _model(kind)
    x = _noise(kind, 2, 5, float(_sigmas(kind, 4)[0]))
    model.calls = 0
    dc_unipc(lambda xx, s: model(xx, s), x, _sigmas(kind, 6), parameterisation=kind)
    per_call = 2  # cfg != 1: each evaluation runs cond and uncond
    assert model.calls == 6 * per_call
    errs = []
    fine = dc_unipc(model, x, _sigmas(kind, 200), parameterisation=kind)
    for n in (6, 12, 24):
        errs.append(float(((dc_unipc(model, x, _sigmas(kind, n), parameterisation=kind) - fine) ** 2).mean().sqrt()))
    assert errs[0] > errs[1] > errs[2], errs


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_ratios_change_the_result_only_from_step_two(kind):
    model = _model(kind)
    sig = _sigmas(kind, 6)
    x = _noise(kind, 2, 5, float(sig[0]))
    base = dc_unipc(model, x, sig, parameterisation=kind)
    early = torch.ones(6, dtype=torch.float64)
    early[:2] = 0.5  # indices 0 and 1 have fewer than three outputs: inert
    assert torch.equal(dc_unipc(model, x, sig, early, parameterisation=kind), base)
    late = torch.ones(6, dtype=torch.float64)
    late[3] = 0.8
    assert not torch.allclose(dc_unipc(model, x, sig, late, parameterisation=kind), base)


def test_wrong_ratio_length_is_a_clear_error():
    model = _model("eps")
    sig = _sigmas("eps", 5)
    with pytest.raises(ValueError, match="ratios hold 4 steps but the sigma list has 5"):
        dc_unipc(model, _noise("eps", 1, 0, float(sig[0])), sig, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("kind,steps,model_gradient", [("eps", 5, True), ("eps", 6, False), ("flow", 5, True)])
def test_searched_ratios_reduce_error_on_held_out_noise(kind, steps, model_gradient):
    model = _model(kind)
    sig, ref_sig = _sigmas(kind, steps), _sigmas(kind, 200)
    train = _noise(kind, 10, 100, float(sig[0]))
    test = _noise(kind, 16, 200, float(sig[0]))

    def reference(x):
        return dc_unipc(model, x, ref_sig, parameterisation=kind)

    result = search_ratios(model, train, sig, reference(train), parameterisation=kind,
                           model_gradient=model_gradient)
    assert len(result.losses) == 21 and min(result.losses) < result.losses[0]
    assert not torch.equal(result.ratios, torch.ones_like(result.ratios))
    ref_test = reference(test)

    def err(ratios):
        return float(((dc_unipc(model, test, sig, ratios, parameterisation=kind) - ref_test) ** 2).mean())

    plain, searched = err(None), err(result.ratios)
    assert searched < 0.8 * plain, (plain, searched, result.ratios.tolist())
