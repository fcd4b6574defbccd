"""Caching nodes on tiny architecture-faithful models through real ComfyUI sampling."""

from __future__ import annotations

import logging
import sys

import comfy.patcher_extension as pe
import comfy.samplers
import pytest
import torch

from preprint.caching.block_profile import Profile, block_key, model_fingerprint

from .harness import node_class, run_custom_sampling, run_node, run_sampling, tiny_model

P = {"start_percent": 0.0, "end_percent": 1.0}


def deepcache(m, interval=3, branch=0, schedule="uniform", **window):
    return run_node("PreprintDeepCache", model=m, cache_interval=interval, branch_depth=branch, schedule=schedule,
                    **{**P, **window})[0]


def blockcache(m, mode="online", threshold=0.3, name="test_profile", **window):
    return run_node("PreprintBlockCache", model=m, mode=mode, threshold=threshold, profile_name=name,
                    **{**P, **window})[0]


def encprop(m, key_steps="uniform", interval=2, **window):
    return run_node("PreprintEncoderPropagation", model=m, key_steps=key_steps, key_interval=interval,
                    **{**P, **window})[0]


def ditcache(m, threshold=0.12, order=2, max_skips=3, **window):
    return run_node("PreprintDiTBlockCache", model=m, threshold=threshold, extrapolation_order=order,
                    max_consecutive_skips=max_skips, **{**P, **window})[0]


def report(m, key):
    return m.get_wrappers(pe.WrappersMP.OUTER_SAMPLE, key)[0].last_report


@pytest.fixture(scope="module")
def sd15():
    return tiny_model("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_model("sdxl")


@pytest.fixture(scope="module")
def flux():
    return tiny_model("flux")


def sample(m, family, **kw):
    kw.setdefault("scheduler", "simple" if family == "flux" else "karras")
    return run_sampling(m, family, **kw)


# -- switched off == uncached, bit for bit ---------------------------------------------------------------------
@pytest.mark.parametrize("family,make", [
    ("sd15", lambda m: deepcache(m, interval=1)),
    ("sdxl", lambda m: deepcache(m, interval=1)),
    ("sd15", lambda m: blockcache(m, threshold=0.0)),
    ("sd15", lambda m: blockcache(m, mode="calibrate", name="bitwise_check")),  # our forward, every block run
    ("sd15", lambda m: encprop(m, interval=1)),
    ("flux", lambda m: ditcache(m, threshold=0.0)),
], ids=["deepcache-sd15", "deepcache-sdxl", "blockcache-th0", "blockcache-calibrate", "encprop-1", "dit-th0"])
# heun calls the model twice per step, its corrector at the next step's noise level on another input
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_switched_off_equals_uncached_bitwise(family, make, sampler, request):
    m = request.getfixturevalue(family)
    base = sample(m, family, steps=5, sampler_name=sampler)
    assert torch.equal(sample(make(m), family, steps=5, sampler_name=sampler), base)


def test_caching_changes_output_and_skips_blocks(sd15, flux):
    base = sample(sd15, "sd15", steps=8)
    m = deepcache(sd15, interval=3)
    out = sample(m, "sd15", steps=8)
    rep = report(m, "preprint_deepcache")
    assert not torch.equal(out, base) and torch.isfinite(out).all()
    assert rep["counts"].skipped_fraction() > 0.5  # 5 of 8 steps run only 2 of 25 blocks
    f = ditcache(flux, threshold=5.0, max_skips=2)
    sample(f, "flux", steps=8)
    assert report(f, "preprint_dit_cache")["counts"].skipped_fraction() > 0.3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_dit_cache_keeps_the_residuals_of_blocks_that_add_in_place(flux):
    """Flux's single blocks and text stream add to their input in place and return it; a skipped block must
    still add its real residual, not act as the identity."""
    # the second call repeats the first (same noise level, same input: Euler with a zero step), so the first
    # block's residual is unchanged and every other block is skipped; input + recorded residual must then
    # reproduce each block's output, so the result matches the uncached model to float rounding
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = torch.tensor([1.0, 1.0, 0.0])
    base = run_custom_sampling(flux, "flux", sampler, sigmas)
    m = ditcache(flux, threshold=0.05, order=1)
    out = run_custom_sampling(m, "flux", sampler, sigmas)
    rep = report(m, "preprint_dit_cache")
    assert rep["summary"].startswith("DiT block cache: 1/2 model calls skipped")
    assert rep["counts"].skipped_fraction() > 0.45  # 56 of 57 blocks on one of two calls
    assert _rel(out, base) < 1e-4  # residuals recorded as zero: 0.33


# -- cond and uncond never share features ----------------------------------------------------------------------
def _split_calls(executor, model, conds, x_in, timestep, model_options):
    # one model call per cond: the batching ComfyUI falls back to when memory is short
    out = []
    for c in conds:
        out += executor(model, [c], x_in, timestep, model_options)
    return out


def _batched_vs_split(m, family, steps=8, **kw):
    batched = sample(m, family, steps=steps, **kw)
    s = m.clone()
    s.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "test_split", _split_calls)
    split = sample(s, family, steps=steps, **kw)
    return batched, split


