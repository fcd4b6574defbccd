"""DiffuseHigh guidance and FAM frequency modulation through real ComfyUI sampling on tiny SD1.5 and Flux layouts:
off-switch exactness, the guide's low band in the guided x0 inside the window (and only there, keyed by sigma),
FAM's modulated denoiser input, non-square odd sizes, guides of another size, bad input, stacking, determinism."""

from __future__ import annotations

import logging

import comfy.patcher_extension
import comfy.sample
import pytest
import torch

from preprint.highres.frequency import dwt2, frequency_modulate, match_guide

from .harness import make_conds, make_noise, node_class, run_node, tiny_model

H, W = 13, 22  # 104 x 176 px: odd, non-square, not a multiple of 64


@pytest.fixture(scope="module")
def sd15():
    return tiny_model("sd15")


@pytest.fixture(scope="module")
def flux():
    return tiny_model("flux")


def channels(family):
    return 16 if family == "flux" else 4


def latent(family, seed=11, h=H, w=W, batch=1):
    return torch.randn(batch, channels(family), h, w, generator=torch.Generator().manual_seed(seed))


def diffusehigh(m, guide, fraction=0.333, wavelet="haar"):
    return run_node("PreprintDiffuseHigh", model=m, guide={"samples": guide}, guidance_fraction=fraction,
                    wavelet=wavelet)[0]


def fam(m, native, c=0.5):
    return run_node("PreprintFAMFrequency", model=m, native_latent={"samples": native}, c=c)[0]


def sample(m, family, start=None, steps=8, sampler="euler", scheduler="karras", seed=0, lat=None, add_noise=True,
           cfg=None):
    """KSamplerAdvanced-style: ``steps`` in the schedule, starting at ``start``; the sampled latent ``lat``."""
    lat = latent(family) if lat is None else lat
    noise = make_noise(lat, seed) if add_noise else torch.zeros_like(lat)
    pos, neg = make_conds(family)
    cfg = (1.0 if family == "flux" else 5.0) if cfg is None else cfg
    return comfy.sample.sample(m, noise, steps, cfg, sampler, scheduler, pos, neg, lat, start_step=start,
                               seed=seed, disable_pbar=True)


def recorder(m):
    """A clone of ``m`` with a post-CFG function after the others, recording (sigma, guided x0) per call."""
    seen = []
    r = m.clone()

    def record(args):
        seen.append((float(args["sigma"].max()), args["denoised"].clone()))
        return args["denoised"]
    r.set_model_sampler_post_cfg_function(record)
    return r, seen


def model_inputs(m):
    """A clone of ``m`` recording every diffusion-model input (after ComfyUI's input scaling)."""
    seen = []
    r = m.clone()

    def wrap(executor, x, *args, **kwargs):
        seen.append(x.clone())
        return executor(x, *args, **kwargs)
    r.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_inputs", wrap)
    return r, seen


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_switched_off_is_bitwise_the_unpatched_model(family, request):
    m = request.getfixturevalue(family)
    base = sample(m, family, start=3)
    assert torch.equal(sample(diffusehigh(m, latent(family, 5), fraction=0.0), family, start=3), base)
    assert torch.equal(sample(fam(m, latent(family, 5), c=0.0), family, start=3), base)
    assert not torch.equal(sample(diffusehigh(m, latent(family, 5)), family, start=3), base)


@pytest.mark.parametrize("family,wavelet,sampler", [("sd15", "haar", "euler"), ("sd15", "db4", "heun"),
                                                    ("sd15", "haar", "dpmpp_2m"), ("flux", "haar", "euler")])
def test_guide_low_band_reaches_the_prediction_for_the_first_third_of_the_run_by_sigma(family, wavelet, sampler,
                                                                                       request):
    m = request.getfixturevalue(family)
    guide = latent(family, 5)
    r, seen = recorder(diffusehigh(m, guide, 0.333, wavelet))
    sample(r, family, start=5, steps=20, sampler=sampler)  # the last 15 of 20 steps, as KSamplerAdvanced runs them
    want = dwt2(m.model.process_latent_in(guide), wavelet).ll  # the guide in the sampler's latent space
    inner = (..., slice(4, -4), slice(4, -4)) if wavelet == "db4" else (...,)
    guided = [torch.allclose(dwt2(x0, wavelet).ll[inner], want[inner], atol=1e-4) for _, x0 in seen]
    sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "karras", 20)[5:]
    step_of = [int((sigmas[:-1] >= s - 1e-6).sum()) - 1 for s, _ in seen]  # the step each call belongs to
    assert [g for g, step in zip(guided, step_of, strict=True) if step < 5] and all(
        g == (step < 5) for g, step in zip(guided, step_of, strict=True)), list(zip(step_of, guided, strict=True))


def test_guide_of_another_size_is_resized_with_a_warning(sd15, caplog):
    guide = latent("sd15", 6, h=7, w=11)
    r, seen = recorder(diffusehigh(sd15, guide, 1.0, "haar"))
    with caplog.at_level(logging.WARNING):
        sample(r, "sd15", start=4)
    assert any("resized bicubic" in msg for msg in caplog.messages)
    resized, _ = match_guide(sd15.model.process_latent_in(guide), torch.zeros(1, 4, H, W))
    assert all(torch.allclose(dwt2(x0, "haar").ll, dwt2(resized, "haar").ll, atol=1e-4) for _, x0 in seen)


