"""Caching policies on synthetic trajectories and small torch modules (no ComfyUI)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from preprint.caching.block_profile import Calibrator, Profile, ProfileError, model_fingerprint, relative_l1_change
from preprint.caching.clock import StepClock
from preprint.caching.dit import DiTCacheRun
from preprint.caching.extrapolation import History, extrapolation_weights
from preprint.caching.schedules import faster_diffusion_keys, nonuniform_refresh, uniform_refresh
from preprint.caching.store import ChunkStore, chunk_keys

SIGMAS = [14.6, 8.0, 4.0, 2.0, 1.0, 0.5, 0.0]


# -- clock -----------------------------------------------------------------------------------------------------
def test_clock_positions_are_keyed_by_sigma():
    c = StepClock(torch.tensor(SIGMAS))
    assert [c.position(s) for s in SIGMAS[:-1]] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert c.position(torch.tensor([6.0, 6.0])) == pytest.approx(1.5)  # a 2S midpoint of step 1
    assert c.step(6.0) == 1
    # Heun's corrector at sigma_{i+1} sits where step i+1 starts: same decision as that step
    assert c.step(torch.tensor(SIGMAS[3], dtype=torch.float32)) == 3
    assert c.step(20.0) == 0 and c.step(0.0) == 5  # clipped to the run
    assert c.progress(SIGMAS[3]) == pytest.approx(0.5)


def test_clock_rejects_bad_schedules():
    with pytest.raises(ValueError, match="at least two"):
        StepClock([1.0])
    with pytest.raises(ValueError, match="must not increase"):
        StepClock([1.0, 2.0, 0.0])


# -- schedules -------------------------------------------------------------------------------------------------
def test_uniform_refresh():
    assert uniform_refresh(10, 3) == {0, 3, 6, 9}
    assert uniform_refresh(5, 1) == set(range(5))
    with pytest.raises(ValueError):
        uniform_refresh(10, 0)


@pytest.mark.parametrize("steps,interval", [(20, 3), (50, 5), (30, 2), (8, 3)])
def test_nonuniform_refresh_same_budget_denser_near_center(steps, interval):
    u, n = uniform_refresh(steps, interval), nonuniform_refresh(steps, interval, center=0.3, power=1.4)
    assert len(n) == len(u) and 0 in n and max(n) < steps
    if steps >= 20:
        c = 0.3 * (steps - 1)
        spread = lambda s: sum(abs(k - c) for k in s if k) / (len(s) - 1)  # noqa: E731
        assert spread(n) < spread(u)


# Refresh steps of the reference DeepCache implementation (sample_from_quad_center with center
# round(0.3 * steps), power 1.4, budget ceil(steps / interval)), as it returns them.
REFERENCE_NONUNIFORM = {
    (20, 5): [0, 5, 8, 13],
    (20, 3): [0, 3, 5, 7, 10, 13, 16],
    (20, 2): [0, 2, 4, 6, 7, 8, 10, 12, 15, 17],  # power relaxed to 1.28 to fit 10 distinct steps
    (50, 3): [0, 3, 6, 8, 11, 13, 15, 17, 20, 22, 25, 28, 32, 35, 38, 42, 46],
    (50, 5): [0, 5, 9, 13, 17, 21, 26, 31, 37, 43],
    (30, 4): [0, 4, 7, 9, 12, 16, 20, 25],
    (25, 2): [0, 2, 4, 6, 7, 8, 10, 11, 13, 15, 17, 20, 22],
    (15, 5): [0, 4, 8],
    (10, 3): [0, 3, 4, 6],
    (20, 10): [0, 8],
}


@pytest.mark.parametrize("steps,interval", sorted(REFERENCE_NONUNIFORM))
def test_nonuniform_refresh_matches_the_reference_placement(steps, interval):
    got = sorted(nonuniform_refresh(steps, interval))
    assert got == REFERENCE_NONUNIFORM[(steps, interval)]
    assert steps - 1 not in got  # the last step is never spent on a refresh


def test_faster_diffusion_keys_match_paper_at_50_steps():
    assert faster_diffusion_keys(50) == {0, 1, 2, 3, 5, 10, 15, 25, 35}
    assert faster_diffusion_keys(10, interval=2) == {0, 2, 4, 6, 8}
    k20 = faster_diffusion_keys(20)
    assert 0 in k20 and len(k20) < 20


# -- store -----------------------------------------------------------------------------------------------------
def test_chunk_keys_keep_streams_apart():
    to = {"uuids": ["c", "u", "c2"], "preprint_perturbed": {2}}
    assert chunk_keys(to, 6) == [("c", False), ("u", False), ("c2", True)]
    # a perturbed copy that shares the positive's uuid is still a stream of its own
    assert len(set(chunk_keys({"uuids": ["c", "c"], "preprint_perturbed": {1}}, 2))) == 2
    assert chunk_keys({}, 3) == [("__whole_batch__", False)]
    # a mapping keeps several kinds of perturbed pass apart from each other as well
    marked = chunk_keys({"uuids": ["c", "c", "c"], "preprint_perturbed": {1: "pag", 2: "sag"}}, 3)
    assert marked == [("c", False), ("c", "pag"), ("c", "sag")]


def test_store_reassembles_chunks_in_call_order_and_checks_tags():
    s = ChunkStore()
    t = torch.arange(4.0).reshape(4, 1)
    s.put("b", [("c", False), ("u", False)], t, tag="8x8")
    assert torch.equal(s.get("b", [("u", False), ("c", False)]), torch.tensor([[2.0], [3.0], [0.0], [1.0]]))
    assert s.has("b", [("c", False)], tag="8x8")
    assert not s.has("b", [("c", False)], tag="16x16")  # another resolution never reads this entry
    assert not s.has("b", [("x", False)], tag="8x8")
    t.add_(100)  # the caller's tensor changes in place: the cache must not
    assert s.get("b", [("c", False)]).max() < 100


# -- extrapolation ---------------------------------------------------------------------------------------------
def test_ab_weights_match_the_paper_on_even_steps():
    assert extrapolation_weights([1.0], 2.0) == [1.0]
    assert extrapolation_weights([1.0, 2.0], 3.0) == pytest.approx([-1.0, 2.0])
    assert extrapolation_weights([1.0, 2.0, 3.0], 4.0) == pytest.approx([1.0, -3.0, 3.0])


@pytest.mark.parametrize("order", [1, 2, 3])
def test_history_is_exact_on_polynomials_of_degree_below_order(order):
    coeffs = torch.randn(order, 5, generator=torch.Generator().manual_seed(order))
    f = lambda u: sum(coeffs[k] * u**k for k in range(order))  # noqa: E731
    h = History(order)
    for u in (0.0, 1.0, 2.5, 3.0):  # uneven positions, as after skipped steps
        h.push(u, f(u))
    torch.testing.assert_close(h.predict(4.7), f(4.7), rtol=1e-4, atol=1e-4)


def test_history_replaces_a_second_value_at_the_same_position():
    h = History(2)
    h.push(1.0, torch.zeros(2))
    h.push(2.0, torch.ones(2))
    h.push(2.0, 2 * torch.ones(2))  # Heun's corrector and the next step share a position
    assert len(h) == 2 and torch.equal(h.predict(2.0), 2 * torch.ones(2))


# -- block profiles --------------------------------------------------------------------------------------------
def test_relative_l1_change():
    a = torch.tensor([1.0, -1.0])
    assert relative_l1_change(a, a) == 0.0
    assert relative_l1_change(a, torch.zeros(2)) == pytest.approx(1.0)
    assert relative_l1_change(torch.zeros(2), torch.zeros(2)) == 0.0


def _linear_profile() -> Profile:
    return Profile("abc", "toy", [0.0, 1.0], {"input.1": [1.0, 3.0]}, steps=10)


def test_profile_integral_is_independent_of_step_count():
    p = _linear_profile()
    assert p.accumulated("input.1", 0.0, 1.0) == pytest.approx(2.0)
    # the same stretch of progress cut into 10 or 40 steps accumulates the same change
    ten = sum(p.accumulated("input.1", k / 10, (k + 1) / 10) for k in range(10))
    forty = sum(p.accumulated("input.1", k / 40, (k + 1) / 40) for k in range(40))
    assert ten == pytest.approx(forty) == pytest.approx(2.0)
    assert p.rate("missing", 0.5) == math.inf


def test_profile_round_trip_and_model_check(tmp_path):
    p = _linear_profile()
    path = p.save(tmp_path / "x.json")
    q = Profile.load(path)
    assert q.rates == p.rates and q.fingerprint == "abc"
    q.check_model("abc", "toy")
    with pytest.raises(ProfileError, match="different model architecture"):
        q.check_model("zzz", "another net")


@pytest.mark.parametrize("content,match", [
    ("not json", "could not be read"),
    (json.dumps({"hello": 1}), "not a Preprint block-cache profile"),
    (json.dumps({"format": "preprint-block-cache-profile", "version": 99}), "version"),
    (json.dumps({"format": "preprint-block-cache-profile", "version": 1, "fingerprint": "a", "progress": [0, 1],
                 "rates": {"b": [1.0]}}), "wrong length"),
])
def test_malformed_profiles_are_rejected_clearly(tmp_path, content, match):
    f = tmp_path / "p.json"
    f.write_text(content)
    with pytest.raises(ProfileError, match=match):
        Profile.load(f)
    with pytest.raises(ProfileError, match="does not exist"):
        Profile.load(tmp_path / "none.json")


def test_calibrator_builds_rates_per_unit_progress():
    cal = Calibrator()
    for k in range(4):
        cal.add("middle.0", k / 4, (k + 1) / 4, 0.05)  # 0.05 per quarter -> rate 0.2
    prof = cal.profile("fp", "toy", 4)
    assert prof.rates["middle.0"] == pytest.approx([0.2] * 4)
    with pytest.raises(ProfileError):
        Calibrator().profile("fp", "toy", 4)


def test_fingerprint_depends_on_architecture_not_weights():
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(torch.nn.Linear(3, 5))


# -- DiT cache on synthetic blocks -----------------------------------------------------------------------------
class _Block:
    """A block whose residual is a smooth function of sigma (the trajectory a cache has to predict)."""

    def __init__(self, k: int):
        self.k, self.calls = k, 0

    def __call__(self, args: dict) -> dict:
        self.calls += 1
        s = args["transformer_options"]["sigmas"][0].item()
        # per-row scale: cond and uncond rows get different residuals
        rows = torch.arange(1, args["img"].shape[0] + 1, dtype=torch.float32).reshape(-1, 1, 1)
        return {"img": args["img"] + rows * (self.k + 1) * (1.0 + 0.5 * s), "txt": args["txt"]}


class _InPlaceBlock(_Block):
    """The same residuals, added to the input in place and returned as the same tensor (as Flux's single
    blocks and text stream do)."""

    def __call__(self, args: dict) -> dict:
        out = super().__call__(args)
        args["img"].copy_(out["img"])
        return {"img": args["img"], "txt": args["txt"]}


def _dit_forward(run: DiTCacheRun, blocks, x, sigma, uuids):
    to = {"sigmas": torch.tensor([sigma] * x.shape[0]), "uuids": uuids}
    args = {"img": x, "txt": torch.zeros(x.shape[0], 2, 3), "transformer_options": to}
    for i, b in enumerate(blocks):
        out = run.block(("double_block", i), args, b)
        args = {**args, **out}
    return args["img"]


def _dit_run(threshold, order, sigmas, batch_uuids=("c", "u"), block=_Block, max_skips=10):
    blocks = [block(k) for k in range(4)]
    run = DiTCacheRun(sigmas, [("double_block", i) for i in range(4)], threshold, order, max_skips=max_skips)
    x = torch.zeros(len(batch_uuids), 5, 3)
    # a fresh input per call: in-place blocks write into it
    outs = [_dit_forward(run, blocks, x.clone(), s, list(batch_uuids)) for s in sigmas[:-1]]
    return outs, blocks, run


def _dit_pattern(threshold, order, sigmas, max_skips=10) -> str:
    """F for a call that computed block 1, S for one that extrapolated it, call by call."""
    blocks = [_Block(k) for k in range(4)]
    run = DiTCacheRun(sigmas, [("double_block", i) for i in range(4)], threshold, order, max_skips=max_skips)
    pattern = ""
    for s in sigmas[:-1]:
        before = blocks[1].calls
        _dit_forward(run, blocks, torch.zeros(2, 5, 3), s, ["c", "u"])
        pattern += "F" if blocks[1].calls > before else "S"
    return pattern


def test_dit_threshold_zero_runs_every_block():
    sig = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    outs, blocks, run = _dit_run(0.0, 2, sig)
    assert all(b.calls == 5 for b in blocks) and run.skipped_calls == 0


def test_dit_ab2_extrapolation_is_exact_on_linear_residuals_and_reuse_is_not():
    sig = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    exact, _, _ = _dit_run(0.0, 1, sig)
    ab2, blocks, run = _dit_run(10.0, 2, sig)  # threshold high: skip whenever allowed
    reuse, _, _ = _dit_run(10.0, 1, sig)
    assert run.skipped_calls > 0 and blocks[1].calls < 5
    for e, a in zip(exact, ab2, strict=True):
        torch.testing.assert_close(a, e)
    assert max((r - e).abs().max().item() for r, e in zip(reuse, exact, strict=True)) > 0.05


def test_dit_residuals_of_in_place_blocks_are_taken_against_their_inputs():
    sig = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    exact, _, _ = _dit_run(0.0, 1, sig)
    ab2, blocks, run = _dit_run(10.0, 2, sig, block=_InPlaceBlock)
    assert run.skipped_calls > 0 and blocks[1].calls < 5
    for e, a in zip(exact, ab2, strict=True):
        torch.testing.assert_close(a, e)  # residuals recorded as zero would drop blocks 1-3 on skipped calls


def test_dit_cond_and_uncond_keep_their_own_residuals():
    sig = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    out, _, _ = _dit_run(10.0, 1, sig)
    # row 2 (uncond) has twice the residual of row 1 (cond) on every step, cached or not
    for o in out:
        torch.testing.assert_close(o[1], 2 * o[0])


@pytest.mark.parametrize("threshold,pattern", [(0.05, "FFFFF"), (0.1, "FSFSF"), (0.16, "FSSFS"), (0.3, "FSSSF")])
def test_dit_threshold_bounds_the_first_blocks_change_since_the_last_full_call(threshold, pattern):
    """The first block's residual is 1 + 0.5 sigma (times the row), so its relative L1 change from the last full
    call at sigma_r to sigma is 0.5 |sigma - sigma_r| / (1 + 0.5 sigma): 0.071 / 0.154 / 0.25 / 0.364 two, three,
    four and five calls after the full one at sigma 1, 0.077-0.091 one step apart further down. A call skips
    while that stays below the threshold, measured against the last *full* call (against the previous call,
    0.16 would skip every call after the first: FSSSS)."""
    assert _dit_pattern(threshold, 1, [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]) == pattern


@pytest.mark.parametrize("max_skips,pattern", [(1, "FSFSFSFS"), (2, "FSSFSSFS"), (3, "FSSSFSSS")])
def test_dit_max_skips_forces_a_full_call(max_skips, pattern):
    sig = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.0]
    assert _dit_pattern(1e9, 1, sig, max_skips=max_skips) == pattern


class _QuadraticBlock(_Block):
    """A residual quadratic in sigma: order 3 extrapolates it exactly, order 2 cannot."""

    def __call__(self, args: dict) -> dict:
        self.calls += 1
        s = args["transformer_options"]["sigmas"][0].item()
        return {"img": args["img"] + (self.k + 1) * (1.0 - 2.0 * s + 3.0 * s * s), "txt": args["txt"]}


def test_dit_extrapolation_order_three_is_exact_on_quadratic_residuals_and_two_is_not():
    sig = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0]
    exact, _, _ = _dit_run(0.0, 1, sig, block=_QuadraticBlock)
    ab3, blocks, run = _dit_run(1e9, 3, sig, block=_QuadraticBlock)
    ab2, _, _ = _dit_run(1e9, 2, sig, block=_QuadraticBlock)
    assert run.skipped_calls == 4 and blocks[1].calls == 3  # three full calls feed the quadratic, four skip
    # float32 Lagrange weights up to four steps ahead: measured error at most 2.6e-5 (outputs of size ~7)
    for e, a in zip(exact, ab3, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-4)
    # a line through the two full calls before misses the curvature 3 sigma^2 by 3 * 0.2 * 0.1 = 0.06 per unit of
    # residual, 0.54 over blocks 1-3 (weights 2 + 3 + 4) at its first skipped call, up to 8.1 later
    assert (ab2[2] - exact[2]).abs().max().item() > 0.5