@pytest.mark.parametrize("family,make", [
    ("sd15", lambda m: deepcache(m, interval=3)),
    ("sd15", lambda m: blockcache(m, threshold=0.5)),
    ("sd15", lambda m: encprop(m, interval=2)),
    ("flux", lambda m: ditcache(m, threshold=5.0, max_skips=2)),
], ids=["deepcache", "blockcache", "encprop", "dit"])
def test_cond_and_uncond_keep_separate_caches(family, make, request):
    m = make(request.getfixturevalue(family))
    batched, split = _batched_vs_split(m, family, cfg=6.0)
    # the same streams, batched together or called one by one, give the same image
    torch.testing.assert_close(batched, split, rtol=1e-4, atol=1e-4 * batched.abs().max().item())


def test_the_check_sees_a_cache_that_mixes_streams(flux, monkeypatch):
    """The check above is sensitive: the same DiT cache keying every call as one stream (the negative prompt's call
    then reuses the positive's cached residual, the defect core EasyCache had in 0.3.64) fails it by far."""
    pack = node_class("PreprintDiTBlockCache").__module__.rsplit(".", 2)[0]
    monkeypatch.setattr(sys.modules[f"{pack}.caching.dit"], "chunk_keys", lambda to, batch: [("one", False)])
    m = ditcache(flux, threshold=5.0, max_skips=2)
    batched, split = _batched_vs_split(m, "flux", cfg=6.0)
    assert (batched - split).abs().max().item() > 1e-2 * batched.abs().max().item()


# -- fresh state every run -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,make", [
    ("sd15", lambda m: deepcache(m, interval=2)),
    ("sd15", lambda m: blockcache(m, threshold=0.5)),
    ("flux", lambda m: ditcache(m, threshold=5.0, max_skips=2)),
])
def test_consecutive_runs_with_other_shapes_and_steps_are_each_fresh(family, make, request):
    base_model = request.getfixturevalue(family)
    runs = [dict(steps=6, height=8, width=8, batch=1), dict(steps=9, height=16, width=8, batch=2),
            dict(steps=6, height=8, width=8, batch=1)]
    m = make(base_model)
    consecutive = [sample(m, family, **r) for r in runs]
    for r, got in zip(runs, consecutive, strict=True):
        fresh = sample(make(base_model), family, **r)  # a newly made node: as in a fresh process
        assert torch.equal(got, fresh)


def test_heun_calls_are_keyed_by_sigma_not_counted(sd15):
    m = deepcache(sd15, interval=2)
    steps = 6
    sample(m, "sd15", steps=steps, sampler_name="heun")
    rep = report(m, "preprint_deepcache")
    # heun evaluates step i at sigma_i and its corrector at sigma_{i+1} (not after the last step): calls at
    # positions 0,1 | 1,2 | 2,3 | 3,4 | 4,5 | 5 -> refresh on even positions; odd positions reuse
    positions = [p for i in range(steps) for p in ((i, i + 1) if i < steps - 1 else (i,))]
    assert rep["calls"] == len(positions)
    expected_reuse = sum(1 for p in positions if p % 2 == 1)
    assert rep["summary"].startswith(f"DeepCache: {expected_reuse}/{len(positions)}")


