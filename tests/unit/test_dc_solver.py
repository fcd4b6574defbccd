"""DC-Solver (UniPC-bh2 + dynamic compensation) on the exact-score mixture."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from preprint.samplers.dc_cpr import SearchedSetting, fit_cpr, outside_range, predict_ratios
from preprint.samplers.dc_solver import compensated, compensation_weights, dc_unipc, sample_dc_solver, search_ratios
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


# --- cascade polynomial regression (CPR, Sec. 3.4) ---------------------------------------------------------------

def _known_coefficients(degree: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((degree + 1, 3, 3), generator=g, dtype=torch.float64)


def _synthetic(e: torch.Tensor, grid: dict[int, list[float]], kind: str = "eps") -> list[SearchedSetting]:
    """Ratios exactly on the cascade polynomial at the steps that act; the inert steps hold junk the fit must skip."""
    out = []
    for steps, cfgs in grid.items():
        used = compensated(_sigmas(kind, steps), kind)
        for cfg in cfgs:
            ratios = torch.where(used, predict_ratios(e, steps, cfg), torch.full((steps,), 50.0, dtype=torch.float64))
            out.append(SearchedSetting(steps, cfg, ratios, used))
    return out


def test_compensated_marks_the_steps_whose_ratio_acts():
    assert compensated(_sigmas("eps", 5), "eps").tolist() == [False, False, True, True, True]
    # a flow list starts at sigma 1 (lambda = -inf): index 2 interpolates through it, so only index 3 on acts
    assert compensated(_sigmas("flow", 5), "flow").tolist() == [False, False, False, True, True]
    model = _model("flow")
    sig = _sigmas("flow", 5)
    x = _noise("flow", 2, 5, 1.0)
    base = dc_unipc(model, x, sig, parameterisation="flow")
    for i, acts in enumerate(compensated(sig, "flow").tolist()):
        rho = torch.ones(5, dtype=torch.float64)
        rho[i] = 0.7
        assert torch.equal(dc_unipc(model, x, sig, rho, parameterisation="flow"), base) != acts, i


@pytest.mark.parametrize("degree,grid,kind", [
    (2, {5: [3.0, 6.0, 9.0], 7: [3.0, 6.0, 9.0], 10: [3.0, 6.0, 9.0]}, "eps"),
    # not a grid: each step count at its own CFG scales (the cascade fits the CFG stage per step count)
    (3, {7: [1.5, 4.0, 7.5], 9: [2.0, 5.0, 8.0, 11.0], 12: [3.0, 6.0, 9.0]}, "flow"),
    (1, {4: [2.0, 5.0, 8.0], 9: [2.0, 5.0, 8.0], 20: [2.0, 5.0, 8.0]}, "eps"),
])
def test_cpr_fit_recovers_known_cascade_coefficients(degree, grid, kind):
    e = _known_coefficients(degree, seed=degree)
    fit = fit_cpr(_synthetic(e, grid, kind), step_degree=degree)
    torch.testing.assert_close(fit.coefficients, e, rtol=0, atol=1e-7)
    assert fit.steps_range == (min(grid), max(grid))
    assert fit.cfg_range == (min(min(c) for c in grid.values()), max(max(c) for c in grid.values()))
    # the cascade evaluated by hand: rho_i = sum_k x^k sum_j g^j sum_l e_kjl n^l at an unseen setting
    steps, cfg = 11, 4.2
    x, g, n = torch.arange(steps, dtype=torch.float64) / steps, cfg / 12.0, steps / 50.0
    want = sum(x ** k * sum(g ** j * sum(e[k, j, m] * n ** m for m in range(3)) for j in range(3))
               for k in range(degree + 1))
    torch.testing.assert_close(predict_ratios(fit.coefficients, steps, cfg), want, rtol=0, atol=1e-7)


def test_cpr_fit_is_least_squares_at_each_stage():
    """Two searches of one setting that disagree are averaged: the fit goes through their mean."""
    e = _known_coefficients(2)
    grid = {5: [3.0, 6.0, 9.0], 7: [3.0, 6.0, 9.0], 10: [3.0, 6.0, 9.0]}
    settings = _synthetic(e, grid)
    up = settings[4]._replace(ratios=settings[4].ratios + 0.1)
    down = settings[4]._replace(ratios=settings[4].ratios - 0.1)
    fit = fit_cpr([*settings[:4], up, down, *settings[5:]], step_degree=2)
    torch.testing.assert_close(fit.coefficients, e, rtol=0, atol=1e-7)
    moved = fit_cpr([*settings[:4], up, *settings[5:]], step_degree=2)
    assert not torch.allclose(moved.coefficients, e, atol=1e-3)


def test_cpr_ratios_beat_plain_unipc_at_an_unseen_setting():
    """Ratios searched on a 3 x 3 grid (flow mixture, 10 noises, 100-step reference), CPR-predicted at step counts
    and CFG scales never searched, against the 100-step reference on 16 held-out noises."""
    kind = "flow"
    mixture = make_mixture(EVENT_SHAPE, components=6, seed=3)
    cond_w = torch.tensor([4.0, 2.0, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)
    train, test = _noise(kind, 10, 100, 1.0), _noise(kind, 16, 200, 1.0)
    settings = []
    for steps in (6, 8, 10):
        for cfg in (1.5, 2.5, 3.5):
            model = MixtureDenoiser(mixture, kind=kind, cond_weights=cond_w, cfg=cfg)
            ref = dc_unipc(model, train, _sigmas(kind, 100), parameterisation=kind)
            found = search_ratios(model, train, _sigmas(kind, steps), ref, parameterisation=kind)
            settings.append(SearchedSetting(steps, cfg, found.ratios, compensated(_sigmas(kind, steps), kind)))
    fit = fit_cpr(settings, step_degree=2)
    for steps, cfg in ((9, 2.0), (7, 2.0)):
        model = MixtureDenoiser(mixture, kind=kind, cond_weights=cond_w, cfg=cfg)
        ref = dc_unipc(model, test, _sigmas(kind, 100), parameterisation=kind)

        def err(ratios, steps=steps, model=model, ref=ref):
            out = dc_unipc(model, test, _sigmas(kind, steps), ratios, parameterisation=kind)
            return float(((out - ref) ** 2).mean())

        plain, predicted = err(None), err(predict_ratios(fit.coefficients, steps, cfg))
        assert predicted < 0.5 * plain, (steps, cfg, plain, predicted)


def test_cpr_bad_inputs_are_clear_errors():
    e = _known_coefficients(2)
    full = {5: [3.0, 6.0, 9.0], 7: [3.0, 6.0, 9.0], 10: [3.0, 6.0, 9.0]}
    with pytest.raises(ValueError, match=r"only 2 step count\(s\) were searched \(5 steps at CFG 3, 6, 9; 7 steps.*"
                                         r"9 settings at least"):
        fit_cpr(_synthetic(e, {5: full[5], 7: full[7]}))
    with pytest.raises(ValueError, match=r"CFG scales of the 7-step searches \(7 steps at CFG 3, 6\): 2 distinct "
                                         r"value\(s\) cannot determine a degree-2 polynomial \(it needs 3\)"):
        fit_cpr(_synthetic(e, {**full, 7: [3.0, 6.0]}))
    with pytest.raises(ValueError, match="too close together"):
        fit_cpr(_synthetic(e, {**full, 7: [3.0, 3.0 + 1e-6, 3.0 + 2e-6]}))
    with pytest.raises(ValueError, match=r"5-step search at CFG 3 \(3 compensated steps\): 3 distinct value\(s\) "
                                         r"cannot determine a degree-3 polynomial.*Lower step_degree"):
        fit_cpr(_synthetic(_known_coefficients(3), full), step_degree=3)
    bad = _synthetic(e, full)
    with pytest.raises(ValueError, match="holds 4 ratios and 5 flags"):
        fit_cpr([bad[0]._replace(ratios=bad[0].ratios[:4]), *bad[1:]])
    nan = bad[0].ratios.clone()
    nan[3] = float("nan")
    with pytest.raises(ValueError, match="ratios at CFG 3 are not finite"):
        fit_cpr([bad[0]._replace(ratios=nan), *bad[1:]])
    with pytest.raises(ValueError, match="no searched ratios were given"):
        fit_cpr([])
    with pytest.raises(ValueError, match="holds 5 ratios and 4 flags"):
        fit_cpr([bad[0]._replace(used=bad[0].used[:4]), *bad[1:]])
    for degree in (-1, 7):
        with pytest.raises(ValueError, match="step_degree must be 0 to 6"):
            fit_cpr(bad, step_degree=degree)
    # an inert step's ratio never acts: whatever it holds (even NaN) is skipped, not an error
    inert = bad[0].ratios.clone()
    inert[0] = float("nan")
    torch.testing.assert_close(fit_cpr([bad[0]._replace(ratios=inert), *bad[1:]]).coefficients, e, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"shape \[degree \+ 1, 3, 3\]"):
        predict_ratios(torch.zeros(3, 2, 3), 5, 3.0)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        predict_ratios(e, 0, 3.0)


def test_cpr_range_warning_names_what_is_extrapolated():
    assert outside_range((5, 10), (3.0, 9.0), 7, 4.5) is None
    assert outside_range((5, 10), (3.0, 9.0), 5, 9.0) is None
    msg = outside_range((5, 10), (3.0, 9.0), 4, 12.0)
    assert "4 steps (fitted on 5 to 10)" in msg and "CFG 12 (fitted on 3 to 9)" in msg
    assert "CFG" not in outside_range((5, 10), (3.0, 9.0), 11, 3.0)
    assert "steps" not in outside_range((5, 10), (3.0, 9.0), 10, 2.9).split(";")[0]
