"""Host tier: the Preprint solver nodes and KSampler names in real ComfyUI on tiny models."""

from __future__ import annotations

import comfy.patcher_extension
import comfy.samplers
import pytest
import torch

from .harness import counted, make_conds, run_custom_sampling, run_node, run_sampling, tiny_model

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
        counter = counted(model)
        run_custom_sampling(counter.model, family, sampler, sig, cfg=4.0)
        assert counter.calls == calls, (solver, counter.calls)  # cond + uncond batched in one call
    (sampler,) = run_node("PreprintSamplerEVODiff", lower_order_final=True)
    counter = counted(model)
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


def comfy_validation(class_type: str, **inputs) -> list[str]:
    """The errors ComfyUI's own prompt validator reports for a one-node prompt of widget values (a failed
    validate_inputs is reported once per input it names)."""
    import asyncio

    import execution

    prompt = {"1": {"class_type": class_type, "inputs": inputs}}
    ok, errors, _ = asyncio.run(execution.validate_inputs("preprint-test", prompt, "1", {}))
    assert ok == (not errors)
    return [f"{e['message']}: {e['details']}" for e in errors]


def test_dpmpp_threshold_range_is_refused_before_queueing():
    from preprint.nodes.samplers import PreprintSamplerDPMSolverPP as node

    msg = node.validate_inputs(dynamic_thresholding=True, threshold_max=1.5, threshold_floor=2.0)
    assert isinstance(msg, str) and msg.startswith("DPM-Solver++ (Preprint): threshold_max (1.5)"), msg
    msg = node.validate_inputs(dynamic_thresholding=True, threshold_max=0.0, threshold_floor=0.0)
    assert isinstance(msg, str) and msg.startswith("DPM-Solver++ (Preprint): threshold_floor"), msg
    assert node.validate_inputs(dynamic_thresholding=True, threshold_max=10.0, threshold_floor=2.0) is True
    assert node.validate_inputs(dynamic_thresholding=False, threshold_max=1.5, threshold_floor=2.0) is True
    assert node.validate_inputs(dynamic_thresholding=True, threshold_max=None, threshold_floor=2.0) is True
    widgets = {"solver": "2M", "lower_order_final": True, "dynamic_thresholding": True, "threshold_floor": 2.0}
    errors = comfy_validation("PreprintSamplerDPMSolverPP", **widgets, threshold_max=1.5)
    assert errors and all("DPM-Solver++ (Preprint): threshold_max (1.5) is below threshold_floor" in e for e in errors)
    assert comfy_validation("PreprintSamplerDPMSolverPP", **widgets, threshold_max=0.0) == []
    # options left out take execute's defaults: threshold_max 0.5 is below the default floor 1, refused only when on
    assert comfy_validation("PreprintSamplerDPMSolverPP", solver="2M", lower_order_final=True, threshold_max=0.5) == []
    assert comfy_validation("PreprintSamplerDPMSolverPP", solver="2M", lower_order_final=True,
                            dynamic_thresholding=True, threshold_max=0.5) != []


