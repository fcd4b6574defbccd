"""Token layouts of DiT attention for perturbed attention: every order and mask against the map written out."""

from __future__ import annotations

import pytest
import torch

from preprint.guidance.attention_perturbation import Perturbation, blur_tokens
from preprint.guidance.pag_tokens import TokenLayout, _reorder, _restore, perturb_layout

B, H, D = 3, 2, 8
ROWS = [1, 2]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def qkv(length, seed=0):
    return rand(B, H, length, D, seed=seed), rand(B, H, length, D, seed=seed + 1), rand(B, H, length, D, seed=seed + 2)


def plain(q, k, v, mask=None):
    logits = q @ k.transpose(-1, -2) * D ** -0.5
    return torch.softmax(logits if mask is None else logits + mask, -1) @ v


def explicit_identity(q, k, v, image, mask=None):
    """An image query sees all non-image keys and its own key (plus ``mask``); other queries see everything."""
    length = q.shape[-2]
    block = torch.zeros(length, length)
    idx = torch.tensor(list(image))
    if len(idx):
        block[idx[:, None], idx[None, :]] = float("-inf")
        block[idx, idx] = 0.0
    return plain(q, k, v, block if mask is None else block + mask)


def seg_q(q, start, grid, frames, sigma):
    q = q.clone()
    n = grid[0] * grid[1]
    for f in range(frames):
        s = start + f * n
        q[:, :, s:s + n] = blur_tokens(q[:, :, s:s + n], grid, sigma)
    return q


@pytest.mark.parametrize("layout", [TokenLayout((5, 17), (3, 4)), TokenLayout((0, 12), (3, 4)),
                                    TokenLayout((2, 20), (2, 3), frames=2, refs_first=True),
                                    TokenLayout((2, 20), (2, 3), frames=2), TokenLayout((0, 22))])
def test_reorder_puts_text_then_grid_then_other_image_tokens_and_restores(layout):
    length = 22
    seq = torch.arange(length).view(1, 1, length, 1).float()
    pieces = layout.pieces(length)
    order = _reorder(seq, pieces, 2).flatten().long().tolist()
    a, b = layout.image
    n_grid = min(layout.grid_tokens(), b - a)
    grid = list(range(b - n_grid, b)) if layout.refs_first else list(range(a, a + n_grid))
    text = [i for i in range(length) if not a <= i < b]
    assert order[:len(text)] == text and order[len(text):len(text) + n_grid] == grid
    assert sorted(order) == list(range(length))
    assert torch.equal(_restore(_reorder(seq, pieces, 2), pieces, 2), seq)


def test_image_before_text_identity_matches_the_written_out_map():
    q, k, v = qkv(20)
    base = plain(q, k, v)
    layout = TokenLayout((0, 12), (3, 4))  # HunyuanVideo: [image | text]
    out = perturb_layout(base, q, k, v, ROWS, Perturbation(), layout)
    torch.testing.assert_close(out[ROWS], explicit_identity(q, k, v, range(12))[ROWS])
    assert torch.equal(out[0], base[0])


def test_seg_blurs_the_grid_behind_leading_reference_tokens_frame_by_frame():
    q, k, v = qkv(24)
    base = plain(q, k, v)
    layout = TokenLayout((4, 24), (2, 4), frames=2, refs_first=True)  # text 4, refs 4, grid 2 x (2 x 4)
    out = perturb_layout(base, q, k, v, ROWS, Perturbation("smoothed_energy", blur_sigma=1.0), layout)
    want = plain(seg_q(q, 8, (2, 4), 2, 1.0), k, v)
    torch.testing.assert_close(out[ROWS], want[ROWS])
    # blurring the frames as one tall grid is a different answer
    assert not torch.allclose(out[ROWS], plain(seg_q(q, 8, (4, 4), 1, 1.0), k, v)[ROWS], atol=1e-4)


