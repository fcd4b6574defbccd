"""The wavelet transform (known answers from PyWavelets, perfect reconstruction at any size), DiffuseHigh's
low-band replacement, FAM's high-pass K(t) and frequency modulation, and the run-fraction window."""

from __future__ import annotations

import math

import pytest
import torch

from preprint.highres.frequency import (
    WAVELETS,
    dwt2,
    fam_cutoffs,
    fam_filter,
    filters,
    frequency_modulate,
    idwt2,
    match_guide,
    replace_low_band,
    sigma_at_fraction,
)

SIZES = [(1, 1), (2, 3), (7, 7), (8, 8), (13, 22), (22, 13), (5, 64)]


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_filters_are_an_orthonormal_quadrature_mirror_pair(wavelet):
    f = filters(wavelet)
    h, g = torch.tensor(f.rec_lo, dtype=torch.float64), torch.tensor(f.rec_hi, dtype=torch.float64)
    assert float(h.sum()) == pytest.approx(math.sqrt(2), abs=1e-12)
    assert float(g.sum()) == pytest.approx(0.0, abs=1e-12)
    for m in range(0, len(h) // 2):  # orthogonal to their own even shifts and to each other's
        assert float((h[2 * m:] * h[:len(h) - 2 * m]).sum()) == pytest.approx(1.0 if m == 0 else 0.0, abs=1e-12)
        assert float((h[2 * m:] * g[:len(g) - 2 * m]).sum()) == pytest.approx(0.0, abs=1e-12)


def test_db4_bands_match_pywavelets_symmetric_mode():
    """Known answers from ``pywt.dwt2(x, 'db4', mode='symmetric')`` (PyWavelets 1.9) on a 3x5 image."""
    x = torch.arange(15.0, dtype=torch.float64).reshape(3, 5) ** 1.5
    b = dwt2(x, "db4")
    assert b.ll.shape == (5, 6)  # floor((N + 8 - 1) / 2) per axis
    torch.testing.assert_close(b.ll[2], torch.tensor([11.46927873, 2.20997891, -3.24752945, -1.51967379,
                                                      8.36738627, 11.46927873], dtype=torch.float64),
                               atol=1e-7, rtol=0)
    torch.testing.assert_close(b.hh[1], torch.tensor([0.01151414, 0.01472554, 0.04423605, -0.09301112,
                                                      0.02253538, 0.01151414], dtype=torch.float64),
                               atol=1e-7, rtol=0)
    # pywt's cV: high along the width, low along the height
    torch.testing.assert_close(b.lh[:, 3], torch.tensor([-2.46395078, -2.85954168, -1.64977653, -2.46395078,
                                                         -2.85954168], dtype=torch.float64), atol=1e-7, rtol=0)


def test_haar_low_band_of_a_2x2_block_is_half_its_sum():
    x = rand(3, 6, 10)
    ll = dwt2(x, "haar").ll
    blocks = x.reshape(3, 3, 2, 5, 2).sum(dim=(2, 4)) / 2
    torch.testing.assert_close(ll, blocks)


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("size", SIZES)
def test_perfect_reconstruction_at_any_size(wavelet, size):
    x = rand(2, 3, *size)
    b = dwt2(x, wavelet)
    taps = len(filters(wavelet).dec_lo)
    assert b.ll.shape[-2:] == ((size[0] + taps - 1) // 2, (size[1] + taps - 1) // 2)
    torch.testing.assert_close(idwt2(b, wavelet), x, atol=1e-12, rtol=0)
    x32 = x.float()
    out = idwt2(dwt2(x32, wavelet), wavelet)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x32, atol=1e-5, rtol=0)


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_replacing_the_low_band_with_its_own_returns_the_prediction(wavelet):
    x0 = rand(2, 4, 13, 22)
    torch.testing.assert_close(replace_low_band(x0, dwt2(x0, wavelet).ll, wavelet), x0, atol=1e-12, rtol=0)


@pytest.mark.parametrize("size", [(16, 20), (13, 22), (31, 40)])
def test_haar_result_has_the_guides_low_band_and_the_predictions_detail_everywhere(size):
    x0, guide = rand(1, 2, *size, seed=1), rand(1, 2, *size, seed=2)
    out = dwt2(replace_low_band(x0, dwt2(guide, "haar").ll, "haar"), "haar")
    want = dwt2(x0, "haar")
    torch.testing.assert_close(out.ll, dwt2(guide, "haar").ll, atol=1e-12, rtol=0)
    for band in ("lh", "hl", "hh"):
        torch.testing.assert_close(getattr(out, band), getattr(want, band), atol=1e-12, rtol=0)


@pytest.mark.parametrize("size", [(20, 26), (23, 30)])
def test_db4_result_has_the_guides_low_band_away_from_the_border(size):
    """db4 with symmetric extension is redundant at the borders, so a mixed band set is exact 4 coefficients in
    (the module documents this); the border rows differ, which the full-band check would not allow."""
    x0, guide = rand(1, 2, *size, seed=3), rand(1, 2, *size, seed=4)
    out = dwt2(replace_low_band(x0, dwt2(guide, "db4").ll, "db4"), "db4")
    want, g = dwt2(x0, "db4"), dwt2(guide, "db4")
    inner = (..., slice(4, -4), slice(4, -4))
    torch.testing.assert_close(out.ll[inner], g.ll[inner], atol=1e-12, rtol=0)
    for band in ("lh", "hl", "hh"):
        torch.testing.assert_close(getattr(out, band)[inner], getattr(want, band)[inner], atol=1e-12, rtol=0)
    # the result moved to the guide: its distance to the guide's low band is far below the prediction's
    assert (out.ll - g.ll).abs().mean() < 0.1 * (want.ll - g.ll).abs().mean()


def test_replace_low_band_keeps_dtype_and_rejects_a_guide_of_another_size():
    x0 = rand(1, 4, 12, 12, dtype=torch.float32)
    assert replace_low_band(x0, dwt2(x0).ll).dtype == torch.float32
    with pytest.raises(ValueError, match="size"):
        replace_low_band(x0, dwt2(rand(1, 4, 16, 12)).ll)


def test_fam_filter_box_matches_equations_9_to_11():
    # rho = 0 (t = 0), c = 0.5 on 12 x 20: |ky| < 3 (5 rows: -2..2), |kx| < 5 (rfft columns 0..4)
    k = fam_filter(12, 20, 0.0, 0.5)[0, 0]
    assert k.shape == (12, 11)
    inside = k == 0.0
    rows = torch.tensor([0, 1, 2, 10, 11])
    assert inside.sum() == 5 * 5
    assert inside[rows][:, :5].all()
    assert (k[~inside] == 1.0).all()
    # rho = 0.4: box 12*0.5*0.6 = 3.6 -> |ky| < 1.8, 20*0.5*0.6 = 6 -> |kx| < 3; weight rho inside
    k = fam_filter(12, 20, 0.4, 0.5)[0, 0]
    assert (k == 0.4).sum() == 3 * 3 and (k[:2, :3] == 0.4).all() and (k[11, :3] == 0.4).all()
    assert fam_cutoffs(12, 20, 0.4, 0.5) == pytest.approx((3.6, 6.0))


def test_fam_filter_passes_everything_at_t_equals_T():
    assert (fam_filter(9, 14, 1.0, 0.5) == 1.0).all()
    assert (fam_filter(9, 14, 0.3, 0.0) == 1.0).all()  # c = 0: no box at all


def test_frequency_modulation_at_t_equals_T_returns_the_noisy_latent():
    z, up = rand(2, 4, 13, 22, seed=5), rand(2, 4, 13, 22, seed=6)
    torch.testing.assert_close(frequency_modulate(z, up, 1.0), z, atol=1e-12, rtol=0)


def test_frequency_modulation_takes_low_frequencies_from_the_upsampled_latent_and_high_from_z():
    z, up = rand(1, 3, 16, 24, seed=7), rand(1, 3, 16, 24, seed=8)
    rho = 0.25
    out = torch.fft.rfft2(frequency_modulate(z, up, rho))
    k = fam_filter(16, 24, rho)[0, 0]
    inside = k < 1
    assert inside.any() and (~inside).any()
    zs, us = torch.fft.rfft2(z), torch.fft.rfft2(up)
    torch.testing.assert_close(out[..., ~inside], zs[..., ~inside])
    torch.testing.assert_close(out[..., inside], rho * zs[..., inside] + (1 - rho) * us[..., inside])


def test_frequency_modulation_keeps_a_constant_and_blends_the_mean():
    """The amplitude check: a same-size transform pair keeps every value; the DC term blends as K says."""
    for rho in (0.0, 0.3, 0.9):
        const = torch.full((1, 4, 11, 17), 0.7, dtype=torch.float64)
        torch.testing.assert_close(frequency_modulate(const, const, rho), const, atol=1e-12, rtol=0)
        a, b = torch.full_like(const, 2.0), torch.full_like(const, -1.0)
        torch.testing.assert_close(frequency_modulate(a, b, rho), torch.full_like(const, rho * 2.0 - (1 - rho)),
                                   atol=1e-12, rtol=0)


def test_frequency_modulation_per_row_rho_and_dtype():
    z, up = rand(2, 2, 10, 14, seed=9, dtype=torch.float32), rand(2, 2, 10, 14, seed=10, dtype=torch.float32)
    both = frequency_modulate(z, up, torch.tensor([0.2, 0.8]))
    assert both.dtype == torch.float32
    torch.testing.assert_close(both[:1], frequency_modulate(z[:1], up[:1], 0.2))
    torch.testing.assert_close(both[1:], frequency_modulate(z[1:], up[1:], 0.8))
    with pytest.raises(ValueError, match="one shape"):
        frequency_modulate(z, up[..., :7], 0.5)


def test_run_fraction_window_counts_steps_by_sigma():
    sigmas = torch.linspace(14.0, 0.0, 16)  # 15 steps
    for fraction, steps in ((1 / 3, 5), (0.333, 5), (0.0, 0), (1.0, 15), (0.5, 8)):
        threshold = sigma_at_fraction(sigmas, fraction)
        assert int((sigmas[:-1] > threshold).sum()) == steps, fraction
    karras = torch.tensor([14.6, 9.0, 5.1, 2.7, 1.3, 0.5, 0.0])
    assert sigma_at_fraction(karras, 0.5) == pytest.approx(2.7)
    with pytest.raises(ValueError):
        sigma_at_fraction(karras, 1.5)


def test_match_guide_broadcasts_resizes_and_rejects():
    like = torch.zeros(3, 4, 10, 14)
    guide, resized = match_guide(torch.full((1, 4, 10, 14), 0.5), like)
    assert guide.shape == like.shape and not resized and (guide == 0.5).all()
    guide, resized = match_guide(torch.full((3, 4, 5, 7), 0.25), like)
    assert resized and guide.shape == like.shape
    torch.testing.assert_close(guide, torch.full_like(like, 0.25))  # bicubic keeps a constant
    with pytest.raises(ValueError, match="channels"):
        match_guide(torch.zeros(1, 16, 10, 14), like)
    with pytest.raises(ValueError, match="images"):
        match_guide(torch.zeros(2, 4, 10, 14), like)
