"""Host tier: the logistic and GITS schedules as SIGMAS nodes and as stock KSampler scheduler names."""

from __future__ import annotations

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import pytest
import torch

from .harness import make_conds, make_latent, run_custom_sampling, run_node, run_sampling, tiny_model

FAMILIES = ["sd15", "sdxl", "flux"]


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


def test_names_are_in_the_stock_dropdowns():
    import nodes

    ksampler_choices = nodes.KSampler.INPUT_TYPES()["required"]["scheduler"][0]
    for name in ("preprint_logistic", "preprint_gits"):
        assert name in comfy.samplers.SCHEDULER_NAMES and name in comfy.samplers.KSampler.SCHEDULERS
        assert name in ksampler_choices and name in comfy.samplers.SCHEDULER_HANDLERS


@pytest.mark.parametrize("family", FAMILIES)
def test_logistic_from_ksampler_equals_the_sigmas_node(models, family):
    model = models[family]
    (sigmas,) = run_node("PreprintLogisticScheduler", model=model, steps=5, k=15.0, t0=0.5, denoise=1.0)
    assert len(sigmas) == 6 and float(sigmas[-1]) == 0.0 and (sigmas[1:] < sigmas[:-1]).all()
    via_dropdown = run_sampling(model, family, "euler", "preprint_logistic", steps=5, cfg=4.0)
    via_custom = run_custom_sampling(model, family, comfy.samplers.sampler_object("euler"), sigmas, cfg=4.0)
    assert torch.isfinite(via_dropdown).all() and torch.equal(via_dropdown, via_custom)


def test_logistic_denoise_takes_the_tail(models):
    (full,) = run_node("PreprintLogisticScheduler", model=models["sd15"], steps=10, k=15.0, t0=0.5, denoise=1.0)
    (half,) = run_node("PreprintLogisticScheduler", model=models["sd15"], steps=5, k=15.0, t0=0.5, denoise=0.5)
    assert torch.equal(half, full[-6:])


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_gits_search_runs_on_the_model_and_serves_the_ksampler(models, family):
    model = models[family]
    pos, neg = make_conds(family)
    latent = {"samples": make_latent(family)}
    sigmas, searched = run_node("PreprintGITSScheduler", model=model, positive=pos, negative=neg,
                                latent_image=latent, steps=3, cfg=4.0, seed=0, warmup_samples=2, teacher_steps=8,
                                coeff=1.15, grid="auto")
    ms = model.get_model_object("model_sampling")
    assert len(sigmas) == 4 and float(sigmas[-1]) == 0.0 and (sigmas[1:] < sigmas[:-1]).all()
    assert float(sigmas[0]) == pytest.approx(float(ms.sigma_max), rel=1e-4)
    assert model.get_model_object("model_sampling") is ms  # the input model is untouched
    via_dropdown = run_sampling(searched, family, "euler", "preprint_gits", steps=3, cfg=4.0)
    via_custom = run_custom_sampling(searched, family, comfy.samplers.sampler_object("euler"), sigmas, cfg=4.0)
    assert torch.isfinite(via_dropdown).all() and torch.equal(via_dropdown, via_custom)
    with pytest.raises(ValueError, match="GITS"):
        run_sampling(model, family, "euler", "preprint_gits", steps=3)
    with pytest.raises(ValueError, match="teacher"):
        run_sampling(searched, family, "euler", "preprint_gits", steps=9)


def test_gits_defaults_are_the_official_stable_diffusion_recipe():
    """zju-pi/diff-sampler's SD recipe: DPM-Solver++ teacher on 61 timestamps, 'dev' cost, coeff 1.20, 256 warm-up."""
    from preprint.nodes.schedules import PreprintGITSScheduler

    defaults = {i.id: i.default for i in PreprintGITSScheduler.define_schema().inputs if hasattr(i, "default")}
    assert defaults["teacher"] == "dpmpp_2m" and defaults["metric"] == "dev"
    assert defaults["coeff"] == pytest.approx(1.2) and defaults["warmup_samples"] == 256
    assert defaults["teacher_steps"] == 60


