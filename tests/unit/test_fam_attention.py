"""FAM attention modulation maths: the interpolation behind Up, the up-sampled map (rows are distributions, a
same-size map is itself), and the factorised blend against the explicit blended map on small sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from preprint.highres.fam_attention import (
    CALL_KEY,
    AttentionModulation,
    AttentionModulationError,
    Call,
    Resampler,
    interpolation_matrix,
    modulated_output,
)


def attention(q, k, v, heads, attn_precision=None, transformer_options=None):
    """Multi-head softmax attention on ``[B, N, heads * d]`` tensors, as ComfyUI's attention takes them."""
    return _merge(_maps(q, k, heads) @ _split(v, heads))


def _split(x, heads):
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge(x):
    b, heads, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, heads * d)


def _maps(q, k, heads):
    qs, ks = _split(q, heads), _split(k, heads)
    return torch.softmax(qs @ ks.transpose(-1, -2) / qs.shape[-1] ** 0.5, dim=-1)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_interpolation_matrix_known_answer_and_rows_sum_to_one():
    # 2 -> 4 samples, align_corners=False: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to the last)
    want = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(interpolation_matrix(2, 4, torch.float64), want)
    for n, size in ((3, 7), (5, 5), (1, 4), (6, 13)):
        u = interpolation_matrix(n, size, torch.float64)
        assert u.shape == (size, n) and (u >= 0).all() and (u.sum(0) > 0).all()
        torch.testing.assert_close(u.sum(1), torch.ones(size, dtype=torch.float64))
    assert torch.equal(interpolation_matrix(5, 5), torch.eye(5))
    with pytest.raises(AttentionModulationError, match="no larger"):
        interpolation_matrix(6, 4)


