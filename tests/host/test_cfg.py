"""Annealed / scheduled CFG nodes on tiny SD1.5, SDXL and Flux models through real ComfyUI sampling."""

from __future__ import annotations

import contextlib
import copy
import logging
import math

import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension as pe
import comfy.sample
import comfy.samplers
import comfy.supported_models
import folder_paths
import pytest
import torch
from comfy_extras.nodes_custom_sampler import Guider_DualCFG

from preprint.guidance.annealing import constant_scheduler, save_scheduler

from .harness import make_conds, make_latent, make_noise, run_custom_sampling, run_node, run_sampling
from .harness import tiny_model as build

FAMILIES = ["sd15", "sdxl", "flux"]
STEPS = 6
CFG = 4.0


class Counter:
    """Diffusion-model forward calls: batch rows and the cond index of each chunk, per call."""

    def __init__(self):
        self.calls, self.rows, self.chunks = 0, [], []

    def wrapper(self, executor, *args, **kwargs):
        self.calls += 1
        self.rows.append(int(args[0].shape[0]))
        opts = kwargs.get("transformer_options")
        if opts is None:
            opts = next((a for a in args if isinstance(a, dict) and "cond_or_uncond" in a), {})
        self.chunks.append(list(opts.get("cond_or_uncond", [])))
        return executor(*args, **kwargs)


@contextlib.contextmanager
def count_calls(model):
    counter = Counter()
    counter.model = model.clone()
    counter.model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "preprint_test_cfg_counter", counter.wrapper)
    yield counter


@pytest.fixture(scope="module")
def models():
    return {f: build(f) for f in FAMILIES}


def scheduled(m, schedule="constant", cfg_start=-1.0, cfg_end=-1.0, exponent=2.0, custom_scales="",
              sigma_start=-1.0, sigma_end=-1.0):
    return run_node("PreprintScheduledCFG", model=m, schedule=schedule, cfg_start=cfg_start, cfg_end=cfg_end,
                    exponent=exponent, custom_scales=custom_scales, sigma_start=sigma_start, sigma_end=sigma_end)[0]


def adaptive(m, threshold):
    return run_node("PreprintAdaptiveGuidance", model=m, threshold=threshold)[0]


def cads(m, tau1=0.6, tau2=0.9, noise_scale=0.25, psi=1.0, noise_pooled=True, anneal="positive and negative"):
    return run_node("PreprintCADS", model=m, tau1=tau1, tau2=tau2, noise_scale=noise_scale, psi=psi,
                    noise_pooled=noise_pooled, anneal=anneal)[0]


def sigmas_of(m, steps=STEPS, scheduler="karras"):
    return comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), scheduler, steps)


def rows(m, family, **kw):
    with count_calls(m) as counter:
        out = run_sampling(counter.model, family, steps=STEPS, cfg=CFG, **kw)
    return out, counter


