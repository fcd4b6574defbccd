"""Differential Diffusion in sigma space: which pixels are denoised at which call."""

from __future__ import annotations

import torch

from preprint.regional.soft_inpaint import active_mask, threshold


def karras(n: int, lo=0.03, hi=14.6, rho=7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1)])


def test_a_pixel_of_value_m_joins_for_the_last_m_of_the_steps():
    sig = karras(20)
    change = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    joined = []
    for i in range(20):
        joined.append(active_mask(change, sig[i], sig))
    first = [next((i for i, a in enumerate(joined) if a[k] == 1), None) for k in range(5)]
    assert first == [None, 15, 10, 5, 0]  # img2img with denoise m over 20 steps starts at step 20 (1 - m)
    for k in range(5):  # once in, a pixel stays in
        col = [int(a[k]) for a in joined]
        assert col == sorted(col)


def test_intermediate_evaluations_sit_between_steps():
    sig = karras(10)
    mid = float((sig[4] * sig[5]).sqrt())  # a 2S-type evaluation between steps 4 and 5
    assert 1 - 5 / 10 < threshold(mid, sig) < 1 - 4 / 10
    assert threshold(sig[4], sig) == 1 - 4 / 10


def test_all_ones_is_always_on_and_all_zeros_always_off():
    sig = karras(8)
    for i in range(8):
        assert torch.equal(active_mask(torch.ones(2, 3), sig[i], sig), torch.ones(2, 3))
        assert torch.equal(active_mask(torch.zeros(2, 3), sig[i], sig), torch.zeros(2, 3))