class _CallLog:
    """DIFFUSION_MODEL wrapper recording, per model call, its sigma, input, output and the blocks not run."""

    def __init__(self, key: str):
        self.key = key
        self.calls: list[tuple[float, torch.Tensor, torch.Tensor, dict]] = []

    def __call__(self, executor, *args, **kwargs):
        # the UNet gets transformer_options positionally (x, timesteps, context, y, control, options), Flux by
        # keyword
        to = kwargs.get("transformer_options") or next(a for a in args if isinstance(a, dict) and "sigmas" in a)
        run = to.get(self.key)
        before = dict(run.counts.not_run) if run is not None else {}
        out = executor(*args, **kwargs)
        after = dict(run.counts.not_run) if run is not None else {}
        not_run = {n for n, c in after.items() if c > before.get(n, 0)}
        self.calls.append((float(to["sigmas"][0]), args[0].clone(), out.clone(), not_run))
        return out


def _logged(m, key: str) -> tuple:
    log = _CallLog(key)
    logged = m.clone()
    logged.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_call_log", log)
    return logged, log


def test_block_cache_judges_heun_calls_at_one_noise_level_on_their_inputs(sd15):
    """Heun's corrector and the next step's first call share a noise level but not an input: the second must
    not read what the first computed."""
    # a threshold below any step's predicted change: Euler reuses nothing, and neither may Heun
    for sampler in ("euler", "heun"):
        base = sample(sd15, "sd15", steps=6, sampler_name=sampler)
        m = blockcache(sd15, threshold=1e-3)
        assert torch.equal(sample(m, "sd15", steps=6, sampler_name=sampler), base), sampler
        assert report(m, "preprint_blockcache")["counts"].skipped_fraction() == 0.0, sampler
    # a threshold that reuses: per pair of Heun calls at one sigma, the second computes what the first computed
    m, log = _logged(blockcache(sd15, threshold=0.5), "preprint_blockcache")
    sample(m, "sd15", steps=8, sampler_name="heun")
    pairs = [(a, b) for a, b in zip(log.calls, log.calls[1:], strict=False) if a[0] == b[0]]
    assert len(pairs) == 7 and all(not torch.equal(a[1], b[1]) for a, b in pairs)
    assert any(b[3] for _, b in pairs)  # reuse does happen on these calls
    last = ("output", len(sd15.model.diffusion_model.output_blocks) - 1)
    assert any(last not in a[3] for a, _ in pairs)
    for a, b in pairs:
        assert b[3] == a[3]  # the same blocks reused: progress since they were computed is the same
        if last not in a[3]:  # the last block ran on the first call, so it runs again: another output
            assert not torch.equal(a[2], b[2])


def _pattern(log: _CallLog, not_run: set, letter: str) -> str:
    """One letter per model call: F when every block ran, ``letter`` when exactly the blocks ``not_run`` did not,
    ? for anything else."""
    return "".join("F" if not c[3] else letter if c[3] == not_run else "?" for c in log.calls)


@pytest.mark.parametrize("threshold,order,max_skips,pattern", [
    (1e9, 1, 1, "FSFSFSFS"), (1e9, 1, 2, "FSSFSSFS"), (1e9, 1, 3, "FSSSFSSS"), (1e9, 2, 2, "FFSSFSSF"),
    (1e9, 3, 2, "FFFSSFSS"), (1e-6, 1, 3, "FFFFFFFF")])
def test_dit_cache_forces_a_full_call_after_max_consecutive_skips(flux, threshold, order, max_skips, pattern):
    """F: every block computed; S: only the first block, the others extrapolated. A threshold no change reaches
    skips whenever the history allows (``order`` full calls first), so only the limit forces full calls; one
    below every change of the first block's residual skips nothing."""
    m, log = _logged(ditcache(flux, threshold=threshold, order=order, max_skips=max_skips), "preprint_dit_cache")
    sample(m, "flux", steps=len(pattern))
    keys = [k for k in m.model_options["transformer_options"]["patches_replace"]["dit"]]
    assert len(keys) > 2 and ("double_block", 0) in keys
    assert _pattern(log, set(keys) - {("double_block", 0)}, "S") == pattern


