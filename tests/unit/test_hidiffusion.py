"""HiDiffusion operators and switches (pure torch): window attention against attention computed window by
window by hand, any size, RAU-Net sizes, the paper's block choices and presets, switch points read from sigmas,
and the patches of hidiffusion_runtime driven with plain options dicts and a plain attention function."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from preprint.highres import hidiffusion_runtime as rt
from preprint.highres.hidiffusion import (
    LAYOUTS,
    PRESETS,
    HiDiffusionRun,
    RAULayout,
    auto_preset,
    layer_index,
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
@pytest.mark.parametrize("shift", [(0, 0), (1, 2), (3, 1), (0, 2), (2, 0)])
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
                          kw.pop("seed", 0), kw.pop("preset", "custom")), sigmas


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


def test_windows_are_ceil_half_first_and_the_rest():
    assert [window_splits(n) for n in (1, 2, 7, 8, 13)] == [(1, 0), (1, 1), (4, 3), (4, 4), (7, 6)]


@pytest.mark.parametrize("height,width,calls", [
    (5, 1, [(2, 3, 3), (2, 2, 3)]),  # windows 3 x 1 and 2 x 1; the second column is empty
    (1, 5, [(2, 3, 3), (2, 2, 3)]),  # the second row is empty
    (1, 1, [(2, 1, 3)]),
    (3, 4, [(4, 4, 3), (4, 2, 3)]),  # two 2 x 2 windows of 2 images in one call, two 1 x 2 in another
])
def test_only_non_empty_windows_reach_attention_once_per_window_size(height, width, calls):
    seen = []

    def attention(q, k, v):
        seen.append(tuple(q.shape))
        return _attention(q, k, v)

    q, k, v = (torch.randn(2, height * width, 3, generator=torch.Generator().manual_seed(i)) for i in range(3))
    windowed_attention(q, k, v, height, width, (0, 0), attention)
    assert sorted(seen) == sorted(calls)


def test_window_shift_is_a_whole_quarter_of_the_first_window_on_each_side():
    """23 x 15 tokens: windows of 12 / 11 rows and 8 / 7 columns; a quarter of the first is 3 rows, 2 columns."""
    shifts = [window_shift(7, step, 23, 15) for step in range(40)]
    assert set(shifts) == {(3 * k, 2 * k) for k in range(4)}
    assert all(type(a) is int and type(b) is int for a, b in shifts)  # torch.roll needs whole tokens
    odd = {window_shift(7, step, 10, 10) for step in range(40)}  # windows of 5: a quarter is 1 token (floor)
    assert odd == {(k, k) for k in range(4)} and all(type(a) is int for a, _ in odd)


def test_layouts_are_the_papers_block_choices():
    """SD1.x / SD2.x (12 input blocks): stride-4 conv in input_blocks[3] (down block 0's down-sampler) for the first
    T1, pooling after input_blocks[4] undone at output_blocks[8] for the first T2, windows on the level-0
    transformers (input 1, 2; output 9, 10, 11). SDXL (9 input blocks): pooling after input_blocks[4] undone at
    output_blocks[5] for T1, stride-4 conv in input_blocks[6] for T2, windows on both transformer layers of the
    first attention level (input 4, 5; output 3, 4, 5)."""
    sd15, sdxl = LAYOUTS["sd15"], LAYOUTS["sdxl"]
    assert set(LAYOUTS) == {"sd15", "sdxl"}
    assert (sd15.strided_block, sd15.pooled_block, sd15.unpool_block) == (3, 4, 8)
    assert (sd15.strided_phase, sd15.pooled_phase) == ("t1", "t2")
    assert sorted(sd15.window_blocks) == [("input", 1, 0), ("input", 2, 0), ("output", 9, 0), ("output", 10, 0),
                                          ("output", 11, 0)]
    assert (sdxl.strided_block, sdxl.pooled_block, sdxl.unpool_block) == (6, 4, 5)
    assert (sdxl.strided_phase, sdxl.pooled_phase) == ("t2", "t1")
    assert len(sdxl.window_blocks) == 10 and sorted(sdxl.window_blocks) == sorted(
        (b, n, i) for b, ns in (("input", (4, 5)), ("output", (3, 4, 5))) for n in ns for i in (0, 1))


def test_pooled_levels_skips_meet_features_of_their_own_size():
    """Why those blocks: a UNet of L levels has 3 L input blocks (conv_in, then per level two res (+ attention)
    blocks and a down-sampler, the last level without one) whose outputs are all skips, and 3 L output blocks that
    pop them in reverse. The strided conv is a down-sampler (a multiple of 3); pooling follows a level's first pair,
    so the pair's skips (pooled_block, pooled_block + 1) stay reduced and the output block that meets the level's
    first skip, the down-sampler's full-size output (pooled_block - 1), is where the features are resized back."""
    for layout, levels in ((LAYOUTS["sd15"], 4), (LAYOUTS["sdxl"], 3)):
        popped = list(reversed(range(3 * levels)))  # output block j concatenates input block popped[j]'s output
        assert layout.strided_block % 3 == 0 and 0 < layout.strided_block < 3 * levels
        assert layout.pooled_block % 3 == 1
        assert popped[layout.unpool_block] == layout.pooled_block - 1
        assert {popped[layout.unpool_block - 1], popped[layout.unpool_block - 2]} == {layout.pooled_block,
                                                                                     layout.pooled_block + 1}


def test_layouts_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LAYOUTS["sd15"].strided_block = 6
    assert hash(LAYOUTS["sd15"]) == hash(RAULayout(**dataclasses.asdict(LAYOUTS["sd15"])))


def test_presets_are_the_papers_switch_points():
    assert PRESETS == {"2x": (0.4, 0.0), "4x": (0.7, 0.3)}


def _keys_cubic_1d(v: list[float], out: int) -> list[float]:
    """Bicubic convolution (Keys, a = -0.75 as PyTorch) at pixel centres: source x = (j + 0.5) n / out - 0.5."""
    a, n = -0.75, len(v)

    def w(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0

    res = []
    for j in range(out):
        x = (j + 0.5) * n / out - 0.5
        i0 = math.floor(x)
        res.append(sum(w(x - (i0 + m)) * v[min(max(i0 + m, 0), n - 1)] for m in (-1, 0, 1, 2)))
    return res


@pytest.mark.parametrize("size,target", [((4, 5), (8, 10)), ((5, 7), (9, 13)), ((8, 6), (4, 3))])
def test_resize_is_bicubic_at_pixel_centres(size, target):
    """Separable data u_i v_j resize to resize(u)_i resize(v)_j; pixel-centre alignment, as the paper's code."""
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(size[0], generator=g, dtype=torch.float64), torch.randn(size[1], generator=g,
                                                                               dtype=torch.float64)
    h = (u[:, None] * v[None, :]).expand(2, 3, *size)
    out = resize_to(h, target)
    want = torch.outer(torch.tensor(_keys_cubic_1d(u.tolist(), target[0]), dtype=torch.float64),
                       torch.tensor(_keys_cubic_1d(v.tolist(), target[1]), dtype=torch.float64))
    assert out.shape == (2, 3, *target)
    assert torch.allclose(out[1, 2], want, atol=1e-12, rtol=0)


def test_switch_point_one_is_the_whole_run_and_one_part_alone_still_reshapes():
    run, sigmas = _run(1.0, 1.0)
    assert all(run.strided(s) and run.pooled(s) for s in sigmas[:-1])
    assert run.strided(sigmas[-1])  # the final sigma belongs to the last step
    only_strided, _ = _run(0.4, 0.0)  # the 2x preset on SD1.x: stride-4 conv, no pooling
    assert [only_strided.reshaping(s) for s in sigmas[:-1]] == [True] * 4 + [False] * 6
    only_pooled, _ = _run(0.0, 0.3)
    assert [only_pooled.reshaping(s) for s in sigmas[:-1]] == [True] * 3 + [False] * 7
    assert not any(only_pooled.strided(s) for s in sigmas)


def test_run_shift_is_the_steps_seeded_shift_drawn_once():
    run, sigmas = _run(0.4, 0.0, seed=11)
    for i in range(10):
        want = window_shift(11, i, 32, 48)
        assert run.shift(sigmas[i], 32, 48) == want
        assert run.shift((sigmas[i] + sigmas[i + 1]) / 2, 32, 48) == want  # an intermediate call of step i
    assert run.shift(sigmas[3], 23, 15) == window_shift(11, 3, 23, 15)  # per grid size
    other, _ = _run(0.4, 0.0, seed=12)
    assert [other.shift(s, 32, 48) for s in sigmas[:-1]] == [window_shift(12, i, 32, 48) for i in range(10)]


# ---------------------------------------------------------------------------------------------- the runtime


class _Host:
    """ComfyUI's pieces, plain: multi-head attention on [b, n, heads * d], weights lent as they are."""

    def __init__(self):
        self.calls, self.lent, self.returned = [], [], []

    def attention(self, q, k, v, heads, attn_precision=None):
        self.calls.append((tuple(q.shape), heads, attn_precision))
        b, n, c = q.shape
        split = [t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v)]
        return _attention(*split).transpose(1, 2).reshape(b, n, c)

    def cast(self, op, x):
        self.lent.append((op, x.dtype))
        return op.weight, op.bias, "offload"

    def uncast(self, op, weight, bias, offload):
        self.returned.append((op, weight, bias, offload))

    def host(self) -> rt.Host:
        return rt.Host(attention=self.attention, cast=self.cast, uncast=self.uncast)


class _Downsample(torch.nn.Module):
    def __init__(self, use_conv=True):
        super().__init__()
        self.use_conv = use_conv
        self.op = torch.nn.Conv2d(2, 2, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


def _options(run, sigma, block=None, **extra):
    return {rt.KEY: run, "sigmas": torch.tensor([float(sigma)]), "block": block, **extra}


def test_host_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _Host().host().attention = None


def test_run_of_reads_the_run_from_the_options():
    run, _ = _run(0.4, 0.3)
    assert rt.run_of({rt.KEY: run}) is run
    assert rt.run_of({}) is None and rt.run_of(None) is None and rt.run_of({"other": 1}) is None


@pytest.mark.parametrize("layout,block,until", [("sd15", 3, 4), ("sdxl", 6, 3)])
def test_downsample_runs_stride_4_in_the_layouts_block_while_the_run_says_so(layout, block, until):
    torch.manual_seed(0)
    fake = _Host()
    patch = rt.Downsample(fake.host())
    layer = _Downsample()
    run, sigmas = _run(0.4, 0.3, layout=layout)  # strided until step 4 (t1) on SD1.x, step 3 (t2) on SDXL
    x = torch.randn(1, 2, 16, 12)
    for i in range(10):
        out = patch(layer, x, None, None, _options(run, sigmas[i], ("input", block)), None)
        if i < until:
            assert torch.equal(out, strided_conv(x, layer.op.weight, layer.op.bias))
            assert out.shape[-2:] == (4, 3)
        else:
            assert torch.equal(out, layer(x)) and out.shape[-2:] == (8, 6)
    assert len(fake.lent) == until and fake.lent[0] == (layer.op, torch.float32)
    assert fake.returned == [(layer.op, layer.op.weight, layer.op.bias, "offload")] * until
    # other blocks, a down-sampler without a conv, calls outside a run: the plain layer
    plain = layer(x)
    for opts, lay in ((_options(run, sigmas[0], ("input", block + 3)), layer),
                      ({rt.KEY: run, "block": ("input", block)}, layer),  # no sigmas: not a sampling call
                      ({"sigmas": sigmas[:1], "block": ("input", block)}, layer)):
        assert torch.equal(patch(lay, x, None, None, opts, None), plain)
    pooled = _Downsample(use_conv=False)
    pooled.forward = lambda x: torch.nn.functional.avg_pool2d(x, 2)
    assert torch.equal(patch(pooled, x, None, None, _options(run, sigmas[0], ("input", block)), None),
                       torch.nn.functional.avg_pool2d(x, 2))
    assert len(fake.lent) == until
    bare = _Downsample()  # a down-sampler that does not say whether it has a conv: left alone
    del bare.use_conv
    assert torch.equal(patch(bare, x, None, None, _options(run, sigmas[0], ("input", block)), None), bare(x))
    assert len(fake.lent) == until


def test_input_block_pools_the_layouts_block_while_pooling_and_adds_stashed_control_resized():
    run, sigmas = _run(0.4, 0.3)  # SD1.x: pooling after input_blocks[4] for steps 0, 1, 2
    h = torch.randn(1, 2, 8, 6)
    assert torch.equal(rt.input_block(h, _options(run, sigmas[0], ("input", 4))), pool(h))
    assert rt.input_block(h, _options(run, sigmas[3], ("input", 4))) is h
    assert rt.input_block(h, _options(run, sigmas[0], ("input", 5))) is h
    assert rt.input_block(h, {rt.KEY: run, "block": ("input", 4)}) is h  # no sigmas
    assert rt.input_block(h, {"sigmas": sigmas[:1], "block": ("input", 4)}) is h  # no run
    # ControlNet residuals (full size, float64) taken from the stash in ComfyUI's order (last first), resized
    first, last = torch.randn(1, 2, 8, 6, dtype=torch.float64), torch.randn(1, 2, 8, 6, dtype=torch.float64)
    stash = {"input": [first, None, last]}
    out = rt.input_block(h, _options(run, sigmas[0], ("input", 4), **{rt.CONTROL_KEY: stash}))
    assert torch.equal(out, pool(h + last.float())) and out.dtype == torch.float32
    assert stash["input"] == [first, None]
    small = pool(h)
    assert rt.input_block(small, _options(run, sigmas[0], ("input", 5), **{rt.CONTROL_KEY: stash})) is small  # None
    assert torch.equal(rt.input_block(small, _options(run, sigmas[0], ("input", 6), **{rt.CONTROL_KEY: stash})),
                       small + resize_to(first.float(), (4, 3)))
    assert stash["input"] == []
    assert rt.input_block(small, _options(run, sigmas[0], ("input", 7), **{rt.CONTROL_KEY: stash})) is small


def test_output_block_undoes_the_pooling_and_adds_stashed_middle_and_output_control():
    run, sigmas = _run(0.4, 0.3)  # SD1.x: resized back at output_blocks[8] while pooling (steps 0, 1, 2)
    h, hsp = torch.randn(1, 2, 4, 3), torch.randn(1, 2, 8, 6)
    got_h, got_hsp = rt.output_block(h, hsp, _options(run, sigmas[0], ("output", 8)))
    assert torch.equal(got_h, resize_to(h, (8, 6))) and got_hsp is hsp
    for opts in (_options(run, sigmas[3], ("output", 8)), _options(run, sigmas[0], ("output", 7)),
                 {rt.KEY: run, "block": ("output", 8)}):
        got_h, got_hsp = rt.output_block(h, hsp, opts)
        assert got_h is h and got_hsp is hsp
    # the stash: the middle residual joins h at the first output block, the output residuals join the skips
    mid, o1, o2 = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 8, 6)
    stash = {"middle": [mid], "output": [o1, o2]}
    deep, skip = torch.randn(1, 2, 1, 2), torch.randn(1, 2, 1, 2)
    got_h, got_hsp = rt.output_block(deep, skip, _options(run, sigmas[0], ("output", 0), **{rt.CONTROL_KEY: stash}))
    assert torch.equal(got_h, deep + resize_to(mid, (1, 2))) and torch.equal(got_hsp, skip + resize_to(o2, (1, 2)))
    stash = {"middle": [mid], "output": [o1]}
    got_h, got_hsp = rt.output_block(deep, skip, _options(run, sigmas[0], ("output", 1), **{rt.CONTROL_KEY: stash}))
    assert got_h is deep and stash["middle"] == [mid]  # the middle residual belongs to output block 0 only
    assert torch.equal(got_hsp, skip + resize_to(o1, (1, 2)))
    got_h, got_hsp = rt.output_block(deep, skip, _options(run, sigmas[0], ("output", 0)))  # nothing stashed
    assert got_h is deep and got_hsp is skip


def test_diffusion_model_stashes_control_while_raunet_reshapes():
    run, sigmas = _run(0.4, 0.0)  # SD1.x 2x preset: only the strided conv, steps 0 .. 3
    seen = []

    def executor(x, timesteps, context, y, control, transformer_options, **kwargs):
        seen.append((x, timesteps, context, y, control, transformer_options, kwargs))
        return "out"

    a, b, m, o = (torch.randn(1, 2, 2, 2) for _ in range(4))
    control = {"input": [a, b], "middle": [m], "output": [o], "extra": "kept"}
    options = {rt.KEY: run, "sigmas": sigmas[1:2], "patches": {}}
    assert rt.diffusion_model(executor, "x", "t", "ctx", "y", control, options, flag=1) == "out"
    x, t, ctx, y, ctrl, to, kw = seen[-1]
    assert (x, t, ctx, y, kw) == ("x", "t", "ctx", "y", {"flag": 1})
    assert ctrl == {"input": [], "middle": [], "output": [], "extra": "kept"}  # ComfyUI adds none of them
    stash = to[rt.CONTROL_KEY]
    assert stash["input"] == [a, b] and stash["middle"] == [m] and stash["output"] == [o]
    assert {k: v for k, v in to.items() if k != rt.CONTROL_KEY} == options and rt.CONTROL_KEY not in options
    assert control["input"] == [a, b] and control["middle"] == [m]  # the caller's lists are left whole
    stash["input"].pop()
    assert control["input"] == [a, b]
    rt.diffusion_model(executor, "x", "t", "ctx", "y", {"input": [a]}, options)  # keys missing: empty stashes
    assert seen[-1][5][rt.CONTROL_KEY] == {"input": [a], "middle": [], "output": []}
    # not reshaping, no control, no run: everything passes through as given
    for ctl, opts in ((control, {rt.KEY: run, "sigmas": sigmas[4:5]}), (None, options),
                      (control, {"sigmas": sigmas[1:2]}), (control, {rt.KEY: run})):
        rt.diffusion_model(executor, "x", "t", "ctx", "y", ctl, opts)
        assert seen[-1][4] is ctl and seen[-1][5] is opts
    rt.diffusion_model(executor, "x", "t", "ctx", "y", control, None)
    assert seen[-1][4] is control and seen[-1][5] == {}


def test_window_attention_is_msw_msa_with_the_runs_shift_inside_a_run_and_plain_outside():
    fake = _Host()
    run, sigmas = _run(0.4, 0.0, seed=3)
    layer = layer_index(("input", 1, 0))
    step = next(i for i in range(10) if window_shift(3, i, 8, 12, layer) != (0, 0))
    shift = window_shift(3, step, 8, 12, layer)  # 8 x 12 tokens: windows 4 x 6, shifts (k, k)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 96, 6, generator=g, dtype=torch.float64) for _ in range(3))
    patch = rt.WindowAttention(fake.host(), ("input", 1, 0))
    opts = _options(run, sigmas[step], n_heads=2, attn_precision="fp32", activations_shape=(2, 6, 8, 12))
    out = patch(q, k, v, opts)

    def heads2(a, b, c):
        return fake.attention(a, b, c, 2)

    assert torch.allclose(out, windowed_attention(q, k, v, 8, 12, shift, heads2), atol=1e-12, rtol=0)
    assert not torch.allclose(out, windowed_attention(q, k, v, 8, 12, (0, 0), heads2), atol=1e-6)
    assert fake.calls[0] == ((8, 24, 6), 2, "fp32")  # four 4 x 6 windows of 2 images in one call
    plain = fake.attention(q, k, v, 2)
    no_windows, _ = _run(0.4, 0.0, seed=3, windows=False)
    for o in (_options(no_windows, sigmas[step], n_heads=2, activations_shape=(2, 6, 8, 12)),
              _options(run, sigmas[step], n_heads=2),  # no grid: cannot place windows
              {"sigmas": sigmas[step:step + 1], "n_heads": 2, "activations_shape": (2, 6, 8, 12)}):
        fake.calls.clear()
        assert torch.allclose(patch(q, k, v, o), plain, atol=1e-12, rtol=0)
        assert fake.calls == [((2, 96, 6), 2, None)]


# -- the official presets and schedules ------------------------------------------------------------------------
@pytest.mark.parametrize("layout,h,w,expected", [
    ("sd15", 128, 128, (0.4, 0.0, False)),  # 1024 px: 2x
    ("sd15", 256, 200, (0.4, 0.0, False)),  # one side below 2048 px: still the 2x preset
    ("sd15", 256, 256, (0.7, 0.3, False)),  # 2048 px: 4x
    ("sd15", 255, 400, (0.4, 0.0, False)),  # the last size below the limit
    ("sdxl", 511, 600, (0.4, 0.0, True)),
    ("sdxl", 256, 256, (0.4, 0.0, True)),  # 2048 px: 2x with the early stride-4 phase
    ("sdxl", 512, 384, (0.4, 0.0, True)),
    ("sdxl", 512, 512, (0.7, 0.3, False)),  # 4096 px: 4x, no early phase
])
def test_auto_preset_is_the_official_choice_from_the_latent_size(layout, h, w, expected):
    """The official code picks sd15_1024 / sd15_2048 and sdxl_2048 (aggressive) / sdxl_4096 from the latent's
    sides (SD1.x below 256, SDXL below 512 latent pixels on either side: the 2x preset)."""
    assert auto_preset(LAYOUTS[layout], h, w) == expected


@pytest.mark.parametrize("steps,stride_steps,pool_steps", [(50, range(0, 8), range(8, 20)),
                                                           (20, range(0, 3), range(3, 8)),
                                                           (56, range(0, 8), range(8, 22)),  # int(8.96) = 8
                                                           (30, range(0, 4), range(4, 12))])
def test_sdxl_2x_auto_runs_the_stride_first_then_pooling(steps, stride_steps, pool_steps):
    """SDXL at 2x ('auto'): the stride-4 down-sampler for steps < int(8/50 N), then 2x2 pooling up to int(0.4 N),
    never both at once; afterwards neither (the official 'aggressive' schedule)."""
    run, sigmas = _run(0.9, 0.9, steps=steps, layout="sdxl", preset="auto")  # t1 / t2 ignored by 'auto'
    run.configure(128, 128)
    assert [i for i in range(steps) if run.strided(sigmas[i])] == list(stride_steps)
    assert [i for i in range(steps) if run.pooled(sigmas[i])] == list(pool_steps)


def test_auto_at_4x_and_custom_keep_the_plain_switch_points():
    """SDXL at 4x ('auto'): pooling from the start to 0.7, stride to 0.3; 'custom' uses t1 / t2 and no early phase
    whatever the size."""
    run, sigmas = _run(0.4, 0.0, steps=20, layout="sdxl", preset="auto")
    run.configure(512, 512)
    assert [i for i in range(20) if run.pooled(sigmas[i])] == list(range(14))
    assert [i for i in range(20) if run.strided(sigmas[i])] == list(range(6))
    custom, _ = _run(0.4, 0.0, steps=20, layout="sdxl")
    custom.configure(128, 128)  # nothing to fix: already configured
    assert [i for i in range(20) if custom.pooled(sigmas[i])] == list(range(8))
    assert not any(custom.strided(sigmas[i]) for i in range(20))


def test_auto_preset_before_any_model_call_is_a_clear_error():
    run, sigmas = _run(0.4, 0.0, preset="auto")
    with pytest.raises(RuntimeError, match="preset 'custom'"):
        run.strided(sigmas[0])
    with pytest.raises(ValueError, match="preset"):
        _run(0.4, 0.0, preset="2x")


def test_diffusion_model_wrapper_fixes_the_auto_preset_from_the_latent():
    run, sigmas = _run(0.4, 0.0, steps=50, layout="sdxl", preset="auto")
    options = {rt.KEY: run, "sigmas": sigmas[0:1], "patches": {}}
    rt.diffusion_model(lambda x, *a, **k: x, torch.zeros(1, 4, 130, 170), "t", "ctx", "y", None, options)
    assert run.early_stride and run.strided(sigmas[0]) and not run.pooled(sigmas[0])


def test_each_window_layer_draws_its_own_shift_shared_by_the_steps_calls():
    """As the official code draws a shift per layer and step: layers differ, the same layer's calls in a step
    (cond and uncond) agree."""
    run, sigmas = _run(0.4, 0.0, seed=5, steps=20)
    layers = [layer_index(b) for b in LAYOUTS["sdxl"].window_blocks]
    assert len(set(layers)) == len(layers)
    per_step = [[run.shift(sigmas[i], 64, 64, layer) for layer in layers] for i in range(20)]
    assert any(len(set(row)) > 1 for row in per_step)  # layers do not all move together
    assert per_step == [[run.shift(sigmas[i], 64, 64, layer) for layer in layers] for i in range(20)]
    assert per_step[3][2] == window_shift(5, 3, 64, 64, layers[2])