@pytest.mark.parametrize("family", FAMILIES)
def test_constant_schedule_equals_plain_cfg_bitwise(models, family):
    m = models[family]
    plain = run_sampling(m, family, steps=STEPS, cfg=CFG)
    assert torch.equal(run_sampling(scheduled(m), family, steps=STEPS, cfg=CFG), plain)
    custom = ", ".join([str(CFG)] * STEPS)
    assert torch.equal(run_sampling(scheduled(m, "custom", custom_scales=custom), family, steps=STEPS, cfg=CFG), plain)
    # a scale set by the node (not the sampler) moves the result to exactly that CFG scale
    other = run_sampling(m, family, steps=STEPS, cfg=2.5)
    moved = run_sampling(scheduled(m, "constant", cfg_start=2.5), family, steps=STEPS, cfg=CFG)
    torch.testing.assert_close(moved, other, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_interval_really_skips_the_negative_pass(models, family):
    m = models[family]
    sig = [float(s) for s in sigmas_of(m)]
    lo, hi = sig[4], sig[1]  # guidance on steps 1..4 only
    _, counter = rows(scheduled(m, sigma_start=hi, sigma_end=lo), family)
    inside = [lo <= s <= hi for s in sig[:-1]]
    assert counter.calls == STEPS
    assert counter.rows == [2 if i else 1 for i in inside]
    assert [c for c, i in zip(counter.chunks, inside, strict=True) if not i] == [[0]] * inside.count(False)


def test_scale_one_steps_skip_the_negative_pass(models):
    m = models["sd15"]
    # linear from 5 at pure noise down to 1 at the end: the last evaluations, where the scale rounds to 1, ...
    custom = "5, 4, 3, 1, 1, 1"
    out, counter = rows(scheduled(m, "custom", custom_scales=custom), "sd15")
    assert counter.rows == [2, 2, 2, 1, 1, 1]
    # ... and a KSampler CFG of 1 still gets the node's guidance (the cfg1 shortcut is disabled)
    with count_calls(scheduled(m, "constant", cfg_start=3.0)) as c:
        run_sampling(c.model, "sd15", steps=STEPS, cfg=1.0)
    assert c.rows == [2] * STEPS


class CosineProbe:
    """Records the cosine of the two flow velocities eps - x0 per evaluation from a plain CFG run (post-CFG
    hook): for EPS models eps = (x - D) / sigma, for flow models (x - alpha D) / sigma with alpha = 1 - sigma."""

    def __init__(self, flow: bool):
        self.flow = flow
        self.cos: list[float] = []

    def velocity(self, x, d, sigma):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).double()
        a = 1.0 - s if self.flow else 1.0
        return ((x.double() - a * d.double()) / s - d.double()).flatten(1)

    def __call__(self, args):
        x, s = args["input"], args["sigma"]
        a, b = self.velocity(x, args["cond_denoised"], s), self.velocity(x, args["uncond_denoised"], s)
        self.cos.append(float(torch.nn.functional.cosine_similarity(a, b, dim=1).min()))
        return args["denoised"]


