"""Host tier: DC-Solver's CPR Fit node, and the sampler reading a fitted CPR (or exact searched ratios), tiny models."""

from __future__ import annotations

import comfy.samplers
import pytest
import torch

from preprint.nodes import dc_solver as glue
from preprint.samplers.dc_cpr import predict_ratios
from preprint.samplers.dc_solver import compensated, sample_dc_solver
from preprint.utils import calibration_store as store

from .harness import counted, make_conds, make_latent, node_class, run_custom_sampling, run_node, tiny_model

SAMPLER, FIT = "PreprintDCSolver", "PreprintDCSolverCPRFit"
H, W = 6, 10
# a flow list starts at sigma 1, so its ratios act from index 3: a degree-2 fit needs 6 steps there
GRID_STEPS = {"sd15": (5, 7, 10), "flux": (6, 8, 10)}
GRID_CFG = (3.0, 6.0, 9.0)
UNSEEN = {"sd15": 6, "flux": 7}  # a step count between the searched ones
SEARCH = {"reference_steps": 12, "samples": 2, "seed": 0}


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in ("sd15", "flux")}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PREPRINT_CALIBRATION_DIR", str(tmp_path))
    return tmp_path


def known(degree: int = 2) -> torch.Tensor:
    return torch.randn((degree + 1, 3, 3), generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.3


def latent(family: str) -> dict:
    return {"samples": make_latent(family, height=H, width=W)}


def save_search(model, family, steps, cfg, ratios, scheduler="karras", **settings):
    """A search result as the Ratio Search node saves it, without running the search."""
    s = {**SEARCH, **settings}
    key = glue.search_key(model, cfg, make_latent(family, height=H, width=W).shape[1:], steps, s["reference_steps"],
                          scheduler, s["samples"], s["seed"], iterations=s.get("iterations", glue.ITERATIONS))
    return store.save(glue.calibration_folder(), glue.KIND, key, {"ratios": ratios}, {})


def save_grid(model, family, e, skip=(), steps_grid=None, **settings):
    """Searches whose ratios lie on the cascade ``e`` where they act and are 1 (as a search leaves them) elsewhere."""
    kind = "flow" if family == "flux" else "eps"
    for steps in steps_grid or GRID_STEPS[family]:
        used = compensated(sigmas_for(model, steps), kind)
        for cfg in GRID_CFG:
            if (steps, cfg) not in skip:
                ratios = torch.where(used, predict_ratios(e, steps, cfg), torch.ones(steps, dtype=torch.float64))
                save_search(model, family, steps, cfg, ratios, **settings)


def fit(model, family, steps_list=None, cfg_list="3, 6, 9", degree=2, scheduler="karras", **settings):
    steps_list = steps_list or ", ".join(map(str, GRID_STEPS[family]))
    pos, neg = make_conds(family)
    with torch.inference_mode():  # as the executor runs every node
        (out,) = run_node(FIT, model=model, positive=pos, negative=neg, latent_image=latent(family),
                          scheduler=scheduler, steps_list=steps_list, cfg_list=cfg_list, step_degree=degree,
                          **{**SEARCH, **settings})
    return out


def sigmas_for(model, steps, scheduler="karras"):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).float()


def sample(model, family, sampler, steps, cfg, scheduler="karras"):
    with torch.inference_mode():
        return run_custom_sampling(model, family, sampler, sigmas_for(model, steps, scheduler), cfg=cfg, height=H,
                                   width=W)


