"""AdaptiveDiffusion's skip rule on hand-made states (``samplers/adaptive_diffusion.py``).

The skipper is fed states whose first differences ``d_k = mean |x_k - x_{k-1}|`` are chosen exactly, so the
paper's third-order test ``|(d_k + d_{k-2}) / 2 - d_{k-1}| <= threshold * d_{k-1}`` can be checked at and on
either side of its boundary, together with the warm-up, the consecutive-skip limit, what a skipped call returns
(``x - sigma r`` with ``r`` the last computed raw output), and the sigma-0 guard.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from preprint.samplers.adaptive_diffusion import AdaptiveConfig, AdaptiveDiffusionSampler, AdaptiveSkipper, SkipStats


class HalfModel:
    """Denoiser ``D(x) = x / 2``: its raw output at sigma ``s`` is ``r = (x - D) / s = x / (2 s)``."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, **kwargs):
        self.calls.append((x, sigma, kwargs))
        return x / 2


def states(diffs, shape=(2, 1, 2, 3)):
    """States whose successive mean absolute differences are exactly ``diffs`` (x_0 = 0)."""
    out, v = [torch.zeros(shape)], 0.0
    for d in diffs:
        v += d
        out.append(torch.full(shape, v))
    return out


def feed(skipper, xs, sigmas=None):
    model = HalfModel()
    sigmas = sigmas or [1.0] * len(xs)
    outs = [skipper(model, x, torch.full((x.shape[0],), s)) for x, s in zip(xs, sigmas, strict=True)]
    return outs, model


def decision(diffs, threshold, warmup=3, max_skips=4):
    """Whether the call after ``diffs`` (the fourth state with three diffs) is answered from cache."""
    sk = AdaptiveSkipper(AdaptiveConfig(threshold=threshold, max_skips=max_skips, warmup=warmup))
    feed(sk, states(diffs))
    return sk.stats.skipped_calls == [len(diffs)]


@pytest.mark.parametrize("diffs,threshold,skip", [
    ((1.0, 1.0, 1.5), 0.25, True),   # |1.25 - 1| = 0.25 = 0.25 * 1: the boundary counts as smooth
    ((1.0, 1.0, 1.5), 0.2, False),   # 0.25 > 0.2
    ((1.0, 2.0, 4.0), 0.25, True),   # |2.5 - 2| = 0.5 = 0.25 * 2 (the scale is d_{k-1}, not d_k or d_{k-2})
    ((1.0, 2.0, 4.0), 0.24, False),
    ((4.0, 2.0, 1.0), 0.25, True),   # the test is symmetric in d_k and d_{k-2}
    ((2.0, 2.0, 2.0), 0.01, True),   # a steady trajectory: second difference 0
    ((1.0, 3.0, 1.0), 0.6, False),   # |1 - 3| = 2 > 0.6 * 3
    ((1.0, 3.0, 1.0), 0.7, True),    # 2 <= 0.7 * 3
])
def test_third_order_criterion_known_answers(diffs, threshold, skip):
    assert decision(diffs, threshold) is skip


def test_a_standing_state_is_smooth():
    """All differences 0 (the state does not move): 0 <= threshold * 0, the previous prediction is reused."""
    assert decision((0.0, 0.0, 0.0), 0.01)


def test_skipped_call_reuses_the_last_raw_output_at_the_new_sigma():
    """The skipped call returns ``x - sigma r``, ``r = (x_prev - D(x_prev)) / sigma_prev`` per sample."""
    sk = AdaptiveSkipper(AdaptiveConfig(threshold=0.5, max_skips=4, warmup=3))
    xs = states((1.0, 1.0, 1.0))
    xs = [x * torch.tensor([1.0, -2.0]).view(2, 1, 1, 1) for x in xs]  # the two samples differ
    sig = [8.0, 4.0, 2.0, 0.5]
    outs, model = feed(sk, xs, sig)
    assert len(model.calls) == 3 and sk.stats.skipped_calls == [3]
    raw = (xs[2] - xs[2] / 2) / sig[2]
    torch.testing.assert_close(outs[3], xs[3] - sig[3] * raw, rtol=0, atol=0)
    for x, out in zip(xs[:3], outs[:3], strict=True):
        assert torch.equal(out, x / 2)  # computed calls return the model's prediction


def test_per_sample_sigmas_scale_each_sample():
    sk = AdaptiveSkipper(AdaptiveConfig(threshold=0.5, warmup=3))
    xs = states((1.0, 1.0, 1.0))
    model = HalfModel()
    sig = torch.tensor([2.0, 4.0])
    outs = [sk(model, x, sig) for x in xs]
    assert sk.stats.skipped_calls == [3]
    want = xs[3] - sig.view(2, 1, 1, 1) * (xs[2] / 2) / sig.view(2, 1, 1, 1)
    torch.testing.assert_close(outs[3], want, rtol=0, atol=0)
    # a scalar sigma serves the whole batch
    sk = AdaptiveSkipper(AdaptiveConfig(threshold=0.5, warmup=3))
    outs = [sk(model, x, torch.tensor(2.0)) for x in xs]
    torch.testing.assert_close(outs[3], xs[3] - xs[2] / 2, rtol=0, atol=0)


