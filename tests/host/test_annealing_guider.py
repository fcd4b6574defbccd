"""The Annealing Guidance guider (arXiv:2506.24108) through real ComfyUI: with euler_cfg_pp it is the pack's
annealing sampler (the paper's Algorithm 4); with a constant scheduler it is plain CFG with any sampler; the
scheduler sees each evaluation's timestep, lambda and guidance direction; later post-CFG hooks see the learned
result; and its errors."""

from __future__ import annotations

import comfy.samplers
import pytest
import torch

from preprint.guidance import annealing
from preprint.guidance.annealing import constant_scheduler, save_scheduler

from .harness import make_conds, make_latent, make_noise, run_custom_sampling, run_node
from .test_cfg import CFG, STEPS, RecordingScheduler, count_calls, models, scheduled, scheduler_dir, sigmas_of  # noqa: F401


def guider(m, family, file="const.safetensors", lam=0.4):
    pos, neg = make_conds(family)
    return run_node("PreprintAnnealingGuidanceGuider", model=m, positive=pos, negative=neg, scheduler_file=file,
                    guidance_lambda=lam)[0]


def sample(g, family, sampler, sig):
    latent = make_latent(family)
    return g.sample(make_noise(latent), latent, comfy.samplers.sampler_object(sampler), sig, seed=0,
                    disable_pbar=True)


class Ramp(annealing.GuidanceScheduler):
    """A scale that moves with the timestep and the guidance norm, so a wrong input gives another image."""

    def __init__(self):
        pass

    def __call__(self, timestep, lam, eps_uncond, eps_cond):
        norm = (eps_uncond - eps_cond).float().flatten(1).norm(dim=1)
        return 1.5 + float(timestep) / 250.0 + 0.1 * norm + float(lam)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_with_euler_cfg_pp_it_is_the_annealing_sampler(models, family, scheduler_dir):
    m = models[family]
    save_scheduler(constant_scheduler(CFG), scheduler_dir / "const.safetensors")
    sig = sigmas_of(m)
    g = guider(m, family)
    ramp = Ramp()
    g.scheduler = ramp
    sampler = run_node("PreprintSamplerAnnealingGuidance", scheduler_file="const.safetensors", guidance_lambda=0.4,
                       renoise="unconditional (paper)")[0]
    sampler.extra_options["scheduler"] = ramp
    with count_calls(m) as counter:
        g.model_patcher = counter.model
        out = sample(g, family, "euler_cfg_pp", sig)
    ref = run_custom_sampling(m, family, sampler, sig, cfg=1.0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert counter.rows == [2] * STEPS  # both branches once per step, though the nominal scale is 1
    plain = run_custom_sampling(m, family, comfy.samplers.sampler_object("euler_cfg_pp"), sig, cfg=CFG)
    assert (out - plain).abs().max() > 1e-2  # the learned scale differs from the constant CFG it would replace


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
def test_a_constant_scheduler_is_plain_cfg_with_any_sampler(models, family, sampler, scheduler_dir):
    m = models[family]
    save_scheduler(constant_scheduler(CFG), scheduler_dir / "const.safetensors")
    sig = sigmas_of(m)
    out = sample(guider(m, family), family, sampler, sig)
    ref = run_custom_sampling(m, family, comfy.samplers.sampler_object(sampler), sig, cfg=CFG)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_the_scheduler_gets_each_evaluations_timestep_lambda_and_direction(models, family, scheduler_dir):
    m = models[family]
    save_scheduler(constant_scheduler(CFG), scheduler_dir / "const.safetensors")
    g = guider(m, family, lam=0.7)
    recorder = RecordingScheduler(g.scheduler)
    g.scheduler = recorder
    sig = sigmas_of(m)
    sample(g, family, "heun", sig)  # two evaluations per step but the last
    assert len(recorder.calls) == 2 * STEPS - 1
    sampler = run_node("PreprintSamplerAnnealingGuidance", scheduler_file="const.safetensors", guidance_lambda=0.7,
                       renoise="unconditional (paper)")[0]
    reference = RecordingScheduler(sampler.extra_options["scheduler"])
    sampler.extra_options["scheduler"] = reference
    run_custom_sampling(m, family, sampler, sig, cfg=CFG)
    # the first evaluation of each step is at the step's sigma: the same timestep and lambda the sampler feeds
    firsts = recorder.calls[0::2]
    for (t, lam, eu, ec), (t_ref, lam_ref, eu_ref, ec_ref) in zip(firsts[:1], reference.calls[:1], strict=True):
        assert (t, lam) == pytest.approx((t_ref, lam_ref))
        torch.testing.assert_close(eu, eu_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ec, ec_ref, rtol=1e-4, atol=1e-4)
    assert [c[0] for c in firsts] == pytest.approx([c[0] for c in reference.calls], abs=0.5)


def test_later_post_cfg_hooks_see_the_learned_result(models, scheduler_dir):
    m = models["sd15"]
    save_scheduler(constant_scheduler(7.0), scheduler_dir / "seven.safetensors")
    seen = []

    def later(args):
        seen.append((args["denoised"].clone(), args["cond_denoised"], args["uncond_denoised"]))
        return args["denoised"]

    pm = m.clone()
    pm.set_model_sampler_post_cfg_function(later)
    sample(guider(pm, "sd15", file="seven.safetensors"), "sd15", "euler", sigmas_of(m))
    assert len(seen) == STEPS
    for d, c, u in seen:
        torch.testing.assert_close(d, u + 7.0 * (c - u), rtol=1e-4, atol=1e-4)


def test_refuses_scheduled_cfg_on_the_model(models, scheduler_dir):
    m = models["sd15"]
    save_scheduler(constant_scheduler(CFG), scheduler_dir / "const.safetensors")
    with pytest.raises(ValueError, match=r"^Scheduled CFG.*the guider AnnealingGuider combines its conditionings"):
        sample(guider(scheduled(m), "sd15"), "sd15", "euler", sigmas_of(m))


def test_missing_scheduler_file_is_a_clear_error(models, scheduler_dir):
    with pytest.raises(ValueError, match="not found.*annealing_convert"):
        guider(models["sd15"], "sd15", file="absent.safetensors")
