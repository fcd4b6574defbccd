"""Differential Diffusion in sigma space: which pixels are denoised at which call."""

from __future__ import annotations

import pytest
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


def _concat(mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return torch.cat([mask, image], dim=1)


def test_concat_layout_reads_comfyui_keys_and_refuses_a_mismatch():
    from preprint.regional.soft_inpaint import concat_layout

    assert concat_layout(("mask", "masked_image"), 5, 4) == (("mask", 1), ("masked_image", 4))
    assert concat_layout(("concat_image", "mask_inverted"), 17, 16) == (("image", 16), ("mask_inverted", 1))
    with pytest.raises(ValueError, match="make 5 channels, the input has 9"):
        concat_layout(("mask", "masked_image"), 9, 4)


def test_follow_change_hides_exactly_the_active_part():
    from preprint.regional.soft_inpaint import follow_change

    g = torch.Generator().manual_seed(0)
    given_mask = torch.zeros(2, 1, 3, 5)
    given_mask[..., 3:] = 1.0  # the conditioning hid the last two columns
    given_img, original = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    blank = torch.full((2, 4, 3, 5), 7.0)
    layout = (("mask", 1), ("masked_image", 4))
    concat = _concat(given_mask, given_img)
    active = torch.zeros(2, 1, 3, 5)
    active[..., 1:] = 1.0  # the map now reaches two columns beyond the conditioning's mask
    out = follow_change(concat, layout, active, original, blank)
    assert torch.equal(out[:, :1], active)
    img = out[:, 1:]
    assert torch.equal(img[..., :1], original[..., :1])  # held: the picture
    assert torch.equal(img[..., 1:3], blank[..., 1:3])  # regenerated beyond the conditioning's hole: blank
    assert torch.equal(img[..., 3:], given_img[..., 3:])  # the conditioning's own hidden latent
    # an active mask equal to the conditioning's, where the conditioning shows the picture: back value for value
    assert torch.equal(follow_change(concat, layout, given_mask, given_img, blank), concat)


def test_follow_change_other_mask_kinds_and_layouts_without_a_mask():
    from preprint.regional.soft_inpaint import follow_change

    active = torch.tensor([0.0, 1.0, 1.0]).view(1, 1, 1, 3)
    img = torch.randn(1, 2, 1, 3)
    flux = follow_change(torch.cat([img, torch.zeros(1, 64, 1, 3)], 1), (("masked_image", 2), ("mask_pixels", 64)),
                         active, img, torch.zeros_like(img))
    assert torch.equal(flux[:, 2:], active.expand(1, 64, 1, 3))
    inv = follow_change(torch.cat([img, torch.ones(1, 1, 1, 3)], 1), (("image", 2), ("mask_inverted", 1)), active,
                        img, img)
    assert torch.equal(inv[:, 2:], 1 - active) and torch.equal(inv[:, :2], img)  # a plain image piece is kept
    plain = torch.randn(1, 2, 1, 3)
    assert follow_change(plain, (("image", 2),), active, img, img) is plain


def test_flux_fill_pixel_mask_keeps_the_conditioning_edges_where_the_map_agrees():
    """Flux Fill's 64 mask channels are the pixel mask folded 8 x 8: a block the conditioning half-covers keeps its
    exact pixels wherever the change map agrees with the conditioning's rounding; only disagreeing blocks become
    whole blocks of the map."""
    from preprint.regional.soft_inpaint import follow_change

    pixels = torch.zeros(1, 64, 1, 3)
    pixels[:, :40, :, 1] = 1.0  # block 1: 40 of 64 pixels masked (mean 0.625: hidden), with its edge
    pixels[:, :10, :, 0] = 1.0  # block 0: 10 of 64 (mean 0.16: shown), edge pixels the conditioning carries
    img = torch.randn(1, 2, 1, 3)
    concat = torch.cat([img, pixels], 1)
    layout = (("masked_image", 2), ("mask_pixels", 64))
    agree = torch.tensor([0.0, 1.0, 0.0]).view(1, 1, 1, 3)  # the conditioning's own rounding
    assert torch.equal(follow_change(concat, layout, agree, img, torch.zeros_like(img))[:, 2:], pixels)
    grown = torch.tensor([0.0, 1.0, 1.0]).view(1, 1, 1, 3)  # the map reaches block 2 too
    out = follow_change(concat, layout, grown, img, torch.zeros_like(img))[:, 2:]
    assert torch.equal(out[..., :2], pixels[..., :2]) and torch.equal(out[..., 2], torch.ones(1, 64, 1))
