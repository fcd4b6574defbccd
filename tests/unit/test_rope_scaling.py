"""RoPE scaling per axis (pure torch) against its documented maths, computed here by hand in float64:
Flux's rotations, NTK-aware base scaling theta' = theta * s^(d/(d-2)), position interpolation (positions / s),
the identity at or below the training extent, each axis with its own scale, the index axis untouched."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from preprint.highres.rope import (
    MODES,
    ScaledRoPE,
    axis_extent,
    axis_scale,
    ntk_theta,
    rope_rotations,
    scaled_rope,
)

AXES = [4, 6, 8]  # index, rows, columns: three different widths, so a mixed-up axis shows in the shapes
THETA = 10000.0
TOL = 2e-6  # float32 output of angles up to ~20 rad; every effect checked below is orders of magnitude larger


def reference_rotations(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """[[cos, -sin], [sin, cos]] of pos * theta^(-2j / dim), j = 0 .. dim/2 - 1, in float64: ``[B, N, dim/2, 2, 2]``."""
    omega = torch.tensor([theta ** (-2.0 * j / dim) for j in range(dim // 2)], dtype=torch.float64)
    ang = pos.double()[..., None] * omega
    c, s = torch.cos(ang), torch.sin(ang)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def reference(ids: torch.Tensor, thetas: list[float], divisors: list[float]) -> torch.Tensor:
    """Flux's EmbedND by hand: each axis rotated at its own base and position divisor, ``[B, 1, sum/2, 2, 2]``."""
    parts = [reference_rotations(ids[..., i] / divisors[i], d, thetas[i]) for i, d in enumerate(AXES)]
    return torch.cat(parts, dim=-3).unsqueeze(1)


def make_ids(rows: int, cols: int, text: int = 3, index: float = 0.0) -> torch.Tensor:
    """Flux ids ``[1, text + rows * cols, 3]``: text at (0, 0, 0), then the image grid at (index, row, column)."""
    r, c = torch.meshgrid(torch.arange(float(rows)), torch.arange(float(cols)), indexing="ij")
    img = torch.stack([torch.full_like(r, index), r, c], dim=-1).reshape(1, -1, 3)
    return torch.cat([torch.zeros(1, text, 3), img], dim=1)


def kontext_ids(rows: int, cols: int) -> torch.Tensor:
    """Flux Kontext: the image at index 0 and a reference image of the same grid at index 1."""
    ref = make_ids(rows, cols, text=0, index=1.0)
    return torch.cat([make_ids(rows, cols), ref], dim=1)


# ---------------------------------------------------------------------------------------------- the pieces

