"""Host tier: the Preprint solver nodes and KSampler names in real ComfyUI on tiny models."""

from __future__ import annotations

import comfy.patcher_extension
import comfy.samplers
import pytest
import torch

from .harness import make_conds, run_custom_sampling, run_node, run_sampling, tiny_model

FAMILIES = ["sd15", "sd15_v", "sdxl", "flux"]
STEPS = 5

NODE_SETTINGS = [
    ("PreprintSamplerDPMSolverPP", {"solver": "2S", "lower_order_final": True}),
    ("PreprintSamplerDPMSolverPP", {"solver": "3S", "lower_order_final": True, "flow_lambda": "log_snr"}),
    ("PreprintSamplerDPMSolverPP", {"solver": "3M", "lower_order_final": True, "dynamic_thresholding": True}),
    ("PreprintSamplerDEIS", {"order": 3, "poly_space": "t", "lower_order_final": True}),
    ("PreprintSamplerDEIS", {"order": 3, "poly_space": "lambda", "lower_order_final": True}),
    ("PreprintSamplerMomentum", {"solver": "plms", "momentum": "ghvb", "order": 4, "beta": 0.7}),
    ("PreprintSamplerMomentum", {"solver": "dpmpp_3m", "momentum": "hb", "order": 2, "beta": 0.8}),
    ("PreprintSamplerEVODiff", {"lower_order_final": True}),
]
KSAMPLER_NAMES = ["preprint_dpmpp_3m", "preprint_dpmpp_2s", "preprint_dpmpp_3s", "preprint_deis", "preprint_ghvb",
                  "preprint_evodiff"]


class Calls:
    """Counts diffusion-model forward calls through a DIFFUSION_MODEL wrapper on a clone."""

    def __init__(self, model):
        self.calls = 0
        self.model = model.clone()
        self.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                        "preprint_test_solver_calls", self.wrapper)

    def wrapper(self, executor, *args, **kwargs):
        self.calls += 1
        return executor(*args, **kwargs)


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


def sigmas_for(model, steps=STEPS):
    ms = model.get_model_object("model_sampling")
    scheduler = "simple" if "flux" in str(type(ms)).lower() else "karras"
    return comfy.samplers.calculate_sigmas(ms, scheduler, steps)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("node,inputs", NODE_SETTINGS, ids=lambda v: v if isinstance(v, str) else "-".join(
    str(x) for x in v.values()))
def test_node_samplers_run_from_sampler_custom_advanced(models, family, node, inputs):
    model = models[family]
    (sampler,) = run_node(node, **inputs)
    out = run_custom_sampling(model, family, sampler, sigmas_for(model), cfg=4.0)
    assert torch.isfinite(out).all()
    again = run_custom_sampling(model, family, sampler, sigmas_for(model), cfg=4.0)
    assert torch.equal(out, again)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", KSAMPLER_NAMES)
def test_registered_names_run_from_the_stock_ksampler(models, family, name):
    assert name in comfy.samplers.KSampler.SAMPLERS
    model = models[family]
    scheduler = "simple" if family == "flux" else "karras"
    out = run_sampling(model, family, sampler_name=name, scheduler=scheduler, steps=STEPS, cfg=4.0, batch=2)
    assert out.shape[0] == 2 and torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_model_calls_per_step(models, family):
    """Singlestep 2S / 3S cost 2 / 3 calls per step (1 for the final jump to 0); the others 1 per step."""
    model = models[family]
    sig = sigmas_for(model)
    expected = {"2S": 2 * (STEPS - 1) + 1, "3S": 3 * (STEPS - 1) + 1, "2M": STEPS}
    for solver, calls in expected.items():
        (sampler,) = run_node("PreprintSamplerDPMSolverPP", solver=solver, lower_order_final=True)
        counter = Calls(model)
        run_custom_sampling(counter.model, family, sampler, sig, cfg=4.0)
        assert counter.calls == calls, (solver, counter.calls)  # cond + uncond batched in one call
    (sampler,) = run_node("PreprintSamplerEVODiff", lower_order_final=True)
    counter = Calls(model)
    run_custom_sampling(counter.model, family, sampler, sig, cfg=4.0)
    assert counter.calls == STEPS