@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_guidance_calls_uncond_the_counted_number_of_times(models, family, caplog):
    m = models[family]
    probe = CosineProbe(isinstance(m.get_model_object("model_sampling"), comfy.model_sampling.CONST))
    pm = m.clone()
    pm.set_model_sampler_post_cfg_function(probe)
    plain = run_sampling(pm, family, steps=STEPS, cfg=CFG)
    cos = probe.cos
    assert len(cos) == STEPS
    ordered = sorted(set(cos))
    thr = ordered[len(ordered) // 2]
    first = next(i for i, c in enumerate(cos) if c >= thr)
    with caplog.at_level(logging.INFO, logger="preprint"):
        out, counter = rows(adaptive(m, thr), family)
    assert counter.rows == [2] * (first + 1) + [1] * (STEPS - first - 1)
    saved = STEPS - first - 1
    assert any(f"{saved} of {STEPS} unconditional passes saved" in r.getMessage() for r in caplog.records)
    # threshold 1 never stops: plain CFG, bit for bit
    same, counter1 = rows(adaptive(m, 1.0), family)
    assert counter1.rows == [2] * STEPS and torch.equal(same, plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_cads_runs_is_reproducible_and_off_is_identity(models, family):
    m = models[family]
    plain = run_sampling(m, family, steps=STEPS, cfg=CFG, seed=3)
    off = cads(m, tau1=1.0, tau2=1.0)  # gamma = 1 everywhere: clean conditioning
    assert torch.equal(run_sampling(off, family, steps=STEPS, cfg=CFG, seed=3), plain)
    on = cads(m, noise_scale=0.5)
    a = run_sampling(on, family, steps=STEPS, cfg=CFG, seed=3)
    b = run_sampling(on, family, steps=STEPS, cfg=CFG, seed=3)
    c = run_sampling(on, family, steps=STEPS, cfg=CFG, seed=4)
    d = run_sampling(m, family, steps=STEPS, cfg=CFG, seed=4)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, plain)
    assert not torch.equal(c - d, a - plain)  # the CADS noise follows the seed
    if family in ("sdxl", "flux"):
        no_pooled = run_sampling(cads(m, noise_scale=0.5, noise_pooled=False), family, steps=STEPS, cfg=CFG, seed=3)
        assert not torch.equal(no_pooled, a)


class ContextProbe:
    """Records, per diffusion-model call, the text conditioning (or, with ``key="y"``, the pooled / ADM vector)
    each chunk (0 = positive, 1 = negative) saw."""

    def __init__(self, key: str = "context"):
        self.key = key
        self.seen: list[dict[int, torch.Tensor]] = []

    def __call__(self, executor, *args, **kwargs):
        value = kwargs[self.key] if self.key in kwargs else args[2 if self.key == "context" else 3]
        # positional on the UNet and Flux forwards, at different places
        topts = kwargs.get("transformer_options") or next(a for a in args if isinstance(a, dict) and "uuids" in a)
        kinds = list(topts["cond_or_uncond"])
        self.seen.append({k: c.clone() for k, c in zip(kinds, value.chunk(len(kinds)), strict=True)})
        return executor(*args, **kwargs)


def contexts(m, family, key="context", positive=None, negative=None):
    probe = ContextProbe(key)
    pm = m.clone()
    pm.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_context_probe", probe)
    run_sampling(pm, family, steps=STEPS, cfg=CFG, seed=3, positive=positive, negative=negative)
    return probe.seen


@pytest.mark.parametrize("family", FAMILIES)
def test_cads_follows_the_run_seed_from_the_same_starting_noise(models, family):
    """The CADS noise comes from the run's seed, not from the starting noise: with one starting noise, two seeds
    give two images and one seed gives one image, bit for bit (sampling is deterministic: noise floor 0)."""
    m = models[family]
    on = cads(m, noise_scale=0.5)
    latent = make_latent(family)
    noise = make_noise(latent, 0)  # one starting noise for every run: only the seed widget changes
    pos, neg = make_conds(family)

    def sample(model, seed):  # 3 steps: the first is at pure noise, where CADS acts
        return comfy.sample.sample(model, noise, 3, CFG, "euler", "karras", pos, neg, latent, seed=seed,
                                   disable_pbar=True)

    assert torch.equal(sample(m, 3), sample(m, 4))  # without CADS the seed does nothing here
    a, b, c = sample(on, 3), sample(on, 3), sample(on, 4)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-1  # measured 4.1 / 8.8 / 4.3 (SD1.5 / SDXL / Flux; magnitudes 277 / 384 / 11)


SDXL_SIZES = {"width": 1152, "height": 896, "crop_w": 64, "crop_h": 32, "target_width": 1024,
              "target_height": 768}  # not ComfyUI's defaults, so the embeddings are the conds' own


def sdxl_conds(pooled_width):
    """SDXL conditioning with a pooled text vector of ``pooled_width`` and explicit size / crop keys."""
    pos, neg = make_conds("sdxl")
    g = torch.Generator().manual_seed(11)
    return tuple([[c[0][0], {**c[0][1], **SDXL_SIZES, "pooled_output": torch.randn(1, pooled_width, generator=g)}]]
                 for c in (pos, neg))


def tiny_sdxl_with_pooled(pooled_width):
    """The tiny SDXL, but with an ADM input of ``pooled_width`` + 6 x 256 size embeddings (1280 on real SDXL)."""
    from preprint.runner.tiny_models import _sdxl_config, randomise_

    config = comfy.supported_models.SDXL({**_sdxl_config(), "adm_in_channels": pooled_width + 1536})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    randomise_(model.diffusion_model, 0)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def check_cads_keeps_the_size_embeddings(m, pooled_width):
    pos, neg = sdxl_conds(pooled_width)
    before = copy.deepcopy((pos, neg))
    plain = contexts(m, "sdxl", key="y", positive=pos, negative=neg)
    annealed = contexts(cads(m, noise_scale=0.5), "sdxl", key="y", positive=pos, negative=neg)
    # the probe reads ComfyUI's ADM vector: [pooled text | height, width, crop_h, crop_w, target h, target w]
    expected = m.model.encode_adm(pooled_output=pos[0][1]["pooled_output"], **SDXL_SIZES)
    assert expected.shape[-1] == pooled_width + 1536
    torch.testing.assert_close(plain[0][0], expected, rtol=0, atol=0)
    # CADS acted on the text part (both prompts, at pure noise) ...
    assert all(not torch.equal(annealed[0][k][..., :pooled_width], plain[0][k][..., :pooled_width]) for k in (0, 1))
    # ... and at every call, for both prompts, left every size / crop embedding exactly as the conds gave it
    assert len(plain) == len(annealed) == STEPS
    for p, q in zip(plain, annealed, strict=True):
        for k in p:
            torch.testing.assert_close(q[k][..., pooled_width:], p[k][..., pooled_width:], rtol=0, atol=0)
    # and the conditioning itself (its size / crop keys included) is not mutated
    for got, was in zip((pos, neg), before, strict=True):
        assert {k: v for k, v in got[0][1].items() if k in SDXL_SIZES} == SDXL_SIZES
        assert torch.equal(got[0][1]["pooled_output"], was[0][1]["pooled_output"]) and torch.equal(got[0][0], was[0][0])


def test_cads_on_sdxl_anneals_the_pooled_text_and_never_the_size_embeddings():
    """On SDXL's real ADM layout (1280 pooled CLIP-G features, then six 256-wide size / crop embeddings)."""
    check_cads_keeps_the_size_embeddings(tiny_sdxl_with_pooled(1280), 1280)


def test_cads_keeps_the_size_embeddings_whatever_the_pooled_width(models):
    check_cads_keeps_the_size_embeddings(models["sdxl"], 32)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_cads_positive_only_leaves_the_negative_prompt_alone(models, family):
    m = models[family]
    plain = contexts(m, family)
    both = contexts(cads(m, noise_scale=0.5), family)
    positive = contexts(cads(m, noise_scale=0.5, anneal="positive only"), family)
    assert len(plain) == len(both) == len(positive) == STEPS
    # the first step is at pure noise (t >= tau2): the positive prompt is annealed in both modes
    assert not torch.equal(both[0][0], plain[0][0]) and not torch.equal(positive[0][0], plain[0][0])
    torch.testing.assert_close(positive[0][0], both[0][0], rtol=0, atol=0)
    # the negative prompt: annealed in "positive and negative", untouched at every step in "positive only"
    assert not torch.equal(both[0][1], plain[0][1])
    assert all(torch.equal(p[1], q[1]) for p, q in zip(positive, plain, strict=True))


def test_cads_with_dual_cfg_guider_and_scheduled_cfg_refuses_it_clearly(models):
    m = models["sd15"]
    pos, neg = make_conds("sd15")
    mid, _ = make_conds("sd15", seed=7)
    sig = sigmas_of(m)
    sampler = comfy.samplers.sampler_object("euler")

    def dual(model):
        g = Guider_DualCFG(model)
        g.set_conds(pos, mid, neg)
        g.set_cfg(3.0, 2.0)
        return run_custom_sampling(model, "sd15", sampler, sig, guider=g, seed=1)

    plain = dual(m)
    with_cads = dual(cads(m, noise_scale=0.5))
    assert torch.isfinite(with_cads).all() and not torch.equal(with_cads, plain)
    with pytest.raises(ValueError, match="Guider_DualCFG combines its conditionings itself"):
        dual(scheduled(m, sigma_start=5.0))


def test_cfg_guider_path_matches_ksampler_path(models):
    m = models["sdxl"]
    patched = scheduled(m, "cosine", cfg_start=6.0, cfg_end=2.0, sigma_start=float(sigmas_of(m)[1]))
    via_ks = run_sampling(patched, "sdxl", steps=STEPS, cfg=CFG, scheduler="karras")
    via_guider = run_custom_sampling(patched, "sdxl", comfy.samplers.sampler_object("euler"), sigmas_of(m), cfg=CFG)
    assert torch.equal(via_ks, via_guider)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_everything_stacks_with_pag_and_caching(models, family):
    m = models[family]
    sig = [float(s) for s in sigmas_of(m)]

    def pag(x):
        return run_node("PreprintPerturbedAttentionGuidance", model=x, scale=2.0, layers="", adaptive_scale=0.0,
                        sigma_start=-1.0, sigma_end=-1.0, rescale=0.0)[0]

    def cache(x):
        if family == "sd15":
            return run_node("PreprintDeepCache", model=x, cache_interval=2, branch_depth=0, schedule="uniform",
                            start_percent=0.0, end_percent=1.0)[0]
        return run_node("PreprintDiTBlockCache", model=x, threshold=5.0, extrapolation_order=2,
                        max_consecutive_skips=2, start_percent=0.0, end_percent=1.0)[0]

    stack = {
        "pag": pag,
        "scheduled": lambda x: scheduled(x, "linear", cfg_start=5.0, cfg_end=2.0, sigma_start=sig[1],
                                         sigma_end=sig[4]),
        "cads": lambda x: cads(x, noise_scale=0.5),
        "adaptive": lambda x: adaptive(x, -1.0),  # converges at the first evaluation it can measure
        "cache": cache,
    }

    def build(skip=None):
        x = m
        for name, apply in stack.items():
            x = x if name == skip else apply(x)
        return x

    out, counter = rows(build(), family)
    assert torch.isfinite(out).all()
    # per evaluation: the positive and its PAG copy; the negative only inside the interval [sig[4], sig[1]],
    # and there only until Adaptive Guidance has measured once (step 1)
    assert counter.rows == [2, 3, 2, 2, 2, 2]
    # the stack minus any one technique gives another image: every technique took part
    for name in stack:
        without, c = rows(build(skip=name), family)
        assert not torch.equal(without, out), f"removing {name} changed nothing"
        if name == "adaptive":
            assert c.rows == [2, 3, 3, 3, 3, 2]
        if name == "pag":
            assert c.rows == [1, 2, 1, 1, 1, 1]


def test_second_node_of_a_kind_replaces_the_first(models):
    m = models["sd15"]
    once = scheduled(m, "constant", cfg_start=2.0)
    twice = scheduled(scheduled(m, "constant", cfg_start=9.0), "constant", cfg_start=2.0)
    assert torch.equal(run_sampling(twice, "sd15", steps=STEPS, cfg=CFG), run_sampling(once, "sd15", steps=STEPS,
                                                                                       cfg=CFG))
    assert len(twice.model_options["sampler_post_cfg_function"]) == len(once.model_options["sampler_post_cfg_function"])


def test_bad_input_errors(models):
    m = models["sd15"]
    with pytest.raises(ValueError, match="start after it ends"):
        scheduled(m, sigma_start=1.0, sigma_end=2.0)
    with pytest.raises(ValueError, match="has 3 values but this run has 6 steps"):
        run_sampling(scheduled(m, "custom", custom_scales="1,2,3"), "sd15", steps=STEPS, cfg=CFG)
    with pytest.raises(ValueError, match="swap them"):
        cads(m, tau1=0.9, tau2=0.5)


# ---------------------------------------------------------------- annealing guidance


@pytest.fixture
def scheduler_dir(tmp_path):
    import preprint  # noqa: F401  (the pack registered the folder when ComfyUI loaded it)

    folder_paths.folder_names_and_paths.setdefault("guidance_schedulers", ([], {".safetensors"}))
    paths = folder_paths.folder_names_and_paths["guidance_schedulers"][0]
    paths.append(str(tmp_path))
    folder_paths.filename_list_cache.pop("guidance_schedulers", None)
    yield tmp_path
    paths.remove(str(tmp_path))
    folder_paths.filename_list_cache.pop("guidance_schedulers", None)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_constant_annealing_scheduler_reproduces_cfg(models, family, scheduler_dir):
    m = models[family]
    save_scheduler(constant_scheduler(CFG), scheduler_dir / "const.safetensors")
    sig = sigmas_of(m)
    paper = run_node("PreprintSamplerAnnealingGuidance", scheduler_file="const.safetensors", guidance_lambda=0.4,
                     renoise="unconditional (paper)")[0]
    ddim = run_node("PreprintSamplerAnnealingGuidance", scheduler_file="const.safetensors", guidance_lambda=0.4,
                    renoise="guided (plain DDIM)")[0]
    ref_pp = run_custom_sampling(m, family, comfy.samplers.sampler_object("euler_cfg_pp"), sig, cfg=CFG)
    ref_cfg = run_custom_sampling(m, family, comfy.samplers.sampler_object("euler"), sig, cfg=CFG)
    with count_calls(m) as counter:
        out = run_custom_sampling(counter.model, family, paper, sig, cfg=CFG)
    torch.testing.assert_close(out, ref_pp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run_custom_sampling(m, family, ddim, sig, cfg=CFG), ref_cfg, rtol=1e-5, atol=1e-5)
    assert counter.rows == [2] * STEPS  # one two-branch evaluation per step, no extra passes
    # the learned scale replaces the sampler's: a sampler CFG of 1 gives the same image
    torch.testing.assert_close(run_custom_sampling(m, family, paper, sig, cfg=1.0), out, rtol=1e-4, atol=1e-4)


class RecordingScheduler:
    """Wraps a scheduler: records what the sampler feeds it and returns a scale that depends on all of it."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, timestep, lam, eps_uncond, eps_cond):
        self.calls.append((float(timestep), float(lam), eps_uncond.clone(), eps_cond.clone()))
        return self.inner(timestep, lam, eps_uncond, eps_cond)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_annealing_scheduler_gets_the_timestep_lambda_and_guidance_direction(models, family, scheduler_dir):
    m = models[family]
    save_scheduler(constant_scheduler(CFG), scheduler_dir / "const.safetensors")
    sampler = run_node("PreprintSamplerAnnealingGuidance", scheduler_file="const.safetensors", guidance_lambda=0.7,
                       renoise="unconditional (paper)")[0]
    recorder = RecordingScheduler(sampler.extra_options["scheduler"])
    sampler.extra_options["scheduler"] = recorder
    seen = []

    def capture(args):  # what CFG saw at each evaluation, recorded independently of the sampler
        seen.append((args["input"].clone(), args["sigma"].clone(), args["cond_denoised"].clone(),
                     args["uncond_denoised"].clone()))
        return args["denoised"]

    pm = m.clone()
    pm.set_model_sampler_post_cfg_function(capture)
    sig = sigmas_of(m)
    run_custom_sampling(pm, family, sampler, sig, cfg=CFG)
    ms = m.get_model_object("model_sampling")
    flow = isinstance(ms, comfy.model_sampling.CONST)
    assert len(recorder.calls) == len(seen) == STEPS
    for (t, lam, eu, ec), (x, s, dc, du), sigma in zip(recorder.calls, seen, sig[:-1], strict=True):
        assert lam == pytest.approx(0.7)
        # EPS: the model timestep 0..999 the scheduler was trained on. Flow: the pack's noise level 1 - percent,
        # i.e. the flow time before Flux's shift sigma = a t / (1 + (a - 1) t), a = exp(mu), is applied
        sg, a = float(sigma), math.exp(ms.shift) if flow else 1.0
        expected_t = 999.0 * sg / (a - (a - 1.0) * sg) if flow else float(ms.timestep(sigma.reshape(1)))
        assert t == pytest.approx(expected_t, abs=0.5), (t, expected_t)
        a = (1.0 - s) if flow else 1.0
        sv = s.reshape(-1, 1, 1, 1)
        a = a.reshape(-1, 1, 1, 1) if flow else a
        torch.testing.assert_close(eu, (x - a * du) / sv, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ec, (x - a * dc) / sv, rtol=1e-4, atol=1e-4)
    ts = [c[0] for c in recorder.calls]
    assert ts == sorted(ts, reverse=True) and ts[0] > ts[-1] + 100


def test_annealing_scheduler_file_errors(scheduler_dir):
    # the pack is loaded under its folder name, so its error class is not preprint's: match the base class
    with pytest.raises(ValueError, match="not found.*annealing_convert"):
        run_node("PreprintSamplerAnnealingGuidance", scheduler_file="absent.safetensors", guidance_lambda=0.4,
                 renoise="unconditional (paper)")
    (scheduler_dir / "broken.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        run_node("PreprintSamplerAnnealingGuidance", scheduler_file="broken.safetensors", guidance_lambda=0.4,
                 renoise="unconditional (paper)")


# ---------------------------------------------------------------- noise-level guidance


class FixedNoise:
    def __init__(self, seed):
        self.seed = seed

    def generate_noise(self, latent):
        return make_noise(latent["samples"], self.seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_noise_level_guidance_noise_for_sampler_custom_advanced(models, family):
    m = models[family]
    pos, neg = make_conds(family)
    latent = {"samples": make_latent(family)}
    base = FixedNoise(5)
    off = run_node("PreprintNoiseLevelGuidance", noise=base, model=m, positive=pos, negative=neg, iterations=0,
                   step_size=1.0, clip_norm=0.5, jitter=0.001, renormalize=True)[0]
    assert torch.equal(off.generate_noise(latent), base.generate_noise(latent))
    with count_calls(m) as counter:
        nlg = run_node("PreprintNoiseLevelGuidance", noise=base, model=counter.model, positive=pos, negative=neg,
                       iterations=4, step_size=1.0, clip_norm=0.5, jitter=0.001, renormalize=True)[0]
        refined = nlg.generate_noise(latent)
    assert counter.rows == [2] * 4  # one two-branch evaluation per iteration
    assert nlg.seed == 5 and refined.shape == latent["samples"].shape
    assert not torch.equal(refined, base.generate_noise(latent))
    assert torch.equal(refined, nlg.generate_noise(latent))  # reproducible
    dim = refined[0].numel()
    assert float(refined.flatten(1).norm(dim=1)[0]) == pytest.approx(dim**0.5, rel=1e-4)
    # usable by SamplerCustomAdvanced, and with the CFG patches on the model it refines without them
    guider = comfy.samplers.CFGGuider(scheduled(m, sigma_start=0.5))
    guider.set_conds(pos, neg)
    guider.set_cfg(CFG)
    (out, _) = run_node_advanced(nlg, guider, family, latent)
    assert torch.isfinite(out["samples"]).all()


def run_node_advanced(noise, guider, family, latent):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["SamplerCustomAdvanced"]
    sampler = comfy.samplers.sampler_object("euler")
    return cls().sample(noise, guider, sampler, sigmas_of(guider.model_patcher), latent)


def test_graph_executes_all_nodes_together(comfy_host, scheduler_dir):
    save_scheduler(constant_scheduler(5.0), scheduler_dir / "graph.safetensors")
    prompt = {
        "1": {"class_type": "PreprintTinyTestModel", "inputs": {"architecture": "sd15", "weights_seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "5": {"class_type": "PreprintCADS", "inputs": {"model": ["1", 0], "tau1": 0.6, "tau2": 0.9,
                                                        "noise_scale": 0.25, "psi": 1.0, "noise_pooled": True}},
        "6": {"class_type": "PreprintScheduledCFG", "inputs": {"model": ["5", 0], "schedule": "cosine",
                                                                "cfg_start": 7.0, "cfg_end": 3.0, "exponent": 2.0,
                                                                "custom_scales": "", "sigma_start": 10.0,
                                                                "sigma_end": 0.2}},
        "7": {"class_type": "PreprintAdaptiveGuidance", "inputs": {"model": ["6", 0], "threshold": 0.999}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["7", 0], "seed": 1, "steps": 4, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "karras", "denoise": 1.0,
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0]}},
        "9": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "10": {"class_type": "PreprintNoiseLevelGuidance", "inputs": {
            "noise": ["9", 0], "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "iterations": 2,
            "step_size": 1.0, "clip_norm": 0.5, "jitter": 0.001, "renormalize": True}},
        "11": {"class_type": "CFGGuider", "inputs": {"model": ["5", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": 5.0}},
        "12": {"class_type": "PreprintSamplerAnnealingGuidance", "inputs": {
            "scheduler_file": "graph.safetensors", "guidance_lambda": 0.4, "renoise": "unconditional (paper)"}},
        "13": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 4,
                                                          "denoise": 1.0}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["11", 0],
                                                                 "sampler": ["12", 0], "sigmas": ["13", 0],
                                                                 "latent_image": ["4", 0]}},
        "15": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["1", 2]}},
        "17": {"class_type": "PreviewImage", "inputs": {"images": ["15", 0]}},
        "18": {"class_type": "PreviewImage", "inputs": {"images": ["16", 0]}},
    }
    outputs = comfy_host.execute(prompt)
    assert "17" in outputs and "18" in outputs


def test_model_options_keep_only_plain_data(models):
    # techniques ride in model_options, which ComfyUI deep-copies on every clone
    m = cads(scheduled(models["sd15"], sigma_start=3.0))
    clone = m.clone()
    assert clone.model_options["transformer_options"]["preprint_cfg"].keys() == {"scheduled_cfg", "cads"}
    assert comfy.model_patcher.ModelPatcher.get_wrappers(clone, pe.WrappersMP.CALC_COND_BATCH, "preprint_cfg")


# ---------------------------------------------------------------- Omegance (a guidance-family sampler wrapper)
# Its other host tests are in test_sampler_wrappers.py; these pin down what the node's mask input does.
