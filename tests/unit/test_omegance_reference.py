"""Omegance (Hong et al., arXiv:2411.17769) against references written here from the module's stated maths.

The module docstring states: ``w = lo + (hi - lo) sigmoid(0.1 omega)`` with ``(lo, hi) = (0.95, 1.05)`` (EPS) or
``(0.9, 1.1)`` (flow); the residual ``r = x - D`` becomes ``w r`` (EPS) or ``(r - mean r) w + mean r`` per
sample (flow); omega moves from ``omega`` to ``omega_end`` linearly or along a half cosine by the step's position
in the sigma list (log-sigma interpolation between listed sigmas); a mask sets ``mask_omega`` inside it. Every
check is in float64 on small cases, with hand-computed numbers or an independent re-implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from preprint.samplers.omegance import (
    OmeganceConfig,
    apply_scale,
    omega_to_scale,
    omegance_denoise,
    omegance_sampler,
    resize_mask,
    run_progress,
    schedule_weight,
)

F64 = torch.float64
LO_HI = {"eps": (0.95, 1.05), "flow": (0.9, 1.1)}


def ref_scale(omega: float, kind: str) -> float:
    """The official logistic, written directly (omega within the node's range [-50, 50], so no overflow)."""
    lo, hi = LO_HI[kind]
    return lo + (hi - lo) / (1.0 + math.exp(-0.1 * omega))


def ref_weight(p: float, schedule: str) -> float:
    p = min(max(p, 0.0), 1.0)
    return {"constant": 0.0, "linear": p, "cosine": (1.0 - math.cos(math.pi * p)) / 2.0}[schedule]


def ref_apply(x: torch.Tensor, d: torch.Tensor, w: torch.Tensor | float, kind: str) -> torch.Tensor:
    """Per sample, sample by sample: EPS ``x - w r``; flow ``x - ((r - mean r) w + mean r)``."""
    out = []
    for b in range(x.shape[0]):
        r = x[b] - d[b]
        wb = w[b if w.shape[0] > 1 else 0] if isinstance(w, torch.Tensor) else w
        if kind == "flow":
            m = r.sum() / r.numel()
            out.append(x[b] - ((r - m) * wb + m))
        else:
            out.append(x[b] - wb * r)
    return torch.stack(out)


def toy_model(x: torch.Tensor, sigma: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """A deterministic nonlinear denoiser with per-sample sigma (shape [B]) and a keyword argument."""
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return gain * (torch.tanh(x) * 0.8 + 0.1 * torch.sin(3 * x)) / (1.0 + 0.3 * s)


def toy_latent(batch: int = 3, shape=(2, 4, 4), seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2.0


# ------------------------------------------------------------------------------------------ scale map


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_omega_to_scale_is_the_official_logistic(kind):
    """w(omega) = lo + (hi - lo) sigmoid(0.1 omega) at values across the node's range, both signs (the
    stable-sigmoid branch for negative omega included), to 1e-15; omega 0 is exactly 1."""
    for omega in (-50.0, -17.5, -10.0, -3.0, -0.5, 0.5, 3.0, 10.0, 17.5, 50.0):
        assert omega_to_scale(omega, kind) == pytest.approx(ref_scale(omega, kind), abs=1e-15, rel=0)
        # symmetric about omega = 0: w(omega) + w(-omega) = lo + hi
        assert omega_to_scale(omega, kind) + omega_to_scale(-omega, kind) == pytest.approx(sum(LO_HI[kind]),
                                                                                           abs=1e-15, rel=0)
    assert omega_to_scale(0.0, kind) == 1.0
    # hand values: sigmoid(1) = 0.7310585786300049
    lo, hi = LO_HI[kind]
    assert omega_to_scale(10.0, kind) == pytest.approx(lo + (hi - lo) * 0.7310585786300049, abs=1e-15, rel=0)
    assert omega_to_scale(-10.0, kind) == pytest.approx(lo + (hi - lo) * 0.2689414213699951, abs=1e-15, rel=0)
    # far outside the range the map saturates at lo / hi without overflowing
    assert omega_to_scale(1e5, kind) == pytest.approx(hi, abs=1e-15, rel=0)
    assert omega_to_scale(-1e5, kind) == pytest.approx(lo, abs=1e-15, rel=0)
    ws = [omega_to_scale(o, kind) for o in (-30.0, -5.0, -0.1, 0.0, 0.1, 5.0, 30.0)]
    assert all(a < b for a, b in zip(ws, ws[1:], strict=False))


def test_omega_to_scale_rejects_an_unknown_parameterisation():
    with pytest.raises(ValueError, match="parameterisation"):
        omega_to_scale(1.0, "v")


# ------------------------------------------------------------------------------------------ schedules


def test_schedule_weight_hand_values_and_clamping():
    """constant: 0; linear: p; cosine: (1 - cos(pi p)) / 2 (0.14644660940672624 at 1/4); p clamped to [0, 1]."""
    for p in (0.0, 0.3, 1.0, 1.7, -0.2):
        assert schedule_weight(p, "constant") == 0.0
    assert schedule_weight(0.3, "linear") == 0.3
    assert schedule_weight(-0.5, "linear") == 0.0 and schedule_weight(1.5, "linear") == 1.0
    assert schedule_weight(0.25, "cosine") == pytest.approx(0.14644660940672624, abs=1e-16, rel=0)
    assert schedule_weight(0.5, "cosine") == pytest.approx(0.5, abs=1e-16, rel=0)
    assert schedule_weight(0.75, "cosine") == pytest.approx(0.8535533905932737, abs=1e-16, rel=0)
    assert schedule_weight(0.0, "cosine") == 0.0 and schedule_weight(1.0, "cosine") == 1.0
    assert schedule_weight(-1.0, "cosine") == 0.0 and schedule_weight(2.0, "cosine") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        schedule_weight(0.5, "step")


def test_config_defaults_validation_and_omega_at():
    """Defaults are all neutral (omega, omega_end, mask_omega 0, constant, no mask): a linear schedule with only
    ``omega`` set fades to neutral at the last step. omega_at interpolates omega -> omega_end by the weight;
    non-finite values and unknown schedules are refused."""
    c = OmeganceConfig()
    assert (c.omega, c.schedule, c.omega_end, c.mask, c.mask_omega) == (0.0, "constant", 0.0, None, 0.0)
    fade = OmeganceConfig(omega=6.0, schedule="linear")
    assert fade.omega_at(0.0) == 6.0 and fade.omega_at(1.0) == 0.0 and fade.omega_at(0.5) == 3.0
    const = OmeganceConfig(omega=6.0, omega_end=-6.0)
    assert [const.omega_at(p) for p in (0.0, 0.4, 1.0)] == [6.0, 6.0, 6.0]
    cos = OmeganceConfig(omega=6.0, schedule="cosine", omega_end=-2.0)
    for p in (0.0, 0.25, 0.6, 1.0):
        assert cos.omega_at(p) == pytest.approx(6.0 - 8.0 * ref_weight(p, "cosine"), abs=1e-14, rel=0)
    for name in ("omega", "omega_end", "mask_omega"):
        for bad in (math.inf, -math.inf, math.nan):
            with pytest.raises(ValueError, match=name):
                OmeganceConfig(**{name: bad})
    with pytest.raises(ValueError, match="schedule"):
        OmeganceConfig(schedule="Linear")


def test_run_progress_hand_values():
    """Sigmas 8, 4, 2, 1, 0 are equally spaced in log-sigma, so sigma = 8 / 2^t sits at progress t / 3 for any
    t in [0, 3] (listed sigmas and Heun-type stages between them); above the first sigma progress is 0, at or
    below the last non-zero one 1, and at sigma 0 it is 1."""
    sig = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0], dtype=F64)
    for t in (0.0, 0.5, 1.0, 1.25, 2.0, 2.5, 2.9, 3.0):
        assert run_progress(8.0 / 2.0**t, sig) == pytest.approx(t / 3.0, abs=1e-14, rel=0), t
    assert run_progress(8.0, sig) == 0.0 and run_progress(16.0, sig) == 0.0
    assert run_progress(1.0, sig) == 1.0 and run_progress(0.5, sig) == 1.0 and run_progress(0.0, sig) == 1.0
    # uneven spacing: sigma 3 between 5 and 2 of [10, 5, 2, 1, 0] is (1 + log(5/3) / log(5/2)) / 3
    uneven = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0], dtype=F64)
    want = (1.0 + math.log(5.0 / 3.0) / math.log(5.0 / 2.0)) / 3.0
    assert run_progress(3.0, uneven) == pytest.approx(want, abs=1e-14, rel=0)
    # between the last two non-zero sigmas: (2 + log(2/1.5) / log 2) / 3, not yet the end
    assert run_progress(1.5, uneven) == pytest.approx((2.0 + math.log(2.0 / 1.5) / math.log(2.0)) / 3.0,
                                                      abs=1e-14, rel=0)
    # a list without a final zero: its last sigma is the last step
    assert run_progress(2.0, torch.tensor([8.0, 4.0, 2.0], dtype=F64)) == 1.0
    assert run_progress(4.0, torch.tensor([8.0, 4.0, 2.0], dtype=F64)) == 0.5


