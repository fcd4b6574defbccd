"""The block-skipping UNet forward and the UNet policies, on a small synthetic UNet (pure torch)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from preprint.caching.unet_policies import BlockCacheRun, DeepCacheRun, EncoderPropagationRun
from preprint.caching.unet_runner import BlockCounts, RunAll, run_unet


def timestep_embedding(t, dim, repeat_only=False):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    a = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


class Blk(nn.Module):
    """A UNet block with the calling convention of ComfyUI's TimestepEmbedSequential."""

    def __init__(self, cin, cout, scale=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(8, cout)
        self.scale = scale

    def forward(self, h, emb, context=None, transformer_options=None, output_shape=None, **kw):
        if self.scale == 2:
            h = nn.functional.avg_pool2d(h, 2)
        elif self.scale == 0.5:
            h = nn.functional.interpolate(h, size=output_shape[2:] if output_shape else None,
                                          scale_factor=None if output_shape else 2)
        return torch.tanh(self.conv(h) + self.emb(emb)[:, :, None, None])


class TinyUNet(nn.Module):
    # 4 input blocks (stem, same, down, same), middle, 4 output blocks mirroring them
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model_channels, self.num_classes, self.predict_codebook_ids = 8, None, False
        self.time_embed = nn.Linear(8, 8)
        self.input_blocks = nn.ModuleList([Blk(2, 4), Blk(4, 4), Blk(4, 6, scale=2), Blk(6, 6)])
        self.middle_block = Blk(6, 6)
        self.output_blocks = nn.ModuleList([Blk(12, 6), Blk(12, 4, scale=0.5), Blk(8, 4), Blk(8, 4)])
        self.out = nn.Conv2d(4, 2, 1)


def reference(unet, x, t, control=None):
    """The stock UNet forward, written plainly."""
    emb = unet.time_embed(timestep_embedding(t, 8))
    hs, h = [], x
    for m in unet.input_blocks:
        h = m(h, emb)
        if control and control["input"]:
            h = h + control["input"].pop()
        hs.append(h)
    h = unet.middle_block(h, emb)
    for m in unet.output_blocks:
        hsp = hs.pop()
        if control and control["output"]:
            hsp = hsp + control["output"].pop()
        h = m(torch.cat([h, hsp], 1), emb, output_shape=hs[-1].shape if hs else None)
    return unet.out(h)


@pytest.fixture(scope="module")
def unet():
    return TinyUNet().eval()


def call(unet, plan, x, t, control=None, counts=None):
    with torch.no_grad():
        return run_unet(unet, plan, timestep_embedding, x, t, None, None, control, {}, counts=counts)


def controls(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 4, 8, 8), (2, 4, 8, 8), (2, 6, 4, 4), (2, 6, 4, 4)]
    # lists are popped from the end: block 0's residual is last
    return {"input": [torch.randn(s, generator=g) for s in reversed(shapes)],
            "output": [torch.randn(s, generator=g) for s in shapes]}


def test_run_all_is_bitwise_the_stock_forward(unet):
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        assert torch.equal(call(unet, RunAll(), x, t, controls(1)), reference(unet, x, t, controls(1)))


def _to(sigma, uuids=("c", "u")):
    return {"sigmas": torch.tensor([sigma, sigma]), "uuids": list(uuids)}


def test_deepcache_cached_step_consumes_controlnet_residuals_in_order(unet):
    sig = [10.0, 5.0, 2.0, 1.0, 0.0]
    run = DeepCacheRun(unet, sig, interval=2, branch=0)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([500.0, 500.0])
    plan = run.plan(x, _to(10.0))
    call(unet, plan, x, t, controls(1))  # refresh step: records the deep feature
    ctrl = controls(2)
    ctrl["input"][-1] = controls(1)["input"][-1]  # same stem residual, so the cached deep feature stays valid
    plan = run.plan(x, _to(5.0))  # step 1: cached, only the stem and the last output block run
    counts = BlockCounts()
    out = call(unet, plan, x, t, ctrl, counts)
    assert run.reuse_calls == 1 and all(len(v) == 0 for v in ctrl.values())
    assert counts.run == {("input", 0): 1, ("output", 3): 1}
    # the deep feature was made from the same x and t under controls(1); the last output block must get the
    # residual that is popped last from the new list (controls(2)["output"][0]), not a skipped block's one
    mixed = controls(1)
    mixed["output"][0] = controls(2)["output"][0]
    with torch.no_grad():
        assert torch.equal(out, reference(unet, x, t, mixed))
        assert not torch.equal(out, reference(unet, x, t, controls(1)))


def test_deepcache_interval_one_and_wrong_branch(unet):
    assert DeepCacheRun(unet, [3.0, 2.0, 1.0, 0.0], interval=1, branch=0).plan(torch.zeros(2, 2, 8, 8),
                                                                            _to(3.0)) is None
    with pytest.raises(ValueError, match="branch depth 3 is out of range"):
        DeepCacheRun(unet, [3.0, 2.0, 1.0, 0.0], interval=2, branch=3)