# -- every documented knob of the UNet caches acts: which blocks run on which step ------------------------------
@pytest.mark.parametrize("interval,schedule,branch,pattern", [
    (3, "uniform", 0, "FRRFRRFRRF"), (2, "uniform", 0, "FRFRFRFRFR"), (4, "uniform", 9, "FRRRFRRRFR"),
    (3, "non-uniform", 0, "FRRFFRFRRR"),  # the reference implementation's refresh steps {0, 3, 4, 6} of 10
    (3, "non-uniform", 2, "FRRFFRFRRR")])
def test_deepcache_refreshes_on_its_schedule_and_runs_only_its_branch(sd15, interval, schedule, branch, pattern):
    """F: every block computed (a refresh); R: the deep feature reused, so exactly the blocks below the branch
    (input blocks after ``branch``, the middle block, the output blocks up to its mirror) are not run. At most
    interval - 1 steps in a row reuse."""
    unet = sd15.model.diffusion_model
    n_in, n_out = len(unet.input_blocks), len(unet.output_blocks)
    deep = ({("input", i) for i in range(branch + 1, n_in)} | {("middle", 0)}
            | {("output", j) for j in range(n_out - 1 - branch)})
    m, log = _logged(deepcache(sd15, interval=interval, branch=branch, schedule=schedule), "preprint_deepcache")
    sample(m, "sd15", steps=len(pattern))
    assert _pattern(log, deep, "R") == pattern


@pytest.mark.parametrize("key_steps,interval,pattern", [
    ("uniform", 3, "FRRFRRFRRF"), ("uniform", 2, "FRFRFRFRFR"),
    # the paper's 50-step key steps {0, 1, 2, 3, 5, 10, 15, 25, 35} rescaled to 10: {0, 1, 2, 3, 5, 7}; the
    # interval is for uniform key steps only
    ("non-uniform", 2, "FFFFRFRFRR"), ("non-uniform", 5, "FFFFRFRFRR")])
def test_encoder_propagation_runs_the_encoder_only_on_key_steps(sd15, key_steps, interval, pattern):
    """F: every block computed (a key step); R: the encoder (input blocks after the stem, the middle block)
    reused, only the decoder runs."""
    unet = sd15.model.diffusion_model
    encoder = {("input", i) for i in range(1, len(unet.input_blocks))} | {("middle", 0)}
    m, log = _logged(encprop(sd15, key_steps=key_steps, interval=interval), "preprint_encoder_propagation")
    sample(m, "sd15", steps=len(pattern))
    assert _pattern(log, encoder, "R") == pattern


@pytest.mark.parametrize("threshold,pattern", [(0.25, "FRRFRRFRRF"), (0.45, "FRRRRFRRRR")])
def test_block_cache_reuses_each_block_until_its_profiled_change_reaches_the_threshold(sd15, threshold, pattern):
    """A profile saying every block changes at rate 1 per run (0.1 per step of 10), one block at rate 10: each
    block is reused while the change accumulated since it was computed stays below the threshold (0.1 and 0.2 for
    0.25, up to 0.4 for 0.45), the fast block never. R: every block but the stem and the fast one reused."""
    unet = sd15.model.diffusion_model
    names = [("input", i) for i in range(len(unet.input_blocks))] + [("middle", 0)]
    names += [("output", j) for j in range(len(unet.output_blocks))]
    fast = ("output", 5)
    rates = {block_key(n): [10.0 if n == fast else 1.0] * 2 for n in names if n != ("input", 0)}
    profile_path = sys.modules[node_class("PreprintBlockCache").__module__].profile_path
    Profile(model_fingerprint(unet), "tiny SD1.5", [0.0, 1.0], rates, steps=10).save(profile_path("constant_rates"))
    m, log = _logged(blockcache(sd15, mode="profile", threshold=threshold, name="constant_rates"),
                     "preprint_blockcache")
    sample(m, "sd15", steps=len(pattern))
    assert _pattern(log, set(names) - {("input", 0), fast}, "R") == pattern