def test_run_progress_degenerate_lists():
    """One non-zero sigma: its single step is also the last, so progress is 1 (the schedule's end value) at any
    sigma; sigma 0 is the end of any run; a list with no non-zero sigma places nothing, so progress stays 0."""
    one = torch.tensor([5.0, 0.0], dtype=F64)
    assert run_progress(5.0, one) == 1.0 and run_progress(2.0, one) == 1.0 and run_progress(9.0, one) == 1.0
    assert run_progress(0.0, one) == 1.0
    assert run_progress(0.0, torch.tensor([8.0, 4.0, 2.0, 0.0], dtype=F64)) == 1.0
    assert run_progress(0.5, torch.tensor([0.0], dtype=F64)) == 0.0
    assert run_progress(3.0, torch.tensor([0.0], dtype=F64)) == 0.0


# ------------------------------------------------------------------------------------------ masks


def test_resize_mask_downsample_is_the_block_mean():
    """Bilinear resize by exactly 1/2 (align_corners False) samples the centre of each 2x2 block: its mean.
    The result is [1, 1, H, W] in the latent's dtype."""
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0],
                         [0.0, 0.0, 1.0, 1.0],
                         [0.5, 0.5, 0.0, 0.2],
                         [0.5, 0.5, 0.6, 0.2]])
    x = torch.zeros(2, 3, 2, 2, dtype=F64)
    m = resize_mask(mask, x)
    assert m.shape == (1, 1, 2, 2) and m.dtype == F64
    want = torch.tensor([[0.25, 1.0], [0.5, 0.25]], dtype=F64)
    torch.testing.assert_close(m[0, 0], want, rtol=0, atol=1e-7)


