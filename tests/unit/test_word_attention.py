"""Word attention maths: token positions of chosen words, cross-attention probabilities against a hand computation,
the mask refinement / blur / threshold of masks from words (InstDiffEdit), and Directed Diffusion's edit and its
attn2 replacement driven with a plain attention function."""

from __future__ import annotations

import math

import pytest
import torch

from preprint.regional.word_attention import (
    AttentionRecorder,
    Box,
    DirectedAttention,
    Placement,
    WordError,
    attention_probs,
    box_of_mask,
    box_on_grid,
    directed_probs,
    find_positions,
    gaussian_blur,
    mask_from_map,
    mean_attention_probs,
    normalise,
    parse_words,
    refine_by_similarity,
    trailing_positions,
    word_map,
)
from preprint.utils.sigma_window import SigmaWindow


def plain_attention(q, k, v, heads, attn_precision=None, transformer_options=None):
    b, n, width = q.shape
    d = width // heads
    qh, kh, vh = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1) @ vh
    return out.transpose(1, 2).reshape(b, n, width)


# -- words -----------------------------------------------------------------------------------------------------------
def test_words_are_split_on_commas_lower_cased_and_deduplicated():
    assert parse_words(" Cat ,red   HAT,, cat ") == ["cat", "red hat"]
    with pytest.raises(WordError, match="no words given"):
        parse_words(" , ,")


# a prompt "<sot> a red cat sits by a cat tree <eot> <pad>..." with made-up ids; None = start, end, padding
PROMPT = [None, 1, 2, 3, 4, 5, 1, 3, 6, None, None, None]


def test_positions_of_single_multi_token_and_repeated_words():
    assert find_positions(PROMPT, [2], "red") == [2]
    assert find_positions(PROMPT, [3], "cat") == [3, 7]  # every occurrence
    assert find_positions(PROMPT, [3, 6], "cat tree") == [7, 8]  # a word of two tokens, only where both follow
    assert find_positions(PROMPT, [1, 2, 3], "a red cat") == [1, 2, 3]


def test_a_word_not_in_the_prompt_is_named_and_specials_never_match():
    with pytest.raises(WordError, match='"dog" is not in the prompt'):
        find_positions(PROMPT, [9], "dog")
    with pytest.raises(WordError, match='"tree cat"'):
        find_positions(PROMPT, [6, 3], "tree cat")  # tokens present, not in that order
    with pytest.raises(WordError, match="no text tokens"):
        find_positions(PROMPT, [], ",")
    # a word whose sequence would straddle the end token and the next chunk's start does not match
    two_chunks = [None, 7, None] + [None] * 74 + [None, 8, None]
    with pytest.raises(WordError):
        find_positions(two_chunks, [7, 8], "x")


def test_trailing_positions_follow_the_last_word_within_its_chunk():
    ids = [None, 1, 2, 3] + [None] * 73
    assert trailing_positions(ids, 3) == [4, 5, 6]
    assert trailing_positions(ids, 0) == []
    assert trailing_positions(ids, 200) == list(range(4, 77))  # clipped at the chunk's end
    long = [None] + [5] * 75 + [None] + [None, 5, 5] + [None] * 74  # the last word sits in the second chunk
    assert trailing_positions(long, 2) == [80, 81]


# -- attention probabilities ---------------------------------------------------------------------------------------
def test_attention_probabilities_match_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    heads, d = 3, 4
    q = torch.randn(2, 5, heads * d, generator=g)
    k = torch.randn(2, 7, heads * d, generator=g)
    got = attention_probs(q, k, heads)
    assert got.shape == (2, heads, 5, 7)
    for b in range(2):
        for h in range(heads):
            for i in range(5):
                logits = [sum(float(q[b, i, h * d + c] * k[b, j, h * d + c]) for c in range(d)) / math.sqrt(d)
                          for j in range(7)]
                top = max(logits)
                e = [math.exp(x - top) for x in logits]
                want = torch.tensor([x / sum(e) for x in e])
                assert torch.allclose(got[b, h, i], want, atol=1e-6)
    mean = mean_attention_probs(q, k, heads)
    assert torch.allclose(mean, got.mean(dim=1)) and torch.allclose(mean.sum(-1), torch.ones(2, 5))


# -- masks from words ----------------------------------------------------------------------------------------------
def test_normalise_spans_zero_to_one_and_a_constant_map_is_zero():
    x = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]])
    n = normalise(x)
    assert float(n[0].min()) == 0.0 and float(n[0].max()) == 1.0 and torch.equal(n[1], torch.zeros(2, 2))