def test_momentum_choices_are_refused_before_queueing():
    from preprint.nodes.samplers import PreprintSamplerMomentum as node

    msg = node.validate_inputs(solver="dpmpp_2m", momentum="ghvb")
    assert isinstance(msg, str) and msg.startswith("Momentum Solver (GHVB / Heavy Ball, Preprint): GHVB is defined")
    msg = node.validate_inputs(solver="dpmpp_4m", momentum="hb")
    assert isinstance(msg, str)
    assert msg.startswith("Momentum Solver (GHVB / Heavy Ball, Preprint): solver = 'dpmpp_4m' is not one of its")
    assert node.validate_inputs(solver="dpmpp_2m", momentum="hb") is True
    assert node.validate_inputs(solver="plms", momentum="ghvb") is True
    widgets = {"solver": "dpmpp_2m", "order": 2, "beta": 0.8}
    errors = comfy_validation("PreprintSamplerMomentum", **widgets, momentum="ghvb")
    assert errors and all("Momentum Solver (GHVB / Heavy Ball, Preprint): GHVB is defined for PLMS" in e
                          for e in errors)
    assert comfy_validation("PreprintSamplerMomentum", **widgets, momentum="hb") == []
    # the inputs the check does not name keep ComfyUI's own range check
    (error,) = comfy_validation("PreprintSamplerMomentum", **{**widgets, "beta": 5.0}, momentum="hb")
    assert "bigger than max" in error


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
    counter = counted(model)
    out = run_custom_sampling(counter.model, family, node, sig, cfg=4.0)
    ref = run_custom_sampling(model, family, dpmpp_direct(variant, family, False), sig, cfg=4.0)
    assert torch.equal(out, ref)
    assert counter.calls == CALLS_PER_RUN[variant]


def model_time(model):
    """The model's own sigma -> timestep map (``model_sampling.timestep``), as DEIS is meant to receive it."""
    ms = model.get_model_object("model_sampling")
    return lambda s: ms.timestep(s.float()).to(torch.float64)


def ksampler_promise(name, model):
    """What each registered KSampler name promises, written out here independently of nodes/samplers.py:
    (solver function, its options, model calls per STEPS-step run, a one-option-off alternative)."""
    from preprint.samplers import deis, dpm_solver_pp, evodiff, momentum

    multistep, singlestep = dpm_solver_pp.sample_dpmpp_multistep, dpm_solver_pp.sample_dpmpp_singlestep
    deis_options = {"order": 3, "poly_space": "lambda", "lower_order_final": True, "time_fn": model_time(model)}
    return {
        # (2M's lower_order_final only acts on the last step, which a KSampler list always takes to sigma 0)
        "preprint_dpmpp_2m": (multistep, {"order": 2, "lower_order_final": False}, STEPS,
                              (multistep, {"order": 3, "lower_order_final": False})),
        "preprint_dpmpp_3m": (multistep, {"order": 3, "lower_order_final": True}, STEPS,
                              (multistep, {"order": 3, "lower_order_final": False})),
        "preprint_dpmpp_2s": (singlestep, {"order": 2}, CALLS_PER_RUN["2S"], (singlestep, {"order": 3})),
        "preprint_dpmpp_3s": (singlestep, {"order": 3}, CALLS_PER_RUN["3S"], (singlestep, {"order": 2})),
        "preprint_deis": (deis.sample_deis, deis_options, STEPS,
                          (deis.sample_deis, {**deis_options, "poly_space": "t"})),
        # the paper's fractional order 2.8 = GHVB order 3 with beta 0.8; the alternative is plain PLMS 3
        "preprint_ghvb": (momentum.sample_plms_momentum, {"order": 2.8, "momentum": "ghvb"}, STEPS,
                          (momentum.sample_plms_momentum, {"order": 3.0, "momentum": "ghvb"})),
        "preprint_evodiff": (evodiff.sample_evodiff, {"lower_order_final": True}, STEPS,
                             (multistep, {"order": 2, "lower_order_final": True})),
    }[name]


PROMISED_KSAMPLER_NAMES = ["preprint_dpmpp_2m", "preprint_dpmpp_3m", "preprint_dpmpp_2s", "preprint_dpmpp_3s",
                           "preprint_deis", "preprint_ghvb", "preprint_evodiff"]


# names that read a calibration saved on the model, tested with it in their own files
CALIBRATED_KSAMPLER_NAMES = ["preprint_dpm_solver_v3"]  # tests/host/test_dpm_solver_v3.py


