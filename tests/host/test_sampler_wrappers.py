"""Host tier: Time-Shift, Omegance and AdaptiveDiffusion wrappers in real ComfyUI on tiny models."""

from __future__ import annotations

import logging
import re

import comfy.model_sampling
import comfy.patcher_extension
import comfy.samplers
import pytest
import torch

from .harness import make_conds, make_latent, make_noise, run_custom_sampling, run_node, tiny_model

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


class FedTimesteps(Timesteps):
    """Records the timestep the network is fed, ``model_sampling.timestep(sigma)`` as ``BaseModel._apply_model``
    computes it (APPLY_MODEL wrapper: SD3's MMDiT has no DIFFUSION_MODEL wrapper)."""

    def __init__(self, model):
        self.seen = []
        self.model = model.clone()
        self.ms = model.get_model_object("model_sampling")
        self.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "preprint_test_ts",
                                        self.wrapper)

    def wrapper(self, executor, *args, **kwargs):
        self.seen.append(self.ms.timestep(args[1].detach().clone()).float())
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


@pytest.mark.parametrize("family", [*FAMILIES, "sd3"])
def test_time_shift_feeds_shifted_timesteps_to_the_network(models, family):
    """The network's timestep moves by at most half the window (30 of 1000 training steps for window 60).

    Shifted flow models (SD3 shift 3, Flux) feed ``t = sigma`` while their ``sigma(t)`` applies the shift: a
    candidate must be mapped back through the inverse of the fed timestep, or the shift is applied twice.
    """
    model = models[family] if family in models else tiny_model(family)
    inner = comfy.samplers.sampler_object("dpmpp_2m")
    plain_rec, shift_rec = FedTimesteps(model), FedTimesteps(model)
    plain = sample(plain_rec.model, family, inner)
    (wrapped,) = run_node("PreprintTimeShiftSampler", sampler=inner, window=60.0, cutoff=0.0, data_variance=0.0)
    out = sample(shift_rec.model, family, wrapped)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert len(plain_rec.seen) == len(shift_rec.seen) == STEPS  # no extra model calls
    moved = [not torch.allclose(a, b) for a, b in zip(plain_rec.seen, shift_rec.seen, strict=True)]
    assert sum(moved) >= STEPS - 2, (plain_rec.seen, shift_rec.seen)
    ms = model.get_model_object("model_sampling")
    top = float(ms.timestep(torch.tensor([float(ms.sigma_max)])).float()[0])
    # discrete models feed whole training steps (one step of rounding); continuous ones feed the exact value
    slack = 1.0 if isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) else 1e-4 * top
    for a, b in zip(plain_rec.seen, shift_rec.seen, strict=True):
        assert float((a - b).abs().max()) <= top * 0.03 + slack, (family, float(a[0]), float(b[0]), top)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_time_axis_of_shifted_flow_models_inverts_the_fed_timestep(models, family):
    """At solver sigma 0.5 with no shift the network must be fed 0.5 of its range, not the shifted ~0.74."""
    from preprint.nodes.sampler_wrappers import sigma_inverts_timestep, time_axis_of

    model = models[family] if family in models else tiny_model(family)
    ms = model.get_model_object("model_sampling")
    assert not sigma_inverts_timestep(ms)
    axis = time_axis_of(ms)
    t = torch.linspace(0.05, 1.0, 20, dtype=torch.float64)
    torch.testing.assert_close(axis.t_of_sigma(axis.sigma_of_t(t)), t, atol=1e-5, rtol=0)
    half = axis.sigma_of_t(torch.tensor([0.5], dtype=torch.float64))
    assert float(half) == pytest.approx(0.5, abs=1e-5)


def test_time_axis_of_discrete_models_keeps_comfyui_inverse(models):
    from preprint.nodes.sampler_wrappers import sigma_inverts_timestep, time_axis_of

    ms = models["sd15"].get_model_object("model_sampling")
    assert sigma_inverts_timestep(ms)
    axis = time_axis_of(ms)
    t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    torch.testing.assert_close(axis.sigma_of_t(t), ms.sigma((t * 999).float()).double())


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


def sample_with_noise(model, family, sampler, noise, sigmas, cfg=4.0):
    """SamplerCustomAdvanced with explicit noise, so a batch row and a single sample can share their noise."""
    pos, neg = make_conds(family)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    return guider.sample(noise, torch.zeros_like(noise), sampler, sigmas, seed=0, disable_pbar=True)


