"""Attention entropy scaling (pure torch): the paper's sqrt(log T / log N), the key counts, and the attention
override and latent recorder that apply it (driven with plain attention functions and options dicts)."""

from __future__ import annotations

import math

import pytest
import torch

from preprint.highres.entropy import (
    LATENT_KEY,
    EntropyOverride,
    RecordLatentSize,
    entropy_factor,
    keys_at_training_size,
)


def test_factor_is_the_papers_and_one_at_the_training_size():
    assert entropy_factor(4096, 4096) == 1.0
    assert entropy_factor(16384, 4096) == pytest.approx(math.sqrt(math.log(16384) / math.log(4096)))
    assert entropy_factor(1024, 4096) < 1.0
    assert entropy_factor(1, 4096) == 1.0 and entropy_factor(4096, 1) == 1.0


def test_scaled_logits_keep_the_training_entropy_of_uniform_keys():
    """The motivation, checked: for random keys the mean row entropy at 4x the tokens, with the factor,
    is closer to the training-size entropy than without."""
    g = torch.Generator().manual_seed(0)
    d = 16

    def mean_entropy(n, factor=1.0):
        q, k = torch.randn(64, d, generator=g) * 2, torch.randn(n, d, generator=g) * 2
        p = torch.softmax(factor * q @ k.T / d ** 0.5, dim=-1)
        return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())

    train = mean_entropy(256)
    plain, scaled = mean_entropy(1024), mean_entropy(1024, entropy_factor(1024, 256))
    assert abs(scaled - train) < abs(plain - train)


def test_keys_at_training_size_scale_image_tokens_and_keep_text_tokens():
    assert keys_at_training_size(192, 192, 64) == 64  # UNet top level, 3x the area
    assert keys_at_training_size(48, 192, 64) == 16  # a level 2x down: same ratio
    assert keys_at_training_size(512 + 4096, 4096, 1024) == 512 + 1024  # joint attention: text kept
    with pytest.raises(ValueError):
        keys_at_training_size(10, 0, 64)


def test_two_keys_are_the_smallest_count_with_an_entropy():
    """log 2 > 0: two keys now or at the training size get the paper's factor; one key has no entropy."""
    assert entropy_factor(2, 4096) == pytest.approx(math.sqrt(math.log(2) / math.log(4096)), rel=1e-12)
    assert entropy_factor(4096, 2) == pytest.approx(math.sqrt(math.log(4096) / math.log(2)), rel=1e-12)
    assert entropy_factor(3, 2) == pytest.approx(math.sqrt(math.log(3) / math.log(2)), rel=1e-12)
    assert entropy_factor(1, 2) == 1.0 and entropy_factor(2, 1) == 1.0 and entropy_factor(0, 64) == 1.0


def test_a_single_image_token_is_a_valid_layer():
    assert keys_at_training_size(1, 1, 64) == 64  # the deepest level of a tiny latent: 1 token now, 64x the area
    assert keys_at_training_size(8 + 1, 1, 4) == 8 + 4  # with 8 text tokens in joint attention


def test_a_layer_keeps_at_least_one_image_key_at_the_training_size():
    """An image share that rounds to 0 keys at the (smaller) training size still counts one key."""
    assert keys_at_training_size(1, 4096, 1024) == 1  # 1 * 1024 / 4096 = 0.25 keys
    assert keys_at_training_size(2, 4096, 1024) == 1  # 0.5 rounds to even, 0: floored at 1
    assert keys_at_training_size(3, 4096, 1024) == 1  # 0.75 rounds to 1


# ---------------------------------------------------------------------------------------------- the hooks

def _record():
    calls = []

    def attention(*args, **kwargs):
        calls.append((args, kwargs))
        return args[0]

    return attention, calls


def test_record_latent_size_hands_the_latent_height_and_width_to_the_model():
    seen = []

    def executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        seen.append((x, t, c_concat, c_crossattn, control, transformer_options, kwargs))
        return "out"

    x, t = torch.zeros(2, 4, 13, 7), torch.tensor([1.0, 1.0])
    options = {"sigmas": t, "other": 1}
    assert RecordLatentSize()(executor, x, t, "concat", "cross", "ctrl", options, extra=5) == "out"
    got = seen[0]
    assert got[:5] == (x, t, "concat", "cross", "ctrl") and got[6] == {"extra": 5}
    assert got[5] == {"sigmas": t, "other": 1, LATENT_KEY: (13, 7)}
    assert LATENT_KEY not in options  # the caller's options are left as they were
    assert type(got[5][LATENT_KEY][0]) is int
    RecordLatentSize()(executor, torch.zeros(1, 16, 5, 9, 11), t)  # a video latent: frames, height and width
    assert seen[1][5] == {LATENT_KEY: (5, 9, 11)}


