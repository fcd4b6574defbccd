"""The UNet cache policies (DeepCache, encoder propagation, Block Caching) as the host drives them: what each run
stores, when it reuses, what it counts and reports, on the small synthetic UNet (pure torch, no ComfyUI)."""

from __future__ import annotations

import logging

import pytest
import torch

from preprint.caching.block_profile import Profile, block_key
from preprint.caching.schedules import refresh_steps
from preprint.caching.unet_policies import BlockCacheRun, DeepCacheRun, EncoderPropagationRun, LockedPlan
from preprint.caching.unet_runner import REUSE, RUN, BlockCounts, run_unet
from preprint.utils.sigma_window import SigmaWindow

from .test_caching_unet import TinyUNet, reference, timestep_embedding

ALL_BLOCKS = ([("input", i) for i in range(4)] + [("middle", 0)] + [("output", j) for j in range(4)])


@pytest.fixture(scope="module")
def unet():
    return TinyUNet().eval()


def _to(sigma, uuids=("c", "u")):
    return {"sigmas": torch.tensor([sigma] * len(uuids)), "uuids": list(uuids)}


def _t(sigma, n):
    return torch.tensor([sigma * 100.0] * n)


def _call(unet, run, x, sigma, uuids=("c", "u"), counts=None):
    """One model call as the host makes it: the run's plan, the cached forward, the plan's after-call hook."""
    to = _to(sigma, uuids)
    plan = run.plan_for(x, to)
    with torch.no_grad():
        if plan is None:
            return reference(unet, x, _t(sigma, x.shape[0]))
        out = run_unet(unet, plan, timestep_embedding, x, _t(sigma, x.shape[0]), None, None, None, to,
                       counts=run.counts if counts is None else counts)
    plan.after_call()
    return out


def assert_close(a, b):
    # float32 convolutions on other batch sizes may round differently
    assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _xs(seed, n, batch=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 2, 8, 8, generator=g) for _ in range(n)]


# -- what a cached entry was made for --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 2, 8, 8), (2, 3, 8, 8), (2, 2, 16, 16)],
                         ids=["batch-per-stream", "channels", "resolution"])
def test_deepcache_never_reuses_features_made_for_another_per_stream_input_shape(unet, shape):
    """Features are tagged with the per-stream input shape; a step whose streams carry another shape (two
    images per stream instead of one, another latent format, another resolution) recomputes."""
    run = DeepCacheRun(unet, [10.0, 5.0, 0.0], interval=2, branch=0)
    x0 = _xs(1, 1)[0]
    _call(unet, run, x0, 10.0)
    plan = run.plan(torch.zeros(shape), _to(5.0))
    assert plan.action(run.cache_name) == RUN and plan.action(("middle", 0)) == RUN
    assert run.reuse_calls == 0


def test_deepcache_conds_split_over_several_calls_reuse_their_own_features(unet):
    """ComfyUI may run the conds of one step in separate calls when memory is short: each call reuses the
    feature its own stream stored, whatever the batch of the call that stored it."""
    x0, x1 = _xs(2, 2)
    run = DeepCacheRun(unet, [10.0, 5.0, 0.0], interval=2, branch=0)
    _call(unet, run, x0, 10.0)
    cond = _call(unet, run, x1[:1], 5.0, ("c",))
    uncond = _call(unet, run, x1[1:], 5.0, ("u",))
    assert run.reuse_calls == 2
    clean = DeepCacheRun(unet, [10.0, 5.0, 0.0], interval=2, branch=0)
    _call(unet, clean, x0, 10.0)
    assert_close(torch.cat([cond, uncond]), _call(unet, clean, x1, 5.0))


def test_deepcache_keeps_three_streams_apart_when_their_order_changes(unet):
    """Every uuid of the batch is its own stream (here cond, uncond and a third cond): a step that brings them
    in another order gets each stream's own cached feature back."""
    x0, x1 = _xs(3, 2, batch=3)
    sig = [10.0, 5.0, 0.0]
    run = DeepCacheRun(unet, sig, interval=2, branch=0)
    _call(unet, run, x0, 10.0, ("c", "u", "p"))
    assert len(run.store) == 3
    rolled = _call(unet, run, x1.roll(1, 0), 5.0, ("p", "c", "u"))
    straight_run = DeepCacheRun(unet, sig, interval=2, branch=0)
    _call(unet, straight_run, x0, 10.0, ("c", "u", "p"))
    straight = _call(unet, straight_run, x1, 5.0, ("c", "u", "p"))
    assert run.reuse_calls == straight_run.reuse_calls == 1
    assert_close(rolled, straight.roll(1, 0))


