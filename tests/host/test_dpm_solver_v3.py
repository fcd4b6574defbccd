"""Host tier: DPM-Solver-v3 statistics on the user's model, saved and reused; the sampler node and KSampler name."""

from __future__ import annotations

import json

import comfy.patcher_extension
import comfy.samplers
import pytest
import torch

from .harness import counted, make_conds, make_latent, run_custom_sampling, run_node, run_sampling, tiny_model

FAMILIES = ["sd15", "flux"]
TINY = {"grid_points": 2, "samples": 2, "chunk": 2, "trajectory_substeps": 1, "seed": 0,
        "derivatives": "finite_difference",
        "recompute": False}


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PREPRINT_CALIBRATION_DIR", str(tmp_path))
    return tmp_path


def statistics(model, family, cfg=5.0, height=8, width=12, **overrides):
    positive, negative = make_conds(family)
    latent = {"samples": make_latent(family, 1, height, width)}
    return run_node("PreprintDPMSolverV3Statistics", model=model, positive=positive, negative=negative, cfg=cfg,
                    latent=latent, **{**TINY, **overrides})


def sigmas_for(model, steps=5):
    ms = model.get_model_object("model_sampling")
    scheduler = "simple" if "flux" in str(type(ms)).lower() else "karras"
    return comfy.samplers.calculate_sigmas(ms, scheduler, steps)


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_computed_saved_and_reused_without_model_calls(models, family, folder):
    counter = counted(models[family])
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        stats, path = statistics(counter.model, family)
    # two finite-difference JVPs per grid point and chunk (each: the +- pair in one call, the centre in another),
    # cond and uncond batched into one call; flow leaves sigma = 1 first
    expected = (TINY["grid_points"] + 1) * 2 * 2 + (1 if family == "flux" else 0)
    assert counter.calls == expected
    channels = make_latent(family).shape[1]
    assert stats.shape == (channels, 8, 12) and stats.l.shape[0] == TINY["grid_points"] + 1
    assert all(torch.isfinite(t).all() for t in (stats.l, stats.s, stats.b))
    assert path.startswith(str(folder)) and len(list(folder.glob("dpm_solver_v3-*.safetensors"))) == 1

    counter.calls = 0
    again, path2 = statistics(counter.model, family)
    assert counter.calls == 0 and path2 == path
    assert torch.equal(again.l, stats.l) and torch.equal(again.s, stats.s) and torch.equal(again.b, stats.b)

    statistics(counter.model, family, cfg=3.0)  # another CFG is another file
    assert counter.calls == expected and len(list(folder.glob("dpm_solver_v3-*.safetensors"))) == 2


def test_chunking_does_not_change_the_statistics(models, folder):
    whole, _ = statistics(models["sd15"], "sd15", chunk=2, recompute=True)
    parts, _ = statistics(models["sd15"], "sd15", chunk=1, recompute=True)
    # batch size changes only the float rounding of the tiny UNet; s divides it by the variance of f over two
    # samples, which the random model makes tiny on a few elements, so s and b are compared by their median
    torch.testing.assert_close(parts.l, whole.l, atol=1e-3, rtol=0)
    for name in ("s", "b"):
        assert float((getattr(parts, name) - getattr(whole, name)).abs().median()) < 1e-3


def test_forward_mode_jvp_through_comfyui_in_inference_mode(folder):
    """Forward-mode AD through the real guider and Flux, inside inference mode as ComfyUI's executor runs nodes
    (the model's weights and conds are inference tensors there: the model is built inside it, as a checkpoint loader
    node builds it); it agrees with the finite differences."""
    with torch.inference_mode():
        counter = counted(tiny_model("flux"))
        assert next(counter.model.model.diffusion_model.parameters()).is_inference()
    settings = {"grid_points": 2, "samples": 2, "chunk": 2, "recompute": True, "cfg": 3.0}
    with torch.inference_mode():
        fwd, _ = statistics(counter.model, "flux", derivatives="forward", **settings)
    assert counter.calls == 3 * 2 + 1  # one call per JVP, one to leave sigma = 1
    with torch.inference_mode():
        fd, _ = statistics(counter.model, "flux", derivatives="finite_difference", **settings)
    assert float((fd.l - 1).abs().max()) > 0.05  # statistics away from the trivial l = 1 ...
    torch.testing.assert_close(fd.l, fwd.l, atol=1e-2, rtol=0)  # ... agree to step-0.02 differences of float32
    for name in ("s", "b"):  # the derivative along the trajectory (tangent in sigma too): compared by the median
        assert float((getattr(fd, name) - getattr(fwd, name)).abs().median()) < 0.1 * float(
            getattr(fd, name).abs().median()), name