def test_the_pack_registers_exactly_the_tested_ksampler_names():
    """A name added without a promise above would go untested: the list of registered names is pinned."""
    ours = sorted(n for n in comfy.samplers.KSampler.SAMPLERS if n.startswith("preprint_"))
    assert ours == sorted(PROMISED_KSAMPLER_NAMES + CALIBRATED_KSAMPLER_NAMES)


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("name", PROMISED_KSAMPLER_NAMES)
def test_ksampler_names_are_the_intended_solver(models, family, name):
    """Each preprint_* name from the stock KSampler equals its solver called directly on the same sigmas (with the
    model's parameterisation, and for DEIS its own time map), bit for bit, at its own cost in model calls."""
    model = models[family]
    scheduler = "simple" if family == "flux" else "karras"
    fn, options, calls, (alt_fn, alt_options) = ksampler_promise(name, model)
    counter = counted(model)
    out = run_sampling(counter.model, family, sampler_name=name, scheduler=scheduler, steps=STEPS, cfg=4.0)
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, STEPS)
    ref = run_custom_sampling(model, family, direct(fn, parameterisation=kind_of(family), **options), sig, cfg=4.0)
    assert torch.equal(out, ref)
    assert counter.calls == calls, counter.calls
    # teeth: one option off moves the result (measured: sd15 0.045 for deis lambda -> t and ghvb 2.8 -> 3, 0.28 to 73
    # for the others; flux 0.23 to 1.0), far above float32 rounding (ulp 3e-5 at the outputs' |x| ~ 270)
    alt = run_custom_sampling(model, family, direct(alt_fn, parameterisation=kind_of(family), **alt_options), sig,
                              cfg=4.0)
    assert float((alt - ref).abs().max()) > 1e-3, name


