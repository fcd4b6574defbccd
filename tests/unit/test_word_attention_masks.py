"""Mask-from-words pieces of regional/word_attention.py checked against hand-derived values: token positions at
the prompt's end and chunk borders, min-max normalisation's guard, the similarity refinement's weights, the
Gaussian blur's kernel support and border reflection, bilinear upsampling, and the attention recorder's grids."""

import pytest
import torch

from preprint.regional.word_attention import (
    AttentionRecorder,
    WordError,
    find_positions,
    gaussian_blur,
    mask_from_map,
    mean_attention_probs,
    normalise,
    refine_by_similarity,
    trailing_positions,
)


def plain_attention(q, k, v, heads, **_):
    p = mean_attention_probs(q, k, heads)
    return p @ v  # any output will do: the recorder must hand it back untouched


# -- word positions ------------------------------------------------------------------------------------------------
def test_find_positions_matches_a_word_that_ends_the_prompt():
    ids = [None, 5, 7, 9, 7, 9]  # "7 9" twice, the second occurrence in the last two positions
    assert find_positions(ids, [7, 9], "w") == [2, 3, 4, 5]
    assert find_positions([None, 4], [4], "w") == [1]


def test_trailing_positions_stay_inside_the_last_words_chunk():
    chunk = 77
    one = [None, 3, 4] + [None] * (chunk - 3)
    assert trailing_positions(one, 0) == []
    assert trailing_positions(one, 1) == [3]  # the end token right after the last word
    assert trailing_positions(one, 2) == [3, 4]
    # an empty prompt: start token at 0, so the end token (1) and padding follow it
    assert trailing_positions([None] * chunk, 2) == [1, 2]
    # two chunks, words at 1..5: asking for more than the chunk holds stops at the chunk's end (77)
    two = [None] + [1] * 5 + [None] * (2 * chunk - 6)
    assert trailing_positions(two, 100) == list(range(6, chunk))
    # three chunks: the last word is the first word of chunk 3 (positions 154..230)
    three = [None] * (3 * chunk)
    three[155] = 8
    assert trailing_positions(three, 3) == [156, 157, 158]
    # the last word fills chunk 2's last word slot (152): only its end token (153) is left in that chunk
    full = [None] * (3 * chunk)
    full[152] = 8
    assert trailing_positions(full, 3) == [153]


# -- normalise -------------------------------------------------------------------------------------------------------
def test_normalise_min_max_and_tiny_spans_are_not_stretched():
    m = torch.tensor([[[2.0, 4.0, 3.0], [6.0, 2.0, 5.0]]])
    assert torch.allclose(normalise(m), (m - 2.0) / 4.0)
    assert torch.equal(normalise(torch.full((1, 2, 3), 7.0)), torch.zeros(1, 2, 3))
    # a span far below the 1e-12 guard is float noise: it is divided by the guard, not stretched to [0, 1]
    tiny = torch.tensor([[[0.0, 1e-14], [0.0, 0.0]]], dtype=torch.float64)
    assert torch.allclose(normalise(tiny), tiny / 1e-12, rtol=1e-9, atol=0)
    assert float(normalise(tiny).max()) < 0.2


# -- refine_by_similarity ----------------------------------------------------------------------------------------------
def _maps(*rows):
    """[1, T, 2, 3] maps from flattened rows (each already min 0, max 1, so normalise leaves it)."""
    return torch.tensor([list(r) for r in rows], dtype=torch.float32).view(1, len(rows), 2, 3)