def test_forward_mode_is_refused_where_the_timestep_is_discrete_and_auto_takes_differences(models, folder):
    """SD1.5's model sampling maps sigma to the nearest of its 1000 training timesteps (an argmin): forward mode would
    see no derivative through the noise level and give wrong statistics without any error, so it is refused; auto
    computes with finite differences and records that in the file."""
    from safetensors import safe_open

    settings = {"grid_points": 2, "samples": 2, "chunk": 2, "recompute": True}
    with pytest.raises(ValueError, match=r"forward derivatives: this model maps the noise level to discrete "
                                         r"timesteps"):
        statistics(models["sd15"], "sd15", derivatives="forward", **settings)
    counter = counted(models["sd15"])
    _, path = statistics(counter.model, "sd15", derivatives="auto", **settings)
    assert counter.calls == 3 * 2 * 2  # two calls per finite-difference JVP
    with safe_open(path, "pt") as f:
        assert json.dumps(f.metadata()).count("finite_difference") >= 1
        assert "forward" not in json.dumps(f.metadata()).replace("finite_difference", "")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("order,solver", [(2, "2M"), (3, "3M")])
def test_without_statistics_it_is_dpm_solver_pp(models, family, order, solver):
    model = models[family]
    (v3_sampler,) = run_node("PreprintSamplerDPMSolverV3", order=order, corrector=False, lower_order_final=True)
    (pp_sampler,) = run_node("PreprintSamplerDPMSolverPP", solver=solver, lower_order_final=True)
    sig = sigmas_for(model)
    a = run_custom_sampling(model, family, v3_sampler, sig, cfg=4.0, height=8, width=12)
    b = run_custom_sampling(model, family, pp_sampler, sig, cfg=4.0, height=8, width=12)
    torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
    # the corrector changes the result (it is not silently off)
    (corrected,) = run_node("PreprintSamplerDPMSolverV3", order=order, corrector=True, lower_order_final=True)
    c = run_custom_sampling(model, family, corrected, sig, cfg=4.0, height=8, width=12)
    assert float((c - b).abs().max()) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_ksampler_name_reads_the_saved_statistics(models, family, folder):
    model = models[family]
    with pytest.raises(ValueError, match="DPM-Solver-v3 Statistics"):
        run_sampling(model, family, sampler_name="preprint_dpm_solver_v3", scheduler="simple", steps=5, cfg=5.0,
                     height=8, width=12)
    stats, _ = statistics(model, family, cfg=5.0)
    via_name = run_sampling(model, family, sampler_name="preprint_dpm_solver_v3", scheduler="simple", steps=5,
                            cfg=5.0, height=8, width=12)
    ms = model.get_model_object("model_sampling")
    sig = comfy.samplers.calculate_sigmas(ms, "simple", 5)
    (with_stats,) = run_node("PreprintSamplerDPMSolverV3", order=2, corrector=True, lower_order_final=True,
                             statistics=stats)
    (without,) = run_node("PreprintSamplerDPMSolverV3", order=2, corrector=True, lower_order_final=True)
    node_out = run_custom_sampling(model, family, with_stats, sig, cfg=5.0, height=8, width=12)
    plain = run_custom_sampling(model, family, without, sig, cfg=5.0, height=8, width=12)
    assert torch.isfinite(via_name).all()
    torch.testing.assert_close(via_name, node_out, atol=1e-6, rtol=1e-6)
    assert float((via_name - plain).abs().max()) > 1e-4  # the statistics were used
    # another CFG has no statistics saved: the error names the node again
    with pytest.raises(ValueError, match="CFG 2"):
        run_sampling(model, family, sampler_name="preprint_dpm_solver_v3", scheduler="simple", steps=5, cfg=2.0,
                     height=8, width=12)


def test_statistics_of_another_latent_size_are_refused_clearly(models, folder):
    stats, _ = statistics(models["sd15"], "sd15", height=8, width=12)
    (sampler,) = run_node("PreprintSamplerDPMSolverV3", order=2, corrector=True, lower_order_final=True,
                          statistics=stats)
    with pytest.raises(ValueError, match="DPM-Solver-v3: the statistics were computed for latents of shape"):
        run_custom_sampling(models["sd15"], "sd15", sampler, sigmas_for(models["sd15"]), height=8, width=8)


def test_bad_derivatives_value_is_rejected_by_validation():
    from preprint.nodes.dpm_solver_v3 import PreprintDPMSolverV3Statistics

    message = PreprintDPMSolverV3Statistics.validate_inputs(derivatives="backward")
    assert isinstance(message, str) and message.startswith("DPM-Solver-v3 Statistics")


def test_ksampler_name_reads_the_cfg_of_the_guider_it_runs_under(models, folder):
    """CFGGuider's scale, 1 for core's BasicGuider; DualCFGGuider subclasses CFGGuider and inherits its cfg of 1, so
    its run is refused instead of being read at CFG 1."""
    from comfy_extras.nodes_custom_sampler import Guider_Basic, Guider_DualCFG

    model, family = models["sd15"], "sd15"
    statistics(model, family, cfg=1.0)
    name = comfy.samplers.sampler_object("preprint_dpm_solver_v3")
    pos, neg = make_conds(family)
    sig = sigmas_for(model)
    basic = Guider_Basic(model)
    basic.set_conds(pos)
    dual = Guider_DualCFG(model)
    dual.set_conds(pos, pos, neg)
    dual.set_cfg(1.0, 1.0)
    with torch.inference_mode():
        assert torch.isfinite(run_custom_sampling(model, family, name, sig, guider=basic, height=8, width=12)).all()
        with pytest.raises(ValueError, match=r"guider \(Guider_DualCFG\) has none"):
            run_custom_sampling(model, family, name, sig, guider=dual, height=8, width=12)
