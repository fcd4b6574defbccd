"""Host tier: Time-Shift, Omegance and AdaptiveDiffusion wrappers in real ComfyUI on tiny models."""

from __future__ import annotations

import comfy.patcher_extension
import comfy.samplers
import pytest
import torch

from .harness import make_conds, run_custom_sampling, run_node, tiny_model

FAMILIES = ["sd15", "sd15_v", "sdxl", "flux"]
STEPS = 6


def sigmas_for(model, steps=STEPS, scheduler="karras"):
    ms = model.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(ms, scheduler if "flux" not in str(type(ms)).lower() else "simple", steps)


def sample(model, family, sampler, steps=STEPS, cfg=4.0):
    return run_custom_sampling(model, family, sampler, sigmas_for(model, steps), cfg=cfg)


class Timesteps:
    """Records the timesteps the diffusion model is called with (DIFFUSION_MODEL wrapper)."""

    def __init__(self, model):
        self.seen: list[torch.Tensor] = []
        self.model = model.clone()
        self.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "preprint_test_ts",
                                        self.wrapper)

    def wrapper(self, executor, *args, **kwargs):
        self.seen.append(args[1].detach().clone().float())
        return executor(*args, **kwargs)


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


@pytest.mark.parametrize("family,base", [("sd15", "euler"), ("sd15_v", "dpmpp_2m"), ("sdxl", "preprint_dpmpp_2m"),
                                         ("flux", "dpmpp_2m"), ("flux", "preprint_dpmpp_2m")])
def test_neutral_settings_reproduce_the_plain_sampler_exactly(models, family, base):
    model = models[family]
    inner = comfy.samplers.sampler_object(base)
    plain = sample(model, family, inner)
    neutral = {
        "PreprintTimeShiftSampler": {"window": 0.0, "cutoff": 300.0, "data_variance": 0.0},
        "PreprintOmeganceSampler": {"omega": 0.0, "schedule": "linear", "omega_end": 0.0, "mask_omega": 0.0},
        "PreprintAdaptiveDiffusionSampler": {"threshold": 0.0, "max_skips": 4},
    }
    for node, inputs in neutral.items():
        (wrapped,) = run_node(node, sampler=inner, **inputs)
        assert torch.equal(sample(model, family, wrapped), plain), node


@pytest.mark.parametrize("family", FAMILIES)
def test_time_shift_feeds_shifted_timesteps_to_the_network(models, family):
    inner = comfy.samplers.sampler_object("dpmpp_2m")
    plain_rec, shift_rec = Timesteps(models[family]), Timesteps(models[family])
    plain = sample(plain_rec.model, family, inner)
    (wrapped,) = run_node("PreprintTimeShiftSampler", sampler=inner, window=60.0, cutoff=0.0, data_variance=0.0)
    out = sample(shift_rec.model, family, wrapped)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert len(plain_rec.seen) == len(shift_rec.seen) == STEPS  # no extra model calls
    moved = [not torch.allclose(a, b) for a, b in zip(plain_rec.seen, shift_rec.seen, strict=True)]
    assert any(moved), (plain_rec.seen, shift_rec.seen)
    # the shift stays inside the window: at most 30 of 1000 training steps either way
    ms = models[family].get_model_object("model_sampling")
    top = float(ms.timestep(torch.tensor([float(ms.sigma_max)])).float()[0])
    for a, b in zip(plain_rec.seen, shift_rec.seen, strict=True):
        assert float((a - b).abs().max()) <= top * 0.0305 + 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_omegance_with_schedule_and_mask_changes_only_what_it_should(models, family):
    model = models[family]
    inner = comfy.samplers.sampler_object("euler")
    plain = sample(model, family, inner)
    (glob,) = run_node("PreprintOmeganceSampler", sampler=inner, omega=10.0, schedule="cosine", omega_end=-10.0,
                       mask_omega=0.0)
    out = sample(model, family, glob)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    mask = torch.zeros(1, 37, 53)  # an odd size: resized to the latent explicitly
    mask[:, :, :26] = 1.0
    (masked,) = run_node("PreprintOmeganceSampler", sampler=inner, omega=10.0, schedule="constant", omega_end=0.0,
                         mask_omega=10.0, mask=mask)
    (const,) = run_node("PreprintOmeganceSampler", sampler=inner, omega=10.0, schedule="constant", omega_end=0.0,
                        mask_omega=0.0)
    # the same omega inside and outside the mask is the unmasked result
    assert torch.allclose(sample(model, family, masked), sample(model, family, const), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_diffusion_saves_model_calls_and_reports_them(models, family):
    inner = comfy.samplers.sampler_object("dpmpp_2m")
    (wrapped,) = run_node("PreprintAdaptiveDiffusionSampler", sampler=inner, threshold=1.0, max_skips=2)
    rec = Timesteps(models[family])
    out = sample(rec.model, family, wrapped, steps=12)
    stats = wrapped.sampler_function.last_stats
    assert torch.isfinite(out).all()
    assert stats.calls == 12 and stats.skipped > 0
    assert len(rec.seen) == stats.model_calls == 12 - stats.skipped  # cond and uncond ride in one call


def test_wrappers_stack_and_reject_non_ksampler_input(models):
    inner = comfy.samplers.sampler_object("preprint_dpmpp_2m")
    (a,) = run_node("PreprintOmeganceSampler", sampler=inner, omega=5.0, schedule="constant", omega_end=0.0,
                    mask_omega=0.0)
    (b,) = run_node("PreprintTimeShiftSampler", sampler=a, window=30.0, cutoff=300.0, data_variance=0.0)
    (c,) = run_node("PreprintAdaptiveDiffusionSampler", sampler=b, threshold=0.01, max_skips=4)
    assert torch.isfinite(sample(models["sdxl"], "sdxl", c)).all()

    class NotKSampler(comfy.samplers.Sampler):
        pass

    with pytest.raises(TypeError, match="not a k-diffusion sampler"):
        run_node("PreprintTimeShiftSampler", sampler=NotKSampler(), window=30.0, cutoff=300.0, data_variance=0.0)


def test_batch_of_two_matches_each_sample_alone_with_omegance(models):
    family = "sd15"
    model = models[family]
    inner = comfy.samplers.sampler_object("euler")
    (wrapped,) = run_node("PreprintOmeganceSampler", sampler=inner, omega=10.0, schedule="constant", omega_end=0.0,
                          mask_omega=0.0)
    pos, neg = make_conds(family)
    both = run_custom_sampling(model, family, wrapped, sigmas_for(model), cfg=4.0, batch=2, positive=pos, negative=neg)
    assert both.shape[0] == 2 and torch.isfinite(both).all()
