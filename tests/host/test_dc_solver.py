"""Host tier: the DC-Solver sampler and ratio-search nodes on tiny SD1.5 and Flux models."""

from __future__ import annotations

import comfy.samplers
import pytest
import torch

from preprint.samplers.dc_solver import sample_dc_solver

from .harness import counted, make_conds, make_latent, node_class, run_custom_sampling, run_node, tiny_model

SAMPLER, SEARCH = "PreprintDCSolver", "PreprintDCSolverSearch"


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in ("sd15", "flux")}


@pytest.fixture(scope="module")
def loaded():
    """Models as the executor's loaders leave them: built in inference mode, so their weights are inference
    tensors, which no autograd graph may record."""
    with torch.inference_mode():
        out = {f: tiny_model(f, seed=1) for f in ("sd15", "flux")}
    assert all(next(m.model.parameters()).is_inference() for m in out.values())
    return out


def sample(model, family, sampler, sig):
    with torch.inference_mode():  # as the executor runs every node
        return run_custom_sampling(model, family, sampler, sig, cfg=4.0, height=6, width=10)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PREPRINT_CALIBRATION_DIR", str(tmp_path))
    return tmp_path


def sigmas_for(model, steps, scheduler="karras"):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).float()


def search(model, family, steps=3, reference_steps=6, recompute=False, height=6, width=10):
    pos, neg = make_conds(family)
    latent = {"samples": make_latent(family, height=height, width=width)}
    # the executor runs nodes in inference mode; the search must leave it to differentiate
    with torch.inference_mode():
        return run_node(SEARCH, model=model, positive=pos, negative=neg, cfg=4.0, latent_image=latent, steps=steps,
                        reference_steps=reference_steps, scheduler="karras", samples=2, seed=0, recompute=recompute)


def test_plain_mode_matches_core_uni_pc_bh2_where_core_runs_order_two(models):
    """Without ratios the node is UniPC-bh2 at order 2. Core's uni_pc_bh2 uses order min(3, steps - 1), so the two
    agree at 3 steps; at more steps core is third order and they differ (checked the other way round below)."""
    model = models["sd15"]
    (ours,) = run_node(SAMPLER, mode="plain")
    sig = sigmas_for(model, 3)
    a = run_custom_sampling(model, "sd15", ours, sig, height=6, width=10)
    b = run_custom_sampling(model, "sd15", comfy.samplers.sampler_object("uni_pc_bh2"), sig, height=6, width=10)
    # core computes lambda in float32 through a VP conversion (1 - 1/(1 + sigma^2) at sigma 0.001 cancels badly);
    # here the weights are float64: the states agree to float32 rounding of those weights
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    sig6 = sigmas_for(model, 6)
    a6 = run_custom_sampling(model, "sd15", ours, sig6, height=6, width=10)
    b6 = run_custom_sampling(model, "sd15", comfy.samplers.sampler_object("uni_pc_bh2"), sig6, height=6, width=10)
    assert not torch.allclose(a6, b6, rtol=1e-4, atol=1e-4)
    third = comfy.samplers.KSAMPLER(sample_dc_solver, extra_options={"order": 3})
    c6 = run_custom_sampling(model, "sd15", third, sig6, height=6, width=10)
    torch.testing.assert_close(c6, b6, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_search_saves_reuses_and_its_ratios_drive_the_sampler(loaded, family, folder):
    model = loaded[family]
    # a flow list starts at sigma 1 (lambda = -inf), so its first compensable output is index 3: one more step
    steps = 3 if family == "sd15" else 4
    counter = counted(model)
    ratios, sig = search(counter.model, family, steps=steps)
    # reference (6 steps) + 21 passes of the few-step run; cond and uncond in one call
    assert counter.calls == 6 + 21 * steps
    assert ratios["steps"] == steps and ratios["ratios"].shape == (steps,)
    assert torch.isfinite(ratios["ratios"]).all()
    assert not torch.equal(ratios["ratios"], torch.ones(steps, dtype=torch.float64))
    torch.testing.assert_close(sig, sigmas_for(model, steps))
    assert len(list(folder.glob("dc_solver-*.safetensors"))) == 1
    again = counted(model)
    ratios2, _ = search(again.model, family, steps=steps)
    assert again.calls == 0 and torch.equal(ratios2["ratios"], ratios["ratios"])
    if family == "sd15":
        redo = counted(model)
        search(redo.model, family, recompute=True)
        assert redo.calls == 6 + 21 * 3
    # the ratios reach the sampler: deterministic, different from plain; all-ones ratios are plain exactly
    (plain,) = run_node(SAMPLER, mode="plain")
    (comp,) = run_node(SAMPLER, ratios=ratios)
    (found,) = run_node(SAMPLER)  # mode auto, nothing linked: the ratios saved for this setting are found
    a, b, b2, c = (sample(model, family, s, sig) for s in (plain, comp, comp, found))
    assert torch.isfinite(b).all() and torch.equal(b, b2) and torch.equal(b, c)
    assert not torch.equal(a, b)
    ones = {"ratios": torch.ones(steps, dtype=torch.float64), "steps": steps, "scheduler": "karras"}
    (unit,) = run_node(SAMPLER, ratios=ones)
    assert torch.equal(sample(model, family, unit, sig), a)


def test_bad_inputs_give_clear_errors(models, folder):
    model = models["sd15"]
    ratios = {"ratios": torch.ones(4, dtype=torch.float64), "steps": 4, "scheduler": "karras"}
    (comp,) = run_node(SAMPLER, ratios=ratios)
    with pytest.raises(ValueError, match="ratios hold 4 steps but the sigma list has 6"):
        run_custom_sampling(model, "sd15", comp, sigmas_for(model, 6))
    with pytest.raises(ValueError, match="DC-Solver"):
        run_node(SAMPLER, ratios=torch.ones(4))
    msg = node_class(SEARCH).validate_inputs(cfg=4.0, steps=6, reference_steps=6, scheduler="karras", samples=2)
    assert isinstance(msg, str) and "reference_steps (6) must exceed steps (6)" in msg