def omegance(inner, omega, mask_omega=0.0, mask=None):
    (wrapped,) = run_node("PreprintOmeganceSampler", sampler=inner, omega=omega, schedule="constant", omega_end=0.0,
                          mask_omega=mask_omega, mask=mask)
    return wrapped


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_omegance_mask_sets_mask_omega_inside_it(models, family):
    """A mask of ones gives mask_omega everywhere (the unmasked run at that omega); a half mask gives neither
    the unmasked run nor the plain sampler."""
    model = models[family]
    inner = comfy.samplers.sampler_object("euler")
    plain = sample(model, family, inner)
    everywhere = sample(model, family, omegance(inner, 10.0))
    ones = sample(model, family, omegance(inner, 0.0, mask_omega=10.0, mask=torch.ones(1, 24, 24)))
    # the masked path blends w (1 - m) + w_in m: a rounding-level difference from the scalar path at most
    torch.testing.assert_close(ones, everywhere, atol=1e-5, rtol=0)
    assert float((everywhere - plain).abs().max()) > 1e-2  # the effect the identity above would miss
    half = torch.zeros(1, 24, 24)
    half[:, :, :12] = 1.0
    partial = sample(model, family, omegance(inner, 0.0, mask_omega=10.0, mask=half))
    assert float((partial - everywhere).abs().max()) > 1e-3
    assert float((partial - plain).abs().max()) > 1e-3


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_omegance_treats_each_image_of_a_batch_on_its_own(models, family):
    """Each latent of a batch sampled alone equals its row of the batch run: the flow rescaling's mean and the
    step's sigma are per sample, never pooled over the batch."""
    model = models[family]
    wrapped = omegance(comfy.samplers.sampler_object("euler"), 40.0)
    sig = sigmas_for(model)
    noise = make_noise_batch(family, 2)
    # the rows differ in scale, so a mean pooled over the batch would move each row visibly
    noise[1] = noise[1] * 0.5 + 1.0
    both = sample_with_noise(model, family, wrapped, noise, sig)
    for row in range(2):
        alone = sample_with_noise(model, family, wrapped, noise[row:row + 1].clone(), sig)
        # batch size changes only the summation order inside the network (about 3e-5 here; a mean pooled
        # over the batch moves a row by about 2e-3)
        torch.testing.assert_close(both[row:row + 1], alone, atol=1e-4, rtol=0)


def make_noise_batch(family, batch):
    return make_noise(make_latent(family, batch), seed=3)


class FedSigmas:
    """Records the sigma of every diffusion-model call (APPLY_MODEL wrapper: cond and uncond ride in one call)."""

    def __init__(self, model):
        self.seen: list[float] = []
        self.model = model.clone()
        self.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "preprint_test_sigmas",
                                        self.wrapper)

    def wrapper(self, executor, *args, **kwargs):
        self.seen.append(float(args[1].reshape(-1)[0]))
        return executor(*args, **kwargs)


ADAPTIVE_LOG = re.compile(r"AdaptiveDiffusion: (\d+) of (\d+) model calls computed, (\d+) saved "
                          r"\(calls skipped: \[([\d, ]*)\]\)")


def test_adaptive_diffusion_logs_the_calls_it_saved(models, caplog):
    """The node promises one log line per run with the calls computed and saved and which calls were skipped. Every
    number of the line is checked against the model calls that really happened (recorded by a wrapper), not against
    the node's own statistics: with euler (one call per step) call i is step i, so the skipped calls are exactly the
    steps whose sigma the model never saw."""
    family, steps = "sd15", 12
    inner = comfy.samplers.sampler_object("euler")
    sig = [float(s) for s in sigmas_for(models[family], steps)[:-1]]

    def logged_run(threshold, max_skips):
        (wrapped,) = run_node("PreprintAdaptiveDiffusionSampler", sampler=inner, threshold=threshold,
                              max_skips=max_skips)
        rec = FedSigmas(models[family])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="preprint"):
            sample(rec.model, family, wrapped, steps=steps)
        lines = [r.getMessage() for r in caplog.records if "AdaptiveDiffusion" in r.getMessage()]
        assert len(lines) == 1, lines  # one line per run
        found = ADAPTIVE_LOG.search(lines[0])
        assert found, lines[0]
        computed, total, saved = (int(v) for v in found.group(1, 2, 3))
        listed = [int(v) for v in found.group(4).split(",") if v.strip()]
        # a step is skipped when no model call had its sigma (neighbouring sigmas of this schedule are 32% or more
        # apart; a call matches its own sigma to float32 rounding, far inside the 1e-6 relative tolerance)
        never_seen = [i for i, s in enumerate(sig) if not any(abs(s - t) <= 1e-6 * s for t in rec.seen)]
        return computed, total, saved, listed, len(rec.seen), never_seen

    computed, total, saved, listed, calls, never_seen = logged_run(0.0, 4)
    assert (computed, total, saved, listed) == (12, 12, 0, []) and calls == 12 and never_seen == []
    computed, total, saved, listed, calls, never_seen = logged_run(1.0, 2)
    assert total == steps and computed == calls and saved == steps - calls
    # the run really skips (measured: 6 of 12, calls 4 5 7 8 10 11), so the numbers above are not trivially 0
    assert saved >= 2
    assert listed == never_seen and len(listed) == saved