def test_video_frames_come_from_the_latent_so_long_joint_text_counts_as_text():
    """HunyuanVideo 1.5 joins glyph and vision tokens to its text, which can outnumber one frame's tokens: with the
    latent's frames recorded (5 frames, temporal patch 1, 4 x 6 tokens a frame) the 150 text tokens stay text and
    the 120 image tokens scale with the area; a text-only refiner (100 keys, fewer than the video's 120 image
    tokens) keeps its scale. Without recorded frames, 150 + 120 keys read as 11 frames (the older count)."""
    attention, calls = _record()
    override = EntropyOverride((4, 6), (1, 2, 2), dit=True)  # trained at 2 x 3 tokens a frame
    q = torch.randn(1, 2, 150 + 120, 8)
    to = {LATENT_KEY: (5, 8, 12)}
    override(attention, q, q.clone(), q.clone(), 2, skip_reshape=True, transformer_options=to)
    want = math.sqrt(math.log(270) / math.log(150 + 5 * 6))
    assert torch.allclose(calls[0][0][0], q * want, rtol=1e-6, atol=0)
    text = torch.randn(1, 2, 100, 8)
    override(attention, text, text.clone(), text.clone(), 2, skip_reshape=True, transformer_options=to)
    assert calls[1][0][0] is text  # fewer keys than the video's image tokens: the text refiner, unscaled
    frame = torch.randn(1, 2, 24, 8)  # attention within one frame (a per-frame spatial layer): one frame's area
    override(attention, frame, frame.clone(), frame.clone(), 2, skip_reshape=True, transformer_options=to)
    assert torch.allclose(calls[2][0][0], frame * math.sqrt(math.log(24) / math.log(6)), rtol=1e-6, atol=0)
    override(attention, q, q.clone(), q.clone(), 2, skip_reshape=True, transformer_options={LATENT_KEY: (8, 12)})
    frames = 270 // 24
    legacy = math.sqrt(math.log(270) / math.log(270 - frames * 24 + frames * 6))
    assert torch.allclose(calls[3][0][0], q * legacy, rtol=1e-6, atol=0)


@pytest.mark.parametrize("patch,latent,train,image_now,image_train", [
    (1, (16, 12), (8, 8), 192, 64),  # a UNet: one token per latent pixel
    (2, (17, 11), (7, 8), 9 * 6, 16),  # Flux: 2x2 patches, odd sides rounded up (now and at the training size)
])
def test_override_scales_self_attention_queries_by_the_papers_factor(patch, latent, train, image_now, image_train):
    attention, calls = _record()
    override = EntropyOverride(train, patch)
    q, k, v = (torch.randn(2, image_now, 8) for _ in range(3))
    options = {LATENT_KEY: latent}
    override(attention, q, k, v, 4, transformer_options=options, mask=None)
    args, kwargs = calls[0]
    factor = math.sqrt(math.log(image_now) / math.log(image_train))
    assert torch.allclose(args[0], q * factor, rtol=1e-6, atol=0)
    assert args[1] is k and args[2] is v and args[3] == 4
    assert kwargs == {"transformer_options": options, "mask": None}
    override(attention, q, k, v, heads=4, transformer_options=options)  # q, k, v alone are enough
    assert torch.allclose(calls[1][0][0], q * factor, rtol=1e-6, atol=0) and calls[1][1]["heads"] == 4


def test_override_counts_text_tokens_in_joint_attention_on_the_token_axis_of_skip_reshape():
    """Flux hands ``[B, heads, text + image, d]`` with skip_reshape: T = 8 + 48 keys now, N = 8 + 16."""
    attention, calls = _record()
    override = EntropyOverride((8, 8), 2)
    q = torch.randn(1, 4, 8 + 48, 16)
    override(attention, q, q.clone(), q.clone(), 4, skip_reshape=True, transformer_options={LATENT_KEY: (16, 12)})
    want = math.sqrt(math.log(56) / math.log(24))
    assert torch.allclose(calls[0][0][0], q * want, rtol=1e-6, atol=0)
    assert calls[0][1]["skip_reshape"] is True


def test_override_leaves_cross_attention_other_calls_and_the_training_size_alone():
    override = EntropyOverride((8, 8), 1)
    q = torch.randn(2, 192, 8)
    text = torch.randn(2, 77, 8)
    cases = [
        ((q, text, text, 4), {"transformer_options": {LATENT_KEY: (16, 12)}}),  # cross-attention
        ((q, q.clone(), q.clone(), 4), {"transformer_options": {}}),  # no latent recorded (not our run)
        ((q, q.clone(), q.clone(), 4), {}),  # no options at all
        ((q, q.clone()), {"transformer_options": {LATENT_KEY: (16, 12)}}),  # not q, k, v
        ((q[:, :64], q[:, :64].clone(), q[:, :64].clone(), 4), {"transformer_options": {LATENT_KEY: (8, 8)}}),
    ]
    for args, kwargs in cases:
        attention, calls = _record()
        override(attention, *args, **kwargs)
        assert calls[0][0][0] is args[0] and calls[0][1] == kwargs


def test_override_chains_the_previous_override_with_the_scaled_queries():
    inner, calls = _record()
    seen = []

    def previous(func, *args, **kwargs):
        seen.append(func)
        return func(*args, **kwargs)

    override = EntropyOverride((8, 8), 1, previous=previous)
    q = torch.randn(1, 256, 4)
    override(inner, q, q.clone(), q.clone(), 2, transformer_options={LATENT_KEY: (16, 16)})
    assert seen == [inner]
    assert torch.allclose(calls[0][0][0], q * math.sqrt(math.log(256) / math.log(64)), rtol=1e-6, atol=0)
