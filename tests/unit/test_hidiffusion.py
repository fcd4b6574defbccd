"""HiDiffusion operators and switches (pure torch): window attention against attention computed window by
window by hand, any size, RAU-Net sizes, and switch points read from sigmas."""

from __future__ import annotations

import pytest
import torch

from preprint.highres.hidiffusion import (
    LAYOUTS,
    HiDiffusionRun,
    pool,
    resize_to,
    strided_conv,
    window_shift,
    window_splits,
    windowed_attention,
)


def _attention(q, k, v):
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return w @ v


@pytest.mark.parametrize("height,width", [(8, 8), (7, 10), (5, 3), (1, 4)])
@pytest.mark.parametrize("shift", [(0, 0), (1, 2), (3, 1)])
def test_windowed_attention_is_attention_inside_each_shifted_window(height, width, shift):
    g = torch.Generator().manual_seed(0)
    b, c = 2, 6
    q, k, v = (torch.randn(b, height * width, c, generator=g, dtype=torch.float64) for _ in range(3))
    out = windowed_attention(q, k, v, height, width, shift, _attention)
    # by hand: roll the grid, attend inside each of the 2x2 windows, roll back
    sy, sx = shift
    grid = [torch.roll(t.reshape(b, height, width, c), (-sy, -sx), (1, 2)) for t in (q, k, v)]
    want = torch.zeros(b, height, width, c, dtype=torch.float64)
    h0, w0 = window_splits(height)[0], window_splits(width)[0]
    for r in (slice(0, h0), slice(h0, height)):
        for cl in (slice(0, w0), slice(w0, width)):
            qq, kk, vv = (t[:, r, cl].reshape(b, -1, c) for t in grid)
            if qq.shape[1]:
                want[:, r, cl] = _attention(qq, kk, vv).reshape(b, r.stop - r.start if r.stop else 0, -1, c)
    want = torch.roll(want, (sy, sx), (1, 2)).reshape(b, -1, c)
    assert torch.allclose(out, want, atol=1e-12)


def test_windows_keep_attention_local():
    """A token's output does not change when keys / values in other windows change."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 36, 4, generator=g) for _ in range(3))
    base = windowed_attention(q, k, v, 6, 6, (0, 0), _attention)
    k2, v2 = k.clone(), v.clone()
    grid = torch.arange(36).reshape(6, 6)
    far = grid[3:, 3:].reshape(-1)  # the bottom-right window
    k2[0, far] += 5.0
    v2[0, far] -= 3.0
    moved = windowed_attention(q, k2, v2, 6, 6, (0, 0), _attention)
    near = grid[:3, :3].reshape(-1)
    assert torch.equal(moved[0, near], base[0, near])
    assert not torch.allclose(moved[0, far], base[0, far])


def test_window_attention_differs_from_global_attention():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 64, 4, generator=g) for _ in range(3))
    assert not torch.allclose(windowed_attention(q, k, v, 8, 8, (0, 0), _attention), _attention(q, k, v), atol=1e-3)


@pytest.mark.parametrize("n", [8, 9, 13, 40, 47])
def test_raunet_sizes_at_any_size(n):
    x = torch.randn(1, 3, n, n + 5)
    w = torch.randn(3, 3, 3, 3)
    assert strided_conv(x, w, None).shape[-2:] == ((n + 3) // 4, (n + 5 + 3) // 4)
    assert pool(x).shape[-2:] == ((n + 1) // 2, (n + 5 + 1) // 2)
    assert resize_to(pool(x), x.shape[-2:]).shape == x.shape
    assert resize_to(x, x.shape[-2:]) is x


def test_strided_conv_reads_every_fourth_pixel_with_dilation_2():
    """Stride 4, padding 2, dilation 2: output (i, j) sees input rows / columns 4i - 2, 4i, 4i + 2."""
    x = torch.zeros(1, 1, 12, 12)
    x[0, 0, 4, 6] = 1.0
    w = torch.zeros(1, 1, 3, 3)
    w[0, 0, 1, 2] = 1.0  # centre row, right tap: input (4i, 4j + 2)
    out = strided_conv(x, w, None)
    assert out.shape[-2:] == (3, 3)
    assert out[0, 0, 1, 1] == 1.0 and out.sum() == 1.0


def _run(t1, t2, layout="sd15", steps=10, **kw):
    sigmas = torch.linspace(10.0, 0.0, steps + 1)
    return HiDiffusionRun(sigmas, LAYOUTS[layout], t1, t2, kw.pop("raunet", True), kw.pop("windows", True),
                          kw.pop("seed", 0)), sigmas


def test_switches_follow_fractions_of_the_run_by_sigma():
    run, sigmas = _run(0.4, 0.3)  # sd15: strided conv is the t1 part, pooling the t2 part
    strided = [run.strided(s) for s in sigmas[:-1]]
    pooled = [run.pooled(s) for s in sigmas[:-1]]
    assert strided == [True] * 4 + [False] * 6
    assert pooled == [True] * 3 + [False] * 7
    # an intermediate evaluation inside step 3 (as Heun / DPM-2S make) belongs to step 3
    assert run.strided((sigmas[3] + sigmas[4]) / 2) and not run.pooled((sigmas[3] + sigmas[4]) / 2)
    xl, _ = _run(0.4, 0.3, layout="sdxl")  # SDXL: the roles swap
    assert [xl.pooled(s) for s in sigmas[:-1]] == strided and [xl.strided(s) for s in sigmas[:-1]] == pooled


def test_zero_switch_points_and_raunet_off_switch_everything_off():
    for run, sigmas in (_run(0.0, 0.0), _run(0.7, 0.3, raunet=False)):
        assert not any(run.reshaping(s) for s in sigmas)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_switch_points_outside_the_run_are_refused(bad):
    with pytest.raises(ValueError, match="fraction of the run"):
        _run(bad, 0.0)


def test_shifts_are_seeded_per_run_and_step_never_global():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    shifts = [window_shift(7, step, 32, 48) for step in range(40)]
    assert torch.equal(torch.rand(3), before)  # the global RNG was not touched
    assert shifts == [window_shift(7, step, 32, 48) for step in range(40)]
    assert set(shifts) == {(k * 4, k * 6) for k in range(4)}  # quarter-window steps of 16 x 24 windows
    assert shifts != [window_shift(8, step, 32, 48) for step in range(40)]