@pytest.mark.parametrize("dim", [2, 4, 6, 16])
def test_rotations_are_flux_rope(dim):
    pos = torch.tensor([[0.0, 1.0, 2.5, 7.0, 19.0]])
    out = rope_rotations(pos, dim, THETA)
    assert out.shape == (1, 5, dim // 2, 2, 2) and out.dtype == torch.float32
    assert torch.allclose(out.double(), reference_rotations(pos, dim, THETA), atol=TOL, rtol=0)


def test_rotation_pair_j_turns_theta_to_the_minus_2j_over_d_per_position():
    out = rope_rotations(torch.tensor([[3.0]]), 8, 100.0)[0, 0]  # frequencies 100^(0, -1/4, -1/2, -3/4)
    for j, omega in enumerate([1.0, 100 ** -0.25, 0.1, 100 ** -0.75]):
        ang = 3.0 * omega
        want = [math.cos(ang), -math.sin(ang), math.sin(ang), math.cos(ang)]
        assert out[j].reshape(-1).tolist() == pytest.approx(want, abs=TOL)


@pytest.mark.parametrize("dim", [1, 3, 5])
def test_an_odd_axis_is_refused(dim):
    with pytest.raises(ValueError, match="even number of dimensions"):
        rope_rotations(torch.zeros(1, 2), dim, THETA)


def test_axis_extent_counts_grid_positions():
    assert axis_extent(torch.arange(5.0) + 3.0) == 5.0  # 3 .. 7
    assert axis_extent(torch.tensor([9.0, 2.0, 4.0])) == 8.0  # 2 .. 9, whatever the order
    assert axis_extent(torch.full((6,), 4.0)) == 1.0  # a constant axis
    assert axis_extent(torch.tensor([2.0])) == 1.0
    assert axis_extent(torch.zeros(0)) == 1.0  # no tokens at all: one position, never an error


def test_axis_scale_is_the_growth_never_below_one():
    assert axis_scale(12.0, 4.0) == 3.0
    assert axis_scale(6.0, 4.0) == 1.5
    assert axis_scale(4.0, 4.0) == 1.0
    assert axis_scale(3.0, 4.0) == 1.0  # smaller than at training: left alone, not compressed
    assert axis_scale(6.0, 1.0) == 6.0
    assert axis_scale(6.0, 0.5) == 6.0  # a training extent under one position counts as one
    assert axis_scale(6.0, 0.0) == 6.0


@pytest.mark.parametrize("dim", [4, 16, 56])
@pytest.mark.parametrize("s", [1.5, 2.0, 3.0])
def test_ntk_base_is_theta_times_s_to_the_d_over_d_minus_2(dim, s):
    new = ntk_theta(THETA, s, dim)
    assert new == pytest.approx(THETA * s ** (dim / (dim - 2)), rel=1e-12)
    # what the formula is for: the highest frequency (1 per position) is kept, the lowest slows down by s,
    # so the new extent's last position turns the lowest pair as far as the trained extent's did
    lowest = (dim - 2) / dim
    assert new ** -lowest == pytest.approx(THETA ** -lowest / s, rel=1e-12)


@pytest.mark.parametrize("s", [1.0, 0.5, 0.0])
def test_ntk_base_is_unchanged_at_or_below_the_training_extent(s):
    assert ntk_theta(THETA, s, 16) == THETA


# ---------------------------------------------------------------------------------------------- scaled_rope

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows,cols", [(4, 6), (3, 5), (1, 1)])
def test_at_or_below_the_training_size_the_embedding_is_bitwise_flux(mode, rows, cols):
    ids = kontext_ids(rows, cols)
    plain = torch.cat([rope_rotations(ids[..., i], d, THETA) for i, d in enumerate(AXES)], dim=-3).unsqueeze(1)
    out = scaled_rope(ids, AXES, THETA, [None, 4, 6], mode)
    assert out.shape == (1, 1, ids.shape[1], sum(AXES) // 2, 2, 2)
    assert torch.equal(out, plain)
    assert torch.allclose(out.double(), reference(ids, [THETA] * 3, [1.0] * 3), atol=TOL, rtol=0)
    assert torch.equal(scaled_rope(ids, AXES, THETA, [None] * 3, mode), plain)  # no training extents: Flux


def test_ntk_scales_each_axis_base_with_its_own_factor():
    ids = kontext_ids(6, 12)  # rows 1.5x and columns 4x their training extents 4 and 3
    out = scaled_rope(ids, AXES, THETA, [None, 4, 3], "NTK-aware")
    want = reference(ids, [THETA, THETA * 1.5 ** (6 / 4), THETA * 4.0 ** (8 / 6)], [1.0] * 3)
    assert out.shape == (1, 1, ids.shape[1], 9, 2, 2)
    assert torch.allclose(out.double(), want, atol=TOL, rtol=0)


def test_position_interpolation_divides_each_axis_positions_by_its_own_factor():
    ids = kontext_ids(6, 12)
    out = scaled_rope(ids, AXES, THETA, [None, 4, 3], "position interpolation")
    want = reference(ids, [THETA] * 3, [1.0, 1.5, 4.0])
    assert out.shape == (1, 1, ids.shape[1], 9, 2, 2)
    assert torch.allclose(out.double(), want, atol=TOL, rtol=0)
    # the interpolated columns 0 .. 11 land inside the trained span 0 .. 3 (largest 11 / 4 = 2.75)
    assert torch.allclose(out[0, 0, -1, 5:].double(), reference_rotations(torch.tensor([[2.75]]), 8, THETA)[0, 0],
                          atol=TOL, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_only_the_axis_that_grew_is_scaled(mode):
    """A wide image: the columns grow 3x, the rows stay at their training extent, so only the columns change."""
    ids = kontext_ids(4, 12)
    out = scaled_rope(ids, AXES, THETA, [None, 4, 4], mode)
    ntk = mode == "NTK-aware"
    want = reference(ids, [THETA, THETA, THETA * 3.0 ** (8 / 6) if ntk else THETA], [1.0, 1.0, 1.0 if ntk else 3.0])
    assert torch.allclose(out.double(), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_an_axis_without_a_training_extent_is_never_scaled(mode):
    """None leaves the axis as Flux has it however far it reaches: the index axis (Kontext's reference image
    sits at index 1) and here the rows too, while the columns are scaled."""
    ids = kontext_ids(9, 8)
    out = scaled_rope(ids, AXES, THETA, [None, None, 2], mode)
    ntk = mode == "NTK-aware"
    want = reference(ids, [THETA, THETA, THETA * 4.0 ** (8 / 6) if ntk else THETA], [1.0, 1.0, 1.0 if ntk else 4.0])
    assert torch.allclose(out.double(), want, atol=TOL, rtol=0)
    # the untouched axes are bitwise Flux's
    assert torch.equal(out[0, 0, :, :5], torch.cat([rope_rotations(ids[..., i], d, THETA) for i, d in
                                                     enumerate(AXES[:2])], dim=-3)[0])


def test_text_tokens_at_position_zero_are_the_identity_in_every_mode():
    ids = make_ids(8, 8)
    eye = torch.eye(2).expand(3, 9, 2, 2)
    for mode in MODES:
        assert torch.equal(scaled_rope(ids, AXES, THETA, [None, 2, 2], mode)[0, 0, :3], eye)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown RoPE scaling mode"):
        scaled_rope(make_ids(2, 2), AXES, THETA, [None, 2, 2], "YaRN")


def test_batches_keep_their_rows():
    ids = torch.cat([make_ids(6, 4), make_ids(6, 4, index=1.0)])  # two images, different index axes
    out = scaled_rope(ids, AXES, THETA, [None, 3, 4], "NTK-aware")
    assert out.shape == (2, 1, ids.shape[1], 9, 2, 2)
    want = reference(ids, [THETA, THETA * 2.0 ** (6 / 4), THETA], [1.0] * 3)
    assert torch.allclose(out.double(), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_scaled_rope_module_is_scaled_rope_with_the_embedders_axes_and_theta(mode):
    original = SimpleNamespace(axes_dim=(4, 6, 8), theta=10000)  # as Flux's EmbedND holds them
    module = ScaledRoPE(original, [None, 4, 3], mode)
    assert isinstance(module, torch.nn.Module)
    assert module.axes_dim == AXES and module.theta == THETA and isinstance(module.theta, float)
    ids = kontext_ids(6, 12)
    assert torch.equal(module(ids), scaled_rope(ids, AXES, THETA, [None, 4, 3], mode))
    assert not torch.equal(module(ids), scaled_rope(ids, AXES, THETA, [None] * 3, mode))


def test_modes_are_the_two_documented():
    assert MODES == ("NTK-aware", "position interpolation")


def test_a_reference_image_beside_the_image_does_not_widen_its_extent():
    """Flux Kontext's second reference image sits at index 2 beside the first (columns offset by its width), and
    HunyuanVideo's reference latent at frame -1 a whole width to the right: the column scale is the generated
    image's own (6 columns over 3 trained: 2x), not the 12 or 18 columns the references reach."""
    original = SimpleNamespace(axes_dim=(4, 6, 8), theta=10000)
    second = make_ids(4, 6, text=0, index=2.0)
    second[..., 2] += 6.0
    image = torch.cat([kontext_ids(4, 6), second], dim=1)
    want = reference(image, [THETA, THETA, THETA * 2.0 ** (8 / 6)], [1.0] * 3)
    assert torch.allclose(ScaledRoPE(original, [None, 4, 3], "NTK-aware")(image).double(), want, atol=TOL, rtol=0)
    frames = torch.cat([make_ids(4, 6, text=0, index=0.0), make_ids(4, 6, text=0, index=1.0)], dim=1)
    ref = make_ids(4, 6, text=0, index=-1.0)
    ref[..., 2] += 6.0
    video = torch.cat([torch.zeros(1, 3, 3), ref, frames], dim=1)
    want = reference(video, [THETA] * 3, [1.0, 1.0, 2.0])
    out = ScaledRoPE(original, [None, 4, 3], "position interpolation", video=True)(video)
    assert torch.allclose(out.double(), want, atol=TOL, rtol=0)