def test_deepcache_keeps_cond_and_uncond_apart(unet):
    sig = [10.0, 5.0, 0.0]
    run = DeepCacheRun(unet, sig, interval=2, branch=0)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([500.0, 500.0])
    call(unet, run.plan(x, _to(10.0)), x, t)
    # step 1 arrives with the batch in the other order (or split): each stream gets its own cached feature
    swapped = call(unet, run.plan(x.flip(0), _to(5.0, ("u", "c"))), x.flip(0), t)
    run2 = DeepCacheRun(unet, sig, interval=2, branch=0)
    call(unet, run2.plan(x, _to(10.0)), x, t)
    straight = call(unet, run2.plan(x, _to(5.0)), x, t)
    torch.testing.assert_close(swapped.flip(0), straight)


def test_deepcache_new_resolution_never_reads_old_features(unet):
    run = DeepCacheRun(unet, [10.0, 5.0, 0.0], interval=2, branch=0)
    call(unet, run.plan(torch.randn(2, 2, 8, 8), _to(10.0)), torch.randn(2, 2, 8, 8), torch.tensor([1.0, 1.0]))
    plan = run.plan(torch.randn(2, 2, 16, 16), _to(5.0))
    assert plan.action(("middle", 0)) == "run" and run.reuse_calls == 0


def test_encoder_propagation_runs_only_the_decoder_on_non_key_steps(unet):
    run = EncoderPropagationRun(unet, [10.0, 5.0, 2.0, 0.0], interval=2)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([500.0, 500.0])
    call(unet, run.plan(x, _to(10.0)), x, t)
    counts = BlockCounts()
    out = call(unet, run.plan(x, _to(5.0)), x, t, counts=counts)
    assert set(counts.not_run) == {("input", 1), ("input", 2), ("input", 3), ("middle", 0)}
    with torch.no_grad():
        assert torch.equal(out, reference(unet, x, t))  # same inputs: reused encoder = recomputed encoder


def _trajectory(run, unet, sigmas, counts):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 8, 8, generator=g)
    outs = []
    for s in sigmas[:-1]:
        t = torch.tensor([s * 100.0] * 2)
        plan = run.plan(x, _to(s))
        out = call(unet, plan, x, t, counts=counts) if plan is not None else reference(unet, x, t)
        outs.append(out)
        x = x - 0.1 * out.mean(1, keepdim=True)  # a slowly moving input, like a sampler's
    return outs


def test_block_cache_threshold_zero_is_inert_and_threshold_trades_reuse(unet):
    sig = [float(v) for v in torch.linspace(10, 1, 12)] + [0.0]
    assert BlockCacheRun(unet, sig, "online", 0.0).plan(torch.zeros(2, 2, 8, 8), _to(10.0)) is None
    fractions = []
    for th in (0.05, 0.5, 5.0):
        counts = BlockCounts()
        _trajectory(BlockCacheRun(unet, sig, "online", th), unet, sig, counts)
        fractions.append(counts.skipped_fraction())
    assert fractions[0] <= fractions[1] <= fractions[2] and fractions[2] > 0.3
    # never the stem: it reads x itself
    counts = BlockCounts()
    _trajectory(BlockCacheRun(unet, sig, "online", 5.0), unet, sig, counts)
    assert ("input", 0) not in counts.not_run


def test_block_cache_calibration_profile_drives_the_same_decisions_at_other_step_counts(unet):
    sig = [float(v) for v in torch.linspace(10, 1, 12)] + [0.0]
    cal = BlockCacheRun(unet, sig, "calibrate", 0.3)
    ref = _trajectory(cal, unet, sig, BlockCounts())
    prof = cal.calibrator.profile("fp", "tiny", 12)
    assert set(prof.rates) == {f"input.{i}" for i in (1, 2, 3)} | {"middle.0"} | {f"output.{i}" for i in range(4)}
    counts = BlockCounts()
    outs = _trajectory(BlockCacheRun(unet, sig, "profile", 0.3, prof), unet, sig, counts)
    assert counts.skipped_fraction() > 0
    drift = max((a - b).abs().max().item() for a, b in zip(outs, ref, strict=True))
    assert drift < 0.5
    # a run with twice the steps uses the same profile and reuses at least as often per unit of progress
    sig2 = [float(v) for v in torch.linspace(10, 1, 24)] + [0.0]
    counts2 = BlockCounts()
    _trajectory(BlockCacheRun(unet, sig2, "profile", 0.3, prof), unet, sig2, counts2)
    assert counts2.skipped_fraction() >= counts.skipped_fraction()


def _blockcache_call(unet, run, x, sigma):
    counts = BlockCounts()
    t = torch.tensor([sigma * 100.0] * 2)
    out = call(unet, run.plan(x, _to(sigma)), x, t, counts=counts)
    return out, sum(counts.not_run.values())