def test_refine_weights_similar_tokens_by_their_cosine_similarity():
    start = [0, 0, 0, 0, 0, 0]
    a = [1, 0, 0, 0, 0, 0]  # the chosen word: the target itself, sim 1
    b = [0, 1, 0, 0, 0, 0]  # orthogonal: sim 0, below the mean
    c = [1, 1, 1, 1, 0, 0]  # cos = 1 / (1 * 2) = 0.5, above the mean (1 + 0 + 0.5 + 0) / 4
    d = [0, 0, 0, 0, 1, 0]  # sim 0
    maps = _maps(start, a, b, c, d)
    target = torch.tensor(a, dtype=torch.float32).view(1, 2, 3)
    out = refine_by_similarity(maps, target, [1, 2, 3, 4], [1], start_token=None)
    want = (torch.tensor(a) * 1.0 + torch.tensor(c) * 0.5) / 1.5
    want = (want - want.min()) / (want.max() - want.min())
    assert torch.allclose(out.flatten(), want.float(), atol=1e-6)  # [1, 1/3, 1/3, 1/3, 0, 0]


def test_refine_counts_a_token_whose_similarity_equals_the_mean():
    a = [1, 0, 0, 0, 0, 0]  # chosen, sim 1
    b = [0, 1, 0, 0, 0, 0]  # sim 0
    c = [1, 1, 1, 1, 0, 0]  # sim 0.5 = (1 + 0 + 0.5) / 3, exactly the mean
    maps = _maps([0] * 6, a, b, c)
    target = torch.tensor(a, dtype=torch.float32).view(1, 2, 3)
    out = refine_by_similarity(maps, target, [1, 2, 3], [1], start_token=None)
    want = torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3, 0.0, 0.0])
    assert torch.allclose(out.flatten(), want, atol=1e-6)


def test_refine_never_gives_an_anti_aligned_token_negative_weight():
    a = [0, 0, 1, 0, 0, 0]  # chosen: cos 0 with the signed target
    b = [1, 0, 1, 1, 1, 1]  # cos -1 / sqrt(10) = -0.32: above the mean (0 - 0.32 - 1 - 1) / 4, but negative
    c = [1, 1, 0, 0, 0, 0]  # cos -1
    maps = _maps([0] * 6, a, b, c, c)
    target = torch.tensor([-1.0, -1.0, 0.0, 0.0, 0.0, 0.0]).view(1, 2, 3)
    out = refine_by_similarity(maps, target, [1, 2, 3, 4], [1], start_token=None)
    assert torch.allclose(out.flatten(), torch.tensor(a, dtype=torch.float32))


def test_refine_is_a_weighted_mean_before_the_final_normalisation():
    # two chosen tokens (weight 1 each): the refined map is their mean, then min-max normalised with the 1e-12 guard;
    # their mean is nearly flat (span 5e-14), so the guard keeps it near 0 instead of stretching it
    a = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 0.5 - 1e-13], dtype=torch.float64)
    maps = torch.stack([torch.zeros(3, dtype=torch.float64), a, b]).view(1, 3, 1, 3)
    out = refine_by_similarity(maps, a.view(1, 1, 3), [1, 2], [1, 2], start_token=None)
    mean = (a + b) / 2
    want = (mean - mean.min()) / 1e-12
    assert torch.allclose(out.flatten(), want, rtol=1e-6, atol=0)
    assert float(out.max()) < 0.1


def test_refine_treats_each_batch_element_on_its_own():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(2, 5, 3, 4, generator=g)
    target = torch.rand(2, 3, 4, generator=g)
    out = refine_by_similarity(maps, target, [1, 2, 4], [2], start_token=0)
    assert out.shape == (2, 3, 4)
    for i in range(2):
        one = refine_by_similarity(maps[i:i + 1], target[i:i + 1], [1, 2, 4], [2], start_token=0)
        assert torch.allclose(out[i:i + 1], one, atol=1e-6)


# -- gaussian_blur ----------------------------------------------------------------------------------------------------
def _gauss(sigma, radius):
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def test_blur_of_an_impulse_is_the_sampled_gaussian_cut_at_three_sigma():
    x = torch.zeros(1, 31, 33)
    x[0, 14, 17] = 1.0
    out = gaussian_blur(x, 2.0)
    g = _gauss(2.0, 6)  # radius ceil(3 * 2) = 6
    want = torch.zeros(31, 33, dtype=torch.float64)
    want[14 - 6:14 + 7, 17 - 6:17 + 7] = torch.outer(g, g)
    assert out.shape == x.shape
    assert torch.allclose(out[0].double(), want, atol=1e-7)