# start 0.25 / end 0.65 of the run put the window edges between steps of 10 on both models
WINDOW = {"start_percent": 0.25, "end_percent": 0.65}


@pytest.mark.parametrize("family,make,key,exact", [
    ("sd15", lambda m, **w: deepcache(m, interval=2, **w), "preprint_deepcache", True),
    ("sd15", lambda m, **w: encprop(m, interval=2, **w), "preprint_encoder_propagation", True),
    ("sd15", lambda m, **w: blockcache(m, threshold=0.5, **w), "preprint_blockcache", False),
    ("flux", lambda m, **w: ditcache(m, threshold=1e9, order=1, max_skips=2, **w), "preprint_dit_cache", False),
], ids=["deepcache", "encprop", "blockcache", "dit"])
def test_caches_reuse_only_inside_their_percent_window(family, make, key, exact, request):
    """Outside [start_percent, end_percent] of the run every block is computed; inside, the cache acts (for the
    key-step caches exactly as it does without a window)."""
    base = request.getfixturevalue(family)
    ms = base.get_model_object("model_sampling")
    hi, lo = float(ms.percent_to_sigma(WINDOW["start_percent"])), float(ms.percent_to_sigma(WINDOW["end_percent"]))
    everywhere, log_all = _logged(make(base), key)
    sample(everywhere, family, steps=10)
    windowed, log_win = _logged(make(base, **WINDOW), key)
    sample(windowed, family, steps=10)
    inside = [lo <= c[0] <= hi for c in log_win.calls]
    reused_all = [bool(c[3]) for c in log_all.calls]
    reused_win = [bool(c[3]) for c in log_win.calls]
    assert 2 <= sum(inside) <= len(inside) - 2
    # without the window, calls outside it reuse: a window that were ignored would show
    assert any(r and not i for r, i in zip(reused_all, inside, strict=True))
    assert not any(r and not i for r, i in zip(reused_win, inside, strict=True)), (inside, reused_win)
    assert any(reused_win)
    if exact:
        assert reused_win == [r and i for r, i in zip(reused_all, inside, strict=True)]


# -- composition ------------------------------------------------------------------------------------------------
def test_lora_patched_weights_are_used_by_the_cached_forward(sd15):
    lora = sd15.clone()
    key = "diffusion_model.output_blocks.11.0.out_layers.3.weight"
    w = sd15.model.state_dict()[key]
    lora.add_patches({key: (0.5 * torch.ones_like(w),)}, 1.0)
    base = sample(lora, "sd15", steps=5)
    assert not torch.equal(base, sample(sd15, "sd15", steps=5))
    assert torch.equal(sample(deepcache(lora, interval=1), "sd15", steps=5), base)
    # cached steps run output block 11 (the shallow branch): its patched weights must apply there too
    cached_lora = sample(deepcache(lora, interval=2), "sd15", steps=5)
    cached_plain = sample(deepcache(sd15, interval=2), "sd15", steps=5)
    assert not torch.equal(cached_lora, cached_plain)


def test_a_second_cache_node_replaces_the_first(sd15):
    twice = deepcache(deepcache(sd15, interval=3), interval=1)
    assert len(twice.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, "preprint_deepcache")) == 1
    assert torch.equal(sample(twice, "sd15", steps=5), sample(sd15, "sd15", steps=5))


# -- bad input ---------------------------------------------------------------------------------------------------
def test_unet_caches_refuse_dit_models_clearly(flux):
    for make in (deepcache, blockcache, encprop):
        with pytest.raises(ValueError, match="not a UNet .*DiT Block Cache"):
            make(flux)


def test_dit_cache_refuses_unets_clearly(sd15):
    with pytest.raises(ValueError, match="DiT block caching supports .*DeepCache"):
        ditcache(sd15)


def test_two_different_unet_caches_are_refused(sd15):
    with pytest.raises(ValueError, match="already has a Preprint UNet cache"):
        blockcache(deepcache(sd15))