def test_momentum_beta_one_equals_the_plain_node_on_a_real_model(models):
    model = models["sdxl"]
    sig = sigmas_for(model, 8)
    (plain,) = run_node("PreprintSamplerDPMSolverPP", solver="3M", lower_order_final=True)
    (hb,) = run_node("PreprintSamplerMomentum", solver="dpmpp_3m", momentum="hb", order=3, beta=1.0)
    assert torch.equal(run_custom_sampling(model, "sdxl", plain, sig), run_custom_sampling(model, "sdxl", hb, sig))


def test_ghvb_with_dpmpp_is_refused_clearly():
    with pytest.raises(ValueError, match="GHVB is defined for PLMS"):
        run_node("PreprintSamplerMomentum", solver="dpmpp_2m", momentum="ghvb", order=2, beta=0.8)


def test_deis_uses_the_models_own_timesteps(models):
    """On a real SD model poly_space t must follow ModelSamplingDiscrete.timestep: it differs from rho."""
    model = models["sd15"]
    sig = sigmas_for(model, 8)
    (t_space,) = run_node("PreprintSamplerDEIS", order=3, poly_space="t", lower_order_final=True)
    (rho,) = run_node("PreprintSamplerDEIS", order=3, poly_space="rho", lower_order_final=True)
    a = run_custom_sampling(model, "sd15", t_space, sig)
    b = run_custom_sampling(model, "sd15", rho, sig)
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_dpmpp_thresholding_inputs_reach_the_sampler():
    """threshold_floor is the official DPM-Solver++ thresholding_max_val (a floor on s); threshold_max is the
    optional ceiling (0 = none, the official rule); a ceiling below the floor is refused with a clear message."""
    import math

    (official,) = run_node("PreprintSamplerDPMSolverPP", solver="2M", lower_order_final=True,
                           dynamic_thresholding=True, threshold_percentile=0.995)
    opts = official.extra_options
    assert opts["threshold_floor"] == 1.0 and math.isinf(opts["threshold_max"])
    assert opts["threshold_percentile"] == 0.995
    (capped,) = run_node("PreprintSamplerDPMSolverPP", solver="2M", lower_order_final=True,
                         dynamic_thresholding=True, threshold_max=10.0, threshold_floor=2.0)
    assert capped.extra_options["threshold_max"] == 10.0 and capped.extra_options["threshold_floor"] == 2.0
    with pytest.raises(ValueError, match="threshold_floor"):
        run_node("PreprintSamplerDPMSolverPP", solver="2M", lower_order_final=True, dynamic_thresholding=True,
                 threshold_max=1.5, threshold_floor=2.0)


def direct(fn, **options):
    """A SAMPLER calling a solver function of samplers/ directly, with its parameters spelled out."""
    return comfy.samplers.KSAMPLER(lambda model, x, sigmas, extra_args=None, callback=None, disable=None:
                                   fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                      **options))


def kind_of(family):
    return "flow" if family in ("flux", "sd3") else "eps"


def dpmpp_direct(variant, family, lower_order_final):
    from preprint.samplers import dpm_solver_pp

    order = int(variant[0])
    if variant.endswith("M"):
        return direct(dpm_solver_pp.sample_dpmpp_multistep, order=order, parameterisation=kind_of(family),
                      lower_order_final=lower_order_final, flow_lambda="auto")
    return direct(dpm_solver_pp.sample_dpmpp_singlestep, order=order, parameterisation=kind_of(family),
                  flow_lambda="auto")