def test_deepcache_stores_only_the_high_level_feature_of_each_stream(unet):
    """DeepCache keeps one tensor per stream (the main branch's feature), not every block it computes."""
    run = DeepCacheRun(unet, [10.0, 5.0, 0.0], interval=2, branch=0)
    x0, x1 = _xs(4, 2)
    _call(unet, run, x0, 10.0)
    assert len(run.store) == 2  # refresh step: ("output", 2) for "c" and for "u"
    _call(unet, run, x1, 5.0)
    assert len(run.store) == 2 and run.reuse_calls == 1  # a cached step records nothing


def test_deepcache_refresh_keeps_the_new_stream_of_a_call_whose_other_stream_is_another_input(unet):
    """At a refresh noise level, cond ran alone first; a later call there brings cond on another input (a guidance
    pass) together with uncond's first input. Uncond's feature is recorded from that call, cond's is kept from
    its first call, and the next step reuses both as a clean batched run would."""
    x0, x_other, x1 = _xs(5, 3)
    run = DeepCacheRun(unet, [10.0, 5.0, 0.0], interval=2, branch=0)
    _call(unet, run, x0[:1], 10.0, ("c",))
    _call(unet, run, torch.cat([x_other[:1], x0[1:]]), 10.0)
    out = _call(unet, run, x1, 5.0)
    assert run.reuse_calls == 1
    clean = DeepCacheRun(unet, [10.0, 5.0, 0.0], interval=2, branch=0)
    _call(unet, clean, x0, 10.0)
    assert_close(out, _call(unet, clean, x1, 5.0))


# -- DeepCache branch and schedule -----------------------------------------------------------------------------
@pytest.mark.parametrize("branch, ran, reused", [
    (1, {("input", 0), ("input", 1), ("output", 2), ("output", 3)}, ("output", 1)),
    (2, {("input", 0), ("input", 1), ("input", 2), ("output", 1), ("output", 2), ("output", 3)}, ("output", 0)),
])
def test_deepcache_cached_step_runs_the_skip_branch_of_its_depth(unet, branch, ran, reused):
    """Branch depth b (0 to n_out - 2): input blocks 0..b and the mirrored output blocks run on a cached step,
    the output block just before them (n_out - 2 - b) is reused and the deep branch below it is skipped. Same
    x and t as the refresh step: the reused feature is the recomputed one, so the output is the stock one."""
    run = DeepCacheRun(unet, [10.0, 5.0, 0.0], interval=2, branch=branch)
    assert run.cache_name == reused
    x = _xs(6, 1)[0]
    t = _t(10.0, 2)
    with torch.no_grad():
        run_unet(unet, run.plan(x, _to(10.0)), timestep_embedding, x, t, None, None, None, _to(10.0))
        counts = BlockCounts()
        out = run_unet(unet, run.plan(x, _to(5.0)), timestep_embedding, x, t, None, None, None, _to(5.0),
                       counts=counts)
        assert torch.equal(out, reference(unet, x, t))
    assert set(counts.run) == ran
    assert set(counts.not_run) == set(ALL_BLOCKS) - ran


def test_deepcache_branch_depth_range(unet):
    """Valid depths are 0 to n_out - 2 (the node's own check): the deepest is accepted, a negative one is not."""
    assert DeepCacheRun(unet, [3.0, 2.0, 1.0, 0.0], interval=2, branch=2).branch == 2
    with pytest.raises(ValueError, match="branch depth -1 is out of range"):
        DeepCacheRun(unet, [3.0, 2.0, 1.0, 0.0], interval=2, branch=-1)