def test_profile_for_another_model_is_rejected(sd15, sdxl):
    m = blockcache(sd15, mode="calibrate", name="sd15_profile")
    sample(m, "sd15", steps=6)
    ok = blockcache(sd15, mode="profile", threshold=0.5, name="sd15_profile")
    out = sample(ok, "sd15", steps=10)  # another step count: the profile still applies
    assert torch.isfinite(out).all() and report(ok, "preprint_blockcache")["counts"].skipped_fraction() > 0
    with pytest.raises(ValueError, match="calibrated on a different model architecture"):
        blockcache(sdxl, mode="profile", name="sd15_profile")
    with pytest.raises(ValueError, match="does not exist"):
        blockcache(sd15, mode="profile", name="no_such_profile")
    with pytest.raises(ValueError, match="not a plain file name"):
        blockcache(sd15, mode="profile", name="../escape")


def test_percent_window_is_validated():
    cls = comfy.samplers  # noqa: F841  (ComfyUI is booted)
    assert "after end_percent" in node_class("PreprintDeepCache").validate_inputs(start_percent=0.8,
                                                                                   end_percent=0.2)
    assert node_class("PreprintDeepCache").validate_inputs(start_percent=0.0, end_percent=1.0) is True



# (node, widget values that cannot run, values that can): checked by validate_inputs before anything is queued
WIDGET_CHECKS = [
    ("PreprintDeepCache", {"start_percent": 0.8, "end_percent": 0.2}, {"start_percent": 0.2, "end_percent": 0.8}),
    ("PreprintDeepCache", {"cache_interval": 0}, {"cache_interval": 1}),
    ("PreprintDeepCache", {"schedule": "sometimes"}, {"schedule": "non-uniform"}),
    ("PreprintBlockCache", {"start_percent": 0.5, "end_percent": 1.5}, {"start_percent": 0.5, "end_percent": 1.0}),
    ("PreprintBlockCache", {"mode": "offline"}, {"mode": "calibrate"}),
    ("PreprintBlockCache", {"threshold": -0.1}, {"threshold": 0.0}),
    ("PreprintBlockCache", {"mode": "profile", "profile_name": "../escape"},
     {"mode": "profile", "profile_name": "my profile.json"}),
    ("PreprintEncoderPropagation", {"start_percent": 0.9, "end_percent": 0.1},
     {"start_percent": 0.1, "end_percent": 0.9}),
    ("PreprintEncoderPropagation", {"key_steps": "every other"}, {"key_steps": "uniform"}),
    ("PreprintEncoderPropagation", {"key_interval": 0}, {"key_interval": 50}),
    ("PreprintDiTBlockCache", {"start_percent": 0.7, "end_percent": 0.3}, {"start_percent": 0.3, "end_percent": 0.7}),
    ("PreprintDiTBlockCache", {"threshold": -1.0}, {"threshold": 2.0}),
    ("PreprintDiTBlockCache", {"extrapolation_order": 4}, {"extrapolation_order": 3}),
]


@pytest.mark.parametrize("node_id,bad,good", WIDGET_CHECKS,
                         ids=[f"{n}-{'-'.join(bad)}" for n, bad, _ in WIDGET_CHECKS])
def test_widget_values_that_cannot_run_are_rejected_before_a_run(node_id, bad, good):
    cls = node_class(node_id)
    message = cls.validate_inputs(**bad)
    assert isinstance(message, str) and message.startswith(cls.define_schema().display_name + ": "), message
    assert cls.validate_inputs(**good) is True


def test_linked_inputs_and_unused_widgets_are_left_to_the_run():
    for node_id in ("PreprintDeepCache", "PreprintBlockCache", "PreprintEncoderPropagation", "PreprintDiTBlockCache"):
        assert node_class(node_id).validate_inputs() is True  # every checked input linked
    block_cache = node_class("PreprintBlockCache")
    # online mode reads no profile; a linked mode may turn out online
    assert block_cache.validate_inputs(mode="online", profile_name="../escape") is True
    assert block_cache.validate_inputs(profile_name="../escape") is True