CALLS_PER_RUN = {"2M": STEPS, "3M": STEPS, "2S": 2 * (STEPS - 1) + 1, "3S": 3 * (STEPS - 1) + 1}


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("variant", list(CALLS_PER_RUN))
def test_dpmpp_node_setting_is_the_intended_solver(models, family, variant):
    """Each solver setting runs its own function, order and parameterisation, at its own cost in calls."""
    model = models[family]
    sig = sigmas_for(model)
    # lower_order_final off: a node that dropped the option would take the lower-order last steps
    (node,) = run_node("PreprintSamplerDPMSolverPP", solver=variant, lower_order_final=False)
    counter = Calls(model)
    out = run_custom_sampling(counter.model, family, node, sig, cfg=4.0)
    ref = run_custom_sampling(model, family, dpmpp_direct(variant, family, False), sig, cfg=4.0)
    assert torch.equal(out, ref)
    assert counter.calls == CALLS_PER_RUN[variant]


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("variant,lower_order_final", [("2M", False), ("3M", True), ("2S", True), ("3S", True)])
def test_ksampler_names_are_the_intended_solver(models, family, variant, lower_order_final):
    """preprint_dpmpp_* from the stock KSampler equals the solver called directly on the same sigmas."""
    model = models[family]
    name = f"preprint_dpmpp_{variant.lower()}"
    scheduler = "simple" if family == "flux" else "karras"
    counter = Calls(model)
    out = run_sampling(counter.model, family, sampler_name=name, scheduler=scheduler, steps=STEPS, cfg=4.0)
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, STEPS)
    ref = run_custom_sampling(model, family, dpmpp_direct(variant, family, lower_order_final), sig, cfg=4.0)
    assert torch.equal(out, ref)
    assert counter.calls == CALLS_PER_RUN[variant]


def denoised_seen(model, family, sampler, sig):
    from .harness import make_latent, make_noise

    latent = make_latent(family)
    pos, neg = make_conds(family)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(8.0)
    seen: list[torch.Tensor] = []
    guider.sample(make_noise(latent, 0), latent, sampler, sig, seed=0, disable_pbar=True,
                  callback=lambda i, denoised, x, total: seen.append(denoised.detach().clone()))
    return seen


@pytest.mark.parametrize("variant", ["2M", "3S"])
def test_dpmpp_dynamic_thresholding_bounds_every_data_prediction(models, variant):
    """On: every x0 the solver steps with lies in [-1, 1] (x0 clipped to [-s, s] and divided by s, s >= 1)."""
    model = models["sd15"]
    sig = sigmas_for(model)
    (off,) = run_node("PreprintSamplerDPMSolverPP", solver=variant, lower_order_final=True)
    (on,) = run_node("PreprintSamplerDPMSolverPP", solver=variant, lower_order_final=True,
                     dynamic_thresholding=True, threshold_percentile=0.9)
    free = denoised_seen(model, "sd15", off, sig)
    assert max(float(d.abs().max()) for d in free) > 1.5  # without it the bound would hold by accident
    bounded = denoised_seen(model, "sd15", on, sig)
    assert len(bounded) == STEPS
    for d in bounded:
        assert float(d.abs().max()) <= 1.0 + 1e-6


@pytest.fixture(scope="module")
def edm_model(models):
    """sd15 with ComfyUI's continuous EDM sampling: timestep = log(sigma) / 4, unlike SD's discrete table."""
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    (patched,) = ModelSamplingContinuousEDM().patch(models["sd15"], "eps", 120.0, 0.002)
    return patched


@pytest.mark.parametrize("poly_space", ["t", "lambda"])
def test_deis_integrates_on_the_models_own_timestep_map(edm_model, poly_space):
    """The node equals sample_deis given this model's sigma -> timestep map, and not the SD default map."""
    from preprint.samplers import deis

    ms = edm_model.get_model_object("model_sampling")
    sig = comfy.samplers.calculate_sigmas(ms, "karras", 6)

    def time_fn(s):
        return ms.timestep(s.float()).to(torch.float64)

    (node,) = run_node("PreprintSamplerDEIS", order=3, poly_space=poly_space, lower_order_final=True)
    out = run_custom_sampling(edm_model, "sd15", node, sig, cfg=4.0)
    own = run_custom_sampling(edm_model, "sd15", direct(deis.sample_deis, order=3, poly_space=poly_space,
                                                       parameterisation="eps", time_fn=time_fn,
                                                       lower_order_final=True), sig, cfg=4.0)
    torch.testing.assert_close(out, own, atol=1e-6, rtol=0)
    if poly_space == "t":
        sd_map = run_custom_sampling(edm_model, "sd15", direct(deis.sample_deis, order=3, poly_space="t",
                                                              parameterisation="eps", lower_order_final=True),
                                     sig, cfg=4.0)
        assert float((sd_map - own).abs().max()) > 1e-3  # the map matters here, so the check above has teeth