def masked_omegance(omega, mask_omega=0.0, mask=None):
    return run_node("PreprintOmeganceSampler", sampler=comfy.samplers.sampler_object("euler"), omega=omega,
                    schedule="constant", omega_end=0.0, mask_omega=mask_omega, mask=mask)[0]


def sample_noise(m, family, sampler, noise, steps):
    """SamplerCustomAdvanced's path with explicit starting noise (one row of a batch can be sampled alone)."""
    ms = m.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple" if family == "flux" else "karras", steps)
    pos, neg = make_conds(family)
    guider = comfy.samplers.CFGGuider(m)
    guider.set_conds(pos, neg)
    guider.set_cfg(4.0)
    return guider.sample(noise, torch.zeros_like(noise), sampler, sigmas, seed=0, disable_pbar=True)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_omegance_mask_gets_mask_omega_and_the_rest_omega(models, family):
    """One Euler step to sigma 0 returns the (Omegance-scaled) prediction itself, so where each omega applies is
    visible pixel by pixel: outside the mask the result is the plain omega run's, inside it the mask_omega run's,
    bit for bit (the scale map holds exactly w or w_in there). The region matters: inside, omega 10 and -10 differ
    by 0.13 (SD1.5, latent magnitude 220) and 0.26 (Flux, 11) (measured)."""
    m = models[family]
    noise = make_noise(make_latent(family), 2)
    mask = torch.zeros(1, 24, 40)  # any size: resized to the latent (8x8) explicitly
    mask[:, :, :15] = 1.0  # the left 3 latent columns exactly
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:, :3] = True
    outer = sample_noise(m, family, masked_omegance(10.0), noise, 1)
    inner = sample_noise(m, family, masked_omegance(-10.0), noise, 1)
    both = sample_noise(m, family, masked_omegance(10.0, mask_omega=-10.0, mask=mask), noise, 1)
    assert torch.equal(both[..., ~inside], outer[..., ~inside])
    assert torch.equal(both[..., inside], inner[..., inside])
    assert (inner[..., inside] - outer[..., inside]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_omegance_batch_of_masks_gives_each_image_its_own(models, family):
    """A batch of latents sampled together with one mask per image: each row equals its latent sampled alone
    with its own mask. A batch size changes only the summation order in the network: measured 4.6e-5 (SD1.5,
    latent magnitude 180-230) and 3.3e-6 (Flux, 8-9) over 4 steps, 2e-7 of the magnitude; the tolerance is 1e-6 of
    it. Giving the second image the first image's mask moves it by 0.28 (SD1.5) and 0.31 (Flux)."""
    m = models[family]
    noise = make_noise(make_latent(family, batch=2), 3)
    noise[1] = noise[1] * 0.5 + 1.0  # rows of different scale, so anything pooled over the batch shows
    masks = torch.zeros(2, 16, 16)
    masks[0, :, :8] = 1.0
    masks[1, 8:, :] = 1.0
    together = sample_noise(m, family, masked_omegance(15.0, mask_omega=-15.0, mask=masks), noise, 4)
    tol = 1e-6 * float(together.abs().max())
    for row in range(2):
        alone = sample_noise(m, family, masked_omegance(15.0, mask_omega=-15.0, mask=masks[row:row + 1]),
                             noise[row:row + 1].clone(), 4)
        torch.testing.assert_close(together[row:row + 1], alone, rtol=0, atol=tol)
    shared = sample_noise(m, family, masked_omegance(15.0, mask_omega=-15.0, mask=masks[:1]), noise[1:].clone(), 4)
    assert (shared - together[1:]).abs().max() > 100 * tol  # the tolerance would see a wrong mask