def explicit(family, ratios):
    kind = "flow" if family == "flux" else "eps"
    return comfy.samplers.KSAMPLER(sample_dc_solver, extra_options={"ratios": ratios, "order": 2,
                                                                    "parameterisation": kind})


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_fit_reads_saved_searches_and_the_sampler_uses_it_at_an_unseen_setting(models, family, folder):
    model = models[family]
    e = known()
    save_grid(model, family, e)
    counter = counted(model)
    out = fit(counter.model, family)
    assert counter.calls == 0  # every grid setting was saved: nothing searched
    torch.testing.assert_close(out["coefficients"], e, rtol=0, atol=1e-7)
    assert out["steps_range"] == (GRID_STEPS[family][0], 10) and out["cfg_range"] == (3.0, 9.0)
    assert len(list(folder.glob("dc_solver_cpr-*.safetensors"))) == 1
    # unseen setting: n steps at CFG 4.5, no search saved for it; the saved fit is found without a link
    n = UNSEEN[family]
    want = predict_ratios(e, n, 4.5)
    ref = sample(model, family, explicit(family, want), n, 4.5)
    (auto,) = run_node(SAMPLER, mode="auto")
    (only_cpr,) = run_node(SAMPLER, mode="cpr")
    (plain,) = run_node(SAMPLER, mode="plain")
    for s in (auto, only_cpr):
        assert torch.equal(sample(model, family, s, n, 4.5), ref)
    assert not torch.equal(sample(model, family, plain, n, 4.5), ref)
    # a linked fit wins over the saved one
    halved = {**out, "coefficients": out["coefficients"] * 0.5}
    by_halved = sample(model, family, explicit(family, predict_ratios(e * 0.5, n, 4.5)), n, 4.5)
    for mode in ("auto", "cpr"):
        (linked,) = run_node(SAMPLER, mode=mode, cpr=halved)
        assert torch.equal(sample(model, family, linked, n, 4.5), by_halved)
    # another CFG is another prediction: the run's own scale is read from the guider
    at_7 = sample(model, family, auto, n, 7.5)
    assert not torch.equal(at_7, sample(model, family, explicit(family, want), n, 7.5))
    assert torch.equal(at_7, sample(model, family, explicit(family, predict_ratios(e, n, 7.5)), n, 7.5))


def test_searched_ratios_for_the_exact_setting_win_over_the_fit(models, folder):
    model, family = models["sd15"], "sd15"
    e = known()
    save_grid(model, family, e)
    fit(model, family)
    exact = torch.linspace(0.8, 1.2, 6, dtype=torch.float64)  # 6 steps: not in the grid
    save_search(model, family, 6, 4.5, exact, reference_steps=40, samples=3)  # any search settings count
    (auto,) = run_node(SAMPLER, mode="auto")
    (searched,) = run_node(SAMPLER, mode="searched")
    (only_cpr,) = run_node(SAMPLER, mode="cpr")
    by_search = sample(model, family, explicit(family, exact), 6, 4.5)
    assert torch.equal(sample(model, family, auto, 6, 4.5), by_search)
    assert torch.equal(sample(model, family, searched, 6, 4.5), by_search)
    assert torch.equal(sample(model, family, only_cpr, 6, 4.5),
                       sample(model, family, explicit(family, predict_ratios(e, 6, 4.5)), 6, 4.5))
    # the search belongs to CFG 4.5: at CFG 5 the fit serves
    assert torch.equal(sample(model, family, auto, 6, 5.0),
                       sample(model, family, explicit(family, predict_ratios(e, 6, 5.0)), 6, 5.0))


def test_another_schedule_or_nothing_saved_is_plain_in_auto_and_an_error_otherwise(models, folder):
    model, family = models["sd15"], "sd15"
    (auto,) = run_node(SAMPLER, mode="auto")
    (plain,) = run_node(SAMPLER, mode="plain")
    assert torch.equal(sample(model, family, auto, 6, 4.5), sample(model, family, plain, 6, 4.5))
    save_grid(model, family, known())
    fit(model, family)
    # the fit is for karras: a 'normal' schedule is not served
    assert torch.equal(sample(model, family, auto, 6, 4.5, "normal"), sample(model, family, plain, 6, 4.5, "normal"))
    (only_cpr,) = run_node(SAMPLER, mode="cpr")
    with pytest.raises(ValueError, match=r"DC-Solver \(mode 'cpr'\): no CPR fit is saved for this model at 6 steps, "
                                         r"CFG 4.5.*DC-Solver CPR Fit"):
        sample(model, family, only_cpr, 6, 4.5, "normal")
    (searched,) = run_node(SAMPLER, mode="searched")
    with pytest.raises(ValueError, match=r"DC-Solver \(mode 'searched'\): no ratios are saved.*DC-Solver Ratio "
                                         r"Search"):
        sample(model, family, searched, 6, 4.5)
    # another model (other weights) finds nothing
    other = tiny_model(family, seed=5)
    assert torch.equal(sample(other, family, auto, 6, 4.5), sample(other, family, plain, 6, 4.5))