def test_resize_mask_upsample_hand_values_and_clamp():
    """2 -> 4 bilinear (align_corners False) takes columns 0, 1/4, 3/4, 1 of the way from the left value to the
    right one; values outside [0, 1] are clamped."""
    m = resize_mask(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.zeros(1, 4, 4, 4))
    assert m.shape == (1, 1, 4, 4)
    torch.testing.assert_close(m[0, 0], torch.tensor([[0.0, 0.25, 0.75, 1.0]] * 4), rtol=0, atol=1e-7)
    c = resize_mask(torch.tensor([[-0.5, 2.0], [0.3, 1.0]]), torch.zeros(1, 4, 2, 2))
    torch.testing.assert_close(c[0, 0], torch.tensor([[0.0, 1.0], [0.3, 1.0]]), rtol=0, atol=1e-7)


def test_resize_mask_five_dimensional_latent():
    """A video-style latent [B, C, T, H, W]: the mask is resized to its last two dimensions (H, W) and shaped
    [B|1, 1, 1, H, W]."""
    x = torch.zeros(2, 3, 5, 4, 6, dtype=F64)
    masks = torch.zeros(2, 8, 12)
    masks[0, :, :6] = 1.0
    masks[1, 4:, :] = 1.0
    m = resize_mask(masks, x)
    assert m.shape == (2, 1, 1, 4, 6)
    want = torch.zeros(2, 4, 6, dtype=F64)
    want[0, :, :3] = 1.0
    want[1, 2:, :] = 1.0
    torch.testing.assert_close(m[:, 0, 0], want, rtol=0, atol=1e-7)
    assert resize_mask(masks[0], x).shape == (1, 1, 1, 4, 6)