def test_block_cache_judges_a_second_call_at_one_noise_level_on_its_input(unet):
    g = torch.Generator().manual_seed(5)
    x0, x1, x2, x3 = (torch.randn(2, 2, 8, 8, generator=g) for _ in range(4))
    t5 = torch.tensor([500.0] * 2)
    run = BlockCacheRun(unet, [10.0, 5.0, 2.0, 0.0], "online", 1e9)  # any predicted change is accepted
    _blockcache_call(unet, run, x0, 10.0)
    _, reused = _blockcache_call(unet, run, x1, 5.0)  # first rates are measured here
    assert reused == 0
    # another input at the same noise level (Heun's step after its corrector, a degraded guidance pass): no
    # progress means no predicted change, but features computed from x1 say nothing about x2
    out, reused = _blockcache_call(unet, run, x2, 5.0)
    assert reused == 0
    with torch.no_grad():
        assert torch.equal(out, reference(unet, x2, t5))
    # the reference input again: its own features, all reused, exact; x2's pass did not replace them
    out, reused = _blockcache_call(unet, run, x1, 5.0)
    assert reused == len(run.eligible)
    with torch.no_grad():
        assert torch.equal(out, reference(unet, x1, t5))
    # back up to a higher noise level (a restart): features from further down the run are not reused there
    out, reused = _blockcache_call(unet, run, x3, 10.0)
    assert reused == 0
    with torch.no_grad():
        assert torch.equal(out, reference(unet, x3, torch.tensor([1000.0] * 2)))


def test_block_cache_profile_mode_judges_a_second_call_at_one_noise_level_on_its_input(unet):
    from preprint.caching.block_profile import Profile, block_key

    run0 = BlockCacheRun(unet, [10.0, 5.0, 0.0], "online", 1.0)
    still = Profile("fp", "tiny", [0.0, 1.0], {block_key(n): [0.0, 0.0] for n in run0.eligible})
    run = BlockCacheRun(unet, [10.0, 5.0, 0.0], "profile", 0.1, still)  # blocks never change, says the profile
    g = torch.Generator().manual_seed(6)
    x0, x1 = (torch.randn(2, 2, 8, 8, generator=g) for _ in range(2))
    _blockcache_call(unet, run, x0, 10.0)
    out, reused = _blockcache_call(unet, run, x1, 10.0)
    assert reused == 0
    with torch.no_grad():
        assert torch.equal(out, reference(unet, x1, torch.tensor([1000.0] * 2)))
    _, reused = _blockcache_call(unet, run, x1, 5.0)  # progress: the profile's zero change allows reuse
    assert reused == len(run.eligible)


@pytest.mark.parametrize("make", [lambda u, s: DeepCacheRun(u, s, interval=2, branch=0),
                                  lambda u, s: EncoderPropagationRun(u, s, interval=2)],
                         ids=["deepcache", "encoder-propagation"])
def test_key_step_caches_keep_the_first_call_at_a_refresh_noise_level(unet, make):
    """A later call at a refresh step's noise level on another input (a degraded guidance pass, a refinement
    call) computes in full and leaves the features the following steps reuse as the first call made them."""
    sig = [10.0, 5.0, 2.0, 0.0]
    g = torch.Generator().manual_seed(7)
    x0, x_other, x1 = (torch.randn(2, 2, 8, 8, generator=g) for _ in range(3))
    t10, t5 = torch.tensor([1000.0] * 2), torch.tensor([500.0] * 2)
    run = make(unet, sig)
    call(unet, run.plan(x0, _to(10.0)), x0, t10)
    want = call(unet, run.plan(x1, _to(5.0)), x1, t5)  # step 1 reuses step 0's features
    with torch.no_grad():
        assert not torch.equal(want, reference(unet, x1, t5))  # so it depends on what was kept

    # the extra call on the whole batch, then on the cond chunk alone, then with only cond's input changed
    extra = [(x_other, ("c", "u")), (x_other[:1], ("c",)), (torch.cat([x_other[:1], x0[1:]]), ("c", "u"))]
    for x, uuids in extra:
        run = make(unet, sig)
        call(unet, run.plan(x0, _to(10.0)), x0, t10)
        counts = BlockCounts()
        t = t10[: x.shape[0]]
        out = call(unet, run.plan(x, _to(10.0, uuids)), x, t, counts=counts)
        with torch.no_grad():
            assert not counts.not_run and torch.equal(out, reference(unet, x, t))
        assert torch.equal(call(unet, run.plan(x1, _to(5.0)), x1, t5), want), uuids
        assert run.reuse_calls == 1


def test_control_residuals_keep_the_unets_dtype():
    """ComfyUI adds control residuals in place (h keeps its dtype); a T2I-Adapter hands them in float32. The cached
    forward adds out of place, so it casts: a half-precision UNet must not go on in float32."""
    from preprint.caching.unet_runner import _add_control

    h = torch.ones(1, 4, 2, 2, dtype=torch.float16)
    out = _add_control(h, torch.full((1, 4, 2, 2), 0.5))
    assert out.dtype == torch.float16 and torch.equal(out, torch.full_like(h, 1.5))
    assert _add_control(h, torch.ones(1, 3, 2, 2)) is h  # a residual that does not fit is left out, as core does