def test_a_narrow_blur_has_a_three_tap_kernel():
    sigma = 0.33  # 3 sigma = 0.99: radius 1
    x = torch.zeros(1, 5, 7)
    x[0, 2, 3] = 1.0
    out = gaussian_blur(x, sigma)
    g = _gauss(sigma, 1)
    want = torch.zeros(5, 7, dtype=torch.float64)
    want[1:4, 2:5] = torch.outer(g, g)
    assert out.shape == x.shape
    assert torch.allclose(out[0].double(), want, atol=1e-7)
    assert torch.all(out[0][want == 0] == 0)  # nothing beyond the kernel's reach


def test_blur_reflects_at_the_borders_of_maps_narrower_than_the_kernel():
    x = torch.tensor([[[1.0, 4.0, 2.0]]])  # height 1, width 3; sigma 2 wants radius 6
    out = gaussian_blur(x, 2.0)
    # height 1: nothing to blur; width 3: reflection allows 2 pixels each side, the middle 5 taps renormalised
    g = _gauss(2.0, 6)[4:9]
    g = g / g.sum()
    p = [2.0, 4.0, 1.0, 4.0, 2.0, 4.0, 1.0]  # reflect-padded by 2
    want = torch.tensor([sum(g[j] * p[i + j] for j in range(5)) for i in range(3)], dtype=torch.float64)
    assert out.shape == (1, 1, 3)
    assert torch.allclose(out[0, 0].double(), want, atol=1e-6)


def test_a_very_wide_blur_of_a_half_precision_map_is_the_reflected_average():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 4, 5, generator=g)
    # sigma far above the map: the kernel is flat over the reflected window (2 (n - 1) + 1 pixels per axis)
    def box(v):
        n = len(v)
        p = list(reversed(v[1:])) + v + list(reversed(v[:-1]))
        return [sum(p[i:i + 2 * n - 1]) / (2 * n - 1) for i in range(n)]
    rows = [box(r) for r in x[0].tolist()]
    cols = [box(list(c)) for c in zip(*rows, strict=True)]
    want = torch.tensor(cols).T
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-2)):
        out = gaussian_blur(x.to(dtype), 3.0e4)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert torch.allclose(out[0].float(), want, atol=tol)


# -- mask_from_map ----------------------------------------------------------------------------------------------------
def test_mask_upsampling_is_bilinear_on_pixel_centres():
    soft = torch.tensor([[[0.0, 1.0]]])  # 1 x 2 -> 3 x 4: half-pixel centres sample 0, 0.25, 0.75, 1
    mask, smooth = mask_from_map(soft, 3, 4, blur=0.0, threshold=0.5)
    want = torch.tensor([0.0, 0.25, 0.75, 1.0]).expand(3, 4)
    assert torch.allclose(smooth[0], want, atol=1e-6)
    assert torch.equal(mask[0], (want >= 0.5).float())


def test_mask_from_map_keeps_the_batch_apart():
    g = torch.Generator().manual_seed(5)
    soft = torch.rand(2, 2, 3, generator=g)
    mask, smooth = mask_from_map(soft, 8, 12, blur=1.0, threshold=0.4)
    assert mask.shape == smooth.shape == (2, 8, 12)
    for i in range(2):
        m1, s1 = mask_from_map(soft[i:i + 1], 8, 12, blur=1.0, threshold=0.4)
        assert torch.allclose(smooth[i:i + 1], s1, atol=1e-6)


# -- the attention recorder -------------------------------------------------------------------------------------------
def _record(rec, h, w, latent, g, batch=1, cou=(0,), t=6, heads=2, d=4):
    q = torch.randn(batch, h * w, heads * d, generator=g)
    k = torch.randn(batch, t, heads * d, generator=g)
    rec.record(q, k, {"n_heads": heads, "activations_shape": [batch, 8, h, w],
                      "original_shape": [batch, 4, *latent], "cond_or_uncond": list(cou)})
    rows = mean_attention_probs(q, k, heads)  # [batch, L, T]
    return torch.stack([r.T.reshape(t, h, w) for r in rows])  # each token's map on the layer's grid