def test_deepcache_non_uniform_schedule_defaults_to_the_papers_centre_and_power(unet):
    """DeepCache Sec. 3.3 centres the non-uniform refreshes at step 15 of 50 (0.3 of the run) with power 1.4."""
    sig = [float(10 - i) for i in range(10)] + [0.0]
    run = DeepCacheRun(unet, sig, interval=3, branch=0, schedule="non-uniform")
    assert run.refresh == refresh_steps("non-uniform", 10, 3, center=0.3, power=1.4)
    assert run.refresh != refresh_steps("non-uniform", 10, 3, center=0.3, power=2.4)  # the power matters here


def test_encoder_propagation_with_every_step_a_key_leaves_the_model_alone(unet):
    """Interval 1 makes every step a key step: nothing is ever reused, so no plan (the stock forward runs)."""
    run = EncoderPropagationRun(unet, [3.0, 2.0, 1.0, 0.0], interval=1)
    assert run.inert
    assert [run.plan_for(torch.zeros(2, 2, 8, 8), _to(s)) for s in (3.0, 2.0, 1.0)] == [None, None, None]
    assert run.calls == 3


# -- counting, reporting, fallbacks ----------------------------------------------------------------------------
def test_summary_counts_calls_reuse_and_skipped_block_evaluations(unet):
    """Three calls, refresh at steps 0 and 2: one call reused; the cached step skipped 7 of its 9 blocks, so 7
    of the run's 27 block evaluations (26%) were skipped."""
    run = DeepCacheRun(unet, [10.0, 5.0, 2.0, 0.0], interval=2, branch=0)
    for x, s in zip(_xs(7, 3), (10.0, 5.0, 2.0), strict=True):
        _call(unet, run, x, s)
    assert (run.calls, run.reuse_calls, run.fallback_calls) == (3, 1, 0)
    assert run.summary() == "DeepCache: 1/3 model calls reused cached features; 26% of block evaluations skipped"


def test_summary_percentage_is_the_skipped_fraction_in_percent(unet):
    """3 of 4 block evaluations not run: 75%."""
    run = EncoderPropagationRun(unet, [10.0, 5.0, 0.0], interval=2)
    run.counts.add(("input", 0), True)
    for _ in range(3):
        run.counts.add(("input", 1), False)
    assert run.summary() == ("Encoder propagation: 0/0 model calls reused cached features; "
                             "75% of block evaluations skipped")


def test_fallback_counts_every_call_and_warns_once_per_set_of_patches(unet, caplog):
    """A call with patches the cached forward cannot run goes to the stock forward: counted each time, warned
    about once per distinct set of patches, and reported in the summary."""
    run = DeepCacheRun(unet, [10.0, 5.0, 0.0], interval=2, branch=0)
    assert "uncached" not in run.summary()
    with caplog.at_level(logging.WARNING, logger="preprint.caching"):
        run.fallback(["patches['a']"])
        run.fallback(["patches['a']"])
        run.fallback(["patches['b']"])
    warned = [r.getMessage() for r in caplog.records if r.name == "preprint.caching"]
    assert len(warned) == 2 and "patches['a']" in warned[0] and "patches['b']" in warned[1]
    assert run.fallback_calls == 3
    assert run.summary().endswith("; 3 calls ran uncached (patches the cached forward does not run)")


@pytest.mark.parametrize("make", [lambda u, s: DeepCacheRun(u, s, interval=1, branch=0),
                                  lambda u, s: BlockCacheRun(u, s, "online", 0.0)],
                         ids=["deepcache-interval-1", "blockcache-threshold-0"])
def test_inert_runs_count_their_calls_and_plan_nothing(unet, make):
    """A run that can never reuse anything hands every call to the stock forward, and still counts it."""
    run = make(unet, [3.0, 2.0, 1.0, 0.0])
    assert [run.plan_for(torch.zeros(2, 2, 8, 8), _to(s)) for s in (3.0, 2.0, 1.0)] == [None, None, None]
    assert run.calls == 3 and run.summary().startswith(f"{run.name}: 0/3 model calls")


