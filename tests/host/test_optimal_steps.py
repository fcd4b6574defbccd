"""Host tier: the Optimal Steps Search node on tiny SD1.5 and Flux models, its saved schedules, and the stock
KSampler's ``preprint_oss`` scheduler that reads them."""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import pytest
import torch

from preprint.samplers.optimal_steps import evaluations
from preprint.utils import calibration_store as store

from .harness import (
    count_calls,
    make_conds,
    make_latent,
    node_class,
    run_custom_sampling,
    run_node,
    run_sampling,
    tiny_model,
)

NODE = "PreprintOptimalStepsSearch"
NAME = "Optimal Steps Search (Preprint)"


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in ("sd15", "flux")}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PREPRINT_CALIBRATION_DIR", str(tmp_path))
    return tmp_path


def search(model, family, steps=2, teacher_steps=5, cfg=4.0, height=8, width=8, recompute=False, samples=1,
           **extra):
    pos, neg = make_conds(family)
    latent = {"samples": make_latent(family, height=height, width=width)}
    return run_node(NODE, model=model, positive=pos, negative=neg, latent_image=latent, steps=steps,
                    teacher_steps=teacher_steps, cfg=cfg, samples=samples, seed=0, teacher_grid="simple",
                    recompute=recompute, **extra)


def files(folder):
    return sorted(folder.glob("oss-*.safetensors"))


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_search_gives_a_schedule_in_the_models_range_at_the_stated_cost(models, family, folder):
    """K + 1 strictly decreasing sigmas from the model's sigma_max to 0, on a non-square latent; N + (K - 1)(N - K + 1)
    model calls (cond and uncond in one call); one file saved; the model passed on untouched."""
    model = models[family]
    ms = model.get_model_object("model_sampling")
    with count_calls(model) as counter:
        sigmas, out = search(counter.model, family, steps=3, teacher_steps=8, height=6, width=10, samples=2)
    assert counter.calls == evaluations(8, 3) == 8 + 2 * 6
    assert len(sigmas) == 4 and float(sigmas[-1]) == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())
    assert float(sigmas[0]) == pytest.approx(float(ms.sigma_max), rel=1e-5)
    assert bool((sigmas[:-1] >= float(ms.sigma_min) * (1 - 1e-5)).all())
    grid = comfy.samplers.calculate_sigmas(ms, "simple", 8).float()
    assert all(bool((grid - s).abs().min() < 1e-6) for s in sigmas)  # chosen from the teacher's sigmas
    assert out is counter.model and model.get_model_object("model_sampling") is ms
    assert len(files(folder)) == 1


def test_a_saved_schedule_is_read_back_and_recompute_searches_again(models, folder):
    model = models["sd15"]
    first, _ = search(model, "sd15")
    (path,) = files(folder)
    tensors, key, meta = store.read(path)
    assert torch.equal(tensors["sigmas"], first) and key["steps"] == 2 and key["cfg"] == 4.0
    assert meta["evaluations"] == evaluations(5, 2)
    # the node reads the file: a schedule written there under the same key comes back, with no model call
    planted = torch.tensor([14.0, 0.5, 0.0])
    store.save(folder, "oss", key, {**tensors, "sigmas": planted})
    with count_calls(model) as counter:
        again, _ = search(counter.model, "sd15")
    assert counter.calls == 0 and torch.equal(again, planted)
    with count_calls(model) as counter:
        fresh, _ = search(counter.model, "sd15", recompute=True)
    assert counter.calls == evaluations(5, 2) and torch.equal(fresh, first)
    assert files(folder) == [path] and torch.equal(store.read(path)[0]["sigmas"], first)  # replaced in place


def test_another_cfg_size_or_model_is_another_file(models, folder):
    model = models["sd15"]
    search(model, "sd15")
    search(model, "sd15", cfg=6.0)
    search(model, "sd15", height=8, width=12)
    search(tiny_model("sd15", seed=1), "sd15")
    keys = [store.read(p)[1] for p in files(folder)]
    assert len(keys) == 4
    assert sorted({k["cfg"] for k in keys}) == [4.0, 6.0]
    assert sorted({tuple(k["shape"]) for k in keys}) == [(4, 8, 8), (4, 8, 12)]
    assert len({k["model"] for k in keys}) == 2


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_the_stock_ksampler_scheduler_uses_exactly_the_saved_sigmas(models, family, folder):
    model = models[family]
    sigmas, out = search(model, family, steps=2)
    sampler = comfy.samplers.KSampler(out, steps=2, device=comfy.model_management.get_torch_device(),
                                      sampler="euler", scheduler="preprint_oss")
    assert torch.equal(sampler.sigmas.cpu(), sigmas)
    (basic,) = node_class("BasicScheduler")().get_sigmas(model=out, scheduler="preprint_oss", steps=2, denoise=1.0)
    assert torch.equal(basic, sigmas)
    via_ksampler = run_sampling(out, family, "euler", "preprint_oss", steps=2, cfg=4.0)
    via_custom = run_custom_sampling(out, family, comfy.samplers.sampler_object("euler"), sigmas, cfg=4.0)
    assert torch.isfinite(via_ksampler).all() and torch.equal(via_ksampler, via_custom)


def test_no_saved_schedule_is_a_clear_error_naming_the_node_and_the_saved_counts(models, folder):
    model = models["sd15"]
    with pytest.raises(ValueError, match=r"no Optimal Steps schedule of 3 steps .*none is saved") as e:
        run_sampling(model, "sd15", "euler", "preprint_oss", steps=3)
    assert NAME in str(e.value)
    search(model, "sd15", steps=3)
    search(model, "sd15", steps=5)
    with pytest.raises(ValueError, match=r"of 4 steps is saved for this model \(saved for this model: 3, 5 steps\)"):
        run_sampling(model, "sd15", "euler", "preprint_oss", steps=4)
    # another model's schedules do not serve this one
    with pytest.raises(ValueError, match="none is saved"):
        run_sampling(tiny_model("sd15", seed=1), "sd15", "euler", "preprint_oss", steps=3)


def test_the_scheduler_name_is_in_the_stock_dropdowns():
    import nodes

    assert "preprint_oss" in nodes.KSampler.INPUT_TYPES()["required"]["scheduler"][0]
    assert "preprint_oss" in comfy.samplers.SCHEDULER_HANDLERS


def test_bad_settings_are_refused_before_queueing():
    from preprint.nodes.optimal_steps import PreprintOptimalStepsSearch as node

    msg = node.validate_inputs(steps=12, teacher_steps=10, cfg=4.0, samples=2, teacher_grid="simple")
    assert isinstance(msg, str) and msg.startswith(f"{NAME}: steps (12) must be at most teacher_steps (10)"), msg
    msg = node.validate_inputs(steps=3, teacher_steps=10, cfg=4.0, samples=2, teacher_grid="preprint_oss")
    assert isinstance(msg, str) and "teacher_grid" in msg, msg
    msg = node.validate_inputs(steps=3, teacher_steps=10, cfg=4.0, samples=2, teacher_grid="simple",
                               aggregate="mode")
    assert isinstance(msg, str) and "aggregate" in msg, msg
