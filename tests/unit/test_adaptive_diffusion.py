"""AdaptiveDiffusion step skipping on the exact-score mixture."""

from __future__ import annotations

import pytest
import torch

from preprint.samplers.adaptive_diffusion import AdaptiveConfig, AdaptiveDiffusionSampler
from preprint.samplers.dpm_solver_pp import sample_dpmpp_2m

from .conftest import get_problem
from .test_omegance import euler


def run(base, problem, steps, **cfg):
    f = AdaptiveDiffusionSampler(base, AdaptiveConfig(**cfg))
    before = problem.model.calls
    x = f(problem.model, problem.x_start.clone(), problem.sigmas(steps), disable=True)
    return x, f.last_stats, problem.model.calls - before


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("base", [euler, sample_dpmpp_2m])
def test_threshold_zero_is_bit_identical(kind, base):
    p = get_problem(kind)
    plain = base(p.model, p.x_start.clone(), p.sigmas(25), disable=True)
    x, stats, calls = run(base, p, 25, threshold=0.0)
    assert torch.equal(x, plain)
    assert stats.skipped == 0 and stats.calls == 25 and calls == 25


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_skips_save_model_calls_at_small_error(kind):
    p = get_problem(kind)
    steps = 30
    plain = sample_dpmpp_2m(p.model, p.x_start.clone(), p.sigmas(steps), disable=True)
    x, stats, calls = run(sample_dpmpp_2m, p, steps, threshold=0.05, max_skips=4)
    assert stats.skipped > 0 and calls == stats.model_calls == steps - stats.skipped  # counted honestly
    rel = float((x - plain).pow(2).mean().sqrt() / plain.pow(2).mean().sqrt())
    assert rel < 0.05, (stats, rel)


def test_rules_warmup_and_max_consecutive_skips():
    p = get_problem("eps")
    _, stats, _ = run(euler, p, 40, threshold=10.0, max_skips=3)  # a huge threshold: skip whenever allowed
    skipped = set(stats.skipped_calls)
    assert not skipped & {0, 1, 2, 3}  # the first four calls always run
    run_len = 0
    for i in range(stats.calls):
        run_len = run_len + 1 if i in skipped else 0
        assert run_len <= 3
    assert stats.skipped == sum(1 for _ in skipped) and stats.skipped >= 20


def test_larger_threshold_skips_more():
    p = get_problem("flow")
    counts = [run(sample_dpmpp_2m, p, 30, threshold=t, max_skips=4)[1].skipped for t in (0.001, 0.02, 0.2, 2.0)]
    assert counts == sorted(counts) and counts[-1] > counts[0], counts


def test_each_run_starts_clean_and_is_deterministic():
    p = get_problem("eps", 7.5)
    f = AdaptiveDiffusionSampler(sample_dpmpp_2m, AdaptiveConfig(threshold=0.05))
    a = f(p.model, p.x_start.clone(), p.sigmas(20), disable=True)
    first = f.last_stats
    b = f(p.model, p.x_start.clone(), p.sigmas(20), disable=True)
    assert torch.equal(a, b) and f.last_stats is not first and f.last_stats.skipped_calls == first.skipped_calls
    seen = []
    f(p.model, p.x_start.clone(), p.sigmas(12), callback=lambda d: seen.append(d["i"]), disable=True)
    assert seen == list(range(12)) and f.last_stats.calls == 12


def test_bad_config():
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveConfig(threshold=-1)
    with pytest.raises(ValueError, match="max_skips"):
        AdaptiveConfig(max_skips=-2)