def test_plan_for_wraps_the_plan_in_the_runs_lock(unet):
    """plan_for returns the run's plan behind a LockedPlan, which answers as the plan does."""
    run = DeepCacheRun(unet, [10.0, 5.0, 0.0], interval=2, branch=0)
    x0 = _xs(8, 1)[0]
    _call(unet, run, x0, 10.0)
    plan = run.plan_for(x0, _to(5.0))
    assert isinstance(plan, LockedPlan)
    assert plan.action(run.cache_name) == REUSE and plan.action(("middle", 0)) == "skip"
    assert plan.action(("input", 0)) == RUN
    plan.after_call()  # DeepCache has no after-call hook: nothing to do
    assert run.reuse_calls == 1


# -- Block Caching ---------------------------------------------------------------------------------------------
def _still_profile(run):
    """A calibrated profile saying no block ever changes: any progress allows reuse."""
    return Profile("fp", "tiny", [0.0, 1.0], {block_key(n): [0.0, 0.0] for n in run.eligible})


def _not_run(counts):
    return sum(counts.not_run.values())


def test_block_cache_counts_a_call_as_reused_only_when_it_reused_a_block(unet):
    """Online mode, huge threshold: the first call has nothing stored, the second has no measured rate yet, the
    third reuses every eligible block. Only that call counts as reused (through the plan's after-call hook)."""
    run = BlockCacheRun(unet, [10.0, 5.0, 2.0, 0.0], "online", 1e9)
    xs = _xs(9, 3)
    counts = []
    for x, s in zip(xs, (10.0, 5.0, 2.0), strict=True):
        c = BlockCounts()
        _call(unet, run, x, s, counts=c)
        counts.append(_not_run(c))
        assert run.reuse_calls == (1 if s == 2.0 else 0)
    assert counts == [0, 0, len(run.eligible)]
    assert run.calls == 3


def test_block_cache_calibration_runs_every_block(unet):
    """Calibrate mode measures; it never reuses, whatever the threshold."""
    run = BlockCacheRun(unet, [10.0, 5.0, 2.0, 0.0], "calibrate", 1e9)
    counts = BlockCounts()
    for x, s in zip(_xs(10, 3), (10.0, 5.0, 2.0), strict=True):
        _call(unet, run, x, s, counts=counts)
    assert not counts.not_run and run.reuse_calls == 0
    assert run.calibrator.samples  # it did measure


@pytest.mark.parametrize("window, reused", [(SigmaWindow(), True), (SigmaWindow(-1.0, 6.0), False)],
                         ids=["no-window", "sigma-5-outside"])
def test_block_cache_reuses_only_inside_its_window(unet, window, reused):
    """Outside the node's percent window every block is computed, even where the profile allows reuse."""
    probe = BlockCacheRun(unet, [10.0, 5.0, 0.0], "online", 1.0)
    run = BlockCacheRun(unet, [10.0, 5.0, 0.0], "profile", 0.1, _still_profile(probe), window=window)
    x0, x1 = _xs(11, 2)
    _call(unet, run, x0, 10.0)
    counts = BlockCounts()
    _call(unet, run, x1, 5.0, counts=counts)
    assert _not_run(counts) == (len(run.eligible) if reused else 0)


@pytest.mark.parametrize("threshold, reused", [(0.25, False), (0.2500001, True)])
def test_block_cache_reuses_only_while_the_predicted_change_stays_under_the_threshold(unet, threshold, reused):
    """A profile rate of 0.5 per unit of progress over half the run predicts a change of exactly 0.25: a block is
    reused only when that is strictly below the threshold."""
    probe = BlockCacheRun(unet, [10.0, 5.0, 0.0], "online", 1.0)
    prof = Profile("fp", "tiny", [0.0, 1.0], {block_key(n): [0.5, 0.5] for n in probe.eligible})
    run = BlockCacheRun(unet, [10.0, 5.0, 0.0], "profile", threshold, prof)
    assert run.predicted_change(("middle", 0), ("c", False), 0.0, 0.5) == 0.25
    x0, x1 = _xs(12, 2)
    _call(unet, run, x0, 10.0)
    counts = BlockCounts()
    _call(unet, run, x1, 5.0, counts=counts)
    assert _not_run(counts) == (len(run.eligible) if reused else 0)