@pytest.mark.parametrize("warmup,first", [(3, 3), (4, 4), (6, 6)])
def test_warmup_calls_always_run(warmup, first):
    """A perfectly steady trajectory skips from the first call after the warm-up on."""
    sk = AdaptiveSkipper(AdaptiveConfig(threshold=0.1, max_skips=100, warmup=warmup))
    feed(sk, states([1.0] * 9))
    assert sk.stats.skipped_calls == list(range(first, 10))


@pytest.mark.parametrize("max_skips", [1, 2, 3])
def test_consecutive_skips_stop_at_max_skips(max_skips):
    sk = AdaptiveSkipper(AdaptiveConfig(threshold=0.1, max_skips=max_skips, warmup=3))
    feed(sk, states([1.0] * 12))
    skipped, run = set(sk.stats.skipped_calls), 0
    longest = 0
    for i in range(13):
        run = run + 1 if i in skipped else 0
        longest = max(longest, run)
    assert longest == max_skips
    # the pattern: max_skips skips, one computed call, and again
    assert sk.stats.skipped_calls[:max_skips] == list(range(3, 3 + max_skips))
    assert 3 + max_skips not in skipped and 4 + max_skips in skipped


def test_max_skips_zero_and_threshold_zero_never_skip():
    for cfg in (AdaptiveConfig(threshold=0.1, max_skips=0, warmup=3), AdaptiveConfig(threshold=0.0, warmup=3)):
        sk = AdaptiveSkipper(cfg)
        _, model = feed(sk, states([1.0] * 8))
        assert sk.stats.skipped == 0 and len(model.calls) == 9


def test_sigma_zero_is_computed_and_not_kept_as_raw():
    """At sigma 0 the model is called (x - 0 r would just return x) and its output is not turned into a raw
    output (a division by 0): a later skip reuses the raw output of the last call with sigma > 0."""
    sk = AdaptiveSkipper(AdaptiveConfig(threshold=0.5, max_skips=4, warmup=3))
    xs = states((1.0, 1.0, 1.0, 1.0, 1.0))
    sig = [4.0, 3.0, 2.0, 0.0, 1.0, 0.5]
    outs, model = feed(sk, xs, sig)
    assert sk.stats.skipped_calls == [4, 5]
    assert torch.equal(outs[3], xs[3] / 2)  # computed although the trajectory is smooth
    raw = (xs[2] / 2) / sig[2]
    torch.testing.assert_close(outs[4], xs[4] - sig[4] * raw, rtol=0, atol=0)
    assert torch.isfinite(outs[5]).all()


def test_nothing_to_reuse_before_a_call_with_positive_sigma():
    """After a smooth warm-up made only of sigma-0 calls there is no raw output to reuse: the call is computed."""
    sk = AdaptiveSkipper(AdaptiveConfig(threshold=0.5, max_skips=4, warmup=3))
    xs = states((1.0, 1.0, 1.0, 1.0))
    outs, model = feed(sk, xs, [0.0, 0.0, 0.0, 2.0, 1.0])
    assert len(model.calls) == 4 and sk.stats.skipped_calls == [4]
    assert torch.equal(outs[3], xs[3] / 2)


def test_a_state_of_another_shape_adds_no_difference():
    """A state of a new shape is not differenced against the previous one: after a change of shape the rule has
    one difference from before it and must wait for two more, so the first call that may skip is the fifth."""
    sk = AdaptiveSkipper(AdaptiveConfig(threshold=0.1, max_skips=100, warmup=3))
    small, big = states([1.0], shape=(1, 1, 2, 2)), states([1.0, 1.0], shape=(2, 1, 2, 2))
    _, model = feed(sk, small + big)
    assert sk.stats.skipped_calls == [4] and len(model.calls) == 4


def test_stats_and_config():
    s = SkipStats(calls=7, skipped=3)
    assert s.model_calls == 4
    assert AdaptiveConfig() == AdaptiveConfig(threshold=0.01, max_skips=4, warmup=4)  # the official code's values
    AdaptiveConfig(threshold=0.0, max_skips=0, warmup=3)  # every lower bound is allowed
    with pytest.raises(ValueError, match="warmup"):
        AdaptiveConfig(warmup=2)
    with pytest.raises(ValueError, match="max_skips"):
        AdaptiveConfig(max_skips=-1)
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveConfig(threshold=-1e-9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        AdaptiveConfig().warmup = 1  # one config serves every run of a sampler: its checks cannot be bypassed


def test_sampler_passes_options_and_keeps_the_name():
    seen = {}

    def my_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        seen.update(extra_args=extra_args, callback=callback, disable=disable, options=options)
        return model(x, sigmas[0], **(extra_args or {}))

    f = AdaptiveDiffusionSampler(my_sampler, AdaptiveConfig())
    model = HalfModel()
    x = torch.ones(1, 1, 2, 2)
    cb = object()
    out = f(model, x, torch.tensor([1.0, 0.0]), extra_args={"seed": 3}, callback=cb, disable=True, eta=0.5)
    assert torch.equal(out, x / 2) and model.calls[0][2] == {"seed": 3}
    assert seen == {"extra_args": {"seed": 3}, "callback": cb, "disable": True, "options": {"eta": 0.5}}
    assert f.__name__ == "my_sampler" and f.last_stats.calls == 1 and f.last_stats.skipped == 0
