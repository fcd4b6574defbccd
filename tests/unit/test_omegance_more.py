"""Omegance (samplers/omegance.py): run progress on sigma lists with repeated or few entries and non-finite sigmas,
mask batches that are neither 1 nor the latent batch, the memory a cyclic mask repeat takes, and the config's
immutability. Expected values come from the module's stated rules (position in the list as a fraction of the
steps, log-sigma interpolation between listed sigmas, 0 at the first step and 1 at the last; masks repeated
cyclically as ComfyUI does), computed by hand here."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from preprint.samplers.omegance import OmeganceConfig, omegance_denoise, resize_mask, run_progress

F64 = torch.float64


# ------------------------------------------------------------------------------------------ run progress


def test_progress_between_listed_sigmas_after_a_repeated_sigma():
    """[8, 4, 4, 1, 0] has three steps between its four non-zero sigmas, the middle one of zero length (4 -> 4).
    A Heun-type stage at sigma 2 lies in the last interval (4 -> 1, from step 2 to step 3) at log(4/2) / log(4/1)
    = 1/2 of the way: progress (2 + 1/2) / 3. A sigma of 3 in the same interval: (2 + log(4/3) / log 4) / 3."""
    sig = torch.tensor([8.0, 4.0, 4.0, 1.0, 0.0], dtype=F64)
    assert run_progress(2.0, sig) == pytest.approx(2.5 / 3.0, abs=1e-14, rel=0)
    assert run_progress(3.0, sig) == pytest.approx((2.0 + math.log(4.0 / 3.0) / math.log(4.0)) / 3.0,
                                                   abs=1e-14, rel=0)
    # and in the first interval (8 -> 4), unaffected by the repeat: log(8/6) / log 2 of step 0 -> 1
    assert run_progress(6.0, sig) == pytest.approx(math.log(8.0 / 6.0) / math.log(2.0) / 3.0, abs=1e-14, rel=0)


def test_the_last_step_is_at_progress_one_even_when_its_sigma_is_repeated():
    """[8, 4, 1, 1, 0]: the last step starts at sigma 1 (the list repeats it), so at sigma 1 progress is 1, the
    schedule's end value; strictly between 4 and 1 it is below 1 (in the interval from step 1 to step 2)."""
    sig = torch.tensor([8.0, 4.0, 1.0, 1.0, 0.0], dtype=F64)
    assert run_progress(1.0, sig) == 1.0
    assert run_progress(2.0, sig) == pytest.approx((1.0 + 0.5) / 3.0, abs=1e-14, rel=0)
    # through the sampler's denoise call: at the last step the linear schedule has reached omega_end exactly, so
    # the scale is omega_end's (here 0: the plain prediction, bit for bit)
    x = torch.linspace(-2.0, 2.0, 2 * 1 * 2 * 2, dtype=F64).reshape(2, 1, 2, 2)

    def model(xx, s):
        return 0.5 * xx

    cfg = OmeganceConfig(omega=30.0, schedule="linear", omega_end=0.0)
    assert torch.equal(omegance_denoise(model, x, torch.tensor(1.0, dtype=F64), sig, "eps", cfg), model(x, None))


def test_progress_with_two_non_zero_sigmas():
    """[8, 2, 0]: one interval between the two non-zero sigmas, so progress runs 0 (sigma 8) -> 1 (sigma 2) in
    log-sigma: sigma 4 is its log-midpoint (1/2), sigma 8 / 2^(1/2) a quarter of the way."""
    sig = torch.tensor([8.0, 2.0, 0.0], dtype=F64)
    assert run_progress(8.0, sig) == 0.0
    assert run_progress(2.0, sig) == 1.0
    assert run_progress(4.0, sig) == pytest.approx(0.5, abs=1e-14, rel=0)
    assert run_progress(8.0 / math.sqrt(2.0), sig) == pytest.approx(0.25, abs=1e-14, rel=0)
    assert run_progress(2.0, torch.tensor([8.0, 2.0], dtype=F64)) == 1.0  # no final zero: same two steps