def test_recorder_default_reads_the_quarter_grid():
    g = torch.Generator().manual_seed(6)
    default, four = AttentionRecorder(plain_attention), AttentionRecorder(plain_attention, factor=4)
    for h, w in ((12, 20), (6, 10), (3, 5), (2, 3)):
        s = g.get_state()
        _record(default, h, w, (12, 20), g)
        g.set_state(s)
        want = _record(four, h, w, (12, 20), g)
        if (h, w) == (3, 5):
            quarter = want
    assert default.count == four.count == 1
    assert torch.allclose(default.maps(), quarter)


def test_recorder_grid_of_tall_and_odd_latents():
    g = torch.Generator().manual_seed(7)
    tall = AttentionRecorder(plain_attention, factor=4)
    want = _record(tall, 5, 3, (20, 12), g)  # latent 20 x 12: the quarter grid is 5 x 3
    assert tall.grid == (5, 3) and torch.allclose(tall.maps(), want)
    odd = AttentionRecorder(plain_attention, factor=4)
    _record(odd, 3, 4, (13, 18), g)  # not ceil(13 / 4) x ceil(18 / 4)
    with pytest.raises(WordError):
        odd.maps()
    want = _record(odd, 4, 5, (13, 18), g)  # the UNet's stride-2 levels round up: 13 x 18 -> 7 x 9 -> 4 x 5
    assert odd.count == 1 and odd.grid == (4, 5) and torch.allclose(odd.maps(), want)


def test_recorder_keeps_each_positive_row_apart():
    g = torch.Generator().manual_seed(8)
    rec = AttentionRecorder(plain_attention, factor=4)
    want = _record(rec, 3, 5, (12, 20), g, batch=2, cou=(0,))  # one positive chunk of two rows
    assert rec.maps().shape == (2, 6, 3, 5) and torch.allclose(rec.maps(), want)


def _blocks(m, fh, fw):
    """Mean of each fh x fw block."""
    r, t, h, w = m.shape
    return m.reshape(r, t, h // fh, fh, w // fw, fw).mean(dim=(3, 5))


def test_recorder_without_factor_pools_finer_grids_and_interpolates_coarser_ones():
    g = torch.Generator().manual_seed(9)
    latent = (12, 20)  # the quarter grid: 3 x 5
    rec = AttentionRecorder(plain_attention, factor=None)
    m = _record(rec, 3, 15, latent, g)  # finer along w only: 1 x 3 box means
    assert torch.allclose(rec.maps(), _blocks(m, 1, 3), atol=1e-6)
    rec = AttentionRecorder(plain_attention, factor=None)
    m = _record(rec, 9, 5, latent, g)  # finer along h only: 3 x 1 box means
    assert torch.allclose(rec.maps(), _blocks(m, 3, 1), atol=1e-6)
    rec = AttentionRecorder(plain_attention, factor=None)
    m = _record(rec, 9, 4, latent, g)  # coarser along w: bilinear on pixel centres
    rows = m[:, :, [1, 4, 7]]  # h 9 -> 3: centres at source rows 3y + 1
    c = [rows[..., i] for i in range(4)]
    # w 4 -> 5: sources (x + 0.5) * 0.8 - 0.5 = -0.1 (clamped to 0), 0.7, 1.5, 2.3, 3.1 (clamped to 3)
    want = torch.stack([c[0], 0.3 * c[0] + 0.7 * c[1], 0.5 * c[1] + 0.5 * c[2], 0.7 * c[2] + 0.3 * c[3], c[3]], -1)
    assert rec.maps().shape == (1, 6, 3, 5)
    assert torch.allclose(rec.maps(), want, atol=1e-5)