def test_batch_guides_go_image_by_image(sd15):
    lat, guide = latent("sd15", 1, batch=2), latent("sd15", 7, batch=2)
    r, seen = recorder(diffusehigh(sd15, guide, 1.0, "haar"))
    sample(r, "sd15", start=4, lat=lat)
    want = dwt2(sd15.model.process_latent_in(guide), "haar").ll
    assert all(torch.allclose(dwt2(x0, "haar").ll, want, atol=1e-4) for _, x0 in seen)


def test_bad_input_is_refused_with_the_node_name(sd15, flux):
    with pytest.raises(ValueError, match="DiffuseHigh Guidance"):  # a 4-channel guide for a 16-channel model
        sample(diffusehigh(flux, latent("sd15", 5)), "flux", start=4)
    with pytest.raises(ValueError, match="FAM Frequency Modulation.*images"):
        sample(fam(sd15, latent("sd15", 5, batch=3)), "sd15", lat=latent("sd15", 1, batch=2))
    bad = latent("sd15", 5)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        diffusehigh(sd15, bad)
    with pytest.raises(ValueError, match="video"):
        fam(sd15, torch.zeros(1, 4, 2, 8, 8))
    assert "guidance_fraction" in node_class("PreprintDiffuseHigh").validate_inputs(guidance_fraction=1.5)
    assert "wavelet" in node_class("PreprintDiffuseHigh").validate_inputs(wavelet="db2")
    assert "c =" in node_class("PreprintFAMFrequency").validate_inputs(c=-0.1)


def _fam_first_input(m, family, native, start, c=0.5):
    """The diffusion model's first input in a run starting at ``start`` of 10 steps, and the expected one."""
    r, seen = model_inputs(fam(m, native, c))
    lat = latent(family, 1)
    sample(r, family, start=start, steps=10, lat=lat)
    ms = m.get_model_object("model_sampling")
    sigma = comfy.samplers.calculate_sigmas(ms, "karras", 10)[start]
    noise = make_noise(lat, 0)
    x = ms.noise_scaling(sigma, noise, m.model.process_latent_in(lat))  # the sampler's state at the first call
    diffused = ms.noise_scaling(sigma, noise, m.model.process_latent_in(native))
    return seen[0], x, diffused, sigma, ms


def test_fam_modulates_the_noisy_latent_flux(flux):
    """Flux's input is the latent itself and t/T = sigma, so Eq. 4 can be checked from outside."""
    native = latent("flux", 8)
    first, x, diffused, sigma, _ = _fam_first_input(flux, "flux", native, start=4)
    rho = float(sigma)
    assert 0.05 < rho < 0.95
    torch.testing.assert_close(first, frequency_modulate(x, diffused, rho), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, x, atol=1e-3)


def test_fam_modulates_the_noisy_latent_sd15(sd15):
    native = latent("sd15", 8)
    first, x, diffused, sigma, ms = _fam_first_input(sd15, "sd15", native, start=3)
    rho = float(ms.timestep(sigma.reshape(1)) / ms.timestep(ms.sigma_max.reshape(1)))
    want = ms.calculate_input(sigma, frequency_modulate(x, diffused, rho))
    assert first.shape[0] == 2  # cond and uncond in one call: both rows see the same modulated latent
    torch.testing.assert_close(first, want.expand(2, -1, -1, -1), atol=1e-5, rtol=1e-5)


def test_fam_leaves_the_first_call_of_a_full_run_alone(sd15):
    """At t = T the box is empty (K passes everything): the first input is bitwise the unpatched one."""
    plain, base = model_inputs(sd15)
    sample(plain, "sd15")
    r, seen = model_inputs(fam(sd15, latent("sd15", 8)))
    sample(r, "sd15")
    assert torch.equal(seen[0], base[0]) and not torch.equal(seen[-1], base[-1])


def test_fam_without_added_noise_diffuses_with_its_own_seeded_noise(sd15):
    native = latent("sd15", 8)
    a = sample(fam(sd15, native), "sd15", start=3, add_noise=False, seed=1)
    b = sample(fam(sd15, native), "sd15", start=3, add_noise=False, seed=1)
    c = sample(fam(sd15, native), "sd15", start=3, add_noise=False, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_deterministic_and_stacking(family, request):
    m = request.getfixturevalue(family)
    guide, native = latent(family, 5), latent(family, 8)
    both = diffusehigh(fam(m, native), guide, 0.5, "haar")
    first = sample(both, family, start=1, steps=5)
    assert torch.equal(sample(both, family, start=1, steps=5), first)
    assert not torch.equal(first, sample(diffusehigh(m, guide, 0.5, "haar"), family, start=1, steps=5))
    assert not torch.equal(first, sample(fam(m, native), family, start=1, steps=5))
    # stacked with FAM (on the input) and a later post-CFG function, the guide still reaches the x0 in its window
    r, seen = recorder(both)
    sample(r, family, start=1, steps=5)
    want = dwt2(m.model.process_latent_in(guide), "haar").ll
    assert torch.allclose(dwt2(seen[0][1], "haar").ll, want, atol=1e-4)
    assert not torch.allclose(dwt2(seen[-1][1], "haar").ll, want, atol=1e-4)
    # a second DiffuseHigh node replaces the first instead of applying twice
    twice = diffusehigh(diffusehigh(m, latent(family, 9), 0.5, "haar"), guide, 0.5, "haar")
    once = diffusehigh(m, guide, 0.5, "haar")
    assert torch.equal(sample(twice, family, start=1, steps=5), sample(once, family, start=1, steps=5))
    assert len(twice.model_options["sampler_post_cfg_function"]) == 1