def test_progress_is_a_fraction_for_non_finite_sigmas():
    """Progress is a fraction of the run for any sigma a sampler may pass: +inf is above the first sigma (0), and
    a NaN sigma (a failed model or schedule upstream) must not crash the wrapper or leave [0, 1]."""
    for sig in (torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0], dtype=F64), torch.tensor([8.0, 2.0, 0.0], dtype=F64),
                torch.tensor([8.0, 4.0, 4.0, 1.0], dtype=F64)):
        assert run_progress(math.inf, sig) == 0.0
        p = run_progress(math.nan, sig)
        assert 0.0 <= p <= 1.0


# ------------------------------------------------------------------------------------------ masks


def test_a_mask_batch_as_long_as_the_latent_width_is_still_repeated_cyclically():
    """Three masks for a batch of two latents that happen to be three wide: the masks are cut to the batch
    (mask b for sample b), whatever the latent's width; a scale map with three rows could not broadcast."""
    masks = torch.stack([torch.full((6, 6), v) for v in (0.25, 0.5, 0.75)])
    x = torch.zeros(2, 4, 5, 3, dtype=F64)
    m = resize_mask(masks, x)
    assert m.shape == (2, 1, 5, 3)
    assert [float(v) for v in m.flatten(1)[:, 0]] == [0.25, 0.5]
    # through the denoise call, with omega 0 outside and mask_omega inside: each sample scaled by its own mask
    xx = torch.linspace(-1.0, 1.0, x.numel(), dtype=F64).reshape(x.shape)
    cfg = OmeganceConfig(omega=0.0, mask=masks, mask_omega=20.0)
    got = omegance_denoise(lambda a, s: 0.25 * a, xx, torch.tensor(2.0, dtype=F64),
                           torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=F64), "eps", cfg)
    w_in = 0.95 + 0.1 / (1.0 + math.exp(-2.0))
    for b, v in enumerate((0.25, 0.5)):
        scale = (1.0 - v) + w_in * v
        assert float((got[b] - (xx[b] - scale * (0.75 * xx[b]))).abs().max()) <= 1e-14


class _LargestTensor(TorchFunctionMode):
    """Records the element count of the largest tensor any torch call returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.largest = max(self.largest, out.numel())
        return out


@pytest.mark.parametrize("masks_n,batch", [(5, 7), (3, 2), (2, 16)])
def test_repeating_a_batch_of_masks_takes_memory_of_the_batch_not_batch_times_masks(masks_n, batch):
    """Cycling M masks over a batch of B needs ceil(B / M) copies, at most B + M - 1 mask planes: no tensor the
    resize builds may hold more (a repeat by B * M would build B * M^2 planes, 16 GB for 64 latents of 128 x 128
    and 63 masks). The masks still go to the samples cyclically, mask b % M for sample b."""
    h = w = 4
    masks = torch.stack([torch.full((h, w), (i + 1) / 100.0) for i in range(masks_n)])
    x = torch.zeros(batch, 1, h, w)
    spy = _LargestTensor()
    with spy:
        m = resize_mask(masks, x)
    assert m.shape == (batch, 1, h, w)
    assert [round(float(v), 6) for v in m.flatten(1)[:, 0]] == [(b % masks_n + 1) / 100.0 for b in range(batch)]
    assert spy.largest <= (batch + masks_n - 1) * h * w


# ------------------------------------------------------------------------------------------ config


def test_the_config_is_immutable_and_hashable():
    """A wrapped sampler keeps its config: fields cannot be reassigned after construction (which would also skip
    the finite-value check), and equal configs hash equal, so a config can key a cache."""
    cfg = OmeganceConfig(omega=5.0, schedule="linear", omega_end=-5.0)
    with pytest.raises(AttributeError):
        cfg.omega = math.inf
    with pytest.raises(AttributeError):
        cfg.schedule = "sawtooth"
    assert cfg.omega == 5.0 and cfg.schedule == "linear"
    assert hash(cfg) == hash(OmeganceConfig(omega=5.0, schedule="linear", omega_end=-5.0))
    assert len({cfg, OmeganceConfig(omega=5.0, schedule="linear", omega_end=-5.0)}) == 1