@pytest.mark.parametrize("native,grid", [((3, 5), (7, 11)), ((4, 4), (8, 8)), ((2, 3), (2, 7))])
def test_token_upsampling_is_bilinear_interpolation_of_the_grid(native, grid):
    r = Resampler.make(native, grid, torch.float64)
    x = rand(2, native[0] * native[1], 3)
    image = x.reshape(2, *native, 3).permute(0, 3, 1, 2)
    want = F.interpolate(image, size=grid, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(r.upsample(x), want.reshape(2, -1, 3))


@pytest.mark.parametrize("native,grid", [((3, 5), (7, 11)), ((2, 2), (4, 4)), ((3, 4), (3, 9))])
def test_upsampled_map_rows_are_distributions(native, grid):
    n, big = native[0] * native[1], grid[0] * grid[1]
    a = torch.softmax(rand(2, n, n, seed=1) * 3, dim=-1)
    up = Resampler.make(native, grid, torch.float64).upsample_map(a)
    assert up.shape == (2, big, big) and (up >= 0).all()
    torch.testing.assert_close(up.sum(-1), torch.ones(2, big, dtype=torch.float64))


def test_upsampled_map_keeps_a_same_size_map_and_spreads_a_key_over_its_footprint():
    a = torch.softmax(rand(12, 12, seed=2), dim=-1)
    torch.testing.assert_close(Resampler.make((3, 4), (3, 4), torch.float64).upsample_map(a), a)
    # every native query attending only native key 0 (the top-left cell): at scale 2 each high-resolution query
    # attends only the keys that cell spreads to, by its interpolation weights over its footprint
    r = Resampler.make((2, 2), (4, 4), torch.float64)
    one_key = torch.zeros(4, 4, dtype=torch.float64)
    one_key[:, 0] = 1.0
    up = r.upsample_map(one_key)
    weights = torch.outer(r.uh[:, 0], r.uw[:, 0]).reshape(-1)
    torch.testing.assert_close(up, (weights / weights.sum()).expand(16, 16))
    assert (up[:, weights == 0] == 0).all() and up[0, 0] > up[0, 5] > 0


def test_pool_is_the_normalised_adjoint_of_upsampling():
    r = Resampler.make((3, 5), (7, 11), torch.float64)
    x, y = rand(1, 15, 2, seed=3), rand(1, 77, 2, seed=4)
    footprint = torch.outer(r.uh.sum(0), r.uw.sum(0)).reshape(1, 15, 1)
    # <U x, y> = <x, U^T y> = <x, D pool(y)>
    torch.testing.assert_close((r.upsample(x) * y).sum(), (x * footprint * r.pool(y)).sum())
    torch.testing.assert_close(r.pool(torch.ones(1, 77, 2, dtype=torch.float64)), torch.ones(1, 15, 2,
                                                                                             dtype=torch.float64))


def _brute_force(q, k, v, nq, nk, native, grid, heads, weight):
    """The output of the explicit blended map: (weight Up(A_native) + (1 - weight) A_hr) V, head by head."""
    up = Resampler.make(native, grid, torch.float64).upsample_map(_maps(nq, nk, heads))
    blended = weight * up + (1 - weight) * _maps(q, k, heads)
    torch.testing.assert_close(blended.sum(-1), torch.ones(blended.shape[:-1], dtype=torch.float64))
    return _merge(blended @ _split(v, heads))


def _layer_call(native, grid, heads=2, dim=4, batch=2, weight=0.7, seed=0):
    """A modulated layer run through its capture and blend calls, and the brute-force answer."""
    n, big, c = native[0] * native[1], grid[0] * grid[1], heads * dim
    nq, nk, nv = (rand(batch, n, c, seed=seed + i) for i in range(3))
    q, k, v = (rand(batch, big, c, seed=seed + 10 + i) for i in range(3))
    layer = AttentionModulation(attention, ("output", 3, 0))
    call = Call("capture")
    options = {"n_heads": heads, "activations_shape": [batch, c, *native], CALL_KEY: call}
    torch.testing.assert_close(layer(nq, nk, nv, options), attention(nq, nk, nv, heads))
    blend = Call("blend", weight, call.store)
    out = layer(q, k, v, {"n_heads": heads, "activations_shape": [batch, c, *grid], CALL_KEY: blend})
    return out, _brute_force(q, k, v, nq, nk, native, grid, heads, weight), attention(q, k, v, heads)


@pytest.mark.parametrize("native,grid", [((3, 5), (7, 11)), ((2, 2), (4, 4)), ((4, 3), (4, 7)), ((1, 1), (3, 2))])
def test_factorised_blend_equals_the_explicit_blended_map(native, grid):
    out, want, _ = _layer_call(native, grid)
    torch.testing.assert_close(out, want)


def test_weight_zero_is_the_plain_attention_and_one_the_native_map_alone():
    out, _, plain = _layer_call((3, 5), (7, 11), weight=0.0)
    assert torch.equal(out, plain)
    out, want, plain = _layer_call((3, 5), (7, 11), weight=1.0)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(out, plain)


def test_the_blend_never_builds_a_high_resolution_map():
    # 256 x 256 tokens: one float32 N x N map would take 17 GB; the factorised blend needs the tokens only
    r = Resampler.make((32, 32), (256, 256), torch.float32)
    seen = []

    def native_attention(values):
        seen.append(values.shape)
        return values.flip(1)
    v = torch.randn(1, 256 * 256, 4, generator=torch.Generator().manual_seed(0))
    out = modulated_output(v, native_attention, v, r, 0.5)
    assert seen == [torch.Size([1, 32 * 32, 4])] and out.shape == v.shape and torch.isfinite(out).all()


def test_outside_a_call_the_layer_is_plain_or_the_earlier_replacement():
    q, k, v = (rand(1, 6, 4, seed=i) for i in range(3))
    layer = AttentionModulation(attention, ("output", 3, 0))
    assert torch.equal(layer(q, k, v, {"n_heads": 2}), attention(q, k, v, 2))
    earlier = []

    def previous(q, k, v, options):
        earlier.append(options)
        return v * 2
    chained = AttentionModulation(attention, ("output", 3, 0), previous)
    assert torch.equal(chained(q, k, v, {"n_heads": 2}), v * 2) and len(earlier) == 1
    # a second modulation node replaces the first rather than modulating twice
    assert AttentionModulation(attention, ("output", 3, 0), chained).previous is previous


def test_blend_without_a_native_capture_or_with_a_larger_native_grid_is_refused():
    q, k, v = (rand(1, 12, 4, seed=i) for i in range(3))
    layer = AttentionModulation(attention, ("output", 3, 0), node="FAM Attention Modulation (Preprint)")
    options = {"n_heads": 2, "activations_shape": [1, 4, 3, 4], CALL_KEY: Call("blend", 0.7)}
    with pytest.raises(AttentionModulationError, match="FAM Attention Modulation.*never reached"):
        layer(q, k, v, options)
    store = {("output", 3, 0): (rand(1, 20, 4), rand(1, 20, 4), (4, 5), {"n_heads": 2})}
    with pytest.raises(AttentionModulationError, match="larger than the high-resolution grid"):
        layer(q, k, v, {**options, CALL_KEY: Call("blend", 0.7, store)})
    with pytest.raises(AttentionModulationError, match="feature grid"):
        layer(q, k, v, {"n_heads": 2, "activations_shape": [1, 4, 5, 5], CALL_KEY: Call("capture")})
