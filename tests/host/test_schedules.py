"""Host tier: the logistic and GITS schedules as SIGMAS nodes and as stock KSampler scheduler names."""

from __future__ import annotations

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