def test_fit_node_searches_only_the_missing_settings(models, folder):
    model, family = models["sd15"], "sd15"
    # degree 0 (one ratio per setting) on 3 to 5 steps keeps the one real search short
    e = known(0)
    save_grid(model, family, e, skip={(3, 6.0)}, steps_grid=(3, 4, 5), reference_steps=6, iterations=2)
    counter = counted(model)
    out = fit(counter.model, family, steps_list="3, 4, 5", degree=0, reference_steps=6, iterations=2)
    # one search: a 6-step reference and 3 passes (2 iterations + the last score) of the 3-step run, cond and
    # uncond in one call
    assert counter.calls == 6 + 3 * 3
    assert len(list(folder.glob("dc_solver-*.safetensors"))) == 9  # the new search is saved too
    assert not torch.allclose(out["coefficients"], e, atol=1e-6)  # the searched ratio is not on the polynomial
    again = counted(model)
    second = fit(again.model, family, steps_list="3, 4, 5", degree=0, reference_steps=6, iterations=2)
    assert again.calls == 0 and torch.equal(second["coefficients"], out["coefficients"])


def test_bad_inputs_give_clear_errors(models, folder):
    cls = node_class(FIT)
    widgets = {"scheduler": "karras", "step_degree": 2, "reference_steps": 200, "samples": 2}
    msg = cls.validate_inputs(steps_list="5, 7", cfg_list="3, 6, 9", **widgets)
    assert isinstance(msg, str) and msg.startswith("DC-Solver CPR Fit: steps_list = '5, 7' holds 2 distinct") \
        and "9 settings at least" in msg
    msg = cls.validate_inputs(steps_list="5, 7, 10", cfg_list="3, three, 9", **widgets)
    assert "cfg_list must be numbers separated by commas" in msg
    msg = cls.validate_inputs(steps_list="5, 7, 2", cfg_list="3, 6, 9", **widgets)
    assert "every step count must be between 3 and 100" in msg
    msg = cls.validate_inputs(steps_list="5, 7, 10", cfg_list="3, 6, 9", **{**widgets, "reference_steps": 10})
    assert "reference_steps (10) must exceed the largest step count (10)" in msg
    assert cls.validate_inputs(steps_list="5 7 10", cfg_list="3,6,9", **widgets) is True
    # a degree the 5-step searches cannot determine
    model = models["sd15"]
    save_grid(model, "sd15", known(3))
    with pytest.raises(ValueError, match=r"DC-Solver CPR Fit: the 5-step search at CFG 3 \(3 compensated steps\).*"
                                         r"Lower step_degree"):
        fit(model, "sd15", degree=3)
    with pytest.raises(ValueError, match="mode 'plain' .* would ignore the linked"):
        run_node(SAMPLER, mode="plain", cpr={"coefficients": known()})
    with pytest.raises(ValueError, match="'cpr' must come from the 'DC-Solver CPR Fit' node"):
        run_node(SAMPLER, mode="auto", cpr=known())
    with pytest.raises(ValueError, match="mode 'searched' would ignore the linked CPR fit"):
        run_node(SAMPLER, mode="searched", cpr={"coefficients": known()})
    msg = node_class(SAMPLER).validate_inputs(mode="fitted")
    assert isinstance(msg, str) and "mode = 'fitted' is not one of its options" in msg


def test_guiders_without_one_cfg_scale_are_refused_or_plain(models, folder):
    """DualCFGGuider subclasses CFGGuider and inherits its cfg of 1: the fit must not be read at CFG 1 for it."""
    from comfy_extras.nodes_custom_sampler import Guider_Basic, Guider_DualCFG

    model, family = models["sd15"], "sd15"
    e = known()
    save_grid(model, family, e)
    fit(model, family)
    pos, neg = make_conds(family)
    dual = Guider_DualCFG(model)
    dual.set_conds(pos, pos, neg)
    dual.set_cfg(4.5, 2.0)
    sig = sigmas_for(model, 6)
    (auto,) = run_node(SAMPLER, mode="auto")
    (plain,) = run_node(SAMPLER, mode="plain")
    (only_cpr,) = run_node(SAMPLER, mode="cpr")
    with torch.inference_mode():
        got = run_custom_sampling(model, family, auto, sig, guider=dual, height=H, width=W)
        assert torch.equal(got, run_custom_sampling(model, family, plain, sig, guider=dual, height=H, width=W))
        with pytest.raises(ValueError, match=r"DC-Solver \(mode 'cpr'\): ratios are chosen by the run's CFG scale"):
            run_custom_sampling(model, family, only_cpr, sig, guider=dual, height=H, width=W)
        # BasicGuider: one prompt, no guidance, so the fit is read at CFG 1
        basic = Guider_Basic(model)
        basic.set_conds(pos)
        got = run_custom_sampling(model, family, auto, sig, guider=basic, height=H, width=W)
        want = run_custom_sampling(model, family, explicit(family, predict_ratios(e, 6, 1.0)), sig, guider=basic,
                                   height=H, width=W)
    assert torch.equal(got, want)