@pytest.mark.parametrize("kind", ["key", "bool", "full"])
def test_masked_identity_keeps_the_mask_on_the_logits_it_keeps(kind):
    length, image = 14, list(range(6, 14))  # [text 6 | image 8]
    q, k, v = qkv(length, seed=3)
    keep = torch.ones(B, length, dtype=torch.bool)
    keep[0, 4:6] = keep[1, 5] = keep[2, 3:6] = False  # padded text tokens
    additive = torch.zeros(B, 1, 1, length).masked_fill(~keep.view(B, 1, 1, length), float("-inf"))
    if kind == "key":
        mask = additive
    elif kind == "bool":
        mask = keep.view(B, 1, length)  # 3-D, as ComfyUI's attention promotes it
    else:
        mask = additive.expand(B, 1, length, length) + rand(1, 1, length, length, seed=9)
    full = additive if kind != "full" else mask
    base = plain(q, k, v, full)
    out = perturb_layout(base, q, k, v, ROWS, Perturbation(), TokenLayout((6, 14), (2, 4)), mask)
    torch.testing.assert_close(out[ROWS], explicit_identity(q, k, v, image, full)[ROWS])
    assert torch.equal(out[0], base[0])
    assert not torch.allclose(out[ROWS], explicit_identity(q, k, v, image)[ROWS], atol=1e-4)  # the mask mattered


def test_masked_seg_and_softpag_heads():
    length = 14
    q, k, v = qkv(length, seed=5)
    mask = torch.zeros(1, 1, 1, length)
    mask[..., 2] = float("-inf")
    base = plain(q, k, v, mask)
    layout = TokenLayout((0, 8), (2, 4))  # image first, text after
    out = perturb_layout(base, q, k, v, ROWS, Perturbation("smoothed_energy", blur_sigma=1.0), layout, mask)
    torch.testing.assert_close(out[ROWS], plain(seg_q(q, 0, (2, 4), 1, 1.0), k, v, mask)[ROWS])
    soft = Perturbation(strength=0.5, heads=(1,))
    out = perturb_layout(base, q, k, v, ROWS, soft, layout, mask)
    assert torch.equal(out[:, 0], base[:, 0])  # head 0 not selected: bit for bit
    want = base[ROWS, 1] + 0.5 * (explicit_identity(q, k, v, range(8), mask)[ROWS, 1] - base[ROWS, 1])
    torch.testing.assert_close(out[ROWS, 1], want)


def test_layout_outside_the_sequence_is_an_error():
    q, k, v = qkv(10)
    with pytest.raises(ValueError, match=r"image tokens \[4, 12\) do not lie in a sequence of 10 tokens"):
        perturb_layout(q, q, k, v, ROWS, Perturbation(), TokenLayout((4, 12)))


def test_attention_masks_are_promoted_as_comfyuis_pytorch_attention_does():
    """2-D ``(Lq, Lk)`` -> ``(1, 1, Lq, Lk)``, 3-D ``(B, Lq, Lk)`` -> ``(B, 1, Lq, Lk)``, 4-D kept; booleans (True =
    attend) become 0 / -inf logits."""
    from preprint.guidance.pag_tokens import additive_mask

    two = torch.arange(6.0).reshape(2, 3)
    assert additive_mask(two, torch.float32).shape == (1, 1, 2, 3)
    assert torch.equal(additive_mask(two, torch.float32)[0, 0], two)
    three = torch.arange(12.0).reshape(2, 2, 3)
    assert additive_mask(three, torch.float32).shape == (2, 1, 2, 3)
    assert torch.equal(additive_mask(three, torch.float32)[1, 0], three[1])
    assert additive_mask(torch.zeros(2, 4, 2, 3), torch.float16).dtype == torch.float16
    keep = torch.tensor([[True, False, True]])
    assert additive_mask(keep, torch.float32)[0, 0, 0].tolist() == [0.0, float("-inf"), 0.0]