def _measured_run(unet, threshold):
    """Online run over four steps (progress 0, 0.25, 0.5, 0.75): the middle block's output of the single stream
    goes from all ones at progress 0.25 to all twos at 0.5."""
    run = BlockCacheRun(unet, [10.0, 8.0, 6.0, 4.0, 0.0], "online", threshold)
    x = torch.zeros(1, 2, 8, 8)
    run.plan(x, _to(8.0, ("c",))).computed(("middle", 0), torch.ones(1, 6, 4, 4))
    run.plan(x, _to(6.0, ("c",))).computed(("middle", 0), torch.full((1, 6, 4, 4), 2.0))
    return run, x


def test_block_cache_online_rate_is_change_per_unit_of_progress(unet):
    """Online mode measures a block's rate as its relative L1 change (Eq. 1) divided by the progress since it was
    last computed, and predicts rate x progress ahead: change |2 - 1| / |2| = 0.5 over 0.25 of the run is a rate
    of 2, so a change of 0.5 over any following quarter."""
    run, _ = _measured_run(unet, 1.0)
    key, mid = ("c", False), ("middle", 0)
    assert run.predicted_change(mid, key, 0.5, 0.75) == pytest.approx(0.5)
    assert run.predicted_change(mid, key, 0.75, 1.0) == pytest.approx(0.5)


@pytest.mark.parametrize("threshold, action", [(0.45, RUN), (0.55, REUSE)])
def test_block_cache_online_decision_compares_the_predicted_change_with_the_threshold(unet, threshold, action):
    """The next step predicts a change of 0.5 for the middle block: recomputed under threshold 0.45, reused
    under 0.55."""
    run, x = _measured_run(unet, threshold)
    assert run.plan(x, _to(4.0, ("c",))).action(("middle", 0)) == action


def test_block_cache_rejects_a_negative_threshold(unet):
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        BlockCacheRun(unet, [10.0, 5.0, 0.0], "online", -0.5)


def test_block_cache_keeps_the_new_stream_of_a_call_whose_other_stream_is_another_input(unet):
    """Cond ran alone first at a noise level; a later call there brings cond on another input together with
    uncond's first input. Cond's features are left alone, uncond's are recorded, and at the next noise level
    (a profile that allows any reuse) every eligible block is reused for both, as after a clean batched call."""
    x0, x_other, x1 = _xs(13, 3)
    probe = BlockCacheRun(unet, [10.0, 5.0, 0.0], "online", 1.0)
    prof = _still_profile(probe)
    run = BlockCacheRun(unet, [10.0, 5.0, 0.0], "profile", 0.1, prof)
    _call(unet, run, x0[:1], 10.0, ("c",))
    _call(unet, run, torch.cat([x_other[:1], x0[1:]]), 10.0)
    counts = BlockCounts()
    out = _call(unet, run, x1, 5.0, counts=counts)
    assert _not_run(counts) == len(run.eligible)
    clean = BlockCacheRun(unet, [10.0, 5.0, 0.0], "profile", 0.1, prof)
    _call(unet, clean, x0, 10.0)
    assert_close(out, _call(unet, clean, x1, 5.0))


def test_block_cache_recomputing_a_stream_at_its_own_noise_level_measures_no_rate(unet):
    """Cond moved to sigma 5 alone; then cond (same input) and uncond (first call there) come together. Uncond
    has no measured rate yet, so every block runs; cond's recomputed features at the noise level they were made
    at carry no progress, so no rate is taken from them, and the call is the stock forward."""
    x0, x1 = _xs(14, 2)
    run = BlockCacheRun(unet, [10.0, 5.0, 0.0], "online", 1e9)
    _call(unet, run, x0, 10.0)
    _call(unet, run, x1[:1], 5.0, ("c",))
    rate_c = run.predicted_change(("middle", 0), ("c", False), 0.5, 1.0)
    counts = BlockCounts()
    out = _call(unet, run, x1, 5.0, counts=counts)
    assert not counts.not_run
    with torch.no_grad():
        assert torch.equal(out, reference(unet, x1, _t(5.0, 2)))
    assert run.predicted_change(("middle", 0), ("c", False), 0.5, 1.0) == rate_c