def _maps(t: int = 6, h: int = 8, w: int = 8) -> torch.Tensor:
    """Token maps [1, T, h, w]: 0 start (background: right half), 1 the word (left-top block), 2 a word attending
    the same block, 3 a word attending the right half, 4 and 5 noise."""
    g = torch.Generator().manual_seed(1)
    m = 0.05 * torch.rand(1, t, h, w, generator=g)
    m[0, 0, :, w // 2:] += 1.0
    m[0, 1, : h // 2, : w // 2] += 1.0
    m[0, 2, : h // 2, : w // 2] += 0.8
    m[0, 3, :, w // 2:] += 1.0
    return m


def test_word_map_averages_a_words_tokens_and_unites_several_words():
    m = torch.zeros(1, 4, 2, 2)
    m[0, 1, 0, 0], m[0, 2, 0, 1], m[0, 3, 1, 1] = 1.0, 1.0, 1.0
    one = word_map(m, [[1, 2]])  # a word of two tokens: the mean of their maps
    assert torch.allclose(one[0], torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    both = word_map(m, [[1], [3]])  # two words: the union
    assert torch.allclose(both[0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_refinement_keeps_the_similar_tokens_and_drops_the_background():
    maps = _maps()
    target = word_map(maps, [[1]])
    refined = refine_by_similarity(maps, target, prompt_tokens=[1, 2, 3, 4, 5], chosen=[1])
    assert refined.shape == (1, 8, 8) and float(refined.min()) == 0.0 and float(refined.max()) == 1.0
    inside, outside = refined[0, :4, :4].mean(), refined[0, :, 4:].mean()
    assert inside > 0.8 and outside < 0.05
    # the token attending the right half is not mixed in: forcing it in (as "chosen") lifts the right half
    forced = refine_by_similarity(maps, target, prompt_tokens=[1, 2, 3, 4, 5], chosen=[1, 3], start_token=None)
    assert forced[0, :, 4:].mean() > 0.3
    # without the start token the similarity selection alone keeps the right half out: averaging every token
    # would give it a fifth of token 3's map
    no_start = refine_by_similarity(maps, target, prompt_tokens=[1, 2, 3, 4, 5], chosen=[1], start_token=None)
    assert float(no_start[0, :, 4:].mean()) < 0.1 and float(no_start[0, :4, :4].mean()) > 0.8


def test_the_start_tokens_map_damps_the_background():
    """A token attending the word's block and the background resembles the word more than the prompt's mean, so it
    is kept; the start token's inverted map (low on the right half, where it looks) takes that half back out."""
    maps = _maps()
    maps[0, 4, :4, :4] += 1.0
    maps[0, 4, :, 4:] += 1.0
    target = word_map(maps, [[1]])
    kept = refine_by_similarity(maps, target, prompt_tokens=[1, 3, 4], chosen=[1], start_token=None)
    damped = refine_by_similarity(maps, target, prompt_tokens=[1, 3, 4], chosen=[1], start_token=0)
    assert float(kept[0, :, 4:].mean()) > 0.2 and float(damped[0, :, 4:].mean()) < 0.05


def test_blur_keeps_constants_and_mass_and_zero_is_no_blur():
    x = torch.zeros(1, 21, 17)
    x[0, 10, 8] = 1.0
    assert torch.equal(gaussian_blur(x, 0.0), x)
    y = gaussian_blur(x, 2.0)
    assert abs(float(y.sum()) - 1.0) < 1e-5 and float(y.max()) < 0.1 and float(y[0, 10, 8]) == float(y.max())
    c = torch.full((2, 5, 9), 0.3)
    assert torch.allclose(gaussian_blur(c, 3.0), c)  # radius larger than the map: reflection still works


def test_mask_from_map_is_binary_at_pixel_size_and_monotone_in_the_threshold():
    soft = normalise(_maps()[:, 1])
    masks = [mask_from_map(soft, 40, 56, blur=2.0, threshold=t)[0] for t in (0.0, 0.2, 0.5, 0.9)]
    assert masks[0].shape == (1, 40, 56) and torch.equal(masks[0], torch.ones(1, 40, 56))
    for m in masks:
        assert set(m.unique().tolist()) <= {0.0, 1.0}
    for lo, hi in zip(masks, masks[1:], strict=False):
        assert bool((hi <= lo).all())  # a higher threshold gives a subset
    assert masks[1][0, :20, :28].mean() > 0.9 and masks[1][0, :, 36:].mean() < 0.05


class _Recorded:
    def __init__(self):
        self.calls = 0


def test_recorder_reads_the_quarter_grid_layers_on_positive_rows_and_leaves_the_output():
    g = torch.Generator().manual_seed(2)
    rec = AttentionRecorder(plain_attention, factor=4)
    heads, d, t = 2, 4, 6
    seen = _Recorded()

    def prev(q, k, v, extra):
        seen.calls += 1
        return plain_attention(q, k, v, heads)

    layer = rec.layer(prev)
    for h, w in ((12, 20), (6, 10), (3, 5)):  # a latent of 12 x 20: factors 1, 2, 4
        q = torch.randn(2, h * w, heads * d, generator=g)
        k = torch.randn(2, t, heads * d, generator=g)
        v = torch.randn(2, t, heads * d, generator=g)
        opts = {"n_heads": heads, "activations_shape": [2, 8, h, w], "original_shape": [2, 4, 12, 20],
                "cond_or_uncond": [1, 0]}  # negative first, positive second
        out = layer(q, k, v, opts)
        assert torch.equal(out, plain_attention(q, k, v, heads))
        if (h, w) == (3, 5):
            want = mean_attention_probs(q[1:], k[1:], heads).transpose(1, 2).reshape(1, t, 3, 5)
    assert seen.calls == 3 and rec.count == 1 and torch.allclose(rec.maps(), want)
    every = AttentionRecorder(plain_attention, factor=None)
    for h, w in ((12, 20), (3, 5)):
        every.record(torch.randn(1, h * w, 8, generator=g), torch.randn(1, t, 8, generator=g),
                     {"n_heads": 2, "activations_shape": [1, 8, h, w], "original_shape": [1, 4, 12, 20],
                      "cond_or_uncond": [0]})
    assert every.count == 2 and every.maps().shape == (1, t, 3, 5)
    with pytest.raises(WordError, match="1/4-resolution"):
        AttentionRecorder(plain_attention).maps()


# -- Directed Diffusion -----------------------------------------------------------------------------------------------
def test_box_coverage_is_exact_and_the_bump_peaks_at_its_centre():
    inside, bump = box_on_grid(Box(0.25, 0.5, 0.5, 0.5), 4, 8)
    grid = inside.view(4, 8)
    want = torch.zeros(4, 8)
    want[2:, 2:6] = 1.0
    assert torch.equal(grid, want)
    b = bump.view(4, 8)
    assert float(b[~want.bool()].abs().max()) == 0.0 and float(b.max()) <= 1.0
    assert b[2, 3] == b.max() and b[2, 3] > b[2, 2] and b[2, 3] == b[3, 4]  # symmetric about the box centre
    half, _ = box_on_grid(Box(0.0, 0.0, 0.125, 1.0), 1, 4)  # half of the first cell
    assert torch.allclose(half, torch.tensor([0.5, 0.0, 0.0, 0.0]))
    with pytest.raises(WordError, match="empty or outside"):
        Box(1.0, 0.0, 0.5, 0.5)
    m = torch.zeros(10, 20)
    m[2:6, 5:15] = 1.0
    assert box_of_mask(m) == Box(0.25, 0.2, 0.5, 0.4)
    with pytest.raises(WordError, match="mask is empty"):
        box_of_mask(torch.zeros(4, 4))


def _probs(seed: int = 3, heads: int = 2, n: int = 16, t: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(1, heads, n, t, generator=g), dim=-1)


def test_the_bump_raises_the_words_inside_lowers_them_outside_and_leaves_other_tokens():
    probs = _probs()
    inside, bump = box_on_grid(Box(0.0, 0.0, 0.5, 0.5), 4, 4)
    cols = [2, 4]
    edited = directed_probs(probs, cols, inside, bump, strength=0.5)
    others = [0, 1, 3, 5]
    assert torch.equal(edited[..., others], probs[..., others])
    inn, out = inside.bool(), ~inside.bool()
    assert bool((edited[..., inn, :][..., cols] > probs[..., inn, :][..., cols]).all())
    assert torch.allclose(edited[..., out, :][..., cols], 0.5 * probs[..., out, :][..., cols])
    assert torch.equal(directed_probs(probs, cols, inside, bump, 0.0), probs)
    full = directed_probs(probs, cols, inside, bump, 1.0)
    assert float(full[..., out, :][..., cols].abs().max()) == 0.0  # strength 1: gone outside
    peak = probs[..., cols].amax(dim=-2)
    centre = int(bump.argmax())
    assert torch.allclose(full[..., centre, :][..., cols], probs[..., centre, :][..., cols] + peak * bump[centre])


def _layer_inputs(seed=4, batch=2, heads=2, d=4, h=4, w=4, t=6):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, h * w, heads * d, generator=g)
    k = torch.randn(batch, t, heads * d, generator=g)
    v = torch.randn(batch, t, heads * d, generator=g)
    return q, k, v


def _opts(sigma: float, cou=(0, 1), h=4, w=4, heads=2):
    return {"n_heads": heads, "activations_shape": [2, 8, h, w], "cond_or_uncond": list(cou),
            "sigmas": torch.tensor([sigma])}


def test_directed_attention_edits_only_positive_rows_inside_its_window_and_equals_the_edited_product():
    q, k, v = _layer_inputs()
    place = Placement(Box(0.5, 0.0, 0.5, 1.0))
    cols = [1, 3]
    layer = DirectedAttention(plain_attention, cols, place, 1.0, SigmaWindow(10.0, 5.0))
    plain = plain_attention(q, k, v, 2)
    assert torch.equal(layer(q, k, v, _opts(4.0)), plain)  # below the window
    assert torch.equal(layer(q, k, v, _opts(11.0)), plain)  # above it
    out = layer(q, k, v, _opts(7.0))  # inside: row 0 positive, row 1 negative
    assert torch.equal(out[1], plain[1])
    inside, bump = place(4, 4, q.device)
    edited = directed_probs(attention_probs(q[:1], k[:1], 2), cols, inside, bump, 1.0)
    vh = v[:1].view(1, 6, 2, 4).transpose(1, 2)
    want = (edited @ vh).transpose(1, 2).reshape(1, 16, 8)
    assert torch.allclose(out[0], want[0], atol=1e-5) and not torch.allclose(out[0], plain[0], atol=1e-3)
    assert torch.equal(DirectedAttention(plain_attention, cols, place, 0.0, SigmaWindow())(q, k, v, _opts(7.0)),
                       plain)
    swapped = layer(q, k, v, _opts(7.0, cou=(1, 0)))  # the positive row is now row 1
    assert torch.equal(swapped[0], plain[0]) and not torch.equal(swapped[1], plain[1])


def test_directed_attention_adds_its_change_on_top_of_the_previous_replacement():
    q, k, v = _layer_inputs()
    place = Placement(Box(0.0, 0.0, 0.5, 0.5))

    def previous(q, k, v, extra):
        return plain_attention(q, k, v, extra["n_heads"]) * 2.0 + 1.0  # any other patch

    alone = DirectedAttention(plain_attention, [2], place, 1.0, SigmaWindow())(q, k, v, _opts(7.0))
    stacked = DirectedAttention(plain_attention, [2], place, 1.0, SigmaWindow(), previous)(q, k, v, _opts(7.0))
    plain = plain_attention(q, k, v, 2)
    assert torch.allclose(stacked - previous(q, k, v, {"n_heads": 2}), alone - plain, atol=1e-5)
    with pytest.raises(WordError, match="token 10 but the positive prompt has 6"):
        DirectedAttention(plain_attention, [9], place, 1.0, SigmaWindow())(q, k, v, _opts(7.0))


def test_a_mask_placement_uses_its_coverage_and_a_bump_over_its_bounding_box():
    m = torch.zeros(1, 16, 16)
    m[0, :8, :8] = 1.0
    inside, bump = Placement(mask=m)(4, 4, torch.device("cpu"))
    box_inside, box_bump = box_on_grid(Box(0.0, 0.0, 0.5, 0.5), 4, 4)
    assert torch.equal(inside, box_inside) and torch.allclose(bump, box_bump)
    with pytest.raises(WordError, match="either a box or a mask"):
        Placement()


def test_directed_attention_under_tiles_gives_each_tile_its_part_of_the_placement():
    """In a call of two side-by-side tiles (one positive and one negative row each), each tile's positive row is
    the edit with the placement on the whole 4 x 8 latent cropped to that tile and resampled to its 4 x 4 grid."""
    import torch.nn.functional as F

    from preprint.highres.tiling import Tile

    q, k, v = _layer_inputs(batch=4)
    place = Placement(Box(0.25, 0.0, 0.5, 1.0))  # straddles the two tiles
    layer = DirectedAttention(plain_attention, [1, 3], place, 0.7, SigmaWindow())
    tiles = [Tile(0, 0, 4, 4), Tile(0, 4, 4, 4)]
    opts = {**_opts(7.0, cou=(0, 1, 0, 1)), "activations_shape": [4, 8, 4, 4], "preprint_tiles": (tiles, 4, 8)}
    out = layer(q, k, v, opts)
    inside, bump = place(4, 8, q.device)
    for row, t in ((0, tiles[0]), (2, tiles[1])):
        crops = [F.adaptive_avg_pool2d(m.view(1, 4, 8)[..., t.y:t.y + t.h, t.x:t.x + t.w], (4, 4)).reshape(-1)
                 for m in (inside, bump)]
        alone = DirectedAttention(plain_attention, [1, 3], lambda h, w, d, c=crops: tuple(c), 0.7, SigmaWindow())
        want = alone(q[row:row + 2], k[row:row + 2], v[row:row + 2], _opts(7.0))
        assert torch.allclose(out[row], want[0], atol=1e-6, rtol=0)
    squeezed = layer(q, k, v, {k_: v_ for k_, v_ in opts.items() if k_ != "preprint_tiles"})
    assert not torch.allclose(squeezed[2], out[2], atol=1e-3)  # the whole frame's placement squeezed is another edit
    assert torch.equal(out[1], plain_attention(q, k, v, 2)[1])  # negative rows untouched