def test_comfyui_validation_runs_the_checks_and_keeps_its_own():
    """Through ComfyUI's own prompt validation: the node's check answers for the inputs it names, ComfyUI's range
    check still holds for the others."""
    import asyncio

    import execution

    def errors(**widgets):
        prompt = {"1": {"class_type": "PreprintTinyTestModel", "inputs": {"architecture": "sd15", "weights_seed": 0}},
                  "2": {"class_type": "PreprintDeepCache",
                        "inputs": {"model": ["1", 0], "cache_interval": 3, "branch_depth": 0, "schedule": "uniform",
                                   **P, **widgets}}}
        return asyncio.run(execution.validate_inputs("test", prompt, "2", {}))[1]

    assert errors() == []
    ours = errors(cache_interval=0)  # ComfyUI files the message once per input the check names
    assert ours and all(e["type"] == "custom_validation_failed" for e in ours)
    assert "DeepCache (Preprint): cache_interval" in ours[0]["details"]
    (theirs,) = errors(branch_depth=21)
    assert theirs["type"] == "value_bigger_than_max"

def test_deepcache_composes_with_preprint_pag(sd15):
    def pag(m):
        return run_node("PreprintPerturbedAttentionGuidance", model=m, scale=3.0, layers="", adaptive_scale=0.0,
                        sigma_start=-1.0, sigma_end=-1.0, rescale=0.0)[0]

    pag_only = sample(pag(sd15), "sd15", steps=6, cfg=4.0)
    assert torch.equal(sample(deepcache(pag(sd15), interval=1), "sd15", steps=6, cfg=4.0), pag_only)
    for m in (deepcache(pag(sd15), interval=2), pag(deepcache(sd15, interval=2))):
        out = sample(m, "sd15", steps=6, cfg=4.0)
        assert torch.isfinite(out).all() and not torch.equal(out, pag_only)
        # the perturbed chunk is a stream of its own: batched or split, the same image
        s = m.clone()
        s.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "test_split", _split_calls)
        split = sample(s, "sd15", steps=6, cfg=4.0)
        torch.testing.assert_close(out, split, rtol=1e-4, atol=1e-4 * out.abs().max().item())


# -- hooks of newer ComfyUI, and patches the cached forward does not know ----------------------------------------
def test_middle_block_after_patch_is_run_by_the_cached_forward(sd15):
    m = sd15.clone()
    m.set_model_patch(lambda args: {"h": args["h"] * 1.25}, "middle_block_after_patch")
    # reference: the same change where newer stock forwards make it (after the middle block and its ControlNet
    # residual, before the first output block), through an output-block hook that every version runs
    ref = sd15.clone()
    ref.set_model_output_block_patch(lambda h, hsp, to: (h * 1.25 if to["block"] == ("output", 0) else h, hsp))
    expected = sample(ref, "sd15", steps=5)
    assert not torch.equal(expected, sample(sd15, "sd15", steps=5))
    # calibrate mode runs every block through our forward
    assert torch.equal(sample(blockcache(m, mode="calibrate", name="middle_patch_check"), "sd15", steps=5), expected)


@pytest.mark.parametrize("kind", ["patches", "patches_replace"])
def test_an_unknown_patch_hands_every_call_to_the_stock_forward(sd15, kind, caplog):
    m = sd15.clone()
    if kind == "patches":
        m.set_model_patch(lambda *a: a[0], "future_patch")
    else:
        m.set_model_patch_replace(lambda *a: a[0], "future_replace", "middle", 0)
    expected = sample(m, "sd15", steps=6, cfg=4.0)
    c = deepcache(m, interval=2)
    with caplog.at_level(logging.WARNING, logger="preprint.caching"):
        out = sample(c, "sd15", steps=6, cfg=4.0)
    assert torch.equal(out, expected)
    name = "future_patch" if kind == "patches" else "future_replace"
    warned = [r for r in caplog.records if name in r.getMessage()]
    assert len(warned) == 1 and "uncached" in warned[0].getMessage()  # once per run, not once per call
    rep = report(c, "preprint_deepcache")
    assert "6 calls ran uncached" in rep["summary"] and rep["counts"].skipped_fraction() == 0
