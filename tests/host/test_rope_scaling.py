"""RoPE scaling on a tiny Flux layout through real ComfyUI: exact at the training size, per-axis scaling
(only the axis that grew), both modes, and a clear error on models without Flux's RoPE."""

from __future__ import annotations

import pytest
import torch

from preprint.highres.rope import ntk_theta, rope_rotations, scaled_rope

from .harness import run_node, run_sampling, tiny_model


def rope(m, mode="NTK-aware", width=64, height=64):
    return run_node("PreprintRoPEScaling", model=m, mode=mode, training_width=width, training_height=height)[0]


@pytest.fixture(scope="module")
def flux():
    return tiny_model("flux")


@pytest.mark.parametrize("mode", ["NTK-aware", "position interpolation"])
def test_training_size_is_bitwise_the_unpatched_model(flux, mode):
    base = run_sampling(flux, "flux", steps=3, height=8, width=8)  # 64 px: the stated training size
    assert torch.equal(run_sampling(rope(flux, mode), "flux", steps=3, height=8, width=8), base)


@pytest.mark.parametrize("mode", ["NTK-aware", "position interpolation"])
def test_larger_sizes_change_the_result(flux, mode):
    base = run_sampling(flux, "flux", steps=3, height=8, width=16)
    out = run_sampling(rope(flux, mode), "flux", steps=3, height=8, width=16)
    assert torch.isfinite(out).all() and not torch.allclose(out, base)


def _ids(rows, cols, text=3):
    img = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(rows)), torch.arange(float(cols)),
                                     indexing="ij"), dim=-1).reshape(1, -1, 3)
    return torch.cat([torch.zeros(1, text, 3), img], dim=1)


def test_only_the_axis_that_grew_is_scaled():
    axes, theta = [4, 6, 6], 10000.0
    ids = _ids(4, 12)  # rows at the training extent 4, columns 3x it
    out = scaled_rope(ids, axes, theta, [None, 4, 4], "NTK-aware")
    plain = scaled_rope(ids, axes, theta, [None, None, None], "NTK-aware")
    rows, cols = slice(2, 5), slice(5, 8)  # rotation pairs of each axis: 2, 3, 3
    assert torch.equal(out[:, :, :, rows], plain[:, :, :, rows])
    want = rope_rotations(ids[..., 2], 6, ntk_theta(theta, 3.0, 6))
    assert torch.allclose(out[:, 0, :, cols], want)
    assert not torch.allclose(out[:, :, :, cols], plain[:, :, :, cols])
    pi = scaled_rope(ids, axes, theta, [None, 4, 4], "position interpolation")
    assert torch.allclose(pi[:, 0, :, cols], rope_rotations(ids[..., 2] / 3.0, 6, theta))
    assert torch.equal(pi[:, 0, :3], plain[:, 0, :3])  # text tokens (position 0) untouched


def test_ntk_base_follows_the_formula():
    assert ntk_theta(10000.0, 1.0, 16) == 10000.0
    assert ntk_theta(10000.0, 2.0, 16) == pytest.approx(10000.0 * 2.0 ** (16 / 14))


def test_models_without_flux_rope_get_a_clear_error():
    with pytest.raises(ValueError, match="rotary position embedding"):
        rope(tiny_model("sd15"))


def test_a_second_node_after_a_run_reads_the_models_own_embedder(flux):
    """After sampling, ComfyUI may leave the last run's object patches applied to the shared model; the node must
    still scale the model's own embedder, not the previous run's replacement (a 64 px training size puts the probe
    outside that replacement's extent, which used to be refused as a different embedding)."""
    first = rope(flux, width=64, height=64)
    run_sampling(first, "flux", steps=2, height=16, width=16)
    again = rope(flux, width=64, height=64)
    torch.testing.assert_close(run_sampling(again, "flux", steps=3, height=16, width=16),
                               run_sampling(rope(tiny_model("flux"), width=64, height=64), "flux", steps=3, height=16,
                                            width=16), rtol=0, atol=0)