def node_promises(group):
    """Node settings and the solver call each promises (function, options), written out independently of
    nodes/samplers.py. Returns (family, steps, whether the sigma list ends at 0, cases)."""
    import math

    from preprint.samplers import deis, dpm_solver_pp, evodiff, momentum

    multistep, singlestep = dpm_solver_pp.sample_dpmpp_multistep, dpm_solver_pp.sample_dpmpp_singlestep
    dpmpp, deis_node, mom, evo = ("PreprintSamplerDPMSolverPP", "PreprintSamplerDEIS", "PreprintSamplerMomentum",
                                  "PreprintSamplerEVODiff")
    if group == "dpmpp_lower_order_final":
        # on a list ending at 0 the last step is the x0 itself whatever the order: end above 0 so 2M's option acts,
        # with 5 steps, so that 3M with lower-order final steps still takes one third-order step (unlike 2M's)
        return "sd15", STEPS + 1, False, [
            (dpmpp, {"solver": s, "lower_order_final": lof}, multistep, {"order": int(s[0]), "lower_order_final": lof})
            for s in ("2M", "3M") for lof in (False, True)]
    if group == "dpmpp_flow_lambda":
        return "flux", 3, True, [
            (dpmpp, {"solver": "2M", "lower_order_final": True, "flow_lambda": "sigma"}, multistep,
             {"order": 2, "flow_lambda": "sigma"}),
            (dpmpp, {"solver": "2M", "lower_order_final": True, "flow_lambda": "log_snr"}, multistep,
             {"order": 2, "flow_lambda": "log_snr"}),
            (dpmpp, {"solver": "3S", "lower_order_final": True, "flow_lambda": "log_snr"}, singlestep,
             {"order": 3, "flow_lambda": "log_snr"}),
            (dpmpp, {"solver": "3S", "lower_order_final": True, "flow_lambda": "sigma"}, singlestep,
             {"order": 3, "flow_lambda": "sigma"}),
        ]
    if group == "dpmpp_thresholding":
        # the tiny model's |x0| has median ~9, 90th percentile ~22, 99.5th ~38: floor 30 and ceiling 15 both bind
        def case(on, p, floor, ceiling):
            inputs = {"solver": "2M", "lower_order_final": True, "dynamic_thresholding": on,
                      "threshold_percentile": p, "threshold_floor": floor, "threshold_max": ceiling}
            return (dpmpp, inputs, multistep, {"order": 2, "threshold_percentile": p if on else 0.0,
                                               "threshold_floor": floor,
                                               "threshold_max": ceiling if ceiling > 0 else math.inf})
        return "sd15", STEPS, True, [case(False, 0.5, 1.0, 0.0), case(True, 0.9, 1.0, 0.0), case(True, 0.5, 1.0, 0.0),
                                     case(True, 0.9, 30.0, 0.0), case(True, 0.9, 1.0, 15.0)]
    if group == "deis":
        def case(order, space, lof):
            return (deis_node, {"order": order, "poly_space": space, "lower_order_final": lof}, deis.sample_deis,
                    {"order": order, "poly_space": space, "lower_order_final": lof})
        return "sd15", STEPS, True, [case(3, "t", False), case(2, "t", False), case(1, "t", False),
                                     case(3, "lambda", False), case(3, "rho", False), case(3, "lambda", True)]
    if group == "momentum":
        plms, hb = momentum.sample_plms_momentum, momentum.sample_dpmpp_hb

        def case(solver, kind, order, beta, fn, options):
            return (mom, {"solver": solver, "momentum": kind, "order": order, "beta": beta}, fn, options)

        return "sd15", STEPS, True, [
            # the paper's fractional order: order k with beta b is k - 1 + b
            case("plms", "ghvb", 4, 0.7, plms, {"order": 3.7, "momentum": "ghvb"}),
            case("plms", "ghvb", 3, 0.7, plms, {"order": 2.7, "momentum": "ghvb"}),
            case("plms", "ghvb", 4, 0.5, plms, {"order": 3.5, "momentum": "ghvb"}),
            case("plms", "hb", 4, 0.7, plms, {"order": 3.7, "momentum": "hb"}),
            case("plms", "ghvb", 2, 1.0, plms, {"order": 2.0, "momentum": "ghvb"}),
            # DPM-Solver++ takes its order from the solver name: the order input is ignored there
            case("dpmpp_2m", "hb", 3, 0.8, hb, {"order": 2, "beta": 0.8}),
            case("dpmpp_3m", "hb", 2, 0.8, hb, {"order": 3, "beta": 0.8}),
            case("dpmpp_3m", "hb", 3, 0.6, hb, {"order": 3, "beta": 0.6}),
        ]
    if group == "evodiff":
        # lower_order_final only acts on a list that does not end at sigma 0 (the last jump to 0 is the x0 itself)
        return "sd15", STEPS, False, [(evo, {"lower_order_final": lof}, evodiff.sample_evodiff,
                                       {"lower_order_final": lof}) for lof in (True, False)]
    raise KeyError(group)


@pytest.mark.parametrize("group", ["dpmpp_lower_order_final", "dpmpp_flow_lambda", "dpmpp_thresholding", "deis",
                                   "momentum", "evodiff"])
def test_every_node_setting_is_its_solver_called_directly(models, group):
    """Each setting of a sampler node equals its solver function called directly with the promised options, bit for
    bit; and within a group every setting gives a different result, so an option the node dropped, swapped or
    mis-mapped shows up as a mismatch."""
    family, steps, ends_at_zero, cases = node_promises(group)
    model = models[family]
    sig = sigmas_for(model, steps)
    if not ends_at_zero:
        sig = sig[:-1]
    refs = []
    for node, inputs, fn, options in cases:
        (sampler,) = run_node(node, **inputs)
        out = run_custom_sampling(model, family, sampler, sig, cfg=4.0)
        extra = {"time_fn": model_time(model)} if fn.__name__ == "sample_deis" else {}
        ref = run_custom_sampling(model, family, direct(fn, parameterisation=kind_of(family), **options, **extra), sig,
                                  cfg=4.0)
        assert torch.equal(out, ref), (node, inputs)
        refs.append(ref)
    # smallest gap between two settings of a group, measured: deis 1.0e-2, momentum 1.4e-2, flow_lambda 4.6e-2,
    # lower_order_final 0.14, thresholding 0.25, evodiff 43 (outputs up to |x| ~ 270, float32 ulp there 3e-5);
    # 1e-3 keeps every setting clear of rounding while the equality above has zero tolerance
    gaps = [float((a - b).abs().max()) for i, a in enumerate(refs) for b in refs[i + 1:]]
    assert min(gaps) > 1e-3, gaps


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