def test_gits_step_counts_are_refused_before_queueing():
    from preprint.nodes.schedules import PreprintGITSScheduler as node

    msg = node.validate_inputs(steps=9, teacher_steps=8)
    assert isinstance(msg, str) and msg.startswith("GITS Schedule Search (Preprint): steps (9)"), msg
    msg = node.validate_inputs(steps=2, teacher_steps=1)
    assert isinstance(msg, str) and msg.startswith("GITS Schedule Search (Preprint): teacher_steps"), msg
    assert node.validate_inputs(steps=8, teacher_steps=8) is True
    assert node.validate_inputs(steps=None, teacher_steps=8) is True
    with pytest.raises(ValueError, match=r"^GITS Schedule Search \(Preprint\): steps \(9\)"):
        node.execute(None, None, None, None, steps=9, cfg=1.0, seed=0, warmup_samples=1, teacher_steps=8,
                     coeff=1.2, grid="auto")


@pytest.mark.parametrize("metric,teacher", [("dev", "dpmpp_2m"), ("vp_l2", "ipndm")])
def test_gits_warm_up_batches_do_not_change_the_search(models, metric, teacher):
    model = models["sd15"]
    pos, neg = make_conds("sd15")
    latent = {"samples": make_latent("sd15")}
    common = {"model": model, "positive": pos, "negative": neg, "latent_image": latent, "steps": 3, "cfg": 4.0,
              "seed": 3, "warmup_samples": 3, "teacher_steps": 8, "coeff": 1.2, "grid": "auto", "metric": metric,
              "teacher": teacher}
    _, whole = run_node("PreprintGITSScheduler", warmup_batch=3, **common)
    _, chunked = run_node("PreprintGITSScheduler", warmup_batch=1, **common)
    a = whole.get_model_object("model_sampling").preprint_gits
    b = chunked.get_model_object("model_sampling").preprint_gits
    assert (a.metric, a.teacher) == (metric, teacher)
    upper = torch.triu(torch.ones_like(a.cost, dtype=torch.bool), 1)
    torch.testing.assert_close(b.cost[upper], a.cost[upper], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_logistic_defaults_on_eps_models_are_core_exponential(models, family):
    """With k 15, t0 0.5 the curve spans more than SD's trained noise range, so after the cut to
    [sigma_min, sigma_max] the list is uniform in log sigma: core's `exponential` scheduler (what the README
    says); a smaller k stays inside a narrower band and differs."""
    ms = models[family].get_model_object("model_sampling")
    (ours,) = run_node("PreprintLogisticScheduler", model=models[family], steps=12, k=15.0, t0=0.5, denoise=1.0)
    core = comfy.samplers.calculate_sigmas(ms, "exponential", 12)
    torch.testing.assert_close(ours, core.float(), rtol=1e-5, atol=1e-6)
    (narrow,) = run_node("PreprintLogisticScheduler", model=models[family], steps=12, k=10.0, t0=0.45, denoise=1.0)
    assert not torch.allclose(narrow, core.float(), rtol=1e-3)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_logistic_k_and_t0_give_the_documented_curve(models, family):
    """Non-default k and t0 give exactly samplers/schedules.logistic_sigmas on this model's noise range."""
    from preprint.samplers.schedules import logistic_sigmas

    ms = models[family].get_model_object("model_sampling")
    kind = "flow" if family == "flux" else "eps"
    (default,) = run_node("PreprintLogisticScheduler", model=models[family], steps=8, k=15.0, t0=0.5, denoise=1.0)
    for k, t0 in [(6.0, 0.5), (15.0, 0.3), (9.0, 0.6)]:
        (ours,) = run_node("PreprintLogisticScheduler", model=models[family], steps=8, k=k, t0=t0, denoise=1.0)
        want = logistic_sigmas(8, kind, float(ms.sigma_min), float(ms.sigma_max), k=k, t0=t0)
        torch.testing.assert_close(ours, want, rtol=1e-6, atol=0)
        # the setting must move the list by far more than the tolerance above
        assert float(((ours[:-1] - default[:-1]).abs() / default[:-1]).max()) > 1e-2, (k, t0)


def direct_gits_cost(model, positive, negative, latent, cfg, seed, warmup, fine, teacher, metric):
    """samplers/gits.py called directly: the teacher solves the seeded warm-up noise on ``fine`` through a CFGGuider at
    ``cfg``, and cost_matrix scores every jump."""
    from preprint.samplers import gits

    warm = torch.zeros((warmup, *latent.shape[1:]))
    noise = comfy.sample.prepare_noise(warm, seed)
    kind = "flow" if isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST) else "eps"
    found = {}

    def solve(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        states, derivs = gits.teacher_trajectory(model_k, x, sigmas, teacher, kind, extra_args)
        found["cost"] = gits.cost_matrix(states, derivs, sigmas.cpu(), kind, metric)
        return x

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    guider.sample(noise, warm, comfy.samplers.KSAMPLER(solve), fine, seed=seed, disable_pbar=True)
    return found["cost"]


def test_gits_cfg_and_teacher_grid_reach_the_search(models):
    """The warm-up runs at the node's cfg on a grid of teacher_steps laid out by the chosen scheduler: the node's cost
    matrix is the one samplers/gits.py computes directly at that cfg on that grid, and its schedule is the DP path."""
    from preprint.samplers.gits import dp_search

    model = models["sd15"]
    ms = model.get_model_object("model_sampling")
    pos, neg = make_conds("sd15")
    latent = make_latent("sd15")
    common = {"model": model, "positive": pos, "negative": neg, "latent_image": {"samples": latent},
              "steps": 3, "seed": 0, "warmup_samples": 2, "coeff": 1.3, "teacher": "dpmpp_2m", "metric": "dev"}

    def table(**inputs):
        sigmas, searched = run_node("PreprintGITSScheduler", **common, **inputs)
        found = searched.get_model_object("model_sampling").preprint_gits
        torch.testing.assert_close(sigmas, found.schedule(3), rtol=0, atol=0)
        return sigmas, found

    _, low = table(cfg=1.0, teacher_steps=9, grid="exponential")
    high_sigmas, high = table(cfg=6.0, teacher_steps=9, grid="exponential")
    grid = comfy.samplers.calculate_sigmas(ms, "exponential", 9)
    for found in (low, high):
        assert found.max_steps == 9 and found.coeff == pytest.approx(1.3)
        torch.testing.assert_close(found.sigmas, grid.double(), rtol=1e-6, atol=0)
    upper = torch.triu(torch.ones_like(low.cost, dtype=torch.bool), 1)
    # the same noise and grid: only the guidance scale can move the trajectories' costs (cfg 1 -> 6 moves them by up
    # to 3.9x relative, cfg 6 -> 5.9 by up to 0.97x; the direct computation below must agree bit for bit)
    rel = ((high.cost - low.cost)[upper].abs() / low.cost[upper].abs().clamp(min=1e-8)).max()
    assert float(rel) > 1e-2
    want = direct_gits_cost(model, pos, neg, latent, 6.0, 0, 2, grid, "dpmpp_2m", "dev")
    torch.testing.assert_close(high.cost[upper], want[upper], rtol=0, atol=0)
    torch.testing.assert_close(high_sigmas, grid[dp_search(want, 3, 1.3)].float(), rtol=0, atol=0)
    # grid "auto" is karras on an EPS model: a different fine grid from "exponential" (inner sigmas 96% apart)
    _, auto = table(cfg=6.0, teacher_steps=9, grid="auto")
    torch.testing.assert_close(auto.sigmas, comfy.samplers.calculate_sigmas(ms, "karras", 9).double(), rtol=1e-6,
                               atol=0)
    assert float((auto.sigmas[1:-1] / grid[1:-1].double() - 1).abs().max()) > 1e-2