def test_resize_mask_batches():
    """A batch of masks as long as the latent batch keeps its order; a shorter (or longer) batch is repeated
    cyclically and cut to the latent batch (mask b % n for sample b), whatever the channel count; one mask
    broadcasts."""
    masks = torch.stack([torch.full((4, 4), v) for v in (0.1, 0.2, 0.3)])

    def values(m):
        return [round(float(v), 6) for v in m.flatten(1)[:, 0]]

    assert values(resize_mask(masks, torch.zeros(3, 4, 4, 4))) == [0.1, 0.2, 0.3]
    five = resize_mask(masks[:2], torch.zeros(5, 4, 4, 4))
    assert five.shape == (5, 1, 4, 4) and values(five) == [0.1, 0.2, 0.1, 0.2, 0.1]
    four = resize_mask(masks, torch.zeros(4, 2, 2, 2))
    assert four.shape == (4, 1, 2, 2) and values(four) == [0.1, 0.2, 0.3, 0.1]
    seven = resize_mask(masks, torch.zeros(7, 16, 4, 4))
    assert seven.shape == (7, 1, 4, 4) and values(seven) == [0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1]
    two = resize_mask(masks, torch.zeros(2, 3, 4, 4))
    assert two.shape == (2, 1, 4, 4) and values(two) == [0.1, 0.2]
    assert resize_mask(masks[1:2], torch.zeros(3, 4, 4, 4)).shape == (1, 1, 4, 4)


def test_resize_mask_rejects_other_ranks():
    for bad in (torch.zeros(4), torch.zeros(1, 1, 4, 4)):
        with pytest.raises(ValueError, match="mask"):
            resize_mask(bad, torch.zeros(1, 4, 4, 4))


# ------------------------------------------------------------------------------------------ one evaluation


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_apply_scale_against_the_per_sample_reference(kind):
    """A number and a per-sample / per-pixel scale map, each sample scaled about its own residual mean (flow)."""
    x = toy_latent(3)
    d = toy_model(x, torch.tensor(1.0, dtype=F64)) + 0.4
    torch.testing.assert_close(apply_scale(x, d, 1.07, kind), ref_apply(x, d, 1.07, kind), rtol=0, atol=1e-13)
    smap = 1.0 + 0.05 * torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(apply_scale(x, d, smap, kind), ref_apply(x, d, smap, kind), rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_denoise_matches_the_reference_at_listed_and_intermediate_sigmas(kind, schedule):
    """One evaluation: D' = x - w r with w from omega_at(progress(sigma)) (sigma given as a scalar or as a
    per-sample vector), keyword arguments reaching the model."""
    sig = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0], dtype=F64)
    cfg = OmeganceConfig(omega=12.0, schedule=schedule, omega_end=-20.0)
    x = toy_latent(2)
    for t in (0.0, 0.5, 1.0, 2.0, 2.5, 3.0):
        s = 8.0 / 2.0**t
        omega = 12.0 - 32.0 * ref_weight(t / 3.0, schedule)
        want = ref_apply(x, toy_model(x, torch.tensor(s, dtype=F64), gain=0.7), ref_scale(omega, kind), kind)
        for sigma in (torch.tensor(s, dtype=F64), torch.full((2,), s, dtype=F64)):
            got = omegance_denoise(toy_model, x, sigma, sig, kind, cfg, gain=0.7)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_denoise_at_sigma_zero_is_the_plain_prediction(kind):
    """At sigma 0 there is no residual to scale: the model's prediction comes back unchanged, mask or not."""
    sig = torch.tensor([8.0, 4.0, 0.0], dtype=F64)
    x = toy_latent(2)
    plain = toy_model(x, torch.zeros(2, dtype=F64))
    mask = torch.ones(4, 4)
    for cfg in (OmeganceConfig(omega=20.0), OmeganceConfig(omega=20.0, mask=mask, mask_omega=-20.0)):
        for sigma in (torch.tensor(0.0, dtype=F64), torch.zeros(2, dtype=F64)):
            assert torch.equal(omegance_denoise(toy_model, x, sigma, sig, kind, cfg), plain)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_denoise_with_a_soft_mask_blends_the_two_scales(kind):
    """Scale map w (1 - m) + w_in m with a soft mask at latent size; with omega 0 outside, the outside is the
    plain prediction (to rounding of x - (x - D)) while the inside is still scaled by mask_omega."""
    sig = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0], dtype=F64)
    x = toy_latent(2)
    m = torch.zeros(4, 4, dtype=F64)
    m[:, 1] = 0.25
    m[:, 2] = 0.5
    m[:, 3] = 1.0
    s = torch.tensor(2.0, dtype=F64)
    plain = toy_model(x, s)
    for omega, mask_omega in ((9.0, -14.0), (0.0, 14.0), (-6.0, 0.0)):
        cfg = OmeganceConfig(omega=omega, mask=m, mask_omega=mask_omega)
        w, w_in = ref_scale(omega, kind), ref_scale(mask_omega, kind)
        smap = (w * (1 - m) + w_in * m)[None, None]
        got = omegance_denoise(toy_model, x, s, sig, kind, cfg)
        torch.testing.assert_close(got, ref_apply(x, plain, smap, kind), rtol=0, atol=1e-13)
        if kind == "eps" and omega == 0.0:
            torch.testing.assert_close(got[..., 0], plain[..., 0], rtol=0, atol=1e-15)
            assert (got[..., 3] - plain[..., 3]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ whole runs


def euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        d = model(x, sigmas[i] * x.new_ones(x.shape[0]), **extra_args)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - d) / sigmas[i]
    return x