@pytest.mark.parametrize("variant", list(CALLS_PER_RUN))
def test_dpmpp_dynamic_thresholding_bounds_every_data_prediction(models, variant):
    """On: every x0 the solver steps with lies in [-1, 1] (x0 clipped to [-s, s] and divided by s, s = the
    per-sample percentile of |x0|), and the entries beyond the percentile sit exactly on the bound: a share of
    about 1 - percentile."""
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
        # 256 entries per sample: 26 lie above the interpolated 90th percentile, 26 / 256 = 0.102. The tolerance
        # 0.01 is far below what a lost percentile would give (0.5 at 0.5, 0.004 at the default 0.995, 0 when off)
        share = float((d.abs() == 1.0).double().mean())
        assert abs(share - 0.1) <= 0.01, share


@pytest.fixture(scope="module")
def time_map_models(models):
    """Models whose sigma -> timestep map is not SD's: ComfyUI's continuous EDM sampling (t = log(sigma) / 4),
    a discrete schedule with DDPM's betas (1e-4..2e-2 instead of SD's 0.00085..0.012) and Flux (t = sigma)."""
    import types

    import comfy.model_sampling
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    (edm,) = ModelSamplingContinuousEDM().patch(models["sd15"], "eps", 120.0, 0.002)

    class DDPMBetas(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    ddpm = models["sd15"].clone()
    ddpm.add_object_patch("model_sampling", DDPMBetas(types.SimpleNamespace(
        sampling_settings={"beta_schedule": "linear", "linear_start": 1e-4, "linear_end": 2e-2})))
    return {"sd15": (models["sd15"], "sd15"), "edm": (edm, "sd15"), "ddpm_betas": (ddpm, "sd15"),
            "flux": (models["flux"], "flux")}


@pytest.mark.parametrize("which", ["sd15", "edm", "ddpm_betas", "flux"])
def test_deis_integrates_on_the_models_own_timestep_map(time_map_models, which):
    """poly_space t: the node equals sample_deis given this model's own sigma -> timestep map (and its
    parameterisation), bit for bit; where that map is not SD's, SD's map gives a clearly different result."""
    from preprint.samplers import deis

    model, family = time_map_models[which]
    sig = sigmas_for(model, 6)
    (node,) = run_node("PreprintSamplerDEIS", order=3, poly_space="t", lower_order_final=True)
    out = run_custom_sampling(model, family, node, sig, cfg=4.0)
    options = {"order": 3, "poly_space": "t", "parameterisation": kind_of(family), "lower_order_final": True}
    own = run_custom_sampling(model, family, direct(deis.sample_deis, time_fn=model_time(model), **options), sig,
                              cfg=4.0)
    assert torch.equal(out, own)
    if which != "sd15":
        # SD1.x / SDXL's discrete map (what DEIS assumes when the host gives no map). Measured max differences:
        # edm 0.45, flux 0.040, ddpm_betas 0.023 (outputs up to |x| ~ 700 there: float32 ulp 6e-5); on sd15 itself
        # only the rounding of ComfyUI's discrete timestep to whole steps differs (0.0017), so it is left out
        sd_map = run_custom_sampling(model, family, direct(deis.sample_deis, time_fn=deis.sd_discrete_timestep,
                                                           **options), sig, cfg=4.0)
        assert float((sd_map - own).abs().max()) > 5e-3