def midpoint(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A two-stage sampler whose second evaluation sits at the log-midpoint of each interval (to 0: Euler)."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        d = model(x, s * x.new_ones(x.shape[0]), **extra_args)
        if s1 == 0:
            x = d
            continue
        sm = (s * s1).sqrt()
        xm = x + (sm - s) * (x - d) / s
        dm = model(xm, sm * x.new_ones(x.shape[0]), **extra_args)
        x = x + (s1 - s) * (xm - dm) / sm
    return x


def reference_run(sampler, x, sigmas, kind, omega, schedule, omega_end, mask=None, mask_omega=0.0):
    """The same sampler on a denoiser rescaled by the reference formulas: listed sigma i of n non-zero ones sits at
    progress i / (n - 1), the log-midpoint of interval i at (i + 1/2) / (n - 1)."""
    n = int((sigmas > 0).sum())
    listed = [float(v) for v in sigmas]

    def model(xx, sigma, **kw):
        s = float(sigma.reshape(-1)[0])
        d = toy_model(xx, sigma, **kw)
        if s == 0:
            return d
        if s in listed:
            p = listed.index(s) / (n - 1)
        else:
            i = max(j for j in range(n) if listed[j] > s)
            p = (i + 0.5) / (n - 1)
        w = ref_scale(omega + ref_weight(p, schedule) * (omega_end - omega), kind)
        if mask is not None:
            w = (w * (1 - mask) + ref_scale(mask_omega, kind) * mask)[:, None]
        return ref_apply(xx, d, w, kind)

    return sampler(model, x, sigmas, extra_args={"gain": 0.9})


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("sampler", [euler, midpoint])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_whole_run_matches_the_reference(kind, sampler, schedule):
    """A wrapped sampler run equals the same sampler on the reference-rescaled denoiser (float64, 1e-12), so the
    scheduled omega at every listed and intermediate sigma is the stated one; per-image masks included."""
    sig = torch.tensor([6.0, 3.0, 1.5, 0.7, 0.3, 0.0], dtype=F64)
    x = toy_latent(3)
    masks = torch.zeros(3, 4, 4, dtype=F64)
    masks[0, :, :2] = 1.0
    masks[1, 2:, :] = 0.5
    masks[2, 1:3, 1:3] = 1.0
    for mask, mask_omega in ((None, 0.0), (masks, -25.0)):
        cfg = OmeganceConfig(omega=18.0, schedule=schedule, omega_end=-10.0, mask=mask, mask_omega=mask_omega)
        got = omegance_sampler(sampler, lambda _m: kind, cfg)(toy_model, x.clone(), sig, extra_args={"gain": 0.9})
        want = reference_run(sampler, x.clone(), sig, kind, 18.0, schedule, -10.0, mask, mask_omega)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    plain = sampler(toy_model, x.clone(), sig, extra_args={"gain": 0.9})
    assert (got - plain).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_batch_rows_are_independent(kind):
    """Each sample of a masked, scheduled run equals that sample run alone with its own mask (flow's mean is per
    sample, so a neighbour in the batch must not move it)."""
    sig = torch.tensor([6.0, 3.0, 1.5, 0.7, 0.0], dtype=F64)
    x = toy_latent(3)
    x[1] += 3.0  # a different residual mean in one sample
    masks = torch.zeros(3, 4, 4, dtype=F64)
    masks[0, :, :2] = 1.0
    masks[2, 1:3, 1:3] = 1.0

    def run(xs, mk):
        cfg = OmeganceConfig(omega=15.0, schedule="cosine", omega_end=-5.0, mask=mk, mask_omega=-20.0)
        return omegance_sampler(midpoint, lambda _m: kind, cfg)(toy_model, xs.clone(), sig)

    together = run(x, masks)
    for i in range(3):
        torch.testing.assert_close(together[i:i + 1], run(x[i:i + 1], masks[i:i + 1]), rtol=0, atol=1e-13)
